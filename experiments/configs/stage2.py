r"""Stage 2: contrastive tuning of image tower + adapter with EMA self-distillation.

Image tower from a converted OpenAI CLIP, adapter from a stage-1 workdir, learnable logit
scale (clamped to [0, ln 100]); symmetric InfoNCE over the global batch plus
λ·(instance + structure) distillation of the image features towards an EMA teacher
(m = 0.999, λ = 1.0). Each example's text is its short or long caption, equal chance.
Defaults (LLM2CLIP's recipe): AdamW lr 1e-5, wd 0.05, layer decay 0.85 over the image
tower, grad clip 5.0, no warmup then cosine, global batch 4096, bf16 compute.

Args (``stage2.py:k=v,...``): ``size`` B/32 | B/16 | L/14 | L/14-336 and ``embedder``
(llm2clip_llama3_8b) name the folders under ``root``; ``dataset``, ``stage1`` (the stage-1
workdir; default ROOT/runs/stage1-SIZE-EMBEDDER), ``steps``, ``batch``, ``bf16``, ``impl``
(contrastive loss: dense | blockwise | sharded), ``scan`` (scan the ViT blocks), ``remat``
(rematerialisation of each block: none | full | a ``jax.checkpoint_policies`` name such as
nothing_saveable; also ``--config.model.vision.remat=...``). The image
tower's architecture comes from ``config.init.clip``'s model.json and the adapter's D from
the LLM cache (train/run_config.py): another CLIP or embedder needs only their paths.
``shapes=True`` states the named ``size`` and ``embedder``'s shapes instead, for
``tools/aot_compile.py``, which compiles the step without the files.
On NVIDIA GPUs in bf16, ``--config.model.vision.attention=cudnn`` runs the image tower's
attention through cuDNN's fused kernel (``VisionConfig.attention``); a model trained so still
loads and runs on a CPU (``ProCLIP.load`` falls back to the dense path).

What it needs under ROOT (a missing one is reported with the command that makes it)::

    DATA=ROOT/datasets/cc3m                                   # fields short, long
      python tools/build_dataset.py cc3m_dreamlip.jsonl $DATA
    python tools/convert.py ViT-B-16.pt ROOT/weights/clip-vit-b16
    python tools/precompute.py --data $DATA --model ROOT/weights/llm2clip-llama3-8b-cc \
        --fields short,long --out ROOT/caches/cc3m-llm2clip-llama3-8b-cc
    a stage-1 run (experiments/configs/stage1.py) in ROOT/runs/stage1-b16-llm2clip_llama3_8b

Single host::

    python experiments/run.py --config stage2.py:size=B/16,root=/data/proclip \
        --workdir /runs/stage2-b16

ViT-L/14 on a TPU pod slice (the same command on every worker). Scanned layers with
``remat=nothing_saveable`` compile into 6.0 GiB per v5e chip at batch 4096 on v5e-64 (fsdp
8) and 9.8 GiB at 32,768 on v5e-256 (fsdp 16); check a slice before launching with
``python tools/aot_compile.py --config stage2.py:shapes=True,size=L/14,scan,remat=nothing_saveable
--topology v5e:8x8 --config.mesh.fsdp=8`` (no TPU needed; docs/scale.md)::

    gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command "cd proclip-jax \
      && python experiments/run.py \
         --config stage2.py:size=L/14,scan,remat=nothing_saveable,root=gs://BUCKET/proclip \
         --workdir gs://BUCKET/runs/stage2-l14 --config.mesh.fsdp=8"
"""
from experiments.configs import common


def build(size: str, embedder: str, root: str, dataset: str, stage1: str, steps: int,
          batch: int, bf16: bool, impl: str, scan: bool, remat: str = "none",
          preset: str = "", shapes: bool = False):
  """The stage-2 ConfigDict (shared with the Qwen3 variant).

  The image tower's architecture comes from the converted CLIP in ``init.clip`` and the
  adapter's D from the LLM cache, when the run starts (proclip_jax/train/run_config.py);
  ``size`` and ``embedder`` only name the folders.
  """
  tag = common.size_tag(common.check_backbone(size))
  stem, _ = common.embedder(embedder)
  c = common.base_config(stage=2)
  c.total_steps = steps
  dtype = "bfloat16" if bf16 else "float32"
  if shapes:   # the named backbone's and embedder's shapes, stated (no files needed)
    d, e = common.named_shapes(size, embedder)
    common.set_model(c, d=d, e=e, size=size, dtype=dtype, scan_layers=scan)
  else:
    common.set_model(c, d=None, e=None, size=None, dtype=dtype, scan_layers=scan,
                     vision_from_files=True)
  c.model.vision.remat = remat
  c.data.path = common.under(root, "datasets", dataset)
  c.data.batch_size = batch
  c.cache.llm = common.under(root, "caches", f"{dataset}-{stem}")
  c.cache.clip = ""
  c.cache.preset = preset
  c.init.clip = common.under(root, "weights", f"clip-vit-{tag}")
  c.init.stage1_workdir = stage1 or common.under(root, "runs", f"stage1-{tag}-{embedder}")
  c.stage2.text_fields = ("short", "long")
  c.stage2.ema_momentum = 0.999
  c.stage2.distill_weight = 1.0
  c.stage2.contrastive_impl = impl
  c.distill_chunk = 512
  c.optim.lr = 1e-5
  c.optim.weight_decay = 0.05
  c.optim.layer_decay = 0.85
  c.optim.grad_clip_norm = 5.0
  c.optim.warmup_steps = 0
  c.optim.end_lr_ratio = 0.0
  c.log_every = 50
  c.ckpt_every = 1000
  return c


def get_config(arg=None):
  a = common.parse_arg(arg, size="B/16", embedder="llm2clip_llama3_8b", root=".",
                       dataset="cc3m", stage1="", steps=10_000, batch=4096, bf16=True,
                       impl="dense", scan=False, remat="none", shapes=False)
  return build(a.size, a.embedder, a.root, a.dataset, a.stage1, a.steps, a.batch, a.bf16,
               a.impl, a.scan, a.remat, shapes=a.shapes)
