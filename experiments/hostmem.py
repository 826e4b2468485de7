"""glibc malloc settings for XLA:CPU's host memory, set once at process start (Linux, glibc).

XLA:CPU allocates each step's temporaries anew on every call: one block of
``temp_size_in_bytes`` (3.2 GB for the stage-2 step of ViT-B/16 at batch 8, D = 4096),
requested from a worker thread. glibc gives a worker thread its own arena, an arena cannot
grow by gigabytes, and so glibc serves the block from a fresh ``mmap`` and unmaps it when
it is freed. Every step then touches 3.2 GB of new pages: 790 thousand minor page faults
and 2–4 s of kernel time per stage-2 step on the development machine. The kernel work
also competes with whatever else runs: beside a PyTorch process the same step took 9.9 s
instead of 7.9 s.

The tunables set here keep that block in the process's heap from one step to the next:

* ``glibc.malloc.arena_max=1``: one arena (the main heap) for every thread, so a large
  block can come from it;
* ``glibc.malloc.mmap_max=0``: large blocks come from the heap instead of ``mmap``;
* ``glibc.malloc.trim_threshold=1099511627776``: freed memory stays in the heap for the
  next step instead of going back to the kernel;
* ``glibc.malloc.hugetlb=1``, when the system's transparent-huge-page mode is ``madvise``:
  the heap on 2 MiB pages.

With all four, the stage-2 step takes 0 page faults and 0.1 s of kernel time, runs in
7.1 s instead of 7.6–8.2 s, and takes the same time beside a PyTorch process as alone
(docs/performance.md). Peak memory is unchanged: the block was resident during each step
anyway. glibc reads tunables only when a process starts, so the entry points
(``experiments/run.py``, ``tools/benchmark.py``) call :func:`restart_with_tunables` first:
it restarts the process once with ``GLIBC_TUNABLES`` set. Nothing happens when any of
these holds:

* ``GLIBC_TUNABLES`` is already set (a user's own choice is kept);
* ``PROCLIP_MALLOC_TUNABLES=0`` is set;
* the platform is not Linux with glibc.

:data:`ADDED_ENV` names the variable that records what was added, so that a child process
of another framework (the PyTorch side of ``tools/benchmark.py``) can start with the
environment the user gave (:func:`original_environ`).
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

HEAP_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                 "glibc.malloc.trim_threshold=1099511627776")
HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
OPT_OUT_ENV = "PROCLIP_MALLOC_TUNABLES"
ADDED_ENV = "PROCLIP_ADDED_GLIBC_TUNABLES"


def wanted_tunables(environ: Mapping[str, str] = os.environ,
                    thp_mode_file: str = THP_MODE_FILE) -> str | None:
  """The ``GLIBC_TUNABLES`` value :func:`restart_with_tunables` would set, or None."""
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return None
  if "GLIBC_TUNABLES" in environ or environ.get(OPT_OUT_ENV) == "0":
    return None
  tunables = list(HEAP_TUNABLES)
  try:
    with open(thp_mode_file) as f:
      if "[madvise]" in f.read():
        tunables.append(HUGE_PAGES)
  except OSError:
    pass
  return ":".join(tunables)


def restart_with_tunables() -> None:
  """Replaces this process by the same command line with ``GLIBC_TUNABLES`` set, if wanted.

  Call it first thing in a script's ``__main__`` block, before JAX or torch is imported.
  The environment of the new process carries the tunables, so it never restarts twice.
  """
  tunables = wanted_tunables()
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
