"""The trainer end to end (train/loop.py, train/checkpoints.py, experiments/run.py).

Tiny runs on demo-world scenes drawn in memory, with in-memory "caches" (bag-of-words
random features of the captions, one vector per (id, field), through the same
``lookup(ids, fields)`` protocol as ``CacheReader``) on the 8 simulated CPU devices:

* stage 1 on the demo world (caches written to disk and read by ``CacheReader``): the loss
  falls clearly; metrics.jsonl and TensorBoard files;
* stage-1 -> stage-2 handoff through Orbax (the adapter from the stage-1 workdir, the image
  tower from a converted-CLIP folder);
* an interrupted stage-2 run (SIGTERM at step 2 from an eval hook) resumed from its
  checkpoint ends bitwise equal to the uninterrupted run (params, EMA, optimizer, metrics);
  a half-written checkpoint folder is ignored;
* the CLI: a config override reaches the trainer; an unknown field exits 2 with one line.
"""
import json
import math
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import proclip_jax.eval as eval_lib  # noqa: E402
from experiments.configs import common  # noqa: E402
from proclip_jax.data import demo_world as dw  # noqa: E402
from proclip_jax.errors import ProclipError  # noqa: E402
from proclip_jax.models.proclip import ProCLIPModel  # noqa: E402
from proclip_jax.models.vit import VisionConfig  # noqa: E402
from proclip_jax.storage import save_model  # noqa: E402
from proclip_jax.train import checkpoints as ckpt_lib  # noqa: E402
from proclip_jax.train import inputs, loop  # noqa: E402
from proclip_jax.tree import flatten  # noqa: E402

D, E, SIZE = 24, 16, 32
N_EXAMPLES = 64
VISION = VisionConfig(image_size=SIZE, patch_size=16, width=32, layers=2, heads=2,
                      embed_dim=E)


# ------------------------------------------------------------------------ tiny world

def _png(pixels):
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _demo_source(n=N_EXAMPLES, seed=0):
  """Demo-world records in memory (what the tfds source yields)."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    scene = dw.sample_scene(rng)
    rows.append({"id": np.int64(1000 + i), "image": _png(dw.draw(scene, 48)),
                 "short": dw.short_caption(scene).encode(),
                 "long": dw.long_caption(scene).encode(),
                 "raw": dw.raw_caption(scene, rng).encode()})
  return rows


class BagOfWordsCache:
  """A feature per (id, field): the sum of fixed random word vectors of the caption."""

  def __init__(self, source, dim, seed):
    self.dim, self.seed = dim, seed
    self.words = {}
    self.table = {}
    for ex in source:
      for f in ("short", "long", "raw"):
        self.table[(int(ex["id"]), f)] = self._embed(ex[f].decode())

  def _word(self, w):
    if w not in self.words:
      h = int.from_bytes(w.encode()[:8].ljust(8, b"\0"), "little") ^ len(w)
      self.words[w] = np.random.default_rng([self.seed, h]).normal(size=self.dim)
    return self.words[w]

  def _embed(self, text):
    return np.sum([self._word(w) for w in text.lower().split()], axis=0).astype(np.float32)

  def lookup(self, ids, fields):
    return np.stack([self.table[(int(i), str(f))] for i, f in zip(ids, fields)])


def _write_cache(path, kind, provider, source, fields):
  """An embedding-cache folder in the CacheReader layout (ids.npy, FIELD.npy, manifest)."""
  from proclip_jax.data import cache as C
  os.makedirs(path)
  ids = np.array(sorted(int(ex["id"]) for ex in source), np.int64)
  C.atomic_save_npy(os.path.join(path, C.IDS_FILE), ids)
  for f in fields:
    rows = provider.lookup(ids, [f] * len(ids))
    C.atomic_save_npy(os.path.join(path, f"{f}.npy"), rows.astype(np.float32))
  C.atomic_write_json(os.path.join(path, C.MANIFEST), {
      "format": C.FORMAT, "version": C.VERSION, "kind": kind, "dim": provider.dim,
      "dtype": "float32", "fields": list(fields), "count": len(ids), "skipped": {},
      "files": {"ids": C.IDS_FILE, **{f: f"{f}.npy" for f in fields}}})
  return path


@pytest.fixture(scope="module")
def world():
  source = _demo_source()
  return {"source": source, "caches": {"llm": BagOfWordsCache(source, D, 1),
                                       "clip": BagOfWordsCache(source, E, 2)}}


def _config(stage, steps, **over):
  c = common.base_config(stage)
  c.total_steps = steps
  c.seed = 0
  c.progress = False
  c.distill_chunk = 8
  c.log_every = 1
  c.ckpt_every = 0
  c.data.batch_size = 16
  c.data.read_threads = 1
  c.data.prefetch_batches = 1
  c.data.worker_count = 0   # in-process decoding whatever the cores (the default is -1: auto)
  common.set_model(c, d=D, e=E, size=None, dtype="float32")
  c.model.adapter.expansion = 2
  if stage == 1:
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 2
  else:
    c.model.vision = VISION.to_dict()
    c.optim.lr = 1e-3
    c.optim.layer_decay = 0.85
    c.optim.grad_clip_norm = 5.0
    c.stage2.ema_momentum = 0.9
  for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ------------------------------------------------------------------------ stage 1

@pytest.fixture(scope="module")
def stage1(world, tmp_path_factory):
  """40 stage-1 steps reading on-disk caches through CacheReader (config.cache paths)."""
  root = tmp_path_factory.mktemp("s1")
  workdir = str(root / "run")
  cfg = _config(1, 40, log_every=5)
  cfg.cache.llm = _write_cache(str(root / "llm"), "llm", world["caches"]["llm"],
                               world["source"], ("short", "raw"))
  cfg.cache.clip = _write_cache(str(root / "clip"), "clip_text", world["caches"]["clip"],
                                world["source"], ("short", "raw"))
  result = loop.train(cfg, workdir, source=world["source"])
  return {"workdir": workdir, "result": result}


def test_stage1_loss_falls_and_logs(stage1):
  rows = _rows(stage1["workdir"])
  losses = [r["loss"] for r in rows if "loss" in r]
  assert [r["step"] for r in rows if "loss" in r] == list(range(5, 41, 5))
  assert any("first_step_s" in r for r in rows)
  assert losses[-1] < 0.5 * losses[0], losses
  last = rows[-1]
  for key in ("loss", "ins", "struct", "grad_norm", "lr", "steps_per_s", "examples_per_s"):
    assert key in last and math.isfinite(last[key]), (key, last)
  assert last["examples_per_s"] == pytest.approx(16 * last["steps_per_s"])
  assert stage1["result"]["step"] == 40 and not stage1["result"]["preempted"]
  assert stage1["result"]["loss"] == pytest.approx(losses[-1])
  tb = os.listdir(os.path.join(stage1["workdir"], "tb"))
  assert any(f.startswith("events.out.tfevents") for f in tb)
  assert ckpt_lib.Checkpoints(stage1["workdir"], read_only=True).all_steps() == [40]
  cfg = json.load(open(os.path.join(stage1["workdir"], "config.json")))
  assert cfg["stage"] == 1 and cfg["total_steps"] == 40


# ------------------------------------------------------------------------ stage 2

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A converted-CLIP folder holding only an image tower (what tools/convert.py writes)."""
  from proclip_jax.models.clip import CLIPConfig
  from proclip_jax.models.proclip import ProCLIPConfig
  from proclip_jax.models.adapter import AdapterConfig
  model = ProCLIPModel(ProCLIPConfig(vision=VISION, adapter=AdapterConfig(D, E)))
  visual = jax.tree.map(np.asarray, model.init(jax.random.key(7), ("visual",))["visual"])
  out = str(tmp_path_factory.mktemp("clip") / "clip-tiny")
  save_model(out, "clip", CLIPConfig(vision=VISION, text=None).to_dict(),
             {"visual": visual, "logit_scale": np.float32(math.log(50.0))})
  return out, visual


class SigtermAt:
  """An eval hook that sends this process SIGTERM (a preemption) when called."""

  def __init__(self):
    self.calls = []

  def __call__(self, params, config, mesh):
    self.calls.append(sorted(params))
    os.kill(os.getpid(), signal.SIGTERM)
    return {"called": 1.0}


def _stage2_config(stage1_workdir, clip_path, **over):
  return _config(2, 4, ckpt_every=2, **{"init.stage1_workdir": stage1_workdir,
                                        "init.clip": clip_path}, **over)


@pytest.fixture(scope="module")
def stage2(world, stage1, clip_dir, tmp_path_factory):
  """Uninterrupted 4 steps (A) and 2 + SIGTERM, then resumed to 4 (B)."""
  cfg = _stage2_config(stage1["workdir"], clip_dir[0])
  wa = str(tmp_path_factory.mktemp("s2a"))
  ra = loop.train(cfg, wa, source=world["source"], caches=world["caches"])
  wb = str(tmp_path_factory.mktemp("s2b"))
  hook = SigtermAt()
  cfg_b = _stage2_config(stage1["workdir"], clip_dir[0])
  cfg_b.evals.test_sigterm = {"every": 2, "at_end": False}
  eval_lib.EVALS["test_sigterm"] = hook   # the trainer's one registry of evaluations
  try:
    rb1 = loop.train(cfg_b, wb, source=world["source"], caches=world["caches"])
  finally:
    del eval_lib.EVALS["test_sigterm"]
  steps_b1 = ckpt_lib.Checkpoints(wb, read_only=True).all_steps()
  partial = os.path.join(wb, "checkpoints", "3.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(partial, "state"))
  rb2 = loop.train(cfg, wb, source=world["source"], caches=world["caches"])
  return {"cfg": cfg, "wa": wa, "wb": wb, "ra": ra, "rb1": rb1, "rb2": rb2, "hook": hook,
          "steps_b1": steps_b1, "partial": partial}


def _restore(cfg, workdir, step):
  from proclip_jax import mesh as mesh_lib
  from proclip_jax.train.state import abstract_train_state
  mesh = mesh_lib.make_mesh(cfg.mesh)
  abstract, _ = abstract_train_state(cfg, mesh)
  c = ckpt_lib.Checkpoints(workdir, read_only=True)
  state, meta = c.restore(abstract, step=step)
  c.close()
  return jax.tree.map(lambda x: np.array(x), state), meta


def test_stage2_starts_from_stage1_adapter_and_clip_tower(stage1, stage2, clip_dir):
  init = ckpt_lib.stage2_init_params(stage2["cfg"])
  s1_cfg = _config(1, 40)
  s1_state, meta = _restore(s1_cfg, stage1["workdir"], 40)
  assert meta["stage"] == 1 and meta["step"] == 40
  adapter = flatten(s1_state.params["adapter"])
  assert sorted(flatten(init["adapter"])) == sorted(adapter)
  for k, v in flatten(init["adapter"]).items():
    np.testing.assert_array_equal(v, adapter[k])
  for k, v in flatten(clip_dir[1]).items():
    np.testing.assert_array_equal(flatten(init["visual"])[k], v)
  assert float(init["logit_scale"]) == pytest.approx(math.log(50.0))
  assert stage2["ra"]["step"] == 4 and math.isfinite(stage2["ra"]["loss"])
  rows = _rows(stage2["wa"])
  last = rows[-1]
  for key in ("clip", "distill", "logit_scale", "scale", "grad_norm", "lr", "images_per_s"):
    assert key in last and math.isfinite(last[key]), key


def test_interrupted_run_resumes_bitwise(stage2):
  assert stage2["rb1"]["preempted"] and stage2["rb1"]["step"] == 2
  assert stage2["steps_b1"] == [2]
  assert len(stage2["hook"].calls) == 1
  assert stage2["hook"].calls[0] == ["adapter", "logit_scale", "visual"]
  assert not os.path.exists(stage2["partial"])  # the half-written folder was dropped
  assert stage2["rb2"]["step"] == 4 and not stage2["rb2"]["preempted"]
  sa, _ = _restore(stage2["cfg"], stage2["wa"], 4)
  sb, _ = _restore(stage2["cfg"], stage2["wb"], 4)
  leaves_a, leaves_b = jax.tree.leaves(sa), jax.tree.leaves(sb)
  assert len(leaves_a) == len(leaves_b) > 10
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)
  assert flatten(sa.ema) and int(sa.step) == 4
  timing = ("first_step_s", "steps_per_s", "images_per_s")
  strip = lambda rows: [{k: v for k, v in r.items() if k not in timing}  # noqa: E731
                        for r in rows if "loss" in r and r["step"] > 2]
  assert strip(_rows(stage2["wa"])) == strip(_rows(stage2["wb"]))
  assert [r["step"] for r in _rows(stage2["wb"]) if "first_step_s" in r] == [1, 3]


# ------------------------------------------------------------------------ configs and errors

def _run_module():
  import importlib.util
  spec = importlib.util.spec_from_file_location("proclip_run", os.path.join(REPO, "experiments",
                                                                            "run.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_config_files_args_and_overrides():
  run = _run_module()
  a = common.parse_arg("size=L/14,steps=7,bf16=false,fields=short;long", size="B/16",
                       steps=1, bf16=True, fields=("short",))
  assert (a.size, a.steps, a.bf16, a.fields) == ("L/14", 7, False, ("short", "long"))
  with pytest.raises(ProclipError, match="Unknown config arg 'sise'"):
    common.parse_arg("sise=1", size="B/16")
  with pytest.raises(ProclipError, match="steps='many': expected a value of type int"):
    common.parse_arg("steps=many", steps=1)
  c1 = run.load_config("stage1.py")
  assert c1.stage == 1 and c1.model.vision is None
  # Shapes come from the caches / converted CLIP when the run starts (train/run_config.py).
  assert (c1.model.adapter.in_dim, c1.model.adapter.out_dim) == (None, None)
  assert c1.cache.llm == "./caches/cc3m-llm2clip-llama3-8b-cc"
  assert c1.cache.clip == "./caches/cc3m-clip-b16"
  assert (c1.optim.lr, c1.optim.weight_decay, c1.optim.warmup_steps) == (1e-4, 0.05, 500)
  assert (c1.data.batch_size, c1.distill_chunk, tuple(c1.stage1.fields)) == (4096, 512,
                                                                            ("short", "raw"))
  c2 = run.load_config("stage2:size=L/14,impl=sharded")
  assert c2.init.clip == "./weights/clip-vit-l14" and c2.model.adapter.out_dim is None
  assert c2.model.vision.dtype == "bfloat16" and c2.stage2.contrastive_impl == "sharded"
  assert (c2.optim.lr, c2.optim.layer_decay, c2.optim.grad_clip_norm,
          c2.optim.warmup_steps) == (1e-5, 0.85, 5.0, 0)
  assert (c2.stage2.ema_momentum, c2.stage2.distill_weight) == (0.999, 1.0)
  assert tuple(c2.stage2.text_fields) == ("short", "long")
  q = run.load_config("stage1_qwen3.py:qwen=0.6b")
  assert q.cache.llm == "./caches/cc3m-qwen3-embedding-0.6b"
  assert q.cache.preset == "qwen3-embedding"
  assert run.load_config("stage2_qwen3.py").cache.preset == "qwen3-embedding"
  run.apply_override(c2, "optim.lr", "3e-5")
  run.apply_override(c2, "stage2.text_fields", "short;long;raw")
  run.apply_override(c2, "data.num_epochs", "3")
  run.apply_override(c2, "progress", "false")
  assert (c2.optim.lr, tuple(c2.stage2.text_fields), c2.data.num_epochs, c2.progress) == (
      3e-5, ("short", "long", "raw"), 3, False)
  with pytest.raises(ProclipError, match="unknown field; config.optim has b1"):
    run.apply_override(c2, "optim.lrr", "1")
  with pytest.raises(ProclipError, match="expected a value of type int"):
    run.apply_override(c2, "total_steps", "ten")
  with pytest.raises(ProclipError, match="known configs: .*stage1.py"):
    run.load_config("stage9.py")


def test_unknown_evaluation_lists_known_ones(world, tmp_path):
  cfg = _config(1, 2)
  cfg.evals.nope = {"every": 1}
  with pytest.raises(ProclipError, match="unknown evaluation 'nope'; known: .*demo_short"):
    loop.train(cfg, str(tmp_path / "w"), source=world["source"], caches=world["caches"])


def test_missing_inputs_name_the_command(world, tmp_path, clip_dir):
  from proclip_jax import mesh as mesh_lib
  mesh = mesh_lib.make_mesh({"data": -1})
  cfg = _config(1, 2)
  cfg.cache.llm = str(tmp_path / "no-cache")
  with pytest.raises(ProclipError, match="no-cache.*tools/precompute.py"):
    inputs.build_data(cfg, mesh, source=world["source"])
  cfg = _config(1, 2)
  with pytest.raises(ProclipError, match="config.cache.llm is not set.*tools/precompute.py"):
    inputs.build_data(cfg, mesh, source=world["source"])
  cfg.data.path = str(tmp_path / "no-data")
  with pytest.raises(ProclipError, match="no-data.*tools/build_dataset.py"):
    inputs.build_data(cfg, mesh)
  cfg = _stage2_config(str(tmp_path / "no-stage1"), clip_dir[0])
  with pytest.raises(ProclipError, match="no-stage1.*experiments/run.py --config stage1.py"):
    ckpt_lib.stage2_init_params(cfg)
  cfg = _stage2_config(str(tmp_path), str(tmp_path / "no-clip"))
  with pytest.raises(ProclipError, match="no-clip.*tools/convert.py"):
    ckpt_lib.stage2_init_params(cfg)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ProclipError, match="has no checkpoint"):
    ckpt_lib.load_stage1_adapter(str(tmp_path / "empty"))


def test_cli_override_reaches_trainer_and_errors_exit_2(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  work = tmp_path / "w"
  argv = [sys.executable, os.path.join(REPO, "experiments", "run.py"), "--config",
          "stage1.py:size=L/14,embedder=qwen3_embedding_0.6b", "--workdir", str(work),
          f"--config.data.path={tmp_path / 'no-data'}", "--config.optim.lr", "2e-4",
          "--config.model.adapter.in_dim=1024", "--config.model.adapter.out_dim=768"]
  p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
  assert p.returncode == 2, p.stderr
  assert "Traceback" not in p.stderr
  assert "no-data" in p.stderr and "tools/build_dataset.py" in p.stderr
  assert not (work / "config.json").exists()   # a start that fails records nothing
  p = subprocess.run(argv + ["--print-config"], capture_output=True, text=True, env=env,
                     timeout=120)
  assert p.returncode == 0, p.stderr
  written = json.loads(p.stdout)
  assert written["optim"]["lr"] == 2e-4
  assert written["model"]["adapter"] == {"in_dim": 1024, "out_dim": 768, "expansion": 8,
                                         "n_blocks": 1, "dtype": "float32"}
  p = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "run.py"), "--config", "stage2.py",
       "--workdir", str(tmp_path / "w2"), "--config.stage2.ema_momentun=0.9"],
      capture_output=True, text=True, env=env, timeout=120)
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert p.stderr.strip().splitlines() == [
      p.stderr.strip()] and "unknown field; config.stage2 has" in p.stderr
  assert not (tmp_path / "w2").exists()
