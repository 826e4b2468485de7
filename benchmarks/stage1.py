"""Benchmark ``stage1``: the JAX stage-1 step against the PyTorch reference step, per example.

  python tools/benchmark.py stage1 [--batch 64 --steps 3 --warmup 1 --dtype float32
      --llm-dim 4096 --embed-dim 512 --vision B/16 --torch-adamw foreach --no-torch
      --torch-process worker]

JAX: ``train/steps.py``'s ``make_stage1_step`` on a one-device mesh: the adapter only, on
cached features (``llm_short``/``llm_raw`` [B, D] and the CLIP text targets
``clip_short``/``clip_raw`` [B, E]), distillation loss, AdamW; state donated.

PyTorch (the reference recipe, which has no caches): every step runs the CLIP text teacher
(``transformers.CLIPTextModelWithProjection`` at the text dimensions of ``--vision``'s CLIP,
random weights, ``no_grad``, 77 tokens) on both caption fields, then the same adapter (a
transcription of TextProj), the same distillation losses and ``torch.optim.AdamW``
(``--torch-adamw foreach`` or ``fused``), under bf16 autocast when ``--dtype bfloat16``. It
runs in a child process driven one step at a time (``common.TorchWorker``), or in this
process with ``--torch-process same``.

Runs alternate (JAX, PyTorch, JAX, ...) after warm-up. One JSON line per side and one
``"side": "ratio"`` line: ``ratio_median`` = PyTorch s/step ÷ JAX s/step at the same batch,
i.e. how many times more examples per second the JAX step trains (target: ≥ 4).
"""
from __future__ import annotations

import numpy as np

from benchmarks import common, emit

# CLIP text towers by image-tower variant (OpenAI): width, layers, heads, context, E.
TEXT_TOWERS = {
    "B/32": dict(width=512, layers=12, heads=8, context=77, embed_dim=512),
    "B/16": dict(width=512, layers=12, heads=8, context=77, embed_dim=512),
    "L/14": dict(width=768, layers=12, heads=12, context=77, embed_dim=768),
    "L/14-336": dict(width=768, layers=12, heads=12, context=77, embed_dim=768),
}
FIELDS = ("short", "raw")
TARGET_RATIO = 4.0


def add_args(parser):
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--llm-dim", type=int, default=4096, help="D, the LLM feature size")
  parser.add_argument("--embed-dim", type=int, default=None,
                      help="E (default: the CLIP variant's joint dimension)")
  parser.add_argument("--expansion", type=int, default=8)
  parser.add_argument("--vision", default="B/16", choices=sorted(TEXT_TOWERS),
                      help="CLIP variant whose text tower is the PyTorch teacher")
  parser.add_argument("--text-layers", type=int, default=None,
                      help="override the teacher's depth (tests)")
  parser.add_argument("--chunk", type=int, default=512, help="distill_chunk")
  parser.add_argument("--torch-adamw", default="foreach", choices=("foreach", "fused"))
  parser.add_argument("--peak-n", type=int, default=2048, help="matmul size for the peak")
  parser.add_argument("--no-torch", action="store_true")
  common.add_torch_process_arg(parser)


def _tower(args) -> dict:
  t = dict(TEXT_TOWERS[args.vision])
  if args.text_layers is not None:
    t["layers"] = args.text_layers
  if args.embed_dim is not None:
    t["embed_dim"] = args.embed_dim
  return t


# ---------------------------------------------------------------------------- JAX side


def jax_side(args, batch_np: dict):
  """``(run_one_step, info)``: a callable doing one blocking JAX step, compile time etc."""
  import jax  # pylint: disable=g-import-not-at-top
  from proclip_jax.models.adapter import AdapterConfig  # pylint: disable=g-import-not-at-top
  from proclip_jax.models.proclip import ProCLIPConfig  # pylint: disable=g-import-not-at-top
  from proclip_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from proclip_jax.train.state import create_train_state  # pylint: disable=g-import-not-at-top
  from proclip_jax.train.steps import make_stage1_step  # pylint: disable=g-import-not-at-top
  from experiments.configs import common as common_config  # pylint: disable=g-import-not-at-top

  e = _tower(args)["embed_dim"]
  adapter = AdapterConfig(in_dim=args.llm_dim, out_dim=e, expansion=args.expansion,
                          dtype=args.dtype)
  config = common_config.base_config(1)
  config.update(model=ProCLIPConfig(vision=None, adapter=adapter), total_steps=1000,
                distill_chunk=min(args.chunk, args.batch), seed=0)
  config.optim.update(lr=1e-4, weight_decay=0.05, grad_clip_norm=1.0, warmup_steps=10)
  mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
  state, shardings = create_train_state(config, mesh, jax.random.key(0))
  step = make_stage1_step(config, mesh, shardings)
  batch_sh = mesh_lib.batch_sharding(mesh)
  batch = {k: jax.device_put(v, batch_sh) for k, v in batch_np.items()}
  run, info = common.jax_step_runner(step.jitted, mesh, state, batch)
  info["model_flops_per_step"] = common.stage1_step_flops(adapter, args.batch)
  return run, info


# ------------------------------------------------------------------------ PyTorch side


def torch_side(args, batch_np: dict):
  """``(run_one_step, info)`` for the PyTorch reference step (text teacher every step)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModelWithProjection  # pylint: disable=g-import-not-at-top
  from proclip_jax.models.adapter import AdapterConfig  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  dev = common.torch_device()
  t = _tower(args)
  text_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=t["width"],
                            intermediate_size=4 * t["width"],
                            num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                            max_position_embeddings=t["context"], projection_dim=t["embed_dim"],
                            hidden_act="quick_gelu", eos_token_id=49407)
  teacher = CLIPTextModelWithProjection(text_cfg).to(dev).eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  adapter_cfg = AdapterConfig(in_dim=args.llm_dim, out_dim=t["embed_dim"],
                              expansion=args.expansion)
  adapter = common.torch_adapter(adapter_cfg).to(dev)
  opt = common.torch_adamw(adapter.parameters(), lr=1e-4, weight_decay=0.05,
                           kind=args.torch_adamw)
  rng = np.random.default_rng(1)
  ids = {}
  for f in FIELDS:
    x = rng.integers(1, 49406, size=(args.batch, t["context"]))
    x[np.arange(args.batch), rng.integers(2, t["context"], size=args.batch)] = 49407  # EOT
    ids[f] = torch.from_numpy(x).to(dev)
  llm = {f: torch.from_numpy(batch_np[f"llm_{f}"]).to(dev) for f in FIELDS}
  chunk = min(args.chunk, args.batch)

  def run():
    with common.torch_autocast(args.dtype, dev):
      with torch.no_grad():
        targets = {f: torch.nn.functional.normalize(
            teacher(input_ids=ids[f]).text_embeds.float(), dim=-1) for f in FIELDS}
      student = {f: torch.nn.functional.normalize(adapter(llm[f]).float(), dim=-1)
                 for f in FIELDS}
    # Losses in float32, outside autocast (as the JAX step).
    loss = common.torch_distill_terms(student["short"], targets["short"], student["raw"],
                                      targets["raw"], chunk)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
    opt.step()
    common.torch_sync(dev)
    return loss

  loss = run()
  text_flops = 2 * common.text_forward_flops(
      width=t["width"], layers=t["layers"], mlp=4 * t["width"], context=t["context"],
      embed_dim=t["embed_dim"], batch=args.batch)
  info = {"model_flops_per_step": text_flops + common.stage1_step_flops(adapter_cfg, args.batch),
          "teacher_flops_per_step": text_flops, "first_loss": float(loss.detach()),
          "torch_threads": torch.get_num_threads(), "torch_adamw": args.torch_adamw,
          "torch_device": dev}
  return run, info


# ------------------------------------------------------------------------------- driver


def make_batch(args) -> dict:
  e = _tower(args)["embed_dim"]
  rng = np.random.default_rng(0)
  out = {}
  for f in FIELDS:
    out[f"llm_{f}"] = rng.standard_normal((args.batch, args.llm_dim)).astype(np.float32)
    out[f"clip_{f}"] = rng.standard_normal((args.batch, e)).astype(np.float32)
  return out


def run(args):
  torch_on = not args.no_torch
  peaks = common.peaks([args.dtype], n=args.peak_n)
  batch_np = make_batch(args)
  sides = {"jax": jax_side(args, batch_np)}
  worker = None
  if torch_on:
    runs, info, torch_peaks, worker = common.torch_sides(
        __name__, args, batch_np, peak_dtypes=[args.dtype], peak_n=args.peak_n)
    sides["torch"] = (runs[""], info)
    peaks[("torch", args.dtype)] = torch_peaks[args.dtype]
  try:
    stats = common.alternate({k: v[0] for k, v in sides.items()}, warmup=args.warmup,
                             runs=args.steps)
  finally:
    if worker is not None:
      worker.close()
  base = {"benchmark": "stage1", "batch": args.batch, "dtype": args.dtype,
          "llm_dim": args.llm_dim, "embed_dim": _tower(args)["embed_dim"],
          "vision": args.vision, "torch_process": args.torch_process if torch_on else None,
          **common.machine(), **common.peak_memory()}
  for name, (_, info) in sides.items():
    rec = common.step_record(stats[name], items=args.batch,
                             flops=info["model_flops_per_step"],
                             peak_flops=peaks[("jax", args.dtype)])
    rec.update({k: v for k, v in info.items() if k != "model_flops_per_step"})
    if name == "torch" and worker is not None:
      rec.update(peak_bytes=worker.peak_rss_bytes, peak_source="maxrss_torch_process")
    rec["matmul_peak_flops_per_s"] = peaks[("jax", args.dtype)]
    if ("torch", args.dtype) in peaks:
      rec["torch_matmul_peak_flops_per_s"] = peaks[("torch", args.dtype)]
      rec["fraction_of_torch_peak"] = (rec["achieved_flops_per_s"]
                                       / peaks[("torch", args.dtype)])
    emit({**base, "side": name, **rec})
  if torch_on:
    r = common.ratio(stats["torch"], stats["jax"])
    emit({**base, "side": "ratio", "what": "torch s/step / jax s/step (per example)",
          **r, "target": TARGET_RATIO, "target_met": r["ratio_median"] >= TARGET_RATIO,
          "flop_ratio": (sides["torch"][1]["model_flops_per_step"]
                         / sides["jax"][1]["model_flops_per_step"])})
  return 0
