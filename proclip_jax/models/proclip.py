"""The ProCLIP two-tower model: an image tower, the TextProj adapter, a logit scale.

Parameters are one plain tree::

    {"visual": <image tower params>,           # CLIP ViT, EVA02 or SigLIP (models/towers.py)
     "adapter": <TextProj params>,             # LLM feature (D) -> E
     "logit_scale": float32 scalar}            # s = exp(logit_scale), init ln 100

Any subset of the three top-level entries may be present: stage 1 trains a tree with only
``adapter``; stage 2 the whole tree. Both towers return L2-normalised float32 features.
The text side takes *cached LLM-embedder features* (the LLM itself is frozen and run once
by ``tools/precompute.py``), not token ids.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax.core import meta

from proclip_jax.errors import ProclipError
from proclip_jax.models.adapter import AdapterConfig, TextProj, l2_normalize
from proclip_jax.models.towers import vision_config_from_dict, vision_tower

PARTS = ("visual", "adapter", "logit_scale")
LOGIT_SCALE_INIT = math.log(100.0)


@dataclasses.dataclass(frozen=True)
class ProCLIPConfig:
  """The two towers' configurations.

  Attributes:
    vision: the image tower's config (``VisionConfig``, ``EvaVisionConfig`` or
      ``SiglipConfig``, chosen by ``arch`` in a dict: models/towers.py); None for an
      adapter-only model (stage 1).
    adapter: the ``AdapterConfig``; ``adapter.out_dim`` must equal the vision projection E.
    logit_scale_init: initial ``logit_scale`` (ln 100, as pretrained CLIP) when not loaded.
  """
  vision: Any
  adapter: AdapterConfig
  logit_scale_init: float = LOGIT_SCALE_INIT

  def __post_init__(self):
    e = _vision_out_dim(self.vision)
    if e is not None and e != self.adapter.out_dim:
      raise ProclipError(
          f"ProCLIPConfig: the adapter projects to {self.adapter.out_dim} but the image tower "
          f"to {e}; set AdapterConfig.out_dim = {e} (the joint dimension E).")

  def to_dict(self) -> dict[str, Any]:
    return {"vision": None if self.vision is None else self.vision.to_dict(),
            "adapter": self.adapter.to_dict(),
            "logit_scale_init": self.logit_scale_init}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ProCLIPConfig":
    unknown = sorted(set(d) - {"vision", "adapter", "logit_scale_init"})
    if unknown:
      raise ProclipError(f"Unknown ProCLIPConfig fields {unknown}.")
    if "adapter" not in d:
      raise ProclipError("ProCLIPConfig needs an 'adapter' entry.")
    vision = d.get("vision")
    if vision is not None and not hasattr(vision, "to_dict"):
      vision = vision_config_from_dict(vision)
    adapter = d["adapter"]
    if not isinstance(adapter, AdapterConfig):
      adapter = AdapterConfig.from_dict(dict(adapter))
    return cls(vision=vision, adapter=adapter,
               logit_scale_init=float(d.get("logit_scale_init", LOGIT_SCALE_INIT)))


def _vision_out_dim(vision) -> int | None:
  if vision is None:
    return None
  for name in ("output_dim", "out_dim", "embed_dim", "proj_dim"):
    if hasattr(vision, name):
      return getattr(vision, name)
  return None


class ProCLIPModel:
  """Functional two-tower model: holds the configs and Flax modules, never parameters.

  ``encode_images(params, pixels)`` and ``encode_texts(params, llm_features)`` read
  ``params["visual"]`` and ``params["adapter"]``; ``*_features`` take the sub-trees.
  """

  def __init__(self, config: ProCLIPConfig):
    self.config = config
    self.adapter = TextProj(config.adapter)
    self.vision = None if config.vision is None else vision_tower(config.vision)

  # ------------------------------------------------------------------ init
  def init_boxed(self, rng: jax.Array, parts: Sequence[str] = PARTS) -> dict:
    """Random parameters with logical-partitioning boxes (for ``jax.eval_shape``)."""
    bad = [p for p in parts if p not in PARTS]
    if bad:
      raise ProclipError(f"Unknown ProCLIP parameter parts {bad}; known: {PARTS}.")
    r_vis, r_ad = jax.random.split(rng)
    out = {}
    if "visual" in parts:
      if self.vision is None:
        raise ProclipError("This ProCLIPConfig has no vision tower (vision=None).")
      size = self.config.vision.image_size
      pixels = jnp.zeros((1, size, size, 3), jnp.float32)
      out["visual"] = self.vision.init(r_vis, pixels)["params"]
    if "adapter" in parts:
      feats = jnp.zeros((1, self.config.adapter.in_dim), jnp.float32)
      out["adapter"] = self.adapter.init(r_ad, feats)["params"]
    if "logit_scale" in parts:
      out["logit_scale"] = jnp.asarray(self.config.logit_scale_init, jnp.float32)
    return out

  def init(self, rng: jax.Array, parts: Sequence[str] = PARTS) -> dict:
    return meta.unbox(self.init_boxed(rng, parts))

  def abstract(self, parts: Sequence[str] = PARTS) -> dict:
    """Boxed ``ShapeDtypeStruct`` tree (logical axis names kept)."""
    return jax.eval_shape(lambda: self.init_boxed(jax.random.key(0), parts))

  # ------------------------------------------------------------------ towers
  def image_features(self, visual_params: Mapping, pixels: jax.Array) -> jax.Array:
    """Pixels ``[B, H, W, 3]`` (CLIP-normalised) -> unit-norm float32 ``[B, E]``."""
    if self.vision is None:
      raise ProclipError("This ProCLIPConfig has no vision tower (vision=None).")
    return l2_normalize(self.vision.apply({"params": visual_params}, pixels))

  def text_features(self, adapter_params: Mapping, llm_features: jax.Array) -> jax.Array:
    """LLM-embedder features ``[B, D]`` -> unit-norm float32 ``[B, E]``."""
    return l2_normalize(self.adapter.apply({"params": adapter_params}, llm_features))

  def encode_images(self, params: Mapping, pixels: jax.Array) -> jax.Array:
    return self.image_features(params["visual"], pixels)

  def encode_texts(self, params: Mapping, llm_features: jax.Array) -> jax.Array:
    return self.text_features(params["adapter"], llm_features)
