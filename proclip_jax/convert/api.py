"""One entry point for every converter: detect the checkpoint's family, convert, write.

``convert(src, out)`` looks at ``src``:

* a folder whose ``config.json`` has ``model_type`` "clip" / "clip_vision_model" /
  "clip_text_model" -> Hugging Face CLIP (:mod:`proclip_jax.convert.clip`);
* ``model_type`` "llama" / "qwen3" / "qwen2" / "bert" / "mistral" -> an LLM or sentence
  embedder (:mod:`proclip_jax.convert.llm`);
* otherwise a state dict (file or folder) whose keys include ``text.text_adaptor.`` ->
  a ProCLIP checkpoint (:mod:`proclip_jax.convert.proclip`);
* keys ``visual.*`` plus ``token_embedding.weight`` -> an OpenAI / open_clip CLIP;
* an EVA02 image tower (timm, open_clip ``visual.trunk.*`` or EVA-CLIP ``visual.*`` keys, see
  :mod:`proclip_jax.convert.eva`) -> an EVA02-CLIP.
* ``model_type`` "siglip" / "siglip_vision_model" (a Hugging Face folder) or an ``.npz``
  file (a big_vision parameter tree) -> a SigLIP / SigLIP 2 image tower
  (:mod:`proclip_jax.convert.siglip`).

Anything else is a :class:`ProclipError` naming what was found and the supported forms.
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from etils import epath
from safetensors import safe_open

from proclip_jax.convert import siglip
from proclip_jax.convert.clip import convert_hf_clip, convert_openai_clip
from proclip_jax.convert.eva import convert_eva_clip, find_eva
from proclip_jax.convert.common import read_json, read_state_dict
from proclip_jax.convert.llm import convert_embedder
from proclip_jax.convert.openclip_arch import resolve_arch
from proclip_jax.convert.proclip import convert_proclip
from proclip_jax.data import paths
from proclip_jax.data.paths import check_output_apart
from proclip_jax.errors import ProclipError
from proclip_jax.storage import load_model, read_model_json

CLIP_TYPES = ("clip", "clip_vision_model", "clip_text_model")
EMBEDDER_TYPES = ("llama", "qwen3", "qwen2", "bert", "mistral")
# SigLIP 2 NaFlex types are detected so that the SigLIP converter refuses them by name.
SIGLIP_TYPES = ("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model")

SUPPORTED = (
    "Supported sources: a Hugging Face folder (config.json + model.safetensors or "
    "pytorch_model.bin) with model_type in {clip, clip_vision_model, clip_text_model, llama, "
    "qwen3, qwen2, bert, mistral, siglip, siglip_vision_model}; an OpenAI / open_clip CLIP "
    "state dict (.pt/.bin/.safetensors with visual.* and token_embedding.weight keys, or "
    "OpenAI's TorchScript archive); an EVA02-CLIP state dict (timm / open_clip / EVA-CLIP, "
    "e.g. blocks.N.mlp.fc1_g or visual.blocks.N.mlp.w1 keys); a ProCLIP checkpoint (keys "
    "text.text_adaptor.*); a big_vision SigLIP / SigLIP 2 .npz.")


def _model_type(src: str) -> str | None:
  cfg = os.path.join(src, "config.json")
  if os.path.isdir(src) and os.path.exists(cfg):
    return read_json(cfg).get("model_type")
  return None


def _safetensors_keys(src: str) -> list[str] | None:
  """Tensor names without reading tensors, when ``src`` is (a folder of) safetensors."""
  index = os.path.join(src, "model.safetensors.index.json")
  if os.path.isdir(src) and os.path.exists(index):
    return list(read_json(index).get("weight_map", {}))
  path = src
  if os.path.isdir(src):
    path = os.path.join(src, "model.safetensors")
  if not (path.endswith(".safetensors") and os.path.isfile(path)):
    return None
  try:
    with safe_open(path, framework="np") as f:
      return list(f.keys())
  except Exception:  # a damaged file: let the full reader raise its message
    return None


def _describe(keys) -> str:
  keys = sorted(keys)
  return f"{len(keys)} tensors, e.g. {keys[:8]}"


def detect(src: str) -> tuple[str, Mapping | None]:
  """``(family, state_dict or None)``; family: hf-clip, embedder, proclip, openai-clip, eva-clip,
  hf-siglip, big-vision-siglip."""
  src = os.fspath(src)
  if not os.path.exists(src):
    raise ProclipError(f"Source {src!r} does not exist. {SUPPORTED}")
  mtype = _model_type(src)
  if mtype in CLIP_TYPES:
    return "hf-clip", None
  if mtype in EMBEDDER_TYPES:
    return "embedder", None
  if mtype in SIGLIP_TYPES:
    return "hf-siglip", None
  if os.path.isfile(src) and src.endswith(".npz"):
    return "big-vision-siglip", None
  sd = None
  keys = _safetensors_keys(src)
  if keys is None:
    sd = read_state_dict(src)
    keys = list(sd)
  if any(k.startswith("text.text_adaptor.") for k in keys):
    return "proclip", None
  if any(k.startswith("visual.") for k in keys) and "token_embedding.weight" in keys:
    return "openai-clip", sd
  if find_eva(keys) is not None:
    return "eva-clip", sd
  found = f"config.json model_type {mtype!r} and " if mtype is not None else ""
  raise ProclipError(f"Cannot tell what {src!r} is: found {found}{_describe(keys)}. {SUPPORTED}")


def convert(src: str, out: str, *, lora: str | None = None, preset: str | None = None,
            overwrite: bool = False, scan_layers: bool = False, act: str | None = None,
            vision_heads: int | None = None, text_heads: int | None = None) -> str:
  """Converts ``src`` into the folder ``out`` (Orbax params + model.json); returns ``out``.

  Args:
    src: Hugging Face folder or checkpoint file (see the module docstring).
    out: output folder; must not exist unless ``overwrite``.
    lora: PEFT adapter folder merged into an LLM embedder (embedders only).
    preset: embedder preset name (pooling / prompt conventions) for an embedder; for an
      OpenAI-layout CLIP or ProCLIP checkpoint an open_clip model name (``ViT-H-14``) or
      model config JSON giving the head counts (:mod:`proclip_jax.convert.openclip_arch`).
    overwrite: replace an existing ``out``.
    scan_layers: store CLIP / EVA02 / SigLIP towers in the stacked (``nn.scan``) layout.
    act: activation of an OpenAI-layout CLIP (default: the preset's, else "quick_gelu";
      "gelu" for open_clip models trained without QuickGELU).
    vision_heads, text_heads: attention head counts of an OpenAI-layout CLIP's towers, when
      neither a preset nor the standard OpenAI sizes give them.
  """
  src, out = os.fspath(src), os.fspath(out)
  loras = [lora] if isinstance(lora, (str, os.PathLike)) else list(lora or ())
  check_output_apart(out, [("source", src), *[("LoRA folder", p) for p in loras]])
  if epath.Path(out).exists() and not overwrite:
    raise ProclipError(f"Output {out!r} already exists; remove it or pass --overwrite.")
  family, sd = detect(src)
  if lora is not None and family != "embedder":
    raise ProclipError(f"--lora applies to LLM / sentence embedders, not to a {family} "
                       f"checkpoint ({src!r}).")
  if family in ("hf-clip", "eva-clip", "hf-siglip", "big-vision-siglip") and preset is not None:
    raise ProclipError(f"--preset does not apply to a {family} checkpoint ({src!r}): its "
                       "config.json or tensor shapes give the architecture.")
  # An EVA02-CLIP file's text tower is OpenAI-layout: its head count may need --text-heads.
  heads = {"--vision-heads": (vision_heads, ("openai-clip", "proclip")),
           "--text-heads": (text_heads, ("openai-clip", "proclip", "eva-clip"))}
  for name, (value, families) in heads.items():
    if value is not None and family not in families:
      raise ProclipError(f"{name} applies to OpenAI-layout CLIP / ProCLIP state dicts, not to "
                         f"{family} ({src!r}), whose config.json gives the head counts.")
  if act is not None and family not in ("openai-clip", "proclip"):
    raise ProclipError(f"--act applies to OpenAI-layout CLIP state dicts, not to {family}.")
  if family == "hf-clip":
    return convert_hf_clip(src, out, overwrite=overwrite, scan_layers=scan_layers)
  if family == "eva-clip":
    return convert_eva_clip(src, out, overwrite=overwrite, scan_layers=scan_layers,
                            state_dict=sd, arch=resolve_arch(src, None, None, text_heads))
  if family in ("hf-siglip", "big-vision-siglip"):
    fn = siglip.convert_hf_siglip if family == "hf-siglip" else siglip.convert_big_vision
    return fn(src, out, overwrite=overwrite, scan_layers=scan_layers)
  if family == "embedder":
    return convert_embedder(src, out, preset=preset, lora=lora, overwrite=overwrite)
  arch = resolve_arch(src, preset, vision_heads, text_heads)
  if family == "openai-clip":
    return convert_openai_clip(src, out, overwrite=overwrite, scan_layers=scan_layers,
                               act=act, state_dict=sd, arch=arch)
  return convert_proclip(src, out, overwrite=overwrite, act=act, scan_layers=scan_layers,
                         arch=arch)


def summary(out: str) -> str:
  """One line describing a converted folder: family, parameter count, path."""
  meta = read_model_json(out)
  n = meta.get("num_params")
  if n is None:
    n = int(sum(np.size(x) for x in jax.tree.leaves(load_model(out)[1])))
  family = meta.get("family", meta.get("kind"))
  skipped = meta.get("skipped") or {}
  skip = ("; skipped on purpose: " + ", ".join(f"{k} ({v} tensors)" for k, v in
                                              sorted(skipped.items()))) if skipped else ""
  return (f"converted {family} ({meta.get('kind')}): {n:,} parameters -> "
          f"{paths.absolute(out)}{skip}")

