"""The image towers a ProCLIP or a converted CLIP can hold, chosen by a config's ``arch``.

* no ``arch`` (configs written before other towers existed): OpenAI-CLIP ViT (:mod:`vit`);
* ``"eva02"``: EVA02-CLIP (:mod:`eva`);
* ``"siglip"``: SigLIP / SigLIP 2 fixed-resolution towers (:mod:`siglip`).

Each tower maps CLIP-normalised NHWC pixels to unnormalised features in the joint space.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn

from proclip_jax.errors import ProclipError
from proclip_jax.models import eva, siglip, vit

_CONFIGS = {eva.ARCH: eva.EvaVisionConfig, siglip.ARCH: siglip.SiglipConfig}


def vision_config_from_dict(d: Mapping[str, Any]):
  """A saved image-tower config -> its config class, chosen by ``arch``."""
  d = dict(d)
  arch = d.get("arch")
  if arch is None:
    return vit.VisionConfig.from_dict(d)
  if arch not in _CONFIGS:
    raise ProclipError(f"Unknown image tower arch {arch!r}; known: {', '.join(_CONFIGS)} (or "
                       "no arch for an OpenAI-CLIP ViT).")
  return _CONFIGS[arch].from_dict(d)


def vision_tower(config) -> nn.Module:
  """The Flax image tower of an image-tower config."""
  if isinstance(config, eva.EvaVisionConfig):
    return eva.EvaTower(config)
  if isinstance(config, siglip.SiglipConfig):
    return siglip.SiglipVisionTransformer(config)
  return vit.VisionTransformer(config)
