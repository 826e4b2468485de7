"""The user's path (issue #25 A): converted models and caches fix the model, no overrides.

A tiny converted CLIP image tower (width 24, E = 12) and a tiny converted BERT embedder
(hidden 32, the all-MiniLM vocabulary) of sizes no stage config knows; caches written from
their features. Stage 1 and stage 2 run from ``stage1.py`` / ``stage2.py`` with only paths
(and run-length knobs) set, and:

* the resolved config (adapter D and E, the image tower, the preset, the teacher CLIP's
  fingerprint) is what the files say and is recorded in config.json;
* a stated shape that disagrees with a file is refused naming the field and the file;
* stage 2 refuses a CLIP other than the one that taught stage 1;
* one caption field in stage 1 stands for both instance terms;
* a resumed run with a changed config lists the changes (loop-only ones allowed);
* worker counts follow the cores; a single image encodes; ``embed(normalize=True)``;
  rank_images walks subfolders and skips unreadable files; loading a run logs no absl
  warnings.
"""
import json
import logging
import math
import os

import jax
import numpy as np
import pytest
from PIL import Image

from proclip_jax.errors import ProclipError
from proclip_jax.models.clip import CLIPConfig
from proclip_jax.models.vit import VisionConfig
from proclip_jax.storage import read_model_json, save_model
from proclip_jax.train import inputs, loop, run_config
from test_eval import make_tiny_embedder
from test_run import _demo_source, _run_module, _write_cache

E = 12
VISION = VisionConfig(image_size=32, patch_size=16, width=24, layers=1, heads=2, embed_dim=E)
FIELDS = ("short", "long", "raw")


class Features:
  """A cache provider: a fixed table of features per (id, field)."""

  def __init__(self, table, dim):
    self.table, self.dim = table, dim

  def lookup(self, ids, fields):
    return np.stack([self.table[(int(i), str(f))] for i, f in zip(ids, fields)])


def _clip(path, seed):
  """A converted-CLIP folder with only an image tower (what tools/convert.py writes)."""
  from proclip_jax.models.proclip import ProCLIPConfig, ProCLIPModel
  from proclip_jax.models.adapter import AdapterConfig
  model = ProCLIPModel(ProCLIPConfig(vision=VISION, adapter=AdapterConfig(8, E)))
  visual = jax.tree.map(np.asarray, model.init(jax.random.key(seed), ("visual",))["visual"])
  save_model(path, "clip", CLIPConfig(vision=VISION, text=None).to_dict(),
             {"visual": visual, "logit_scale": np.float32(math.log(50.0))})
  return path


def _cache(path, kind, provider, source, fields, **manifest):
  _write_cache(path, kind, provider, source, fields)
  m = json.load(open(os.path.join(path, "manifest.json")))
  m.update(manifest)
  json.dump(m, open(os.path.join(path, "manifest.json"), "w"))
  return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  from proclip_jax.models.embedder import load_embedder
  tmp = tmp_path_factory.mktemp("userpath")
  source = _demo_source(32)
  emb_dir = make_tiny_embedder(tmp)
  emb = load_embedder(emb_dir)
  ids = [int(ex["id"]) for ex in source]
  table = {}
  for f in FIELDS:
    feats = emb.embed([ex[f].decode() for ex in source], batch_size=32)
    table.update({(i, f): v for i, v in zip(ids, feats)})
  llm = Features(table, emb.dim)
  rng = np.random.default_rng(3)
  teacher = Features({k: rng.normal(size=E).astype(np.float32) for k in table}, E)
  clip = _clip(str(tmp / "clip-tiny"), 7)
  clip_fp = read_model_json(clip)["params_sha256"]
  preset = emb.preset.name
  return {
      "tmp": tmp, "source": source, "emb_dir": emb_dir, "dim": emb.dim, "clip": clip,
      "clip_fp": clip_fp, "preset": preset,
      "llm": _cache(str(tmp / "llm"), "llm", llm, source, FIELDS, preset_name=preset),
      "teacher": _cache(str(tmp / "clip-text"), "clip_text", teacher, source, ("short", "raw"),
                        model={"kind": "clip", "fingerprint": clip_fp})}


def _stage_config(spec, files, **paths):
  """``spec`` loaded as run.py does, with paths and run-length knobs only (no model.*)."""
  run = _run_module()
  c = run.load_config(spec)
  over = {"cache.llm": files["llm"], "total_steps": "3", "data.batch_size": "16",
          "distill_chunk": "8", "progress": "false", "log_every": "1", "ckpt_every": "0",
          "data.read_threads": "1", "data.prefetch_batches": "1", "optim.warmup_steps": "1",
          "data.worker_count": "0",
          **paths}
  for k, v in over.items():
    run.apply_override(c, k, v)
  c.lock()
  return c


@pytest.fixture(scope="module")
def runs(files):
  root = files["tmp"]
  s1 = str(root / "stage1")
  c1 = _stage_config("stage1.py:root=/nowhere", files, **{"cache.clip": files["teacher"]})
  r1 = loop.train(c1, s1, source=files["source"])
  s2 = str(root / "stage2")
  c2 = _stage_config(f"stage2.py:root=/nowhere,stage1={s1},bf16=false", files,
                     **{"init.clip": files["clip"], "total_steps": "2"})
  r2 = loop.train(c2, s2, source=files["source"])
  return {"s1": s1, "s2": s2, "r1": r1, "r2": r2, "c1": c1, "c2": c2}


def _saved(workdir):
  return json.load(open(os.path.join(workdir, "config.json")))


# ------------------------------------------------------------------------ 1. shapes from files

def test_stages_run_with_only_paths(files, runs):
  assert runs["r1"]["step"] == 3 and math.isfinite(runs["r1"]["loss"])
  assert runs["r2"]["step"] == 2 and math.isfinite(runs["r2"]["loss"])
  for name in ("c1", "c2"):   # the configs stated no shape
    assert runs[name].model.adapter.in_dim is None and runs[name].model.adapter.out_dim is None
  s1, s2 = _saved(runs["s1"]), _saved(runs["s2"])
  assert files["dim"] == 32 and files["dim"] != E
  assert (s1["model"]["adapter"]["in_dim"], s1["model"]["adapter"]["out_dim"]) == (32, E)
  assert s1["cache"]["preset"] == files["preset"] and s1["model"]["vision"] is None
  assert s1["init"]["clip_sha256"] == files["clip_fp"]
  assert (s2["model"]["adapter"]["in_dim"], s2["model"]["adapter"]["out_dim"]) == (32, E)
  want = dict(VISION.to_dict(), dtype="float32", scan_layers=False)
  assert s2["model"]["vision"] == want
  assert s2["init"]["clip_sha256"] == files["clip_fp"]


def test_stated_shape_that_disagrees_names_field_and_file(files, runs, tmp_path):
  c = _stage_config("stage1.py:root=/nowhere", files, **{"cache.clip": files["teacher"],
                                           "model.adapter.in_dim": "4096"})
  with pytest.raises(ProclipError, match=r"config\.model\.adapter\.in_dim=4096 does not match "
                     r"the LLM cache .*llm/manifest\.json.*32.*input width"):
    loop.train(c, str(tmp_path / "w1"), source=files["source"])
  assert not (tmp_path / "w1").exists()
  c = _stage_config("stage1_qwen3.py", files, **{"cache.clip": files["teacher"]})
  with pytest.raises(ProclipError, match=r"config\.cache\.preset='qwen3-embedding'.*"
                     r"llm/manifest\.json"):
    run_config.resolve_model(c)
  c = _stage_config(f"stage2.py:stage1={runs['s1']},bf16=false", files,
                    **{"init.clip": files["clip"]})
  with c.unlocked():
    c.model.vision = dict(VISION.to_dict(), width=48)
  with pytest.raises(ProclipError, match=r"config\.model\.vision\.width=48 does not match the "
                     r"converted CLIP .*clip-tiny/model\.json.*24"):
    run_config.resolve_model(c)


def test_stage2_refuses_another_clip_than_stage1s_teacher(files, runs):
  other = _clip(str(files["tmp"] / "clip-other"), 8)
  c = _stage_config(f"stage2.py:stage1={runs['s1']},bf16=false", files,
                    **{"init.clip": other})
  fp = read_model_json(other)["params_sha256"]
  with pytest.raises(ProclipError, match=rf"clip-other.*{fp[:12]}.*not the CLIP that taught "
                     rf"the stage-1 run .*{files['clip_fp'][:12]}"):
    run_config.resolve_model(c)


# ------------------------------------------------------------------------ 2. one caption field

def test_stage1_with_one_field_uses_it_for_both_terms(files, tmp_path):
  c = _stage_config("stage1.py:root=/nowhere", files, **{"cache.clip": files["teacher"],
                                           "stage1.fields": "short", "total_steps": "1"})
  assert run_config.resolve_model(c).stage1.fields == ("short", "short")
  r = loop.train(c, str(tmp_path / "w"), source=files["source"])
  assert r["ins_short"] == r["ins_raw"]
  assert r["loss"] == pytest.approx(2 * r["ins_short"] + r["struct"], rel=1e-6)
  assert _saved(tmp_path / "w")["stage1"]["fields"] == ["short", "short"]


# ------------------------------------------------------------------------ 4. defaults, resume

def test_worker_count_follows_cores():
  assert [inputs.default_worker_count(n) for n in (1, 2, 3, 8, 16, 64)] == [0, 0, 1, 4, 8, 16]
  from experiments.configs import common
  c = common.base_config(2)
  assert c.data.worker_count == -1
  assert inputs.worker_count(c) == inputs.default_worker_count(len(os.sched_getaffinity(0)))
  c.data.worker_count = -3
  with pytest.raises(ProclipError, match="worker_count=-3"):
    inputs.worker_count(c)


def test_resume_with_changed_config_lists_changes(files, runs, caplog):
  s1 = runs["s1"]
  before = _saved(s1)
  c = _stage_config("stage1.py:root=/nowhere", files, **{"cache.clip": files["teacher"],
                                           "optim.lr": "0.001", "optim.b1": "0.8"})
  with pytest.raises(ProclipError) as e:
    loop.train(c, s1, source=files["source"])
  lines = str(e.value).splitlines()
  assert "  optim.lr: 0.0001 -> 0.001" in lines and "  optim.b1: 0.9 -> 0.8" in lines
  assert "allow_config_change" in lines[-1]
  assert _saved(s1) == before   # config.json is not overwritten by a refused resume
  c = _stage_config("stage1.py:root=/nowhere", files, **{"cache.clip": files["teacher"],
                                           "total_steps": "4", "log_every": "2"})
  with caplog.at_level(logging.WARNING, logger="proclip_jax.train.run_config"):
    r = loop.train(c, s1, source=files["source"])
  assert r["step"] == 4
  text = caplog.text
  assert "Loop-only config changes" in text and "total_steps: 3 -> 4" in text
  assert "log_every: 1 -> 2" in text and "schedule" in text
  c = _stage_config("stage1.py:root=/nowhere", files, **{
      "cache.clip": files["teacher"], "total_steps": "4", "optim.lr": "0.001",
      "allow_config_change": "true"})
  loop.train(c, s1, source=files["source"])
  assert _saved(s1)["optim"]["lr"] == 0.001


def test_load_encode_one_image_rank_folder_and_normalize(files, runs, tmp_path, capsys):
  import absl.logging
  from proclip_jax.inference import ProCLIP
  from proclip_jax.models.embedder import load_embedder
  records = []

  class Grab(logging.Handler):
    def emit(self, record):
      records.append(record)
  grab = Grab(level=logging.WARNING)
  absl_logger = absl.logging.get_absl_logger()
  absl_logger.addHandler(grab)
  try:
    model = ProCLIP.load(runs["s2"], embedder=files["emb_dir"], batch_size=8)
  finally:
    absl_logger.removeHandler(grab)
  assert [r.getMessage() for r in records] == []

  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
  batch = model.encode_images([img, img[::-1]])
  for one in (img, Image.fromarray(img)):
    got = model.encode_images(one)
    assert got.shape == (1, E) and np.abs(got - batch[:1]).max() < 1e-5

  emb = load_embedder(files["emb_dir"])
  texts = ["a red circle", "two blue squares on a striped background"]
  raw = emb.embed(texts)
  assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 1e-3   # mean pooling: not unit
  unit = emb.embed(texts, normalize=True)
  want = raw.astype(np.float64) / np.linalg.norm(raw.astype(np.float64), axis=1, keepdims=True)
  assert np.abs(unit - want).max() < 1e-6

  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "rank_images", os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools",
                                  "rank_images.py"))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  folder = tmp_path / "photos"
  (folder / "sub" / "deeper").mkdir(parents=True)
  Image.fromarray(img).save(folder / "a.png")
  Image.fromarray(img[::-1]).save(folder / "sub" / "b.jpg")
  Image.fromarray(img[:, ::-1]).save(folder / "sub" / "deeper" / "c.png")
  (folder / "sub" / "broken.jpg").write_bytes(b"not an image")
  (folder / "notes.txt").write_text("skip me")
  rc = tool.main(["--checkpoint", runs["s2"], "--images", str(folder), "--query", "a circle",
                  "--embedder", files["emb_dir"], "--top", "5", "--batch-size", "8"])
  out = capsys.readouterr()
  assert rc == 0, out.err
  listed = sorted(line.split()[-1] for line in out.out.strip().splitlines())
  assert listed == sorted(str(folder / p) for p in ("a.png", "sub/b.jpg", "sub/deeper/c.png"))
  assert "skipped 1 unreadable file(s)" in out.err and "broken.jpg" in out.err


def test_trainer_closes_grain_workers(files, tmp_path):
  """A run with a worker process leaves no worker and frees its shared-memory blocks."""
  import multiprocessing
  before = set(os.listdir("/dev/shm"))
  c = _stage_config("stage1.py:root=/nowhere", files, **{
      "cache.clip": files["teacher"], "total_steps": "1", "data.worker_count": "1"})
  loop.train(c, str(tmp_path / "w"), source=files["source"])
  assert multiprocessing.active_children() == []
  assert set(os.listdir("/dev/shm")) - before == set()
