"""The workload that ``bench/gpu_cuda_memcheck.sh`` runs under compute-sanitizer:
the native op's forward and backward over its edge cases (1/2/3-D grids,
parts None/1/6, normalize on/off, N*P not a multiple of the block size, K=1,
C=1, K>128, N=0), in all four dtypes, with contiguous and non-contiguous
inputs; on CUDA through both paths (PERSONVLAD_CUDA_FWD/_BWD=gemm and
fused: the one-kernel passes' dynamic shared memory too; the forward both
with its samples split over blocks, as it does by default at these small
batches wherever P > 32, and whole, PERSONVLAD_CUDA_FWD_SPLITS=1).

    python bench/memcheck_driver.py [--device cuda|cpu] [--fused]

``--device cpu`` runs the same cases on the C++ CPU kernels: the test suite
does that, so the driver itself is checked on machines without a GPU.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import make_inputs  # noqa: E402

from _env import scoped_env  # noqa: E402  (this script's folder is on sys.path)
from personvlad import ops  # noqa: E402

CASES = [
    dict(N=3, C=6, S=(7,), B=None, K=5),
    dict(N=2, C=6, S=(3, 5), B=1, K=5),
    dict(N=2, C=5, S=(2, 3, 4), B=6, K=4),
    dict(N=3, C=40, S=(7, 13), B=3, K=9),     # N*P = 273: a partial second block
    dict(N=2, C=1, S=(5,), B=2, K=4),
    dict(N=2, C=3, S=(5,), B=2, K=1),
    dict(N=1, C=3, S=(4, 4), B=2, K=130),     # K > 128, more rows than warps
    dict(N=2, C=8, S=(4, 40), B=2, K=6),      # P = 160: 5 tiles, the fused forward split 5 ways
    dict(N=0, C=4, S=(3,), B=2, K=3),
]
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# The CUDA op's two paths (PERSONVLAD_CUDA_FWD and _BWD together): the
# default GEMM path and the one-kernel passes (the forward takes every case
# here but K=130, the backward every case with K <= 64); "fused-whole": the
# one-kernel passes with the forward's samples never split (only where P > 32:
# elsewhere a sample is one tile, never split); "fused-tc": the one-kernel
# forward with its tensor-core products (bfloat16 features on sm_80+; other
# dtypes run the FMA kernel again).
CUDA_PATHS = ("gemm", "fused", "fused-whole", "fused-tc")
SWITCHES = {
    "gemm": {"PERSONVLAD_CUDA_FWD": "gemm", "PERSONVLAD_CUDA_BWD": "gemm"},
    "fused": {"PERSONVLAD_CUDA_FWD": "fused", "PERSONVLAD_CUDA_BWD": "fused"},
    "fused-whole": {"PERSONVLAD_CUDA_FWD": "fused", "PERSONVLAD_CUDA_BWD": "fused",
                    "PERSONVLAD_CUDA_FWD_SPLITS": "1"},
    "fused-tc": {"PERSONVLAD_CUDA_FWD": "fused-tc", "PERSONVLAD_CUDA_BWD": "fused"},
}


def run(device: str, fused_only: bool = False) -> int:
    """Forward + backward of every case (on CUDA through both paths);
    returns the number of configurations.  ``fused_only``: the one-kernel
    passes alone, float32 and bfloat16 (the racecheck workload: those
    kernels are the ones with shared-memory phases)."""
    FWD = torch.ops.personvlad.person_vlad.default
    BWD = torch.ops.personvlad.person_vlad_backward.default
    paths = ("fused", "fused-whole", "fused-tc") if fused_only else CUDA_PATHS if device == "cuda" else (None,)
    dtypes = (torch.float32, torch.bfloat16) if fused_only else DTYPES
    n = 0
    for dtype in dtypes:
        for case in CASES:
            for normalize in (True, False):
                args = make_inputs(**case, dtype=dtype, device=device, seed=n)
                nc = make_inputs(**case, dtype=dtype, device=device, seed=n, noncontig=True) if case["N"] else args
                for path in paths:
                    if path == "fused-whole" and math.prod(case["S"]) <= 32:
                        continue
                    if path == "fused-tc" and dtype != torch.bfloat16:
                        continue  # the tensor-core products are bfloat16's; others rerun the FMA kernel
                    with scoped_env({} if path is None else SWITCHES[path]):
                        for a in (args, nc):
                            out = FWD(*a, normalize)
                            grads = BWD(torch.ones_like(out), *a, normalize)
                            if device == "cuda":
                                torch.cuda.synchronize()
                            bad = [i for i, t in enumerate((out, *grads)) if not torch.isfinite(t.float()).all()]
                            if bad:
                                raise AssertionError(f"non-finite outputs {bad}: {case}, {dtype}, "
                                                     f"normalize={normalize}, path {path}")
                n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--fused", action="store_true",
                   help="only the one-kernel CUDA forward and backward, float32 and bfloat16 (for racecheck)")
    a = p.parse_args(argv)
    dev = a.device
    if a.fused and dev != "cuda":
        p.error("--fused: the one-kernel passes are CUDA kernels (use --device cuda)")
    if dev == "cuda":
        if not torch.cuda.is_available():
            sys.exit("gpu_cuda_memcheck: no CUDA device")
        if not ops._NATIVE_CUDA:
            sys.exit("gpu_cuda_memcheck: personvlad._C has no CUDA kernels (build with nvcc)")
    n = run(dev, a.fused)
    if a.fused:
        what = "the one-kernel forward and backward, float32 + bfloat16"
    else:
        what = "forward + backward" + (" (paths: " + ", ".join(CUDA_PATHS) + ")" if dev == "cuda" else "")
    print(f"memcheck driver ({dev}): {n} configurations, {what}, contiguous + non-contiguous")
    return 0


if __name__ == "__main__":
    sys.exit(main())
