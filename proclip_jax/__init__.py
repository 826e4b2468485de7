"""proclip-jax: ProCLIP (a CLIP image encoder aligned with an LLM-based text embedder) in JAX.

Public API (imported lazily so that ``import proclip_jax`` stays cheap)::

    clip = proclip_jax.load_clip(OUT)          # a converted CLIP
    emb = proclip_jax.load_embedder(OUT)       # a converted text embedder
    model = proclip_jax.ProCLIP.load(DIR)      # a trained or converted ProCLIP
    from proclip_jax import losses
"""
import importlib

from proclip_jax import torchvision_compat as _torchvision_compat
from proclip_jax.errors import ProclipError

_torchvision_compat.install()  # torchvision beside the CPU torch (timm needs it)

__version__ = "0.1.0"

_LAZY = {
    "load_clip": "proclip_jax.models.clip",
    "load_embedder": "proclip_jax.models.embedder",
    "ProCLIP": "proclip_jax.inference",
    "losses": "proclip_jax.losses",
}

__all__ = ["ProclipError", "__version__", *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    module = importlib.import_module(_LAZY[name])
    return module if module.__name__.endswith(name) else getattr(module, name)
  raise AttributeError(f"module 'proclip_jax' has no attribute {name!r}")
