"""ProCLIP / LLM2CLIP release checkpoints -> a converted ``kind="proclip"`` model folder.

Source layout (PyTorch, saved as a plain state dict, ``{"state_dict": ...}`` or DeepSpeed's
``{"module": ...}``; ``read_state_dict`` removes the wrapper)::

    visual.*                            OpenAI CLIP image tower (converted by convert/clip.py)
                                        or EVA02 image tower (EVA-CLIP layout, convert/eva.py)
    text.text_adaptor.{i}.ln.{weight,bias}       block i: LayerNorm(D)
    text.text_adaptor.{i}.fn.0.{weight,bias}     block i: Linear(D, expansion*D)
    text.text_adaptor.{i}.fn.3.{weight,bias}     block i: Linear(expansion*D, D)
    text.text_adaptor.{n}.{weight,bias}          final LayerNorm(D)
    text.text_adaptor.{n+1}.{weight,bias}        Linear(D, E)
    logit_scale

ProCLIP has n = 1 block of expansion 8; LLM2CLIP n = 4 of expansion 2. All sizes come from
the tensor shapes. The LLM text embedder is not part of these files (it is converted on its
own and used through the feature caches).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

import jax
import numpy as np

from proclip_jax.convert import clip as clip_conv
from proclip_jax.convert import eva
from proclip_jax.convert.common import check_weights, linear, read_state_dict
from proclip_jax.convert.openclip_arch import resolve_arch
from proclip_jax.errors import ProclipError
from proclip_jax.models import vit
from proclip_jax.models.adapter import AdapterConfig, TextProj
from proclip_jax.models.proclip import ProCLIPConfig
from proclip_jax.storage import save_model
from proclip_jax.tree import check_tree, to_f32, unflatten

ADAPTER_PREFIXES = ("text.text_adaptor.", "text_adaptor.", "model.text.text_adaptor.")


def find_adapter_prefix(sd: Mapping[str, np.ndarray]) -> str | None:
  for p in ADAPTER_PREFIXES:
    if any(k.startswith(p) for k in sd):
      return p
  return None


def adapter_config_from_state_dict(sd: Mapping[str, np.ndarray], prefix: str,
                                   dtype: str = "float32") -> AdapterConfig:
  """Infers D, E, the expansion and the number of blocks from the adapter's tensors."""
  idx = sorted({int(m.group(1)) for k in sd
                if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})
  blocks = [i for i in idx if f"{prefix}{i}.ln.weight" in sd]
  n = len(blocks)
  where = f"adapter tensors under {prefix!r}"
  if n == 0 or blocks != list(range(n)):
    raise ProclipError(f"Cannot read the adapter: expected blocks {prefix}0.ln, {prefix}1.ln, "
                       f"...; found block indices {blocks} in the {where}.")
  for name in (f"{prefix}0.fn.0.weight", f"{prefix}{n}.weight", f"{prefix}{n + 1}.weight"):
    if name not in sd:
      raise ProclipError(f"Cannot read the adapter: {name!r} is missing from the {where} "
                         f"(found indices {idx}).")
  d = int(sd[f"{prefix}0.ln.weight"].shape[0])
  hidden = int(sd[f"{prefix}0.fn.0.weight"].shape[0])
  e = int(sd[f"{prefix}{n + 1}.weight"].shape[0])
  if hidden % d:
    raise ProclipError(f"Adapter hidden size {hidden} is not a multiple of its width {d}.")
  return AdapterConfig(in_dim=d, out_dim=e, expansion=hidden // d, n_blocks=n, dtype=dtype)


def adapter_rename_table(prefix: str, n_blocks: int) -> dict[str, tuple[str, bool]]:
  """``{source key: (flax path, is_linear_weight)}`` for an adapter of ``n_blocks`` blocks."""
  table = {}
  for i in range(n_blocks):
    b = f"{prefix}{i}."
    table.update({
        b + "ln.weight": (f"block_{i}/ln/scale", False),
        b + "ln.bias": (f"block_{i}/ln/bias", False),
        b + "fn.0.weight": (f"block_{i}/fn_0/kernel", True),
        b + "fn.0.bias": (f"block_{i}/fn_0/bias", False),
        b + "fn.3.weight": (f"block_{i}/fn_3/kernel", True),
        b + "fn.3.bias": (f"block_{i}/fn_3/bias", False),
    })
  table.update({
      f"{prefix}{n_blocks}.weight": ("ln_final/scale", False),
      f"{prefix}{n_blocks}.bias": ("ln_final/bias", False),
      f"{prefix}{n_blocks + 1}.weight": ("proj/kernel", True),
      f"{prefix}{n_blocks + 1}.bias": ("proj/bias", False),
  })
  return table


def convert_adapter(sd: Mapping[str, np.ndarray], prefix: str, config: AdapterConfig
                    ) -> tuple[dict, set[str]]:
  """Adapter tensors -> ``(TextProj params, source keys used)``; checked against the model."""
  table = adapter_rename_table(prefix, config.n_blocks)
  flat, used = {}, set()
  for src, (dst, is_linear) in table.items():
    if src not in sd:
      continue
    flat[dst] = linear(sd[src]) if is_linear else np.asarray(sd[src])
    used.add(src)
  params = to_f32(unflatten(flat))
  abstract = jax.eval_shape(
      lambda: TextProj(config).init(jax.random.key(0),
                                    np.zeros((1, config.in_dim), np.float32))["params"])
  unused = [k for k in sd if k.startswith(prefix) and k not in used]
  check_tree(params, abstract, what="adapter checkpoint", unused_source_keys=unused)
  return params, used


def _convert_visual(sd: Mapping[str, np.ndarray], *, act: str | None, scan_layers: bool,
                    dtype: str, arch=None, where: str = "the checkpoint"):
  """The ``visual.*`` tower through the CLIP converter's tables: (VisionConfig, params, used)."""
  cfg = clip_conv.openai_visual_config(sd, "visual.", act=act, arch=arch, where=where)
  flat, used = clip_conv.apply_table(sd, clip_conv.openai_vision_table(cfg, "visual.", "visual"))
  params = unflatten(flat)["visual"]
  size = cfg.image_size
  abstract = jax.eval_shape(lambda: vit.VisionTransformer(cfg).init(
      jax.random.key(0), np.zeros((1, size, size, 3), np.float32))["params"])
  unused = [k for k in sd if k.startswith("visual.") and k not in used]
  check_tree(params, abstract, what="image tower of the checkpoint", unused_source_keys=unused)
  if scan_layers:
    params = vit.stack_layers(params)
  cfg = dataclasses.replace(cfg, scan_layers=scan_layers, dtype=dtype)
  return cfg, params, used


def convert_proclip(src: str, out: str, *, overwrite: bool = False, dtype: str = "float32",
                    act: str | None = None, scan_layers: bool = False, arch=None) -> str:
  """Converts a ProCLIP / LLM2CLIP checkpoint at ``src`` into the model folder ``out``.

  The result has ``kind="proclip"``, ``config`` = ``ProCLIPConfig.to_dict()`` and params
  ``{"visual", "adapter", "logit_scale"}`` (the image tower is optional: a file holding only
  the adapter converts to an adapter-only model). ``act``: the image tower's activation
  (None: the preset's, else QuickGELU as OpenAI towers); ``arch``: the image tower's head
  count and sizes (:func:`proclip_jax.convert.openclip_arch.resolve_arch`; default: the
  open_clip config next to ``src``, else the standard OpenAI sizes);
  ``scan_layers``: store its blocks stacked for ``nn.scan``;
  ``dtype``: the compute dtype written into the model config (parameters stay float32).
  """
  sd = read_state_dict(src)
  prefix = find_adapter_prefix(sd)
  if prefix is None:
    raise ProclipError(
        f"{src!r} has no adapter tensors ({' / '.join(p + '*' for p in ADAPTER_PREFIXES)}); "
        "it is not a ProCLIP or LLM2CLIP checkpoint. A plain CLIP converts with "
        "`python tools/convert.py` as a CLIP.")
  adapter_cfg = adapter_config_from_state_dict(sd, prefix, dtype)
  adapter, used = convert_adapter(sd, prefix, adapter_cfg)
  params = {"adapter": adapter}
  vision_cfg = None
  if any(k.startswith("visual.") for k in sd):
    if eva.find_eva(sd) is not None:  # an EVA02 image tower (EVA-CLIP layout under visual.)
      vision_cfg, visual, used_v = eva.convert_eva_visual(sd, scan_layers=scan_layers,
                                                          dtype=dtype)
    else:
      vision_cfg, visual, used_v = _convert_visual(sd, act=act, scan_layers=scan_layers,
                                                   dtype=dtype, arch=arch or resolve_arch(src),
                                                   where=repr(src))
    params["visual"] = visual
    used |= set(used_v)
    if vision_cfg.embed_dim != adapter_cfg.out_dim:
      raise ProclipError(
          f"{src!r}: the adapter projects to {adapter_cfg.out_dim} but the image tower to "
          f"{vision_cfg.embed_dim}. (LLM2CLIP-style checkpoints that drop CLIP's projection "
          "are not ProCLIP models in this project's sense; see proclip_method.md.)")
  logit_scale = float(np.asarray(sd["logit_scale"]).reshape(())) if "logit_scale" in sd \
      else math.log(100.0)
  if "logit_scale" in sd:
    used.add("logit_scale")
  params["logit_scale"] = np.asarray(logit_scale, np.float32)
  check_weights(params, what=f"checkpoint {src!r}")
  ignored = sorted(k for k in sd if k not in used)
  config = ProCLIPConfig(vision=vision_cfg, adapter=adapter_cfg, logit_scale_init=logit_scale)
  return save_model(out, "proclip", config.to_dict(), params, overwrite=overwrite,
                    source=str(src), ignored_source_keys=ignored[:50],
                    n_ignored_source_keys=len(ignored))
