"""The demo end to end at a reduced size (``demo.py:quick``), and its reuse of artifacts.

One module-scoped run in a temporary workdir: the results table has the four rows with
finite percentages, the JSON / PNG outputs exist, the converted demo CLIP loads and
matches the weights the OpenAI export was made from, and a second ``run_demo`` in the same
workdir reuses every step (it says "reusing" and trains nothing).
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
  _, workdir, results = quick_run
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert list(saved["table"]) == ROW_KEYS
  for key in ROW_KEYS:
    row = saved["table"][key]
    assert sorted(row) == sorted(COL_KEYS)
    for col in COL_KEYS:
      assert math.isfinite(row[col]) and 0.0 <= row[col] <= 100.0, (key, col, row[col])
  assert saved["table"] == results["table"]
  for name in ("results.png", "loss_curves.png"):
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Every stage trained to its configured step and logged metrics.
  for run, steps in (("stage1", "stage1"), *((r, "stage2") for r in demo.STAGE2_RUNS.values())):
    rows = [json.loads(line) for line in open(os.path.join(workdir, run, "metrics.jsonl"))]
    total = int(getattr(quick_run[0], steps).total_steps)
    assert max(r["step"] for r in rows) == total
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


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
  mtimes = {run: os.path.getmtime(os.path.join(workdir, run, "metrics.jsonl"))
            for run in ("stage1", *demo.STAGE2_RUNS.values())}
  capsys.readouterr()
  second = demo.run_demo(config, workdir)
  out = capsys.readouterr().out
  for what in ("reusing the demo world", "reusing the demo CLIP", "reusing the converted "
               "embedder", "reusing the MiniLM cache", "reusing the demo-CLIP text-tower cache",
               "reusing stage 1", "reusing stage 2", "reusing the evaluation"):
    assert what in out, what
  for run, t in mtimes.items():  # nothing trained again
    assert os.path.getmtime(os.path.join(workdir, run, "metrics.jsonl")) == t, run
  assert second["table"] == first["table"]


def test_config_args():
  c = demo_config.get_config("n_train=100,stage2_steps=7,batch=16")
  assert c.stage == "demo"
  assert (c.world.n_train, c.stage2.total_steps, c.stage2.data.batch_size) == (100, 7, 16)
  q = demo_config.get_config("quick,stage1_steps=3")
  assert q.stage1.total_steps == 3 and q.world.n_train < demo_config.get_config().world.n_train
  from proclip_jax.errors import ProclipError
  with pytest.raises(ProclipError, match="Unknown config arg"):
    demo_config.get_config("n_trian=5")
