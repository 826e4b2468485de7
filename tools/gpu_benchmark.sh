#!/usr/bin/env bash
# The GPU figures of docs/performance.md: the stage-2 step with the ViT-L/14 image tower in
# bfloat16 (float32 parameters and AdamW state) on one GPU, JAX against PyTorch (transformers'
# CLIPVisionModelWithProjection with SDPA attention, bf16 autocast, fused AdamW) on the same
# GPU, in its own process, alternating step by step.
#
#   bash tools/gpu_benchmark.sh [OUT_DIR] [CONFIG ...]
#
# OUT_DIR defaults to $OUT, else runs/gpu_benchmark; CONFIGs (default: all, in this order):
#   b128_scan_vs_torch      scanned layers, dense attention, batch 128, PyTorch alongside
#   b256_scan               the same, batch 256, JAX alone
#   b256_unrolled           unrolled layers, dense attention, batch 256, JAX alone
#   b128_unrolled_vs_torch  unrolled layers, dense attention, batch 128, PyTorch alongside
#   b256_no_triton          b256_unrolled with XLA's Triton GEMMs off (cuBLAS everywhere)
#   b256_cudnn              b256_unrolled with cuDNN's fused attention (--attention cudnn)
#   b128_cudnn_vs_torch     b128_unrolled_vs_torch with cuDNN's fused attention
#   b128_cudnn_tower_vs_torch  b128_cudnn_vs_torch timing only the image tower's share of the
#                           step (--part tower): whether the gap is in the tower or the rest
# Writes env.txt (GPU, driver, package versions), one CONFIG.jsonl of
# `python tools/benchmark.py stage2` records per configuration (median s/step after warm-up,
# images/s, model FLOPs, fraction of the measured 8192³ bf16 matmul rate, MFU against the
# datasheet rate NOMINAL_TFLOPS, 989 for an H100/H200 SXM, peak device memory, compile s) and
# the tail of each one's stderr in stderr.log. Each configuration has its own time limit
# (LIMIT_S) so that one failure leaves the others' records.
set -u
out=${1:-${OUT:-runs/gpu_benchmark}}
shift || true
mkdir -p "$out"
cd "$(dirname "$0")/.."
# This checkout's code (proclip_jax, benchmarks, experiments), installed with `pip install -e .`
# or not.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
limit=${LIMIT_S:-240}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$py" - <<'PY'
import importlib
for m in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy"):
  try:
    print(m, importlib.import_module(m).__version__)
  except Exception as e:  # noqa: BLE001
    print(m, "missing:", e)
import jax
print("devices", jax.devices())
PY
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

common=(--vision L/14 --dtype bfloat16 --llm-dim 4096 --peak-n 8192
        --nominal-peak-tflops "${NOMINAL_TFLOPS:-989}" --warmup 2 --steps 10)
# EXTRA_ARGS: more options for every configuration (later ones win), e.g. a tiny model to try
# the script on a CPU.
read -r -a extra <<<"${EXTRA_ARGS:-}"

run() {  # NAME [VAR=VALUE ...] -- benchmark options
  local name=$1; shift
  local envs=()
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  echo "== $name: ${envs[*]} $*"
  env "${envs[@]}" timeout "$limit" "$py" tools/benchmark.py stage2 "${common[@]}" "$@" \
      "${extra[@]}" >"$out/$name.jsonl" 2>"$out/$name.err"
  local rc=$?
  echo "exit $rc ($name)"
  cut -c1-2500 "$out/$name.jsonl"
  { echo "== $name (exit $rc)"; tail -n 8 "$out/$name.err"; } >>"$out/stderr.log"
  rm -f "$out/$name.err"
  return $rc
}

big=XLA_PYTHON_CLIENT_MEM_FRACTION=0.9  # JAX alone: most of the device for the batch of 256
configs=("$@")
[[ ${#configs[@]} -gt 0 ]] || configs=(b128_scan_vs_torch b256_scan b256_unrolled
    b128_unrolled_vs_torch b256_no_triton b256_cudnn b128_cudnn_vs_torch
    b128_cudnn_tower_vs_torch)
for c in "${configs[@]}"; do
  case $c in
    b128_scan_vs_torch) run "$c" -- --batch 128 --scan --torch-dtypes bfloat16 ;;
    b256_scan) run "$c" "$big" -- --batch 256 --scan --no-torch ;;
    b256_unrolled) run "$c" "$big" -- --batch 256 --no-torch ;;
    b128_unrolled_vs_torch) run "$c" -- --batch 128 --torch-dtypes bfloat16 ;;
    b256_no_triton)
      run "$c" "$big" "XLA_FLAGS=${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" -- \
          --batch 256 --no-torch ;;
    b256_cudnn) run "$c" "$big" -- --batch 256 --attention cudnn --no-torch ;;
    b128_cudnn_vs_torch) run "$c" -- --batch 128 --attention cudnn --torch-dtypes bfloat16 ;;
    b128_cudnn_tower_vs_torch)
      run "$c" -- --batch 128 --attention cudnn --part tower --torch-dtypes bfloat16 ;;
    *) echo "unknown configuration $c" >&2; exit 2 ;;
  esac
done
