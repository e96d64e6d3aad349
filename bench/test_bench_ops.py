"""Benchmarks of the fused op: every available backend vs the unfused PyTorch
forms (matmul reference eager, its torch.compile, and the naive per-part
broadcast), forward and forward+backward, with peak memory in extra_info.

CPU (``make bench``): the paper-like shape N=8, C=256, grid 2x11x5, B=6, K=64;
``fused-cpu`` runs the widest tile instance the CPU has, ``fused-cpu-avx2`` /
``fused-cpu-baseline`` the narrower ones (``PERSONVLAD_CPU_TILES``).
GPU (``bench/gpu_check.sh``): the paper shape N=64 and the large shape
N=32, C=512, grid 8x14x14 (P=1568), B=8, K=64, in bf16 and fp32.

``floor`` (no VLAD work: the inputs summed and broadcast to the output's
shape) times the harness itself in the same run: the speed-up no variant can
pass at that shape.

extra_info keys: op_backend, N, C, P, K, B, dtype, mode ("fwd"|"fwdbwd"),
peak_bytes (GPU: max_memory_allocated above the inputs; CPU: peak RSS growth),
output_bytes, baseline (the faster of "unfused-eager" and "unfused-compile":
the matmul form eager and compiled, same run and group); gemm_flops,
vector_flops, bytes (the op's algorithmic work, :func:`personvlad.roofline.op_cost`,
the same for every variant) and, on a GPU with known peaks, roofline_s /
bound_by / peak_* (:func:`personvlad.roofline.roofline` for the products'
precision: the variant's own for fused-triton, TF32 when PyTorch's matmuls
allow it, else IEEE fp32); target_speedup / target_peak_per_output for the
fused GPU rows (the issues' targets; the report says met or not).
`personvlad bench report` turns the JSON into ratios vs the baseline.
"""
import math
import os

import pytest
import torch

from personvlad import ops, reference, roofline
from personvlad._memory import peak_bytes

HAS_CUDA = torch.cuda.is_available()
# One compiled unfused function serves every shape, dtype and pass of a run
# (the GPU suite has 8, bench/profile_op.py as many): above Dynamo's default
# recompile limit of 8 it would silently run eager under the compile label.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

# CPU: the paper-like grid at a small batch; one clip (N=1 < threads: the
# kernels split each sample's positions over the threads instead of the
# batch); and a large grid (P=1568, B=8), where the soft-assignment work per
# channel is 10x the paper's.
CPU_SHAPES = {
    "paper-cpu": dict(N=8, C=256, S=(2, 11, 5), B=6, K=64),
    "single-cpu": dict(N=1, C=256, S=(2, 11, 5), B=6, K=64),
    "large-cpu": dict(N=2, C=256, S=(8, 14, 14), B=8, K=64),
}
GPU_SHAPES = {
    "paper": dict(N=64, C=256, S=(2, 11, 5), B=6, K=64),
    "large": dict(N=32, C=512, S=(8, 14, 14), B=8, K=64),
}


def _inputs(shape, dtype, device, requires_grad):
    g = torch.Generator().manual_seed(0)
    N, C, S, B, K = shape["N"], shape["C"], shape["S"], shape["B"], shape["K"]
    F = torch.relu(torch.randn(N, C, *S, generator=g)).to(device, dtype)
    M = torch.rand(N, B, *S, generator=g).to(device, dtype)
    c = (torch.randn(K, C, generator=g) / math.sqrt(C)).to(device)
    alpha = 10.0
    W = (2 * alpha * c).contiguous()
    z = (-alpha * (c * c).sum(1)).contiguous()
    ts = [F, M, W, z, c]
    if requires_grad:
        ts = [t.detach().requires_grad_(True) for t in ts]
    return ts


def _floor(F, M, W, z, c, normalize=True):
    """No VLAD at all: the five inputs summed to one number, broadcast to the
    output's shape (same dtype promotion as the op's parameters).  The same
    timed step around it measures the harness's floor: Python, the launches
    of a few tiny kernels, autograd with five leaf gradients, the sync.  No
    variant's time can go below it, so it bounds the speed-up any op could
    show at this shape."""
    N, C = F.shape[0], F.shape[1]
    t = F.sum() + W.sum() + z.sum() + c.sum()
    if M is not None:
        t = t + M.sum()
    return t.to(F.dtype).expand(N, W.shape[0] * C)


def _variants(device):
    """name -> callable(F, M, W, z, c) for this device."""
    out = {
        "unfused-eager": reference.person_vlad_ref,
        "unfused-naive": reference.person_vlad_naive,
        "floor": _floor,
    }
    if device == "cuda" or os.environ.get("PERSONVLAD_BENCH_COMPILE_CPU") == "1":
        out["unfused-compile"] = torch.compile(reference.person_vlad_ref, dynamic=False)
    for b in ops.available_backends(device):
        if b == "reference":
            continue
        if b == "triton" and device == "cpu":
            continue  # the interpreter is not a benchmark
        out[f"fused-{b}"] = (lambda b: lambda *a: ops.person_vlad(*a, backend=b))(b)
    if device == "cpu" and "fused-cpu" in out:
        for name in _CPU_ABLATION_ENV:  # same call; the test sets the environment
            out[name] = out["fused-cpu"]
    if device == "cuda":
        for name in _ABLATION_ENV:  # same call; the test sets the environment for the whole case
            base = "fused-cuda" if name.startswith("fused-cuda") else "fused-triton"
            if base in out:
                out[name] = out[base]
    return out


# Ablations, each the same op under one switch, set for the whole benchmark
# case (not per call, so the timed call is unchanged).  Triton: every dot in
# plain fp32 (what sm_7x gets), to measure what the tf32x3 tensor-core
# products buy; and the three-kernel tiled forward where the one-program
# forward would run (P <= 128).  CUDA: the GEMMs with the bf16 features on
# bf16 tensor cores, the float32 operand split in three bf16 pieces, instead
# of IEEE fp32 GEMMs over a float32 copy of F; and the one-kernel forward
# (fused_forward_kernel: one launch, no intermediate in memory; samples split
# over several blocks sum their V in the output's memory, plus the low
# halves of those sums for a 16-bit output; a candidate default, so it
# runs in every dtype), with the one-kernel backward (K <= 64, C <= 256; ~140
# KB of shared memory at the paper shape, so sm_80+; at the large shape, C =
# 512, the backward falls back to the gemm path).  The forward splits each
# sample over blocks to fill one wave of SMs (at the paper shape on an H200:
# 2 blocks per sample; at the large shape, where all of A' would not fit a
# block: 4); fused-cuda-1k-whole keeps one block per sample where A' fits,
# to measure what the split buys at the paper shape; fused-cuda-1k-tc runs the
# one-kernel forward with both products on bf16 tensor cores (W as three bf16
# pieces, A' as two; bf16 only, sm_80+), against fused-cuda-1k's FMA products.
# fused-triton-viaop: every eager call through the registered op (triton_op,
# custom_op, its autograd wrapper), as before the direct eager path: what
# that machinery costs a call on the GPU machine's host.
# fused-triton-split: the one-program forward spread over C slices (one
# launch, 2x the programs at the paper shape on an H100/H200; the sample's
# last program normalises): a candidate default where the one-program
# forward applies.
# fused-triton-stream: the whole forward in one launch at any P, each C
# slice's program streaming the grid through in tiles (no (N, K, P) A' in
# memory, G computed once per slice): a candidate default where the tiled
# forward runs, measured at the large shape, forward only (its backward is
# the tiled forward's).
_ABLATION_ENV = {
    "fused-triton-ieee": {"PERSONVLAD_TRITON_DOT": "ieee"},
    "fused-triton-viaop": {"PERSONVLAD_TRITON_DIRECT": "0"},
    "fused-triton-tiled": {"PERSONVLAD_TRITON_FWD": "tiled"},
    "fused-triton-split": {"PERSONVLAD_TRITON_FWD": "split"},
    "fused-triton-stream": {"PERSONVLAD_TRITON_FWD": "stream"},
    "fused-cuda-split3": {"PERSONVLAD_CUDA_BF16_GEMM": "split3"},
    "fused-cuda-1k": {"PERSONVLAD_CUDA_FWD": "fused", "PERSONVLAD_CUDA_BWD": "fused"},
    "fused-cuda-1k-whole": {"PERSONVLAD_CUDA_FWD": "fused", "PERSONVLAD_CUDA_BWD": "fused",
                            "PERSONVLAD_CUDA_FWD_SPLITS": "1"},
    "fused-cuda-1k-tc": {"PERSONVLAD_CUDA_FWD": "fused-tc", "PERSONVLAD_CUDA_BWD": "fused"},
}
# CPU: the C++ backend's tile loops (softmax, A', s and their backward) with
# a narrower instance than the widest this CPU runs (fused-cpu): what a
# machine with only AVX2, or only the x86-64 baseline, gets.
_CPU_ABLATION_ENV = {
    "fused-cpu-avx2": {"PERSONVLAD_CPU_TILES": "avx2"},
    "fused-cpu-baseline": {"PERSONVLAD_CPU_TILES": "baseline"},
}
# Candidate defaults, measured in every dtype with the main op step.
_CANDIDATES = ("fused-cuda-1k", "fused-triton-split", "fused-triton-stream")


def _op_step(fn, args, mode, sync=None):
    """One timed call of an op variant (also bench/profile_op.py's): the forward
    under no_grad, or the forward and the backward of sum(out) with the
    inputs' gradients reset first; then ``sync()`` when given."""
    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(*args)
        else:
            for t in args:
                t.grad = None
            fn(*args).float().sum().backward()
        if sync is not None:
            sync()

    return step


def _accuracy(fn, args, dtype):
    """Max abs error of ``fn`` vs the float64 reference, and the same for the
    eager reference in ``dtype`` (the budget the tests allow 2x of)."""
    ins = [a.detach() for a in args]
    with torch.no_grad():
        o64 = reference.person_vlad_ref(*[a.double() for a in ins])
        err = (fn(*ins).double() - o64).abs().max().item()
        ref_err = (reference.person_vlad_ref(*ins).double() - o64).abs().max().item()
    return err, ref_err


def _skip_reason(variant, shape_name, shape, dtype, mode=None):
    """Why a variant is not measured at this shape, dtype and mode (None: it
    is); bench/profile_op.py follows the same rules."""
    if variant == "unfused-naive" and shape_name == "large":
        return "naive broadcast at the large shape needs > 10 GiB"
    if variant == "unfused-naive" and shape_name == "large-cpu":
        return "naive broadcast at the large CPU shape needs > 3 GiB and seconds a call"
    # the ablations in bf16 only (each costs a round of kernel compilation and
    # autotuning); the tiled forward only where the one-program one applies
    if variant in _ABLATION_ENV and variant not in _CANDIDATES and dtype != torch.bfloat16:
        return f"{variant}: an ablation, measured in bf16 only"
    if variant == "fused-triton-tiled" and math.prod(shape["S"]) > 128:
        return "the tiled forward is already the default at this P"
    if variant == "fused-triton-split" and math.prod(shape["S"]) > 128:
        return "the split forward applies where the one-program one does (P <= 128)"
    if variant == "fused-triton-stream" and math.prod(shape["S"]) <= 128:
        return "the streamed forward is measured where the tiled one is the default (P > 128)"
    if variant == "fused-triton-stream" and mode == "fwdbwd":
        return "the streamed forward's backward is the tiled forward's: measured forward only"
    if variant == "fused-cuda-1k-whole" and math.prod(shape["S"]) > 128:
        return "a block per sample: all of A' is over a block's shared memory at this P"
    return None


def _run_case(benchmark, device, shape_name, shape, dtype, variant, mode):
    variants = _variants(device)
    if variant not in variants:
        pytest.skip(f"{variant} not available on {device}")
    fn = variants[variant]
    why = _skip_reason(variant, shape_name, shape, dtype, mode)
    if why:
        pytest.skip(why)
    args = _inputs(shape, dtype, device, requires_grad=(mode == "fwdbwd"))
    step = _op_step(fn, args, mode, torch.cuda.synchronize if device == "cuda" else None)
    step()  # warm-up (compilation, autotuning)
    peak = peak_bytes(step, device)
    P = math.prod(shape["S"])
    if variant.startswith("fused-"):
        # the timed configuration must also be right: the autotuned kernels at
        # this shape against float64, within 2x the eager reference's own error
        err, ref_err = _accuracy(fn, args, dtype)
        benchmark.extra_info.update(max_abs_err=err, ref_max_abs_err=ref_err)
        assert math.isfinite(err) and err <= 2 * ref_err + 1e-6, (
            f"{variant}: max error {err:.3e} vs float64, reference's own {ref_err:.3e}")
    # fp32 products: what this variant computes them with (half dtypes: tensor cores)
    precision = "tf32" if (device == "cuda" and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    if variant.startswith("fused-triton"):
        from personvlad.kernels import person_vlad as tk
        precs = list(tk.dot_precisions(args[0].device, dtype))  # the ablation's switches are set
        benchmark.extra_info.update(dot_precisions=precs, forward_path=tk.forward_path(P, shape["K"], precs[1]))
        # the logit GEMM W F is 1 of the forward's 2 products, 1 of fwd+bwd's 6
        logit_share = 0.5 if mode == "fwd" else 1 / 6
        precision = precs[0] if precs[0] == precs[1] else {precs[0]: logit_share, precs[1]: 1 - logit_share}
    cost = roofline.op_cost(shape["N"], shape["C"], P, shape["K"], shape["B"], dtype=dtype,
                            param_dtype=args[2].dtype, mode=mode)
    benchmark.extra_info.update(cost)
    peaks = roofline.device_peaks(args[0].device) if device == "cuda" else None
    if peaks is not None:
        rl = roofline.roofline(cost["gemm_flops"], cost["bytes"], peaks, dtype, precision, cost["vector_flops"])
        benchmark.extra_info.update(roofline_s=rl["bound_s"], bound_by=rl["bound_by"],
                                    peak_matmul_tflops=rl["peak_matmul_tflops"], peak_gbps=rl["peak_gbps"],
                                    peaks_name=rl["peaks_name"], peaks_source=rl["peaks_source"])
    benchmark.extra_info.update(
        op_backend=variant, N=shape["N"], C=shape["C"], P=P, K=shape["K"], B=shape["B"],
        dtype=str(dtype).replace("torch.", ""), mode=mode, shape=shape_name,
        peak_bytes=int(peak), output_bytes=shape["N"] * shape["K"] * shape["C"] * torch.tensor([], dtype=dtype).element_size(),
        baseline=["unfused-eager", "unfused-compile"], device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
    )
    if device == "cuda" and (variant in ("fused-cuda", "fused-triton") or variant in _CANDIDATES):
        # issues 4/5: fwd >= 10x, fwd+bwd >= 4x the best unfused PyTorch; at the
        # large shape the forward's extra memory <= 2x the output (peak <= 3x);
        # the candidate defaults are held to the same targets
        benchmark.extra_info["target_speedup"] = 10.0 if mode == "fwd" else 4.0
        if shape_name == "large" and mode == "fwd":
            benchmark.extra_info["target_peak_per_output"] = 3.0
    # CPU: 5 rounds were too few: the eager baseline's median swung by +-25%
    # from run to run (allocator and MKL state); 50 rounds of the ~1-4 ms
    # variants cost a second.  The naive broadcast (~0.2-0.7 s a call) keeps 5.
    rounds = 5 if variant == "unfused-naive" else 50
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)


CPU_VARIANTS = ["unfused-eager", "unfused-naive", "unfused-compile", "fused-cpu", "fused-cpu-avx2",
                "fused-cpu-baseline", "floor"]
GPU_VARIANTS = ["unfused-eager", "unfused-naive", "unfused-compile", "fused-cuda", "fused-triton",
                "fused-cuda-split3", "fused-cuda-1k", "fused-cuda-1k-whole", "fused-cuda-1k-tc", "fused-triton-ieee",
                "fused-triton-tiled", "fused-triton-split", "fused-triton-stream", "fused-triton-viaop", "floor"]


@pytest.mark.parametrize("shape_name", list(CPU_SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_op_cpu(benchmark, monkeypatch, variant, mode, shape_name):
    for name, value in _CPU_ABLATION_ENV.get(variant, {}).items():
        monkeypatch.setenv(name, value)
    if variant in _CPU_ABLATION_ENV:
        try:  # the extension says whether this CPU (and build) has the instance
            ops.person_vlad(*_inputs(DISPATCH_SHAPE, torch.float32, "cpu", False), backend="cpu")
        except ValueError as e:
            pytest.skip(str(e))
    benchmark.group = f"op-cpu-{shape_name.removesuffix('-cpu')}-{mode}"
    _run_case(benchmark, "cpu", shape_name, CPU_SHAPES[shape_name], torch.float32, variant, mode)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape_name", list(GPU_SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("variant", GPU_VARIANTS)
def test_op_gpu(benchmark, monkeypatch, variant, mode, shape_name, dtype):
    for name, value in _ABLATION_ENV.get(variant, {}).items():
        monkeypatch.setenv(name, value)
    benchmark.group = f"op-gpu-{shape_name}-{str(dtype).replace('torch.', '')}-{mode}"
    _run_case(benchmark, "cuda", shape_name, GPU_SHAPES[shape_name], dtype, variant, mode)


# The public door's host cost: ops.person_vlad (validation, backend choice)
# against the registered op called directly, at a shape so small that the
# kernel is next to nothing.  On a GPU the calls are timed without a sync
# (the host side only; the device keeps up with kernels this small).
DISPATCH_SHAPE = dict(N=1, C=4, S=(2, 2), B=2, K=3)
DISPATCH_VARIANTS = {
    "raw-op": lambda F, M, W, z, c: torch.ops.personvlad.person_vlad(F, M, W, z, c, True),
    "door": lambda F, M, W, z, c: ops.person_vlad(F, M, W, z, c),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device"))])
@pytest.mark.parametrize("variant", list(DISPATCH_VARIANTS))
def test_op_dispatch(benchmark, variant, device):
    benchmark.group = f"op-dispatch-{device}"
    fn = DISPATCH_VARIANTS[variant]
    args = _inputs(DISPATCH_SHAPE, torch.float32, device, requires_grad=False)

    def step():
        with torch.no_grad():
            for _ in range(20):
                fn(*args)

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    benchmark.extra_info.update(op_backend=variant, baseline="raw-op", calls_per_round=20,
                                backend=ops.resolve_backend(args[0], args[1], args[2]),
                                device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    benchmark.pedantic(step, rounds=100, iterations=1, warmup_rounds=2)
    if device == "cuda":
        torch.cuda.synchronize()
