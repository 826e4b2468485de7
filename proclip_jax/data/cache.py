"""Embedding caches: one vector per (example id, caption field), written once, read by id.

ProCLIP never runs the LLM (or the CLIP text teacher) while training: ``tools/precompute.py``
(:mod:`proclip_jax.data.precompute`) writes their features here and the grain pipeline joins
them to each batch through its side-data hook (``CacheReader.lookup(ids, fields)``).

Layout of a cache folder ``CACHE``::

    CACHE/manifest.json        written LAST: a folder without it is incomplete, never read
    CACHE/ids.npy              int64 [N], the example ids, strictly increasing (row order)
    CACHE/{field}.npy          [N, D] per caption field; float16 / float32, or bfloat16 stored
                               as its uint16 bit pattern (``.npy`` cannot name bfloat16)
    CACHE/{field}.rowsum.npy   uint32 [N], a checksum of each row (and its id), verified on read
    CACHE/parts/               while writing only: one ``{field}-{start:09d}.npy`` per field
                               and work unit plus ``unit-{start:09d}.json`` (written after its
                               arrays: a unit is done when its json exists) and ``plan.json``

The manifest (``manifest.json``) records what the vectors are, so that loading can refuse a
cache that does not fit the run::

    format, version           "proclip-embedding-cache", 1
    kind                      "llm" (embedder features) | "clip_text" (CLIP text-tower features)
    model                     {"kind", "family", "fingerprint" (sha256 of the parameters, see
                              params_fingerprint), "config", "path" (informational)}
    preset                    the embedder preset dict (llm) or None
    preset_name, template, pooling, normalized, max_length, compute_dtype
    dim, dtype, fields, count, unit_size
    dataset                   {"fingerprint", "split", "path" (informational)}
    ids_sha256                sha256 of ids.npy's int64 bytes
    captions_sha256           {field: sha256 of the captions in id order}
    truncated                 {field: captions longer than max_length (cut)}
    empty_policy              "error" | "skip"
    skipped                   {field: [ids of empty captions]} (rows zero-filled, refused on read)
    files                     {"ids": "ids.npy", field: "FIELD.npy", ...}
    row_checksums             {field: "FIELD.rowsum.npy"}: uint32 per row (row_checksums)

Content checksums: ids other than the manifest's ``ids_sha256`` are refused at open, and
rows that differ from their row checksums (``{field}.rowsum.npy``) on every lookup, for the
rows read (``CacheReader(verify=False)`` skips both).

Reading: ``CacheReader(CACHE, expect={...})`` checks the manifest against what the run expects
(``kind``, ``model`` / ``model_fingerprint``, ``preset``, ``dim``, ``fields``, ``dataset`` /
``data`` + ``split``), opens the arrays and answers ``lookup(ids, fields)`` with float32
``[B, D]`` rows (``ids`` int64 [B]; ``fields`` one field name or an array of B names).
Paths go through ``etils.epath``: a local cache is memory-mapped, one elsewhere (``gs://``)
is read into memory.
Damage is refused with a ProclipError: a truncated or unreadable array file, a row count
other than the manifest's, and non-finite rows (checked on every lookup; precompute never
writes them). A write that fails (disk full) leaves no temporary file and is a ProclipError;
the finished parts stay, so running the same command again goes on.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np
from etils import epath

from proclip_jax.data import paths
from proclip_jax.errors import ProclipError
from proclip_jax.storage import load_model, params_fingerprint, read_model_json

FORMAT = "proclip-embedding-cache"
VERSION = 1
MANIFEST = "manifest.json"
IDS_FILE = "ids.npy"
PARTS_DIR = "parts"
KINDS = ("llm", "clip_text")
DTYPES = ("float16", "bfloat16", "float32")
EXPECT_KEYS = ("kind", "model", "model_fingerprint", "preset", "dim", "fields", "dataset",
               "data", "split")


# ------------------------------------------------------------------------- fingerprints

def model_fingerprint(path: str) -> str:
  """The parameter fingerprint of a converted model folder (``model.json`` + ``params/``).

  Uses ``model.json``'s ``params_sha256`` when the converter stored one; otherwise loads the
  parameters and hashes them (:func:`params_fingerprint`).
  """
  meta = read_model_json(path)
  if isinstance(meta.get("params_sha256"), str):
    return meta["params_sha256"]
  return params_fingerprint(load_model(path)[1])


def dataset_fingerprint(path: str, split: str) -> str:
  """sha256 of a built dataset split's identity, from its metadata files (cheap; no data read).

  Covers the dataset name and version, the split's name, byte count and shard lengths, the
  feature spec, the ingest report's counts and the order and content of the records: every
  field of up to ``ORDER_SAMPLES`` records at evenly spaced positions (the first and the
  last included), so a rebuild with the rows reordered gets another fingerprint; not the
  folder's location.
  """
  from proclip_jax.data.pipeline import check_dataset_files  # pylint: disable=import-outside-toplevel
  check_dataset_files(path)  # present, JSON objects
  root = epath.Path(path)
  info = json.loads((root / "dataset_info.json").read_text())
  splits = {s.get("name"): s for s in info.get("splits", [])}
  if split not in splits:
    raise ProclipError(f"The dataset {path} has no split {split!r}; it has {sorted(splits)}.")
  s = splits[split]
  ident = {"name": info.get("name"), "version": info.get("version"), "split": split,
           "num_bytes": s.get("numBytes"), "shard_lengths": s.get("shardLengths")}
  features = root / "features.json"
  if features.exists():
    ident["features"] = json.loads(features.read_text())
  report = root / "ingest_report.json"
  if report.exists():
    try:
      r = json.loads(report.read_text())
    except ValueError:
      r = None
    if not isinstance(r, dict):
      raise ProclipError(f"{report} is damaged (not a JSON object); build the dataset again "
                         "with tools/build_dataset.py.")
    ident["report"] = {"splits": r.get("splits"), "skipped": r.get("skipped"),
                       "caption_fields": r.get("caption_fields")}
  ident["records"] = _records_digest(path, split, sum(int(n) for n in s.get("shardLengths") or []))
  return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


ORDER_SAMPLES = 64


def _records_digest(path: str, split: str, count: int) -> str:
  """sha256 over (position, every field) of up to ORDER_SAMPLES evenly spaced records."""
  if count <= 0:
    return ""
  from proclip_jax.data.pipeline import open_source  # pylint: disable=import-outside-toplevel
  source = open_source(path, split)
  n = len(source)
  positions = sorted({int(round(i * (n - 1) / max(ORDER_SAMPLES - 1, 1)))
                      for i in range(min(ORDER_SAMPLES, n))})
  h = hashlib.sha256()
  for pos in positions:
    record = source[pos]
    h.update(f"{pos}\n".encode())
    for key in sorted(record):
      a = np.asarray(record[key])
      if a.dtype.kind in "OSU":  # bytes / strings: their contents, not object pointers
        b = b"".join(x if isinstance(x, bytes) else str(x).encode() for x in a.reshape(-1))
      else:
        b = np.ascontiguousarray(a).tobytes()
      h.update(f"{key}:{len(b)}\n".encode())
      h.update(b)
  return h.hexdigest()


def texts_sha256(texts: Sequence[str]) -> str:
  """sha256 of captions in order (each UTF-8, length-prefixed)."""
  h = hashlib.sha256()
  for t in texts:
    b = t.encode("utf-8", "surrogatepass")
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)
  return h.hexdigest()


# ------------------------------------------------------------------------- row checksums
# Content checksums: one uint32 per row of every field file, in ``{field}.rowsum.npy``
# (manifest ``row_checksums``: {field: file name}), and ``ids_sha256`` over ``ids.npy``.
# A reader verifies exactly the rows it reads, on every lookup, at the cost of 4 bytes read
# and one multiply-add per value: a 100 GB cache is never read whole to be checked, and a
# flipped value is refused the first time it would be used. The row hash includes the row's
# id, so rows moved or shifted are caught too.

ROWSUM_SUFFIX = ".rowsum.npy"
_ID_MIX = np.uint64(0x9E3779B1)


def row_checksums(rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """uint32 [B]: ``sum_j word(rows[b, j]) * (2 j + 1) + id_b * 0x9E3779B1 (mod 2^32)`` of
  stored rows (any 1/2/4-byte dtype: its bits, widened to uint32)."""
  rows = np.ascontiguousarray(rows)
  words = rows.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[rows.dtype.itemsize])
  words = words.astype(np.uint32)
  weights = (np.arange(rows.shape[1], dtype=np.uint32) * np.uint32(2) + np.uint32(1))
  total = (words * weights).sum(axis=1, dtype=np.uint64)  # uint32 products, exact sum
  total += np.asarray(ids, np.int64).astype(np.uint64) * _ID_MIX
  return (total & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def write_row_checksums(out: str, fields: Sequence[str], dtype: str,
                        chunk_rows: int = 65536) -> dict:
  """Writes ``{field}.rowsum.npy`` for the complete field files of the cache ``out``
  (streamed in chunks) and returns the manifest entry ``{field: file name}``."""
  ids = _load_npy(os.path.join(out, IDS_FILE))
  entry = {}
  for f in fields:
    a = _load_npy(os.path.join(out, f"{f}.npy"))
    sums = np.empty(a.shape[0], np.uint32)
    for s in range(0, a.shape[0], chunk_rows):
      sums[s:s + chunk_rows] = row_checksums(np.asarray(a[s:s + chunk_rows], storage_dtype(dtype)),
                                             ids[s:s + chunk_rows])
    atomic_save_npy(os.path.join(out, f + ROWSUM_SUFFIX), sums)
    entry[f] = f + ROWSUM_SUFFIX
  return entry


# ------------------------------------------------------------------------- dtypes

def storage_dtype(dtype: str) -> np.dtype:
  """The NumPy dtype on disk for ``dtype`` (bfloat16 is kept as its uint16 bits)."""
  if dtype not in DTYPES:
    raise ProclipError(f"Cache dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
  return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def encode_rows(x: np.ndarray, dtype: str) -> np.ndarray:
  """float32 rows -> the on-disk representation of ``dtype``."""
  x = np.asarray(x, np.float32)
  if dtype == "bfloat16":
    return x.astype(ml_dtypes.bfloat16).view(np.uint16)
  return x.astype(storage_dtype(dtype))


def decode_rows(x: np.ndarray, dtype: str) -> np.ndarray:
  """On-disk rows of ``dtype`` -> float32."""
  if dtype == "bfloat16":
    return np.asarray(x).view(ml_dtypes.bfloat16).astype(np.float32)
  return np.asarray(x, np.float32)


# ------------------------------------------------------------------------- writing helpers

def _temporary(path: str) -> epath.Path:
  """A per-process temporary name beside ``path``: renamed to ``path`` once written whole."""
  return epath.Path(f"{path}.tmp-{os.getpid()}")


@contextlib.contextmanager
def _writing(path: str):
  """Yields the temporary name of ``path`` and renames it to ``path`` at the end; a failed
  write (disk full, no permission) removes it and becomes a ProclipError: what was renamed
  into place before stays, so the same command run again goes on from there."""
  tmp = _temporary(path)
  try:
    yield tmp
    tmp.replace(path)
  except OSError as e:
    with contextlib.suppress(OSError):
      tmp.unlink(missing_ok=True)
    raise ProclipError(f"Cannot write {path}: {e.strerror or e}. Free space on that disk (or "
                       "fix its permissions) and run the same command again; finished parts "
                       "are kept.") from e


def atomic_save_npy(path: str, array: np.ndarray) -> None:
  """``np.save`` to ``path`` through a temporary name and a rename."""
  with _writing(path) as tmp, tmp.open("wb") as f:
    np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def atomic_write_json(path: str, obj: Any) -> None:
  with _writing(path) as tmp:
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: str) -> Any:
  try:
    return json.loads(epath.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise ProclipError(f"{path} is not valid JSON ({e}); the cache is damaged: remove it and "
                       "run tools/precompute.py again.") from e


def merge_parts(parts: Sequence[str], out: str, rows: int, dim: int, dtype: np.dtype) -> None:
  """Concatenates part ``.npy`` files (in the given order) into ``out`` atomically.

  The ``.npy`` header goes first and the parts' rows are streamed after it, one part in
  memory at a time, so the file is the one ``np.save`` writes for the whole array.
  """
  written = 0
  with _writing(out) as tmp:
    with tmp.open("wb") as f:
      np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": False, "shape": (rows, dim)})
      for p in parts:
        with epath.Path(p).open("rb") as pf:
          a = np.load(pf, allow_pickle=False)
        if a.ndim != 2 or a.shape[1] != dim or written + a.shape[0] > rows:
          written = -1  # never equal to rows: refused below
          break
        f.write(np.ascontiguousarray(a, dtype).tobytes())
        written += a.shape[0]
    if written != rows:
      tmp.unlink()
      raise ProclipError(f"The parts of {out} do not make {rows} rows of {dim} values; remove "
                         f"{os.path.dirname(parts[0]) if parts else out} and run again.")


# ------------------------------------------------------------------------- reading

def _load_npy(path: str) -> np.ndarray:
  """A local ``.npy`` memory-mapped (lookups touch only their rows); any other read whole."""
  if paths.is_local(path):
    return np.load(path, mmap_mode="r")
  with epath.Path(path).open("rb") as f:
    return np.load(f, allow_pickle=False)


def read_manifest(path: str) -> dict:
  """The manifest of a complete cache (ProclipError for an incomplete or foreign folder)."""
  path = os.fspath(path)
  if not epath.Path(path).is_dir():
    raise ProclipError(f"No embedding cache at {path}. Write one with `python "
                       f"tools/precompute.py --data DATA --model MODEL --fields ... --out {path}`.")
  mpath = os.path.join(path, MANIFEST)
  if not epath.Path(mpath).exists():
    extra = (" It has partial results (parts/): run the same tools/precompute.py command "
             "again to finish it." if epath.Path(path, PARTS_DIR).is_dir() else "")
    raise ProclipError(f"{path} is not a complete embedding cache (no {MANIFEST}; the "
                       f"manifest is written last).{extra}")
  m = read_json(mpath)
  if not isinstance(m, dict) or m.get("format") != FORMAT:
    found = m.get("format") if isinstance(m, dict) else None
    raise ProclipError(f"{mpath} is not an embedding-cache manifest (format {found!r}, "
                       f"expected {FORMAT!r}).")
  if m.get("version") != VERSION:
    raise ProclipError(f"{path}: cache format version {m.get('version')} is not supported "
                       f"(this code reads version {VERSION}); write the cache again.")
  return m


def _sha256_rows(a: np.ndarray, chunk: int = 1 << 22) -> str:
  """sha256 of an array's bytes (C order), read in chunks of rows (memory-mapped files)."""
  h = hashlib.sha256()
  for s in range(0, a.shape[0], chunk):
    h.update(np.ascontiguousarray(a[s:s + chunk]).tobytes())
  return h.hexdigest()


def _short(fp: Any) -> str:
  return f"{fp[:12]}..." if isinstance(fp, str) and len(fp) > 12 else repr(fp)


def check_manifest(m: Mapping, expect: Mapping[str, Any] | None, where: str = "") -> None:
  """Raises ProclipError listing every way the manifest ``m`` differs from ``expect``.

  ``expect`` keys (all optional): ``kind`` ("llm" | "clip_text"), ``model`` (a converted model
  folder whose parameter fingerprint must match), ``model_fingerprint`` (the fingerprint
  itself), ``preset`` (preset name), ``dim``, ``fields`` (each must be in the cache),
  ``dataset`` (a dataset fingerprint) or ``data`` (a dataset folder) with ``split``.
  """
  expect = dict(expect or {})
  unknown = sorted(set(expect) - set(EXPECT_KEYS))
  if unknown:
    raise ProclipError(f"CacheReader expect has unknown keys {unknown}; known: "
                       f"{', '.join(EXPECT_KEYS)}.")
  problems = []
  if expect.get("kind") is not None and m.get("kind") != expect["kind"]:
    problems.append(f"it holds {m.get('kind')!r} features, the run expects {expect['kind']!r}")
  fp = expect.get("model_fingerprint")
  if expect.get("model") is not None:
    fp = model_fingerprint(expect["model"])
  have_fp = (m.get("model") or {}).get("fingerprint")
  if fp is not None and have_fp != fp:
    src = f" ({expect['model']})" if expect.get("model") is not None else ""
    problems.append(f"it was computed with model weights {_short(have_fp)} "
                    f"({(m.get('model') or {}).get('path')}), the run's model{src} has "
                    f"{_short(fp)}")
  if expect.get("preset") is not None and m.get("preset_name") != expect["preset"]:
    problems.append(f"embedder preset {m.get('preset_name')!r}, expected {expect['preset']!r}")
  if expect.get("dim") is not None and m.get("dim") != int(expect["dim"]):
    problems.append(f"dimension {m.get('dim')}, expected {int(expect['dim'])}")
  if expect.get("fields") is not None:
    want = [expect["fields"]] if isinstance(expect["fields"], str) else list(expect["fields"])
    missing = [f for f in want if f not in m.get("fields", [])]
    if missing:
      problems.append(f"no field(s) {missing} (it has {m.get('fields')})")
  dfp = expect.get("dataset")
  if expect.get("data") is not None:
    split = expect.get("split") or (m.get("dataset") or {}).get("split") or "train"
    dfp = dataset_fingerprint(expect["data"], split)
  elif expect.get("split") is not None and (m.get("dataset") or {}).get("split") != expect["split"]:
    problems.append(f"dataset split {(m.get('dataset') or {}).get('split')!r}, expected "
                    f"{expect['split']!r}")
  have_dfp = (m.get("dataset") or {}).get("fingerprint")
  if dfp is not None and have_dfp != dfp:
    src = f" ({expect['data']}, split {expect.get('split') or 'train'!r})" if expect.get(
        "data") is not None else ""
    problems.append(f"it was computed on another dataset ({(m.get('dataset') or {}).get('path')}"
                    f", split {(m.get('dataset') or {}).get('split')!r}, fingerprint "
                    f"{_short(have_dfp)}) than the run's{src} ({_short(dfp)})")
  if problems:
    raise ProclipError(f"The embedding cache {where} does not match this run: "
                       + "; ".join(problems) + ". Recompute it with tools/precompute.py for "
                       "this model and dataset, or point the config at the right cache.")


class CacheReader:
  """Random access to a complete embedding cache by example id (float32 rows).

  Args:
    path: the cache folder.
    expect: what the run expects (see :func:`check_manifest`); mismatches raise ProclipError.
    fields: fields to open (default: all of the cache's).
    verify: check content checksums (default True): ``ids.npy`` against the manifest's
      ``ids_sha256`` once at open (8 bytes per row), and every row a lookup reads against
      its ``{field}.rowsum.npy`` entry (4 bytes per row read). Nothing is read in advance,
      so opening a 100 GB cache stays cheap. A cache written before row checksums is read
      unchecked.

  Attributes: ``path``, ``manifest``, ``ids`` (int64 [N], increasing), ``dim``, ``fields``,
  ``dtype`` (the stored dtype name), ``kind``.

  ``lookup(ids, fields)`` is the pipeline's side-data protocol (also ``reader(ids, fields)``).
  Thread-safe for reads (memory-mapped or in-memory arrays, no mutable state).
  """

  def __init__(self, path: str, expect: Mapping[str, Any] | None = None,
               fields: Sequence[str] | None = None, *, verify: bool = True):
    self.path = paths.absolute(path)
    m = read_manifest(self.path)
    check_manifest(m, expect, self.path)
    self.manifest = m
    self.kind = m["kind"]
    self.dim = int(m["dim"])
    self.dtype = m["dtype"]
    all_fields = list(m["fields"])
    fields = all_fields if fields is None else ([fields] if isinstance(fields, str)
                                                else list(fields))
    missing = [f for f in fields if f not in all_fields]
    if missing:
      raise ProclipError(f"The embedding cache {self.path} has no field(s) {missing}; it has "
                         f"{all_fields}.")
    self.fields = fields
    files = m.get("files", {})
    self.ids = self._open(files.get("ids", IDS_FILE), np.dtype(np.int64), (int(m["count"]),))
    self._arrays = {f: self._open(files.get(f, f"{f}.npy"), storage_dtype(self.dtype),
                                  (int(m["count"]), self.dim)) for f in fields}
    self._rowsums = {}
    if verify:
      want = m.get("ids_sha256")
      if want and _sha256_rows(self.ids) != want:
        raise ProclipError(f"{os.path.join(self.path, files.get('ids', IDS_FILE))} does not "
                           "match the manifest's ids_sha256; the cache is damaged: remove it "
                           "and run tools/precompute.py again.")
      for f in fields:
        name = (m.get("row_checksums") or {}).get(f)
        if name:
          self._rowsums[f] = self._open(name, np.dtype(np.uint32), (int(m["count"]),))
    self._skipped = {}
    for f in fields:
      skipped = np.asarray(sorted((m.get("skipped") or {}).get(f, [])), np.int64)
      if skipped.size:
        self._skipped[f] = skipped

  def _open(self, name: str, dtype: np.dtype, shape: tuple) -> np.ndarray:
    p = os.path.join(self.path, name)
    if not epath.Path(p).exists():
      raise ProclipError(f"The embedding cache {self.path} lacks {name} (its manifest lists "
                         "it); the cache is damaged: remove it and run tools/precompute.py again.")
    try:
      a = _load_npy(p)
    except (ValueError, OSError, EOFError) as e:
      raise ProclipError(f"{p} cannot be read ({type(e).__name__}: {e}); the cache is damaged "
                         "(truncated?): remove it and run tools/precompute.py again.") from e
    if a.dtype != dtype or a.shape != shape:  # shape[0]: the manifest's row count
      raise ProclipError(f"{p} is {a.dtype} {a.shape}, the manifest says {dtype} {shape}; the "
                         "cache is damaged: remove it and run tools/precompute.py again.")
    return a

  def __len__(self) -> int:
    return int(self.ids.shape[0])

  def rows(self, ids) -> np.ndarray:
    """Row indices of ``ids`` (ProclipError naming the ids the cache does not hold)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    rows = np.searchsorted(self.ids, ids)
    rows_c = np.minimum(rows, len(self) - 1)
    bad = self.ids[rows_c] != ids if len(self) else np.ones(ids.shape, bool)
    if bad.any():
      missing = np.unique(ids[bad])
      raise ProclipError(f"The embedding cache {self.path} has no rows for ids "
                         f"{missing[:10].tolist()}{' ...' if missing.size > 10 else ''} "
                         f"({missing.size} missing); it was computed on another dataset or "
                         "split. Recompute it for this data.")
    return rows_c

  def get(self, field: str, ids) -> np.ndarray:
    """float32 ``[len(ids), dim]`` rows of ``field`` for ``ids``."""
    if field not in self._arrays:
      raise ProclipError(f"The embedding cache {self.path} has no field {field!r} open; it has "
                         f"{self.fields}.")
    ids = np.asarray(ids, np.int64).reshape(-1)
    rows = self.rows(ids)
    skipped = self._skipped.get(field)
    if skipped is not None:
      hit = np.isin(ids, skipped)
      if hit.any():
        raise ProclipError(f"Ids {np.unique(ids[hit])[:10].tolist()} have an empty {field!r} "
                           f"caption and were skipped when {self.path} was written "
                           "(--skip-empty); they have no feature. Drop them from the data or "
                           "use another caption field.")
    order = np.argsort(rows, kind="stable")
    out = np.empty((ids.shape[0], self.dim), np.float32)
    raw = self._arrays[field][rows[order]]
    sums = self._rowsums.get(field)
    if sums is not None:
      wrong = row_checksums(raw, self.ids[rows[order]]) != sums[rows[order]]
      if wrong.any():
        bad = np.unique(ids[order][wrong])
        raise ProclipError(f"The embedding cache {self.path} has {field!r} rows that differ "
                           f"from their checksums (ids {bad[:10].tolist()}"
                           f"{' ...' if bad.size > 10 else ''}); the cache is damaged: "
                           "recompute it with tools/precompute.py.")
    out[order] = decode_rows(raw, self.dtype)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():  # a NaN passed on would poison the loss without a word
      bad = np.unique(ids[~finite])
      raise ProclipError(f"The embedding cache {self.path} has non-finite (NaN/inf) {field!r} "
                         f"features for ids {bad[:10].tolist()}"
                         f"{' ...' if bad.size > 10 else ''}; the cache is damaged: "
                         "recompute it with tools/precompute.py.")
    return out

  def lookup(self, ids, fields) -> np.ndarray:
    """The pipeline side-data protocol: row ``i`` is the feature of ``(ids[i], fields[i])``.

    Args:
      ids: int64 [B] example ids.
      fields: one field name for all rows, or an array/sequence of B field names.

    Returns:
      float32 [B, dim].
    """
    ids = np.asarray(ids, np.int64).reshape(-1)
    if isinstance(fields, (str, bytes)):
      return self.get(fields.decode() if isinstance(fields, bytes) else fields, ids)
    names = np.asarray([f.decode() if isinstance(f, bytes) else str(f) for f in fields],
                       dtype=object)
    if names.shape != ids.shape:
      raise ProclipError(f"lookup: {names.shape[0]} field names for {ids.shape[0]} ids.")
    out = np.empty((ids.shape[0], self.dim), np.float32)
    for name in dict.fromkeys(names.tolist()):
      sel = np.flatnonzero(names == name)
      out[sel] = self.get(name, ids[sel])
    return out

  __call__ = lookup
