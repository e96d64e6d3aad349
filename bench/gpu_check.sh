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
OUT="${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M)}"
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

step build 240 $PY -m pip install --no-build-isolation --no-deps -e .
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

step gpu_tests 150 $PY -m pytest -q -x -m cuda -p no:cacheprovider tests/
if [ -f bench/gpu_cuda_memcheck.sh ]; then
  step memcheck 90 bash bench/gpu_cuda_memcheck.sh
fi
BENCH_OPTS=(-q -p no:cacheprovider --benchmark-only --benchmark-disable-gc --benchmark-min-time=0.05)
step bench_ops 150 $PY -m pytest "${BENCH_OPTS[@]}" bench/test_bench_ops.py -k gpu --benchmark-json="$OUT/bench_ops.json"
models=()
for f in bench/test_bench_e2e.py bench/test_bench_model.py bench/test_bench_train.py bench/test_bench_data.py; do
  [ -f "$f" ] && models+=("$f")
done
step bench_model 150 $PY -m pytest "${BENCH_OPTS[@]}" "${models[@]}" -k "gpu or cuda" --benchmark-json="$OUT/bench_model.json"
for j in bench_ops bench_model; do
  [ -s "$OUT/$j.json" ] && $PY -m personvlad.cli bench report "$OUT/$j.json" --out "$OUT" > "$OUT/$j.md" 2>&1 && cat "$OUT/$j.md"
done
echo "results in $OUT"
if [ ${#failed[@]} -gt 0 ]; then echo "failed steps: ${failed[*]}"; exit 1; fi
