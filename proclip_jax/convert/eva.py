"""EVA02-CLIP weight conversion: timm / open_clip and BAAI EVA-CLIP layouts to Flax.

Image-tower layouts (the family is read from the keys, the sizes from the tensor shapes):

* "timm": timm's ``eva02_*_clip_*`` state dict, bare (``blocks.0...``) or inside open_clip's
  ``TimmModel`` (``visual.trunk.*``)::

      patch_embed.proj.{weight,bias}  cls_token [1,1,W]  pos_embed [1,1+g*g,W]
      blocks.{i}.norm1 / norm2.{weight,bias}
      blocks.{i}.attn.{q_proj.weight, q_proj.bias, k_proj.weight, v_proj.weight, v_proj.bias}
      blocks.{i}.attn.norm.*  blocks.{i}.attn.proj.*
      blocks.{i}.mlp.{fc1_g, fc1_x, norm, fc2}.*
      norm.*  head.{weight,bias}

* "eva": BAAI's ``EVAVisionTransformer`` (EVA-CLIP release files, and the ProCLIP / LLM2CLIP
  checkpoints built on it) under ``visual.``: the same, except ``attn.q_bias`` / ``attn.v_bias``
  (the q / v projections without bias), ``attn.inner_attn_ln``, ``mlp.w1`` (gate) / ``mlp.w2``
  / ``mlp.ffn_ln`` / ``mlp.w3``, and the RoPE tables ``rope.freqs_cos`` / ``freqs_sin`` (also
  under every ``blocks.{i}.attn.rope.``): they are consumed by checking them against the tables
  :class:`EvaTower` computes, and a mismatch refuses the conversion.

The heads are ``width // 64`` (every EVA02 tower has 64-wide heads; shapes cannot tell) and the
RoPE reference grid 16 (``rope_ref_grid``). A whole EVA02-CLIP checkpoint also holds the text
tower under ``text.`` (OpenAI layout, exact GELU) and ``logit_scale``; it converts to a
``kind="clip"`` model whose image tower is an :class:`EvaVisionConfig`. Every source tensor is
consumed or the conversion is refused; the tree is checked against ``jax.eval_shape`` of the
model before anything is written.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from proclip_jax.convert.clip import (_Hook, _conv, _dense, _layer_count, _ln, _out_kernel,
                                      _qkv_bias, _qkv_kernel, _to, apply_table, check_clip,
                                      count_params, openai_text_config, openai_text_table)
from proclip_jax.convert.common import check_weights, read_state_dict
from proclip_jax.errors import ProclipError
from proclip_jax.models.eva import EvaTower, EvaVisionConfig, rope_tables
from proclip_jax.models.clip import CLIPConfig
from proclip_jax.models.vit import stack_layers
from proclip_jax.storage import save_model
from proclip_jax.tree import check_tree, unflatten

EVA_HEAD_WIDTH = 64
LAYOUTS = ("timm", "eva")
# (layout, prefix) candidates, most specific first.
_CANDIDATES = (("timm", "visual.trunk."), ("timm", "trunk."), ("timm", ""),
               ("eva", "visual."), ("eva", ""))
_MARKER = {"timm": "blocks.0.mlp.fc1_g.weight", "eva": "blocks.0.mlp.w1.weight"}


def find_eva(keys: Iterable[str]) -> tuple[str, str] | None:
  """``(layout, prefix)`` of an EVA02 image tower among ``keys``, or None."""
  keys = set(keys)
  for layout, prefix in _CANDIDATES:
    if prefix + _MARKER[layout] in keys and prefix + "pos_embed" in keys:
      return layout, prefix
  return None


def eva_visual_config(sd: Mapping[str, np.ndarray], layout: str, prefix: str,
                      rope_ref_grid: int = 16) -> EvaVisionConfig:
  """Infers the :class:`EvaVisionConfig` from tensor shapes under ``prefix``."""
  gate = prefix + ("blocks.0.mlp.fc1_g.weight" if layout == "timm" else "blocks.0.mlp.w1.weight")
  need = [prefix + "patch_embed.proj.weight", prefix + "pos_embed", gate]
  missing = [k for k in need if k not in sd]
  if missing:
    raise ProclipError(f"Cannot infer the EVA02 image tower: the state dict lacks {missing} "
                       f"({layout} layout under {prefix!r}).")
  conv = np.shape(sd[prefix + "patch_embed.proj.weight"])
  npos = int(np.prod(np.shape(sd[prefix + "pos_embed"])[:-1]))
  grid = math.isqrt(max(npos - 1, 0))
  if len(conv) != 4 or conv[2] != conv[3] or grid * grid != npos - 1:
    raise ProclipError(
        f"{prefix}patch_embed.proj.weight {conv} / {prefix}pos_embed ({npos} rows) do not "
        "describe a square patch grid with a class token.")
  width, patch = int(conv[0]), int(conv[2])
  head = sd.get(prefix + "head.weight")
  return EvaVisionConfig(
      image_size=grid * patch, patch_size=patch, width=width,
      layers=_layer_count(sd, prefix + "blocks."), heads=max(width // EVA_HEAD_WIDTH, 1),
      mlp_dim=int(np.shape(sd[gate])[0]),
      embed_dim=None if head is None else int(np.shape(head)[0]), rope_ref_grid=rope_ref_grid)


# ------------------------------------------------------------------------- rename tables

def _rope_check(cfg: EvaVisionConfig, which: int, key: str):
  """A hook that checks a stored RoPE table (``which`` 0: sin, 1: cos) and emits nothing; run
  backwards (the export) it gives the table the tower computes."""
  head_dim = cfg.width // cfg.heads
  want = rope_tables(cfg.grid, cfg.rope_ref_grid, head_dim, cfg.rope_theta)[which]

  def hook(x):
    got = np.asarray(x, np.float32)
    atol = 1e-4 if np.asarray(x).dtype.itemsize >= 4 else 1e-2  # half-precision checkpoints
    if got.size != want.size or np.abs(got.reshape(want.shape) - want).max() > atol:
      raise ProclipError(
          f"{key}: the checkpoint's RoPE table does not match a {cfg.grid}x{cfg.grid} grid with "
          f"reference grid {cfg.rope_ref_grid} (shape {got.shape}, expected {want.shape}). If "
          "the model was pretrained on another grid, pass that grid as rope_ref_grid.")
    return []
  return _Hook((), hook, lambda: np.array(want, np.float32))


def eva_vision_table(cfg: EvaVisionConfig, layout: str, prefix: str, dst: str = "visual") -> list:
  """``(source key, hook)`` rows of one EVA02 image tower -> ``dst/...``."""
  if layout not in LAYOUTS:
    raise ProclipError(f"Unknown EVA layout {layout!r}; known: {LAYOUTS}.")
  w, h = cfg.width, cfg.heads
  p = prefix
  t = [(p + "patch_embed.proj.weight", _conv(dst + "/patch_embed/kernel")),
       (p + "patch_embed.proj.bias", _to(dst + "/patch_embed/bias")),
       (p + "cls_token", _to(dst + "/class_embedding", lambda x: x.reshape(x.shape[-1]),
                             lambda x: x.reshape(1, 1, -1))),
       (p + "pos_embed", _to(dst + "/positional_embedding", lambda x: x.reshape(-1, x.shape[-1]),
                             lambda x: x.reshape(1, *x.shape)))]
  if layout == "eva":
    t += [(p + "rope.freqs_sin", _rope_check(cfg, 0, p + "rope.freqs_sin")),
          (p + "rope.freqs_cos", _rope_check(cfg, 1, p + "rope.freqs_cos"))]
  for i in range(cfg.layers):
    s, d = f"{p}blocks.{i}.", f"{dst}/transformer/blocks_{i}"
    t += _ln(d + "/norm1", s + "norm1") + _ln(d + "/norm2", s + "norm2")
    t += [(s + "attn.q_proj.weight", _qkv_kernel(d + "/attn/query", w, h)),
          (s + "attn.k_proj.weight", _qkv_kernel(d + "/attn/key", w, h)),
          (s + "attn.v_proj.weight", _qkv_kernel(d + "/attn/value", w, h)),
          (s + "attn.proj.weight", _out_kernel(d + "/attn/out", w, h)),
          (s + "attn.proj.bias", _to(d + "/attn/out/bias"))]
    if layout == "timm":
      t += [(s + "attn.q_proj.bias", _qkv_bias(d + "/attn/query", w, h)),
            (s + "attn.v_proj.bias", _qkv_bias(d + "/attn/value", w, h))]
      t += _ln(d + "/attn/norm", s + "attn.norm") + _ln(d + "/mlp/norm", s + "mlp.norm")
      mlp = {"fc1_g": "fc1_g", "fc1_x": "fc1_x", "fc2": "fc2"}
    else:
      t += [(s + "attn.q_bias", _qkv_bias(d + "/attn/query", w, h)),
            (s + "attn.v_bias", _qkv_bias(d + "/attn/value", w, h)),
            (s + "attn.rope.freqs_sin", _rope_check(cfg, 0, s + "attn.rope.freqs_sin")),
            (s + "attn.rope.freqs_cos", _rope_check(cfg, 1, s + "attn.rope.freqs_cos"))]
      t += _ln(d + "/attn/norm", s + "attn.inner_attn_ln") + _ln(d + "/mlp/norm", s + "mlp.ffn_ln")
      mlp = {"fc1_g": "w1", "fc1_x": "w2", "fc2": "w3"}
    for name, src in mlp.items():
      t += _dense(f"{d}/mlp/{name}", f"{s}mlp.{src}")
  t += _ln(dst + "/norm", p + "norm")
  if cfg.embed_dim is not None:
    t += _dense(dst + "/head", p + "head")
  return t


# --------------------------------------------------------------------------- conversions

def abstract_tower(cfg: EvaVisionConfig):
  size = cfg.image_size
  return jax.eval_shape(lambda: EvaTower(dataclasses.replace(cfg, scan_layers=False)).init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))["params"]


def convert_eva_visual(sd: Mapping[str, np.ndarray], *, layout: str | None = None,
                       prefix: str | None = None, rope_ref_grid: int = 16,
                       scan_layers: bool = False, dtype: str = "float32"
                       ) -> tuple[EvaVisionConfig, dict, set]:
  """Converts and checks the EVA02 image tower in ``sd``: ``(config, params, used keys)``.

  ``layout`` / ``prefix`` default to :func:`find_eva`'s answer. Keys under ``prefix`` that no
  rule consumes refuse the conversion (for an empty prefix: keys that look like a tower's);
  keys elsewhere are the caller's.
  """
  if layout is None or prefix is None:
    found = find_eva(sd)
    if found is None:
      raise ProclipError("No EVA02 image tower found: expected blocks.0.mlp.fc1_g.weight (timm / "
                         "open_clip, optionally under visual.trunk.) or blocks.0.mlp.w1.weight "
                         "(EVA-CLIP, under visual.) next to pos_embed.")
    layout, prefix = found
  cfg = eva_visual_config(sd, layout, prefix, rope_ref_grid)
  flat, used = apply_table(sd, eva_vision_table(cfg, layout, prefix))
  params = unflatten(flat).get("visual", {})
  if prefix:
    unused = sorted(k for k in sd if k.startswith(prefix) and k not in used)
  else:  # a bare tower: every key is the tower's
    unused = sorted(k for k in sd if k not in used)
  check_tree(params, abstract_tower(cfg), what=f"EVA02 image tower ({layout} layout)",
             unused_source_keys=unused)
  if scan_layers:
    params = stack_layers(params)
  return dataclasses.replace(cfg, scan_layers=scan_layers, dtype=dtype), params, used


def eva_to_clip(sd: Mapping[str, np.ndarray], *, rope_ref_grid: int = 16, arch=None,
                where: str = "the checkpoint"):
  """A whole EVA02-CLIP (image tower, optional ``text.`` tower and ``logit_scale``) ->
  ``(CLIPConfig, params, unused source keys)`` in the per-layer layout."""
  found = find_eva(sd)
  if found is None:
    raise ProclipError("No EVA02 image tower in this checkpoint.")
  layout, prefix = found
  vision, visual, used = convert_eva_visual(sd, layout=layout, prefix=prefix,
                                            rope_ref_grid=rope_ref_grid)
  params = {"visual": visual}
  text = None
  if "text.token_embedding.weight" in sd:
    tsd = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    # EVA-CLIP and open_clip build the text tower with nn.GELU (not QuickGELU).
    text = openai_text_config(tsd, act="gelu", arch=arch, where=where)
    flat, tused = apply_table(tsd, openai_text_table(text))
    params["text"] = unflatten(flat)["text"]
    used |= {"text." + k for k in tused}
  logit_scale = math.log(1 / 0.07)
  if "logit_scale" in sd:
    logit_scale = float(np.asarray(sd["logit_scale"], np.float32).reshape(()))
    used.add("logit_scale")
  params["logit_scale"] = np.asarray(logit_scale, np.float32)
  config = CLIPConfig(vision=vision, text=text, logit_scale_init=logit_scale)
  return config, params, sorted(set(sd) - used)


def convert_eva_clip(src: str, out: str, *, overwrite: bool = False, scan_layers: bool = False,
                     rope_ref_grid: int = 16, state_dict: Mapping | None = None,
                     arch=None) -> str:
  """An EVA02-CLIP checkpoint file (timm, open_clip or EVA-CLIP) -> converted ``kind="clip"``
  folder ``out``; its image tower is an :class:`EvaTower`. ``arch``: the text tower's head
  count where its shapes do not give it (:func:`proclip_jax.convert.openclip_arch.resolve_arch`).
  """
  sd = read_state_dict(src) if state_dict is None else state_dict
  config, params, unused = eva_to_clip(sd, rope_ref_grid=rope_ref_grid, arch=arch,
                                       where=repr(src))
  check_clip(params, config, unused, what=f"checkpoint {src!r}")
  check_weights(params, what=f"checkpoint {src!r}")
  if scan_layers:
    config = config.replace(scan_layers=True)
    params = stack_layers(params)
  return save_model(out, "clip", config.to_dict(), params, overwrite=overwrite, family="eva-clip",
                    source=os.path.abspath(src), num_params=count_params(params))
