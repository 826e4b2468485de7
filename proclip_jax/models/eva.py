"""The EVA02-CLIP image tower (EVA02-CLIP-B/16, L/14, L/14-336) in Flax Linen.

Architecture (as timm's ``eva02_*_clip_*`` models and BAAI's ``EVAVisionTransformer`` with
``rope``, ``naiveswiglu``, ``subln``): a conv patch stem with bias, a class token, learned
absolute position embeddings (class token included), no pre-norm, pre-LN blocks, a final
LayerNorm, the class token pooled, and a linear head with bias ``[width, E]``. LayerNorm eps
is 1e-6 everywhere. A block is

    x = x + proj(subLN(attention(q, k, v)))        q, k, v = separate projections of norm1(x);
                                                  q and v have a bias, k has none; 2-D RoPE on
                                                  the patch tokens' q and k (not the class token)
    x = x + fc2(subLN(silu(fc1_g(h)) * fc1_x(h)))  h = norm2(x)  (SwiGLU, hidden mlp_dim)

RoPE (timm's ``RotaryEmbeddingCat`` in "language" mode, EVA's ``VisionRotaryEmbeddingFast``):
with head size ``d``, ``d // 4`` frequencies ``theta ** (-j / (d // 4))``; a patch at grid row
``r`` and column ``c`` has coordinates ``r * ref / g`` and ``c * ref / g`` (``g`` the grid,
``ref`` the pretraining grid, 16 for every EVA02-CLIP); the angles of the row coordinate fill
the first ``d / 2`` channels and those of the column the last ``d / 2``, each angle used by a
pair of adjacent channels, which are rotated together: ``(x0, x1) -> (x0 cos - x1 sin,
x1 cos + x0 sin)``.

Parameter layout (float32; logical axis names in brackets)::

    patch_embed/{kernel [p, p, 3, width], bias [width]}   (None, None, None, embed) / (embed)
    class_embedding                 [width]                (embed)
    positional_embedding            [1 + g*g, width]       (None, embed)
    transformer/blocks_{i}/...      one block per layer; with ``scan_layers`` a single
    transformer/blocks/...          block whose leaves have a leading [layers] axis
    norm/{scale,bias}               [width]
    head/{kernel [width, E], bias [E]}                     (embed, joint) / (joint)

A block holds ``norm1``, ``attn/{query,value}/{kernel [width, heads, head_dim], bias [heads,
head_dim]}``, ``attn/key/kernel``, ``attn/norm`` (the sub-LN over ``width``), ``attn/out/
{kernel [heads, head_dim, width], bias}``, ``norm2``, ``mlp/{fc1_g,fc1_x}/{kernel [width,
mlp], bias [mlp]}``, ``mlp/norm`` (over ``mlp``), ``mlp/fc2/{kernel [mlp, width], bias}``.
The names keep ``optimizer.DEFAULT_STEM`` / ``DEFAULT_NO_DECAY`` and layer-wise decay working
unchanged (``patch_embed``, ``*_embedding``, ``blocks_{i}``, norms). :func:`vit.stack_layers`
/ :func:`vit.unstack_layers` move between the two layouts.

Input: NHWC float32 CLIP-normalised pixels (EVA02-CLIP uses OpenAI's mean and std). Output:
unnormalised projected features ``[N, E]`` (or the pooled class token with ``project=False``),
as :class:`proclip_jax.models.vit.VisionTransformer`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from proclip_jax.errors import ProclipError
from proclip_jax.models.config_dict import DictConfig
from proclip_jax.models import vit
from proclip_jax.models.vit import partitioned

ARCH = "eva02"

_EVA_VARIANTS = {
    "EVA02-B/16": dict(image_size=224, patch_size=16, width=768, layers=12, heads=12,
                       mlp_dim=2048, embed_dim=512),
    "EVA02-L/14": dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16,
                       mlp_dim=2730, embed_dim=768),
    "EVA02-L/14-336": dict(image_size=336, patch_size=14, width=1024, layers=24, heads=16,
                           mlp_dim=2730, embed_dim=768),
}


@dataclasses.dataclass(frozen=True)
class EvaVisionConfig(DictConfig):
  """Architecture and compute options of an EVA02-CLIP image tower.

  Attributes:
    arch: always "eva02"; written into saved configs so that readers pick this tower.
    image_size: input resolution (square); ``image_size // patch_size`` is the grid.
    patch_size: patch (and conv stride) size.
    width: residual stream width.
    layers: number of blocks.
    heads: attention heads (``width // heads`` is the head size; EVA02 uses 64).
    mlp_dim: SwiGLU hidden size (``int(width * 8 / 3)``: 2048 for B, 2730 for L).
    embed_dim: joint embedding size E of the head; None means no head.
    rope_ref_grid: the grid the RoPE coordinates are scaled to (EVA's ``pt_hw_seq_len``,
      timm's ``ref_feat_shape``): 16 for every EVA02-CLIP model.
    rope_theta: RoPE temperature.
    ln_eps: LayerNorm epsilon.
    dtype, remat, scan_layers, attention: as in :class:`vit.VisionConfig`.
  """
  arch: str = ARCH
  image_size: int = 224
  patch_size: int = 14
  width: int = 1024
  layers: int = 24
  heads: int = 16
  mlp_dim: int = 2730
  embed_dim: int | None = 768
  rope_ref_grid: int = 16
  rope_theta: float = 10000.0
  ln_eps: float = 1e-6
  dtype: str = "float32"
  remat: bool | str = False
  scan_layers: bool = False
  attention: str = "dense"

  def __post_init__(self):
    if self.arch != ARCH:
      raise ProclipError(f"EvaVisionConfig: arch is {self.arch!r}; this tower is {ARCH!r}.")
    vit.check_options("EvaVisionConfig", self.width, self.heads, "gelu", self.dtype, self.remat)
    vit.check_attention("EvaVisionConfig", self.attention, self.dtype)
    if (self.width // self.heads) % 4:
      raise ProclipError(
          f"EvaVisionConfig: head size {self.width // self.heads} is not a multiple of 4, which "
          "the 2-D rotary embedding needs (a quarter of the channels per axis and sin/cos).")
    if self.image_size % self.patch_size:
      raise ProclipError(
          f"EvaVisionConfig: image_size {self.image_size} is not a multiple of patch_size "
          f"{self.patch_size}.")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def mlp_width(self) -> int:
    return self.mlp_dim

  @classmethod
  def named(cls, name: str, **overrides: Any) -> "EvaVisionConfig":
    """A named EVA02-CLIP variant ("EVA02-B/16", "EVA02-L/14", "EVA02-L/14-336")."""
    if name not in _EVA_VARIANTS:
      raise ProclipError(f"Unknown EVA02 vision variant {name!r}; known: {list(_EVA_VARIANTS)}.")
    return cls(**{**_EVA_VARIANTS[name], **overrides})



# ------------------------------------------------------------------------------- RoPE

@functools.lru_cache(maxsize=16)
def rope_tables(grid: int, ref_grid: int, head_dim: int, theta: float = 10000.0):
  """``(sin, cos)``, float32 ``[grid * grid, head_dim]`` for the patch tokens (row-major).

  Channels ``[0, d/2)`` carry the row angles, ``[d/2, d)`` the column angles; each angle
  is repeated for the two channels of a rotated pair.
  """
  bands = 1.0 / theta ** (np.arange(head_dim // 4, dtype=np.float64) / (head_dim // 4))
  t = np.arange(grid, dtype=np.float64) / grid * ref_grid
  rows = np.repeat(t[:, None], grid, axis=1)          # [g, g]: the row coordinate
  cols = np.repeat(t[None, :], grid, axis=0)          # [g, g]: the column coordinate
  ang = np.concatenate([rows[..., None] * bands, cols[..., None] * bands], axis=-1)
  ang = np.repeat(ang.reshape(grid * grid, head_dim // 2), 2, axis=-1)
  return np.sin(ang).astype(np.float32), np.cos(ang).astype(np.float32)


def apply_rope(x, sin, cos):
  """Rotates adjacent channel pairs of ``x [..., tokens, heads, d]`` by the table angles."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return x * cos[:, None, :] + rotated * sin[:, None, :]


# --------------------------------------------------------------------------- building blocks

def _norm(eps: float, name: str, axis: str = "embed") -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                      scale_init=partitioned(nn.initializers.ones, (axis,)),
                      bias_init=partitioned(nn.initializers.zeros, (axis,)), name=name)


class EvaAttention(nn.Module):
  """Self-attention with q/v biases, no k bias, RoPE on the patch tokens, a sub-LN before the
  output projection. Kernels as :class:`vit.Attention`."""
  width: int
  heads: int
  grid: int
  ref_grid: int
  theta: float
  ln_eps: float
  dtype: Any = jnp.float32
  depth: int = 24
  attention: str = "dense"

  @nn.compact
  def __call__(self, x):
    head_dim = self.width // self.heads
    std = 0.02
    proj = functools.partial(
        nn.DenseGeneral, features=(self.heads, head_dim), axis=-1, dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(nn.initializers.normal(std), ("embed", "heads", "kv")),
        bias_init=partitioned(nn.initializers.zeros, ("heads", "kv")))
    q = proj(name="query")(x)
    k = proj(name="key", use_bias=False)(x)
    v = proj(name="value")(x)
    sin, cos = (jnp.asarray(a) for a in rope_tables(self.grid, self.ref_grid, head_dim,
                                                     self.theta))

    def rope(a):  # float32 rotation of the patch tokens; the class token is left as is
      rot = apply_rope(a[:, 1:].astype(jnp.float32), sin, cos).astype(a.dtype)
      return jnp.concatenate([a[:, :1], rot], axis=1)

    q, k = rope(q), rope(k)
    if self.attention == "dense":
      heads_major = lambda a: jnp.transpose(a, (0, 2, 1, 3))  # noqa: E731
      out = vit.softmax_attention(heads_major(q), heads_major(k), heads_major(v), None,
                                  head_dim ** -0.5)
      out = jnp.transpose(out, (0, 2, 1, 3))
    else:
      if vit._cudnn_unavailable(self.attention):  # pylint: disable=protected-access
        raise ProclipError(
            "EvaAttention: attention='cudnn' needs an NVIDIA GPU (cuDNN), but JAX's backend is "
            f"{jax.default_backend()!r}; use attention='dense' here.")
      out = vit.fused_attention(q, k, v, self.attention)
    n, t = out.shape[:2]
    out = _norm(self.ln_eps, "norm")(out.reshape(n, t, self.width))
    out = out.reshape(n, t, self.heads, head_dim)
    return nn.DenseGeneral(
        features=self.width, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=partitioned(nn.initializers.normal(std * (2 * self.depth) ** -0.5),
                                ("heads", "kv", "embed")),
        bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="out")(out)


class SwiGLU(nn.Module):
  """``fc2(subLN(silu(fc1_g(x)) * fc1_x(x)))``."""
  width: int
  mlp_dim: int
  ln_eps: float
  dtype: Any = jnp.float32
  depth: int = 24

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(
        nn.Dense, self.mlp_dim, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=partitioned(nn.initializers.normal(0.02), ("embed", "mlp")),
        bias_init=partitioned(nn.initializers.zeros, ("mlp",)))
    gate = dense(name="fc1_g")(x)
    h = jax.nn.silu(gate.astype(jnp.float32)) * dense(name="fc1_x")(x).astype(jnp.float32)
    h = _norm(self.ln_eps, "norm", "mlp")(h)
    return nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=partitioned(nn.initializers.normal(0.02 * (2 * self.depth) ** -0.5),
                                            ("mlp", "embed")),
                    bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="fc2")(h)


class EvaBlock(nn.Module):
  """Pre-LN block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``; float32 residual."""
  config: EvaVisionConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    x = x + EvaAttention(cfg.width, cfg.heads, cfg.grid, cfg.rope_ref_grid, cfg.rope_theta,
                         cfg.ln_eps, dtype, cfg.layers, cfg.attention, name="attn")(
        _norm(cfg.ln_eps, "norm1")(x))
    x = x + SwiGLU(cfg.width, cfg.mlp_dim, cfg.ln_eps, dtype, cfg.layers, name="mlp")(
        _norm(cfg.ln_eps, "norm2")(x))
    return x


class _ScanEvaBlock(EvaBlock):
  """The block in ``nn.scan``'s ``(carry, x) -> (carry, out)`` form."""

  def __call__(self, x):
    return super().__call__(x), None


class EvaTransformer(nn.Module):
  """``layers`` EVA blocks, unrolled (``blocks_{i}``) or scanned (``blocks``)."""
  config: EvaVisionConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    policy = None if cfg.remat is True else (
        getattr(jax.checkpoint_policies, cfg.remat) if cfg.remat else None)
    if cfg.scan_layers:
      block = _ScanEvaBlock
      if cfg.remat is not False:
        block = nn.remat(block, policy=policy, prevent_cse=False)
      scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=cfg.layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(cfg, name="blocks")(x)
      return x
    block = EvaBlock
    if cfg.remat is not False:
      block = nn.remat(block, policy=policy)
    for i in range(cfg.layers):
      x = block(cfg, name=f"blocks_{i}")(x)
    return x


# ------------------------------------------------------------------------------ the tower

class EvaTower(nn.Module):
  """EVA02-CLIP image tower.

  ``__call__(images, project=True)``: ``images`` NHWC float32 CLIP-normalised pixels of
  ``config.image_size``; returns unnormalised projected features ``[N, E]`` or, with
  ``project=False`` (or ``embed_dim=None``), the pooled normed class token ``[N, width]``.
  """
  config: EvaVisionConfig

  @nn.compact
  def __call__(self, images, project: bool = True):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    vit.check_images(images, cfg.image_size, "EvaTower",
                     "Resize the images (the position embeddings and RoPE tables are for that "
                     "grid).")
    x = nn.Conv(cfg.width, (cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size,) * 2,
                padding="VALID", dtype=dtype, param_dtype=jnp.float32,
                kernel_init=partitioned(nn.initializers.lecun_normal(),
                                        (None, None, None, "embed")),
                bias_init=partitioned(nn.initializers.zeros, ("embed",)),
                name="patch_embed")(images.astype(jnp.float32))
    n = x.shape[0]
    x = x.reshape(n, -1, cfg.width).astype(jnp.float32)
    cls = self.param("class_embedding", partitioned(nn.initializers.normal(0.02), ("embed",)),
                     (cfg.width,), jnp.float32)
    pos = self.param("positional_embedding",
                     partitioned(nn.initializers.normal(0.02), (None, "embed")),
                     (cfg.grid * cfg.grid + 1, cfg.width), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, cfg.width)), x], axis=1) + pos[None]
    x = EvaTransformer(cfg, name="transformer")(x)
    pooled = _norm(cfg.ln_eps, "norm")(x[:, 0])  # per-token norm: pooling first is the same
    if cfg.embed_dim is None:
      return pooled
    head = nn.Dense(cfg.embed_dim, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=partitioned(nn.initializers.normal(0.02), ("embed", "joint")),
                    bias_init=partitioned(nn.initializers.zeros, ("joint",)), name="head")
    out = head(pooled)
    return pooled if not project else out.astype(jnp.float32)
