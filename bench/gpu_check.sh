#!/usr/bin/env bash
# One GPU session in one script (< 8 minutes on an H100): build the extension
# for sm_90 only, run the CUDA tests, compute-sanitizer memcheck on the CUDA
# backend, then the GPU benchmarks (op, model, training step, data, end to
# end).  Results go to $OUT (the device tool's output folder) or, when unset,
# bench/results/gpu-<date>/ — commit them under bench/results/.
#
#   bash bench/gpu_check.sh            # on a machine with torch + triton + nvcc
#
# The GPU machine already has torch and triton: nothing is pip-installed but
# this package (--no-deps).  Each step has its own time limit so one slow step
# cannot eat the others; the script goes on after a failing step and exits
# non-zero at the end if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
# Everything is written under RES; where the device tool's $OUT exists (it
# returns at most 8 files) RES is packed into $OUT/gpu_results.tgz at the end.
RES="bench/results/gpu-$(date -u +%Y%m%d-%H%M)"
DEVICE_OUT="${OUT:-}"
OUT="$RES"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-$($PY setup.py --print-cuda-home)}"
failed=()
step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "   ok in $(( $(date +%s) - t0 ))s"
  else
    echo "   FAILED (rc=$?) in $(( $(date +%s) - t0 ))s; tail:"; tail -n 15 "$OUT/$name.log"; failed+=("$name")
  fi
}

step build 180 $PY -m pip install --no-build-isolation --no-deps -e .
$PY - > "$OUT/env.json" <<'EOF'
import json, datetime, platform, torch
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"unavailable: {e}"
import personvlad.ops as ops
print(json.dumps({
    "date": datetime.datetime.utcnow().isoformat() + "Z",
    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
    "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
    "triton": tv, "python": platform.python_version(),
    "backends": list(ops.available_backends()),
}, indent=1))
EOF
cat "$OUT/env.json"

T0=$(date +%s)
left() { echo $(( 460 - ($(date +%s) - T0) )); }   # keep the whole run under ~8 min
step gpu_tests 120 $PY -m pytest -q -x -m cuda -p no:cacheprovider tests/
if [ -f bench/gpu_cuda_memcheck.sh ]; then
  step memcheck 60 bash bench/gpu_cuda_memcheck.sh
fi
# The libtorch C++ test with its CUDA case (dispatcher-level, no Python).
step cmake_cuda_test 120 bash -c 'cmake -S . -B /tmp/pv-cmake -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$('"$PY"' -c "import torch.utils; print(torch.utils.cmake_prefix_path)")" -DCMAKE_CUDA_ARCHITECTURES=90-real && cmake --build /tmp/pv-cmake -j 16 && cd /tmp/pv-cmake && ctest --output-on-failure'
BENCH_OPTS=(-q -p no:cacheprovider --benchmark-only --benchmark-disable-gc --benchmark-min-time=0.05)
step bench_ops 120 $PY -m pytest "${BENCH_OPTS[@]}" bench/test_bench_ops.py -k gpu --benchmark-json="$OUT/bench_ops.json"
[ -s "$OUT/bench_ops.json" ] && $PY -m personvlad.cli bench table "$OUT/bench_ops.json" --out "$OUT/backend_table.json"
step perf_tests 60 $PY -m pytest -q -p no:cacheprovider tests/test_perf.py
$PY -c "import json; from personvlad.perf import check_cudnn_3d; print(json.dumps(check_cudnn_3d(warn=False), indent=1, default=str))" > "$OUT/cudnn_check.json"; cat "$OUT/cudnn_check.json"
# End to end: without the torch.compile variants first (they are the slow part).
step bench_e2e $(( $(left) > 150 ? 150 : $(left) )) $PY -m pytest "${BENCH_OPTS[@]}" bench/test_bench_e2e.py -k "gpu and not compile" --benchmark-json="$OUT/bench_e2e.json"
models=()
for f in bench/test_bench_model.py bench/test_bench_train.py bench/test_bench_data.py; do
  [ -f "$f" ] && models+=("$f")
done
if [ "$(left)" -gt 40 ]; then
  step bench_model $(( $(left) > 90 ? 90 : $(left) )) $PY -m pytest "${BENCH_OPTS[@]}" "${models[@]}" -k "gpu or cuda" --benchmark-json="$OUT/bench_model.json"
fi
if [ "$(left)" -gt 60 ]; then
  step bench_e2e_compile $(left) $PY -m pytest "${BENCH_OPTS[@]}" bench/test_bench_e2e.py -k "gpu and compile" --benchmark-json="$OUT/bench_e2e_compile.json"
fi
for j in bench_ops bench_e2e bench_e2e_compile bench_model; do
  [ -s "$OUT/$j.json" ] && $PY -m personvlad.cli bench report "$OUT/$j.json" --out "$OUT" > "$OUT/$j.md" 2>&1 && cat "$OUT/$j.md"
done
echo "results in $OUT"
if [ -n "$DEVICE_OUT" ]; then
  tar czf "$DEVICE_OUT/gpu_results.tgz" "$OUT" && cat "$OUT"/*.md > "$DEVICE_OUT/summary.md" 2>/dev/null
fi
if [ ${#failed[@]} -gt 0 ]; then echo "failed steps: ${failed[*]}"; exit 1; fi
