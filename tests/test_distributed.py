"""When ``jax.distributed`` starts ('auto' on TPU VMs too) and how often SIGTERM is agreed.

The TPU VM is faked: device files ``accel0..`` / ``vfio/0..`` in a temporary folder stand
for ``/dev``, the environment is a dict, and ``jax.distributed.initialize`` is replaced by
a recorder (nothing touches the network). The preemption check counts the cross-process
all-gathers a multi-process run would make.
"""
import os
import signal

import jax
import pytest

from experiments.configs import common
from proclip_jax.errors import ProclipError
from proclip_jax.train import distributed


def _config(mode="auto"):
  c = common.base_config(1)
  c.distributed = mode
  return c


def _dev(tmp_path, *names):
  root = tmp_path / "dev"
  for name in names:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("")
  root.mkdir(exist_ok=True)
  return str(root)


def test_environment_detection(tmp_path):
  wants = distributed.wants_distributed
  bare = _dev(tmp_path)
  auto = _config()
  assert auto.distributed == "auto"
  assert not wants(auto, {}, bare)
  assert wants(_config("on"), {}, bare)
  assert wants(auto, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, bare)
  assert wants(auto, {"TPU_WORKER_HOSTNAMES": "a,b,c,d"}, bare)
  assert wants(auto, {"TPU_PROCESS_ADDRESSES": "a:8476,b:8476"}, bare)
  assert not wants(auto, {"TPU_WORKER_HOSTNAMES": "localhost"}, bare)
  assert wants(auto, {"SLURM_NTASKS": "4"}, bare)
  assert not wants(auto, {"SLURM_NTASKS": "1"}, bare)
  assert not wants(_config("off"), {"SLURM_NTASKS": "4"}, bare)
  with pytest.raises(ProclipError, match="config.distributed"):
    wants(_config("maybe"), {}, bare)


@pytest.mark.parametrize("devices", [("accel0", "accel1", "accel2", "accel3"),
                                     ("vfio/0", "vfio/1", "vfio/vfio")])
def test_tpu_vm_detected_from_device_files(tmp_path, devices):
  root = _dev(tmp_path, *devices)
  assert distributed.tpu_chips(root) == len([d for d in devices if d[-1].isdigit()])
  auto = _config()
  # A GCE TPU VM lists its slice's workers only in the metadata server: JAX finds them.
  assert distributed.wants_distributed(auto, {}, root)
  # A single-host VM that says so in its environment runs without jax.distributed.
  assert not distributed.wants_distributed(auto, {"TPU_WORKER_HOSTNAMES": "localhost"}, root)
  assert distributed.wants_distributed(auto, {"TPU_WORKER_HOSTNAMES": "h0,h1"}, root)
  assert not distributed.wants_distributed(_config("off"), {}, root)
  # /dev/vfio/vfio (the container device every VFIO host has) is not a chip.
  assert distributed.tpu_chips(_dev(tmp_path / "x", "vfio/vfio")) == 0


def test_initialize_without_arguments_on_a_tpu_vm(tmp_path, monkeypatch):
  root = _dev(tmp_path, "accel0")
  calls = []
  monkeypatch.setattr(distributed, "_INITIALIZED", False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  for key in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    monkeypatch.delenv(key, raising=False)
  real = distributed.tpu_chips
  monkeypatch.setattr(distributed, "tpu_chips", lambda dev_root="/dev": real(root))
  assert distributed.initialize_distributed(_config())
  assert calls == [((), {})]
  assert distributed.initialize_distributed(_config())   # once only
  assert calls == [((), {})]
  monkeypatch.setattr(distributed, "_INITIALIZED", False)
  monkeypatch.setattr(distributed, "tpu_chips", lambda dev_root="/dev": 0)
  assert not distributed.initialize_distributed(_config())
  assert len(calls) == 1


def test_preemption_agreed_every_n_steps_across_processes(monkeypatch):
  gathers = []

  def fake_any(flag):
    gathers.append(flag)
    return flag

  monkeypatch.setattr(distributed, "any_process", fake_any)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with distributed.Preemption(check_every=4) as p:
    stops = [p.should_stop(step) for step in range(1, 6)]
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.requested
    stops += [p.should_stop(step) for step in range(6, 10)]
  assert stops == [False] * 7 + [True, False]    # agreed at step 8, the next multiple of 4
  assert gathers == [False, True]                 # one all-gather per 4 steps, not per step
  with pytest.raises(ProclipError, match="preemption_check_every"):
    distributed.Preemption(check_every=0)


def test_preemption_single_process_stops_at_the_next_step(monkeypatch):
  monkeypatch.setattr(distributed, "any_process",
                      lambda flag: pytest.fail("one process needs no all-gather"))
  with distributed.Preemption(check_every=10) as p:
    assert not p.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.should_stop(2)
  assert common.base_config(2).preemption_check_every == 10
