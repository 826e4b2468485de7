"""Device mesh, logical-axis rules and shardings (training state, inference, precompute).

The mesh has three axes, built from the config (``-1`` takes the devices the others leave)::

    config.mesh = {"data": -1, "fsdp": 1, "tensor": 1}

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``,
``layers``, ``joint``) through ``nn.with_logical_partitioning``; a rules table maps each
logical name to mesh axes. A dimension that the chosen mesh axes do not divide evenly is
replicated instead (so tiny models and odd sizes still run on any mesh). The batch is split
along its first dimension over the ``batch`` rule (``data`` and ``fsdp``).

State is born sharded: ``jax.eval_shape(init)`` gives the boxed abstract tree,
:func:`tree_shardings` turns it into ``NamedSharding`` s, and
``jax.jit(init, out_shardings=...)`` creates every array already in place
(``train/state.py``). Enter the mesh with ``jax.set_mesh(mesh)`` (``with mesh:`` is
deprecated and silently disables logical constraints).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from proclip_jax.errors import ProclipError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes. Later entries for the same name are fallbacks (used when the
# first choice is taken by another dimension of the same array or does not divide it).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("joint", None),
    ("layers", None),
)


def mesh_shape(spec: Mapping[str, int] | None, n_devices: int) -> tuple[int, int, int]:
  """Resolves ``{"data": -1, "fsdp": 2, ...}`` to three sizes whose product is n_devices."""
  spec = dict(spec or {"data": -1})
  unknown = sorted(set(spec) - set(MESH_AXES))
  if unknown:
    raise ProclipError(f"config.mesh has unknown axes {unknown}; the axes are {MESH_AXES}.")
  sizes = [int(spec.get(a, 1)) for a in MESH_AXES]
  n_fill = sum(s == -1 for s in sizes)
  if n_fill > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ProclipError(
        f"config.mesh={spec}: sizes must be positive, with at most one -1 (fills the rest).")
  fixed = math.prod(s for s in sizes if s != -1)
  if n_fill:
    if n_devices % fixed:
      raise ProclipError(
          f"config.mesh={spec}: {n_devices} devices are not divisible by {fixed}; change "
          "the fixed axis sizes.")
    sizes = [n_devices // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != n_devices:
    raise ProclipError(
        f"config.mesh={spec} needs {math.prod(sizes)} devices but {n_devices} are used; set "
        "one axis to -1 to fill the rest.")
  return tuple(sizes)


def make_mesh(spec: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ``(data, fsdp, tensor)`` mesh with Auto axis types from ``config.mesh``."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(spec, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def normalize_rules(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
  """Config rules (lists, from JSON or ConfigDict) -> a tuple of ``(name, axes)`` pairs."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for r in rules:
    if len(r) != 2:
      raise ProclipError(
          f"Logical axis rule {r!r} must be a pair (logical_name, mesh_axes or None).")
    name, axes = r
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      bad = [a for a in axes if a not in MESH_AXES]
    else:
      bad = [] if axes is None or axes in MESH_AXES else [axes]
    if bad:
      raise ProclipError(f"Logical axis rule {r!r} names unknown mesh axes {bad}; the mesh "
                         f"axes are {MESH_AXES}.")
    out.append((str(name), axes))
  return tuple(out)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]]) -> P:
  """One array's logical names -> a PartitionSpec (replicates dimensions that don't divide)."""
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape):
    chosen = None
    if name is not None:
      for rule_name, axes in rules:
        if rule_name != name or axes is None:
          continue
        axes_t = tuple(a for a in ((axes,) if isinstance(axes, str) else axes)
                       if mesh.shape[a] > 1)
        if not axes_t or used & set(axes_t):
          continue
        if dim % math.prod(mesh.shape[a] for a in axes_t):
          continue
        chosen = axes_t[0] if len(axes_t) == 1 else axes_t
        used |= set(axes_t)
        break
    out.append(chosen)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


_RULES: contextvars.ContextVar = contextvars.ContextVar("proclip_axis_rules", default=None)


@contextlib.contextmanager
def axis_rules(rules):
  """Makes ``rules`` the rules :func:`constrain` uses while tracing under this context."""
  token = _RULES.set(normalize_rules(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def constrain(x, names: Sequence[str | None]):
  """``x`` constrained to the sharding its logical axis ``names`` give under the rules.

  Inside a step (a mesh set with ``jax.set_mesh`` and rules with :func:`axis_rules`) it is
  ``with_sharding_constraint``; elsewhere (inference, tests, one device) it returns ``x``.
  Activations use it to stay split over the batch axes (``("batch", "length", "embed")``):
  without it XLA may keep a scanned layer's carry split over its width instead and run
  every layer on the whole global batch.
  """
  rules = _RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh is None or mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


def _is_box(x) -> bool:
  return isinstance(x, meta.AxisMetadata)


def tree_specs(boxed_abstract: Any, mesh: Mesh, rules=None) -> Any:
  """Maps a boxed abstract tree (``jax.eval_shape`` of an init) to PartitionSpecs.

  Leaves that are not ``nn.Partitioned`` (e.g. a scalar logit scale) are replicated.
  """
  rules = normalize_rules(rules)

  def one(x):
    if isinstance(x, nn.Partitioned):
      return logical_to_spec(x.names, x.value.shape, mesh, rules)
    return P()
  return jax.tree.map(one, boxed_abstract, is_leaf=_is_box)


def tree_shardings(boxed_abstract: Any, mesh: Mesh, rules=None) -> Any:
  """Like :func:`tree_specs` but returns ``NamedSharding`` s (for unboxed trees)."""
  specs = tree_specs(boxed_abstract, mesh, rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def logical_names(boxed_abstract: Any) -> Any:
  """The logical axis names of each leaf (a tuple; ``()`` for unboxed leaves)."""
  return jax.tree.map(
      lambda x: tuple(x.names) if isinstance(x, nn.Partitioned) else (None,) * np.ndim(x),
      boxed_abstract, is_leaf=_is_box)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_spec(mesh: Mesh, rules=None) -> P:
  """PartitionSpec of a batch array: its first dimension over the ``batch`` rule axes."""
  for name, axes in normalize_rules(rules):
    if name == "batch" and axes is not None:
      axes_t = tuple(a for a in ((axes,) if isinstance(axes, str) else axes)
                     if mesh.shape[a] > 1)
      if not axes_t:
        return P()
      return P(axes_t[0] if len(axes_t) == 1 else axes_t)
  return P()


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(mesh, rules))


def batch_divisor(mesh: Mesh, rules=None) -> int:
  """The number of shards the batch dimension is split into (global batch must divide)."""
  spec = batch_spec(mesh, rules)
  if not spec or spec[0] is None:
    return 1
  axes = (spec[0],) if isinstance(spec[0], str) else spec[0]
  return math.prod(mesh.shape[a] for a in axes)
