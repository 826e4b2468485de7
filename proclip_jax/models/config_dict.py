"""Model configs as plain dicts: the ``to_dict`` / ``from_dict`` of every config dataclass.

A config is saved in ``model.json`` and in training configs as a dict of its fields;
reading one back refuses fields the class does not have (a file from another version or
another model kind), naming them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from proclip_jax.errors import ProclipError


def check_fields(cls, d: Mapping[str, Any]) -> None:
  """Raises ProclipError naming the keys of ``d`` that are not fields of ``cls``."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ProclipError(f"{cls.__name__}: unknown fields {unknown}; known: {sorted(known)}.")


class DictConfig:
  """Mixin for config dataclasses: ``to_dict()`` and a field-checked ``from_dict(d)``."""

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]):
    check_fields(cls, d)
    return cls(**d)
