#!/usr/bin/env bash
# Run the CUDA backend's kernels (csrc/cuda/person_vlad_cuda.cu) under
# compute-sanitizer: memcheck (out-of-bounds / misaligned accesses), then
# racecheck (shared-memory races in the epilogue kernels) and initcheck
# (reads of uninitialised device memory, e.g. scratch buffers).  A small
# Python driver calls the forward and backward ops over the edge cases
# (1/2/3-D grids, parts None/1/6, normalize on/off, N*P not a multiple of the
# block size, K=1, C=1, K>128, all four dtypes).
#
#   bench/gpu_cuda_memcheck.sh                 # all three tools
#   TOOLS=memcheck bench/gpu_cuda_memcheck.sh  # just one
#   PYTHON=python3 COMPUTE_SANITIZER=/path/to/compute-sanitizer bench/gpu_cuda_memcheck.sh
#   TOOLS=racecheck DRIVER_ARGS=--fused bench/gpu_cuda_memcheck.sh  # the one-kernel passes only
#
# Needs a CUDA device and personvlad._C built with CUDA.  Exits non-zero when
# a tool reports an error, the driver fails, or the prerequisites are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi

SAN="${COMPUTE_SANITIZER:-}"
if [[ -z "$SAN" ]]; then
  SAN="$(command -v compute-sanitizer || true)"
  for cand in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
              /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [[ -z "$SAN" && -x "$cand" ]] && SAN="$cand"
  done
fi
if [[ -z "$SAN" ]]; then
  echo "gpu_cuda_memcheck: compute-sanitizer not found (set COMPUTE_SANITIZER)" >&2
  exit 2
fi

DRIVER=bench/memcheck_driver.py  # also runs on the CPU in tests/test_cuda_backend.py

TOOLS="${TOOLS:-memcheck racecheck initcheck}"
status=0
for tool in $TOOLS; do
  echo "=== compute-sanitizer --tool $tool"
  # No caching allocator: every tensor is its own allocation, so an access
  # past a tensor's end is out of bounds for memcheck.
  # --report-api-errors no: failing CUDA API calls inside torch, cuBLAS or
  # Triton (probes whose failure they handle) are not memory errors of our
  # kernels; our launches are checked by C10_CUDA_KERNEL_LAUNCH_CHECK.
  # SAN_ARGS replaces it (e.g. SAN_ARGS="" for the tool's default).
  # shellcheck disable=SC2086
  if PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" ${SAN_ARGS---report-api-errors no} \
      --error-exitcode 99 "$PY" "$DRIVER" ${DRIVER_ARGS:-}; then
    echo "=== $tool: clean"
  else
    rc=$?
    echo "=== $tool: FAILED (exit $rc)" >&2
    status=1
  fi
done
exit $status
