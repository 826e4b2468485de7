"""The starting points of stage 2: a stage-1 run's adapter and a converted CLIP's tower.

Stage 2 starts from two folders (``stage2_init_params``)::

    config.init.clip            a converted CLIP (tools/convert.py): image tower, logit scale
    config.init.stage1_workdir  a stage-1 workdir: its latest checkpoint's adapter (or, if
                                unset, the adapter of a converted ProCLIP release in init.clip)

Reading and writing the files (model folders, the workdir's Orbax checkpoints) is
``proclip_jax.storage``'s; the checkpoint names used by the trainer are re-exported here.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from proclip_jax import storage
from proclip_jax.data.cache import read_manifest
from proclip_jax.errors import ProclipError
from proclip_jax.models import vit
from proclip_jax.storage import (  # noqa: F401  (the trainer's checkpoint names)
    CKPT_DIR, Checkpoints, CorruptCheckpoint, SaveFailed, StorageUnavailable, checkpoint_dir,
    partial_checkpoints)
from proclip_jax.train import run_config
from proclip_jax.train.optimizer import LOGIT_SCALE_MAX
from proclip_jax.train.state import model_config
from proclip_jax.tree import merge

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ stage-2 starts

STAGE1_HINT = ("Train stage 1 first: `python experiments/run.py --config stage1.py "
               "--workdir DIR`, then set config.init.stage1_workdir=DIR.")


def load_stage1_adapter(stage1_workdir, expect: Any = None, config: Any = None) -> dict:
  """The adapter parameters (host NumPy) of the latest checkpoint of a stage-1 workdir.

  Args:
    stage1_workdir: the ``--workdir`` of a stage-1 run.
    expect: optional ``AdapterConfig`` (or dict) the adapter must have been trained with.
    config: optional stage-2 config whose LLM cache must come from stage 1's embedder
      (:func:`check_stage1_embedder`).

  Raises:
    ProclipError: no such workdir, no checkpoint, not a stage-1 run, or another adapter.
    CorruptCheckpoint: the latest checkpoint's files cannot be read.
  """
  root = epath.Path(stage1_workdir)
  if not root.exists():
    raise ProclipError(f"config.init.stage1_workdir={stage1_workdir!r} does not exist. "
                       f"{STAGE1_HINT}")
  step = storage.latest_step(root)
  if step is None:
    d = checkpoint_dir(root)
    raise ProclipError(f"The stage-1 workdir {stage1_workdir} has no checkpoint ({d} is "
                       f"{'empty' if d.exists() else 'missing'}). {STAGE1_HINT}")
  step_dir = checkpoint_dir(root) / str(step)
  meta = storage.read_metadata(root, step)
  cfg = meta.get("config") or {}
  if cfg and int(cfg.get("stage", 1)) != 1:
    raise ProclipError(f"{stage1_workdir} is a stage-{cfg.get('stage')} workdir; "
                       "config.init.stage1_workdir must name a stage-1 run.")
  if config is not None:
    check_stage1_embedder(meta, config, stage1_workdir)
  if expect is not None and cfg.get("model", {}).get("adapter"):
    want = expect.to_dict() if hasattr(expect, "to_dict") else dict(expect)
    have = cfg["model"]["adapter"]
    diff = {k: (have.get(k), want[k]) for k in ("in_dim", "out_dim", "expansion", "n_blocks")
            if k in want and have.get(k) != want[k]}
    if diff:
      raise ProclipError(
          f"The stage-1 adapter in {stage1_workdir} does not fit this config: "
          + ", ".join(f"{k} is {h} there but {w} here" for k, (h, w) in diff.items())
          + ". Use the stage-1 run made with the same embedder (D) and CLIP (E).")
  out = storage.restore_state_params(
      root, step, "adapter", fix="set config.init.stage1_workdir to a run with a readable "
      "checkpoint, or move this step folder away to use the one before.")
  if not out:
    raise ProclipError(f"The checkpoint {step_dir} holds no adapter parameters.")
  full = merge(out.get("params", {}).get("adapter", {}), out.get("frozen", {}).get("adapter", {}))
  log.info("Stage-1 adapter from %s (step %d).", step_dir, step)
  return jax.tree.map(np.asarray, full)


_ARCH = ("arch", "image_size", "patch_size", "width", "layers", "heads", "mlp_dim", "embed_dim",
         "act")


def load_clip_tower(path, expect_vision: Any = None) -> dict:
  """``{"visual", "logit_scale"}`` (host NumPy) from a converted CLIP folder.

  A converted ProCLIP / LLM2CLIP release (``kind="proclip"``) also gives its ``adapter``.

  ``expect_vision`` (a ``VisionConfig`` or dict): the architecture the run builds; a
  different converted tower is an error, a different layer layout (scan) is restacked.
  """
  run_config.require_init_clip(path)
  meta, params = storage.load_model(path)
  if meta.get("kind") not in ("clip", "proclip", "siglip"):
    raise ProclipError(f"config.init.clip={path!r} holds a {meta.get('kind')!r} model; it must "
                       "be a converted CLIP (or ProCLIP / LLM2CLIP release) checkpoint.")
  have = (meta.get("config") or {}).get("vision")
  if not have or "visual" not in params:
    raise ProclipError(f"The converted CLIP {path} has no image tower.")
  if expect_vision is not None:
    want = expect_vision.to_dict() if hasattr(expect_vision, "to_dict") else dict(expect_vision)
    diff = [f"{k}: {have.get(k)} there, {want.get(k)} here" for k in _ARCH
            if k in want and have.get(k) != want.get(k)]
    if diff:
      raise ProclipError(f"The converted CLIP {path} does not match config.model.vision ("
                         + "; ".join(diff) + "). Set the config's size to that CLIP's or "
                         "convert the right one.")
    if bool(have.get("scan_layers")) != bool(want.get("scan_layers")):
      params = dict(params)
      params["visual"] = (vit.stack_layers(params["visual"]) if want.get("scan_layers")
                          else vit.unstack_layers(params["visual"]))
  out = {"visual": jax.tree.map(np.asarray, params["visual"])}
  if "adapter" in params:  # a converted ProCLIP / LLM2CLIP release
    out["adapter"] = jax.tree.map(np.asarray, params["adapter"])
  if "logit_scale" in params:
    out["logit_scale"] = np.asarray(params["logit_scale"], np.float32).reshape(())
  return out


def stage2_init_params(config: Any) -> dict:
  """``{"visual", "adapter", "logit_scale"}`` for a fresh stage-2 run from ``config.init``.

  The logit scale comes from the CLIP (clamped to ln 100) when it has one, else from
  ``config.model.logit_scale_init``.
  """
  mc = model_config(config)
  out = load_clip_tower(config.init.clip, mc.vision)
  workdir = config.init.stage1_workdir
  if workdir:
    out["adapter"] = load_stage1_adapter(workdir, mc.adapter, config)
  elif "adapter" not in out:
    raise ProclipError(f"config.init.stage1_workdir is not set. {STAGE1_HINT}")
  ls = out.get("logit_scale", np.float32(mc.logit_scale_init))
  out["logit_scale"] = np.clip(np.asarray(ls, np.float32), 0.0, LOGIT_SCALE_MAX)
  return out


# ============================================================================ resuming
# The trainer's resume policy (train/loop.py): the newest readable checkpoint of a
# workdir; an unreadable one is set aside in WORKDIR/corrupt_checkpoints/STEP.

from proclip_jax.train import distributed  # noqa: E402  pylint: disable=wrong-import-position

CORRUPT_DIR = "corrupt_checkpoints"


def max_to_keep(config: Any) -> int | None:
  """``config.max_to_keep``: newest checkpoints kept; None or 0 keep all."""
  value = config.max_to_keep
  if value is None or int(value) == 0:
    return None
  if int(value) < 0:
    raise ProclipError(f"config.max_to_keep={value} must be >= 0 (0 or None: keep all).")
  return int(value)


def set_aside(workdir, step: int) -> epath.Path:
  """Moves ``checkpoints/STEP`` to ``corrupt_checkpoints/STEP`` (process 0; all wait)."""
  workdir = epath.Path(workdir)
  src = checkpoint_dir(workdir) / str(step)
  dest_dir = workdir / CORRUPT_DIR
  dest = dest_dir / str(step)
  n = 1
  while dest.exists():             # the same step damaged twice: keep both
    dest, n = dest_dir / f"{step}.{n}", n + 1
  if jax.process_index() == 0:
    dest_dir.mkdir(parents=True, exist_ok=True)
    src.rename(dest)
  distributed.sync(f"proclip_set_aside_{step}")
  return dest


RESUME_TRIES = 4          # reads refused by the storage: tries before giving up
RESUME_BACKOFF_S = 2.0    # first wait between tries (doubled each time)


def resume(workdir, abstract: Any, pipe, *, stage: int, keep: int | None):
  """``(ckpts, step, state, data_iter)`` of the newest good checkpoint (None, None: none).

  Steps are tried newest first. A checkpoint whose files cannot be read, or whose arrays
  differ from the checksums recorded at save or hold NaN / inf (on any process), is
  reported, moved to ``WORKDIR/corrupt_checkpoints/STEP`` (so that a later save of that
  step does not collide with it) and the next older one is tried. A read the storage
  refuses or does not answer (permissions, a bucket that is down) is not damage: it is
  tried ``RESUME_TRIES`` times with a doubling wait, then a ProclipError stops the run with
  every checkpoint left in place. The step used is pinned (kept by ``max_to_keep``) while
  the run lasts. ``data_iter`` is a fresh iterator of ``pipe`` (restored with the state
  when a checkpoint is used); a checkpoint of the other stage is an error. ``keep`` is
  :func:`max_to_keep`'s value.
  """
  workdir = epath.Path(workdir)
  tries = 0
  while True:
    ckpts = Checkpoints(workdir, max_to_keep=keep)
    data_iter = iter(pipe)               # fresh: a failed restore may have moved it
    steps = sorted(ckpts.all_steps(), reverse=True)
    if not steps:
      return ckpts, None, None, data_iter
    step = steps[0]
    error = unavailable = None
    try:
      state, meta = ckpts.restore(abstract, data_iter, step)
    except CorruptCheckpoint as e:
      error = e
    except StorageUnavailable as e:
      unavailable = e
    except BaseException:
      ckpts.close()
      raise
    if distributed.any_process(unavailable is not None):
      ckpts.close()
      tries += 1
      why = str(unavailable) if unavailable is not None else (
          f"Checkpoint {ckpts.directory / str(step)} cannot be read now by another process.")
      if tries >= RESUME_TRIES:
        raise ProclipError(f"{why} Gave up after {tries} tries; no checkpoint was moved or "
                           "deleted.")
      wait = RESUME_BACKOFF_S * 2 ** (tries - 1)
      log.warning("%s Trying again in %.0fs (%d of %d).", why, wait, tries + 1, RESUME_TRIES)
      time.sleep(wait)
      continue
    if distributed.any_process(error is not None):
      ckpts.close()
      older = f"step {steps[1]}" if len(steps) > 1 else "the start (no older checkpoint)"
      dest = set_aside(workdir, step)
      why = (str(error) if error is not None else
             f"Checkpoint {ckpts.directory / str(step)} cannot be read by another process.")
      log.warning("%s Moved it to %s; trying %s.", why, dest, older)
      continue
    saved_stage = (meta.get("config") or {}).get("stage")
    if saved_stage is not None and int(saved_stage) != stage:
      ckpts.close()
      raise ProclipError(f"{workdir} holds a stage-{saved_stage} run; this config is stage "
                         f"{stage}. Use another --workdir.")
    ckpts.pinned.add(step)
    return ckpts, step, state, data_iter


# ============================================================================ the workdir
# One run per workdir: WORKDIR/run.lock (host, pid, time), created atomically by process 0.

LOCK_FILE = "run.lock"


def prepare_workdir(workdir) -> epath.Path:
  """Creates ``workdir`` (process 0) and checks it can be written: one line when it is a
  file, read-only, or cannot be created."""
  workdir = epath.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ProclipError(f"--workdir {workdir} is a file, not a folder; name a folder (it is "
                       "created if missing).")
  error = None
  if jax.process_index() == 0:
    probe = workdir / f".write-test-{os.getpid()}"
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      probe.write_text("")
      probe.unlink()
    except OSError as e:
      error = ProclipError(f"--workdir {workdir} cannot be written ({e.strerror or e}); give "
                           "the run a folder it may write to.")
  if distributed.any_process(error is not None):  # every process stops, not only process 0
    raise error or ProclipError(f"--workdir {workdir} cannot be written (see process 0).")
  return workdir


class WorkdirLock:
  """``WORKDIR/run.lock``: one training run per workdir at a time (taken by process 0).

  The lock file (``{"host", "pid", "time"}``) is created with ``O_CREAT | O_EXCL``, so two
  runs starting together cannot both take it. A second run stops with one line naming the
  holder. A lock left by a process that no longer exists on this host (a run killed with
  ``kill -9``) is taken over with a warning. A lock from another host cannot be checked
  from here: after making sure that run is gone, delete ``WORKDIR/run.lock`` by hand.
  """

  def __init__(self, workdir):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.held = False

  def _holder(self) -> dict:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return {}

  def acquire(self) -> "WorkdirLock":
    """Takes the lock on process 0; every process raises when it could not be taken."""
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire()
      except ProclipError as e:
        error = e
    if distributed.any_process(error is not None):
      raise error or ProclipError(f"{self.path.parent} is in use by another run (see "
                                  "process 0).")
    return self

  def _create(self, me: dict) -> bool:
    """Creates the lock file atomically (False: it exists). On an object store (``gs://``),
    which has no exclusive create, a check and a write."""
    if "://" in os.fspath(self.path):
      if self.path.exists():
        return False
      self.path.write_text(json.dumps(me))
      return True
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return True

  def _acquire(self) -> None:
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for _ in range(3):
      if not self._create(me):
        holder = self._holder()
        if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
          log.warning("Taking over %s from process %s on %s, which no longer exists.",
                      self.path, holder.get("pid"), holder.get("host"))
          self.path.unlink(missing_ok=True)
          continue
        if not holder:   # being written by a run starting right now
          time.sleep(0.2)
          holder = self._holder()
        raise ProclipError(
            f"{self.path.parent} is in use by another run (process {holder.get('pid')} on "
            f"{holder.get('host')}, since {holder.get('time')}); wait for it to end or use "
            f"another --workdir. If that run is gone, delete {self.path}.")
      self.held = True
      return
    raise ProclipError(f"Could not take {self.path}; delete it if no run uses the workdir.")

  def release(self) -> None:
    if self.held:
      self.path.unlink(missing_ok=True)
      self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (TypeError, ValueError, ProcessLookupError):
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  return True


# ============================================================================ non-finite steps

class NonfiniteGuard:
  """Stops a run whose updates are all skipped (non-finite loss or gradient) for ``limit``
  consecutive steps (``config.max_nonfinite_steps``; 0: never).

  Fed the state's running count of skipped steps at every logged step; a window in which
  every step was skipped adds its length to the streak, any finite step resets it. With
  ``log_every > 1`` the streak is known to a window's precision.
  """

  def __init__(self, limit: int | None, step: int, skipped: int):
    self.limit = int(limit or 0)
    self.step, self.skipped, self.streak = step, skipped, 0

  def update(self, step: int, skipped: int) -> None:
    n, bad = step - self.step, skipped - self.skipped
    self.streak = self.streak + n if n > 0 and bad >= n else 0
    self.step, self.skipped = step, skipped
    if self.limit and self.streak >= self.limit:
      raise ProclipError(
          f"The last {self.streak} steps (to step {step}) all had a non-finite loss or "
          f"gradient and were skipped (config.max_nonfinite_steps={self.limit}); the run is "
          "diverging or its inputs are damaged. Lower the learning rate, check the caches, or "
          "resume from an earlier checkpoint.")


# ============================================================================ cache identity
# Stage 1 records the model fingerprints of its caches in every checkpoint's metadata
# ("caches"); a fresh stage 2 compares its LLM cache with stage 1's (the adapter reads
# features of that embedder only).

def cache_identity(config: Any) -> dict:
  """``{name: {"model_fingerprint", "preset", "dim", "path"}}`` of ``config.cache``'s caches."""
  out = {}
  caches = config.get("cache") if hasattr(config, "get") else None
  for name in ("llm", "clip"):
    path = caches.get(name) if caches is not None else None
    if not path:
      continue
    try:
      m = read_manifest(path)
    except ProclipError:
      continue  # opened (and refused) by the input pipeline
    out[name] = {"model_fingerprint": (m.get("model") or {}).get("fingerprint"),
                 "preset": m.get("preset_name"), "dim": m.get("dim"), "path": os.fspath(path)}
  return out


def check_stage1_embedder(stage1_meta: dict, config: Any, stage1_workdir) -> None:
  """Refuses a stage-2 LLM cache made by another embedder than stage 1's caches."""
  theirs = ((stage1_meta.get("caches") or {}).get("llm") or {})
  ours = cache_identity(config).get("llm") or {}
  a, b = theirs.get("model_fingerprint"), ours.get("model_fingerprint")
  if a and b and a != b:
    raise ProclipError(
        f"config.cache.llm={ours.get('path')} was computed with embedder weights {b[:12]}..., "
        f"but the stage-1 run {stage1_workdir} trained its adapter on features of embedder "
        f"weights {a[:12]}... ({theirs.get('path')}). Recompute the stage-2 cache with the "
        "stage-1 embedder, or train stage 1 on this embedder's features.")
