"""Transparent huge pages for host memory on Linux with glibc, set once at process start.

XLA:CPU allocates each step's temporaries again on every call, and glibc serves every
allocation above its mmap threshold with a fresh mapping. Each step therefore touches
gigabytes of new 4 KiB pages. Five stage-2 steps of ViT-B/16 at batch 8 take 6.0 million
minor page faults here.

The glibc tunable ``glibc.malloc.hugetlb=1`` makes malloc ask the kernel for transparent
huge pages (2 MiB) when the system's THP mode is ``madvise``. The same run then takes
0.54 million faults, and its step is 12 % faster (docs/performance.md). glibc reads tunables
only when a process starts, so the training entry point ``experiments/run.py`` restarts
itself once with the tunable set. ``tools/benchmark.py`` does not: with huge pages, the JAX
step that follows each PyTorch step in its alternating runs slows down (docs/performance.md).
To benchmark with huge pages, set ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` yourself.

Nothing happens when any of these holds:

* ``GLIBC_TUNABLES`` is already set (a user's own choice is kept);
* ``PROCLIP_HUGEPAGES=0`` is set;
* the platform is not Linux with glibc;
* THP is ``always`` (already on) or ``never`` (unavailable).
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def wants_huge_page_restart(environ: Mapping[str, str] = os.environ,
                            thp_mode_file: str = THP_MODE_FILE) -> bool:
  """Whether :func:`restart_with_huge_pages` would restart this process (see module doc)."""
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return False
  if "GLIBC_TUNABLES" in environ or environ.get("PROCLIP_HUGEPAGES") == "0":
    return False
  try:
    with open(thp_mode_file) as f:
      return "[madvise]" in f.read()
  except OSError:
    return False


def restart_with_huge_pages() -> None:
  """Replaces this process by the same command line with ``GLIBC_TUNABLES`` set, if wanted.

  Call it first thing in a script's ``__main__`` block, before JAX or torch is imported.
  The environment of the new process carries the tunable, so it never restarts twice.
  """
  if not wants_huge_page_restart():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), {**os.environ, "GLIBC_TUNABLES": TUNABLE})
