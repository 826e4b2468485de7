"""CLIP weight conversion: Hugging Face and OpenAI / open_clip layouts to Flax, and back.

Sources:

* Hugging Face ``CLIPModel``, ``CLIPVisionModel[WithProjection]``,
  ``CLIPTextModel[WithProjection]``: a folder with ``config.json`` and ``model.safetensors``
  or ``pytorch_model.bin``; the architecture comes from ``config.json``.
* OpenAI / open_clip state dicts (``visual.conv1.weight``, ``visual.transformer.resblocks.N.
  attn.in_proj_weight``, ..., ``token_embedding.weight``, ``text_projection``,
  ``logit_scale``) in .pt / .bin / .safetensors or OpenAI's TorchScript archives, possibly
  wrapped in ``state_dict``; the architecture is inferred from tensor shapes, the head count from a preset / open_clip
  config / explicit counts (:mod:`proclip_jax.convert.openclip_arch`).

Each tower is converted with a rename table: ``(source key, hook)`` rows, where the hook
turns the source tensor into ``{flax path: array}`` (transposes, q/k/v splits, head
reshapes) and back (``hook.inverse``). Every source tensor must be consumed; the result is
checked against ``jax.eval_shape`` of the model (:func:`proclip_jax.tree.check_tree`)
and for non-finite values before anything is written. :func:`invert_table` runs a table
backwards: :func:`clip_to_openai` and :mod:`proclip_jax.convert.export` use it.

The image-tower functions with a ``prefix`` (:func:`openai_visual_config`,
:func:`convert_openai_visual`, :func:`visual_to_openai`) serve checkpoints that embed an
OpenAI image tower (ProCLIP / LLM2CLIP).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from proclip_jax.convert.common import (check_weights, conv_oihw_to_hwio, linear, read_json,
                                        read_state_dict)
from proclip_jax.convert.openclip_arch import Arch, TowerArch, resolve_arch, tower_heads
from proclip_jax.errors import ProclipError
from proclip_jax.models.clip import CLIPConfig, abstract_params
from proclip_jax.models.clip_text import TextConfig
from proclip_jax.models.vit import VisionConfig, VisionTransformer, stack_layers, unstack_layers
from proclip_jax.storage import save_model
from proclip_jax.tree import check_tree, flatten, to_f32, unflatten

Hook = Callable[[np.ndarray], dict]
Table = list  # of (source_key, hook)

HF_MODEL_TYPES = ("clip", "clip_vision_model", "clip_text_model")
_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
            "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
# Scalars that OpenAI's original checkpoints carry besides the weights.
_OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")
DEFAULT_LOGIT_SCALE = math.log(1 / 0.07)


# ------------------------------------------------------------------------------- hooks

class _Hook:
  """One rename rule in both directions: ``hook(source tensor) -> {flax path: array}`` and
  ``hook.inverse({flax path: array}) -> source tensor`` (the export to PyTorch layouts)."""

  def __init__(self, dsts, fwd, inv):
    self.dsts, self._fwd, self._inv = tuple(dsts), fwd, inv

  def __call__(self, x: np.ndarray) -> dict:
    return dict(zip(self.dsts, self._fwd(x)))

  def inverse(self, flat: Mapping[str, np.ndarray]) -> np.ndarray:
    return self._inv(*[np.asarray(flat[d]) for d in self.dsts])


def _ident(x):
  return x


def _reshape_if(x: np.ndarray, shape) -> np.ndarray:
  """``x.reshape(shape)`` when sizes agree; otherwise ``x`` unchanged (check_tree reports it)."""
  return x.reshape(shape) if x.size == math.prod(shape) else x


def _to(dst: str, fn=_ident, inv=_ident) -> Hook:
  return _Hook([dst], lambda x: [fn(x)], inv)


def _ln(dst: str, src: str) -> Table:
  return [(src + ".weight", _to(dst + "/scale")), (src + ".bias", _to(dst + "/bias"))]


def _dense(dst: str, src: str) -> Table:
  return [(src + ".weight", _to(dst + "/kernel", linear, linear)),
          (src + ".bias", _to(dst + "/bias"))]


def _scalar(dst: str) -> Hook:
  return _to(dst, lambda x: np.reshape(x, ()), lambda x: np.reshape(x, ()))


def _conv_hwio_to_oihw(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1)))


def _conv(dst: str) -> Hook:
  return _to(dst, conv_oihw_to_hwio, _conv_hwio_to_oihw)


def _qkv_kernel(dst: str, width: int, heads: int) -> Hook:
  return _to(dst + "/kernel", lambda w: _reshape_if(linear(w), (width, heads, width // heads)),
             lambda k: linear(k.reshape(k.shape[0], -1)))


def _qkv_bias(dst: str, width: int, heads: int) -> Hook:
  return _to(dst + "/bias", lambda b: _reshape_if(b, (heads, width // heads)),
             lambda b: b.reshape(-1))


def _out_kernel(dst: str, width: int, heads: int) -> Hook:
  return _to(dst + "/kernel", lambda w: _reshape_if(linear(w), (heads, width // heads, width)),
             lambda k: linear(k.reshape(-1, k.shape[-1])))


def _fused(dst: str, width: int, heads: int, kind: str) -> Hook:
  """OpenAI's ``in_proj_weight [3w, w]`` / ``in_proj_bias [3w]`` -> query, key, value."""
  make = _qkv_kernel if kind == "kernel" else _qkv_bias
  parts = [make(f"{dst}/attn/{name}", width, heads) for name in ("query", "key", "value")]

  def fwd(x):
    xs = np.split(x, 3, axis=0) if x.shape[0] % 3 == 0 else [x, x, x]
    return [p(part)[p.dsts[0]] for p, part in zip(parts, xs)]

  return _Hook([p.dsts[0] for p in parts], fwd,
               lambda *qkv: np.concatenate([p._inv(x) for p, x in zip(parts, qkv)], 0))  # pylint: disable=protected-access


def _block_table(dst: str, src: str, width: int, heads: int, layout: str) -> Table:
  """One residual block. ``layout``: "hf" (``encoder.layers.i``) or "openai" (``resblocks.i``)."""
  if layout == "hf":
    t = _ln(f"{dst}/ln_1", src + "layer_norm1") + _ln(f"{dst}/ln_2", src + "layer_norm2")
    for name, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      t += [(f"{src}self_attn.{hf}.weight", _qkv_kernel(f"{dst}/attn/{name}", width, heads)),
            (f"{src}self_attn.{hf}.bias", _qkv_bias(f"{dst}/attn/{name}", width, heads))]
    attn_out, fc, proj = src + "self_attn.out_proj", src + "mlp.fc1", src + "mlp.fc2"
  else:
    t = _ln(f"{dst}/ln_1", src + "ln_1") + _ln(f"{dst}/ln_2", src + "ln_2")
    t += [(src + "attn.in_proj_weight", _fused(dst, width, heads, "kernel")),
          (src + "attn.in_proj_bias", _fused(dst, width, heads, "bias"))]
    attn_out, fc, proj = src + "attn.out_proj", src + "mlp.c_fc", src + "mlp.c_proj"
  t += [(attn_out + ".weight", _out_kernel(f"{dst}/attn/out", width, heads)),
        (attn_out + ".bias", _to(f"{dst}/attn/out/bias"))]
  return t + _dense(f"{dst}/mlp/c_fc", fc) + _dense(f"{dst}/mlp/c_proj", proj)


# ------------------------------------------------------------------------ rename tables

def hf_vision_table(cfg: VisionConfig, prefix: str, proj_key: str | None, dst: str = "visual") -> Table:
  """Hugging Face ``CLIPVisionTransformer`` keys under ``prefix`` -> ``dst/...``."""
  t = [(prefix + "embeddings.patch_embedding.weight", _conv(dst + "/conv1/kernel")),
       (prefix + "embeddings.class_embedding", _to(dst + "/class_embedding")),
       (prefix + "embeddings.position_embedding.weight", _to(dst + "/positional_embedding"))]
  t += _ln(dst + "/ln_pre", prefix + "pre_layrnorm")
  for i in range(cfg.layers):
    t += _block_table(f"{dst}/transformer/blocks_{i}", f"{prefix}encoder.layers.{i}.",
                      cfg.width, cfg.heads, "hf")
  t += _ln(dst + "/ln_post", prefix + "post_layernorm")
  if proj_key is not None:
    t.append((proj_key, _to(dst + "/proj", linear, linear)))
  return t


def hf_text_table(cfg: TextConfig, prefix: str, proj_key: str | None, dst: str = "text") -> Table:
  """Hugging Face ``CLIPTextTransformer`` keys under ``prefix`` -> ``dst/...``."""
  t = [(prefix + "embeddings.token_embedding.weight", _to(dst + "/token_embedding")),
       (prefix + "embeddings.position_embedding.weight", _to(dst + "/positional_embedding"))]
  for i in range(cfg.layers):
    t += _block_table(f"{dst}/transformer/blocks_{i}", f"{prefix}encoder.layers.{i}.",
                      cfg.width, cfg.heads, "hf")
  t += _ln(dst + "/ln_final", prefix + "final_layer_norm")
  if proj_key is not None:
    t.append((proj_key, _to(dst + "/text_projection", linear, linear)))
  return t


def openai_vision_table(cfg: VisionConfig, prefix: str = "visual.", dst: str = "visual") -> Table:
  """OpenAI / open_clip ``visual.*`` keys -> ``dst/...`` (``proj`` is already [in, out])."""
  t = [(prefix + "conv1.weight", _conv(dst + "/conv1/kernel")),
       (prefix + "class_embedding", _to(dst + "/class_embedding")),
       (prefix + "positional_embedding", _to(dst + "/positional_embedding"))]
  t += _ln(dst + "/ln_pre", prefix + "ln_pre")
  for i in range(cfg.layers):
    t += _block_table(f"{dst}/transformer/blocks_{i}", f"{prefix}transformer.resblocks.{i}.",
                      cfg.width, cfg.heads, "openai")
  t += _ln(dst + "/ln_post", prefix + "ln_post")
  if cfg.embed_dim is not None:
    t.append((prefix + "proj", _to(dst + "/proj")))
  return t


def openai_text_table(cfg: TextConfig, dst: str = "text") -> Table:
  t = [("token_embedding.weight", _to(dst + "/token_embedding")),
       ("positional_embedding", _to(dst + "/positional_embedding"))]
  for i in range(cfg.layers):
    t += _block_table(f"{dst}/transformer/blocks_{i}", f"transformer.resblocks.{i}.",
                      cfg.width, cfg.heads, "openai")
  t += _ln(dst + "/ln_final", "ln_final")
  if cfg.embed_dim is not None:
    t.append(("text_projection", _to(dst + "/text_projection")))
  return t


def apply_table(sd: Mapping[str, np.ndarray], table: Iterable) -> tuple[dict, set]:
  """Runs a rename table over ``sd``: ``({flax path: float32 array}, consumed source keys)``.

  Source keys the table names but ``sd`` lacks are skipped; their targets then show up as
  missing in :func:`check_tree`.
  """
  flat, used = {}, set()
  for key, hook in table:
    if key in sd:
      used.add(key)
      flat.update(hook(np.asarray(sd[key])))
  return to_f32(flat), used


# ------------------------------------------------------------- architecture inference

def _layer_count(keys: Iterable[str], prefix: str) -> int:
  pat = re.compile(re.escape(prefix) + r"(\d+)\.")
  idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
  return max(idx) + 1 if idx else 0


def _need(sd: Mapping, keys: Iterable[str], what: str) -> None:
  missing = [k for k in keys if k not in sd]
  if missing:
    raise ProclipError(
        f"Cannot infer the {what} architecture: the state dict lacks {missing}. Expected an "
        "OpenAI / open_clip CLIP state dict (visual.conv1.weight, visual.positional_embedding, "
        "visual.transformer.resblocks.N..., token_embedding.weight, ...).")


def openai_visual_config(sd: Mapping[str, np.ndarray], prefix: str = "visual.",
                         act: str | None = None, arch: Arch | None = None,
                         where: str = "the checkpoint") -> VisionConfig:
  """Infers an OpenAI image tower's :class:`VisionConfig` from tensor shapes under ``prefix``.

  The head count (and, without ``act``, the activation) comes from ``arch``
  (:func:`proclip_jax.convert.openclip_arch.resolve_arch`); without one only the standard
  OpenAI sizes convert. ``act`` None: ``arch``'s activation, else QuickGELU.
  """
  arch = arch or Arch()
  if prefix + "layer1.0.conv1.weight" in sd or prefix + "attnpool.positional_embedding" in sd:
    raise ProclipError("This checkpoint holds a modified-ResNet CLIP image tower (RN50 etc.); "
                       "only ViT towers are supported.")
  _need(sd, [prefix + "conv1.weight", prefix + "positional_embedding",
             prefix + "transformer.resblocks.0.mlp.c_fc.weight"], "image tower")
  conv = np.shape(sd[prefix + "conv1.weight"])
  npos = np.shape(sd[prefix + "positional_embedding"])[0]
  grid = math.isqrt(max(npos - 1, 0))
  if len(conv) != 4 or conv[2] != conv[3] or grid * grid != npos - 1:
    raise ProclipError(
        f"{prefix}conv1.weight {conv} / {prefix}positional_embedding ({npos} rows) do not "
        "describe a square ViT patch grid with a class token.")
  width, patch = int(conv[0]), int(conv[2])
  mlp = int(np.shape(sd[prefix + "transformer.resblocks.0.mlp.c_fc.weight"])[0])
  proj = sd.get(prefix + "proj")
  layers = _layer_count(sd, prefix + "transformer.resblocks.")
  embed = None if proj is None else int(np.shape(proj)[-1])
  heads = tower_heads("vision", arch, TowerArch(
      width=width, layers=layers, mlp_dim=mlp, patch_size=patch, image_size=grid * patch,
      embed_dim=embed), where)
  return VisionConfig(
      image_size=grid * patch, patch_size=patch, width=width, layers=layers, heads=heads,
      mlp_dim=None if mlp == 4 * width else mlp, embed_dim=embed,
      act=act or arch.act or "quick_gelu")


def openai_text_config(sd: Mapping[str, np.ndarray], act: str | None = None,
                       arch: Arch | None = None, where: str = "the checkpoint") -> TextConfig:
  """Infers an OpenAI text tower's :class:`TextConfig` from tensor shapes (heads: as
  :func:`openai_visual_config`)."""
  arch = arch or Arch()
  _need(sd, ["token_embedding.weight", "positional_embedding",
             "transformer.resblocks.0.mlp.c_fc.weight"], "text tower")
  vocab, width = (int(s) for s in np.shape(sd["token_embedding.weight"]))
  mlp = int(np.shape(sd["transformer.resblocks.0.mlp.c_fc.weight"])[0])
  proj = sd.get("text_projection")
  layers = _layer_count(sd, "transformer.resblocks.")
  context = int(np.shape(sd["positional_embedding"])[0])
  embed = None if proj is None else int(np.shape(proj)[-1])
  heads = tower_heads("text", arch, TowerArch(
      width=width, layers=layers, mlp_dim=mlp, context_length=context, vocab_size=vocab,
      embed_dim=embed), where)
  return TextConfig(
      vocab_size=vocab, context_length=context, width=width, layers=layers, heads=heads,
      mlp_dim=None if mlp == 4 * width else mlp, embed_dim=embed,
      act=act or arch.act or "quick_gelu", eos_token_id=None)


def _hf_act(name: str, where: str) -> str:
  if name not in _HF_ACTS:
    raise ProclipError(f"{where}: hidden_act {name!r} is not supported; known: {list(_HF_ACTS)}.")
  return _HF_ACTS[name]


def hf_vision_config(vc: Mapping, embed_dim: int | None) -> VisionConfig:
  """:class:`VisionConfig` from a Hugging Face ``CLIPVisionConfig`` dict."""
  if vc.get("num_channels", 3) != 3:
    raise ProclipError(f"config.json: num_channels={vc.get('num_channels')}; CLIP takes RGB (3).")
  width = vc.get("hidden_size", 768)
  mlp = vc.get("intermediate_size", 3072)
  return VisionConfig(
      image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 32), width=width,
      layers=vc.get("num_hidden_layers", 12), heads=vc.get("num_attention_heads", 12),
      mlp_dim=None if mlp == 4 * width else mlp, embed_dim=embed_dim,
      act=_hf_act(vc.get("hidden_act", "quick_gelu"), "vision config"),
      ln_eps=float(vc.get("layer_norm_eps", 1e-5)))


def hf_text_config(tc: Mapping, embed_dim: int | None) -> TextConfig:
  """:class:`TextConfig` from a Hugging Face ``CLIPTextConfig`` dict (pooling as transformers)."""
  width = tc.get("hidden_size", 512)
  mlp = tc.get("intermediate_size", 2048)
  eos = tc.get("eos_token_id", 2)
  return TextConfig(
      vocab_size=tc.get("vocab_size", 49408), context_length=tc.get("max_position_embeddings", 77),
      width=width, layers=tc.get("num_hidden_layers", 12), heads=tc.get("num_attention_heads", 8),
      mlp_dim=None if mlp == 4 * width else mlp, embed_dim=embed_dim,
      act=_hf_act(tc.get("hidden_act", "quick_gelu"), "text config"),
      ln_eps=float(tc.get("layer_norm_eps", 1e-5)),
      # transformers: eos_token_id == 2 (configs before PR #24773) pools at argmax(ids).
      eos_token_id=None if (eos == 2 or not isinstance(eos, int)) else eos)


# ------------------------------------------------------------------- whole conversions

def check_clip(params: Mapping, config: CLIPConfig, unused_source_keys=(), what="checkpoint"):
  """Raises one ProclipError unless ``params`` (per-layer layout) fit ``config`` exactly."""
  check_tree(params, abstract_params(config.replace(scan_layers=False)), what=what,
             unused_source_keys=unused_source_keys)


def hf_to_clip(sd: Mapping[str, np.ndarray], hf_config: Mapping) -> tuple[CLIPConfig, dict, list]:
  """Hugging Face CLIP state dict + config.json -> ``(config, params, unused source keys)``."""
  mtype = hf_config.get("model_type")
  table: Table = []
  vision = text = None
  extra_used = set()
  if mtype == "clip":
    e = hf_config.get("projection_dim", 512)
    vision = hf_vision_config(hf_config.get("vision_config") or {}, e)
    text = hf_text_config(hf_config.get("text_config") or {}, e)
    table += hf_vision_table(vision, "vision_model.", "visual_projection.weight")
    table += hf_text_table(text, "text_model.", "text_projection.weight")
    table.append(("logit_scale", _scalar("logit_scale")))
    vp, tp = "vision_model.", "text_model."
  elif mtype == "clip_vision_model":
    vp = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
    proj = "visual_projection.weight" if "visual_projection.weight" in sd else None
    vision = hf_vision_config(hf_config, hf_config.get("projection_dim", 512) if proj else None)
    table += hf_vision_table(vision, vp, proj)
    tp = None
  elif mtype == "clip_text_model":
    tp = "text_model." if any(k.startswith("text_model.") for k in sd) else ""
    proj = "text_projection.weight" if "text_projection.weight" in sd else None
    text = hf_text_config(hf_config, hf_config.get("projection_dim", 512) if proj else None)
    table += hf_text_table(text, tp, proj)
    vp = None
  else:
    raise ProclipError(f"config.json model_type {mtype!r} is not a CLIP ({HF_MODEL_TYPES}).")
  config = CLIPConfig(vision=vision, text=text,
                      logit_scale_init=float(hf_config.get("logit_scale_init_value",
                                                           DEFAULT_LOGIT_SCALE)))
  flat, used = apply_table(sd, table)
  # Non-persistent buffers that older transformers versions saved.
  for p in (vp, tp):
    if p is not None and p + "embeddings.position_ids" in sd:
      extra_used.add(p + "embeddings.position_ids")
  if "logit_scale" not in flat:
    flat["logit_scale"] = np.asarray(config.logit_scale_init, np.float32)
  unused = sorted(set(sd) - used - extra_used)
  return config, unflatten(flat), unused


def openai_to_clip(sd: Mapping[str, np.ndarray], act: str | None = None,
                   arch: Arch | None = None, where: str = "the checkpoint"
                   ) -> tuple[CLIPConfig, dict, list]:
  """OpenAI / open_clip state dict -> ``(config, params, unused source keys)``; head counts
  and activation as :func:`openai_visual_config`."""
  vision = openai_visual_config(sd, "visual.", act, arch, where)
  text = openai_text_config(sd, act, arch, where) if "token_embedding.weight" in sd else None
  table = openai_vision_table(vision)
  if text is not None:
    table += openai_text_table(text)
  table.append(("logit_scale", _scalar("logit_scale")))
  config = CLIPConfig(vision=vision, text=text)
  flat, used = apply_table(sd, table)
  if "logit_scale" not in flat:
    flat["logit_scale"] = np.asarray(DEFAULT_LOGIT_SCALE, np.float32)
  used |= {k for k in _OPENAI_SCALARS if k in sd and np.size(sd[k]) == 1}
  return config, unflatten(flat), sorted(set(sd) - used)


def convert_openai_visual(sd: Mapping[str, np.ndarray], prefix: str = "visual.",
                          act: str | None = None, scan_layers: bool = False,
                          arch: Arch | None = None) -> tuple[VisionConfig, dict]:
  """Converts and checks only the OpenAI-layout image tower under ``prefix``.

  Keys outside ``prefix`` are left to the caller; keys under it that no rule consumes are
  reported as unexpected. Returns ``(VisionConfig, params)`` with params in the per-layer
  (or, with ``scan_layers``, stacked) layout of :class:`VisionTransformer`.
  """
  cfg = openai_visual_config(sd, prefix, act, arch)
  flat, used = apply_table(sd, openai_vision_table(cfg, prefix, dst="visual"))
  params = unflatten(flat)["visual"]
  unused = sorted(k for k in sd if k.startswith(prefix) and k not in used)
  size = cfg.image_size
  abstract = jax.eval_shape(lambda: VisionTransformer(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))["params"]
  check_tree(params, abstract, what=f"image tower under {prefix!r}", unused_source_keys=unused)
  if scan_layers:
    cfg = dataclasses.replace(cfg, scan_layers=True)
    params = stack_layers(params)
  return cfg, params


# ------------------------------------------------------- export (the tables run backwards)

def invert_table(flat: Mapping[str, np.ndarray], table: Iterable, what: str = "parameters"
                 ) -> dict:
  """Runs a rename table backwards: ``{flax path: array}`` -> ``{source key: float32 array}``.

  Every path the table reads must be in ``flat`` and every entry of ``flat`` must be read by
  the table, else one ProclipError lists the differences (nothing is dropped silently).
  """
  out, used, missing = {}, set(), []
  for key, hook in table:
    lacking = [d for d in hook.dsts if d not in flat]
    if lacking:
      missing += lacking
      continue
    out[key] = np.array(hook.inverse(flat), np.float32, order="C")  # keeps 0-d
    used.update(hook.dsts)
  unread = sorted(set(flat) - used)
  if missing or unread:
    raise ProclipError(f"Cannot export the {what}: the model lacks {sorted(missing)[:20]} and has "
                       f"{unread[:20]} that the layout has no name for; nothing was written.")
  return out


def visual_to_openai(params: Mapping, cfg: VisionConfig, prefix: str = "visual.") -> dict:
  """Image-tower params (either layout) -> OpenAI-layout numpy state dict under ``prefix``."""
  flat = flatten({"visual": unstack_layers(params)})
  return invert_table(flat, openai_vision_table(cfg, prefix, "visual"), "image tower")


def clip_to_openai(params: Mapping, config: CLIPConfig) -> dict:
  """A whole CLIP (either layout) -> OpenAI / open_clip state dict of float32 numpy arrays."""
  tree, table = {"logit_scale": params["logit_scale"]}, [("logit_scale", _scalar("logit_scale"))]
  if config.vision is not None:
    tree["visual"] = unstack_layers(params["visual"])
    table += openai_vision_table(config.vision)
  if config.text is not None:
    tree["text"] = unstack_layers(params["text"])
    table += openai_text_table(config.text)
  return invert_table(flatten(tree), table, "CLIP")


# ------------------------------------------------------------------------ file to folder

def count_params(tree) -> int:
  return int(sum(np.size(v) for v in flatten(tree).values()))


def _save(out: str, config: CLIPConfig, params: dict, unused, *, family: str, src: str,
          overwrite: bool, scan_layers: bool) -> str:
  check_clip(params, config, unused, what=f"checkpoint {src!r}")
  check_weights(params, what=f"checkpoint {src!r}")
  if scan_layers:
    config = config.replace(scan_layers=True)
    params = stack_layers(params)
  return save_model(out, "clip", config.to_dict(), params, overwrite=overwrite, family=family,
                    source=os.path.abspath(src), num_params=count_params(params))


def convert_hf_clip(src: str, out: str, *, overwrite: bool = False,
                    scan_layers: bool = False) -> str:
  """Hugging Face CLIP folder -> converted folder ``out`` (Orbax params + model.json)."""
  hf_config = read_json(os.path.join(src, "config.json"))
  config, params, unused = hf_to_clip(read_state_dict(src), hf_config)
  return _save(out, config, params, unused, family="hf-clip", src=src, overwrite=overwrite,
               scan_layers=scan_layers)


def convert_openai_clip(src: str, out: str, *, overwrite: bool = False, scan_layers: bool = False,
                        act: str | None = None, state_dict: Mapping | None = None,
                        arch: Arch | None = None) -> str:
  """OpenAI / open_clip state dict file -> converted folder ``out``.

  ``act``: the checkpoint's activation (OpenAI: "quick_gelu"; open_clip models trained
  without ``-quickgelu``: "gelu"); shapes cannot tell. None: the preset's, else QuickGELU.
  ``arch``: head counts and stated sizes (:func:`proclip_jax.convert.openclip_arch.
  resolve_arch`; default: the config next to ``src``, else the shapes).
  ``state_dict``: already read tensors.
  """
  sd = read_state_dict(src) if state_dict is None else state_dict
  arch = resolve_arch(src) if arch is None else arch
  config, params, unused = openai_to_clip(sd, act, arch, where=repr(src))
  if act is None and arch.act == "gelu" and any(k in sd for k in _OPENAI_SCALARS):
    raise ProclipError(
        f"{src!r} is one of OpenAI's own checkpoints (it carries {list(_OPENAI_SCALARS)}), "
        f"which use QuickGELU, but {arch.source} is an open_clip model with exact GELU: pass "
        "the preset's '-quickgelu' name (e.g. ViT-B-16-quickgelu), or --act to choose.")
  return _save(out, config, params, unused, family="openai-clip", src=src, overwrite=overwrite,
               scan_layers=scan_layers)
