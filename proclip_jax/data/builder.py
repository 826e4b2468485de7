"""Ingestion: image-text pairs -> a tensorflow-datasets dataset of ArrayRecord files.

Sources:

* a **JSONL or CSV manifest**: one example per line/row; an image column (``image``,
  ``image_path``, ``path``, ``file_name`` or ``filename``; paths relative to the manifest's
  folder), one or more caption columns (default: whichever of ``caption``, ``short``,
  ``long``, ``raw``, ``text`` exist), optional ``lang``, optional ``split`` (one split per
  value, unless ``split=`` is given), optional integer ``id``; integer columns named in
  ``int_fields`` (default ``label``) are stored as int64, every other string column is kept
  as a text field.
* a **folder of webdataset ``.tar`` shards** as img2dataset writes them: members ``KEY.jpg``
  (or png/webp/...) with ``KEY.txt`` and/or ``KEY.json``; the txt is the ``caption`` field,
  the json's ``caption`` is used when there is no txt, and the json's other string values
  become fields; the webdataset key is kept as ``key``.
* a mapping ``{split: source}`` (each a manifest or a shard folder) for one source per split.

Output ``OUT`` is a tfds dataset folder (``dataset_info.json``, ``features.json``,
``metadata.json``, ``NAME-SPLIT.array_record-*``) that reads without TensorFlow::

  tfds.builder_from_directory(OUT).as_data_source("train")[i]
  # {"id": int64, "image": bytes, "short": bytes (UTF-8), ..., "lang": bytes}

plus ``OUT/ingest_report.json`` (counts per split and per reason, every skipped example
with id, location and reason, ignored columns).

Each example has a stable int64 ``id``: the manifest's ``id`` column when it has one,
otherwise the row's position (0-based, counted over every non-blank row, bad ones
included); for shards, the position of the example in (sorted shard name, member order).
With a ``{split: source}`` mapping the sources are numbered one after another in the order
given. The same input always gets the same ids; examples are stored in id order.

Images are validated: PIL must identify them, ``verify()`` and fully ``load()`` them;
width*height above ``max_pixels`` (and PIL's DecompressionBombError) is rejected. Storage
encoding: an RGB JPEG or RGB PNG keeps its original bytes; anything else (other modes, other
formats) is converted to RGB (see ``transforms.to_rgb``) and re-encoded as PNG (lossless).
Captions must be present, valid UTF-8 and non-empty after stripping. A bad example is
skipped and listed in the report; nothing else is dropped.

The build writes into ``.OUT_NAME.incomplete`` beside ``OUT`` and renames it at the end, so a
killed run never leaves a folder that looks complete; running again starts that split
from scratch (the leftover temporary folder is removed).
"""
import contextlib
import csv
import dataclasses
import io
import json
import os
import re
import shutil
import tarfile
import time
import warnings
from concurrent import futures
from typing import Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tqdm import tqdm

from proclip_jax.data import transforms
from proclip_jax.errors import ProclipError

DEFAULT_CAPTION_FIELDS = ("caption", "short", "long", "raw", "text")
IMAGE_KEYS = ("image", "image_path", "path", "file_name", "filename")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own warning threshold
DATASET_NAME = "proclip_data"
VERSION = "1.0.0"
REPORT_NAME = "ingest_report.json"


class _Bad(Exception):
  """An example that cannot be used: ``reason`` is a short category, ``detail`` the message."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(reason)
    self.reason = reason
    self.detail = detail or reason


# ---------------------------------------------------------------------------------------
# Image validation (runs in worker processes when num_workers > 0).


def validate_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
  """Checks encoded image bytes and returns the bytes to store (see the module docstring).

  Raises:
    _Bad: with reason ``unreadable image``, ``too many pixels``, ``corrupt image``.
  """
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
      im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
      raise _Bad("too many pixels", str(e)) from None
    except Exception as e:  # noqa: BLE001  PIL raises many types for bad files.
      raise _Bad("unreadable image", f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
      raise _Bad("unreadable image", f"image size {w}x{h}")
    if w * h > max_pixels:
      raise _Bad("too many pixels", f"{w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
    fmt, mode = im.format, im.mode
    try:
      im.verify()
      im = Image.open(io.BytesIO(data))
      im.load()
      rgb = transforms.to_rgb(im)
    except Image.DecompressionBombError as e:
      raise _Bad("too many pixels", str(e)) from None
    except Exception as e:  # noqa: BLE001
      raise _Bad("corrupt image", f"{type(e).__name__}: {e}") from None
  if fmt in ("JPEG", "PNG") and mode == "RGB":
    return data
  out = io.BytesIO()
  rgb.save(out, format="PNG")
  return out.getvalue()


@dataclasses.dataclass
class _Raw:
  """One example before validation: fields already parsed, image as bytes or a path."""
  id: int
  split: str
  location: str
  fields: dict
  image_bytes: bytes | None = None
  image_path: str | None = None
  error: _Bad | None = None


def _process(raw: _Raw, max_pixels: int):
  """Validates one example: ``(id, record or _Bad, location)``."""
  return (raw.id, _process_one(raw, max_pixels), raw.location)


def _process_one(raw: _Raw, max_pixels: int):
  if raw.error is not None:
    return raw.error
  data = raw.image_bytes
  if data is None:
    if raw.image_path is None or not os.path.isfile(raw.image_path):
      return _Bad("missing file", f"no image file at {raw.image_path}")
    try:
      with open(raw.image_path, "rb") as f:
        data = f.read()
    except OSError as e:
      return _Bad("missing file", f"cannot read {raw.image_path}: {e}")
  try:
    image = validate_image(data, max_pixels)
  except _Bad as e:
    return e
  record = dict(raw.fields)
  record["id"] = raw.id
  record["image"] = image
  return record


# ---------------------------------------------------------------------------------------
# Reading sources.


def _check_text(name: str, value) -> str:
  """A caption value: a string, valid UTF-8, non-empty after stripping."""
  if value is None:
    raise _Bad("missing caption", f"caption field {name!r} is missing")
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _Bad("caption not UTF-8", f"caption field {name!r}: {e}") from None
  if not isinstance(value, str):
    raise _Bad("missing caption", f"caption field {name!r} is {type(value).__name__}, not text")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise _Bad("caption not UTF-8", f"caption field {name!r}: {e}") from None
  if not value.strip():
    raise _Bad("empty caption", f"caption field {name!r} is empty")
  return value


def _is_utf8(s: str) -> bool:
  try:
    s.encode("utf-8")
    return True
  except UnicodeEncodeError:
    return False


def _manifest_rows(path: str) -> Iterator[tuple[int, dict | None, _Bad | None]]:
  """Yields ``(line_number, row, error)`` for every non-blank data row of a manifest.

  Rows are decoded as UTF-8 with surrogate escapes so that a bad byte spoils only its row
  (strings that carry escapes fail ``_is_utf8`` later).
  """
  if path.endswith(".csv"):
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
      reader = csv.DictReader(f)
      if reader.fieldnames is None:
        return
      for row in reader:
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
          continue
        row.pop(None, None)  # extra cells without a header
        yield reader.line_num, row, None
  else:
    with open(path, "rb") as f:
      for n, line in enumerate(f, start=1):
        if not line.strip():
          continue
        text = line.decode("utf-8", errors="surrogateescape")
        try:
          row = json.loads(text)
        except json.JSONDecodeError as e:
          yield n, None, _Bad("bad manifest row", f"line {n}: {e}")
          continue
        if not isinstance(row, dict):
          yield n, None, _Bad("bad manifest row", f"line {n}: not a JSON object")
          continue
        yield n, row, None


@dataclasses.dataclass
class _Schema:
  """What a source provides: caption fields, int fields, other text fields."""
  captions: list
  ints: list
  texts: list
  ignored: list
  splits: list
  image_key: str | None = None


def _other_columns(kinds, reserved, texts=()) -> tuple[list[str], list[str]]:
  """Splits the non-reserved columns into kept text fields (always with ``lang``) and
  ignored non-text ones; ``kinds`` maps a column to the set of value kinds seen in it."""
  texts, ignored = list(texts), []
  for k, ks in kinds.items():
    if k not in reserved:
      (texts if ks <= {"str", "none"} else ignored).append(k)
  if "lang" not in texts:
    texts.append("lang")
  return texts, ignored


def _scan_manifest(path: str, fields, int_fields, split) -> _Schema:
  kinds = {}  # column -> set of value kinds
  splits = []
  for _, row, err in _manifest_rows(path):
    if err is not None:
      continue
    for k, v in row.items():
      kinds.setdefault(k, set()).add(
          "none" if v is None or v == "" else "int" if isinstance(v, int) and not isinstance(
              v, bool) else "str" if isinstance(v, str) else "other")
    if split is None:
      s = row.get("split")
      s = str(s) if s not in (None, "") else "train"
      if s not in splits:
        splits.append(s)
  if not kinds:
    raise ProclipError(f"The manifest {path} has no rows. Give a JSONL file with one JSON "
                       f"object per line or a CSV file with a header row.")
  image_key = next((k for k in IMAGE_KEYS if k in kinds), None)
  if image_key is None:
    raise ProclipError(f"The manifest {path} has no image column (one of {IMAGE_KEYS}); its "
                       f"columns are {sorted(kinds)}. Name the column with the relative image "
                       f"path 'image'.")
  captions = list(fields) if fields else [f for f in DEFAULT_CAPTION_FIELDS if f in kinds]
  if not captions:
    raise ProclipError(f"The manifest {path} has no caption column: expected one of "
                       f"{DEFAULT_CAPTION_FIELDS} or the names given with --fields; its "
                       f"columns are {sorted(kinds)}.")
  missing = [c for c in captions if c not in kinds]
  if missing:
    raise ProclipError(f"The manifest {path} has no column {missing} (asked for by --fields); "
                       f"its columns are {sorted(kinds)}.")
  ints = [k for k in int_fields if k in kinds and k not in captions]
  texts, ignored = _other_columns(kinds, {image_key, "id", "split", "image", *captions, *ints})
  return _Schema(captions, ints, texts, ignored, [split] if split else splits, image_key)


def _parse_int(name: str, value) -> int:
  if isinstance(value, bool):
    raise _Bad("bad int field", f"field {name!r} is a boolean")
  if isinstance(value, int):
    return value
  if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
    return int(value)
  raise _Bad("bad int field", f"field {name!r} = {value!r} is not an integer")


def _fields_of(row: dict, schema: _Schema, default_lang: str) -> dict:
  """The stored fields of one row (captions checked, ints parsed, texts defaulted)."""
  out = {}
  for c in schema.captions:
    out[c] = _check_text(c, row.get(c))
  for k in schema.ints:
    v = row.get(k)
    out[k] = -1 if v in (None, "") else _parse_int(k, v)
  for k in schema.texts:
    v = row.get(k)
    if v is None or v == "":
      v = default_lang if k == "lang" else ""
    if not isinstance(v, str):
      v = str(v)
    if not _is_utf8(v):
      raise _Bad("text not UTF-8", f"field {k!r} is not valid UTF-8")
    out[k] = v
  return out


def _manifest_examples(path: str, schema: _Schema, split_name: str, by_column: bool,
                       id_offset: int, default_lang: str) -> Iterator[_Raw]:
  """Yields the rows of ``path`` in ``split_name``.

  With ``by_column`` only rows whose ``split`` value (default ``train``) is ``split_name``;
  rows that cannot be parsed at all are reported under the manifest's first split.
  """
  root = os.path.dirname(os.path.abspath(path))
  ordinal = -1
  for line, row, err in _manifest_rows(path):
    ordinal += 1
    location = f"{path}:{line}"
    if err is not None:
      if not by_column or split_name == schema.splits[0]:
        yield _Raw(id_offset + ordinal, split_name, location, {}, error=err)
      continue
    if by_column:
      s = row.get("split")
      if (str(s) if s not in (None, "") else "train") != split_name:
        continue
    ex_id = id_offset + ordinal
    try:
      if "id" in row and row["id"] not in (None, ""):
        ex_id = _parse_int("id", row["id"])
      rel = row.get(schema.image_key)
      if not isinstance(rel, str) or not rel.strip():
        raise _Bad("missing file", f"row has no {schema.image_key!r} value")
      fields = _fields_of(row, schema, default_lang)
    except _Bad as e:
      yield _Raw(ex_id, split_name, location, {}, error=e)
      continue
    image_path = rel if os.path.isabs(rel) else os.path.join(root, rel)
    yield _Raw(ex_id, split_name, f"{location} ({rel})", fields, image_path=image_path)


def _tar_paths(folder: str) -> list:
  paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))
  if not paths:
    raise ProclipError(f"No .tar shards in {folder}. Give a folder of webdataset shards "
                       f"(as img2dataset writes them) or a .jsonl/.csv manifest.")
  return paths


def _tar_groups(paths: Sequence[str], read_images: bool = True):
  """Yields ``(location, key, {ext: bytes})`` per example, in shard and member order."""
  for path in paths:
    try:
      tf = tarfile.open(path)
    except (tarfile.TarError, OSError) as e:
      raise ProclipError(f"Cannot open the shard {path}: {e}. Remove or re-download it.") from None
    with tf:
      key, parts = None, {}
      for member in tf:
        if not member.isfile():
          continue
        base = os.path.basename(member.name)
        if base.startswith("."):
          continue
        stem, dot, ext = base.partition(".")
        k = os.path.join(os.path.dirname(member.name), stem)
        if k != key and key is not None:
          yield f"{path}:{key}", key, parts
          parts = {}
        key = k
        ext = ext.lower()
        if read_images or ext in ("json", "txt"):
          parts[ext] = tf.extractfile(member).read()
        else:
          parts[ext] = b""
      if key is not None:
        yield f"{path}:{key}", key, parts


def _scan_tars(paths, fields, split) -> _Schema:
  kinds = {}
  has_txt = False
  for _, _, parts in _tar_groups(paths, read_images=False):
    has_txt |= "txt" in parts
    if "json" in parts:
      try:
        meta = json.loads(parts["json"])
      except ValueError:
        continue
      if isinstance(meta, dict):
        for k, v in meta.items():
          kinds.setdefault(k, set()).add(
              "none" if v is None else "int" if isinstance(v, int) and not isinstance(
                  v, bool) else "str" if isinstance(v, str) else "other")
  captions = list(fields) if fields else ["caption"]
  if not has_txt and not any(c in kinds for c in captions):
    raise ProclipError(f"The shards {paths[0]}... have no captions: no .txt members and no "
                       f"json key {captions}. Give the caption field names with --fields.")
  texts, ignored = _other_columns(kinds, {"id", "split", "image", "key", *captions},
                                  texts=["key"])
  return _Schema(captions, [], texts, ignored, [split or "train"])


def _tar_examples(paths, schema: _Schema, split_name: str, id_offset: int,
                  default_lang: str) -> Iterator[_Raw]:
  for ordinal, (location, key, parts) in enumerate(_tar_groups(paths)):
    ex_id = id_offset + ordinal
    try:
      row = {}
      if "json" in parts:
        try:
          meta = json.loads(parts["json"].decode("utf-8", errors="surrogateescape"))
        except ValueError as e:
          raise _Bad("bad json", f"{key}.json: {e}") from None
        if isinstance(meta, dict):
          row.update(meta)
      if "txt" in parts:
        row[schema.captions[0]] = parts["txt"]
      row["key"] = key
      image_ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
      if image_ext is None:
        raise _Bad("missing file", f"no image member for key {key} (have {sorted(parts)})")
      fields = _fields_of(row, schema, default_lang)
    except _Bad as e:
      yield _Raw(ex_id, split_name, location, {}, error=e)
      continue
    yield _Raw(ex_id, split_name, location, fields, image_bytes=parts[image_ext])


# ---------------------------------------------------------------------------------------
# The tfds builder.


def _features(schema: _Schema):
  feats = {"id": tfds.features.Scalar(np.int64),
           "image": tfds.features.Tensor(shape=(), dtype=np.object_)}
  for c in schema.captions:
    feats[c] = tfds.features.Text()
  for k in schema.ints:
    feats[k] = tfds.features.Scalar(np.int64)
  for k in schema.texts:
    feats[k] = tfds.features.Text()
  return tfds.features.FeaturesDict(feats)


class _IngestBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A beam-free tfds builder over the generator that ``build_dataset`` prepares."""

  VERSION = tfds.core.Version(VERSION)
  name = DATASET_NAME

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # No code folder (no checksums, no metadata files beside the code). tfds' own lookup
    # needs importlib_resources, which tfds does not install.
    return None

  def __init__(self, *, features, split_examples, description, metadata, **kwargs):
    self._feature_spec = features
    self._split_examples = split_examples
    self._description = description
    self._metadata = metadata
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=self._description, features=self._feature_spec,
        disable_shuffling=True, metadata=tfds.core.MetadataDict(self._metadata))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(s) for s in self._split_examples}

  def _generate_examples(self, split):
    for record in self._split_examples[split]():
      yield record["id"], record


# ---------------------------------------------------------------------------------------
# The public entry point.


@dataclasses.dataclass
class BuildResult:
  """What ``build_dataset`` wrote: the folder, examples per split, the report."""
  path: str
  num_examples: dict
  num_skipped: int
  report: dict
  seconds: float


def _resolve_sources(src, split):
  """``[(split or None, path, kind)]`` with kind ``manifest`` or ``tars``."""
  items = list(src.items()) if isinstance(src, Mapping) else [(split, src)]
  out = []
  for s, p in items:
    p = os.fspath(p)
    if os.path.isdir(p):
      out.append((s or "train", p, "tars"))
    elif os.path.isfile(p):
      if not p.endswith((".jsonl", ".json", ".csv")):
        raise ProclipError(f"Unknown source {p}: give a .jsonl or .csv manifest or a folder of "
                           f"webdataset .tar shards.")
      out.append((s, p, "manifest"))
    else:
      raise ProclipError(f"The source {p} does not exist. Give a .jsonl/.csv manifest or a "
                         f"folder of webdataset .tar shards.")
  return out


def build_dataset(src, out, *, split: str | None = None, fields: Sequence[str] | None = None,
                  int_fields: Sequence[str] = ("label",), max_pixels: int = DEFAULT_MAX_PIXELS,
                  default_lang: str = "en", metadata: Mapping | None = None,
                  overwrite: bool = False, num_workers: int = 0,
                  progress: bool = True) -> BuildResult:
  """Ingests a manifest or webdataset shards into a tfds ArrayRecord dataset at ``out``.

  Args:
    src: a ``.jsonl``/``.csv`` manifest, a folder of ``.tar`` shards, or a mapping
      ``{split: source}``.
    out: the dataset folder to write (``tfds.builder_from_directory(out)`` reads it).
    split: put every example of a single source in this split (default: the manifest's
      ``split`` column, else ``train``).
    fields: caption field names (default: those of ``caption, short, long, raw, text``
      present; ``caption`` for shards).
    int_fields: columns stored as int64 (e.g. classification labels); missing -> -1.
    max_pixels: images with more pixels are skipped (decompression-bomb guard).
    default_lang: ``lang`` of rows that do not give one.
    metadata: JSON-serialisable dict stored in the dataset's ``metadata.json`` (read back as
      ``builder.info.metadata``), e.g. class names.
    overwrite: replace an existing ``out``.
    num_workers: processes validating images (0: in this process).
    progress: show a tqdm bar per split (examples/s).

  Returns:
    A ``BuildResult``.

  Raises:
    ProclipError: missing/unknown source, no image/caption column, ``out`` exists without
      ``overwrite``, a split with no valid example.
  """
  t0 = time.time()
  out = os.path.abspath(os.fspath(out))
  if os.path.exists(out) and not overwrite:
    raise ProclipError(f"{out} already exists. Pass overwrite=True (--overwrite) to replace it "
                       f"or choose another output folder.")
  sources = _resolve_sources(src, split)
  fields = list(fields) if fields else None

  # Scan every source: the union of their schemas is the feature set.
  plans = []  # (split, path, kind, schema, id_offset)
  offset = 0
  captions, ints, texts, ignored = None, [], [], []
  for s, path, kind in sources:
    if kind == "tars":
      paths = _tar_paths(path)
      schema = _scan_tars(paths, fields, s)
      count = sum(1 for _ in _tar_groups(paths, read_images=False))
    else:
      schema = _scan_manifest(path, fields, int_fields, s)
      count = sum(1 for _ in _manifest_rows(path))
    if captions is None:
      captions = schema.captions
    elif schema.captions != captions:
      raise ProclipError(f"The sources disagree on caption fields: {captions} vs "
                         f"{schema.captions} in {path}. Pass the same --fields for all.")
    ints += [k for k in schema.ints if k not in ints]
    texts += [k for k in schema.texts if k not in texts]
    ignored += [k for k in schema.ignored if k not in ignored]
    plans.append((s, path, kind, schema, offset))
    offset += count
  merged = _Schema(captions, ints, [t for t in texts if t not in ints], ignored, [])
  split_names = []
  for s, _, _, schema, _ in plans:
    for name in ([s] if s else schema.splits):
      if name not in split_names:
        split_names.append(name)

  skipped, counts, seen_ids = [], {}, set()

  def raws_for(split_name):
    for s, path, kind, schema, id_offset in plans:
      if kind == "tars":
        if s == split_name:
          yield from _tar_examples(_tar_paths(path), merged, split_name, id_offset, default_lang)
      elif s == split_name or (s is None and split_name in schema.splits):
        sch = dataclasses.replace(merged, image_key=schema.image_key, splits=schema.splits)
        yield from _manifest_examples(path, sch, split_name, s is None, id_offset, default_lang)

  def examples_for(split_name):
    def gen():
      bar = tqdm(desc=f"ingest {split_name}", unit="ex", disable=not progress, smoothing=0.1)
      counts[split_name] = {"written": 0, "skipped": 0}
      executor = futures.ProcessPoolExecutor(num_workers) if num_workers > 0 else None
      try:
        raws = raws_for(split_name)
        if executor is None:
          results = (_process(r, max_pixels) for r in raws)
        else:
          results = executor.map(_process, raws, _repeat(max_pixels), chunksize=16)
        for ex_id, result, location in results:
          bar.update(1)
          if isinstance(result, _Bad) or ex_id in seen_ids:
            if not isinstance(result, _Bad):
              result = _Bad("duplicate id", f"id {ex_id} appears more than once")
            skipped.append({"id": ex_id, "split": split_name, "location": location,
                            "reason": result.reason, "detail": result.detail})
            counts[split_name]["skipped"] += 1
            continue
          seen_ids.add(ex_id)
          counts[split_name]["written"] += 1
          yield {k: result[k] for k in ("id", "image", *merged.captions, *merged.ints,
                                        *merged.texts)}
      finally:
        bar.close()
        if executor is not None:
          executor.shutdown(cancel_futures=True)
    return gen

  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(out)}.incomplete")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  meta = {"proclip": {"caption_fields": merged.captions, "int_fields": merged.ints,
                      "text_fields": merged.texts, "splits": split_names,
                      "image_encoding": "original bytes for RGB JPEG/PNG, else RGB PNG"}}
  meta.update(dict(metadata or {}))
  builder = _IngestBuilder(
      features=_features(merged), split_examples={s: examples_for(s) for s in split_names},
      description=f"Built by proclip_jax.data.builder from {[p for _, p, _ in sources]}.",
      metadata=meta, data_dir=tmp, file_format="array_record")
  was_active = tfds.core.utils.tqdm_utils._active  # pylint: disable=protected-access
  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(io.StringIO()):  # tfds' "downloaded ..." lines mislead
      builder.download_and_prepare()
  except ValueError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if "should be >0" in str(e):
      empty = [s for s in split_names if counts.get(s, {}).get("written", 0) == 0]
      raise ProclipError(f"No valid example in split(s) {empty} of {src}; every example was "
                         f"skipped ({_reason_counts(skipped)}). Fix the inputs.") from None
    raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    tfds.core.utils.tqdm_utils.display_progress_bar(was_active)

  report = {
      "sources": [{"split": s, "path": p, "kind": k} for s, p, k in sources],
      "splits": counts,
      "written": sum(c["written"] for c in counts.values()),
      "skipped": len(skipped),
      "by_reason": _reason_counts(skipped),
      "skipped_examples": sorted(skipped, key=lambda r: r["id"]),
      "ignored_columns": merged.ignored,
      "caption_fields": merged.captions,
      "max_pixels": max_pixels,
  }
  data_dir = os.path.join(tmp, DATASET_NAME, VERSION)
  with open(os.path.join(data_dir, REPORT_NAME), "w") as f:
    json.dump(report, f, indent=1)
  if os.path.exists(out):
    trash = os.path.join(parent, f".{os.path.basename(out)}.old")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(out, trash)
    os.rename(data_dir, out)
    shutil.rmtree(trash, ignore_errors=True)
  else:
    os.rename(data_dir, out)
  shutil.rmtree(tmp, ignore_errors=True)
  return BuildResult(out, {s: c["written"] for s, c in counts.items()}, len(skipped), report,
                     time.time() - t0)


def _repeat(x):
  while True:
    yield x


def _reason_counts(skipped) -> dict:
  counts = {}
  for r in skipped:
    counts[r["reason"]] = counts.get(r["reason"], 0) + 1
  return counts


def load_report(path) -> dict:
  """Reads ``PATH/ingest_report.json`` of a built dataset."""
  p = epath.Path(path) / REPORT_NAME
  if not p.exists():
    raise ProclipError(f"No {REPORT_NAME} in {path}: is it a dataset written by "
                       f"tools/build_dataset.py?")
  return json.loads(p.read_text())
