"""The paper's evaluation sets, read from local files in their published layouts.

Every loader returns an in-memory description (image paths, captions, caption→image map,
labels); nothing is downloaded. A missing file raises ``ProclipError`` naming the file and
where to put it. ``ingest(data, out)`` turns any of them into a tfds dataset through
``proclip_jax.data.builder`` (e.g. to precompute an embedding cache of the captions).

Layouts (``ROOT`` is ``--data-root``; the default sub-folder of each set in brackets):

* **Flickr30k / COCO, Karpathy split** [``flickr30k/``, ``coco/``]: ``dataset_flickr30k.json`` /
  ``dataset_coco.json`` = ``{"images": [{"filename", "filepath" (COCO only), "split",
  "sentences": [{"raw"}, ...]}, ...]}``. Image ``IMAGES/[filepath/]filename`` with ``IMAGES``
  the first of ``flickr30k-images/``, ``images/`` or the JSON's folder that holds it. Split
  ``test`` (1k / 5k images), the first ``max_captions`` (5) sentences per image.
* **ShareGPT4V-1k** [``sharegpt4v/``]: the share-captioner JSON
  (``share-captioner_coco_lcs_sam_1246k_1107.json``): a list of ``{"image": "coco/...jpg",
  "conversations": [{"from": "human"}, {"from": "gpt", "value": CAPTION}]}``; the first 1000
  entries, images relative to the JSON's folder.
* **Urban-1k** [``Urban1k/``]: ``image/NAME.jpg`` and ``caption/NAME.txt`` (one caption per
  image, matched by file stem).
* **DOCCI** [``docci/``]: ``docci_descriptions.jsonlines`` (one JSON object per line:
  ``example_id``, ``split``, ``image_file``, ``description``), images in ``images/``; split
  ``test`` (5k).
* **DCI** [``dci/``]: ``densely_captioned_images/splits.json`` (``{split: [annotation file,
  ...]}``; all splits, 7805 images), ``annotations/*.json`` (``image``, ``short_caption``,
  ``extra_caption``, ``summaries``) and ``photos/``; the caption is
  ``short_caption + "\\n" + extra_caption`` (the long-text retrieval protocol).
* **Zero-shot classification** [``imagenet/``, ``cifar10/``, ...]: either a folder per class
  (``ROOT/NAME/{test,val,}/CLASS/*.jpg``; classes in sorted folder order, which is the
  standard label order of the shipped class names, e.g. ImageNet's sorted wnids) or a labels
  file ``labels.csv`` (``path,label`` rows, ``label`` an index or a class name; paths relative
  to the CSV). Class names: the shipped lists (``data/classnames.json``: the 11 sets of the
  paper) or a ``classnames.txt`` / ``classnames.json`` beside the data; templates: the 80
  OpenAI ImageNet templates (``data/imagenet_templates.json``).
* **XM3600** [``xm3600/``]: ``captions.jsonl``, one line per image: ``{"image/key": KEY,
  LANG: {"caption": [...], ...}, ...}`` (36 languages); images ``images/KEY.jpg``.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
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
  """Flickr30k / COCO from a Karpathy-split JSON (see the module docstring)."""
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


# --------------------------------------------------------------------------- classification

def _resolve_names(root: str, dataset: str | None, class_names_arg) -> list | None:
  if class_names_arg is not None:
    return list(class_names_arg)
  for fname in ("classnames.txt", "classnames.json"):
    p = os.path.join(root, fname)
    if os.path.isfile(p):
      if fname.endswith(".json"):
        return list(_read_json(p, dataset or root))
      with open(p, encoding="utf-8") as f:
        return [l.strip() for l in f if l.strip()]
  if dataset is not None and dataset in _shipped("classnames.json"):
    return class_names(dataset)
  return None


def load_image_folder(root: str, *, dataset: str | None = None,
                      class_names: Sequence[str] | None = None,  # pylint: disable=redefined-outer-name
                      templates: Sequence[str] | None = None) -> ClassificationData:
  """One folder per class under ``root``; label = index in sorted folder order.

  Class names: ``class_names``, else ``classnames.txt|json`` in ``root``, else the shipped
  list of ``dataset``, else the folder names (underscores as spaces).
  """
  name = dataset or os.path.basename(os.path.normpath(root))
  _need(root, name, "Put one folder of images per class there, or a labels.csv.")
  folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not folders:
    raise ProclipError(f"{name}: {root} has no class folders.")
  names = _resolve_names(root, dataset, class_names)
  if names is not None and len(names) == len(folders) + 1 and names[0] == "background":
    names = names[1:]  # Caltech101 without BACKGROUND_Google
  if names is None:
    names = [d.replace("_", " ") for d in folders]
  if len(names) != len(folders):
    raise ProclipError(f"{name}: {root} has {len(folders)} class folders but {len(names)} "
                       "class names; pass the matching class_names.")
  images, labels = [], []
  for k, d in enumerate(folders):
    for f in sorted(os.listdir(os.path.join(root, d))):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        images.append(os.path.join(root, d, f))
        labels.append(k)
  if not images:
    raise ProclipError(f"{name}: no images in the class folders of {root}.")
  return ClassificationData(name, images, labels, names,
                            list(templates) if templates is not None else imagenet_templates())


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
  return ClassificationData(name, images, labels, names,
                            list(templates) if templates is not None else imagenet_templates())


def load_classification(root: str, *, dataset: str | None = None, **kwargs) -> ClassificationData:
  """``root/labels.csv`` if present, else class folders in ``root/test``, ``root/val`` or ``root``."""
  csv_path = os.path.join(root, "labels.csv")
  if os.path.isfile(csv_path):
    return load_labels_csv(csv_path, dataset=dataset, **kwargs)
  for sub in ("test", "val", ""):
    d = os.path.join(root, sub) if sub else root
    if os.path.isdir(d) and any(os.path.isdir(os.path.join(d, x)) for x in os.listdir(d)):
      return load_image_folder(d, dataset=dataset, **kwargs)
  raise ProclipError(f"{dataset or root}: no labels.csv and no class folders under {root} "
                     "(test/, val/ or the folder itself). Put the evaluation images there.")


# --------------------------------------------------------------------------- by name

def default_path(name: str, data_root: str) -> str:
  """Where a named set is looked for under ``data_root``."""
  paths = {
      "flickr30k": ("flickr30k", "dataset_flickr30k.json"),
      "coco": ("coco", "dataset_coco.json"),
      "sharegpt4v": ("sharegpt4v", SHAREGPT4V_JSON),
      "urban1k": ("Urban1k",),
      "docci": ("docci", DOCCI_JSONL),
      "dci": ("dci",),
      "xm3600": ("xm3600", "captions.jsonl"),
  }
  return os.path.join(data_root, *paths.get(name, (name,)))


def load(name: str, data_root: str | None = None, path: str | None = None):
  """A named set (``flickr30k``, ``coco``, ..., ``xm3600`` or one of ``ZERO_SHOT_SETS``)."""
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
  if name in ZERO_SHOT_SETS:
    return load_classification(path, dataset=name)
  raise ProclipError(f"Unknown evaluation set {name!r}.")


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
