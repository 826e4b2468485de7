"""Ahead-of-time compile of the train step for a TPU slice, on a machine without TPUs.

XLA:TPU's compiler (the ``libtpu`` wheel, ``requirements-tpu.txt``) runs on any host:
``jax.experimental.topologies.get_topology_desc`` describes the devices of a named slice
(``v5e:16x16`` is 256 v5e chips) and ``jit(...).lower(...).compile()`` on a mesh of those
devices returns the compiler's own per-chip memory and cost analysis. :func:`compile_step`
does that for the trainer's own step: the state from :func:`abstract_train_state`, the step
from :func:`make_train_step`, the batch as ``ShapeDtypeStruct`` s with the trainer's batch
sharding, so what compiles here is what runs on the slice::

    report = compile_step(config, "v5e:8x8")
    report["memory"]["total_bytes"], report["fits"], report["collectives"]

The report (a JSON-ready dict):

* ``memory``: per-chip bytes from ``memory_analysis()``: ``argument`` (state and batch
  shards), ``output``, ``alias`` (outputs written into donated arguments), ``temp``
  (activations and workspaces), ``code``, and ``total = argument + output - alias + temp +
  code``, the chip's peak need; ``hbm_bytes`` of the chip kind (:data:`HBM_BYTES`).
* ``fits``: ``total <= hbm``.
* ``flops``: ``per_chip`` from ``cost_analysis()`` (the SPMD program is one chip's share),
  ``step`` = per chip × chips, ``model`` (matmul FLOPs of the step from
  ``proclip_jax.flops``), ``model_as_compiled`` (the same count as the compiled
  program runs it: a scanned loop's body once, since the cost analysis does not multiply by
  trip counts, plus a remat policy's recomputed forward) and ``ratio = step /
  model_as_compiled``; and, every ``while`` loop unrolled (:func:`hlo_matmul_flops`: scans,
  micro-batch loops, XLA:TPU's windowed einsums), ``step_matmul_once``,
  ``step_loops_unrolled``, ``loops`` and ``ratio_loops_unrolled`` against
  ``model_executed`` (:func:`model_executed_flops`).
* ``collectives``: count and result bytes per kind in the optimized HLO; an op inside a
  loop body (the scanned layers) counts once. ``batch_collectives``: the collectives whose
  result has a dimension equal to the global batch (what crosses the chips per example:
  the InfoNCE features should be the only ones).
* ``compile_s``: lower + compile wall time.

:func:`compile_precompute` does the same for the precompute forward
(``proclip_jax.data.precompute``: a converted embedder's ``embed_tokens`` over one batch of
tokenised captions, ``jit`` over the precompute mesh with its parameter and batch
shardings, the frozen kernels in the compute dtype as ``load_embedder`` stores them), from
a config of ``experiments/configs/precompute.py`` (``config.precompute`` and the
architecture in ``config.model``); its ``flops.model`` is the decoder's matmul count
(:func:`embedder_forward_flops`).
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from proclip_jax import flops
from proclip_jax import mesh as mesh_lib
from proclip_jax.errors import ProclipError
from proclip_jax.models.vit import remat_policy
from proclip_jax.train.state import abstract_train_state, model_config, stage_of, uses_teacher
from proclip_jax.train.steps import TEXT_KEY, make_train_step

GiB = 1 << 30
# HBM per chip of the TPU generations a topology name starts with.
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
# "%name = SHAPE op(" where SHAPE is "f32[4,8]{1,0...}" or a tuple "(f32[..], bf16[..])";
# async collectives appear as op-start / op-done pairs: the -done carries the result.
_OP_RE = re.compile(r"=\s*(\(.*?\)|[a-z0-9]+\[[^\]]*\](?:\{[^}]*\})?)\s+"
                    r"(" + "|".join(COLLECTIVES) + r")(-done)?\(")
_OFF_VM_ENV = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_ID": "0",
               "TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": "v5litepod-4"}
_SHAPE_RE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


def chip_kind(topology: str) -> str:
  """``"v5e:8x8"`` -> ``"v5e"`` (a key of :data:`HBM_BYTES`)."""
  kind = topology.partition(":")[0].lower()
  if kind not in HBM_BYTES or ":" not in topology:
    raise ProclipError(
        f"Topology {topology!r}: expected GENERATION:SHAPE with GENERATION one of "
        f"{', '.join(HBM_BYTES)}, e.g. v5e:8x8 (64 chips), v4:4x4x4, v5p:4x4x4, v6e:16x16.")
  return kind


def topology_devices(topology: str) -> list:
  """The devices of a named TPU slice, from XLA:TPU's topology description (no TPU needed)."""
  kind = chip_kind(topology)
  # Off a TPU VM libtpu looks for the VM's metadata (accelerator type, worker hostnames) and
  # logs errors when it finds none; the compile needs none of it. Compile-only processes
  # share no TPU, so libtpu's one-process lock (/tmp/libtpu_lockfile) is not taken.
  for name, value in _OFF_VM_ENV.items():
    os.environ.setdefault(name, value)
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    # A v4 chip is two TensorCores run as one device ("megacore"), as on a v4 VM.
    extra = {"chip_config_name": "megacore"} if kind == "v4" else {}
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **extra)
  except Exception as e:  # pylint: disable=broad-except
    raise ProclipError(
        f"Could not describe TPU topology {topology!r} ({type(e).__name__}: {e}). The "
        "ahead-of-time compile needs XLA:TPU: `pip install -r requirements-tpu.txt` (the libtpu "
        "that matches the pinned jax).") from None
  return list(desc.devices)


def batch_structs(config: Any, mesh) -> dict:
  """The step's batch as sharded ``ShapeDtypeStruct`` s (what the trainer's pipeline feeds)."""
  stage = stage_of(config)
  b = int(config.data.batch_size)
  shards = mesh_lib.batch_divisor(mesh, config.logical_axis_rules)
  if b < 1 or b % shards:
    raise ProclipError(f"config.data.batch_size={b} must be a positive multiple of the batch "
                       f"shards ({shards}) of this mesh.")
  sh = mesh_lib.batch_sharding(mesh, config.logical_axis_rules)
  mc = model_config(config)
  d, e = mc.adapter.in_dim, mc.adapter.out_dim
  if stage == 1:
    shapes = {}
    for f in tuple(config.stage1.fields):
      shapes[f"llm_{f}"] = (b, d)
      shapes[f"clip_{f}"] = (b, e)
  else:
    s = mc.vision.image_size
    shapes = {"image": (b, s, s, 3), TEXT_KEY: (b, d)}
  return {k: jax.ShapeDtypeStruct(v, jnp.float32, sharding=sh) for k, v in shapes.items()}


def model_step_flops(config: Any, as_compiled: bool = False) -> int:
  """Matmul FLOPs of one global step of this config (``proclip_jax.flops``).

  With ``as_compiled``, the count that XLA's cost analysis of the compiled step should
  give: a scanned tower's loop body counted once (the analysis does not multiply by the trip
  count), plus the forward the backward recomputes under a remat policy that saves no
  matmul outputs.
  """
  mc = model_config(config)
  b = int(config.data.batch_size)
  if stage_of(config) == 1:
    return flops.stage1_step_flops(mc.adapter, b,
                                    len(tuple(config.stage1.fields)))
  vis = mc.vision
  recompute = 0
  if as_compiled:
    if vis.scan_layers:
      vis = dataclasses.replace(vis, layers=1)
    policy = remat_policy(vis.remat)
    if policy is not None and not _saves_dots(vis.remat):
      recompute = (flops.vit_forward_flops(vis, b)
                   - flops.vit_forward_flops(dataclasses.replace(vis, layers=0), b))
  return flops.stage2_step_flops(vis, mc.adapter, b,
                                  teacher=uses_teacher(config))["total"] + recompute


def model_executed_flops(config: Any) -> int:
  """Matmul FLOPs that the compiled step executes, every loop unrolled: the model's count
  (:func:`model_step_flops`) with what the program does beyond or short of it.

  * A remat policy that saves no matmul outputs recomputes each layer's forward in the
    backward, all but the MLP's second product (the backward of a block needs that
    product's input, not its output, so XLA drops it).
  * The pixels take no gradient: the patch embedding has no input-gradient product.
  * GradCache micro-batches (``microbatches`` > 1) run one more forward of the image tower
    and the adapter (the features without gradients; the teacher's run only there).
  """
  total = model_step_flops(config)
  mc = model_config(config)
  b = int(config.data.batch_size)
  micro = int(config.get("microbatches", 1) or 1)
  if stage_of(config) == 1:
    return total + (flops.stage1_step_flops(mc.adapter, b, len(tuple(config.stage1.fields)))
                    // 3 if micro > 1 else 0)
  vis = mc.vision
  g = vis.image_size // vis.patch_size
  total -= 2 * b * g * g * vis.patch_size ** 2 * 3 * vis.width
  if remat_policy(vis.remat) is not None and not _saves_dots(vis.remat):
    layers = (flops.vit_forward_flops(vis, b)
              - flops.vit_forward_flops(dataclasses.replace(vis, layers=0), b))
    tokens = g * g + 1
    c_proj = 2 * vis.layers * b * tokens * (vis.mlp_dim or 4 * vis.width) * vis.width
    total += layers - c_proj
  if micro > 1:
    total += flops.vit_forward_flops(vis, b) + flops.adapter_forward_flops(mc.adapter, b)
  return total


def _saves_dots(remat) -> bool:
  return isinstance(remat, str) and "dots" in remat


def _shape_bytes(shape_text: str) -> tuple[int, list[tuple[int, ...]]]:
  total, dims = 0, []
  for dtype, ds in _SHAPE_RE.findall(shape_text):
    d = tuple(int(x) for x in ds.split(",") if x)
    dims.append(d)
    total += _DTYPE_BYTES.get(dtype, 4) * int(np.prod(d, dtype=np.int64))
  return total, dims


def collectives(hlo_text: str, global_batch: int | None = None,
                weight_shapes=frozenset()) -> tuple[dict, list]:
  """``({kind: {"count", "bytes"}}, batch_ops)`` from optimized HLO text.

  ``batch_ops``: ``{"kind", "shape", "bytes"}`` of each collective with a result array that
  has a dimension equal to ``global_batch`` and is not shaped like a weight (a shape in
  ``weight_shapes``: D = 4096 is also the paper's batch).
  """
  out = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
  batch_ops = []
  for line in hlo_text.splitlines():
    m = _OP_RE.search(line)
    if not m:
      continue
    shape_text, kind, done = m.group(1), m.group(2), m.group(3)
    if not done and f"{kind}-start" in line:
      continue
    nbytes, dims = _shape_bytes(shape_text)
    out[kind]["count"] += 1
    out[kind]["bytes"] += nbytes
    for dtype, ds in _SHAPE_RE.findall(shape_text):
      d = tuple(int(x) for x in ds.split(",") if x)
      if global_batch and global_batch in d and d not in weight_shapes:
        batch_ops.append({"kind": kind, "shape": f"{dtype}{list(d)}",
                          "bytes": _DTYPE_BYTES.get(dtype, 4) * int(np.prod(d))})
  return out, batch_ops


# One HLO instruction: "[ROOT] %name = SHAPE opcode(operands), attributes".
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_COMP_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLED_RE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)"
                        r"=%?([\w.\-]+)")
_CONSTANT_RE = re.compile(r"\sconstant\((-?\d+)\)")
_CALLED_LIST_RE = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")


def _split_instruction(line: str):
  """``(name, shape_text, opcode, operand_names, attributes)`` of an HLO instruction line."""
  m = _INSTR_RE.match(line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        break
    shape, rest = rest[:i + 1], rest[i + 1:]
  else:
    sm = re.match(r"[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?", rest)
    if not sm:
      return None
    shape, rest = sm.group(0), rest[sm.end():]
  om = re.match(r"\s+([a-z][a-z0-9\-]*)\(", rest)
  if not om:
    return None
  rest = rest[om.end():]
  depth = 1
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      break
  # Operands as "%a, %b" (optimized HLO) or "a, b" (lowered HLO); no index comments.
  operands = [p.split()[-1].lstrip("%") for p in re.sub(r"/\*.*?\*/", "", rest[:i]).split(",")
              if p.strip()]
  return m.group(1), shape, om.group(1), operands, rest[i + 1:]


def _dims(shape_text: str) -> tuple[int, ...]:
  m = _SHAPE_RE.match(shape_text)
  return tuple(int(x) for x in m.group(2).split(",") if x) if m else ()


def _window(attrs: str, rank: int) -> list[dict]:
  """Per spatial dimension: size, stride, padding, dilations of a convolution's window."""
  dims = [{"size": 1, "stride": 1, "lo": 0, "hi": 0, "lhs_dilate": 1, "rhs_dilate": 1}
          for _ in range(rank)]
  m = re.search(r"window=\{([^}]*)\}", attrs)
  for field in (m.group(1).split() if m else ()):
    key, _, value = field.partition("=")
    for d, v in zip(dims, value.split("x")):
      if key == "pad":
        d["lo"], d["hi"] = (int(x) for x in v.split("_"))
      elif key in d:
        d[key] = int(v)
  return dims


def _valid_taps(out: int, inp: int, w: dict) -> int:
  """Pairs (output position, window tap) of one spatial dimension that read a real input
  element, not padding or a hole of the input dilation (as XLA's cost analysis counts)."""
  o = np.arange(out, dtype=np.int64)
  last, total = (inp - 1) * w["lhs_dilate"], 0
  for k in range(w["size"]):
    pos = o * w["stride"] + k * w["rhs_dilate"] - w["lo"]
    total += int(np.count_nonzero((pos >= 0) & (pos <= last) & (pos % w["lhs_dilate"] == 0)))
  return total


def _matmul_flops(opcode: str, out: tuple, lhs: tuple, rhs: tuple, attrs: str) -> int:
  """FLOPs (2 per multiply-add) of a ``dot`` or ``convolution`` (XLA:TPU writes most
  products as convolutions, some with padded windows over what were dot dimensions)."""
  if opcode == "dot":
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs)
    k = [int(x) for x in m.group(1).split(",") if x] if m else []
    return 2 * int(np.prod(out, dtype=np.int64)) * int(np.prod([lhs[i] for i in k],
                                                               dtype=np.int64))
  m = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", attrs)
  if not m:
    return 0
  lhs_l, rhs_l, out_l = m.groups()
  spatial = sorted(c for c in out_l if c.isdigit())
  window = _window(attrs, len(spatial))
  taps = 1
  for c, w in zip(spatial, window):
    taps *= _valid_taps(out[out_l.index(c)], lhs[lhs_l.index(c)], w)
  return 2 * out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")] * taps


def hlo_matmul_flops(hlo_text: str) -> dict:
  """Matmul FLOPs of an optimized HLO module, with each ``while`` body times its trip count.

  XLA's cost analysis counts a loop body once. The loops of a train step are the scanned
  layers, GradCache's micro-batch scans, and XLA:TPU's windowed einsums (a sharded matmul
  split into one partial product per shard, its operands passed around the ring by
  collective-permutes), so its count falls short of what the chips run. This walks the
  module from the entry computation: ``dot`` and ``convolution`` FLOPs of each computation
  plus those of what it calls (fusions, calls; a conditional's largest branch), a while
  loop's body and condition times the trip count read from the loop (``known_trip_count``,
  or the condition ``counter < N`` with the counter's initial constant).

  Returns ``{"flops", "flops_once", "loops"}``: ``flops`` with trip counts, ``flops_once``
  with every body once (the cost analysis' convention, for comparison), ``loops`` one
  ``{"body", "trip_count", "body_flops"}`` per while instruction (``trip_count`` None where
  it could not be read; such a body counts once).
  """
  comps: dict[str, list] = {}
  entry, current = None, None
  shapes, defs, lines, roots = {}, {}, {}, {}
  current_name = None
  for line in hlo_text.splitlines():
    cm = _COMP_RE.match(line)
    if cm and not _INSTR_RE.match(line):
      current_name = cm.group(1)
      current = comps.setdefault(current_name, [])
      if line.startswith("ENTRY"):
        entry = cm.group(1)
      continue
    if current is None:
      continue
    ins = _split_instruction(line)
    if ins is None:
      continue
    current.append(ins)
    if line.lstrip().startswith("ROOT"):
      roots[current_name] = ins
    shapes[ins[0]] = ins[1]
    defs[ins[0]] = ins
    lines[ins[0]] = line
  if entry is None:
    raise ProclipError("hlo_matmul_flops: no ENTRY computation in the HLO text; expected "
                       "the optimized module of a compiled program (compiled.as_text()).")

  def constant(name):
    m = _CONSTANT_RE.search(lines.get(name, ""))
    return int(m.group(1)) if m else None

  def trip_count(while_ins):
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', while_ins[4])
    if m:
      return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", while_ins[4]).group(1)
    root = next((i for i in comps.get(cond, []) if i[2] == "compare"), None)
    if root is None or len(root[3]) != 2:
      return None
    direction = re.search(r"direction=(\w+)", root[4])
    gte, bound = (defs.get(n) for n in root[3])
    if not (direction and gte and gte[2] == "get-tuple-element"):
      return None
    n = constant(bound[0]) if bound else None
    index = re.search(r"index=(\d+)", gte[4])
    init = None
    tup = defs.get(while_ins[3][0]) if while_ins[3] else None
    if tup and tup[2] == "tuple" and index and int(index.group(1)) < len(tup[3]):
      init = constant(tup[3][int(index.group(1))])
    # The counter's step: the body's root tuple holds ``add(counter, constant)`` at the
    # counter's index (XLA:TPU unrolls windowed einsums by two: step 2).
    body = re.search(r"body=%?([\w.\-]+)", while_ins[4]).group(1)
    root = roots.get(body)
    step = None
    if root and root[2] == "tuple" and index and int(index.group(1)) < len(root[3]):
      add = defs.get(root[3][int(index.group(1))])
      if add and add[2] == "add":
        step = next((c for c in map(constant, add[3]) if c), None)
    extra = {"LT": 0, "LE": 1}.get(direction.group(1))
    if n is None or not step or step < 0 or extra is None:
      return None
    init = 0 if init is None else init
    return max(-(-(n - init + extra) // step), 0)

  loops, memo = [], {}

  def flops(comp: str, unroll: bool) -> int:
    key = (comp, unroll)
    if key in memo:
      return memo[key]
    memo[key] = 0  # guards against a malformed cyclic module
    total = 0
    for ins in comps.get(comp, []):
      name, shape, opcode, operands, attrs = ins
      if opcode in ("dot", "convolution") and len(operands) >= 2:
        total += _matmul_flops(opcode, _dims(shape), _dims(shapes.get(operands[0], "")),
                               _dims(shapes.get(operands[1], "")), attrs)
      if opcode == "while":
        body = re.search(r"body=%?([\w.\-]+)", attrs).group(1)
        cond = re.search(r"condition=%?([\w.\-]+)", attrs).group(1)
        n = trip_count(ins)
        body_flops = flops(body, unroll)
        if unroll and not any(l["while"] == name for l in loops):
          loops.append({"while": name, "body": body, "trip_count": n, "body_flops": body_flops})
        times = (n if n is not None else 1) if unroll else 1
        total += times * (body_flops + flops(cond, unroll))
        continue
      called = [c for _, c in _CALLED_RE.findall(attrs)]
      lists = [re.findall(r"%?([\w.\-]+)", group) for _, group in _CALLED_LIST_RE.findall(attrs)]
      if opcode == "conditional":
        branches = called + [c for group in lists for c in group]
        total += max((flops(c, unroll) for c in branches), default=0)
      else:
        total += sum(flops(c, unroll) for c in called + [c for g in lists for c in g])
    memo[key] = total
    return total

  return {"flops": flops(entry, True), "flops_once": flops(entry, False), "loops": loops}


def _loop_fields(hlo_counts: dict, chips: int) -> dict:
  """The report's loop-aware FLOP fields (module doc) from :func:`hlo_matmul_flops`."""
  loops = hlo_counts["loops"]
  return {"step_matmul_once": hlo_counts["flops_once"] * chips,
          "step_loops_unrolled": hlo_counts["flops"] * chips,
          "loops": {"count": len(loops),
                    "windowed_einsum": sum("windowed_dot_general" in l["body"] for l in loops),
                    "unknown_trip_count": sum(l["trip_count"] is None for l in loops)}}


def _memory(compiled, hbm: int) -> dict:
  ma = compiled.memory_analysis()
  m = {"argument_bytes": int(ma.argument_size_in_bytes),
       "output_bytes": int(ma.output_size_in_bytes),
       "alias_bytes": int(ma.alias_size_in_bytes),
       "temp_bytes": int(ma.temp_size_in_bytes),
       "code_bytes": int(ma.generated_code_size_in_bytes)}
  m["total_bytes"] = (m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"]
                      + m["temp_bytes"] + m["code_bytes"])
  m["hbm_bytes"] = hbm
  m["total_gib"] = round(m["total_bytes"] / GiB, 3)
  m["hbm_gib"] = round(hbm / GiB, 3)
  return m


_OOM_RE = re.compile(r"required for ([^(]*?)\s*\(([0-9.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _oom(message: str, hbm: int) -> dict:
  """The memory entry of a compile that XLA:TPU refused for lack of HBM."""
  out = {"hbm_bytes": hbm, "hbm_gib": round(hbm / GiB, 3),
         "error": message.strip().splitlines()[0][:500]}
  m = _OOM_RE.search(message)
  if m:
    out["required_for"] = m.group(1).strip()
    out["required_bytes"] = int(float(m.group(2)) * _UNITS[m.group(3)])
    out["required_gib"] = round(out["required_bytes"] / GiB, 3)
  return out


def _cost_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def compile_step(config: Any, topology: str, *, devices: list | None = None,
                 keep_hlo: bool = False) -> dict:
  """Compiles the train step of ``config`` for the TPU slice ``topology`` (module doc).

  ``devices`` replaces the topology's devices (e.g. the host's own, for a comparison).
  With ``keep_hlo`` the report also holds the optimized HLO text (``"hlo"``).
  """
  kind = chip_kind(topology)
  devices = topology_devices(topology) if devices is None else list(devices)
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  t0 = time.perf_counter()
  abstract, shardings = abstract_train_state(config, mesh)
  step = make_train_step(config, mesh, shardings)
  batch = batch_structs(config, mesh)
  lowered = step.lower(abstract, batch)
  n = len(devices)
  b = int(config.data.batch_size)
  head = {"topology": topology, "chips": n,
          "device_kind": getattr(devices[0], "device_kind", ""),
          "mesh": dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
          "stage": stage_of(config), "global_batch": b}
  model = model_step_flops(config)
  as_compiled = model_step_flops(config, as_compiled=True)

  executed = model_executed_flops(config)

  def flops_entry(per_chip, hlo_counts):
    unrolled = hlo_counts["flops"] * n
    return {"per_chip": per_chip, "step": None if per_chip is None else per_chip * n,
            "model": model, "model_as_compiled": as_compiled,
            "ratio": None if per_chip is None else round(per_chip * n / as_compiled, 4),
            **_loop_fields(hlo_counts, n),
            "model_executed": executed, "ratio_loops_unrolled": round(unrolled / executed, 4)}
  return _compiled_report(lowered, head, kind, t0, abstract.params, b, flops_entry, keep_hlo)


def _compiled_report(lowered, head: dict, kind: str, t0: float, weights_tree, batch: int,
                     flops_entry, keep_hlo: bool) -> dict:
  """Compiles ``lowered`` and reports on it (the fields in the module doc)."""
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # XLA:TPU refuses a program whose buffers exceed the chip's HBM: that is the answer
    # "does not fit", with what the compiler found it needs.
    return {**head, "fits": False, "memory": _oom(str(e), HBM_BYTES[kind]),
            "compile_s": round(time.perf_counter() - t0, 2)}
  compile_s = time.perf_counter() - t0
  memory = _memory(compiled, HBM_BYTES[kind])
  hlo = compiled.as_text()
  # Weights and their gradients as gathered or reduced: whole, one chip's shard, one layer
  # of a scanned stack ([1, ...] or without the axis).
  weights = set()
  for x in jax.tree.leaves(weights_tree):
    for shape in (tuple(x.shape), tuple(x.sharding.shard_shape(x.shape))):
      weights |= {shape, shape[1:], (1,) + shape[1:]}
  coll, batch_ops = collectives(hlo, batch, frozenset(weights))
  report = {
      **head, "memory": memory, "fits": memory["total_bytes"] <= memory["hbm_bytes"],
      "flops": flops_entry(_cost_flops(compiled), hlo_matmul_flops(hlo)),
      "collectives": coll, "batch_collectives": batch_ops,
      "compile_s": round(compile_s, 2),
  }
  if keep_hlo:
    report["hlo"] = hlo
  return report


def is_precompute(config: Any) -> bool:
  """Whether ``config`` describes the precompute forward (``experiments/configs/precompute.py``)."""
  return "precompute" in config


def embedder_forward_flops(model_config, batch: int, length: int) -> int | None:
  """Matmul FLOPs of a decoder embedder's forward over ``batch`` captions of ``length``
  tokens: q/k/v/o projections (grouped k/v), attention logits and values (in full, as the
  model computes them), the gated MLP's three products; the embedding is a gather and an
  embedder has no LM head. None for a BERT (its count is not modelled here)."""
  from proclip_jax.models import llm  # pylint: disable=import-outside-toplevel
  if not isinstance(model_config, llm.DecoderConfig):
    return None
  c, t = model_config, batch * length
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  proj = 2 * t * c.hidden_size * (2 * q + 2 * kv)
  attn = 2 * 2 * batch * c.num_heads * length * length * c.head_dim
  mlp = 3 * 2 * t * c.hidden_size * c.intermediate_size
  return c.num_layers * (proj + attn + mlp)


def compile_precompute(config: Any, topology: str, *, devices: list | None = None,
                       keep_hlo: bool = False) -> dict:
  """Compiles the precompute forward of ``config`` for the TPU slice ``topology``.

  The report has the fields of :func:`compile_step` (``global_batch`` is the rows of one
  forward) plus ``what: "precompute"``, ``length`` and ``preset``.
  """
  # pylint: disable=import-outside-toplevel
  from flax.core import meta as flax_meta
  from proclip_jax.data.precompute import jit_in_mesh
  from proclip_jax.models import embedder as E
  kind = chip_kind(topology)
  devices = topology_devices(topology) if devices is None else list(devices)
  pc = config.precompute
  preset = E.get_preset(pc.preset)
  length = int(pc.length) or preset.max_length
  if length > preset.max_length or length < 2:
    raise ProclipError(f"config.precompute.length={length}: tokens per caption must be in "
                       f"[2, {preset.max_length}] (preset {preset.name!r}'s max_length).")
  preset = dataclasses.replace(preset, max_length=length)
  dtype = jnp.dtype(pc.compute_dtype)
  mcfg = E.model_config_from_dict(config.model.to_dict())
  model = E.build_model(mcfg, preset, dtype=dtype)
  fn = E.make_embed_tokens(model, preset.normalize)
  # precompute.build_forward's placement: the mesh over the devices, the parameters by the
  # logical axis rules, the batch over data x fsdp.
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  rules = config.get("logical_axis_rules")
  b = int(pc.batch_size)
  shards = mesh_lib.batch_divisor(mesh, rules)
  if b < 1 or b % shards:
    raise ProclipError(f"config.precompute.batch_size={b} must be a positive multiple of the "
                       f"batch shards ({shards}) of this mesh.")
  t0 = time.perf_counter()
  dummy = jnp.ones((1, 16), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, dummy,
                                            dummy))["params"]
  shardings = mesh_lib.tree_shardings(boxed, mesh, rules)
  # load_embedder stores the frozen kernels in the compute dtype (embedder.cast_kernels).
  params = jax.tree_util.tree_map_with_path(
      lambda path, x, sh: jax.ShapeDtypeStruct(
          x.shape, dtype if getattr(path[-1], "key", None) == "kernel" else x.dtype,
          sharding=sh),
      flax_meta.unbox(boxed), shardings)
  tokens = jax.ShapeDtypeStruct((b, length), jnp.int32,
                                sharding=mesh_lib.batch_sharding(mesh, rules))
  lowered = jit_in_mesh(fn, mesh, rules).lower(params, tokens, tokens, tokens)
  n = len(devices)
  head = {"topology": topology, "chips": n, "what": "precompute",
          "device_kind": getattr(devices[0], "device_kind", ""),
          "mesh": dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
          "global_batch": b, "length": length, "preset": preset.name}
  model_flops = embedder_forward_flops(mcfg, b, length)

  def flops_entry(per_chip, hlo_counts):
    known = per_chip is not None and model_flops
    return {"per_chip": per_chip, "step": None if per_chip is None else per_chip * n,
            "model": model_flops,
            "ratio": round(per_chip * n / model_flops, 4) if known else None,
            **_loop_fields(hlo_counts, n),
            "ratio_loops_unrolled": (round(hlo_counts["flops"] * n / model_flops, 4)
                                     if model_flops else None)}
  return _compiled_report(lowered, head, kind, t0, params, b, flops_entry, keep_hlo)


def summary(report: Mapping[str, Any]) -> dict:
  """The report without the HLO text (what the CLI prints)."""
  return {k: v for k, v in report.items() if k != "hlo"}
