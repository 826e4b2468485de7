"""Evaluators: encode an evaluation set with a model and score it with ``eval.metrics``.

A *model* is anything with ``encode_images(images) -> [N, E]`` (a float NHWC normalised
array is accepted), ``encode_texts(list[str]) -> [N, E]`` and ``image_size``; both
``proclip_jax.ProCLIP`` and ``inference.CLIPModelAdapter`` (a converted CLIP) are. A ProCLIP
model also has ``encode_text_features(llm_features)``, which the demo evaluators use when
an embedding cache (``proclip_jax.data.cache``) of the captions is given.

Images are decoded and eval-transformed on the host (a thread pool) in batches of
``batch_size``; with a ``mesh`` every batch is split over the mesh's batch axes (padded to
a multiple of the device count, padding dropped) and the rank computations of the metrics
run on the mesh too. On several hosts every process reads the same batches (the global
batch) and gets the same, replicated results.

Every evaluator returns a flat ``{metric: float}`` (percent): retrieval ``i2t_R@k`` /
``t2i_R@k``, classification ``top1`` / ``top5`` / ``mean_per_class_recall``, multilingual
``LANG/i2t_R@1`` and ``mean/...``; ``clip_benchmark_view`` gives CLIP_benchmark's keys.
``EVALS`` maps names to ``fn(model, config) -> dict``; ``run_evals(specs, model, config)``
runs several: built-in names, ``NAME=PATH`` or user sets ``NAME=TASK:PATH``
(``parse_spec``); each set is read and checked (``prepare``) before any is scored
(``evaluate``). The trainer's hooks are ``TRAINER_EVALS``. ``config`` fields (a mapping or
ConfigDict; all optional)::

    data_root    root of the published sets (layouts in docs/evaluation.md)
    paths        {name: path} overrides of the default locations under data_root
    demo         the demo world folder (generate_demo_world's out_dir) or its data/ folder
    llm_cache    {"short": CACHE, "long": CACHE}: caches of the demo retrieval split
    batch_size   images / texts per encoder call (64)
    limit        evaluate only the first N images of each set (quick periodic evals)
    mesh         a jax.sharding.Mesh for the encoders and the metrics
    progress     tqdm bars per set on stderr (False)
    classnames, templates   classification: a file for every set, or {name: file}
    first_index  classification: first number of integer class folders (int or {name: int})
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from proclip_jax.data import transforms
from proclip_jax.data.cache import CacheReader
from proclip_jax.data.pipeline import open_source
from proclip_jax.errors import ProclipError
from proclip_jax.eval import datasets as ds
from proclip_jax.eval import metrics
from proclip_jax.inference import ProCLIP, resolve_embedder
from proclip_jax.train.state import model_config


# --------------------------------------------------------------------------- encoding

def _load_file(path: str, size: int) -> np.ndarray:
  try:
    with Image.open(path) as im:
      im.load()
      return transforms.eval_transform(transforms.to_rgb(im), size)
  except (OSError, ValueError) as e:
    raise ProclipError(f"Cannot read the evaluation image {path}: {e}.") from e


def _load_bytes(data: bytes, size: int) -> np.ndarray:
  return transforms.eval_transform(transforms.decode_image(data), size)


def _bar(total: int, desc: str | None, unit: str):
  """A tqdm bar on stderr when ``desc`` is given (``progress`` on), else a silent one."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=desc is None,
              dynamic_ncols=True, leave=False)


def encode_image_list(model, items: Sequence, *, loader: Callable | None = None,
                      batch_size: int = 64, mesh=None, threads: int = 8,
                      progress: str | None = None) -> np.ndarray:
  """Embeddings ``[N, E]`` of image files (or encoded bytes with ``loader=_load_bytes``);
  ``progress``: the label of a progress bar on stderr (None: no bar)."""
  loader = loader or _load_file
  size = model.image_size
  if size is None:
    raise ProclipError("The model has no image tower; it cannot be evaluated on images.")
  out = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool, \
      _bar(len(items), progress and f"{progress} images", "img") as bar:
    for s in range(0, len(items), batch_size):
      pixels = np.stack(list(pool.map(lambda it: loader(it, size), items[s:s + batch_size])))
      out.append(model.encode_images(pixels, batch_size=batch_size, mesh=mesh))
      bar.update(len(pixels))
  if not out:
    raise ProclipError("No images to evaluate.")
  return np.concatenate(out)


def encode_text_list(model, texts: Sequence[str], *, batch_size: int = 64,
                     mesh=None, progress: str | None = None) -> np.ndarray:
  """Embeddings ``[N, E]`` of captions through the model's text side."""
  out = []
  with _bar(len(texts), progress and f"{progress} texts", "text") as bar:
    for s in range(0, len(texts), 4 * batch_size):
      chunk = list(texts[s:s + 4 * batch_size])
      out.append(model.encode_texts(chunk, batch_size=batch_size, mesh=mesh))
      bar.update(len(chunk))
  if not out:
    raise ProclipError("No captions to evaluate.")
  return np.concatenate(out)


def classifier(model, class_names: Sequence[str], templates: Sequence[str], *,
               batch_size: int = 64, mesh=None, progress: str | None = None) -> np.ndarray:
  """Prompt-ensemble class embeddings ``[C, E]`` (``metrics.zero_shot_classifier``)."""
  texts = [t.format(c) for c in class_names for t in templates]
  emb = encode_text_list(model, texts, batch_size=batch_size, mesh=mesh, progress=progress)
  return metrics.zero_shot_classifier(emb.reshape(len(class_names), len(templates), -1))


# --------------------------------------------------------------------------- evaluators

def eval_retrieval(model, data: ds.RetrievalData, *, batch_size: int = 64, mesh=None,
                   ks: Sequence[int] = (1, 5, 10), img_emb=None, txt_emb=None,
                   progress: bool = False) -> dict:
  """Image↔text R@k on a retrieval set (several captions per image allowed)."""
  bar = data.name if progress else None
  if img_emb is None:
    img_emb = encode_image_list(model, data.images, batch_size=batch_size, mesh=mesh,
                                progress=bar)
  if txt_emb is None:
    txt_emb = encode_text_list(model, data.captions, batch_size=batch_size, mesh=mesh,
                               progress=bar)
  return metrics.retrieval_metrics(img_emb, txt_emb, data.txt_to_img, ks, mesh=mesh)


def eval_long_retrieval(model, data: ds.RetrievalData, **kwargs) -> dict:
  """One long caption per image (ShareGPT4V-1k, Urban-1k, DOCCI, DCI): same protocol."""
  if len(data.captions) != len(data.images):
    raise ProclipError(f"{data.name}: long-text retrieval expects one caption per image, got "
                       f"{len(data.captions)} captions for {len(data.images)} images.")
  return eval_retrieval(model, data, **kwargs)


def eval_zero_shot(model, data: ds.ClassificationData, *, batch_size: int = 64, mesh=None,
                   ks: Sequence[int] = (1, 5), img_emb=None, progress: bool = False) -> dict:
  """Top-k zero-shot accuracy with the prompt-ensemble classifier, and the mean per-class
  recall of the top-1 prediction (``mean_per_class_recall``, CLIP_benchmark's metric for
  the unbalanced sets: the mean over the classes present of each class's top-1 accuracy)."""
  bar = data.name if progress else None
  w = classifier(model, data.class_names, data.templates, batch_size=batch_size, mesh=mesh,
                 progress=bar)
  if img_emb is None:
    img_emb = encode_image_list(model, data.images, batch_size=batch_size, mesh=mesh,
                                progress=bar)
  ks = tuple(k for k in ks if k <= len(data.class_names)) or (1,)
  out = metrics.classification_metrics(img_emb, w, data.labels, ks, mesh=mesh)
  out["mean_per_class_recall"] = mean_per_class_recall(img_emb, w, data.labels)
  return out


def mean_per_class_recall(img_emb, class_emb, labels) -> float:
  """Mean over the classes present in ``labels`` of the top-1 recall, in percent (ties: the
  lower class index, as ``metrics``)."""
  pred = np.argmax(np.asarray(img_emb, np.float32) @ np.asarray(class_emb, np.float32).T, 1)
  labels = np.asarray(labels)
  return float(100.0 * np.mean([np.mean(pred[labels == c] == c) for c in np.unique(labels)]))


def eval_multilingual(model, data: ds.MultilingualData, *, batch_size: int = 64, mesh=None,
                      ks: Sequence[int] = (1,), progress: bool = False) -> dict:
  """Per-language retrieval over one image set, plus the mean (XM3600)."""
  img_emb = encode_image_list(model, data.images, batch_size=batch_size, mesh=mesh,
                              progress=data.name if progress else None)
  per = {lang: eval_retrieval(model, data.language(lang), batch_size=batch_size, mesh=mesh,
                              ks=ks, img_emb=img_emb)
         for lang in data.captions}
  nested = metrics.per_language(per)
  return {f"{lang}/{k}": v for lang, res in nested.items() for k, v in res.items()}


# --------------------------------------------------------------------------- demo world

def _demo_dirs(path: str) -> tuple[str, str | None]:
  """(tfds data dir, classes.json or None) from a demo world folder or its data/ folder."""
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    parent = os.path.join(os.path.dirname(os.path.normpath(path)), "classes.json")
    return path, parent if os.path.isfile(parent) else None
  data = os.path.join(path, "data")
  if not os.path.isfile(os.path.join(data, "dataset_info.json")):
    raise ProclipError(f"No demo world at {path} (no data/dataset_info.json). Generate one "
                       "with proclip_jax.data.demo_world.generate_demo_world(OUT) and pass OUT.")
  classes = os.path.join(path, "classes.json")
  return data, classes if os.path.isfile(classes) else None


def _demo_split(path: str, split: str, fields: Sequence[str], limit: int | None = None):
  data_dir, classes = _demo_dirs(path)
  src = open_source(data_dir, split)
  n = len(src) if limit is None else min(limit, len(src))
  rows = [src[i] for i in range(n)]
  txt = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
  out = {"id": np.asarray([int(r["id"]) for r in rows], np.int64),
         "image": [bytes(r["image"]) for r in rows]}
  for f in fields:
    out[f] = [txt(r[f]) for r in rows] if f != "label" else np.asarray(
        [int(r["label"]) for r in rows], np.int32)
  return out, data_dir, classes


def _demo_text_emb(model, texts, ids, field, llm_cache, batch_size, mesh):
  cache = (llm_cache or {}).get(field) if isinstance(llm_cache, Mapping) else llm_cache
  if cache and hasattr(model, "encode_text_features"):
    feats = CacheReader(cache, expect={"kind": "llm"}).get(field, ids)
    return model.encode_text_features(feats, batch_size=batch_size, mesh=mesh)
  return encode_text_list(model, texts, batch_size=batch_size, mesh=mesh)


def _demo_retrieval(model, path, field, *, split="retrieval_test", batch_size=64, mesh=None,
                    limit=None, llm_cache=None, ks=(1, 5, 10)) -> dict:
  rows, _, _ = _demo_split(path, split, (field,), limit)
  img = encode_image_list(model, rows["image"], loader=_load_bytes, batch_size=batch_size,
                          mesh=mesh)
  txt = _demo_text_emb(model, rows[field], rows["id"], field, llm_cache, batch_size, mesh)
  return metrics.retrieval_metrics(img, txt, np.arange(len(img)), ks, mesh=mesh)


def demo_short_retrieval(model, path: str, **kwargs) -> dict:
  """Demo world ``retrieval_test``: each image against its short caption (one per image)."""
  return _demo_retrieval(model, path, "short", **kwargs)


def demo_long_retrieval(model, path: str, **kwargs) -> dict:
  """Demo world ``retrieval_test``: each image against its long caption."""
  return _demo_retrieval(model, path, "long", **kwargs)


def demo_zero_shot(model, path: str, *, split: str = "classification_test", batch_size: int = 64,
                   mesh=None, limit: int | None = None, ks=(1, 5)) -> dict:
  """Demo world ``classification_test``: main object's "COLOUR SHAPE" with the demo templates."""
  rows, data_dir, classes_file = _demo_split(path, split, ("label",), limit)
  if classes_file is not None:
    with open(classes_file, encoding="utf-8") as f:
      info = json.load(f)
  else:
    from proclip_jax.data.pipeline import open_builder  # pylint: disable=import-outside-toplevel
    info = dict(open_builder(data_dir).info.metadata or {}).get("demo_world")
    if not info:
      raise ProclipError(f"No classes.json beside {data_dir} and no demo_world metadata.")
  data = ds.ClassificationData("demo", [], rows["label"], info["classes"], info["templates"])
  img = encode_image_list(model, rows["image"], loader=_load_bytes, batch_size=batch_size,
                          mesh=mesh)
  return eval_zero_shot(model, data, batch_size=batch_size, mesh=mesh, ks=ks, img_emb=img)


# --------------------------------------------------------------------------- registry

# ``config`` of an evaluator: a dict or ConfigDict of the optional settings in the module
# docstring (None: all defaults), read with ``.get``; a None value means the default.

def _common(config) -> dict:
  return {"batch_size": int(config.get("batch_size") or 64), "mesh": config.get("mesh"),
          "progress": bool(config.get("progress") or False)}


def _path(name, config):
  return (config.get("paths") or {}).get(name) or None


# --------------------------------------------------------------------------- evaluation specs

# Kind of each built-in set; the demo sets read the demo world (``config.demo``).
KINDS = {"flickr30k": "retrieval", "coco": "retrieval", "sharegpt4v": "long",
         "urban1k": "long", "docci": "long", "dci": "long", "xm3600": "multilingual",
         **{n: "zero_shot" for n in ds.ZERO_SHOT_SETS},
         "demo": "demo", "demo_short": "demo", "demo_long": "demo", "demo_zero_shot": "demo"}
# CLIP_benchmark's task names (``--eval NAME=TASK:PATH``; the short forms are accepted too).
TASKS = {"zeroshot_classification": "zero_shot", "zeroshot": "zero_shot",
         "classification": "zero_shot", "zeroshot_retrieval": "retrieval",
         "retrieval": "retrieval"}
_TASK_OF_KIND = {"zero_shot": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
                 "long": "zeroshot_retrieval", "multilingual": "zeroshot_retrieval",
                 "demo": "demo"}
_FITS = {"retrieval": eval_retrieval, "long": eval_long_retrieval,
         "zero_shot": eval_zero_shot, "multilingual": eval_multilingual}


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """One evaluation: ``name`` (its results key), the built-in ``set`` it reads (None for a
  user set), its ``kind`` and an explicit ``path`` (None: the default under data_root)."""
  name: str
  set: str | None
  kind: str
  path: str | None = None

  @property
  def task(self) -> str:
    return _TASK_OF_KIND[self.kind]


def parse_spec(text: str) -> EvalSpec:
  """``NAME`` (a built-in set, ours or CLIP_benchmark's name), ``NAME=PATH`` (a built-in set
  at PATH) or ``NAME=TASK:PATH`` (a user set named NAME; TASK ``zeroshot_classification`` or
  ``zeroshot_retrieval``, see ``docs/evaluation.md``)."""
  name, eq, rest = (x.strip() for x in text.partition("="))
  if not name:
    raise ProclipError(f"Evaluation {text!r}: give a name (NAME, NAME=PATH or "
                       "NAME=TASK:PATH).")
  task, colon, path = rest.partition(":")
  if eq and colon and task.strip() in TASKS:
    if not path.strip():
      raise ProclipError(f"Evaluation {text!r}: no path after '{task}:'.")
    return EvalSpec(name, None, TASKS[task.strip()], path.strip())
  builtin = ds.canonical_name(name)
  if builtin not in EVALS:
    raise ProclipError(
        f"Unknown evaluation {name!r}; known: {', '.join(EVALS)} (or CLIP_benchmark's names "
        f"{', '.join(sorted(ds.ALIASES))}). Your own set: {name}=zeroshot_classification:"
        f"FOLDER_OR_CSV or {name}=zeroshot_retrieval:JSON_OR_CSV.")
  if eq and not rest:
    raise ProclipError(f"Evaluation {text!r}: no path after '='.")
  return EvalSpec(builtin, builtin, KINDS[builtin], rest or None)


def parse_specs(texts: Sequence[str] | str) -> list[EvalSpec]:
  """Specs from strings, each comma-separated; a name given twice is refused."""
  if isinstance(texts, str):
    texts = [texts]
  specs = [parse_spec(t) for text in texts for t in text.split(",") if t.strip()]
  if not specs:
    raise ProclipError("No evaluation named; e.g. --eval flickr30k,imagenet.")
  names = [s.name for s in specs]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ProclipError(f"Evaluation(s) {dup} named twice; give each once.")
  return specs


def _per_set(config, field: str, spec: EvalSpec):
  """``config[field]``: one value for every classification set, or ``{name: value}``."""
  v = (config or {}).get(field)
  if hasattr(v, "get") and not isinstance(v, str):
    return v.get(spec.name, v.get(spec.set)) if spec.set else v.get(spec.name)
  return v


def prepare(spec: EvalSpec, config=None):
  """Reads (and so validates) the set of ``spec``: every file it needs is checked here,
  before any model is loaded. Returns the data (None for the demo sets, whose folder is
  checked). ``config``: ``data_root``, ``paths``, ``demo``, ``limit``, and for
  classification sets ``classnames`` / ``templates`` (a file, or ``{name: file}``) and
  ``first_index`` (an int, or ``{name: int}``)."""
  config = config or {}
  if spec.kind == "demo":
    _demo_dirs(spec.path or _demo_path(config))
    return None
  kwargs = {}
  if spec.kind == "zero_shot":
    label = spec.set or spec.name
    names_file, templates_file = (_per_set(config, f, spec) for f in ("classnames", "templates"))
    if names_file:
      kwargs["class_names"] = ds.read_class_names(str(names_file), label)
    if templates_file:
      kwargs["templates"] = ds.read_templates(str(templates_file), label)
    first = _per_set(config, "first_index", spec)
    if first is not None:
      kwargs["first_index"] = int(first)
  else:
    for f in ("classnames", "templates", "first_index"):
      v = config.get(f)
      if hasattr(v, "get") and not isinstance(v, str) and spec.name in v:
        raise ProclipError(f"{spec.name}: --{f.replace('_', '-')} applies to classification "
                           f"sets only; {spec.name} is a {spec.task} set.")
  if spec.set is None:
    data = ds.load_custom(spec.name, spec.task, spec.path, **kwargs)
  else:
    path = spec.path or _path(spec.set, config) or config.get("path") or None
    data = ds.load(spec.set, config.get("data_root") or None, path, **kwargs)
  limit = config.get("limit")
  return data.limit(int(limit)) if limit else data


def evaluate(model, spec: EvalSpec, data, config=None) -> dict:
  """Scores the prepared ``data`` of ``spec`` (``prepare``) with ``model``."""
  config = config or {}
  if spec.kind == "demo":
    cfg = dict(config or {}) if not hasattr(config, "to_dict") else config.to_dict()
    if spec.path:
      cfg["demo"] = spec.path
    return EVALS[spec.set](model, cfg)
  return _FITS[spec.kind](model, data, **_common(config))


def clip_benchmark_view(spec: EvalSpec, result: Mapping) -> dict:
  """``result`` in CLIP_benchmark's form: ``{"dataset", "task", "metrics"}`` with its keys
  (``acc1``, ``acc5``, ``mean_per_class_recall``, ``image_retrieval_recall@k`` = text→image,
  ``text_retrieval_recall@k`` = image→text) and its scale (fractions in [0, 1])."""
  def key(k: str) -> str:
    prefix, _, base = k.rpartition("/")
    m = re.fullmatch(r"top(\d+)", base)
    if m:
      base = f"acc{m.group(1)}"
    elif base.startswith("i2t_R@"):
      base = "text_retrieval_recall@" + base[len("i2t_R@"):]
    elif base.startswith("t2i_R@"):
      base = "image_retrieval_recall@" + base[len("t2i_R@"):]
    return f"{prefix}/{base}" if prefix else base
  metrics_out = {key(k): float(v) / 100.0 for k, v in result.items() if k != "seconds"}
  dataset = ds.CLIP_BENCHMARK_NAMES.get(spec.set, spec.set) if spec.set else spec.name
  return {"dataset": dataset, "task": spec.task, "metrics": metrics_out}


def _published(name: str) -> Callable:
  def run(model, config) -> dict:
    config = config or {}
    spec = EvalSpec(name, name, KINDS[name])
    return evaluate(model, spec, prepare(spec, config), config)
  run.__name__ = f"eval_{name}"
  run.__doc__ = f"{name}: {KINDS[name]} (layouts in docs/evaluation.md)."
  return run


def _demo_path(config) -> str:
  p = config.get("demo") or _path("demo", config)
  if not p:
    raise ProclipError("The demo evaluations need config.demo (the demo world folder).")
  return p


def _demo(which: str) -> Callable:
  def run(model, config) -> dict:
    config = config or {}
    kw = dict(_common(config), limit=config.get("limit"))
    kw.pop("progress")
    path = _demo_path(config)
    if which == "short":
      return demo_short_retrieval(model, path, llm_cache=config.get("llm_cache"), **kw)
    if which == "long":
      return demo_long_retrieval(model, path, llm_cache=config.get("llm_cache"), **kw)
    if which == "zero_shot":
      return demo_zero_shot(model, path, **kw)
    out = {}
    for part in ("short", "long", "zero_shot"):
      out.update({f"{part}/{k}": v for k, v in _demo(part)(model, config).items()})
    return out
  run.__name__ = f"demo_{which}"
  return run


EVALS: dict[str, Callable[[Any, Any], dict]] = {
    **{n: _published(n) for n, kind in KINDS.items() if kind != "demo"},
    "demo": _demo("all"),
    "demo_short": _demo("short"),
    "demo_long": _demo("long"),
    "demo_zero_shot": _demo("zero_shot"),
}


def run_evals(names: Sequence[str] | str, model, config=None) -> dict:
  """Runs evaluations (names or specs, see :func:`parse_spec`): ``{name: {metric: value,
  ..., "seconds": s}}``. Every set is read and checked before the first is scored."""
  specs = parse_specs(names)
  data = [prepare(s, config) for s in specs]
  out = {}
  for spec, d in zip(specs, data):
    t0 = time.time()
    res = dict(evaluate(model, spec, d, config))
    res["seconds"] = time.time() - t0
    out[spec.name] = res
  return out


# Settings of one trainer evaluation, ``config.evals.NAME.FIELD`` (train/loop.py), with their
# defaults; ``--config.evals.NAME.FIELD=VALUE`` may add any of them (add_trainer_setting).
TRAINER_SETTINGS = {
    "every": 0,            # evaluate every N steps (0: only at the end)
    "at_end": True,        # evaluate after the last step
    "embedder": "",        # converted text-embedder folder (unless llm_cache is given)
    "data_root": "",       # root of the published sets
    "path": "",            # this set's own path (overrides data_root/NAME)
    "demo": "",            # demo world folder (demo* evaluations)
    "limit": 0,            # first N images only (0: all)
    "batch_size": 64,
    "classnames": "",      # classification: class-names file
    "templates": "",       # classification: templates file
}


def add_trainer_setting(config, name: str, field: str) -> None:
  """Makes ``config.evals[name][field]`` exist (with its default) so that a command-line
  override ``--config.evals.NAME.FIELD=VALUE`` can set it; ``name`` must be a built-in
  evaluation and ``field`` one of ``TRAINER_SETTINGS``."""
  if name not in EVALS:
    raise ProclipError(f"--config.evals.{name}.{field}: unknown evaluation {name!r}; known: "
                       f"{', '.join(EVALS)}.")
  evals = config["evals"] if "evals" in config else None
  if evals is None:
    config["evals"] = evals = ml_collections.ConfigDict()
  if name not in evals:
    evals[name] = ml_collections.ConfigDict()
  if field not in evals[name]:
    if field not in TRAINER_SETTINGS:
      raise ProclipError(f"--config.evals.{name}.{field}: unknown setting; an evaluation "
                         f"takes {', '.join(TRAINER_SETTINGS)}.")
    evals[name][field] = TRAINER_SETTINGS[field]


# --------------------------------------------------------------------------- trainer hook

_TRAINER_MODELS: dict = {}


def for_trainer(name: str) -> Callable[[Mapping, Any, Any], dict]:
  """``EVALS[name]`` as the trainer's hook ``fn(params, config, mesh) -> dict``.

  The model is a ``ProCLIP`` built from ``config.model`` and the full parameter tree; its
  text embedder is ``config.evals[name].embedder`` (a converted embedder folder; optional
  when the evaluation reads an LLM cache, ``llm_cache``). The other fields of
  ``config.evals[name]`` are this module's evaluation config (``demo``, ``data_root``,
  ``limit``, ``batch_size`` ...). The model is built once per evaluation name and gets the
  new parameters on later calls, so the encoders compile once.
  """
  def fn(params, config, mesh) -> dict:
    settings = config.evals[name] if name in config.evals else {}
    settings = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings or {})
    host = jax_to_host(params)
    model = _TRAINER_MODELS.get(name)
    if model is None:
      emb, emb_path = resolve_embedder(settings.get("embedder") or None, None,
                                        f"config.evals.{name}.embedder")
      model = ProCLIP(model_config(config), host, emb, embedder_path=emb_path,
                      batch_size=int(settings.get("batch_size", 64)), mesh=mesh)
      _TRAINER_MODELS[name] = model
    else:
      model.set_params(host)
    return EVALS[name](model, dict(settings, mesh=mesh))
  fn.__name__ = f"trainer_{name}"
  return fn


def jax_to_host(tree):
  """A (possibly sharded, multi-host) parameter tree as host NumPy arrays on every process."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)


TRAINER_EVALS = {n: for_trainer(n) for n in EVALS}
