"""Benchmark ``input``: images/s of the grain pipeline (read + decode + train transform + batch).

  python tools/benchmark.py input [--num-images 512 --source-size 256 --image-size 224
                                   --batch-size 64 --workers 0 --threads 4 --data DIR]

Without ``--data`` it draws ``--num-images`` demo-world scenes at ``--source-size``, stores
them as JPEGs through the dataset builder (its examples/s is reported too) and reads them
back. One JSON line per worker count in ``--workers`` (comma-separated).
"""
import io
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from benchmarks import emit, timeit


def add_args(parser):
  parser.add_argument("--data", default=None, help="an existing tfds dataset folder")
  parser.add_argument("--split", default="train")
  parser.add_argument("--field", default=None, help="caption field (default: first one)")
  parser.add_argument("--num-images", type=int, default=512)
  parser.add_argument("--source-size", type=int, default=256)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--workers", default="0", help="comma-separated worker counts")
  parser.add_argument("--threads", type=int, default=4)
  parser.add_argument("--batches-per-run", type=int, default=10,
                      help="batches consumed per timed run (longer than the prefetch buffer)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--runs", type=int, default=5)


def _make_dataset(tmp, n, size):
  from proclip_jax.data import builder, demo_world  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(tmp, "src", "images"))
  with open(os.path.join(tmp, "src", "manifest.jsonl"), "w") as f:
    for i in range(n):
      scene = demo_world.sample_scene(rng)
      buf = io.BytesIO()
      Image.fromarray(demo_world.draw(scene, size)).save(buf, "JPEG", quality=90)
      rel = f"images/{i:06d}.jpg"
      with open(os.path.join(tmp, "src", rel), "wb") as g:
        g.write(buf.getvalue())
      f.write(json.dumps({"image": rel, "caption": demo_world.long_caption(scene)}) + "\n")
  t0 = time.perf_counter()
  builder.build_dataset(os.path.join(tmp, "src", "manifest.jsonl"), os.path.join(tmp, "data"),
                        progress=False)
  return os.path.join(tmp, "data"), n / (time.perf_counter() - t0)


def run(args):
  from proclip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    ingest = None
    data = args.data
    if data is None:
      data, ingest = _make_dataset(tmp, args.num_images, args.source_size)
    source = pipeline.open_source(data, args.split)
    field = args.field or next(k for k in source[0] if k not in ("id", "image", "lang"))
    for workers in [int(w) for w in args.workers.split(",")]:
      pipe = pipeline.Pipeline(source, pipeline.PipelineOptions(
          batch_size=args.batch_size, image_size=args.image_size, fields=(field,),
          worker_count=workers, read_threads=args.threads, process_index=0, process_count=1))
      it = iter(pipe)

      def consume():
        for _ in range(args.batches_per_run):
          next(it)

      stats = timeit(consume, warmup=args.warmup, runs=args.runs)
      it.close()
      record = {"benchmark": "input", "batch_size": args.batch_size,
                "image_size": args.image_size, "source_size": args.source_size,
                "workers": workers, "threads": args.threads, "cpus": os.cpu_count(),
                "batches_per_run": args.batches_per_run,
                "images_per_s": args.batch_size * args.batches_per_run / stats["median_s"],
                **stats}
      if ingest is not None:
        record["ingest_examples_per_s"] = ingest
      emit(record)
  return 0
