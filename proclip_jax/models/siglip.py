"""The SigLIP / SigLIP 2 image tower (ViT with a MAP head) in Flax Linen.

Architecture (big_vision ``models/vit.py`` with ``pool_type="map"``, as transformers'
``SiglipVisionModel``): a conv patch stem *with* bias, learned position embeddings and no
class token, pre-LN residual blocks (separate q/k/v with biases, MLP with the tanh-approximated
GELU), a final LayerNorm over all tokens, then multihead attention pooling: a learned probe
attends over the tokens, and the result gets ``+ mlp(ln(.))``. LayerNorm eps is 1e-6.
Optionally a Dense (with bias) to a joint dimension E (big_vision's ``img/head``, present
when the two-tower model was built with an image ``out_dim``; the released SigLIP and SigLIP 2
towers have none: their joint space is the width).

SigLIP 2's fixed-resolution towers are this architecture; the NaFlex variant (a Dense patch
embedding on flattened patches, resized position embeddings, masks) is not supported.

Parameter layout (float32; logical axis names in brackets)::

    conv1/{kernel [p, p, 3, width], bias [width]}   (None, None, None, embed) / (embed)
    positional_embedding        [g*g, width]         (None, embed)
    transformer/blocks_{i}/...  the blocks of vit.py (``ln_1``, ``attn/{query,key,value,out}``,
    transformer/blocks/...      ``ln_2``, ``mlp/{c_fc,c_proj}``); stacked on "layers" with scan
    ln_post/{scale,bias}        [width]              the final norm (big_vision encoder_norm)
    head/probe                  [width]              (embed)
    head/attn/{query,key,value}/{kernel [width, heads, head_dim], bias [heads, head_dim]}
    head/attn/out/{kernel [heads, head_dim, width], bias [width]}
    head/ln/{scale,bias}, head/mlp/{c_fc,c_proj}/{kernel,bias}
    proj/{kernel [width, E], bias [E]}               (embed, joint)  (absent if E is None)

Input: NHWC float32 pixels of ``image_size``. With ``pixel_norm="clip"`` (the default) they
are CLIP-normalised, as the rest of the project feeds image towers, and the tower maps them
to SigLIP's ``[-1, 1]`` range (mean 0.5, std 0.5) itself; with ``pixel_norm="siglip"`` they
are already in that range. Output: the pooled features ``[N, width]`` or, with a head,
``[N, E]`` (unnormalised).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from proclip_jax.errors import ProclipError
from proclip_jax.models.config_dict import DictConfig
from proclip_jax.models.vit import (Attention, Mlp, Transformer, check_attention, check_images,
                                    check_options, layer_norm, partitioned)

ARCH = "siglip"
PIXEL_NORMS = ("clip", "siglip")

# big_vision's ``decode_variant`` sizes: width, layers, mlp_dim, heads.
_VARIANTS = {
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "g-opt": (1536, 40, 6144, 16),
}


@dataclasses.dataclass(frozen=True)
class SiglipConfig(DictConfig):
  """Architecture and compute options of a SigLIP image tower.

  Attributes:
    image_size: input resolution (square); ``image_size // patch_size`` is the grid (the
      remainder, if any, is not seen, as in the reference implementations).
    patch_size: patch (and conv stride) size.
    width: residual stream width (the pooled feature size).
    layers: number of residual blocks.
    heads: attention heads, in the blocks and in the MAP head.
    mlp_dim: MLP hidden size (blocks and MAP head); None means ``4 * width``.
    embed_dim: size E of the optional Dense head after pooling; None means no head.
    act: MLP activation; SigLIP uses "gelu_tanh".
    ln_eps: LayerNorm epsilon.
    pixel_norm: what the input pixels are: "clip" (CLIP-normalised, mapped to SigLIP's range
      inside the tower) or "siglip" (already ``(x - 0.5) / 0.5``).
    dtype, remat, scan_layers, attention: as in :class:`proclip_jax.models.vit.VisionConfig`.
    arch: always "siglip"; tells this config from a CLIP ``VisionConfig`` in saved configs.
  """
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int | None = None
  embed_dim: int | None = None
  act: str = "gelu_tanh"
  ln_eps: float = 1e-6
  pixel_norm: str = "clip"
  dtype: str = "float32"
  remat: bool | str = False
  scan_layers: bool = False
  attention: str = "dense"
  arch: str = ARCH

  def __post_init__(self):
    if self.arch != ARCH:
      raise ProclipError(f"SiglipConfig: arch is {self.arch!r}; a SigLIP tower has arch "
                         f"{ARCH!r}.")
    check_options("SiglipConfig", self.width, self.heads, self.act, self.dtype, self.remat)
    check_attention("SiglipConfig", self.attention, self.dtype)
    if self.pixel_norm not in PIXEL_NORMS:
      raise ProclipError(f"SiglipConfig: unknown pixel_norm {self.pixel_norm!r}; use one of "
                         f"{PIXEL_NORMS}.")
    if self.image_size < self.patch_size:
      raise ProclipError(f"SiglipConfig: image_size {self.image_size} is smaller than "
                         f"patch_size {self.patch_size}.")

  @property
  def grid(self) -> int:
    """Patches per side. As in big_vision and transformers, the stride-``patch_size`` conv
    drops a remainder: So400m/14 at 384 px sees 27 x 27 patches (378 px)."""
    return self.image_size // self.patch_size

  @property
  def mlp_width(self) -> int:
    return self.mlp_dim or 4 * self.width

  @property
  def output_dim(self) -> int:
    """Size of the tower's output features (the joint dimension E for ProCLIP)."""
    return self.embed_dim or self.width

  @classmethod
  def named(cls, name: str, image_size: int = 224, **overrides: Any) -> "SiglipConfig":
    """A big_vision variant "SIZE/PATCH" ("B/16", "L/16", "So400m/14", "g-opt/16", ...)."""
    size, _, patch = name.partition("/")
    if size not in _VARIANTS or not patch.isdigit():
      raise ProclipError(f"Unknown SigLIP variant {name!r}: use SIZE/PATCH with SIZE in "
                         f"{list(_VARIANTS)} (e.g. 'So400m/14').")
    width, layers, mlp, heads = _VARIANTS[size]
    base = dict(image_size=image_size, patch_size=int(patch), width=width, layers=layers,
                heads=heads, mlp_dim=None if mlp == 4 * width else mlp)
    return cls(**{**base, **overrides})



def clip_to_siglip_pixels(x):
  """CLIP-normalised pixels -> SigLIP's ``(pixel - 0.5) / 0.5``, per channel, in float32."""
  from proclip_jax.data.transforms import CLIP_MEAN, CLIP_STD  # pylint: disable=import-outside-toplevel
  return x * jnp.asarray(2.0 * CLIP_STD) + jnp.asarray(2.0 * CLIP_MEAN - 1.0)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens, then
  ``+ mlp(ln(.))``. Returns float32 ``[batch, width]``."""
  width: int
  heads: int
  mlp_dim: int
  act: str = "gelu_tanh"
  ln_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    probe = self.param("probe", partitioned(nn.initializers.normal(self.width ** -0.5),
                                            ("embed",)), (self.width,), jnp.float32)
    queries = jnp.broadcast_to(probe, (x.shape[0], 1, self.width))
    out = Attention(self.width, self.heads, self.dtype, name="attn")(queries, tokens=x)
    out = out.astype(jnp.float32)
    out = out + Mlp(self.width, self.mlp_dim, self.act, self.dtype, name="mlp")(
        layer_norm(self.ln_eps, "ln")(out))
    return out[:, 0].astype(jnp.float32)


class SiglipVisionTransformer(nn.Module):
  """SigLIP image tower.

  ``__call__(images, project=True)``: ``images`` NHWC float32 pixels of ``config.image_size``
  (normalised as ``config.pixel_norm`` says); returns the MAP-pooled features ``[N, width]``,
  or ``[N, E]`` through the head when ``embed_dim`` is set and ``project`` is True.
  """
  config: SiglipConfig

  @nn.compact
  def __call__(self, images, project: bool = True):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    check_images(images, cfg.image_size, "SiglipVisionTransformer", "Resize the images.")
    x = images.astype(jnp.float32)
    if cfg.pixel_norm == "clip":
      x = clip_to_siglip_pixels(x)
    std = cfg.width ** -0.5
    x = nn.Conv(cfg.width, (cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size,) * 2,
                padding="VALID", use_bias=True, dtype=dtype, param_dtype=jnp.float32,
                kernel_init=partitioned(nn.initializers.lecun_normal(),
                                        (None, None, None, "embed")),
                bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="conv1")(x)
    n = x.shape[0]
    x = x.reshape(n, -1, cfg.width).astype(jnp.float32)
    pos = self.param("positional_embedding",
                     partitioned(nn.initializers.normal(std), (None, "embed")),
                     (cfg.grid * cfg.grid, cfg.width), jnp.float32)
    x = x + pos[None]
    x = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_width, cfg.act, cfg.ln_eps,
                    dtype, cfg.remat, cfg.scan_layers, cfg.attention, name="transformer")(x)
    x = layer_norm(cfg.ln_eps, "ln_post")(x)
    pooled = MAPHead(cfg.width, cfg.heads, cfg.mlp_width, cfg.act, cfg.ln_eps, dtype,
                     name="head")(x)
    if cfg.embed_dim is None:
      return pooled
    projected = nn.Dense(
        cfg.embed_dim, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=partitioned(nn.initializers.normal(std), ("embed", "joint")),
        bias_init=partitioned(nn.initializers.zeros, ("joint",)), name="proj")(pooled)
    return projected.astype(jnp.float32) if project else pooled
