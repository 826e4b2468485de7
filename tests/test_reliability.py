"""Faults: kill -9 / SIGTERM / half-written checkpoints in training, killed tools rerun.

Training runs are real subprocesses (``tests/mp_worker.py train``: ``train(config, workdir)``
on a tiny stage-1 config with an in-memory data source and caches that are pure functions
of the example id, 4 CPU devices, a checkpoint every 3 steps). Every interrupted run is
run again with the same command and must end with parameters (and optimizer-free state)
bitwise equal to an uninterrupted run of the same length, and the same metrics at every
step. The tools (``tools/precompute.py``, ``tools/build_dataset.py``) are killed with a
real SIGKILL at a known point (``mp_worker.py killat``) and rerun: the result is
byte-identical to an uninterrupted run's.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "mp_worker.py")
TOTAL, CKPT_EVERY = 12, 3
TIMEOUT = 240
TIMING_KEYS = {"steps_per_s", "examples_per_s", "images_per_s", "first_step_s"}


def stage1_config(total=TOTAL):
  return {
      "stage": 1, "seed": 0, "total_steps": total, "log_every": 1, "ckpt_every": CKPT_EVERY,
      "max_to_keep": 10, "progress": False, "distill_chunk": 8,
      "model": {"vision": None, "adapter": {"in_dim": 24, "out_dim": 16, "expansion": 2,
                                            "n_blocks": 1}},
      "mesh": {"data": -1},
      "data": {"batch_size": 16, "seed": 0, "shuffle": True, "read_threads": 1,
               "prefetch_batches": 1},
      "optim": {"lr": 1e-2, "weight_decay": 0.05, "warmup_steps": 2},
      "stage1": {"fields": ["short", "raw"]},
  }


# ------------------------------------------------------------------------ subprocess helpers

def subprocess_env(cache_dir):
  env = dict(os.environ)
  env.update({"HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
              "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
              # A shared compilation cache: each rerun skips the compile (same executable).
              "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
  # Of XLA_FLAGS only the suite's compile setting (tests/conftest.py) is passed on.
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "backend_optimization_level" in f)
  return env


class Proc:
  """A subprocess with its output in a file, killed (and the test failed) on timeout."""

  def __init__(self, args, log_path, env):
    self.log_path = str(log_path)
    self._log = open(self.log_path, "w")
    self.p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=self._log,
                              stderr=subprocess.STDOUT, start_new_session=True)

  def output(self) -> str:
    if not self._log.closed:
      self._log.flush()
    with open(self.log_path) as f:
      return f.read()

  def wait(self, timeout=TIMEOUT) -> int:
    try:
      rc = self.p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.p.kill()
      self.p.wait()
      self._log.close()
      pytest.fail(f"{self.p.args} ran past {timeout}s and was killed; output:\n"
                  + self.output()[-4000:])
    self._log.close()
    return rc

  def signal(self, sig):
    self.p.send_signal(sig)


def run_ok(args, log_path, env, timeout=TIMEOUT):
  p = Proc(args, log_path, env)
  rc = p.wait(timeout)
  assert rc == 0, f"{args} exited {rc}:\n{p.output()[-4000:]}"
  return p.output()


class Run:
  """One training workdir driven through mp_worker.py."""

  def __init__(self, base, name, env, config=None):
    self.dir = base / name
    self.dir.mkdir(parents=True, exist_ok=True)
    self.workdir = self.dir / "workdir"
    self.out = self.dir / "out"
    self.env = env
    self.spec = self.dir / "spec.json"
    self.spec.write_text(json.dumps({"n_examples": 64, "jobs": [
        {"name": "job", "workdir": str(self.workdir), "config": config or stage1_config()}]}))
    self.n = 0

  def args(self, delay=0.0):
    return [WORKER, "train", "--spec", str(self.spec), "--out", str(self.out), "--devices",
            "4", "--delay", str(delay)]

  def start(self, delay=0.0) -> Proc:
    self.n += 1
    return Proc(self.args(delay), self.dir / f"log{self.n}.txt", self.env)

  def run(self, delay=0.0) -> str:
    self.n += 1
    return run_ok(self.args(delay), self.dir / f"log{self.n}.txt", self.env)

  def steps_logged(self) -> int:
    path = self.workdir / "metrics.jsonl"
    if not path.exists():
      return 0
    best = 0
    for line in path.read_text().splitlines():
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line being written
      if "loss" in row:
        best = max(best, row["step"])
    return best

  def wait_for_step(self, proc, step, timeout=TIMEOUT):
    t0 = time.monotonic()
    while self.steps_logged() < step:
      if proc.p.poll() is not None:
        pytest.fail(f"The run ended (rc {proc.p.returncode}) before step {step}:\n"
                    + proc.output()[-4000:])
      if time.monotonic() - t0 > timeout:
        proc.p.kill()
        pytest.fail(f"No step {step} after {timeout}s:\n{proc.output()[-4000:]}")
      time.sleep(0.02)

  def checkpoints(self):
    d = self.workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []

  def metrics(self) -> dict:
    """{step: row} of the loss rows, asserting that rows repeated by a resume agree."""
    out = {}
    for line in (self.workdir / "metrics.jsonl").read_text().splitlines():
      row = json.loads(line)
      if "loss" not in row:
        continue
      row = {k: v for k, v in row.items() if k not in TIMING_KEYS}
      if row["step"] in out:
        assert out[row["step"]] == row, f"step {row['step']} logged twice with other values"
      out[row["step"]] = row
    return out

  def state(self) -> dict:
    with np.load(self.out / "job.npz") as z:
      return {k: z[k] for k in z.files}

  def result(self) -> dict:
    return json.loads((self.out / "job.p0.json").read_text())


def assert_same_run(run, ref):
  """Bitwise-equal final state and the same metrics at every step."""
  a, b = run.state(), ref.state()
  assert a.keys() == b.keys()
  assert int(a["step"]) == int(b["step"]) == TOTAL
  for k in b:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert np.array_equal(a[k], b[k]), f"{k} differs (max {np.max(np.abs(a[k] - b[k]))})"
  ma, mb = run.metrics(), ref.metrics()
  assert sorted(ma) == list(range(1, TOTAL + 1)) == sorted(mb)
  for s in mb:
    assert ma[s] == mb[s], f"metrics of step {s} differ: {ma[s]} vs {mb[s]}"


# ------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def base(tmp_path_factory):
  return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def env(base):
  return subprocess_env(base / "jax_cache")


@pytest.fixture(scope="module")
def reference(base, env):
  """An uninterrupted run of TOTAL steps."""
  r = Run(base, "reference", env)
  r.run()
  assert r.checkpoints() == list(range(CKPT_EVERY, TOTAL + 1, CKPT_EVERY))
  return r


@pytest.fixture(scope="module")
def preempted(base, env):
  """A run stopped by SIGTERM once step 5 was logged (workdir kept as it stopped)."""
  r = Run(base, "sigterm", env)
  p = r.start(delay=0.15)
  r.wait_for_step(p, 5)
  seen = r.steps_logged()
  p.signal(signal.SIGTERM)
  rc = p.wait()
  return r, rc, seen, p.output()


# ------------------------------------------------------------------------ training faults

def test_kill9_at_random_step_then_rerun_is_bitwise_identical(base, env, reference):
  kill_at = random.SystemRandom().randint(2, TOTAL - 2)
  print("kill -9 after step", kill_at)
  r = Run(base, "kill9", env)
  p = r.start(delay=0.15)
  r.wait_for_step(p, kill_at)
  os.killpg(p.p.pid, signal.SIGKILL)
  assert p.wait() == -signal.SIGKILL
  done = r.steps_logged()
  assert done < TOTAL, "the run finished before the kill; the test did not test anything"
  assert not r.checkpoints() or max(r.checkpoints()) <= done
  out = r.run(delay=0.15)  # the same command again
  if done >= CKPT_EVERY:  # resumed from the last checkpoint (or the one before, when the
    # kill cut the newest save short)
    last = done - done % CKPT_EVERY
    assert any(f"at step {s}" in out for s in (last, last - CKPT_EVERY)), out[-3000:]
  assert_same_run(r, reference)


def test_sigterm_saves_at_next_step_boundary_and_exits_0(preempted):
  r, rc, seen, out = preempted
  assert rc == 0, out[-3000:]
  res = r.result()["result"]
  assert res["preempted"] is True
  stopped = res["step"]
  assert seen <= stopped <= seen + 2, (seen, stopped)
  assert stopped < TOTAL
  assert max(r.checkpoints()) == stopped
  assert r.steps_logged() == stopped
  assert "SIGTERM: saved a checkpoint at step" in out


def test_half_written_newest_checkpoint_is_ignored(base, env, preempted, reference):
  """An Orbax tmp folder (a save cut short) as the newest step: warned about and skipped."""
  src, _, _, _ = preempted
  r = Run(base, "halfwritten", env)
  shutil.copytree(src.workdir, r.workdir)
  newest = max(r.checkpoints())
  previous = max(s for s in r.checkpoints() if s < newest)
  ck = r.workdir / "checkpoints"
  tmp = ck / f"{newest}.orbax-checkpoint-tmp"
  os.rename(ck / str(newest), tmp)
  (tmp / "commit_success.txt").unlink()
  for f in sorted((tmp / "state").rglob("*")):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  out = r.run()
  assert "half-written checkpoint" in out and tmp.name in out, out[-3000:]
  assert f"at step {previous}" in out, out[-3000:]
  assert_same_run(r, reference)


def test_truncated_file_in_newest_checkpoint_falls_back_to_previous(base, env, preempted,
                                                                      reference):
  """A committed step folder whose array file was cut (disk fault): warned, previous used."""
  src, _, _, _ = preempted
  r = Run(base, "truncated", env)
  shutil.copytree(src.workdir, r.workdir)
  newest = max(r.checkpoints())
  previous = max(s for s in r.checkpoints() if s < newest)
  files = [f for f in (r.workdir / "checkpoints" / str(newest) / "state").rglob("*")
           if f.is_file() and "/d/" in str(f)]
  biggest = max(files, key=lambda f: f.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 3])
  p = r.start()
  rc = p.wait()
  out = p.output()
  assert "Traceback" not in out, out[-3000:]
  assert rc == 0, f"exit {rc}: a damaged newest checkpoint must not stop the run:\n{out[-3000:]}"
  assert str(newest) in out and f"at step {previous}" in out, out[-3000:]
  assert_same_run(r, reference)


# ------------------------------------------------------------------------ tools killed

@pytest.fixture(scope="module")
def world(base):
  from proclip_jax.data import demo_world  # pylint: disable=import-outside-toplevel
  return demo_world.generate_demo_world(base / "world", n_train=40, n_test=4, image_size=24,
                                        progress=False)


@pytest.fixture(scope="module")
def text_clip(base):
  from proclip_jax.storage import save_model  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.clip import CLIPConfig, init_clip  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.clip_text import TextConfig  # pylint: disable=import-outside-toplevel
  config = CLIPConfig(vision=None, text=TextConfig(context_length=24, width=16, layers=1,
                                                   heads=2, embed_dim=8))
  return save_model(str(base / "text_clip"), "clip", config.to_dict(), init_clip(config, 1))


def _tree_bytes(path) -> dict:
  out = {}
  for dirpath, _, files in os.walk(path):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = fh.read()
  return out


def test_precompute_killed_and_rerun_is_byte_identical(base, env, world, text_clip):
  tool = os.path.join(ROOT, "tools", "precompute.py")

  def cmd(out):
    return [tool, "--data", world.data_dir, "--model", text_clip, "--fields", "short,long",
            "--out", str(out), "--dtype", "float32", "--batch-size", "4", "--unit-size", "8",
            "--no-progress"]

  ref = base / "cache_ref"
  run_ok(cmd(ref), base / "pc_ref.txt", env)
  out = base / "cache_killed"
  # 40 ids, units of 8: the 7th part file is unit 3's "short" part; it is cut off half-way
  # by the kill, after units 0-2 completed.
  p = Proc([WORKER, "killat", "--target", "proclip_jax.data.cache:atomic_save_npy",
            "--after", "7", "--partial", "--", *cmd(out)], base / "pc_kill.txt", env)
  assert p.wait() == -signal.SIGKILL, p.output()[-3000:]
  parts = os.listdir(out / "parts")
  assert not (out / "manifest.json").exists()
  assert sum(n.startswith("unit-") for n in parts) == 3, parts
  assert any(".tmp-" in n for n in parts), parts  # the write cut short
  run_ok(cmd(out), base / "pc_rerun.txt", env)
  a, b = _tree_bytes(out), _tree_bytes(ref)
  assert sorted(a) == sorted(b), (sorted(a), sorted(b))
  ma, mb = json.loads(a.pop("manifest.json")), json.loads(b.pop("manifest.json"))
  assert ma == mb
  for k in b:
    assert a[k] == b[k], k


def test_build_dataset_killed_and_rerun_is_byte_identical(base, env, world):
  from proclip_jax.data import builder  # pylint: disable=import-outside-toplevel
  ref = base / "ds_ref"
  builder.build_dataset(world.manifest, ref, progress=False)
  tool = os.path.join(ROOT, "tools", "build_dataset.py")
  out = base / "ds_killed"
  cmd = [tool, world.manifest, str(out), "--no-progress"]
  p = Proc([WORKER, "killat", "--target", "proclip_jax.data.builder:_process", "--after",
            "20", "--", *cmd], base / "ds_kill.txt", env)
  assert p.wait() == -signal.SIGKILL, p.output()[-3000:]
  assert not out.exists()  # nothing that looks complete
  run_ok(cmd, base / "ds_rerun.txt", env)
  assert not [n for n in os.listdir(base) if n.startswith(".ds_killed")]  # leftovers cleaned
  a, b = _tree_bytes(out), _tree_bytes(ref)
  assert sorted(a) == sorted(b)
  for k in b:
    if k.endswith(".json"):
      assert json.loads(a[k]) == json.loads(b[k]), k
  # ArrayRecord files differ byte-wise between any two processes that write the same records
  # (two uninterrupted CLI runs differ too), so the records are compared decoded: every
  # split, every example, every field, in order.
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  ba, bb = tfds.builder_from_directory(str(out)), tfds.builder_from_directory(str(ref))
  assert sorted(ba.info.splits) == sorted(bb.info.splits)
  for split in bb.info.splits:
    sa, sb = ba.as_data_source(split), bb.as_data_source(split)
    assert len(sa) == len(sb) > 0
    for i in range(len(sb)):
      ea, eb = sa[i], sb[i]
      assert sorted(ea) == sorted(eb)
      for f in eb:
        assert np.array_equal(np.asarray(ea[f]), np.asarray(eb[f])), (split, i, f)
