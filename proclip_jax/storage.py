"""Orbax I/O: converted-model folders and training checkpoints.

A converted-model folder ``OUT`` (``tools/convert.py``, ``ProCLIP.save``)::

    OUT/model.json      {"kind": "clip" | "embedder" | "proclip" | ..., "config": {...}, ...}
    OUT/params/         Orbax StandardCheckpointer tree of float32 parameters

It is written under a temporary name and renamed when complete, so an interrupted
conversion never leaves an ``OUT`` that looks finished.

A training run's checkpoints (``train/loop.py`` writes the rest of its workdir)::

    WORKDIR/checkpoints/STEP/state/      StandardSave of the TrainState: params, frozen,
                                         opt_state, ema (teacher), step, nonfinite_steps
    WORKDIR/checkpoints/STEP/data/       grain iterator state, one JSON file per process
    WORKDIR/checkpoints/STEP/metadata/   JsonSave: {"config": ..., "stage", "step", ...}

Saves are asynchronous (the arrays are copied off the devices before ``save`` returns; the
files are written in the background) and atomic: Orbax writes ``STEP.orbax-checkpoint-tmp-*``
and renames it when complete, so a save cut short is never taken for a checkpoint (it is
reported with a warning and cleaned up). :meth:`Checkpoints.restore` goes straight into the
sharded abstract tree; :func:`restore_numpy` reads (part of) a saved tree as host NumPy.

Files that cannot be read (truncated, damaged on disk) are a :class:`ProclipError` naming
the folder (:class:`CorruptCheckpoint` for a training checkpoint). When one array of a
restore fails, TensorStore's other reads still in flight report the failure again later;
every restore runs inside :func:`quiet_failed_restore`, which drops those echoes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import uuid
import warnings
from typing import Any, Callable, Iterator, Mapping

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from proclip_jax.data import paths
from proclip_jax.errors import ProclipError
from proclip_jax.tree import flatten

log = logging.getLogger(__name__)

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
CKPT_DIR = "checkpoints"
_TMP_MARK = ".orbax-checkpoint-tmp"


# ------------------------------------------------------------------------ read errors

# TensorStore reports I/O and decoding failures as an absl status ("OUT_OF_RANGE: ...",
# "DATA_LOSS: ...") in a ValueError, or sometimes a plain Exception; Orbax's own checks of
# the tree and the shapes (a run with another config) raise ValueError / KeyError /
# TypeError with a sentence.
_STATUS = re.compile(r"^(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION|UNKNOWN|"
                     r"INTERNAL|INVALID_ARGUMENT|UNAVAILABLE|ABORTED|PERMISSION_DENIED):")


def is_read_error(e: BaseException) -> bool:
  """Whether ``e`` (or an exception it was raised from) is a failure to read the files."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, (OSError, json.JSONDecodeError, UnicodeDecodeError, EOFError)):
      return True
    if type(e) is Exception or _STATUS.match(str(e).strip()):  # pylint: disable=unidiomatic-typecheck
      return True
    e = e.__cause__ or e.__context__
  return False


def first_line(e: BaseException) -> str:
  """``"Type: first line of the message"`` (TensorStore messages run over many lines)."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else ''}".strip()


def echo_of_failed_read(directory: str, exc: BaseException | None, text: str = "") -> bool:
  """True for a late error of a restore from ``directory`` that already failed.

  When one array of a checkpoint cannot be read, Orbax's restore raises at once while
  TensorStore's other reads are still in flight; they finish later on its threads and report
  "Event loop is closed" or their own read errors (naming the folder), as unraisable
  exceptions or as asyncio's "Task exception was never retrieved". The failure was already
  raised (and acted on) as a ProclipError, so these echoes are dropped instead of printed.
  """
  msg = f"{text} {exc!r}" if exc is not None else text
  if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
    return True
  return str(directory) in msg


# Orbax's per-array read and metadata coroutines that an aborted restore never started;
# Python warns when they are garbage-collected.
UNAWAITED_READ = (r"coroutine '(_read_array_index_and_device_put|Store\._get_array_metadatas)' "
                  r"was never awaited")


def _wait_for_reads_in_flight(timeout: float = 10.0) -> None:
  """Waits (at most ``timeout`` s in all) for the TensorStore operations still running.

  After a failed restore these are the reads it left in flight; they complete (and report
  their echoes) on TensorStore's threads, so the filters must stay until they are done.
  """
  pending = [f for f in gc.get_objects() if isinstance(f, ts.Future) and not f.done()]
  deadline = time.monotonic() + timeout
  for f in pending:
    try:
      f.exception(timeout=max(0.0, deadline - time.monotonic()))
    except Exception:  # pylint: disable=broad-except
      pass  # cancelled or timed out: nothing more to wait for


@contextlib.contextmanager
def quiet_failed_restore(directory) -> Iterator[None]:
  """Runs a restore from ``directory`` with the echoes of its failure dropped.

  While the block runs, unraisable exceptions and asyncio log records that are echoes of a
  failed read (:func:`echo_of_failed_read`) are dropped, and so is the warning about
  Orbax's read coroutines that were never started; everything else reaches the previous
  hook / handlers unchanged. When the block fails, it first waits for the reads still in
  flight (their echoes come as they finish), then clears the frames of the traceback and
  collects garbage, so the unstarted coroutines are collected (and their warnings dropped)
  now rather than later in the caller. The filters are removed when the block ends.
  """
  directory = str(directory)
  previous = sys.unraisablehook

  def hook(unraisable):
    if not echo_of_failed_read(directory, unraisable.exc_value, str(unraisable.err_msg or "")):
      previous(unraisable)

  class _Filter(logging.Filter):
    def filter(self, record):
      exc = record.exc_info[1] if record.exc_info else None
      return not echo_of_failed_read(directory, exc, record.getMessage())

  asyncio_log = logging.getLogger("asyncio")
  flt = _Filter()
  sys.unraisablehook = hook
  asyncio_log.addFilter(flt)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=UNAWAITED_READ, category=RuntimeWarning)
      try:
        yield
      except BaseException as e:
        _wait_for_reads_in_flight()
        traceback.clear_frames(e.__traceback__)
        gc.collect()
        raise
  finally:
    asyncio_log.removeFilter(flt)
    if sys.unraisablehook is hook:
      sys.unraisablehook = previous


# ------------------------------------------------------------------------ reading trees

def _is_array_meta(m) -> bool:
  return hasattr(m, "shape") and hasattr(m, "dtype")


# The item handler, not a Checkpointer: a Checkpointer also reads a step-level
# _CHECKPOINT_METADATA file, which an item folder inside a training checkpoint
# (checkpoints/STEP/state) does not have, and warns about it on every read.

def saved_tree(directory) -> Any:
  """The tree of array metadata (``.shape``, ``.dtype``) saved in an Orbax item folder."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(epath.Path(directory))
  finally:
    handler.close()
  tree = getattr(tree, "item_metadata", tree)
  return getattr(tree, "tree", tree)


def restore_numpy(directory, select: Callable[[Any], Any] | None = None) -> Any:
  """(Part of) the tree saved in an Orbax item folder, as host NumPy arrays.

  ``select`` maps the saved metadata tree (:func:`saved_tree`) to the sub-tree to read (a
  partial restore: other entries are not read); default: everything. Errors propagate as
  Orbax / TensorStore raise them (callers turn them into messages naming their folder).
  """
  directory = epath.Path(directory)
  tree = saved_tree(directory)
  if select is not None:
    tree = select(tree)
    if not jax.tree.leaves(tree, is_leaf=_is_array_meta):
      return tree
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree, is_leaf=_is_array_meta)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.restore(directory, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=select is not None))
  finally:
    handler.close()


# ------------------------------------------------------------------------ model folders

def params_fingerprint(params: Any) -> str:
  """sha256 over every parameter leaf: its "a/b/c" path, dtype, shape and bytes (sorted)."""
  h = hashlib.sha256()
  flat = flatten(params)
  for key in sorted(flat):
    a = np.ascontiguousarray(np.asarray(flat[key]))
    h.update(f"{key}|{a.dtype.str}|{a.shape}\n".encode())
    h.update(memoryview(a.reshape(-1).view(np.uint8)))
  return h.hexdigest()


def _temporary_folder(out: str) -> epath.Path:
  """A new, empty folder beside ``out`` to write it under (renamed to ``out`` when whole)."""
  parent = epath.Path(out).parent
  parent.mkdir(parents=True, exist_ok=True)
  name = epath.Path(out).name + ".tmp-"
  if paths.is_local(out):
    return epath.Path(tempfile.mkdtemp(prefix=name, dir=os.fspath(parent)))
  tmp = parent / f"{name}{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  return tmp


def publish_folder(tmp: epath.Path, out: str) -> None:
  """Renames the finished folder ``tmp`` to ``out``, replacing an existing ``out``.

  Local: an atomic rename. Elsewhere (``gs://`` has no folder rename: epath copies and
  deletes each object) the old ``out`` is removed first and ``model.json`` is copied last,
  so an interrupted move leaves a folder without ``model.json``, never one that looks whole.
  """
  dst = epath.Path(out)
  if paths.is_local(out):
    if dst.exists():
      shutil.rmtree(out)
    os.replace(os.fspath(tmp), out)
    return
  if dst.exists():
    dst.rmtree()
  files = sorted(_files(tmp), key=lambda rel: (rel == MODEL_JSON, rel))
  for rel in files:
    target = dst / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    (tmp / rel).copy(target, overwrite=True)
  tmp.rmtree()


def _files(folder: epath.Path, prefix: str = "") -> list[str]:
  """The relative paths of the files under ``folder``, at any depth."""
  out = []
  for p in folder.iterdir():
    if p.is_dir():
      out += _files(p, f"{prefix}{p.name}/")
    else:
      out.append(prefix + p.name)
  return out


def save_model(out: str, kind: str, config: Mapping[str, Any], params: Any,
               *, overwrite: bool = False, **extra: Any) -> str:
  """Writes ``params`` and ``{"kind", "config", "params_sha256", **extra}`` to ``out`` atomically.

  ``out`` is a local path or a URI (``gs://bucket/...``, through ``etils.epath``).
  ``params_sha256`` (:func:`params_fingerprint`) lets caches check which weights made them
  without loading the parameters again.
  """
  tmp = start_model_folder(out, overwrite=overwrite)
  out = paths.absolute(out)
  try:
    write_model_files(tmp, kind, config, params, **extra)
    publish_folder(tmp, out)
  except BaseException:
    tmp.rmtree(missing_ok=True)
    raise
  return out


def start_model_folder(out, *, overwrite: bool = False) -> epath.Path:
  """Refuses an existing ``out`` (unless ``overwrite``); returns a new temporary folder
  beside it to write the model into (:func:`publish_folder` moves it into place)."""
  out = paths.absolute(out)
  if epath.Path(out).exists() and not overwrite:
    raise ProclipError(f"Output {out!r} already exists; remove it or pass --overwrite.")
  return _temporary_folder(out)


def write_model_files(folder: epath.Path, kind: str, config: Mapping[str, Any], params: Any,
                      **extra: Any) -> None:
  """``folder/params/`` (Orbax) and ``folder/model.json`` (written last)."""
  params = jax.tree.map(np.asarray, params)
  ckptr = ocp.StandardCheckpointer()
  try:
    ckptr.save(epath.Path(folder) / PARAMS_DIR, params)
    ckptr.wait_until_finished()
  finally:
    ckptr.close()
  meta = {"kind": kind, "config": dict(config),
          "params_sha256": params_fingerprint(params), **extra}
  (epath.Path(folder) / MODEL_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True))


def is_model_folder(path) -> bool:
  """Whether ``path`` is a folder with a ``model.json`` (see :func:`save_model`)."""
  return epath.Path(paths.absolute(path), MODEL_JSON).is_file()


def read_model_json(path: str) -> dict:
  p = os.path.join(os.fspath(path), MODEL_JSON)
  f = epath.Path(p)
  if not f.exists():
    raise ProclipError(
        f"{path!r} is not a converted model folder (no {MODEL_JSON}). Make one with "
        "`python tools/convert.py SRC OUT`.")
  try:
    meta = json.loads(f.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ProclipError(f"{p} is damaged (not valid JSON: {e}). Convert the model again with "
                       "`python tools/convert.py SRC OUT`.") from None
  if not isinstance(meta, dict):
    raise ProclipError(f"{p} is damaged (a JSON {type(meta).__name__}, not an object). Convert "
                       "the model again with `python tools/convert.py SRC OUT`.")
  return meta


def load_model(path: str, *, kind: str | None = None, target: Any = None):
  """Returns ``(meta, params)`` from a folder written by :func:`save_model`.

  ``path`` is a local folder or a URI (``gs://...``). ``target`` (an abstract tree,
  optionally with shardings) restores straight into that structure and placement;
  otherwise arrays come back as host numpy arrays.

  Raises:
    ProclipError: no ``model.json``, another ``kind``, or parameters that cannot be read
      (missing or damaged files).
  """
  path = paths.absolute(path)
  meta = read_model_json(path)
  if kind is not None and meta.get("kind") != kind:
    raise ProclipError(
        f"{path!r} holds a {meta.get('kind')!r} model, but a {kind!r} model was expected.")
  params_dir = epath.Path(path) / PARAMS_DIR
  try:
    with quiet_failed_restore(params_dir):
      if target is None:
        params = restore_numpy(params_dir)
      else:
        ckptr = ocp.StandardCheckpointer()
        try:
          params = ckptr.restore(params_dir, target)
        finally:
          ckptr.close()
  except FileNotFoundError as e:
    raise ProclipError(f"{path!r} lacks its parameters ({PARAMS_DIR}/); convert it again.") from e
  except Exception as e:  # pylint: disable=broad-except
    # With a caller's target, a ValueError may be a structure mismatch (theirs to report);
    # a TensorStore status ("OUT_OF_RANGE: ...") or an I/O error is a damaged folder.
    if target is not None and not is_read_error(e):
      raise
    raise ProclipError(f"{path}: its parameters cannot be read ({first_line(e)}); the folder "
                       "is damaged: convert it again with tools/convert.py.") from e
  return meta, params


# ------------------------------------------------------------------------ content checksums
# Orbax stores no checksum: a flipped bit in an array file is restored as it is. Every
# training checkpoint records one 32-bit checksum per array in its JSON metadata
# ("checksums": {"params/visual/...": n}), verified on every restore.
#
# checksum(a) = sum_i word(a_i) * (2 i + 1)  (mod 2^32)
#
# word: the element's bits as uint32 (16- and 8-bit types widened, bool as 0/1); i: the
# flat (C-order) index. Integer addition mod 2^32 is exact in any order, so the value is
# the same computed on device (a jitted reduction over the global, possibly multi-host
# sharded array: every process gets the same number, no gather) and in NumPy on host
# (:func:`numpy_checksums`). The weights are odd, hence invertible mod 2^32: any change
# of a single element always changes the checksum.

_MIX = np.uint32(2654435761)


def _words_np(a: np.ndarray) -> np.ndarray:
  a = np.ascontiguousarray(a)
  if a.dtype == np.bool_:
    return a.astype(np.uint32)
  size = a.dtype.itemsize
  if size == 8:
    return a.reshape(-1).view(np.uint32)
  return a.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[size]).astype(np.uint32)


def _checksum_np(a) -> int:
  w = _words_np(np.asarray(a)).reshape(-1)
  total = np.uint64(0)
  step = 1 << 22  # bounded temporaries for large arrays
  for s in range(0, w.size, step):
    idx = np.arange(s, min(s + step, w.size), dtype=np.uint64)
    weights = ((idx * np.uint64(2) + np.uint64(1)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    part = (w[s:s + step] * weights).astype(np.uint64)  # uint32 product: wraps mod 2^32
    total = (total + part.sum(dtype=np.uint64)) & np.uint64(0xFFFFFFFF)
  return int(total)


def _checksum_jax(a):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
    a = jax.random.key_data(a)
  if a.dtype == jnp.bool_:
    w = a.astype(jnp.uint32)
  elif a.dtype.itemsize == 8:
    w = jax.lax.bitcast_convert_type(a, jnp.uint32)  # [..., 2]: the two halves in order
  else:
    w = jax.lax.bitcast_convert_type(
        a, {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[a.dtype.itemsize]).astype(jnp.uint32)
  w = w.reshape(-1)
  idx = jax.lax.iota(jnp.uint32, w.size)
  return jnp.sum(w * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


def _path_name(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def named_leaves(tree) -> dict[str, Any]:
  """``{"a/b/c": leaf}`` of any pytree (dicts, dataclasses, tuples: keys, names, indices)."""
  return {_path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


_CHECKSUM_FN = {}


def tree_checksums(tree) -> dict[str, int]:
  """``{"path": checksum}`` of every array leaf of ``tree`` (device or host arrays)."""
  leaves = named_leaves(tree)
  arrays = {k: v for k, v in leaves.items() if isinstance(v, jax.Array)}
  out = {k: _checksum_np(v) for k, v in leaves.items()
         if k not in arrays and hasattr(v, "dtype")}
  if arrays:
    fn = _CHECKSUM_FN.setdefault("fn", jax.jit(lambda t: jax.tree.map(_checksum_jax, t)))
    for k, v in fn(arrays).items():
      out[k] = int(np.asarray(jax.device_get(v)))
  return out


def numpy_checksums(tree) -> dict[str, int]:
  """:func:`tree_checksums` of a tree of host arrays, computed in NumPy."""
  return {k: _checksum_np(v) for k, v in named_leaves(tree).items() if hasattr(v, "dtype")}


def nonfinite_leaves(tree) -> list[str]:
  """Paths of the floating-point leaves of ``tree`` holding a NaN or an infinity."""
  bad = []
  for k, v in named_leaves(tree).items():
    dt = getattr(v, "dtype", None)
    if dt is None or not jax.dtypes.issubdtype(dt, np.inexact):
      continue
    if isinstance(v, jax.Array):
      ok = bool(jax.device_get(jax.numpy.isfinite(v).all()))
    else:
      ok = bool(np.isfinite(np.asarray(v, np.float32)).all())
    if not ok:
      bad.append(k)
  return bad


def verify_checksums(tree, recorded: Mapping[str, Any] | None, where: str, *,
                     host: bool = False) -> None:
  """Raises :class:`CorruptCheckpoint` when a leaf of ``tree`` differs from its recorded
  checksum or holds a NaN / inf. Leaves without a recorded checksum (a checkpoint written
  before checksums, or a partial read) are only checked for finite values."""
  problems = []
  if recorded:
    have = numpy_checksums(tree) if host else tree_checksums(tree)
    wrong = sorted(k for k in have if k in recorded and int(recorded[k]) != have[k])
    if wrong:
      problems.append(f"checksum mismatch in {len(wrong)} array(s) ({', '.join(wrong[:3])}"
                      f"{' ...' if len(wrong) > 3 else ''})")
  bad = nonfinite_leaves(tree)
  if bad:
    problems.append(f"non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
  if problems:
    raise CorruptCheckpoint(f"Checkpoint {where} is damaged: " + "; ".join(problems)
                            + " (a disk fault or a copy gone wrong).")


# ------------------------------------------------------------------------ training checkpoints

class CorruptCheckpoint(ProclipError):
  """A committed checkpoint whose files cannot be read (truncated, damaged on disk)."""


class StorageUnavailable(ProclipError):
  """The storage refused or failed a read that may succeed later (permissions, a network
  filesystem or bucket that is down): not a damaged checkpoint, never set aside."""


class SaveFailed(ProclipError):
  """A checkpoint could not be written (disk full, storage gone); the earlier ones are intact."""


# errno values and absl statuses of a storage that is (for now) unreachable or refusing.
_UNAVAILABLE_ERRNO = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ETIMEDOUT, errno.EAGAIN,
                      errno.ECONNRESET, errno.ECONNREFUSED, errno.ENETUNREACH,
                      errno.EHOSTUNREACH, errno.ESTALE, errno.ENOTCONN}
_UNAVAILABLE_STATUS = re.compile(r"\b(PERMISSION_DENIED|UNAVAILABLE|DEADLINE_EXCEEDED|"
                                 r"UNAUTHENTICATED|RESOURCE_EXHAUSTED)\b|Permission denied")


def is_unavailable(e: BaseException) -> bool:
  """Whether ``e`` (or its cause) is a storage refusing or failing to answer, rather than
  files that were read and found damaged."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _UNAVAILABLE_ERRNO:
      return True
    if _UNAVAILABLE_STATUS.search(str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


def checkpoint_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / CKPT_DIR


def partial_checkpoints(workdir) -> list[str]:
  """Names of half-written (interrupted) checkpoint folders in ``workdir``."""
  d = checkpoint_dir(workdir)
  if not d.exists():
    return []
  return sorted(p.name for p in d.iterdir() if _TMP_MARK in p.name)


def complete_steps(workdir) -> list[int]:
  """The steps of the complete checkpoints in ``workdir``, ascending ([] when none).

  Half-written saves (``STEP.orbax-checkpoint-tmp-*``) are not steps.
  """
  d = checkpoint_dir(workdir)
  if not d.exists():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def latest_step(workdir) -> int | None:
  """The newest complete checkpoint's step in ``workdir`` (None when there is none)."""
  steps = complete_steps(workdir)
  return steps[-1] if steps else None


class Checkpoints:
  """An Orbax CheckpointManager over ``WORKDIR/checkpoints`` (items: state, data, metadata).

  Args:
    workdir: the run's folder (local or ``gs://``).
    max_to_keep: newest checkpoints kept (None: all).
    async_save: write in the background (``wait()`` / ``close()`` finish it).
    read_only: open an existing workdir without creating or cleaning anything.
  """

  def __init__(self, workdir, *, max_to_keep: int | None = 3, async_save: bool = True,
               read_only: bool = False):
    self.workdir = epath.Path(workdir)
    self.directory = checkpoint_dir(workdir)
    for name in partial_checkpoints(workdir):
      log.warning("Ignoring the half-written checkpoint %s (a save was interrupted); "
                  "resuming from the last complete one.", self.directory / name)
    # A reader is not Orbax's read_only manager (which warns on every open and about the
    # save options it overrides): it creates, cleans and deletes nothing, and save() refuses.
    self.read_only = read_only
    # The step restored at resume (verified: checksums and finite values) is kept beside
    # the newest ``max_to_keep`` until the run ends: the checkpoints this run writes are
    # only verified when read back, so the last verified one must outlive them.
    self.pinned: set[int] = set()
    policy = None
    if max_to_keep is not None and not read_only:
      policy = ocp.checkpoint_managers.AnyPreservationPolicy(
          [ocp.checkpoint_managers.LatestN(n=max_to_keep), _Pinned(self.pinned)])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=not read_only,
        cleanup_tmp_directories=not read_only, enable_async_checkpointing=async_save)
    self._saving: int | None = None
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain_ckpt.CheckpointHandler(),
                       "metadata": ocp.JsonCheckpointHandler()})

  def _save_failed(self, e: BaseException, step: int | None):
    older = [s for s in complete_steps(self.workdir) if step is None or s < step]
    kept = f"checkpoint {older[-1]} is intact" if older else "no earlier checkpoint exists"
    return SaveFailed(
        f"Saving checkpoint {step if step is not None else ''} in {self.directory} failed "
        f"({first_line(e)}); {kept}. Free space or fix the storage, then run the same "
        "command again: it resumes from the last complete checkpoint.")

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any = None,
           metadata: Mapping[str, Any] | None = None, *, force: bool = True) -> bool:
    """Saves the TrainState, the data iterator's state and ``metadata`` as step ``step``."""
    if self.read_only:
      raise ProclipError(f"{self.directory} was opened read-only; it cannot save step {step}.")
    metadata = {**dict(metadata or {}), "checksums": tree_checksums(state)}
    items = {"state": ocp.args.StandardSave(state),
             "metadata": ocp.args.JsonSave(metadata)}
    if data_iter is not None:
      items["data"] = grain_ckpt.CheckpointSave(data_iter)
    self.wait()  # the previous asynchronous save (Orbax waits for it anyway): its failure
    try:
      saved = self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e, int(step)) from e
    self._saving = int(step)
    return saved

  def restore(self, abstract_state: Any, data_iter: Any = None, step: int | None = None
              ) -> tuple[Any, dict]:
    """Restores ``(state, metadata)`` of ``step`` (default: the latest) into the abstract tree.

    ``abstract_state`` carries the target shardings (``state.abstract_train_state``); the
    data iterator, when given, is set to the saved position in place.

    The restored arrays are checked against the checksums recorded at save and for
    non-finite values.

    Raises:
      CorruptCheckpoint: the step's files cannot be read, are missing, or hold other
        values than were saved (checksum) or NaN / inf.
      StorageUnavailable: the storage refused the read (permissions) or did not answer.
      ProclipError: the checkpoint does not fit ``abstract_state`` (another config).
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise ProclipError(f"No checkpoint in {self.directory} to restore.")
    items = {"state": ocp.args.StandardRestore(abstract_state),
             "metadata": ocp.args.JsonRestore()}
    has_data = (self.directory / str(step) / "data").exists()
    if data_iter is not None:
      if has_data:
        items["data"] = grain_ckpt.CheckpointRestore(data_iter)
      else:
        log.warning("Checkpoint %s has no data-iterator state; the data starts over.", step)
    step_dir = self.directory / str(step)
    try:
      # Whatever fails (damaged files, another architecture), TensorStore's reads still in
      # flight report it again; the error below says it once.
      with quiet_failed_restore(step_dir):
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      if is_unavailable(e):
        raise StorageUnavailable(
            f"Checkpoint {step_dir} cannot be read now ({first_line(e)}): the storage refuses "
            "or does not answer. Fix its permissions / availability and run again.") from e
      if not is_read_error(e) and not isinstance(e, (ValueError, KeyError, TypeError)):
        raise
      if is_read_error(e):
        raise CorruptCheckpoint(
            f"Checkpoint {step_dir} cannot be read ({first_line(e)}); its "
            "files are damaged (a disk fault or a copy cut short).") from e
      mismatch = state_mismatch(step_dir, abstract_state)
      if mismatch is None:  # the saved tree fits: its files, not the config, are at fault
        raise CorruptCheckpoint(
            f"Checkpoint {step_dir} cannot be restored ({first_line(e)}) although its tree "
            "fits this run; its files are damaged or missing.") from e
      raise ProclipError(
          f"Cannot restore checkpoint {step_dir} into this run's state ({mismatch}). The "
          "workdir was written by a different config (model sizes, freeze rules, stage); use "
          "a new --workdir or the config that wrote it.") from e
    meta = dict(out["metadata"] or {})
    verify_checksums(out["state"], meta.get("checksums"), str(step_dir))
    return out["state"], meta

  def metadata(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else int(step)
    if step is None:
      return {}
    out = self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return dict(out["metadata"] or {})

  def wait(self) -> None:
    """Waits for the background save (SaveFailed when it failed)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      step, self._saving = self._saving, None
      raise self._save_failed(e, step) from e
    self._saving = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


@dataclasses.dataclass
class _Pinned(ocp.checkpoint_managers.PreservationPolicy):
  """Preserves the steps in ``steps`` (a set the owner updates)."""

  steps: set

  def should_preserve(self, checkpoints, *, context):
    del context
    return [c.step in self.steps for c in checkpoints]


def state_mismatch(step_dir, abstract_state) -> str | None:
  """How the TrainState saved in ``step_dir`` differs from ``abstract_state`` (paths and
  shapes), or None when it fits. Unreadable or missing tree metadata is a damaged
  checkpoint (:class:`CorruptCheckpoint`), not a mismatch."""
  try:
    saved = saved_tree(epath.Path(step_dir) / "state")
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpoint(f"Checkpoint {step_dir}: the description of its saved arrays "
                            f"cannot be read ({first_line(e)}); the checkpoint is damaged "
                            "or empty.") from e
  have = {k: tuple(v.shape) for k, v in named_leaves(
      jax.tree.map(lambda m: m, saved, is_leaf=_is_array_meta)).items() if _is_array_meta(v)}
  if not have:
    raise CorruptCheckpoint(f"Checkpoint {step_dir} describes no saved arrays; the "
                            "checkpoint is empty or damaged.")
  want = {k: tuple(v.shape) for k, v in named_leaves(abstract_state).items()
          if hasattr(v, "shape")}
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  shaped = sorted(k for k in set(want) & set(have) if want[k] != have[k])
  if not (missing or extra or shaped):
    return None
  out = []
  for title, items in (("missing there", missing), ("not in this run", extra)):
    if items:
      out.append(f"{title}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}")
  if shaped:
    out.append("other shapes: " + ", ".join(f"{k} {have[k]} there, {want[k]} here"
                                            for k in shaped[:3]))
  return "; ".join(out)


def read_metadata(workdir, step: int) -> dict:
  """The JSON metadata of checkpoint ``step`` in ``workdir`` ({} when it has none)."""
  if not (checkpoint_dir(workdir) / str(step) / "metadata").exists():
    return {}
  return Checkpoints(workdir, read_only=True).metadata(step)


def restore_state_params(workdir, step: int, part: str | None = None, *, fix: str = "") -> dict:
  """``{"params": ..., "frozen": ...}`` of checkpoint ``step``'s TrainState as host NumPy.

  Only the model parameters are read (not the optimizer state or the EMA teacher); with
  ``part`` (e.g. ``"adapter"``) only that entry of each. An entry the checkpoint lacks is
  absent from the result.

  Raises:
    CorruptCheckpoint: the files cannot be read (the message ends with ``fix``).
  """
  step_dir = checkpoint_dir(workdir) / str(step)

  def select(tree):
    out = {}
    for k in ("params", "frozen"):
      sub = tree.get(k)
      if isinstance(sub, Mapping) and part is not None:
        sub = {part: sub[part]} if part in sub else None
      if isinstance(sub, Mapping):
        out[k] = sub
    return out

  what = f"its {part} parameters" if part else "its parameters"
  try:
    meta = read_metadata(workdir, step)
    with quiet_failed_restore(step_dir):
      out = restore_numpy(step_dir / "state", select)
  except Exception as e:  # pylint: disable=broad-except
    if is_unavailable(e):
      raise StorageUnavailable(f"{step_dir}: {what} cannot be read now ({first_line(e)}): "
                               "the storage refuses or does not answer.") from e
    raise CorruptCheckpoint(f"{step_dir}: {what} cannot be read ({first_line(e)}); the "
                            f"checkpoint is damaged{': ' + fix if fix else '.'}") from e
  try:
    verify_checksums(out, meta.get("checksums"), str(step_dir), host=True)
  except CorruptCheckpoint as e:
    raise CorruptCheckpoint(f"{e}{' ' + fix[0].upper() + fix[1:] if fix else ''}") from None
  return out
