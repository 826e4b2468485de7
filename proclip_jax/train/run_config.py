"""The run's config as its files fix it: model shapes read once, resumes checked for changes.

A stage config names paths (``config.cache.*``, ``config.init.*``); the model's shapes come
from the files those paths hold. :func:`resolve_model` reads them once, before the trainer
builds anything::

    stage 1   model.adapter.in_dim   <- config.cache.llm   manifest.json "dim"
              model.adapter.out_dim  <- config.cache.clip  manifest.json "dim"
              cache.preset           <- config.cache.llm   manifest.json "preset_name"
              init.clip_sha256       <- config.cache.clip  manifest.json model.fingerprint
                                        (the CLIP whose text tower is the teacher)
    stage 2   model.vision           <- config.init.clip   model.json config.vision (the
                                        architecture; dtype, scan_layers, remat and
                                        attention stay the config's run options)
              model.adapter.out_dim  <- the image tower's embed_dim
              model.adapter.in_dim   <- config.cache.llm   manifest.json "dim" (or, with an
                                        in-memory cache, the stage-1 run's adapter)
              cache.preset           <- as in stage 1
              init.clip_sha256       <- config.init.clip   model.json params_sha256

A field the config leaves unset (None, or "" for the strings) is filled; one it states must
equal the file's value, else a ProclipError names the field, the file and the fix. Stage 2
also refuses an ``init.clip`` other than the CLIP that taught the stage-1 run
(``init.clip_sha256`` recorded in the stage-1 workdir's config.json).

:func:`check_resume` compares a resumed run's config with the one its workdir recorded:
changes to loop-only fields (:data:`LOOP_ONLY`) are reported and allowed; any other change
is refused, one line per field, unless ``config.allow_config_change`` is True.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Mapping

from etils import epath

from proclip_jax.errors import ProclipError

log = logging.getLogger(__name__)

CONFIG_JSON = "config.json"
# Image-tower options that are the run's choice, not the converted tower's architecture.
VISION_RUN_OPTIONS = ("dtype", "remat", "scan_layers", "attention")
# Fields a resumed run may change freely: they steer the loop, not what a step computes
# (total_steps moves the end of the learning-rate schedule, which is said when it changes).
LOOP_ONLY = ("total_steps", "log_every", "ckpt_every", "max_to_keep", "progress", "evals",
             "distributed", "compilation_cache_dir", "allow_config_change",
             "data.worker_count", "data.read_threads", "data.prefetch_batches",
             "data.worker_buffer_size")


def _unset(value) -> bool:
  return value is None or value == ""


def _manifest(path: str, name: str, what: str) -> dict:
  """The manifest of the cache ``config.cache.<name>`` (errors name the field and the fix)."""
  from proclip_jax.data.cache import read_manifest  # pylint: disable=import-outside-toplevel
  if not path:
    raise ProclipError(
        f"config.cache.{name} is not set: the run reads the {what} (and their size) from a "
        "cache. Write one with `python tools/precompute.py --data DATA --model MODEL "
        f"--fields ... --out CACHE` and set config.cache.{name}=CACHE.")
  return read_manifest(path)


def _fill(node, key: str, value, field: str, source: str, fix: str) -> None:
  """Sets ``node[key]`` to ``value`` when unset; refuses a stated value that differs."""
  have = node.get(key)   # a config made without the field (not from base_config) gets it
  if _unset(have):
    node[key] = value
  elif have != value:
    raise ProclipError(f"config.{field}={have!r} does not match {source}, which says "
                       f"{value!r}. {fix}")


def _stage1_config(workdir: str) -> dict:
  """The resolved config a stage-1 workdir recorded ({} when it has none)."""
  p = epath.Path(workdir) / CONFIG_JSON
  if not p.exists():
    return {}
  try:
    return json.loads(p.read_text())
  except (json.JSONDecodeError, OSError):
    return {}


def _resolve_llm(c, caches) -> None:
  """adapter.in_dim and cache.preset from the LLM cache's manifest."""
  if "llm" in caches:   # an in-memory provider replaces the files
    return
  path = c.cache.llm
  if not _unset(c.model.adapter.in_dim) and not (path and epath.Path(path).exists()):
    return   # stated, and nothing to check it against yet (the data pipeline reports it)
  m = _manifest(path, "llm", "LLM-embedder features")
  src = os.path.join(path, "manifest.json")
  _fill(c.model.adapter, "in_dim", int(m["dim"]), "model.adapter.in_dim",
        f"the LLM cache {src} (dim: the embedder's feature size)",
        "The adapter's input width is the embedder's feature size: drop the override of "
        "model.adapter.in_dim (it is read from the cache), or point config.cache.llm at the "
        "cache of the embedder you mean.")
  if m.get("preset_name"):
    _fill(c.cache, "preset", m["preset_name"], "cache.preset",
          f"the LLM cache {src} (preset_name: the embedder preset it was written with)",
          "Use a config for that embedder (or --config.cache.preset='' to take the cache's), "
          "or point config.cache.llm at a cache of the intended embedder.")


def _resolve_stage1(c, caches) -> None:
  _resolve_llm(c, caches)
  if "clip" in caches:
    return
  path = c.cache.clip
  if not _unset(c.model.adapter.out_dim) and not (path and epath.Path(path).exists()):
    return
  m = _manifest(path, "clip", "CLIP text-tower features (the teacher)")
  src = os.path.join(path, "manifest.json")
  _fill(c.model.adapter, "out_dim", int(m["dim"]), "model.adapter.out_dim",
        f"the CLIP text cache {src} (dim: the CLIP's joint embedding size E)",
        "The adapter's output width is the teaching CLIP's embedding size: drop the "
        "override of model.adapter.out_dim, or point config.cache.clip at the right cache.")
  fp = (m.get("model") or {}).get("fingerprint")
  if fp:
    _fill(c.init, "clip_sha256", fp, "init.clip_sha256",
          f"the CLIP text cache {src} (model.fingerprint: the CLIP that wrote it)",
          "Point config.cache.clip at a cache written by the intended CLIP.")


def require_init_clip(path: str) -> None:
  """Refuses an unset or missing ``config.init.clip``, with the command that makes it."""
  if not path:
    raise ProclipError("config.init.clip is not set: stage 2 starts from (and takes its image "
                       "tower's shape from) a converted CLIP. Convert one with `python "
                       "tools/convert.py SRC OUT` and set config.init.clip=OUT.")
  if not epath.Path(path).exists():
    raise ProclipError(f"config.init.clip={path!r} does not exist. Convert the pretrained "
                       f"CLIP with `python tools/convert.py SRC {path}` (SRC: an OpenAI .pt, "
                       "an open_clip or a Hugging Face CLIP).")


def _resolve_vision(c) -> None:
  """model.vision from the converted CLIP named by config.init.clip."""
  from proclip_jax.data.cache import model_fingerprint  # pylint: disable=import-outside-toplevel
  from proclip_jax.storage import read_model_json  # pylint: disable=import-outside-toplevel
  path = c.init.clip
  require_init_clip(path)
  meta = read_model_json(path)
  src = os.path.join(path, "model.json")
  vision = (meta.get("config") or {}).get("vision")
  if meta.get("kind") not in ("clip", "proclip") or not vision:
    raise ProclipError(f"config.init.clip={path!r} holds no CLIP image tower ({src}: kind "
                       f"{meta.get('kind')!r}); name a folder written by tools/convert.py "
                       "from a CLIP (or a ProCLIP / LLM2CLIP release).")
  stated = c.model.vision
  stated = {} if stated is None else dict(stated.items())
  out = dict(vision)
  for key, value in stated.items():
    if key in VISION_RUN_OPTIONS:
      out[key] = value
    elif not _unset(value) and vision.get(key) != value:
      raise ProclipError(
          f"config.model.vision.{key}={value!r} does not match the converted CLIP {src} "
          f"(config.vision.{key} = {vision.get(key)!r}). The image tower's shape is read from "
          "config.init.clip: drop the model.vision override (or the size= argument that "
          "set it), or point config.init.clip at the CLIP you mean.")
  c.model.vision = out
  fp = model_fingerprint(path)
  _fill(c.init, "clip_sha256", fp, "init.clip_sha256", f"the converted CLIP {src} "
        "(params_sha256)", "Leave init.clip_sha256 unset: it is recorded from init.clip.")


def _check_teacher(c) -> None:
  """Refuses an init.clip other than the CLIP whose text tower taught the stage-1 run."""
  s1 = c.init.stage1_workdir
  if not s1:
    return
  taught = (_stage1_config(s1).get("init") or {}).get("clip_sha256")
  mine = c.init.get("clip_sha256")
  if taught and mine and taught != mine:
    raise ProclipError(
        f"config.init.clip={c.init.clip!r} (weights {mine[:12]}...) is not the CLIP that "
        f"taught the stage-1 run {s1} (its text cache came from weights {taught[:12]}..., "
        f"{os.path.join(s1, CONFIG_JSON)} init.clip_sha256). Stage 2 must start from the "
        "same CLIP: set config.init.clip to it, or run stage 1 again with this CLIP's text "
        "cache.")


def _resolve_stage2(c, caches) -> None:
  _resolve_vision(c)
  _check_teacher(c)
  e = c.model.vision.get("embed_dim")
  if e is None:
    raise ProclipError(f"The converted CLIP {c.init.clip} has an image tower without a "
                       "projection (embed_dim None); ProCLIP needs the joint embedding.")
  _fill(c.model.adapter, "out_dim", int(e), "model.adapter.out_dim",
        f"the converted CLIP {os.path.join(c.init.clip, 'model.json')} (config.vision."
        "embed_dim)", "The adapter's output width is the image tower's embedding size: drop "
        "the override of model.adapter.out_dim.")
  if "llm" in caches and _unset(c.model.adapter.in_dim) and c.init.stage1_workdir:
    a = ((_stage1_config(c.init.stage1_workdir).get("model") or {}).get("adapter") or {})
    if a.get("in_dim"):
      c.model.adapter.in_dim = int(a["in_dim"])
  _resolve_llm(c, caches)


def resolve_model(config: Any, caches: Mapping[str, Any] | None = None) -> Any:
  """A copy of ``config`` with the model's shapes (and the recorded fingerprints) filled.

  ``caches``: the trainer's in-memory providers (``{"llm", "clip"}``), which replace the
  cache folders; their shapes are then the config's to state. Raises ProclipError when a
  stated field disagrees with its file (naming both) or a needed file is missing.
  """
  from proclip_jax.train.state import stage_of  # pylint: disable=import-outside-toplevel
  stage = stage_of(config)
  c = copy.deepcopy(config)
  caches = dict(caches or {})
  locked = getattr(c, "is_locked", False)
  if locked:
    c.unlock()
  if stage == 1:
    _resolve_stage1(c, caches)
  else:
    _resolve_stage2(c, caches)
  for key in ("in_dim", "out_dim"):
    if _unset(c.model.adapter[key]):
      raise ProclipError(f"config.model.adapter.{key} is not set and no file gives it (the "
                         "caches were replaced by in-memory providers); state it.")
  if stage == 1 and len(tuple(c.stage1.fields)) == 1:
    # One caption field (e.g. img2dataset's "caption"): it stands for both of the
    # instance term's fields; the structure term uses it once.
    c.stage1.fields = tuple(c.stage1.fields) * 2
  if locked:
    c.lock()
  return c


# ------------------------------------------------------------------------ resuming

def _flat(d: Any, prefix: str = "") -> dict:
  out = {}
  if isinstance(d, Mapping):
    for k, v in d.items():
      name = f"{prefix}.{k}" if prefix else str(k)
      if isinstance(v, Mapping) and v and not name == "evals":
        out.update(_flat(v, name))
      else:
        out[name] = v
  return out


def _loop_only(field: str) -> bool:
  return any(field == f or field.startswith(f + ".") for f in LOOP_ONLY)


def config_changes(saved: Mapping, new: Mapping) -> list[tuple[str, Any, Any]]:
  """``[(field, saved value, new value)]`` for every dotted field that differs."""
  a, b = _flat(saved), _flat(new)
  missing = object()
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, missing), b.get(k, missing)
    if va != vb:
      out.append((k, None if va is missing else va, None if vb is missing else vb))
  return out


def check_resume(workdir, new: Mapping, allow: bool) -> list[str]:
  """Compares ``new`` (a config dict) with ``WORKDIR/config.json``; returns the notes.

  Loop-only changes are allowed and listed; others raise ProclipError (one line per
  field) unless ``allow``. Nothing to compare (a new workdir) returns [].
  """
  p = epath.Path(workdir) / CONFIG_JSON
  if not p.exists():
    return []
  try:
    saved = json.loads(p.read_text())
  except (json.JSONDecodeError, OSError):
    return [f"{p} cannot be read; it is written again."]
  changes = config_changes(saved, new)
  fmt = lambda k, a, b: f"  {k}: {a!r} -> {b!r}"  # noqa: E731
  loop = [fmt(*ch) for ch in changes if _loop_only(ch[0])]
  other = [fmt(*ch) for ch in changes if not _loop_only(ch[0])]
  if other and not allow:
    raise ProclipError(
        f"The config differs from the one {workdir} was started with ({p}):\n"
        + "\n".join(other) + "\nThese fields change what a step computes. Resume with the "
        "original config, use a new --workdir, or pass --config.allow_config_change=True to "
        "continue with the new values.")
  notes = []
  if loop:
    notes.append("Loop-only config changes since the run started (allowed):\n"
                 + "\n".join(loop))
  if other:
    notes.append("Config changes allowed by config.allow_config_change:\n" + "\n".join(other))
  if any(ch[0] == "total_steps" for ch in changes):
    notes.append("total_steps changed: the learning-rate schedule now ends at the new total.")
  return notes


def prepare(config: Any, workdir, caches: Mapping[str, Any] | None = None,
            source: Any = None) -> Any:
  """The trainer's first step: the resolved config, checked against a resumed run's, recorded.

  ``source`` is the trainer's in-memory data (else ``config.data.path`` must hold a built
  dataset). Returns :func:`resolve_model`'s config. When ``workdir`` holds a checkpoint, its
  config.json is compared (:func:`check_resume`); then process 0 writes the resolved config
  to ``WORKDIR/config.json``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from proclip_jax.storage import latest_step  # pylint: disable=import-outside-toplevel
  from proclip_jax.train.loop import config_to_dict  # pylint: disable=import-outside-toplevel
  from proclip_jax.train.inputs import require_data  # pylint: disable=import-outside-toplevel
  if source is None:   # the dataset is made first: a missing one is said first
    require_data(config)
  config = resolve_model(config, caches)
  plain = config_to_dict(config)
  workdir = epath.Path(workdir)
  if latest_step(workdir) is not None:
    for note in check_resume(workdir, plain, bool(config.get("allow_config_change", False))):
      log.warning("%s", note)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / f"{CONFIG_JSON}.tmp-{os.getpid()}"   # other processes read it whole
    tmp.write_text(json.dumps(plain, indent=1))
    tmp.replace(workdir / CONFIG_JSON)
  return config
