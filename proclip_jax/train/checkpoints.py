"""Training checkpoints (Orbax) in a workdir, and the starting points of stage 2.

Layout of a run's workdir (``train/loop.py`` writes the rest)::

    WORKDIR/checkpoints/STEP/state/      StandardSave of the TrainState: params, frozen,
                                         opt_state, ema (teacher), step, nonfinite_steps
    WORKDIR/checkpoints/STEP/data/       grain iterator state, one JSON file per process
    WORKDIR/checkpoints/STEP/metadata/   JsonSave: {"config": ..., "stage", "step", ...}

Saves are asynchronous (the arrays are copied off the devices before ``save`` returns; the
files are written in the background) and atomic: Orbax writes ``STEP.orbax-checkpoint-tmp-*``
and renames it when complete, so a save cut short is never taken for a checkpoint (it is
reported with a warning and cleaned up). Restores go straight into the sharded abstract
tree (``jax.ShapeDtypeStruct`` s with shardings from ``state.abstract_train_state``).

Stage 2 starts from two folders (``stage2_init_params``)::

    config.init.clip            a converted CLIP (tools/convert.py): image tower, logit scale
    config.init.stage1_workdir  a stage-1 workdir: its latest checkpoint's adapter (or, if
                                unset, the adapter of a converted ProCLIP release in init.clip)
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from proclip_jax.checkpoint import (first_line, install_echo_filters, is_read_error,
                                    quiet_echoes_of)
from proclip_jax.errors import ProclipError

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
_TMP_MARK = ".orbax-checkpoint-tmp"


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp


def _grain_ckpt():
  import grain.checkpoint as gc  # pylint: disable=import-outside-toplevel
  return gc


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
    ocp = _ocp()
    self.workdir = epath.Path(workdir)
    self.directory = checkpoint_dir(workdir)
    for name in partial_checkpoints(workdir):
      log.warning("Ignoring the half-written checkpoint %s (a save was interrupted); "
                  "resuming from the last complete one.", self.directory / name)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": _grain_ckpt().CheckpointHandler(),
                       "metadata": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any = None,
           metadata: Mapping[str, Any] | None = None, *, force: bool = True) -> bool:
    """Saves the TrainState, the data iterator's state and ``metadata`` as step ``step``."""
    ocp = _ocp()
    items = {"state": ocp.args.StandardSave(state),
             "metadata": ocp.args.JsonSave(dict(metadata or {}))}
    if data_iter is not None:
      items["data"] = _grain_ckpt().CheckpointSave(data_iter)
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
    ocp = _ocp()
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise ProclipError(f"No checkpoint in {self.directory} to restore.")
    items = {"state": ocp.args.StandardRestore(abstract_state),
             "metadata": ocp.args.JsonRestore()}
    has_data = (self.directory / str(step) / "data").exists()
    if data_iter is not None:
      if has_data:
        items["data"] = _grain_ckpt().CheckpointRestore(data_iter)
      else:
        log.warning("Checkpoint %s has no data-iterator state; the data starts over.", step)
    install_echo_filters()
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      # Whatever failed (damaged files, another architecture), TensorStore's reads still in
      # flight report it again later; the error below says it once.
      quiet_echoes_of(str(self.directory / str(step)))
      if is_read_error(e):
        raise CorruptCheckpoint(
            f"Checkpoint {self.directory / str(step)} cannot be read ({first_line(e)}); its "
            "files are damaged (a disk fault or a copy cut short).") from e
      if not isinstance(e, (ValueError, KeyError, TypeError)):
        raise
      raise ProclipError(
          f"Cannot restore checkpoint {self.directory / str(step)} into this run's state "
          f"({e}). The workdir was written by a different config (model sizes, freeze "
          "rules, stage); use a new --workdir or the config that wrote it.") from e
    return out["state"], dict(out["metadata"] or {})

  def metadata(self, step: int | None = None) -> dict:
    ocp = _ocp()
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


# ------------------------------------------------------------------------ stage-2 starts

STAGE1_HINT = ("Train stage 1 first: `python experiments/run.py --config stage1.py "
               "--workdir DIR`, then set config.init.stage1_workdir=DIR.")


def _latest_complete_step(workdir) -> int:
  d = checkpoint_dir(workdir)
  steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.exists() else []
  if not steps:
    raise ProclipError(f"The stage-1 workdir {workdir} has no checkpoint ({d} is "
                       f"{'empty' if d.exists() else 'missing'}). {STAGE1_HINT}")
  return max(steps)


def load_stage1_adapter(stage1_workdir, expect: Any = None) -> dict:
  """The adapter parameters (host NumPy) of the latest checkpoint of a stage-1 workdir.

  Args:
    stage1_workdir: the ``--workdir`` of a stage-1 run.
    expect: optional ``AdapterConfig`` (or dict) the adapter must have been trained with.

  Raises:
    ProclipError: no such workdir, no checkpoint, not a stage-1 run, or another adapter.
    CorruptCheckpoint: the latest checkpoint's files cannot be read.
  """
  ocp = _ocp()
  root = epath.Path(stage1_workdir)
  if not root.exists():
    raise ProclipError(f"config.init.stage1_workdir={stage1_workdir!r} does not exist. "
                       f"{STAGE1_HINT}")
  step = _latest_complete_step(root)
  step_dir = checkpoint_dir(root) / str(step)
  meta = {}
  if (step_dir / "metadata").exists():
    meta = Checkpoints(root, read_only=True).metadata(step)
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
  ckptr = ocp.PyTreeCheckpointer()
  try:
    tree = ckptr.metadata(step_dir / "state")
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    parts = {k: tree[k]["adapter"] for k in ("params", "frozen")
             if isinstance(tree.get(k), Mapping) and "adapter" in tree[k]}
    if not parts:
      raise ProclipError(f"The checkpoint {step_dir} holds no adapter parameters.")
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), {k: {"adapter": v}
                                                                  for k, v in parts.items()},
                          is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    install_echo_filters()
    out = ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  except ProclipError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    quiet_echoes_of(str(step_dir))
    raise CorruptCheckpoint(
        f"{step_dir}: its adapter parameters cannot be read ({first_line(e)}); the stage-1 "
        "checkpoint is damaged: set config.init.stage1_workdir to a run with a readable "
        "checkpoint, or move this step folder away to use the one before.") from e
  finally:
    ckptr.close()
  from proclip_jax.train.optimizer import merge  # pylint: disable=import-outside-toplevel
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
  from proclip_jax.checkpoint import load_model  # pylint: disable=import-outside-toplevel
  from proclip_jax.models import vit  # pylint: disable=import-outside-toplevel
  if not path:
    raise ProclipError("config.init.clip is not set: stage 2 starts from a converted CLIP. "
                       "Convert one with `python tools/convert.py SRC OUT` and set "
                       "config.init.clip=OUT.")
  if not epath.Path(path).exists():
    raise ProclipError(f"config.init.clip={path!r} does not exist. Convert the pretrained "
                       f"CLIP with `python tools/convert.py SRC {path}` (SRC: an OpenAI .pt "
                       "or a Hugging Face CLIP folder).")
  meta, params = load_model(path)
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
  from proclip_jax.train.optimizer import LOGIT_SCALE_MAX  # pylint: disable=import-outside-toplevel
  from proclip_jax.train.state import _get, model_config  # pylint: disable=import-outside-toplevel
  mc = model_config(config)
  out = load_clip_tower(_get(config, "init.clip", ""), mc.vision)
  workdir = _get(config, "init.stage1_workdir", "")
  if workdir:
    out["adapter"] = load_stage1_adapter(workdir, mc.adapter)
  elif "adapter" not in out:
    raise ProclipError(f"config.init.stage1_workdir is not set. {STAGE1_HINT}")
  ls = out.get("logit_scale", np.float32(mc.logit_scale_init))
  out["logit_scale"] = np.clip(np.asarray(ls, np.float32), 0.0, LOGIT_SCALE_MAX)
  return out
