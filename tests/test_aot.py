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
from proclip_jax.flops import vit_forward_flops  # noqa: E402
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
