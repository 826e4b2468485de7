"""Shared pieces of the experiment configs: typed string args and the base ConfigDict.

A config file is a Python module with ``get_config(arg: str | None) -> ConfigDict``;
``arg`` is the text after the colon in ``--config stage2.py:size=L/14,steps=2000`` and is
parsed by :func:`parse_arg` into typed values (the defaults' types decide)::

    args = parse_arg("size=L/14,steps=2000", size="B/16", steps=10_000, bf16=True)
    args.size, args.steps, args.bf16     # "L/14", 2000, True

:func:`base_config` holds every field the trainer (``proclip_jax/train/loop.py``) reads,
with the method file's defaults where it gives them; the stage files fill in the rest.
Any field can be overridden on the command line: ``--config.optim.lr=3e-5``.
``experiments/run.py`` locks the ConfigDict and the library reads ``config.a.b``; the only
optional fields (absent here, read with ``.get``) are ``data.seed`` (default ``seed``),
``stage2.field_weights`` (default equal), ``optim.no_decay``, ``optim.layer_decay_prefix``
and ``optim.layer_stem`` (train/optimizer.py) and the settings inside ``evals.NAME``.
"""
from __future__ import annotations

import ast
import math
import os

import ml_collections

from proclip_jax.errors import ProclipError
from proclip_jax.models.vit import VisionConfig

# Names only: the configs derive folder names from them (``weights/clip-vit-b16``,
# ``caches/cc3m-clip-b16``, ``caches/cc3m-llm2clip-llama3-8b-cc``). Shapes are read from
# the converted models and caches those folders hold (proclip_jax/train/run_config.py), so
# any converted CLIP and embedder work when their paths are set.
BACKBONES = ("B/32", "B/16", "L/14", "L/14-336")
# Text embedders: cache / weights folder stem and the preset their caches were written with.
EMBEDDERS = {
    "llm2clip_llama3_8b": ("llm2clip-llama3-8b-cc", "llm2clip-llama3"),
    "qwen3_embedding_8b": ("qwen3-embedding-8b", "qwen3-embedding"),
    "qwen3_embedding_4b": ("qwen3-embedding-4b", "qwen3-embedding"),
    "qwen3_embedding_0.6b": ("qwen3-embedding-0.6b", "qwen3-embedding"),
}


def parse_value(text: str, current):
  """``text`` read as the type of ``current`` (bool, int, float, str, tuple/list; for None
  or anything else a Python literal, else the text itself).

  Lists are ``a;b;c`` or a Python literal. Raises ValueError / SyntaxError when ``text``
  does not fit the type; the callers (config args, ``--config.*`` overrides) say where.
  """
  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ValueError(text)
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    if text.strip().startswith(("(", "[")):
      value = ast.literal_eval(text)
      if not isinstance(value, (tuple, list)):
        raise ValueError(text)
    else:
      value = [v for v in text.split(";") if v != ""]
      if len(value) == 1 and "," in value[0]:
        value = value[0].split(",")
    return type(current)(value)
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _parse_value(text: str, default, name: str):
  try:
    return parse_value(text, default)
  except (ValueError, SyntaxError) as e:
    raise ProclipError(
        f"Config arg {name}={text!r}: expected a value of type {type(default).__name__} "
        f"like {default!r}.") from e


def parse_arg(arg: str | None, lazy: bool = False, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"k1=v1,k2=v2,flag"`` into a ConfigDict typed by ``defaults``.

  A bare name sets a boolean to True. Unknown keys are an error unless ``lazy`` is True
  (then they are kept, typed by :func:`ast.literal_eval` when possible).
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, eq, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      if not lazy:
        raise ProclipError(
            f"Unknown config arg {key!r} in {arg!r}; this config takes "
            f"{', '.join(f'{k}={v}' for k, v in defaults.items())}.")
      out[key] = _parse_value(text, None, key) if eq else True
      continue
    if not eq:
      if not isinstance(defaults[key], bool):
        raise ProclipError(f"Config arg {key!r} needs a value ({key}=...).")
      out[key] = True
      continue
    out[key] = _parse_value(text, defaults[key], key)
  return out


# Each embedder's feature width D, for configs that state their shapes (``shapes=True``).
EMBEDDER_DIMS = {"llm2clip_llama3_8b": 4096, "qwen3_embedding_8b": 4096,
                 "qwen3_embedding_4b": 2560, "qwen3_embedding_0.6b": 1024}


def named_shapes(size: str, embedder: str) -> tuple[int, int]:
  """``(D, E)`` of a named backbone and embedder: what a config states when no converted
  files are at hand (``tools/aot_compile.py`` compiles the step from shapes alone)."""
  check_backbone(size)
  if embedder not in EMBEDDER_DIMS:
    raise ProclipError(f"embedder={embedder!r}: known {', '.join(EMBEDDER_DIMS)}.")
  return EMBEDDER_DIMS[embedder], VisionConfig.named(size).embed_dim


def check_backbone(size: str) -> str:
  """``size`` if it is a known backbone name (it names the CLIP's folders)."""
  if size not in BACKBONES:
    raise ProclipError(f"Unknown backbone size {size!r}; known: {', '.join(BACKBONES)} "
                       "(another CLIP: set config.init.clip / config.cache.clip to its paths).")
  return size


def embedder(name: str) -> tuple[str, str]:
  """``(folder stem, preset)`` of a text-embedder name."""
  if name not in EMBEDDERS:
    raise ProclipError(f"Unknown embedder {name!r}; known: {', '.join(EMBEDDERS)}.")
  return EMBEDDERS[name]


def size_tag(size: str) -> str:
  """"L/14" -> "l14" (for folder names)."""
  return size.lower().replace("/", "").replace("-", "_")


def base_config(stage: int) -> ml_collections.ConfigDict:
  """Every field the trainer reads, with defaults (paths left for the stage files)."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.total_steps = 10_000
  c.distill_chunk = 512          # rows per chunk of the distillation sums
  # Micro-batches per step (GradCache, train/steps.py): k > 1 runs the towers on 1/k of every
  # device's rows at a time (features without gradients, the loss over the whole batch, then
  # each micro-batch's backward), so activation memory is one micro-batch's for one more
  # forward pass; the loss and gradients are those of the whole batch. 1: all rows at once.
  # The global batch must divide by k x the batch shards (data x fsdp).
  c.microbatches = 1
  # "auto": jax.distributed.initialize() when the environment names a coordinator or a
  # multi-host TPU / SLURM / Open MPI job; "on" always; "off" never.
  c.distributed = "auto"
  # Multi-process runs agree on a SIGTERM (preemption) every N steps (a cross-process
  # all-gather that waits for the queued steps); one process checks at every step.
  c.preemption_check_every = 10
  # JAX's persistent compilation cache (experiments/run.py sets it on GPU / TPU; "" = off):
  # a resumed or repeated run loads its compiled steps instead of compiling them again.
  c.compilation_cache_dir = "~/.cache/proclip_jax/jax"

  # Observability and checkpoints.
  c.log_every = 50               # metrics.jsonl + TensorBoard every N steps
  c.ckpt_every = 1000            # periodic Orbax checkpoint every N steps (0: final only)
  c.max_to_keep = 3              # newest checkpoints kept (None or 0: keep all)
  c.max_nonfinite_steps = 20     # stop after this many skipped (non-finite) steps in a row; 0: never
  c.progress = True              # progress bar with ETA on process 0
  c.evals = ml_collections.ConfigDict()   # {name: {"every": N, ...}} (train/loop.py)

  # Devices: mesh axes (-1 fills) and logical-axis rules (None: proclip_jax/mesh.py defaults).
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.logical_axis_rules = ml_collections.config_dict.placeholder(tuple)

  # Data: a tfds dataset made by tools/build_dataset.py; the global batch over all hosts.
  c.data = ml_collections.ConfigDict()
  c.data.path = ""
  c.data.split = "train"
  c.data.batch_size = 4096
  c.data.num_epochs = ml_collections.config_dict.placeholder(int)   # None: forever
  c.data.shuffle = True
  # grain worker processes decoding images; -1: from the cores (train/inputs.py,
  # default_worker_count: 0 on <= 2 cores, where workers only add copies).
  c.data.worker_count = -1
  c.data.read_threads = 4       # grain read threads; at most prefetch_batches (each loads a batch)
  c.data.prefetch_batches = 4
  c.data.worker_buffer_size = 2

  # Embedding caches made by tools/precompute.py.
  c.cache = ml_collections.ConfigDict()
  c.cache.llm = ""               # LLM-embedder features per caption field
  c.cache.clip = ""              # CLIP text-tower features (stage 1 teacher)
  c.cache.preset = ""            # expected embedder preset of the llm cache ("" = any)

  # Starting points (stage 2).
  c.init = ml_collections.ConfigDict()
  c.init.clip = ""               # converted CLIP folder (tools/convert.py): image tower
  c.init.stage1_workdir = ""     # stage-1 workdir: the adapter
  # The CLIP's parameter fingerprint (storage.params_fingerprint), recorded by the trainer:
  # stage 1, the teacher (from config.cache.clip's manifest); stage 2, config.init.clip's.
  # Stage 2 refuses an init.clip other than the one that taught its stage-1 run.
  c.init.clip_sha256 = ""
  # A resumed run whose config differs from its config.json in fields that change the steps
  # is refused unless this is True (train/run_config.py, check_resume).
  c.allow_config_change = False

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 0
  c.optim.end_lr_ratio = 0.0
  c.optim.grad_clip_norm = 0.0
  c.optim.layer_decay = 1.0
  c.optim.freeze = ()
  c.optim.lr_mults = ()

  c.stage1 = ml_collections.ConfigDict()
  c.stage1.fields = ("short", "raw")

  c.stage2 = ml_collections.ConfigDict()
  c.stage2.text_fields = ("short", "long")      # drawn with equal chance per example
  c.stage2.ema_momentum = 0.999
  c.stage2.distill_weight = 1.0                 # λ
  c.stage2.contrastive_impl = "dense"           # dense | blockwise | sharded
  c.stage2.contrastive_block = 1024
  return c


def set_model(c: ml_collections.ConfigDict, *, d: int | None, e: int | None,
              size: str | None, dtype: str, scan_layers: bool = False,
              vision_from_files: bool = False) -> None:
  """Sets ``c.model``: the adapter D -> E (one block, expansion 8) and the image tower.

  ``d`` / ``e`` None: read from the caches / the converted CLIP when the run starts
  (train/run_config.py). ``vision_from_files``: the image tower's architecture comes from
  ``config.init.clip``; the config keeps only the run options (dtype, scan_layers, remat,
  attention). Otherwise ``size`` names an OpenAI backbone (None: no image tower).
  """
  vision = None
  if vision_from_files:
    vision = {"dtype": dtype, "scan_layers": scan_layers, "remat": "none",
              "attention": "dense"}
  elif size is not None:
    vision = VisionConfig.named(size, dtype=dtype, scan_layers=scan_layers).to_dict()
  c.model = ml_collections.ConfigDict({
      "vision": vision,
      "adapter": {"in_dim": ml_collections.config_dict.placeholder(int) if d is None else d,
                  "out_dim": ml_collections.config_dict.placeholder(int) if e is None else e,
                  "expansion": 8, "n_blocks": 1, "dtype": dtype},
      "logit_scale_init": math.log(100.0),
  })


def under(root: str, *parts: str) -> str:
  """``root/parts...`` (a plain join; gs:// roots stay URLs)."""
  return os.path.join(root, *parts)
