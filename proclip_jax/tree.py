"""Parameter-tree utilities shared by the converters, training, storage and inference.

Trees are nested mappings (``{"visual": {"conv1": {"kernel": array}}}``); a flat view keys
every leaf by its ``"a/b/c"`` path.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
from flax.core import meta

from proclip_jax.errors import ProclipError


def flatten(tree: Mapping, sep: str = "/") -> dict[str, Any]:
  """``{"a": {"b": x}}`` -> ``{"a/b": x}``."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      for kk, vv in flatten(v, sep).items():
        out[f"{k}{sep}{kk}"] = vv
    else:
      out[str(k)] = v
  return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict:
  """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
  out: dict = {}
  for k, v in flat.items():
    node = out
    parts = k.split(sep)
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def check_tree(params: Mapping, abstract: Mapping, *, what: str = "checkpoint",
               unused_source_keys: Iterable[str] = ()) -> None:
  """Raises one ProclipError listing every difference between ``params`` and ``abstract``.

  ``abstract`` is ``jax.eval_shape`` of the model's init (leaves with ``.shape``; flax
  ``Partitioned`` boxes are unwrapped). ``unused_source_keys`` are checkpoint tensors that no
  rename rule consumed; they are reported as unexpected.
  """
  abstract = meta.unbox(abstract)
  got = flatten(params)
  want = flatten(abstract)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want)) + sorted(f"(source) {k}" for k in unused_source_keys)
  misshaped = sorted(
      f"{k}: got {tuple(np.shape(got[k]))}, model expects {tuple(want[k].shape)}"
      for k in set(got) & set(want) if tuple(np.shape(got[k])) != tuple(want[k].shape))
  if missing or unexpected or misshaped:
    lines = [f"The {what} does not fit the model; nothing was written."]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      if items:
        shown = items[:40] + ([f"... and {len(items) - 40} more"] if len(items) > 40 else [])
        lines.append(f"{title} ({len(items)}):\n  " + "\n  ".join(shown))
    lines.append("Check that the checkpoint and the model configuration are the same "
                 "architecture and size.")
    raise ProclipError("\n".join(lines))


def to_f32(tree):
  """Casts every floating leaf to float32 numpy (parameters are kept in float32)."""
  def cast(x):
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype.kind == "f" or x.dtype.name == "bfloat16" else x
  if isinstance(tree, Mapping):
    return {k: to_f32(v) for k, v in tree.items()}
  return cast(tree)


def merge(*trees: Mapping) -> dict:
  """One tree holding the leaves of all ``trees`` (later trees win on a shared path)."""
  flat: dict = {}
  for t in trees:
    flat.update(flatten(t))
  return unflatten(flat)
