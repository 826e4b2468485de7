"""experiments/hostmem.py: when the entry points restart with glibc tunables (opt-in, CPU
backend only), which tunables, and that glibc then keeps a large freed block in the heap (no
fresh page faults when it is allocated again)."""
import json
import os
import platform
import subprocess
import sys

import pytest

from experiments import hostmem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
HEAP = ":".join(hostmem.HEAP_TUNABLES)
CPU = {"JAX_PLATFORMS": "cpu"}


def _mode(tmp_path, text):
  p = tmp_path / f"enabled_{text.index('[')}"  # one file per mode
  p.write_text(text)
  return str(p)


@pytest.fixture
def no_accel(tmp_path):
  """A /dev stand-in without accelerator device files."""
  d = tmp_path / "dev"
  d.mkdir()
  (d / "null").touch()
  (d / "nvme0").touch()
  return str(d)


def test_cpu_backend_from_jax_platforms_and_device_files(tmp_path, no_accel):
  for platforms, cpu in [("cpu", True), (" cpu ", True), ("cpu,cpu", True), ("tpu", False),
                         ("cuda", False), ("cuda,cpu", False), ("cpu,tpu", False)]:
    # JAX_PLATFORMS decides, whatever device files exist.
    assert hostmem.cpu_backend({"JAX_PLATFORMS": platforms}, no_accel) is cpu, platforms
    assert hostmem.cpu_backend({"JAX_PLATFORMS": platforms}, "/nonexistent") is cpu, platforms
  assert hostmem.cpu_backend({}, no_accel)
  assert hostmem.cpu_backend({"JAX_PLATFORMS": ""}, no_accel)
  for name in ("accel0", "vfio", "nvidia0", "nvidiactl"):
    dev = tmp_path / name / "dev"
    dev.mkdir(parents=True)
    (dev / "null").touch()
    if name == "vfio":
      (dev / name).mkdir()
    else:
      (dev / name).touch()
    assert not hostmem.cpu_backend({}, str(dev)), name
    assert hostmem.cpu_backend(CPU, str(dev)), name


def test_wanted_tunables_are_opt_in_follow_thp_mode_and_leave_user_settings_alone(
    tmp_path, no_accel):
  madvise = _mode(tmp_path, "always [madvise] never\n")

  def wanted(env, thp=madvise, **kw):
    return hostmem.wanted_tunables(env, thp, dev_dir=no_accel, **kw)

  if not GLIBC_LINUX:
    assert wanted({hostmem.ENV: "1", **CPU}) is None
    return
  # Off by default, on with the variable (or an entry point's default), on the CPU backend.
  assert wanted(CPU) is None
  assert wanted({}) is None
  assert wanted({hostmem.ENV: "1", **CPU}) == HEAP + ":" + hostmem.HUGE_PAGES
  assert wanted({hostmem.ENV: "1"}) == HEAP + ":" + hostmem.HUGE_PAGES
  assert wanted(CPU, default=True) == HEAP + ":" + hostmem.HUGE_PAGES
  for off in ("0", "false", "off", "no", ""):
    assert wanted({hostmem.ENV: off, **CPU}, default=True) is None, off
  on = {hostmem.ENV: "1", **CPU}
  assert wanted(on, _mode(tmp_path, "[always] madvise never\n")) == HEAP
  assert wanted(on, _mode(tmp_path, "always madvise [never]\n")) == HEAP
  assert wanted(on, str(tmp_path / "missing")) == HEAP
  # A user's own GLIBC_TUNABLES is kept.
  assert wanted({"GLIBC_TUNABLES": "glibc.malloc.check=0", **on}) is None
  # Never on an accelerator backend, asked for or not.
  for platforms in ("tpu", "cuda", "cpu,cuda"):
    assert wanted({hostmem.ENV: "1", "JAX_PLATFORMS": platforms}) is None, platforms
    assert wanted({"JAX_PLATFORMS": platforms}, default=True) is None, platforms
  gpu = tmp_path / "gpu"
  gpu.mkdir()
  (gpu / "nvidia0").touch()
  assert hostmem.wanted_tunables({hostmem.ENV: "1"}, madvise, dev_dir=str(gpu)) is None
  assert hostmem.wanted_tunables({hostmem.ENV: "1", **CPU}, madvise, dev_dir=str(gpu)) == (
      HEAP + ":" + hostmem.HUGE_PAGES)


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
# faults once per 4 KiB page (16384 times). The child finds this checkout's code through
# PYTHONPATH (set by conftest.py).
_ENTRY = """\
import ctypes, os, resource, sys, threading
from experiments.hostmem import restart_with_tunables
print('start', flush=True)
restart_with_tunables(default={default})
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


@pytest.mark.parametrize("setting,platforms,default,restarts", [
    (None, "cpu", False, False),    # default: off
    ("1", "cpu", False, True),      # opted in, CPU backend
    (None, "cpu", True, True),      # an entry point that defaults to on (the benchmarks)
    ("0", "cpu", True, False),      # ... refused by the user
    ("1", "cuda", False, False),    # opted in, but an accelerator backend
])
def test_restart_is_opt_in_sets_the_tunables_once_and_glibc_keeps_the_heap(
    tmp_path, setting, platforms, default, restarts):
  script = tmp_path / "entry.py"
  script.write_text(_ENTRY.format(default=default))
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", hostmem.ADDED_ENV, hostmem.ENV)}
  env["JAX_PLATFORMS"] = platforms
  if setting is not None:
    env[hostmem.ENV] = setting
  tunables = hostmem.wanted_tunables(env, default=default)
  assert (tunables is not None) == (restarts and GLIBC_LINUX)
  out = subprocess.run([sys.executable, str(script), "a", "--b=1"], env=env, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  assert out[:-1] == ["start"] * (2 if tunables else 1) + [f"{tunables} ['a', '--b=1']"]
  faults = int(out[-1])
  if tunables:
    assert faults < 1000, faults
  elif GLIBC_LINUX:
    assert faults > 8000, faults


@pytest.mark.parametrize("flag", [False, True])
def test_run_restarts_only_with_the_host_malloc_flag(tmp_path, flag):
  # A sitecustomize on PYTHONPATH reports every interpreter start of experiments/run.py
  # (started from another folder) and the GLIBC_TUNABLES it started with.
  (tmp_path / "sitecustomize.py").write_text(
      "import os, sys\n"
      "sys.stderr.write(f\"started {os.environ.get('GLIBC_TUNABLES')}\\n\")\n")
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", hostmem.ADDED_ENV, hostmem.ENV)}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))
  r = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "run.py"), "--config",
                      "demo.py:quick", "--print-config"] + (["--host-malloc"] if flag else []),
                     env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)["stage"] == "demo"
  starts = [l for l in r.stderr.splitlines() if l.startswith("started ")]
  tunables = hostmem.wanted_tunables({**env, hostmem.ENV: "1"}) if flag else None
  assert starts == ["started None"] + ([f"started {tunables}"] if tunables else []), r.stderr
