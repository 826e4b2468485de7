"""What a run reports: ``metrics.jsonl``, TensorBoard event files and a progress bar.

``metrics.jsonl`` holds one JSON object per line (``{"step": N, "loss": ..., ...}``); the
same finite scalars go to ``WORKDIR/tb/`` through tensorboardX. tensorboardX imports
PyTorch when it is installed (it accepts ``torch.Tensor`` values too), which costs a
process a few seconds at the first :class:`MetricWriter`; PyTorch is a pinned dependency
of this project, so that import is accepted rather than hidden.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class MetricWriter:
  """``metrics.jsonl`` + TensorBoard event files in the workdir (process 0 only)."""

  def __init__(self, workdir: epath.Path, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._path = workdir / "metrics.jsonl"
    if enabled:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.fspath(workdir / "tb"))
      except ImportError:  # pragma: no cover - tensorboardX is in requirements.txt
        log.warning("tensorboardX is not installed; no TensorBoard files.")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: (float(v) if isinstance(v, (int, float, np.number)) else v)
                for k, v in metrics.items()})
    line = json.dumps(row) + "\n"
    if "://" in os.fspath(self._path):
      # GCS objects cannot be appended to (gcsfs' "a" silently overwrites): rewrite.
      old = self._path.read_text() if self._path.exists() else ""
      self._path.write_text(old + line)
    else:
      with self._path.open("a") as f:
        f.write(line)
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, float) and math.isfinite(v):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def host_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Replicated device scalars -> Python floats (works on every host of a pod)."""
  def one(x):
    if isinstance(x, jax.Array):
      x = x.addressable_data(0)
    return float(np.asarray(x))
  return {k: one(v) for k, v in metrics.items()}


def progress_bar(total: int, initial: int, enabled: bool):
  """A tqdm bar over the steps with an ETA (a silent one when ``enabled`` is False)."""
  return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
              dynamic_ncols=True, smoothing=0.1)
