"""Shared converter machinery: reading checkpoints safely and checking converted trees.

Reading never runs pickled code: safetensors through ``safe_open(framework="np")``
(bfloat16 through ml_dtypes), ``.pt/.bin/.pth`` only through
``torch.load(weights_only=True)``. A converted tree is compared with ``jax.eval_shape`` of
the model, and every missing, unexpected and mis-shaped key is listed in one error.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import numpy as np

from proclip_jax.errors import ProclipError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# Wrappers that training frameworks put around a state dict.
_WRAPPER_KEYS = ("state_dict", "module", "model", "model_state_dict")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  out = {}
  try:
    with safe_open(path, framework="np") as f:
      for k in f.keys():
        out[k] = f.get_tensor(k)
  except Exception as e:  # safetensors raises several types for a bad header / truncation
    raise ProclipError(
        f"Cannot read safetensors file {path!r}: {e}. The file is truncated or not a "
        "safetensors file; download or export it again.") from e
  return out


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _flatten_torch_obj(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
  import torch  # pylint: disable=import-outside-toplevel
  out = {}
  if isinstance(obj, torch.Tensor):
    out[prefix.rstrip(".")] = _torch_to_numpy(obj)
  elif isinstance(obj, Mapping):
    for k, v in obj.items():
      out.update(_flatten_torch_obj(v, f"{prefix}{k}."))
  return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ProclipError(
        f"{path!r} is a PyTorch pickle; reading it needs torch (pip install torch==2.13.0), "
        "or convert it to .safetensors first.") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # UnpicklingError, RuntimeError (truncated zip), EOFError ...
    raise ProclipError(
        f"Refusing or unable to read {path!r}: {type(e).__name__}: {str(e)[:300]}. Only "
        "plain tensor state dicts are loaded (torch.load(weights_only=True)); a file that "
        "needs arbitrary code to unpickle, or a truncated file, is rejected. Re-save it as "
        "a state dict or as .safetensors.") from e
  if not isinstance(obj, Mapping):
    raise ProclipError(f"{path!r} does not hold a state dict (found {type(obj).__name__}).")
  return _flatten_torch_obj(obj)


def _unwrap(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strips one wrapper level (``state_dict.``/``module.``) when every key carries it."""
  for w in _WRAPPER_KEYS:
    p = w + "."
    if sd and all(k.startswith(p) for k in sd):
      return _unwrap({k[len(p):]: v for k, v in sd.items()})
  return sd


def _read_file(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  if path.endswith((".pt", ".pth", ".bin", ".ckpt")):
    return _read_torch(path)
  raise ProclipError(
      f"Unknown checkpoint file type {path!r}: expected one of {', '.join(WEIGHT_SUFFIXES)}.")


def read_state_dict(src: str) -> dict[str, np.ndarray]:
  """Reads a checkpoint into ``{name: numpy array}`` without running pickled code.

  ``src`` is a weights file or a folder holding ``model.safetensors``,
  ``model.safetensors.index.json`` (sharded), ``pytorch_model.bin`` or
  ``pytorch_model.bin.index.json``. One wrapper level (``state_dict``, ``module``) is removed.
  """
  src = os.fspath(src)
  if not os.path.exists(src):
    raise ProclipError(f"Checkpoint {src!r} does not exist.")
  if os.path.isfile(src):
    return _unwrap(_read_file(src))
  for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    index = os.path.join(src, index_name)
    if os.path.exists(index):
      weight_map = read_json(index).get("weight_map", {})
      out = {}
      for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(src, shard)
        if not os.path.exists(shard_path):
          raise ProclipError(f"{index} names shard {shard!r}, which is missing from {src!r}.")
        out.update(_read_file(shard_path))
      missing = sorted(set(weight_map) - set(out))
      if missing:
        raise ProclipError(f"Sharded checkpoint {src!r} lacks tensors its index lists: {missing[:10]}")
      return _unwrap(out)
  for name in ("model.safetensors", "pytorch_model.bin"):
    p = os.path.join(src, name)
    if os.path.exists(p):
      return _unwrap(_read_file(p))
  found = sorted(f for f in os.listdir(src) if f.endswith(WEIGHT_SUFFIXES))
  if len(found) == 1:
    return _unwrap(_read_file(os.path.join(src, found[0])))
  raise ProclipError(
      f"No weights found in folder {src!r}: expected model.safetensors, a sharded "
      f"model.safetensors.index.json, or pytorch_model.bin (found {found or 'none'}).")


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      obj = json.load(f)
  except FileNotFoundError as e:
    raise ProclipError(f"Missing {path!r}.") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ProclipError(f"{path!r} is not valid JSON: {e}.") from e
  if not isinstance(obj, dict):
    raise ProclipError(f"{path!r} holds a JSON {type(obj).__name__}, not an object; it is "
                       "damaged or not the file expected there.")
  return obj


# ---------------------------------------------------------------- tree helpers

def flatten(tree: Mapping, sep: str = "/") -> dict[str, Any]:
  """``{"a": {"b": x}}`` -> ``{"a/b": x}``."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      for kk, vv in flatten(v, sep).items():
        out[f"{k}{sep}{kk}"] = vv
    else:
      out[str(k)] = v
  return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict:
  """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
  out: dict = {}
  for k, v in flat.items():
    node = out
    parts = k.split(sep)
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def check_tree(params: Mapping, abstract: Mapping, *, what: str = "checkpoint",
               unused_source_keys: Iterable[str] = ()) -> None:
  """Raises one ProclipError listing every difference between ``params`` and ``abstract``.

  ``abstract`` is ``jax.eval_shape`` of the model's init (leaves with ``.shape``; flax
  ``Partitioned`` boxes are unwrapped). ``unused_source_keys`` are checkpoint tensors that no
  rename rule consumed; they are reported as unexpected.
  """
  from flax.core import meta  # pylint: disable=import-outside-toplevel
  abstract = meta.unbox(abstract)
  got = flatten(params)
  want = flatten(abstract)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want)) + sorted(f"(source) {k}" for k in unused_source_keys)
  misshaped = sorted(
      f"{k}: got {tuple(np.shape(got[k]))}, model expects {tuple(want[k].shape)}"
      for k in set(got) & set(want) if tuple(np.shape(got[k])) != tuple(want[k].shape))
  if missing or unexpected or misshaped:
    lines = [f"The {what} does not fit the model; nothing was written."]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      if items:
        shown = items[:40] + ([f"... and {len(items) - 40} more"] if len(items) > 40 else [])
        lines.append(f"{title} ({len(items)}):\n  " + "\n  ".join(shown))
    lines.append("Check that the checkpoint and the model configuration are the same "
                 "architecture and size.")
    raise ProclipError("\n".join(lines))


def linear(w: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight ``[out, in]`` -> Flax Dense kernel ``[in, out]``."""
  return np.ascontiguousarray(np.asarray(w).T)


def conv_oihw_to_hwio(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(np.asarray(w), (2, 3, 1, 0)))


def to_f32(tree):
  """Casts every floating leaf to float32 numpy (parameters are kept in float32)."""
  def cast(x):
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype.kind == "f" or x.dtype.name == "bfloat16" else x
  if isinstance(tree, Mapping):
    return {k: to_f32(v) for k, v in tree.items()}
  return cast(tree)
