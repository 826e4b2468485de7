"""Nothing silently wrong: damaged checkpoints and caches, storage faults, shared workdirs.

Training runs in-process (``train(config, workdir)`` on the tiny stage-1 config of
tests/test_reliability.py with the in-memory data source and caches of tests/mp_worker.py,
6 steps, a checkpoint every 3). One base run is copied for each case. JAX's persistent
compilation cache stays off (tests/conftest.py): once set in a process, later stage-2 steps
in the same test worker would load from it, which deadlocks on XLA:CPU's 8-device mesh.
"""
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

import mp_worker
from config_helpers import make_config
from test_reliability import stage1_config

from proclip_jax import storage
from proclip_jax.data import cache as C
from proclip_jax.errors import ProclipError
from proclip_jax.train import checkpoints as ckpt_lib
from proclip_jax.train.loop import train

TOTAL = 6


def config(total=TOTAL, **over):
  c = stage1_config(total)
  c.update({"max_to_keep": 1, **over})
  return make_config(c)


def run(workdir, cfg=None, llm=None):
  cfg = cfg or config()
  llm = llm or mp_worker.Features(cfg.model.adapter.in_dim, 1)
  return train(cfg, workdir, source=mp_worker.Source(64),
               caches={"llm": llm, "clip": mp_worker.Features(cfg.model.adapter.out_dim, 2)})


def steps(workdir):
  return storage.complete_steps(workdir)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A finished 6-step run keeping every checkpoint (3 and 6)."""
  wd = tmp_path_factory.mktemp("integrity") / "base"
  run(wd, config(max_to_keep=0))
  assert steps(wd) == [3, 6]
  return wd


def copy(base, tmp_path, name="wd"):
  dst = tmp_path / name
  shutil.copytree(base, dst)
  return dst


def state_files(step_dir):
  return sorted((f for f in (step_dir / "state").rglob("*") if f.is_file() and "/d/" in str(f)),
                key=lambda f: f.stat().st_size)


# ------------------------------------------------------------------------ checksums

def test_checksum_equals_brute_force_and_device_value(rng):
  for a in (rng.normal(size=(5, 7)).astype(np.float32), rng.integers(-9, 9, (11,), np.int32),
            rng.normal(size=(3, 4)).astype(np.float16), np.array([True, False, True])):
    words = [int(w) for w in storage._words_np(a).reshape(-1)]
    want = sum(w * (2 * i + 1) for i, w in enumerate(words)) % 2 ** 32
    assert storage.numpy_checksums({"a": a}) == {"a": want}
    assert storage.tree_checksums({"a": jax.numpy.asarray(a)}) == {"a": want}
  a = rng.normal(size=(64,)).astype(np.float32)
  b = a.copy()
  b.view(np.uint8)[37] ^= 1                   # one flipped bit
  assert storage.numpy_checksums({"a": a}) != storage.numpy_checksums({"a": b})


def test_flipped_value_in_newest_checkpoint_falls_back_and_keeps_the_good_one(
    base, tmp_path, monkeypatch, caplog):
  """A value that Orbax reads back fine but differs from what was saved: only the checksum
  sees it. The run sets the step aside, resumes from 3, and max_to_keep=1 keeps step 3
  (pinned) beside the new ones."""
  wd = copy(base, tmp_path)
  ck = ckpt_lib.Checkpoints(wd, max_to_keep=None)
  meta = ck.metadata(6)
  ck.close()
  # Rewrite step 6 with one adapter value changed by one ulp, keeping step 6's recorded
  # checksums (what a flipped bit on disk gives).
  from proclip_jax import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from proclip_jax.train.state import abstract_train_state  # pylint: disable=import-outside-toplevel
  cfg = config()
  abstract, _ = abstract_train_state(cfg, mesh_lib.make_mesh(cfg.mesh))
  ck = ckpt_lib.Checkpoints(wd, max_to_keep=None)
  state, _ = ck.restore(abstract, None, 6)
  ck.close()
  leaf = state.params["adapter"]["block_0"]["fn_0"]["bias"]
  flipped = np.asarray(leaf).copy()
  flipped.view(np.uint32)[0] ^= 1
  state.params["adapter"]["block_0"]["fn_0"]["bias"] = jax.device_put(flipped, leaf.sharding)
  shutil.rmtree(wd / "checkpoints" / "6")
  recorded = meta["checksums"]
  monkeypatch.setattr(storage, "tree_checksums", lambda tree: recorded)
  ck = ckpt_lib.Checkpoints(wd, max_to_keep=None)
  ck.save(6, state, None, {k: v for k, v in meta.items() if k != "checksums"})
  ck.close()
  monkeypatch.undo()
  with caplog.at_level("WARNING"):
    res = run(wd)
  assert res["step"] == TOTAL and np.isfinite(res["loss"])
  text = caplog.text
  assert "checksum mismatch" in text and "params/adapter/block_0/fn_0/bias" in text, text
  assert (wd / "corrupt_checkpoints" / "6").is_dir()
  assert steps(wd) == [3, 6]          # 3 (the verified start) is kept despite max_to_keep=1


def test_byte_flipped_on_disk_falls_back(base, tmp_path, caplog):
  wd = copy(base, tmp_path)
  f = state_files(wd / "checkpoints" / "6")[-1]
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x10
  f.write_bytes(bytes(data))
  with caplog.at_level("WARNING"):
    res = run(wd)                     # resumes at 3
  assert res["step"] == TOTAL
  assert "checkpoints/6" in caplog.text and (wd / "corrupt_checkpoints" / "6").is_dir()


def test_damaged_or_empty_newest_is_not_called_another_config(base, tmp_path, caplog):
  wd = copy(base, tmp_path)
  state_dir = wd / "checkpoints" / "6" / "state"
  shutil.rmtree(state_dir)
  state_dir.mkdir()                   # an empty item folder (a copy cut short)
  (wd / "checkpoints" / "9").mkdir()  # an empty step folder
  with caplog.at_level("WARNING"):
    res = run(wd)
  assert res["step"] == TOTAL
  assert "different config" not in caplog.text
  assert (wd / "corrupt_checkpoints" / "6").is_dir() and (wd / "corrupt_checkpoints" / "9").is_dir()
  assert steps(wd) == [3, 6]


def test_all_skipped_steps_stop_the_run(tmp_path):
  class NaNFeatures(mp_worker.Features):
    def lookup(self, ids, fields):
      return np.full((len(ids), self.dim), np.nan, np.float32)

  cfg = config(max_nonfinite_steps=3, ckpt_every=0)
  with pytest.raises(ProclipError, match=r"last 3 steps .* non-finite"):
    run(tmp_path / "wd", cfg, llm=NaNFeatures(cfg.model.adapter.in_dim, 1))
  g = ckpt_lib.NonfiniteGuard(3, 0, 0)
  g.update(2, 2)
  g.update(3, 2)                      # one finite step resets the streak
  g.update(5, 4)
  with pytest.raises(ProclipError):
    g.update(6, 5)


# ------------------------------------------------------------------------ storage faults

def test_storage_refusing_reads_is_retried_then_stops_without_moving_anything(
    base, tmp_path, monkeypatch):
  wd = copy(base, tmp_path)
  calls = []

  def refuse(self, *a, **k):
    calls.append(1)
    raise PermissionError(errno.EACCES, "Permission denied", str(wd))

  monkeypatch.setattr(ckpt_lib, "RESUME_BACKOFF_S", 0.0)
  monkeypatch.setattr(storage.ocp.CheckpointManager, "restore", refuse)
  with pytest.raises(ProclipError, match="Gave up after 4 tries; no checkpoint was moved"):
    run(wd)
  assert len(calls) == ckpt_lib.RESUME_TRIES
  assert steps(wd) == [3, 6] and not (wd / "corrupt_checkpoints").exists()


def test_disk_full_while_saving_then_rerun_recovers(base, tmp_path, monkeypatch):
  wd = tmp_path / "wd"
  real = storage.ocp.CheckpointManager.save

  def full(self, step, *a, **k):
    if step == 6:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, step, *a, **k)

  monkeypatch.setattr(storage.ocp.CheckpointManager, "save", full)
  with pytest.raises(storage.SaveFailed, match=r"Saving checkpoint 6 .*No space left.* "
                     r"checkpoint 3 is intact"):
    run(wd)
  monkeypatch.undo()
  assert steps(wd) == [3]
  res = run(wd)
  assert res["step"] == TOTAL and steps(wd) == [3, 6]


def test_workdir_that_is_a_file_or_unwritable(tmp_path, monkeypatch):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(ProclipError, match="is a file, not a folder"):
    run(f)
  with pytest.raises(ProclipError, match="cannot be written"):
    run(f / "sub")
  ro = tmp_path / "ro"
  ro.mkdir()

  def refuse(self, *a, **k):
    raise PermissionError(errno.EROFS, "Read-only file system")

  monkeypatch.setattr(type(storage.epath.Path(ro)), "write_text", refuse)
  with pytest.raises(ProclipError, match="cannot be written .*Read-only"):
    run(ro)


def test_second_run_on_a_workdir_is_refused_and_stale_lock_taken_over(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  lock = wd / ckpt_lib.LOCK_FILE
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "time": "t"}))
    with pytest.raises(ProclipError, match=rf"in use by another run \(process {holder.pid}"):
      run(wd)
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone now: its lock is stale and taken over.
  res = run(wd)
  assert res["step"] == TOTAL and not lock.exists()   # released at the end


# ------------------------------------------------------------------------ stage 2 embedder

def _fake_cache(path, fingerprint):
  path.mkdir()
  (path / "manifest.json").write_text(json.dumps({
      "format": C.FORMAT, "version": C.VERSION, "kind": "llm", "dim": 24,
      "preset_name": "minilm", "model": {"fingerprint": fingerprint}}))
  return str(path)


def test_stage2_refuses_llm_cache_of_another_embedder(tmp_path):
  ours = _fake_cache(tmp_path / "c2", "b" * 64)
  cfg = make_config({"stage": 2, "cache": {"llm": ours}})
  meta = {"caches": {"llm": {"model_fingerprint": "a" * 64, "path": "/s1/cache"}}}
  with pytest.raises(ProclipError, match=r"bbbbbbbbbbbb\.\.\..*aaaaaaaaaaaa\.\.\. \(/s1/cache\)"):
    ckpt_lib.check_stage1_embedder(meta, cfg, "/s1")
  meta["caches"]["llm"]["model_fingerprint"] = "b" * 64
  ckpt_lib.check_stage1_embedder(meta, cfg, "/s1")   # the same embedder: accepted
  assert ckpt_lib.cache_identity(cfg)["llm"]["model_fingerprint"] == "b" * 64


# ------------------------------------------------------------------------ inference side

def test_load_workdir_falls_back_and_refuses_nan(base, tmp_path):
  from proclip_jax.inference import ProCLIP, similarity  # pylint: disable=import-outside-toplevel
  wd = copy(base, tmp_path)
  f = state_files(wd / "checkpoints" / "6")[-1]
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.warns(UserWarning, match=r"checkpoints/6.*Using step 3 instead"):
    model = ProCLIP.load(str(wd))
  assert model.meta["step"] == 3
  assert (wd / "checkpoints" / "6").is_dir()       # the reader changes nothing
  emb = model.encode_text_features(np.ones((2, 24), np.float32))
  assert np.isfinite(emb).all()
  with pytest.raises(ProclipError, match="non-finite"):
    similarity(emb, np.full((1, emb.shape[1]), np.nan, np.float32))
  params = jax.tree.map(np.array, model.params)
  params["adapter"]["block_0"]["fn_0"]["bias"][0] = np.nan
  with pytest.raises(ProclipError, match=r"adapter/block_0/fn_0/bias hold NaN"):
    ProCLIP(model.config, params)
  shutil.rmtree(wd / "checkpoints" / "3")
  with pytest.raises(ProclipError, match="No readable checkpoint left"):
    ProCLIP.load(str(wd))


def test_evaluate_refuses_to_print_nan_scores(monkeypatch, capsys):
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
  import evaluate  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(evaluate.evaluators, "prepare", lambda spec, config: None)
  monkeypatch.setattr(evaluate, "load_any", lambda *a, **k: object())
  monkeypatch.setattr(evaluate.evaluators, "evaluate",
                      lambda *a, **k: {"image_retrieval_recall@1": float("nan")})
  rc = evaluate.main(["--checkpoint", "x", "--eval", "flickr30k", "--data-root", "/nowhere"])
  out = capsys.readouterr()
  assert rc == 2 and "nan" not in out.out
  assert "non-finite results (image_retrieval_recall@1)" in out.err


# ------------------------------------------------------------------------ caches

def _write_cache(path, n=40, dim=8, dtype="float16"):
  rng = np.random.default_rng(0)
  path.mkdir()
  ids = np.arange(100, 100 + n, dtype=np.int64)
  C.atomic_save_npy(str(path / C.IDS_FILE), ids)
  C.atomic_save_npy(str(path / "short.npy"), C.encode_rows(rng.normal(size=(n, dim)), dtype))
  sums = C.write_row_checksums(str(path), ["short"], dtype, chunk_rows=16)
  import hashlib  # pylint: disable=import-outside-toplevel
  C.atomic_write_json(str(path / C.MANIFEST), {
      "format": C.FORMAT, "version": C.VERSION, "kind": "llm", "dim": dim, "dtype": dtype,
      "fields": ["short"], "count": n, "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
      "files": {"ids": C.IDS_FILE, "short": "short.npy"}, "row_checksums": sums})
  return ids


def test_cache_row_checksums_catch_a_flipped_value(tmp_path):
  d = tmp_path / "cache"
  ids = _write_cache(d)
  r = C.CacheReader(str(d))
  good = r.lookup(ids, "short")
  sums = np.load(d / "short.rowsum.npy")
  # The row checksum, brute force: sum of the float16 bit patterns times 2j+1, plus the id.
  row = np.load(d / "short.npy")[5].view(np.uint16)
  want = (sum(int(w) * (2 * j + 1) for j, w in enumerate(row)) + int(ids[5]) * 0x9E3779B1)
  assert int(sums[5]) == want % 2 ** 32
  a = np.load(d / "short.npy", mmap_mode="r+")
  a.view(np.uint16)[5, 3] ^= 1                  # one bit of one value, still a finite number
  a.flush()
  del a, r
  r = C.CacheReader(str(d))
  with pytest.raises(ProclipError, match=r"differ from their checksums \(ids \[105\]\)"):
    r.lookup(ids[:8], "short")
  np.testing.assert_array_equal(r.lookup(ids[6:], "short"), good[6:])   # others still read
  assert np.isfinite(C.CacheReader(str(d), verify=False).lookup(ids[:8], "short")).all()
  i = np.load(d / C.IDS_FILE, mmap_mode="r+")
  i[[0, 1]] = i[[1, 0]]
  i.flush()
  del i
  with pytest.raises(ProclipError, match="does not match the manifest's ids_sha256"):
    C.CacheReader(str(d))


def test_reordered_dataset_gets_another_fingerprint(tmp_path):
  from proclip_jax.data import builder, demo_world  # pylint: disable=import-outside-toplevel
  w = demo_world.generate_demo_world(tmp_path / "w", n_train=6, n_test=2, image_size=24)
  rows = open(w.manifest).read().splitlines()   # pylint: disable=unspecified-encoding
  train = [r for r in rows if '"train"' in r] if any('"split"' in r for r in rows) else rows
  rest = [r for r in rows if r not in train]
  swapped = tmp_path / "w" / "source" / "swapped.jsonl"     # beside it: relative image paths
  swapped.write_text("\n".join(rest + train[::-1]) + "\n")
  builder.build_dataset(str(swapped), str(tmp_path / "ds2"), progress=False)
  builder.build_dataset(w.manifest, str(tmp_path / "ds1"), progress=False)
  a = C.dataset_fingerprint(str(tmp_path / "ds1"), "train")
  assert a == C.dataset_fingerprint(str(tmp_path / "ds1"), "train")
  assert a != C.dataset_fingerprint(str(tmp_path / "ds2"), "train")
