"""Ahead-of-time compile of the train step for a TPU slice (proclip_jax/train/aot.py).

Compiles a tiny stage-2 step for ``v5e:2x2`` (4 chips, data 2 x fsdp 2) with XLA:TPU on this
CPU-only host: needs ``libtpu`` from requirements-tpu.txt (the suite runs on the CPU platform,
JAX_PLATFORMS=cpu, so libtpu is only loaded for the compile). The per-chip argument bytes are
checked against the sharded state and batch computed from the shapes and shardings, the
FLOP count against the model's, and the collectives parser against hand-written HLO.
"""
import dataclasses
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from experiments.run import apply_override, load_config  # noqa: E402
from proclip_jax.errors import ProclipError  # noqa: E402
from proclip_jax.flops import adapter_forward_flops, vit_forward_flops  # noqa: E402
from proclip_jax.train import aot  # noqa: E402
from proclip_jax import mesh as mesh_lib  # noqa: E402
from proclip_jax.train.state import abstract_train_state  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 24          # 6 examples per chip; no other dimension of the tiny model is 24
TOKENS = 5          # (32 / 16)^2 patches + the class token
WIDTH = 64
TINY = {"data.batch_size": BATCH, "mesh.fsdp": 2, "model.vision.layers": 2,
        "model.vision.width": WIDTH, "model.vision.heads": 2, "model.vision.image_size": 32,
        "model.vision.embed_dim": 32, "model.vision.remat": "nothing_saveable",
        "model.adapter.in_dim": 96, "model.adapter.out_dim": 32}


def tiny_config(**extra):
  config = load_config("stage2.py:size=B/16,scan,shapes=True")
  for k, v in {**TINY, **extra}.items():
    apply_override(config, k, str(v))
  return config


@pytest.fixture(scope="module")
def report():
  return aot.compile_step(tiny_config(), "v5e:2x2", keep_hlo=True)


def _shard_bytes(tree) -> int:
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def test_memory_is_the_sharded_state_and_batch(report):
  config = tiny_config()
  devices = aot.topology_devices("v5e:2x2")
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  abstract, _ = abstract_train_state(config, mesh)
  expected = _shard_bytes(abstract) + _shard_bytes(aot.batch_structs(config, mesh))
  m = report["memory"]
  assert report["chips"] == 4 and report["device_kind"].startswith("TPU v5")
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  # XLA:TPU pads arrays to its (8, 128) tiles, which roughly doubles this tiny model's
  # small leaves; the sharded sizes are a lower bound (a ViT-L/14 state is within a few %).
  assert expected <= m["argument_bytes"] <= 2.5 * expected
  assert m["total_bytes"] == (m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"]
                              + m["temp_bytes"] + m["code_bytes"])
  assert m["alias_bytes"] > 0  # the donated state is updated in place
  assert m["hbm_bytes"] == 16 * 2 ** 30 and report["fits"] is True


def test_flops_against_the_model_count(report):
  f = report["flops"]
  assert f["step"] == f["per_chip"] * 4
  config = tiny_config()
  assert f["model"] == aot.model_step_flops(config)
  # Scanned: the loop body once; remat nothing_saveable: one more forward of that layer.
  one = aot.model_config(tiny_config(**{"model.vision.layers": 1})).vision
  layer = (vit_forward_flops(one, BATCH)
           - vit_forward_flops(dataclasses.replace(one, layers=0), BATCH))
  once = tiny_config(**{"model.vision.layers": 1, "model.vision.remat": "none"})
  assert f["model_as_compiled"] == aot.model_step_flops(once) + layer
  # The tiny model's elementwise work is a large share; the matmuls dominate at real sizes
  # (docs/scale.md), here only the order of magnitude is checked.
  assert 0.5 < f["ratio"] < 2.0
  # Every loop unrolled, the HLO's products are what the model says the step executes (the
  # loss's B x B products are the only ones the model leaves out).
  assert f["model_executed"] == aot.model_executed_flops(config)
  assert f["loops"]["count"] >= 3 and f["loops"]["unknown_trip_count"] == 0
  assert f["step_loops_unrolled"] > f["step_matmul_once"]
  assert abs(f["ratio_loops_unrolled"] - 1) < 0.01, f


def test_model_executed_flops_by_hand():
  """Remat recomputes each layer but its MLP's second product; pixels take no gradient;
  GradCache adds one forward of the image tower and the adapter."""
  config = tiny_config()
  vis = aot.model_config(config).vision
  b, t, w, mlp = BATCH, TOKENS, WIDTH, 4 * WIDTH
  layer = 2 * b * t * (4 * w * w + 2 * t * w + 2 * w * mlp)
  patch = 2 * b * (t - 1) * 16 * 16 * 3 * w
  recompute = vis.layers * (layer - 2 * b * t * mlp * w)
  assert aot.model_executed_flops(config) == aot.model_step_flops(config) - patch + recompute
  no_remat = tiny_config(**{"model.vision.remat": "none"})
  assert aot.model_executed_flops(no_remat) == aot.model_step_flops(no_remat) - patch
  micro = tiny_config(microbatches=2)
  adapter = aot.model_config(micro).adapter
  assert aot.model_executed_flops(micro) == (aot.model_executed_flops(config)
                                             + vit_forward_flops(vis, b)
                                             + adapter_forward_flops(adapter, b))


def test_microbatch_loops_counted_by_trip_count():
  """GradCache's two scans over k = 2 micro-batches: the cost analysis counts each body
  once (about half the step), the loop-aware count all of it."""
  f = aot.compile_step(tiny_config(microbatches=2), "v5e:2x2")["flops"]
  assert f["ratio"] < 0.85, f
  assert abs(f["ratio_loops_unrolled"] - 1) < 0.01, f


def test_no_global_batch_activation_crosses_chips(report):
  """Activations stay split over (data, fsdp): no collective of a [B, tokens, *] array."""
  coll, batch_ops = aot.collectives(report["hlo"], BATCH)
  assert coll == report["collectives"]
  assert coll["all-gather"]["count"] > 0  # fsdp gathers the weights
  shapes = [op["shape"] for op in batch_ops]
  assert not any(f"[{BATCH}, {TOKENS}" in s for s in shapes), shapes


def test_collectives_parser():
  hlo = "\n".join([
      "  %ag = bf16[8,128]{1,0:T(8,128)} all-gather(%p), dimensions={0}",
      "  %ags = (f32[2,4], f32[8,4]) all-gather-start(%q), dimensions={0}",
      "  %agd = f32[8,4]{1,0} all-gather-done(%ags)",
      "  %ar = f32[8]{0} all-reduce(%x), to_apply=%add",
      "  %rs = (bf16[4,16], f32[2]) reduce-scatter(%a, %b), dimensions={0}",
      "  %cp = s32[3]{0} collective-permute(%c), source_target_pairs={{0,1}}",
      "  %f = f32[8]{0} fusion(%ar), calls=%all-reduce-like",
  ])
  coll, batch_ops = aot.collectives(hlo, 8)
  assert coll["all-gather"] == {"count": 2, "bytes": 8 * 128 * 2 + 8 * 4 * 4}
  assert coll["all-reduce"] == {"count": 1, "bytes": 32}
  assert coll["reduce-scatter"] == {"count": 1, "bytes": 4 * 16 * 2 + 2 * 4}
  assert coll["collective-permute"] == {"count": 1, "bytes": 12}
  assert coll["all-to-all"] == {"count": 0, "bytes": 0}
  assert [(op["kind"], op["shape"]) for op in batch_ops] == [
      ("all-gather", "bf16[8, 128]"), ("all-gather", "f32[8, 4]"), ("all-reduce", "f32[8]")]
  _, batch_ops = aot.collectives(hlo, 8, frozenset({(8, 128)}))
  assert [op["shape"] for op in batch_ops] == ["f32[8, 4]", "f32[8]"]


def _lowered(fn, *shapes):
  lowered = jax.jit(fn).lower(*(jax.ShapeDtypeStruct(s, np.float32) for s in shapes))
  return lowered.as_text(dialect="hlo"), lowered.cost_analysis()["flops"]


@pytest.mark.parametrize("conv", [
    dict(window_strides=(1, 1), padding=[(0, 0), (0, 0)]),
    dict(window_strides=(2, 1), padding=[(1, 2), (0, 1)], lhs_dilation=(1, 3), rhs_dilation=(2, 1),
         feature_group_count=2),
    dict(window_strides=(3, 2), padding=[(2, 2), (1, 0)], lhs_dilation=(2, 1)),
])
def test_hlo_matmul_flops_of_convolutions_match_xla(conv):
  """XLA:TPU writes products as convolutions with padded, dilated windows: their FLOPs
  (the valid taps only) against XLA's own cost analysis of the same HLO."""
  from jax import lax  # pylint: disable=import-outside-toplevel

  def fn(x, w):
    return lax.conv_general_dilated(x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"), **conv)
  text, cost = _lowered(fn, (2, 9, 7, 4), (3, 2, 4 // conv.get("feature_group_count", 1), 6))
  counted = aot.hlo_matmul_flops(text)
  assert counted["flops"] == counted["flops_once"] == cost > 0


def test_hlo_matmul_flops_multiplies_loop_bodies():
  def fn(c, w, a):
    c = jax.lax.fori_loop(0, 5, lambda i, c: c @ w, c)   # carried: not hoisted
    return c, jax.numpy.einsum("bij,bjk->bik", a, a.transpose(0, 2, 1))
  text, cost = _lowered(fn, (4, 8), (8, 8), (3, 4, 5))
  counted = aot.hlo_matmul_flops(text)
  body, batched = 2 * 4 * 8 * 8, 2 * 3 * 4 * 5 * 4
  assert counted["loops"] == [{"while": counted["loops"][0]["while"], "body": counted["loops"][0]["body"],
                               "trip_count": 5, "body_flops": body}]
  assert counted["flops"] == 5 * body + batched and counted["flops_once"] == body + batched
  # XLA's cost analysis counts the body once (plus the counter's add and compare).
  assert 0 <= cost - counted["flops_once"] <= 2


# The shape of an XLA:TPU windowed einsum (docs/scale.md): a u32 counter stepped by 2 (two
# partial products an iteration, one per ring direction) up to 4, i.e. 2 iterations.
WINDOWED = """\
%cond (p.1: (u32[], bf16[8,16])) -> pred[] {
  %p.1 = (u32[]{:T(128)}, bf16[8,16]{1,0:T(8,128)}) parameter(0)
  %c.4 = u32[]{:T(128)} constant(4)
  %i.1 = u32[]{:T(128)} get-tuple-element(%p.1), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i.1, %c.4), direction=LT
}

%fused (x: bf16[8,16], y: bf16[16,32]) -> bf16[8,32] {
  %x = bf16[8,16]{1,0} parameter(0)
  %y = bf16[16,32]{1,0} parameter(1)
  ROOT %conv = bf16[8,32]{1,0} convolution(%x, %y), dim_labels=bf_io->bf
}

%body (p.2: (u32[], bf16[8,16])) -> (u32[], bf16[8,16]) {
  %p.2 = (u32[]{:T(128)}, bf16[8,16]{1,0:T(8,128)}) parameter(0)
  %i.2 = u32[]{:T(128)} get-tuple-element(%p.2), index=0
  %a.2 = bf16[8,16]{1,0} get-tuple-element(%p.2), index=1
  %w.2 = bf16[16,32]{1,0} constant({...})
  %f.1 = bf16[8,32]{1,0} fusion(%a.2, %w.2), kind=kOutput, calls=%fused
  %f.2 = bf16[8,32]{1,0} fusion(%a.2, %w.2), kind=kOutput, calls=%fused
  %two = u32[]{:T(128)} constant(2)
  %next = u32[]{:T(128)} add(%i.2, %two)
  ROOT %t.2 = (u32[]{:T(128)}, bf16[8,16]{1,0:T(8,128)}) tuple(%next, /*index=1*/%a.2)
}

ENTRY %main (a: bf16[8,16]) -> bf16[8,16] {
  %a = bf16[8,16]{1,0} parameter(0)
  %zero = u32[]{:T(128)} constant(0)
  %t = (u32[]{:T(128)}, bf16[8,16]{1,0:T(8,128)}) tuple(%zero, %a)
  %w = (u32[]{:T(128)}, bf16[8,16]{1,0:T(8,128)}) while(%t), condition=%cond, body=%body
  %k = (u32[]{:T(128)}, bf16[8,16]{1,0:T(8,128)}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = bf16[8,16]{1,0} get-tuple-element(%w), index=1
}
"""


def test_hlo_matmul_flops_windowed_einsum_loop():
  counted = aot.hlo_matmul_flops(WINDOWED)
  per_iteration = 2 * (2 * 8 * 16 * 32)
  assert [(l["while"], l["trip_count"], l["body_flops"]) for l in counted["loops"]] == [
      ("w", 2, per_iteration), ("k", 3, per_iteration)]
  assert counted["flops"] == 5 * per_iteration and counted["flops_once"] == 2 * per_iteration
  with pytest.raises(ProclipError, match="no ENTRY computation"):
    aot.hlo_matmul_flops("%x = f32[2] parameter(0)")


def test_bad_topology():
  with pytest.raises(ProclipError, match="v5e:8x8"):
    aot.chip_kind("v7x:2x2")
  with pytest.raises(ProclipError, match="GENERATION:SHAPE"):
    aot.chip_kind("v5e")


def test_cli_prints_one_json_object_and_reports_mistakes():
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  bad = subprocess.run([sys.executable, "tools/aot_compile.py", "--config", "stage2.py",
                        "--topology", "v9:2x2"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.startswith("error: Topology 'v9:2x2'"), bad.stderr
  assert bad.stdout == ""


def test_remat_policy_from_the_command_line():
  from proclip_jax.models.vit import remat_policy  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  apply_override(config, "model.vision.remat", "dots_saveable")
  assert config.model.vision.remat == "dots_saveable"
  assert remat_policy(config.model.vision.remat) is jax.checkpoint_policies.dots_saveable
  assert remat_policy(False) is None and remat_policy("none") is None
  assert remat_policy(True) == "full" and remat_policy("full") == "full"
  with pytest.raises(ProclipError, match="no_such_policy"):
    remat_policy("no_such_policy")


def test_compute_cast_leaves_bf16_outputs_unchanged():
  """Casting the matmul weights before the step (for bf16 gathers) changes no value."""
  from proclip_jax.models.proclip import ProCLIPModel  # pylint: disable=import-outside-toplevel
  from proclip_jax.train.state import model_config  # pylint: disable=import-outside-toplevel
  from proclip_jax.train.steps import compute_cast  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"model.vision.remat": "none"})
  model = ProCLIPModel(model_config(config))
  params = jax.tree.map(lambda x: getattr(x, "value", x),
                        model.init_boxed(jax.random.key(0)),
                        is_leaf=lambda x: hasattr(x, "value"))
  cast = compute_cast(params["visual"], "bfloat16")
  dtypes = {"/".join(str(getattr(k, "key", k)) for k in p): x.dtype
            for p, x in jax.tree_util.tree_leaves_with_path(cast)}
  assert dtypes["conv1/kernel"] == jax.numpy.bfloat16 and dtypes["proj"] == jax.numpy.bfloat16
  assert dtypes["ln_pre/scale"] == np.float32 and dtypes["positional_embedding"] == np.float32
  assert dtypes["transformer/blocks/ln_1/bias"] == np.float32
  assert dtypes["transformer/blocks/attn/query/bias"] == jax.numpy.bfloat16
  pixels = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(model.image_features(cast, pixels)),
                                np.asarray(model.image_features(params["visual"], pixels)))
  feats = np.random.default_rng(1).standard_normal((2, 96)).astype(np.float32)
  np.testing.assert_array_equal(
      np.asarray(model.text_features(compute_cast(params["adapter"], "bfloat16"), feats)),
      np.asarray(model.text_features(params["adapter"], feats)))


# ------------------------------------------------------------------------ precompute forward

PRE_BATCH, PRE_LEN = 24, 16
TINY_LLAMA = {"model.model.vocab_size": 512, "model.model.hidden_size": 128,
              "model.model.intermediate_size": 256, "model.model.num_layers": 2,
              "model.model.num_heads": 4, "model.model.num_kv_heads": 2,
              "model.model.head_dim": 32}


def precompute_config(**extra):
  config = load_config(f"precompute.py:batch={PRE_BATCH},length={PRE_LEN}")
  for k, v in {**TINY_LLAMA, "mesh.fsdp": 2, **extra}.items():
    apply_override(config, k, str(v))
  return config


def test_precompute_forward_compiles_for_a_slice():
  """The embedder forward of tools/precompute.py, parameters sharded over fsdp = 2."""
  config = precompute_config()
  report = aot.compile_precompute(config, "v5e:2x2", keep_hlo=True)
  assert report["what"] == "precompute" and report["chips"] == 4
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert (report["global_batch"], report["length"]) == (PRE_BATCH, PRE_LEN)
  # Arguments: the frozen parameters (kernels in bf16, embeddings and norms f32) split over
  # fsdp, and three int32 [batch, length] token arrays split over data x fsdp.
  from proclip_jax.models import embedder as E  # pylint: disable=import-outside-toplevel
  mcfg = E.model_config_from_dict(config.model.to_dict())
  h, i, v = 128, 256, 512
  layer = h * (4 * 32 + 2 * 2 * 32) + 3 * h * i   # q, o (4 heads) + k, v (2) + gated MLP
  kernels, f32 = 2 * layer, v * h + (2 * 2 + 1) * h   # embedding + 2 norms a layer + final
  param_bytes = 2 * kernels + 4 * f32
  tokens = 3 * PRE_BATCH * PRE_LEN * 4
  m = report["memory"]
  assert param_bytes / 2 + tokens / 4 <= m["argument_bytes"] <= 2.5 * (param_bytes / 2
                                                                       + tokens / 4)
  assert report["fits"] is True and m["hbm_bytes"] == 16 * 2 ** 30
  f = report["flops"]
  assert f["model"] == aot.embedder_forward_flops(mcfg, PRE_BATCH, PRE_LEN)
  # By hand: 2 layers of projections, attention (in full) and the gated MLP.
  t = PRE_BATCH * PRE_LEN
  assert f["model"] == 2 * (2 * t * h * (2 * 128 + 2 * 64) + 4 * PRE_BATCH * 4 * PRE_LEN ** 2
                            * 32 + 6 * t * h * i)
  assert 0.5 < f["ratio"] < 2.0
  coll, _ = aot.collectives(report["hlo"], PRE_BATCH)
  assert coll == report["collectives"] and coll["all-gather"]["count"] > 0   # fsdp weights


def test_precompute_cli_and_mistakes():
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  over = [f"--config.{k}={v}" for k, v in TINY_LLAMA.items()]
  ok = subprocess.run([sys.executable, "tools/aot_compile.py", "--config",
                       f"precompute.py:batch=8,length={PRE_LEN}", "--topology", "v5e:2x2",
                       "--config.mesh.fsdp=4", *over], cwd=REPO, env=env,
                      capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr
  import json  # pylint: disable=import-outside-toplevel
  out = json.loads(ok.stdout)
  assert out["what"] == "precompute" and out["mesh"]["fsdp"] == 4 and "hlo" not in out
  with pytest.raises(ProclipError, match=r"batch_size=6 must be a positive multiple"):
    aot.compile_precompute(precompute_config(**{"precompute.batch_size": 6}), "v5e:2x2")
  with pytest.raises(ProclipError, match=r"length=9999"):
    aot.compile_precompute(precompute_config(**{"precompute.length": 9999}), "v5e:2x2")
  with pytest.raises(ProclipError, match="known: llm2clip_llama3_8b"):
    load_config("precompute.py:embedder=nope")
