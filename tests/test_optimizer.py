"""Optimizer: weight-decay mask, layer-decay multipliers (unrolled and scanned), freezing
without optimizer state, the schedule, and the AdamW chain against a NumPy transcription."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from proclip_jax.errors import ProclipError
from proclip_jax.models.adapter import AdapterConfig
from proclip_jax.models.proclip import ProCLIPConfig, ProCLIPModel
from proclip_jax.models.vit import VisionConfig, stack_layers, unstack_layers
from proclip_jax.train import optimizer as opt
from proclip_jax.mesh import logical_names
from proclip_jax.tree import flatten, unflatten

from config_helpers import optim_config


def _model(scan=False):
  vis = VisionConfig(image_size=16, patch_size=8, width=8, layers=2, heads=2, embed_dim=4,
                     scan_layers=scan)
  return ProCLIPModel(ProCLIPConfig(vision=vis, adapter=AdapterConfig(6, 4, expansion=2)))


@pytest.fixture(scope="module")
def tree():
  m = _model()
  boxed = m.abstract()
  from flax.core import meta
  return meta.unbox(boxed), logical_names(boxed)


DECAYED = {
    "visual/conv1/kernel", "visual/proj",
    *(f"visual/transformer/blocks_{i}/{p}" for i in range(2) for p in (
        "attn/query/kernel", "attn/key/kernel", "attn/value/kernel", "attn/out/kernel",
        "mlp/c_fc/kernel", "mlp/c_proj/kernel")),
    "adapter/block_0/fn_0/kernel", "adapter/block_0/fn_3/kernel", "adapter/proj/kernel",
}


def test_decay_mask(tree):
  params, _ = tree
  mask = flatten(opt.decay_mask(params))
  assert {k for k, v in mask.items() if v} == DECAYED
  # Everything else: biases, LayerNorms, class/positional embeddings, logit scale.
  assert not mask["logit_scale"] and not mask["visual/class_embedding"]
  assert not mask["visual/positional_embedding"] and not mask["adapter/ln_final/scale"]


def test_layer_decay_multipliers_unrolled(tree):
  params, names = tree
  d = 0.5
  mult = flatten(opt.lr_multipliers(params, names, layer_decay=d,
                                    lr_mults=[(r"^adapter/", 3.0), (r"ln_post", 2.0)]))
  # L = 2 blocks: stem d^3, block 0 d^2, block 1 d^1, head 1; adapter 3 (module rule).
  want = {"visual/conv1/kernel": 0.125, "visual/class_embedding": 0.125,
          "visual/positional_embedding": 0.125, "visual/ln_pre/scale": 0.125,
          "visual/ln_pre/bias": 0.125,
          "visual/transformer/blocks_0/attn/query/kernel": 0.25,
          "visual/transformer/blocks_0/ln_2/bias": 0.25,
          "visual/transformer/blocks_1/mlp/c_fc/kernel": 0.5,
          "visual/ln_post/scale": 2.0, "visual/proj": 1.0,
          "adapter/block_0/fn_0/kernel": 3.0, "adapter/proj/bias": 3.0, "logit_scale": 1.0}
  for k, v in want.items():
    assert mult[k] == pytest.approx(v), k
  assert len(mult) == len(flatten(params))


def test_layer_decay_scanned_matches_unrolled(tree):
  params, names = tree
  m = _model(scan=True)
  boxed = m.abstract()
  from flax.core import meta
  sparams, snames = meta.unbox(boxed), logical_names(boxed)
  mult = flatten(opt.lr_multipliers(sparams, snames, layer_decay=0.5))
  k = "visual/transformer/blocks/attn/query/kernel"
  assert mult[k].shape == (2, 1, 1, 1)
  np.testing.assert_allclose(mult[k].ravel(), [0.25, 0.5])
  assert mult["visual/conv1/kernel"] == pytest.approx(0.125)
  # The whole chain on the scanned layout equals the unrolled one, leaf by leaf.
  rng = np.random.default_rng(0)
  p_un = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), params)
  g_un = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), params)
  cfg = optim_config(lr=0.1, weight_decay=0.1, layer_decay=0.5, grad_clip_norm=1.0)
  p_sc = {**p_un, "visual": stack_layers(p_un["visual"])}
  g_sc = {**g_un, "visual": stack_layers(g_un["visual"])}
  outs = []
  for p, g, nm in ((p_un, g_un, names), (p_sc, g_sc, snames)):
    tx, _ = opt.make_optimizer(cfg, p, 10, names=nm)
    st = tx.init(p)
    update = jax.jit(tx.update)
    for _ in range(2):
      u, st = update(g, st, p)
    outs.append(u)
  u_sc = {**outs[1], "visual": unstack_layers(outs[1]["visual"])}
  for k, v in flatten(outs[0]).items():
    np.testing.assert_allclose(np.asarray(v), np.asarray(flatten(u_sc)[k]), atol=1e-7,
                               err_msg=k)


def test_partition_and_no_state_for_frozen(tree):
  params, names = tree
  freeze = [r"^visual/(conv1|class_embedding|positional_embedding|ln_pre)",
            r"^visual/transformer/blocks_0/"]
  trainable, frozen = opt.partition(params, freeze)
  ft, ff = flatten(trainable), flatten(frozen)
  assert set(ft) | set(ff) == set(flatten(params)) and not set(ft) & set(ff)
  assert "visual/transformer/blocks_0/attn/out/bias" in ff
  assert "visual/transformer/blocks_1/attn/out/bias" in ft
  assert flatten(opt.merge(trainable, frozen)).keys() == flatten(params).keys()
  tx, _ = opt.make_optimizer(optim_config(lr=1.0, weight_decay=0.1, layer_decay=0.5), trainable, 10,
                             full_params=params, names=names)
  state = jax.eval_shape(tx.init, trainable)
  paths = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(state)}
  assert not any("blocks_0" in p or "conv1" in p for p in paths)
  n_state = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
  # Adam mu and nu over the trainable leaves only, plus the Adam and schedule counts.
  assert n_state == 2 * n_train + 2
  with pytest.raises(ProclipError, match="matches no parameter"):
    opt.partition(params, [r"^nothing_here"])


def test_schedule():
  s = opt.make_schedule(2.0, total_steps=10, warmup_steps=4, end_lr_ratio=0.1)
  got = [float(s(i)) for i in range(12)]
  want = [2.0 * i / 4 for i in range(4)] + [
      0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * min(i - 4, 6) / 6)) for i in range(4, 12)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  s0 = opt.make_schedule(1.0, total_steps=4)
  np.testing.assert_allclose([float(s0(i)) for i in range(5)],
                             [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                              0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0], atol=1e-7)


def test_adamw_chain_matches_numpy():
  rng = np.random.default_rng(1)
  params = {"visual": {"conv1": {"kernel": rng.normal(size=(2, 3)).astype(np.float32)},
                       "transformer": {"blocks_0": {"mlp": {"c_fc": {
                           "kernel": rng.normal(size=(3, 2)).astype(np.float32),
                           "bias": rng.normal(size=(2,)).astype(np.float32)}}}},
                       "proj": rng.normal(size=(2, 2)).astype(np.float32)},
            "logit_scale": np.float32(4.0)}
  cfg = optim_config(lr=0.01, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.3, layer_decay=0.5,
                     grad_clip_norm=0.7, warmup_steps=1, lr_mults=[("logit_scale", 5.0)])
  tx, sched = opt.make_optimizer(cfg, params, total_steps=5)
  mult = {"visual/conv1/kernel": 0.25, "visual/transformer/blocks_0/mlp/c_fc/kernel": 0.5,
          "visual/transformer/blocks_0/mlp/c_fc/bias": 0.5, "visual/proj": 1.0,
          "logit_scale": 5.0}
  decay = {"visual/conv1/kernel", "visual/transformer/blocks_0/mlp/c_fc/kernel", "visual/proj"}
  p_np = {k: np.asarray(v, np.float64) for k, v in flatten(params).items()}
  mu = {k: 0 * v for k, v in p_np.items()}
  nu = {k: 0 * v for k, v in p_np.items()}
  state = tx.init(params)
  p_jx = params
  for t in range(1, 5):
    g = {k: rng.normal(size=np.shape(v)) * 3 for k, v in p_np.items()}
    norm = math.sqrt(sum(float(np.sum(v * v)) for v in g.values()))
    g = {k: v * min(1.0, 0.7 / norm) for k, v in g.items()}
    lr = 0.01 * (t - 1) / 1 if t - 1 < 1 else 0.01 * 0.5 * (1 + math.cos(math.pi * (t - 2) / 4))
    np.testing.assert_allclose(float(sched(t - 1)), lr, rtol=1e-6)
    for k in p_np:
      mu[k] = 0.8 * mu[k] + 0.2 * g[k]
      nu[k] = 0.95 * nu[k] + 0.05 * g[k] ** 2
      u = (mu[k] / (1 - 0.8 ** t)) / (np.sqrt(nu[k] / (1 - 0.95 ** t)) + 1e-6)
      if k in decay:
        u = u + 0.3 * p_np[k]
      p_np[k] = p_np[k] - lr * mult[k] * u
    grads = unflatten({k: np.asarray(v, np.float32) * (norm / min(norm, 0.7))
                       for k, v in g.items()})
    updates, state = tx.update(grads, state, p_jx)
    p_jx = jax.tree.map(lambda p, u: p + u, p_jx, updates)
  for k, v in flatten(p_jx).items():
    np.testing.assert_allclose(np.asarray(v), p_np[k], atol=1e-5, err_msg=k)


def test_clamp_logit_scale():
  got = opt.clamp_logit_scale({"logit_scale": jnp.float32(7.0), "a": 1})
  assert float(got["logit_scale"]) == pytest.approx(math.log(100.0))
  assert float(opt.clamp_logit_scale({"logit_scale": jnp.float32(-2.0)})["logit_scale"]) == 0.0
  assert opt.clamp_logit_scale({"adapter": 1}) == {"adapter": 1}


def test_clip_by_global_norm_equals_optax():
  """The scalar-multiply clip gives optax's values: above, at and below the threshold, and
  for all-zero gradients (no division by zero)."""
  import optax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  g = {"a": rng.normal(size=(5, 7)).astype(np.float32),
       "b": {"c": rng.normal(size=(11,)).astype(np.float32)}}
  norm = float(optax.tree.norm(g))
  for max_norm in (0.25 * norm, norm, 4.0 * norm):
    ours, _ = opt.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
    ref, _ = optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
    for k, v in flatten(ref).items():
      np.testing.assert_allclose(np.asarray(flatten(ours)[k]), np.asarray(v), rtol=1e-6,
                                 atol=0, err_msg=f"{k} at max_norm {max_norm}")
  assert float(optax.tree.norm(opt.clip_by_global_norm(0.25 * norm).update(
      g, optax.EmptyState())[0])) == pytest.approx(0.25 * norm, rel=1e-6)
  zeros = jax.tree.map(np.zeros_like, g)
  out, _ = opt.clip_by_global_norm(1.0).update(zeros, optax.EmptyState())
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))
  # A norm passed in (as the train step passes its own) is the one used, also through the
  # whole optimizer chain.
  half, _ = opt.clip_by_global_norm(norm).update(g, optax.EmptyState(), grad_norm=2.0 * norm)
  for k, v in flatten(g).items():
    np.testing.assert_allclose(np.asarray(flatten(half)[k]), 0.5 * v, rtol=1e-6)
  tx = optax.chain(opt.clip_by_global_norm(norm), optax.scale(-1.0))
  out, _ = tx.update(g, tx.init(g), grad_norm=2.0 * norm)
  np.testing.assert_allclose(np.asarray(out["a"]), -0.5 * g["a"], rtol=1e-6)


# --------------------------------------------------------------- hyper-parameter checks

def _valid_config():
  return ml_collections.ConfigDict({
      "total_steps": 100, "distill_chunk": 512,
      "optim": {"lr": 1e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.05,
                "warmup_steps": 10, "end_lr_ratio": 0.0, "grad_clip_norm": 0.0,
                "layer_decay": 1.0, "lr_mults": (("adapter", 2.0),)},
      "stage2": {"ema_momentum": 0.999, "distill_weight": 1.0, "contrastive_block": 1024}})


def test_validate_hparams_accepts_valid_configs():
  opt.validate_hparams(_valid_config())
  opt.validate_hparams(_valid_config().to_dict())         # a plain nested dict
  opt.validate_hparams({})                                 # nothing set: the defaults
  edge = _valid_config()
  edge.optim.lr, edge.optim.warmup_steps, edge.stage2.ema_momentum = 0.0, 100, 1.0
  edge.stage2.distill_weight, edge.optim.grad_clip_norm, edge.optim.b1 = 0.0, None, 0.0
  opt.validate_hparams(edge)


BAD = [
    ("total_steps", 0), ("total_steps", 2.5), ("optim.lr", float("nan")),
    ("optim.lr", float("inf")), ("optim.lr", -1e-4), ("optim.lr", "1e-4"),
    ("optim.b1", 1.0), ("optim.b1", -0.1), ("optim.b2", 2.0), ("optim.b2", float("nan")),
    ("optim.eps", 0.0), ("optim.weight_decay", -0.05), ("optim.warmup_steps", 101),
    ("optim.warmup_steps", -1), ("optim.end_lr_ratio", 1.5), ("optim.grad_clip_norm", -1.0),
    ("optim.grad_clip_norm", float("inf")), ("optim.layer_decay", 0.0),
    ("optim.layer_decay", 1.2), ("stage2.ema_momentum", 1.01),
    ("stage2.ema_momentum", -0.5), ("stage2.distill_weight", -1.0),
    ("stage2.distill_weight", True), ("distill_chunk", 0), ("stage2.contrastive_block", 0),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v}" for f, v in BAD])
def test_validate_hparams_refuses(field, value):
  cfg = _valid_config().to_dict()
  node = cfg
  *parents, last = field.split(".")
  for p in parents:
    node = node[p]
  node[last] = value
  with pytest.raises(ProclipError) as e:
    opt.validate_hparams(cfg)
  msg = str(e.value)
  assert f"config.{field}=" in msg and "\n" not in msg
  assert "[" in msg or "(" in msg   # the valid range is named


@pytest.mark.parametrize("rule", [("adapter", -1.0), ("adapter", float("nan")), ("adapter",)])
def test_validate_hparams_refuses_bad_lr_mults(rule):
  cfg = _valid_config().to_dict()
  cfg["optim"]["lr_mults"] = [rule]
  with pytest.raises(ProclipError, match=r"config\.optim\.lr_mults\[0\]"):
    opt.validate_hparams(cfg)


def test_trainer_setup_refuses_before_building():
  """state.setup (the trainer's first step) refuses a bad field before the model is built."""
  from proclip_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  cfg = _valid_config().to_dict()
  cfg.update(stage=2, model={"nonsense": True})   # a model this config could never build
  cfg["optim"]["b2"] = 2.0
  with pytest.raises(ProclipError, match=r"config\.optim\.b2=2\.0 is outside .*\[0\.0, 1\.0\)"):
    state_lib.setup(ml_collections.ConfigDict(cfg), None)
