"""The paper's evaluation sets, read from local files in their published layouts.

Every loader returns an in-memory description (image paths, captions, caption→image map,
labels); nothing is downloaded. A missing file raises ``ProclipError`` naming the file and
where to put it. ``ingest(data, out)`` turns any of them into a tfds dataset through
``proclip_jax.data.builder`` (e.g. to precompute an embedding cache of the captions).

Layouts, the class-folder mapping rules and the official archives read here:
``docs/evaluation.md``.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import re
import tempfile
from typing import Mapping, Sequence

import numpy as np

from proclip_jax.errors import ProclipError

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ZERO_SHOT_SETS = ("food101", "cifar10", "cifar100", "sun397", "cars", "aircraft", "dtd", "pets",
                  "caltech101", "flowers", "imagenet")
SHAREGPT4V_JSON = "share-captioner_coco_lcs_sam_1246k_1107.json"
DOCCI_JSONL = "docci_descriptions.jsonlines"


# --------------------------------------------------------------------------- containers

@dataclasses.dataclass
class RetrievalData:
  """Image-text retrieval: ``captions[t]`` describes ``images[txt_to_img[t]]``."""
  name: str
  images: list
  captions: list
  txt_to_img: np.ndarray

  def __post_init__(self):
    self.txt_to_img = np.asarray(self.txt_to_img, np.int32)
    if len(self.txt_to_img) != len(self.captions):
      raise ProclipError(f"{self.name}: {len(self.captions)} captions but "
                         f"{len(self.txt_to_img)} caption→image entries.")

  def limit(self, n_images: int | None) -> "RetrievalData":
    """The first ``n_images`` images and their captions (a quick periodic eval)."""
    if n_images is None or n_images >= len(self.images):
      return self
    keep = self.txt_to_img < n_images
    return RetrievalData(self.name, self.images[:n_images],
                         [c for c, k in zip(self.captions, keep) if k], self.txt_to_img[keep])


@dataclasses.dataclass
class ClassificationData:
  """Zero-shot classification: ``labels[i]`` indexes ``class_names`` for ``images[i]``."""
  name: str
  images: list
  labels: np.ndarray
  class_names: list
  templates: list

  def __post_init__(self):
    self.labels = np.asarray(self.labels, np.int32)

  def limit(self, n_images: int | None) -> "ClassificationData":
    if n_images is None or n_images >= len(self.images):
      return self
    return ClassificationData(self.name, self.images[:n_images], self.labels[:n_images],
                              self.class_names, self.templates)


@dataclasses.dataclass
class MultilingualData:
  """Per-language retrieval over one image set: ``captions[lang]``, ``txt_to_img[lang]``."""
  name: str
  images: list
  captions: dict
  txt_to_img: dict

  def language(self, lang: str) -> RetrievalData:
    return RetrievalData(f"{self.name}/{lang}", self.images, self.captions[lang],
                         self.txt_to_img[lang])

  def limit(self, n_images: int | None) -> "MultilingualData":
    if n_images is None or n_images >= len(self.images):
      return self
    caps, t2i = {}, {}
    for lang in self.captions:
      sub = self.language(lang).limit(n_images)
      caps[lang], t2i[lang] = sub.captions, sub.txt_to_img
    return MultilingualData(self.name, self.images[:n_images], caps, t2i)


# --------------------------------------------------------------------------- shipped data

@functools.lru_cache(maxsize=None)
def _shipped(name: str):
  with open(os.path.join(DATA_DIR, name), encoding="utf-8") as f:
    return json.load(f)


def imagenet_templates() -> list:
  """The 80 OpenAI ImageNet prompt templates (``template.format(class_name)``)."""
  return list(_shipped("imagenet_templates.json"))


def class_names(dataset: str) -> list:
  """Shipped class names of one of ``ZERO_SHOT_SETS`` in the standard label order.

  Caltech101 has 102 names (OpenAI's list: ``background`` first, then the sorted
  ``101_ObjectCategories`` folders); a 101-folder copy without ``BACKGROUND_Google`` drops it.
  """
  names = _shipped("classnames.json")
  if dataset not in names:
    raise ProclipError(f"No shipped class names for {dataset!r}; known: {sorted(names)}. "
                       "Pass class_names= or put a classnames.txt beside the data.")
  return list(names[dataset])


# --------------------------------------------------------------------------- helpers

def _need(path: str, what: str, hint: str) -> str:
  if not os.path.exists(path):
    raise ProclipError(f"{what}: {path} does not exist. {hint}")
  return path


def _read_json(path: str, what: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ProclipError(f"{what}: {path} is not valid JSON ({e}).") from e


def _read_jsonl(path: str, what: str) -> list:
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ProclipError(f"{what}: line {n} of {path} is not valid JSON ({e}).") from e
  return rows


def _check_images(paths: Sequence[str], what: str, hint: str) -> None:
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise ProclipError(f"{what}: {len(missing)} of {len(paths)} images are missing, first "
                       f"{missing[0]}. {hint}")


def _one_caption_per_image(name, images, captions) -> RetrievalData:
  return RetrievalData(name, list(images), list(captions), np.arange(len(images)))


# --------------------------------------------------------------------------- retrieval

def load_karpathy(path: str, image_root: str | None = None, *, split: str = "test",
                  max_captions: int | None = 5, name: str | None = None) -> RetrievalData:
  """Flickr30k / COCO from a Karpathy-split JSON (layout in docs/evaluation.md)."""
  name = name or os.path.splitext(os.path.basename(path))[0].replace("dataset_", "")
  _need(path, name, "Download the Karpathy split JSON (dataset_flickr30k.json / "
        "dataset_coco.json) and put it there, with the images beside it.")
  entries = [e for e in _read_json(path, name).get("images", []) if e.get("split") == split]
  if not entries:
    raise ProclipError(f"{name}: {path} has no images of split {split!r} (expected "
                       "{'images': [{'split': 'test', 'filename', 'sentences'}, ...]}).")
  folder = os.path.dirname(os.path.abspath(path))
  first = os.path.join(entries[0].get("filepath", ""), entries[0]["filename"])
  roots = [image_root] if image_root else [os.path.join(folder, "flickr30k-images"),
                                           os.path.join(folder, "images"), folder]
  root = next((r for r in roots if os.path.isfile(os.path.join(r, first))), roots[0])
  images, captions, t2i = [], [], []
  for i, e in enumerate(entries):
    images.append(os.path.join(root, e.get("filepath", ""), e["filename"]))
    sents = [s["raw"].strip() for s in e.get("sentences", [])][:max_captions]
    if not sents:
      raise ProclipError(f"{name}: image {e['filename']} in {path} has no sentences.")
    captions += sents
    t2i += [i] * len(sents)
  _check_images(images, name, f"Put the images under {root} (as [filepath/]filename).")
  return RetrievalData(name, images, captions, t2i)


def load_sharegpt4v(path: str, image_root: str | None = None, *, n: int = 1000,
                    name: str = "sharegpt4v") -> RetrievalData:
  """ShareGPT4V-1k: the first ``n`` entries of the share-captioner COCO JSON."""
  _need(path, name, f"Download {SHAREGPT4V_JSON} (ShareGPT4V) and put it there; the "
        "images' 'image' paths are relative to its folder (or pass image_root).")
  data = _read_json(path, name)[:n]
  root = image_root or os.path.dirname(os.path.abspath(path))
  images, captions = [], []
  for e in data:
    conv = e.get("conversations", [])
    if len(conv) < 2 or "value" not in conv[1]:
      raise ProclipError(f"{name}: entry {e.get('id', e.get('image'))} of {path} has no "
                         "conversations[1].value caption.")
    images.append(os.path.join(root, e["image"]))
    captions.append(conv[1]["value"].strip())
  _check_images(images, name, f"Put the images under {root}.")
  return _one_caption_per_image(name, images, captions)


def load_urban1k(root: str, *, name: str = "urban1k") -> RetrievalData:
  """Urban-1k: ``root/image/X.jpg`` with ``root/caption/X.txt``."""
  img_dir, cap_dir = os.path.join(root, "image"), os.path.join(root, "caption")
  for d in (img_dir, cap_dir):
    _need(d, name, "Download Urban1k and unpack it so that image/ and caption/ are there.")
  stems = {os.path.splitext(f)[0]: f for f in os.listdir(img_dir)
           if f.lower().endswith(IMAGE_EXTENSIONS)}
  caps = sorted(f for f in os.listdir(cap_dir) if f.endswith(".txt"))
  images, captions = [], []
  for f in caps:
    stem = os.path.splitext(f)[0]
    if stem not in stems:
      raise ProclipError(f"{name}: caption {os.path.join(cap_dir, f)} has no image "
                         f"{stem}.jpg in {img_dir}.")
    with open(os.path.join(cap_dir, f), encoding="utf-8") as fh:
      captions.append(fh.read().strip())
    images.append(os.path.join(img_dir, stems[stem]))
  if not images:
    raise ProclipError(f"{name}: no caption .txt files in {cap_dir}.")
  return _one_caption_per_image(name, images, captions)


def load_docci(path: str, image_root: str | None = None, *, split: str = "test",
               name: str = "docci") -> RetrievalData:
  """DOCCI: the descriptions JSONL, rows of ``split``, images in ``images/``."""
  _need(path, name, f"Download {DOCCI_JSONL} and the images (images/) of DOCCI there.")
  rows = [r for r in _read_jsonl(path, name) if r.get("split") == split]
  if not rows:
    raise ProclipError(f"{name}: {path} has no rows of split {split!r}.")
  root = image_root or os.path.join(os.path.dirname(os.path.abspath(path)), "images")
  images = [os.path.join(root, r["image_file"]) for r in rows]
  _check_images(images, name, f"Put the DOCCI images under {root}.")
  return _one_caption_per_image(name, images, [r["description"].strip() for r in rows])


def load_dci(root: str, *, name: str = "dci") -> RetrievalData:
  """DCI: every split of ``splits.json``; caption = short_caption + newline + extra_caption."""
  base = os.path.join(root, "densely_captioned_images")
  base = base if os.path.isdir(base) else root
  splits_file = _need(os.path.join(base, "splits.json"), name,
                      "Download DCI (densely_captioned_images/ with splits.json, "
                      "annotations/ and photos/) there.")
  files = [f for v in _read_json(splits_file, name).values() for f in v]
  images, captions = [], []
  for f in files:
    ann_path = _need(os.path.join(base, "annotations", f), name,
                     "The annotation listed in splits.json is missing.")
    ann = _read_json(ann_path, name)
    images.append(os.path.join(base, "photos", ann["image"]))
    captions.append(f"{ann['short_caption'].strip()}\n{ann['extra_caption'].strip()}")
  _check_images(images, name, f"Put the DCI photos under {os.path.join(base, 'photos')}.")
  return _one_caption_per_image(name, images, captions)


def load_xm3600(path: str, image_root: str | None = None, *,
                languages: Sequence[str] | None = None, name: str = "xm3600"
                ) -> MultilingualData:
  """XM3600: ``captions.jsonl`` with per-language caption lists; images ``images/KEY.jpg``."""
  _need(path, name, "Download XM3600's captions.jsonl and images/ there.")
  rows = _read_jsonl(path, name)
  if not rows:
    raise ProclipError(f"{name}: {path} is empty.")
  root = image_root or os.path.join(os.path.dirname(os.path.abspath(path)), "images")
  langs = sorted(k for k, v in rows[0].items() if isinstance(v, Mapping) and "caption" in v)
  if languages is not None:
    unknown = sorted(set(languages) - set(langs))
    if unknown:
      raise ProclipError(f"{name}: languages {unknown} are not in {path} (it has {langs}).")
    langs = list(languages)
  images = []
  captions = {l: [] for l in langs}
  t2i = {l: [] for l in langs}
  for i, r in enumerate(rows):
    key = r.get("image/key")
    if key is None:
      raise ProclipError(f"{name}: line {i + 1} of {path} has no 'image/key'.")
    images.append(os.path.join(root, f"{key}.jpg"))
    for l in langs:
      caps = [c.strip() for c in r.get(l, {}).get("caption", []) if c.strip()]
      captions[l] += caps
      t2i[l] += [i] * len(caps)
  _check_images(images, name, f"Put the XM3600 images under {root} as KEY.jpg.")
  return MultilingualData(name, images, captions,
                          {l: np.asarray(v, np.int32) for l, v in t2i.items()})



# Sets whose official numeric class ids start at 1: Oxford Flowers-102 (imagelabels.mat),
# Stanford Cars (the devkit's class ids), Oxford-IIIT Pets (CLASS-ID of annotations/*.txt).
# Integer-named class folders of every other set count from 0 (CIFAR's label bytes, the
# torchvision / tfds label order).
FIRST_INDEX = {"flowers": 1, "cars": 1, "pets": 1}
INDEX_FILE = "classes.txt"


def class_folders(dataset: str | None) -> list | None:
  """Official folder names of ``dataset`` in label order, where they are not its class names
  (ImageNet's WordNet ids, Caltech101's ``101_ObjectCategories`` folders); else None."""
  table = _shipped("class_folders.json")
  return list(table[dataset]) if dataset in table and not dataset.startswith("_") else None


def _norm(text: str) -> str:
  """Case, underscores, slashes and runs of spaces ignored: ``Golden_Retriever`` ->
  ``golden retriever``."""
  return " ".join(re.sub(r"[_/]+", " ", str(text)).lower().split())


def _loose(text: str) -> str:
  """Letters and digits only (``Ram C-V Cargo Van`` matches ``Ram C/V Cargo Van``)."""
  return re.sub(r"[^0-9a-z]+", "", str(text).lower())


def _name_index(names: Sequence[str], dataset: str | None) -> tuple[dict, dict]:
  """Lookup tables ``{normalised name: index}`` (exact and loose) over the class names and
  the shipped official folder names of ``dataset``; keys shared by two classes are left out."""
  exact, loose, seen_e, seen_l = {}, {}, set(), set()
  keys = [(i, n) for i, n in enumerate(names)]
  folders = class_folders(dataset)
  if folders is not None and len(folders) == len(names):
    keys += list(enumerate(folders))
  for i, n in keys:
    for table, seen, key in ((exact, seen_e, _norm(n)), (loose, seen_l, _loose(n))):
      if key in table and table[key] != i:
        seen.add(key)
      table.setdefault(key, i)
  return ({k: v for k, v in exact.items() if k not in seen_e},
          {k: v for k, v in loose.items() if k not in seen_l})


def map_classes(folders: Sequence[str], names: Sequence[str], *, dataset: str | None = None,
                first_index: int | None = None, what: str = "class folders",
                where: str = "", name: str = "", fix: str = "") -> list[int]:
  """The class index of each entry of ``folders`` (folder names or label strings).

  Tried in order, the first rule that maps every entry wins:

  1. by name: equal to a class name, or to the shipped official folder name of the class
     (ImageNet WordNet id ``n01440764``, Caltech101 ``Faces_easy``), ignoring case,
     underscores, slashes and spaces (then, if still unmatched, all punctuation);
  2. by number: every entry an integer; ``int(entry) - first_index`` with ``first_index`` the
     set's documented convention (``FIRST_INDEX``, else 0); numeric value, never a text sort.

  Anything else raises ``ProclipError`` naming the entries that do not map and the fix.
  """
  n = len(names)
  exact, loose = _name_index(names, dataset)
  by_name = [exact.get(_norm(f), loose.get(_loose(f))) for f in folders]
  label = f"{name}: " if name else ""
  if all(i is not None for i in by_name):
    dup = _duplicates(folders, by_name)
    if dup:
      raise ProclipError(f"{label}{what} {dup} {where}name the same class; keep one. {fix}")
    return by_name
  if all(re.fullmatch(r"\d+", str(f)) for f in folders):
    base = FIRST_INDEX.get(dataset, 0) if first_index is None else int(first_index)
    idx = [int(f) - base for f in folders]
    bad = [f for f, i in zip(folders, idx) if not 0 <= i < n]
    if bad:
      raise ProclipError(
          f"{label}integer {what} {_few(bad)} {where}are outside {base}..{base + n - 1}, the "
          f"{n} classes counted from {base} ({dataset or 'this set'}'s convention). {fix or ''}"
          "Pass first_index= if they count from another number.")
    return idx
  unmapped = [f for f, i in zip(folders, by_name) if i is None]
  source = f"the shipped {dataset} names" if dataset in _shipped("classnames.json") else \
      "the given class names"
  wn = " or WordNet id" if class_folders(dataset) else ""
  raise ProclipError(
      f"{label}{len(unmapped)} of {len(folders)} {what} {where}match no class name{wn} of "
      f"{source} (case, '_' and spaces ignored) and are not all integers: {_few(unmapped)}. "
      f"{fix}")


def _few(items: Sequence, k: int = 5) -> str:
  items = list(items)
  more = f" (and {len(items) - k} more)" if len(items) > k else ""
  return ", ".join(repr(str(x)) for x in items[:k]) + more


def _duplicates(folders, idx) -> str:
  by = {}
  for f, i in zip(folders, idx):
    by.setdefault(i, []).append(f)
  clash = [v for v in by.values() if len(v) > 1]
  return _few(clash[0]) if clash else ""


def _index_fix(root: str) -> str:
  return (f"Fix: write {os.path.join(root, INDEX_FILE)} with one folder name per line in label "
          "order, or 'folder,class name' CSV lines (see docs/evaluation.md), or pass "
          "class_names whose entries equal the folder names.")


def read_index_file(path: str, what: str) -> tuple[list, list | None]:
  """A ``classes.txt``: ``(folders in label order, class names or None)``.

  One folder name per line, or ``folder,class name`` CSV rows (then the names come from it).
  """
  with open(path, newline="", encoding="utf-8") as f:
    rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
  if not rows:
    raise ProclipError(f"{what}: {path} is empty; write one folder name per line in label "
                       "order.")
  widths = {len(r) for r in rows}
  if widths == {1}:
    return [r[0].strip() for r in rows], None
  if widths == {2}:
    return [r[0].strip() for r in rows], [r[1].strip() for r in rows]
  bad = next(n for n, r in enumerate(rows, 1) if len(r) != len(rows[0]))
  raise ProclipError(f"{what}: line {bad} of {path} does not match the first line's "
                     "format; use one folder name per line, or 'folder,class name' on every "
                     "line (quote names with commas).")


def _resolve_names(root: str, dataset: str | None, class_names_arg) -> list | None:
  if class_names_arg is not None:
    return list(class_names_arg)
  for fname in ("classnames.txt", "classnames.json"):
    p = os.path.join(root, fname)
    if os.path.isfile(p):
      return read_class_names(p, dataset)
  if dataset is not None and dataset in _shipped("classnames.json"):
    return class_names(dataset)
  return None


def _read_string_list(path: str, dataset: str | None, what_items: str) -> list:
  """Stripped non-empty strings from a text file (one per line) or JSON: a list, or
  ``{set name: list}`` (CLIP_benchmark's files; our or its name of ``dataset`` looked up)."""
  what = dataset or path
  _need(path, what, f"Pass an existing file of {what_items} (one per line, or JSON).")
  if path.endswith(".json"):
    data = _read_json(path, what)
    if isinstance(data, Mapping):
      key = next((k for k in (dataset, CLIP_BENCHMARK_NAMES.get(dataset)) if k in data), None)
      if key is None:
        raise ProclipError(f"{what}: {path} maps set names to {what_items} but has no entry "
                           f"for {dataset!r} (it has {_few(sorted(data))}).")
      data = data[key]
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
      raise ProclipError(f"{what}: {path} must hold a JSON list of {what_items}.")
    out = [x.strip() for x in data if x.strip()]
  else:
    with open(path, encoding="utf-8") as f:
      out = [l.strip() for l in f if l.strip()]
  if not out:
    raise ProclipError(f"{what}: {path} holds no {what_items}.")
  return out


def read_class_names(path: str, dataset: str | None = None) -> list:
  """Class names from a file: text (one name per line, in label order) or JSON (a list, or
  ``{set name: list}`` as CLIP_benchmark's ``en_classnames.json``)."""
  return _read_string_list(path, dataset, "class names")


def read_templates(path: str, dataset: str | None = None) -> list:
  """Prompt templates from a file: text (one per line) or JSON (a list, or ``{set name:
  list}`` as CLIP_benchmark's templates files). ``{c}`` (CLIP_benchmark) is read as ``{}``;
  every template must hold the class-name slot exactly once."""
  raw = _read_string_list(path, dataset, "templates")
  out = [t.replace("{c}", "{}") for t in raw]
  bad = [t for t in out if t.count("{}") != 1]
  if bad:
    raise ProclipError(f"{dataset or path}: every template in {path} needs one '{{}}' (or "
                       f"'{{c}}') slot for the class name; not {_few(bad)}.")
  return out


def load_image_folder(root: str, *, dataset: str | None = None,
                      class_names: Sequence[str] | None = None,  # pylint: disable=redefined-outer-name
                      templates: Sequence[str] | None = None, first_index: int | None = None,
                      index_file: str | None = None) -> ClassificationData:
  """One folder per class under ``root``; each folder mapped to its class explicitly.

  The mapping (``docs/evaluation.md``): an index file (``index_file`` or ``root/classes.txt``)
  if there is one, else :func:`map_classes` (folder = class name or official folder name /
  WordNet id, else integer folders by the set's numbering convention). Class names:
  ``class_names``, else ``classnames.txt|json`` in ``root``, else the shipped list of
  ``dataset``, else the folder names (underscores as spaces, sorted; integer-named folders
  need names). Caltech101 without a ``BACKGROUND_Google`` folder drops the shipped
  ``background`` class.
  """
  name = dataset or os.path.basename(os.path.normpath(root))
  _need(root, name, "Put one folder of images per class there, or a labels.csv.")
  folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not folders:
    raise ProclipError(f"{name}: {root} has no class folders.")
  names = _resolve_names(root, dataset, class_names)
  index_file = index_file or os.path.join(root, INDEX_FILE)
  if os.path.isfile(index_file):
    order, listed = read_index_file(index_file, name)
    names = listed if listed is not None else names
    if names is None:
      names = [f.replace("_", " ") for f in order]
    if len(names) != len(order):
      raise ProclipError(f"{name}: {index_file} lists {len(order)} folders but there are "
                         f"{len(names)} class names; give one name per listed folder.")
    pos = {f: i for i, f in enumerate(order)}
    missing = [f for f in folders if f not in pos]
    if missing:
      raise ProclipError(f"{name}: class folders {_few(missing)} of {root} are not listed in "
                         f"{index_file}; add them (one folder name per line, in label order).")
    mapping = [pos[f] for f in folders]
  elif names is None:
    numeric = [f for f in folders if re.fullmatch(r"\d+", f)]
    if numeric:
      raise ProclipError(f"{name}: class folders {_few(numeric)} of {root} are numbers and "
                         "there are no class names to prompt with. Pass class_names (in "
                         "label order) or put a classnames.txt beside them.")
    names = [f.replace("_", " ") for f in folders]
    mapping = list(range(len(folders)))
  else:
    mapping = map_classes(folders, names, dataset=dataset, first_index=first_index,
                          where=f"in {root} ", name=name, fix=_index_fix(root))
    if dataset == "caltech101" and len(names) == 102 and 0 not in mapping:
      names, mapping = names[1:], [i - 1 for i in mapping]   # no BACKGROUND_Google folder
  images, labels = [], []
  for k, d in zip(mapping, folders):
    for f in sorted(os.listdir(os.path.join(root, d))):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        images.append(os.path.join(root, d, f))
        labels.append(k)
  if not images:
    raise ProclipError(f"{name}: no images in the class folders of {root}.")
  return ClassificationData(name, images, labels, list(names), _templates(templates))


def _templates(templates) -> list:
  return list(templates) if templates is not None else imagenet_templates()


def load_labels_csv(path: str, *, dataset: str | None = None,
                    class_names: Sequence[str] | None = None,  # pylint: disable=redefined-outer-name
                    templates: Sequence[str] | None = None, image_root: str | None = None
                    ) -> ClassificationData:
  """A ``path,label`` CSV (header optional); ``label`` an index or a class name."""
  name = dataset or os.path.basename(os.path.dirname(os.path.abspath(path)))
  _need(path, name, "Write a CSV of 'path,label' rows (paths relative to it) there.")
  root = image_root or os.path.dirname(os.path.abspath(path))
  names = _resolve_names(os.path.dirname(os.path.abspath(path)), dataset, class_names)
  with open(path, newline="", encoding="utf-8") as f:
    rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
  if rows and rows[0][:2] == ["path", "label"]:
    rows = rows[1:]
  images, raw = [], []
  for n, r in enumerate(rows, 1):
    if len(r) < 2:
      raise ProclipError(f"{name}: row {n} of {path} is not 'path,label': {r}.")
    images.append(os.path.join(root, r[0].strip()))
    raw.append(r[1].strip())
  if names is None:
    if not all(v.lstrip("-").isdigit() for v in raw):
      names = sorted(set(raw))
    else:
      raise ProclipError(f"{name}: {path} has integer labels but no class names; pass "
                         "class_names= or put a classnames.txt beside it.")
  index = {c: i for i, c in enumerate(names)}
  labels = []
  for n, v in enumerate(raw, 1):
    if v.lstrip("-").isdigit() and v not in index:
      k = int(v)
    elif v in index:
      k = index[v]
    else:
      raise ProclipError(f"{name}: row {n} of {path}: label {v!r} is not a class name or index.")
    if not 0 <= k < len(names):
      raise ProclipError(f"{name}: row {n} of {path}: label {k} outside [0, {len(names)}).")
    labels.append(k)
  _check_images(images, name, f"Paths in {path} are relative to {root}.")
  return ClassificationData(name, images, labels, names, _templates(templates))


def load_classification(root: str, *, dataset: str | None = None, **kwargs) -> ClassificationData:
  """``root/labels.csv`` if present, else class folders in ``root/test``, ``root/val`` or ``root``
  (a ``classes.txt`` in ``root`` serves the sub-folder too)."""
  csv_path = os.path.join(root, "labels.csv")
  if os.path.isfile(csv_path):
    kwargs.pop("first_index", None)
    kwargs.pop("index_file", None)
    return load_labels_csv(csv_path, dataset=dataset, **kwargs)
  for sub in ("test", "val", ""):
    d = os.path.join(root, sub) if sub else root
    if os.path.isdir(d) and any(os.path.isdir(os.path.join(d, x)) for x in os.listdir(d)):
      top = os.path.join(root, INDEX_FILE)
      if (kwargs.get("index_file") is None and not os.path.isfile(os.path.join(d, INDEX_FILE))
          and os.path.isfile(top)):
        kwargs["index_file"] = top
      return load_image_folder(d, dataset=dataset, **kwargs)
  raise ProclipError(f"{dataset or root}: no labels.csv and no class folders under {root} "
                     "(test/, val/ or the folder itself). Put the evaluation images there.")


# --------------------------------------------------------------------------- official layouts

def _base(root: str, marker: str, top: str) -> str | None:
  """``root`` or ``root/top`` (the archive's own folder), whichever holds ``marker``."""
  for b in (root, os.path.join(root, top)):
    if os.path.exists(os.path.join(b, marker)):
      return b
  return None


def _read_lines(path: str) -> list:
  with open(path, encoding="utf-8") as f:
    return [l.strip() for l in f if l.strip() and not l.lstrip().startswith("#")]


def _names_for(dataset: str, class_names_arg) -> list:
  return list(class_names_arg) if class_names_arg is not None else class_names(dataset)


def load_food101(root: str, *, split: str = "test", name: str = "food101",
                 class_names: Sequence[str] | None = None,  # pylint: disable=redefined-outer-name
                 templates: Sequence[str] | None = None) -> ClassificationData:
  """Food-101 as published: ``food-101/meta/{split}.txt`` (``class_folder/image_id`` lines)
  and ``food-101/images/class_folder/image_id.jpg``; folders mapped to the class names by
  name (``apple_pie`` -> ``apple pie``)."""
  base = _base(root, os.path.join("meta", f"{split}.txt"), "food-101")
  if base is None:
    raise ProclipError(f"{name}: no meta/{split}.txt under {root} or {root}/food-101. Unpack "
                       "food-101.tar.gz there (food-101/meta/, food-101/images/).")
  lines = _read_lines(os.path.join(base, "meta", f"{split}.txt"))
  pairs = [l.split("/", 1) for l in lines]
  bad = [l for l, p in zip(lines, pairs) if len(p) != 2]
  if bad or not lines:
    raise ProclipError(f"{name}: meta/{split}.txt of {base} must hold 'class_folder/image_id' "
                       f"lines; {_few(bad) if bad else 'it is empty'}.")
  folders = sorted({p[0] for p in pairs})
  names = _names_for("food101", class_names)
  idx = dict(zip(folders, map_classes(folders, names, dataset="food101", name=name,
                                      where=f"in {base}/meta/{split}.txt ",
                                      fix="Pass class_names matching the folders.")))
  images = [os.path.join(base, "images", f"{l}.jpg") for l in lines]
  _check_images(images, name, f"Put the images under {os.path.join(base, 'images')}.")
  return ClassificationData(name, images, [idx[p[0]] for p in pairs], names,
                            _templates(templates))


def _sun_class(path: str) -> str:
  """``/a/apartment_building/outdoor`` -> ``apartment_building/outdoor`` (the letter dropped)."""
  parts = [p for p in path.strip().split("/") if p]
  return "/".join(parts[1:] if len(parts) > 1 and len(parts[0]) == 1 else parts)


def load_sun397(root: str, *, partition: int = 1, name: str = "sun397",
                class_names: Sequence[str] | None = None,  # pylint: disable=redefined-outer-name
                templates: Sequence[str] | None = None) -> ClassificationData:
  """SUN397 as published: ``SUN397/x/class[/sub]/*.jpg`` with ``ClassName.txt``
  (``/a/abbey`` lines); the test images of ``Partitions/Testing_0N.txt`` (``/a/abbey/sun_x.jpg``
  lines; beside or inside ``SUN397/``) when present, else every image of every class."""
  base = None
  for b in (root, os.path.join(root, "SUN397")):
    if any(os.path.isfile(os.path.join(b, *p, "ClassName.txt")) for p in ((), ("Partitions",))):
      base = b
      break
  if base is None:
    raise ProclipError(f"{name}: no ClassName.txt under {root} or {root}/SUN397. Unpack "
                       "SUN397.tar.gz there (and optionally Partitions.zip beside it).")
  parts_dirs = [os.path.join(base, "Partitions"),
                os.path.join(os.path.dirname(os.path.abspath(base)), "Partitions"), base]
  class_file = next(os.path.join(d, "ClassName.txt") for d in (base, *parts_dirs)
                    if os.path.isfile(os.path.join(d, "ClassName.txt")))
  classes = [_sun_class(l) for l in _read_lines(class_file)]
  names = _names_for("sun397", class_names)
  idx = dict(zip(classes, map_classes(classes, names, dataset="sun397", name=name,
                                      what="classes", where=f"of {class_file} ",
                                      fix="Pass class_names matching them.")))
  test = next((os.path.join(d, f"Testing_{partition:02d}.txt") for d in parts_dirs
               if os.path.isfile(os.path.join(d, f"Testing_{partition:02d}.txt"))), None)
  images, labels = [], []
  if test is not None:
    for l in _read_lines(test):
      cls = _sun_class(os.path.dirname(l))
      if cls not in idx:
        raise ProclipError(f"{name}: {test} lists {l}, whose class {cls!r} is not in "
                           f"{class_file}.")
      images.append(os.path.join(base, l.lstrip("/")))
      labels.append(idx[cls])
  else:
    for l in _read_lines(class_file):
      d = os.path.join(base, l.strip().lstrip("/"))
      _need(d, name, f"{class_file} lists it; unpack SUN397.tar.gz in {base}.")
      for f in sorted(os.listdir(d)):
        if f.lower().endswith(IMAGE_EXTENSIONS):
          images.append(os.path.join(d, f))
          labels.append(idx[_sun_class(l)])
  if not images:
    raise ProclipError(f"{name}: no test images found under {base}.")
  _check_images(images, name, f"Unpack SUN397.tar.gz in {base}.")
  return ClassificationData(name, images, labels, names, _templates(templates))


def load_pets(root: str, *, split: str = "test", name: str = "pets",
              class_names: Sequence[str] | None = None,  # pylint: disable=redefined-outer-name
              templates: Sequence[str] | None = None) -> ClassificationData:
  """Oxford-IIIT Pets as published: ``annotations/{split}.txt`` rows ``Image CLASS-ID SPECIES
  BREED-ID`` (CLASS-ID counts from 1) and ``images/Image.jpg``. The breed in the file name
  (``american_bulldog_100``) names the class; CLASS-ID must agree with it."""
  base = _base(root, os.path.join("annotations", f"{split}.txt"), "oxford-iiit-pet")
  if base is None:
    raise ProclipError(f"{name}: no annotations/{split}.txt under {root} or "
                       f"{root}/oxford-iiit-pet. Unpack images.tar.gz and annotations.tar.gz "
                       "there.")
  path = os.path.join(base, "annotations", f"{split}.txt")
  rows = [l.split() for l in _read_lines(path)]
  bad = [" ".join(r) for r in rows if len(r) < 2 or not r[1].isdigit()]
  if bad or not rows:
    raise ProclipError(f"{name}: {path} must hold 'Image CLASS-ID SPECIES BREED-ID' rows; "
                       f"{_few(bad) if bad else 'it is empty'}.")
  names = _names_for("pets", class_names)
  breeds = sorted({r[0].rsplit("_", 1)[0] for r in rows})
  idx = dict(zip(breeds, map_classes(breeds, names, dataset="pets", name=name,
                                     what="breeds", where=f"of {path} ",
                                     fix="Pass class_names matching the breeds.")))
  images, labels, by_id = [], [], {}
  for r in rows:
    k = idx[r[0].rsplit("_", 1)[0]]
    if by_id.setdefault(int(r[1]), k) != k:
      raise ProclipError(f"{name}: {path}: CLASS-ID {r[1]} is given to breeds "
                         f"{names[by_id[int(r[1])]]!r} and {names[k]!r}; the file is corrupt.")
    images.append(os.path.join(base, "images", f"{r[0]}.jpg"))
    labels.append(k)
  _check_images(images, name, f"Put the images under {os.path.join(base, 'images')}.")
  return ClassificationData(name, images, labels, names, _templates(templates))


def load_aircraft(root: str, *, split: str = "test", name: str = "aircraft",
                  class_names: Sequence[str] | None = None,  # pylint: disable=redefined-outer-name
                  templates: Sequence[str] | None = None) -> ClassificationData:
  """FGVC-Aircraft (2013b) as published, variant level: ``data/images_variant_{split}.txt``
  rows ``IMAGE_ID VARIANT NAME`` (the name may hold spaces), ``data/variants.txt`` (one
  variant per line) and ``data/images/IMAGE_ID.jpg``."""
  rel = os.path.join("data", f"images_variant_{split}.txt")
  base = _base(root, rel, "fgvc-aircraft-2013b")
  if base is None:
    raise ProclipError(f"{name}: no {rel} under {root} or {root}/fgvc-aircraft-2013b. Unpack "
                       "fgvc-aircraft-2013b.tar.gz there.")
  variants_file = _need(os.path.join(base, "data", "variants.txt"), name,
                        "It is part of fgvc-aircraft-2013b.tar.gz.")
  variants = _read_lines(variants_file)
  names = _names_for("aircraft", class_names)
  idx = dict(zip(variants, map_classes(variants, names, dataset="aircraft", name=name,
                                       what="variants", where=f"of {variants_file} ",
                                       fix="Pass class_names matching them.")))
  images, labels = [], []
  for l in _read_lines(os.path.join(base, rel)):
    image_id, _, variant = l.partition(" ")
    variant = variant.strip()
    if variant not in idx:
      raise ProclipError(f"{name}: {rel} row {l!r}: variant {variant!r} is not in "
                         f"{variants_file}.")
    images.append(os.path.join(base, "data", "images", f"{image_id}.jpg"))
    labels.append(idx[variant])
  if not images:
    raise ProclipError(f"{name}: {os.path.join(base, rel)} is empty.")
  _check_images(images, name, f"Put the images under {os.path.join(base, 'data', 'images')}.")
  return ClassificationData(name, images, labels, names, _templates(templates))


OFFICIAL_LAYOUTS = {
    # set: (loader, marker file under the set's folder, the archive's own top folder)
    "food101": (load_food101, os.path.join("meta", "test.txt"), "food-101"),
    "sun397": (load_sun397, "ClassName.txt", "SUN397"),
    "pets": (load_pets, os.path.join("annotations", "test.txt"), "oxford-iiit-pet"),
    "aircraft": (load_aircraft, os.path.join("data", "images_variant_test.txt"),
                 "fgvc-aircraft-2013b"),
}


# --------------------------------------------------------------------------- by name

# Our set names -> CLIP_benchmark's dataset names (accepted as aliases everywhere).
CLIP_BENCHMARK_NAMES = {
    "imagenet": "imagenet1k", "cifar10": "cifar10", "cifar100": "cifar100",
    "food101": "food101", "sun397": "sun397", "cars": "cars", "aircraft": "fgvc_aircraft",
    "dtd": "dtd", "pets": "vtab/pets", "caltech101": "vtab/caltech101",
    "flowers": "vtab/flowers", "flickr30k": "flickr30k", "coco": "mscoco_captions",
}
ALIASES = {**{v: k for k, v in CLIP_BENCHMARK_NAMES.items()},
           "vtab/dtd": "dtd", "vtab/cifar10": "cifar10", "vtab/cifar100": "cifar100",
           "imagenet-1k": "imagenet", "fgvc-aircraft": "aircraft", "oxford_pets": "pets",
           "flowers102": "flowers", "stanford_cars": "cars", "mscoco": "coco"}


def canonical_name(name: str) -> str:
  """Our name of a set given ours or CLIP_benchmark's (``vtab/flowers`` -> ``flowers``)."""
  return ALIASES.get(name, name)


def default_path(name: str, data_root: str) -> str:
  """Where a named set is looked for under ``data_root``: ``data_root/NAME`` (for Food-101,
  SUN397, Pets and FGVC-Aircraft also the archive's own folder name, e.g. ``food-101``)."""
  paths = {
      "flickr30k": ("flickr30k", "dataset_flickr30k.json"),
      "coco": ("coco", "dataset_coco.json"),
      "sharegpt4v": ("sharegpt4v", SHAREGPT4V_JSON),
      "urban1k": ("Urban1k",),
      "docci": ("docci", DOCCI_JSONL),
      "dci": ("dci",),
      "xm3600": ("xm3600", "captions.jsonl"),
  }
  name = canonical_name(name)
  first = os.path.join(data_root, *paths.get(name, (name,)))
  if name in OFFICIAL_LAYOUTS and not os.path.exists(first):
    own = os.path.join(data_root, OFFICIAL_LAYOUTS[name][2])
    if os.path.exists(own):
      return own
  return first


def _has_official_layout(name: str, path: str) -> bool:
  _, marker, top = OFFICIAL_LAYOUTS[name]
  markers = (marker, os.path.join("Partitions", "ClassName.txt")) if name == "sun397" else (
      marker,)
  return any(_base(path, m, top) is not None for m in markers)


def load(name: str, data_root: str | None = None, path: str | None = None, **kwargs):
  """A named set (``flickr30k``, ``coco``, ..., ``xm3600`` or one of ``ZERO_SHOT_SETS``, or
  CLIP_benchmark's name of one). ``kwargs`` go to a classification loader (``class_names``,
  ``templates``, ``first_index``)."""
  name = canonical_name(name)
  if path is None:
    if data_root is None:
      raise ProclipError(f"Evaluation {name!r} needs --data-root (or a path for it).")
    path = default_path(name, data_root)
  if name in ("flickr30k", "coco"):
    return load_karpathy(path, name=name)
  loaders = {"sharegpt4v": load_sharegpt4v, "urban1k": load_urban1k, "docci": load_docci,
             "dci": load_dci, "xm3600": load_xm3600}
  if name in loaders:
    return loaders[name](path)
  if name in OFFICIAL_LAYOUTS and _has_official_layout(name, path):
    kwargs.pop("first_index", None)
    return OFFICIAL_LAYOUTS[name][0](path, name=name, **kwargs)
  if name in ZERO_SHOT_SETS:
    return load_classification(path, dataset=name, **kwargs)
  raise ProclipError(f"Unknown evaluation set {name!r}.")


def load_retrieval_csv(path: str, *, name: str | None = None,
                       image_root: str | None = None) -> RetrievalData:
  """A ``image,caption`` CSV (header optional; several rows per image allowed); paths
  relative to the CSV (or ``image_root``)."""
  name = name or os.path.splitext(os.path.basename(path))[0]
  _need(path, name, "Write a CSV of 'image,caption' rows (paths relative to it) there.")
  root = image_root or os.path.dirname(os.path.abspath(path))
  with open(path, newline="", encoding="utf-8") as f:
    rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
  if rows and [c.strip().lower() for c in rows[0][:2]] in (["image", "caption"],
                                                           ["path", "caption"]):
    rows = rows[1:]
  images, index, captions, t2i = [], {}, [], []
  for n, r in enumerate(rows, 1):
    if len(r) != 2 or not r[1].strip():
      raise ProclipError(f"{name}: row {n} of {path} is not 'image,caption' (quote captions "
                         f"that hold commas): {r}.")
    img = os.path.join(root, r[0].strip())
    if img not in index:
      index[img] = len(images)
      images.append(img)
    captions.append(r[1].strip())
    t2i.append(index[img])
  if not images:
    raise ProclipError(f"{name}: {path} has no 'image,caption' rows.")
  _check_images(images, name, f"Paths in {path} are relative to {root}.")
  return RetrievalData(name, images, captions, t2i)


def load_custom(name: str, task: str, path: str, **kwargs):
  """A user set under its own ``name``: ``task`` ``zeroshot_classification`` (a class-folder
  tree or a ``labels.csv``; ``kwargs`` as :func:`load_image_folder`) or
  ``zeroshot_retrieval`` (a Karpathy-split JSON or an ``image,caption`` CSV)."""
  if task == "zeroshot_classification":
    if os.path.isfile(path) and path.endswith(".csv"):
      kwargs.pop("first_index", None)
      kwargs.pop("index_file", None)
      return load_labels_csv(path, dataset=name, **kwargs)
    _need(path, name, "Give a folder of class folders, or a labels.csv.")
    data = load_classification(path, dataset=None, **kwargs)
    data.name = name
    return data
  if task == "zeroshot_retrieval":
    if kwargs:
      raise ProclipError(f"{name}: class names and templates apply to classification sets "
                         "only.")
    if path.endswith(".csv"):
      return load_retrieval_csv(path, name=name)
    if path.endswith(".json"):
      return load_karpathy(path, name=name)
    raise ProclipError(f"{name}: a retrieval set is a Karpathy-split .json or an "
                       f"'image,caption' .csv; got {path}.")
  raise ProclipError(f"{name}: unknown task {task!r}; use zeroshot_classification or "
                     "zeroshot_retrieval.")


# --------------------------------------------------------------------------- ingestion

def ingest(data, out: str, **build_kwargs):
  """Writes ``data`` as a tfds dataset through ``proclip_jax.data.builder.build_dataset``.

  Retrieval sets get one example per caption (field ``caption``, int field ``image_index``);
  classification sets one per image (``caption`` = class name, ``label``); a multilingual
  set one per caption with ``lang``. Returns the builder's ``BuildResult``.
  """
  from proclip_jax.data import builder  # pylint: disable=import-outside-toplevel
  if isinstance(data, RetrievalData):
    rows = [{"image": data.images[i], "caption": c, "image_index": int(i)}
            for c, i in zip(data.captions, data.txt_to_img)]
    ints = ("image_index",)
  elif isinstance(data, ClassificationData):
    rows = [{"image": p, "caption": data.class_names[k], "label": int(k)}
            for p, k in zip(data.images, data.labels)]
    ints = ("label",)
  elif isinstance(data, MultilingualData):
    rows = [{"image": data.images[i], "caption": c, "image_index": int(i), "lang": lang}
            for lang in data.captions
            for c, i in zip(data.captions[lang], data.txt_to_img[lang])]
    ints = ("image_index",)
  else:
    raise ProclipError(f"ingest: cannot ingest a {type(data).__name__}.")
  with tempfile.TemporaryDirectory() as tmp:
    manifest = os.path.join(tmp, "manifest.jsonl")
    with open(manifest, "w", encoding="utf-8") as f:
      for r in rows:
        r["image"] = os.path.abspath(r["image"])
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    build_kwargs.setdefault("progress", False)
    return builder.build_dataset(manifest, out, split=build_kwargs.pop("split", "test"),
                                 fields=("caption",), int_fields=ints, **build_kwargs)
