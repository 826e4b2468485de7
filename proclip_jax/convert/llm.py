"""Hugging Face LLM / BERT checkpoints -> converted text-embedder folders.

``convert_embedder(SRC, OUT)`` reads a Hugging Face folder (``config.json``, weights as
one or sharded safetensors or ``.bin`` read with ``weights_only``, ``tokenizer.json``),
optionally merges PEFT LoRA adapters into the base weights (as LLM2Vec models are shipped),
renames every tensor into the Flax tree of :mod:`proclip_jax.models.llm` or
:mod:`proclip_jax.models.bert`, checks the tree against the model's ``jax.eval_shape`` and
writes ``OUT`` (parameters, ``model.json`` with model config and embedder preset, and the
tokenizer files) atomically. Every source tensor is either consumed or on an explicit
ignore list (``lm_head``, BERT's pooler and heads, rotary buffers); anything else is an
error, and nothing is written on any error.

Families: ``model_type`` llama, mistral, qwen2, qwen3 (decoders) and bert. Keys may carry the
``model.`` prefix of ``*ForCausalLM`` (or ``bert.`` of ``BertFor*``) or not (``LlamaModel``).

LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``); for each target
module ``W += s · B @ A`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``;
per-module ``rank_pattern`` / ``alpha_pattern`` honoured), keys with or without PEFT's
``base_model.model.`` prefix. DoRA, trained biases and ``modules_to_save`` are refused.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from proclip_jax.data import paths
from proclip_jax.convert.common import check_weights, read_json, read_state_dict
from proclip_jax.errors import ProclipError
from proclip_jax.models import embedder as emb
from proclip_jax.models.bert import BertConfig
from proclip_jax.models.llm import DecoderConfig, abstract_params
from proclip_jax.tree import check_tree, unflatten

MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "bert": "bert"}
# Source tensors deliberately not used, by regular expression on the prefix-stripped name.
IGNORED = (r"^lm_head\.", r"rotary_emb\.inv_freq$", r"^pooler\.", r"^cls\.",
           r"^embeddings\.position_ids$")


# ----------------------------------------------------------------------------- configs

def _rope_from_hf(c: Mapping[str, Any]) -> dict:
  """Rope fields from ``rope_theta`` + ``rope_scaling`` (v4) or ``rope_parameters`` (v5)."""
  params = dict(c.get("rope_parameters") or {})
  scaling = dict(c.get("rope_scaling") or {})
  merged = {**params, **scaling}
  theta = merged.get("rope_theta", c.get("rope_theta", 10000.0))
  rtype = merged.get("rope_type", merged.get("type", "default")) or "default"
  out = {"rope_theta": float(theta), "rope_type": rtype}
  if rtype == "linear":
    out["rope_factor"] = float(merged["factor"])
  elif rtype == "llama3":
    try:
      out.update(rope_factor=float(merged["factor"]),
                 rope_low_freq_factor=float(merged["low_freq_factor"]),
                 rope_high_freq_factor=float(merged["high_freq_factor"]),
                 rope_original_max_position=int(merged["original_max_position_embeddings"]))
    except KeyError as e:
      raise ProclipError(f"config.json: llama3 rope scaling lacks {e}.") from e
  elif rtype != "default":
    raise ProclipError(f"config.json: rope type {rtype!r} is not supported (default, linear, "
                       "llama3).")
  return out


def decoder_config_from_hf(c: Mapping[str, Any], max_length: int) -> DecoderConfig:
  family = MODEL_TYPES[c["model_type"]]
  try:
    heads = int(c["num_attention_heads"])
    hidden = int(c["hidden_size"])
    act = c.get("hidden_act", "silu")
    if act != "silu":
      raise ProclipError(f"config.json: hidden_act {act!r} is not supported (silu).")
    window = c.get("sliding_window")
    uses_window = c.get("use_sliding_window", family == "mistral") and window
    if uses_window and int(window) < max_length:
      raise ProclipError(
          f"config.json: sliding-window attention (window {window}) is shorter than the "
          f"preset's max_length {max_length}; it is not implemented. Lower max_length.")
    bias = bool(c.get("attention_bias", False))
    return DecoderConfig(
        vocab_size=int(c["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(c["intermediate_size"]), num_layers=int(c["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or hidden // heads),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        qkv_bias=True if family == "qwen2" else bias,
        out_bias=False if family == "qwen2" else bias,
        mlp_bias=bool(c.get("mlp_bias", False)), qk_norm=family == "qwen3", family=family,
        **_rope_from_hf(c))
  except KeyError as e:
    raise ProclipError(f"config.json lacks {e}, which a {family} model needs.") from e


def bert_config_from_hf(c: Mapping[str, Any]) -> BertConfig:
  if c.get("position_embedding_type", "absolute") != "absolute":
    raise ProclipError("config.json: only absolute position embeddings are supported for BERT.")
  try:
    return BertConfig(
        vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]), num_layers=int(c["num_hidden_layers"]),
        num_heads=int(c["num_attention_heads"]),
        max_position_embeddings=int(c.get("max_position_embeddings", 512)),
        type_vocab_size=int(c.get("type_vocab_size", 2)),
        layer_norm_eps=float(c.get("layer_norm_eps", 1e-12)),
        hidden_act=c.get("hidden_act", "gelu"))
  except KeyError as e:
    raise ProclipError(f"config.json lacks {e}, which a BERT model needs.") from e


# ----------------------------------------------------------------------------- LoRA

def _pattern_value(name: str, patterns: Mapping[str, Any], default):
  for pat, v in (patterns or {}).items():
    if re.match(rf"(.*\.)?{pat}$", name):
      return v
  return default


def merge_lora(sd: dict[str, np.ndarray], adapter_dir: str) -> dict[str, np.ndarray]:
  """Returns ``sd`` with a PEFT LoRA adapter merged in (``W + s · B @ A``), in float32."""
  adapter_dir = os.fspath(adapter_dir)
  acfg = read_json(os.path.join(adapter_dir, "adapter_config.json"))
  if acfg.get("peft_type", "LORA") != "LORA":
    raise ProclipError(f"{adapter_dir!r}: peft_type {acfg.get('peft_type')!r} is not LoRA.")
  if acfg.get("use_dora"):
    raise ProclipError(f"{adapter_dir!r}: DoRA adapters are not supported; merge it with PEFT "
                       "(merge_and_unload) and convert the merged model.")
  if acfg.get("modules_to_save"):
    raise ProclipError(f"{adapter_dir!r}: modules_to_save={acfg['modules_to_save']} is not "
                       "supported; merge it with PEFT and convert the merged model.")
  weights = None
  for name in ("adapter_model.safetensors", "adapter_model.bin"):
    if os.path.exists(os.path.join(adapter_dir, name)):
      weights = read_state_dict(os.path.join(adapter_dir, name))
      break
  if weights is None:
    raise ProclipError(f"No adapter_model.safetensors or adapter_model.bin in {adapter_dir!r}.")
  fan_in_fan_out = bool(acfg.get("fan_in_fan_out", False))
  made_for = (f"adapter_config.json: base_model_name_or_path "
              f"{acfg.get('base_model_name_or_path')!r}")
  sd = dict(sd)
  pairs: dict[str, dict[str, np.ndarray]] = {}
  for k, v in weights.items():
    m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", k)
    if not m:
      raise ProclipError(f"{adapter_dir!r}: adapter tensor {k!r} is not a LoRA A/B weight "
                         "(trained biases, embeddings or DoRA are not supported).")
    pairs.setdefault(m.group(1), {})[m.group(2)] = v
  for module, ab in sorted(pairs.items()):
    if set(ab) != {"A", "B"}:
      raise ProclipError(f"{adapter_dir!r}: module {module!r} has lora_{list(ab)[0]} only.")
    candidates = [module + ".weight", "model." + module + ".weight"]
    if module.startswith("model."):
      candidates.append(module[len("model."):] + ".weight")
    target = next((c for c in candidates if c in sd), None)
    if target is None:
      raise ProclipError(f"LoRA module {module!r} from {adapter_dir!r} has no base weight in "
                         f"the checkpoint (looked for {candidates}): the adapter was made for "
                         f"another base model ({made_for}).")
    a = np.asarray(ab["A"], np.float32)
    b = np.asarray(ab["B"], np.float32)
    r = a.shape[0]
    alpha = float(_pattern_value(module, acfg.get("alpha_pattern"), acfg.get("lora_alpha", r)))
    rank = int(_pattern_value(module, acfg.get("rank_pattern"), acfg.get("r", r)))
    if rank != r:
      raise ProclipError(f"{adapter_dir!r}: {module!r} has rank {r} but the config says {rank}.")
    scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
    delta = (b @ a) * scale
    if fan_in_fan_out:
      delta = delta.T
    w = np.asarray(sd[target], np.float32)
    if w.shape != delta.shape:
      raise ProclipError(f"The LoRA adapter {adapter_dir!r} was made for another base model "
                         f"({made_for}): its update for {target!r} is {delta.shape}, the base "
                         f"weight {w.shape}. Pass the base model the adapter was trained on.")
    sd[target] = w + delta
  return sd


# ----------------------------------------------------------------------------- renaming

class _Source:
  """A state dict that records which tensors were consumed."""

  def __init__(self, sd: Mapping[str, np.ndarray], prefixes: Sequence[str]):
    for p in prefixes:  # LlamaForCausalLM "model.", BertFor* "bert."
      if any(k.startswith(p) for k in sd):
        sd = {(k[len(p):] if k.startswith(p) else k): v for k, v in sd.items()}
    self.sd = dict(sd)
    self.used: set[str] = set()

  def get(self, key: str):
    if key not in self.sd:
      return None
    self.used.add(key)
    return np.asarray(self.sd[key], np.float32)

  def unused(self) -> list[str]:
    return sorted(k for k in self.sd if k not in self.used
                  and not any(re.search(p, k) for p in IGNORED))


def _put(flat: dict, key: str, value):
  if value is not None:
    flat[key] = value


def _kernel(w, in_shape=None, out_shape=None):
  """PyTorch [out, in] -> kernel [*in_shape, *out_shape]."""
  if w is None:
    return None
  k = np.ascontiguousarray(w.T)
  return k.reshape(*(in_shape or k.shape[:1]), *(out_shape or k.shape[1:]))


def rename_decoder(src: _Source, cfg: DecoderConfig) -> dict:
  h, hkv, dh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
  flat: dict[str, Any] = {}
  _put(flat, "embed_tokens/embedding", src.get("embed_tokens.weight"))
  _put(flat, "norm/scale", src.get("norm.weight"))
  for i in range(cfg.num_layers):
    s, t = f"layers.{i}.", f"layers_{i}/"
    _put(flat, t + "input_layernorm/scale", src.get(s + "input_layernorm.weight"))
    _put(flat, t + "post_attention_layernorm/scale", src.get(s + "post_attention_layernorm.weight"))
    for name, heads in (("q", h), ("k", hkv), ("v", hkv)):
      w = src.get(f"{s}self_attn.{name}_proj.weight")
      _put(flat, f"{t}self_attn/{name}_proj/kernel", _kernel(w, (d,), (heads, dh))
           if w is not None and w.shape == (heads * dh, d) else _kernel(w))
      b = src.get(f"{s}self_attn.{name}_proj.bias")
      _put(flat, f"{t}self_attn/{name}_proj/bias",
           b.reshape(heads, dh) if b is not None and b.size == heads * dh else b)
    w = src.get(s + "self_attn.o_proj.weight")
    _put(flat, t + "self_attn/o_proj/kernel", _kernel(w, (h, dh), (d,))
         if w is not None and w.shape == (d, h * dh) else _kernel(w))
    _put(flat, t + "self_attn/o_proj/bias", src.get(s + "self_attn.o_proj.bias"))
    for name in ("q_norm", "k_norm"):
      _put(flat, f"{t}self_attn/{name}/scale", src.get(f"{s}self_attn.{name}.weight"))
    for name in ("gate_proj", "up_proj", "down_proj"):
      _put(flat, f"{t}mlp/{name}/kernel", _kernel(src.get(f"{s}mlp.{name}.weight")))
      _put(flat, f"{t}mlp/{name}/bias", src.get(f"{s}mlp.{name}.bias"))
  return unflatten(flat)


def rename_bert(src: _Source, cfg: BertConfig) -> dict:
  h, dh, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
  flat: dict[str, Any] = {}

  def ln(target, source):
    _put(flat, target + "/scale", src.get(source + ".weight") if source + ".weight" in src.sd
         else src.get(source + ".gamma"))
    _put(flat, target + "/bias", src.get(source + ".bias") if source + ".bias" in src.sd
         else src.get(source + ".beta"))

  for name in ("word", "position", "token_type"):
    _put(flat, f"{name}_embeddings/embedding", src.get(f"embeddings.{name}_embeddings.weight"))
  ln("embeddings_norm", "embeddings.LayerNorm")
  for i in range(cfg.num_layers):
    s, t = f"encoder.layer.{i}.", f"layer_{i}/"
    for name in ("query", "key", "value"):
      w = src.get(f"{s}attention.self.{name}.weight")
      _put(flat, f"{t}{name}/kernel", _kernel(w, (d,), (h, dh))
           if w is not None and w.shape == (d, d) else _kernel(w))
      b = src.get(f"{s}attention.self.{name}.bias")
      _put(flat, f"{t}{name}/bias", b.reshape(h, dh) if b is not None and b.size == d else b)
    w = src.get(s + "attention.output.dense.weight")
    _put(flat, t + "attention_output/kernel", _kernel(w, (h, dh), (d,))
         if w is not None and w.shape == (d, d) else _kernel(w))
    _put(flat, t + "attention_output/bias", src.get(s + "attention.output.dense.bias"))
    ln(t + "attention_norm", s + "attention.output.LayerNorm")
    _put(flat, t + "intermediate/kernel", _kernel(src.get(s + "intermediate.dense.weight")))
    _put(flat, t + "intermediate/bias", src.get(s + "intermediate.dense.bias"))
    _put(flat, t + "output/kernel", _kernel(src.get(s + "output.dense.weight")))
    _put(flat, t + "output/bias", src.get(s + "output.dense.bias"))
    ln(t + "output_norm", s + "output.LayerNorm")
  return unflatten(flat)


# ----------------------------------------------------------------------------- entry point

def convert_embedder(src: str, out: str, *, preset: str | Mapping | None = None,
                     lora: str | Sequence[str] | None = None, overwrite: bool = False) -> str:
  """Converts a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / BERT folder into ``out``.

  Args:
    src: Hugging Face model folder (config.json, weights, tokenizer.json).
    out: output folder (written atomically).
    preset: embedder preset name or dict (default per family: llm2clip-llama3 for llama,
      qwen3-embedding for qwen2/qwen3, llama-mean for mistral, minilm for bert).
    lora: a PEFT LoRA adapter folder, or several applied in order, merged before conversion.
    overwrite: replace an existing ``out``.

  Returns:
    The absolute output path.
  """
  src = os.fspath(src)
  out = paths.absolute(out)
  if epath.Path(out).exists() and not overwrite:
    raise ProclipError(f"Output {out!r} already exists; remove it or pass --overwrite.")
  if not os.path.isdir(src):
    raise ProclipError(f"{src!r} is not a Hugging Face model folder (config.json, weights, "
                       "tokenizer.json).")
  hf = read_json(os.path.join(src, "config.json"))
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ProclipError(f"{src!r}: model_type {model_type!r} is not a supported embedder "
                       f"family ({', '.join(MODEL_TYPES)}).")
  family = MODEL_TYPES[model_type]
  preset = emb.get_preset(preset if preset is not None else emb.DEFAULT_PRESET[family])
  if family not in preset.families:
    raise ProclipError(f"Preset {preset.name!r} is for {', '.join(preset.families)} models, "
                       f"but {src!r} is {family!r}; pass another --preset.")
  if not os.path.isfile(os.path.join(src, "tokenizer.json")):
    raise ProclipError(f"{src!r} has no tokenizer.json; copy the model's tokenizer files "
                       "(tokenizer.json, tokenizer_config.json, special_tokens_map.json) into "
                       "it. Nothing was written.")
  emb.TextTokenizer(src, preset)  # the preset's pad token must exist in this vocabulary
  if family == "bert":
    cfg = bert_config_from_hf(hf)
  else:
    cfg = decoder_config_from_hf(hf, preset.max_length)
  sd = read_state_dict(src)
  loras = [] if lora is None else [lora] if isinstance(lora, (str, os.PathLike)) else list(lora)
  for adapter in loras:
    sd = merge_lora(sd, adapter)
  if family == "bert":
    source = _Source(sd, ("bert.",))
    params = rename_bert(source, cfg)
  else:
    source = _Source(sd, ("model.",))
    params = rename_decoder(source, cfg)
  model = emb.build_model(cfg, preset)
  check_tree(params, abstract_params(model), what=f"checkpoint {src!r}",
             unused_source_keys=source.unused())
  check_weights(params, what=f"checkpoint {src!r}")
  return emb.save_embedder(out, cfg, preset, params, src, overwrite=overwrite, source=src,
                           lora=[os.fspath(x) for x in loras])
