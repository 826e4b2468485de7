"""One batched encoder: any number of rows through a jitted ``fn(params, x[B, ...]) -> [B, E]``.

Used by the converted CLIP (``models/clip.py``: ``LoadedCLIP.encode_image / encode_text``)
and by the ProCLIP inference API (``inference.py``: image tower and adapter); the CLIP
adapter of the evaluators reuses the CLIP's encoders.

Rows are processed in chunks of a power of two up to ``batch_size`` (so only a few shapes
compile), the last chunk padded by repeating its last row and the padding dropped. With a
mesh the chunk is a multiple of the batch-axis (``data``, ``fsdp``) device count and split
over those axes; the parameters are placed once per mesh (``param_shardings(mesh)``,
default replicated) and the function is compiled once per mesh. Results are host float32
NumPy arrays.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from proclip_jax.errors import ProclipError

BATCH_AXES = ("data", "fsdp")


def batch_axes(mesh) -> tuple:
  """The mesh axes (of size > 1) that a batch of rows is split over."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def check_batch_size(batch_size) -> int:
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
    raise ProclipError(f"batch_size must be a positive int, got {batch_size!r}.")
  return batch_size


def bucket(n: int, batch_size: int) -> int:
  """The chunk size for ``n`` rows: the next power of two, at most ``batch_size``."""
  return min(batch_size, 1 << max(0, (n - 1).bit_length()))


class BatchedEncoder:
  """``fn(params, x[B, ...]) -> [B, E]`` over any number of rows, optionally on a mesh.

  Args:
    fn: a pure function of ``(params, batch)``; it is jitted here.
    params: its parameters (host or device arrays).
    batch_size: the largest chunk per compiled call.
    param_shardings: ``mesh -> sharding tree`` for ``params`` (default: replicated).
  """

  def __init__(self, fn: Callable, params: Any, batch_size: int = 64,
               param_shardings: Callable | None = None):
    self.fn, self.params, self.batch_size = fn, params, check_batch_size(batch_size)
    self._param_shardings = param_shardings
    self._compiled: dict = {}  # mesh (None: default device) -> (jitted fn, x sharding, n_dev, p_sh)
    self._placed: dict = {}    # mesh -> params placed there

  def set_params(self, params: Any) -> None:
    """New parameters (same tree and shapes); compiled functions are kept."""
    self.params = params
    self._placed.clear()

  def _compile(self, mesh):
    if mesh not in self._compiled:
      if mesh is None:
        self._compiled[None] = (jax.jit(self.fn), None, 1, None)
      else:
        p_sh = (self._param_shardings(mesh) if self._param_shardings is not None else
                jax.tree.map(lambda _: NamedSharding(mesh, P()), self.params))
        axes = batch_axes(mesh)
        x_sh = NamedSharding(mesh, P(axes if axes else None))
        fn = jax.jit(self.fn, in_shardings=(p_sh, x_sh), out_shardings=NamedSharding(mesh, P()))
        n_dev = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        self._compiled[mesh] = (fn, x_sh, n_dev, p_sh)
    return self._compiled[mesh]

  def __call__(self, x, mesh=None, batch_size: int | None = None) -> np.ndarray:
    n = len(x)
    if n == 0:
      raise ProclipError("Nothing to encode: the batch is empty.")
    fn, x_sh, n_dev, p_sh = self._compile(mesh)
    if mesh not in self._placed:
      self._placed[mesh] = jax.device_put(self.params, p_sh)
    params = self._placed[mesh]
    chunk = bucket(n, batch_size or self.batch_size)
    chunk = -(-chunk // n_dev) * n_dev
    outs = []
    for s in range(0, n, chunk):
      part = np.asarray(x[s:s + chunk])
      pad = chunk - len(part)
      if pad:
        part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
      if x_sh is not None:
        part = jax.device_put(part, x_sh)
      outs.append(np.asarray(jax.device_get(fn(params, part)))[:chunk - pad])
    return np.concatenate(outs).astype(np.float32)
