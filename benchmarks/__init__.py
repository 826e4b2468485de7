"""Benchmarks behind ``tools/benchmark.py``: one module per name, each with ``add_args`` and ``run``.

Every measurement is printed as one JSON object: median seconds per step after warm-up
(with min and max), items per second and, where it applies, model FLOPs, achieved FLOP/s,
its fraction of the machine's measured matmul peak, peak memory and compile seconds.
"""
import json
import statistics
import time
from typing import Callable

import proclip_jax  # noqa: F401  (its torchvision hook: the PyTorch side imports transformers)

NAMES = {
    "input": "benchmarks.input",
    "loss_memory": "benchmarks.loss_memory",
    "precompute": "benchmarks.precompute",
    "stage1": "benchmarks.stage1",
    "stage2": "benchmarks.stage2",
}


def timeit(fn: Callable[[], object], *, warmup: int = 2, runs: int = 5) -> dict:
  """Median / min / max wall seconds of ``fn()`` after ``warmup`` calls.

  ``fn`` must block until its work is done (``jax.block_until_ready`` for JAX results).
  """
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "runs": runs}


def emit(record: dict) -> None:
  print(json.dumps(record, sort_keys=True), flush=True)
