"""Architecture of OpenAI / open_clip state dicts: what tensor shapes cannot tell.

Shapes give every size of an OpenAI-layout CLIP except the attention head count (and the
activation). OpenAI's models use 64-wide heads, but open_clip's ViT-H/14, ViT-g/14 and
ViT-bigG/14 image towers use 80, 88 and 104, so ``width // 64`` would split them wrongly and
the features would drift without any error. The head count therefore comes from, in order:

1. explicit ``vision_heads`` / ``text_heads`` (``--vision-heads N --text-heads N``);
2. a preset: an open_clip model name from :data:`OPEN_CLIP_MODELS` (``--preset ViT-H-14``)
   or the path of an open_clip model config JSON;
3. ``open_clip_config.json`` next to the checkpoint (as open_clip's Hugging Face repositories
   ship it; ``{"model_cfg": {...}}``);
4. the shapes, only where they match a known model whose heads are 64 wide (OpenAI's
   ViT-B/32, B/16, L/14, L/14@336 and their text towers).

Anything else is refused with the fix in the message. A preset's sizes are checked against
the shapes, so the wrong preset is an error, not a silent drift. :data:`OPEN_CLIP_MODELS`
transcribes open_clip's ``model_configs/*.json`` (``head_width`` 64 and ``mlp_ratio`` 4 by
default; ``quick_gelu`` false unless named ``-quickgelu``: OpenAI's own weights use QuickGELU,
so they convert with the ``-quickgelu`` name or without a preset; a GELU preset on a file that
carries OpenAI's ``input_resolution`` / ``context_length`` / ``vocab_size`` is refused).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from proclip_jax.errors import ProclipError


def _cfg(embed, image, vlayers, vwidth, patch, twidth, theads, tlayers, head_width=64,
         mlp_ratio=4.0, quick_gelu=False):
  return {"embed_dim": embed, "quick_gelu": quick_gelu,
          "vision_cfg": {"image_size": image, "layers": vlayers, "width": vwidth,
                         "head_width": head_width, "mlp_ratio": mlp_ratio, "patch_size": patch},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": twidth,
                       "heads": theads, "layers": tlayers}}


_BASE = {
    "ViT-B-32": _cfg(512, 224, 12, 768, 32, 512, 8, 12),
    "ViT-B-16": _cfg(512, 224, 12, 768, 16, 512, 8, 12),
    "ViT-L-14": _cfg(768, 224, 24, 1024, 14, 768, 12, 12),
    "ViT-L-14-336": _cfg(768, 336, 24, 1024, 14, 768, 12, 12),
    "ViT-H-14": _cfg(1024, 224, 32, 1280, 14, 1024, 16, 12, head_width=80),
    "ViT-H-14-378": _cfg(1024, 378, 32, 1280, 14, 1024, 16, 24, head_width=80),
    "ViT-g-14": _cfg(1024, 224, 40, 1408, 14, 1024, 16, 12, head_width=88, mlp_ratio=4.3637),
    "ViT-bigG-14": _cfg(1280, 224, 48, 1664, 14, 1280, 20, 32, head_width=104,
                        mlp_ratio=4.9231),
}
OPEN_CLIP_MODELS: dict[str, dict] = dict(_BASE)
OPEN_CLIP_MODELS.update({f"{k}-quickgelu": {**v, "quick_gelu": True} for k, v in _BASE.items()
                         if k not in ("ViT-g-14", "ViT-bigG-14")})
# OpenAI's model names, as OpenAI's clip.load spells them (QuickGELU).
OPEN_CLIP_MODELS.update({"ViT-B/32": OPEN_CLIP_MODELS["ViT-B-32-quickgelu"],
                         "ViT-B/16": OPEN_CLIP_MODELS["ViT-B-16-quickgelu"],
                         "ViT-L/14": OPEN_CLIP_MODELS["ViT-L-14-quickgelu"],
                         "ViT-L/14@336px": OPEN_CLIP_MODELS["ViT-L-14-336-quickgelu"]})

CONFIG_NAME = "open_clip_config.json"


@dataclasses.dataclass(frozen=True)
class TowerArch:
  """Sizes one tower is expected to have; None = not stated (taken from the shapes)."""
  heads: int | None = None
  width: int | None = None
  layers: int | None = None
  mlp_dim: int | None = None
  patch_size: int | None = None
  image_size: int | None = None
  context_length: int | None = None
  vocab_size: int | None = None
  embed_dim: int | None = None


@dataclasses.dataclass(frozen=True)
class Arch:
  """What a preset / config / the flags say about a checkpoint; ``source`` names where from."""
  vision: TowerArch = TowerArch()
  text: TowerArch = TowerArch()
  act: str | None = None
  source: str = "the shapes"


def arch_from_open_clip(cfg: Mapping[str, Any], source: str) -> Arch:
  """An open_clip model config (``model_configs/NAME.json`` or ``open_clip_config.json``)."""
  cfg = cfg.get("model_cfg", cfg)
  try:
    v, t = cfg["vision_cfg"], cfg.get("text_cfg") or {}
    if "hf_model_name" in t:
      raise ProclipError(f"{source}: a Hugging Face text tower is not an OpenAI-layout CLIP; "
                         "only open_clip's own text transformer converts.")
    if isinstance(v.get("layers"), (list, tuple)):
      raise ProclipError(f"{source}: a ResNet image tower is not supported (ViT only).")
    embed = cfg.get("embed_dim")
    vision = TowerArch()  # a timm trunk (EVA02): its converter reads the sizes from the shapes
    if not v.get("timm_model_name"):
      vwidth = int(v["width"])
      head_width = int(v.get("head_width", 64))
      if vwidth % head_width:
        raise ProclipError(f"{source}: vision width {vwidth} is not a multiple of head_width "
                           f"{head_width}.")
      vision = TowerArch(heads=vwidth // head_width, width=vwidth, layers=int(v["layers"]),
                         mlp_dim=int(vwidth * float(v.get("mlp_ratio", 4.0))),
                         patch_size=int(v["patch_size"]), image_size=int(v["image_size"]),
                         embed_dim=embed)
    text = TowerArch()
    if t:
      twidth = int(t.get("width", 512))
      text = TowerArch(heads=int(t.get("heads", 8)), width=twidth, layers=int(t.get("layers", 12)),
                       mlp_dim=int(twidth * float(t.get("mlp_ratio", 4.0))),
                       context_length=int(t.get("context_length", 77)),
                       vocab_size=int(t.get("vocab_size", 49408)), embed_dim=embed)
  except (KeyError, TypeError, ValueError) as e:
    raise ProclipError(f"{source} is not an open_clip model config (embed_dim, vision_cfg: "
                       f"width/layers/patch_size/image_size, text_cfg): {e!r}.") from e
  return Arch(vision=vision, text=text, act="quick_gelu" if cfg.get("quick_gelu") else "gelu",
              source=source)


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ProclipError(f"Cannot read the open_clip config {path!r}: {e}.") from e


def resolve_arch(src: str, preset: str | None = None, vision_heads: int | None = None,
                 text_heads: int | None = None) -> Arch:
  """The :class:`Arch` for the OpenAI-layout checkpoint ``src`` (see the module docstring)."""
  if preset is not None:
    if preset in OPEN_CLIP_MODELS:
      arch = arch_from_open_clip(OPEN_CLIP_MODELS[preset], f"preset {preset!r}")
    elif preset.endswith(".json") and os.path.isfile(preset):
      arch = arch_from_open_clip(_read(preset), repr(preset))
    else:
      raise ProclipError(f"Unknown CLIP preset {preset!r}: give an open_clip model name "
                         f"({', '.join(OPEN_CLIP_MODELS)}) or the path of an open_clip model "
                         "config JSON, or the head counts (--vision-heads N --text-heads N).")
  else:
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    path = os.path.join(folder, CONFIG_NAME)
    arch = arch_from_open_clip(_read(path), repr(path)) if os.path.isfile(path) else Arch()
  for name, value in (("vision", vision_heads), ("text", text_heads)):
    if value is not None:
      if int(value) < 1:
        raise ProclipError(f"--{name}-heads {value}: must be a positive head count.")
      tower = dataclasses.replace(getattr(arch, name), heads=int(value))
      arch = dataclasses.replace(arch, **{name: tower}, source=(
          arch.source if arch.source != Arch.source else "--vision-heads/--text-heads"))
  return arch


# (width, layers, patch, image size) of image towers / (width, layers) of text towers whose
# heads are 64 wide in every known model of that size.
def _known(kind: str) -> dict[tuple, tuple[int, list[str]]]:
  out: dict[tuple, tuple[int, list[str]]] = {}
  for name, cfg in OPEN_CLIP_MODELS.items():
    a = arch_from_open_clip(cfg, name)
    t = a.vision if kind == "vision" else a.text
    key = ((t.width, t.layers, t.patch_size, t.image_size) if kind == "vision"
           else (t.width, t.layers))
    heads, names = out.get(key, (t.heads, []))
    out[key] = (heads if heads == t.heads else -1, names + [name])
  return out


def tower_heads(kind: str, arch: Arch, shapes: TowerArch, where: str) -> int:
  """The head count of a tower of the given ``shapes``; checks ``arch``'s stated sizes.

  ``kind``: "vision" or "text"; ``shapes``: sizes read from the tensors.
  """
  stated = arch.vision if kind == "vision" else arch.text
  flag = f"--{kind}-heads"
  wrong = [f"{f.name} {getattr(shapes, f.name)} (expected {getattr(stated, f.name)})"
           for f in dataclasses.fields(TowerArch) if f.name != "heads"
           and getattr(stated, f.name) is not None and getattr(shapes, f.name) is not None
           and getattr(stated, f.name) != getattr(shapes, f.name)]
  if wrong:
    raise ProclipError(f"The {kind} tower of {where} does not match {arch.source}: "
                       f"{', '.join(wrong)}. Pass the preset of this model (or the head "
                       f"counts only: {flag} N).")
  if stated.heads is not None:
    if shapes.width % stated.heads:
      raise ProclipError(f"{arch.source}: {stated.heads} heads do not divide the {kind} width "
                         f"{shapes.width} of {where}.")
    return stated.heads
  key = ((shapes.width, shapes.layers, shapes.patch_size, shapes.image_size) if kind == "vision"
         else (shapes.width, shapes.layers))
  heads, names = _known(kind).get(key, (None, []))
  desc = (f"width {shapes.width}, {shapes.layers} layers"
          + (f", patch {shapes.patch_size}, image {shapes.image_size}" if kind == "vision" else ""))
  if heads is not None and heads > 0 and heads * 64 == shapes.width:
    return heads
  fix = (f"Pass --preset NAME (an open_clip model name: {', '.join(_BASE)}, '-quickgelu' "
         f"variants, or an open_clip model config JSON), put {CONFIG_NAME} next to the "
         f"checkpoint, or pass {flag} N.")
  if heads is not None and heads > 0:
    raise ProclipError(f"The {kind} tower of {where} ({desc}) looks like open_clip's "
                       f"{names[0]}, whose {heads} heads are {shapes.width // heads} wide, not "
                       f"64: pass --preset {names[0]} (or {flag} {heads}).")
  why = ("its width is not a multiple of 64" if shapes.width % 64 else
         "these are not one of OpenAI's standard sizes, where width // 64 heads is known to "
         "be right")
  raise ProclipError(f"Cannot tell the attention head count of the {kind} tower of {where} "
                     f"({desc}): {why}. {fix}")
