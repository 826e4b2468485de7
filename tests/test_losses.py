"""Losses against independent NumPy transcriptions of the method file's formulas.

Values and gradients: NumPy float64 references (central finite differences for gradients) on
small sizes; the blockwise and sharded InfoNCE against the dense one (value and gradients,
float32 rounding), the sharded one on the 8 simulated CPU devices of conftest.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proclip_jax import losses
from proclip_jax.errors import ProclipError

LN100 = float(np.log(100.0))


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def randn_unit(rng, b, e):
  return unit(rng.normal(size=(b, e)))


# ------------------------------------------------------------------ NumPy references

def np_clip(img, txt, logit_scale):
  """½[CE(s·img·txtᵀ, arange) + CE(s·txt·imgᵀ, arange)], mean over rows, float64."""
  s = np.exp(logit_scale)
  total = 0.0
  for logits in (s * img @ txt.T, s * txt @ img.T):
    for i in range(logits.shape[0]):
      row = logits[i]
      m = row.max()
      lse = m + np.log(np.sum(np.exp(row - m)))
      total += 0.5 * (lse - row[i])
  return total / img.shape[0]


def np_smooth_l1(x):
  return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


def np_ins(s, t):
  return sum(float(np.sum((s[i] - t[i]) ** 2)) for i in range(len(s)))


def np_struct(s, t):
  total = 0.0
  for i in range(len(s)):
    for j in range(i + 1, len(s)):
      total += np_smooth_l1(np.linalg.norm(s[i] - s[j]) - np.linalg.norm(t[i] - t[j]))
  return total


def np_stage1(ss, ts, sr, tr, chunk):
  chunks = []
  for k in range(0, len(ss), chunk):
    sl = slice(k, k + chunk)
    chunks.append(np_ins(ss[sl], ts[sl]) + np_ins(sr[sl], tr[sl]) + np_struct(ss[sl], ts[sl]))
  return float(np.mean(chunks))


def np_image(img, tea, chunk):
  chunks = [np_ins(img[k:k + chunk], tea[k:k + chunk]) + np_struct(img[k:k + chunk],
                                                                   tea[k:k + chunk])
            for k in range(0, len(img), chunk)]
  return float(np.mean(chunks))


def fd_grad(f, args, argnum, h=1e-6):
  """Central finite differences of the float64 function f w.r.t. args[argnum]."""
  x = np.array(args[argnum], np.float64)
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    plus, minus = x.copy(), x.copy()
    plus[idx] += h
    minus[idx] -= h
    a = list(args)
    a[argnum] = plus
    fp = f(*a)
    a[argnum] = minus
    grad[idx] = (fp - f(*a)) / (2 * h)
  return grad


# ------------------------------------------------------------------------ dense InfoNCE

def test_clip_loss_value_and_grad_vs_numpy_fd(rng):
  img, txt = randn_unit(rng, 6, 5), randn_unit(rng, 6, 5)
  ls = np.log(30.0)
  value, grads = jax.value_and_grad(losses.clip_loss, argnums=(0, 1, 2))(
      jnp.float32(img), jnp.float32(txt), jnp.float32(ls))
  assert value.dtype == jnp.float32 and value.shape == ()
  np.testing.assert_allclose(value, np_clip(img, txt, ls), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grads[0], fd_grad(np_clip, (img, txt, ls), 0), atol=2e-5)
  np.testing.assert_allclose(grads[1], fd_grad(np_clip, (img, txt, ls), 1), atol=2e-5)
  f_ls = lambda s: np_clip(img, txt, s)
  d_ls = (f_ls(ls + 1e-6) - f_ls(ls - 1e-6)) / 2e-6
  np.testing.assert_allclose(grads[2], d_ls, atol=2e-5)


def test_clip_loss_large_scale_is_stable(rng):
  img, txt = randn_unit(rng, 16, 8), randn_unit(rng, 16, 8)
  value = losses.clip_loss(jnp.float32(img), jnp.float32(txt), LN100)
  np.testing.assert_allclose(value, np_clip(img, txt, LN100), rtol=1e-6)


# ------------------------------------------------------------------------ distillation

def test_stage1_value_and_grads_vs_numpy(rng):
  b, e, chunk = 8, 4, 4
  ss, ts, sr, tr = (randn_unit(rng, b, e) for _ in range(4))
  args32 = [jnp.float32(x) for x in (ss, ts, sr, tr)]
  terms = losses.stage1_distill_terms(*args32, chunk=chunk)
  np.testing.assert_allclose(terms["loss"], np_stage1(ss, ts, sr, tr, chunk), rtol=2e-6)
  np.testing.assert_allclose(terms["ins_short"], np.mean([np_ins(ss[:4], ts[:4]),
                                                          np_ins(ss[4:], ts[4:])]), rtol=2e-6)
  np.testing.assert_allclose(terms["ins_raw"], np.mean([np_ins(sr[:4], tr[:4]),
                                                        np_ins(sr[4:], tr[4:])]), rtol=2e-6)
  np.testing.assert_allclose(terms["struct"], np.mean([np_struct(ss[:4], ts[:4]),
                                                       np_struct(ss[4:], ts[4:])]), rtol=2e-6)
  np.testing.assert_allclose(terms["ins"], terms["ins_short"] + terms["ins_raw"], rtol=1e-6)
  assert float(losses.stage1_distill_loss(*args32, chunk)) == float(terms["loss"])
  grads = jax.grad(losses.stage1_distill_loss, argnums=(0, 2))(*args32, chunk)
  ref = lambda a, b_, c, d: np_stage1(a, b_, c, d, chunk)
  np.testing.assert_allclose(grads[0], fd_grad(ref, (ss, ts, sr, tr), 0), atol=2e-5)
  np.testing.assert_allclose(grads[1], fd_grad(ref, (ss, ts, sr, tr), 2), atol=2e-5)


def test_image_distill_value_and_grads_vs_numpy(rng):
  img, tea = randn_unit(rng, 6, 5), randn_unit(rng, 6, 5)
  # A partly trained student is near its teacher: exercise both SmoothL1 branches.
  img[:3] = unit(tea[:3] + 0.05 * rng.normal(size=(3, 5)))
  terms = losses.image_distill_terms(jnp.float32(img), jnp.float32(tea), 3)
  np.testing.assert_allclose(terms["loss"], np_image(img, tea, 3), rtol=2e-6)
  np.testing.assert_allclose(terms["ins"], np.mean([np_ins(img[:3], tea[:3]),
                                                    np_ins(img[3:], tea[3:])]), rtol=2e-6)
  np.testing.assert_allclose(terms["struct"], np.mean([np_struct(img[:3], tea[:3]),
                                                       np_struct(img[3:], tea[3:])]), rtol=2e-6)
  grad = jax.grad(losses.image_distill_loss)(jnp.float32(img), jnp.float32(tea), 3)
  ref = lambda a, b: np_image(a, b, 3)
  np.testing.assert_allclose(grad, fd_grad(ref, (img, tea), 0), atol=2e-5)


def test_identical_rows_give_finite_gradients(rng):
  img, tea = randn_unit(rng, 8, 6), randn_unit(rng, 8, 6)
  img[1] = img[0]   # identical student rows: zero distance on the student side
  img[5] = img[4]
  tea[5] = tea[4]   # ... and on both sides for one pair
  img_j, tea_j = jnp.float32(img), jnp.float32(tea)
  g = jax.grad(losses.image_distill_loss, argnums=(0, 1))(img_j, tea_j, 4)
  assert all(np.isfinite(np.asarray(x)).all() for x in g)
  g1 = jax.grad(losses.stage1_distill_loss, argnums=(0, 1, 2, 3))(img_j, tea_j, img_j, tea_j, 8)
  assert all(np.isfinite(np.asarray(x)).all() for x in g1)
  # The distance between the identical rows is exactly 0, so the value matches NumPy.
  np.testing.assert_allclose(losses.image_distill_loss(img_j, tea_j, 4),
                             np_image(img, tea, 4), rtol=2e-6)
  # A fully collapsed student (all rows equal) and its teacher: still finite.
  same = jnp.float32(np.repeat(img[:1], 8, axis=0))
  g2 = jax.grad(losses.image_distill_loss)(same, same, 8)
  assert np.isfinite(np.asarray(g2)).all()
  assert float(losses.image_distill_loss(same, same, 8)) == 0.0


def test_chunk_semantics(rng):
  ss, ts, sr, tr = (jnp.float32(randn_unit(rng, 12, 4)) for _ in range(4))
  whole = losses.stage1_distill_loss(ss, ts, sr, tr, 6)
  halves = [losses.stage1_distill_loss(ss[k:k + 6], ts[k:k + 6], sr[k:k + 6], tr[k:k + 6], 6)
            for k in (0, 6)]
  np.testing.assert_allclose(whole, np.mean(halves), rtol=1e-6)
  img_whole = losses.image_distill_loss(ss, ts, 4)
  img_parts = [losses.image_distill_loss(ss[k:k + 4], ts[k:k + 4], 4) for k in (0, 4, 8)]
  np.testing.assert_allclose(img_whole, np.mean(img_parts), rtol=1e-6)
  # A chunk larger than the batch is one chunk of the whole batch.
  np.testing.assert_allclose(losses.image_distill_loss(ss, ts, 512),
                             losses.image_distill_loss(ss, ts, 12), rtol=0)
  with pytest.raises(ProclipError, match=r"12.*5"):
    losses.stage1_distill_loss(ss, ts, sr, tr, 5)
  with pytest.raises(ProclipError, match=r"12.*7"):
    losses.image_distill_loss(ss, ts, 7)
  with pytest.raises(ProclipError, match="shape"):
    losses.image_distill_loss(ss, ts[:6], 6)


# ----------------------------------------------------------------- blockwise / sharded

def _dense_and(fn, img, txt, ls, cot=2.5):
  """Value and gradients (upstream cotangent ``cot``) of the dense loss and of ``fn``."""
  out = []
  for f in (losses.clip_loss, fn):
    v, g = jax.jit(jax.value_and_grad(lambda a, b, c: cot * f(a, b, c), argnums=(0, 1, 2)))(
        img, txt, ls)
    out.append((v / cot, g))
  return out


@pytest.fixture(scope="module")
def pair():
  r = np.random.default_rng(1)
  return jnp.float32(randn_unit(r, 64, 24)), jnp.float32(randn_unit(r, 64, 24))


@pytest.mark.parametrize("block", [16, 64, 1000])
def test_blockwise_equals_dense(pair, block):
  img, txt = pair
  (v0, g0), (v1, g1) = _dense_and(lambda a, b, c: losses.clip_loss_blockwise(a, b, c, block),
                                  img, txt, jnp.float32(LN100))
  np.testing.assert_allclose(v1, v0, rtol=1e-6, atol=1e-5)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_blockwise_bf16_inputs_and_errors(pair):
  img, txt = pair
  gi = jax.grad(losses.clip_loss_blockwise)(img.astype(jnp.bfloat16), txt.astype(jnp.bfloat16),
                                            LN100, 16)
  assert gi.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      losses.clip_loss_blockwise(img.astype(jnp.bfloat16), txt.astype(jnp.bfloat16), 2.0, 16),
      losses.clip_loss(img.astype(jnp.bfloat16), txt.astype(jnp.bfloat16), 2.0), rtol=1e-6)
  with pytest.raises(ProclipError, match=r"64.*24"):
    losses.clip_loss_blockwise(img, txt, LN100, 24)
  with pytest.raises(ProclipError, match="impl"):
    losses.contrastive_loss(img, txt, LN100, impl="ring")


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def test_sharded_equals_dense_8_devices(pair):
  assert jax.device_count() == 8
  img, txt = pair
  mesh = _mesh((8,), ("data",))
  with jax.set_mesh(mesh):
    (v0, g0), (v1, g1) = _dense_and(
        lambda a, b, c: losses.contrastive_loss(a, b, c, impl="sharded", block=4),
        img, txt, jnp.float32(LN100))
  np.testing.assert_allclose(v1, v0, rtol=1e-6, atol=1e-5)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_sharded_two_batch_axes_and_replicated_axis(pair):
  img, txt = pair
  ls = jnp.float32(np.log(20.0))
  mesh = _mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  (v0, g0), (v1, g1) = _dense_and(
      lambda a, b, c: losses.clip_loss_sharded(a, b, c, mesh=mesh, axis_names=("data", "fsdp"),
                                               block=8), img, txt, ls, cot=1.0)
  np.testing.assert_allclose(v1, v0, rtol=1e-6, atol=1e-5)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ProclipError, match=r"16.*5"):   # 64 rows / 4 devices = 16 per device
    losses.clip_loss_sharded(img, txt, ls, mesh=mesh, axis_names=("data", "fsdp"), block=5)
  with pytest.raises(ProclipError, match="not axes"):
    losses.clip_loss_sharded(img, txt, ls, mesh=mesh, axis_names=("batch",))


def test_loss_memory_benchmark_small(capsys):
  """The benchmark runs at a tiny size; tiles keep temp memory below the dense B×B logits."""
  import argparse
  import json
  from benchmarks import loss_memory
  parser = argparse.ArgumentParser()
  loss_memory.add_args(parser)
  loss_memory.run(parser.parse_args(["--batch", "1024", "--dim", "8", "--block", "16",
                                     "--time-batches", "64", "--warmup", "0", "--runs", "1",
                                     "--platform", "default"]))
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  mem = {r["impl"]: r for r in records if r["what"] == "memory_per_device"}
  assert set(mem) == set(loss_memory.IMPLS) and all(r["devices"] == 8 for r in mem.values())
  assert mem["dense"]["temp_bytes"] >= 1024 * 1024 * 4      # the logits themselves
  assert mem["blockwise"]["temp_bytes"] < mem["dense"]["temp_bytes"] / 4
  assert mem["sharded"]["temp_bytes"] < mem["dense_spmd"]["temp_bytes"] / 4
  times = [r for r in records if r["what"] == "time_value_and_grad"]
  assert len(times) == 4
  np.testing.assert_allclose([r["loss"] for r in times], times[0]["loss"], rtol=1e-6)
