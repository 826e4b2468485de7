"""CLIP's byte-level BPE tokenizer (ids identical to OpenAI CLIP's), from the file in the repo.

Pipeline for one text (the OpenAI CLIP specification):

1. clean: ``ftfy.fix_text``, HTML-unescape twice, strip, collapse whitespace runs, lowercase;
2. split with CLIP's pattern (the special tokens, English contractions, letter runs, single
   digits, runs of other non-space characters);
3. map each piece's UTF-8 bytes to printable characters (the GPT-2 byte alphabet), mark the
   last character with ``</w>`` and merge pairs by BPE rank until no ranked pair is left;
4. ``tokenize``: ``<|startoftext|>`` + ids + ``<|endoftext|>``, cut to ``context_length``
   with ``<|endoftext|>`` kept last, zero padding, int32.

The vocabulary (49408 = 256 bytes + 256 bytes with ``</w>`` + 48894 merges + 2 specials)
comes from ``bpe_simple_vocab_16e6.txt.gz`` beside this file; nothing is downloaded. Pieces
are cached (LRU) so that millions of captions tokenise fast.
"""
from __future__ import annotations

import functools
import gzip
import html
import json
import os
from typing import Iterable, Sequence

import numpy as np
import regex

from proclip_jax.errors import ProclipError

DEFAULT_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "bpe_simple_vocab_16e6.txt.gz")
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2

_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE)
_WHITESPACE = regex.compile(r"\s+")
# Printable ASCII (plus tab/newline/CR) without '&': ftfy and html.unescape leave it alone.
_PLAIN_ASCII = regex.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")


def byte_alphabet() -> dict[int, str]:
  """Byte value -> a printable character (GPT-2's reversible byte-to-unicode map).

  Bytes that are printable Latin-1 characters map to themselves and come first (in byte
  order); the other 68 bytes follow, mapped in increasing order to characters 256, 257, ...
  The dict's order is the order of the first 256 vocabulary entries.
  """
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  table = {b: chr(b) for b in keep}
  others = [b for b in range(256) if b not in table]
  table.update({b: chr(256 + n) for n, b in enumerate(others)})
  return table


def read_merges(bpe_path: str = DEFAULT_BPE_PATH) -> list[tuple[str, str]]:
  """The 48894 merge pairs of CLIP's BPE file, in rank order."""
  try:
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
  except OSError as e:
    raise ProclipError(f"Cannot read the CLIP BPE vocabulary {bpe_path!r}: {e}.") from e
  pairs = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
  if len(pairs) != NUM_MERGES or any(len(p) != 2 for p in pairs):
    raise ProclipError(f"{bpe_path!r} is not CLIP's BPE merge list ({NUM_MERGES} pairs expected).")
  return pairs


def build_vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
  """Token strings in id order: bytes, bytes + ``</w>``, merged pairs, then SOT and EOT."""
  chars = list(byte_alphabet().values())
  return chars + [c + "</w>" for c in chars] + ["".join(p) for p in merges] + [SOT, EOT]


def basic_clean(text: str) -> str:
  """OpenAI's normalisation: ftfy, HTML-unescape twice, whitespace collapse, lowercase."""
  if not _PLAIN_ASCII.fullmatch(text):
    import ftfy  # pylint: disable=import-outside-toplevel
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return _WHITESPACE.sub(" ", text.strip()).strip().lower()


class ClipTokenizer:
  """CLIP BPE tokenizer: ``tok(texts, context_length=77) -> int32 [N, context_length]``.

  Args:
    bpe_path: gzipped merge list (default: the file shipped in this package).
    cache_size: number of distinct pieces whose ids are cached.
  """

  def __init__(self, bpe_path: str = DEFAULT_BPE_PATH, cache_size: int = 1 << 18):
    self.merges = read_merges(bpe_path)
    self.vocab = build_vocab(self.merges)
    self.encoder = {t: i for i, t in enumerate(self.vocab)}
    self.ranks = {p: i for i, p in enumerate(self.merges)}
    self.bytes = byte_alphabet()
    self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
    self._piece_ids = functools.lru_cache(maxsize=cache_size)(self._piece_ids_uncached)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def bpe(self, piece: str) -> list[str]:
    """Merges the byte characters of one ``piece`` (the last carries ``</w>``)."""
    parts = list(piece[:-1]) + [piece[-1] + "</w>"]
    while len(parts) > 1:
      best, best_rank = -1, None
      for i in range(len(parts) - 1):
        r = self.ranks.get((parts[i], parts[i + 1]))
        if r is not None and (best_rank is None or r < best_rank):
          best, best_rank = i, r
      if best < 0:
        break
      pair = (parts[best], parts[best + 1])
      merged, i = [], 0
      while i < len(parts):  # merge every occurrence of the best pair, left to right
        if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return parts

  def _piece_ids_uncached(self, piece: str) -> tuple[int, ...]:
    if piece in (SOT, EOT):
      return (self.encoder[piece],)
    chars = "".join(self.bytes[b] for b in piece.encode("utf-8"))
    return tuple(self.encoder[t] for t in self.bpe(chars))

  def encode(self, text: str) -> list[int]:
    """BPE ids of one text, without SOT/EOT."""
    ids: list[int] = []
    for piece in _PATTERN.findall(basic_clean(text)):
      ids.extend(self._piece_ids(piece))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ids (specials and padding zeros after EOT dropped)."""
    inverse = {c: b for b, c in self.bytes.items()}
    out = []
    for i in ids:
      i = int(i)
      if i == self.eot_id:
        break
      if i != self.sot_id:
        out.append(self.vocab[i])
    words = "".join(out).split("</w>")
    return " ".join(bytearray(inverse[c] for c in w).decode("utf-8", "replace")
                    for w in words).strip()

  def tokenize(self, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
    """int32 ``[N, context_length]``: SOT, ids, EOT (kept last when cut), zero padding."""
    if isinstance(texts, str):
      texts = [texts]
    if context_length < 2:
      raise ProclipError(f"context_length must be at least 2 (SOT + EOT), got {context_length}.")
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
      if not isinstance(text, str):
        raise ProclipError(f"tokenize: item {row} is a {type(text).__name__}, not a string.")
      ids = [self.sot_id] + self.encode(text)[:context_length - 2] + [self.eot_id]
      out[row, :len(ids)] = ids
    return out

  __call__ = tokenize

  def write_hf_files(self, out_dir: str) -> tuple[str, str]:
    """Writes ``vocab.json`` and ``merges.txt`` (Hugging Face BPE format); returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    vocab_path = os.path.join(out_dir, "vocab.json")
    merges_path = os.path.join(out_dir, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
      json.dump(self.encoder, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n")
      f.writelines(f"{a} {b}\n" for a, b in self.merges)
    return vocab_path, merges_path


def write_hf_vocab(out_dir: str, bpe_path: str = DEFAULT_BPE_PATH) -> tuple[str, str]:
  """``vocab.json`` + ``merges.txt`` for transformers' ``CLIPTokenizer(vocab, merges)``."""
  return ClipTokenizer(bpe_path).write_hf_files(out_dir)
