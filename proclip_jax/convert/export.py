"""Export to PyTorch layouts: a converted CLIP, EVA02-CLIP, SigLIP tower or ProCLIP, or a
training workdir.

``export(src, out, fmt)`` reads ``src`` (a folder with ``model.json`` of kind "clip",
"siglip" or "proclip", or a training ``--workdir``; its latest checkpoint unless ``step``) and
writes, by the model's image tower (its config's ``arch``):

OpenAI-CLIP ViT towers (and a CLIP text tower alone):

* ``openai``: ``out`` is a ``.pt`` file, ``torch.save`` of a plain state dict in OpenAI's
  names (``visual.*``, ``transformer.resblocks.*``, ``token_embedding.weight``,
  ``text_projection``, ``logit_scale``), as ``clip.model.build_model`` and open_clip load it;
* ``open_clip``: ``out`` is a folder as open_clip's Hugging Face repositories hold a model:
  ``open_clip_model.safetensors`` (the same names) and ``open_clip_config.json``
  (``{"model_cfg": ...}`` with the head width and ``quick_gelu``), which ``tools/convert.py``
  reads back too;
* ``hf``: ``out`` is a transformers folder (``config.json`` + ``model.safetensors``):
  ``CLIPVisionModelWithProjection`` for an image tower (a ProCLIP), ``CLIPModel`` for a CLIP
  with both towers, ``CLIPTextModelWithProjection`` for a text tower alone;
* ``proclip``: ``out`` is a ``.pt`` file in the ProCLIP release layout, ``{"state_dict":
  {visual.*, text.text_adaptor.*, logit_scale}}`` (ProCLIP models only), which
  ``tools/convert.py`` converts back.

EVA02-CLIP towers (``arch`` "eva02"):

* ``open_clip``: open_clip's timm-based layout, ``visual.trunk.*`` (timm's ``Eva`` names, the
  head ``visual.trunk.head.*`` as open_clip's ``timm_proj: null`` keeps it), the text tower of
  an EVA02-CLIP under ``text.*`` (``custom_text``) and ``logit_scale``; the config names the
  timm model (``eva02_large_patch14_clip_224`` etc.; another size adds the
  ``timm.create_model`` keyword arguments as ``timm_model_kwargs``);
* ``proclip`` (ProCLIP models): the release layout with BAAI EVA-CLIP's ``visual.*`` (``q_bias``
  / ``v_bias``, ``mlp.w1/w2/w3``, the RoPE tables), as the EVA-based ProCLIP / LLM2CLIP files;
* ``openai`` is refused: the OpenAI layout (``clip.model.build_model``) has no EVA02 tower, and
  writing EVA-CLIP names under that name would promise a file OpenAI's loader cannot build;
* ``hf`` is refused: transformers has no EVA02-CLIP model class.

SigLIP towers (``arch`` "siglip", a converted SigLIP or a ProCLIP built on one):

* ``hf``: a transformers ``SiglipVisionModel`` folder (``config.json`` + ``model.safetensors``
  in the names the pinned transformers saves it with: ``embeddings.*``, ``encoder.*``,
  ``post_layernorm.*``, ``head.*``); it takes SigLIP-normalised pixels (mean = std = 0.5, its
  processor's), where the project's tower takes CLIP-normalised ones by default. A tower with
  a Dense after the MAP head (big_vision ``img/head``) is refused: ``SiglipVisionModel`` has
  no such layer;
* ``openai``, ``open_clip`` (timm's attention-pool layout, which ``tools/convert.py`` does not
  read) and ``proclip`` (the release layout, whose converter reads OpenAI and EVA-CLIP towers
  only) are refused.

The OpenAI / open_clip, Hugging Face and ProCLIP layouts cannot hold a ProCLIP's adapter or
the text tower's tokenizer: the ``openai`` / ``open_clip`` / ``hf`` exports of a ProCLIP hold
its image tower (and logit scale), and the one-line summary says so. Names come from the
converters' rename tables run backwards (:func:`proclip_jax.convert.clip.invert_table`); every
parameter is written or the export is refused, an EVA02 / SigLIP tower is read back from the
exported names by its converter's own config inference and refused when that would give another
architecture (e.g. EVA02 heads other than 64 wide, a RoPE reference grid other than 16), and
the output appears under its name only when complete. A refusal writes nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
from safetensors.numpy import save_file

from proclip_jax.convert import clip as clip_conv
from proclip_jax.convert import eva as eva_conv
from proclip_jax.convert import siglip as siglip_conv
from proclip_jax.convert.common import linear
from proclip_jax.convert.openclip_arch import Arch, TowerArch
from proclip_jax.convert.proclip import adapter_rename_table
from proclip_jax.errors import ProclipError
from proclip_jax.inference import load_workdir
from proclip_jax.models.clip import CLIPConfig
from proclip_jax.models.eva import EvaVisionConfig
from proclip_jax.models.proclip import ProCLIPConfig
from proclip_jax.models.siglip import SiglipConfig
from proclip_jax.models.vit import unstack_layers
from proclip_jax.storage import MODEL_JSON, load_model
from proclip_jax.tree import flatten

FORMATS = ("openai", "open_clip", "hf", "proclip")
_HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# Config fields that are compute options or input conventions, not weights: an exported
# layout need not record them.
_COMPUTE = ("dtype", "remat", "scan_layers", "attention", "pixel_norm")
# The timm models open_clip builds EVA02-CLIP image towers from (EvaVisionConfig.named sizes).
_EVA_TIMM = {"EVA02-B/16": "eva02_base_patch16_clip_224",
             "EVA02-L/14": "eva02_large_patch14_clip_224",
             "EVA02-L/14-336": "eva02_large_patch14_clip_336"}
_OPENAI_PREPROCESS = {"mean": [0.48145466, 0.4578275, 0.40821073],
                      "std": [0.26862954, 0.26130258, 0.27577711]}


# ----------------------------------------------------------------------------- reading

def load_source(src: str, step: int | None = None) -> tuple[str, Any, dict]:
  """``(kind, config, params)``: kind "clip" (``CLIPConfig``), "siglip" (a ``CLIPConfig`` with
  the SigLIP image tower and no text tower) or "proclip" (``ProCLIPConfig``); params in the
  per-layer layout, as float32 numpy arrays."""
  src = os.fspath(src)
  if not os.path.isdir(src):
    raise ProclipError(f"Export source {src!r} is not a folder: pass a converted model folder "
                       "(tools/convert.py, ProCLIP.save) or a training workdir.")
  if os.path.isfile(os.path.join(src, MODEL_JSON)):
    if step is not None:
      raise ProclipError(f"--step applies to a training workdir; {src!r} is a model folder.")
    meta, params = load_model(src)
    kind = meta.get("kind")
    if kind == "clip":
      config = CLIPConfig.from_dict(meta["config"])
    elif kind == "proclip":
      config = ProCLIPConfig.from_dict(meta["config"])
    elif kind == siglip_conv.KIND:
      config = CLIPConfig(vision=SiglipConfig.from_dict(meta["config"]["vision"]), text=None)
    else:
      raise ProclipError(f"{src!r} holds a {kind!r} model; only CLIP, SigLIP and ProCLIP models "
                         "export (a text embedder is used from its Hugging Face source as it "
                         "is).")
  else:
    config, params, _, _ = load_workdir(src, step)
    kind = "proclip"
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(params))
  for tower in ("visual", "text"):
    if tower in params:
      params[tower] = unstack_layers(params[tower])
  return kind, config, params


# ----------------------------------------------------------------------------- layouts

def _logit_scale(params: Mapping, config) -> np.ndarray:
  value = params.get("logit_scale", getattr(config, "logit_scale_init", None))
  return np.asarray(value, np.float32).reshape(())


def _towers(kind: str, config) -> tuple[Any, Any]:
  """(VisionConfig or None, TextConfig or None) of a model."""
  if kind == "clip":
    return config.vision, config.text
  return config.vision, None


def tower_arch(vision) -> str | None:
  """"vit" (OpenAI-CLIP ViT), "eva02", "siglip", or None (no image tower)."""
  if vision is None:
    return None
  if isinstance(vision, EvaVisionConfig):
    return "eva02"
  if isinstance(vision, SiglipConfig):
    return "siglip"
  return "vit"


def check_format(kind: str, config, fmt: str) -> None:
  """Refuses (ProclipError naming the formats that work) a format with no layout for the
  model's image tower."""
  arch = tower_arch(_towers(kind, config)[0])
  if arch == "eva02" and fmt in ("openai", "hf"):
    works = "--format open_clip (open_clip's timm-based visual.trunk.* layout)"
    if kind == "proclip":
      works += (" or --format proclip (the ProCLIP release layout with BAAI EVA-CLIP's "
                "visual.*, the adapter included)")
    why = ("the OpenAI layout (clip.model.build_model) has no EVA02 image tower" if fmt == "openai"
           else "transformers has no EVA02-CLIP model class")
    raise ProclipError(f"Cannot export an EVA02 image tower as --format {fmt}: {why}. Export it "
                       f"with {works}. Nothing was written.")
  if arch == "siglip" and fmt != "hf":
    why = {"openai": "the OpenAI layout has no SigLIP image tower (no class token, a MAP head)",
           "open_clip": ("open_clip holds SigLIP as a timm trunk (timm's attention-pool names), "
                         "which tools/convert.py does not read back"),
           "proclip": ("the ProCLIP release layout holds OpenAI or EVA-CLIP image towers; its "
                       "converter (convert/proclip.py) reads no SigLIP visual.*, so the adapter "
                       "has no PyTorch layout beside a SigLIP tower")}[fmt]
    raise ProclipError(f"Cannot export a SigLIP image tower as --format {fmt}: {why}. Export the "
                       "tower with --format hf (a transformers SiglipVisionModel folder). Nothing "
                       "was written.")


def _check_reads_back(want, got, layout: str) -> None:
  """Refuses an export whose names its converter would read back as another architecture."""
  diff = [(f.name, getattr(want, f.name), getattr(got, f.name))
          for f in dataclasses.fields(want)
          if f.name not in _COMPUTE and getattr(want, f.name) != getattr(got, f.name)]
  if diff:
    raise ProclipError(
        f"The {layout} layout cannot record this tower's "
        + ", ".join(f"{name}={a!r}" for name, a, _ in diff)
        + ": tools/convert.py would read the export back with "
        + ", ".join(f"{name}={b!r}" for name, _, b in diff)
        + ". Only towers with the released models' conventions export in this layout (EVA02: "
        "64-wide heads, RoPE reference grid 16, LayerNorm eps 1e-6). Nothing was written.")


def eva_visual_state_dict(vision: EvaVisionConfig, visual: Mapping, layout: str,
                          prefix: str) -> dict[str, np.ndarray]:
  """An EVA02 image tower in ``layout`` ("timm": timm / open_clip, "eva": BAAI EVA-CLIP, with
  the RoPE tables) under ``prefix``: the converter's table run backwards, checked to read back
  as the same tower."""
  flat = flatten({"visual": unstack_layers(visual)})
  sd = clip_conv.invert_table(flat, eva_conv.eva_vision_table(vision, layout, prefix),
                              "EVA02 image tower")
  back = eva_conv.eva_visual_config(sd, layout, prefix)
  _check_reads_back(vision, back, f"EVA02 ({layout})")
  return sd


def _eva_text_state_dict(text, params: Mapping) -> dict[str, np.ndarray]:
  """An EVA02-CLIP's text tower: OpenAI names under ``text.`` (open_clip's custom_text)."""
  sd = clip_conv.invert_table(flatten({"text": unstack_layers(params)}),
                              clip_conv.openai_text_table(text), "text tower")
  back = clip_conv.openai_text_config(sd, act="gelu", arch=Arch(text=TowerArch(heads=text.heads)))
  _check_reads_back(text, back, "EVA02-CLIP text tower (exact GELU, argmax pooling)")
  return {"text." + k: v for k, v in sd.items()}


def _eva_timm_model(vision: EvaVisionConfig) -> tuple[str, dict]:
  """``(timm model name, extra timm.create_model keyword arguments)`` of an EVA02 tower."""
  for name, timm_name in _EVA_TIMM.items():
    std = EvaVisionConfig.named(name, embed_dim=vision.embed_dim)
    if all(getattr(std, f) == getattr(vision, f) for f in ("image_size", "patch_size", "width",
                                                          "layers", "heads", "mlp_dim")):
      return timm_name, {}
  ratio = vision.mlp_dim / vision.width
  while int(vision.width * ratio) < vision.mlp_dim:  # timm takes int(width * mlp_ratio)
    ratio = float(np.nextafter(ratio, np.inf))
  return _EVA_TIMM["EVA02-L/14"], {
      "img_size": vision.image_size, "patch_size": vision.patch_size,
      "embed_dim": vision.width, "depth": vision.layers, "num_heads": vision.heads,
      "mlp_ratio": ratio}


def to_eva_open_clip(kind: str, config, params: Mapping) -> tuple[dict, dict]:
  """``(state dict, open_clip_config.json)`` of a model with an EVA02 image tower in open_clip's
  timm-based layout (``visual.trunk.*``, ``text.*``, ``logit_scale``)."""
  vision, text = _towers(kind, config)
  if vision.embed_dim is None or text is not None and text.embed_dim != vision.embed_dim:
    raise ProclipError("open_clip needs the EVA02 tower's head (timm's classifier, projecting "
                       "to the joint size) and a text tower of the same size; this model has "
                       f"{vision.embed_dim} and {None if text is None else text.embed_dim}.")
  sd = eva_visual_state_dict(vision, params["visual"], "timm", "visual.trunk.")
  timm_name, kwargs = _eva_timm_model(vision)
  vcfg: dict[str, Any] = {"image_size": vision.image_size, "timm_model_name": timm_name,
                          "timm_model_pretrained": False, "timm_pool": "token",
                          "timm_proj": None}
  if kwargs:
    vcfg["timm_model_kwargs"] = kwargs
  cfg: dict[str, Any] = {"embed_dim": vision.embed_dim, "quick_gelu": False, "vision_cfg": vcfg}
  if text is not None:
    sd.update(_eva_text_state_dict(text, params["text"]))
    cfg["custom_text"] = True
    cfg["text_cfg"] = {"context_length": text.context_length, "vocab_size": text.vocab_size,
                       "width": text.width, "heads": text.heads, "layers": text.layers,
                       "mlp_ratio": text.mlp_width / text.width}
  sd["logit_scale"] = _logit_scale(params, config)
  return sd, {"model_cfg": cfg, "preprocess_cfg": _OPENAI_PREPROCESS}


def to_siglip_hf(kind: str, config, params: Mapping) -> tuple[dict, dict]:
  """``(state dict, config.json)`` of a transformers ``SiglipVisionModel`` for a SigLIP tower."""
  vision, text = _towers(kind, config)
  if text is not None:
    raise ProclipError("transformers has no CLIP model with a SigLIP image tower; export the "
                       "image tower alone (a SigLIP or ProCLIP model) with --format hf.")
  if vision.embed_dim is not None:
    raise ProclipError(
        f"This SigLIP tower ends with a Dense to {vision.embed_dim} after the MAP head "
        "(big_vision's img/head); transformers' SiglipVisionModel has no such layer and no other "
        "export layout holds it. Nothing was written.")
  if vision.act not in _HF_ACT:
    raise ProclipError(f"transformers' SigLIP has no activation {vision.act!r}.")
  sd = clip_conv.invert_table(flatten({"visual": unstack_layers(params["visual"])}),
                              siglip_conv.hf_table(vision, ""), "SigLIP image tower")
  cfg = {"model_type": "siglip_vision_model", "architectures": ["SiglipVisionModel"],
         "hidden_size": vision.width, "intermediate_size": vision.mlp_width,
         "num_hidden_layers": vision.layers, "num_attention_heads": vision.heads,
         "image_size": vision.image_size, "patch_size": vision.patch_size, "num_channels": 3,
         "hidden_act": _HF_ACT[vision.act], "layer_norm_eps": vision.ln_eps,
         "vision_use_head": True}
  _check_reads_back(vision, siglip_conv.hf_vision_config(cfg), "transformers SiglipVisionModel")
  return sd, cfg


def to_openai(kind: str, config, params: Mapping) -> dict[str, np.ndarray]:
  """OpenAI / open_clip names for the CLIP towers present, plus ``logit_scale``."""
  check_format(kind, config, "openai")
  vision, text = _towers(kind, config)
  if vision is None and text is None:
    raise ProclipError("This model has no CLIP tower to export (a stage-1 ProCLIP holds only "
                       "the adapter): use --format proclip.")
  tree = {"logit_scale": _logit_scale(params, config)}
  tree.update({k: params[k] for k in ("visual", "text") if k in params
               and (k == "visual" and vision is not None or k == "text" and text is not None)})
  return clip_conv.clip_to_openai(tree, CLIPConfig(vision=vision, text=text))


def open_clip_config(kind: str, config) -> dict:
  """``open_clip_config.json`` contents (``{"model_cfg": ...}``) for the towers present."""
  check_format(kind, config, "open_clip")
  vision, text = _towers(kind, config)
  if tower_arch(vision) == "eva02":
    raise ProclipError("open_clip_config() describes OpenAI-ViT towers; an EVA02 tower's "
                       "config comes with its weights from to_eva_open_clip().")
  towers = [t for t in (vision, text) if t is not None]
  acts = {t.act for t in towers}
  if len(acts) > 1 or acts - {"quick_gelu", "gelu"}:
    raise ProclipError(f"open_clip has no activation setting for {sorted(acts)}; its towers "
                       "use QuickGELU or exact GELU. Export with --format openai or hf.")
  embed = {t.embed_dim for t in towers}
  if len(embed) != 1 or None in embed:
    raise ProclipError(f"open_clip needs projected towers of one embedding size; this model "
                       f"has {sorted(embed, key=str)}. Export with --format openai or hf.")
  cfg: dict[str, Any] = {"embed_dim": embed.pop(), "quick_gelu": acts == {"quick_gelu"}}
  if vision is not None:
    cfg["vision_cfg"] = {"image_size": vision.image_size, "layers": vision.layers,
                         "width": vision.width, "head_width": vision.width // vision.heads,
                         "mlp_ratio": vision.mlp_width / vision.width,
                         "patch_size": vision.patch_size}
  if text is not None:
    cfg["text_cfg"] = {"context_length": text.context_length, "vocab_size": text.vocab_size,
                       "width": text.width, "heads": text.heads, "layers": text.layers,
                       "mlp_ratio": text.mlp_width / text.width}
  return {"model_cfg": cfg, "preprocess_cfg": _OPENAI_PREPROCESS}


def _hf_vision_config(v) -> dict:
  return {"hidden_size": v.width, "intermediate_size": v.mlp_width,
          "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
          "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": 3,
          "hidden_act": _HF_ACT[v.act], "layer_norm_eps": v.ln_eps}


def _hf_text_config(t) -> dict:
  # eos_token_id 2 is transformers' legacy switch to pooling at argmax(ids) (OpenAI's rule).
  return {"vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": t.mlp_width,
          "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
          "max_position_embeddings": t.context_length, "hidden_act": _HF_ACT[t.act],
          "layer_norm_eps": t.ln_eps,
          "eos_token_id": 2 if t.eos_token_id is None else int(t.eos_token_id)}


def to_hf(kind: str, config, params: Mapping) -> tuple[dict, dict]:
  """``(state dict, config.json)`` of a transformers CLIP model for the towers present (a
  ``SiglipVisionModel`` for a SigLIP tower)."""
  check_format(kind, config, "hf")
  vision, text = _towers(kind, config)
  if tower_arch(vision) == "siglip":
    return to_siglip_hf(kind, config, params)
  if vision is None and text is None:
    raise ProclipError("This model has no CLIP tower to export: use --format proclip.")
  for t in (vision, text):
    if t is not None and t.act not in _HF_ACT:
      raise ProclipError(f"transformers' CLIP has no activation {t.act!r}.")
  table, tree = [], {}
  if vision is not None and text is not None:
    embed = {vision.embed_dim, text.embed_dim}
    if len(embed) != 1 or None in embed:
      raise ProclipError(f"transformers' CLIPModel needs both towers projected to one size; "
                         f"this model has {sorted(embed, key=str)}.")
    table += clip_conv.hf_vision_table(vision, "vision_model.", "visual_projection.weight")
    table += clip_conv.hf_text_table(text, "text_model.", "text_projection.weight")
    table.append(("logit_scale", clip_conv._scalar("logit_scale")))  # pylint: disable=protected-access
    tree = {"visual": params["visual"], "text": params["text"],
            "logit_scale": _logit_scale(params, config)}
    cfg = {"model_type": "clip", "architectures": ["CLIPModel"],
           "projection_dim": vision.embed_dim,
           "logit_scale_init_value": float(_logit_scale(params, config)),
           "vision_config": _hf_vision_config(vision), "text_config": _hf_text_config(text)}
  elif vision is not None:
    proj = "visual_projection.weight" if vision.embed_dim is not None else None
    table += clip_conv.hf_vision_table(vision, "vision_model.", proj)
    tree = {"visual": params["visual"]}
    arch = "CLIPVisionModelWithProjection" if proj else "CLIPVisionModel"
    cfg = {"model_type": "clip_vision_model", "architectures": [arch],
           **_hf_vision_config(vision)}
    if proj:
      cfg["projection_dim"] = vision.embed_dim
  else:
    proj = "text_projection.weight" if text.embed_dim is not None else None
    table += clip_conv.hf_text_table(text, "text_model.", proj)
    tree = {"text": params["text"]}
    arch = "CLIPTextModelWithProjection" if proj else "CLIPTextModel"
    cfg = {"model_type": "clip_text_model", "architectures": [arch], **_hf_text_config(text)}
    if proj:
      cfg["projection_dim"] = text.embed_dim
  return clip_conv.invert_table(flatten(tree), table, "model"), cfg


def to_proclip(kind: str, config, params: Mapping) -> dict[str, np.ndarray]:
  """The ProCLIP release state dict: ``visual.*`` (OpenAI names, or BAAI EVA-CLIP's for an
  EVA02 tower), ``text.text_adaptor.*``, ``logit_scale``."""
  if kind != "proclip":
    raise ProclipError("--format proclip is for ProCLIP models (image tower + adapter); a CLIP "
                       "exports with --format openai, open_clip or hf (an EVA02-CLIP with "
                       "open_clip, a SigLIP tower with hf).")
  check_format(kind, config, "proclip")
  out = {}
  if tower_arch(config.vision) == "eva02":
    out.update(eva_visual_state_dict(config.vision, params["visual"], "eva", "visual."))
  elif config.vision is not None:
    out.update(clip_conv.visual_to_openai(params["visual"], config.vision, "visual."))
  flat = flatten(params["adapter"])
  table = adapter_rename_table("text.text_adaptor.", config.adapter.n_blocks)
  missing = sorted(dst for dst, _ in table.values() if dst not in flat)
  extra = sorted(set(flat) - {dst for dst, _ in table.values()})
  if missing or extra:
    raise ProclipError(f"Cannot export the adapter: it lacks {missing[:10]} and has {extra[:10]} "
                       "that the release layout has no name for; nothing was written.")
  for key, (dst, is_linear) in table.items():
    x = np.asarray(flat[dst], np.float32)
    out[key] = np.array(linear(x) if is_linear else x, order="C")
  out["logit_scale"] = _logit_scale(params, config)
  return out


# ----------------------------------------------------------------------------- writing

def _torch_save(sd: Mapping[str, np.ndarray], path: str, wrap: str | None = None) -> None:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ProclipError("Writing a .pt file needs torch (pip install torch==2.13.0); "
                       "--format open_clip / hf write safetensors without it.") from e
  tensors = {k: torch.from_numpy(np.array(v, order="C")) for k, v in sd.items()}
  torch.save({wrap: tensors} if wrap else tensors, path)


@contextlib.contextmanager
def _staged(out: str, folder: bool):
  """Yields a temporary path next to ``out`` that replaces ``out`` when the block succeeds."""
  parent = os.path.dirname(out) or "."
  os.makedirs(parent, exist_ok=True)
  prefix = os.path.basename(out) + ".tmp-"
  if folder:
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
  else:
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=parent)
    os.close(fd)
  try:
    yield tmp
    if os.path.isdir(out):
      shutil.rmtree(out)
    elif os.path.exists(out):
      os.remove(out)
    os.replace(tmp, out)
  except BaseException:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.exists(tmp):
      os.remove(tmp)
    raise


def _write_folder(out: str, files: Mapping[str, Any]) -> None:
  """Writes ``{name: dict of arrays (safetensors) | dict (JSON)}`` as the folder ``out``."""
  with _staged(out, folder=True) as tmp:
    for name, content in files.items():
      path = os.path.join(tmp, name)
      if name.endswith(".safetensors"):
        save_file(dict(content), path, metadata={"format": "pt"})
      else:
        with open(path, "w") as f:
          json.dump(content, f, indent=2)


def _write_file(out: str, sd: Mapping[str, np.ndarray], wrap: str | None) -> None:
  with _staged(out, folder=False) as tmp:
    _torch_save(sd, tmp, wrap)


def export(src: str, out: str, fmt: str, *, step: int | None = None,
           overwrite: bool = False) -> str:
  """Writes the model at ``src`` to ``out`` in ``fmt`` (see the module docstring); returns a
  one-line summary."""
  if fmt not in FORMATS:
    raise ProclipError(f"Unknown export format {fmt!r}; one of {', '.join(FORMATS)}.")
  out = os.path.abspath(os.fspath(out))
  if os.path.exists(out) and not overwrite:
    raise ProclipError(f"Output {out!r} already exists; remove it or pass --overwrite.")
  if fmt in ("openai", "proclip") and not out.endswith((".pt", ".pth", ".bin")):
    raise ProclipError(f"--format {fmt} writes one file: give OUT a .pt name (got {out!r}).")
  kind, config, params = load_source(src, step)
  check_format(kind, config, fmt)
  note = ""
  if fmt == "openai":
    sd = to_openai(kind, config, params)
    _write_file(out, sd, None)
  elif fmt == "open_clip":
    if tower_arch(_towers(kind, config)[0]) == "eva02":
      sd, cfg = to_eva_open_clip(kind, config, params)
    else:
      sd, cfg = to_openai(kind, config, params), open_clip_config(kind, config)
    _write_folder(out, {"open_clip_config.json": cfg, "open_clip_model.safetensors": sd})
  elif fmt == "hf":
    sd, cfg = to_hf(kind, config, params)
    _write_folder(out, {"config.json": cfg, "model.safetensors": sd})
  else:
    sd = to_proclip(kind, config, params)
    _write_file(out, sd, "state_dict")
  if kind == "proclip" and fmt != "proclip":
    note = " (the image tower; the adapter is only in --format proclip)"
  if fmt == "hf" and tower_arch(_towers(kind, config)[0]) == "siglip":
    note += " (SiglipVisionModel takes SigLIP-normalised pixels: mean = std = 0.5)"
  n = int(sum(np.size(v) for v in sd.values()))
  return f"exported {kind} as {fmt}{note}: {len(sd)} tensors, {n:,} values -> {out}"
