"""ProCLIP's losses: symmetric InfoNCE (dense, blockwise, sharded) and the distillation terms.

The formulas are those of ``shared/proclip_method.md``:

* ``clip_loss``: ½[CE(s·img·txtᵀ, arange) + CE(s·txt·imgᵀ, arange)], mean over the batch,
  ``s = exp(logit_scale)``, logits and logsumexp in float32.
* ``stage1_distill_loss``: per chunk of ``chunk`` rows,
  ``L_ins = Σ_i ||s_i^short − t_i^short||² + Σ_i ||s_i^raw − t_i^raw||²`` (sums, not means)
  and ``L_struct = Σ_{i<j} SmoothL1_β=1(||s_i − s_j|| − ||t_i − t_j||)`` (short captions);
  the loss is the mean over chunks of ``L_ins + L_struct``.
* ``image_distill_loss``: the same instance + structure terms between the student image
  features and the (EMA) teacher's, per chunk, mean over chunks; without λ.

Chunking: the number of rows must be divisible by ``chunk`` (a chunk larger than the batch
means one chunk of the whole batch). This fixes the loss scale independently of the device
count, which is how the reference's per-GPU sums averaged over GPUs behave.

Memory-efficient InfoNCE. ``clip_loss_blockwise`` computes the dense loss without the B×B
logits: it scans over column blocks of ``txt`` holding one ``[B, block]`` tile at a time; a
running logsumexp gives the image→text direction, and since a tile holds whole columns, the
text→image logsumexp of its columns is exact per tile. A ``custom_vjp`` recomputes the tiles in
the backward pass from the saved O(B) row/column logsumexps: with ``L_ij = s·img_i·txt_j``,
``P^r = softmax_j(L)``, ``P^c = softmax_i(L)`` and upstream cotangent ``g``,

    dL/dL_ij = g/(2B)·(P^r_ij + P^c_ij) − g/B·δ_ij      =: G_ij
    d img = s·G·txt,  d txt = s·Gᵀ·img,  d logit_scale = Σ_ij G_ij·L_ij.

Plain autodiff through the scan would store every tile (B×B again), hence the custom rule.
``clip_loss_sharded`` does the same across devices with ``jax.shard_map``: each device holds
``b = B/n`` rows of both towers; the text rows travel round a ring (``lax.ppermute``), each
visit adding its image rows' contributions, and each travelling chunk carries the running
column logsumexp (forward) or the column gradient (backward) of its own rows, which returns
home after a full turn. Per-device memory is O(b·block) for tiles plus O(b·E) buffers; each
tile's matmul is computed once per pass (no duplicated work for the two directions).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from proclip_jax.errors import ProclipError

_F32 = jnp.float32


# ---------------------------------------------------------------------------- helpers

def _check_pair(a, b, what: str):
  if a.ndim != 2 or a.shape != b.shape:
    raise ProclipError(
        f"{what}: expected two [B, E] arrays of the same shape, got {tuple(a.shape)} and "
        f"{tuple(b.shape)}; pass the L2-normalised features of the same batch")


def _resolve_chunk(rows: int, chunk: int, what: str) -> int:
  """The chunk size actually used: ``chunk`` if it divides ``rows``; ``rows`` if larger."""
  chunk = int(chunk)
  if chunk <= 0:
    raise ProclipError(f"{what}: chunk must be a positive number of rows, got {chunk}")
  if chunk >= rows:
    return rows
  if rows % chunk:
    raise ProclipError(
        f"{what}: the number of rows {rows} is not divisible by the chunk size {chunk}; choose "
        f"a batch size that is a multiple of {chunk} or a chunk size that divides {rows}")
  return chunk


def _matmul_t(a, b):
  """``a @ b.T`` with float32 accumulation."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _safe_sqrt(x):
  """sqrt with a finite gradient at 0 (double-where: the unused branch never sees 0)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _pairwise_dist(x):
  """Euclidean distances between the rows of ``x`` [c, E] -> [c, c], zero-distance safe.

  Uses the Gram matrix (the squared norms are its diagonal, so identical rows give exactly 0
  whatever the matmul's rounding) and a guarded sqrt.
  """
  gram = _matmul_t(x, x)
  sq = jnp.diagonal(gram)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
  return _safe_sqrt(d2)


def _smooth_l1(x, beta: float = 1.0):
  ax = jnp.abs(x)
  return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def _instance(student, teacher):
  """Σ_i ||s_i − t_i||² per chunk: [n, c, E] -> [n]."""
  return jnp.sum(jnp.square(student - teacher), axis=(1, 2))


def _structure(student, teacher):
  """Σ_{i<j} SmoothL1(||s_i − s_j|| − ||t_i − t_j||) per chunk: [n, c, E] -> [n]."""
  c = student.shape[1]
  upper = jnp.triu(jnp.ones((c, c), bool), k=1)
  ds = jax.vmap(_pairwise_dist)(student)
  dt = jax.vmap(_pairwise_dist)(teacher)
  return jnp.sum(jnp.where(upper, _smooth_l1(ds - dt), 0.0), axis=(1, 2))


def _chunked(x, chunk):
  return x.astype(_F32).reshape(x.shape[0] // chunk, chunk, x.shape[1])


# ---------------------------------------------------------------------- distillation

def stage1_distill_terms(s_short, t_short, s_raw, t_raw, chunk: int) -> dict:
  """Stage-1 distillation terms, each the mean over chunks of its per-chunk sum.

  Args:
    s_short, t_short: student (adapter) and teacher (CLIP text) features of the short
      captions, unit-norm ``[B, E]``.
    s_raw, t_raw: the same for the second caption field (raw alt-text by default).
    chunk: rows per chunk (``distill_chunk``); ``B`` must be divisible by it; a chunk larger
      than ``B`` means one chunk of ``B`` rows.

  Returns:
    dict of float32 scalars: ``loss`` (= ``ins + struct``), ``ins`` (= ``ins_short +
    ins_raw``), ``ins_short``, ``ins_raw``, ``struct`` (structure term over the short batch).
  """
  _check_pair(s_short, t_short, "stage1_distill_loss (short)")
  _check_pair(s_raw, t_raw, "stage1_distill_loss (raw)")
  _check_pair(s_short, s_raw, "stage1_distill_loss (short vs raw)")
  c = _resolve_chunk(s_short.shape[0], chunk, "stage1_distill_loss")
  ss, ts, sr, tr = (_chunked(x, c) for x in (s_short, t_short, s_raw, t_raw))
  ins_short = jnp.mean(_instance(ss, ts))
  ins_raw = jnp.mean(_instance(sr, tr))
  struct = jnp.mean(_structure(ss, ts))
  ins = ins_short + ins_raw
  return {"loss": ins + struct, "ins": ins, "ins_short": ins_short, "ins_raw": ins_raw,
          "struct": struct}


def stage1_distill_loss(s_short, t_short, s_raw, t_raw, chunk: int):
  """Stage-1 loss ``L_ins + L_struct`` averaged over chunks (see ``stage1_distill_terms``)."""
  return stage1_distill_terms(s_short, t_short, s_raw, t_raw, chunk)["loss"]


def image_distill_terms(img, teacher_img, chunk: int) -> dict:
  """Stage-2 self-distillation terms (without λ), each the mean over chunks.

  Args:
    img: student image features, unit-norm ``[B, E]``.
    teacher_img: the teacher's (EMA tower) features of the same images; treat as constant
      (wrap in ``lax.stop_gradient`` or leave it outside the differentiated arguments).
    chunk: rows per chunk, as in ``stage1_distill_terms``.

  Returns:
    dict of float32 scalars ``loss`` (= ``ins + struct``), ``ins``, ``struct``.
  """
  _check_pair(img, teacher_img, "image_distill_loss")
  c = _resolve_chunk(img.shape[0], chunk, "image_distill_loss")
  s, t = _chunked(img, c), _chunked(teacher_img, c)
  ins = jnp.mean(_instance(s, t))
  struct = jnp.mean(_structure(s, t))
  return {"loss": ins + struct, "ins": ins, "struct": struct}


def image_distill_loss(img, teacher_img, chunk: int):
  """Stage-2 image self-distillation ``L_ins_img + L_struct_img`` averaged over chunks."""
  return image_distill_terms(img, teacher_img, chunk)["loss"]


# ---------------------------------------------------------------------- dense InfoNCE

def clip_loss(img, txt, logit_scale):
  """Symmetric InfoNCE over the batch, with the B×B logits materialised.

  Args:
    img, txt: unit-norm ``[B, E]`` features; row i of each is a positive pair.
    logit_scale: scalar log of the temperature scale (``s = exp(logit_scale)``).

  Returns:
    float32 scalar ½[CE(s·img·txtᵀ) + CE(s·txt·imgᵀ)], mean over the batch.
  """
  _check_pair(img, txt, "clip_loss")
  scale = jnp.exp(jnp.asarray(logit_scale, _F32))
  logits = scale * _matmul_t(img.astype(_F32), txt.astype(_F32))
  diag = jnp.diagonal(logits)
  row = jax.nn.logsumexp(logits, axis=1)
  col = jax.nn.logsumexp(logits, axis=0)
  return jnp.mean(0.5 * (row - diag) + 0.5 * (col - diag))


# ----------------------------------------------------------------- blockwise InfoNCE
# The tile kernels, shared by the single-device and the ring implementations: ``img`` holds
# R rows, ``txt`` C columns (C a multiple of ``block``); one [R, block] tile at a time.

def _tile_lse(img, txt, scale, block, axes=()):
  """Row logsumexp over these columns [R] and exact column logsumexp over these rows [C].

  ``axes``: inside ``shard_map``, the manual axes the inputs vary over (the scan carry must
  be typed as varying like the body's output); empty outside.
  """
  rows, cols = img.shape[0], txt.shape[0]
  blocks = txt.reshape(cols // block, block, txt.shape[1])

  def body(row_lse, t):
    logits = scale * _matmul_t(img, t)
    row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1))
    return row_lse, jax.nn.logsumexp(logits, axis=0)

  init = _varying(jnp.full((rows,), -jnp.inf, _F32), axes)
  row_lse, col_lse = lax.scan(body, init, blocks)
  return row_lse, col_lse.reshape(cols)


def _tile_grads(img, txt, scale, row_lse, col_lse, coef, block, axes=()):
  """Σ over tiles of G = coef·(P^r + P^c): returns (G·txt [R,E], Gᵀ·img [C,E], Σ G∘L)."""
  cols, dim = txt.shape
  blocks = txt.reshape(cols // block, block, dim)
  col_blocks = col_lse.reshape(cols // block, block)

  def body(carry, xs):
    d_img, d_ls = carry
    t, c_lse = xs
    logits = scale * _matmul_t(img, t)
    g = coef * (jnp.exp(logits - row_lse[:, None]) + jnp.exp(logits - c_lse[None, :]))
    d_img = d_img + jnp.dot(g, t, preferred_element_type=_F32)
    d_t = lax.dot_general(g, img, (((0,), (0,)), ((), ())), preferred_element_type=_F32)
    return (d_img, d_ls + jnp.sum(g * logits)), d_t

  init = (_varying(jnp.zeros(img.shape, _F32), axes), _varying(jnp.zeros((), _F32), axes))
  (d_img, d_ls), d_txt = lax.scan(body, init, (blocks, col_blocks))
  return d_img, d_txt.reshape(cols, dim), d_ls


def _varying(x, axes):
  """Mark a fresh constant as varying over the manual ``axes`` (no-op when empty)."""
  return lax.pcast(x, axes, to="varying") if axes else x


def _check_block(rows: int, block: int, what: str) -> int:
  return _resolve_chunk(rows, block, what)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise(img, txt, logit_scale, block):
  return _blockwise_fwd(img, txt, logit_scale, block)[0]


def _blockwise_fwd(img, txt, logit_scale, block):
  x, y = img.astype(_F32), txt.astype(_F32)
  scale = jnp.exp(logit_scale.astype(_F32))
  row_lse, col_lse = _tile_lse(x, y, scale, block)
  diag = scale * jnp.sum(x * y, axis=1)
  loss = jnp.mean(0.5 * (row_lse - diag) + 0.5 * (col_lse - diag))
  return loss, (img, txt, logit_scale, row_lse, col_lse)


def _blockwise_bwd(block, res, g):
  img, txt, logit_scale, row_lse, col_lse = res
  x, y = img.astype(_F32), txt.astype(_F32)
  scale = jnp.exp(logit_scale.astype(_F32))
  n = x.shape[0]
  d_img, d_txt, d_ls = _tile_grads(x, y, scale, row_lse, col_lse, 0.5 * g / n, block)
  # The −g/B·δ_ij part of G (the diagonal targets).
  d_img = scale * (d_img - (g / n) * y)
  d_txt = scale * (d_txt - (g / n) * x)
  d_ls = d_ls - (g / n) * scale * jnp.sum(x * y)
  return (d_img.astype(img.dtype), d_txt.astype(txt.dtype),
          d_ls.astype(logit_scale.dtype))


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def clip_loss_blockwise(img, txt, logit_scale, block: int = 1024):
  """``clip_loss`` computed over ``[B, block]`` tiles, forward and backward.

  Same value and gradients as ``clip_loss`` (to float32 rounding) with O(B·block) temporary
  memory instead of O(B²). ``B`` must be divisible by ``block``; a block larger than ``B``
  means one block of ``B``.
  """
  _check_pair(img, txt, "clip_loss_blockwise")
  block = _check_block(img.shape[0], block, "clip_loss_blockwise (block)")
  return _blockwise(img, txt, jnp.asarray(logit_scale, _F32), block)


# ------------------------------------------------------------------- sharded InfoNCE

def _ring_perm(n):
  return [(i, (i + 1) % n) for i in range(n)]


def _ring_fwd_local(img, txt, scale, *, axes, n, block):
  """Per device: (row_lse of the local image rows, col_lse of the local text rows)."""
  perm = _ring_perm(n)
  row_lse, col_lse = _tile_lse(img, txt, scale, block, axes)

  def step(_, carry):
    row_lse, chunk, chunk_col = carry
    chunk = lax.ppermute(chunk, axes, perm)
    chunk_col = lax.ppermute(chunk_col, axes, perm)
    r, c = _tile_lse(img, chunk, scale, block, axes)
    return jnp.logaddexp(row_lse, r), chunk, jnp.logaddexp(chunk_col, c)

  row_lse, _, col_lse = lax.fori_loop(0, n - 1, step, (row_lse, txt, col_lse))
  # After n−1 hops the travelling column statistics sit one device before home.
  col_lse = lax.ppermute(col_lse, axes, perm)
  return row_lse, col_lse


def _ring_bwd_local(img, txt, scale, row_lse, col_lse, coef, *, axes, n, block):
  """Per device: (Σ G·txt for local image rows, Σ Gᵀ·img for local text rows, Σ G∘L)."""
  perm = _ring_perm(n)
  d_img, d_txt, d_ls = _tile_grads(img, txt, scale, row_lse, col_lse, coef, block, axes)

  def step(_, carry):
    d_img, d_ls, chunk, chunk_col, chunk_grad = carry
    chunk, chunk_col, chunk_grad = (lax.ppermute(v, axes, perm)
                                    for v in (chunk, chunk_col, chunk_grad))
    a, b, c = _tile_grads(img, chunk, scale, row_lse, chunk_col, coef, block, axes)
    return d_img + a, d_ls + c, chunk, chunk_col, chunk_grad + b

  d_img, d_ls, _, _, d_txt = lax.fori_loop(0, n - 1, step, (d_img, d_ls, txt, col_lse, d_txt))
  d_txt = lax.ppermute(d_txt, axes, perm)
  return d_img, d_txt, d_ls


def _mesh_size(mesh, axes):
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  return size


@functools.lru_cache(maxsize=32)
def _make_sharded(mesh, axes: tuple, block: int, n: int, batch: int):
  """The custom-vjp sharded loss for one (mesh, axes, block, sizes) configuration."""
  rows = P(axes, None)
  smap = functools.partial(jax.shard_map, mesh=mesh, check_vma=True)

  def fwd_local(img, txt, logit_scale):
    x, y = img.astype(_F32), txt.astype(_F32)
    scale = jnp.exp(logit_scale.astype(_F32))
    row_lse, col_lse = _ring_fwd_local(x, y, scale, axes=axes, n=n, block=block)
    diag = scale * jnp.sum(x * y, axis=1)
    part = jnp.sum(0.5 * (row_lse - diag) + 0.5 * (col_lse - diag))
    return lax.psum(part, axes) / batch, row_lse, col_lse

  fwd_map = smap(fwd_local, in_specs=(rows, rows, P()), out_specs=(P(), P(axes), P(axes)))

  def bwd_local(img, txt, logit_scale, row_lse, col_lse, g):
    x, y = img.astype(_F32), txt.astype(_F32)
    scale = jnp.exp(logit_scale.astype(_F32))
    d_img, d_txt, d_ls = _ring_bwd_local(x, y, scale, row_lse, col_lse, 0.5 * g / batch,
                                         axes=axes, n=n, block=block)
    d_img = scale * (d_img - (g / batch) * y)
    d_txt = scale * (d_txt - (g / batch) * x)
    d_ls = lax.psum(d_ls - (g / batch) * scale * jnp.sum(x * y), axes)
    return d_img.astype(img.dtype), d_txt.astype(txt.dtype), d_ls

  bwd_map = smap(bwd_local, in_specs=(rows, rows, P(), P(axes), P(axes), P()),
                 out_specs=(rows, rows, P()))

  @jax.custom_vjp
  def loss(img, txt, logit_scale):
    return fwd_map(img, txt, logit_scale)[0]

  def loss_fwd(img, txt, logit_scale):
    value, row_lse, col_lse = fwd_map(img, txt, logit_scale)
    return value, (img, txt, logit_scale, row_lse, col_lse)

  def loss_bwd(res, g):
    img, txt, logit_scale, row_lse, col_lse = res
    d_img, d_txt, d_ls = bwd_map(img, txt, logit_scale, row_lse, col_lse,
                                 jnp.asarray(g, _F32))
    return d_img, d_txt, d_ls.astype(logit_scale.dtype)

  loss.defvjp(loss_fwd, loss_bwd)
  return loss


def _default_axes(mesh) -> tuple:
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  if not axes:
    raise ProclipError(
        f"clip_loss_sharded: the mesh has axes {tuple(mesh.axis_names)}, none of them 'data' "
        "or 'fsdp'; pass axis_names=(...) naming the mesh axes the batch is sharded over")
  return axes


def clip_loss_sharded(img, txt, logit_scale, *, mesh=None, axis_names: Sequence[str] | None = None,
                      block: int = 1024):
  """``clip_loss`` over a batch sharded on ``axis_names`` of ``mesh``, ring-exchanged.

  Each device keeps its ``b = B/n`` rows of both towers (``n`` = product of the named axes'
  sizes); the text rows go round the ring in ``n − 1`` hops (``lax.ppermute``) and every
  visit is processed in ``[b, block]`` tiles. The backward pass is a ``custom_vjp`` that runs
  the same ring again, recomputing the tiles, so per-device temporary memory is
  O(b·block + b·E) in both passes. Other mesh axes (e.g. ``tensor``) see the batch replicated.

  Args:
    img, txt: ``[B, E]`` global arrays (any input sharding; resharded to rows on the axes).
    logit_scale: scalar log-scale.
    mesh: a ``jax.sharding.Mesh``; None takes the one set with ``jax.set_mesh``.
    axis_names: mesh axes the batch is split over; None takes those of ``data``/``fsdp``
      present in the mesh.
    block: columns per tile; ``B/n`` must be divisible by it (larger means ``B/n``).
  """
  _check_pair(img, txt, "clip_loss_sharded")
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
      raise ProclipError("clip_loss_sharded: no mesh given and none set with jax.set_mesh; "
                         "pass mesh=... or call it under `with jax.set_mesh(mesh):`")
  axes = _default_axes(mesh) if axis_names is None else tuple(axis_names)
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ProclipError(f"clip_loss_sharded: axis_names {missing} are not axes of the mesh "
                       f"{tuple(mesh.axis_names)}")
  n = _mesh_size(mesh, axes)
  batch = img.shape[0]
  if batch % n:
    raise ProclipError(f"clip_loss_sharded: the batch {batch} is not divisible by the {n} "
                       f"devices of mesh axes {axes}; use a batch that is a multiple of {n}")
  block = _check_block(batch // n, block, "clip_loss_sharded (block per device)")
  fn = _make_sharded(mesh, axes, block, n, batch)
  return fn(img, txt, jnp.asarray(logit_scale, _F32))


# ------------------------------------------------------------------------- dispatcher

IMPLS = ("dense", "blockwise", "sharded")


def contrastive_loss(img, txt, logit_scale, impl: str = "dense", *, block: int = 1024,
                     mesh=None, axis_names: Sequence[str] | None = None):
  """Symmetric InfoNCE by the implementation a config names.

  ``impl``: ``dense`` (``clip_loss``; B×B logits, XLA partitions them under a mesh),
  ``blockwise`` (``clip_loss_blockwise``; one device's view, O(B·block)), or ``sharded``
  (``clip_loss_sharded``; ring over the mesh's batch axes, O(B/n·block) per device).
  """
  if impl == "dense":
    return clip_loss(img, txt, logit_scale)
  if impl == "blockwise":
    return clip_loss_blockwise(img, txt, logit_scale, block)
  if impl == "sharded":
    return clip_loss_sharded(img, txt, logit_scale, mesh=mesh, axis_names=axis_names,
                             block=block)
  raise ProclipError(f"contrastive_loss: impl {impl!r} is not one of {IMPLS}; set the "
                     "config's contrastive loss implementation to one of them")
