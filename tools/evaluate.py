"""Evaluate a model on named evaluation sets; print a table and write JSON.

  python tools/evaluate.py --checkpoint DIR --eval flickr30k,coco,imagenet --data-root DATA \
      [--embedder EMB_DIR] [--out results.json] [--batch-size 64] [--limit N] [--demo DEMO_DIR]

DIR: a converted/saved ProCLIP folder, a training workdir, or a converted CLIP. Names:
``proclip_jax.eval.evaluators.EVALS``. A user error exits with status 2 and its message.
"""
import argparse
import json
import os
import sys

from proclip_jax.errors import ProclipError


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--eval", required=True, help="comma-separated evaluation names")
  p.add_argument("--data-root", default=None)
  p.add_argument("--demo", default=None, help="demo world folder (for demo* evals)")
  p.add_argument("--embedder", default=None)
  p.add_argument("--out", default=None)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--limit", type=int, default=None, help="first N images of each set")
  args = p.parse_args(argv)
  try:
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else None
    if out_dir and not os.path.isdir(out_dir):
      raise ProclipError(f"--out {args.out}: the folder {out_dir} does not exist. Create it "
                         "or choose another --out.")
    from proclip_jax.eval import evaluators  # pylint: disable=import-outside-toplevel
    from proclip_jax.inference import load_any  # pylint: disable=import-outside-toplevel
    names = [n.strip() for n in args.eval.split(",") if n.strip()]
    unknown = [n for n in names if n not in evaluators.EVALS]
    if unknown:
      raise ProclipError(f"Unknown evaluation(s) {unknown}; known: "
                         f"{', '.join(evaluators.EVALS)}.")
    model = load_any(args.checkpoint, embedder=args.embedder, batch_size=args.batch_size)
    config = {"data_root": args.data_root, "demo": args.demo, "batch_size": args.batch_size,
              "limit": args.limit}
    results = evaluators.run_evals(names, model, config)
  except ProclipError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  width = max(len(f"{n}/{k}") for n, r in results.items() for k in r)
  print(f"{'metric':<{width}}  value")
  for name, res in results.items():
    for k, v in res.items():
      print(f"{name + '/' + k:<{width}}  {v:8.2f}")
  if args.out:
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"checkpoint": os.path.abspath(args.checkpoint), "results": results}, f,
                indent=2)
    os.replace(tmp, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
