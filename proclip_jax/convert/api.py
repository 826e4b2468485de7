"""One entry point for every converter: detect the checkpoint's family, convert, write.

``convert(src, out)`` looks at ``src``:

* a folder whose ``config.json`` has ``model_type`` "clip" / "clip_vision_model" /
  "clip_text_model" -> Hugging Face CLIP (:mod:`proclip_jax.convert.clip`);
* ``model_type`` "llama" / "qwen3" / "qwen2" / "bert" / "mistral" -> an LLM or sentence
  embedder (:mod:`proclip_jax.convert.llm`);
* otherwise a state dict (file or folder) whose keys include ``text.text_adaptor.`` ->
  a ProCLIP checkpoint (:mod:`proclip_jax.convert.proclip`);
* keys ``visual.*`` plus ``token_embedding.weight`` -> an OpenAI / open_clip CLIP;
* ``model_type`` "siglip" / "siglip_vision_model" (a Hugging Face folder) or an ``.npz``
  file (a big_vision parameter tree) -> a SigLIP / SigLIP 2 image tower
  (:mod:`proclip_jax.convert.siglip`).

Anything else is a :class:`ProclipError` naming what was found and the supported forms.
"""
from __future__ import annotations

import os
from typing import Mapping

from proclip_jax.convert.common import read_json, read_state_dict
from proclip_jax.errors import ProclipError

CLIP_TYPES = ("clip", "clip_vision_model", "clip_text_model")
EMBEDDER_TYPES = ("llama", "qwen3", "qwen2", "bert", "mistral")
# SigLIP 2 NaFlex types are detected so that the SigLIP converter refuses them by name.
SIGLIP_TYPES = ("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model")

SUPPORTED = (
    "Supported sources: a Hugging Face folder (config.json + model.safetensors or "
    "pytorch_model.bin) with model_type in {clip, clip_vision_model, clip_text_model, llama, "
    "qwen3, qwen2, bert, mistral, siglip, siglip_vision_model}; an OpenAI / open_clip CLIP "
    "state dict (.pt/.bin/.safetensors with visual.* and token_embedding.weight keys); a "
    "ProCLIP checkpoint (keys text.text_adaptor.*); a big_vision SigLIP / SigLIP 2 .npz.")


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
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  try:
    with safe_open(path, framework="np") as f:
      return list(f.keys())
  except Exception:  # a damaged file: let the full reader raise its message
    return None


def _describe(keys) -> str:
  keys = sorted(keys)
  return f"{len(keys)} tensors, e.g. {keys[:8]}"


def detect(src: str) -> tuple[str, Mapping | None]:
  """Returns ``(family, state_dict or None)``; family in hf-clip, embedder, proclip, openai-clip,
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
  found = f"config.json model_type {mtype!r} and " if mtype is not None else ""
  raise ProclipError(f"Cannot tell what {src!r} is: found {found}{_describe(keys)}. {SUPPORTED}")


def convert(src: str, out: str, *, lora: str | None = None, preset: str | None = None,
            overwrite: bool = False, scan_layers: bool = False, act: str | None = None) -> str:
  """Converts ``src`` into the folder ``out`` (Orbax params + model.json); returns ``out``.

  Args:
    src: Hugging Face folder or checkpoint file (see the module docstring).
    out: output folder; must not exist unless ``overwrite``.
    lora: PEFT adapter folder merged into an LLM embedder (embedders only).
    preset: embedder preset name (pooling / prompt conventions; embedders only).
    overwrite: replace an existing ``out``.
    scan_layers: store CLIP / SigLIP towers in the stacked (``nn.scan``) layout.
    act: activation of an OpenAI-layout CLIP ("quick_gelu" default, "gelu" for open_clip
      models trained without QuickGELU).
  """
  src, out = os.fspath(src), os.fspath(out)
  if os.path.exists(out) and not overwrite:
    raise ProclipError(f"Output {out!r} already exists; remove it or pass --overwrite.")
  family, sd = detect(src)
  if family in ("hf-clip", "openai-clip", "proclip", "hf-siglip", "big-vision-siglip"):
    for name, value in (("--lora", lora), ("--preset", preset)):
      if value is not None:
        raise ProclipError(f"{name} applies to LLM / sentence embedders, not to a {family} "
                           f"checkpoint ({src!r}).")
  if act is not None and family != "openai-clip":
    raise ProclipError(f"--act applies to OpenAI-layout CLIP state dicts, not to {family}.")
  if family == "hf-clip":
    from proclip_jax.convert.clip import convert_hf_clip  # pylint: disable=import-outside-toplevel
    return convert_hf_clip(src, out, overwrite=overwrite, scan_layers=scan_layers)
  if family == "openai-clip":
    from proclip_jax.convert.clip import convert_openai_clip  # pylint: disable=import-outside-toplevel
    return convert_openai_clip(src, out, overwrite=overwrite, scan_layers=scan_layers,
                               act=act or "quick_gelu", state_dict=sd)
  if family in ("hf-siglip", "big-vision-siglip"):
    from proclip_jax.convert import siglip  # pylint: disable=import-outside-toplevel
    fn = siglip.convert_hf_siglip if family == "hf-siglip" else siglip.convert_big_vision
    return fn(src, out, overwrite=overwrite, scan_layers=scan_layers)
  if family == "embedder":
    from proclip_jax.convert.llm import convert_embedder  # pylint: disable=import-outside-toplevel
    return convert_embedder(src, out, preset=preset, lora=lora, overwrite=overwrite)
  from proclip_jax.convert.proclip import convert_proclip  # pylint: disable=import-outside-toplevel
  return convert_proclip(src, out, overwrite=overwrite)


def summary(out: str) -> str:
  """One line describing a converted folder: family, parameter count, path."""
  from proclip_jax.checkpoint import read_model_json  # pylint: disable=import-outside-toplevel
  meta = read_model_json(out)
  n = meta.get("num_params")
  if n is None:
    import numpy as np  # pylint: disable=import-outside-toplevel
    from proclip_jax.checkpoint import load_model  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    n = int(sum(np.size(x) for x in jax.tree.leaves(load_model(out)[1])))
  family = meta.get("family", meta.get("kind"))
  skipped = meta.get("skipped") or {}
  skip = ("; skipped on purpose: " + ", ".join(f"{k} ({v} tensors)" for k, v in
                                              sorted(skipped.items()))) if skipped else ""
  return (f"converted {family} ({meta.get('kind')}): {n:,} parameters -> "
          f"{os.path.abspath(out)}{skip}")

