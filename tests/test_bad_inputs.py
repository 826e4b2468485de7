"""Bad input end to end: configs, caches and checkpoints give one ProclipError (or CLI exit 2
with a one-line message) that names the thing and the fix; never a library traceback, never
a NaN passed on silently.

Cases already covered elsewhere are listed in docs/reliability.md (images and captions at
ingestion: tests/test_data.py; cache/model/dataset mismatches: tests/test_cache.py;
converter inputs: tests/test_convert_clip.py, tests/test_llm.py, tests/test_adapter.py).
"""
import gc
import importlib.util
import os
import sys
import time

import numpy as np
import pytest

from proclip_jax.errors import ProclipError

from tests import mp_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_run():
  spec = importlib.util.spec_from_file_location("proclip_run_cli",
                                                os.path.join(ROOT, "experiments", "run.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _cli_error(capsys, main, argv, *needles):
  rc = main(argv)
  err = capsys.readouterr().err
  assert rc == 2, err
  assert "Traceback" not in err and err.startswith("error: "), err
  for n in needles:
    assert n in err, (n, err)
  return err


# ------------------------------------------------------------------------ configs

def test_config_mistakes_through_run_py(capsys, tmp_path):
  run = _load_run()
  wd = str(tmp_path / "wd")
  _cli_error(capsys, run.main, ["--config", "stage1.py:nope=1", "--workdir", wd],
             "Unknown config arg 'nope'", "size=")
  _cli_error(capsys, run.main, ["--config", "stage1.py", "--workdir", wd,
                                "--config.optim.nope=1"], "--config.optim.nope", "lr")
  _cli_error(capsys, run.main, ["--config", "stage1.py", "--workdir", wd,
                                "--config.total_steps=abc"], "total_steps", "'abc'")
  _cli_error(capsys, run.main, ["--config", "stage1.py", "--workdir", wd,
                                "--config.data.shuffle=maybe"], "data.shuffle")
  _cli_error(capsys, run.main, ["--config", "nope.py", "--workdir", wd], "nope.py",
             "stage1.py")
  missing = str(tmp_path / "no_root")
  err = _cli_error(capsys, run.main, ["--config", f"stage1.py:root={missing}", "--workdir",
                                      wd], missing, "build_dataset.py")
  assert err.count("\n") == 1, err  # one line


def _stage1(**over):
  c = {"stage": 1, "seed": 0, "total_steps": 1, "log_every": 1, "ckpt_every": 1,
       "progress": False, "distill_chunk": 8, "mesh": {"data": -1},
       "model": {"vision": None, "adapter": {"in_dim": 24, "out_dim": 16, "expansion": 2,
                                             "n_blocks": 1}},
       "data": {"batch_size": 16, "seed": 0, "read_threads": 1, "prefetch_batches": 1},
       "optim": {"lr": 1e-2}, "stage1": {"fields": ["short", "raw"]}}
  for k, v in over.items():
    node = c
    *head, last = k.split(".")
    for h in head:
      node = node[h]
    node[last] = v
  return c


def _train(config, workdir):
  from proclip_jax.train.loop import train  # pylint: disable=import-outside-toplevel
  from config_helpers import make_config  # pylint: disable=import-outside-toplevel
  config = make_config(config)
  ad = config["model"]["adapter"]
  return train(config, workdir, source=mp_worker.Source(64),
               caches={"llm": mp_worker.Features(ad["in_dim"], 1),
                       "clip": mp_worker.Features(ad["out_dim"], 2)})


def test_batch_not_divisible_by_devices(tmp_path):
  with pytest.raises(ProclipError,
                     match=r"batch_size=12 must be a positive multiple.*batch shards \(8\)"):
    _train(_stage1(**{"data.batch_size": 12}), tmp_path / "wd")
  with pytest.raises(ProclipError, match="config.mesh"):
    _train(_stage1(mesh={"data": 3}), tmp_path / "wd2")


# ------------------------------------------------------------------------ checkpoints

@pytest.fixture(scope="module")
def stage1_workdir(tmp_path_factory):
  wd = tmp_path_factory.mktemp("ck") / "stage1"
  _train(_stage1(), wd)
  return wd


def test_resume_with_another_architecture(stage1_workdir, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  wd = tmp_path / "copy"
  shutil.copytree(stage1_workdir, wd)
  cfg = _stage1(**{"model.adapter.expansion": 4, "total_steps": 2})
  with pytest.raises(ProclipError, match=r"model\.adapter\.expansion: 2 -> 4"):
    _train(cfg, wd)   # the config diff (train/run_config.py) says it first
  # Told to go on anyway, the checkpoint itself does not fit the new architecture.
  cfg = _stage1(**{"model.adapter.expansion": 4, "total_steps": 2, "allow_config_change": True})
  with pytest.raises(ProclipError, match=r"(?s)Cannot restore checkpoint .*different config"):
    _train(cfg, wd)
  # The reads still in flight when the restore failed report it again later, from
  # TensorStore's threads (unraisable "Encountered error while reading array index ..."
  # naming the folder); those late echoes are dropped, the error above said it once.
  from proclip_jax import storage  # pylint: disable=import-outside-toplevel
  step_dir = wd / "checkpoints" / "1"
  late = (f"Exception ignored in: <coroutine object _read_array_index_and_device_put>: "
          f"'path': '{step_dir / 'state'}/'")
  assert storage.echo_of_failed_read(str(step_dir), Exception("Encountered error"), late)
  assert not storage.echo_of_failed_read(str(step_dir), Exception("Encountered error"),
                                         "elsewhere")
  # Its read coroutines that never started warn when garbage-collected; during a restore
  # that is dropped too, and nothing else is. The filters are scoped to the restore: the
  # process's unraisable hook and asyncio log filters are as before once it ends.
  import logging  # pylint: disable=import-outside-toplevel
  import warnings  # pylint: disable=import-outside-toplevel
  hook, filters = sys.unraisablehook, list(logging.getLogger("asyncio").filters)
  with warnings.catch_warnings(record=True) as seen:
    warnings.resetwarnings()
    warnings.simplefilter("always")
    with storage.quiet_failed_restore(step_dir):
      assert sys.unraisablehook is not hook
      warnings.warn("coroutine '_read_array_index_and_device_put' was never awaited",
                    RuntimeWarning)
      warnings.warn("coroutine 'Store._get_array_metadatas' was never awaited", RuntimeWarning)
      warnings.warn("coroutine 'something_else' was never awaited", RuntimeWarning)
  assert sys.unraisablehook is hook and logging.getLogger("asyncio").filters == filters
  assert [str(w.message) for w in seen] == ["coroutine 'something_else' was never awaited"]


def test_stage2_starting_points_missing_or_mismatched(stage1_workdir, tmp_path):
  from proclip_jax.models.adapter import AdapterConfig  # pylint: disable=import-outside-toplevel
  from proclip_jax.train import checkpoints as ck  # pylint: disable=import-outside-toplevel
  with pytest.raises(ProclipError, match="does not exist.*Train stage 1 first"):
    ck.load_stage1_adapter(tmp_path / "nowhere")
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(ProclipError, match="has no checkpoint"):
    ck.load_stage1_adapter(tmp_path / "empty")
  with pytest.raises(ProclipError, match="in_dim is 24 there but 32 here"):
    ck.load_stage1_adapter(stage1_workdir, AdapterConfig(in_dim=32, out_dim=16, expansion=2))
  with pytest.raises(ProclipError, match="config.init.clip=.*does not exist.*convert.py"):
    ck.load_clip_tower(str(tmp_path / "no_clip"))


@pytest.fixture(scope="module")
def vision_clip(tmp_path_factory):
  from proclip_jax.storage import save_model  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.clip import CLIPConfig, init_clip  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.vit import VisionConfig  # pylint: disable=import-outside-toplevel
  cfg = CLIPConfig(vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=1,
                                       heads=2, embed_dim=8), text=None)
  out = tmp_path_factory.mktemp("clip") / "clip"
  return save_model(str(out), "clip", cfg.to_dict(), init_clip(cfg, seed=0)), cfg


def test_clip_tower_of_another_architecture(vision_clip):
  import dataclasses  # pylint: disable=import-outside-toplevel
  from proclip_jax.train import checkpoints as ck  # pylint: disable=import-outside-toplevel
  path, cfg = vision_clip
  other = dataclasses.replace(cfg.vision, width=32)
  with pytest.raises(ProclipError, match="does not match config.model.vision.*width: 16 there"):
    ck.load_clip_tower(path, other)


def test_corrupt_converted_checkpoint_is_a_clear_error(vision_clip, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  from proclip_jax.train import checkpoints as ck  # pylint: disable=import-outside-toplevel
  path, cfg = vision_clip
  bad = tmp_path / "bad_clip"
  shutil.copytree(path, bad)
  files = [p for p in (bad / "params").rglob("*") if p.is_file() and "/d/" in str(p)]
  big = max(files, key=lambda p: p.stat().st_size)
  big.write_bytes(big.read_bytes()[: big.stat().st_size // 3])
  # The reads the failed restore left in flight report it again as they finish; those echoes
  # are dropped during the restore, which ends only when they are done: nothing reaches the
  # process's unraisable hook afterwards, and the hook is the process's own again.
  late, previous = [], sys.unraisablehook
  sys.unraisablehook = late.append
  try:
    with pytest.raises(ProclipError, match=str(bad)):
      ck.load_clip_tower(str(bad), cfg.vision)
    assert sys.unraisablehook == late.append
    time.sleep(0.5)
    gc.collect()
  finally:
    sys.unraisablehook = previous
  assert not late, [f"{u.err_msg}: {u.exc_value!r}" for u in late]


# ------------------------------------------------------------------------ caches

@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
  from proclip_jax.storage import save_model  # pylint: disable=import-outside-toplevel
  from proclip_jax.data import precompute as P  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.clip import CLIPConfig, init_clip  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.clip_text import TextConfig  # pylint: disable=import-outside-toplevel
  base = tmp_path_factory.mktemp("cache")
  cfg = CLIPConfig(vision=None, text=TextConfig(context_length=16, width=16, layers=1,
                                                heads=2, embed_dim=8))
  model = save_model(str(base / "clip"), "clip", cfg.to_dict(), init_clip(cfg, 1))
  ids = np.arange(100, 112)
  texts = [f"caption number {i}" for i in range(12)]
  out = P.precompute_captions(ids, {"short": texts}, model, str(base / "cache"),
                              dataset={"fingerprint": "t", "split": "train", "path": None},
                              dtype="float32", batch_size=4, unit_size=8, progress=False)
  return out, ids


def test_cache_with_nan_rows_is_refused(small_cache, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  from proclip_jax.data.cache import CacheReader  # pylint: disable=import-outside-toplevel
  src, ids = small_cache
  bad = tmp_path / "nan"
  shutil.copytree(src, bad)
  a = np.load(bad / "short.npy", mmap_mode="r+")
  a[3, 2] = np.nan
  a.flush()
  del a
  with pytest.raises(ProclipError, match=rf"(?is)(nan|finite).*{ids[3]}|{ids[3]}.*(nan|finite)"):
    reader = CacheReader(str(bad))
    out = reader.lookup(ids[:6], "short")
    # Reaching here, a NaN would flow into the loss: the reader must refuse it.
    assert np.isfinite(out).all(), "CacheReader returned NaN features without an error"


def test_truncated_cache_file_is_refused(small_cache, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  from proclip_jax.data.cache import CacheReader  # pylint: disable=import-outside-toplevel
  src, _ = small_cache
  bad = tmp_path / "trunc"
  shutil.copytree(src, bad)
  f = bad / "short.npy"
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(ProclipError, match=r"short.npy.*(damaged|truncated).*precompute"):
    CacheReader(str(bad))


def test_precompute_cli_bad_arguments(capsys, tmp_path, small_cache):
  spec = importlib.util.spec_from_file_location("precompute_cli",
                                                os.path.join(ROOT, "tools", "precompute.py"))
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  _cli_error(capsys, cli.main, ["--data", str(tmp_path / "nodata"), "--model",
                                str(tmp_path / "nomodel"), "--fields", "short", "--out",
                                str(tmp_path / "o")])
  _cli_error(capsys, cli.main, ["--data", str(tmp_path), "--model", str(tmp_path),
                                "--fields", "short", "--out", str(tmp_path / "o"),
                                "--mesh", "data=x"], "--mesh")
