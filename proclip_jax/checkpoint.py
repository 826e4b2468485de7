"""Converted-model folders: an Orbax parameter checkpoint plus a JSON model description.

Layout of ``OUT``::

    OUT/model.json      {"kind": "clip" | "embedder" | "proclip" | ..., "config": {...}, ...}
    OUT/params/         Orbax StandardCheckpointer tree of float32 parameters

The folder is written under a temporary name and renamed when complete, so an interrupted
conversion never leaves an ``OUT`` that looks finished.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from typing import Any, Mapping

import jax
import numpy as np

from proclip_jax.errors import ProclipError

MODEL_JSON = "model.json"
PARAMS_DIR = "params"


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


_QUIET_DIRS: set[str] = set()


def _echo_of_failed_read(exc: BaseException | None, text: str = "") -> bool:
  """True for the late errors of a restore that already failed on a damaged checkpoint.

  When one array of a checkpoint cannot be read, Orbax's restore raises at once while
  TensorStore's other reads are still in flight; they finish later on its threads and report
  "Event loop is closed" or their own read errors, as unraisable exceptions or as asyncio's
  "Task exception was never retrieved". The failure was already raised (and acted on) as a
  ProclipError, so these echoes are dropped instead of printed as tracebacks.
  """
  msg = f"{text} {exc!r}" if exc is not None else text
  if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
    return True
  return any(d in msg for d in _QUIET_DIRS)


_FILTERS: list[bool] = []


# Orbax's per-array read and metadata coroutines that an aborted restore never started;
# Python warns when they are garbage-collected, long after the restore's error was raised.
_UNAWAITED_READ = (r"coroutine '(_read_array_index_and_device_put|Store\._get_array_metadatas)' "
                   r"was never awaited")


def install_echo_filters() -> None:
  """Installs the filters of :func:`_echo_of_failed_read` (once) and of unawaited reads.

  Called before every restore, not only after one failed: the echoes of a failed read can
  arrive from TensorStore's threads before the failure has reached the caller.
  """
  # Re-adding an identical filter replaces it (no duplicates); it is re-added on every call
  # because warning filters can be reset in between (warnings.catch_warnings, pytest).
  warnings.filterwarnings("ignore", message=_UNAWAITED_READ, category=RuntimeWarning)
  if _FILTERS:
    return
  _FILTERS.append(True)
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _echo_of_failed_read(unraisable.exc_value, str(unraisable.err_msg or "")):
      previous(unraisable)
  sys.unraisablehook = hook

  class _Filter(logging.Filter):
    def filter(self, record):
      exc = record.exc_info[1] if record.exc_info else None
      return not _echo_of_failed_read(exc, record.getMessage())
  logging.getLogger("asyncio").addFilter(_Filter())


def quiet_echoes_of(directory: str) -> None:
  """Also drops the late errors that name the damaged ``directory`` (see above)."""
  install_echo_filters()
  _QUIET_DIRS.add(str(directory))


def params_fingerprint(params: Any) -> str:
  """sha256 over every parameter leaf: its "a/b/c" path, dtype, shape and bytes (sorted)."""
  from proclip_jax.convert.common import flatten  # pylint: disable=import-outside-toplevel
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
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
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
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(os.fspath(path))
  meta = read_model_json(path)
  if kind is not None and meta.get("kind") != kind:
    raise ProclipError(
        f"{path!r} holds a {meta.get('kind')!r} model, but a {kind!r} model was expected.")
  ckptr = ocp.StandardCheckpointer()
  given_target = target is not None
  try:
    if target is None:
      meta_tree = ckptr.metadata(os.path.join(path, PARAMS_DIR))
      tree = getattr(meta_tree, "item_metadata", meta_tree)
      tree = getattr(tree, "tree", tree)
      target = jax.tree.map(
          lambda m: np.zeros(m.shape, m.dtype), tree,
          is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    install_echo_filters()
    params = ckptr.restore(os.path.join(path, PARAMS_DIR), target)
  except FileNotFoundError as e:
    raise ProclipError(f"{path!r} lacks its parameters ({PARAMS_DIR}/); convert it again.") from e
  except Exception as e:  # pylint: disable=broad-except
    # With a caller's target, a ValueError may be a structure mismatch (theirs to report);
    # a TensorStore status ("OUT_OF_RANGE: ...") or an I/O error is a damaged folder.
    if given_target and not is_read_error(e):
      raise
    quiet_echoes_of(os.path.join(path, PARAMS_DIR))
    raise ProclipError(f"{path}: its parameters cannot be read ({first_line(e)}); the folder "
                       "is damaged: convert it again with tools/convert.py.") from e
  finally:
    ckptr.close()
  return meta, params
