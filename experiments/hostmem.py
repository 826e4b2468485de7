"""glibc malloc settings for XLA:CPU's host memory, set at process start (opt-in; Linux, glibc).

XLA:CPU allocates each step's temporaries anew on every call: one large block of
``temp_size_in_bytes`` (gigabytes for a stage-2 step at real sizes), requested from a worker
thread. glibc gives a worker thread its own arena, an arena cannot grow by gigabytes, and so
glibc serves the block from a fresh ``mmap`` and unmaps it when it is freed. Every step then
touches that many new pages: minor page faults and kernel time on every step, which also
compete with whatever else runs on the machine (docs/performance.md, "Host memory").

The tunables set here keep that block in the process's heap from one step to the next:

* ``glibc.malloc.arena_max=1``: one arena (the main heap) for every thread, so a large
  block can come from it;
* ``glibc.malloc.mmap_max=0``: large blocks come from the heap instead of ``mmap``;
* ``glibc.malloc.trim_threshold=1099511627776``: freed memory stays in the heap for the
  next step instead of going back to the kernel;
* ``glibc.malloc.hugetlb=1``, when the system's transparent-huge-page mode is ``madvise``:
  the heap on 2 MiB pages.

Peak memory is unchanged: the block was resident during each step anyway. The settings
suit XLA:CPU on a host with few cores; one arena for every thread is a poor choice for a
TPU or GPU host, whose input pipeline and runtime threads allocate concurrently while the
device computes. So they are opt-in and only ever applied to a run on the CPU backend:

* ``PROCLIP_HOST_MALLOC=1`` (or ``experiments/run.py --host-malloc``) asks for them;
  ``PROCLIP_HOST_MALLOC=0`` refuses them where an entry point would apply them by default
  (``tools/benchmark.py``, which measures the CPU step);
* they apply only when the run is on the CPU backend, decided before JAX is imported:
  ``JAX_PLATFORMS`` names only ``cpu``, or, with ``JAX_PLATFORMS`` unset, no accelerator
  device file exists (``/dev/accel*``: TPU; ``/dev/vfio``: TPU through VFIO;
  ``/dev/nvidia*``: GPU);
* a ``GLIBC_TUNABLES`` already set (a user's own choice) is kept; off Linux with glibc
  nothing happens.

glibc reads tunables only when a process starts, so the entry points call
:func:`restart_with_tunables` first: it restarts the process once with ``GLIBC_TUNABLES``
set. :data:`ADDED_ENV` names the variable that records what was added, so that a child
process of another framework (the PyTorch side of ``tools/benchmark.py``) can start with
the environment the user gave (:func:`original_environ`).
"""
from __future__ import annotations

import glob
import os
import platform
import sys
from typing import Mapping

HEAP_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                 "glibc.malloc.trim_threshold=1099511627776")
HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
ENV = "PROCLIP_HOST_MALLOC"
ADDED_ENV = "PROCLIP_ADDED_GLIBC_TUNABLES"
# Device files whose presence means JAX would pick an accelerator backend by default.
ACCELERATOR_FILES = ("accel*", "vfio", "nvidia*")
_OFF = ("", "0", "false", "no", "off")


def cpu_backend(environ: Mapping[str, str] = os.environ, dev_dir: str = "/dev") -> bool:
  """Whether a JAX process started with ``environ`` runs on the CPU backend.

  ``JAX_PLATFORMS``, when set, decides (only ``cpu`` listed); otherwise the absence of every
  accelerator device file under ``dev_dir`` (:data:`ACCELERATOR_FILES`).
  """
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return all(p == "cpu" for p in platforms)
  return not any(glob.glob(os.path.join(dev_dir, pattern)) for pattern in ACCELERATOR_FILES)


def wanted_tunables(environ: Mapping[str, str] = os.environ,
                    thp_mode_file: str = THP_MODE_FILE, *, default: bool = False,
                    dev_dir: str = "/dev") -> str | None:
  """The ``GLIBC_TUNABLES`` value :func:`restart_with_tunables` would set, or None.

  Asked for when ``PROCLIP_HOST_MALLOC`` is set to anything but ``0`` / ``false`` / ``no`` /
  ``off``; when it is unset, ``default`` decides.
  """
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return None
  if "GLIBC_TUNABLES" in environ:
    return None
  setting = environ.get(ENV)
  wanted = default if setting is None else setting.strip().lower() not in _OFF
  if not wanted or not cpu_backend(environ, dev_dir):
    return None
  tunables = list(HEAP_TUNABLES)
  try:
    with open(thp_mode_file) as f:
      if "[madvise]" in f.read():
        tunables.append(HUGE_PAGES)
  except OSError:
    pass
  return ":".join(tunables)


def restart_with_tunables(*, default: bool = False) -> None:
  """Replaces this process by the same command line with ``GLIBC_TUNABLES`` set, if wanted.

  Call it first thing in a script's ``__main__`` block, before JAX or torch is imported;
  ``default``: whether to apply the settings when ``PROCLIP_HOST_MALLOC`` is unset. The
  environment of the new process carries the tunables, so it never restarts twice.
  """
  tunables = wanted_tunables(default=default)
  if tunables is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv),
            {**os.environ, "GLIBC_TUNABLES": tunables, ADDED_ENV: tunables})


def original_environ(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
  """``environ`` without what :func:`restart_with_tunables` added to it."""
  out = dict(environ)
  added = out.pop(ADDED_ENV, None)
  if added is not None and out.get("GLIBC_TUNABLES") == added:
    del out["GLIBC_TUNABLES"]
  return out
