"""The starting points of stage 2: a stage-1 run's adapter and a converted CLIP's tower.

Stage 2 starts from two folders (``stage2_init_params``)::

    config.init.clip            a converted CLIP (tools/convert.py): image tower, logit scale
    config.init.stage1_workdir  a stage-1 workdir: its latest checkpoint's adapter (or, if
                                unset, the adapter of a converted ProCLIP release in init.clip)

Reading and writing the files (model folders, the workdir's Orbax checkpoints) is
``proclip_jax.storage``'s; the checkpoint names used by the trainer are re-exported here.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from etils import epath

from proclip_jax import storage
from proclip_jax.errors import ProclipError
from proclip_jax.models import vit
from proclip_jax.storage import (  # noqa: F401  (the trainer's checkpoint names)
    CKPT_DIR, Checkpoints, CorruptCheckpoint, checkpoint_dir, partial_checkpoints)
from proclip_jax.train import run_config
from proclip_jax.train.optimizer import LOGIT_SCALE_MAX
from proclip_jax.train.state import model_config
from proclip_jax.tree import merge

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ stage-2 starts

STAGE1_HINT = ("Train stage 1 first: `python experiments/run.py --config stage1.py "
               "--workdir DIR`, then set config.init.stage1_workdir=DIR.")


def load_stage1_adapter(stage1_workdir, expect: Any = None) -> dict:
  """The adapter parameters (host NumPy) of the latest checkpoint of a stage-1 workdir.

  Args:
    stage1_workdir: the ``--workdir`` of a stage-1 run.
    expect: optional ``AdapterConfig`` (or dict) the adapter must have been trained with.

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
    out["adapter"] = load_stage1_adapter(workdir, mc.adapter)
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


def resume(workdir, abstract: Any, pipe, *, stage: int, keep: int | None):
  """``(ckpts, step, state, data_iter)`` of the newest readable checkpoint (None, None: none).

  Steps are tried newest first. A checkpoint whose files cannot be read (on any process)
  is reported, moved to ``WORKDIR/corrupt_checkpoints/STEP`` (so that a later save of
  that step does not collide with it) and the next older one is tried. ``data_iter`` is a
  fresh iterator of ``pipe`` (restored with the state when a checkpoint is used); a
  checkpoint of the other stage is an error. ``keep`` is :func:`max_to_keep`'s value.
  """
  workdir = epath.Path(workdir)
  while True:
    ckpts = Checkpoints(workdir, max_to_keep=keep)
    data_iter = iter(pipe)               # fresh: a failed restore may have moved it
    steps = sorted(ckpts.all_steps(), reverse=True)
    if not steps:
      return ckpts, None, None, data_iter
    step = steps[0]
    error = None
    try:
      state, meta = ckpts.restore(abstract, data_iter, step)
    except CorruptCheckpoint as e:
      error = e
    except BaseException:
      ckpts.close()
      raise
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
    return ckpts, step, state, data_iter
