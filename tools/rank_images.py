"""Rank a folder of images (subfolders included) for a text query and print the top matches.

  python tools/rank_images.py --checkpoint DIR --images FOLDER --query "a red circle" \
      [--top 5] [--embedder EMB_DIR] [--batch-size 64]

Files that cannot be read as images are skipped; their count is printed on stderr.
"""
import argparse
import concurrent.futures
import os
import sys

import numpy as np
from PIL import Image

from proclip_jax.data import transforms
from proclip_jax.errors import ProclipError
from proclip_jax.inference import load_any, rank

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_files(folder: str) -> list[str]:
  """Image files under ``folder`` and its subfolders, sorted by path."""
  out = []
  for root, dirs, names in os.walk(folder):
    dirs.sort()
    out.extend(os.path.join(root, n) for n in names if n.lower().endswith(EXTENSIONS))
  return sorted(out)


def _pixels(path: str, size: int):
  """CLIP-normalised pixels of an image file, or None when it cannot be read."""
  try:
    with Image.open(path) as im:
      im.load()
      return transforms.eval_transform(transforms.to_rgb(im), size)
  except (OSError, ValueError, SyntaxError):   # PIL's errors for a damaged / foreign file
    return None


def encode_folder(model, files, batch_size: int, threads: int = 8):
  """``(embeddings [M, E], readable files [M], skipped files)``."""
  kept, skipped, out = [], [], []
  with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
    for s in range(0, len(files), batch_size):
      chunk = files[s:s + batch_size]
      pix = list(pool.map(lambda f: _pixels(f, model.image_size), chunk))
      good = [(f, p) for f, p in zip(chunk, pix) if p is not None]
      skipped.extend(f for f, p in zip(chunk, pix) if p is None)
      if good:
        kept.extend(f for f, _ in good)
        out.append(model.encode_images(np.stack([p for _, p in good]), batch_size=batch_size))
  return (np.concatenate(out) if out else None), kept, skipped


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
    files = image_files(args.images)
    if not files:
      raise ProclipError(f"No images ({', '.join(EXTENSIONS)}) in {args.images} or its "
                         "subfolders.")
    model = load_any(args.checkpoint, embedder=args.embedder, batch_size=args.batch_size)
    emb, files, skipped = encode_folder(model, files, args.batch_size)
    if skipped:
      print(f"skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}", file=sys.stderr)
    if emb is None:
      raise ProclipError(f"None of the image files in {args.images} could be read.")
    idx, scores = rank(model, args.query, emb, args.top)
  except ProclipError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for r, (i, s) in enumerate(zip(idx, scores), 1):
    print(f"{r:3d}  {s:+.4f}  {files[i]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
