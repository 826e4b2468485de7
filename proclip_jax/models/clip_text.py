"""The CLIP text tower (the stage-1 teacher) in Flax Linen.

Token + learned position embeddings, causal pre-LN residual blocks (the same
:class:`proclip_jax.models.vit.Transformer` as the image tower, given a causal mask),
``ln_final``, pooling at the end-of-text token and a bias-free projection ``[width, E]``.

Pooling: OpenAI takes the position of the largest id (``<|endoftext|>`` = 49407 is the
largest id in CLIP's vocabulary); Hugging Face configs with a real ``eos_token_id`` take the
first position holding that id. ``TextConfig.eos_token_id=None`` selects the former.

Parameter layout (float32; logical axis names in brackets)::

    token_embedding         [vocab, width]     (vocab, embed)
    positional_embedding    [context, width]   (None, embed)
    transformer/blocks_{i}  (or transformer/blocks stacked, see vit.py)
    ln_final/{scale,bias}   [width]            (embed)
    text_projection         [width, E]         (embed, joint)   (absent if E is None)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import flax.linen as nn

from proclip_jax.errors import ProclipError
from proclip_jax.models.config_dict import DictConfig
from proclip_jax.models.vit import Transformer, check_options, layer_norm, partitioned

_TEXT_VARIANTS = {
    "B/32": dict(width=512, layers=12, heads=8, embed_dim=512),
    "B/16": dict(width=512, layers=12, heads=8, embed_dim=512),
    "L/14": dict(width=768, layers=12, heads=12, embed_dim=768),
    "L/14-336": dict(width=768, layers=12, heads=12, embed_dim=768),
}


@dataclasses.dataclass(frozen=True)
class TextConfig(DictConfig):
  """Architecture and compute options of a CLIP text tower.

  Attributes:
    vocab_size: token vocabulary (49408 for CLIP's BPE).
    context_length: number of positions (77).
    width, layers, heads, mlp_dim: as in :class:`VisionConfig` (mlp_dim None = 4 * width).
    embed_dim: joint embedding size E; None means no projection.
    act, ln_eps, dtype, remat, scan_layers: as in :class:`VisionConfig`.
    eos_token_id: None pools at ``argmax(ids)`` (OpenAI); an int pools at the first
      position holding that id (Hugging Face configs after transformers PR #24773).
  """
  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int | None = None
  embed_dim: int | None = 512
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  eos_token_id: int | None = None
  dtype: str = "float32"
  remat: bool | str = False
  scan_layers: bool = False

  def __post_init__(self):
    check_options("TextConfig", self.width, self.heads, self.act, self.dtype, self.remat)

  @property
  def mlp_width(self) -> int:
    return self.mlp_dim or 4 * self.width

  @classmethod
  def named(cls, name: str, **overrides: Any) -> "TextConfig":
    """The text tower of a named OpenAI variant ("B/32", "B/16", "L/14", "L/14-336")."""
    if name not in _TEXT_VARIANTS:
      raise ProclipError(f"Unknown CLIP text variant {name!r}; known: {list(_TEXT_VARIANTS)}.")
    return cls(**{**_TEXT_VARIANTS[name], **overrides})



def pool_positions(ids, eos_token_id: int | None):
  """Index of the pooled (end-of-text) token of each row of ``ids`` [N, L]."""
  if eos_token_id is None:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class TextTransformer(nn.Module):
  """CLIP text tower.

  ``__call__(ids, project=True)``: ``ids`` int32 ``[N, L]`` with ``L <= context_length``;
  returns unnormalised projected features ``[N, E]`` or, with ``project=False`` (or
  ``embed_dim=None``), the pooled ``ln_final`` state ``[N, width]``.
  """
  config: TextConfig

  @nn.compact
  def __call__(self, ids, project: bool = True):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if ids.ndim != 2 or ids.shape[1] > cfg.context_length:
      raise ProclipError(
          f"TextTransformer expects ids [N, L] with L <= {cfg.context_length}, got {ids.shape}.")
    length = ids.shape[1]
    tok = self.param("token_embedding", partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
                     (cfg.vocab_size, cfg.width), jnp.float32)
    pos = self.param("positional_embedding", partitioned(nn.initializers.normal(0.01), (None, "embed")),
                     (cfg.context_length, cfg.width), jnp.float32)
    x = jnp.take(tok, ids, axis=0) + pos[None, :length]
    causal = jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
    x = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_width, cfg.act, cfg.ln_eps,
                    dtype, cfg.remat, cfg.scan_layers, name="transformer")(x, causal)
    x = layer_norm(cfg.ln_eps, "ln_final")(x)
    pooled = jnp.take_along_axis(
        x, pool_positions(ids, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]
    if cfg.embed_dim is None:
      return pooled
    proj = self.param("text_projection",
                      partitioned(nn.initializers.normal(cfg.width ** -0.5), ("embed", "joint")),
                      (cfg.width, cfg.embed_dim), jnp.float32)
    if not project:
      return pooled
    return jnp.dot(pooled.astype(dtype), proj.astype(dtype), preferred_element_type=jnp.float32)
