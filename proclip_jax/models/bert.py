"""BERT-style encoders (BERT, MiniLM such as all-MiniLM-L6-v2) as text embedders in Flax.

Learned absolute positions and token-type embeddings, post-LayerNorm blocks, exact (erf)
GELU, followed by mean or first-token ("cls") pooling of the last hidden states:

    BertEmbedder(config, pooling="mean").apply({"params": p}, ids, attn_mask, pool_mask)
      -> [B, hidden_size] float32 (not normalised; sentence-transformers' Normalize module
         is the preset's ``normalize`` flag)

The calling convention is the one of :class:`proclip_jax.models.llm.DecoderEmbedder`:
``attn_mask`` marks real tokens, positions are ``cumsum(attn_mask) - 1`` (equal to
transformers' ``0..L-1`` for the right padding BERT tokenizers use), every token has token
type 0 (a single segment). Parameter tree (logical axis names in brackets)::

    {word,position,token_type}_embeddings/embedding   [vocab|None, embed]
    embeddings_norm/{scale,bias}                      [embed]
    layer_{i}/{query,key,value}/{kernel [embed, heads, kv], bias [heads, kv]}
    layer_{i}/attention_output/{kernel [heads, kv, embed], bias [embed]}
    layer_{i}/attention_norm/{scale,bias}
    layer_{i}/intermediate/{kernel [embed, mlp], bias}; layer_{i}/output/{kernel [mlp, embed], bias}
    layer_{i}/output_norm/{scale,bias}
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from proclip_jax.errors import ProclipError
from proclip_jax.models.config_dict import DictConfig
from proclip_jax.models.llm import Proj, pool, positions_from_mask, MASK_VALUE

ACTIVATIONS = ("gelu", "gelu_new", "relu")


@dataclasses.dataclass(frozen=True)
class BertConfig(DictConfig):
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"  # exact erf GELU, as Hugging Face's "gelu"
  family: str = "bert"

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ProclipError(f"BertConfig: hidden_size={self.hidden_size} is not a multiple of "
                         f"num_heads={self.num_heads}.")
    if self.hidden_act not in ACTIVATIONS:
      raise ProclipError(f"BertConfig: hidden_act {self.hidden_act!r} is not supported "
                         f"(supported: {', '.join(ACTIVATIONS)}).")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads



def _act(name: str, x):
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name == "gelu_new":
    return jax.nn.gelu(x, approximate=True)
  return jax.nn.relu(x)


class LayerNorm(nn.Module):
  eps: float

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (d,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      (d,), jnp.float32)
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class BertLayer(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attn_mask):
    cfg = self.config
    dt = self.dtype
    shape = (cfg.num_heads, cfg.head_dim)
    names = ("embed", "heads", "kv")
    q = Proj(shape, names, use_bias=True, dtype=dt, name="query")(x)
    k = Proj(shape, names, use_bias=True, dtype=dt, name="key")(x)
    v = Proj(shape, names, use_bias=True, dtype=dt, name="value")(x)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dt), k.astype(dt),
                        preferred_element_type=jnp.float32) * (cfg.head_dim ** -0.5)
    scores = jnp.where(attn_mask[:, None, None, :] > 0, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dt), v.astype(dt),
                   preferred_element_type=jnp.float32)
    o = Proj((cfg.hidden_size,), ("heads", "kv", "embed"), in_dims=2, use_bias=True, dtype=dt,
             name="attention_output")(o)
    x = LayerNorm(cfg.layer_norm_eps, name="attention_norm")(x + o)
    h = Proj((cfg.intermediate_size,), ("embed", "mlp"), use_bias=True, dtype=dt,
             name="intermediate")(x)
    h = Proj((cfg.hidden_size,), ("mlp", "embed"), use_bias=True, dtype=dt,
             name="output")(_act(cfg.hidden_act, h))
    return LayerNorm(cfg.layer_norm_eps, name="output_norm")(x + h)


class BertEmbedder(nn.Module):
  """Token ids -> pooled float32 embedding [B, hidden_size]."""
  config: BertConfig
  pooling: str = "mean"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, attn_mask, pool_mask):
    cfg = self.config
    if ids.ndim != 2 or attn_mask.shape != ids.shape or pool_mask.shape != ids.shape:
      raise ProclipError(
          f"BertEmbedder expects ids, attn_mask and pool_mask of the same shape [B, L]; got "
          f"{ids.shape}, {attn_mask.shape}, {pool_mask.shape}.")
    if ids.shape[1] > cfg.max_position_embeddings:
      raise ProclipError(f"BertEmbedder: sequence length {ids.shape[1]} exceeds "
                         f"max_position_embeddings={cfg.max_position_embeddings}.")

    def embed(n, rows, names):
      return nn.Embed(rows, cfg.hidden_size, embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(0.02), names), name=n)

    pos = positions_from_mask(attn_mask)
    x = (embed("word_embeddings", cfg.vocab_size, ("vocab", "embed"))(ids)
         + embed("position_embeddings", cfg.max_position_embeddings, (None, "embed"))(pos)
         + embed("token_type_embeddings", cfg.type_vocab_size, (None, "embed"))(
             jnp.zeros_like(ids)))
    x = LayerNorm(cfg.layer_norm_eps, name="embeddings_norm")(x)
    for i in range(cfg.num_layers):
      x = BertLayer(cfg, self.dtype, name=f"layer_{i}")(x, attn_mask)
    return pool(x, attn_mask, pool_mask, self.pooling)
