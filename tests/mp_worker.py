"""Subprocess driver for the reliability and multi-process tests (not a test file itself).

Two modes::

  python tests/mp_worker.py train --spec SPEC.json --out OUT [--devices N] [--delay S]
      [--coordinator 127.0.0.1:PORT --num-processes P --process-id I]

    Runs ``proclip_jax.train.loop.train(config, workdir, source=..., caches=...)`` for each
    job of SPEC.json (``{"n_examples": N, "jobs": [{"name", "config", "workdir",
    "interleave"}]}``) on an in-memory data source and in-memory embedding caches, both pure
    functions of the example id, so every process (and every rerun) sees the same data.
    A job with ``copy_from: WORKDIR`` first copies that workdir (process 0) and deletes
    its newest checkpoint, so the run resumes from the one before. With ``--coordinator``
    it first calls ``jax.distributed.initialize`` (loopback). After
    each job every process restores the latest checkpoint (``Checkpoints.restore``, a
    collective) and process 0 writes ``OUT/NAME.npz`` (the state's params / frozen / ema,
    flattened, plus ``step``); every process writes ``OUT/NAME.pI.json``: ``train``'s
    result, the ids whose features it looked up (the batches it consumed, in order) and the
    records its source was asked for (prefetch included). ``--delay S`` sleeps S seconds per
    batch (in the cache lookup) so a test can signal a run mid-way.

    ``interleave: B`` reorders the source for a one-process reference of a two-process run
    with local batch B and ``shuffle=False``: global batch j of two processes is records
    ``[jB, jB+B)`` of shard 0 followed by ``[N/2 + jB, N/2 + jB + B)`` of shard 1.

  python tests/mp_worker.py killat --target MODULE:FUNC --after K [--partial] -- SCRIPT ARGS

    Runs the tool SCRIPT (as ``__main__``) with MODULE.FUNC wrapped so that its K-th call
    sends SIGKILL to this process (a real ``kill -9`` at a known point). ``--partial`` (for
    ``proclip_jax.data.cache:atomic_save_npy``) first writes half of the file's bytes under
    the temporary name the real function uses, as a write cut short would.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FIELDS = ("short", "long", "raw")
IMAGE_SIDE = 20


# ------------------------------------------------------------------------ data

def example(i: int) -> dict:
  """Example ``i`` of the synthetic data set (a pure function of ``i``)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng([7, i])
  pixels = rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return {"id": np.int64(1000 + i), "image": buf.getvalue(),
          **{f: f"{f} caption of example {i}".encode() for f in FIELDS}}


class Source:
  """``len`` + ``[i]`` over examples ``order``; records every index it is asked for."""

  def __init__(self, n: int, order=None):
    self.order = list(range(n)) if order is None else list(order)
    self.read: list[int] = []

  def __len__(self):
    return len(self.order)

  def __getitem__(self, i):
    i = int(i)
    self.read.append(i)
    return example(self.order[i])


def interleaved(n: int, b: int) -> list[int]:
  half = n // 2
  out = []
  for j in range(half // b):
    out += list(range(j * b, j * b + b)) + list(range(half + j * b, half + j * b + b))
  return out


class Features:
  """A cache stand-in: ``lookup(ids, fields)`` -> deterministic unit rows per (id, field)."""

  def __init__(self, dim: int, salt: int, delay: float = 0.0):
    self.dim, self.salt, self.delay = dim, salt, delay
    self.seen: list[list[int]] = []

  def row(self, ex_id: int, field: str):
    import numpy as np  # pylint: disable=import-outside-toplevel
    v = np.random.default_rng([self.salt, int(ex_id), FIELDS.index(field)]).normal(
        size=self.dim)
    return (v / np.linalg.norm(v)).astype(np.float32)

  def lookup(self, ids, fields):
    import numpy as np  # pylint: disable=import-outside-toplevel
    if self.delay:
      time.sleep(self.delay)
    ids = np.asarray(ids, np.int64).reshape(-1)
    self.seen.append(ids.tolist())
    names = [fields] * len(ids) if isinstance(fields, str) else [str(f) for f in fields]
    return np.stack([self.row(i, f) for i, f in zip(ids, names)])


# ------------------------------------------------------------------------ train mode

def _dump_state(config, workdir, path):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from proclip_jax.tree import flatten  # pylint: disable=import-outside-toplevel
  from proclip_jax.train import checkpoints as ckpt_lib  # pylint: disable=import-outside-toplevel
  from proclip_jax import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from proclip_jax.train.state import abstract_train_state  # pylint: disable=import-outside-toplevel
  mesh = mesh_lib.make_mesh(config.get("mesh"))
  abstract, _ = abstract_train_state(config, mesh)
  ck = ckpt_lib.Checkpoints(workdir, read_only=True)
  step = ck.latest_step()
  state, _ = ck.restore(abstract, None, step)
  ck.close()
  tree = {"params": state.params, "frozen": state.frozen, "ema": state.ema}
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  flat = {k: np.asarray(v) for k, v in flatten(jax.device_get(tree)).items()}
  flat["step"] = np.asarray(int(jax.device_get(state.step)))
  if jax.process_index() == 0:
    np.savez(path, **flat)


def train_mode(args) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_num_cpu_devices", args.devices)
  jax.config.update("jax_default_matmul_precision", "highest")
  if args.coordinator:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=60)
  import logging  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
  logging.getLogger("proclip_jax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  from proclip_jax.errors import ProclipError  # pylint: disable=import-outside-toplevel
  from proclip_jax.train.loop import train  # pylint: disable=import-outside-toplevel
  from config_helpers import make_config  # pylint: disable=import-outside-toplevel
  with open(args.spec) as f:
    spec = json.load(f)
  os.makedirs(args.out, exist_ok=True)
  pid = jax.process_index()
  n = int(spec["n_examples"])
  for job in spec["jobs"]:
    config = make_config(job["config"])
    if job.get("copy_from"):  # a copy of another job's workdir minus its newest checkpoint
      if pid == 0:
        import shutil  # pylint: disable=import-outside-toplevel
        shutil.copytree(job["copy_from"], job["workdir"])
        ck = os.path.join(job["workdir"], "checkpoints")
        newest = max(int(d) for d in os.listdir(ck) if d.isdigit())
        shutil.rmtree(os.path.join(ck, str(newest)))
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices(f"copy {job['name']}")
    order = interleaved(n, int(job["interleave"])) if job.get("interleave") else None
    source = Source(n, order)
    llm = Features(config["model"]["adapter"]["in_dim"], 1, args.delay)
    clip = Features(config["model"]["adapter"]["out_dim"], 2)
    try:
      result = train(config, job["workdir"], source=source, caches={"llm": llm, "clip": clip})
    except ProclipError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    _dump_state(config, job["workdir"], os.path.join(args.out, f"{job['name']}.npz"))
    seen = [ids for i, ids in enumerate(llm.seen)
            if config["stage"] == 2 or i % len(config["stage1"]["fields"]) == 0]
    # The trainer's device prefetch reads batches ahead of the steps; the consumed ones are
    # the first ``step`` (the ids are read from fresh runs only).
    seen = seen[:result["step"]]
    with open(os.path.join(args.out, f"{job['name']}.p{pid}.json"), "w") as f:
      json.dump({"result": {k: v for k, v in result.items()
                            if isinstance(v, (int, float, bool, str))},
                 "ids": seen, "records": [source.order[i] for i in source.read],
                 "process_count": jax.process_count(), "devices": jax.device_count()}, f)
    print(json.dumps({"job": job["name"], "step": result["step"],
                      "preempted": result["preempted"]}), flush=True)
  if args.coordinator:
    jax.distributed.shutdown()
  return 0


# ------------------------------------------------------------------------ killat mode

def killat_mode(args, script_argv) -> int:
  import importlib  # pylint: disable=import-outside-toplevel
  import runpy  # pylint: disable=import-outside-toplevel
  mod_name, _, fn_name = args.target.partition(":")
  mod = importlib.import_module(mod_name)
  real = getattr(mod, fn_name)
  calls = {"n": 0}

  def wrapped(*a, **kw):
    calls["n"] += 1
    if calls["n"] == args.after:
      if args.partial:  # atomic_save_npy(path, array): a write cut off half-way
        import numpy as np  # pylint: disable=import-outside-toplevel
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(a[1]), allow_pickle=False)
        data = buf.getvalue()
        with open(f"{a[0]}.tmp-{os.getpid()}", "wb") as f:
          f.write(data[:len(data) // 2])
      sys.stdout.flush()
      os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **kw)

  setattr(mod, fn_name, wrapped)
  sys.argv = list(script_argv)
  runpy.run_path(script_argv[0], run_name="__main__")
  return 0


def main():
  argv = sys.argv[1:]
  script_argv = []
  if "--" in argv:
    cut = argv.index("--")
    argv, script_argv = argv[:cut], argv[cut + 1:]
  p = argparse.ArgumentParser()
  sub = p.add_subparsers(dest="mode", required=True)
  t = sub.add_parser("train")
  t.add_argument("--spec", required=True)
  t.add_argument("--out", required=True)
  t.add_argument("--devices", type=int, default=4)
  t.add_argument("--delay", type=float, default=0.0)
  t.add_argument("--coordinator", default=None)
  t.add_argument("--num-processes", type=int, default=1)
  t.add_argument("--process-id", type=int, default=0)
  k = sub.add_parser("killat")
  k.add_argument("--target", required=True)
  k.add_argument("--after", type=int, required=True)
  k.add_argument("--partial", action="store_true")
  args = p.parse_args(argv)
  if args.mode == "train":
    return train_mode(args)
  return killat_mode(args, script_argv)


if __name__ == "__main__":
  sys.exit(main())
