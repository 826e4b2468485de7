"""The precompute driver: captions of a dataset -> an embedding cache (:mod:`.cache`).

::

  precompute(DATA, MODEL, CACHE, split="train", fields=("short", "long"), dtype="float16")

``MODEL`` is a converted folder (``tools/convert.py``): ``kind="embedder"`` gives LLM /
sentence-embedder features (the preset's pooled output, float32, normalised only when the
preset says so); ``kind="clip"`` gives CLIP text-tower features (L2-normalised projected
end-of-text features: the stage-1 teacher targets).

How it runs:

1. Every process reads the split's ids and the requested caption fields, sorts by id and
   checks for empty captions (an error listing their ids, or with ``skip_empty`` rows left
   zero and listed in the manifest).
2. The rows are cut into work units of ``unit_size`` ids; process ``k`` of ``c`` does units
   ``k, k + c, ...``. A unit whose ``parts/unit-*.json`` exists is done and skipped, so a run
   killed at any point and started again with the same arguments resumes; ``parts/plan.json``
   refuses a resume with different arguments.
3. In a unit, each field's captions are sorted by token length and cut into batches of
   ``batch_size`` rows padded to one of a few bucketed lengths (few compiled shapes); a
   jit-compiled forward runs data-parallel over this process's devices (batch split over
   the mesh's ``data``/``fsdp`` axes; the parameters replicated, or sharded by the logical
   axis rules of :mod:`proclip_jax.mesh` with e.g. ``mesh={"data": 1, "fsdp": -1}`` for
   a model that does not fit one device). Results go back to id order, are cast to the
   cache dtype and written as part files (temporary name + rename), then the unit's json.
4. When every unit is done, process 0 merges the parts in unit order into
   ``CACHE/{field}.npy`` and ``CACHE/ids.npy``, writes ``manifest.json`` last and removes
   ``parts/``. The merged bytes depend only on the inputs, so a resumed run's cache is
   byte-identical to an uninterrupted one (with the same devices and batch size).

Captions longer than the model's ``max_length`` are cut (the embedder keeps its template;
CLIP keeps ``<|endoftext|>``) and counted per field in the manifest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from proclip_jax.storage import load_model, read_model_json
from proclip_jax import mesh as M
from proclip_jax.data import cache as C
from proclip_jax.data import paths
from proclip_jax.data.pipeline import open_source
from proclip_jax.errors import ProclipError
from proclip_jax.models import embedder as E
from proclip_jax.models.clip import CLIPConfig
from proclip_jax.models.clip_text import TextTransformer
from proclip_jax.text.clip_tokenizer import ClipTokenizer

DEFAULT_UNIT_SIZE = 4096

# ------------------------------------------------------------------------- the two model kinds

@dataclasses.dataclass
class PrecomputeModel:
  """What the driver needs from a model, whichever kind.

  Attributes:
    kind: "llm" or "clip_text".
    fn: pure ``fn(params, *arrays) -> float32 [B, dim]``.
    params: parameter tree given to ``fn``.
    abstract: boxed ``jax.eval_shape`` of the init of ``params`` (logical axis names).
    dim: feature size.
    max_length: tokens per caption (template / SOT+EOT included).
    lengths: ``texts -> int [n]`` token counts before truncation.
    tokenize: ``texts -> tuple of int32 [n, L]`` arrays (L a bucketed length).
    info: manifest entries (model, preset, template, pooling, normalized, ...).
  """
  kind: str
  fn: Callable
  params: Any
  abstract: Any
  dim: int
  max_length: int
  lengths: Callable[[Sequence[str]], np.ndarray]
  tokenize: Callable[[Sequence[str]], tuple]
  info: dict


def _embedder_model(path: str, meta: dict, max_length: int | None,
                    compute_dtype: str) -> PrecomputeModel:
  preset = E.get_preset(meta.get("preset", "minilm"))
  if max_length is not None:
    preset = dataclasses.replace(preset, max_length=int(max_length))
  emb = E.load_embedder(path, dtype=jnp.dtype(compute_dtype), preset=preset)
  tok = emb.tokenizer
  p = emb.preset

  def lengths(texts):
    full = [tok.prefix + (t.strip() if p.strip else t) + tok.suffix for t in texts]
    encs = tok.tok.encode_batch(full, add_special_tokens=p.add_special_tokens)
    return np.asarray([len(e.ids) for e in encs], np.int64)

  dummy = np.ones((1, 16), np.int32)
  abstract = jax.eval_shape(lambda: emb.model.init(jax.random.PRNGKey(0), dummy, dummy,
                                                   dummy))["params"]
  info = {"model": {"kind": "embedder", "family": emb.config.family,
                    "config": emb.config.to_dict()},
          "preset": p.to_dict(), "preset_name": p.name, "template": p.template,
          "pooling": p.pooling, "normalized": bool(p.normalize), "max_length": p.max_length}
  return PrecomputeModel("llm", emb.embed_tokens, emb.params, abstract, emb.dim, p.max_length,
                         lengths, lambda texts: tok(list(texts)), info)


def _clip_model(path: str, meta: dict, params: Any, max_length: int | None,
                compute_dtype: str) -> PrecomputeModel:
  config = CLIPConfig.from_dict(meta["config"])
  if config.text is None or "text" not in params:
    raise ProclipError(f"The CLIP at {path} has no text tower (converted from an image-only "
                       "checkpoint); CLIP text features need one.")
  tcfg = dataclasses.replace(config.text, dtype=compute_dtype)
  context = tcfg.context_length
  length = context if max_length is None else int(max_length)
  if not 2 <= length <= context:
    raise ProclipError(f"max_length={length} for the CLIP text tower of {path}: it must be in "
                       f"[2, {context}] (its context length).")
  module = TextTransformer(tcfg)
  tok = ClipTokenizer()
  buckets = E.bucket_lengths(length)

  def fn(p, ids):
    x = module.apply({"params": p}, ids).astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  def lengths(texts):
    return np.asarray([len(tok.encode(t)) + 2 for t in texts], np.int64)

  def tokenize(texts):
    rows = [[tok.sot_id] + tok.encode(t)[:length - 2] + [tok.eot_id] for t in texts]
    longest = max(len(r) for r in rows)
    width = next(b for b in buckets if b >= longest)
    ids = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
      ids[i, :len(r)] = r
    return (ids,)

  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                                np.zeros((1, 2), np.int32)))["params"]
  dim = tcfg.embed_dim if tcfg.embed_dim is not None else tcfg.width
  info = {"model": {"kind": "clip", "family": meta.get("family", "clip"),
                    "config": config.to_dict()},
          "preset": None, "preset_name": None, "template": "{text}",
          "pooling": "eot", "normalized": True, "max_length": length}
  return PrecomputeModel("clip_text", fn, params["text"], abstract, int(dim), length, lengths,
                         tokenize, info)


def load_precompute_model(path: str, *, max_length: int | None = None,
                          compute_dtype: str = "float32") -> PrecomputeModel:
  """A converted embedder (``kind="embedder"``) or CLIP (``kind="clip"``) folder, ready to run.

  Args:
    path: the converted folder.
    max_length: tokens per caption (default: the preset's, or CLIP's context length).
    compute_dtype: "float32" or "bfloat16" matmuls (parameters stay float32).
  """
  if compute_dtype not in ("float32", "bfloat16"):
    raise ProclipError(f"compute_dtype={compute_dtype!r}: use float32 or bfloat16.")
  path = paths.absolute(path)
  meta = read_model_json(path)
  kind = meta.get("kind")
  if kind == "embedder":
    m = _embedder_model(path, meta, max_length, compute_dtype)
  elif kind == "clip":
    _, params = load_model(path, kind="clip")
    m = _clip_model(path, meta, params, max_length, compute_dtype)
  else:
    raise ProclipError(f"{path} holds a {kind!r} model; precompute needs a converted text "
                       "embedder (kind 'embedder') or CLIP (kind 'clip'). Convert one with "
                       "`python tools/convert.py SRC OUT`.")
  # Of the weights as saved (what training's cache check compares), not of m.params, whose
  # kernels may be in the compute dtype.
  m.info["model"]["fingerprint"] = C.model_fingerprint(path)
  m.info["model"]["path"] = path
  m.info["compute_dtype"] = compute_dtype
  return m


# ------------------------------------------------------------------------- reading captions

def _text(v) -> str:
  if isinstance(v, np.ndarray):
    v = v.item()
  if isinstance(v, bytes):
    return v.decode("utf-8")
  return str(v)


def read_captions(data: str, split: str, fields: Sequence[str], *, chunk: int = 1024,
                  progress: bool = False) -> tuple[np.ndarray, dict[str, list[str]]]:
  """``(ids int64 [N], {field: [N captions]})`` of a built dataset split, in record order."""
  source = open_source(data, split)
  n = len(source)
  if n == 0:
    raise ProclipError(f"The split {split!r} of {data} is empty.")
  first = source[0]
  missing = [f for f in fields if f not in first]
  if missing:
    raise ProclipError(f"The dataset {data} (split {split!r}) has no caption field(s) {missing}; "
                       f"its fields are {sorted(first)}.")
  ids = np.empty(n, np.int64)
  caps = {f: [] for f in fields}
  getitems = getattr(source, "__getitems__", None)
  with tqdm(total=n, desc=f"read {split}", unit="ex", disable=not progress) as bar:
    for s in range(0, n, chunk):
      keys = list(range(s, min(s + chunk, n)))
      exs = list(getitems(keys)) if getitems else [source[k] for k in keys]
      for k, ex in zip(keys, exs):
        ids[k] = int(np.asarray(ex["id"]))
        for f in fields:
          caps[f].append(_text(ex[f]))
      bar.update(len(keys))
  return ids, caps


def _list_ids(ids, limit: int = 20) -> str:
  ids = list(ids)
  return f"{ids[:limit]}{' ...' if len(ids) > limit else ''}"


# ------------------------------------------------------------------------- devices

# Rows of a batch that each CPU device should get at least when the CPU is split ("auto").
MIN_ROWS_PER_CPU_DEVICE = 32


def cpu_device_count(batch_size: int, cores: int | None = None) -> int:
  """The "auto" count of :func:`split_cpu`: one XLA device per core, each with at least
  ``MIN_ROWS_PER_CPU_DEVICE`` rows of a ``batch_size`` batch (1: leave the CPU whole)."""
  cores = len(os.sched_getaffinity(0)) if cores is None else int(cores)
  return max(1, min(cores, int(batch_size) // MIN_ROWS_PER_CPU_DEVICE))


def split_cpu(devices: int | str | None, batch_size: int) -> int | None:
  """Makes JAX's CPU backend ``devices`` XLA devices, for the data-parallel forward.

  XLA runs parts of one CPU device's program on one thread (the attention's batched
  products among them); with one device per core, the pieces of a batch run side by side,
  which makes the precompute forward faster in float32 and bfloat16 (``docs/performance.md``,
  "Why the code is shaped so"). Training keeps one device: there, more devices made the step
  slower.

  Args:
    devices: the count (an int or its text, as a command line gives it), or None / "auto"
      for :func:`cpu_device_count` of ``batch_size``.
    batch_size: rows per forward.

  Returns:
    The count set, or None where nothing changed: "auto" leaves the CPU whole when the user
    already chose a count (``JAX_NUM_CPU_DEVICES``, ``--xla_force_host_platform_device_count``)
    or JAX's backends have started. Only the CPU backend is affected; on a GPU or TPU host
    the accelerator stays the default backend.
  """
  if devices is None or devices == "auto":
    chosen = (jax.config.jax_num_cpu_devices >= 0 or
              "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""))
    devices = cpu_device_count(batch_size)
    if chosen or devices == 1:
      return None
    try:
      jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError:  # backends already started (e.g. a caller that used JAX before)
      return None
    return devices
  try:
    devices = int(devices)
    if devices < 1:
      raise ValueError
  except (TypeError, ValueError):
    raise ProclipError(f"CPU devices {devices!r}: give auto or a positive count.") from None
  try:
    jax.config.update("jax_num_cpu_devices", devices)
  except RuntimeError as e:
    if len(jax.devices("cpu")) == devices:  # started already, with that count
      return devices
    raise ProclipError(f"Cannot split the CPU into {devices} devices: JAX has already started "
                       "its backends in this process. Set it before any JAX operation, or "
                       f"start the process with JAX_NUM_CPU_DEVICES={devices}.") from e
  return devices


def build_forward(model: PrecomputeModel, mesh_spec, devices):
  """(jitted fn, placed params, batch sharding, batch divisor) over this process's devices."""
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = M.make_mesh(mesh_spec or {"data": -1}, devices)
  param_shardings = M.tree_shardings(model.abstract, mesh)
  try:
    params = jax.device_put(model.params, param_shardings)
  except ValueError as e:
    raise ProclipError(f"The model's parameters do not match its abstract tree ({e}).") from e
  return (jit_in_mesh(model.fn, mesh), params, M.batch_sharding(mesh), M.batch_divisor(mesh))


def jit_in_mesh(fn: Callable, mesh, rules=None) -> Callable:
  """``jax.jit(fn)`` called (and ``.lower``-ed) inside ``mesh`` and the logical axis rules, so
  the model's activation constraints (``mesh.constrain``) keep activations split over the
  batch axes."""
  jitted = jax.jit(fn)

  def call(*args):
    with jax.set_mesh(mesh), M.axis_rules(rules):
      return jitted(*args)

  def lower(*args):
    with jax.set_mesh(mesh), M.axis_rules(rules):
      return jitted.lower(*args)
  call.lower = lower
  return call


@dataclasses.dataclass
class _Forward:
  """The jitted model over this process's devices, fed batches of exactly ``rows`` rows."""
  fn: Callable
  params: Any
  sharding: Any
  rows: int

  def submit(self, arrays: tuple) -> jax.Array:
    """Starts the forward of tokenised ``arrays`` and returns without waiting for it.

    Fewer than ``rows`` rows are padded by repeating the last (a valid input); the caller
    drops the padding's outputs.
    """
    pad = self.rows - arrays[0].shape[0]
    if pad:
      arrays = tuple(np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in arrays)
    return self.fn(self.params, *[jax.device_put(a, self.sharding) for a in arrays])


def _forward(model: PrecomputeModel, batch_size: int, mesh_spec, devices) -> _Forward:
  fn, params, sharding, shards = build_forward(model, mesh_spec, devices)
  return _Forward(fn, params, sharding, -(-batch_size // shards) * shards)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------- checking the inputs

def _check_options(fields: Sequence[str], dtype: str, batch_size, unit_size) -> None:
  C.storage_dtype(dtype)
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ProclipError(f"batch_size must be a positive int, got {batch_size!r}.")
  if not isinstance(unit_size, int) or unit_size < 1:
    raise ProclipError(f"unit_size must be a positive int, got {unit_size!r}.")
  if not fields:
    raise ProclipError("No caption fields given; name them with --fields (e.g. short,long).")
  bad = [f for f in fields if not f or "/" in f or f in ("ids", "manifest", C.PARTS_DIR)]
  if bad:
    raise ProclipError(f"Field names {bad} cannot name cache files; rename them.")


def _check_out(out: str, data: str | None, model) -> None:
  """Refuses a cache folder that is, contains or lies inside the dataset or the model folder
  (``overwrite`` deletes the cache folder)."""
  model_path = (model.info.get("model", {}).get("path") if isinstance(model, PrecomputeModel)
                else model)
  paths.check_output_apart(out, [("dataset", data), ("model", model_path)])


def _in_id_order(ids, captions: Mapping[str, Sequence[str]],
                 fields: Sequence[str]) -> tuple[np.ndarray, dict[str, list[str]]]:
  """``(ids int64 sorted, {field: captions in that order})``; the ids must be unique."""
  ids = np.asarray(ids).reshape(-1)
  if ids.dtype.kind not in "iu":
    raise ProclipError(f"Example ids must be integers, got {ids.dtype}.")
  ids = ids.astype(np.int64)
  n = ids.shape[0]
  if n == 0:
    raise ProclipError("No examples to precompute.")
  for f in fields:
    if len(captions[f]) != n:
      raise ProclipError(f"Field {f!r} has {len(captions[f])} captions for {n} ids.")
  order = np.argsort(ids, kind="stable")
  ids = ids[order]
  dup = np.unique(ids[1:][ids[1:] == ids[:-1]])
  if dup.size:
    raise ProclipError(f"Duplicate example ids {_list_ids(dup.tolist())}; ids must be unique.")
  return ids, {f: [str(captions[f][i]) for i in order] for f in fields}


def _empty_captions(ids: np.ndarray, caps: Mapping[str, list[str]],
                    skip_empty: bool) -> dict[str, list[int]]:
  """``{field: ids whose caption is empty}`` (fields without any left out); an error listing
  them unless ``skip_empty``."""
  empty = {f: ids[[not t.strip() for t in texts]].tolist() for f, texts in caps.items()}
  empty = {f: v for f, v in empty.items() if v}
  if empty and not skip_empty:
    listing = "; ".join(f"{f!r}: {len(v)} ids {_list_ids(v)}" for f, v in empty.items())
    raise ProclipError(f"Empty captions ({listing}). Fix the data or pass --skip-empty "
                       "(skipped ids are listed in the manifest and refused on lookup).")
  return empty


# ------------------------------------------------------------------------- the plan

def _plan(model: PrecomputeModel, ids: np.ndarray, caps: Mapping[str, list[str]], *,
          dataset: Mapping[str, Any], dtype: str, unit_size: int, batch_size: int,
          skip_empty: bool, empty: Mapping[str, list[int]]) -> dict:
  """Everything that decides the cache's bytes: the manifest less its ``truncated`` counts.

  Stored as ``parts/plan.json`` so that a resume with other arguments is refused.
  """
  fields = list(caps)
  plan = {
      "format": C.FORMAT, "version": C.VERSION, "kind": model.kind, **model.info,
      "dim": model.dim, "dtype": dtype, "fields": fields, "count": int(ids.shape[0]),
      "unit_size": unit_size, "batch_size": batch_size,
      "dataset": {k: dataset.get(k) for k in ("fingerprint", "split", "path")},
      "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
      "captions_sha256": {f: C.texts_sha256(caps[f]) for f in fields},
      "empty_policy": "skip" if skip_empty else "error",
      "skipped": {f: empty.get(f, []) for f in fields},
      "files": {"ids": C.IDS_FILE, **{f: f"{f}.npy" for f in fields}},
  }
  return json.loads(json.dumps(plan))  # exactly what a JSON round trip gives back


def _unit_json(parts: str, start: int) -> str:
  return os.path.join(parts, f"unit-{start:09d}.json")


def _part_npy(parts: str, field: str, start: int) -> str:
  return os.path.join(parts, f"{field}-{start:09d}.npy")


def _is_complete(out: str, plan: dict) -> bool:
  """Whether ``out`` holds the finished cache of exactly this plan."""
  mpath = os.path.join(out, C.MANIFEST)
  if not epath.Path(mpath).exists():
    return False
  done = C.read_json(mpath)
  return {k: v for k, v in done.items() if k not in ("truncated", "row_checksums")} == plan


def _conflict(out: str, plan: dict) -> str | None:
  """Why ``out`` cannot take this plan's results (None: absent, empty, or this plan's parts).

  Called after :func:`_is_complete`, so a manifest found here is of other arguments.
  """
  root = epath.Path(out)
  plan_path = root / C.PARTS_DIR / "plan.json"
  if (root / C.MANIFEST).exists():
    return (f"{out} already holds a complete cache made with other arguments (model, "
            "dataset, fields, dtype or options)")
  if plan_path.exists():
    if C.read_json(os.fspath(plan_path)) != plan:
      return (f"{out} holds partial results of a run with other arguments (model, dataset, "
              "fields, dtype or options); run that command again to finish it")
    return None
  if root.is_dir() and any(root.iterdir()) and not (root / C.PARTS_DIR).is_dir():
    return f"{out} exists and is not an embedding cache"
  return None


def _start_or_resume(out: str, plan: dict, overwrite: bool) -> str:
  """Makes ``out/parts`` ready for this plan (clearing what ``overwrite`` allows) and
  returns it; every process waits until process 0 has written ``parts/plan.json``."""
  stale = _conflict(out, plan)
  if stale is not None:
    if not overwrite:
      raise ProclipError(f"{stale}; pass --overwrite to replace it or choose another --out.")
    if jax.process_index() == 0:
      epath.Path(out).rmtree()
  _sync("proclip_precompute_clean")
  parts = os.path.join(out, C.PARTS_DIR)
  epath.Path(parts).mkdir(parents=True, exist_ok=True)
  plan_path = os.path.join(parts, "plan.json")
  if jax.process_index() == 0 and not epath.Path(plan_path).exists():
    C.atomic_write_json(plan_path, plan)
  _sync("proclip_precompute_plan")
  return parts


# ------------------------------------------------------------------------- one work unit

def _features(model: PrecomputeModel, forward: _Forward, texts: Sequence[str],
              bar) -> tuple[np.ndarray, int]:
  """float32 ``[len(texts), dim]`` features (empty captions: zero rows) and the number of
  captions cut at ``max_length``.

  Captions go through the model sorted by token length, so a batch pads to few tokens;
  every batch is submitted before the first result is read, so tokenising the next batch
  overlaps the device's work on this one.
  """
  keep = np.asarray([bool(t.strip()) for t in texts])
  kept = np.flatnonzero(keep)
  feats = np.zeros((len(texts), model.dim), np.float32)
  lens = model.lengths([texts[i] for i in kept]) if kept.size else np.zeros(0, int)
  by_len = kept[np.argsort(np.minimum(lens, model.max_length), kind="stable")]
  pending = []
  for b in range(0, by_len.size, forward.rows):
    rows = by_len[b:b + forward.rows]
    pending.append((rows, forward.submit(model.tokenize([texts[i] for i in rows]))))
  for rows, y in pending:
    feats[rows] = np.asarray(y)[:rows.size]
    bar.update(rows.size)
  bar.update(int((~keep).sum()))
  return feats, int((lens > model.max_length).sum())


def _encode_finite(feats: np.ndarray, ids: np.ndarray, field: str, dtype: str) -> np.ndarray:
  """``feats`` in the storage ``dtype``; a ProclipError if a row is not finite there (a NaN
  written to the cache would poison the loss)."""
  encoded = C.encode_rows(feats, dtype)
  finite = np.isfinite(C.decode_rows(encoded, dtype)).all(axis=1)
  if finite.all():
    return encoded
  bad = ids[~finite].tolist()
  overflow = np.isfinite(feats).all(axis=1) & ~finite
  hint = (f" ({int(overflow.sum())} of them overflow {dtype}: use --dtype float32 "
          "or bfloat16)" if overflow.any() else "")
  raise ProclipError(
      f"The model gave non-finite (NaN/inf) {field!r} features for {len(bad)} ids "
      f"{_list_ids(bad)}{hint}; nothing of this unit was written. Check the model "
      f"folder (convert it again) and its --compute-dtype, then rerun "
      "tools/precompute.py (finished units are kept).")


def _run_unit(model: PrecomputeModel, forward: _Forward, ids: np.ndarray,
              caps: Mapping[str, list[str]], start: int, dtype: str, parts: str, bar) -> None:
  """Writes the part files of the unit starting at row ``start``, then its json (the unit is
  done once the json exists)."""
  marker = {}
  for f, texts in caps.items():
    feats, truncated = _features(model, forward, texts, bar)
    C.atomic_save_npy(_part_npy(parts, f, start), _encode_finite(feats, ids, f, dtype))
    marker[f] = {"truncated": truncated}
  C.atomic_write_json(_unit_json(parts, start), marker)


def _unit_finished(start: int) -> None:
  """Called after each unit is on disk. A seam for tests, which replace it to stop a run
  between two units as a kill would."""
  del start


def _run_units(model: PrecomputeModel, forward: _Forward, ids: np.ndarray,
               caps: Mapping[str, list[str]], starts: Sequence[int], *, unit_size: int,
               dtype: str, parts: str, progress: bool) -> None:
  n = ids.shape[0]
  total = sum(min(s + unit_size, n) - s for s in starts) * len(caps)
  bar = tqdm(total=total, desc=f"precompute {model.kind}", unit="cap", smoothing=0.05,
             disable=not progress, dynamic_ncols=True)
  try:
    for s in starts:
      e = min(s + unit_size, n)
      _run_unit(model, forward, ids[s:e], {f: t[s:e] for f, t in caps.items()}, s, dtype,
                parts, bar)
      _unit_finished(s)
  finally:
    bar.close()


# ------------------------------------------------------------------------- the merge

def _merge(out: str, parts: str, plan: dict, ids: np.ndarray, starts: Sequence[int]) -> None:
  """Joins the units' parts into the cache files, writes the manifest last, drops ``parts``."""
  missing = [s for s in starts if not epath.Path(_unit_json(parts, s)).exists()]
  if missing:
    raise ProclipError(f"{len(missing)} work units of {out} are unfinished (e.g. ids from row "
                       f"{missing[0]}); another process failed? Run the command again.")
  fields = plan["fields"]
  truncated = {f: 0 for f in fields}
  for s in starts:
    m = C.read_json(_unit_json(parts, s))
    for f in fields:
      truncated[f] += int(m[f]["truncated"])
  C.atomic_save_npy(os.path.join(out, C.IDS_FILE), ids)
  for f in fields:
    C.merge_parts([_part_npy(parts, f, s) for s in starts], os.path.join(out, f"{f}.npy"),
                  plan["count"], plan["dim"], C.storage_dtype(plan["dtype"]))
  sums = C.write_row_checksums(out, fields, plan["dtype"])
  C.atomic_write_json(os.path.join(out, C.MANIFEST), {**plan, "truncated": truncated,
                                                      "row_checksums": sums})
  epath.Path(parts).rmtree(missing_ok=True)


# ------------------------------------------------------------------------- the driver

def precompute_captions(ids, captions: Mapping[str, Sequence[str]], model, out: str, *,
                        dataset: Mapping[str, Any], dtype: str = "float16",
                        batch_size: int = 64, max_length: int | None = None,
                        skip_empty: bool = False, unit_size: int = DEFAULT_UNIT_SIZE,
                        compute_dtype: str = "float32", mesh: Mapping[str, int] | None = None,
                        devices=None, overwrite: bool = False, progress: bool = True) -> str:
  """Writes the cache ``out`` for given ids and captions (the core of :func:`precompute`).

  Args:
    ids: int [N] unique example ids (any order; the cache is in increasing id order).
    captions: ``{field: N captions}`` aligned with ``ids``.
    model: a converted model folder or a :class:`PrecomputeModel`.
    out: the cache folder.
    dataset: ``{"fingerprint", "split", "path"}`` recorded in the manifest.
    dtype: stored dtype, "float16", "bfloat16" or "float32".
    batch_size: rows per forward (rounded up to a multiple of the batch shards).
    max_length: tokens per caption (default: the preset's / CLIP's context length).
    skip_empty: skip empty captions (zero rows, listed in the manifest) instead of raising.
    unit_size: ids per work unit (the resume granularity).
    compute_dtype: "float32" or "bfloat16" matmuls.
    mesh: ``{"data": -1, "fsdp": 1, "tensor": 1}``-style mesh over this process's devices;
      parameters are sharded by the logical axis rules over fsdp/tensor.
    devices: the devices to use (default: ``jax.local_devices()``).
    overwrite: replace a complete cache, or partial results of different arguments.
    progress: tqdm bar (captions/s, ETA).

  Returns:
    The absolute cache path.
  """
  out = paths.absolute(out)
  _check_out(out, dataset.get("path"), model)
  fields = list(captions)
  _check_options(fields, dtype, batch_size, unit_size)
  ids, caps = _in_id_order(ids, captions, fields)
  empty = _empty_captions(ids, caps, skip_empty)
  if not isinstance(model, PrecomputeModel):
    model = load_precompute_model(model, max_length=max_length, compute_dtype=compute_dtype)
  plan = _plan(model, ids, caps, dataset=dataset, dtype=dtype, unit_size=unit_size,
               batch_size=batch_size, skip_empty=skip_empty, empty=empty)
  if _is_complete(out, plan):
    return out
  parts = _start_or_resume(out, plan, overwrite)

  # Process k of c does units k, k + c, ...; a unit whose json exists is done already.
  starts = list(range(0, ids.shape[0], unit_size))
  mine = starts[jax.process_index()::jax.process_count()]
  todo = [s for s in mine if not epath.Path(_unit_json(parts, s)).exists()]
  if todo:
    _run_units(model, _forward(model, batch_size, mesh, devices), ids, caps, todo,
               unit_size=unit_size, dtype=dtype, parts=parts, progress=progress)
  _sync("proclip_precompute_units")
  if jax.process_index() == 0:
    _merge(out, parts, plan, ids, starts)
  _sync("proclip_precompute_done")
  return out


def precompute(data: str, model, out: str, *, split: str = "train",
               fields: Sequence[str] = ("caption",), progress: bool = True,
               **kwargs) -> str:
  """Precomputes ``model``'s features of ``fields`` of ``data``'s ``split`` into ``out``.

  Args:
    data: a dataset folder from ``tools/build_dataset.py``.
    model: a converted embedder or CLIP folder (or a :class:`PrecomputeModel`).
    out: the cache folder.
    split: the dataset split.
    fields: caption fields.
    progress: progress bars.
    **kwargs: options of :func:`precompute_captions` (dtype, batch_size, max_length,
      skip_empty, unit_size, compute_dtype, mesh, devices, overwrite).

  Returns:
    The absolute cache path.
  """
  if isinstance(fields, str):
    fields = [f for f in fields.split(",") if f]
  fields = list(dict.fromkeys(fields))
  ids, caps = read_captions(data, split, fields, progress=progress)
  dataset = {"fingerprint": C.dataset_fingerprint(data, split), "split": split,
             "path": paths.absolute(data)}
  return precompute_captions(ids, caps, model, out, dataset=dataset, progress=progress,
                             **kwargs)
