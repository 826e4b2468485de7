"""The public inference API: a trained or converted ProCLIP as a library.

::

    model = proclip_jax.ProCLIP.load("converted_or_saved_folder", embedder="minilm_folder")
    img = model.encode_images([PIL.Image.open("cat.jpg")])        # np float32 [1, E], unit norm
    txt = model.encode_texts(["a photo of a cat", "ein Hund"])     # np float32 [2, E], unit norm
    W = model.zero_shot_classifier(["cat", "dog"], ["a photo of a {}."])   # [2, E]
    sim = model.similarity(img, txt)                                # cosine [1, 2]
    idx, scores = model.rank("a cat", image_embs, k=5)

What ``ProCLIP.load(path)`` accepts:

* a converted ProCLIP folder (``kind="proclip"``, ``tools/convert.py`` on a ProCLIP / LLM2CLIP
  release checkpoint), or a folder written by :meth:`ProCLIP.save` (the same kind, with the
  embedder's path recorded as ``"embedder"`` in model.json);
* a training workdir (``experiments/run.py``): its latest checkpoint (see
  :func:`load_workdir`).

The text side is ``embedder.embed`` (tokenizer + template + LLM, batched and bucketed by the
embedder) followed by the adapter; an embedder comes from ``embedder=`` (a converted embedder
folder or a loaded ``Embedder``) or the path recorded in model.json.

Images: a list of PIL images or uint8 ``HWC`` arrays (the CLIP eval transform is applied:
resize shorter side bicubic, centre crop, CLIP normalisation) or a float ``NHWC`` array that
is already normalised at the tower's size. Encoding runs in fixed-size, bucketed batches
(power-of-two sizes up to ``batch_size``); with a ``mesh`` each batch is split over the
mesh's batch axes (padded to a multiple of the device count, padding rows dropped) and the
parameters are placed by the logical-axis rules.

:class:`CLIPModelAdapter` gives a converted CLIP (``proclip_jax.load_clip``) the same
``encode_images`` / ``encode_texts`` interface, so the evaluators run on both.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Mapping, Sequence

import jax
import numpy as np
from etils import epath

from proclip_jax import mesh as mesh_lib
from proclip_jax import storage
from proclip_jax.batched import BatchedEncoder, check_batch_size
from proclip_jax.data import paths, transforms
from proclip_jax.errors import ProclipError
from proclip_jax.eval import metrics
from proclip_jax.models.clip import load_clip
from proclip_jax.models.embedder import load_embedder
from proclip_jax.models.proclip import ProCLIPConfig, ProCLIPModel
from proclip_jax.models.vit import runnable_here
from proclip_jax.tree import merge


# --------------------------------------------------------------------------- helpers

def _as_image_list(images) -> list:
  """One image (a PIL image or an HWC array) as a list of one; a batch as a list."""
  if hasattr(images, "convert") or (isinstance(images, np.ndarray) and images.ndim == 3):
    return [images]
  return list(images)


def preprocess_images(images, size: int) -> np.ndarray:
  """PIL images / uint8 HWC arrays / a float NHWC normalised array -> float32 NHWC.

  One image (a PIL image or one HWC array) is a batch of one: ``[1, size, size, 3]``.

  A float array (or list of float HWC arrays) is taken as already CLIP-normalised and must
  be ``size x size``; anything else goes through ``transforms.eval_transform``.
  """
  if isinstance(images, np.ndarray) and images.ndim == 4 and np.issubdtype(images.dtype,
                                                                           np.floating):
    x = images.astype(np.float32)
  else:
    images = _as_image_list(images)
    rows = []
    for i, im in enumerate(images):
      a = im if hasattr(im, "convert") else np.asarray(im)
      if isinstance(a, np.ndarray):
        if np.issubdtype(a.dtype, np.floating):
          rows.append(a.astype(np.float32))
          continue
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
          raise ProclipError(f"Image {i}: expected a PIL image, a uint8 HWC RGB array or a "
                             f"normalised float array; got {a.dtype} {a.shape}.")
      rows.append(transforms.eval_transform(a, size))
    if not rows:
      raise ProclipError("Nothing to encode: no images given.")
    x = np.stack(rows)
  if x.ndim != 4 or x.shape[1:] != (size, size, 3):
    raise ProclipError(f"Pre-normalised images must be [N, {size}, {size}, 3], got {x.shape}.")
  return x


# --------------------------------------------------------------------------- ProCLIP

class ProCLIP:
  """A ProCLIP model (image tower + adapter) with an optional text embedder.

  Attributes:
    config: the ``ProCLIPConfig``.
    params: ``{"visual", "adapter", "logit_scale"}`` (host arrays).
    embedder: the loaded ``Embedder`` (None: only cached features can be encoded).
    embedder_path: where the embedder was loaded from (recorded by :meth:`save`).
    mesh: default mesh for encoding (None: the default device).
    logit_scale: float, log of the logit multiplier.
    image_size: the image tower's input side.
  """

  def __init__(self, config, params: Mapping, embedder=None, *, embedder_path: str | None = None,
               batch_size: int = 64, mesh=None, meta: Mapping | None = None):
    if config.vision is not None:
      config = dataclasses.replace(config, vision=runnable_here(config.vision))
    self.config = config
    self.params = jax.tree.map(np.asarray, dict(params))
    bad = storage.nonfinite_leaves(self.params)
    if bad:
      raise ProclipError(f"The ProCLIP parameters {', '.join(bad[:3])}"
                         f"{' ...' if len(bad) > 3 else ''} hold NaN / inf; the checkpoint is "
                         "damaged: load an earlier step or convert it again.")
    self.embedder = embedder
    self.embedder_path = embedder_path
    self.mesh = mesh
    self.meta = dict(meta or {})
    self.batch_size = batch_size
    self.model = ProCLIPModel(config)
    self.logit_scale = float(np.asarray(self.params.get("logit_scale",
                                                        config.logit_scale_init)))
    self.image_size = None if config.vision is None else config.vision.image_size

    def shardings(part):
      def make(mesh):
        return mesh_lib.tree_shardings(self.model.abstract((part,))[part], mesh)
      return make

    self._image_enc = None
    if config.vision is not None and "visual" in self.params:
      self._image_enc = BatchedEncoder(self.model.image_features, self.params["visual"],
                                       batch_size, shardings("visual"))
    if "adapter" not in self.params:
      raise ProclipError("This ProCLIP checkpoint has no adapter parameters.")
    self._text_enc = BatchedEncoder(self.model.text_features, self.params["adapter"],
                                    batch_size, shardings("adapter"))

  def set_params(self, params: Mapping) -> None:
    """Swaps in new parameters of the same shapes (e.g. the trainer's, between evals) without
    recompiling the encoders."""
    self.params = jax.tree.map(np.asarray, dict(params))
    self.logit_scale = float(np.asarray(self.params.get("logit_scale", self.logit_scale)))
    for enc, part in ((self._image_enc, "visual"), (self._text_enc, "adapter")):
      if enc is not None:
        enc.set_params(self.params[part])

  # ----------------------------------------------------------------- loading / saving
  @classmethod
  def load(cls, path: str, *, embedder=None, batch_size: int = 64, mesh=None,
           step: int | None = None) -> "ProCLIP":
    """Loads a converted / saved ProCLIP folder or a training workdir.

    Args:
      path: a ``kind="proclip"`` model folder, or a training workdir.
      embedder: a converted embedder folder or a loaded ``Embedder`` (default: the path
        recorded in the model folder / the training config, if any).
      batch_size: largest batch per compiled call.
      mesh: encode on this mesh (batch split over its data/fsdp axes).
      step: for a workdir, the checkpoint step (default: the latest).
    """
    path = os.fspath(path)
    if not epath.Path(path).exists():   # a local folder or a gs:// workdir
      raise ProclipError(f"ProCLIP.load: {path} does not exist. Pass a converted ProCLIP folder "
                         "(tools/convert.py), a folder saved by ProCLIP.save, or a workdir.")
    if storage.is_model_folder(path):
      meta, params = storage.load_model(path)
      if meta.get("kind") != "proclip":
        raise ProclipError(f"{path} holds a {meta.get('kind')!r} model, not a ProCLIP one; a "
                           "converted CLIP loads with proclip_jax.load_clip (and evaluates "
                           "through proclip_jax.inference.CLIPModelAdapter).")
      config = ProCLIPConfig.from_dict(meta["config"])
      recorded = meta.get("embedder")
    else:
      config, params, recorded, meta = load_workdir(path, step)
    emb, emb_path = resolve_embedder(embedder, recorded, path)
    return cls(config, params, emb, embedder_path=emb_path, batch_size=batch_size, mesh=mesh,
               meta=meta)

  def save(self, out: str, *, embedder: str | None = None, overwrite: bool = False) -> str:
    """Writes a ``kind="proclip"`` folder; ``embedder`` (a path) is recorded for ``load``."""
    emb = embedder if embedder is not None else self.embedder_path
    extra = {"embedder": paths.absolute(emb)} if emb is not None else {}
    return storage.save_model(out, "proclip", self.config.to_dict(), self.params, overwrite=overwrite,
                      **extra)

  # ----------------------------------------------------------------- encoders
  def encode_images(self, images, *, batch_size: int | None = None, mesh=None) -> np.ndarray:
    """Unit-norm float32 ``[N, E]`` image embeddings (see the module docstring for inputs);
    one image (a PIL image or an HWC array) gives ``[1, E]``."""
    if self._image_enc is None:
      raise ProclipError("This ProCLIP model has no image tower (a stage-1, adapter-only "
                         "checkpoint); load a stage-2 or converted full model.")
    x = preprocess_images(images, self.image_size)
    return self._image_enc(x, mesh if mesh is not None else self.mesh, batch_size)

  def encode_text_features(self, llm_features, *, batch_size: int | None = None,
                           mesh=None) -> np.ndarray:
    """Adapter on LLM-embedder features ``[N, D]`` (e.g. from a cache) -> unit-norm ``[N, E]``."""
    feats = np.asarray(llm_features, np.float32)
    if feats.ndim != 2 or feats.shape[1] != self.config.adapter.in_dim:
      raise ProclipError(f"LLM features must be [N, {self.config.adapter.in_dim}], got "
                         f"{feats.shape}; was the cache made with another embedder?")
    return self._text_enc(feats, mesh if mesh is not None else self.mesh, batch_size)

  def embed_texts(self, texts: Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
    """The raw LLM-embedder features of ``texts`` (before the adapter)."""
    if self.embedder is None:
      raise ProclipError("No text embedder: pass embedder=PATH to ProCLIP.load (a converted "
                         "embedder folder, `python tools/convert.py LLM_DIR OUT`).")
    if isinstance(texts, str):
      raise ProclipError("encode_texts takes a list of strings, not a single string.")
    feats = self.embedder.embed(list(texts), batch_size=batch_size or self.batch_size)
    if feats.shape[1] != self.config.adapter.in_dim:
      raise ProclipError(f"The embedder gives {feats.shape[1]}-dim features but the adapter "
                         f"reads {self.config.adapter.in_dim}; use the embedder it was trained "
                         "with.")
    return feats

  def encode_texts(self, texts: Sequence[str], *, batch_size: int | None = None,
                   mesh=None) -> np.ndarray:
    """Unit-norm float32 ``[N, E]``: embedder (template, LLM, pooling) then the adapter."""
    return self.encode_text_features(self.embed_texts(texts, batch_size=batch_size),
                                     batch_size=batch_size, mesh=mesh)

  # ----------------------------------------------------------------- helpers
  def zero_shot_classifier(self, class_names: Sequence[str], templates: Sequence[str]
                           ) -> np.ndarray:
    """``[C, E]``: normalize(mean over templates of the normalised template embeddings)."""
    return zero_shot_classifier(self, class_names, templates)

  def similarity(self, image_embs, text_embs) -> np.ndarray:
    return similarity(image_embs, text_embs)

  def rank(self, query_text: str, image_embs, k: int = 5):
    return rank(self, query_text, image_embs, k)


def resolve_embedder(embedder, recorded, where):
  """``(Embedder or None, its path)`` from ``embedder=`` (a loaded one or a folder) or the
  path ``recorded`` with the model in ``where`` (a folder that is gone is an error)."""
  if embedder is not None and not isinstance(embedder, (str, os.PathLike)):
    return embedder, getattr(embedder, "path", None)
  path = embedder if embedder is not None else recorded
  if path is None:
    return None, None
  path = os.fspath(path)
  if not epath.Path(path).is_dir():   # a local folder or gs://
    raise ProclipError(f"The text embedder {path} (recorded in {where}) does not exist; pass "
                       "embedder=PATH (--embedder) to a converted embedder folder.")
  return load_embedder(path), path


def load_workdir(path: str, step: int | None):
  """``(config, params, embedder path, meta)`` from a training workdir's checkpoint.

  The layout is ``proclip_jax.storage``'s: ``WORKDIR/checkpoints/STEP/{state, metadata}``.
  The model config comes from the metadata's ``config.model``; the parameters are
  ``merge(state.params, state.frozen)`` (the EMA teacher and the optimizer are not read).
  The embedder is ``config.embedder_path`` when the run recorded one, else the ``path`` in
  the manifest of the run's LLM cache (``config.cache.llm``), when that folder exists.
  """
  steps = storage.complete_steps(path)
  if not steps:
    raise ProclipError(
        f"{path} is neither a model folder (no model.json) nor a training workdir with a "
        f"checkpoint ({storage.checkpoint_dir(path)} has none). Pass a converted ProCLIP "
        "folder, a folder written by ProCLIP.save, or the --workdir of a run that saved a "
        "checkpoint.")
  if step is not None and step not in steps:
    raise ProclipError(f"{path} has no checkpoint of step {step}; it has {steps}.")
  # The latest step unless one was asked for; a damaged one (unreadable, checksum, NaN) is
  # skipped for the one before it, with a warning naming both (the workdir is not changed).
  tries = [step] if step is not None else steps[::-1]
  for i, step in enumerate(tries):
    try:
      cfg, params = _read_step(path, step)
      break
    except storage.CorruptCheckpoint as e:
      if i + 1 == len(tries):
        raise ProclipError(f"{e} No readable checkpoint left in {path}"
                           f"{' (asked for step %d)' % step if len(tries) == 1 else ''}.") from None
      warnings.warn(f"{e} Using step {tries[i + 1]} instead.", stacklevel=3)
  config = ProCLIPConfig.from_dict(cfg["model"])
  emb = cfg.get("embedder_path") or None
  cache = (cfg.get("cache") or {}).get("llm") if isinstance(cfg.get("cache"), Mapping) else None
  if emb is None and cache:
    manifest = epath.Path(cache, "manifest.json")
    if manifest.is_file():
      emb = (json.loads(manifest.read_text()).get("model") or {}).get("path") or None
    if emb is not None and not epath.Path(emb).is_dir():
      emb = None
  return config, params, emb, {"kind": "workdir", "step": step, "stage": cfg.get("stage"),
                               "workdir": os.fspath(path)}


def _read_step(path: str, step: int):
  """``(config dict, merged params)`` of checkpoint ``step`` (CorruptCheckpoint if damaged)."""
  step_dir = storage.checkpoint_dir(path) / str(step)
  try:
    cfg = dict(storage.read_metadata(path, step).get("config") or {})
  except Exception as e:  # pylint: disable=broad-except
    if storage.is_unavailable(e):
      raise storage.StorageUnavailable(f"{step_dir}: its metadata cannot be read now "
                                       f"({storage.first_line(e)}).") from e
    raise storage.CorruptCheckpoint(f"{step_dir}: its metadata cannot be read "
                                    f"({storage.first_line(e)}); the checkpoint is damaged.") from e
  if "model" not in cfg:
    raise ProclipError(f"The checkpoint {step_dir} has no config.model in its metadata; it "
                       "was not written by experiments/run.py.")
  out = storage.restore_state_params(path, step)
  return cfg, merge(out.get("params", {}), out.get("frozen", {}))


def check_finite(x, what: str) -> np.ndarray:
  """``x`` as float32, or a ProclipError when it holds NaN / inf (never a ``nan`` score)."""
  x = np.asarray(x, np.float32)
  if not np.isfinite(x).all():
    rows = np.flatnonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)) if x.ndim else []
    raise ProclipError(f"{what} hold non-finite values (NaN / inf; rows {list(rows[:10])}); "
                       "the model or its inputs are damaged: check the checkpoint and the "
                       "embedder.")
  return x


# --------------------------------------------------------------------------- functions

def zero_shot_classifier(model, class_names: Sequence[str], templates: Sequence[str]
                         ) -> np.ndarray:
  """Class embeddings ``[C, E]`` for any model with ``encode_texts`` (prompt ensemble)."""
  class_names, templates = list(class_names), list(templates)
  if not class_names or not templates:
    raise ProclipError("zero_shot_classifier needs at least one class name and one template.")
  bad = [t for t in templates if "{}" not in t]
  if bad:
    raise ProclipError(f"Templates must contain '{{}}' for the class name: {bad[:3]}.")
  texts = [t.format(c) for c in class_names for t in templates]
  emb = model.encode_texts(texts)
  return metrics.zero_shot_classifier(emb.reshape(len(class_names), len(templates), -1))


def similarity(image_embs, text_embs) -> np.ndarray:
  """Cosine similarities ``[N_images, N_texts]`` (float32) of two embedding arrays."""
  a, b = check_finite(image_embs, "The image embeddings"), check_finite(text_embs,
                                                                        "The text embeddings")
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ProclipError(f"similarity: expected [N, E] and [M, E], got {a.shape} and {b.shape}.")
  a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  return a @ b.T


def rank(model, query_text: str, image_embs, k: int = 5):
  """``(indices, scores)`` of the ``k`` images closest to the text query (best first; ties
  by lower index)."""
  if not isinstance(query_text, str):
    raise ProclipError("rank: query_text must be one string.")
  q = model.encode_texts([query_text])
  s = similarity(q, image_embs)[0]
  k = min(int(k), len(s))
  order = np.argsort(-s, kind="stable")[:k]
  return order, s[order]


# --------------------------------------------------------------------------- CLIP

class CLIPModelAdapter:
  """A converted CLIP (``load_clip``) behind the ProCLIP inference interface.

  ``encode_images`` takes what :meth:`ProCLIP.encode_images` takes; ``encode_texts`` uses
  the CLIP BPE tokenizer and text tower (77 tokens). Encoding runs through the CLIP's own
  batched encoders (``LoadedCLIP.image_encoder`` / ``text_encoder``).
  """

  def __init__(self, clip, *, batch_size: int = 64, mesh=None):
    self.clip = clip
    self.config = clip.config
    self.mesh = mesh
    self.batch_size = check_batch_size(batch_size)
    self.logit_scale = clip.logit_scale
    self.image_size = None if clip.config.vision is None else clip.config.vision.image_size

  @classmethod
  def load(cls, path: str, **kwargs) -> "CLIPModelAdapter":
    return cls(load_clip(path), **kwargs)

  def encode_images(self, images, *, batch_size: int | None = None, mesh=None) -> np.ndarray:
    if self.clip.image_encoder is None:
      raise ProclipError("This CLIP has no image tower.")
    x = preprocess_images(images, self.image_size)
    return self.clip.image_encoder(x, mesh if mesh is not None else self.mesh,
                                   batch_size or self.batch_size)

  def encode_texts(self, texts: Sequence[str], *, batch_size: int | None = None,
                   mesh=None) -> np.ndarray:
    if self.clip.text_encoder is None:
      raise ProclipError("This CLIP has no text tower.")
    if isinstance(texts, str):
      raise ProclipError("encode_texts takes a list of strings, not a single string.")
    ids = self.clip.tokenize(list(texts))
    return self.clip.text_encoder(ids, mesh if mesh is not None else self.mesh,
                                  batch_size or self.batch_size)

  def zero_shot_classifier(self, class_names, templates) -> np.ndarray:
    return zero_shot_classifier(self, class_names, templates)

  def similarity(self, image_embs, text_embs) -> np.ndarray:
    return similarity(image_embs, text_embs)

  def rank(self, query_text: str, image_embs, k: int = 5):
    return rank(self, query_text, image_embs, k)


def load_any(path: str, *, embedder=None, batch_size: int = 64, mesh=None):
  """ProCLIP for a ProCLIP folder or workdir, CLIPModelAdapter for a converted CLIP."""
  if storage.is_model_folder(path) and storage.read_model_json(path).get("kind") == "clip":
    return CLIPModelAdapter.load(path, batch_size=batch_size, mesh=mesh)
  return ProCLIP.load(path, embedder=embedder, batch_size=batch_size, mesh=mesh)
