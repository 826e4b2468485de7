"""Benchmarks: ``python tools/benchmark.py NAME [options]`` prints one JSON object per measurement.

NAME is one of: input, loss_memory, precompute, stage1, stage2 (the modules of ``benchmarks/``).
``--help`` after NAME lists that benchmark's options.
"""
import argparse
import importlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# On a GPU the PyTorch side shares the device: JAX takes 60 % of its memory up front, not 75 %.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

from benchmarks import NAMES  # noqa: E402
from proclip_jax.errors import ProclipError  # noqa: E402


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in NAMES:
    print(f"usage: python tools/benchmark.py {{{','.join(NAMES)}}} [options]", file=sys.stderr)
    return 2
  module = importlib.import_module(NAMES[argv[0]])
  parser = argparse.ArgumentParser(prog=f"benchmark.py {argv[0]}", description=module.__doc__)
  module.add_args(parser)
  try:
    return module.run(parser.parse_args(argv[1:])) or 0
  except ProclipError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  from experiments.hostmem import restart_with_tunables
  # The benchmarks measure the CPU step: glibc heap settings for XLA:CPU on by default (on the
  # CPU backend only; PROCLIP_HOST_MALLOC=0 turns them off; experiments/hostmem.py).
  restart_with_tunables(default=True)
  sys.exit(main())
