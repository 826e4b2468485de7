"""Text embedders by name: presets, the tokenizer step, and ``load_embedder``.

A converted embedder folder (``python tools/convert.py SRC OUT``) holds::

    OUT/model.json   {"kind": "embedder", "config": {"family": ..., "model": {...}},
                      "preset": {...EmbedderPreset...}}
    OUT/params/      Orbax float32 parameters (proclip_jax.models.llm / bert trees)
    OUT/tokenizer/   tokenizer.json (+ tokenizer_config.json, special_tokens_map.json, vocab.txt)

``load_embedder(OUT).embed(list_of_str)`` turns strings into pooled float32 embeddings:

1. the preset's template wraps each text (``"{text}"`` marks the caption; ``{task}`` the
   preset's instruction), the whole string is tokenized once with ``tokenizers`` (so merges
   across the template boundary are exactly those of the reference tokenizer);
2. the pooling mask marks tokens whose character span overlaps the caption (plus the
   template's closing part when ``pool_suffix``), e.g. LLM2Vec's "caption + <|eot_id|>";
   for ``mean`` pooling it is every real token; ``last``/``cls`` ignore it;
3. over-long texts are shortened by dropping caption tokens from the end, never template
   tokens, until ``max_length`` fits;
4. rows are padded (left or right, with the preset's pad token) to one of a few bucketed
   lengths so that jit compiles a handful of shapes;
5. a jit-compiled ``embed_tokens(params, ids, attn_mask, pool_mask)`` runs the network.

Presets (see :data:`PRESETS`): ``llm2clip-llama3`` (LLM2CLIP / LLM2Vec Llama-3: bidirectional,
chat template, mean over caption + ``<|eot_id|>``), ``qwen3-embedding`` (causal, last token,
``Instruct: {task}\\nQuery:{text}<|endoftext|>``), ``qwen3-embedding-doc`` (documents:
``{text}<|endoftext|>``), ``minilm`` (BERT, mean pooling, no template), ``llama-mean``
(causal Llama, mean over all tokens), ``bert-cls`` (BERT, first token).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tokenizers import Tokenizer

from proclip_jax.data import paths
from proclip_jax.errors import ProclipError
from proclip_jax.models import bert, llm
from proclip_jax.storage import load_model, publish_folder, start_model_folder, write_model_files

DECODER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
FAMILIES = DECODER_FAMILIES + ("bert",)
POOLINGS = ("mean_text", "mean", "last", "cls")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")


@dataclasses.dataclass(frozen=True)
class EmbedderPreset:
  """How a text becomes an embedding with a given network.

  Attributes:
    name: preset name.
    families: model families the preset fits ("llama", "qwen3", "bert", ...).
    attention: "causal" or "bidirectional" (decoders; BERT is always bidirectional).
    pooling: "mean_text" (mean over the caption's tokens, template excluded), "mean" (all
      real tokens), "last" (last real token), "cls" (first real token).
    template: prompt with ``{text}`` (and optionally ``{task}``); special tokens written out.
    pool_suffix: with "mean_text", also pool the template part after ``{text}``.
    task: the instruction substituted for ``{task}``.
    add_special_tokens: let the tokenizer's post-processor add its tokens (BERT's
      [CLS]/[SEP]); off when the template writes them itself.
    padding_side: "left" or "right".
    pad_token: token used for padding (None: the tokenizer's pad, else eos, else id 0).
    max_length: maximum tokens per text, template included.
    strip: strip whitespace around the text before templating (LLM2Vec does).
    normalize: L2-normalise the pooled vector (sentence-transformers' Normalize module).
  """
  name: str
  families: tuple[str, ...]
  attention: str = "causal"
  pooling: str = "mean"
  template: str = "{text}"
  pool_suffix: bool = False
  task: str = ""
  add_special_tokens: bool = False
  padding_side: str = "right"
  pad_token: str | None = None
  max_length: int = 512
  strip: bool = True
  normalize: bool = False

  def __post_init__(self):
    problems = []
    if self.attention not in ("causal", "bidirectional"):
      problems.append(f"attention={self.attention!r} (causal|bidirectional)")
    if self.pooling not in POOLINGS:
      problems.append(f"pooling={self.pooling!r} ({'|'.join(POOLINGS)})")
    if self.padding_side not in ("left", "right"):
      problems.append(f"padding_side={self.padding_side!r} (left|right)")
    if self.template.count("{text}") != 1:
      problems.append(f"template={self.template!r} must contain '{{text}}' exactly once")
    if not isinstance(self.max_length, int) or self.max_length < 2:
      problems.append(f"max_length={self.max_length!r} (an int >= 2)")
    unknown = sorted(set(self.families) - set(FAMILIES))
    if unknown:
      problems.append(f"families {unknown} (known: {', '.join(FAMILIES)})")
    if problems:
      raise ProclipError(f"Embedder preset {self.name!r} is invalid: " + "; ".join(problems))

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["families"] = list(self.families)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "EmbedderPreset":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ProclipError(f"Embedder preset: unknown fields {unknown}; known: {sorted(names)}.")
    d = dict(d)
    d["families"] = tuple(d.get("families", ()))
    return cls(**d)

  def split_template(self) -> tuple[str, str]:
    """(prefix, suffix) around ``{text}``, with ``{task}`` filled in."""
    prefix, suffix = self.template.split("{text}")
    return prefix.replace("{task}", self.task), suffix.replace("{task}", self.task)


_LLAMA3_CHAT = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"

PRESETS: dict[str, EmbedderPreset] = {p.name: p for p in (
    EmbedderPreset(
        "llm2clip-llama3", ("llama",), attention="bidirectional", pooling="mean_text",
        template=_LLAMA3_CHAT, pool_suffix=True, padding_side="left", pad_token="<|eot_id|>"),
    EmbedderPreset(
        "qwen3-embedding", ("qwen3", "qwen2"), attention="causal", pooling="last",
        template="Instruct: {task}\nQuery:{text}<|endoftext|>",
        task="Given an image caption, retrieve the image it describes",
        padding_side="left", pad_token="<|endoftext|>"),
    EmbedderPreset(
        "qwen3-embedding-doc", ("qwen3", "qwen2"), attention="causal", pooling="last",
        template="{text}<|endoftext|>", padding_side="left", pad_token="<|endoftext|>"),
    EmbedderPreset(
        "minilm", ("bert",), attention="bidirectional", pooling="mean", add_special_tokens=True,
        padding_side="right", max_length=256),
    EmbedderPreset(
        "bert-cls", ("bert",), attention="bidirectional", pooling="cls", add_special_tokens=True,
        padding_side="right"),
    EmbedderPreset(
        "llama-mean", ("llama", "mistral", "qwen2", "qwen3"), attention="causal", pooling="mean",
        add_special_tokens=True, padding_side="left"),
)}

DEFAULT_PRESET = {"llama": "llm2clip-llama3", "mistral": "llama-mean", "qwen2": "qwen3-embedding",
                  "qwen3": "qwen3-embedding", "bert": "minilm"}


def get_preset(preset: str | Mapping | EmbedderPreset) -> EmbedderPreset:
  """A preset by name, from a dict, or as given."""
  if isinstance(preset, EmbedderPreset):
    return preset
  if isinstance(preset, Mapping):
    return EmbedderPreset.from_dict(preset)
  if preset not in PRESETS:
    raise ProclipError(f"Unknown embedder preset {preset!r}; choose one of "
                       f"{', '.join(sorted(PRESETS))}.")
  return PRESETS[preset]


# ------------------------------------------------------------------------- tokenizer step

def bucket_lengths(max_length: int) -> tuple[int, ...]:
  """Padded lengths used: 16, 32, 64, ... up to and including ``max_length``."""
  out, n = [], 16
  while n < max_length:
    out.append(n)
    n *= 2
  return tuple(out) + (max_length,)


def _read_json_if(path: str) -> dict:
  if not epath.Path(path).exists():
    return {}
  try:
    return json.loads(epath.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise ProclipError(f"{path!r} is not valid JSON: {e}.") from e


def _token_str(v) -> str | None:
  if isinstance(v, Mapping):
    return v.get("content")
  return v


class TextTokenizer:
  """Template + tokenization + masks for one preset, from a tokenizer folder (local or
  ``gs://``)."""

  def __init__(self, folder: str, preset: EmbedderPreset):
    folder = os.fspath(folder)
    path = os.path.join(folder, "tokenizer.json")
    if not epath.Path(path).is_file():
      raise ProclipError(
          f"No tokenizer.json in {folder!r}. The embedder needs its Hugging Face fast tokenizer "
          "file there (copy tokenizer.json, tokenizer_config.json and special_tokens_map.json "
          "from the model folder); nothing is downloaded.")
    try:
      self.tok = Tokenizer.from_str(epath.Path(path).read_text())
    except Exception as e:  # tokenizers raises a generic Exception on a bad file
      raise ProclipError(f"Cannot read tokenizer {path!r}: {e}.") from e
    self.tok.no_truncation()
    self.tok.no_padding()
    self.preset = preset
    self.prefix, self.suffix = preset.split_template()
    cfg = _read_json_if(os.path.join(folder, "tokenizer_config.json"))
    cfg.update({k: v for k, v in _read_json_if(
        os.path.join(folder, "special_tokens_map.json")).items() if k not in cfg})
    pad = preset.pad_token or _token_str(cfg.get("pad_token")) or _token_str(cfg.get("eos_token"))
    pad_id = self.tok.token_to_id(pad) if pad else None
    if pad and pad_id is None:
      raise ProclipError(f"Pad token {pad!r} (preset {preset.name!r}) is not in {path!r}.")
    self.pad_id = int(pad_id) if pad_id is not None else 0
    self.buckets = bucket_lengths(preset.max_length)

  def _encode_one(self, text: str) -> tuple[list[int], list[int]]:
    """ids and pooling mask of one text (no padding), shortened to max_length."""
    p = self.preset
    if not isinstance(text, str):
      raise ProclipError(f"Texts must be strings; got {type(text).__name__}: {text!r:.80}.")
    if p.strip:
      text = text.strip()
    for _ in range(8):
      full = self.prefix + text + self.suffix
      enc = self.tok.encode(full, add_special_tokens=p.add_special_tokens)
      start = len(self.prefix)
      text_end = start + len(text)
      pool_end = len(full) if p.pool_suffix else text_end
      spans = enc.offsets
      special = enc.special_tokens_mask
      # A token belongs to the caption if its character span overlaps it; tokens added by
      # the post-processor (special mask 1, empty span) never do.
      pool = [int(not sp and a < b and b > start and a < pool_end)
              for (a, b), sp in zip(spans, special)]
      ids = list(enc.ids)
      over = len(ids) - p.max_length
      if over <= 0:
        if p.pooling == "mean":
          pool = [1] * len(ids)
        return ids, pool
      in_text = [i for i, (a, b) in enumerate(spans)
                 if not special[i] and b > start and a < text_end and b > a]
      if len(in_text) <= over:
        if text:
          text = ""
          continue
        raise ProclipError(
            f"The template of preset {p.name!r} alone is {len(ids)} tokens, more than "
            f"max_length={p.max_length}; raise max_length.")
      cut = spans[in_text[-over]][0]
      text = text[:max(cut - start, 0)]
    raise ProclipError(f"Could not shorten a text to max_length={p.max_length} tokens.")

  def __call__(self, texts: Sequence[str], length: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns int32 ``ids``, ``attn_mask``, ``pool_mask`` of shape [N, bucketed length]."""
    if isinstance(texts, str):
      raise ProclipError("Pass a list of strings, not a single string.")
    rows = [self._encode_one(t) for t in texts]
    longest = max([len(r[0]) for r in rows] + [1])
    if length is None:
      length = next(b for b in self.buckets if b >= longest)
    elif length < longest:
      raise ProclipError(f"length={length} is shorter than the longest text ({longest} tokens).")
    n = len(rows)
    ids = np.full((n, length), self.pad_id, np.int32)
    attn = np.zeros((n, length), np.int32)
    pool = np.zeros((n, length), np.int32)
    for i, (r, pm) in enumerate(rows):
      sl = slice(length - len(r), length) if self.preset.padding_side == "left" else slice(0, len(r))
      ids[i, sl] = r
      attn[i, sl] = 1
      pool[i, sl] = pm
    return ids, attn, pool


# ------------------------------------------------------------------------- the network

def model_config_from_dict(config: Mapping[str, Any]):
  """``{"family": ..., "model": {...}}`` -> DecoderConfig or BertConfig."""
  family = config.get("family")
  if family == "bert":
    return bert.BertConfig.from_dict(config["model"])
  if family in DECODER_FAMILIES:
    return llm.DecoderConfig.from_dict(config["model"])
  raise ProclipError(f"Unknown embedder family {family!r}; known: {', '.join(FAMILIES)}.")


def build_model(model_config, preset: EmbedderPreset, *, dtype=jnp.float32,
                scan_layers: bool = False):
  """The Flax module for a model config and a preset."""
  pooling = "mean" if preset.pooling == "mean_text" else preset.pooling
  if model_config.family not in preset.families:
    raise ProclipError(
        f"Preset {preset.name!r} is for {', '.join(preset.families)} models, not "
        f"{model_config.family!r}; pick another preset ({', '.join(sorted(PRESETS))}).")
  if isinstance(model_config, bert.BertConfig):
    return bert.BertEmbedder(model_config, pooling=pooling, dtype=dtype)
  return llm.DecoderEmbedder(model_config, causal=preset.attention == "causal", pooling=pooling,
                             dtype=dtype, scan_layers=scan_layers)


def make_embed_tokens(model, normalize: bool = False):
  """A pure ``embed_tokens(params, ids, attn_mask, pool_mask) -> [B, D] float32``."""
  def embed_tokens(params, ids, attn_mask, pool_mask):
    out = model.apply({"params": params}, ids, attn_mask, pool_mask).astype(jnp.float32)
    if normalize:
      out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out
  return embed_tokens


class Embedder:
  """A loaded text embedder: ``.embed(list[str]) -> float32 [N, dim]``.

  Attributes: ``preset``, ``config`` (model config dataclass), ``params``, ``dim``,
  ``tokenizer`` (:class:`TextTokenizer`), ``model`` (Flax module) and ``embed_tokens``, the
  pure function ``(params, ids, attn_mask, pool_mask) -> [B, dim]`` (not jitted; wrap it in
  ``jax.jit`` with shardings for a sharded precompute).
  """

  def __init__(self, config, preset: EmbedderPreset, params, tokenizer: TextTokenizer, *,
               dtype=jnp.float32, scan_layers: bool = False):
    self.config = config
    self.preset = preset
    self.params = params
    self.tokenizer = tokenizer
    self.dim = config.hidden_size
    self.model = build_model(config, preset, dtype=dtype, scan_layers=scan_layers)
    self.embed_tokens = make_embed_tokens(self.model, preset.normalize)
    self._jitted = jax.jit(self.embed_tokens)

  def embed(self, texts: Sequence[str], batch_size: int = 32, *,
            normalize: bool = False) -> np.ndarray:
    """Pooled embeddings of ``texts`` as float32 numpy [N, dim].

    ``normalize``: each row divided by its L2 norm (unit vectors, for cosine similarity);
    by default the features are as the preset pools them (what the caches hold).
    """
    if isinstance(texts, str):
      raise ProclipError("Embedder.embed takes a list of strings, not a single string.")
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ProclipError(f"batch_size must be a positive int, got {batch_size!r}.")
    texts = list(texts)
    out = np.zeros((len(texts), self.dim), np.float32)
    for s in range(0, len(texts), batch_size):
      chunk = texts[s:s + batch_size]
      ids, attn, pool = self.tokenizer(chunk)
      n = len(chunk)
      # Pad the batch to a compiled shape (batch_size, or a power of two for a small call);
      # dummy rows see one token.
      rows = batch_size if len(texts) > batch_size else min(batch_size, 1 << (n - 1).bit_length())
      if rows > n:
        extra = rows - n
        ids = np.concatenate([ids, np.full((extra, ids.shape[1]), self.tokenizer.pad_id,
                                           np.int32)])
        dummy = np.zeros((extra, ids.shape[1]), np.int32)
        dummy[:, -1 if self.preset.padding_side == "left" else 0] = 1
        attn = np.concatenate([attn, dummy])
        pool = np.concatenate([pool, dummy])
      out[s:s + n] = np.asarray(self._jitted(self.params, ids, attn, pool))[:n]
    if normalize:
      out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def cast_kernels(params, dtype):
  """``params`` with every matmul kernel (a leaf named ``kernel``) in ``dtype``, the rest as is.

  The products cast their kernels to the compute dtype on every call (``Proj``); a frozen
  model does it once instead. The result is bit-identical (the same round-to-nearest cast),
  the kernels take half the memory in bfloat16 (an 8B decoder's fit in 16 GB), and the
  forward no longer spends time casting every kernel on every call (docs/performance.md,
  "Precompute"). Embedding tables, biases and norms stay float32.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return params

  def cast(path, x):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    return np.asarray(x).astype(dtype) if name == "kernel" else x
  return jax.tree_util.tree_map_with_path(cast, params)


def load_embedder(path: str, *, dtype: Any = jnp.float32, scan_layers: bool = False,
                  preset: str | Mapping | EmbedderPreset | None = None) -> Embedder:
  """Loads a converted embedder folder (see the module docstring).

  Args:
    path: folder written by :func:`proclip_jax.convert.llm.convert_embedder`.
    dtype: matmul compute dtype (``jnp.bfloat16`` on accelerators); the model is frozen, so
      its kernels are stored in it (:func:`cast_kernels`).
    scan_layers: run decoder layers with ``nn.scan`` (parameters are stacked on load).
    preset: override the stored preset (a name, dict or EmbedderPreset).
  """
  meta, params = load_model(path, kind="embedder")
  config = model_config_from_dict(meta["config"])
  preset = get_preset(preset if preset is not None else meta.get("preset", "minilm"))
  tokenizer = TextTokenizer(os.path.join(os.fspath(path), "tokenizer"), preset)
  params = jax.tree.map(np.asarray, params)
  if scan_layers and isinstance(config, llm.DecoderConfig):
    params = llm.stack_layers(params, config.num_layers)
  params = cast_kernels(params, dtype)
  return Embedder(config, preset, params, tokenizer, dtype=dtype, scan_layers=scan_layers)


def save_embedder(out: str, model_config, preset: EmbedderPreset, params, tokenizer_dir: str,
                  *, overwrite: bool = False, **extra) -> str:
  """Writes a converted embedder folder atomically (parameters, model.json, tokenizer/).

  ``out`` is a local path or a URI (``gs://...``); ``tokenizer_dir`` a local folder.
  """
  tmp = start_model_folder(out, overwrite=overwrite)
  out = paths.absolute(out)
  try:
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
      raise ProclipError(f"No tokenizer.json in {tokenizer_dir!r}; the embedder needs it.")
    config = {"family": model_config.family, "model": model_config.to_dict()}
    write_model_files(tmp, "embedder", config, params, preset=preset.to_dict(),
                      dim=model_config.hidden_size, **extra)
    (tmp / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
      src = os.path.join(tokenizer_dir, name)
      if os.path.isfile(src):
        epath.Path(src).copy(tmp / "tokenizer" / name)
    publish_folder(tmp, out)
  except BaseException:
    tmp.rmtree(missing_ok=True)
    raise
  return out
