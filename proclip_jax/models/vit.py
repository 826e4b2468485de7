"""The OpenAI-CLIP image tower (ViT) in Flax Linen, and the transformer block it shares.

Architecture (as OpenAI's ``VisionTransformer``): a conv patch stem without bias, a class
token, learned position embeddings, ``ln_pre``, pre-LN residual blocks (multi-head
self-attention, MLP with QuickGELU or GELU), ``ln_post`` on the class token and a bias-free
projection ``[width, E]`` to the joint space. LayerNorm eps is 1e-5.

Parameter layout (float32; logical axis names in brackets)::

    conv1/kernel                    [p, p, 3, width]     (None, None, None, embed)
    class_embedding                 [width]              (embed)
    positional_embedding            [1 + g*g, width]     (None, embed)
    ln_pre/{scale,bias}             [width]              (embed)
    transformer/blocks_{i}/...      one block per layer; with ``scan_layers`` a single
    transformer/blocks/...          block whose leaves have a leading [layers] axis
    ln_post/{scale,bias}            [width]
    proj                            [width, E]           (embed, joint)   (absent if E is None)

A block holds ``ln_1``, ``attn/{query,key,value}/{kernel [width, heads, head_dim], bias
[heads, head_dim]}``, ``attn/out/{kernel [heads, head_dim, width], bias [width]}``, ``ln_2``,
``mlp/c_fc/{kernel [width, mlp], bias}``, ``mlp/c_proj/{kernel [mlp, width], bias}``.
:func:`stack_layers` / :func:`unstack_layers` move between the two layouts.

Input: NHWC float32 CLIP-normalised pixels. Output: unnormalised projected features [N, E]
(or the pooled ``ln_post`` class token with ``project=False``).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from proclip_jax.errors import ProclipError
from proclip_jax.models.config_dict import DictConfig
from proclip_jax.mesh import constrain

# Logical axes of the residual stream [batch, tokens, width]: in a sharded step the rules put
# the batch over the data and fsdp axes, so each chip runs its own examples through every layer.
ACT_AXES = ("batch", "length", "embed")

# ------------------------------------------------------------------------- configuration

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")
DTYPES = ("float32", "bfloat16", "float16")
# "dense": explicit heads-major matmuls, a float32 softmax and a written-out backward
# (:func:`softmax_attention`; the reference path, fastest on
# the CPU). "xla" / "cudnn": ``jax.nn.dot_product_attention`` with that ``implementation`` on
# tokens padded to a multiple of FUSED_TOKEN_MULTIPLE; "cudnn" is cuDNN's fused (flash)
# kernel, for bfloat16 / float16 on an NVIDIA GPU.
ATTENTIONS = ("dense", "xla", "cudnn")
FUSED_TOKEN_MULTIPLE = 8

_VISION_VARIANTS = {
    "B/32": dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, embed_dim=512),
    "B/16": dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, embed_dim=512),
    "L/14": dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, embed_dim=768),
    "L/14-336": dict(image_size=336, patch_size=14, width=1024, layers=24, heads=16,
                     embed_dim=768),
}


def check_options(name: str, width: int, heads: int, act: str, dtype: str, remat) -> None:
  if heads <= 0 or width % heads:
    raise ProclipError(f"{name}: width {width} is not divisible by heads {heads}.")
  if act not in ACTIVATIONS:
    raise ProclipError(f"{name}: unknown act {act!r}; use one of {ACTIVATIONS}.")
  if dtype not in DTYPES:
    raise ProclipError(f"{name}: unknown dtype {dtype!r}; use one of {DTYPES}.")
  remat_policy(remat, name)


# ``remat`` values besides the jax.checkpoint_policies names: no rematerialisation, or
# recompute everything in the backward (jax.checkpoint without a policy). Booleans (and their
# command-line spellings) are the older form of the same two.
REMAT_NONE = ("none", "false", "off", "no", "0")
REMAT_FULL = ("full", "true", "on", "yes", "1")


def remat_policy(remat, name: str = "remat"):
  """``remat`` -> ``None`` (no remat), ``"full"`` or a ``jax.checkpoint_policies`` function.

  ``remat`` is a bool (False / True) or a string: "none", "full", or a policy name such as
  "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable".
  """
  if isinstance(remat, bool):
    return "full" if remat else None
  text = str(remat).strip().lower()
  if text in REMAT_NONE:
    return None
  if text in REMAT_FULL:
    return "full"
  policy = getattr(jax.checkpoint_policies, str(remat).strip(), None)
  if policy is None or str(remat).startswith("_"):
    raise ProclipError(
        f"{name}: remat={remat!r} is not 'none', 'full' or a jax.checkpoint_policies name "
        "(e.g. 'nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable').")
  return policy


@dataclasses.dataclass(frozen=True)
class VisionConfig(DictConfig):
  """Architecture and compute options of a CLIP image tower.

  Attributes:
    image_size: input resolution (square); ``image_size // patch_size`` is the grid.
    patch_size: patch (and conv stride) size.
    width: residual stream width.
    layers: number of residual blocks.
    heads: attention heads (``width // heads`` is the head size).
    mlp_dim: MLP hidden size; None means ``4 * width``.
    embed_dim: joint embedding size E of the projection; None means no projection.
    act: "quick_gelu" (OpenAI), "gelu" (exact) or "gelu_tanh".
    ln_eps: LayerNorm epsilon.
    dtype: compute dtype of matmuls ("float32" / "bfloat16"); parameters stay float32.
    remat: rematerialisation of each block in the backward: "none", "full" (recompute
      everything) or a ``jax.checkpoint_policies`` name ("nothing_saveable",
      "dots_saveable", ...); False / True are accepted as "none" / "full".
    scan_layers: run the blocks with ``nn.scan`` (parameters stacked on a "layers" axis).
    attention: how self-attention is computed, one of ``ATTENTIONS`` (same parameters and,
      to rounding, the same result): "dense" by default, "cudnn" for cuDNN's fused kernel on
      a GPU in bfloat16 / float16.
  """
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int | None = None
  embed_dim: int | None = 512
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  attention: str = "dense"

  def __post_init__(self):
    check_options("VisionConfig", self.width, self.heads, self.act, self.dtype, self.remat)
    check_attention("VisionConfig", self.attention, self.dtype)
    if self.image_size % self.patch_size:
      raise ProclipError(
          f"VisionConfig: image_size {self.image_size} is not a multiple of patch_size "
          f"{self.patch_size}.")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def mlp_width(self) -> int:
    return self.mlp_dim or 4 * self.width

  @classmethod
  def named(cls, name: str, **overrides: Any) -> "VisionConfig":
    """A named OpenAI variant ("B/32", "B/16", "L/14", "L/14-336") with field overrides."""
    if name not in _VISION_VARIANTS:
      raise ProclipError(f"Unknown CLIP vision variant {name!r}; known: {list(_VISION_VARIANTS)}.")
    return cls(**{**_VISION_VARIANTS[name], **overrides})



def check_attention(name: str, attention: str, dtype: str) -> None:
  if attention not in ATTENTIONS:
    raise ProclipError(f"{name}: unknown attention {attention!r}; use one of {ATTENTIONS}.")
  if attention == "cudnn" and dtype == "float32":
    raise ProclipError(
        f"{name}: attention='cudnn' runs cuDNN's fused kernel, which takes bfloat16 or float16; "
        "set dtype='bfloat16', or use attention='dense' for float32.")


def _cudnn_unavailable(attention: str) -> bool:
  """Whether ``attention`` is "cudnn" and JAX's backend has no NVIDIA GPU to run it."""
  return attention == "cudnn" and jax.default_backend() != "gpu"


def runnable_here(config: VisionConfig) -> VisionConfig:
  """``config``, with ``attention="dense"`` if it asks for cuDNN and JAX has no GPU.

  For models trained with ``attention="cudnn"`` and used elsewhere (inference on a CPU): the
  parameters are the same and the outputs equal to rounding.
  """
  if _cudnn_unavailable(config.attention):
    return dataclasses.replace(config, attention="dense")
  return config


# --------------------------------------------------------------------------- building blocks

def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def activation(name: str):
  return {"quick_gelu": quick_gelu,
          "gelu": functools.partial(jax.nn.gelu, approximate=False),
          "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}[name]


def partitioned(init, names):
  """``init`` wrapped with logical axis ``names`` (flax ``with_logical_partitioning``)."""
  return nn.with_logical_partitioning(init, names)


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
  """A float32 LayerNorm with partitioned ``scale``/``bias`` over "embed"."""
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                      scale_init=partitioned(nn.initializers.ones, ("embed",)),
                      bias_init=partitioned(nn.initializers.zeros, ("embed",)), name=name)


def fused_attention(q, k, v, implementation: str):
  """``jax.nn.dot_product_attention`` over ``[batch, tokens, heads, head_dim]`` q/k/v.

  The tokens are zero-padded to a multiple of ``FUSED_TOKEN_MULTIPLE`` and the padding keys
  are masked with ``key_value_seq_lengths``; the padding queries' rows are dropped. cuDNN's
  fused kernels refuse odd lengths in training (a ViT has ``1 + grid**2`` tokens, 257 for
  L/14 at 224 px). Returns ``[batch, tokens, heads, head_dim]`` in q's dtype.
  """
  n, t = q.shape[0], q.shape[1]
  pad = -t % FUSED_TOKEN_MULTIPLE
  if pad:
    q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
  out = jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=jnp.full((n,), t, jnp.int32) if pad else None,
      implementation=implementation)
  return out[:, :t]


class Attention(nn.Module):
  """Multi-head self-attention with separate q/k/v kernels ``[width, heads, head_dim]``.

  With ``attention="dense"`` logits, mask and softmax are float32 and the matmuls run in
  ``dtype``; "xla" and "cudnn" use :func:`fused_attention` (no mask). ``tokens``: keys and
  values come from them instead of ``x`` (cross-attention, e.g. SigLIP's MAP head; "dense").
  """
  width: int
  heads: int
  dtype: Any = jnp.float32
  depth: int = 12  # number of blocks, for the output-projection init scale
  attention: str = "dense"

  @nn.compact
  def __call__(self, x, mask=None, tokens=None):
    head_dim = self.width // self.heads
    std = self.width ** -0.5
    proj = functools.partial(
        nn.DenseGeneral, features=(self.heads, head_dim), axis=-1, dtype=self.dtype,
        param_dtype=jnp.float32, kernel_init=partitioned(nn.initializers.normal(std), ("embed", "heads", "kv")),
        bias_init=partitioned(nn.initializers.zeros, ("heads", "kv")))
    q = proj(name="query")(x)
    k = proj(name="key")(x if tokens is None else tokens)
    v = proj(name="value")(x if tokens is None else tokens)
    if self.attention == "dense":
      out = self._dense(q, k, v, mask)
    else:
      if mask is not None:
        raise ProclipError(f"Attention: attention={self.attention!r} takes no mask; the "
                           "masked (text) towers use attention='dense'.")
      if _cudnn_unavailable(self.attention):
        raise ProclipError(
            "Attention: attention='cudnn' needs an NVIDIA GPU (cuDNN), but JAX's backend is "
            f"{jax.default_backend()!r}; use attention='dense' here.")
      out = fused_attention(q, k, v, self.attention)
    out_std = std * (2 * self.depth) ** -0.5
    return nn.DenseGeneral(
        features=self.width, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=partitioned(nn.initializers.normal(out_std), ("heads", "kv", "embed")),
        bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="out")(out)

  def _dense(self, q, k, v, mask):
    heads_major = lambda a: jnp.transpose(a, (0, 2, 1, 3))  # noqa: E731
    out = softmax_attention(heads_major(q), heads_major(k), heads_major(v), mask,
                            (self.width // self.heads) ** -0.5)
    return jnp.transpose(out, (0, 2, 1, 3))


# Heads-major operands, flattened to [batch * heads, tokens, head_dim], make every product a
# plain batched matmul, which XLA:CPU runs much faster than a contraction over
# [batch, tokens, heads, head_dim]. The backward is written out (a custom VJP) because JAX's
# own derivative of the forward lets XLA fuse each batched product with the softmax or its
# backward, and those fusions run slower than the same operations apart; here the forward
# keeps the float32 probabilities and dq, dk, dv are one product each (docs/performance.md).

def _flat(a):
  return a.reshape(-1, *a.shape[2:])


def _attention_fwd(q, k, v, mask, scale):
  n, heads, t = q.shape[:3]
  logits = jnp.einsum("bqd,bkd->bqk", _flat(q), _flat(k), preferred_element_type=jnp.float32)
  logits = logits.reshape(n, heads, t, -1) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bqk,bkd->bqd", _flat(probs).astype(q.dtype), _flat(v))
  return out.reshape(q.shape), (q, k, v, probs, mask)


def _attention_bwd(scale, res, d_out):
  q, k, v, probs, mask = res
  p, do = _flat(probs), _flat(d_out)
  dp = jnp.einsum("bqd,bkd->bqk", do, _flat(v), preferred_element_type=jnp.float32)
  # Softmax backward: dlogits = p * (dp - sum_k p * dp), zero where the mask replaced the logit
  # (p is 0 there already, unless a query has no allowed key at all).
  ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) * scale
  if mask is not None:
    ds = _flat(jnp.where(mask, ds.reshape(probs.shape), 0.0))
  ds = ds.astype(q.dtype)
  dq = jnp.einsum("bqk,bkd->bqd", ds, _flat(k))
  dk = jnp.einsum("bqk,bqd->bkd", ds, _flat(q))
  dv = jnp.einsum("bqk,bqd->bkd", p.astype(q.dtype), do)
  return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def softmax_attention(q, k, v, mask, scale: float):
  """``softmax(q k^T * scale, masked) v`` over heads-major ``[batch, heads, tokens, head_dim]``.

  The products run in q's dtype; logits, softmax and their gradient are float32. ``mask``:
  None or a boolean array broadcastable to ``[batch, heads, q, k]``, True where attention is
  allowed. The backward is written out: it keeps the float32 probabilities from the forward
  and computes ``dq``, ``dk``, ``dv`` from them with one product each.
  """
  return _attention_fwd(q, k, v, mask, scale)[0]


softmax_attention.defvjp(_attention_fwd, _attention_bwd)


class Mlp(nn.Module):
  width: int
  mlp_dim: int
  act: str = "quick_gelu"
  dtype: Any = jnp.float32
  depth: int = 12

  @nn.compact
  def __call__(self, x):
    std = self.width ** -0.5
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=partitioned(nn.initializers.normal((2 * self.width) ** -0.5), ("embed", "mlp")),
                 bias_init=partitioned(nn.initializers.zeros, ("mlp",)), name="c_fc")(x)
    h = activation(self.act)(h)
    return nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=partitioned(nn.initializers.normal(std * (2 * self.depth) ** -0.5),
                                   ("mlp", "embed")),
                    bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="c_proj")(h)


class ResidualBlock(nn.Module):
  """Pre-LN block: ``x + attn(ln_1(x), mask)``, then ``x + mlp(ln_2(x))``.

  ``mask``: None (full attention) or a boolean array broadcastable to
  ``[batch, heads, q, k]``, True where attention is allowed (the text tower passes a causal
  mask). The residual stream stays float32.
  """
  width: int
  heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  dtype: Any = jnp.float32
  depth: int = 12
  attention: str = "dense"

  @nn.compact
  def __call__(self, x, mask=None):
    x = constrain(x, ACT_AXES)
    x = x + Attention(self.width, self.heads, self.dtype, self.depth, self.attention,
                      name="attn")(
        layer_norm(self.ln_eps, "ln_1")(x), mask)
    x = x + Mlp(self.width, self.mlp_dim, self.act, self.dtype, self.depth, name="mlp")(
        layer_norm(self.ln_eps, "ln_2")(x))
    return constrain(x, ACT_AXES)


class _ScanBlock(ResidualBlock):
  """The block in ``nn.scan``'s ``(carry, x) -> (carry, out)`` form."""

  def __call__(self, x, mask=None):  # pylint: disable=arguments-renamed
    return super().__call__(x, mask), None


def _remat(block, remat, **kw):
  """``block`` wrapped in ``nn.remat`` with the policy ``remat`` names (or as is for "none")."""
  policy = remat_policy(remat)
  if policy is None:
    return block
  return nn.remat(block, policy=None if policy == "full" else policy, **kw)


class Transformer(nn.Module):
  """``layers`` residual blocks, unrolled (``blocks_{i}``) or scanned (``blocks``)."""
  width: int
  layers: int
  heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  dtype: Any = jnp.float32
  remat: bool | str = "none"
  scan_layers: bool = False
  attention: str = "dense"

  @nn.compact
  def __call__(self, x, mask=None):
    kw = dict(width=self.width, heads=self.heads, mlp_dim=self.mlp_dim, act=self.act,
              ln_eps=self.ln_eps, dtype=self.dtype, depth=self.layers, attention=self.attention)
    if self.scan_layers:
      block = _remat(_ScanBlock, self.remat, prevent_cse=False)
      scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast,), length=self.layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(name="blocks", **kw)(x, mask)
      return x
    block = _remat(ResidualBlock, self.remat)
    for i in range(self.layers):
      x = block(name=f"blocks_{i}", **kw)(x, mask)
    return x


# ------------------------------------------------------------------------------ the tower

def check_images(images, size: int, tower: str, fix: str) -> None:
  """Refuses anything but NHWC RGB images of ``size`` x ``size`` for the image tower ``tower``."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ProclipError(f"{tower} expects NHWC images [N, H, W, 3], got {images.shape}.")
  if images.shape[1:3] != (size, size):
    raise ProclipError(f"{tower}: images are {images.shape[1]}x{images.shape[2]} but the model "
                       f"takes {size}x{size}. {fix}")


class VisionTransformer(nn.Module):
  """OpenAI-CLIP ViT image tower.

  ``__call__(images, project=True)``: ``images`` NHWC float32 CLIP-normalised pixels of
  ``config.image_size``; returns unnormalised projected features ``[N, E]`` or, with
  ``project=False`` (or ``embed_dim=None``), the pooled ``ln_post`` class token ``[N, width]``.
  """
  config: VisionConfig

  @nn.compact
  def __call__(self, images, project: bool = True):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    check_images(images, cfg.image_size, "VisionTransformer",
                 "Resize the images, or resample the position embeddings with resample_posemb "
                 "and set image_size.")
    std = cfg.width ** -0.5
    x = nn.Conv(cfg.width, (cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size,) * 2,
                padding="VALID", use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                kernel_init=partitioned(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                name="conv1")(images.astype(jnp.float32))
    n = x.shape[0]
    x = constrain(x.reshape(n, -1, cfg.width).astype(jnp.float32), ACT_AXES)
    cls = self.param("class_embedding", partitioned(nn.initializers.normal(std), ("embed",)),
                     (cfg.width,), jnp.float32)
    pos = self.param("positional_embedding", partitioned(nn.initializers.normal(std), (None, "embed")),
                     (cfg.grid * cfg.grid + 1, cfg.width), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, cfg.width)), x], axis=1) + pos[None]
    x = layer_norm(cfg.ln_eps, "ln_pre")(x)
    x = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_width, cfg.act, cfg.ln_eps,
                    dtype, cfg.remat, cfg.scan_layers, cfg.attention, name="transformer")(x)
    pooled = constrain(layer_norm(cfg.ln_eps, "ln_post")(x[:, 0]), ("batch", "embed"))
    if cfg.embed_dim is None:
      return pooled
    proj = self.param("proj", partitioned(nn.initializers.normal(std), ("embed", "joint")),
                      (cfg.width, cfg.embed_dim), jnp.float32)
    if not project:
      return pooled
    return jnp.dot(pooled.astype(dtype), proj.astype(dtype),
                   preferred_element_type=jnp.float32)


# ------------------------------------------------------------------ layouts and resampling

_BLOCK_RE = re.compile(r"^blocks_(\d+)$")


def stack_layers(params: Mapping) -> dict:
  """Per-layer layout (``blocks_0..blocks_{L-1}``) -> scan layout (``blocks``, leading axis).

  Works on any tree (a tower, a whole CLIP); nodes without ``blocks_i`` are copied as is.
  """
  if not isinstance(params, Mapping):
    return params
  idx = sorted(int(m.group(1)) for k in params if (m := _BLOCK_RE.match(str(k))))
  out = {k: stack_layers(v) for k, v in params.items() if not _BLOCK_RE.match(str(k))}
  if idx:
    if idx != list(range(len(idx))):
      raise ProclipError(f"stack_layers: block indices {idx} are not 0..{len(idx) - 1}.")
    blocks = [params[f"blocks_{i}"] for i in idx]
    out["blocks"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)
  return out


def unstack_layers(params: Mapping) -> dict:
  """Scan layout (``blocks`` with a leading layer axis) -> per-layer ``blocks_{i}``."""
  if not isinstance(params, Mapping):
    return params
  out = {k: unstack_layers(v) for k, v in params.items() if k != "blocks"}
  if "blocks" in params:
    leaves = jax.tree.leaves(params["blocks"])
    n = leaves[0].shape[0]
    for i in range(n):
      out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), params["blocks"])
  return out


def resample_posemb(posemb, new_grid: int | Sequence[int], method: str = "bicubic"):
  """Resamples ``[1 + g*g, width]`` position embeddings to a new grid; the class token is kept.

  Args:
    posemb: the ``positional_embedding`` parameter (class token first, square grid).
    new_grid: int or (rows, cols) of the new patch grid.
    method: "bicubic" or "bilinear" (``jax.image.resize``).
  Returns:
    float32 ``[1 + rows*cols, width]``.
  """
  posemb = jnp.asarray(posemb, jnp.float32)
  n, width = posemb.shape
  g = int(round((n - 1) ** 0.5))
  if g * g != n - 1:
    raise ProclipError(f"resample_posemb: {n - 1} patch positions do not form a square grid.")
  if method not in ("bicubic", "bilinear"):
    raise ProclipError(f"resample_posemb: method {method!r}; use 'bicubic' or 'bilinear'.")
  rows, cols = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
  grid = posemb[1:].reshape(g, g, width)
  grid = jax.image.resize(grid, (rows, cols, width),
                          method="cubic" if method == "bicubic" else "linear", antialias=False)
  return jnp.concatenate([posemb[:1], grid.reshape(rows * cols, width)], axis=0)
