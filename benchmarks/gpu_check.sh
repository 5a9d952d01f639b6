#!/usr/bin/env bash
# gpu_check.sh — the one prepared script for a GPU machine (DESIGN.md §5).
#
# Builds slmfast._C with the CUDA part using every core, prints `slmfast info`, runs the GPU
# tests (`pytest -m gpu -x -q`: every cuda and triton backend against the fp64 reference) and
# the GPU benchmarks, then prints a short summary table last. Details go to $OUT when it is set
# (the device tool brings that folder back), else to a temporary folder. Needs only what the GPU
# image has (torch, triton, pytest, transformers; no internet). Budget: under 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
START=$(date +%s)
SUMMARY=()

elapsed() { echo $(( $(date +%s) - START )); }
step() {  # step NAME TIMEOUT_S LOGFILE COMMAND...
  local name=$1 limit=$2 log=$3; shift 3
  local t0; t0=$(date +%s)
  echo "=== [$(elapsed)s] $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$log"
  local rc=${PIPESTATUS[0]}
  local status="ok"; [ "$rc" -ne 0 ] && status="FAILED (rc $rc)"; [ "$rc" -eq 124 ] && status="TIMED OUT (${limit}s)"
  SUMMARY+=("$(printf '%-28s %-22s %5ss' "$name" "$status" $(( $(date +%s) - t0 )))")
  return "$rc"
}

"$PY" - <<'PYEOF' | tee "$OUT_DIR/environment.txt"
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
PYEOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT_DIR/environment.txt"

if step "build (CUDA)" 300 build.log env MAX_JOBS="$(nproc)" SLMFAST_BUILD_CUDA=1 "$PY" setup.py --quiet build_ext --inplace; then
  step "slmfast info" 60 info.txt "$PY" -m slmfast info
  step "pytest -m gpu" 240 pytest_gpu.log "$PY" -m pytest -m gpu -x -q -p no:cacheprovider tests
  step "bench rms_norm" 120 bench_rms_norm.txt "$PY" benchmarks/bench_rms_norm.py --table --device cuda
  step "bench swiglu" 90 bench_swiglu.txt "$PY" benchmarks/bench_swiglu.py --table --device cuda --reps 10
  step "bench layer_norm" 90 bench_layer_norm.txt "$PY" benchmarks/bench_layer_norm.py --table --device cuda --quick --reps 10
  step "bench rotary" 90 bench_rotary.txt "$PY" benchmarks/bench_rotary.py --table --device cuda --quick --reps 10
  step "bench attention (triton)" 180 bench_attention_triton.txt "$PY" benchmarks/bench_attention_triton.py --precompile
  step "bench attention" 150 bench_attention.txt "$PY" benchmarks/bench_attention.py --table --device cuda --quick --reps 5
  step "bench losses" 120 bench_losses.txt "$PY" benchmarks/bench_losses.py --table --device cuda --reps 3
  step "bench train" 150 bench_train.txt "$PY" benchmarks/bench_train.py --device cuda --dtype bf16 --batch 8
  step "bench recompute" 150 bench_recompute.txt "$PY" benchmarks/bench_recompute.py --table --device cuda --batch 4
fi

echo
echo "=== gpu_check summary ($(elapsed)s; details in $OUT_DIR)"
head -3 "$OUT_DIR/environment.txt"
printf '%-28s %-22s %6s\n' "step" "status" "time"
for line in "${SUMMARY[@]}"; do echo "$line"; done
grep -E "passed|failed|error" "$OUT_DIR/pytest_gpu.log" 2>/dev/null | tail -1
for f in "$OUT_DIR"/bench_*.txt; do
  [ -f "$f" ] && { echo "--- $(basename "$f")"; grep -E "fwd\+bwd|saved|slmfast|HF" "$f"; }
done
