#!/usr/bin/env bash
# gpu_check.sh — the one prepared script for a GPU machine (docs/architecture.md §6).
#
# One call runs these steps in order, each under its own time limit, everything they print
# appended to $OUT/log.txt (stdout gets one line per step and the summary at the end):
#   env         nvidia-smi, torch/triton/CUDA versions, varlen_attn's signature, and the C++
#               toolchain torch's cpp_extension would use (which libstdc++/libgcc it links)
#   build       slmfast._C with the CUDA part for TORCH_CUDA_ARCH_LIST (default 9.0a only);
#               meanwhile, in the background, tools/abort_probe.py (which link flags let a C++
#               exception of an extension reach Python on this image)
#   linkage     what the built _C needs (ldd, readelf -d) and whether it holds its own C++ runtime
#   errors      tests/test_errors_reach_python.py (bad arguments to CPU and CUDA ops, each in a
#               subprocess); when that fails and the probe found link flags that work, _C is
#               relinked with them (LDFLAGS: the compiled objects are kept) and tested again
#   info        python -m slmfast info
#   tests       pytest -m gpu over tests/ops and the errors test, on xdist workers -> junit.xml
#               (without the torch.compile / opcheck tests and the autotuned Triton attention)
#   attention, layers, losses   benchmarks/gpu_bench.py -> results.json
#   table       benchmarks/gpu_dispatch.py -> gpu_dispatch.json; the steps after it run with it
#   tests-more  pytest -m gpu over the other test folders, the torch.compile / opcheck tests and
#               the autotuned Triton attention -> junit_more.xml, then the table again with those
#               verdicts too
#   train       the 125M-class training step (benchmarks/gpu_bench.py train)
#   compiled    the torch.compile baselines of the layers
# Files in $OUT (the device tool brings back at most 8): log.txt, results.json, junit.xml,
# junit_more.xml, gpu_dispatch.json, summary.txt and, when it is at most 16 MB without its debug
# sections, the built slmfast/_C*.so (carry it into a later run with GPU_CHECK_STEPS without "build").
#
# Environment:
#   GPU_CHECK_BUDGET   seconds for the whole script (default 420). A step gets at most what is left
#                      minus 15 s kept for the summary; a step that would get under 10 s is skipped.
#   GPU_CHECK_STEPS    comma list of the steps to run (default: all of them)
#   GPU_CHECK_WORKERS  pytest-xdist workers (default 12: Triton and inductor compiles are CPU-bound)
#   GPU_CHECK_TESTS_LIMIT  seconds for the tests step (default 160)
#   GPU_CHECK_TESTS    what the tests step runs (default "tests/ops tests/test_errors_reach_python.py";
#                      a rerun may name files, node ids or add -k EXPR)
#   GPU_CHECK_SEED     a folder with an earlier run's results.json / junit.xml (carried in): its
#                      figures and verdicts are the start of this run's, so that a short rerun of
#                      some steps still writes a whole dispatch table
#   TORCH_CUDA_ARCH_LIST (default 9.0a), MAX_JOBS (default: every core), PYTHON (default python3)
# Wheels in .whl/ (cut-cross-entropy, a baseline of the losses) are installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d)  # scratch that does not come back
LOG="$OUT_DIR/log.txt"
RESULTS="$OUT_DIR/results.json"
JUNIT="$OUT_DIR/junit.xml"
JUNIT_MORE="$OUT_DIR/junit_more.xml"
TABLE="$OUT_DIR/gpu_dispatch.json"
SUMMARY_FILE="$OUT_DIR/summary.txt"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-420}"
STEPS="${GPU_CHECK_STEPS:-all}"
WORKERS="${GPU_CHECK_WORKERS:-12}"
ARCHS="${TORCH_CUDA_ARCH_LIST:-9.0a}"
JOBS="${MAX_JOBS:-$(nproc)}"
RESERVE=15
START=$(date +%s)
SUMMARY=()
LAST_RC=0
TESTS="${GPU_CHECK_TESTS:-tests/ops tests/test_errors_reach_python.py}"
export PYTHONUNBUFFERED=1 PY ARCHS JOBS RESULTS TABLE
: >"$LOG"
if [ -n "${GPU_CHECK_SEED:-}" ]; then
  [ -f "$GPU_CHECK_SEED/results.json" ] && cp "$GPU_CHECK_SEED/results.json" "$RESULTS"
  [ -f "$GPU_CHECK_SEED/junit.xml" ] && cp "$GPU_CHECK_SEED/junit.xml" "$WORK/junit_seed.xml"
fi

elapsed() { echo $(( $(date +%s) - START )); }
want() { [ "$STEPS" = "all" ] || [[ ",$STEPS," == *",$1,"* ]]; }
note() { echo "$*" | tee -a "$LOG"; }

step() {  # [ESSENTIAL=1] step NAME MAX_SECONDS COMMAND...  (sets LAST_RC; 124 = cut at its limit)
  local name=$1 cap=$2; shift 2
  LAST_RC=0
  want "$name" || { LAST_RC=200; return 0; }
  local left=$(( BUDGET - $(elapsed) - RESERVE ))
  [ "${ESSENTIAL:-0}" = 1 ] && left=$cap  # a few seconds the summary cannot do without
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 10 ]; then
    SUMMARY+=("$(printf '%-16s %-26s %5s' "$name" "SKIPPED (budget spent)" "-")")
    note "=== [$(elapsed)s] $name: skipped, ${left}s of the budget left"
    LAST_RC=201
    return 0
  fi
  local t0; t0=$(date +%s)
  note "=== [$(elapsed)s] $name (limit ${limit}s): $*"
  # SIGINT first: pytest then still writes its JUnit file, the benchmarks keep their figures.
  # Shell functions (exported below) run in a child bash, since timeout runs programs.
  if declare -F "$1" >/dev/null; then
    timeout -s INT -k 20 "$limit" bash -c '"$@"' bash "$@" >>"$LOG" 2>&1
  else
    timeout -s INT -k 20 "$limit" "$@" >>"$LOG" 2>&1
  fi
  LAST_RC=$?
  local status="ok"
  [ "$LAST_RC" -ne 0 ] && status="FAILED (rc $LAST_RC)"
  [ "$LAST_RC" -eq 124 ] && status="CUT AT ${limit}s"
  [ "$LAST_RC" -gt 128 ] && [ "$LAST_RC" -ne 200 ] && status="KILLED (signal $(( LAST_RC - 128 )))"
  SUMMARY+=("$(printf '%-16s %-26s %5ss' "$name" "$status" $(( $(date +%s) - t0 )))")
  echo "    -> $status after $(( $(date +%s) - t0 ))s"
}

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- env ----------------------------------------------------------------------------------------
environment() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm --format=csv
  "$PY" - <<'PYEOF'
import inspect, os, platform, shutil, torch
from torch.utils import cpp_extension
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
cxx = os.environ.get("CXX", "c++")
print("cpp_extension compiler:", cxx, "->", shutil.which(cxx), "->", os.path.realpath(shutil.which(cxx) or cxx))
print("torch built with:", torch.__config__.show().splitlines()[1:4])
try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
except ImportError as exc:
    print("varlen_attn: not in this torch", exc)
PYEOF
  echo "--- which -a g++ c++: $(which -a g++ c++ | tr '\n' ' ')"
  g++ -v 2>&1 | tail -2
  echo "--- echo | g++ -dM -E -x c++ - (GNU/ABI macros)"
  echo | g++ -dM -E -x c++ - | grep -E "__GNUC__|__GNUC_MINOR__|_GLIBCXX_USE_CXX11_ABI|__VERSION__|__cplusplus" | head
  echo "--- libraries: libstdc++.so $(g++ -print-file-name=libstdc++.so)  libstdc++.a $(g++ -print-file-name=libstdc++.a)" \
       " libgcc_s.so $(g++ -print-file-name=libgcc_s.so)  libgcc $(g++ -print-libgcc-file-name)"
  echo "--- g++ -dumpspecs (libgcc / static)"
  g++ -dumpspecs | grep -i -A3 'libgcc\|static' | cut -c1-400 | head -40
  command -v nvcc >/dev/null && nvcc --version | tail -2
  echo "cores $(nproc), $(free -g | awk '/Mem:/ {print $2}') GiB memory"
}
export -f environment
step env 30 environment
grep -m1 -A1 "^name, driver" "$LOG"; grep -m1 "^python " "$LOG"

# ---- build (and the abort probe beside it) ---------------------------------------------------
PROBE_PID=""
if want errors; then  # the probe informs the errors step only
  ( timeout 240 "$PY" tools/abort_probe.py --json "$RESULTS" --recommend-file "$WORK/ldflags" \
      >"$WORK/probe.log" 2>&1 ) &
  PROBE_PID=$!
fi
build() {  # build [VAR=value ...]: slmfast._C in place, with the CUDA part
  local archs="$ARCHS"
  # torch turns TORCH_CUDA_ARCH_LIST into -gencode flags; a torch that does not know an entry
  # (9.0a before torch 2.3) would stop the build: fall back to plain 9.0 then.
  TORCH_CUDA_ARCH_LIST="$archs" "$PY" -c \
    "from torch.utils.cpp_extension import _get_cuda_arch_flags as f; print('nvcc arch flags:', f())" \
    || { echo "TORCH_CUDA_ARCH_LIST=$archs refused by this torch; building for 9.0"; archs=9.0; }
  env TORCH_CUDA_ARCH_LIST="$archs" MAX_JOBS="$JOBS" SLMFAST_BUILD_CUDA=1 "$@" \
    "$PY" setup.py --quiet build_ext --inplace
}
SO="slmfast/_C$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
export SO
export -f build
step build 200 build

linkage() {
  [ -f "$SO" ] || { echo "no $SO"; return 1; }
  ls -la "$SO"
  echo "--- readelf -d (NEEDED, RPATH)"; readelf -d "$SO" | grep -E "NEEDED|RPATH|RUNPATH"
  echo "--- ldd (C++ runtime, OpenMP, torch, CUDA)"; ldd "$SO" | grep -E "stdc|gcc|gomp|c10|torch|cuda"
  echo "--- C++ runtime symbols defined inside _C (a private copy when any):"
  nm -D --defined-only "$SO" | grep -E " (__cxa_throw|__cxa_begin_catch|_Unwind_RaiseException|__gxx_personality_v0)$" \
    || echo "(none: the shared libstdc++/libgcc_s are used)"
  "$PY" -c "import slmfast.backends as b; print(b.build_info())"
}
export -f linkage
step linkage 30 linkage
if [ -n "$PROBE_PID" ]; then
  wait "$PROBE_PID" 2>/dev/null
  { echo "=== abort probe (tools/abort_probe.py)"; cat "$WORK/probe.log"; } >>"$LOG"
  grep -E "^recommended" "$WORK/probe.log"
fi

# ---- errors: a C++ exception must reach Python ----------------------------------------------
ERRORS_TEST=(-m pytest -q -p no:cacheprovider tests/test_errors_reach_python.py)
step errors 90 "$PY" "${ERRORS_TEST[@]}"
if [ "$LAST_RC" -ne 0 ] && [ "$LAST_RC" -lt 200 ] && [ -s "$WORK/ldflags" ]; then
  LDF=$(cat "$WORK/ldflags")
  note "errors failed; relinking slmfast._C with LDFLAGS='$LDF' (the abort probe's first working flags)"
  rm -f "$SO"
  step relink 150 build LDFLAGS="$LDF"
  step linkage 20 linkage
  step errors 90 "$PY" "${ERRORS_TEST[@]}"
fi
step info 30 "$PY" -m slmfast info

# ---- the GPU tests ---------------------------------------------------------------------------
PYTEST=(-m pytest -m gpu -q -p no:cacheprovider)
"$PY" -c "import xdist" 2>/dev/null && PYTEST+=(-n "$WORKERS" --dist loadgroup --max-worker-restart 16)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 180)
# Correctness of every kernel first. The Triton attention runs its first config (autotuning
# compiles each config: minutes); torch.compile / opcheck tests (inductor compiles, seconds each)
# and the autotuned path wait for tests-more. One inductor compile thread per xdist worker.
LATER='compiles_fullgraph or opcheck or gpu_autotuned'
# shellcheck disable=SC2086  # TESTS is a list of pytest arguments
step tests "${GPU_CHECK_TESTS_LIMIT:-160}" env SLMFAST_TRITON_AUTOTUNE=0 TORCHINDUCTOR_COMPILE_THREADS=1 "$PY" "${PYTEST[@]}" \
  --junitxml="$JUNIT" -k "not ($LATER)" $TESTS

# ---- benchmarks ------------------------------------------------------------------------------
BENCH=(benchmarks/gpu_bench.py)
step attention 70 env SLMFAST_TRITON_AUTOTUNE=0 "$PY" "${BENCH[@]}" attention --out "$RESULTS"
step layers 50 "$PY" "${BENCH[@]}" layers --out "$RESULTS"
step losses 40 "$PY" "${BENCH[@]}" losses --out "$RESULTS"
make_table() { "$PY" benchmarks/gpu_dispatch.py --results "$RESULTS" --junit "$@" --out "$TABLE"; }
export -f make_table
VERDICTS=()  # oldest first: a test's last outcome counts
[ -f "$WORK/junit_seed.xml" ] && VERDICTS+=("$WORK/junit_seed.xml")
VERDICTS+=("$JUNIT")
ESSENTIAL=1 step table 20 make_table "${VERDICTS[@]}"
[ -s "$TABLE" ] && export SLMFAST_GPU_TABLE="$TABLE"

step tests-more 120 env TORCHINDUCTOR_COMPILE_THREADS=1 "$PY" "${PYTEST[@]}" --junitxml="$JUNIT_MORE" \
  -k "not ops or $LATER" tests/nn tests/models tests/distill tests/integrations tests/test_recompute.py tests/ops
if [ -s "$JUNIT_MORE" ] && [ -s "$RESULTS" ]; then ESSENTIAL=1 step table 20 make_table "${VERDICTS[@]}" "$JUNIT_MORE"; fi
step train 90 "$PY" "${BENCH[@]}" train --out "$RESULTS" --batch 8 --seq 1024
step compiled 90 "$PY" "${BENCH[@]}" layers --compiled --out "$RESULTS"

# The extension without its debug sections, when small enough to come back (to carry into a rerun).
if [ -f "$SO" ] && strip --strip-debug -o "$OUT_DIR/$(basename "$SO")" "$SO" 2>/dev/null; then
  [ "$(stat -c %s "$OUT_DIR/$(basename "$SO")")" -le 16000000 ] || rm -f "$OUT_DIR/$(basename "$SO")"
fi

# ---- summary (last: the device tool returns only the end of the output) ----------------------
{
  echo
  echo "=== gpu_check summary: $(elapsed)s of ${BUDGET}s; files in $OUT_DIR"
  printf '%-16s %-26s %6s\n' "step" "status" "time"
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)|worker .* crashed" "$LOG" | grep -v "^=== " | tail -40
  [ -f "$SO" ] && { echo -n "_C NEEDED: "; readelf -d "$SO" | grep NEEDED | sed 's/.*\[\(.*\)\]/\1/' | tr '\n' ' '; echo; }
  "$PY" benchmarks/gpu_bench.py summary --out "$RESULTS" 2>&1
  [ -s "$TABLE" ] && "$PY" - "$TABLE" <<'PYEOF'
import json, sys
sys.path.insert(0, "benchmarks")
from gpu_dispatch import summary
print("\n".join(summary(json.load(open(sys.argv[1])))))
PYEOF
} 2>&1 | tee "$SUMMARY_FILE"
rm -rf "$WORK"
