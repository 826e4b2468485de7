"""Multi-process runs: when to start ``jax.distributed`` and the cross-process helpers.

On a Cloud TPU VM slice (and under SLURM / Open MPI, or with an explicit coordinator)
``jax.distributed.initialize()`` without arguments finds the coordinator, the process
count and this process's index by itself; this module only decides whether to call it
(``config.distributed``: ``"auto"`` looks at the environment, ``"on"``, ``"off"``).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from proclip_jax.errors import ProclipError

log = logging.getLogger(__name__)

_INITIALIZED = False
# A coordinator named explicitly (any platform, or a multi-slice TPU job).
_COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")
# Process counts of the launchers jax.distributed knows (a count above 1: several hosts).
_COUNT_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def wants_distributed(config: Any, environ: Mapping[str, str] | None = None) -> bool:
  """Whether ``jax.distributed.initialize()`` should run (``config.distributed``, env).

  ``"auto"`` says yes when a coordinator is named, on a multi-host TPU slice
  (``TPU_WORKER_HOSTNAMES`` lists several workers, as the TPU VM metadata sets it) or when
  SLURM / Open MPI start more than one process.
  """
  env = os.environ if environ is None else environ
  mode = config.distributed
  mode = str(mode).strip().lower() if not isinstance(mode, bool) else ("on" if mode else "off")
  if mode in ("off", "false", "0", "no"):
    return False
  if mode in ("on", "true", "1", "yes"):
    return True
  if mode != "auto":
    raise ProclipError(f"config.distributed={mode!r}: use 'auto', 'on' or 'off'.")
  if any(env.get(k) for k in _COORDINATOR_ENV):
    return True
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):      # a multi-host TPU slice
    return True
  for key in _COUNT_ENV:
    try:
      if int(env.get(key, "1")) > 1:
        return True
    except ValueError:
      pass
  return False


def initialize_distributed(config: Any) -> bool:
  """Calls ``jax.distributed.initialize()`` once when :func:`wants_distributed` says so.

  Must run before anything touches the devices (``experiments/run.py`` calls it first).
  """
  global _INITIALIZED
  if _INITIALIZED:
    return True
  if not wants_distributed(config):
    return False
  jax.distributed.initialize()
  _INITIALIZED = True
  log.info("jax.distributed: process %d of %d, %d devices.", jax.process_index(),
           jax.process_count(), jax.device_count())
  return True


def sync(name: str) -> None:
  """All processes wait here (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """``flag`` OR-ed over all processes (every process gets the same answer)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


class Preemption:
  """Catches SIGTERM (a preempted VM): the loop saves at the next step boundary and returns.

  A context manager; :meth:`should_stop` is the same on every process (any process that
  got the signal stops them all at the same step).
  """

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
    return any_process(self.requested)
