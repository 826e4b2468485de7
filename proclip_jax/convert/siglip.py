"""SigLIP / SigLIP 2 image towers: big_vision ``.npz`` and Hugging Face folders -> Flax.

Sources:

* big_vision parameter trees saved as ``.npz`` (the released SigLIP and SigLIP 2 two-tower
  checkpoints, or a bare image tower): flat keys joined by "/", optionally under ``params/``
  (a training checkpoint; other top-level trees such as optimizer state are skipped) or the
  older ``opt/target/``. The image tower is ``img/*`` (or the root when it holds
  ``embedding/kernel``)::

      img/embedding/{kernel [p, p, 3, W], bias}      img/pos_embedding [1, g*g, W]
      img/Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0/
          {query,key,value,out}, LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}}/...
      img/Transformer/encoderblock/...               (scan checkpoints: leading [depth] axis)
      img/Transformer/encoder_norm/{scale,bias}
      img/MAPHead_0/{probe [1, 1, W], MultiHeadDotProductAttention_0/..., LayerNorm_0,
          MlpBlock_0/...}
      img/head/{kernel [W, E], bias}                 (only when the model had an image out_dim)

  The text tower ``txt/*`` and the sigmoid loss's ``t`` / ``b`` are skipped on purpose
  (ProCLIP's text side is the LLM embedder and its adapter) and listed in the converted
  folder's ``model.json`` (``skipped_source_keys``) and in the converter's summary line.
* Hugging Face ``SiglipModel`` / ``SiglipVisionModel`` folders (``config.json`` with
  ``model_type`` "siglip" / "siglip_vision_model"; keys with or without ``vision_model.``);
  ``text_model.*``, ``logit_scale`` and ``logit_bias`` are skipped the same way.

Every other source tensor must be consumed: the converted tree is checked against
``jax.eval_shape`` of :class:`SiglipVisionTransformer` (missing, unexpected and mis-shaped
keys in one error) before anything is written. SigLIP 2 NaFlex towers (big_vision
``naflex_vit.py``, transformers ``siglip2``) are refused: only the fixed-resolution SigLIP 2
towers, which share SigLIP's architecture, are supported.

The output folder has ``kind="siglip"``, ``config = {"vision": SiglipConfig.to_dict()}`` and
params ``{"visual": <tower>}``; :func:`load_siglip_tower` reads it back.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import zipfile
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from proclip_jax.convert.clip import (_conv, _dense, _fused, _hf_act, _ln, _out_kernel,
                                      _reshape_if, _to, _block_table, apply_table, count_params)
from proclip_jax.convert.common import check_weights, read_json, read_state_dict
from proclip_jax.errors import ProclipError
from proclip_jax.models.siglip import SiglipConfig, SiglipVisionTransformer
from proclip_jax.models.vit import stack_layers, unstack_layers
from proclip_jax.storage import load_model, save_model
from proclip_jax.tree import check_tree, unflatten

KIND = "siglip"
HF_MODEL_TYPES = ("siglip", "siglip_vision_model")
NAFLEX_MODEL_TYPES = ("siglip2", "siglip2_vision_model")
NAFLEX_HINT = ("SigLIP 2 NaFlex towers (a Dense patch embedding on flattened patches) are not "
               "supported; use a fixed-resolution SigLIP 2 checkpoint (e.g. siglip2_b16_224.npz, "
               "or a Hugging Face 'siglip' folder such as google/siglip2-base-patch16-224).")
_BV_SKIPS = {"txt": "text tower", "t": "sigmoid-loss temperature", "b": "sigmoid-loss bias"}
_HF_SKIPS = {"text_model": "text tower", "logit_scale": "sigmoid-loss temperature",
             "logit_bias": "sigmoid-loss bias"}


# ------------------------------------------------------------------------ reading .npz

def read_npz(path: str) -> dict[str, np.ndarray]:
  """All arrays of an ``.npz`` (no pickles); bfloat16 saved as 2-byte void is restored."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  try:
    with np.load(path, allow_pickle=False) as f:
      out = {k: f[k] for k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise ProclipError(
        f"Cannot read {path!r} as a big_vision .npz checkpoint: {type(e).__name__}: {e}. The "
        "file is truncated, holds pickled objects, or is not an .npz; download it again.") from e
  for k, v in out.items():
    if v.dtype.type is np.void and v.dtype.itemsize == 2:
      out[k] = v.view(ml_dtypes.bfloat16)
  return out


# --------------------------------------------------------------------- big_vision layout

def split_big_vision(flat: Mapping[str, np.ndarray]) -> tuple[dict, dict, list]:
  """Splits a flat big_vision tree into ``(tower, skipped, unknown)``.

  ``tower``: the image tower's arrays keyed relative to it; ``skipped``: ``{key: why}`` for the
  parts left out on purpose; ``unknown``: keys that belong to none (the caller refuses them).
  """
  keys = list(flat)
  skipped, unknown = {}, []
  root = ""
  for r in ("params/", "opt/target/"):
    if any(k.startswith(r) for k in keys):
      root = r
      break
  inner = {}
  for k in keys:
    if k.startswith(root):
      inner[k[len(root):]] = k
    else:
      skipped[k] = "not parameters (training state)"
  if any(k.startswith("img/") for k in inner):
    tower = {}
    for rel, full in inner.items():
      top = rel.split("/", 1)[0]
      if top == "img":
        tower[rel[len("img/"):]] = flat[full]
      elif top in _BV_SKIPS:
        skipped[full] = _BV_SKIPS[top]
      else:
        unknown.append(full)
    return tower, skipped, unknown
  if "embedding/kernel" in inner:  # a bare image tower
    return {rel: flat[full] for rel, full in inner.items()}, skipped, unknown
  raise ProclipError(
      f"No image tower in this big_vision checkpoint: expected keys 'img/embedding/kernel' "
      f"(a two-tower SigLIP) or 'embedding/kernel' (a bare ViT), optionally under 'params/'; "
      f"found {len(keys)} keys, e.g. {sorted(keys)[:8]}.")


def unstack_scan(tower: Mapping[str, np.ndarray]) -> dict:
  """``Transformer/encoderblock/...`` (scan, leading [depth] axis) -> ``encoderblock_{i}``."""
  scan = "Transformer/encoderblock/"
  stacked = {k: v for k, v in tower.items() if k.startswith(scan)}
  if not stacked:
    return dict(tower)
  if any(re.match(r"Transformer/encoderblock_\d+/", k) for k in tower):
    raise ProclipError("The big_vision checkpoint has both scanned ('Transformer/encoderblock/') "
                       "and per-layer ('Transformer/encoderblock_N/') blocks; it is damaged.")
  depths = {np.shape(v)[0] if np.ndim(v) else None for v in stacked.values()}
  if len(depths) != 1 or None in depths:
    raise ProclipError(
        "The scanned blocks 'Transformer/encoderblock/...' do not share one leading layer "
        f"axis (leading sizes {sorted(map(str, depths))}); the checkpoint is damaged.")
  out = {k: v for k, v in tower.items() if not k.startswith(scan)}
  for k, v in stacked.items():
    rest = k[len(scan):]
    for i in range(int(next(iter(depths)))):
      out[f"Transformer/encoderblock_{i}/{rest}"] = np.asarray(v)[i]
  return out


def _need(tower: Mapping, key: str, what: str, hint: str = "") -> np.ndarray:
  if key not in tower:
    raise ProclipError(f"Cannot read the SigLIP image tower: {what} {key!r} is missing"
                       f"{' (' + hint + ')' if hint else ''}. Found e.g. {sorted(tower)[:8]}.")
  return np.asarray(tower[key])


def big_vision_config(tower: Mapping[str, np.ndarray]) -> SiglipConfig:
  """Infers the :class:`SiglipConfig` of a big_vision image tower (per-layer keys) from shapes."""
  kernel = _need(tower, "embedding/kernel", "the patch embedding")
  if kernel.ndim == 2:
    raise ProclipError(f"The patch embedding 'embedding/kernel' is a Dense {kernel.shape}. "
                       + NAFLEX_HINT)
  if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != 3:
    raise ProclipError(f"'embedding/kernel' has shape {kernel.shape}; a ViT patch embedding is "
                       "[p, p, 3, width].")
  patch, width = int(kernel.shape[0]), int(kernel.shape[3])
  pos = _need(tower, "pos_embedding", "the learned position embedding",
              "towers with posemb='sincos2d' are not supported")
  n = int(pos.shape[-2]) if pos.ndim >= 2 else 0
  grid = math.isqrt(n)
  if grid * grid != n or grid == 0:
    raise ProclipError(f"'pos_embedding' {pos.shape} does not cover a square patch grid "
                       "(a class-token tower is not a SigLIP tower).")
  blocks = {int(m.group(1)) for k in tower
            if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
  if not blocks or blocks != set(range(len(blocks))):
    raise ProclipError(f"The tower's blocks 'Transformer/encoderblock_N' are {sorted(blocks)}; "
                       "expected 0..depth-1.")
  b0 = "Transformer/encoderblock_0/"
  query = _need(tower, b0 + "MultiHeadDotProductAttention_0/query/kernel", "the attention")
  mlp = _need(tower, b0 + "MlpBlock_0/Dense_0/kernel", "the MLP")
  _need(tower, "MAPHead_0/probe", "the MAP head's probe",
        "only towers pooled by a MAP head (pool_type='map'), as SigLIP's, are supported")
  head = tower.get("head/kernel")
  if query.ndim != 3:
    raise ProclipError(f"'{b0}MultiHeadDotProductAttention_0/query/kernel' has shape "
                       f"{query.shape}; expected [width, heads, head_dim].")
  return SiglipConfig(
      image_size=grid * patch, patch_size=patch, width=width, layers=len(blocks),
      heads=int(query.shape[1]), mlp_dim=None if mlp.shape[-1] == 4 * width else int(mlp.shape[-1]),
      embed_dim=None if head is None else int(np.shape(head)[-1]))


def _bv_attn(dst: str, src: str) -> list:
  return [(f"{src}/{n}/{p}", _to(f"{dst}/{n}/{p}"))
          for n in ("query", "key", "value", "out") for p in ("kernel", "bias")]


def _bv_param(dst: str, src: str, names=("kernel", "bias")) -> list:
  return [(f"{src}/{n}", _to(f"{dst}/{m}")) for n, m in zip(names, ("kernel", "bias"))]


def _bv_ln(dst: str, src: str) -> list:
  return [(f"{src}/scale", _to(f"{dst}/scale")), (f"{src}/bias", _to(f"{dst}/bias"))]


def _bv_mlp(dst: str, src: str) -> list:
  return _bv_param(f"{dst}/c_fc", f"{src}/Dense_0") + _bv_param(f"{dst}/c_proj", f"{src}/Dense_1")


def big_vision_table(cfg: SiglipConfig, dst: str = "visual") -> list:
  """big_vision image-tower keys (per-layer) -> ``dst/...``: ``(source key, hook)`` rows."""
  w = cfg.width
  t = _bv_param(f"{dst}/conv1", "embedding")
  t.append(("pos_embedding", _to(f"{dst}/positional_embedding",
                                 lambda x: _reshape_if(x, (cfg.grid ** 2, w)))))
  for i in range(cfg.layers):
    b, s = f"{dst}/transformer/blocks_{i}", f"Transformer/encoderblock_{i}"
    t += _bv_ln(f"{b}/ln_1", f"{s}/LayerNorm_0") + _bv_ln(f"{b}/ln_2", f"{s}/LayerNorm_1")
    t += _bv_attn(f"{b}/attn", f"{s}/MultiHeadDotProductAttention_0")
    t += _bv_mlp(f"{b}/mlp", f"{s}/MlpBlock_0")
  t += _bv_ln(f"{dst}/ln_post", "Transformer/encoder_norm")
  t.append(("MAPHead_0/probe", _to(f"{dst}/head/probe", lambda x: _reshape_if(x, (w,)))))
  t += _bv_attn(f"{dst}/head/attn", "MAPHead_0/MultiHeadDotProductAttention_0")
  t += _bv_ln(f"{dst}/head/ln", "MAPHead_0/LayerNorm_0")
  t += _bv_mlp(f"{dst}/head/mlp", "MAPHead_0/MlpBlock_0")
  if cfg.embed_dim is not None:
    t += _bv_param(f"{dst}/proj", "head")
  return t


# ------------------------------------------------------------------- Hugging Face layout

def hf_vision_config(hf_config: Mapping) -> SiglipConfig:
  """:class:`SiglipConfig` from a ``SiglipConfig`` / ``SiglipVisionConfig`` config.json dict."""
  mtype = hf_config.get("model_type")
  if mtype in NAFLEX_MODEL_TYPES:
    raise ProclipError(f"config.json model_type {mtype!r} is transformers' SigLIP 2 NaFlex "
                       "model. " + NAFLEX_HINT)
  if mtype not in HF_MODEL_TYPES:
    raise ProclipError(f"config.json model_type {mtype!r} is not a SigLIP ({HF_MODEL_TYPES}).")
  vc = (hf_config.get("vision_config") or {}) if mtype == "siglip" else hf_config
  if not vc.get("vision_use_head", True):
    raise ProclipError("config.json: vision_use_head is false, so this SigLIP tower has no MAP "
                       "head to pool with; only pooled (MAP head) towers are supported.")
  if vc.get("num_channels", 3) != 3:
    raise ProclipError(f"config.json: num_channels={vc.get('num_channels')}; SigLIP takes RGB.")
  sizes = {}
  for name, default in (("image_size", 224), ("patch_size", 16)):
    v = vc.get(name, default)
    if isinstance(v, (list, tuple)):
      if len(set(v)) != 1:
        raise ProclipError(f"config.json: {name}={v} is not square; only square inputs are "
                           "supported.")
      v = v[0]
    sizes[name] = int(v)
  width = int(vc.get("hidden_size", 768))
  mlp = int(vc.get("intermediate_size", 3072))
  return SiglipConfig(
      **sizes, width=width, layers=int(vc.get("num_hidden_layers", 12)),
      heads=int(vc.get("num_attention_heads", 12)), mlp_dim=None if mlp == 4 * width else mlp,
      act=_hf_act(vc.get("hidden_act", "gelu_pytorch_tanh"), "vision config"),
      ln_eps=float(vc.get("layer_norm_eps", 1e-6)))


def hf_table(cfg: SiglipConfig, prefix: str, dst: str = "visual") -> list:
  """Hugging Face ``SiglipVisionModel`` keys under ``prefix`` -> ``dst/...``."""
  w, h = cfg.width, cfg.heads
  e = prefix + "embeddings."
  t = [(e + "patch_embedding.weight", _conv(f"{dst}/conv1/kernel")),
       (e + "patch_embedding.bias", _to(f"{dst}/conv1/bias")),
       (e + "position_embedding.weight", _to(f"{dst}/positional_embedding"))]
  for i in range(cfg.layers):
    t += _block_table(f"{dst}/transformer/blocks_{i}", f"{prefix}encoder.layers.{i}.", w, h, "hf")
  t += _ln(f"{dst}/ln_post", prefix + "post_layernorm")
  p = prefix + "head."
  t += [(p + "probe", _to(f"{dst}/head/probe", lambda x: _reshape_if(x, (w,)),
                          lambda x: x.reshape(1, 1, w))),
        (p + "attention.in_proj_weight", _fused(f"{dst}/head", w, h, "kernel")),
        (p + "attention.in_proj_bias", _fused(f"{dst}/head", w, h, "bias")),
        (p + "attention.out_proj.weight", _out_kernel(f"{dst}/head/attn/out", w, h)),
        (p + "attention.out_proj.bias", _to(f"{dst}/head/attn/out/bias"))]
  t += _ln(f"{dst}/head/ln", p + "layernorm")
  t += _dense(f"{dst}/head/mlp/c_fc", p + "mlp.fc1") + _dense(f"{dst}/head/mlp/c_proj",
                                                              p + "mlp.fc2")
  return t


# ------------------------------------------------------------------- whole conversions

def abstract_tower(cfg: SiglipConfig):
  """``jax.eval_shape`` of the tower's init (per-layer layout)."""
  cfg = dataclasses.replace(cfg, scan_layers=False)
  size = cfg.image_size
  return jax.eval_shape(lambda: SiglipVisionTransformer(cfg).init(
      jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32)))["params"]


def _tower(sd: Mapping, table: list, cfg: SiglipConfig, extra_unused, what: str) -> dict:
  flat, used = apply_table(sd, table)
  params = unflatten(flat).get("visual", {})
  unused = sorted(k for k in sd if k not in used) + sorted(extra_unused)
  check_tree(params, abstract_tower(cfg), what=what, unused_source_keys=unused)
  return params


def big_vision_to_siglip(flat: Mapping[str, np.ndarray]) -> tuple[SiglipConfig, dict, dict]:
  """A flat big_vision tree -> ``(config, tower params, skipped {key: why})``; checked."""
  tower, skipped, unknown = split_big_vision(flat)
  tower = unstack_scan(tower)
  cfg = big_vision_config(tower)
  params = _tower(tower, big_vision_table(cfg), cfg, unknown, "big_vision image tower")
  return cfg, params, skipped


def hf_to_siglip(sd: Mapping[str, np.ndarray], hf_config: Mapping
                 ) -> tuple[SiglipConfig, dict, dict]:
  """A Hugging Face SigLIP state dict + config.json -> ``(config, params, skipped)``; checked."""
  cfg = hf_vision_config(hf_config)
  prefix = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
  skipped = {k: _HF_SKIPS[k.split(".", 1)[0]] for k in sd if k.split(".", 1)[0] in _HF_SKIPS}
  vision = {k: v for k, v in sd.items() if k not in skipped}
  vision.pop(prefix + "embeddings.position_ids", None)  # a buffer older versions saved
  params = _tower(vision, hf_table(cfg, prefix), cfg, (), "Hugging Face SigLIP image tower")
  return cfg, params, skipped


def _skip_summary(skipped: Mapping[str, str]) -> dict[str, int]:
  out: dict[str, int] = {}
  for why in skipped.values():
    out[why] = out.get(why, 0) + 1
  return out


def _save(out: str, cfg: SiglipConfig, params: dict, skipped: Mapping[str, str], *,
          family: str, src: str, overwrite: bool, scan_layers: bool, extra=None) -> str:
  check_weights(params, what=f"checkpoint {src!r}")
  if scan_layers:
    cfg = dataclasses.replace(cfg, scan_layers=True)
    params = stack_layers(params)
  return save_model(out, KIND, {"vision": cfg.to_dict()}, {"visual": params},
                    overwrite=overwrite, family=family, source=os.path.abspath(src),
                    num_params=count_params(params), skipped=_skip_summary(skipped),
                    skipped_source_keys=sorted(skipped)[:50], **(extra or {}))


def _scalar(x) -> float:
  return float(np.asarray(x, np.float32).reshape(-1)[0])


def convert_big_vision(src: str, out: str, *, overwrite: bool = False,
                       scan_layers: bool = False) -> str:
  """A big_vision SigLIP / SigLIP 2 ``.npz`` -> converted folder ``out`` (kind "siglip").

  The sigmoid loss's ``t`` (log temperature) and ``b`` (bias) are recorded in model.json as
  ``siglip_log_temperature`` / ``siglip_bias`` for reference; they are not ProCLIP parameters.
  """
  flat = read_npz(src)
  cfg, params, skipped = big_vision_to_siglip(flat)
  extra = {}
  for name, key in (("siglip_log_temperature", "t"), ("siglip_bias", "b")):
    full = next((r + key for r in ("params/", "opt/target/", "") if r + key in skipped), None)
    if full is not None and np.size(flat[full]) == 1:
      extra[name] = _scalar(flat[full])
  return _save(out, cfg, params, skipped, family="big-vision-siglip", src=src,
               overwrite=overwrite, scan_layers=scan_layers, extra=extra)


def convert_hf_siglip(src: str, out: str, *, overwrite: bool = False,
                      scan_layers: bool = False) -> str:
  """A Hugging Face SigLIP folder -> converted folder ``out`` (kind "siglip")."""
  hf_config = read_json(os.path.join(src, "config.json"))
  sd = read_state_dict(src)
  cfg, params, skipped = hf_to_siglip(sd, hf_config)
  extra = {}
  for name, key in (("siglip_log_temperature", "logit_scale"), ("siglip_bias", "logit_bias")):
    if key in sd and np.size(sd[key]) == 1:
      extra[name] = _scalar(sd[key])
  return _save(out, cfg, params, skipped, family="hf-siglip", src=src, overwrite=overwrite,
               scan_layers=scan_layers, extra=extra)


def load_siglip_tower(path: str, *, scan_layers: bool | None = None
                      ) -> tuple[SiglipConfig, dict]:
  """``(SiglipConfig, tower params)`` from a folder written by this converter.

  ``scan_layers``: optional layout override (the blocks are restacked as needed).
  """
  meta, params = load_model(path, kind=KIND)
  cfg = SiglipConfig.from_dict(meta["config"]["vision"])
  tower = params["visual"]
  if scan_layers is not None and scan_layers != cfg.scan_layers:
    tower = stack_layers(tower) if scan_layers else unstack_layers(tower)
    cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
  return cfg, tower
