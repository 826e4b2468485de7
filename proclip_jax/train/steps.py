"""Jitted ProCLIP train steps for stage 1 and stage 2 (sharded, donated state).

Both builders return ``step(state, batch) -> (state, metrics)``, jit-compiled with the
state's shardings in and out, the batch split over the mesh's batch axes, and the state
donated. The mesh and the logical-axis rules are entered around each call.

Stage 1 (adapter only; everything comes from the caches). Batch, for each caption field
``f`` of ``config.stage1.fields`` (default ``("short", "raw")``)::

    llm_{f}    float32 [B, D]   cached LLM-embedder features (the student's input)
    clip_{f}   float32 [B, E]   cached CLIP text-tower features (the teacher)

    loss = stage1_distill_loss(adapter(llm_short), clip_short, adapter(llm_raw), clip_raw,
                               config.distill_chunk)

Stage 2 (image tower + adapter + logit scale; teacher = EMA image tower). Batch::

    image        float32 [B, H, W, 3]   CLIP-normalised pixels
    llm_feature  float32 [B, D]         the LLM feature of the caption the pipeline drew
 or llm_{f}      float32 [B, D]         for f in config.stage2.text_fields (default short,
                                        long): the step draws one field per example,
                                        uniformly, from ``fold_in(key(config.seed), step)``

Other batch entries (ids, texts, masks) are dropped before the jitted call. ::

    loss = contrastive(img, txt, logit_scale) over the global batch
           + λ · image_distill_loss(img, stop_gradient(teacher(image)), config.distill_chunk)

then ``θ_T ← m·θ_T + (1−m)·θ`` on the image tower after the optimizer step (skipped when
m = 1) and ``logit_scale`` clamped to ``[0, ln 100]``.

Micro-batches (``config.microbatches`` = k > 1, GradCache: Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup"). Both losses couple the rows of
the global batch only through the features, so the step computes the same loss and
gradients in three passes over k micro-batches, each a 1/k share of every device's rows:
(1) the features (and the teacher's) of every micro-batch without gradients (a ``lax.scan``);
(2) the loss over the whole batch's features and its gradient with respect to them (and to
the logit scale); (3) per micro-batch, the towers' VJP with that micro-batch's slice of the
feature gradient, summed into the parameter gradients (a second scan; remat inside the
towers as configured). Activation memory is that of one micro-batch, for one more forward
pass of the towers; the gradient accumulator is sharded like the parameters (with data
parallelism its reduction over devices then runs once per micro-batch). k = 1 is the one-shot
step. The global batch must be divisible by k × the number of batch shards.

Only ``state.params`` is differentiated; ``state.frozen`` and ``state.ema`` enter as
constants. If the loss or the gradient norm is not finite, params, optimizer state and
teacher stay as they were, ``nonfinite_steps`` is incremented (``step`` advances).

Metrics (float32 scalars): ``loss``, the loss terms, ``logit_scale`` (log) and ``scale``
(exp), ``grad_norm`` (before clipping), ``lr`` (of this update), ``finite`` (1 or 0),
``nonfinite_steps``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from proclip_jax import losses
from proclip_jax.errors import ProclipError
from proclip_jax.models.adapter import l2_normalize
from proclip_jax import mesh as mesh_lib
from proclip_jax.data.transforms import normalize_batch
from proclip_jax.train import optimizer as optim_lib
from proclip_jax.train.state import Setup, TrainState, setup, uses_teacher

TEXT_KEY = "llm_feature"  # stage 2: the LLM feature of the caption the pipeline chose
StepFn = Callable[[TrainState, dict], tuple[TrainState, dict]]


def _apply_update(s: Setup, state: TrainState, grads, loss, ema_fn=None):
  """Optimizer update, logit-scale clamp, EMA; all undone if loss/grads are not finite."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def apply(_):
    updates, opt_state = s.tx.update(grads, state.opt_state, state.params,
                                     grad_norm=grad_norm)
    params = optim_lib.clamp_logit_scale(optax.apply_updates(state.params, updates))
    return params, opt_state, (state.ema if ema_fn is None else ema_fn(params))

  # A branch, not a select over the whole state: the skipped update costs nothing and the
  # taken one no extra pass over params, moments and teacher.
  params, opt_state, ema = jax.lax.cond(
      finite, apply, lambda _: (state.params, state.opt_state, state.ema), None)
  lr = s.schedule(state.step - state.nonfinite_steps)
  new_state = TrainState(
      step=state.step + 1,
      params=params,
      frozen=state.frozen,
      opt_state=opt_state,
      ema=ema,
      nonfinite_steps=state.nonfinite_steps + jnp.where(finite, 0, 1).astype(jnp.int32))
  metrics = {"grad_norm": grad_norm, "lr": lr, "finite": finite.astype(jnp.float32),
             "nonfinite_steps": new_state.nonfinite_steps.astype(jnp.float32)}
  return new_state, metrics


def _jit(fn, mesh: Mesh, rules, shardings: TrainState, select) -> StepFn:
  """jit with state shardings in/out, batch sharded, state donated; mesh entered per call.

  ``select(batch)`` keeps the entries the step reads (a batch may carry ids, texts ...).
  """
  batch_sh = mesh_lib.batch_sharding(mesh, rules)
  jitted = jax.jit(fn, in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)),
                   donate_argnums=(0,))

  @functools.wraps(fn)
  def step(state, batch):
    batch = select(batch)
    with jax.set_mesh(mesh), mesh_lib.axis_rules(rules):
      return jitted(state, batch)

  def lower(state, batch):
    """``jitted.lower`` in the step's mesh and rules (state / batch may be abstract)."""
    with jax.set_mesh(mesh), mesh_lib.axis_rules(rules):
      return jitted.lower(state, select(batch))
  step.jitted = jitted  # for cost analysis
  step.lower = lower    # ahead-of-time compile (train/aot.py)
  return step


def compute_cast(tree: Any, dtype: str) -> Any:
  """The matmul weights of ``tree`` (``kernel`` / ``bias`` / ``proj`` leaves outside the
  LayerNorms) in the compute ``dtype``; the rest as is.

  The modules cast these weights to ``dtype`` before each product anyway, so the values are
  unchanged; casting them first puts the cast before FSDP's all-gather of a weight (and the
  gradient's reduce-scatter after the cast back), so those move ``dtype``, not float32.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return tree

  def one(path, x):
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys[-1] in ("kernel", "bias", "proj") and not any(k.startswith("ln") for k in keys):
      return x.astype(dtype)
    return x
  return jax.tree_util.tree_map_with_path(one, tree)


def _check_chunk(config) -> int:
  chunk = int(config.distill_chunk)
  if chunk < 1:
    raise ProclipError(f"config.distill_chunk must be a positive integer, got {chunk}.")
  return chunk


def _microbatches(config) -> int:
  k = config.get("microbatches", 1)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ProclipError(
        f"config.microbatches must be a positive integer (1 = the whole batch at once), got "
        f"{k!r}.")
  return int(k)


def _split(x: jax.Array, k: int, shards: int) -> jax.Array:
  """``[B, ...] -> [k, B/k, ...]``: micro-batch i takes the i-th of k runs of rows of every
  batch shard, so no row leaves its device and each micro-batch stays split over all."""
  rows = x.shape[0] // shards
  y = x.reshape(shards, k, rows // k, *x.shape[1:]).swapaxes(0, 1)
  y = y.reshape(k, x.shape[0] // k, *x.shape[1:])
  return mesh_lib.constrain(y, (None, "batch") + (None,) * (x.ndim - 1))


def _join(y: jax.Array, shards: int) -> jax.Array:
  """The inverse of ``_split``: ``[k, B/k, ...] -> [B, ...]`` in the batch's row order."""
  k, m = y.shape[:2]
  x = y.reshape(k, shards, m // shards, *y.shape[2:]).swapaxes(0, 1)
  x = x.reshape(k * m, *y.shape[2:])
  return mesh_lib.constrain(x, ("batch",) + (None,) * (x.ndim - 2))


def _loss_and_grads(features, extra, loss, params, inputs: dict, k: int, shards: int,
                    grad_shardings):
  """``((loss, aux), grads)`` of ``params -> loss(params, features(params, inputs),
  extra(inputs))``, over ``k`` micro-batches when ``k > 1`` (GradCache, module doc).

  ``features(params, inputs)`` and ``extra(inputs)`` (no gradient; may be None) map the
  batch's rows independently (row i of every output from row i of every input);
  ``loss(params, feats, extras)`` may couple all rows. ``grad_shardings`` (those of
  ``params``) keep the micro-batch gradient accumulator sharded like the parameters.
  """
  if k == 1:
    def total(p):
      return loss(p, features(p, inputs), None if extra is None else extra(inputs))
    return jax.value_and_grad(total, has_aux=True)(params)

  rows = jax.tree.leaves(inputs)[0].shape[0]
  if rows % (k * shards):
    raise ProclipError(
        f"config.microbatches={k}: the global batch of {rows} rows is not divisible by "
        f"{k} micro-batches x {shards} batch shards; set config.data.batch_size to a "
        f"multiple of {k * shards} or choose microbatches dividing {rows // shards}.")
  split = lambda t: jax.tree.map(lambda x: _split(x, k, shards), t)  # noqa: E731
  join = lambda t: jax.tree.map(lambda y: _join(y, shards), t)  # noqa: E731
  micro = split(inputs)

  def forward(_, mb):  # no gradient: nothing is kept for a backward pass
    return None, (features(params, mb), None if extra is None else extra(mb))
  _, (feats, extras) = jax.lax.scan(forward, None, micro)
  feats, extras = join(feats), join(extras)

  (value, aux), (grads, d_feats) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      params, feats, extras)
  constrain = lambda g: jax.lax.with_sharding_constraint(g, grad_shardings)  # noqa: E731

  def backward(acc, xs):
    mb, d_mb = xs
    _, vjp = jax.vjp(lambda p: features(p, mb), params)
    return constrain(jax.tree.map(jnp.add, acc, vjp(d_mb)[0])), None
  grads, _ = jax.lax.scan(backward, constrain(grads), (micro, split(d_feats)))
  return (value, aux), grads


# ------------------------------------------------------------------------ stage 1

def make_stage1_step(config: Any, mesh: Mesh, state_shardings: TrainState) -> StepFn:
  """The stage-1 step: distil CLIP's text features into the adapter (see module doc)."""
  s = setup(config, mesh)
  chunk = _check_chunk(config)
  fields = tuple(config.stage1.fields)
  if len(fields) != 2:
    raise ProclipError(
        f"config.stage1.fields must name two caption fields (short, raw), got {fields}.")

  micro = _microbatches(config)
  shards = mesh_lib.batch_divisor(mesh, s.rules)

  def step(state: TrainState, batch: dict):
    def features(params, inputs):
      adapter = optim_lib.merge(params, state.frozen)["adapter"]
      return s.model.text_features(compute_cast(adapter, s.model.config.adapter.dtype),
                                   inputs["llm"])

    def loss_fn(params, both, _):
      student = [both[:, 0], both[:, 1]]
      teacher = [l2_normalize(batch[f"clip_{f}"]) for f in fields]
      terms = losses.stage1_distill_terms(student[0], teacher[0], student[1], teacher[1],
                                          chunk)
      return terms["loss"], terms

    # Both caption fields through the adapter in one pass on [B, 2, D] (stacked on a new axis,
    # so the batch sharding is kept): every weight is read once per product, not once per
    # field, and the products are twice as tall.
    inputs = {"llm": jnp.stack([batch[f"llm_{f}"] for f in fields], axis=1)}
    (loss, terms), grads = _loss_and_grads(features, None, loss_fn, state.params, inputs,
                                           micro, shards, state_shardings.params)
    new_state, metrics = _apply_update(s, state, grads, loss)
    metrics.update({k: v.astype(jnp.float32) for k, v in terms.items()})
    return new_state, metrics

  keys = [f"{p}_{f}" for f in fields for p in ("llm", "clip")]
  return _jit(step, mesh, s.rules, state_shardings, lambda b: _select(b, keys, "stage 1"))


def _select(batch: dict, keys, what: str) -> dict:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ProclipError(
        f"The {what} batch lacks {missing} (it has {sorted(batch)}); the data pipeline's "
        "side data must provide them (see train/steps.py).")
  return {k: batch[k] for k in keys}


# ------------------------------------------------------------------------ stage 2

def _pick_text(batch: dict, fields: tuple[str, ...], rng: jax.Array) -> jax.Array:
  if TEXT_KEY in batch:
    return batch[TEXT_KEY]
  feats = [batch[f"llm_{f}"] for f in fields]
  if len(feats) == 1:
    return feats[0]
  choice = jax.random.randint(rng, (feats[0].shape[0],), 0, len(feats))
  out = feats[0]
  for i, f in enumerate(feats[1:], start=1):
    out = jnp.where((choice == i)[:, None], f, out)
  return out


def ema_update(teacher: Any, student: Any, momentum: float) -> Any:
  """``θ_T ← m·θ_T + (1−m)·θ`` leaf by leaf (float32)."""
  m = jnp.float32(momentum)
  return jax.tree.map(lambda t, p: m * t + (1.0 - m) * p.astype(t.dtype), teacher, student)


def make_stage2_step(config: Any, mesh: Mesh, state_shardings: TrainState) -> StepFn:
  """The stage-2 step: contrastive + λ·image self-distillation, EMA teacher (module doc)."""
  s = setup(config, mesh)
  chunk = _check_chunk(config)
  fields = tuple(config.stage2.text_fields)
  lam = float(config.stage2.distill_weight)
  m = float(config.stage2.ema_momentum)
  if not 0.0 <= m <= 1.0:
    raise ProclipError(f"config.stage2.ema_momentum must be in [0, 1], got {m}.")
  impl = config.stage2.contrastive_impl
  block = int(config.stage2.contrastive_block)
  seed = int(config.seed)
  teacher_on = uses_teacher(config)

  vis_dtype, ad_dtype = s.model.config.vision.dtype, s.model.config.adapter.dtype

  micro = _microbatches(config)
  shards = mesh_lib.batch_divisor(mesh, s.rules)

  def step(state: TrainState, batch: dict):
    batch = normalize_batch(batch)   # uint8 pixels from the pipeline -> CLIP-normalised
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    txt_in = _pick_text(batch, fields, rng)

    def features(params, inputs):
      full = optim_lib.merge(params, state.frozen)
      img = s.model.image_features(compute_cast(full["visual"], vis_dtype), inputs["image"])
      txt = s.model.text_features(compute_cast(full["adapter"], ad_dtype), inputs["text"])
      return img, txt

    def teacher(inputs):
      return jax.lax.stop_gradient(
          s.model.image_features(compute_cast(state.ema, vis_dtype), inputs["image"]))

    def loss_fn(params, feats, teacher_img):
      img, txt = feats
      logit_scale = optim_lib.merge(params, state.frozen)["logit_scale"]
      clip = losses.contrastive_loss(img, txt, logit_scale, impl, block=block, mesh=mesh)
      terms = {"clip": clip}
      loss = clip
      if teacher_img is not None:
        d = losses.image_distill_terms(img, teacher_img, chunk)
        terms.update({"distill": d["loss"], "distill_ins": d["ins"],
                      "distill_struct": d["struct"]})
        loss = clip + lam * d["loss"]
      terms["loss"] = loss
      return loss, terms

    inputs = {"image": batch["image"], "text": txt_in}
    (loss, terms), grads = _loss_and_grads(
        features, teacher if teacher_on else None, loss_fn, state.params, inputs, micro,
        shards, state_shardings.params)

    ema_fn = None
    if teacher_on and m < 1.0:
      ema_fn = lambda p: ema_update(  # noqa: E731
          state.ema, optim_lib.merge(p, state.frozen)["visual"], m)
    new_state, metrics = _apply_update(s, state, grads, loss, ema_fn)
    ls = optim_lib.merge(new_state.params, new_state.frozen)["logit_scale"]
    metrics.update({k: v.astype(jnp.float32) for k, v in terms.items()})
    metrics.update({"logit_scale": ls.astype(jnp.float32), "scale": jnp.exp(ls)})
    return new_state, metrics

  def select(batch):
    if TEXT_KEY in batch:
      return _select(batch, ["image", TEXT_KEY], "stage 2")
    return _select(batch, ["image"] + [f"llm_{f}" for f in fields], "stage 2")
  return _jit(step, mesh, s.rules, state_shardings, select)


def make_train_step(config: Any, mesh: Mesh, state_shardings: TrainState) -> StepFn:
  """``make_stage1_step`` or ``make_stage2_step`` by ``config.stage``."""
  stage = config.stage
  if stage == 1:
    return make_stage1_step(config, mesh, state_shardings)
  if stage == 2:
    return make_stage2_step(config, mesh, state_shardings)
  raise ProclipError(f"config.stage must be 1 or 2, got {stage!r}.")
