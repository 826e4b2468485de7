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
``t2i_R@k``, classification ``top1`` / ``top5``, multilingual ``LANG/i2t_R@1`` and
``mean/...``. ``EVALS`` maps names to ``fn(model, config) -> dict``; ``run_evals(names,
model, config)`` runs several (the trainer calls it periodically). ``config`` fields (a
mapping or ConfigDict; all optional)::

    data_root    root of the published sets (layouts in eval/datasets.py)
    paths        {name: path} overrides of the default locations under data_root
    demo         the demo world folder (generate_demo_world's out_dir) or its data/ folder
    llm_cache    {"short": CACHE, "long": CACHE}: caches of the demo retrieval split
    batch_size   images / texts per encoder call (64)
    limit        evaluate only the first N images of each set (quick periodic evals)
    mesh         a jax.sharding.Mesh for the encoders and the metrics
"""
from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from proclip_jax.errors import ProclipError
from proclip_jax.eval import datasets as ds
from proclip_jax.eval import metrics


# --------------------------------------------------------------------------- encoding

def _load_file(path: str, size: int) -> np.ndarray:
  from proclip_jax.data import transforms  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path) as im:
      im.load()
      return transforms.eval_transform(transforms.to_rgb(im), size)
  except (OSError, ValueError) as e:
    raise ProclipError(f"Cannot read the evaluation image {path}: {e}.") from e


def _load_bytes(data: bytes, size: int) -> np.ndarray:
  from proclip_jax.data import transforms  # pylint: disable=import-outside-toplevel
  return transforms.eval_transform(transforms.decode_image(data), size)


def encode_image_list(model, items: Sequence, *, loader: Callable | None = None,
                      batch_size: int = 64, mesh=None, threads: int = 8) -> np.ndarray:
  """Embeddings ``[N, E]`` of image files (or encoded bytes with ``loader=_load_bytes``)."""
  loader = loader or _load_file
  size = model.image_size
  if size is None:
    raise ProclipError("The model has no image tower; it cannot be evaluated on images.")
  out = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
    for s in range(0, len(items), batch_size):
      pixels = np.stack(list(pool.map(lambda it: loader(it, size), items[s:s + batch_size])))
      out.append(model.encode_images(pixels, batch_size=batch_size, mesh=mesh))
  if not out:
    raise ProclipError("No images to evaluate.")
  return np.concatenate(out)


def encode_text_list(model, texts: Sequence[str], *, batch_size: int = 64,
                     mesh=None) -> np.ndarray:
  """Embeddings ``[N, E]`` of captions through the model's text side."""
  out = [model.encode_texts(list(texts[s:s + 4 * batch_size]), batch_size=batch_size, mesh=mesh)
         for s in range(0, len(texts), 4 * batch_size)]
  if not out:
    raise ProclipError("No captions to evaluate.")
  return np.concatenate(out)


def classifier(model, class_names: Sequence[str], templates: Sequence[str], *,
               batch_size: int = 64, mesh=None) -> np.ndarray:
  """Prompt-ensemble class embeddings ``[C, E]`` (``metrics.zero_shot_classifier``)."""
  texts = [t.format(c) for c in class_names for t in templates]
  emb = encode_text_list(model, texts, batch_size=batch_size, mesh=mesh)
  return metrics.zero_shot_classifier(emb.reshape(len(class_names), len(templates), -1))


# --------------------------------------------------------------------------- evaluators

def eval_retrieval(model, data: ds.RetrievalData, *, batch_size: int = 64, mesh=None,
                   ks: Sequence[int] = (1, 5, 10), img_emb=None, txt_emb=None) -> dict:
  """Image↔text R@k on a retrieval set (several captions per image allowed)."""
  if img_emb is None:
    img_emb = encode_image_list(model, data.images, batch_size=batch_size, mesh=mesh)
  if txt_emb is None:
    txt_emb = encode_text_list(model, data.captions, batch_size=batch_size, mesh=mesh)
  return metrics.retrieval_metrics(img_emb, txt_emb, data.txt_to_img, ks, mesh=mesh)


def eval_long_retrieval(model, data: ds.RetrievalData, **kwargs) -> dict:
  """One long caption per image (ShareGPT4V-1k, Urban-1k, DOCCI, DCI): same protocol."""
  if len(data.captions) != len(data.images):
    raise ProclipError(f"{data.name}: long-text retrieval expects one caption per image, got "
                       f"{len(data.captions)} captions for {len(data.images)} images.")
  return eval_retrieval(model, data, **kwargs)


def eval_zero_shot(model, data: ds.ClassificationData, *, batch_size: int = 64, mesh=None,
                   ks: Sequence[int] = (1, 5), img_emb=None) -> dict:
  """Top-k zero-shot accuracy with the prompt-ensemble classifier."""
  w = classifier(model, data.class_names, data.templates, batch_size=batch_size, mesh=mesh)
  if img_emb is None:
    img_emb = encode_image_list(model, data.images, batch_size=batch_size, mesh=mesh)
  ks = tuple(k for k in ks if k <= len(data.class_names)) or (1,)
  return metrics.classification_metrics(img_emb, w, data.labels, ks, mesh=mesh)


def eval_multilingual(model, data: ds.MultilingualData, *, batch_size: int = 64, mesh=None,
                      ks: Sequence[int] = (1,)) -> dict:
  """Per-language retrieval over one image set, plus the mean (XM3600)."""
  img_emb = encode_image_list(model, data.images, batch_size=batch_size, mesh=mesh)
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
  from proclip_jax.data.pipeline import open_source  # pylint: disable=import-outside-toplevel
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
    from proclip_jax.data.cache import CacheReader  # pylint: disable=import-outside-toplevel
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
  import json  # pylint: disable=import-outside-toplevel
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

def _cfg(config, name: str, default: Any = None) -> Any:
  if config is None:
    return default
  if isinstance(config, Mapping) or hasattr(config, "keys"):
    try:
      v = config[name] if name in config else default
    except (KeyError, TypeError):
      v = getattr(config, name, default)
  else:
    v = getattr(config, name, default)
  return default if v is None else v


def _common(config) -> dict:
  return {"batch_size": int(_cfg(config, "batch_size", 64)), "mesh": _cfg(config, "mesh")}


def _path(name, config):
  paths = _cfg(config, "paths", {}) or {}
  p = paths.get(name) if hasattr(paths, "get") else None
  return p or None


def _published(name: str, kind: str) -> Callable:
  def run(model, config) -> dict:
    data = ds.load(name, _cfg(config, "data_root"), _path(name, config))
    limit = _cfg(config, "limit")
    data = data.limit(int(limit)) if limit else data
    fn = {"retrieval": eval_retrieval, "long": eval_long_retrieval, "zero_shot": eval_zero_shot,
          "multilingual": eval_multilingual}[kind]
    return fn(model, data, **_common(config))
  run.__name__ = f"eval_{name}"
  run.__doc__ = f"{name}: {kind} (layout in eval/datasets.py)."
  return run


def _demo_path(config) -> str:
  p = _cfg(config, "demo") or _path("demo", config)
  if not p:
    raise ProclipError("The demo evaluations need config.demo (the demo world folder).")
  return p


def _demo(which: str) -> Callable:
  def run(model, config) -> dict:
    kw = dict(_common(config), limit=_cfg(config, "limit"))
    path = _demo_path(config)
    if which == "short":
      return demo_short_retrieval(model, path, llm_cache=_cfg(config, "llm_cache"), **kw)
    if which == "long":
      return demo_long_retrieval(model, path, llm_cache=_cfg(config, "llm_cache"), **kw)
    if which == "zero_shot":
      return demo_zero_shot(model, path, **kw)
    out = {}
    for part in ("short", "long", "zero_shot"):
      out.update({f"{part}/{k}": v for k, v in _demo(part)(model, config).items()})
    return out
  run.__name__ = f"demo_{which}"
  return run


EVALS: dict[str, Callable[[Any, Any], dict]] = {
    "flickr30k": _published("flickr30k", "retrieval"),
    "coco": _published("coco", "retrieval"),
    "sharegpt4v": _published("sharegpt4v", "long"),
    "urban1k": _published("urban1k", "long"),
    "docci": _published("docci", "long"),
    "dci": _published("dci", "long"),
    "xm3600": _published("xm3600", "multilingual"),
    **{n: _published(n, "zero_shot") for n in ds.ZERO_SHOT_SETS},
    "demo": _demo("all"),
    "demo_short": _demo("short"),
    "demo_long": _demo("long"),
    "demo_zero_shot": _demo("zero_shot"),
}


def run_evals(names: Sequence[str] | str, model, config=None) -> dict:
  """Runs the named evaluations: ``{name: {metric: value, ..., "seconds": s}}``."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in names if n not in EVALS]
  if unknown:
    raise ProclipError(f"Unknown evaluation(s) {unknown}; known: {', '.join(EVALS)}.")
  out = {}
  for name in names:
    t0 = time.time()
    res = dict(EVALS[name](model, config))
    res["seconds"] = time.time() - t0
    out[name] = res
  return out


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
    from proclip_jax.inference import ProCLIP, _resolve_embedder  # pylint: disable=import-outside-toplevel
    from proclip_jax.train.state import model_config  # pylint: disable=import-outside-toplevel
    evals = _cfg(config, "evals", {}) or {}
    settings = evals[name] if name in evals else {}
    settings = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings or {})
    host = jax_to_host(params)
    model = _TRAINER_MODELS.get(name)
    if model is None:
      emb, emb_path = _resolve_embedder(settings.get("embedder") or None, None,
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
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)


TRAINER_EVALS = {n: for_trainer(n) for n in EVALS}
