"""The ProCLIP trainer: one flat function, ``train(config, workdir)``, that reads top to bottom.

  mesh -> data (grain pipeline + embedding-cache side data) -> abstract state + shardings
  -> jitted step (train/steps.py) -> resume (or initial parameters) -> loop (log, evaluate,
  checkpoint) -> final save

Stage 1 reads only the caches (the dataset gives the ids; images are not decoded)::

    batch = {llm_short, llm_raw: LLM features, clip_short, clip_raw: CLIP text features}

Stage 2 reads images and the LLM feature of the caption field the pipeline drew for each
example (``config.stage2.text_fields``, equal chance)::

    batch = {image, llm_feature}

Workdir layout::

    WORKDIR/config.json          the resolved config (process 0)
    WORKDIR/metrics.jsonl        one JSON object per line: {"step", "loss", ..., "lr",
                                 "grad_norm", "steps_per_s", "examples_per_s" (stage 2:
                                 "images_per_s"), ...}; {"step", "first_step_s"} once per
                                 start (compile + first step); {"step", "eval/NAME/KEY"}
    WORKDIR/tb/                  TensorBoard event files (tensorboardX), the same scalars
    WORKDIR/checkpoints/STEP/    Orbax (train/checkpoints.py): state, data iterator, metadata
    WORKDIR/corrupt_checkpoints/STEP/  checkpoints found unreadable on resume, set aside

Resuming is automatic: a workdir with a checkpoint continues from its latest step (the
state, the optimizer, the EMA teacher and the data iterator restored exactly); a newest
checkpoint whose files cannot be read (truncated by a disk fault) is reported with a
warning, moved to ``corrupt_checkpoints/`` and the one before it is used. SIGTERM (a
preempted VM) saves a checkpoint at the next step boundary and returns; ``run.py`` exits 0.

Evaluation hooks: ``config.evals = {NAME: {"every": N, "at_end": True, ...}}``; each NAME
is a function registered with :func:`register_eval` (or found in ``proclip_jax.eval``
after importing it), called as ``fn(params, config, mesh) -> {key: number}`` with
``params`` the full model tree (``visual`` / ``adapter`` / ``logit_scale``); its own
settings are ``config.evals[NAME]``.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from etils import epath

from proclip_jax.errors import ProclipError
from proclip_jax.train import checkpoints as ckpt_lib
from proclip_jax import mesh as mesh_lib
from proclip_jax.train.state import (_get, abstract_train_state, create_train_state,
                                     full_params, model_config, stage_of)
from proclip_jax.train.steps import TEXT_KEY, make_train_step

log = logging.getLogger(__name__)

EvalFn = Callable[[dict, Any, Any], Mapping[str, Any]]
_EVALS: dict[str, EvalFn] = {}


# ------------------------------------------------------------------------ eval registry

def register_eval(name: str, fn: EvalFn | None = None):
  """Registers ``fn(params, config, mesh) -> dict`` under ``name`` (usable as a decorator)."""
  def add(f):
    _EVALS[name] = f
    return f
  return add if fn is None else add(fn)


def get_eval(name: str) -> EvalFn:
  """The evaluator ``name``: registered, or registered by importing ``proclip_jax.eval``."""
  if name not in _EVALS:
    import importlib  # pylint: disable=import-outside-toplevel
    mod = importlib.import_module("proclip_jax.eval")
    table = getattr(mod, "EVALS", None)
    if name not in _EVALS and isinstance(table, Mapping) and name in table:
      _EVALS[name] = table[name]
  if name not in _EVALS:
    raise ProclipError(f"config.evals names an unknown evaluation {name!r}; known: "
                       f"{sorted(_EVALS) or 'none registered'} (register one with "
                       "proclip_jax.train.loop.register_eval).")
  return _EVALS[name]


# ------------------------------------------------------------------------ multi-host

_DISTRIBUTED = False
_MULTI_HOST_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def wants_distributed(config: Any = None, environ: Mapping[str, str] | None = None) -> bool:
  """Whether ``jax.distributed.initialize()`` should run (``config.distributed``, env)."""
  env = os.environ if environ is None else environ
  mode = _get(config, "distributed", "auto")
  mode = str(mode).strip().lower() if not isinstance(mode, bool) else ("on" if mode else "off")
  if mode in ("off", "false", "0", "no"):
    return False
  if mode in ("on", "true", "1", "yes"):
    return True
  if mode != "auto":
    raise ProclipError(f"config.distributed={mode!r}: use 'auto', 'on' or 'off'.")
  if any(env.get(k) for k in _MULTI_HOST_ENV):
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:                                   # a multi-host TPU slice
    return True
  for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    try:
      if int(env.get(key, "1")) > 1:
        return True
    except ValueError:
      pass
  return False


def initialize_distributed(config: Any = None) -> bool:
  """Calls ``jax.distributed.initialize()`` once when :func:`wants_distributed` says so.

  Must run before anything touches the devices (``run.py`` calls it first).
  """
  global _DISTRIBUTED
  if _DISTRIBUTED:
    return True
  if not wants_distributed(config):
    return False
  jax.distributed.initialize()
  _DISTRIBUTED = True
  log.info("jax.distributed: process %d of %d, %d devices.", jax.process_index(),
           jax.process_count(), jax.device_count())
  return True


# ------------------------------------------------------------------------ config helpers

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


# ------------------------------------------------------------------------ compiled steps

# Fields the jitted step never reads (the loop's own settings, paths). Two configs equal
# outside them build the same step, so a second train() in one process (a resumed run, the
# demo's stages, tests) reuses the compiled function instead of compiling it again.
_LOOP_ONLY = ("evals", "log_every", "ckpt_every", "max_to_keep", "progress", "init", "cache",
              "data", "distributed")
_STEP_CACHE: dict[tuple, Any] = {}
_STEP_CACHE_SIZE = 4


def cached_train_step(config: Any, mesh, shardings):
  """``make_train_step(config, mesh, shardings)``, memoised on the step-relevant config."""
  d = config_to_dict(config)
  key = (json.dumps({k: v for k, v in d.items() if k not in _LOOP_ONLY}, sort_keys=True),
         mesh)
  step = _STEP_CACHE.pop(key, None)
  if step is None:
    step = make_train_step(config, mesh, shardings)
  _STEP_CACHE[key] = step                      # most recent last
  while len(_STEP_CACHE) > _STEP_CACHE_SIZE:
    _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
  return step


# ------------------------------------------------------------------------ data

_TINY_PNG: bytes | None = None


def _tiny_png() -> bytes:
  global _TINY_PNG
  if _TINY_PNG is None:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    _TINY_PNG = buf.getvalue()
  return _TINY_PNG


class TextOnlySource:
  """A data source whose images are replaced by a 4x4 blank (stage 1 never looks at them)."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def _strip(self, ex):
    ex = dict(ex)
    ex["image"] = _tiny_png()
    return ex

  def __getitem__(self, i):
    return self._strip(self.source[i])

  def __getitems__(self, keys):
    many = getattr(self.source, "__getitems__", None)
    rows = many(keys) if many is not None else [self.source[k] for k in keys]
    return [self._strip(ex) for ex in rows]


class FixedField:
  """A side-data provider that always looks up ``field`` (stage 1 wants both fields)."""

  def __init__(self, provider, field: str):
    self.provider, self.field = provider, field

  def lookup(self, ids, fields):
    del fields
    names = np.full(np.shape(ids), self.field, dtype=object)
    if hasattr(self.provider, "lookup"):
      return self.provider.lookup(ids, names)
    return self.provider(ids, names)


def _open_cache(config, name: str, kind: str, dim: int, fields, data_path: str | None):
  from proclip_jax.data.cache import CacheReader  # pylint: disable=import-outside-toplevel
  path = _get(config, f"cache.{name}", "")
  what = "LLM-embedder features" if kind == "llm" else "CLIP text-tower features"
  model = "the converted embedder" if kind == "llm" else "the converted CLIP"
  if not path:
    raise ProclipError(
        f"config.cache.{name} is not set: the run needs a cache of {what}. Write one with "
        f"`python tools/precompute.py --data DATA --model MODEL --fields "
        f"{','.join(fields)} --out CACHE` (MODEL: {model}) and set config.cache.{name}=CACHE.")
  expect = {"kind": kind, "dim": dim, "fields": list(fields)}
  if kind == "llm" and _get(config, "cache.preset", ""):
    expect["preset"] = _get(config, "cache.preset")
  if data_path:
    expect.update(data=data_path, split=_get(config, "data.split", "train"))
  return CacheReader(path, expect=expect, fields=list(fields))


def _batch_axes(mesh, rules) -> tuple[str, ...]:
  spec = mesh_lib.batch_spec(mesh, rules)
  if not spec or spec[0] is None:
    return ()
  return (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])


def build_data(config: Any, mesh, *, source=None, caches: Mapping[str, Any] | None = None):
  """``(pipeline, batch_keys)``: the training pipeline of this stage and what the step reads.

  ``source`` replaces ``open_source(config.data.path, config.data.split)``; ``caches``
  (``{"llm": provider, "clip": provider}``, the ``lookup(ids, fields)`` protocol) replace
  the caches named by ``config.cache``.
  """
  from proclip_jax.data import pipeline as pl  # pylint: disable=import-outside-toplevel
  stage = stage_of(config)
  data_path = _get(config, "data.path", "")
  split = _get(config, "data.split", "train")
  if source is None:
    if not data_path:
      raise ProclipError("config.data.path is not set: name a dataset folder made by "
                         "`python tools/build_dataset.py SRC OUT`.")
    source = pl.open_source(data_path, split)
  else:
    data_path = None  # an injected source: no dataset fingerprint to check caches against
  global_batch = int(_get(config, "data.batch_size", 0))
  pc = jax.process_count()
  shards = mesh_lib.batch_divisor(mesh, _get(config, "logical_axis_rules"))
  if global_batch < 1 or global_batch % pc or global_batch % shards:
    raise ProclipError(f"config.data.batch_size={global_batch} must be a positive multiple "
                       f"of the process count ({pc}) and of the batch shards ({shards}).")
  mc = model_config(config)
  caches = dict(caches or {})
  if stage == 1:
    fields = tuple(_get(config, "stage1.fields", ("short", "raw")))
    llm = caches.get("llm") or _open_cache(config, "llm", "llm", mc.adapter.in_dim, fields,
                                           data_path)
    clip = caches.get("clip") or _open_cache(config, "clip", "clip_text", mc.adapter.out_dim,
                                             fields, data_path)
    side = {}
    for f in fields:
      side[f"llm_{f}"] = FixedField(llm, f)
      side[f"clip_{f}"] = FixedField(clip, f)
    keys = [k for f in fields for k in (f"llm_{f}", f"clip_{f}")]
    source, image_size = TextOnlySource(source), 4
  else:
    fields = tuple(_get(config, "stage2.text_fields", ("short", "long")))
    llm = caches.get("llm") or _open_cache(config, "llm", "llm", mc.adapter.in_dim, fields,
                                           data_path)
    side = {TEXT_KEY: llm}
    keys = ["image", TEXT_KEY]
    image_size = mc.vision.image_size
  weights = _get(config, "stage2.field_weights") if stage == 2 else None
  options = pl.PipelineOptions(
      batch_size=global_batch // pc, image_size=image_size, mode="train", fields=fields,
      field_weights=None if weights is None else tuple(weights),
      seed=int(_get(config, "data.seed", _get(config, "seed", 0))),
      num_epochs=_get(config, "data.num_epochs"), shuffle=bool(_get(config, "data.shuffle",
                                                                    True)),
      worker_count=int(_get(config, "data.worker_count", 0)),
      worker_buffer_size=int(_get(config, "data.worker_buffer_size", 2)),
      read_threads=int(_get(config, "data.read_threads", 4)),
      prefetch_batches=int(_get(config, "data.prefetch_batches", 4)))
  return pl.Pipeline(source, options, side_data=side), keys


# ------------------------------------------------------------------------ metrics

def _summary_writer_class():
  """``tensorboardX.SummaryWriter``, imported without PyTorch when PyTorch is not loaded yet.

  tensorboardX imports torch (a slow import at a run's start) only so that it can also accept
  ``torch.Tensor`` values; this trainer logs Python floats. While tensorboardX is imported,
  ``import torch`` fails (the ImportError its ``try`` expects); torch stays importable after.
  """
  import sys  # pylint: disable=import-outside-toplevel
  block = "torch" not in sys.modules
  if block:
    sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    if block and sys.modules.get("torch", False) is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """``metrics.jsonl`` + TensorBoard event files in the workdir (process 0 only)."""

  def __init__(self, workdir: epath.Path, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._path = workdir / "metrics.jsonl"
    if enabled:
      try:
        self._tb = _summary_writer_class()(os.fspath(workdir / "tb"))
      except ImportError:  # pragma: no cover - tensorboardX is in requirements.txt
        log.warning("tensorboardX is not installed; no TensorBoard files.")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: (float(v) if isinstance(v, (int, float, np.number)) else v)
                for k, v in metrics.items()})
    with self._path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, float) and math.isfinite(v):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _host_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Replicated device scalars -> Python floats (works on every host of a pod)."""
  def one(x):
    if isinstance(x, jax.Array):
      x = x.addressable_data(0)
    return float(np.asarray(x))
  return {k: one(v) for k, v in metrics.items()}


class _Preemption:
  """Catches SIGTERM: the loop saves at the next step boundary and returns."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self) -> bool:
    flag = self.requested
    if jax.process_count() > 1:  # every host stops at the same step
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
    return flag


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
              dynamic_ncols=True, smoothing=0.1)


def _run_evals(config, state, mesh, step: int, final: bool) -> dict[str, float]:
  evals = _get(config, "evals", None) or {}
  out = {}
  params = None
  for name in list(evals.keys()):
    settings = evals[name] or {}
    every = int(_get(settings, "every", 0) or 0)
    due = (every and step % every == 0) or (final and bool(_get(settings, "at_end", True)))
    if not due:
      continue
    fn = get_eval(name)
    if params is None:
      params = full_params(state)
    t0 = time.time()
    result = fn(params, config, mesh) or {}
    for k, v in result.items():
      out[f"eval/{name}/{k}"] = float(v)
    out[f"eval/{name}/seconds"] = time.time() - t0
  return out


# ------------------------------------------------------------------------ resuming

CORRUPT_DIR = "corrupt_checkpoints"


def max_to_keep(config: Any) -> int | None:
  """``config.max_to_keep``: newest checkpoints kept; None or 0 keep all (default 3)."""
  value = _raw(config, "max_to_keep", 3)   # _get would turn an explicit None into 3
  if value is None or int(value) == 0:
    return None
  if int(value) < 0:
    raise ProclipError(f"config.max_to_keep={value} must be >= 0 (0 or None: keep all).")
  return int(value)


def _raw(config: Any, name: str, default: Any) -> Any:
  """``config.name`` as set (None included); ``default`` when the config lacks it."""
  if isinstance(config, Mapping) or hasattr(config, "keys"):
    try:
      return config[name] if name in config else default
    except TypeError:
      pass
  return getattr(config, name, default)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def _any_process(flag: bool) -> bool:
  """``flag`` OR-ed over all processes (each may have read other shards of a checkpoint)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _set_aside(workdir: epath.Path, step: int) -> epath.Path:
  """Moves ``checkpoints/STEP`` to ``corrupt_checkpoints/STEP`` (process 0; all wait)."""
  src = ckpt_lib.checkpoint_dir(workdir) / str(step)
  dest_dir = workdir / CORRUPT_DIR
  dest = dest_dir / str(step)
  n = 1
  while dest.exists():             # the same step damaged twice: keep both
    dest, n = dest_dir / f"{step}.{n}", n + 1
  if jax.process_index() == 0:
    dest_dir.mkdir(parents=True, exist_ok=True)
    src.rename(dest)
  _sync(f"proclip_set_aside_{step}")
  return dest


def _resume(config: Any, workdir: epath.Path, abstract: Any, pipe):
  """``(ckpts, step, state, data_iter)`` of the newest readable checkpoint (None, None: none).

  Steps are tried newest first. A checkpoint whose files cannot be read (``CorruptCheckpoint``)
  is reported, moved to ``WORKDIR/corrupt_checkpoints/STEP`` (so that a later save of that
  step does not collide with it) and the next older one is tried.
  """
  stage = stage_of(config)
  while True:
    ckpts = ckpt_lib.Checkpoints(workdir, max_to_keep=max_to_keep(config))
    data_iter = iter(pipe)               # fresh: a failed restore may have moved it
    steps = sorted(ckpts.all_steps(), reverse=True)
    if not steps:
      return ckpts, None, None, data_iter
    step = steps[0]
    error = None
    try:
      state, meta = ckpts.restore(abstract, data_iter, step)
    except ckpt_lib.CorruptCheckpoint as e:
      error = e
    except BaseException:
      ckpts.close()
      raise
    if _any_process(error is not None):
      ckpts.close()
      older = f"step {steps[1]}" if len(steps) > 1 else "the start (no older checkpoint)"
      dest = _set_aside(workdir, step)
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


# ------------------------------------------------------------------------ the trainer

def train(config: Any, workdir, *, source=None, caches: Mapping[str, Any] | None = None
          ) -> dict[str, Any]:
  """Trains stage ``config.stage`` in ``workdir`` (resuming from its latest checkpoint).

  Args:
    config: an ml_collections ConfigDict (or nested dict) as in experiments/configs.
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
  main = jax.process_index() == 0
  if main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config_to_dict(config), indent=1))
  total = int(_get(config, "total_steps", 0))
  if total < 1:
    raise ProclipError(f"config.total_steps={total} must be >= 1.")
  log_every = max(int(_get(config, "log_every", 50)), 1)
  ckpt_every = int(_get(config, "ckpt_every", 0) or 0)

  # Mesh and data.
  from proclip_jax.data.pipeline import make_global_batch  # pylint: disable=import-outside-toplevel
  mesh = mesh_lib.make_mesh(_get(config, "mesh"))
  rules = _get(config, "logical_axis_rules")
  pipe, batch_keys = build_data(config, mesh, source=source, caches=caches)
  batch_axes = _batch_axes(mesh, rules)
  global_batch = int(_get(config, "data.batch_size"))

  # Abstract state, shardings and the jitted step.
  abstract, shardings = abstract_train_state(config, mesh)
  train_step = cached_train_step(config, mesh, shardings)

  # Resume (the newest readable checkpoint), or start from the initial parameters.
  ckpts, start, state, data_iter = _resume(config, workdir, abstract, pipe)
  if start is not None:
    log.info("Resumed from %s at step %d.", ckpts.directory / str(start), start)
  else:
    start = 0
    log.info("No checkpoint in %s: starting at step 0.", ckpts.directory)
    init = None
    if stage == 2:
      init = ckpt_lib.stage2_init_params(config)
    state, _ = create_train_state(config, mesh, jax.random.key(int(_get(config, "seed", 0))),
                                  init)
  if int(jax.device_get(state.step)) != start:
    raise ProclipError(f"Checkpoint {start} holds state.step={int(state.step)}; the "
                       "checkpoint folder is inconsistent.")

  writer = MetricWriter(workdir, enabled=main)
  meta_out = {"config": config_to_dict(config), "stage": stage}
  result: dict[str, Any] = {"step": start, "preempted": False}
  bar = _progress(total, start, main and bool(_get(config, "progress", True)))
  t_first = None
  t_mark, step_mark = None, start
  last = {}
  try:
    with _Preemption() as preempt:
      for step in range(start + 1, total + 1):
        try:
          local = next(data_iter)
        except StopIteration:
          raise ProclipError(
              f"The data ran out at step {step} of {total} (config.data.num_epochs="
              f"{_get(config, 'data.num_epochs')}); raise num_epochs or lower "
              "total_steps.") from None
        batch = make_global_batch({k: local[k] for k in batch_keys}, mesh, batch_axes)
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
        stop = preempt.should_stop() and not final
        if step % log_every == 0 or final or stop:
          last = _host_metrics(metrics)
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
  if start >= total:
    log.info("%s is already at step %d of %d; nothing to do.", workdir, start, total)
  result.update({k: v for k, v in last.items()})
  return result
