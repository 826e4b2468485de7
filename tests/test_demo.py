"""The demo end to end at a reduced size (``demo.py:quick``), and its reuse of artifacts.

One module-scoped run in a temporary workdir: the results table has the five rows (CLIP,
direct alignment, stage 1 only, stage 1 + 2 without self-distillation, ProCLIP) with
finite percentages, the JSON / PNG outputs exist, the converted demo CLIP loads and
matches the weights the OpenAI export was made from, the "stage 1 only" row is exactly
what stage 2 starts from, and a second ``run_demo`` in the same workdir reuses every step
(it says "reusing" and trains nothing). The seed statistics and the seen / unseen split of
zero-shot are checked against brute force.
"""
import json
import math
import os

import numpy as np
import pytest

from experiments import demo
from experiments.configs import demo as demo_config

ROW_KEYS = [k for k, _ in demo.ROWS]
COL_KEYS = [k for k, _ in demo.COLUMNS]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  config = demo_config.get_config("quick")
  config.progress = False
  results = demo.run_demo(config, workdir)
  return config, workdir, results


def test_results_table_and_files(quick_run):
  config, workdir, results = quick_run
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert list(saved["table"]) == ROW_KEYS
  seeds = [int(s) for s in config.seeds]
  assert saved["seeds"] == seeds
  for key in ROW_KEYS:
    row = saved["table"][key]
    assert sorted(row) == sorted(COL_KEYS)
    for col in COL_KEYS:
      vals = [saved["per_seed"][key][str(s)][col] for s in seeds]
      assert row[col]["values"] == vals
      for v in vals:  # unseen classes are in the held-out split at this size too
        assert math.isfinite(v) and 0.0 <= v <= 100.0, (key, col, v)
  assert saved["table"] == results["table"]
  assert saved["unseen_classes"] == list(demo.unseen_classes(config))
  for name in ("results.png", "loss_curves.png"):
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Every stage of every seed trained to its configured step and logged metrics.
  for s in seeds:
    for run, steps in (("stage1", "stage1"),
                       *((r, "stage2") for r in demo.STAGE2_RUNS.values())):
      path = os.path.join(demo.seed_dir(workdir, s), run, "metrics.jsonl")
      rows = [json.loads(line) for line in open(path)]
      total = int(getattr(config, steps).total_steps)
      assert max(r["step"] for r in rows) == total
      assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
  # Stage 2 changed the models: their rows are not the stage-1 row.
  per = saved["per_seed"]
  assert any(per["proclip"][str(s)] != per["stage1"][str(s)] for s in seeds)


def test_stage1_only_is_stage2_start(quick_run):
  """The "stage 1 only" model is CLIP's image tower and the stage-1 adapter, unchanged."""
  from proclip_jax.inference import CLIPModelAdapter
  from proclip_jax.storage import restore_state_params
  config, workdir, _ = quick_run
  seed = int(config.seeds[0])
  runs = demo.stage_configs(config, demo._world_info(os.path.join(workdir, "world")),  # pylint: disable=protected-access
                            os.path.join(workdir, "clip"), os.path.join(workdir, "embedder"),
                            {k: os.path.join(workdir, "caches", k) for k in
                             ("llm_train", "clip_train", "llm_retrieval_test")},
                            workdir, seed)
  model = demo.stage1_only_model(runs["proclip"][0], None)
  adapter = restore_state_params(runs["stage1"][1], int(config.stage1.total_steps))["params"]
  for a, b in zip(jax_leaves(model.params["adapter"]), jax_leaves(adapter["adapter"])):
    np.testing.assert_array_equal(a, b)
  clip = CLIPModelAdapter.load(os.path.join(workdir, "clip"))
  side = int(config.world.image_size)
  images = np.random.default_rng(0).integers(0, 255, (3, side, side, 3), dtype=np.uint8)
  np.testing.assert_allclose(model.encode_images(images), clip.encode_images(images),
                             atol=1e-5)


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def test_zero_shot_split_and_aggregate_against_brute_force():
  rng = np.random.default_rng(1)
  classes = [f"c{i}" for i in range(6)]
  labels = rng.integers(0, 6, 40)
  pred = np.where(rng.random(40) < 0.5, labels, rng.integers(0, 6, 40))
  got = demo.zero_shot_split(pred, labels, classes, ("c1", "c4"))
  unseen = [i for i in range(40) if labels[i] in (1, 4)]
  seen = [i for i in range(40) if labels[i] not in (1, 4)]
  assert got["zero_shot_unseen"] == pytest.approx(
      100 * sum(pred[i] == labels[i] for i in unseen) / len(unseen))
  assert got["zero_shot_seen"] == pytest.approx(
      100 * sum(pred[i] == labels[i] for i in seen) / len(seen))
  assert got["zero_shot_top1"] == pytest.approx(100 * np.mean(pred == labels))
  assert math.isnan(demo.zero_shot_split(pred, labels, classes, ())["zero_shot_unseen"])
  per_seed = {"clip": {0: dict.fromkeys(COL_KEYS, 50.0), 1: dict.fromkeys(COL_KEYS, 50.0)},
              "proclip": {0: {c: 10.0 + i for i, c in enumerate(COL_KEYS)},
                          1: {c: 14.0 + i for i, c in enumerate(COL_KEYS)}}}
  agg = demo.aggregate(per_seed)
  col = COL_KEYS[2]
  assert agg["proclip"][col] == {"mean": 14.0, "std": 2.0, "values": [12.0, 16.0]}
  assert agg["clip"][col]["std"] == 0.0
  text = demo.format_table(agg)
  assert "14.0 ± 2.0" in text and "50.0 ± 0.0" in text
  md = demo.format_table(agg, markdown=True)
  assert md.splitlines()[1].startswith("| --- |") and len(md.splitlines()) == 4


def test_table_text_lists_every_row(quick_run):
  _, _, results = quick_run
  text = demo.format_table(results["table"])
  for _, label in demo.ROWS:
    assert label in text


def test_demo_clip_conversion_round_trip(quick_run):
  """The converted demo CLIP equals the state dict it was converted from (export inverse)."""
  from safetensors.numpy import load_file
  from proclip_jax.storage import load_model
  from proclip_jax.convert.clip import clip_to_openai
  from proclip_jax.models.clip import CLIPConfig
  config, workdir, _ = quick_run
  meta, params = load_model(os.path.join(workdir, "clip"), kind="clip")
  cc = CLIPConfig.from_dict(meta["config"])
  assert cc == demo.clip_config(config)
  assert cc.text.context_length == config.clip.context_length
  exported = load_file(os.path.join(workdir, "clip_openai.safetensors"))
  again = clip_to_openai(params, cc)
  assert sorted(again) == sorted(exported)
  for k, v in exported.items():
    np.testing.assert_array_equal(again[k], v, err_msg=k)


def test_match_r1_against_brute_force():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(12, 5))
  txt = rng.normal(size=(12, 5))
  keys = ["a", "b", "a", "c", "b", "a", "d", "c", "a", "e", "b", "f"]
  got = demo._match_r1(img, txt, keys)  # pylint: disable=protected-access
  s = img @ txt.T
  i2t = np.mean([keys[int(np.argmax(s[i]))] == keys[i] for i in range(12)]) * 100
  t2i = np.mean([keys[int(np.argmax(s[:, j]))] == keys[j] for j in range(12)]) * 100
  assert got == {"i2t_R@1": i2t, "t2i_R@1": t2i}
  # Unique captions: the usual R@1 (the pair itself).
  uniq = demo._match_r1(img, txt, [str(i) for i in range(12)])  # pylint: disable=protected-access
  assert uniq["i2t_R@1"] == np.mean(np.argmax(s, 1) == np.arange(12)) * 100


def test_second_run_reuses_everything(quick_run, capsys):
  config, workdir, first = quick_run
  sd = demo.seed_dir(workdir, int(config.seeds[0]))
  mtimes = {run: os.path.getmtime(os.path.join(sd, run, "metrics.jsonl"))
            for run in ("stage1", *demo.STAGE2_RUNS.values())}
  capsys.readouterr()
  second = demo.run_demo(config, workdir)
  out = capsys.readouterr().out
  for what in ("reusing the demo world", "reusing the demo CLIP", "reusing the converted "
               "embedder", "reusing the MiniLM cache", "reusing the demo-CLIP text-tower cache",
               "reusing seed 0: stage 1", "reusing seed 0: stage 2", "reusing the evaluation"):
    assert what in out, what
  for run, t in mtimes.items():  # nothing trained again
    assert os.path.getmtime(os.path.join(sd, run, "metrics.jsonl")) == t, run
  assert second["table"] == first["table"]


def test_config_args():
  c = demo_config.get_config("n_train=100,stage2_steps=7,batch=16,seeds=2,seed=5")
  assert c.stage == "demo"
  assert (c.world.n_train, c.stage2.total_steps, c.stage2.data.batch_size) == (100, 7, 16)
  assert tuple(c.seeds) == (5, 6) and demo_config.get_config("quick").seeds == (0,)
  d = demo_config.get_config()
  assert d.clip.n_pretrain > d.world.n_train and len(d.seeds) == 3
  q = demo_config.get_config("quick,stage1_steps=3")
  assert q.stage1.total_steps == 3 and q.world.n_train < demo_config.get_config().world.n_train
  from proclip_jax.errors import ProclipError
  with pytest.raises(ProclipError, match="Unknown config arg"):
    demo_config.get_config("n_trian=5")


def test_pretraining_phrasings(tmp_path):
  """The first phrasing is the world's short caption; every one names the class; none but
  the bare name is a zero-shot template; bad caption settings fail before any training."""
  from proclip_jax.data import demo_world as dw
  from proclip_jax.errors import ProclipError
  rng = np.random.default_rng(0)
  for _ in range(50):
    scene = dw.sample_scene(rng)
    o = scene.objects[0]
    name = f"{o.colour} {o.shape}"
    assert demo.PHRASINGS[0].format(a=dw.article(name), name=name) == dw.short_caption(scene)
  texts = {t.format(c) for c in dw.CLASSES for t in dw.TEMPLATES}
  for p in demo.PHRASINGS:
    for c in dw.CLASSES:
      s = p.format(a=dw.article(c), name=c)
      assert c in s and (s not in texts or p == "{name}"), s
  for field, value, match in (("captions", "long", "config.clip.captions"),
                              ("short_share", 1.5, "config.clip.short_share")):
    config = demo_config.get_config("quick")
    config.clip[field] = value
    with pytest.raises(ProclipError, match=match):
      demo.pretrain_clip(config, str(tmp_path / field), lambda msg: None)
    assert not os.path.exists(tmp_path / field)
