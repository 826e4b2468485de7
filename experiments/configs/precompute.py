r"""The precompute forward (tools/precompute.py's LLM-embedder pass) for tools/aot_compile.py.

``tools/precompute.py`` takes its settings as flags and its architecture from the converted
folder; this config states them for a named embedder, so that the forward over one batch of
captions compiles for a TPU slice without the files::

    python tools/aot_compile.py --config precompute.py:embedder=llm2clip_llama3_8b \
        --topology v5e:2x2 --config.mesh.fsdp=4

Args (``precompute.py:k=v,...``): ``embedder`` (a name of :data:`ARCHS`), ``batch`` (rows
per forward: ``--batch-size``), ``length`` (tokens per caption, the longest bucket; default
the preset's ``max_length``), ``bf16`` (``--compute-dtype bfloat16``: matmuls and the
frozen kernels in bfloat16). The mesh is ``--mesh`` (``{"data": -1}`` by default; an 8B model
needs its parameters sharded, e.g. ``--config.mesh.data=1 --config.mesh.fsdp=-1``).
"""
import ml_collections

from experiments.configs import common
from proclip_jax.errors import ProclipError

# Architectures of the named embedders (the Hugging Face config.json of each release).
ARCHS = {
    # LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned: Meta-Llama-3-8B-Instruct.
    "llm2clip_llama3_8b": {
        "family": "llama",
        "model": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_layers": 32, "num_heads": 32, "num_kv_heads": 8, "head_dim": 128,
                  "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "family": "llama"}},
}


def get_config(arg=None):
  a = common.parse_arg(arg, embedder="llm2clip_llama3_8b", batch=64, length=0, bf16=True)
  if a.embedder not in ARCHS:
    raise ProclipError(f"precompute.py: embedder={a.embedder!r}; known: {', '.join(ARCHS)}.")
  _, preset = common.embedder(a.embedder)
  c = ml_collections.ConfigDict()
  c.precompute = ml_collections.ConfigDict({
      "embedder": a.embedder, "preset": preset, "batch_size": a.batch,
      "length": a.length, "compute_dtype": "bfloat16" if a.bf16 else "float32"})
  c.model = ml_collections.ConfigDict(ARCHS[a.embedder])
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.logical_axis_rules = ml_collections.config_dict.placeholder(tuple)
  return c
