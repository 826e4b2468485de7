"""proclip_jax/hostmem.py: which glibc tunables the entry points restart with, and that glibc
then keeps a large freed block in the heap (no fresh page faults when it is allocated again)."""
import os
import platform
import subprocess
import sys

import pytest

from proclip_jax import hostmem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
HEAP = ":".join(hostmem.HEAP_TUNABLES)


def _mode(tmp_path, text):
  p = tmp_path / "enabled"
  p.write_text(text)
  return str(p)


def test_wanted_tunables_follow_thp_mode_and_leave_user_settings_alone(tmp_path):
  madvise = _mode(tmp_path, "always [madvise] never\n")
  if not GLIBC_LINUX:
    assert hostmem.wanted_tunables({}, madvise) is None
    return
  assert hostmem.wanted_tunables({}, madvise) == HEAP + ":" + hostmem.HUGE_PAGES
  assert hostmem.wanted_tunables({}, _mode(tmp_path, "[always] madvise never\n")) == HEAP
  assert hostmem.wanted_tunables({}, _mode(tmp_path, "always madvise [never]\n")) == HEAP
  assert hostmem.wanted_tunables({}, str(tmp_path / "missing")) == HEAP
  assert hostmem.wanted_tunables({"GLIBC_TUNABLES": "glibc.malloc.check=0"}, madvise) is None
  assert hostmem.wanted_tunables({hostmem.OPT_OUT_ENV: "0"}, madvise) is None


def test_original_environ_drops_only_what_was_added():
  added = {"GLIBC_TUNABLES": HEAP, hostmem.ADDED_ENV: HEAP, "HOME": "/h"}
  assert hostmem.original_environ(added) == {"HOME": "/h"}
  # The user's own GLIBC_TUNABLES (never replaced by a restart) is kept.
  mine = {"GLIBC_TUNABLES": "glibc.malloc.check=0", "HOME": "/h"}
  assert hostmem.original_environ(mine) == mine


# After the restart (or not), a worker thread allocates a 64 MiB block with malloc, fills
# it, frees it and does it again (as XLA:CPU does with a step's temporaries); the child
# prints GLIBC_TUNABLES, its arguments and the minor page faults of the second round. Kept in
# the heap, the block faults again at most a handful of times; served by a fresh mmap, it
# faults once per 4 KiB page (16384 times).
_ENTRY = """\
import ctypes, os, resource, sys, threading
sys.path.insert(0, {repo!r})
from proclip_jax.hostmem import restart_with_tunables
print('start', flush=True)
restart_with_tunables()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
faults = []
def rounds():
  for _ in range(2):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
t = threading.Thread(target=rounds)
t.start()
t.join()
print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)
print(faults[1])
"""


@pytest.mark.parametrize("opt_out", [False, True])
def test_restart_sets_the_tunables_once_and_glibc_keeps_the_heap(tmp_path, opt_out):
  script = tmp_path / "entry.py"
  script.write_text(_ENTRY.format(repo=REPO))
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", hostmem.ADDED_ENV, hostmem.OPT_OUT_ENV)}
  if opt_out:
    env[hostmem.OPT_OUT_ENV] = "0"
  tunables = hostmem.wanted_tunables(env)
  out = subprocess.run([sys.executable, str(script), "a", "--b=1"], env=env, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  assert out[:-1] == ["start"] * (2 if tunables else 1) + [f"{tunables} ['a', '--b=1']"]
  faults = int(out[-1])
  if tunables:
    assert faults < 1000, faults
  elif GLIBC_LINUX:
    assert faults > 8000, faults
