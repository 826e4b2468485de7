"""Compiles the train step for a TPU slice on this machine (no TPU needed) and prints its fit.

  python tools/aot_compile.py --config stage2.py:shapes=True,size=L/14 --topology v5e:8x8 \\
      [--config.mesh.fsdp=8 --config.data.batch_size=4096 ...] [--hlo FILE]
  python tools/aot_compile.py --config precompute.py:embedder=llm2clip_llama3_8b,batch=256 \\
      --topology v5e:2x2 --config.mesh.fsdp=4

A stage config compiles that stage's train step; ``precompute.py`` compiles the precompute
forward (tools/precompute.py's embedder pass over one batch of captions).

``--config`` and ``--config.a.b=VALUE`` are those of ``experiments/run.py``; ``--topology``
names a slice as GENERATION:SHAPE (``v5e:16x16`` = 256 v5e chips, ``v4:4x4x2`` = v4-64,
``v5p:4x4x4``, ``v6e:8x8``). Prints one JSON object (``proclip_jax/train/aot.py``): per-chip
argument / output / temp / total bytes against the chip's HBM, ``fits``, the step's FLOPs
from XLA:TPU's cost analysis against the model's count, the collectives of the optimized
HLO, and the compile time. ``--hlo FILE`` also writes the optimized HLO text.

Needs XLA:TPU: ``pip install -r requirements-tpu.txt`` (libtpu pinned to the jax release).
JAX runs on the CPU platform here (``JAX_PLATFORMS=cpu`` unless set), so a host without TPUs
prints no TPU start-up errors. Exit status 2 and one line on a user mistake.
"""
import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from experiments.run import apply_override, load_config, split_overrides  # noqa: E402
from proclip_jax.errors import ProclipError  # noqa: E402


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  try:
    rest, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="tools/aot_compile.py", description=__doc__.split("\n")[0],
                                epilog="Any config field: --config.a.b=VALUE.")
    p.add_argument("--config", required=True, help="NAME.py[:ARGS] (see experiments/configs)")
    p.add_argument("--topology", required=True, help="e.g. v5e:8x8, v4:4x4x2, v5p:4x4x4")
    p.add_argument("--hlo", default=None, help="write the optimized HLO text to this file")
    args = p.parse_args(rest)
    config = load_config(args.config)
    for field, text in overrides:
      apply_override(config, field, text)
    from proclip_jax.train import aot  # pylint: disable=import-outside-toplevel
    compile_fn = aot.compile_precompute if aot.is_precompute(config) else aot.compile_step
    report = compile_fn(config, args.topology, keep_hlo=bool(args.hlo))
    if args.hlo and "hlo" in report:  # none when the compiler refused the program
      tmp = args.hlo + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(report["hlo"])
      os.replace(tmp, args.hlo)
  except ProclipError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(aot.summary(report), sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
