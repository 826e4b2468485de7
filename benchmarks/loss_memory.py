"""loss_memory: per-device memory of the contrastive loss + gradient, dense vs memory-efficient.

``python tools/benchmark.py loss_memory [--batch 65536 --dim 512 --devices 8 --block 1024]``

For the global batch ``--batch`` it lowers and compiles (never runs) value-and-gradient of
each implementation with ``jax.jit(...).lower(...).compile()`` and prints
``compiled.memory_analysis()`` per device (temporary, argument, output bytes):

* ``dense`` on one device: the B×B logits (B²·4 bytes) and their softmax live in temp memory;
* ``dense_spmd``: the dense loss under jit with the batch sharded over the mesh, left to XLA's
  partitioner (each device still holds B/n × B logits);
* ``blockwise`` on one device: O(B·block) temporaries;
* ``sharded``: the ring over the mesh (``losses.clip_loss_sharded``), O(B/n·block) per device.

Then, for the small batches of ``--time-batches``, it runs each implementation and prints the
median step time. The simulated devices are CPU devices (``--devices``); ``--platform default``
leaves the platform and device count to JAX (the accelerators present).
"""
import time

from benchmarks import emit, timeit

IMPLS = ("dense", "dense_spmd", "blockwise", "sharded")


def add_args(parser):
  parser.add_argument("--batch", type=int, default=65536,
                      help="global batch for the memory figures")
  parser.add_argument("--dim", type=int, default=512, help="joint embedding dimension")
  parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
  parser.add_argument("--block", type=int, default=1024, help="tile columns (blockwise/sharded)")
  parser.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {IMPLS}")
  parser.add_argument("--time-batches", default="1024,4096",
                      help="comma-separated global batches to time ('' for none)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--platform", default="cpu",
                      help="cpu: --devices simulated CPU devices; default: leave JAX's choice")


def _setup(args):
  import jax
  if args.platform == "cpu":
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
  return jax


def _build(jax, impl, batch, dim, block, mesh):
  """(jitted value-and-grad, abstract args) for one implementation at one size."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from proclip_jax import losses

  if impl in ("dense", "blockwise"):
    dev = jax.devices()[0]
    rows = scalar = jax.sharding.SingleDeviceSharding(dev)
  else:
    rows, scalar = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P())
  if impl in ("dense", "dense_spmd"):
    loss = losses.clip_loss
  elif impl == "blockwise":
    loss = lambda a, b, s: losses.clip_loss_blockwise(a, b, s, block)
  else:
    loss = lambda a, b, s: losses.clip_loss_sharded(a, b, s, mesh=mesh, axis_names=("data",),
                                                    block=block)
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)),
               in_shardings=(rows, rows, scalar))
  spec = [jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)] * 2
  spec.append(jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar))
  return fn, spec


def run(args):
  jax = _setup(args)
  import numpy as np

  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  impls = [i for i in args.impls.split(",") if i]
  base = {"bench": "loss_memory", "dim": args.dim, "devices": n, "block": args.block,
          "platform": jax.devices()[0].platform}
  for impl in impls:
    fn, spec = _build(jax, impl, args.batch, args.dim, args.block, mesh)
    t0 = time.perf_counter()
    compiled = fn.lower(*spec).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    per_dev_rows = args.batch // (1 if impl in ("dense", "blockwise") else n)
    emit({**base, "impl": impl, "batch": args.batch, "what": "memory_per_device",
          "temp_bytes": int(mem.temp_size_in_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes),
          "alias_bytes": int(mem.alias_size_in_bytes),
          "peak_estimate_bytes": int(mem.temp_size_in_bytes + mem.argument_size_in_bytes +
                                     mem.output_size_in_bytes - mem.alias_size_in_bytes),
          "rows_x_batch_x4_bytes": per_dev_rows * args.batch * 4,
          "rows_x_block_x4_bytes": per_dev_rows * min(args.block, per_dev_rows) * 4,
          "compile_s": compile_s})

  rng = np.random.default_rng(0)
  for batch in [int(b) for b in args.time_batches.split(",") if b]:
    x = rng.normal(size=(2, batch, args.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    for impl in impls:
      fn, spec = _build(jax, impl, batch, args.dim, args.block, mesh)
      vals = [jax.device_put(x[0], spec[0].sharding), jax.device_put(x[1], spec[1].sharding),
              jax.device_put(np.float32(np.log(100.0)), spec[2].sharding)]
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(*vals))
      first_s = time.perf_counter() - t0
      stats = timeit(lambda: jax.block_until_ready(fn(*vals)), warmup=args.warmup,
                     runs=args.runs)
      emit({**base, "impl": impl, "batch": batch, "what": "time_value_and_grad",
            "loss": float(out[0]), "first_call_s": first_s, "items_per_s":
            batch / stats["median_s"], **stats})
