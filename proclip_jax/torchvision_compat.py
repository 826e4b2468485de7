"""Lets PyPI's torchvision import beside the CPU build of torch.

timm (the EVA02 parity reference) needs torchvision, and the only release for torch 2.13.0 is
0.28.0, whose PyPI wheel is a CUDA build: its C++ ops library does not load beside the CPU
torch, and its import then fails registering fake kernels for two of those ops (``nms`` and
``qnms``, "operator torchvision::nms does not exist"). transformers imports torchvision
whenever it is installed, so that failure would break every transformers model import too.

:func:`install` adds a one-shot import hook: the first ``import torchvision`` tries to load
torchvision's ops library and, only if that fails, declares the two op schemas first, so the
import succeeds; the detection ops themselves stay unavailable (torchvision raises when one is
called). Nothing happens until torchvision is imported, nor where its library loads.
"""
from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import sys

_MISSING_OPS = ("nms", "qnms")
_libraries = []  # the torch.library.Library objects must stay alive


def declare_missing_ops() -> bool:
  """Declares ``torchvision::nms`` / ``qnms`` if torchvision's ops library cannot load.

  Returns whether it declared them (False: no torchvision, or its library loads).
  """
  spec = importlib.util.find_spec("torchvision")
  if spec is None or spec.origin is None or _libraries:
    return False
  import torch  # pylint: disable=import-outside-toplevel
  try:
    for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
      torch.ops.load_library(path)  # torchvision loads the same file again: a no-op
      return False
  except OSError:
    pass
  lib = torch.library.Library("torchvision", "DEF")
  for op in _MISSING_OPS:
    lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _libraries.append(lib)
  return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
  """Runs :func:`declare_missing_ops` at the first ``import torchvision``, then steps aside."""

  def find_spec(self, fullname, path=None, target=None):  # pylint: disable=unused-argument
    if fullname == "torchvision":
      if self in sys.meta_path:
        sys.meta_path.remove(self)
      declare_missing_ops()
    return None  # the regular finders import the module


def install() -> None:
  """Adds the hook (once), unless torchvision is imported already."""
  if "torchvision" in sys.modules or any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
    return
  sys.meta_path.insert(0, _BeforeTorchvision())
