"""Decoder embedders (proclip_jax.models.llm) against transformers' PyTorch Llama / Qwen3.

Tiny random models go through the production converter (proclip_jax.convert.llm), then the
pooled Flax output is compared with the PyTorch model's last hidden state pooled in NumPy,
given the same ``position_ids = cumsum(mask) - 1``. Bidirectional references switch off
causality in transformers (``config.is_causal = False`` and ``is_causal`` on every attention
module, eager attention), as LLM2Vec does.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from tokenizers import Tokenizer, models, pre_tokenizers

from proclip_jax.convert.llm import convert_embedder
from proclip_jax.errors import ProclipError
from proclip_jax.models import embedder as E
from proclip_jax.models import llm

TOL = 1e-5
L = 9
LENGTHS = (9, 5, 1, 7)
WORDS = ["<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|endoftext|>", "user", "a", "red", "cat", "on", "the", "mat"]


def write_word_tokenizer(folder):
  """A whitespace WordLevel tokenizer.json holding the presets' special tokens."""
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="a"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.save(os.path.join(folder, "tokenizer.json"))


def batch(padding, vocab, seed=0):
  """ids, attn, random non-empty pool mask [4, L] for rows of LENGTHS, padded on one side."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (len(LENGTHS), L)).astype(np.int32)
  attn = np.zeros_like(ids)
  for i, n in enumerate(LENGTHS):
    attn[i, L - n:] = 1 if padding == "left" else 0
    attn[i, :n] = 1 if padding == "right" else attn[i, :n]
  pool = attn * (rng.random(attn.shape) < 0.6)
  for i in range(len(LENGTHS)):  # at least one pooled token per row
    pool[i, np.flatnonzero(attn[i])[-1]] = 1
  return ids, attn, pool.astype(np.int32)


def np_pool(h, attn, pool, pooling):
  if pooling == "mean":
    return (h * pool[..., None]).sum(1) / pool.sum(1, keepdims=True)
  idx = [np.flatnonzero(a)[-1 if pooling == "last" else 0] for a in attn]
  return h[np.arange(len(idx)), idx]


def hf_hidden(model, ids, attn, causal):
  model.config.is_causal = causal
  for m in model.modules():
    if hasattr(m, "is_causal") and hasattr(m, "q_proj"):
      m.is_causal = causal
  pos = np.maximum(np.cumsum(attn, 1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(attn, dtype=torch.long),
                position_ids=torch.tensor(pos, dtype=torch.long))
  return out.last_hidden_state.numpy()


def tiny_llama_config(**kw):
  from transformers import LlamaConfig  # pylint: disable=import-outside-toplevel
  # head_dim 16, theta 5e5, original 64: the RoPE frequencies hit all three llama3 branches
  # (kept, smoothed, divided by factor).
  return LlamaConfig(
      vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64},
      attn_implementation="eager", **kw)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """LlamaForCausalLM ("model." keys + lm_head), saved as sharded safetensors, converted."""
  from transformers import LlamaForCausalLM  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  hf = LlamaForCausalLM(tiny_llama_config()).eval()
  src = tmp_path_factory.mktemp("llama_src")
  hf.save_pretrained(src, max_shard_size="40KB")
  assert os.path.exists(src / "model.safetensors.index.json")
  write_word_tokenizer(src)
  out = convert_embedder(src, tmp_path_factory.mktemp("conv") / "llama")
  return hf.model, E.load_embedder(out), src


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
  """Qwen3Model with attention biases, saved as pytorch_model.bin (weights_only reader)."""
  from transformers import Qwen3Config, Qwen3Model  # pylint: disable=import-outside-toplevel
  torch.manual_seed(1)
  cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    attention_bias=True, rope_parameters={"rope_type": "default",
                                                          "rope_theta": 10000.0},
                    attn_implementation="eager")
  hf = Qwen3Model(cfg).eval()
  src = tmp_path_factory.mktemp("qwen_src")
  hf.config.save_pretrained(src)
  torch.save(hf.state_dict(), src / "pytorch_model.bin")
  write_word_tokenizer(src)
  out = convert_embedder(src, tmp_path_factory.mktemp("conv") / "qwen3")
  return hf, E.load_embedder(out), src


CASES = [  # (family, attention, pooling, padding)
    ("llama", "causal", "mean", "right"),
    ("llama", "bidirectional", "mean", "left"),
    ("llama", "causal", "last", "left"),
    ("qwen3", "causal", "last", "left"),
    ("qwen3", "bidirectional", "cls", "right"),
    ("qwen3", "causal", "mean", "right"),
]


@pytest.mark.parametrize("family,attention,pooling,padding", CASES)
def test_pooled_parity_with_transformers(request, family, attention, pooling, padding):
  hf, emb, _ = request.getfixturevalue(family)
  preset = dataclasses.replace(emb.preset, attention=attention, pooling=pooling)
  fn = jax.jit(E.make_embed_tokens(E.build_model(emb.config, preset)))
  ids, attn, pool = batch(padding, emb.config.vocab_size)
  got = np.asarray(fn(emb.params, ids, attn, pool))
  h = hf_hidden(hf, ids, attn, attention == "causal")
  want = np_pool(h, attn, pool, pooling)
  err = np.abs(got - want).max()
  print(f"{family} {attention} {pooling} {padding}: max abs err {err:.2e}")
  assert err <= TOL
  # The mode matters: the other attention mode gives a different answer.
  other = np_pool(hf_hidden(hf, ids, attn, attention != "causal"), attn, pool, pooling)
  assert np.abs(other - want).max() > 1e-3


def test_padding_side_does_not_change_embeddings(llama):
  _, emb, _ = llama
  fn = jax.jit(emb.embed_tokens)
  ids_r, attn_r, pool_r = batch("right", 64)
  ids_l, attn_l, pool_l = np.zeros_like(ids_r), np.zeros_like(attn_r), np.zeros_like(pool_r)
  for i, n in enumerate(LENGTHS):  # the same rows, moved to the left-padded layout
    ids_l[i, L - n:], attn_l[i, L - n:], pool_l[i, L - n:] = ids_r[i, :n], 1, pool_r[i, :n]
  a = np.asarray(fn(emb.params, ids_r, attn_r, pool_r))
  b = np.asarray(fn(emb.params, ids_l, attn_l, pool_l))
  assert np.abs(a - b).max() <= TOL


def test_rope_llama3_scaling_matches_transformers(llama):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=import-outside-toplevel
  hf, emb, _ = llama
  want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf.config)
  got = llm.rope_inv_freq(emb.config)
  assert emb.config.rope_type == "llama3"
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
  base = llm.rope_inv_freq(dataclasses.replace(emb.config, rope_type="default"))
  assert (got == base).any() and (got != base).any()  # some kept, some scaled


def test_scan_layers_and_bf16(llama):
  _, emb, _ = llama
  ids, attn, pool = batch("left", 64)
  ref = np.asarray(jax.jit(emb.embed_tokens)(emb.params, ids, attn, pool))
  scanned = llm.stack_layers(emb.params, emb.config.num_layers)
  assert scanned["layers"]["layer"]["mlp"]["up_proj"]["kernel"].shape == (2, 64, 96)
  fn = jax.jit(E.make_embed_tokens(E.build_model(emb.config, emb.preset, scan_layers=True)))
  assert np.abs(np.asarray(fn(scanned, ids, attn, pool)) - ref).max() <= TOL
  axes = llm.logical_axes(E.build_model(emb.config, emb.preset, scan_layers=True))
  assert tuple(axes["layers"]["layer"]["self_attn"]["q_proj"]["kernel"]) == (
      "layers", "embed", "heads", "kv")
  bf = jax.jit(E.make_embed_tokens(E.build_model(emb.config, emb.preset, dtype=jnp.bfloat16)))
  low = np.asarray(bf(emb.params, ids, attn, pool))
  assert low.dtype == np.float32
  assert np.abs(low - ref).max() <= 0.05 * np.abs(ref).max()


def test_sharded_forward_on_8_devices(llama):
  _, emb, _ = llama
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
  rules = (("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
           ("kv", None))
  shardings = nn.logical_to_mesh_sharding(llm.logical_axes(emb.model), mesh, rules)
  params = jax.device_put(emb.params, shardings)
  assert tuple(params["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec) == (
      "fsdp", "tensor", None)
  ids, attn, pool = batch("left", 64)
  data = NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = jax.jit(emb.embed_tokens, out_shardings=data)
  got = np.asarray(fn(params, ids, attn, pool))
  ref = np.asarray(jax.jit(emb.embed_tokens)(emb.params, ids, attn, pool))
  assert np.abs(got - ref).max() <= TOL


def test_lora_merge_equals_peft_forward(tmp_path):
  from peft import LoraConfig, get_peft_model  # pylint: disable=import-outside-toplevel
  from transformers import LlamaModel  # pylint: disable=import-outside-toplevel
  torch.manual_seed(2)
  base = LlamaModel(tiny_llama_config()).eval()
  base.save_pretrained(tmp_path / "base")
  write_word_tokenizer(tmp_path / "base")
  lcfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                    init_lora_weights=False, lora_dropout=0.0)
  peft_model = get_peft_model(base, lcfg).eval()
  peft_model.save_pretrained(tmp_path / "adapter")
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    assert json.load(f)["lora_alpha"] == 12
  out = convert_embedder(tmp_path / "base", tmp_path / "out", preset="llm2clip-llama3",
                         lora=tmp_path / "adapter")
  emb = E.load_embedder(out)
  assert emb.preset.name == "llm2clip-llama3" and emb.preset.attention == "bidirectional"
  ids, attn, pool = batch("left", 64, seed=3)
  got = np.asarray(jax.jit(emb.embed_tokens)(emb.params, ids, attn, pool))
  hf = peft_model.base_model.model
  want = np_pool(hf_hidden(hf, ids, attn, causal=False), attn, pool, "mean")
  err = np.abs(got - want).max()
  print(f"LoRA merge vs PEFT forward: max abs err {err:.2e}")
  assert err <= TOL
  with peft_model.disable_adapter():
    plain = np_pool(hf_hidden(hf, ids, attn, causal=False), attn, pool, "mean")
  assert np.abs(plain - want).max() > 1e-3  # the adapter changes the output
  scanned = E.load_embedder(out, scan_layers=True)
  assert "layers" in scanned.params and "layers_0" not in scanned.params
  assert np.abs(np.asarray(jax.jit(scanned.embed_tokens)(scanned.params, ids, attn, pool))
                - got).max() <= TOL


def test_lora_merge_transcription(tmp_path):
  """W + s·B·A with PEFT's prefixes, alpha_pattern / rank_pattern and rsLoRA, in NumPy."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from proclip_jax.convert.llm import merge_lora  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  base = {"model.layers.0.self_attn.q_proj.weight": rng.normal(size=(8, 6)).astype(np.float32),
          "model.layers.0.mlp.up_proj.weight": rng.normal(size=(5, 6)).astype(np.float32),
          "lm_head.weight": rng.normal(size=(3, 6)).astype(np.float32)}
  a_q, b_q = rng.normal(size=(2, 6)), rng.normal(size=(8, 2))
  a_u, b_u = rng.normal(size=(4, 6)), rng.normal(size=(5, 4))
  pre = "base_model.model.model.layers.0."
  save_file({pre + "self_attn.q_proj.lora_A.weight": a_q.astype(np.float32),
             pre + "self_attn.q_proj.lora_B.weight": b_q.astype(np.float32),
             pre + "mlp.up_proj.lora_A.weight": a_u.astype(np.float32),
             pre + "mlp.up_proj.lora_B.weight": b_u.astype(np.float32)},
            str(tmp_path / "adapter_model.safetensors"))
  for rslora in (False, True):
    with open(tmp_path / "adapter_config.json", "w") as f:
      json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": rslora,
                 "rank_pattern": {"up_proj": 4}, "alpha_pattern": {"up_proj": 3},
                 "target_modules": ["q_proj", "up_proj"]}, f)
    merged = merge_lora(base, tmp_path)
    sq, su = (4 / np.sqrt(2), 3 / 2.0) if rslora else (4 / 2, 3 / 4)
    np.testing.assert_allclose(merged["model.layers.0.self_attn.q_proj.weight"],
                               base["model.layers.0.self_attn.q_proj.weight"] + sq * b_q @ a_q,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged["model.layers.0.mlp.up_proj.weight"],
                               base["model.layers.0.mlp.up_proj.weight"] + su * b_u @ a_u,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged["lm_head.weight"], base["lm_head.weight"])
  del base["model.layers.0.mlp.up_proj.weight"]
  with pytest.raises(ProclipError, match="no base weight"):
    merge_lora(base, tmp_path)


# ------------------------------------------------------------------ bad input, nothing written

def _no_output(parent, name):
  return not any(p.startswith(name) for p in os.listdir(parent))


def test_missing_tokenizer_writes_nothing(llama, tmp_path):
  _, _, src = llama
  bare = tmp_path / "bare"
  bare.mkdir()
  for f in os.listdir(src):
    if f != "tokenizer.json":
      os.symlink(src / f, bare / f)
  with pytest.raises(ProclipError, match="tokenizer.json"):
    convert_embedder(bare, tmp_path / "out")
  assert _no_output(tmp_path, "out")


def test_misshaped_config_and_extra_tensor_write_nothing(llama, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  _, _, src = llama
  bad = tmp_path / "bad"
  bad.mkdir()
  for f in os.listdir(src):
    if f != "config.json":
      os.symlink(src / f, bad / f)
  with open(src / "config.json") as f:
    cfg = json.load(f)
  cfg["intermediate_size"] = 80
  with open(bad / "config.json", "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ProclipError, match="mis-shaped") as e:
    convert_embedder(bad, tmp_path / "out")
  assert "layers_0/mlp/up_proj/kernel" in str(e.value)
  assert _no_output(tmp_path, "out")

  extra = tmp_path / "extra"
  extra.mkdir()
  for f in ("config.json", "tokenizer.json"):
    os.symlink(src / f, extra / f)
  from proclip_jax.convert.common import read_state_dict  # pylint: disable=import-outside-toplevel
  sd = read_state_dict(src)
  sd["model.layers.0.self_attn.rogue.weight"] = np.zeros(3, np.float32)
  save_file(sd, str(extra / "model.safetensors"))
  with pytest.raises(ProclipError, match="rogue"):
    convert_embedder(extra, tmp_path / "out2")
  assert _no_output(tmp_path, "out2")


def test_bad_preset_and_existing_output(llama, tmp_path):
  _, emb, src = llama
  with pytest.raises(ProclipError, match="Unknown embedder preset"):
    convert_embedder(src, tmp_path / "o1", preset="no-such-preset")
  with pytest.raises(ProclipError, match="bert"):
    convert_embedder(src, tmp_path / "o2", preset="minilm")
  assert _no_output(tmp_path, "o")
  (tmp_path / "exists").mkdir()
  with pytest.raises(ProclipError, match="already exists"):
    convert_embedder(src, tmp_path / "exists")
  with pytest.raises(ProclipError, match="same shape"):
    emb.embed_tokens(emb.params, np.zeros((2, 5), np.int32), np.ones((2, 6), np.int32),
                     np.ones((2, 5), np.int32))


# ------------------------------------------------------ release folders as saved (issue #23)

def test_llm2vec_style_full_folder(tmp_path):
  """A complete LLM2Vec / LLM2CLIP-style encoder folder: LlamaModel keys without "model.", 4+
  safetensors shards with an index, a custom architecture name in config.json; converted as
  it is (no LoRA) through the CLI's entry point, bidirectional mean pooling as transformers."""
  from transformers import LlamaModel  # pylint: disable=import-outside-toplevel
  from proclip_jax.convert.api import convert  # pylint: disable=import-outside-toplevel
  torch.manual_seed(5)
  hf = LlamaModel(tiny_llama_config()).eval()
  src = tmp_path / "LLM2CLIP-tiny"
  hf.save_pretrained(src, max_shard_size="60KB")
  with open(src / "model.safetensors.index.json") as f:
    weight_map = json.load(f)["weight_map"]
  assert len(set(weight_map.values())) >= 4 and not any(k.startswith("model.") for k in weight_map)
  with open(src / "config.json") as f:
    cfg = json.load(f)
  cfg.update(architectures=["LlamaEncoderModel"],
             auto_map={"AutoModel": "modeling_llama_encoder.LlamaEncoderModel"})
  with open(src / "config.json", "w") as f:
    json.dump(cfg, f)
  write_word_tokenizer(src)
  emb = E.load_embedder(convert(str(src), str(tmp_path / "out"), preset="llm2clip-llama3"))
  ids, attn, pool = batch("left", 64, seed=6)
  got = np.asarray(jax.jit(emb.embed_tokens)(emb.params, ids, attn, pool))
  want = np_pool(hf_hidden(hf, ids, attn, causal=False), attn, pool, "mean")
  err = np.abs(got - want).max()
  print(f"LLM2Vec-style sharded folder: max abs err {err:.2e}")
  assert err <= TOL


def test_lora_for_another_base_model_is_refused(llama, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  _, _, src = llama  # hidden size 64
  adapter = tmp_path / "adapter"
  adapter.mkdir()
  with open(adapter / "adapter_config.json", "w") as f:
    json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
               "base_model_name_or_path": "someone/other-llama-32"}, f)
  pre = "base_model.model.model.layers.0.self_attn.q_proj."
  save_file({pre + "lora_A.weight": np.ones((2, 32), np.float32),
             pre + "lora_B.weight": np.ones((32, 2), np.float32)},
            str(adapter / "adapter_model.safetensors"))
  with pytest.raises(ProclipError, match="made for another base model") as e:
    convert_embedder(src, tmp_path / "out", lora=adapter)
  msg = str(e.value)
  assert "someone/other-llama-32" in msg and "(32, 32)" in msg and "(64, 64)" in msg
  assert len(msg.splitlines()) == 1 and _no_output(tmp_path, "out")
  # A module the base model does not have: the same diagnosis.
  os.remove(adapter / "adapter_model.safetensors")
  save_file({"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight":
             np.ones((2, 64), np.float32),
             "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight":
             np.ones((64, 2), np.float32)}, str(adapter / "adapter_model.safetensors"))
  with pytest.raises(ProclipError, match="made for another base model"):
    convert_embedder(src, tmp_path / "out", lora=adapter)
  assert _no_output(tmp_path, "out")
