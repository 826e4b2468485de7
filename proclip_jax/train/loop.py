"""The ProCLIP trainer: one flat function, ``train(config, workdir)``, that reads top to bottom.

  mesh -> data (train/inputs.py) -> abstract state + shardings -> jitted step
  (train/steps.py) -> resume (train/checkpoints.py) or initial parameters -> loop (log,
  evaluate, checkpoint) -> final save

Workdir layout::

    WORKDIR/config.json          the resolved config (process 0)
    WORKDIR/metrics.jsonl        one JSON object per line: {"step", "loss", ..., "lr",
                                 "grad_norm", "steps_per_s", "examples_per_s" (stage 2:
                                 "images_per_s"), ...}; {"step", "first_step_s"} once per
                                 start (compile + first step); {"step", "eval/NAME/KEY"}
    WORKDIR/tb/                  TensorBoard event files, the same scalars (train/metrics.py)
    WORKDIR/checkpoints/STEP/    Orbax (train/checkpoints.py): state, data iterator, metadata
    WORKDIR/corrupt_checkpoints/STEP/  checkpoints found damaged on resume, set aside
    WORKDIR/run.lock             {"host", "pid", "time"} of the run using the workdir

Resuming is automatic: a workdir with a checkpoint continues from its latest step (the
state, the optimizer, the EMA teacher and the data iterator restored exactly); a newest
checkpoint whose files cannot be read or differ from their checksums is reported, set aside
and the one before it used (``checkpoints.resume``). One run per workdir
(``checkpoints.WorkdirLock``); ``config.max_nonfinite_steps`` skipped steps in a row stop
the run (``checkpoints.NonfiniteGuard``). SIGTERM (a preempted VM) saves a checkpoint at the next step
boundary and returns; ``run.py`` exits 0.

``config`` is an ml_collections ConfigDict with the fields of
``experiments/configs/common.base_config`` (read as attributes). Evaluation hooks:
``config.evals = {NAME: {"every": N, "at_end": True, ...}}``; each NAME is a key of
``proclip_jax.eval.EVALS``, called as ``fn(params, config, mesh) -> {key: number}`` with
``params`` the full model tree (``visual`` / ``adapter`` / ``logit_scale``); its own
settings are ``config.evals[NAME]`` (``every``: 0 = never periodically, ``at_end``:
default True).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

import proclip_jax.eval as eval_lib
from proclip_jax import mesh as mesh_lib
from proclip_jax.data.pipeline import DevicePrefetch, make_global_batch
from proclip_jax.errors import ProclipError
from proclip_jax.train import checkpoints as ckpt_lib
from proclip_jax.train import run_config
from proclip_jax.train.distributed import Preemption
from proclip_jax.train.inputs import batch_axes, build_data
from proclip_jax.train.metrics import MetricWriter, host_metrics, progress_bar
from proclip_jax.train.state import (abstract_train_state, create_train_state, full_params,
                                     stage_of)
from proclip_jax.train.steps import make_train_step

log = logging.getLogger(__name__)


def config_to_dict(config: Any) -> dict:
  """A JSON-able dict of the config (dataclasses and tuples included)."""
  def plain(x):
    if hasattr(x, "to_dict") and callable(x.to_dict):
      x = x.to_dict()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
      x = dataclasses.asdict(x)
    if isinstance(x, Mapping):
      return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [plain(v) for v in x]
    if isinstance(x, (np.integer, np.floating, np.bool_)):
      return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
      return x
    return repr(x)
  return plain(config)


def _run_evals(config, state, mesh, step: int, final: bool) -> dict[str, float]:
  """The evaluations of ``config.evals`` due at ``step``: ``{"eval/NAME/KEY": value}``."""
  out = {}
  params = None
  for name, settings in config.evals.items():
    every = int(settings.get("every", 0) or 0)
    if not ((every and step % every == 0) or (final and settings.get("at_end", True))):
      continue
    if name not in eval_lib.EVALS:
      raise ProclipError(f"config.evals names an unknown evaluation {name!r}; known: "
                         f"{', '.join(sorted(eval_lib.EVALS))}.")
    if params is None:
      params = full_params(state)
    t0 = time.time()
    for k, v in (eval_lib.EVALS[name](params, config, mesh) or {}).items():
      out[f"eval/{name}/{k}"] = float(v)
    out[f"eval/{name}/seconds"] = time.time() - t0
  return out


def train(config: Any, workdir, *, source=None, caches: Mapping[str, Any] | None = None
          ) -> dict[str, Any]:
  """Trains stage ``config.stage`` in ``workdir`` (resuming from its latest checkpoint).

  Args:
    config: an ml_collections ConfigDict as in experiments/configs (``base_config`` fields).
    workdir: the run's folder (created if needed).
    source: optional in-memory data source replacing ``config.data.path``.
    caches: optional ``{"llm": provider, "clip": provider}`` replacing ``config.cache``
      (objects with ``lookup(ids, fields) -> float32 [B, dim]``, like ``CacheReader``).

  Returns:
    The last step's metrics (floats) plus ``step``, ``first_step_s``, ``steps_per_s``,
    ``preempted`` (True if SIGTERM stopped the run) and any final evaluation results.
  """
  stage = stage_of(config)
  workdir = epath.Path(workdir)
  created = not workdir.exists()
  ckpt_lib.prepare_workdir(workdir)        # a file / read-only folder: one line
  lock = ckpt_lib.WorkdirLock(workdir).acquire()   # one run per workdir
  try:
    return _train(config, workdir, stage, source, caches)
  finally:
    lock.release()
    # A start refused before it wrote anything leaves no workdir behind.
    if created and jax.process_index() == 0 and workdir.exists() and not any(workdir.iterdir()):
      workdir.rmdir()


def _train(config, workdir, stage, source, caches) -> dict[str, Any]:
  main = jax.process_index() == 0
  # The model's shapes from the files the config names; a resume checked for changes.
  config = run_config.prepare(config, workdir, caches, source)
  total = int(config.total_steps)
  if total < 1:
    raise ProclipError(f"config.total_steps={total} must be >= 1.")
  log_every = max(int(config.log_every), 1)
  ckpt_every = int(config.ckpt_every or 0)

  # Mesh and data.
  mesh = mesh_lib.make_mesh(config.mesh)
  pipe, batch_keys = build_data(config, mesh, source=source, caches=caches)
  axes = batch_axes(mesh, config.logical_axis_rules)
  global_batch = int(config.data.batch_size)

  # Abstract state, shardings and the jitted step (compiled on its first call; JAX's
  # persistent compilation cache, when experiments/run.py sets it, serves repeats).
  abstract, shardings = abstract_train_state(config, mesh)
  train_step = make_train_step(config, mesh, shardings)

  # Resume (the newest readable checkpoint), or start from the initial parameters.
  ckpts, start, state, data_iter = ckpt_lib.resume(
      workdir, abstract, pipe, stage=stage, keep=ckpt_lib.max_to_keep(config))
  if start is not None:
    log.info("Resumed from %s at step %d.", ckpts.directory / str(start), start)
  else:
    start = 0
    log.info("No checkpoint in %s: starting at step 0.", ckpts.directory)
    init = ckpt_lib.stage2_init_params(config) if stage == 2 else None
    state, _ = create_train_state(config, mesh, jax.random.key(int(config.seed)), init)
  if int(jax.device_get(state.step)) != start:
    raise ProclipError(f"Checkpoint {start} holds state.step={int(state.step)}; the "
                       "checkpoint folder is inconsistent.")

  # The next two global batches are copied to the devices while a step runs.
  data_iter = DevicePrefetch(data_iter, lambda local: make_global_batch(
      {k: local[k] for k in batch_keys}, mesh, axes))
  writer = MetricWriter(workdir, enabled=main)
  meta_out = {"config": config_to_dict(config), "stage": stage,
              "caches": ckpt_lib.cache_identity(config)}
  guard = ckpt_lib.NonfiniteGuard(config.get("max_nonfinite_steps", 20), start,
                                  int(jax.device_get(state.nonfinite_steps)))
  result: dict[str, Any] = {"step": start, "preempted": False}
  bar = progress_bar(total, start, main and bool(config.progress))
  t_first = None
  t_mark, step_mark = None, start
  last = {}
  try:
    with Preemption(config.get("preemption_check_every", 1)) as preempt:
      for step in range(start + 1, total + 1):
        try:
          batch = next(data_iter)
        except StopIteration:
          raise ProclipError(
              f"The data ran out at step {step} of {total} (config.data.num_epochs="
              f"{config.data.num_epochs}); raise num_epochs or lower total_steps.") from None
        t0 = time.perf_counter()
        state, metrics = train_step(state, batch)
        if t_first is None:  # compile + the first step, reported apart
          jax.block_until_ready(metrics)
          t_first = time.perf_counter() - t0
          result["first_step_s"] = t_first
          writer.write(step, {"first_step_s": t_first})
          log.info("First step (compile + run): %.2fs", t_first)
          t_mark, step_mark = time.perf_counter(), step
        bar.update(1)

        final = step == total
        evals = _run_evals(config, state, mesh, step, final)
        stop = preempt.should_stop(step) and not final
        if step % log_every == 0 or final or stop:
          last = host_metrics(metrics)
          now = time.perf_counter()
          if step > step_mark:
            rate = (step - step_mark) / max(now - t_mark, 1e-9)
            last["steps_per_s"] = rate
            last["images_per_s" if stage == 2 else "examples_per_s"] = rate * global_batch
          t_mark, step_mark = now, step
          if last.get("finite", 1.0) < 1.0:
            log.warning("Step %d: non-finite loss or gradient; update skipped (%d so far).",
                        step, int(last.get("nonfinite_steps", 0)))
          writer.write(step, last)
          guard.update(step, int(last.get("nonfinite_steps", 0)))
          bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4g}")
        if evals:
          writer.write(step, evals)
          last.update(evals)

        if final or stop or (ckpt_every and step % ckpt_every == 0):
          ckpts.save(step, state, data_iter, {**meta_out, "step": step})
        result["step"] = step
        if stop:
          log.warning("SIGTERM: saved a checkpoint at step %d; stopping.", step)
          result["preempted"] = True
          break
  finally:
    bar.close()
    ckpts.close()
    writer.close()
    data_iter.close()  # stops grain's worker processes and frees their shared memory
  if start >= total:
    log.info("%s is already at step %d of %d; nothing to do.", workdir, start, total)
  result.update(last)
  return result
