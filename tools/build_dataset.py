"""Builds a tfds ArrayRecord dataset from image-text pairs.

  python tools/build_dataset.py SRC OUT [--split NAME] [--fields short,long] [--max-pixels N]
                                [--workers N] [--overwrite]
  python tools/build_dataset.py --demo OUT [--n-train 4000 --n-test 500 --image-size 64]

SRC is a .jsonl/.csv manifest (image paths relative to it) or a folder of webdataset .tar
shards; OUT becomes a tfds dataset folder plus OUT/ingest_report.json (skipped examples and
why). OUT may not be, contain or lie inside an input (--overwrite would delete it). ``--demo`` writes the demo world (images, manifest, classes.json, OUT/data) instead.
"""
import argparse
import json
import sys

from proclip_jax.errors import ProclipError


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("src", nargs="?", help=".jsonl/.csv manifest or folder of .tar shards")
  p.add_argument("out", nargs="?", help="output dataset folder")
  p.add_argument("--split", default=None, help="split of every example (default: the "
                 "manifest's split column, else train)")
  p.add_argument("--fields", default=None, help="caption fields, comma-separated (default: "
                 "those of caption,short,long,raw,text present)")
  p.add_argument("--int-fields", default="label", help="integer columns (comma-separated)")
  p.add_argument("--max-pixels", type=int, default=None, help="skip larger images")
  p.add_argument("--lang", default="en", help="lang of rows without one")
  p.add_argument("--workers", type=int, default=0, help="image-validation processes")
  p.add_argument("--overwrite", action="store_true", help="replace OUT")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--demo", metavar="OUT", default=None, help="generate the demo world into OUT")
  p.add_argument("--n-train", type=int, default=4000)
  p.add_argument("--n-test", type=int, default=500)
  p.add_argument("--image-size", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  try:
    if args.demo:
      from proclip_jax.data import demo_world  # pylint: disable=g-import-not-at-top
      w = demo_world.generate_demo_world(args.demo, n_train=args.n_train, n_test=args.n_test,
                                         image_size=args.image_size, seed=args.seed,
                                         overwrite=args.overwrite,
                                         progress=not args.no_progress)
      print(json.dumps({"data_dir": w.data_dir, "classes": w.classes_file,
                        "splits": w.splits, "seconds": round(w.seconds, 2)}))
      return 0
    if not args.src or not args.out:
      p.error("give SRC and OUT (or --demo OUT)")
    from proclip_jax.data import builder  # pylint: disable=g-import-not-at-top
    kwargs = {}
    if args.max_pixels is not None:
      kwargs["max_pixels"] = args.max_pixels
    r = builder.build_dataset(
        args.src, args.out, split=args.split,
        fields=[f for f in args.fields.split(",") if f] if args.fields else None,
        int_fields=[f for f in args.int_fields.split(",") if f], default_lang=args.lang,
        num_workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress,
        **kwargs)
    print(json.dumps({"out": r.path, "splits": r.num_examples, "skipped": r.num_skipped,
                      "by_reason": r.report["by_reason"], "seconds": round(r.seconds, 2)}))
    return 0
  except ProclipError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
