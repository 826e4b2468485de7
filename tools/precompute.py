"""Precomputes an embedding cache (LLM embedder or CLIP text-tower features) for a dataset.

  python tools/precompute.py --data DATA [--split train] --model MODEL --fields short,long \\
      --out CACHE [--dtype float16] [--batch-size 64] [--max-length N] [--skip-empty]
      [--unit-size 4096] [--compute-dtype bfloat16] [--mesh data=1,fsdp=-1]
      [--cpu-devices auto|N] [--overwrite]

DATA comes from tools/build_dataset.py; MODEL is a folder from tools/convert.py (a text
embedder gives LLM features, a CLIP gives the stage-1 teacher's text features). CACHE may
not be, contain or lie inside DATA or MODEL. A disk that fills up is reported in one line;
after freeing space, the same command goes on from the finished parts. Killed and
run again with the same arguments, it resumes where it stopped. On several hosts run the
same command on every host (CACHE on a shared file system); each does its share.

On a CPU, the forward runs data-parallel over one XLA device per core (``--cpu-devices
auto``: as many as give each device at least 32 rows of a batch; ``--cpu-devices 1`` keeps
the CPU one device). A count set with JAX_NUM_CPU_DEVICES is kept.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from proclip_jax.errors import ProclipError  # noqa: E402


def _mesh(spec):
  if not spec:
    return None
  out = {}
  for item in spec.split(","):
    name, _, size = item.partition("=")
    try:
      out[name.strip()] = int(size)
    except ValueError:
      raise ProclipError(f"--mesh {spec!r}: give axis=size pairs, e.g. data=1,fsdp=-1.") from None
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data", required=True, help="dataset folder (tools/build_dataset.py)")
  p.add_argument("--split", default="train")
  p.add_argument("--model", required=True, help="converted embedder or CLIP folder")
  p.add_argument("--fields", required=True, help="caption fields, comma-separated")
  p.add_argument("--out", required=True, help="cache folder")
  p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--max-length", type=int, default=None, help="tokens per caption")
  p.add_argument("--skip-empty", action="store_true", help="skip empty captions (counted)")
  p.add_argument("--unit-size", type=int, default=4096, help="ids per resumable work unit")
  p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=-1 to shard the parameters")
  p.add_argument("--cpu-devices", default="auto",
                 help="XLA devices to split a CPU into: auto (one per core) or a count")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  try:
    from proclip_jax.data import cache, precompute  # pylint: disable=g-import-not-at-top
    precompute.split_cpu(args.cpu_devices, args.batch_size)
    out = precompute.precompute(
        args.data, args.model, args.out, split=args.split,
        fields=[f for f in args.fields.split(",") if f], dtype=args.dtype,
        batch_size=args.batch_size, max_length=args.max_length, skip_empty=args.skip_empty,
        unit_size=args.unit_size, compute_dtype=args.compute_dtype, mesh=_mesh(args.mesh),
        overwrite=args.overwrite, progress=not args.no_progress)
    m = cache.read_manifest(out)
    print(json.dumps({"out": out, "kind": m["kind"], "count": m["count"], "dim": m["dim"],
                      "fields": m["fields"], "dtype": m["dtype"], "truncated": m["truncated"],
                      "skipped": {f: len(v) for f, v in m["skipped"].items()}}))
  except ProclipError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
