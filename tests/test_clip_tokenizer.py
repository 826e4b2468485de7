"""CLIP BPE tokenizer: ids equal transformers' CLIPTokenizer built from the same vocabulary.

transformers 5 has only the tokenizers-backed CLIPTokenizer; it normalises with NFC +
whitespace + lowercase, without OpenAI's ftfy / HTML-unescape step. The reference therefore
applies that step (OpenAI's ``basic_clean``) before calling transformers; strings that the
step leaves alone are also compared with transformers directly.
"""
import html
import json

import ftfy
import numpy as np
import pytest
from transformers import CLIPTokenizer

from proclip_jax.text.clip_tokenizer import ClipTokenizer, write_hf_vocab

STRINGS = [
    "a photo of a cat",
    "Café naïve résumé Ångström, São Paulo über straße",
    "東京タワーの写真、北京天安门 and 서울",
    "emoji 🐱🚀👍🏽 done 🇫🇷",
    "  lots \t\n of   whitespace \u3000 runs  ",
    "Tom &amp; Jerry &lt;3 &amp;amp; &quot;quoted&quot; &#233;t&eacute;",
    "it's they're I'M we'll you've she'd 12345 3.14",
    "ﬁne ｆｕｌｌｗｉｄｔｈ “curly” quotes — dash",
    "<|startoftext|>special<|endoftext|> tokens",
    "",
    "MiXeD CaSe!!! ???... $%^ #hashtag @user",
    "a very long caption that keeps going " * 20,
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  ours = ClipTokenizer()
  vocab, merges = write_hf_vocab(str(tmp_path_factory.mktemp("clipvocab")))
  ref = CLIPTokenizer(vocab, merges)  # positional paths (keywords give wrong ids in v5)
  return ours, ref


def _ref_ids(ref, texts, n=77):
  enc = ref(list(texts), max_length=n, truncation=True, padding="max_length", return_tensors="np")
  return enc["input_ids"] * enc["attention_mask"]  # pad with 0 like OpenAI


def _openai_clean(s):
  return html.unescape(html.unescape(ftfy.fix_text(s))).strip()


def test_vocabulary(tokenizers, tmp_path):
  ours, _ = tokenizers
  assert ours.vocab_size == 49408
  assert (ours.sot_id, ours.eot_id) == (49406, 49407)
  vocab, merges = ours.write_hf_files(str(tmp_path))
  with open(vocab, encoding="utf-8") as f:
    v = json.load(f)
  assert len(v) == 49408 and v["<|endoftext|>"] == 49407 and v["a</w>"] == 320
  with open(merges, encoding="utf-8") as f:
    assert len(f.read().splitlines()) == 1 + 48894
  # Ids that OpenAI's clip.tokenize gives (widely quoted reference values).
  ids = ours(["a photo of a cat", "Hello, world!"])
  assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
  assert ids[1, :6].tolist() == [49406, 3306, 267, 1002, 256, 49407]


def test_ids_equal_transformers(tokenizers):
  ours, ref = tokenizers
  got = ours(STRINGS)
  assert got.dtype == np.int32 and got.shape == (len(STRINGS), 77)
  want = _ref_ids(ref, [_openai_clean(s) for s in STRINGS])
  for s, g, w in zip(STRINGS, got, want):
    assert g.tolist() == w.tolist(), s
  # Where OpenAI's cleaning is a no-op, transformers alone agrees too.
  plain = [s for s in STRINGS if _openai_clean(s) == s.strip()]
  assert len(plain) >= 6
  np.testing.assert_array_equal(ours(plain), _ref_ids(ref, plain))


def test_truncation_padding_and_context(tokenizers):
  ours, ref = tokenizers
  long = "a very long caption that keeps going " * 20
  ids = ours([long, "short"])
  assert ids[0, -1] == 49407 and np.count_nonzero(ids[0]) == 77
  np.testing.assert_array_equal(ids[0], _ref_ids(ref, [long])[0])
  assert ids[1].tolist()[:3] == [49406, ours.encode("short")[0], 49407]
  assert not ids[1, 3:].any()
  short_ctx = ours([long], context_length=16)
  assert short_ctx.shape == (1, 16) and short_ctx[0, -1] == 49407
  np.testing.assert_array_equal(short_ctx[0, :15], ids[0, :15])
  np.testing.assert_array_equal(ours("a photo"), ours(["a photo"]))


def test_decode_round_trip(tokenizers):
  ours, _ = tokenizers
  assert ours.decode(ours(["A Photo of a  Café 東京!"])[0]) == "a photo of a café 東京 !"


def test_bad_input(tokenizers):
  from proclip_jax.errors import ProclipError
  ours, _ = tokenizers
  with pytest.raises(ProclipError):
    ours([None])
  with pytest.raises(ProclipError):
    ours(["x"], context_length=1)
