"""Test configs as the trainer reads them: ``common.base_config(stage)`` with overrides.

The library reads ``config.a.b`` attributes of one ml_collections ConfigDict (what
``experiments/run.py`` builds); tests write only the fields they care about, as a nested
dict, and :func:`make_config` lays them over the defaults. Fields the defaults lack (e.g.
``model``, ``data.seed``) are added; a ``model`` may also be a ``ProCLIPConfig``.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from experiments.configs import common  # noqa: E402  pylint: disable=wrong-import-position


def _merge(node: ml_collections.ConfigDict, over: Mapping[str, Any]) -> None:
  for key, value in over.items():
    if isinstance(value, Mapping) and isinstance(node.get(key), ml_collections.ConfigDict):
      _merge(node[key], value)
    elif isinstance(value, Mapping):
      node[key] = ml_collections.ConfigDict(dict(value))
    else:
      node[key] = value


def make_config(over: Mapping[str, Any], lock: bool = True) -> ml_collections.ConfigDict:
  """``base_config(over["stage"])`` with the nested dict ``over`` laid over it."""
  config = common.base_config(over["stage"])
  config.data.worker_count = 0   # tests decode in-process (the default -1 follows the cores)
  _merge(config, over)
  if lock:
    config.lock()
  return config


def optim_config(**over) -> ml_collections.ConfigDict:
  """``config.optim`` of the defaults with ``over`` set (for the optimizer alone)."""
  optim = common.base_config(1).optim
  _merge(optim, over)
  return optim
