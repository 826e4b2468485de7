"""Tensors of a TorchScript archive (OpenAI's ``ViT-B-16.pt``) read without running its code.

A ``torch.jit.save`` file is a zip: ``ARCHIVE/data.pkl`` pickles the module tree (objects of
classes ``__torch__.*`` whose state holds parameters, buffers and sub-modules),
``ARCHIVE/data/N`` are the raw bytes of storage N, ``ARCHIVE/code/`` is the TorchScript source
and ``constants.pkl`` the traced constants. Only ``data.pkl`` and ``data/N`` are read: the
pickle goes through :class:`_Unpickler`, which resolves nothing but the tensor-rebuild
functions, the storage types and ``OrderedDict`` (the policy of ``torch.load(weights_only=
True)``) to this module's own NumPy implementations, and maps every ``__torch__.*`` class to
an inert record of its attributes. Nothing is imported from the file and ``code/`` is never
opened; any other global refuses the file.

The result is ``{dotted attribute path: numpy array}`` for every tensor in the module tree,
the names ``module.state_dict()`` gives (e.g. ``visual.transformer.resblocks.0.attn.
in_proj_weight``).
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import numpy as np

from proclip_jax.errors import ProclipError


def _bfloat16():
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  return np.dtype(ml_dtypes.bfloat16)


# torch storage class name -> numpy dtype (callables for the ml_dtypes one).
_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": _bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  """What ``torch.<X>Storage`` resolves to: the element dtype, nothing callable."""

  def __init__(self, name: str):
    dtype = _STORAGES[name]
    self.name = name
    self.dtype = np.dtype(dtype() if callable(dtype) and not isinstance(dtype, type) else dtype)


class _ScriptObject:
  """Inert stand-in for a ``__torch__.*`` module object: keeps the pickled attribute dict."""

  def __init__(self, *args):  # REDUCE on the class: refuse, TorchScript pickles use NEWOBJ
    raise pickle.UnpicklingError("a TorchScript class called with arguments")

  def __setstate__(self, state):
    self.__dict__["_state"] = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """``torch._utils._rebuild_tensor_v2`` on NumPy: a strided view of the storage, copied."""
  if not isinstance(storage, np.ndarray):
    raise pickle.UnpicklingError("tensor without a storage")
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  offset = int(offset)
  if min(size + stride + (offset,), default=0) < 0 or len(size) != len(stride):
    raise pickle.UnpicklingError(f"tensor of size {size}, stride {stride}, offset {offset}")
  if not all(size):
    return np.zeros(size, storage.dtype)
  if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
    raise pickle.UnpicklingError(f"tensor of size {size} runs past its storage")
  if not size:
    return np.array(storage[offset])
  base = storage[offset:]
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(base, size, [s * item for s in stride])
  return np.array(view, copy=True)


def _rebuild_parameter(data, *unused):
  return data


def _first(value, *unused):
  return value


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # Typed containers of TorchScript's pickler: identity on the plain value.
    ("torch.jit._pickle", "restore_type_tag"): _first,
    ("torch.jit._pickle", "build_intlist"): _first,
    ("torch.jit._pickle", "build_doublelist"): _first,
    ("torch.jit._pickle", "build_boollist"): _first,
    ("torch.jit._pickle", "build_tensorlist"): _first,
}


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals above, storages and ``__torch__`` classes; refuses the rest."""

  def __init__(self, data: bytes, zf: zipfile.ZipFile, root: str):
    super().__init__(io.BytesIO(data))
    self._zf, self._root, self._storages = zf, root, {}
    self._classes = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGES:
      return _StorageType(name)
    if module == "__torch__" or module.startswith("__torch__."):
      key = f"{module}.{name}"
      if key not in self._classes:  # a fresh inert subclass, so each keeps its own name
        self._classes[key] = type("Script_" + name.replace(".", "_"), (_ScriptObject,), {})
      return self._classes[key]
    raise pickle.UnpicklingError(
        f"global {module}.{name} is not a tensor-rebuild function, storage type or TorchScript "
        "module class")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 4 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
    stype, key = pid[1], str(pid[2])
    if key not in self._storages:
      record = f"{self._root}/data/{key}"
      try:
        raw = self._zf.read(record)
      except KeyError as e:
        raise pickle.UnpicklingError(f"storage record {record} is missing") from e
      if len(raw) % stype.dtype.itemsize:
        raise pickle.UnpicklingError(f"storage record {record} has a partial element")
      self._storages[key] = np.frombuffer(raw, stype.dtype)
    return self._storages[key]


def _archive_root(zf: zipfile.ZipFile) -> str | None:
  roots = {n.split("/", 1)[0] for n in zf.namelist() if n.count("/") == 1
           and n.endswith("/data.pkl")}
  return roots.pop() if len(roots) == 1 else None


def is_torchscript(path: str) -> bool:
  """True for a zip with one ``ROOT/data.pkl`` and TorchScript's ``ROOT/code/`` or
  ``ROOT/constants.pkl`` (a plain ``torch.save`` zip has neither)."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as zf:
    root = _archive_root(zf)
    names = zf.namelist()
  return root is not None and any(n.startswith(f"{root}/code/") or n == f"{root}/constants.pkl"
                                  for n in names)


def _collect(obj: Any, prefix: str, out: dict, seen: set) -> None:
  if isinstance(obj, np.ndarray):
    out[prefix.rstrip(".")] = obj
  elif isinstance(obj, _ScriptObject):
    if id(obj) in seen:
      return
    seen.add(id(obj))
    _collect(obj.__dict__.get("_state", {}), prefix, out, seen)
  elif isinstance(obj, dict):
    for k, v in obj.items():
      if isinstance(k, str):
        _collect(v, f"{prefix}{k}.", out, seen)


def read_torchscript(path: str) -> dict[str, np.ndarray]:
  """Every tensor of the TorchScript archive ``path`` as ``{dotted name: numpy array}``."""
  try:
    with zipfile.ZipFile(path) as zf:
      root = _archive_root(zf)
      if root is None:
        raise ProclipError(f"{path!r} is a zip without one ARCHIVE/data.pkl; it is not a "
                           "TorchScript archive.")
      byteorder = f"{root}/byteorder"
      if byteorder in zf.namelist() and zf.read(byteorder).strip() not in (b"", b"little"):
        raise ProclipError(f"{path!r} was saved big-endian; re-save it on a little-endian "
                           "machine.")
      obj = _Unpickler(zf.read(f"{root}/data.pkl"), zf, root).load()
  except ProclipError:
    raise
  except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError,
          AttributeError, IndexError, KeyError) as e:
    raise ProclipError(
        f"Refusing or unable to read the TorchScript archive {path!r}: {type(e).__name__}: "
        f"{str(e)[:300]}. Only its tensors are read (the tensor-rebuild functions and storage "
        "types weights_only allows; its code/ is never run); a file that needs anything else, "
        "or a truncated file, is rejected. Re-save it as a state dict or .safetensors.") from e
  out: dict[str, np.ndarray] = {}
  _collect(obj, "", out, set())
  if not out:
    raise ProclipError(f"The TorchScript archive {path!r} holds no tensors.")
  return out
