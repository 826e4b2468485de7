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


import proclip_jax  # noqa: E402,F401  (lets torchvision import: proclip_jax/torchvision_compat.py)


@pytest.fixture
def rng():
  return np.random.default_rng(0)
