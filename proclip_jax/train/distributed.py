"""Multi-process runs: when to start ``jax.distributed`` and the cross-process helpers.

On a Cloud TPU VM slice (and under SLURM / Open MPI, or with an explicit coordinator)
``jax.distributed.initialize()`` without arguments finds the coordinator, the process
count and this process's index by itself (on a TPU VM from the GCE metadata server, JAX's
``GceTpuCluster``, or ``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES``, its
``GkeTpuCluster``); this module only decides whether to call it (``config.distributed``:
``"auto"`` looks at the environment and the TPU devices, ``"on"``, ``"off"``).
"""
from __future__ import annotations

import logging
import os
import glob
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
# Hosts of a TPU slice as the TPU VM / GKE environment lists them (JAX's GkeTpuCluster).
_TPU_HOSTS_ENV = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
# TPU chips as a TPU VM exposes them: /dev/accel0.. (v2-v4, v5e, v6e) or /dev/vfio/0.. (v5p).
_TPU_DEVICE_GLOBS = ("accel[0-9]*", "vfio/[0-9]*")


def tpu_chips(dev_root: str = "/dev") -> int:
  """Number of TPU chip device files under ``dev_root`` (0 off a TPU VM)."""
  return sum(len(glob.glob(os.path.join(dev_root, g))) for g in _TPU_DEVICE_GLOBS)


def wants_distributed(config: Any, environ: Mapping[str, str] | None = None,
                      dev_root: str = "/dev") -> bool:
  """Whether ``jax.distributed.initialize()`` should run (``config.distributed``, env).

  ``"auto"`` says yes when a coordinator is named, when SLURM / Open MPI start more than
  one process, and on a Cloud TPU VM (TPU chips under ``dev_root``) unless its environment
  lists a single host (``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` without a
  comma). A TPU VM that lists no hosts in its environment (a GCE TPU VM: the slice's
  workers are in the metadata server) initialises too: ``jax.distributed.initialize()``
  with no arguments is the documented start on every worker of a slice, and on a
  single-host VM it makes a one-process run.
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
  hosts = next((env[k] for k in _TPU_HOSTS_ENV if env.get(k)), None)
  if hosts is not None and "," in hosts:                # a multi-host TPU slice
    return True
  for key in _COUNT_ENV:
    try:
      if int(env.get(key, "1")) > 1:
        return True
    except ValueError:
      pass
  if hosts is None and tpu_chips(dev_root) > 0:         # a TPU VM: its metadata knows
    return True
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
  """Catches SIGTERM (a preempted VM): the loop saves at a step boundary and returns.

  A context manager. :meth:`should_stop` answers the same on every process (any process
  that got the signal stops them all at the same step). With one process it reads the local
  flag at every step. With several, agreeing takes a cross-process all-gather, which waits
  for the devices to finish the steps already queued; so the processes compare flags only
  at steps that are multiples of ``check_every`` (``config.preemption_check_every``) and
  the host keeps dispatching ahead in between. A preemption notice gives tens of seconds,
  so a check every few steps still saves in time.
  """

  def __init__(self, check_every: int = 1):
    check_every = int(check_every)
    if check_every < 1:
      raise ProclipError(f"config.preemption_check_every={check_every} must be >= 1.")
    self.check_every = check_every
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

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after ``step`` (called at every step on every process)."""
    if jax.process_count() == 1:
      return self.requested
    if step % self.check_every:
      return False
    return any_process(self.requested)
