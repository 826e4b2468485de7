"""Evaluation: retrieval, zero-shot classification, multilingual retrieval.

``EVALS`` maps each evaluator name to its trainer form ``fn(params, config, mesh) -> dict``
(loaded lazily from :mod:`proclip_jax.eval.evaluators`); the trainer looks names up here.
"""


def __getattr__(name):
  if name == "EVALS":
    from proclip_jax.eval.evaluators import TRAINER_EVALS  # pylint: disable=import-outside-toplevel
    return TRAINER_EVALS
  raise AttributeError(f"module 'proclip_jax.eval' has no attribute {name!r}")
