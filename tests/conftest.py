"""Test set-up: offline, 8 simulated CPU devices, float32 matmuls at full precision.

JAX's persistent compilation cache stays off in this process: on XLA:CPU a stage-2 step
loaded from it deadlocks in its collectives on the 8-device mesh (tests/test_run.py's
resumed run hangs, then aborts). Subprocess tests that run stage 1 only set their own
cache (tests/test_reliability.py).
"""
import os

# The suite runs on the CPU; libtpu (requirements-tpu.txt) serves only as the TPU compiler.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite compiles hundreds of small programs and runs each a few times: XLA:CPU's LLVM
# optimisation passes cost more than they save there (compile time dominates the suite), so
# the tests and the processes they start compile without them. Numerics are unchanged: the
# passes reorder no floating-point arithmetic (fast-math stays off either way).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                   "--xla_backend_optimization_level=0"]))
# Child processes (the tools, experiments/run.py and tests/mp_worker.py run as scripts)
# import this checkout's code, as the tests do (pytest.ini's pythonpath), whatever else is
# installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != _ROOT:
  os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


import proclip_jax  # noqa: E402,F401  (lets torchvision import: proclip_jax/torchvision_compat.py)


@pytest.fixture
def rng():
  return np.random.default_rng(0)
