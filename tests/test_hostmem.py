"""proclip_jax/hostmem.py: when the entry points restart with glibc's huge-page tunable."""
import os
import platform
import subprocess
import sys

import pytest

from proclip_jax import hostmem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def _mode(tmp_path, text):
  p = tmp_path / "enabled"
  p.write_text(text)
  return str(p)


def test_restart_only_in_madvise_mode_and_without_user_tunables(tmp_path):
  madvise = _mode(tmp_path, "always [madvise] never\n")
  assert hostmem.wants_huge_page_restart({}, madvise) is GLIBC_LINUX
  assert not hostmem.wants_huge_page_restart({}, _mode(tmp_path, "[always] madvise never\n"))
  assert not hostmem.wants_huge_page_restart({}, _mode(tmp_path, "always madvise [never]\n"))
  assert not hostmem.wants_huge_page_restart({}, str(tmp_path / "missing"))
  assert not hostmem.wants_huge_page_restart({"GLIBC_TUNABLES": "glibc.malloc.check=0"},
                                             madvise)
  assert not hostmem.wants_huge_page_restart({"PROCLIP_HUGEPAGES": "0"}, madvise)


@pytest.mark.parametrize("opt_out", [False, True])
def test_restart_sets_the_tunable_once_and_keeps_the_command_line(tmp_path, opt_out):
  script = tmp_path / "entry.py"
  script.write_text(
      "import os, sys\n"
      f"sys.path.insert(0, {REPO!r})\n"
      "from proclip_jax.hostmem import restart_with_huge_pages\n"
      "print('start', flush=True)\n"
      "restart_with_huge_pages()\n"
      "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if opt_out:
    env["PROCLIP_HUGEPAGES"] = "0"
  expect_restart = not opt_out and hostmem.wants_huge_page_restart(env)
  out = subprocess.run([sys.executable, str(script), "a", "--b=1"], env=env, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  tunable = hostmem.TUNABLE if expect_restart else None
  assert out == ["start"] * (2 if expect_restart else 1) + [f"{tunable} ['a', '--b=1']"]
