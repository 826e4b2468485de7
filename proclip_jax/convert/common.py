"""Shared converter machinery: reading PyTorch checkpoints safely, PyTorch -> Flax layouts.

Reading never runs pickled code: safetensors through ``safe_open(framework="np")``
(bfloat16 through ml_dtypes), ``.pt/.bin/.pth`` only through
``torch.load(weights_only=True)``, TorchScript archives (OpenAI's releases) through the
restricted unpickler of :mod:`proclip_jax.convert.torchscript`. Training checkpoints
(``{"state_dict", "epoch", "optimizer", ...}``) give their weights; the training state is
ignored. Converted trees are checked against the model with :func:`proclip_jax.tree.check_tree`
and for non-finite values with :func:`check_weights`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from safetensors import safe_open

from proclip_jax.errors import ProclipError
from proclip_jax.tree import flatten

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# Wrappers that training frameworks put around a state dict.
_WRAPPER_KEYS = ("state_dict", "module", "model", "model_state_dict")
# Entries of a training checkpoint besides the weights, not model parameters.
_TRAINING_STATE_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "scaler",
                        "lr_scheduler", "scheduler", "epoch", "step", "global_step",
                        "global_steps", "name", "args", "config")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
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


def _training_payload(obj: Mapping) -> Mapping:
  """The model weights of a training checkpoint ``{state_dict|module|model: weights, epoch,
  optimizer, ...}`` (open_clip's ``epoch_N.pt``, DeepSpeed's model states): the wrapped
  mapping, when every other entry is training state (optimizer moments, scaler, scheduler,
  counters) or holds no tensors. Anything else is returned whole (its keys then name it)."""
  wrappers = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
  if len(wrappers) != 1:
    return obj
  rest = [k for k in obj if k != wrappers[0] and k not in _TRAINING_STATE_KEYS]
  if any(_flatten_torch_obj(obj[k]) for k in rest):
    return obj
  return obj[wrappers[0]]


def _first_sentences(e: BaseException, limit: int = 300) -> str:
  """The start of an exception's message cut at a sentence end, not mid-sentence."""
  text = " ".join(str(e).split())
  if len(text) <= limit:
    return text if text.endswith(".") else text + "."
  cut = text.rfind(". ", 0, limit)
  return text[:cut + 1] + " [...]" if cut > 0 else text[:limit] + " [...]."


def _read_torch(path: str) -> dict[str, np.ndarray]:
  from proclip_jax.convert.torchscript import is_torchscript, read_torchscript  # pylint: disable=import-outside-toplevel
  if is_torchscript(path):  # OpenAI's releases: tensors only, code/ is never run
    return read_torchscript(path)
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
        f"Refusing or unable to read {path!r}: {type(e).__name__}: {_first_sentences(e)} Only "
        "plain tensor state dicts are loaded (torch.load(weights_only=True)); a file that "
        "needs arbitrary code to unpickle, or a truncated file, is rejected. Re-save it as "
        "a state dict or as .safetensors.") from e
  if not isinstance(obj, Mapping):
    raise ProclipError(f"{path!r} does not hold a state dict (found {type(obj).__name__}).")
  return _flatten_torch_obj(_training_payload(obj))


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


def check_weights(params: Mapping, what: str = "checkpoint") -> None:
  """Raises one ProclipError naming the first converted weight that is not floating point or
  holds NaN / infinity (a damaged file, an overflowed float16 export, quantized integers)."""
  for path, x in sorted(flatten(params).items()):
    x = np.asarray(x)
    if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
      raise ProclipError(f"The {what}: weight {path} is {x.dtype}, not floating point; "
                         "quantized or integer weights do not convert (use the float "
                         "checkpoint). Nothing was written.")
    bad = ~np.isfinite(x.astype(np.float32))
    if bad.any():
      raise ProclipError(f"The {what}: weight {path} has {int(bad.sum())} non-finite values "
                         f"(NaN / infinity) of {x.size}; the file is damaged or overflowed "
                         "(e.g. saved in float16): use the original checkpoint. Nothing was "
                         "written.")


def linear(w: np.ndarray) -> np.ndarray:
  """PyTorch Linear weight ``[out, in]`` -> Flax Dense kernel ``[in, out]``."""
  return np.ascontiguousarray(np.asarray(w).T)


def conv_oihw_to_hwio(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(np.asarray(w), (2, 3, 1, 0)))
