"""CLIP towers in Flax: scan vs unrolled, remat, bf16, posemb resampling, configs, axis names.

Parity with PyTorch lives in test_convert_clip.py; here the references are the same model in
another layout (unrolled blocks), a float32 run, and torch's bilinear interpolation.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from proclip_jax.errors import ProclipError
from proclip_jax.models.clip import CLIP, CLIPConfig, init_clip
from proclip_jax.models.clip_text import TextConfig
from proclip_jax.models.vit import (VisionConfig, VisionTransformer, fused_attention,
                                    resample_posemb, softmax_attention, stack_layers,
                                    unstack_layers)

VISION = VisionConfig(image_size=24, patch_size=8, width=32, layers=2, heads=4, mlp_dim=40,
                      embed_dim=16)
TEXT = TextConfig(vocab_size=60, context_length=12, width=32, layers=2, heads=2, embed_dim=16,
                  act="gelu")
CONFIG = CLIPConfig(vision=VISION, text=TEXT)


@pytest.fixture(scope="module")
def setup():
  params = init_clip(CONFIG, seed=1)
  rng = np.random.default_rng(0)
  # Non-trivial LayerNorms and biases.
  params = jax.tree.map(
      lambda x: (x + 0.05 * rng.normal(size=x.shape)).astype(np.float32), params)
  images = rng.normal(size=(3, 24, 24, 3)).astype(np.float32)
  ids = rng.integers(1, 59, size=(3, 12)).astype(np.int32)
  return params, images, ids


def _run(config, params, images, ids):
  return jax.jit(lambda p: CLIP(config).apply({"params": p}, images, ids))(params)


def test_scan_layout_equals_unrolled(setup):
  params, images, ids = setup
  img, txt, _ = _run(CONFIG, params, images, ids)
  stacked = stack_layers(params)
  assert stacked["visual"]["transformer"]["blocks"]["mlp"]["c_fc"]["kernel"].shape == (2, 32, 40)
  assert "blocks_0" not in stacked["text"]["transformer"]
  img_s, txt_s, _ = _run(CONFIG.replace(scan_layers=True), stacked, images, ids)
  assert np.abs(np.asarray(img) - np.asarray(img_s)).max() <= 1e-5
  assert np.abs(np.asarray(txt) - np.asarray(txt_s)).max() <= 1e-5
  back = unstack_layers(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("remat,scan", [(True, False), ("dots_with_no_batch_dims_saveable", True)])
def test_remat_same_values_and_grads(setup, remat, scan):
  params, images, _ = setup
  base = params["visual"]
  if scan:
    base = stack_layers(base)

  def value_and_grad(config):
    def f(p):
      return jnp.sum(jnp.sin(VisionTransformer(config).apply({"params": p}, images)))
    return jax.jit(jax.value_and_grad(f))(base)

  v0, g0 = value_and_grad(dataclasses.replace(VISION, scan_layers=scan))
  v1, g1 = value_and_grad(dataclasses.replace(VISION, scan_layers=scan, remat=remat))
  assert abs(float(v0) - float(v1)) <= 1e-5
  scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0))
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g0, g1))
  assert max(diffs) <= 1e-5 * scale  # relative to the largest gradient


@pytest.mark.parametrize("scan", [False, True])
def test_fused_attention_same_values_and_grads(setup, scan):
  """attention="xla" (jax.nn.dot_product_attention on 10 tokens padded to 16, the padding keys
  masked) against the dense reference path, values and gradients."""
  params, images, _ = setup
  base = stack_layers(params["visual"]) if scan else params["visual"]

  def value_and_grad(config):
    def f(p):
      return jnp.sum(jnp.sin(VisionTransformer(config).apply({"params": p}, images)))
    return jax.jit(jax.value_and_grad(f))(base)

  v0, g0 = value_and_grad(dataclasses.replace(VISION, scan_layers=scan))
  v1, g1 = value_and_grad(dataclasses.replace(VISION, scan_layers=scan, attention="xla"))
  assert abs(float(v0) - float(v1)) <= 1e-5
  scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0))
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g0, g1))
  assert max(diffs) <= 1e-5 * scale


@pytest.mark.parametrize("tokens", [10, 16])
def test_fused_attention_matches_numpy(tokens):
  rng = np.random.default_rng(3)
  q, k, v = (rng.normal(size=(2, tokens, 3, 8)).astype(np.float32) for _ in range(3))
  out = np.asarray(jax.jit(lambda *a: fused_attention(*a, "xla"))(q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k) / np.sqrt(8)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  ref = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
  assert out.shape == (2, tokens, 3, 8)
  assert np.abs(out - ref).max() <= 1e-5


def test_softmax_attention_values_and_gradients():
  """The written-out attention backward against JAX differentiating the plain formula, with a
  mask that leaves one query no key at all; the values against NumPy in float64."""
  rng = np.random.default_rng(4)
  q, k, v, d_out = (jnp.asarray(rng.normal(size=(2, 3, 7, 8)), jnp.float32) for _ in range(4))
  mask = rng.random((2, 1, 7, 7)) > 0.4
  mask[1, 0, 3, :] = False
  mask = jnp.asarray(mask)

  def plain(q, k, v):
    logits = jnp.einsum("nhqd,nhkd->nhqk", q, k) * 8 ** -0.5
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jnp.einsum("nhqk,nhkd->nhqd", jax.nn.softmax(logits, axis=-1), v)

  out, vjp = jax.vjp(lambda *a: softmax_attention(*a, mask, 8 ** -0.5), q, k, v)
  want_out, want_vjp = jax.vjp(plain, q, k, v)
  logits = np.einsum("nhqd,nhkd->nhqk", np.float64(q), np.float64(k)) / np.sqrt(8)
  logits = np.where(np.asarray(mask), logits, -np.inf)
  logits[1, :, 3, :] = 0.0  # no allowed key: jnp.finfo.min everywhere, a uniform softmax
  p = np.exp(logits - logits.max(-1, keepdims=True))
  ref = np.einsum("nhqk,nhkd->nhqd", p / p.sum(-1, keepdims=True), np.float64(v))
  assert np.abs(np.asarray(out) - ref).max() <= 1e-5
  assert np.abs(np.asarray(out) - np.asarray(want_out)).max() <= 1e-6
  for got, want in zip(vjp(d_out), want_vjp(d_out)):
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5
  # Without a mask, through jax.grad.
  f = lambda *a: jnp.sum(jnp.sin(softmax_attention(*a, None, 0.3)))  # noqa: E731
  g = lambda q, k, v: jnp.sum(jnp.sin(jnp.einsum(  # noqa: E731
      "nhqk,nhkd->nhqd", jax.nn.softmax(jnp.einsum("nhqd,nhkd->nhqk", q, k) * 0.3, -1), v)))
  for got, want in zip(jax.grad(f, (0, 1, 2))(q, k, v), jax.grad(g, (0, 1, 2))(q, k, v)):
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5


def test_cudnn_attention_is_refused_where_it_cannot_run(setup):
  params, images, _ = setup
  with pytest.raises(ProclipError, match="bfloat16"):
    dataclasses.replace(VISION, attention="cudnn")
  config = dataclasses.replace(VISION, attention="cudnn", dtype="bfloat16")
  if jax.default_backend() != "gpu":
    with pytest.raises(ProclipError, match="needs an NVIDIA GPU"):
      VisionTransformer(config).apply({"params": params["visual"]}, images)


def test_bf16_compute_close(setup):
  params, images, ids = setup
  img, txt, _ = _run(CONFIG, params, images, ids)
  img_b, txt_b, _ = _run(CONFIG.replace(dtype="bfloat16"), params, images, ids)
  assert img_b.dtype == jnp.float32
  err = max(np.abs(np.asarray(img) - np.asarray(img_b)).max(),
            np.abs(np.asarray(txt) - np.asarray(txt_b)).max())
  assert 0 < err < 3e-2  # bf16 changes the numbers a little, not the result


def test_bf16_gradients_close(setup):
  """The attention backward in bfloat16 (products in bf16, softmax gradient in float32): both
  towers' float32 parameter gradients within bf16 rounding of the float32 run's."""
  params, images, ids = setup

  def grads(config):
    def f(p):
      img, txt, _ = CLIP(config).apply({"params": p}, images, ids)
      return jnp.sum(jnp.sin(3 * img)) + jnp.sum(jnp.cos(3 * txt))
    return jax.jit(jax.grad(f))(params)

  g32, g16 = grads(CONFIG), grads(CONFIG.replace(dtype="bfloat16"))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g16))
  for tower in ("visual", "text"):
    scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g32[tower]))
    err = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                                           g32[tower], g16[tower])))
    assert 0 < err < 3e-2 * scale, (tower, err, scale)


def test_projection_optional_and_pooled(setup):
  params, images, _ = setup
  vt = VisionTransformer(VISION)
  pooled = vt.apply({"params": params["visual"]}, images, project=False)
  projected = vt.apply({"params": params["visual"]}, images)
  np.testing.assert_allclose(np.asarray(pooled) @ params["visual"]["proj"], projected,
                             atol=1e-5)
  no_proj = dataclasses.replace(VISION, embed_dim=None)
  p = {k: v for k, v in params["visual"].items() if k != "proj"}
  out = VisionTransformer(no_proj).apply({"params": p}, images)
  np.testing.assert_allclose(out, pooled, atol=1e-6)


def test_resample_posemb():
  rng = np.random.default_rng(0)
  pos = rng.normal(size=(1 + 4 * 4, 8)).astype(np.float32)
  same = resample_posemb(pos, 4)
  assert np.abs(np.asarray(same) - pos).max() <= 1e-6
  up = np.asarray(resample_posemb(pos, (6, 5), method="bilinear"))
  np.testing.assert_array_equal(up[0], pos[0])  # class token kept
  grid = torch.tensor(pos[1:].reshape(1, 4, 4, 8)).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=(6, 5), mode="bilinear", align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(30, 8).numpy()
  assert np.abs(up[1:] - ref).max() <= 1e-5
  with pytest.raises(ProclipError):
    resample_posemb(pos[:-1], 4)


def test_configs():
  b16 = VisionConfig.named("B/16", scan_layers=True)
  assert (b16.width, b16.grid, b16.embed_dim, b16.mlp_width) == (768, 14, 512, 3072)
  assert VisionConfig.named("L/14-336").grid == 24
  cfg = CLIPConfig.named("L/14")
  assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
  assert CLIPConfig.from_dict(CONFIG.to_dict()) == CONFIG
  for bad in (dict(heads=5), dict(act="relu"), dict(dtype="int8"), dict(remat="no_such"),
              dict(attention="flash")):
    with pytest.raises(ProclipError):
      dataclasses.replace(VISION, **bad)
  with pytest.raises(ProclipError):
    VisionConfig.named("H/14")
  with pytest.raises(ProclipError):
    CLIPConfig(vision=VISION, text=dataclasses.replace(TEXT, embed_dim=8))


def test_logical_axis_names():
  abstract = jax.eval_shape(lambda: CLIP(CONFIG.replace(scan_layers=True)).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3)), jnp.zeros((1, 12), jnp.int32)))
  boxes = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(b, nn.Partitioned) for b in boxes)
  for b in boxes:
    assert len(b.names) == len(b.value.shape)
  p = abstract["params"]
  assert p["visual"]["transformer"]["blocks"]["attn"]["query"]["kernel"].names == (
      "layers", "embed", "heads", "kv")
  assert p["text"]["token_embedding"].names == ("vocab", "embed")
  assert p["visual"]["proj"].names == ("embed", "joint")


def test_wrong_image_size_is_a_clear_error(setup):
  params, _, _ = setup
  with pytest.raises(ProclipError, match="resample_posemb"):
    VisionTransformer(VISION).apply({"params": params["visual"]}, jnp.zeros((1, 32, 32, 3)))
