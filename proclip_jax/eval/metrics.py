"""Retrieval and zero-shot classification metrics, as the paper reports them.

Top level: NumPy in, NumPy/float out.

* ``retrieval_metrics``: image→text R@k (a hit if ANY of the image's captions is in the top k)
  and text→image R@k (per caption), in percent. Several captions per image (Flickr30k, COCO,
  any count per image) or one (the long-text sets) through ``txt_to_img``.
* ``zero_shot_classifier``: class embedding = normalize(mean over templates of the
  normalized template embeddings).
* ``classification_metrics``: top-k accuracy in percent of ``logit_scale·img·Wᵀ``.
* ``per_language``: per-language results and their mean (XM3600).

Tie rule (deterministic, documented): gallery items are ordered by descending score and,
among equal scores, by ascending index, i.e. the order of a stable descending sort
(``np.argsort(-scores, kind="stable")``) and of ``jax.lax.top_k`` (lower index first on
ties). The rank of a positive is the number of valid gallery items before it in that order;
a query hits at k when its best-ranked positive has rank < k. Argsort/top-k based reference
evaluations (open_clip's, LLM2CLIP's, clip_benchmark's) agree with it whenever their sort
puts the lower index first; exact ties only arise from duplicated embeddings.

The core, ``ranks``, is a jitted JAX function over global arrays: queries are processed in
chunks of ``chunk`` rows (``lax.map``), so only a ``[chunk, G]`` score block exists at a
time (25k captions × 5k images never materialise at once), and with ``mesh`` the rows of
each chunk are split over the mesh's batch axes (the gallery may be sharded too; XLA
partitions the counts). Padding rows are excluded through the ``*_valid`` masks, which is
how a sharded or multi-host evaluation pads to a multiple of the device count.
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from proclip_jax.errors import ProclipError


# ---------------------------------------------------------------------------- JAX core

def _chunk_ranks(q, q_group, gallery, g_group, g_valid):
  """Rank of the best-ranked positive of each query: [c, E] queries -> int32 [c].

  Positives of a query are the valid gallery items whose group equals the query's group.
  A query without any positive gets rank G (a miss at every k).
  """
  n_gallery = gallery.shape[0]
  scores = lax.dot_general(q, gallery, (((1,), (1,)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  scores = jnp.where(g_valid[None, :], scores, -jnp.inf)
  pos = (q_group[:, None] == g_group[None, :]) & g_valid[None, :]
  best = jnp.max(jnp.where(pos, scores, -jnp.inf), axis=1, keepdims=True)
  idx = jnp.arange(n_gallery, dtype=jnp.int32)[None, :]
  best_idx = jnp.min(jnp.where(pos & (scores == best), idx, n_gallery), axis=1, keepdims=True)
  before = (scores > best) | ((scores == best) & (idx < best_idx))
  rank = jnp.sum(before & g_valid[None, :], axis=1, dtype=jnp.int32)
  return jnp.where(jnp.any(pos, axis=1), rank, n_gallery)


@functools.partial(jax.jit, static_argnames=("chunk", "sharding"))
def ranks(queries, query_group, gallery, gallery_group, gallery_valid, *, chunk: int = 512,
          sharding: NamedSharding | None = None):
  """Rank of each query's best positive in the gallery (the tie rule of the module doc).

  Args:
    queries: ``[Q, E]`` float embeddings.
    query_group: int ``[Q]``; a gallery item is a positive of a query when their groups match.
    gallery: ``[G, E]`` float embeddings.
    gallery_group: int ``[G]``.
    gallery_valid: bool ``[G]``; invalid (padding) items are never counted or matched.
    chunk: queries per step; only ``[chunk, G]`` scores exist at a time.
    sharding: optional ``NamedSharding`` for the ``[n_chunks, chunk, E]`` query blocks,
      e.g. ``NamedSharding(mesh, P(None, ("data",), None))``; ``chunk`` must then divide
      evenly over those axes.

  Returns:
    int32 ``[Q]``: 0 means the best positive is first; ``G`` means the query has none.
  """
  n_q, dim = queries.shape
  pad = (-n_q) % chunk
  q = jnp.pad(queries.astype(jnp.float32), ((0, pad), (0, 0))).reshape(-1, chunk, dim)
  qg = jnp.pad(query_group.astype(jnp.int32), (0, pad), constant_values=-1).reshape(-1, chunk)
  if sharding is not None:
    q = lax.with_sharding_constraint(q, sharding)
  g = gallery.astype(jnp.float32)
  gg, gv = gallery_group.astype(jnp.int32), gallery_valid.astype(bool)
  out = lax.map(lambda xs: _chunk_ranks(xs[0], xs[1], g, gg, gv), (q, qg))
  return out.reshape(-1)[:n_q]


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def top_k(queries, gallery, gallery_valid=None, *, k: int, chunk: int = 512):
  """Scores and indices of the ``k`` best gallery items per query (lower index first on ties).

  Jitted over global arrays, chunked over queries like ``ranks``; returns
  (float32 ``[Q, k]``, int32 ``[Q, k]``).
  """
  n_q, dim = queries.shape
  pad = (-n_q) % chunk
  q = jnp.pad(queries.astype(jnp.float32), ((0, pad), (0, 0))).reshape(-1, chunk, dim)
  g = gallery.astype(jnp.float32)
  valid = jnp.ones(g.shape[0], bool) if gallery_valid is None else gallery_valid.astype(bool)

  def one(x):
    s = lax.dot_general(x, g, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
    return lax.top_k(jnp.where(valid[None, :], s, -jnp.inf), k)

  scores, idx = lax.map(one, q)
  return scores.reshape(-1, k)[:n_q], idx.reshape(-1, k)[:n_q]


# ------------------------------------------------------------------- NumPy top level

def _as_emb(x, what):
  x = np.asarray(x)
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
    raise ProclipError(f"{what}: expected a float [N, E] embedding array, got dtype {x.dtype} "
                       f"shape {x.shape}")
  return x.astype(np.float32)


def _as_mask(valid, n, what):
  if valid is None:
    return np.ones(n, bool)
  valid = np.asarray(valid, bool)
  if valid.shape != (n,):
    raise ProclipError(f"{what}: the valid mask has shape {valid.shape}, expected ({n},)")
  return valid


def _sharding(mesh, axis_names, chunk):
  """(NamedSharding for the query blocks, chunk rounded up to the device count)."""
  if mesh is None:
    return None, chunk
  axes = tuple(axis_names) if axis_names is not None else tuple(
      a for a in ("data", "fsdp") if a in mesh.axis_names)
  if not axes or any(a not in mesh.axis_names for a in axes):
    raise ProclipError(f"metrics: axis_names {axis_names} do not name batch axes of the mesh "
                       f"{tuple(mesh.axis_names)}; pass axis_names=('data', ...)")
  n = int(np.prod([mesh.shape[a] for a in axes]))
  return NamedSharding(mesh, P(None, axes, None)), -(-chunk // n) * n


def _recall(rank, valid, ks, prefix):
  return {f"{prefix}_R@{k}": float(100.0 * np.mean(rank[valid] < k)) for k in ks}


def retrieval_metrics(img_emb, txt_emb, txt_to_img, ks: Sequence[int] = (1, 5, 10), *,
                      chunk: int = 512, img_valid=None, txt_valid=None, mesh=None,
                      axis_names: Sequence[str] | None = None) -> dict:
  """Image↔text retrieval recall in percent.

  Args:
    img_emb: ``[N, E]`` image embeddings (normalised; only the order of dot products matters).
    txt_emb: ``[T, E]`` caption embeddings.
    txt_to_img: int ``[T]``: the image each caption describes (any number per image).
    ks: the k of R@k.
    chunk: queries per block (memory ``chunk × max(N, T)`` scores).
    img_valid, txt_valid: optional bool masks; False rows are padding, excluded both as
      queries and as gallery items (a padded caption's ``txt_to_img`` is ignored).
    mesh, axis_names: evaluate on a mesh, splitting each query block over these axes.

  Returns:
    ``{"i2t_R@k": ..., "t2i_R@k": ...}`` floats in percent. Image→text: a hit if any of the
    image's captions ranks < k; text→image: per caption.
  """
  img, txt = _as_emb(img_emb, "retrieval images"), _as_emb(txt_emb, "retrieval texts")
  if img.shape[1] != txt.shape[1]:
    raise ProclipError(f"retrieval_metrics: image dim {img.shape[1]} != text dim {txt.shape[1]}")
  n_img, n_txt = len(img), len(txt)
  img_valid = _as_mask(img_valid, n_img, "retrieval images")
  txt_valid = _as_mask(txt_valid, n_txt, "retrieval texts")
  t2i = np.asarray(txt_to_img)
  if t2i.shape != (n_txt,) or not np.issubdtype(t2i.dtype, np.integer):
    raise ProclipError(f"retrieval_metrics: txt_to_img must be an int array of shape "
                       f"({n_txt},), got {t2i.dtype} {t2i.shape}")
  t2i = np.where(txt_valid, t2i, -1).astype(np.int32)
  ok = ~txt_valid | ((t2i >= 0) & (t2i < n_img) & img_valid[np.clip(t2i, 0, n_img - 1)])
  if not ok.all():
    first = int(np.flatnonzero(~ok)[0])
    raise ProclipError(f"retrieval_metrics: caption {first} points to image {t2i[first]}, which is "
                       f"outside [0, {n_img}) or marked False in img_valid; fix txt_to_img")
  has_caption = np.zeros(n_img, bool)
  has_caption[t2i[txt_valid]] = True
  orphans = np.flatnonzero(img_valid & ~has_caption)
  if orphans.size:
    raise ProclipError(f"retrieval_metrics: {orphans.size} valid images have no caption (first "
                       f"{int(orphans[0])}); drop them or mark them False in img_valid")
  sharding, chunk = _sharding(mesh, axis_names, chunk)
  img_ids = np.arange(n_img, dtype=np.int32)
  rank_i2t = np.asarray(ranks(img, img_ids, txt, t2i, txt_valid, chunk=chunk, sharding=sharding))
  rank_t2i = np.asarray(ranks(txt, t2i, img, img_ids, img_valid, chunk=chunk, sharding=sharding))
  return {**_recall(rank_i2t, img_valid, ks, "i2t"), **_recall(rank_t2i, txt_valid, ks, "t2i")}


def zero_shot_classifier(class_text_emb) -> np.ndarray:
  """Class embeddings from per-template text embeddings: ``[C, T, E] -> [C, E]`` float32.

  Each template embedding is L2-normalised, the templates are averaged, and the mean is
  L2-normalised again (the OpenAI prompt-ensemble rule).
  """
  x = np.asarray(class_text_emb, np.float64)
  if x.ndim != 3:
    raise ProclipError(f"zero_shot_classifier: expected [classes, templates, dim], got shape "
                       f"{x.shape}")
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  m = x.mean(axis=1)
  return (m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def classification_metrics(img_emb, classifier, labels, ks: Sequence[int] = (1, 5),
                           logit_scale: float = 100.0, *, chunk: int = 512, valid=None,
                           mesh=None, axis_names: Sequence[str] | None = None) -> dict:
  """Zero-shot top-k accuracy in percent: logits = ``logit_scale · img · classifierᵀ``.

  Args:
    img_emb: ``[N, E]`` image embeddings.
    classifier: ``[C, E]`` class embeddings (``zero_shot_classifier``).
    labels: int ``[N]`` in ``[0, C)``.
    ks: the k of top-k (k ≥ C gives 100%).
    logit_scale: positive scale of the logits (the paper's 100); a positive scale does not
      change the ranking, so the scores are ranked unscaled (ties stay exact).
    chunk, valid, mesh, axis_names: as in ``retrieval_metrics`` (``valid`` masks images).

  Returns:
    ``{"top1": ..., "top5": ...}`` (one ``top{k}`` per k) in percent.
  """
  img, cls = _as_emb(img_emb, "classification images"), _as_emb(classifier, "classifier")
  if img.shape[1] != cls.shape[1]:
    raise ProclipError(f"classification_metrics: image dim {img.shape[1]} != classifier dim "
                       f"{cls.shape[1]}")
  if not logit_scale > 0:
    raise ProclipError(f"classification_metrics: logit_scale must be > 0, got {logit_scale}")
  valid = _as_mask(valid, len(img), "classification images")
  labels = np.asarray(labels)
  if labels.shape != (len(img),) or not np.issubdtype(labels.dtype, np.integer):
    raise ProclipError(f"classification_metrics: labels must be int [{len(img)}], got "
                       f"{labels.dtype} {labels.shape}")
  out_of_range = valid & ((labels < 0) | (labels >= len(cls)))
  if out_of_range.any():
    first = int(np.flatnonzero(out_of_range)[0])
    raise ProclipError(f"classification_metrics: label {labels[first]} of image {first} is "
                       f"outside [0, {len(cls)}); the classifier has {len(cls)} classes")
  sharding, chunk = _sharding(mesh, axis_names, chunk)
  cls_ids = np.arange(len(cls), dtype=np.int32)
  rank = np.asarray(ranks(img, np.where(valid, labels, -1), cls,
                          cls_ids, np.ones(len(cls), bool), chunk=chunk, sharding=sharding))
  return {f"top{k}": float(100.0 * np.mean(rank[valid] < k)) for k in ks}


def per_language(results_by_lang: Mapping[str, Mapping[str, float]]) -> dict:
  """Per-language results plus their unweighted mean: ``{lang: {...}, ..., "mean": {...}}``.

  Every language must report the same metric names (e.g. ``i2t_R@1``, ``t2i_R@1``).
  """
  if not results_by_lang:
    raise ProclipError("per_language: no languages given")
  if "mean" in results_by_lang:
    raise ProclipError("per_language: 'mean' is reserved for the average; rename that language")
  names = None
  for lang, res in results_by_lang.items():
    if names is None:
      names, first = set(res), lang
    elif set(res) != names:
      raise ProclipError(f"per_language: language {lang!r} reports {sorted(res)} but "
                         f"{first!r} reports {sorted(names)}; evaluate every language alike")
  out = {lang: dict(res) for lang, res in results_by_lang.items()}
  out["mean"] = {k: float(np.mean([res[k] for res in results_by_lang.values()]))
                 for k in sorted(names)}
  return out
