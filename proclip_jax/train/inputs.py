"""The trainer's input pipeline: the grain pipeline of a stage plus its embedding caches.

Stage 1 reads only the caches (the pipeline gives the ids; ``images=False``, so no image
is decoded)::

    batch = {llm_short, llm_raw: LLM features, clip_short, clip_raw: CLIP text features}

Stage 2 reads images and the LLM feature of the caption field the pipeline drew for each
example (``config.stage2.text_fields``, equal chance, or ``config.stage2.field_weights``
when that optional field is set)::

    batch = {image, llm_feature}
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from proclip_jax import mesh as mesh_lib
from proclip_jax.data import pipeline as pl
from proclip_jax.data.cache import CacheReader
from proclip_jax.errors import ProclipError
from proclip_jax.train.state import model_config, stage_of
from proclip_jax.train.steps import TEXT_KEY


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


def open_cache(config, name: str, kind: str, dim: int, fields, data_path: str | None):
  """The ``CacheReader`` of ``config.cache.<name>``, checked against what the run expects."""
  path = config.cache[name]
  what = "LLM-embedder features" if kind == "llm" else "CLIP text-tower features"
  model = "the converted embedder" if kind == "llm" else "the converted CLIP"
  if not path:
    raise ProclipError(
        f"config.cache.{name} is not set: the run needs a cache of {what}. Write one with "
        f"`python tools/precompute.py --data DATA --model MODEL --fields "
        f"{','.join(fields)} --out CACHE` (MODEL: {model}) and set config.cache.{name}=CACHE.")
  expect = {"kind": kind, "dim": dim, "fields": list(fields)}
  if kind == "llm" and config.cache.preset:
    expect["preset"] = config.cache.preset
  if data_path:
    expect.update(data=data_path, split=config.data.split)
  return CacheReader(path, expect=expect, fields=list(fields))


# Most grain workers the automatic count starts: decoding a batch of images is spread over
# them, and more than this only adds copies through shared memory.
MAX_AUTO_WORKERS = 16


def default_worker_count(cores: int | None = None) -> int:
  """``config.data.worker_count = -1``: grain workers for this machine's cores.

  0 (decode in the main process's read threads) on <= 2 cores, where worker processes
  compete with the training step and slow it down; otherwise half the cores, at most
  :data:`MAX_AUTO_WORKERS`.
  """
  if cores is None:
    try:
      cores = len(os.sched_getaffinity(0))   # the cores this process may use
    except AttributeError:
      cores = os.cpu_count() or 1
  if cores <= 2:
    return 0
  return min(cores // 2, MAX_AUTO_WORKERS)


def worker_count(config) -> int:
  """``config.data.worker_count``, with -1 meaning :func:`default_worker_count`."""
  n = int(config.data.worker_count)
  if n == -1:
    return default_worker_count()
  if n < 0:
    raise ProclipError(f"config.data.worker_count={n}: use 0 (no worker processes), a "
                       "positive count, or -1 (from the machine's cores).")
  return n


def batch_axes(mesh, rules) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over (for ``make_global_batch``)."""
  spec = mesh_lib.batch_spec(mesh, rules)
  if not spec or spec[0] is None:
    return ()
  return (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])


def require_data(config: Any) -> None:
  """Refuses an unset ``config.data.path`` or a folder without a built dataset.

  The trainer checks this first (before the caches and models, which are made from it).
  """
  if not config.data.path:
    raise ProclipError("config.data.path is not set: name a dataset folder made by "
                       "`python tools/build_dataset.py SRC OUT`.")
  if not epath.Path(config.data.path, "dataset_info.json").exists():
    pl.open_source(config.data.path, config.data.split)   # raises, naming the command


def build_data(config: Any, mesh, *, source=None, caches: Mapping[str, Any] | None = None):
  """``(pipeline, batch_keys)``: the training pipeline of this stage and what the step reads.

  ``source`` replaces ``open_source(config.data.path, config.data.split)``; ``caches``
  (``{"llm": provider, "clip": provider}``, the ``lookup(ids, fields)`` protocol) replace
  the caches named by ``config.cache``. Optional fields: ``config.data.seed`` (default
  ``config.seed``) and ``config.stage2.field_weights`` (default equal).
  """
  stage = stage_of(config)
  data_path = config.data.path
  if source is None:
    require_data(config)
    source = pl.open_source(data_path, config.data.split)
  else:
    data_path = None  # an injected source: no dataset fingerprint to check caches against
  global_batch = int(config.data.batch_size)
  pc = jax.process_count()
  shards = mesh_lib.batch_divisor(mesh, config.logical_axis_rules)
  if global_batch < 1 or global_batch % pc or global_batch % shards:
    raise ProclipError(f"config.data.batch_size={global_batch} must be a positive multiple "
                       f"of the process count ({pc}) and of the batch shards ({shards}).")
  mc = model_config(config)
  caches = dict(caches or {})
  if stage == 1:
    fields = tuple(config.stage1.fields)
    llm = caches.get("llm") or open_cache(config, "llm", "llm", mc.adapter.in_dim, fields,
                                          data_path)
    clip = caches.get("clip") or open_cache(config, "clip", "clip_text", mc.adapter.out_dim,
                                            fields, data_path)
    side = {}
    for f in fields:
      side[f"llm_{f}"] = FixedField(llm, f)
      side[f"clip_{f}"] = FixedField(clip, f)
    keys = [k for f in fields for k in (f"llm_{f}", f"clip_{f}")]
    images = {"images": False}
    weights = None
  else:
    fields = tuple(config.stage2.text_fields)
    llm = caches.get("llm") or open_cache(config, "llm", "llm", mc.adapter.in_dim, fields,
                                          data_path)
    side = {TEXT_KEY: llm}
    keys = ["image", TEXT_KEY]
    images = {"image_size": mc.vision.image_size}
    weights = config.stage2.get("field_weights")
  data = config.data
  options = pl.PipelineOptions(
      batch_size=global_batch // pc, mode="train", fields=fields,
      field_weights=None if weights is None else tuple(weights),
      seed=int(data.get("seed", config.seed)), num_epochs=data.num_epochs,
      shuffle=bool(data.shuffle), worker_count=worker_count(config),
      worker_buffer_size=int(data.worker_buffer_size), read_threads=int(data.read_threads),
      prefetch_batches=int(data.prefetch_batches), **images)
  return pl.Pipeline(source, options, side_data=side), keys
