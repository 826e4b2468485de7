"""CLIP: the image tower and the text tower side by side, and loading a converted CLIP.

Parameter tree of :class:`CLIP`::

    visual        image tower parameters (VisionTransformer, vit.py, or EvaTower, eva.py)
    text          TextTransformer parameters (see clip_text.py; absent for an image-only model)
    logit_scale   []  log of the contrastive temperature's inverse (scale = exp(logit_scale))

``load_clip(path)`` opens a folder written by ``tools/convert.py`` (``kind="clip"``) and gives
jit-compiled, batched ``encode_image`` / ``encode_text`` (``proclip_jax.batched``) returning
L2-normalised numpy features, and ``tokenize`` (CLIP BPE).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from proclip_jax.batched import BatchedEncoder
from proclip_jax.errors import ProclipError
from proclip_jax.models.clip_text import TextConfig, TextTransformer
from proclip_jax.models.towers import vision_config_from_dict, vision_tower
from proclip_jax.models.vit import VisionConfig, stack_layers, unstack_layers
from proclip_jax.storage import load_model
from proclip_jax.text.clip_tokenizer import ClipTokenizer


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A CLIP: image tower and text tower (either may be None), initial ``logit_scale``."""
  vision: VisionConfig | None = dataclasses.field(default_factory=VisionConfig)
  text: TextConfig | None = dataclasses.field(default_factory=TextConfig)
  logit_scale_init: float = math.log(1 / 0.07)

  def __post_init__(self):
    if self.vision is None and self.text is None:
      raise ProclipError("CLIPConfig: a CLIP needs an image tower, a text tower or both.")
    if (self.text is not None and self.vision is not None
        and self.text.embed_dim != self.vision.embed_dim):
      raise ProclipError(
          f"CLIPConfig: image tower projects to {self.vision.embed_dim} but text tower to "
          f"{self.text.embed_dim}; the joint dimensions must match.")

  @classmethod
  def named(cls, name: str, **overrides: Any) -> "CLIPConfig":
    """An OpenAI variant ("B/32", "B/16", "L/14", "L/14-336")."""
    return cls(vision=VisionConfig.named(name), text=TextConfig.named(name), **overrides)

  def replace(self, **common: Any) -> "CLIPConfig":
    """The same CLIP with fields shared by both towers changed (dtype, remat, scan_layers)."""
    return CLIPConfig(
        vision=None if self.vision is None else dataclasses.replace(self.vision, **common),
        text=None if self.text is None else dataclasses.replace(self.text, **common),
        logit_scale_init=self.logit_scale_init)

  def to_dict(self) -> dict:
    return {"vision": None if self.vision is None else self.vision.to_dict(),
            "text": None if self.text is None else self.text.to_dict(),
            "logit_scale_init": self.logit_scale_init}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
    unknown = sorted(set(d) - {"vision", "text", "logit_scale_init"})
    if unknown:
      raise ProclipError(f"CLIPConfig: unknown fields {unknown}.")
    return cls(vision=None if d.get("vision") is None else vision_config_from_dict(d["vision"]),
               text=None if d.get("text") is None else TextConfig.from_dict(d["text"]),
               logit_scale_init=float(d.get("logit_scale_init", math.log(1 / 0.07))))


class CLIP(nn.Module):
  """Two towers and the logit scale; ``__call__(images, ids)`` gives normalised features."""
  config: CLIPConfig

  def setup(self):
    self.visual = None if self.config.vision is None else vision_tower(self.config.vision)
    self.text = None if self.config.text is None else TextTransformer(self.config.text)
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(self.config.logit_scale_init), ()), (), jnp.float32)

  def encode_image(self, images, normalize: bool = True):
    if self.visual is None:
      raise ProclipError("This CLIP has no image tower (it was converted from a text-only "
                         "checkpoint).")
    return _l2(self.visual(images)) if normalize else self.visual(images)

  def encode_text(self, ids, normalize: bool = True):
    if self.text is None:
      raise ProclipError("This CLIP has no text tower (it was converted from an image-only "
                         "checkpoint).")
    return _l2(self.text(ids)) if normalize else self.text(ids)

  def __call__(self, images=None, ids=None):
    """Returns ``(image_features, text_features, logit_scale)``; features unit-norm (or None)."""
    img = None if (images is None or self.visual is None) else self.encode_image(images)
    txt = None if (ids is None or self.text is None) else self.encode_text(ids)
    return img, txt, self.logit_scale


def _l2(x):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def example_inputs(config: CLIPConfig, batch: int = 1):
  """Dummy ``(images, ids)`` of the right shapes for ``init`` / ``eval_shape``."""
  images = None if config.vision is None else jnp.zeros(
      (batch, config.vision.image_size, config.vision.image_size, 3), jnp.float32)
  ids = None if config.text is None else jnp.zeros((batch, config.text.context_length), jnp.int32)
  return images, ids


def init_clip(config: CLIPConfig, seed: int = 0) -> dict:
  """Random (unboxed) CLIP parameters."""
  variables = jax.jit(CLIP(config).init)(jax.random.PRNGKey(seed), *example_inputs(config))
  return jax.tree.map(np.asarray, nn.unbox(variables)["params"])


def abstract_params(config: CLIPConfig):
  """``jax.eval_shape`` of the boxed init (shapes and logical axis names, no memory)."""
  return jax.eval_shape(lambda: CLIP(config).init(
      jax.random.PRNGKey(0), *example_inputs(config)))["params"]


class LoadedCLIP:
  """A converted CLIP ready for inference (see :func:`load_clip`).

  Attributes:
    config: the :class:`CLIPConfig`.
    params: the parameter tree (``visual``, ``text``, ``logit_scale``).
    logit_scale: float, log of the logit multiplier (multiply cosine logits by its exp).
  """

  def __init__(self, config: CLIPConfig, params: Mapping, batch_size: int = 64):
    self.config = config
    self.params = jax.device_put(params)  # once, not per call
    self.batch_size = int(batch_size)
    self.logit_scale = float(np.asarray(params["logit_scale"]))
    model = CLIP(config)
    # The two towers' encoders (proclip_jax.batched); inference.CLIPModelAdapter reuses them.
    self.image_encoder = None if config.vision is None else BatchedEncoder(
        lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_image), self.params,
        self.batch_size)
    self.text_encoder = None if config.text is None else BatchedEncoder(
        lambda p, t: model.apply({"params": p}, t, method=CLIP.encode_text), self.params,
        self.batch_size)
    self._tokenizer = None

  def tokenize(self, texts, context_length: int | None = None) -> np.ndarray:
    """CLIP BPE ids, int32 ``[N, context_length]`` (default: the text tower's context)."""
    if self._tokenizer is None:
      self._tokenizer = ClipTokenizer()
    if context_length is None:
      context_length = self.config.text.context_length if self.config.text else 77
    return self._tokenizer(texts, context_length=context_length)

  def encode_image(self, pixels) -> np.ndarray:
    """``pixels``: NHWC float32, CLIP-normalised, at ``config.vision.image_size``.

    Returns L2-normalised float32 ``[N, E]`` (``[N, width]`` for a tower without projection).
    """
    if self.config.vision is None:
      raise ProclipError("This CLIP has no image tower (it was converted from a text-only "
                         "checkpoint); encode_image is unavailable.")
    pixels = np.asarray(pixels, np.float32)
    size = self.config.vision.image_size
    if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
      raise ProclipError(f"encode_image expects NHWC pixels [N, {size}, {size}, 3], got "
                         f"{pixels.shape}.")
    return self.image_encoder(pixels)

  def encode_text(self, ids) -> np.ndarray:
    """``ids``: int ``[N, L]`` (from :meth:`tokenize`). Returns L2-normalised float32 ``[N, E]``."""
    if self.config.text is None:
      raise ProclipError("This CLIP has no text tower (it was converted from an image-only "
                         "checkpoint); encode_text is unavailable.")
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] > self.config.text.context_length:
      raise ProclipError(f"encode_text expects ids [N, <= {self.config.text.context_length}], "
                         f"got {ids.shape}; make them with .tokenize(texts).")
    return self.text_encoder(ids.astype(np.int32))


def load_clip(path: str, *, dtype: str | None = None, scan_layers: bool | None = None,
              batch_size: int = 64) -> LoadedCLIP:
  """Loads a CLIP converted by ``tools/convert.py`` (a folder with model.json + params/).

  Args:
    path: the converted folder.
    dtype: optional compute dtype override ("float32" / "bfloat16").
    scan_layers: optional layout override (parameters are restacked as needed).
    batch_size: largest batch per compiled call (inputs are chunked and padded).
  """
  meta, params = load_model(path, kind="clip")
  config = CLIPConfig.from_dict(meta["config"])
  overrides = {}
  if dtype is not None:
    overrides["dtype"] = dtype
  current = (config.vision or config.text).scan_layers
  if scan_layers is not None and scan_layers != current:
    overrides["scan_layers"] = scan_layers
    params = stack_layers(params) if scan_layers else unstack_layers(params)
  if overrides:
    config = config.replace(**overrides)
  return LoadedCLIP(config, params, batch_size=batch_size)
