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
import warnings
from typing import Any, Callable, Iterator, Mapping

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

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


def save_model(out: str, kind: str, config: Mapping[str, Any], params: Any,
               *, overwrite: bool = False, **extra: Any) -> str:
  """Writes ``params`` and ``{"kind", "config", "params_sha256", **extra}`` to ``out`` atomically.

  ``params_sha256`` (:func:`params_fingerprint`) lets caches check which weights made them
  without loading the parameters again.
  """
  out = os.path.abspath(os.fspath(out))
  if os.path.exists(out):
    if not overwrite:
      raise ProclipError(f"Output {out!r} already exists; remove it or pass --overwrite.")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
  try:
    params = jax.tree.map(np.asarray, params)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
    ckptr.wait_until_finished()
    ckptr.close()
    meta = {"kind": kind, "config": dict(config),
            "params_sha256": params_fingerprint(params), **extra}
    with open(os.path.join(tmp, MODEL_JSON), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def is_model_folder(path) -> bool:
  """Whether ``path`` is a folder with a ``model.json`` (see :func:`save_model`)."""
  return os.path.isfile(os.path.join(os.fspath(path), MODEL_JSON))


def read_model_json(path: str) -> dict:
  p = os.path.join(os.fspath(path), MODEL_JSON)
  if not os.path.exists(p):
    raise ProclipError(
        f"{path!r} is not a converted model folder (no {MODEL_JSON}). Make one with "
        "`python tools/convert.py SRC OUT`.")
  try:
    with open(p) as f:
      meta = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ProclipError(f"{p} is damaged (not valid JSON: {e}). Convert the model again with "
                       "`python tools/convert.py SRC OUT`.") from None
  if not isinstance(meta, dict):
    raise ProclipError(f"{p} is damaged (a JSON {type(meta).__name__}, not an object). Convert "
                       "the model again with `python tools/convert.py SRC OUT`.")
  return meta


def load_model(path: str, *, kind: str | None = None, target: Any = None):
  """Returns ``(meta, params)`` from a folder written by :func:`save_model`.

  ``target`` (an abstract tree, optionally with shardings) restores straight into that
  structure and placement; otherwise arrays come back as host numpy arrays.

  Raises:
    ProclipError: no ``model.json``, another ``kind``, or parameters that cannot be read
      (missing or damaged files).
  """
  path = os.path.abspath(os.fspath(path))
  meta = read_model_json(path)
  if kind is not None and meta.get("kind") != kind:
    raise ProclipError(
        f"{path!r} holds a {meta.get('kind')!r} model, but a {kind!r} model was expected.")
  params_dir = os.path.join(path, PARAMS_DIR)
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


# ------------------------------------------------------------------------ training checkpoints

class CorruptCheckpoint(ProclipError):
  """A committed checkpoint whose files cannot be read (truncated, damaged on disk)."""


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
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep, create=not read_only,
        cleanup_tmp_directories=not read_only, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain_ckpt.CheckpointHandler(),
                       "metadata": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any = None,
           metadata: Mapping[str, Any] | None = None, *, force: bool = True) -> bool:
    """Saves the TrainState, the data iterator's state and ``metadata`` as step ``step``."""
    if self.read_only:
      raise ProclipError(f"{self.directory} was opened read-only; it cannot save step {step}.")
    items = {"state": ocp.args.StandardSave(state),
             "metadata": ocp.args.JsonSave(dict(metadata or {}))}
    if data_iter is not None:
      items["data"] = grain_ckpt.CheckpointSave(data_iter)
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, data_iter: Any = None, step: int | None = None
              ) -> tuple[Any, dict]:
    """Restores ``(state, metadata)`` of ``step`` (default: the latest) into the abstract tree.

    ``abstract_state`` carries the target shardings (``state.abstract_train_state``); the
    data iterator, when given, is set to the saved position in place.

    Raises:
      CorruptCheckpoint: the step's files cannot be read (truncated or damaged).
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
      if is_read_error(e):
        raise CorruptCheckpoint(
            f"Checkpoint {step_dir} cannot be read ({first_line(e)}); its "
            "files are damaged (a disk fault or a copy cut short).") from e
      if not isinstance(e, (ValueError, KeyError, TypeError)):
        raise
      raise ProclipError(
          f"Cannot restore checkpoint {step_dir} into this run's state "
          f"({e}). The workdir was written by a different config (model sizes, freeze "
          "rules, stage); use a new --workdir or the config that wrote it.") from e
    return out["state"], dict(out["metadata"] or {})

  def metadata(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else int(step)
    if step is None:
      return {}
    out = self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return dict(out["metadata"] or {})

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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

  try:
    with quiet_failed_restore(step_dir):
      return restore_numpy(step_dir / "state", select)
  except Exception as e:  # pylint: disable=broad-except
    what = f"its {part} parameters" if part else "its parameters"
    raise CorruptCheckpoint(f"{step_dir}: {what} cannot be read ({first_line(e)}); the "
                            f"checkpoint is damaged{': ' + fix if fix else '.'}") from e
