"""Ingestion: image-text pairs -> a tensorflow-datasets dataset of ArrayRecord files.

:mod:`.sources` reads the inputs (JSONL/CSV manifests, folders of webdataset shards, or a
``{split: source}`` mapping) and gives every example its stable id; this module validates
the examples and writes them.

Output ``OUT`` is a tfds dataset folder (``dataset_info.json``, ``features.json``,
``metadata.json``, ``NAME-SPLIT.array_record-*``) that reads without TensorFlow::

  tfds.builder_from_directory(OUT).as_data_source("train")[i]
  # {"id": int64, "image": bytes, "short": bytes (UTF-8), ..., "lang": bytes}

plus ``OUT/ingest_report.json`` (counts per split and per reason, every skipped example
with id, location and reason, ignored columns). Examples are stored in the order the
sources give them (rows, shard members).

Images are validated: PIL must identify them, ``verify()`` and fully ``load()`` them;
width*height above ``max_pixels`` (and PIL's DecompressionBombError) is rejected. Storage
encoding: an RGB JPEG or RGB PNG keeps its original bytes; anything else (other modes, other
formats) is converted to RGB (see ``transforms.to_rgb``) and re-encoded as PNG (lossless).
A bad example (see :mod:`.sources` for the caption rules) is skipped and listed in the
report; nothing else is dropped.

The build writes into ``.OUT_NAME.incomplete`` beside ``OUT`` and renames it at the end, so a
killed run never leaves a folder that looks complete; running again starts that split
from scratch (the leftover temporary folder is removed). A write that fails (disk full) is a
ProclipError and leaves nothing. ``OUT`` must lie apart from the inputs: it may not be,
contain or lie inside a source, nor be or contain a manifest's folder or its images' folders
(``--overwrite`` would delete them). Paths go through ``etils.epath``.
"""
import contextlib
import dataclasses
import io
import itertools
import json
import os
import tempfile
import time
import warnings
from concurrent import futures
from typing import Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tqdm import tqdm

from proclip_jax.data import paths, sources, transforms
from proclip_jax.data.sources import BadExample, RawExample
from proclip_jax.errors import ProclipError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own warning threshold
DATASET_NAME = "proclip_data"
VERSION = "1.0.0"
REPORT_NAME = "ingest_report.json"


# ---------------------------------------------------------------------------------------
# Validation (runs in worker processes when num_workers > 0).


def validate_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
  """Checks encoded image bytes and returns the bytes to store (see the module docstring).

  Raises:
    BadExample: with reason ``unreadable image``, ``too many pixels``, ``corrupt image``.
  """
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
      im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
      raise BadExample("too many pixels", str(e)) from None
    except Exception as e:  # noqa: BLE001  PIL raises many types for bad files.
      raise BadExample("unreadable image", f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
      raise BadExample("unreadable image", f"image size {w}x{h}")
    if w * h > max_pixels:
      raise BadExample("too many pixels",
                       f"{w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
    fmt, mode = im.format, im.mode
    try:
      im.verify()
      im = Image.open(io.BytesIO(data))
      im.load()
      rgb = transforms.to_rgb(im)
    except Image.DecompressionBombError as e:
      raise BadExample("too many pixels", str(e)) from None
    except Exception as e:  # noqa: BLE001
      raise BadExample("corrupt image", f"{type(e).__name__}: {e}") from None
  if fmt in ("JPEG", "PNG") and mode == "RGB":
    return data
  out = io.BytesIO()
  rgb.save(out, format="PNG")
  return out.getvalue()


def _read_image(path: str | None) -> bytes:
  if path is None or not epath.Path(path).is_file():
    raise BadExample("missing file", f"no image file at {path}")
  try:
    return epath.Path(path).read_bytes()
  except OSError as e:
    raise BadExample("missing file", f"cannot read {path}: {e}") from None


def _process(raw: RawExample, max_pixels: int):
  """Validates one example: ``(id, record or BadExample, location)``.

  Module-level (worker processes pickle it by name); tests replace it to kill a build.
  """
  return (raw.id, _process_one(raw, max_pixels), raw.location)


def _process_one(raw: RawExample, max_pixels: int):
  if raw.error is not None:
    return raw.error
  try:
    data = raw.image_bytes if raw.image_bytes is not None else _read_image(raw.image_path)
    image = validate_image(data, max_pixels)
  except BadExample as e:
    return e
  return {**raw.fields, "id": raw.id, "image": image}


def _validated(raws: Iterator[RawExample], max_pixels: int, num_workers: int):
  """``_process`` of every example, in order; in ``num_workers`` processes when above 0."""
  if num_workers <= 0:
    yield from (_process(r, max_pixels) for r in raws)
    return
  executor = futures.ProcessPoolExecutor(num_workers)
  try:
    yield from executor.map(_process, raws, itertools.repeat(max_pixels), chunksize=16)
  finally:
    executor.shutdown(cancel_futures=True)


# ---------------------------------------------------------------------------------------
# What is kept and skipped.


class _EmptySplit(Exception):
  """Every example of a split was skipped (raised by its generator, inside tfds' build)."""


@dataclasses.dataclass
class _Tally:
  """Examples written and skipped per split, filled in while tfds consumes the generators."""
  counts: dict = dataclasses.field(default_factory=dict)  # split -> {"written", "skipped"}
  skipped: list = dataclasses.field(default_factory=list)
  ids: set = dataclasses.field(default_factory=set)

  def start(self, split: str) -> None:
    self.counts[split] = {"written": 0, "skipped": 0}

  def keep(self, split: str, ex_id: int, result) -> BadExample | None:
    """Counts the example as written, or returns why it is skipped (bad, or a repeated id)."""
    if not isinstance(result, BadExample) and ex_id in self.ids:
      result = BadExample("duplicate id", f"id {ex_id} appears more than once")
    if isinstance(result, BadExample):
      return result
    self.ids.add(ex_id)
    self.counts[split]["written"] += 1
    return None

  def skip(self, split: str, ex_id: int, location: str, bad: BadExample) -> None:
    self.skipped.append({"id": ex_id, "split": split, "location": location,
                         "reason": bad.reason, "detail": bad.detail})
    self.counts[split]["skipped"] += 1

  def by_reason(self) -> dict:
    counts = {}
    for r in self.skipped:
      counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    return counts


def _records(plan: sources.Plan, split: str, tally: _Tally, *, max_pixels: int,
             default_lang: str, num_workers: int, progress: bool):
  """The validated records of ``split`` in source order, each with the merged schema's keys.

  Raises:
    _EmptySplit: at the end, when no example of the split was kept.
  """
  keys = ("id", "image", *plan.schema.captions, *plan.schema.ints, *plan.schema.texts)
  bar = tqdm(desc=f"ingest {split}", unit="ex", disable=not progress, smoothing=0.1)
  tally.start(split)
  results = _validated(sources.examples(plan, split, default_lang), max_pixels, num_workers)
  try:
    for ex_id, result, location in results:
      bar.update(1)
      bad = tally.keep(split, ex_id, result)
      if bad is not None:
        tally.skip(split, ex_id, location, bad)
        continue
      yield {k: result[k] for k in keys}
  finally:
    bar.close()
    results.close()
  if tally.counts[split]["written"] == 0:
    raise _EmptySplit(split)


# ---------------------------------------------------------------------------------------
# Writing with tfds.


def _features(schema: sources.Schema):
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
  """A beam-free tfds builder over the record generators that ``build_dataset`` prepares."""

  VERSION = tfds.core.Version(VERSION)
  name = DATASET_NAME
  # No code folder, so no checksums or metadata files are looked up beside the code (tfds'
  # own lookup of that folder needs importlib_resources, which tfds does not install).
  code_path = None

  def __init__(self, *, features, split_records, description, metadata, **kwargs):
    self._feature_spec = features
    self._split_records = split_records
    self._description = description
    self._metadata = metadata
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=self._description, features=self._feature_spec,
        disable_shuffling=True, metadata=tfds.core.MetadataDict(self._metadata))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(s) for s in self._split_records}

  def _generate_examples(self, split):
    for record in self._split_records[split]():
      yield record["id"], record


def _tfds_progress_bar_enabled() -> bool:
  # tfds can switch its progress bars on and off (tfds.display_progress_bar) but has no
  # public getter; the module flag is the only way to give the caller's setting back.
  return tfds.core.utils.tqdm_utils._active  # pylint: disable=protected-access


def _prepare_quietly(builder: tfds.core.DatasetBuilder) -> None:
  """``download_and_prepare`` without tfds' bars (ours count examples) or its "downloaded"
  lines on stdout (nothing is downloaded; they would mislead)."""
  was_active = _tfds_progress_bar_enabled()
  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare()
  finally:
    tfds.display_progress_bar(was_active)


def _write_failed(e: BaseException) -> bool:
  """Whether ``e`` is a failed write: an OSError, or the RuntimeError the ArrayRecord writer
  raises for one (it carries the OS message, e.g. "write() failed: No space left on device")."""
  return isinstance(e, OSError) or (isinstance(e, RuntimeError) and "write() failed" in str(e))


def _fresh_dir(path: epath.Path) -> epath.Path:
  path.rmtree(missing_ok=True)
  path.mkdir(parents=True)
  return path


def _upload(src: epath.Path, dst: epath.Path) -> None:
  """Copies the files of the local folder ``src`` into ``dst`` (any epath location)."""
  for folder, _, files in os.walk(os.fspath(src)):
    rel = os.path.relpath(folder, os.fspath(src))
    target = dst if rel == "." else dst / rel
    target.mkdir(parents=True, exist_ok=True)
    for name in sorted(files):
      epath.Path(folder, name).copy(target / name, overwrite=True)


def _move_into_place(built: epath.Path, out: epath.Path) -> None:
  """Renames ``built`` to ``out``, replacing an existing ``out`` only once ``built`` is whole."""
  if not out.exists():
    built.rename(out)
    return
  trash = out.parent / f".{out.name}.old"
  trash.rmtree(missing_ok=True)
  out.rename(trash)
  built.rename(out)
  trash.rmtree(missing_ok=True)


def _check_output_apart(out: epath.Path, plan: sources.Plan) -> None:
  """Refuses an ``out`` that is, contains or lies inside a source, or is or contains a
  manifest's folder or the folder of one of its images (``overwrite`` would delete them)."""
  roots = []
  for s in plan.sources:
    if s.kind == "manifest":
      roots.append(("manifest's folder", os.path.dirname(paths.absolute(s.path))))
      roots += [("image folder", d) for d in s.schema.image_dirs]
  paths.check_output_apart(os.fspath(out), [("source", s.path) for s in plan.sources], roots)


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


def _report(plan: sources.Plan, tally: _Tally, max_pixels: int) -> dict:
  return {
      "sources": [{"split": s.split, "path": s.path, "kind": s.kind} for s in plan.sources],
      "splits": tally.counts,
      "written": sum(c["written"] for c in tally.counts.values()),
      "skipped": len(tally.skipped),
      "by_reason": tally.by_reason(),
      "skipped_examples": sorted(tally.skipped, key=lambda r: r["id"]),
      "ignored_columns": plan.schema.ignored,
      "caption_fields": plan.schema.captions,
      "max_pixels": max_pixels,
  }


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
      ``overwrite``, ``out`` is, contains or lies inside an input (see
      ``paths.check_output_apart``), a damaged shard or CSV, a split with no valid example,
      a failed write (disk full; nothing is kept).
  """
  t0 = time.time()
  out = epath.Path(paths.absolute(out))
  if out.exists() and not overwrite:
    raise ProclipError(f"{out} already exists. Pass overwrite=True (--overwrite) to replace it "
                       f"or choose another output folder.")
  plan = sources.plan_sources(src, split=split, fields=fields, int_fields=int_fields)
  _check_output_apart(out, plan)
  schema = plan.schema
  tally = _Tally()

  def records_of(split_name):
    return lambda: _records(plan, split_name, tally, max_pixels=max_pixels,
                            default_lang=default_lang, num_workers=num_workers,
                            progress=progress)

  meta = {"proclip": {"caption_fields": schema.captions, "int_fields": schema.ints,
                      "text_fields": schema.texts, "splits": plan.splits,
                      "image_encoding": "original bytes for RGB JPEG/PNG, else RGB PNG"}}
  meta.update(dict(metadata or {}))
  out.parent.mkdir(parents=True, exist_ok=True)
  # ArrayRecord's writer opens local files only: a dataset for gs:// is built in a local
  # temporary folder and uploaded (its reader does read gs://).
  local = paths.is_local(out)
  tmp = _fresh_dir(out.parent / f".{out.name}.incomplete") if local else epath.Path(
      tempfile.mkdtemp(prefix=f".{out.name}.incomplete-"))
  builder = _IngestBuilder(
      features=_features(schema), split_records={s: records_of(s) for s in plan.splits},
      description=f"Built by proclip_jax.data.builder from {[s.path for s in plan.sources]}.",
      metadata=meta, data_dir=tmp, file_format="array_record")
  built = tmp / DATASET_NAME / VERSION
  try:
    _prepare_quietly(builder)
    report = _report(plan, tally, max_pixels)
    (built / REPORT_NAME).write_text(json.dumps(report, indent=1))
  except _EmptySplit as e:
    tmp.rmtree(missing_ok=True)
    raise ProclipError(f"No valid example in split(s) {[str(e)]} of {src}; every example was "
                       f"skipped ({tally.by_reason()}). Fix the inputs.") from None
  except BaseException as e:
    tmp.rmtree(missing_ok=True)
    if _write_failed(e):
      raise ProclipError(f"Writing {out} failed ({' '.join(str(e).split())}); nothing was "
                         "kept. Free space on that disk (or fix its permissions) and run the "
                         "command again.") from e
    raise
  try:
    if not local:
      staged = _fresh_dir(out.parent / f".{out.name}.incomplete")
      _upload(built, staged)
      built = staged
    _move_into_place(built, out)
  finally:
    tmp.rmtree(missing_ok=True)
  return BuildResult(str(out), {s: c["written"] for s, c in tally.counts.items()},
                     len(tally.skipped), report, time.time() - t0)


def load_report(path) -> dict:
  """Reads ``PATH/ingest_report.json`` of a built dataset."""
  p = epath.Path(path) / REPORT_NAME
  if not p.exists():
    raise ProclipError(f"No {REPORT_NAME} in {path}: is it a dataset written by "
                       f"tools/build_dataset.py?")
  return json.loads(p.read_text())
