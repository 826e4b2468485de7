"""Evaluate a model on evaluation sets; print a table and write JSON.

  python tools/evaluate.py --checkpoint DIR --data-root DATA \
      --eval flickr30k,coco,imagenet,vtab/flowers \
      --eval myset=zeroshot_classification:/data/myset --classnames myset=names.txt \
      [--templates FILE] [--embedder EMB_DIR] [--out results.json] [--batch-size 64] \
      [--limit N] [--demo DEMO_DIR] [--no-progress]

``--eval`` (repeatable, comma-separated): a built-in set (ours or CLIP_benchmark's name),
``NAME=PATH`` (a built-in set at PATH) or ``NAME=TASK:PATH`` (your own set: TASK
``zeroshot_classification`` with a class-folder tree or ``labels.csv``, or
``zeroshot_retrieval`` with a Karpathy-split JSON or an ``image,caption`` CSV). Layouts, class
names, templates and the output format: docs/evaluation.md. DIR: a converted/saved ProCLIP
folder, a training workdir, or a converted CLIP.

Every named set is read and checked before the model is loaded. A set that fails later is
reported and the others still run; then the finished results go to ``OUT`` with ``.partial``
before the extension (with ``"failed": {name: message}``), ``OUT`` itself is not written, and
the exit status is 2. A user error exits with status 2 and its message.
"""
import argparse
import json
import math
import os
import sys
import time

from proclip_jax.errors import ProclipError
from proclip_jax.eval import evaluators
from proclip_jax.inference import load_any


def _per_set_option(values, flag: str, names, cast=str):
  """``[FILE]`` or ``[NAME=FILE, ...]`` -> one value or ``{name: value}``."""
  if not values:
    return None
  out, common = {}, None
  for v in values:
    key, eq, rest = v.partition("=")
    if eq and key in names:
      out[key] = rest
    elif eq and os.sep not in key and not os.path.exists(v):
      raise ProclipError(f"{flag} {v}: {key!r} is not a set named by --eval "
                         f"({', '.join(names)}).")
    elif common is None:
      common = v
    else:
      raise ProclipError(f"{flag} given twice for every set ({common!r}, {v!r}); use "
                         f"{flag} NAME=VALUE for one set (sets: {', '.join(names)}).")
  try:
    if common is not None and out:
      return {n: cast(out.get(n, common)) for n in names}
    return {k: cast(v) for k, v in out.items()} if out else cast(common)
  except ValueError as e:
    raise ProclipError(f"{flag}: {e}") from None


def partial_path(out: str) -> str:
  """``results.json`` -> ``results.partial.json``."""
  stem, ext = os.path.splitext(out)
  return f"{stem}.partial{ext or '.json'}"


def _write_json(path: str, payload: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2)
  os.replace(tmp, path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--eval", required=True, action="append",
                 help="NAME | NAME=PATH | NAME=TASK:PATH, comma-separated, repeatable")
  p.add_argument("--data-root", default=None)
  p.add_argument("--demo", default=None, help="demo world folder (for demo* evals)")
  p.add_argument("--classnames", action="append", default=[],
                 help="[NAME=]FILE: class names (one per line, or JSON) of classification sets")
  p.add_argument("--templates", action="append", default=[],
                 help="[NAME=]FILE: prompt templates with {} or {c} (one per line, or JSON)")
  p.add_argument("--first-index", action="append", default=[],
                 help="[NAME=]N: the number of the first class of integer-named class folders")
  p.add_argument("--embedder", default=None)
  p.add_argument("--out", default=None)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--limit", type=int, default=None, help="first N images of each set")
  p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
  args = p.parse_args(argv)
  try:
    specs = evaluators.parse_specs(args.eval)
    names = [s.name for s in specs]
    config = {"data_root": args.data_root, "demo": args.demo, "batch_size": args.batch_size,
              "limit": args.limit, "progress": not args.no_progress,
              "classnames": _per_set_option(args.classnames, "--classnames", names),
              "templates": _per_set_option(args.templates, "--templates", names),
              "first_index": _per_set_option(args.first_index, "--first-index", names, int)}
    if args.out:
      folder = os.path.dirname(os.path.abspath(args.out))
      if not os.path.isdir(folder):
        raise ProclipError(f"--out {args.out}: the folder {folder} does not exist.")
    # Every set is read and checked first: a wrong path fails before the model loads.
    data = {s.name: evaluators.prepare(s, config) for s in specs}
    model = load_any(args.checkpoint, embedder=args.embedder, batch_size=args.batch_size)
  except ProclipError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  results, views, failed = {}, {}, {}
  for spec in specs:
    t0 = time.time()
    try:
      res = dict(evaluators.evaluate(model, spec, data[spec.name], config))
      bad = [k for k, v in res.items() if isinstance(v, float) and not math.isfinite(v)]
      if bad:  # never print or write a +nan score as if it were one
        raise ProclipError(f"non-finite results ({', '.join(bad)}): the model's embeddings "
                           "hold NaN / inf; check the checkpoint.")
    except Exception as e:  # pylint: disable=broad-except
      # Keep what finished; the failure is named in the output and the exit status.
      msg = str(e) if isinstance(e, ProclipError) else f"{type(e).__name__}: {e}"
      failed[spec.name] = msg
      print(f"error: evaluation {spec.name} failed: {msg}", file=sys.stderr)
      continue
    res["seconds"] = time.time() - t0
    results[spec.name] = res
    views[spec.name] = dict(evaluators.clip_benchmark_view(spec, res),
                            seconds=res["seconds"])
  if results:
    width = max(len(f"{n}/{k}") for n, r in results.items() for k in r)
    print(f"{'metric':<{width}}  value")
    for name, res in results.items():
      for k, v in res.items():
        print(f"{name + '/' + k:<{width}}  {v:8.2f}")
  payload = {"checkpoint": os.path.abspath(args.checkpoint), "complete": not failed,
             "results": results, "clip_benchmark": views}
  if failed:
    payload["failed"] = failed
  if args.out:
    path = partial_path(args.out) if failed else args.out
    _write_json(path, payload)
    if failed:
      print(f"error: {len(failed)} of {len(specs)} evaluations failed "
            f"({', '.join(failed)}); the {len(results)} finished are in {path} "
            f"({args.out} not written).", file=sys.stderr)
  return 2 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
