#!/usr/bin/env bash
# One GPU session in one script: build the extension for sm_90 only, run the
# CUDA tests, then the GPU benchmarks (op, its per-kernel profile, model,
# training step, data, end to end) and compute-sanitizer on the CUDA backend.
# Results go to $OUT (the device tool's output folder) or, when unset,
# bench/results/gpu-<date>/ -- commit them under bench/results/.
#
#   bash bench/gpu_check.sh                       # every step, in priority order
#   GPU_CHECK_STEPS="ops ablation" bash bench/gpu_check.sh   # a second call: just these
#   GPU_CHECK_BUDGET=400 bash bench/gpu_check.sh  # seconds for the whole script (default 470)
#   GPU_CHECK_BUILD=0 ...                         # skip the build (a second call on a warm machine)
#
# Steps (in this order): tests ops triton_tests ops_compile profile e2e
# schedule memcheck model ablation epilogue e2e_compile cmake.  (2026-12-07:
# the CUDA tests grew to ~540 with the one-kernel passes, so the Triton
# tests became a step of their own after the op benchmarks, which check
# their own outputs against float64; a step cut at its time limit is named in
# the second call's command, like a skipped one.)  What the first H200 run took
# (2026-11-28): build ~60 s, tests 132 s, ops 77 s, ops_compile 49 s,
# ablation 64 s, model 31 s; e2e needed more than 150 s (it held the conv
# epilogue cases then, now a step of their own) and schedule more than 33 s.
# So one 470 s call gets through profile; the script then prints the second
# call (the rest, on the still-warm machine) with the budget it needs.
# Since then the tests gained the one-kernel CUDA passes' matrices (~160
# small cases: limit 170 -> 240 s, so the first call may leave ops_compile to
# the second) and the op step its fused-cuda-1k (now also at the large shape:
# the one-kernel forward splits samples over blocks), fused-cuda-1k-whole and
# floor rows; then fused-cuda-1k-tc (bf16, 4 cases: limit 110 -> 130 s).
# The e2e step gained ofi-heuristic and train-bf16-cl-heuristic (cuDNN
# benchmark mode off, against the default on): limit 130 -> 160 s.  The
# ablation step gained fused-triton-viaop (eager calls through the op, as
# before the direct path; 4 bf16 cases): limit 90 -> 110 s.  The op step
# gained fused-triton-split (the one-program Triton forward over C slices,
# a candidate default: paper shape, bf16 and fp32, 4 cases): 130 -> 145 s;
# then fused-triton-stream (the whole forward in one launch at any P, no A'
# in memory: large shape, forward, bf16 and fp32, 2 cases): 145 -> 160 s,
# and its GPU test (test_cuda_stream_forward, 2 dtypes): triton_tests 150 -> 170 s.
# The GPU machine already has torch and triton: nothing
# is pip-installed but this package (--no-deps).  Each step has its own time
# limit, capped by what is left of the budget (counted from the script's
# start, the build included, less a reserve for the reports), so one slow
# step cannot eat the others; the script goes on after a failing step and
# exits non-zero at the end if any failed.  Call it with the device tool's
# timeout_s at least GPU_CHECK_BUDGET + 40.
#
# Where the device tool's $OUT exists (it returns at most 8 files), the results
# folder is packed into $OUT/gpu_results.tgz after every step, so a command
# killed at its time limit still brings back everything finished before.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
RES="bench/results/gpu-$(date -u +%Y%m%d-%H%M)"
DEVICE_OUT="${OUT:-}"
OUT="$RES"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-$($PY setup.py --print-cuda-home)}"
STEPS=" ${GPU_CHECK_STEPS:-tests ops triton_tests ops_compile profile e2e schedule memcheck model ablation epilogue e2e_compile cmake} "
BUDGET="${GPU_CHECK_BUDGET:-470}"
RESERVE=30  # seconds kept for the merge, the reports and the last pack
failed=()
skipped=()
need=0  # seconds the skipped steps would have had
pack() {  # the results so far into the device tool's $OUT (atomically: a kill mid-tar keeps the last pack)
  [ -n "$DEVICE_OUT" ] || return 0
  tar czf "$DEVICE_OUT/.gpu_results.tgz.part" "$OUT" 2>/dev/null \
    && mv -f "$DEVICE_OUT/.gpu_results.tgz.part" "$DEVICE_OUT/gpu_results.tgz"
}
trap pack EXIT
left() { echo $(( BUDGET - RESERVE - ($(date +%s) - T0) )); }
cap() { local l; l=$(left); echo $(( l > $1 ? $1 : l )); }  # min(limit, time left)
step() {  # step NAME LIMIT_S CMD...: LIMIT_S capped by what is left of the budget
  local name=$1 nominal=$2 limit; shift 2
  limit=$(cap "$nominal")
  local t0=$(date +%s)
  if [ "$limit" -lt 40 ]; then
    echo "== $name: skipped, ${limit}s left"; echo "skipped: ${limit}s left" > "$OUT/$name.log"
    [ -n "${CUR:-}" ] && skipped+=("$CUR") && need=$(( need + nominal )); return
  fi
  echo "== $name (limit ${limit}s)"
  # SIGINT first: pytest stops as on Ctrl-C and still runs its session end, so
  # pytest-benchmark writes the JSON of the cases that finished (bench/conftest.py
  # drops the interrupted one); KILL 25 s later (15 s were too few once, with
  # compile workers to stop).
  local rc=0
  timeout -s INT -k 25 "$(( limit - 25 ))" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "   ok in $(( $(date +%s) - t0 ))s"
  else
    echo "   FAILED (rc=$rc) in $(( $(date +%s) - t0 ))s; tail:"; tail -n 15 "$OUT/$name.log"; failed+=("$name")
    if { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ $(( $(date +%s) - t0 )) -ge $(( limit - 27 )) ]; then
      if [ "$limit" -lt "$nominal" ]; then  # cut short by the budget: the second call runs it again
        echo "   (cut at ${limit}s, short of its ${nominal}s: left for the second call)"
        [ -n "${CUR:-}" ] && skipped+=("$CUR") && need=$(( need + nominal ))
      else
        echo "   (cut at its own ${nominal}s limit: raise it in bench/gpu_check.sh to see the rest)"
      fi
    fi
  fi
  pack
}
want() { CUR=""; [[ "$STEPS" == *" $1 "* ]] && CUR=$1; }  # CUR: the step key, for the rerun hint

[ "${GPU_CHECK_BUILD:-1}" = 0 ] || step build 180 $PY -m pip install --no-build-isolation --no-deps -e .
$PY - > "$OUT/env.json" <<'EOF'
import json, datetime, platform, torch
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"unavailable: {e}"
import personvlad.ops as ops
print(json.dumps({
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
    "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
    "triton": tv, "python": platform.python_version(),
    "backends": list(ops.available_backends()),
}, indent=1))
EOF
cat "$OUT/env.json"
pack
BENCH=($PY -m pytest -q -p no:cacheprovider --benchmark-only --benchmark-disable-gc --benchmark-min-time=0.05)

# 1. Correctness first.  -v so a killed step still shows which tests ran; no
#    -x so one failure does not hide the others.  Autotuning off for the tests
#    (first config of each list): every test shape would otherwise compile and
#    time 2-5 configs per kernel; the benchmarks below autotune and check
#    their own output against float64.
want tests && step gpu_tests 200 env PERSONVLAD_TRITON_AUTOTUNE=0 \
  $PY -m pytest -v -m cuda -p no:cacheprovider --durations=15 tests/ --ignore=tests/test_triton.py
# 2. The op (issues 4/5): fused backends and unfused eager, then the
#    torch.compile'd unfused baseline (8 compilations), then where each
#    variant's time goes (bench/profile_op.py: wall vs device-busy time and
#    the kernels).  All op files are merged into bench_ops.json for the report.
want ops && step bench_ops 160 "${BENCH[@]}" bench/test_bench_ops.py \
  -k "(gpu and not compile and not ieee and not tiled and not viaop) or (dispatch and cuda)" \
  --benchmark-json="$OUT/bench_ops_fused.json"
[ -s "$OUT/bench_ops_fused.json" ] && $PY -m personvlad.cli bench table "$OUT/bench_ops_fused.json" --out "$OUT/backend_table.json"
# The Triton backend's GPU tests (its op benchmark rows above check their
# outputs against float64 already).
want triton_tests && step gpu_triton_tests 170 env PERSONVLAD_TRITON_AUTOTUNE=0 \
  $PY -m pytest -v -m cuda -p no:cacheprovider --durations=10 tests/test_triton.py
want ops_compile && step bench_ops_compile 80 "${BENCH[@]}" bench/test_bench_ops.py \
  -k "gpu and compile" --benchmark-json="$OUT/bench_ops_compile.json"
want profile && step profile_op 120 $PY bench/profile_op.py --out "$OUT"
# 3. End to end (issue 10): inference and training variants without
#    torch.compile (the conv epilogue micro-benchmarks are a later step).
want e2e && step bench_e2e 160 "${BENCH[@]}" bench/test_bench_e2e.py -k "gpu and not compile and not epilogue_gpu" \
  --benchmark-json="$OUT/bench_e2e.json"
want e2e && $PY -c "import json; from personvlad.perf import check_cudnn_3d; print(json.dumps(check_cudnn_3d(warn=False), indent=1, default=str))" > "$OUT/cudnn_check.json"
# The paper's whole schedule (issue 10: < 30 min), projected from a 200-
# iteration probe of the real trainer (data from a shard store, k-means,
# checkpoints); the compiled-model and JPEG-loader variants are left for a
# manual run.
want schedule && step bench_schedule 120 "${BENCH[@]}" bench/test_bench_train.py -k "schedule and gpu and shards and not compile" -s \
  --benchmark-json="$OUT/bench_schedule.json"
# memcheck over both CUDA paths (gemm and the one-kernel passes), forward
# and backward; racecheck over the one-kernel passes (their shared-memory
# phases), float32 + bf16 only.
want memcheck && step memcheck 90 env TOOLS=memcheck PYTHON="$PY" bash bench/gpu_cuda_memcheck.sh
want memcheck && step racecheck 60 env TOOLS=racecheck DRIVER_ARGS=--fused PYTHON="$PY" \
  bash bench/gpu_cuda_memcheck.sh
models=()
for f in bench/test_bench_model.py bench/test_bench_train.py bench/test_bench_data.py; do
  [ -f "$f" ] && models+=("$f")
done
want model && step bench_model 70 "${BENCH[@]}" "${models[@]}" -k "(gpu or cuda) and not schedule" \
  --benchmark-json="$OUT/bench_model.json"
want ablation && step bench_ops_ablation 110 "${BENCH[@]}" bench/test_bench_ops.py \
  -k "gpu and (ieee or tiled or viaop)" --benchmark-json="$OUT/bench_ops_ablation.json"
$PY - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
parts = [os.path.join(out, f"bench_ops_{s}.json") for s in ("fused", "compile", "ablation")]
parts = [p for p in parts if os.path.exists(p) and os.path.getsize(p) > 0]
if parts:
    merged = json.load(open(parts[0]))
    for p in parts[1:]:
        merged["benchmarks"] += json.load(open(p))["benchmarks"]
    json.dump(merged, open(os.path.join(out, "bench_ops.json"), "w"), indent=1)
EOF
want epilogue && step bench_epilogue 90 "${BENCH[@]}" bench/test_bench_e2e.py -k "epilogue_gpu and not compile" \
  --benchmark-json="$OUT/bench_epilogue.json"
want e2e_compile && step bench_e2e_compile 300 "${BENCH[@]}" bench/test_bench_e2e.py -k "gpu and compile" \
  --benchmark-json="$OUT/bench_e2e_compile.json"
# 4. The libtorch C++ test with its CUDA case (dispatcher level, no Python):
#    last, as CI runs its CPU case on every commit.
want cmake && step cmake_cuda_test 300 bash -c 'cmake -S . -B /tmp/pv-cmake -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$('"$PY"' -c "import torch.utils; print(torch.utils.cmake_prefix_path)")" -DCMAKE_CUDA_ARCHITECTURES=90-real && cmake --build /tmp/pv-cmake -j 16 && cd /tmp/pv-cmake && ctest --output-on-failure'

for j in bench_ops bench_e2e bench_schedule bench_epilogue bench_e2e_compile bench_model; do
  [ -s "$OUT/$j.json" ] && $PY -m personvlad.cli bench report "$OUT/$j.json" --out "$OUT" > "$OUT/$j.report.log" 2>&1 \
    && cat "$OUT/$j.md"  # the command writes $j.md itself; its own messages go to the log
done
echo "results in $OUT ($(( $(date +%s) - T0 )) s)"  # packed by the EXIT trap
[ -n "$DEVICE_OUT" ] && cat "$OUT"/*.md > "$DEVICE_OUT/summary.md" 2>/dev/null
if [ ${#skipped[@]} -gt 0 ]; then
  b=$(( need + RESERVE + 20 )); [ "$b" -gt 560 ] && b=560
  echo "out of time for: ${skipped[*]} (${need}s of step limits); on the warm machine, at once"
  echo "(device timeout_s $(( b + 40 )); steps that still do not fit are named again):"
  echo "  GPU_CHECK_BUILD=0 GPU_CHECK_BUDGET=$b GPU_CHECK_STEPS=\"${skipped[*]}\" bash bench/gpu_check.sh"
fi
if [ ${#failed[@]} -gt 0 ]; then echo "failed steps: ${failed[*]}"; exit 1; fi
