"""Benchmarks: FLOP counters against independent counts (the traced program's dot/conv
FLOPs, XLA's cost analysis), the PyTorch reference pieces against the JAX losses and
adapter, and the stage-1 / stage-2 benchmarks end to end at tiny sizes (JSON keys)."""
import argparse
import json
import math

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, precompute, stage1, stage2
from proclip_jax import losses
from proclip_jax.models.adapter import AdapterConfig, TextProj, l2_normalize
from proclip_jax.models.vit import VisionConfig, VisionTransformer

VIT = VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, embed_dim=32)


def _jaxpr_matmul_flops(jaxpr) -> int:
  """Sum of 2·(output size)·(contracted size) over dot_general / conv in a (closed) jaxpr."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape  # kernel; out features are in the output size
      dn = eqn.params["dimension_numbers"]
      k_in = math.prod(rhs[d] for d in dn.rhs_spec[1:])  # in-features and spatial dims
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * k_in
    mult = eqn.params.get("length", 1) if name == "scan" else 1
    for sub in jax.core.jaxprs_in_params(eqn.params):
      total += mult * _jaxpr_matmul_flops(sub)
  return total


def _vit_params(cfg, n):
  x = jnp.zeros((n, cfg.image_size, cfg.image_size, 3), jnp.float32)
  model = VisionTransformer(cfg)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        jax.eval_shape(model.init, jax.random.key(0), x))
  return model, params, x


@pytest.mark.parametrize("scan", [False, True])
def test_vit_flops_match_traced_dots_and_xla(scan):
  cfg = VisionConfig(**{**VIT.to_dict(), "scan_layers": scan})
  model, params, x = _vit_params(cfg, 3)
  mine = common.vit_forward_flops(cfg, 3)
  traced = _jaxpr_matmul_flops(jax.make_jaxpr(model.apply)(params, x).jaxpr)
  assert mine == traced
  if not scan:  # XLA counts elementwise work too: a few % above the matmuls
    xla = common.xla_flops(jax.jit(model.apply).lower(params, x).compile())
    assert mine <= xla <= 1.1 * mine, (mine, xla)


def test_adapter_flops_match_traced_dots_and_xla():
  cfg = AdapterConfig(in_dim=256, out_dim=32, expansion=8, n_blocks=2)
  x = jnp.zeros((4, 256), jnp.float32)
  params = TextProj(cfg).init(jax.random.key(0), x)
  mine = common.adapter_forward_flops(cfg, 4)
  assert mine == _jaxpr_matmul_flops(jax.make_jaxpr(TextProj(cfg).apply)(params, x).jaxpr)
  xla = common.xla_flops(jax.jit(TextProj(cfg).apply).lower(params, x).compile())
  assert mine <= xla <= 1.1 * mine, (mine, xla)


def test_step_flop_rules():
  ad = AdapterConfig(in_dim=16, out_dim=32, expansion=2)
  f = common.stage2_step_flops(VIT, ad, 4)
  assert f["vision"] == 3 * common.vit_forward_flops(VIT, 4)
  assert f["teacher"] == common.vit_forward_flops(VIT, 4)
  assert f["total"] == f["vision"] + f["adapter"] + f["teacher"]
  assert common.stage2_step_flops(VIT, ad, 4, teacher=False)["teacher"] == 0
  assert common.stage1_step_flops(ad, 8) == 6 * common.adapter_forward_flops(ad, 8)
  # The figure: stage-1 PyTorch (text teacher + adapter) / JAX (adapter) ≈ 4.6 at
  # ViT-B/16's text tower and D = 4096.
  big = AdapterConfig(in_dim=4096, out_dim=512)
  text = common.text_forward_flops(width=512, layers=12, mlp=2048, context=77, embed_dim=512)
  r = (2 * text + common.stage1_step_flops(big, 1)) / common.stage1_step_flops(big, 1)
  assert 4.5 < r < 4.8, r


def test_alternate_and_ratio():
  calls = []
  stats = common.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                           warmup=1, runs=3)
  assert calls == ["a", "b"] * 4
  assert set(stats) == {"a", "b"} and len(stats["a"]["times_s"]) == 3
  r = common.ratio({"median_s": 4.0, "min_s": 3.0, "times_s": [4.0, 6.0]},
                   {"median_s": 2.0, "min_s": 1.0, "times_s": [2.0, 2.0]})
  assert r == {"ratio_median": 2.0, "ratio_best": 3.0, "ratio_paired_median": 2.5}


def test_peak_memory_and_matmul_peak():
  mem = common.peak_memory()
  assert mem["peak_bytes"] > 0 and mem["peak_source"] in ("device", "maxrss")
  peak = common.matmul_peak("float32", 128, warmup=1, runs=2)
  assert peak["flops_per_s"] == pytest.approx(2 * 128 ** 3 / peak["median_s"])


# ----------------------------------------------------------- PyTorch reference pieces


def test_torch_reference_matches_jax():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  cfg = AdapterConfig(in_dim=24, out_dim=16, expansion=2)
  x = rng.standard_normal((8, 24)).astype(np.float32)
  params = jax.tree.map(np.array, nn.unbox(TextProj(cfg).init(jax.random.key(1), x))["params"])
  ref = common.torch_adapter(cfg)
  with torch.no_grad():
    b, tb = params["block_0"], ref.blocks[0]
    for mod, src in ((tb.ln, b["ln"]), (ref.ln_final, params["ln_final"])):
      mod.weight.copy_(torch.from_numpy(src["scale"]))
      mod.bias.copy_(torch.from_numpy(src["bias"]))
    for mod, src in ((tb.fn0, b["fn_0"]), (tb.fn3, b["fn_3"]), (ref.proj, params["proj"])):
      mod.weight.copy_(torch.from_numpy(src["kernel"].T.copy()))
      mod.bias.copy_(torch.from_numpy(src["bias"]))
    out_t = ref(torch.from_numpy(x)).numpy()
  out_j = np.asarray(TextProj(cfg).apply({"params": params}, x))
  np.testing.assert_allclose(out_t, out_j, atol=1e-5)

  f = [l2_normalize(rng.standard_normal((8, 16)).astype(np.float32)) for _ in range(4)]
  ft = [torch.from_numpy(np.array(a)) for a in f]
  want = losses.stage1_distill_terms(*f, chunk=4)
  got = common.torch_distill_terms(*ft, chunk=4)
  for k in ("loss", "ins", "struct"):
    np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-5, atol=1e-5)
  want = losses.image_distill_terms(f[0], f[1], chunk=8)
  got = common.torch_distill_terms(ft[0], ft[1], chunk=8)
  np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      float(common.torch_clip_loss(ft[0], ft[1], torch.tensor(math.log(50.0)))),
      float(losses.clip_loss(f[0], f[1], math.log(50.0))), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ benchmarks end to end


def _args(module, argv):
  parser = argparse.ArgumentParser()
  module.add_args(parser)
  return parser.parse_args(argv)


def _records(capsys):
  return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


STEP_KEYS = {"benchmark", "side", "median_s", "min_s", "max_s", "items_per_s",
             "model_flops_per_step", "achieved_flops_per_s", "fraction_of_peak",
             "matmul_peak_flops_per_s", "peak_bytes", "peak_source"}
TINY1 = ["--batch", "4", "--llm-dim", "32", "--embed-dim", "16", "--expansion", "2",
         "--text-layers", "1", "--steps", "2", "--warmup", "1", "--peak-n", "64"]
TINY2 = ["--batch", "4", "--layers", "1", "--width", "32", "--heads", "2", "--image-size",
         "16", "--patch-size", "8", "--embed-dim", "16", "--llm-dim", "32", "--expansion",
         "2", "--steps", "2", "--warmup", "1", "--peak-n", "64"]


def test_stage1_benchmark_jax_only(capsys):
  assert stage1.run(_args(stage1, TINY1 + ["--no-torch"])) == 0
  recs = _records(capsys)
  assert [r["side"] for r in recs] == ["jax"]
  r = recs[0]
  assert STEP_KEYS | {"compile_s", "xla_flops_per_step"} <= set(r)
  assert r["benchmark"] == "stage1" and r["batch"] == 4 and math.isfinite(r["first_loss"])
  ad = AdapterConfig(in_dim=32, out_dim=16, expansion=2)
  assert r["model_flops_per_step"] == common.stage1_step_flops(ad, 4)
  assert r["xla_flops_per_step"] >= r["model_flops_per_step"]


def test_stage1_benchmark_with_torch(capsys):
  pytest.importorskip("torch")
  assert stage1.run(_args(stage1, TINY1)) == 0
  recs = {r["side"]: r for r in _records(capsys)}
  assert set(recs) == {"jax", "torch", "ratio"}
  assert STEP_KEYS <= set(recs["torch"])
  # The PyTorch side ran in its worker process: its first step equals the same side built
  # here, in this process, and the worker reported its own memory and matmul rate.
  assert recs["torch"]["torch_process"] == "worker"
  _, here = stage1.torch_side(_args(stage1, TINY1), stage1.make_batch(_args(stage1, TINY1)))
  assert recs["torch"]["first_loss"] == pytest.approx(here["first_loss"], rel=1e-6)
  assert recs["torch"]["peak_source"] == "maxrss_torch_process"
  assert recs["torch"]["peak_bytes"] > 0 and recs["torch"]["torch_matmul_peak_flops_per_s"] > 0
  assert recs["torch"]["model_flops_per_step"] > recs["jax"]["model_flops_per_step"]
  ratio = recs["ratio"]
  assert ratio["ratio_median"] == pytest.approx(
      recs["torch"]["median_s"] / recs["jax"]["median_s"])
  assert ratio["target"] == 4.0 and isinstance(ratio["target_met"], bool)


def test_stage2_benchmark_jax_only(capsys):
  assert stage2.run(_args(stage2, TINY2 + ["--no-torch", "--scan"])) == 0
  recs = _records(capsys)
  assert [r["side"] for r in recs] == ["jax"]
  r = recs[0]
  assert STEP_KEYS | {"compile_s", "xla_flops_per_step", "flops_breakdown", "temp_bytes"} <= set(r)
  assert r["temp_bytes"] > 0
  assert r["scan"] is True and r["donate"] is True and math.isfinite(r["first_loss"])
  vis = VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2, embed_dim=16)
  ad = AdapterConfig(in_dim=32, out_dim=16, expansion=2)
  assert r["model_flops_per_step"] == common.stage2_step_flops(vis, ad, 4)["total"]
  assert r["attention"] == "dense"
  # The same step with the tower's fused-attention path (jax.nn.dot_product_attention on
  # padded tokens): the same first loss.
  assert stage2.run(_args(stage2, TINY2 + ["--no-torch", "--scan", "--attention", "xla"])) == 0
  fused = _records(capsys)[0]
  assert fused["attention"] == "xla"
  assert fused["first_loss"] == pytest.approx(r["first_loss"], abs=1e-5)


def test_stage2_benchmark_tower_and_step_beside_torch(capsys):
  """``--part tower``: the image tower's share of the step on both sides, with its FLOPs."""
  pytest.importorskip("torch")
  assert stage2.run(_args(stage2, TINY2 + ["--part", "tower", "--torch-dtypes", "float32"])) == 0
  recs = _records(capsys)
  assert [r["side"] for r in recs] == ["jax", "torch", "ratio"]
  assert all(r["part"] == "tower" for r in recs)
  vis = VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2, embed_dim=16)
  ad = AdapterConfig(in_dim=32, out_dim=16, expansion=2)
  full = common.stage2_step_flops(vis, ad, 4)
  for r in recs[:2]:
    assert r["model_flops_per_step"] == full["vision"] + full["teacher"] < full["total"]
    # The teacher is not the student's copy, so the distillation loss is a real, positive one.
    assert math.isfinite(r["first_loss"]) and r["first_loss"] > 1e-3
  assert recs[0]["flops_breakdown"] == {"total": full["vision"] + full["teacher"],
                                        "vision": full["vision"], "teacher": full["teacher"]}
  assert recs[2]["ratio_median"] == pytest.approx(recs[1]["median_s"] / recs[0]["median_s"])
  # The whole step on both sides (the default part), for comparison: the same FLOP count on
  # both, which includes the adapter.
  assert stage2.run(_args(stage2, TINY2 + ["--torch-dtypes", "float32"])) == 0
  step = _records(capsys)
  assert [r["side"] for r in step] == ["jax", "torch", "ratio"]
  assert all(r["part"] == "step" for r in step)
  assert step[0]["model_flops_per_step"] == step[1]["model_flops_per_step"] == full["total"]
  assert all(math.isfinite(r["first_loss"]) for r in step[:2])


TINYP = ["--hidden", "32", "--layers", "2", "--heads", "2", "--intermediate", "64",
         "--batch-size", "8", "--length", "8", "--batches", "2", "--runs", "1"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_precompute_benchmark_both_sides_compute_the_same_embeddings(capsys, dtype):
  pytest.importorskip("torch")
  assert precompute.run(_args(precompute, TINYP + ["--compute-dtype", dtype])) is None
  recs = _records(capsys)
  assert [r["impl"] for r in recs] == ["jax"] + ["torch"] * 3 + ["ratio"] * 3
  jax_rec, torch_recs, ratios = recs[0], recs[1:4], recs[4:]
  assert jax_rec["compute_dtype"] == dtype
  assert jax_rec["captions_per_s"] == pytest.approx(16 / jax_rec["median_s"])
  modes = ["float32", "bfloat16", "autocast"]
  assert [r["torch_dtype"] for r in torch_recs] == [r["torch_dtype"] for r in ratios] == modes
  for t, r in zip(torch_recs, ratios):
    assert r["jax_dtype"] == dtype
    assert r["jax_over_torch"] == pytest.approx(jax_rec["captions_per_s"] / t["captions_per_s"])
    assert r["same_dtype"] == ((r["torch_dtype"] == "float32") == (dtype == "float32"))
    assert ("target_met" in r) == r["same_dtype"]
    # The pooled embeddings are O(1): two float32 sides agree to rounding; with bfloat16 on
    # either side they agree to bfloat16's precision.
    tol = 1e-5 if dtype == r["torch_dtype"] == "float32" else 0.05
    assert 0 <= r["max_abs_diff_first_batch"] < tol


def test_precompute_benchmark_refuses_unknown_torch_dtype():
  with pytest.raises(SystemExit, match="float16"):
    precompute.run(_args(precompute, TINYP + ["--torch-dtypes", "float32,float16"]))


def test_benchmark_cli_reports_a_bad_cpu_device_count():
  import os, subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, os.path.join(root, "tools", "benchmark.py"), "precompute",
                      "--cpu-devices", "0"], capture_output=True, text=True, timeout=120,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2, r.stderr
  assert "CPU devices 0: give auto or a positive count" in r.stderr
  assert "Traceback" not in r.stderr


def test_torch_worker_runs_steps_and_reports_errors():
  pytest.importorskip("torch")
  args = _args(stage1, TINY1)
  with common.TorchWorker(stage1.__name__, args, stage1.make_batch(args)) as worker:
    assert worker.names == [""] and worker.peaks == {}
    worker.step("")
    worker.step("")
  assert worker.peak_rss_bytes > 0
  # A module without a PyTorch side: the child's traceback comes back in the error.
  with pytest.raises(RuntimeError, match="torch_side"):
    common.TorchWorker("benchmarks.input", args, {})
