"""Micro-batched (GradCache) train steps against the one-shot step: after two steps with
``config.microbatches`` = 4 on a data x fsdp mesh of 8 CPU devices, params, optimizer state,
EMA teacher and metrics equal those of ``microbatches`` = 1 to float32 rounding (stage 2 and
stage 1); the micro-batch split against a NumPy transcription; bad settings refused."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from proclip_jax.errors import ProclipError
from proclip_jax.models.adapter import AdapterConfig
from proclip_jax.models.proclip import ProCLIPConfig
from proclip_jax.models.vit import VisionConfig
from proclip_jax import mesh as mesh_lib
from proclip_jax.train import steps as steps_lib
from proclip_jax.train.state import create_train_state
from proclip_jax.tree import flatten

from config_helpers import make_config

B, D, E, SIZE, K = 32, 24, 16, 16, 4
MESH = {"data": 4, "fsdp": 2}   # 8 batch shards: 4 rows per device, 1 per micro-batch
MODEL = ProCLIPConfig(
    vision=VisionConfig(image_size=SIZE, patch_size=8, width=32, layers=2, heads=2,
                        embed_dim=E, remat="full"),
    adapter=AdapterConfig(in_dim=D, out_dim=E, expansion=2))
# The attention key bias has an exactly zero gradient: its float32 rounding noise, which
# Adam scales to a ±lr step, differs with the order of any sum (tests/test_train_steps.py).
NOISE_ONLY = "attn/key/bias"


def _config(stage, microbatches):
  return make_config({
      "stage": stage, "model": MODEL, "total_steps": 10, "distill_chunk": 8, "seed": 3,
      "microbatches": microbatches, "mesh": MESH,
      "optim": {"lr": 1e-3, "weight_decay": 0.05, "grad_clip_norm": 1.0, "warmup_steps": 0,
                "freeze": [r"^visual/conv1/"] if stage == 2 else []},
      "stage2": {"ema_momentum": 0.9, "distill_weight": 1.0},
  })


def _batches(stage, n):
  r = np.random.default_rng(0)
  if stage == 1:
    make = lambda: {**{f"llm_{f}": r.normal(size=(B, D)) for f in ("short", "raw")},  # noqa: E731
                    **{f"clip_{f}": r.normal(size=(B, E)) for f in ("short", "raw")}}
  else:
    make = lambda: {"image": r.normal(size=(B, SIZE, SIZE, 3)),  # noqa: E731
                    "llm_short": r.normal(size=(B, D)), "llm_long": r.normal(size=(B, D))}
  return [{k: v.astype(np.float32) for k, v in make().items()} for _ in range(n)]


def _run(stage, microbatches, n_steps=2):
  cfg = _config(stage, microbatches)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  state, shardings = create_train_state(cfg, mesh, jax.random.key(0))
  initial = np.array(state.params["adapter"]["proj"]["kernel"], copy=True)
  step = steps_lib.make_train_step(cfg, mesh, shardings)
  batches = _batches(stage, n_steps)
  # Compiled once, ahead of time, so that its optimized HLO can be read without a second
  # compile (the batches hold only the entries the step reads).
  compiled = step.lower(state, batches[0]).compile()
  metrics = []
  for batch in batches:
    with jax.set_mesh(mesh):
      state, m = compiled(state, batch)
    metrics.append(jax.tree.map(np.asarray, m))
  host = jax.tree.map(lambda x: np.array(x, copy=True), state)
  return {"state": host, "metrics": metrics, "hlo": compiled.as_text(), "initial": initial}


@pytest.fixture(scope="module", params=[2, 1], ids=["stage2", "stage1"])
def pair(request):
  stage = request.param
  return stage, _run(stage, 1), _run(stage, K)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _compare_tree(got, want, what, tol):
  fg, fw = flatten(got), flatten(want)
  assert fg.keys() == fw.keys() and fw, what
  worst = 0.0
  for k in fw:
    if NOISE_ONLY in k:
      continue
    err = _rel_err(fg[k], fw[k])
    worst = max(worst, err)
    assert err <= tol, (what, k, err)
  return worst


def test_microbatches_equal_one_shot(pair):
  stage, one, many = pair
  s1, sk = one["state"], many["state"]
  assert int(sk.step) == 2 and int(sk.nonfinite_steps) == 0
  # Adam's moments hold the gradients (mu after two steps: 0.09·g1 + 0.1·g2): they agree to
  # 1e-5. The parameters and the teacher move by m/(√v + eps), which turns the rounding of
  # an element with a tiny gradient into a larger relative change of its update (measured:
  # 1.1e-5 of the largest entry of a leaf), hence 2e-5 there.
  worst = {"params": _compare_tree(sk.params, s1.params, "params", 2e-5)}
  paths = lambda t: {jax.tree_util.keystr(p): x  # noqa: E731
                     for p, x in jax.tree_util.tree_leaves_with_path(t)}
  opt_k, opt_1 = paths(sk.opt_state), paths(s1.opt_state)
  assert opt_k.keys() == opt_1.keys()
  worst["opt_state"] = max(_rel_err(opt_k[p], opt_1[p]) for p in opt_1
                           if "['key']['bias']" not in p)
  assert worst["opt_state"] <= 1e-5
  if stage == 2:
    worst["ema"] = _compare_tree(sk.ema, s1.ema, "ema", 2e-5)
  for i, (mk, m1) in enumerate(zip(many["metrics"], one["metrics"])):
    assert mk.keys() == m1.keys()
    for k in m1:
      np.testing.assert_allclose(mk[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=f"step {i} {k}")
  print(f"stage {stage}: max relative difference, microbatches {K} vs 1: {worst}")
  # Training moved the parameters (the comparison is not between two idle states).
  moved = _rel_err(sk.params["adapter"]["proj"]["kernel"], one["initial"])
  assert moved > 1e-3, moved


def test_split_join_rows():
  # 2 shards of 6 rows, 3 micro-batches: micro-batch i holds rows 2i, 2i+1 of each shard.
  x = jnp.arange(12 * 2, dtype=jnp.float32).reshape(12, 2)
  y = steps_lib._split(x, 3, 2)
  want = np.stack([np.concatenate([np.asarray(x)[s * 6 + 2 * i: s * 6 + 2 * i + 2]
                                   for s in range(2)]) for i in range(3)])
  np.testing.assert_array_equal(np.asarray(y), want)
  np.testing.assert_array_equal(np.asarray(steps_lib._join(y, 2)), np.asarray(x))


def test_micro_batch_slices_stay_on_their_devices(pair):
  # The batch is re-ordered into micro-batches and the features back without moving rows
  # between devices: no all-to-all or collective-permute, as in the one-shot step.
  stage, one, many = pair
  for name, run in (("one-shot", one), ("micro-batched", many)):
    assert "all-to-all" not in run["hlo"] and "collective-permute" not in run["hlo"], name
  assert many["hlo"].count(" while(") >= one["hlo"].count(" while(") + 2  # the two scans


def test_bad_settings():
  for bad in (0, -2, 1.5, True, "4"):
    with pytest.raises(ProclipError, match="microbatches"):
      steps_lib._microbatches(ml_collections.ConfigDict({"microbatches": bad}))
  cfg = _config(1, 3)   # 32 rows over 8 shards: 4 per device, not divisible by 3
  mesh = mesh_lib.make_mesh(cfg.mesh)
  state, shardings = create_train_state(cfg, mesh, jax.random.key(0))
  step = steps_lib.make_train_step(cfg, mesh, shardings)
  with pytest.raises(ProclipError, match="microbatches=3"):
    step(state, _batches(1, 1)[0])
