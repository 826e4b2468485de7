"""AdamW with freezing, weight-decay masks, layer-wise and per-module learning rates.

Every rule is a regular expression over '/'-joined parameter paths such as
``visual/transformer/resblocks_3/attn/out_proj/kernel`` or ``adapter/block_0/fn_0/bias``
(``re.search`` semantics). The optimizer config (``config.optim``) fields:

    lr, b1, b2, eps, weight_decay          AdamW (decoupled decay, multiplied by the lr)
    warmup_steps, end_lr_ratio             linear warmup from 0, then cosine to lr*end_lr_ratio
    grad_clip_norm                         clip by global norm (0 or None: off)
    freeze        [regex, ...]             frozen: not differentiated, no optimizer state
    no_decay      [regex, ...]             no weight decay (default: biases, norms,
                                           embeddings, logit scale)
    lr_mults      [(regex, mult), ...]     per-module lr multipliers (first match wins)
    layer_decay   float (1.0 = off)        layer-wise lr decay over the image tower
    layer_decay_prefix  "visual/"          which parameters form the image tower
    layer_stem    regex                    image-tower parameters below block 0

``no_decay``, ``layer_decay_prefix`` and ``layer_stem`` are optional (read with
``optim.get``; ``experiments/configs/common.base_config`` leaves them out); the other
fields are always there.

Freezing is done by partitioning (big_vision style): :func:`partition` splits the
parameter tree into a trainable and a frozen tree; only the trainable tree is
differentiated and passed to the optimizer, so frozen parameters have no optimizer state.

Layer-wise decay (LLM2CLIP / BEiT recipe) over an image tower with L blocks: stem and
embeddings get ``decay**(L+1)``, block i gets ``decay**(L-i)``, everything after the
blocks (final norm, projection) gets 1. Blocks are found either by an index in the path
(``resblocks_3``, ``blocks_3``, ``layers_3``) or, for scanned (stacked) layers, by the
logical axis name ``layers`` on the parameter's first dimension: the multiplier is then an
array along that axis.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from proclip_jax.errors import ProclipError
from proclip_jax.tree import flatten, merge, unflatten  # noqa: F401  (merge: the inverse of partition)

LOGIT_SCALE_MAX = math.log(100.0)

DEFAULT_NO_DECAY = (
    r"(^|/)bias$",            # every bias
    r"(^|/)scale$",           # LayerNorm / RMSNorm weights (Flax names them "scale")
    r"(^|/)[^/]*(ln|norm)[^/]*/",  # anything inside a norm module
    r"embedding",             # class / positional / token embeddings
    r"(^|/)logit_scale$",
)
DEFAULT_STEM = (r"(^|/)(conv1|patch_embed\w*|embedding|class_embedding|positional_embedding"
                r"|pos_embed\w*|cls\w*|ln_pre)(/|$)")
_BLOCK_INDEX = re.compile(r"(?:^|/)(?:resblocks|blocks?|layers?|encoderblock)_(\d+)(?:/|$)")


def _compile(rules: Sequence[str], what: str) -> list[re.Pattern]:
  out = []
  for r in rules or ():
    try:
      out.append(re.compile(r))
    except re.error as e:
      raise ProclipError(f"config.optim.{what}: bad regular expression {r!r}: {e}.") from e
  return out


# --------------------------------------------------------------- freezing (partition)

def partition(params: Mapping, freeze: Sequence[str] = ()) -> tuple[dict, dict]:
  """Splits a nested param dict into ``(trainable, frozen)`` by the ``freeze`` regexes."""
  pats = _compile(freeze, "freeze")
  flat = flatten(params)
  frozen = {k: v for k, v in flat.items() if any(p.search(k) for p in pats)}
  trainable = {k: v for k, v in flat.items() if k not in frozen}
  for p in pats:
    if not any(p.search(k) for k in flat):
      raise ProclipError(
          f"config.optim.freeze rule {p.pattern!r} matches no parameter; parameter paths "
          f"look like {sorted(flat)[:3]}.")
  return unflatten(trainable), unflatten(frozen)


# --------------------------------------------------------------- schedule

def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0,
                  end_lr_ratio: float = 0.0) -> Callable[[Any], jax.Array]:
  """Linear warmup from 0 over ``warmup_steps``, then cosine from ``lr`` to ``lr*end_lr_ratio``.

  Reaches the end value at ``total_steps`` and stays there.
  """
  if total_steps < 1 or warmup_steps < 0 or warmup_steps > total_steps:
    raise ProclipError(
        f"Schedule needs 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) "
        "and total_steps >= 1.")
  end = lr * end_lr_ratio

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = lr * step / max(warmup_steps, 1)
    frac = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    cos = end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(step < warmup_steps, warm, cos)
  return schedule


# --------------------------------------------------------------- masks and multipliers

def decay_mask(params: Mapping, no_decay: Sequence[str] | None = None) -> dict:
  """Tree of bools: True where weight decay applies."""
  pats = _compile(DEFAULT_NO_DECAY if no_decay is None else no_decay, "no_decay")
  flat = flatten(params)
  return unflatten({k: not any(p.search(k) for p in pats) for k in flat})


def _first_axis_is_layers(names: Any) -> bool:
  return bool(names) and names[0] == "layers"


def layer_ids(params: Mapping, names: Mapping | None = None, prefix: str = "visual/",
              stem: str = DEFAULT_STEM) -> tuple[dict[str, Any], int]:
  """Assigns each image-tower parameter a layer id: 0 stem, i+1 block i, L+1 head.

  Returns ``({path: id or "scanned"}, L)`` for the paths under ``prefix``; ``names`` is
  the tree of logical axis names (see ``mesh.logical_names``) used to find scanned stacks.
  """
  flat = {k: v for k, v in flatten(params).items() if k.startswith(prefix)}
  flat_names = flatten(names) if names is not None else {}
  stem_re = re.compile(stem)
  n_layers = 0
  for k, v in flat.items():
    if _first_axis_is_layers(flat_names.get(k)):
      n_layers = max(n_layers, int(np.shape(v)[0]))
    m = _BLOCK_INDEX.search(k[len(prefix):])
    if m:
      n_layers = max(n_layers, int(m.group(1)) + 1)
  ids = {}
  for k in flat:
    rel = k[len(prefix):]
    if _first_axis_is_layers(flat_names.get(k)):
      ids[k] = "scanned"
    elif (m := _BLOCK_INDEX.search(rel)):
      ids[k] = int(m.group(1)) + 1
    elif stem_re.search(rel):
      ids[k] = 0
    else:
      ids[k] = n_layers + 1
  return ids, n_layers


def lr_multipliers(params: Mapping, names: Mapping | None = None, *,
                   layer_decay: float = 1.0, prefix: str = "visual/",
                   stem: str = DEFAULT_STEM,
                   lr_mults: Sequence[Sequence[Any]] = ()) -> dict:
  """Tree of learning-rate multipliers: layer decay times the first matching module rule.

  Leaves are Python floats, or float32 arrays of shape ``[L, 1, ...]`` for parameters
  stacked along a scanned ``layers`` axis.
  """
  rules = [(re.compile(r), float(m)) for r, m in (lr_mults or ())]
  flat = flatten(params)
  ids, n_layers = ({}, 0)
  if layer_decay != 1.0:
    ids, n_layers = layer_ids(params, names, prefix, stem)
  out = {}
  for k, v in flat.items():
    mult = next((m for r, m in rules if r.search(k)), 1.0)
    lid = ids.get(k)
    if lid is None:
      out[k] = mult
    elif lid == "scanned":
      depth = int(np.shape(v)[0])
      per = np.array([layer_decay ** (n_layers - i) for i in range(depth)], np.float32) * mult
      out[k] = per.reshape((depth,) + (1,) * (np.ndim(v) - 1))
    else:
      out[k] = float(layer_decay ** (n_layers + 1 - lid)) * mult
  return unflatten(out)


def scale_by_multipliers(mults: Any) -> optax.GradientTransformation:
  """Multiplies each update by a fixed per-parameter factor (no state)."""
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mults), state
  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """``optax.clip_by_global_norm`` as one scalar multiply: ``g · min(1, max_norm / ‖g‖)``.

  Same values to float32 rounding. A multiply by a scalar is cheap enough for XLA to fuse into
  each consumer (Adam's two moment updates), where optax's ``g / ‖g‖ · max_norm`` (a divide)
  is materialised first: one full read and write of the gradients less per step.

  ``update(..., grad_norm=n)`` uses a norm the caller already has (the train step computes
  it for its non-finite check and metrics), which saves another full read of the gradients:
  XLA does not share the one computed outside the ``lax.cond`` that applies the update.
  """
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    scale = jnp.minimum(1.0, max_norm / norm)  # norm 0 -> inf -> 1
    return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), state
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------- the optimizer

def make_optimizer(optim: Any, trainable: Mapping, total_steps: int, *,
                   full_params: Mapping | None = None,
                   names: Mapping | None = None
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
  """Builds the AdamW chain for the ``trainable`` tree (arrays or abstract shapes).

  Args:
    optim: ``config.optim`` (a ConfigDict), fields in the module docstring; ``no_decay``,
      ``layer_decay_prefix`` and ``layer_stem`` are optional (defaults there).
    trainable: the parameters the optimizer updates (frozen ones already removed).
    total_steps: length of the schedule.
    full_params: the whole parameter tree, trainable and frozen; the number of image-tower
      layers is counted on it (so freezing some blocks does not shift the decay).
    names: logical axis names tree of ``full_params`` (finds scanned layer stacks).

  Returns:
    ``(tx, schedule)``: ``tx`` includes the learning rate; ``schedule(count)`` gives it.
  """
  lr = float(optim.lr)
  schedule = make_schedule(lr, int(total_steps), int(optim.warmup_steps),
                           float(optim.end_lr_ratio))
  full = full_params if full_params is not None else trainable
  mults_full = lr_multipliers(
      full, names, layer_decay=float(optim.layer_decay),
      prefix=optim.get("layer_decay_prefix", "visual/"),
      stem=optim.get("layer_stem", DEFAULT_STEM), lr_mults=optim.lr_mults)
  flat_m = flatten(mults_full)
  mults = unflatten({k: flat_m[k] for k in flatten(trainable)})
  no_decay = optim.get("no_decay")
  wd = float(optim.weight_decay)
  clip = optim.grad_clip_norm
  parts = []
  if clip:
    parts.append(clip_by_global_norm(float(clip)))
  parts.append(optax.scale_by_adam(b1=float(optim.b1), b2=float(optim.b2),
                                   eps=float(optim.eps)))
  if wd:
    parts.append(optax.add_decayed_weights(
        wd, mask=decay_mask(trainable, None if no_decay is None else list(no_decay))))
  parts.append(scale_by_multipliers(mults))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule


# --------------------------------------------------------------- hyper-parameter checks

# (dotted field, lower bound, lower inclusive, upper bound, upper inclusive, integer, what 0 /
# None means). Checked by :func:`validate_hparams` before anything is built or compiled.
HPARAM_RANGES = (
    ("total_steps", 1, True, None, False, True, None),
    ("optim.lr", 0.0, True, None, False, False, "0: parameters stay as they are"),
    ("optim.b1", 0.0, True, 1.0, False, False, None),
    ("optim.b2", 0.0, True, 1.0, False, False, None),
    ("optim.eps", 0.0, False, None, False, False, None),
    ("optim.weight_decay", 0.0, True, None, False, False, None),
    ("optim.warmup_steps", 0, True, "total_steps", True, True, None),
    ("optim.end_lr_ratio", 0.0, True, 1.0, True, False, None),
    ("optim.grad_clip_norm", 0.0, True, None, False, False, "0 or None: no clipping"),
    ("optim.layer_decay", 0.0, False, 1.0, True, False, None),
    ("stage2.ema_momentum", 0.0, True, 1.0, True, False, None),
    ("stage2.distill_weight", 0.0, True, None, False, False, "0: no teacher"),
    ("distill_chunk", 1, True, None, False, True, None),
    ("stage2.contrastive_block", 1, True, None, False, True, None),
)


def _field(config: Any, dotted: str) -> Any:
  """``config.a.b`` of a dict or ConfigDict; None when a level is missing."""
  node = config
  for name in dotted.split("."):
    if node is None or isinstance(node, (str, bytes)) or not hasattr(node, "__contains__"):
      return None
    node = node[name] if name in node else None
  return node


def _range_text(lo, lo_in, hi, hi_in) -> str:
  left = "-inf" if lo is None else lo
  right = "inf" if hi is None else (f"config.{hi}" if isinstance(hi, str) else hi)
  return f"{'[' if lo_in else '('}{left}, {right}{']' if hi_in else ')'}"


def validate_hparams(config: Any) -> None:
  """Refuses hyper-parameters that are not finite numbers or lie outside their valid range.

  Checks the fields of :data:`HPARAM_RANGES` that ``config`` has (absent or None ones keep
  their defaults) and every ``optim.lr_mults`` multiplier (finite, >= 0). Raises one
  ``ProclipError`` naming the field, its value and the valid range; the trainer's setup calls
  this before it builds the optimizer or compiles anything.
  """
  for dotted, lo, lo_in, hi, hi_in, integer, note in HPARAM_RANGES:
    value = _field(config, dotted)
    if value is None:
      continue
    if isinstance(hi, str):
      bound = _field(config, hi)
      hi = None if bound is None or isinstance(bound, bool) else bound
    rng = _range_text(lo, lo_in, hi, hi_in)
    kind = "an integer" if integer else "a finite number"
    hint = f" ({note})" if note else ""
    ok_type = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))
    if ok_type and integer and not float(value).is_integer():
      ok_type = False
    if not ok_type or not math.isfinite(float(value)):
      raise ProclipError(f"config.{dotted}={value!r} must be {kind} in {rng}{hint}.")
    v = float(value)
    below = lo is not None and (v < lo or (v == lo and not lo_in))
    above = hi is not None and (v > float(hi) or (v == float(hi) and not hi_in))
    if below or above:
      raise ProclipError(f"config.{dotted}={value!r} is outside its valid range {rng}{hint}.")
  for i, rule in enumerate(_field(config, "optim.lr_mults") or ()):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ProclipError(f"config.optim.lr_mults[{i}]={rule!r} must be a (regex, multiplier) "
                         "pair.")
    mult = rule[1]
    if (isinstance(mult, bool) or not isinstance(mult, (int, float, np.integer, np.floating))
        or not math.isfinite(float(mult)) or float(mult) < 0):
      raise ProclipError(f"config.optim.lr_mults[{i}] multiplier {mult!r} must be a finite "
                         "number in [0, inf).")


def clamp_logit_scale(params: Mapping, max_value: float = LOGIT_SCALE_MAX) -> Mapping:
  """Clamps a top-level ``logit_scale`` to ``[0, max_value]`` (if it is in ``params``)."""
  if "logit_scale" not in params:
    return params
  out = dict(params)
  out["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, max_value)
  return out
