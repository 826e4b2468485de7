"""Benchmark ``stage2``: the JAX stage-2 step against the same step in PyTorch.

  python tools/benchmark.py stage2 [--vision B/16 --batch 8 --steps 3 --warmup 1
      --dtype float32 --llm-dim 4096 --torch-dtypes float32,bfloat16 --torch-adamw fused
      --scan --remat POLICY --attention dense|xla|cudnn --no-donate --no-torch
      --torch-process worker --part step|tower]

JAX: ``train/steps.py``'s ``make_stage2_step`` on a one-device mesh: the image tower
(``--vision``, 224 px by default), the adapter (D = ``--llm-dim`` → E), the logit scale,
the EMA teacher's forward, contrastive + λ·image self-distillation, AdamW with layer decay,
EMA update; state donated (``--no-donate`` re-jits the same step function without it).
``--scan`` / ``--remat`` select the tower's scanned layers and rematerialisation policy;
``--attention`` its attention path (``VisionConfig.attention``: "cudnn" is cuDNN's fused
kernel, bf16 on an NVIDIA GPU).

``--part tower`` times the image tower's share of the step alone, on both sides: the
student's forward and backward through the image self-distillation loss against the
teacher's forward (no adapter, no contrastive loss, no optimizer; the gradients are
returned). There the teacher is initialised on its own, not copied from the student, so that
the loss is not zero. Comparing it with ``--part step`` says which part of the step a gap is
in.

PyTorch: ``transformers.CLIPVisionModelWithProjection`` (random weights, same size, SDPA
attention) as the student and a deep copy as the EMA teacher (``no_grad``), a transcription
of TextProj, the same losses, ``torch.optim.AdamW`` (``fused`` by default: PyTorch at its
best) with the same layer-decay groups, gradient clipping, logit-scale clamp, EMA. Each
dtype of ``--torch-dtypes`` (float32, bf16 autocast) is its own side. By default the PyTorch
side lives in a child process that the benchmark drives one step at a time
(``common.TorchWorker``), so neither framework's allocator state slows the other;
``--torch-process same`` runs it in this process instead.

Sides alternate (JAX, PyTorch f32, PyTorch bf16, JAX, ...) after warm-up. One JSON line per
side (median/min/max s/step, images/s, model FLOPs per step, achieved FLOP/s and its fraction
of the measured matmul peak, compile seconds, peak memory) and one ``"side": "ratio"`` line
per PyTorch dtype (PyTorch s/step ÷ JAX s/step; ≥ 1 means JAX is faster).
"""
from __future__ import annotations

import copy
import math

import numpy as np

from benchmarks import common, emit

FIELDS = ("short", "long")
LAYER_DECAY = 0.85
EMA_MOMENTUM = 0.999
LR, WD = 1e-5, 0.05


def add_args(parser):
  parser.add_argument("--vision", default="B/16", help="CLIP image tower variant")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="JAX compute dtype")
  parser.add_argument("--llm-dim", type=int, default=4096)
  parser.add_argument("--expansion", type=int, default=8)
  parser.add_argument("--layers", type=int, default=None, help="override depth (tests)")
  parser.add_argument("--width", type=int, default=None, help="override width (tests)")
  parser.add_argument("--heads", type=int, default=None, help="override heads (tests)")
  parser.add_argument("--image-size", type=int, default=None)
  parser.add_argument("--patch-size", type=int, default=None)
  parser.add_argument("--embed-dim", type=int, default=None)
  parser.add_argument("--scan", action="store_true", help="scan over layers")
  parser.add_argument("--remat", default="false",
                      help="false, true, or a jax.checkpoint_policies name")
  from proclip_jax.models.vit import ATTENTIONS  # pylint: disable=g-import-not-at-top
  parser.add_argument("--attention", default="dense", choices=ATTENTIONS,
                      help="VisionConfig.attention of the JAX image tower")
  parser.add_argument("--no-donate", action="store_true")
  parser.add_argument("--part", default="step", choices=("step", "tower"),
                      help="the whole stage-2 step, or the image tower's share of it alone "
                           "(student forward+backward through the image distillation loss, "
                           "teacher forward)")
  parser.add_argument("--contrastive", default="dense", help="stage2.contrastive_impl")
  parser.add_argument("--torch-dtypes", default="float32,bfloat16")
  parser.add_argument("--torch-adamw", default="fused", choices=("foreach", "fused"))
  parser.add_argument("--peak-n", type=int, default=2048, help="matmul size for the peak")
  parser.add_argument("--no-torch", action="store_true")
  common.add_torch_process_arg(parser)
  parser.add_argument("--nominal-peak-tflops", type=float, default=None,
                      help="the accelerator's datasheet matmul rate for --dtype (e.g. 989 for "
                           "an H100/H200 SXM in bf16): adds model-FLOPs utilisation against it")


def _remat(value: str):
  low = value.lower()
  return {"false": False, "true": True}.get(low, value)


def vision_config(args):
  from proclip_jax.models.vit import VisionConfig  # pylint: disable=g-import-not-at-top
  over = {k: v for k, v in {"layers": args.layers, "width": args.width, "heads": args.heads,
                            "image_size": args.image_size, "patch_size": args.patch_size,
                            "embed_dim": args.embed_dim}.items() if v is not None}
  return VisionConfig.named(args.vision, dtype=args.dtype, scan_layers=args.scan,
                            remat=_remat(args.remat), attention=args.attention, **over)


def adapter_config(args, vis, dtype):
  from proclip_jax.models.adapter import AdapterConfig  # pylint: disable=g-import-not-at-top
  return AdapterConfig(in_dim=args.llm_dim, out_dim=vis.embed_dim, expansion=args.expansion,
                       dtype=dtype)


def make_batch(args, vis) -> dict:
  rng = np.random.default_rng(0)
  out = {"image": rng.standard_normal(
      (args.batch, vis.image_size, vis.image_size, 3)).astype(np.float32)}
  for f in FIELDS:
    out[f"llm_{f}"] = rng.standard_normal((args.batch, args.llm_dim)).astype(np.float32)
  return out


# ---------------------------------------------------------------------------- JAX side


def _part_flops(args, vis, adapter) -> dict:
  """The model FLOPs of what ``--part`` times: the whole step, or the tower's share."""
  flops = common.stage2_step_flops(vis, adapter, args.batch)
  if args.part == "tower":
    flops = {"total": flops["vision"] + flops["teacher"], "vision": flops["vision"],
             "teacher": flops["teacher"]}
  return flops


def _jax_tower(args, vis, batch_np: dict):
  """``--part tower``: the student's gradient through the image distillation loss."""
  import jax  # pylint: disable=g-import-not-at-top
  from proclip_jax import losses  # pylint: disable=g-import-not-at-top
  from proclip_jax.models.adapter import l2_normalize  # pylint: disable=g-import-not-at-top
  from proclip_jax.models.vit import VisionTransformer  # pylint: disable=g-import-not-at-top

  model = VisionTransformer(vis)
  image = jax.device_put(batch_np["image"])
  student = model.init(jax.random.key(0), image)
  teacher = model.init(jax.random.key(1), image)  # not the student's copy: a non-zero loss

  def loss_fn(params, teacher_params, image):
    t_img = jax.lax.stop_gradient(l2_normalize(model.apply(teacher_params, image)))
    img = l2_normalize(model.apply(params, image))
    return losses.image_distill_loss(img, t_img, args.batch)

  compiled, compile_s = common.compile_seconds(jax.jit(jax.value_and_grad(loss_fn)), student,
                                               teacher, image)

  def run():
    out = compiled(student, teacher, image)
    jax.block_until_ready(out)
    return out

  loss, _ = run()
  return run, {"compile_s": compile_s, "xla_flops_per_step": common.xla_flops(compiled),
               "temp_bytes": common.compiled_temp_bytes(compiled), "first_loss": float(loss)}


def jax_side(args, batch_np: dict):
  """``(run_one_step, info)``: one blocking JAX step; compile seconds and FLOP counts."""
  import jax  # pylint: disable=g-import-not-at-top
  from proclip_jax.models.proclip import ProCLIPConfig  # pylint: disable=g-import-not-at-top
  from proclip_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from proclip_jax.train.state import create_train_state  # pylint: disable=g-import-not-at-top
  from proclip_jax.train.steps import make_stage2_step  # pylint: disable=g-import-not-at-top
  from experiments.configs import common as common_config  # pylint: disable=g-import-not-at-top

  vis = vision_config(args)
  adapter = adapter_config(args, vis, args.dtype)
  if args.part == "tower":
    run, info = _jax_tower(args, vis, batch_np)
    flops = _part_flops(args, vis, adapter)
    info.update({"model_flops_per_step": flops["total"], "flops_breakdown": flops,
                 "scan": args.scan, "remat": args.remat, "donate": False})
    return run, info
  config = common_config.base_config(2)
  config.update(model=ProCLIPConfig(vision=vis, adapter=adapter), total_steps=1000,
                distill_chunk=args.batch, seed=0)
  config.optim.update(lr=LR, weight_decay=WD, grad_clip_norm=1.0, warmup_steps=10,
                      layer_decay=LAYER_DECAY)
  config.stage2.update(ema_momentum=EMA_MOMENTUM, distill_weight=1.0, text_fields=FIELDS,
                       contrastive_impl=args.contrastive)
  mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
  state, shardings = create_train_state(config, mesh, jax.random.key(0))
  step = make_stage2_step(config, mesh, shardings)
  batch_sh = mesh_lib.batch_sharding(mesh)
  batch = {k: jax.device_put(v, batch_sh) for k, v in batch_np.items()}
  jitted = step.jitted
  if args.no_donate:
    jitted = jax.jit(step.__wrapped__, in_shardings=(shardings, batch_sh),
                     out_shardings=(shardings, mesh_lib.replicated(mesh)))
  run, info = common.jax_step_runner(jitted, mesh, state, batch)
  flops = common.stage2_step_flops(vis, adapter, args.batch)
  info.update({"model_flops_per_step": flops["total"], "flops_breakdown": flops,
               "scan": args.scan, "remat": args.remat, "donate": not args.no_donate})
  return run, info


# ------------------------------------------------------------------------ PyTorch side


def _torch_groups(vision, adapter, logit_scale, layers: int):
  """AdamW groups: layer-decay multipliers over the tower, no decay on biases/norms/embeddings."""
  groups = {}

  def mult_of(name):
    if name.startswith(("vision_model.embeddings", "vision_model.pre_layrnorm")):
      return LAYER_DECAY ** (layers + 1)
    if name.startswith("vision_model.encoder.layers."):
      return LAYER_DECAY ** (layers - int(name.split(".")[3]))
    return 1.0

  def add(name, p, mult):
    no_decay = p.ndim < 2 or "embedding" in name or "norm" in name
    key = (mult, no_decay)
    groups.setdefault(key, []).append(p)

  for name, p in vision.named_parameters():
    add(name, p, mult_of(name))
  for name, p in adapter.named_parameters():
    add(name, p, 1.0)
  add("logit_scale", logit_scale, 1.0)
  return [{"params": ps, "lr": LR * m, "weight_decay": 0.0 if nd else WD}
          for (m, nd), ps in groups.items()]


def torch_side(args, batch_np: dict):
  """``{dtype: run_one_step}`` sharing one PyTorch model, and the info dict."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  dev = common.torch_device()
  vis = vision_config(args)
  cfg = CLIPVisionConfig(hidden_size=vis.width, intermediate_size=vis.mlp_width,
                         num_hidden_layers=vis.layers, num_attention_heads=vis.heads,
                         image_size=vis.image_size, patch_size=vis.patch_size,
                         projection_dim=vis.embed_dim, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5)
  student = CLIPVisionModelWithProjection(cfg).to(dev).train()
  if args.part == "tower":  # a teacher unlike the student, so the loss is not zero
    torch.manual_seed(1)
    teacher = CLIPVisionModelWithProjection(cfg).to(dev).eval()
  else:
    teacher = copy.deepcopy(student).eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  adapter_cfg = adapter_config(args, vis, "float32")
  adapter = common.torch_adapter(adapter_cfg).to(dev)
  logit_scale = torch.nn.Parameter(torch.tensor(math.log(100.0), device=dev))
  params = list(student.parameters()) + list(adapter.parameters()) + [logit_scale]
  opt = common.torch_adamw(_torch_groups(student, adapter, logit_scale, vis.layers),
                           lr=LR, weight_decay=WD, kind=args.torch_adamw)
  pixels = torch.from_numpy(
      np.ascontiguousarray(batch_np["image"].transpose(0, 3, 1, 2))).to(dev)
  rng = np.random.default_rng(2)
  choice = torch.from_numpy(rng.integers(0, len(FIELDS), size=args.batch))
  llm = torch.where(choice[:, None] == 0, torch.from_numpy(batch_np["llm_short"]),
                    torch.from_numpy(batch_np["llm_long"])).to(dev)
  s_params = list(student.parameters())
  t_params = list(teacher.parameters())

  def image_features():
    """The student's and the teacher's L2-normalised image features (under autocast)."""
    with torch.no_grad():
      t_img = torch.nn.functional.normalize(
          teacher(pixel_values=pixels).image_embeds.float(), dim=-1)
    img = torch.nn.functional.normalize(
        student(pixel_values=pixels).image_embeds.float(), dim=-1)
    return img, t_img

  def make_tower_run(dtype):

    def run():
      with common.torch_autocast(dtype, dev):
        img, t_img = image_features()
      loss = common.torch_distill_terms(img, t_img, chunk=args.batch)["loss"]
      student.zero_grad(set_to_none=True)
      loss.backward()
      common.torch_sync(dev)
      return loss

    return run

  def make_run(dtype):
    if args.part == "tower":
      return make_tower_run(dtype)

    def run():
      with common.torch_autocast(dtype, dev):
        img, t_img = image_features()
        txt = torch.nn.functional.normalize(adapter(llm).float(), dim=-1)
      # Losses in float32, outside autocast (as the JAX step).
      loss = (common.torch_clip_loss(img, txt, logit_scale)
              + common.torch_distill_terms(img, t_img, chunk=args.batch)["loss"])
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
      with torch.no_grad():
        logit_scale.clamp_(0.0, math.log(100.0))
        torch._foreach_lerp_(t_params, s_params, 1.0 - EMA_MOMENTUM)  # pylint: disable=protected-access
      common.torch_sync(dev)
      return loss

    return run

  dtypes = [d for d in args.torch_dtypes.split(",") if d]
  runs = {d: make_run(d) for d in dtypes}
  first = {d: float(r().detach()) for d, r in runs.items()}
  info = {"model_flops_per_step": _part_flops(args, vis, adapter_cfg)["total"],
          "torch_threads": torch.get_num_threads(), "torch_adamw": args.torch_adamw,
          "torch_device": dev,
          "first_loss": first}
  return runs, info


# ------------------------------------------------------------------------------- driver


def run(args):
  torch_on = not args.no_torch
  torch_dtypes = [d for d in args.torch_dtypes.split(",") if d] if torch_on else []
  peaks = common.peaks([args.dtype] + torch_dtypes, n=args.peak_n)
  vis = vision_config(args)
  batch_np = make_batch(args, vis)
  fns = {}
  jax_run, jax_info = jax_side(args, batch_np)
  fns["jax"] = jax_run
  torch_info, worker = None, None
  if torch_on:
    torch_runs, torch_info, torch_peaks, worker = common.torch_sides(
        __name__, args, batch_np, peak_dtypes=torch_dtypes, peak_n=args.peak_n)
    fns.update({f"torch_{d}": r for d, r in torch_runs.items()})
    peaks.update({("torch", d): v for d, v in torch_peaks.items()})
  try:
    stats = common.alternate(fns, warmup=args.warmup, runs=args.steps)
  finally:
    if worker is not None:
      worker.close()
  base = {"benchmark": "stage2", "vision": args.vision, "batch": args.batch,
          "llm_dim": args.llm_dim, "image_size": vis.image_size, "layers": vis.layers,
          "width": vis.width, "attention": vis.attention, "part": args.part,
          "torch_process": args.torch_process if torch_on else None,
          **common.machine(), **common.peak_memory()}

  def record(name, dtype, info):
    rec = common.step_record(stats[name], items=args.batch,
                             flops=info["model_flops_per_step"],
                             peak_flops=peaks[("jax", dtype)])
    rec.update({k: v for k, v in info.items() if k not in ("model_flops_per_step",
                                                           "first_loss")})
    if name != "jax" and worker is not None:
      rec.update(peak_bytes=worker.peak_rss_bytes, peak_source="maxrss_torch_process")
    rec["matmul_peak_flops_per_s"] = peaks[("jax", dtype)]
    if ("torch", dtype) in peaks:
      rec["torch_matmul_peak_flops_per_s"] = peaks[("torch", dtype)]
      rec["fraction_of_torch_peak"] = rec["achieved_flops_per_s"] / peaks[("torch", dtype)]
    first = info["first_loss"]
    rec["first_loss"] = first[dtype] if isinstance(first, dict) else first
    if args.nominal_peak_tflops and dtype == args.dtype:
      rec["nominal_peak_flops_per_s"] = args.nominal_peak_tflops * 1e12
      rec["mfu_of_nominal_peak"] = rec["achieved_flops_per_s"] / rec["nominal_peak_flops_per_s"]
    emit({**base, "side": name.split("_")[0], "dtype": dtype, **rec})

  record("jax", args.dtype, jax_info)
  for d in torch_dtypes:
    record(f"torch_{d}", d, torch_info)
  for d in torch_dtypes:
    r = common.ratio(stats[f"torch_{d}"], stats["jax"])
    emit({**base, "side": "ratio", "jax_dtype": args.dtype, "torch_dtype": d,
          "what": f"torch {d} s/step / jax {args.dtype} s/step", **r,
          "jax_fraction_of_peak": (jax_info["model_flops_per_step"]
                                   / stats["jax"]["median_s"] / peaks[("jax", args.dtype)])})
  return 0
