"""Test set-up: offline, 8 simulated CPU devices, float32 matmuls at full precision."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _let_torchvision_import_without_its_ops():
  """PyPI's torchvision wheels are CUDA builds: beside the CPU torch their C++ ops library does
  not load, and torchvision 0.28 then fails at import, registering fake kernels for two of
  those ops (nms, qnms), which breaks ``import timm`` and transformers' model imports. Declaring
  the two schemas first lets it import; its detection ops stay unavailable (torchvision raises
  when one is called). Nothing is done where torchvision is absent or its library loads."""
  import glob  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("torchvision")
  if spec is None or spec.origin is None:
    return None
  import torch  # pylint: disable=import-outside-toplevel
  try:
    for lib_path in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
      torch.ops.load_library(lib_path)
      return None
  except OSError:
    pass
  lib = torch.library.Library("torchvision", "DEF")
  for op in ("nms", "qnms"):
    lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  return lib


_TORCHVISION_SCHEMAS = _let_torchvision_import_without_its_ops()


@pytest.fixture
def rng():
  return np.random.default_rng(0)
