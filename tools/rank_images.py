"""Rank a folder of images for a text query and print the top matches.

  python tools/rank_images.py --checkpoint DIR --images FOLDER --query "a red circle" \
      [--top 5] [--embedder EMB_DIR] [--batch-size 64]
"""
import argparse
import os
import sys

from proclip_jax.errors import ProclipError
from proclip_jax.eval.evaluators import encode_image_list
from proclip_jax.inference import load_any, rank

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--images", required=True)
  p.add_argument("--query", required=True)
  p.add_argument("--top", type=int, default=5)
  p.add_argument("--embedder", default=None)
  p.add_argument("--batch-size", type=int, default=64)
  args = p.parse_args(argv)
  try:
    if not os.path.isdir(args.images):
      raise ProclipError(f"--images {args.images} is not a folder of images.")
    files = sorted(os.path.join(args.images, f) for f in os.listdir(args.images)
                   if f.lower().endswith(EXTENSIONS))
    if not files:
      raise ProclipError(f"No images ({', '.join(EXTENSIONS)}) in {args.images}.")
    model = load_any(args.checkpoint, embedder=args.embedder, batch_size=args.batch_size)
    emb = encode_image_list(model, files, batch_size=args.batch_size)
    idx, scores = rank(model, args.query, emb, args.top)
  except ProclipError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for r, (i, s) in enumerate(zip(idx, scores), 1):
    print(f"{r:3d}  {s:+.4f}  {files[i]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
