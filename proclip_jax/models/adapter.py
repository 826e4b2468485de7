"""TextProj: the adapter from LLM-embedder features to the CLIP joint space.

The only trainable text-side module of ProCLIP (proclip_method.md, "Model")::

    t0  = t / ||t||                                   # L2-normalise the LLM feature
    t   = t + W2 . GELU_exact(W1 . LN(t) + b1) + b2   # n_blocks pre-LN residual MLPs
    out = W3 . LN_final(t) + b3                       # D -> E

LayerNorm eps 1e-5, exact (erf) GELU, no dropout. ProCLIP uses one block of expansion 8;
LLM2CLIP's adapter is 4 blocks of expansion 2 (``AdapterConfig(n_blocks=4, expansion=2)``).

Parameter names follow the PyTorch layout ``text_adaptor.{i}.ln``, ``.{i}.fn.0``,
``.{i}.fn.3``, ``.{n}`` (final LN), ``.{n+1}`` (projection), so the converter is a rename
table::

    block_{i}/ln/{scale,bias}      <- text_adaptor.{i}.ln.{weight,bias}
    block_{i}/fn_0/{kernel,bias}   <- text_adaptor.{i}.fn.0.{weight^T,bias}    D -> expansion*D
    block_{i}/fn_3/{kernel,bias}   <- text_adaptor.{i}.fn.3.{weight^T,bias}    expansion*D -> D
    ln_final/{scale,bias}          <- text_adaptor.{n}.{weight,bias}
    proj/{kernel,bias}             <- text_adaptor.{n+1}.{weight^T,bias}       D -> E
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from proclip_jax.errors import ProclipError
from proclip_jax.mesh import constrain

LN_EPS = 1e-5
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Shape and numerics of a TextProj adapter.

  Attributes:
    in_dim: D, the LLM embedder's feature size.
    out_dim: E, the joint embedding size (the CLIP image tower's projection size).
    expansion: hidden width of each residual MLP block as a multiple of D.
    n_blocks: number of residual MLP blocks.
    dtype: compute dtype of the matmuls ("float32" or "bfloat16"); parameters, LayerNorm
      and the output stay float32.
  """
  in_dim: int
  out_dim: int
  expansion: int = 8
  n_blocks: int = 1
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("in_dim", "out_dim", "expansion", "n_blocks"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ProclipError(f"AdapterConfig.{name} must be a positive integer, got {v!r}.")
    if self.dtype not in _DTYPES:
      raise ProclipError(
          f"AdapterConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}.")

  @property
  def hidden_dim(self) -> int:
    return self.expansion * self.in_dim

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ProclipError(f"Unknown AdapterConfig fields {unknown}; known: {sorted(names)}.")
    return cls(**d)


def _dense(features: int, names: tuple[str, str], dtype, name: str) -> nn.Dense:
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[1],)))


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


class AdapterBlock(nn.Module):
  """One pre-LN residual MLP: ``x + fn_3(GELU(fn_0(ln(x))))``."""
  config: AdapterConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype = _DTYPES[cfg.dtype]
    h = _layer_norm("ln")(x)
    h = _dense(cfg.hidden_dim, ("embed", "mlp"), dtype, "fn_0")(h)
    h = nn.gelu(h, approximate=False)
    h = _dense(cfg.in_dim, ("mlp", "embed"), dtype, "fn_3")(h)
    return x + h.astype(jnp.float32)


class TextProj(nn.Module):
  """LLM features ``[..., D]`` -> joint-space features ``[..., E]`` (not normalised)."""
  config: AdapterConfig

  @nn.compact
  def __call__(self, t):
    cfg = self.config
    if t.shape[-1] != cfg.in_dim:
      raise ProclipError(
          f"TextProj expects features of size {cfg.in_dim} (AdapterConfig.in_dim), got "
          f"shape {t.shape}; the cache was made by a different embedder than the adapter's.")
    t = t.astype(jnp.float32)
    x = t * jax.lax.rsqrt(jnp.maximum(jnp.sum(t * t, axis=-1, keepdims=True), 1e-24))
    # Rows stay split over the batch axes in a sharded step (a no-op elsewhere).
    x = constrain(x, ("batch",) + (None,) * (x.ndim - 2) + ("embed",))
    for i in range(cfg.n_blocks):
      x = AdapterBlock(cfg, name=f"block_{i}")(x)
    x = _layer_norm("ln_final")(x)
    out = _dense(cfg.out_dim, ("embed", "joint"), _DTYPES[cfg.dtype], "proj")(x)
    return out.astype(jnp.float32)


def l2_normalize(x, axis: int = -1):
  """``x / ||x||`` in float32, safe at zero."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-24))
