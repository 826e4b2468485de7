"""Ingestion sources: manifests and webdataset shards -> examples with stable ids.

:mod:`.builder` validates and writes what this module reads. Sources:

* a **JSONL or CSV manifest**: one example per line/row; an image column (``image``,
  ``image_path``, ``path``, ``file_name`` or ``filename``; paths relative to the manifest's
  folder), one or more caption columns (default: whichever of ``caption``, ``short``,
  ``long``, ``raw``, ``text`` exist), optional ``lang``, optional ``split`` (one split per
  value, unless a split is given), optional integer ``id``; integer columns named in
  ``int_fields`` are stored as int64, every other string column is kept as a text field.
* a **folder of webdataset ``.tar`` shards** as img2dataset writes them: members ``KEY.jpg``
  (or png/webp/...) with ``KEY.txt`` and/or ``KEY.json``; the txt is the ``caption`` field,
  the json's ``caption`` is used when there is no txt, and the json's other string values
  become fields; the webdataset key is kept as ``key``.
* a mapping ``{split: source}`` (each a manifest or a shard folder) for one source per split.

Each example has a stable int64 ``id``: the manifest's ``id`` column when it has one,
otherwise the row's position (0-based, counted over every non-blank row, bad ones
included); for shards, the position of the example in (sorted shard name, member order).
With a ``{split: source}`` mapping the sources are numbered one after another in the order
given. The same input always gets the same ids.

Captions must be present, valid UTF-8 and non-empty after stripping; ids and int fields
must fit int64; a row that breaks a rule becomes an example carrying a :class:`BadExample`
(the builder reports it), so nothing is dropped silently. So does a CSV row the csv module
cannot parse on its own line, a field over its size limit included; a quoted CSV field that
is never closed properly (it would swallow the rows after it) is refused with a ProclipError
naming its first and last line. In shards, a key seen before (in the same source) is a
skipped ``duplicate key`` example; a shard that ends without the tar end-of-archive marker
(cut at a member boundary, which tarfile takes for a clean end), is cut inside a member or
has a damaged header is refused with a ProclipError naming it and the examples read before
the damage. Paths go through ``etils.epath``: a manifest, its images and shards may
live wherever epath can read.
"""
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import tarfile
from typing import Iterator, Mapping, Sequence

import numpy as np
from etils import epath

from proclip_jax.data import paths
from proclip_jax.errors import ProclipError

DEFAULT_CAPTION_FIELDS = ("caption", "short", "long", "raw", "text")
IMAGE_KEYS = ("image", "image_path", "path", "file_name", "filename")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MANIFEST_SUFFIXES = (".jsonl", ".json", ".csv")


class BadExample(Exception):
  """An example that cannot be used: ``reason`` is a short category, ``detail`` the message."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(reason)
    self.reason = reason
    self.detail = detail or reason


@dataclasses.dataclass
class RawExample:
  """One example before image validation: fields parsed, the image as bytes or a path."""
  id: int
  split: str
  location: str
  fields: dict
  image_bytes: bytes | None = None
  image_path: str | None = None
  error: BadExample | None = None


@dataclasses.dataclass
class Schema:
  """What a source provides: caption fields, int fields, other text fields."""
  captions: list
  ints: list
  texts: list
  ignored: list
  splits: list
  image_key: str | None = None
  image_dirs: list = dataclasses.field(default_factory=list)  # folders of a manifest's images


@dataclasses.dataclass
class Source:
  """One input: its split (None: a manifest's ``split`` column), path, kind (``manifest`` or
  ``tars``), schema and the id of its first example."""
  split: str | None
  path: str
  kind: str
  schema: Schema | None = None
  id_offset: int = 0
  repeated_keys: frozenset = frozenset()  # shards: hashes of the keys seen more than once


@dataclasses.dataclass
class Plan:
  """Every source scanned: the merged schema (the dataset's features) and the split names."""
  sources: list
  schema: Schema
  splits: list


# ---------------------------------------------------------------------------------------
# Paths.


def _join(root: str, rel: str) -> str:
  """An image path of a manifest row: ``rel`` against the manifest's folder ``root``."""
  return rel if os.path.isabs(rel) or not paths.is_local(rel) else os.path.join(root, rel)


def resolve_sources(src, split: str | None) -> list[Source]:
  """The sources of ``src`` (one path or ``{split: path}``), each a manifest or a shard folder."""
  items = list(src.items()) if isinstance(src, Mapping) else [(split, src)]
  out = []
  for s, p in items:
    p = os.fspath(p)
    path = epath.Path(p)
    if path.is_dir():
      out.append(Source(s or "train", p, "tars"))
    elif path.is_file():
      if not p.endswith(MANIFEST_SUFFIXES):
        raise ProclipError(f"Unknown source {p}: give a .jsonl or .csv manifest or a folder of "
                           f"webdataset .tar shards.")
      out.append(Source(s, p, "manifest"))
    else:
      raise ProclipError(f"The source {p} does not exist. Give a .jsonl/.csv manifest or a "
                         f"folder of webdataset .tar shards.")
  return out


# ---------------------------------------------------------------------------------------
# Field values.


def _is_utf8(s: str) -> bool:
  try:
    s.encode("utf-8")
    return True
  except UnicodeEncodeError:
    return False


def _check_text(name: str, value) -> str:
  """A caption value: a string, valid UTF-8, non-empty after stripping."""
  if value is None:
    raise BadExample("missing caption", f"caption field {name!r} is missing")
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadExample("caption not UTF-8", f"caption field {name!r}: {e}") from None
  if not isinstance(value, str):
    raise BadExample("missing caption",
                     f"caption field {name!r} is {type(value).__name__}, not text")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise BadExample("caption not UTF-8", f"caption field {name!r}: {e}") from None
  if not value.strip():
    raise BadExample("empty caption", f"caption field {name!r} is empty")
  return value


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _parse_int(name: str, value) -> int:
  if isinstance(value, bool):
    raise BadExample("bad int field", f"field {name!r} is a boolean")
  if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
    value = int(value)
  if not isinstance(value, int):
    raise BadExample("bad int field", f"field {name!r} = {value!r} is not an integer")
  if not INT64_MIN <= value <= INT64_MAX:
    raise BadExample("bad int field", f"field {name!r} = {value} does not fit int64")
  return value


def _fields_of(row: dict, schema: Schema, default_lang: str) -> dict:
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
      raise BadExample("text not UTF-8", f"field {k!r} is not valid UTF-8")
    out[k] = v
  return out


def _value_kind(v, blank_is_none: bool = False) -> str:
  if v is None or (blank_is_none and v == ""):
    return "none"
  if isinstance(v, int) and not isinstance(v, bool):
    return "int"
  return "str" if isinstance(v, str) else "other"


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


# ---------------------------------------------------------------------------------------
# Manifests.


def _manifest_rows(path: str) -> Iterator[tuple[int, dict | None, BadExample | None]]:
  """Yields ``(line_number, row, error)`` for every non-blank data row of a manifest.

  Rows are decoded as UTF-8 with surrogate escapes so that a bad byte spoils only its row
  (strings that carry escapes fail ``_is_utf8`` later).
  """
  with epath.Path(path).open("rb") as raw:
    if path.endswith(".csv"):
      yield from _csv_rows(raw, path)
    else:
      yield from _jsonl_rows(raw)


def _csv_rows(raw, path: str) -> Iterator[tuple[int, dict | None, BadExample | None]]:
  """The rows of a CSV manifest as dicts keyed by its header (missing cells None, extra cells
  dropped), read strictly so that a badly closed quoted field is an error, not a field that
  swallows the rows after it."""
  f = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
  reader = csv.reader(f, strict=True)
  header = None
  while True:
    first = reader.line_num + 1
    try:
      cells = next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      last = reader.line_num
      if last > first:  # one row ran over several lines: the rows after it were swallowed
        raise ProclipError(
            f"The CSV manifest {path}: the row starting on line {first} does not end before "
            f"line {last} (csv: {e}); a quoted field is not closed properly and would swallow "
            f"{last - first} lines. Fix its quotes (a quote inside a quoted field is written "
            "twice: \"\").") from None
      if header is None:
        raise ProclipError(f"The header line of the CSV manifest {path} cannot be read: "
                           f"{e}.") from None
      yield first, None, BadExample("bad manifest row", f"line {first}: {e}")
      continue
    if header is None:
      header = cells
      continue
    if not any(c.strip() for c in cells):
      continue
    row = dict(zip(header, cells))
    for k in header[len(cells):]:
      row.setdefault(k, None)
    yield first, row, None


def _jsonl_rows(raw) -> Iterator[tuple[int, dict | None, BadExample | None]]:
  for n, line in enumerate(raw, start=1):
    if not line.strip():
      continue
    text = line.decode("utf-8", errors="surrogateescape")
    try:
      row = json.loads(text)
    except json.JSONDecodeError as e:
      yield n, None, BadExample("bad manifest row", f"line {n}: {e}")
      continue
    if not isinstance(row, dict):
      yield n, None, BadExample("bad manifest row", f"line {n}: not a JSON object")
      continue
    yield n, row, None


def _row_split(row: dict) -> str:
  s = row.get("split")
  return str(s) if s not in (None, "") else "train"


def scan_manifest(path: str, fields, int_fields, split) -> Schema:
  """The schema of a manifest: its columns' kinds decide what is stored and how."""
  kinds = {}  # column -> set of value kinds
  splits = []
  root = os.path.dirname(paths.absolute(path))
  image_dirs = {k: set() for k in IMAGE_KEYS}  # per candidate image column
  for _, row, err in _manifest_rows(path):
    if err is not None:
      continue
    for k, v in row.items():
      kinds.setdefault(k, set()).add(_value_kind(v, blank_is_none=True))
      if k in image_dirs and isinstance(v, str) and v.strip():
        image_dirs[k].add(os.path.dirname(_join(root, v)))
    if split is None and _row_split(row) not in splits:
      splits.append(_row_split(row))
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
  return Schema(captions, ints, texts, ignored, [split] if split else splits, image_key,
                sorted(image_dirs[image_key]))


def manifest_examples(path: str, schema: Schema, split_name: str, by_column: bool,
                      id_offset: int, default_lang: str) -> Iterator[RawExample]:
  """Yields the rows of ``path`` in ``split_name``.

  With ``by_column`` only rows whose ``split`` value (default ``train``) is ``split_name``;
  rows that cannot be parsed at all are reported under the manifest's first split.
  """
  root = os.path.dirname(paths.absolute(path))
  ordinal = -1
  for line, row, err in _manifest_rows(path):
    ordinal += 1
    location = f"{path}:{line}"
    if err is not None:
      if not by_column or split_name == schema.splits[0]:
        yield RawExample(id_offset + ordinal, split_name, location, {}, error=err)
      continue
    if by_column and _row_split(row) != split_name:
      continue
    ex_id = id_offset + ordinal
    try:
      if "id" in row and row["id"] not in (None, ""):
        ex_id = _parse_int("id", row["id"])
      rel = row.get(schema.image_key)
      if not isinstance(rel, str) or not rel.strip():
        raise BadExample("missing file", f"row has no {schema.image_key!r} value")
      fields = _fields_of(row, schema, default_lang)
    except BadExample as e:
      yield RawExample(ex_id, split_name, location, {}, error=e)
      continue
    yield RawExample(ex_id, split_name, f"{location} ({rel})", fields,
                     image_path=_join(root, rel))


# ---------------------------------------------------------------------------------------
# Webdataset shards.


def tar_paths(folder: str) -> list[str]:
  """The ``.tar`` shards of ``folder``, sorted by name (the order that numbers examples)."""
  shards = sorted(os.path.join(folder, p.name) for p in epath.Path(folder).iterdir()
                 if p.name.endswith(".tar"))
  if not shards:
    raise ProclipError(f"No .tar shards in {folder}. Give a folder of webdataset shards "
                       f"(as img2dataset writes them) or a .jsonl/.csv manifest.")
  return shards


def _unreadable_shard(path: str, e: Exception) -> ProclipError:
  return ProclipError(f"Cannot open the shard {path}: {e}. Remove or re-download it.")


@contextlib.contextmanager
def _open_tar(path: str) -> Iterator[tarfile.TarFile]:
  """The shard at ``path``, read through epath; a ProclipError when it cannot be opened."""
  try:
    raw = epath.Path(path).open("rb")
  except OSError as e:
    raise _unreadable_shard(path, e) from None
  with raw:
    try:
      tf = tarfile.open(fileobj=raw)
    except (tarfile.TarError, OSError) as e:
      raise _unreadable_shard(path, e) from None
    with tf:
      yield tf


def _tar_groups(shards: Sequence[str], read_images: bool = True):
  """Yields ``(location, key, {ext: bytes})`` per example, in shard and member order."""
  for path in shards:
    with _open_tar(path) as tf:
      yield from _tar_members(path, tf, read_images)


def _key_hash(key: str) -> int:
  return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"),
                                        digest_size=8).digest(), "little")


def _repeated_hashes(hashes: np.ndarray) -> frozenset:
  """The values that occur more than once in ``hashes`` (uint64: 8 bytes per example, so
  that finding repeated keys costs little memory however many examples there are)."""
  values, counts = np.unique(hashes, return_counts=True)
  return frozenset(values[counts > 1].tolist())


def _damaged_shard(path: str, examples: int, last_key, what: str) -> ProclipError:
  read = f"{examples} examples were read up to key {last_key}" if examples else "nothing was read"
  return ProclipError(f"The shard {path} is {what}: {read}, what followed is lost. "
                      "Re-download the shard, or remove it from the folder to build without it.")


def _check_end_of_archive(path: str, tf: tarfile.TarFile, examples: int, last_key):
  """Refuses a shard whose members end without the end-of-archive block (zeros).

  tarfile stops quietly at end of file and at an unreadable header after the first, so a
  shard cut at a member boundary or with a damaged header would read as a shorter one.
  """
  tf.fileobj.seek(tf.offset)
  block = tf.fileobj.read(tarfile.BLOCKSIZE)
  if not block:
    raise _damaged_shard(path, examples, last_key, "truncated: it ends without the tar "
                         "end-of-archive marker")
  if any(block):
    raise _damaged_shard(path, examples, last_key,
                         f"damaged: the tar header at byte {tf.offset} cannot be read")


def _tar_members(path: str, tf: tarfile.TarFile, read_images: bool):
  """The examples of one shard: consecutive members with the same key form one example."""
  key, parts, groups = None, {}, 0
  members = iter(tf)
  while True:
    try:
      member = next(members, None)
      if member is None:
        break
      if not member.isfile():
        continue
      base = os.path.basename(member.name)
      if base.startswith("."):
        continue
      stem, _, ext = base.partition(".")
      k = os.path.join(os.path.dirname(member.name), stem)
      ext = ext.lower()
      data = tf.extractfile(member).read() if read_images or ext in ("json", "txt") else b""
    except (tarfile.TarError, OSError, EOFError) as e:
      raise _damaged_shard(path, groups, key, "cut inside a member or unreadable "
                           f"({type(e).__name__}: {e})") from None
    if k != key:
      if key is not None:
        yield f"{path}:{key}", key, parts
        parts = {}
      groups += 1
    key = k
    parts[ext] = data
  _check_end_of_archive(path, tf, groups, key)
  if key is not None:
    yield f"{path}:{key}", key, parts


def scan_tars(shards, fields, split) -> Schema:
  """The schema of a set of shards: the json members' keys decide the extra text fields."""
  kinds = {}
  has_txt = False
  for _, _, parts in _tar_groups(shards, read_images=False):
    has_txt |= "txt" in parts
    if "json" in parts:
      try:
        meta = json.loads(parts["json"])
      except ValueError:
        continue
      if isinstance(meta, dict):
        for k, v in meta.items():
          kinds.setdefault(k, set()).add(_value_kind(v))
  captions = list(fields) if fields else ["caption"]
  if not has_txt and not any(c in kinds for c in captions):
    raise ProclipError(f"The shards {shards[0]}... have no captions: no .txt members and no "
                       f"json key {captions}. Give the caption field names with --fields.")
  texts, ignored = _other_columns(kinds, {"id", "split", "image", "key", *captions},
                                  texts=["key"])
  return Schema(captions, [], texts, ignored, [split or "train"])


def tar_examples(shards, schema: Schema, split_name: str, id_offset: int,
                 default_lang: str, repeated_keys=frozenset()) -> Iterator[RawExample]:
  """Yields every example of ``shards`` (all in ``split_name``); a key seen before is a bad
  example (``repeated_keys``: the hashes of the keys that occur more than once)."""
  first_seen = {}  # repeated key -> (ordinal, location) of its first example
  for ordinal, (location, key, parts) in enumerate(_tar_groups(shards)):
    ex_id = id_offset + ordinal
    try:
      if repeated_keys and _key_hash(key) in repeated_keys:
        first = first_seen.setdefault(key, (ordinal, location))
        if first[0] != ordinal:
          raise BadExample("duplicate key", f"key {key} appears again (first at {first[1]})")
      row = {}
      if "json" in parts:
        try:
          meta = json.loads(parts["json"].decode("utf-8", errors="surrogateescape"))
        except ValueError as e:
          raise BadExample("bad json", f"{key}.json: {e}") from None
        if isinstance(meta, dict):
          row.update(meta)
      if "txt" in parts:
        row[schema.captions[0]] = parts["txt"]
      row["key"] = key
      image_ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
      if image_ext is None:
        raise BadExample("missing file", f"no image member for key {key} (have {sorted(parts)})")
      fields = _fields_of(row, schema, default_lang)
    except BadExample as e:
      yield RawExample(ex_id, split_name, location, {}, error=e)
      continue
    yield RawExample(ex_id, split_name, location, fields, image_bytes=parts[image_ext])


# ---------------------------------------------------------------------------------------
# Planning: every source scanned, schemas merged, ids assigned.


def _scan(source: Source, fields, int_fields) -> tuple[Source, int]:
  """``source`` with its schema, example count (the ids it takes) and repeated keys."""
  if source.kind == "tars":
    shards = tar_paths(source.path)
    schema = scan_tars(shards, fields, source.split)
    keys = (key for _, key, _ in _tar_groups(shards, read_images=False))
    hashes = np.fromiter(map(_key_hash, keys), np.uint64)
    repeated = _repeated_hashes(hashes)
    return dataclasses.replace(source, schema=schema, repeated_keys=repeated), hashes.size
  schema = scan_manifest(source.path, fields, int_fields, source.split)
  return dataclasses.replace(source, schema=schema), sum(1 for _ in _manifest_rows(source.path))


def _merge_schemas(sources: Sequence[Source]) -> Schema:
  """The union of the sources' fields; every source must have the same caption fields."""
  captions, ints, texts, ignored = None, [], [], []
  for source in sources:
    schema = source.schema
    if captions is None:
      captions = schema.captions
    elif schema.captions != captions:
      raise ProclipError(f"The sources disagree on caption fields: {captions} vs "
                         f"{schema.captions} in {source.path}. Pass the same --fields for all.")
    ints += [k for k in schema.ints if k not in ints]
    texts += [k for k in schema.texts if k not in texts]
    ignored += [k for k in schema.ignored if k not in ignored]
  return Schema(captions, ints, [t for t in texts if t not in ints], ignored, [])


def plan_sources(src, *, split: str | None = None, fields: Sequence[str] | None = None,
         int_fields: Sequence[str] = ("label",)) -> Plan:
  """Scans every source of ``src`` (see :func:`resolve_sources`) and numbers its examples.

  Sources are numbered one after another in the order given; the merged schema is the
  dataset's feature set and the split names come in order of first appearance.
  """
  fields = list(fields) if fields else None
  sources, offset = [], 0
  for source in resolve_sources(src, split):
    source, count = _scan(source, fields, int_fields)
    sources.append(dataclasses.replace(source, id_offset=offset))
    offset += count
  splits = []
  for source in sources:
    for name in ([source.split] if source.split else source.schema.splits):
      if name not in splits:
        splits.append(name)
  return Plan(sources, _merge_schemas(sources), splits)


def examples(plan: Plan, split_name: str, default_lang: str) -> Iterator[RawExample]:
  """Every example of ``split_name``, source by source, with the merged schema's fields."""
  for source in plan.sources:
    if source.kind == "tars":
      if source.split == split_name:
        yield from tar_examples(tar_paths(source.path), plan.schema, split_name,
                                source.id_offset, default_lang, source.repeated_keys)
    elif source.split == split_name or (source.split is None and
                                        split_name in source.schema.splits):
      schema = dataclasses.replace(plan.schema, image_key=source.schema.image_key,
                                   splits=source.schema.splits)
      yield from manifest_examples(source.path, schema, split_name, source.split is None,
                                   source.id_offset, default_lang)
