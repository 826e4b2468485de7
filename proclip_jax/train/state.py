"""The training state pytree and its born-sharded creation from a config.

``TrainState`` (a ``flax.struct`` dataclass, so a pytree that Orbax saves as is)::

    step             int32 scalar   batches consumed (skipped non-finite steps included)
    params           dict           trainable parameters (the differentiated tree)
    frozen           dict           frozen parameters ({} when nothing is frozen)
    opt_state        optax state    over ``params`` only: frozen ones have none
    ema              dict           EMA teacher image tower ({} in stage 1 or with λ = 0)
    nonfinite_steps  int32 scalar   steps skipped because the loss or a gradient was not finite

``merge(params, frozen)`` is the full model tree (``visual`` / ``adapter`` /
``logit_scale``, see ``models/proclip.py``). Stage 1 holds only ``adapter``; stage 2 all
three. The optimizer's own step count is ``step - nonfinite_steps``.

Config fields read here (ml_collections ConfigDict or nested dicts)::

    stage                  1 or 2
    model                  ProCLIPConfig, or {"vision": VisionConfig dict | None, "adapter": {...}}
    total_steps            schedule length
    optim                  see ``train/optimizer.py`` (freeze rules live here too)
    mesh, logical_axis_rules   see ``proclip_jax/mesh.py``
    stage2.ema_momentum    m (1.0 keeps the original tower frozen as the teacher)
    stage2.distill_weight  λ (0 disables the teacher: no EMA tree at all)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import meta
from jax.sharding import Mesh, NamedSharding

from proclip_jax.errors import ProclipError
from proclip_jax.models.proclip import PARTS, ProCLIPConfig, ProCLIPModel
from proclip_jax import mesh as mesh_lib
from proclip_jax.train import optimizer as optim_lib
from proclip_jax.tree import check_tree, flatten


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any
  ema: Any
  nonfinite_steps: jax.Array


def _plain(x: Any) -> Any:
  return x.to_dict() if hasattr(x, "to_dict") and not dataclasses.is_dataclass(x) else x


def model_config(config: Any) -> ProCLIPConfig:
  """``config.model`` as a ProCLIPConfig (the ConfigDict of ``set_model``, or the dataclass)."""
  m = config.get("model")
  if m is None:
    raise ProclipError("The config has no 'model' entry (vision + adapter configuration).")
  if isinstance(m, ProCLIPConfig):
    return m
  return ProCLIPConfig.from_dict(dict(_plain(m)))


def stage_of(config: Any) -> int:
  stage = config.stage
  if stage not in (1, 2):
    raise ProclipError(f"config.stage must be 1 or 2, got {stage!r}.")
  return stage


def uses_teacher(config: Any) -> bool:
  return stage_of(config) == 2 and float(config.stage2.distill_weight) != 0.0


@dataclasses.dataclass
class Setup:
  """Everything derived from the config that the state and the steps share."""
  model: ProCLIPModel
  parts: tuple[str, ...]
  boxed: Any                  # boxed abstract full param tree
  abstract: dict              # unboxed ShapeDtypeStruct full tree
  names: dict                 # logical axis names per leaf
  param_shardings: dict       # NamedSharding per leaf of the full tree
  freeze: tuple[str, ...]
  tx: optax.GradientTransformation
  schedule: Callable[[Any], jax.Array]
  rules: tuple


def setup(config: Any, mesh: Mesh) -> Setup:
  """Model, abstract shapes, shardings and optimizer from the config (no arrays made)."""
  stage = stage_of(config)
  optim_lib.validate_hparams(config)  # bad hyper-parameters fail before any compile
  model = ProCLIPModel(model_config(config))
  parts = ("adapter",) if stage == 1 else PARTS
  boxed = model.abstract(parts)
  rules = mesh_lib.normalize_rules(config.logical_axis_rules)
  abstract = meta.unbox(boxed)
  names = mesh_lib.logical_names(boxed)
  shardings = mesh_lib.tree_shardings(boxed, mesh, rules)
  optim = config.optim
  freeze = tuple(optim.freeze or ())
  trainable_abs, _ = optim_lib.partition(abstract, freeze)
  if not flatten(trainable_abs):
    raise ProclipError("config.optim.freeze freezes every parameter; nothing would train.")
  total = int(config.total_steps)
  tx, schedule = optim_lib.make_optimizer(optim, trainable_abs, total,
                                          full_params=abstract, names=names)
  return Setup(model, parts, boxed, abstract, names, shardings, freeze, tx, schedule, rules)


def _opt_state_shardings(tx, trainable_abs, trainable_sh, mesh):
  abstract_state = jax.eval_shape(tx.init, trainable_abs)
  rep = mesh_lib.replicated(mesh)
  return optax.tree_utils.tree_map_params(
      tx, lambda _, s: s, abstract_state, trainable_sh,
      transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, NamedSharding))


def state_shardings(s: Setup, config: Any, mesh: Mesh) -> TrainState:
  """The NamedSharding tree of a TrainState for this config and mesh."""
  rep = mesh_lib.replicated(mesh)
  t_abs, _ = optim_lib.partition(s.abstract, s.freeze)
  t_sh, f_sh = optim_lib.partition(s.param_shardings, s.freeze)
  ema_sh = s.param_shardings["visual"] if uses_teacher(config) else {}
  return TrainState(step=rep, params=t_sh, frozen=f_sh,
                    opt_state=_opt_state_shardings(s.tx, t_abs, t_sh, mesh),
                    ema=ema_sh, nonfinite_steps=rep)


def _place(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, sh: jax.device_put(np.asarray(x, np.float32), sh),
                      tree, shardings)


def _init_params(s: Setup, mesh: Mesh, rng: jax.Array, init_params: Mapping | None) -> dict:
  """Random init of the parts ``init_params`` lacks, loaded values for those it has."""
  given = dict(init_params or {})
  unknown = sorted(set(given) - set(s.parts))
  if unknown:
    raise ProclipError(
        f"init_params has entries {unknown} that this stage does not train; expected a "
        f"subset of {list(s.parts)}.")
  for part, value in given.items():
    check_tree({part: value}, {part: s.abstract[part]}, what=f"initial '{part}' parameters")
  missing = tuple(p for p in s.parts if p not in given)
  out = {}
  if missing:
    sh = {p: s.param_shardings[p] for p in missing}
    init = lambda r: meta.unbox(s.model.init_boxed(r, missing))  # noqa: E731
    # No mesh context here: flax would constrain DenseGeneral's flattened kernels inside
    # init; the out_shardings place the results.
    out.update(jax.jit(init, out_shardings=sh)(rng))
  for part, value in given.items():
    out[part] = _place(value, s.param_shardings[part])
  return out


def _copy(tree: Any) -> Any:
  """Fresh buffers with the same shardings (the state is donated: no shared buffers)."""
  return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), tree)


def create_train_state(config: Any, mesh: Mesh, rng: jax.Array,
                       init_params: Mapping | None = None) -> tuple[TrainState, TrainState]:
  """Creates the sharded TrainState; returns ``(state, state_shardings)``.

  Args:
    config: the run config (fields in the module docstring).
    mesh: from ``mesh.make_mesh(config.mesh)``.
    rng: a ``jax.random.key`` for the parts that are not loaded.
    init_params: optional ``{"visual": ..., "adapter": ..., "logit_scale": ...}`` (any
      subset of the stage's parts; host or device arrays), e.g. a converted CLIP image tower
      and the stage-1 adapter. Each given part must match the model exactly.
  """
  s = setup(config, mesh)
  shardings = state_shardings(s, config, mesh)
  params = _init_params(s, mesh, rng, init_params)
  trainable, frozen = optim_lib.partition(params, s.freeze)
  opt_state = jax.jit(s.tx.init, out_shardings=shardings.opt_state)(trainable)
  ema = _copy(params["visual"]) if uses_teacher(config) else {}
  rep = mesh_lib.replicated(mesh)
  zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), rep)  # noqa: E731
  state = TrainState(step=zero(), params=trainable, frozen=frozen, opt_state=opt_state,
                     ema=ema, nonfinite_steps=zero())
  return state, shardings


def abstract_train_state(config: Any, mesh: Mesh) -> tuple[TrainState, TrainState]:
  """``(abstract state with shardings, state_shardings)``: a restore target for Orbax."""
  s = setup(config, mesh)
  shardings = state_shardings(s, config, mesh)
  t_abs, f_abs = optim_lib.partition(s.abstract, s.freeze)
  opt_abs = jax.eval_shape(s.tx.init, t_abs)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  abstract = TrainState(step=scalar, params=t_abs, frozen=f_abs, opt_state=opt_abs,
                        ema=s.abstract["visual"] if uses_teacher(config) else {},
                        nonfinite_steps=scalar)
  with_sh = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                         abstract, shardings)
  return with_sh, shardings


def full_params(state: TrainState) -> dict:
  """The whole model tree (trainable and frozen merged)."""
  return optim_lib.merge(state.params, state.frozen)
