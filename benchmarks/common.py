"""Shared benchmark pieces: matmul peak, model FLOP counts, peak memory, compile time, A/B runs.

* :func:`matmul_peak` / :func:`torch_matmul_peak`: the machine's measured matmul rate
  (FLOP/s) for a dtype, from a jitted ``n×n @ n×n`` product (``2·n³`` FLOPs), and torch's
  for reference. The benchmarks report achieved FLOP/s as a fraction of JAX's own rate.
* FLOP counters (matmul FLOPs, ``2·m·n·k`` per product; elementwise work is not counted):
  :func:`vit_forward_flops`, :func:`text_forward_flops`, :func:`adapter_forward_flops`, and
  the step totals :func:`stage1_step_flops` / :func:`stage2_step_flops` with the usual rule
  "a trained part costs 3× its forward (forward + two backward products), a frozen one or
  the EMA teacher 1×".
* :func:`peak_memory`: the device's ``peak_bytes_in_use`` where the runtime reports it
  (GPU, TPU), else the process's maximum resident set size (``getrusage``, the CPU case;
  it never goes down).
* :func:`compile_seconds`: ``jit(...).lower(...).compile()`` timed on its own.
* :func:`alternate`: runs two (or more) callables in turn, A B A B ..., so that a shared,
  noisy machine slows both alike, and :func:`ratio` of their medians.
* :class:`TorchWorker` / :func:`torch_sides`: a benchmark's PyTorch side in a child process
  that the alternation drives one step at a time (the default), or in this process.

``python -m benchmarks.common [--n 2048 --dtypes float32,bfloat16 --no-torch]``
prints one JSON line per (framework, dtype) matmul rate: the AMX investigation in
``docs/performance.md`` reruns it under different ``XLA_FLAGS``.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable, Mapping

import numpy as np

from proclip_jax.flops import (adapter_forward_flops, encoder_layer_flops,  # noqa: F401
                               stage1_step_flops, stage2_step_flops, text_forward_flops,
                               vit_forward_flops)

from benchmarks import emit, timeit
from experiments import hostmem

# ------------------------------------------------------------------------ matmul peak


def matmul_peak(dtype: str = "float32", n: int = 2048, *, warmup: int = 2,
                runs: int = 5, device=None) -> dict:
  """The measured rate of a jitted ``[n, n] @ [n, n]`` product in ``dtype`` (JAX).

  The output is kept in ``dtype`` (float32 accumulation is XLA's choice). Returns a dict
  with ``flops_per_s`` (from the median), ``median_s``, ``min_s``, ``max_s``, ``n``,
  ``dtype``, ``framework`` and ``xla_flags`` (the environment's ``XLA_FLAGS``).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dt = jnp.dtype(dtype)
  rng = np.random.default_rng(0)
  dev = device or jax.devices()[0]
  a = jax.device_put(rng.standard_normal((n, n), np.float32).astype(dt), dev)
  b = jax.device_put(rng.standard_normal((n, n), np.float32).astype(dt), dev)
  f = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.DEFAULT))
  stats = timeit(lambda: f(a, b).block_until_ready(), warmup=warmup, runs=runs)
  return {"framework": "jax", "dtype": str(dt), "n": n,
          "flops_per_s": 2.0 * n ** 3 / stats["median_s"],
          "xla_flags": os.environ.get("XLA_FLAGS", ""), **stats}


TORCH_DEVICE_ENV = "PROCLIP_BENCH_TORCH_DEVICE"


def torch_device() -> str:
  """Where the PyTorch side runs: "cuda" when JAX runs on a GPU and torch sees one, else "cpu".

  Both frameworks then share the accelerator (JAX preallocates only part of it, see
  ``tools/benchmark.py``), so the A/B runs compare like with like. A :class:`TorchWorker`
  is told the answer through ``PROCLIP_BENCH_TORCH_DEVICE``, so that it never starts a JAX
  backend of its own.
  """
  import torch  # pylint: disable=g-import-not-at-top
  wanted = os.environ.get(TORCH_DEVICE_ENV) or _jax_accelerator()
  return "cuda" if wanted == "cuda" and torch.cuda.is_available() else "cpu"


def _jax_accelerator() -> str:
  """"cuda" when JAX's default backend is a GPU, else "cpu"."""
  import jax  # pylint: disable=g-import-not-at-top
  return "cuda" if jax.default_backend() == "gpu" else "cpu"


def torch_sync(device: str) -> None:
  """Waits for queued PyTorch work on ``device`` (a no-op on the CPU)."""
  if device == "cuda":
    import torch  # pylint: disable=g-import-not-at-top
    torch.cuda.synchronize()


def torch_matmul_peak(dtype: str = "float32", n: int = 2048, *, warmup: int = 2,
                      runs: int = 5) -> dict:
  """The same product in PyTorch (``torch.mm``) on :func:`torch_device`, for reference."""
  import torch  # pylint: disable=g-import-not-at-top
  dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  dev = torch_device()
  g = torch.Generator().manual_seed(0)
  a = torch.randn(n, n, generator=g).to(device=dev, dtype=dt)
  b = torch.randn(n, n, generator=g).to(device=dev, dtype=dt)

  def one():
    torch.mm(a, b)
    torch_sync(dev)

  with torch.no_grad():
    stats = timeit(one, warmup=warmup, runs=runs)
  return {"framework": "torch", "dtype": dtype, "n": n, "device": dev,
          "flops_per_s": 2.0 * n ** 3 / stats["median_s"],
          "torch_threads": torch.get_num_threads(), **stats}


# ---------------------------------------------------------------------- FLOP counters


def xla_flops(compiled) -> float | None:
  """XLA's own FLOP estimate of a compiled function (``cost_analysis()['flops']``)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


# ------------------------------------------------------------------ memory and compile


def compiled_temp_bytes(compiled) -> int | None:
  """XLA's temporary buffer size of a compiled function (activations, workspaces)."""
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def peak_memory(device=None) -> dict:
  """Peak memory so far: the device's counter if it has one, else the process's max RSS.

  Returns ``{"peak_bytes": int, "peak_source": "device" | "maxrss"}``.
  """
  try:
    import jax  # pylint: disable=g-import-not-at-top
    stats = (device or jax.devices()[0]).memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return {"peak_bytes": int(stats["peak_bytes_in_use"]), "peak_source": "device"}
  return {"peak_bytes": _max_rss_bytes(), "peak_source": "maxrss"}


def compile_seconds(jitted, *args, **kwargs) -> tuple[Any, float]:
  """``(compiled, seconds)`` of ``jitted.lower(*args, **kwargs).compile()`` (trace included)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  return compiled, time.perf_counter() - t0


def jax_step_runner(jitted, mesh, state, batch) -> tuple[Callable[[], Any], dict]:
  """Compiles a donated train step once and returns ``(run, info)``.

  ``run()`` applies the step to the current state (carried between calls, as donation
  requires) and blocks on its metrics; it has already run once. ``info`` holds the compile
  seconds, XLA's FLOP and temp-buffer counts, the first step's loss and the state's bytes.
  """
  import jax  # pylint: disable=g-import-not-at-top
  with jax.set_mesh(mesh):
    compiled, compile_s = compile_seconds(jitted, state, batch)
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)
    return metrics

  metrics = run()
  info = {"compile_s": compile_s, "xla_flops_per_step": xla_flops(compiled),
          "temp_bytes": compiled_temp_bytes(compiled), "first_loss": float(metrics["loss"]),
          "state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(holder["state"])))}
  return run, info


# ------------------------------------------------------------------ alternating A/B runs


def alternate(fns: Mapping[str, Callable[[], object]], *, warmup: int = 1,
              runs: int = 3) -> dict[str, dict]:
  """Times each callable ``runs`` times, interleaved (A B A B ...), after ``warmup`` rounds.

  Each ``fn()`` must block until its work is done. Returns ``{name: timeit-style stats}``
  (``median_s``, ``min_s``, ``max_s``, ``runs``, and the raw ``times_s``).
  """
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {k: [] for k in fns}
  for _ in range(runs):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
  return {k: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
              "runs": runs, "times_s": t} for k, t in times.items()}


def ratio(slow: Mapping[str, Any], fast: Mapping[str, Any]) -> dict:
  """How many times faster ``fast`` is than ``slow`` (medians, and the min/max spread).

  ``ratio_median = slow.median / fast.median``; with :func:`alternate`'s ``times_s`` also
  the median of the per-round ratios (each round ran both under the same load).
  """
  out = {"ratio_median": slow["median_s"] / fast["median_s"],
         "ratio_best": slow["min_s"] / fast["min_s"]}
  if "times_s" in slow and "times_s" in fast:
    out["ratio_paired_median"] = statistics.median(
        s / f for s, f in zip(slow["times_s"], fast["times_s"]))
  return out


# ------------------------------------------------------------ PyTorch in its own process


class TorchWorker:
  """A benchmark's PyTorch side in a child process, driven one step at a time.

  ``TorchWorker("benchmarks.stage2", args, batch_np, peak_dtypes=("float32",))``
  spawns a fresh interpreter that imports the module and calls its
  ``torch_side(args, batch_np)`` (which returns ``(run, info)`` or ``({name: run}, info)``)
  and, for each of ``peak_dtypes``, :func:`torch_matmul_peak`. ``worker.step(name)`` runs one
  step there and returns when it is done, so :func:`alternate` times it like a local
  callable; ``worker.runs()`` gives those callables. ``info``, ``peaks`` (``{dtype: FLOP/s}``)
  come from the child, and :meth:`close` adds the child's ``peak_rss_bytes``.

  Why a process: a user runs one framework per process, with its own heap and allocator
  settings, and so does the benchmark: neither side's allocations change how glibc serves
  the other's (docs/performance.md, "Host memory"). The child starts with the environment
  the user gave, without the glibc tunables that :mod:`experiments.hostmem` set for the JAX
  process. ``--torch-process same`` keeps both sides in this process.
  """

  def __init__(self, module: str, args, batch_np: Mapping[str, np.ndarray], *,
               peak_dtypes=(), peak_n: int = 2048):
    import multiprocessing  # pylint: disable=g-import-not-at-top
    ctx = multiprocessing.get_context("spawn")
    self._conn, child = ctx.Pipe()
    self._proc = ctx.Process(
        target=_torch_worker_main, name="proclip-torch-bench", daemon=True,
        args=(child, module, args, dict(batch_np), tuple(peak_dtypes), peak_n,
              _jax_accelerator()))
    # The child starts with the environment the user gave: without the glibc tunables
    # that experiments.hostmem set for this (JAX) process.
    removed = {k: os.environ[k] for k in set(os.environ) - set(hostmem.original_environ())}
    for k in removed:
      del os.environ[k]
    try:
      self._proc.start()
    finally:
      os.environ.update(removed)
    child.close()
    self.names, self.info, self.peaks = self._receive("starting")
    self.peak_rss_bytes = None

  def _receive(self, what: str):
    try:
      kind, payload = self._conn.recv()
    except EOFError:
      self._proc.join(5)
      raise RuntimeError(
          f"The PyTorch benchmark process died while {what} (exit code "
          f"{self._proc.exitcode}); rerun with --torch-process same to see its error "
          f"in this process.") from None
    if kind == "error":
      raise RuntimeError(f"The PyTorch benchmark process failed while {what}:\n{payload}")
    return payload

  def step(self, name: str = "") -> None:
    """Runs one PyTorch step named ``name`` in the child and waits for it."""
    self._conn.send(("step", name))
    self._receive(f"running step {name!r}")

  def runs(self) -> dict[str, Callable[[], None]]:
    """``{name: callable}``, one blocking step per call (the names ``torch_side`` gave)."""
    return {n: (lambda n=n: self.step(n)) for n in self.names}

  def close(self) -> None:
    """Stops the child; records its maximum resident set size in ``peak_rss_bytes``."""
    if self._proc.is_alive():
      self._conn.send(("stop", None))
      self.peak_rss_bytes = self._receive("stopping")
      self._proc.join(30)
    self._conn.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if exc[0] is None:
      self.close()
    else:
      self._proc.kill()
      self._proc.join(5)


def _max_rss_bytes() -> int:
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
  return int(rss if sys.platform == "darwin" else rss * 1024)


def _torch_worker_main(conn, module, args, batch_np, peak_dtypes, peak_n, accelerator):
  """The child side of :class:`TorchWorker`."""
  import traceback  # pylint: disable=g-import-not-at-top
  os.environ[TORCH_DEVICE_ENV] = accelerator
  try:
    runs, info, peaks_ = _build_torch_side(module, args, batch_np, peak_dtypes, peak_n)
    conn.send(("ok", (list(runs), info, peaks_)))
    while True:
      kind, name = conn.recv()
      if kind == "stop":
        conn.send(("ok", _max_rss_bytes()))
        return
      runs[name]()
      conn.send(("ok", None))
  except BaseException:  # pylint: disable=broad-except
    conn.send(("error", traceback.format_exc()))


def torch_sides(module: str, args, batch_np, *, peak_dtypes, peak_n: int):
  """The PyTorch side as ``(runs, info, peaks, worker)``, where ``--torch-process`` says.

  ``worker`` (the default): a :class:`TorchWorker`; ``same``: ``module.torch_side`` in this
  process, with ``worker`` None. ``runs`` is ``{name: blocking callable}``, ``peaks``
  ``{dtype: torch matmul FLOP/s}``.
  """
  if getattr(args, "torch_process", "worker") == "worker":
    worker = TorchWorker(module, args, batch_np, peak_dtypes=peak_dtypes, peak_n=peak_n)
    return worker.runs(), worker.info, worker.peaks, worker
  return (*_build_torch_side(module, args, batch_np, peak_dtypes, peak_n), None)


def _build_torch_side(module, args, batch_np, peak_dtypes, peak_n):
  """``(runs, info, peaks)``: torch's matmul rate per dtype, then ``module.torch_side``.

  ``runs`` is always ``{name: callable}`` (a single callable becomes ``{"": run}``).
  """
  import importlib  # pylint: disable=g-import-not-at-top
  peaks_ = {d: torch_matmul_peak(d, peak_n)["flops_per_s"] for d in peak_dtypes}
  runs, info = importlib.import_module(module).torch_side(args, batch_np)
  return (runs if isinstance(runs, dict) else {"": runs}), info, peaks_


def add_torch_process_arg(parser) -> None:
  parser.add_argument(
      "--torch-process", default="worker", choices=("worker", "same"),
      help="where the PyTorch side runs: 'worker', a child process driven step by step "
           "(default: each framework has its own heap and the user's environment, as in "
           "real use), or 'same', this process (one heap, with the JAX side's glibc "
           "settings)")


def step_record(stats: Mapping[str, Any], *, items: int, flops: float | None,
                peak_flops: float | None) -> dict:
  """items/s, achieved FLOP/s and its fraction of ``peak_flops`` from timing ``stats``."""
  rec = {k: v for k, v in stats.items() if k != "times_s"}
  rec["items_per_s"] = items / stats["median_s"]
  if flops is not None:
    rec["model_flops_per_step"] = float(flops)
    rec["achieved_flops_per_s"] = flops / stats["median_s"]
    if peak_flops:
      rec["fraction_of_peak"] = rec["achieved_flops_per_s"] / peak_flops
  return rec


# ------------------------------------------------------------------ PyTorch reference


def torch_adapter(cfg):
  """A PyTorch transcription of TextProj (an ``AdapterConfig``), float32 parameters.

  ``t / ||t||``, then per block ``x + fn3(GELU_exact(fn0(LN(x))))``, then ``proj(LN(x))``
  (LayerNorm eps 1e-5), as ``models/adapter.py``.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.ln = nn.LayerNorm(cfg.in_dim, eps=1e-5)
      self.fn0 = nn.Linear(cfg.in_dim, cfg.expansion * cfg.in_dim)
      self.fn3 = nn.Linear(cfg.expansion * cfg.in_dim, cfg.in_dim)

    def forward(self, x):
      return x + self.fn3(torch.nn.functional.gelu(self.fn0(self.ln(x))))

  class TextProj(nn.Module):

    def __init__(self):
      super().__init__()
      self.blocks = nn.ModuleList([Block() for _ in range(cfg.n_blocks)])
      self.ln_final = nn.LayerNorm(cfg.in_dim, eps=1e-5)
      self.proj = nn.Linear(cfg.in_dim, cfg.out_dim)

    def forward(self, t):
      x = torch.nn.functional.normalize(t.float(), dim=-1, eps=1e-12)
      for b in self.blocks:
        x = b(x)
      return self.proj(self.ln_final(x)).float()

  return TextProj()


def _torch_safe_sqrt(x):
  import torch  # pylint: disable=g-import-not-at-top
  pos = x > 0
  return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))),
                     torch.zeros_like(x))


def _torch_structure(s, t):
  """Σ_{i<j} SmoothL1(||s_i − s_j|| − ||t_i − t_j||) per chunk: [n, c, E] -> [n]."""
  import torch  # pylint: disable=g-import-not-at-top

  def dist(x):
    gram = x @ x.transpose(1, 2)
    sq = torch.diagonal(gram, dim1=1, dim2=2)
    return _torch_safe_sqrt(torch.clamp(sq[:, :, None] + sq[:, None, :] - 2 * gram, min=0))

  c = s.shape[1]
  upper = torch.triu(torch.ones(c, c, dtype=torch.bool, device=s.device), diagonal=1)
  diff = torch.nn.functional.smooth_l1_loss(dist(s), dist(t), reduction="none", beta=1.0)
  return torch.where(upper, diff, torch.zeros_like(diff)).sum(dim=(1, 2))


def torch_distill_terms(s_short, t_short, s_raw=None, t_raw=None, chunk: int = 512) -> dict:
  """PyTorch transcription of ``losses.stage1_distill_terms`` (or, without the raw pair,
  ``losses.image_distill_terms``): per-chunk sums, mean over chunks."""
  b = s_short.shape[0]
  c = b if chunk >= b else chunk
  ch = lambda x: x.float().reshape(b // c, c, x.shape[1])  # noqa: E731
  ss, ts = ch(s_short), ch(t_short)
  ins = ((ss - ts) ** 2).sum(dim=(1, 2)).mean()
  if s_raw is not None:
    ins = ins + ((ch(s_raw) - ch(t_raw)) ** 2).sum(dim=(1, 2)).mean()
  struct = _torch_structure(ss, ts).mean()
  return {"loss": ins + struct, "ins": ins, "struct": struct}


def torch_clip_loss(img, txt, logit_scale):
  """PyTorch transcription of ``losses.clip_loss`` (dense symmetric InfoNCE)."""
  import torch  # pylint: disable=g-import-not-at-top
  logits = logit_scale.exp() * img.float() @ txt.float().t()
  labels = torch.arange(img.shape[0], device=img.device)
  return 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.t(), labels))


def torch_adamw(param_groups, *, lr: float, weight_decay: float, kind: str = "foreach"):
  """``torch.optim.AdamW`` with ``kind`` "foreach" or "fused" (both exist on the CPU)."""
  import torch  # pylint: disable=g-import-not-at-top
  if kind not in ("foreach", "fused"):
    raise ValueError(f"torch AdamW kind {kind!r}: use 'foreach' or 'fused'")
  return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay,
                           foreach=kind == "foreach", fused=kind == "fused")


def torch_autocast(dtype: str, device: str = "cpu"):
  """A context: bf16 autocast on ``device`` for "bfloat16", nothing for "float32"."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  if dtype == "bfloat16":
    return torch.autocast(device, dtype=torch.bfloat16)
  return contextlib.nullcontext()


def peaks(dtypes, *, n: int, runs: int = 5) -> dict:
  """``{("jax", dtype): flops_per_s}`` matmul peaks for the benchmark records.

  PyTorch's come from :func:`torch_sides`, measured where the PyTorch side runs.
  """
  return {("jax", dt): matmul_peak(dt, n, runs=runs)["flops_per_s"]
          for dt in dict.fromkeys(dtypes)}


def machine() -> dict:
  """A short description of the host for the records."""
  import jax  # pylint: disable=g-import-not-at-top
  model = ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  return {"cpus": os.cpu_count(), "cpu_model": model, "load_avg_1m": load,
          "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
          "jax": jax.__version__}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="matmul rate per dtype, JAX and torch")
  parser.add_argument("--n", type=int, default=2048)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=2,
                      help="repeat the whole JAX/torch sweep (alternation under load)")
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args(argv)
  for _ in range(args.rounds):
    for dt in args.dtypes.split(","):
      emit({"benchmark": "matmul_peak", **matmul_peak(dt, args.n, runs=args.runs)})
      if not args.no_torch:
        emit({"benchmark": "matmul_peak", **torch_matmul_peak(dt, args.n, runs=args.runs)})
  return 0


if __name__ == "__main__":
  sys.exit(main())
