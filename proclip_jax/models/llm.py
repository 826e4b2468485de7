"""Decoder-only LLM text embedders (Llama-3 family, Mistral, Qwen2, Qwen3) in Flax Linen.

The network is the Hugging Face decoder (RMSNorm, rotary position embeddings with optional
Llama-3 / linear scaling, grouped-query attention, SwiGLU MLP, optional per-head q/k RMSNorm
as in Qwen3) followed by a pooling head. It maps token ids to one float32 vector per text:

    DecoderEmbedder(config, causal=..., pooling=...).apply(
        {"params": p}, ids, attn_mask, pool_mask) -> [B, hidden_size] float32

Conventions (the same in :mod:`proclip_jax.models.bert`):

* ``attn_mask`` [B, L] is 1 on real tokens, 0 on padding; left and right padding both work.
* Positions are ``cumsum(attn_mask) - 1`` (clipped at 0), so a text gets the same positions
  whichever side it is padded on. (transformers' ``LlamaModel`` uses ``0..L-1`` unless
  ``position_ids`` are passed; the parity tests pass these same positions to it.)
* ``causal=False`` removes the causal mask (LLM2Vec's bidirectional attention); the padding
  mask is always applied. Masked scores get the most negative float32, never -inf, so rows
  with nothing to attend to (padding queries) stay finite.
* Pooling: ``"mean"`` averages the final hidden states over ``pool_mask`` (the tokenizer step
  puts the caption's own tokens there for LLM2Vec-style pooling, or every real token);
  ``"last"`` takes the last real token; ``"cls"`` the first real token.

Parameters are float32 and carry logical axis names ("vocab", "embed", "heads", "kv", "mlp",
"layers") so an 8B model can be sharded. The tree mirrors the Hugging Face names::

    embed_tokens/embedding                [vocab, embed]
    layers_{i}/input_layernorm/scale      [embed]
    layers_{i}/self_attn/{q,k,v}_proj/kernel  [embed, heads, kv]   (+ bias [heads, kv])
    layers_{i}/self_attn/o_proj/kernel    [heads, kv, embed]      (+ bias [embed])
    layers_{i}/self_attn/{q,k}_norm/scale [kv]                    (Qwen3 only)
    layers_{i}/post_attention_layernorm/scale
    layers_{i}/mlp/{gate,up}_proj/kernel  [embed, mlp];  mlp/down_proj/kernel [mlp, embed]
    norm/scale                            [embed]

With ``scan_layers=True`` the layers are one ``layers/layer/...`` subtree stacked on a leading
"layers" axis (:func:`stack_layers` converts). ``dtype`` is the matmul compute dtype;
norms, softmax and pooling run in float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from proclip_jax.errors import ProclipError
from proclip_jax.mesh import constrain
from proclip_jax.models.config_dict import DictConfig

POOLINGS = ("mean", "last", "cls")
ROPE_TYPES = ("default", "linear", "llama3")
MASK_VALUE = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class DecoderConfig(DictConfig):
  """Architecture of a decoder LLM (no attention mode or pooling: those are the preset's)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_type: str = "default"  # "default" | "linear" | "llama3"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  qkv_bias: bool = False  # Llama/Qwen3: attention_bias; Qwen2: True
  out_bias: bool = False  # Llama/Qwen3: attention_bias; Qwen2: False
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
  family: str = "llama"  # "llama" | "mistral" | "qwen2" | "qwen3" (informational)

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ProclipError(
          f"DecoderConfig: num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}; fix the model config.")
    if self.rope_type not in ROPE_TYPES:
      raise ProclipError(
          f"DecoderConfig: rope_type {self.rope_type!r} is not supported (supported: "
          f"{', '.join(ROPE_TYPES)}).")



def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] (float32), with Llama-3 or linear scaling."""
  dim = cfg.head_dim
  inv = (1.0 / (np.float32(cfg.rope_theta) **
                (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
  if cfg.rope_type == "linear":
    inv = inv / np.float32(cfg.rope_factor)
  elif cfg.rope_type == "llama3":
    old = float(cfg.rope_original_max_position)
    low_wl = old / cfg.rope_low_freq_factor
    high_wl = old / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wl, inv / cfg.rope_factor, inv)
    smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def positions_from_mask(attn_mask: jax.Array) -> jax.Array:
  """``cumsum(mask) - 1`` clipped at 0: positions that ignore left padding."""
  return jnp.maximum(jnp.cumsum(attn_mask.astype(jnp.int32), axis=-1) - 1, 0)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE (the Hugging Face layout). x [B, L, H, Dh]; cos/sin [B, L, Dh]."""
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def pool(h: jax.Array, attn_mask: jax.Array, pool_mask: jax.Array, pooling: str) -> jax.Array:
  """Pools hidden states h [B, L, D] (float32) to [B, D]; see the module docstring."""
  if pooling == "mean":
    w = pool_mask.astype(jnp.float32)
    return (h * w[..., None]).sum(1) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
  if pooling == "last":
    length = attn_mask.shape[1]
    idx = length - 1 - jnp.argmax(attn_mask[:, ::-1] > 0, axis=1)
  elif pooling == "cls":
    idx = jnp.argmax(attn_mask > 0, axis=1)
  else:
    raise ProclipError(f"Unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}.")
  return jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]


def attention_bias_mask(attn_mask: jax.Array, causal: bool) -> jax.Array:
  """Boolean [B, 1, L, L] (query, key) mask: padding keys off, and the future if causal."""
  keep = attn_mask[:, None, None, :] > 0
  if causal:
    length = attn_mask.shape[1]
    keep = keep & jnp.tril(jnp.ones((length, length), bool))[None, None]
  return keep


def dot_attention(q, k, v, keep, dtype):
  """Grouped-query attention. q [B,L,H,Dh], k/v [B,L,Hkv,Dh], keep [B,1,L,L] -> [B,L,H,Dh]."""
  b, length, h, dh = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, length, hkv, h // hkv, dh)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q.astype(dtype), k.astype(dtype),
                      preferred_element_type=jnp.float32) * (dh ** -0.5)
  scores = jnp.where(keep[:, :, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(dtype), v.astype(dtype),
                   preferred_element_type=jnp.float32)
  return out.reshape(b, length, h, dh)


class RMSNorm(nn.Module):
  """RMSNorm in float32 (weight * x / rms(x)), as Llama/Qwen compute it."""
  eps: float
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)),
                       (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return scale * x


class Proj(nn.Module):
  """A linear map with a multi-dimensional kernel and logical axis names.

  ``in_dims`` trailing input axes are contracted; the kernel is ``[*in, *features]``.
  """
  features: tuple[int, ...]
  names: tuple[str | None, ...]  # for the kernel: input axes then output axes
  in_dims: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[-self.in_dims:]
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), self.names), (*in_shape, *self.features), jnp.float32)
    axes = tuple(range(x.ndim - self.in_dims, x.ndim))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((axes, tuple(range(self.in_dims))), ((), ())),
                            preferred_element_type=jnp.float32)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, self.names[self.in_dims:]), self.features, jnp.float32)
      y = y + bias
    return y


class DecoderLayer(nn.Module):
  """One pre-norm decoder block: x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))."""
  config: DecoderConfig
  causal: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attn_mask, cos, sin):
    cfg = self.config
    h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x)
    attn = AttentionBlock(cfg, self.causal, self.dtype, name="self_attn")
    x = x + attn(h, attn_mask, cos, sin)
    h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x)
    x = x + MLP(cfg, self.dtype, name="mlp")(h)
    return x


class AttentionBlock(nn.Module):
  config: DecoderConfig
  causal: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, attn_mask, cos, sin):
    cfg = self.config
    dt = self.dtype
    q = Proj((cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv"), use_bias=cfg.qkv_bias,
             dtype=dt, name="q_proj")(h)
    k = Proj((cfg.num_kv_heads, cfg.head_dim), ("embed", "heads", "kv"), use_bias=cfg.qkv_bias,
             dtype=dt, name="k_proj")(h)
    v = Proj((cfg.num_kv_heads, cfg.head_dim), ("embed", "heads", "kv"), use_bias=cfg.qkv_bias,
             dtype=dt, name="v_proj")(h)
    if cfg.qk_norm:
      q = RMSNorm(cfg.rms_norm_eps, "kv", name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, "kv", name="k_norm")(k)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    o = dot_attention(q, k, v, attention_bias_mask(attn_mask, self.causal), dt)
    return Proj((cfg.hidden_size,), ("heads", "kv", "embed"), in_dims=2, use_bias=cfg.out_bias,
                dtype=dt, name="o_proj")(o)


class MLP(nn.Module):
  config: DecoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h):
    cfg = self.config
    f = cfg.intermediate_size
    gate = Proj((f,), ("embed", "mlp"), use_bias=cfg.mlp_bias, dtype=self.dtype,
                name="gate_proj")(h)
    up = Proj((f,), ("embed", "mlp"), use_bias=cfg.mlp_bias, dtype=self.dtype, name="up_proj")(h)
    return Proj((cfg.hidden_size,), ("mlp", "embed"), use_bias=cfg.mlp_bias, dtype=self.dtype,
                name="down_proj")(jax.nn.silu(gate) * up)


ACT_AXES = ("batch", "length", "embed")


class _ScanLayer(nn.Module):
  """Adapter giving DecoderLayer the (carry, x) -> (carry, y) signature of nn.scan."""
  config: DecoderConfig
  causal: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attn_mask, cos, sin):
    return constrain(DecoderLayer(self.config, self.causal, self.dtype, name="layer")(
        x, attn_mask, cos, sin), ACT_AXES), None


class DecoderEmbedder(nn.Module):
  """Token ids -> pooled float32 embedding [B, hidden_size]."""
  config: DecoderConfig
  causal: bool = True
  pooling: str = "mean"
  dtype: Any = jnp.float32
  scan_layers: bool = False

  @nn.compact
  def __call__(self, ids, attn_mask, pool_mask):
    cfg = self.config
    if ids.ndim != 2 or attn_mask.shape != ids.shape or pool_mask.shape != ids.shape:
      raise ProclipError(
          f"DecoderEmbedder expects ids, attn_mask and pool_mask of the same shape [B, L]; got "
          f"{ids.shape}, {attn_mask.shape}, {pool_mask.shape}.")
    emb = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", "embed")), name="embed_tokens")
    # The hidden states stay split over the batch axes (under a sharded precompute): without
    # the constraint XLA keeps the fsdp-sharded weights in place and all-reduces every
    # layer's global-batch activations instead of gathering the weights.
    x = constrain(emb(ids).astype(jnp.float32), ACT_AXES)
    pos = positions_from_mask(attn_mask).astype(jnp.float32)
    freqs = pos[..., None] * jnp.asarray(rope_inv_freq(cfg))
    ang = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    if self.scan_layers:
      layers = nn.scan(
          _ScanLayer, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = layers(cfg, self.causal, self.dtype, name="layers")(x, attn_mask, cos, sin)
    else:
      for i in range(cfg.num_layers):
        x = constrain(DecoderLayer(cfg, self.causal, self.dtype, name=f"layers_{i}")(
            x, attn_mask, cos, sin), ACT_AXES)
    h = RMSNorm(cfg.rms_norm_eps, name="norm")(x)
    return pool(h, attn_mask, pool_mask, self.pooling)


def stack_layers(params: Mapping, num_layers: int) -> dict:
  """``layers_{i}/...`` -> ``layers/layer/...`` stacked on axis 0 (the scan_layers layout)."""
  params = dict(params)
  per = [params.pop(f"layers_{i}") for i in range(num_layers)]
  params["layers"] = {"layer": jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                            *per)}
  return params


def unstack_layers(params: Mapping, num_layers: int) -> dict:
  """Inverse of :func:`stack_layers`."""
  params = dict(params)
  stacked = params.pop("layers")["layer"]
  for i in range(num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


def abstract_params(model: nn.Module, seq_len: int = 8) -> Any:
  """``jax.eval_shape`` of the model's init (boxed leaves carry logical axis names)."""
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, ids + 1, ids + 1))["params"]


def logical_axes(model: nn.Module) -> Any:
  """The PartitionSpec tree of logical axis names for the model's parameters."""
  return nn.get_partition_spec(abstract_params(model))
