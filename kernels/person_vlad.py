"""Triton forward and backward kernels of the fused PersonVLAD op (SPEC §1).

Public entry points
-------------------
``person_vlad_triton(features, parts, assign_weight, assign_bias, centers, normalize=True)``
    Calls ``torch.ops.personvlad.person_vlad_triton`` and returns the
    descriptor: ``(N, K*C)`` normalised or ``(N, K, C)`` raw, in
    ``features.dtype``; differentiable in all five inputs.
``supports(features, parts, assign_weight, assign_bias=None, centers=None) -> (bool, reason)``
    Whether these kernels accept the tensors; ``reason`` is a one-line
    explanation when they do not (``""`` when they do).
``check_supported(...)``
    Raises :class:`UnsupportedInput` (a ``ValueError``) with that reason.
``dot_precision(device)`` / ``dot_precisions(device, dtype)``
    The ``tl.dot`` input precision(s) the kernels use there (see below).
``forward_path(P, K, dot_prec)``
    ``"single"`` (one program per sample) or ``"tiled"`` (three kernels) by
    default; ``"split"`` or ``"stream"`` when asked for.

Environment: ``PERSONVLAD_TRITON_DOT=ieee|tf32x3`` forces one dot precision;
``PERSONVLAD_TRITON_FWD=tiled`` forces the tiled forward, ``split`` and
``stream`` the two candidate one-launch forwards (below);
``PERSONVLAD_TRITON_AUTOTUNE=0`` (read at import) runs each kernel's first
config without autotuning.

Registered ops
--------------
``personvlad::person_vlad_triton(Tensor features, Tensor? parts, Tensor assign_weight,
Tensor assign_bias, Tensor centers, bool normalize, bool keep_f32=False) -> (Tensor, Tensor, Tensor)``
    returns ``(out, norms, out_f32)``; ``norms`` is float32 ``(N, K+1)`` (the
    K row norms of the raw ``V`` then the norm of the intra-normalised vector)
    when ``normalize`` and ``(N, 0)`` otherwise.  ``out_f32`` is the
    normalised output before its rounding to ``features.dtype``, float32
    ``(N, K*C)``, when ``keep_f32`` and ``normalize`` and the features are
    half precision, and float32 ``(N, 0)`` otherwise; :func:`person_vlad_triton`
    asks for it only when a backward can follow (grad mode on and an input
    that requires grad), so inference keeps one launch and no float32 copy.
    Both exist so autograd can save them (they
    are marked non-differentiable): the backward's ``t = y . dy`` and
    ``q_k = y_k . (dy_k - y_k t)`` from a half-rounded ``y`` put errors of
    ~1e-2 (relative) into ``assign_bias``'s gradient, a sum over positions
    that cancels (seen on an H200; ``test_gradients_half_match_float32_reference``).
``personvlad::person_vlad_triton_backward(Tensor grad_out, Tensor features, Tensor? parts,
Tensor assign_weight, Tensor assign_bias, Tensor centers, Tensor out, Tensor norms,
bool normalize) -> (Tensor, Tensor, Tensor, Tensor, Tensor)``
    ``(dF, dM or empty(0), dW, dz, dc)``, each in its input's dtype and shape.
    ``out`` is the forward's ``out_f32`` where that is not empty, else its
    ``out`` (the raw op called with ``keep_f32=False`` and then differentiated
    falls back to the rounded output).

Both are ``torch.library.triton_op`` s (so ``torch.compile`` sees the Triton
kernels).  Under ``TRITON_INTERPRET=1`` (CPU testing) ``wrap_triton`` cannot
make interpreted kernels traceable (they are plain Python and cannot run on
FakeTensors), so there the same schemas are registered with
``torch.library.custom_op`` plus an explicit fake kernel: the op is then opaque
to ``torch.compile`` but behaves identically otherwise.

Kernel design (per sample n; F is (C, P), M is (B, P), all accumulation fp32)
-------------------------------------------------------------------------
forward, P <= SINGLE_MAX_P (the paper's 2x11x5 grid): one launch
  ``_fwd_single``  grid (N,): one program per sample does all of the below
     on chip (G, soft-assignments, A', s), then V in C chunks twice -- row
     norms first, then the scaled output -- rather than writing V to memory.
  (``PERSONVLAD_TRITON_FWD=split``: ``_fwd_split`` grid (N, C slices), one
     launch: each program recomputes G and A' and computes V once for its
     C slice; normalised, the sample's last program (a ticket counter) sums
     the chunks' row sums of squares in chunk order and writes the scaled
     output from an fp32 V: the same bits as ``_fwd_single`` at the same
     BLOCK_C, whatever the batch.  An
     ablation: at the paper shape on a 132-SM GPU, 2x the programs (one
     wave) and half the dependent steps, for the price of G computed once
     per slice.)
forward, any P, ``PERSONVLAD_TRITON_FWD=stream``: one launch
  ``_fwd_stream``  grid (N x C slices of STREAM_C = min(8192 / BLOCK_K, 256)
     channels, a sample's slices side by side):
     each program streams the sample's grid through in BLOCK_P tiles -- G
     over all C, the soft-assignments, A' and s on chip -- and accumulates
     its slice ``V_j += A' F_j^T`` in registers.  Nothing of size K x P is
     written (the tiled forward's A' workspace); G is computed once per
     slice.  Normalised, V goes to float32 in the output itself (a float32
     output) or, beside a 16-bit output, as 16-bit halves (the high ones in
     the output, the low ones in an int16 buffer), and the sample's last
     program normalises, as in the split forward.  An ablation until GPU
     benchmarks decide; its extra memory is at most 1x the output (issue
     4's bound: 2x).
forward, larger P (tiled; ``PERSONVLAD_TRITON_FWD=tiled`` forces it)
  1. ``_fwd_assign``  grid (N, cdiv(P, BLOCK_P)).  G = W F for a P tile
     (tl.dot over C chunks), then for each part b the max-subtracted softmax
     over k of ``M[b,p] G[k,p] + z[k]``; accumulates ``A'[k,p] = sum_b a M``
     (written to an fp32 (N, K, P) workspace) and per-tile partial
     ``s[k] = sum_{b,p} a`` (written to fixed 16-column slots, so the
     partial buffer does not depend on the autotuned BLOCK_P).  Nothing of
     size N*B*K*P is ever written.
  2. ``_gemm_kc``  grid (N, K tiles, C tiles): ``V = A' F^T - s c`` looping
     over P (deterministic, no atomics), ``s`` summed from the slots in a
     fixed order; writes fp32 V (or the raw output).
  3. ``_fwd_normalize``  grid (N,): intra-normalise rows, L2-normalise, write
     output and the norms.
backward
  4. ``_bwd_normalize``  grid (N,): dV from the saved output and norms (exact
     backward of ``x / max(||x||, eps)`` twice), and ``ds[k] = -dV[k]·c[k]``.
  5. ``_bwd_main``  grid (N, cdiv(P, BLOCK_P)): recompute G and a; with
     ``dA' = dV F`` (same C loop as G) get dM, dlogit, dG, partial dz and s;
     write dM, dG (fp32 (N, K, P) workspace) and
     ``dF = dV^T A' + W^T dG``.
  6. ``_gemm_kc`` again: dW partials ``sum_{n in group} dG F^T`` over a
     fixed number of sample groups, summed by torch (deterministic).
  dz, dc = ``-sum_n s dV`` are small torch reductions.

Everything is deterministic for a given autotuned configuration: no
atomic accumulation (the split and streamed forwards' only atomic is a
per-sample ticket counter; their norms are summed in a fixed order).  Tiles are loaded as fp32 and every ``tl.dot`` takes a constexpr
input precision (see :func:`dot_precisions`): ``"tf32x3"`` on sm_80+ (three
TF32 tensor-core products, a ~fp32-accurate split) and ``"ieee"`` (fp32 FMA)
on sm_7x and under the interpreter; the logit GEMM ``G = W F``
(``LOGIT_PREC``) stays ``"ieee"`` for float32 features.  Plain TF32 is never
used: its 10-bit mantissa perturbs the soft-assignment visibly when logits are
~1e3 (alpha=1000).  A CPU emulation of these roundings stays within the CUDA
tests' bounds (tests/test_triton.py::test_tf32x3_dot_precision_is_accurate_enough).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..ops import _capability, _device_props  # looked up once per device
from ..ops import functorch_active
from ._device import on_tensor_device
from ._launch import tuned

__all__ = [
    "person_vlad_triton",
    "supports",
    "check_supported",
    "UnsupportedInput",
    "MAX_PARTS",
    "MAX_CLUSTERS",
    "MAX_CHANNELS",
    "INTERPRET",
    "DOT_PRECISIONS",
    "dot_precision",
    "dot_precisions",
    "forward_path",
    "SINGLE_MAX_P",
    "SINGLE_MAX_TILE",
]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MAX_PARTS = 16
MAX_CLUSTERS = 128
MAX_CHANNELS = 1024
EPS = 1e-12
_SLOT = 16  # column granularity of the partial-sum buffers (== smallest BLOCK_P)

if INTERPRET:

    def wrap_triton(kernel):  # interpreted kernels are plain Python callables
        return kernel

    def _wrapping() -> bool:
        return False

else:
    from torch.library import wrap_triton

    # Launch through wrap_triton only where it is on: while torch.compile /
    # make_fx trace the op (launches become graph nodes).  In an eager call of
    # a triton_op torch turns it off and wrap_triton hands back the kernel
    # itself, but only after checks that cost ~8 us per autotuned kernel on a
    # 2-core Xeon (it looks for an interpreted function under the autotuner);
    # the call sites skip it then.  Each call site still spells
    # ``wrap_triton(<kernel>)``: triton_op finds the op's kernels by scanning
    # its source for that.
    try:
        from torch._library.triton import is_wrap_triton_enabled as _wrapping
    except ImportError:  # pragma: no cover - torch without the switch: always wrap

        def _wrapping() -> bool:
            return True


class UnsupportedInput(ValueError):
    """The Triton kernels do not handle these inputs (see :func:`supports`)."""


# --------------------------------------------------------------------------
# Support contract
# --------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(features, parts, assign_weight, assign_bias=None, centers=None) -> Tuple[bool, str]:
    """``(True, "")`` if the Triton kernels accept these (already validated)
    tensors, else ``(False, one-line reason)``."""
    dev = features.device
    if dev.type == "cpu":
        if not INTERPRET:
            return False, "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU)"
    elif dev.type != "cuda":
        return False, f"Triton kernels need CUDA tensors, got device {dev}"
    allowed = _FLOAT_DTYPES if dev.type == "cuda" else (torch.float32, torch.float16)
    where = "on CUDA" if dev.type == "cuda" else "under the Triton interpreter"
    for name, t in (("features", features), ("parts", parts), ("assign_weight", assign_weight),
                    ("assign_bias", assign_bias), ("centers", centers)):
        if t is not None and t.dtype not in allowed:
            names = "/".join(str(d).replace("torch.", "") for d in allowed)
            return False, f"Triton kernels take {names} {where}; {name} is {str(t.dtype).replace('torch.', '')}"
    C = features.shape[1]
    K = assign_weight.shape[0]
    B = 1 if parts is None else parts.shape[1]
    if B > MAX_PARTS:
        return False, f"Triton kernels support at most {MAX_PARTS} parts, got B={B}"
    if K > MAX_CLUSTERS:
        return False, f"Triton kernels support at most {MAX_CLUSTERS} clusters, got K={K}"
    if C > MAX_CHANNELS:
        return False, f"Triton kernels support at most {MAX_CHANNELS} channels, got C={C}"
    return True, ""


def check_supported(features, parts, assign_weight, assign_bias=None, centers=None) -> None:
    """Raise :class:`UnsupportedInput` when :func:`supports` says no."""
    ok, why = supports(features, parts, assign_weight, assign_bias, centers)
    if not ok:
        raise UnsupportedInput(why)


# --------------------------------------------------------------------------
# Autotune configurations
# --------------------------------------------------------------------------
# PERSONVLAD_TRITON_AUTOTUNE=0 (read at import) runs the first config of each
# list without benchmarking the others: for test runs on a fresh GPU machine,
# where autotuning every test shape would mean compiling hundreds of kernels.
AUTOTUNE = os.environ.get("PERSONVLAD_TRITON_AUTOTUNE", "1") != "0"


def _cfgs(entries, names):
    if INTERPRET or not AUTOTUNE:  # the interpreter is slow: one small config
        entries = entries[:1]
    return [
        triton.Config(dict(zip(names, e[:-2])), num_warps=e[-2], num_stages=e[-1]) for e in entries
    ]


if INTERPRET:
    _SMALL = [(16, 1, 1)]
    _SPLIT_SM90 = _SMALL
    _ASSIGN = [(16, 16, 1, 1)]
    _BWD = [(16, 16, 1, 1)]
    _GEMM = [(16, 16, 16, 1, 1)]
    _STREAM = [(16, 16, 1, 1)]
else:
    #           BLOCK_C, warps, stages
    # Chosen so that no config spills registers at BLOCK_K=64 on sm_90 or
    # sm_75 in bf16 or fp32 (bench/kernel_resources.py compiles them all and
    # reads the cubins; tests/test_triton.py checks it).  The first entry of
    # each list is the one PERSONVLAD_TRITON_AUTOTUNE=0 runs.
    _SMALL = [(16, 8, 1), (16, 8, 2)]
    _SPLIT_SM90 = [(16, 8, 1), (32, 8, 1), (16, 8, 2)]  # the split forward on sm_90 (see below)
    #            BLOCK_P, BLOCK_C, warps, stages
    _ASSIGN = [(64, 32, 4, 3), (32, 32, 4, 3), (128, 16, 8, 2), (64, 16, 4, 2), (32, 16, 4, 2)]
    _BWD = [(32, 16, 8, 2), (64, 16, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2)]
    #          BLOCK_K, BLOCK_C, BLOCK_P, warps, stages
    _GEMM = [(64, 64, 32, 4, 3), (64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 8, 3),
             (64, 32, 32, 4, 3)]
    #            BLOCK_P, BLOCK_C, warps, stages: the streamed forward.  Its V
    # tile (BLOCK_K x STREAM_C = 8192 fp32) is a register accumulator of its
    # own, so it takes 8 warps and P tiles of 16-32: every 4-warp config and
    # every BLOCK_P = 64 one spilled at sm_90 in bf16 (`kernel_resources.py
    # --scan`, 24-1056 bytes).  These spill nothing at sm_90 or sm_75 in bf16
    # or fp32 at BLOCK_K = 16, 64 or 128 (at 32, with 256-channel slices, 16
    # bytes in one sm_90 config); at sm_80, up to 200 bytes.
    _STREAM = [(32, 32, 8, 1), (32, 16, 8, 2), (16, 32, 8, 1)]

# K > 64 (BLOCK_K = 128) holds twice the (BLOCK_K, BLOCK_P) fp32 tiles: the
# assignment and backward kernels get their own lists, scanned the same way.
# Every fwd_assign config here spills nothing on sm_90 or sm_75.  No bwd_main
# config spills nothing on sm_90 at BLOCK_K=128: in the 24-config scan of
# `bench/kernel_resources.py --scan --block-k 128` the least is 64 bytes (bf16)
# and 72 (fp32); these spill 64-112 (the K <= 64 list's worst spilled 640).
if INTERPRET:
    _ASSIGN_K128, _BWD_K128 = _ASSIGN, _BWD
else:
    _ASSIGN_K128 = [(64, 32, 8, 2), (32, 32, 8, 2), (64, 16, 8, 2), (32, 16, 4, 2)]
    _BWD_K128 = [(32, 16, 8, 2), (32, 16, 8, 1), (16, 16, 8, 2)]


def _p_bucket(P):
    """Autotune bucket of the spatial size (powers of two, 16..4096)."""
    return _pow2_at_least(P, 16, 4096)


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------
@triton.jit
def _part_assign(G, z, M_ptr, n, b, B, P, offs_p, mk, mp, HAS_PARTS: tl.constexpr, BLOCK_P: tl.constexpr):
    """Part ``b``'s map m (BLOCK_P,) and soft-assignment a = softmax_k(m G + z)
    (BLOCK_K, BLOCK_P), max-subtracted in fp32; masked rows/columns give 0."""
    if HAS_PARTS:
        m = tl.load(M_ptr + (n * B + b) * P + offs_p, mask=mp, other=0.0).to(tl.float32)
    else:
        m = tl.full((BLOCK_P,), 1.0, tl.float32)
    logit = m[None, :] * G + z[:, None]
    logit = tl.where(mk[:, None], logit, float("-inf"))
    mx = tl.max(logit, axis=0)
    e = tl.exp(logit - mx[None, :])
    a = e / tl.sum(e, axis=0)[None, :]
    return m, tl.where(mp[None, :], a, 0.0)


@triton.jit
def _load_tile(ptr, rows, cols, ld, rmask, cmask):
    """fp32 tile ptr[rows, cols] of a row-major matrix with leading dim ld."""
    return tl.load(
        ptr + rows[:, None] * ld + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
    ).to(tl.float32)


@triton.jit
def _assign_tile(Fn, M_ptr, W_ptr, Z_ptr, n, C, P, B, offs_k, offs_p, mk, mp,
                 HAS_PARTS: tl.constexpr, LOGIT_PREC: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """For one sample's P tile: G = W F (tl.dot over C chunks), then
    ``A'[k,p] = sum_b a M`` and the tile's ``s[k] = sum_{b,p} a``."""
    G = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        w = _load_tile(W_ptr, offs_k, offs_c, C, mk, mc)
        f = _load_tile(Fn, offs_c, offs_p, P, mc, mp)
        G += tl.dot(w, f, input_precision=LOGIT_PREC)
    z = tl.load(Z_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
    Ap = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    s = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for b in range(B):
        m, a = _part_assign(G, z, M_ptr, n, b, B, P, offs_p, mk, mp, HAS_PARTS, BLOCK_P)
        Ap += a * m[None, :]
        s += tl.sum(a, axis=1)
    return Ap, s


@triton.jit
def _row_sq_sums(v):
    """Per row of the fp32 tile ``v``: the sums of squares of ``v`` and of
    ``v / eps`` (``ss``, ``sst``: :func:`_norms_and_scale` takes their totals)."""
    vt = v * 1e12
    return tl.sum(v * v, axis=1), tl.sum(vt * vt, axis=1)


@triton.jit
def _norms_and_scale(ss, sst, NORM_ptr, n, K, offs_k, mk):
    """From the row sums of squares of V, ``ss`` (of V) and ``sst`` (of
    V * 1e12): store the K row norms and the norm of the intra-normalised
    vector into NORM[n], and return the per-row factor that applies both
    normalisations.

    A clamped row (norm < eps) contributes ``|V_k / eps|^2 = sst`` to the
    second norm: taken from ``ss / eps^2`` it was lost where V_k^2 underflows
    float32 (|V| ~ 1e-22), and the output was no longer a unit vector.  The
    clamps are ``x < eps``-tests, so a NaN norm stays NaN (``tl.maximum``
    drops NaN by default and gave finite garbage)."""
    r = tl.sqrt(ss)
    clamped = r < 1e-12
    inv_r = 1.0 / tl.where(clamped, 1e-12, r)
    gg = tl.sqrt(tl.sum(tl.where(clamped, sst, ss * inv_r * inv_r), axis=0))
    tl.store(NORM_ptr + n * (K + 1) + offs_k, r, mask=mk)
    tl.store(NORM_ptr + n * (K + 1) + K, gg)
    return inv_r * (1.0 / tl.where(gg < 1e-12, 1e-12, gg))


_ASSIGN_KEY = ["C", "K", "B", "P_BUCKET", "HAS_PARTS", "LOGIT_PREC"]


@triton.autotune(configs=_cfgs(_ASSIGN, ("BLOCK_P", "BLOCK_C")), key=_ASSIGN_KEY)
@triton.jit
def _fwd_assign_kernel(
    F_ptr, M_ptr, W_ptr, Z_ptr, AP_ptr, SPART_ptr,
    C, P, K, B, NSLOT, P_BUCKET,
    HAS_PARTS: tl.constexpr, LOGIT_PREC: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mk = offs_k < K
    mp = offs_p < P
    Ap, s_acc = _assign_tile(F_ptr + n * C * P, M_ptr, W_ptr, Z_ptr, n, C, P, B, offs_k, offs_p, mk, mp,
                             HAS_PARTS, LOGIT_PREC, BLOCK_K, BLOCK_P, BLOCK_C)
    tl.store(AP_ptr + n * K * P + offs_k[:, None] * P + offs_p[None, :], Ap,
             mask=mk[:, None] & mp[None, :])
    # partial s into 16-column slots: this tile's sum in its first slot, zeros in the rest
    R: tl.constexpr = BLOCK_P // 16
    slots = pid_p * R + tl.arange(0, R)
    vals = tl.where(tl.arange(0, R)[:, None] == 0, s_acc[None, :], 0.0)
    tl.store(SPART_ptr + n * NSLOT * K + slots[:, None] * K + offs_k[None, :], vals,
             mask=(slots[:, None] < NSLOT) & mk[None, :])


@triton.autotune(configs=_cfgs(_GEMM, ("BLOCK_K", "BLOCK_C", "BLOCK_P")), key=["C", "K", "P_BUCKET", "NPG", "SUB_SC", "DOT_PREC"])
@triton.jit
def _gemm_kc_kernel(
    X_ptr, F_ptr, S_ptr, CEN_ptr, OUT_ptr,
    N, C, P, K, NPG, NSLOT, P_BUCKET,
    SUB_SC: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """OUT[g, k, c] = sum_{n in group g} sum_p X[n, k, p] F[n, c, p]  (- s[g,k] cen[k,c]),
    with s[g, k] = sum_j S[g, j, k] over the NSLOT partial slots (SUB_SC)."""
    g = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mk = offs_k < K
    mc = offs_c < C
    acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
    for i in range(NPG):
        n = g * NPG + i
        nv = n < N
        n64 = n.to(tl.int64)
        Xn = X_ptr + n64 * K * P
        Fn = F_ptr + n64 * C * P
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mp = (offs_p < P) & nv
            x = _load_tile(Xn, offs_k, offs_p, P, mk, mp)
            f = _load_tile(Fn, offs_c, offs_p, P, mc, mp)
            acc += tl.dot(x, tl.trans(f), input_precision=DOT_PREC)
    g64 = g.to(tl.int64)
    if SUB_SC:
        s = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for j in range(NSLOT):
            s += tl.load(S_ptr + (g64 * NSLOT + j) * K + offs_k, mask=mk, other=0.0)
        cen = _load_tile(CEN_ptr, offs_k, offs_c, C, mk, mc)
        acc -= s[:, None] * cen
    out_ptrs = OUT_ptr + g64 * K * C + offs_k[:, None] * C + offs_c[None, :]
    tl.store(out_ptrs, acc.to(OUT_ptr.dtype.element_ty), mask=mk[:, None] & mc[None, :])


@triton.jit
def _v_chunk(Ap, s, Fn, CEN_ptr, offs_k, offs_p, c0, C, P, mk, mp,
             DOT_PREC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns [c0, c0+BLOCK_C) of V = A' F^T - s c for one sample (fp32)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    f = _load_tile(Fn, offs_c, offs_p, P, mc, mp)
    cen = _load_tile(CEN_ptr, offs_k, offs_c, C, mk, mc)
    return tl.dot(Ap, tl.trans(f), input_precision=DOT_PREC) - s[:, None] * cen, offs_c, mc


@triton.jit
def _whole_sample_assign(F_ptr, M_ptr, W_ptr, Z_ptr, n, C, P, K, B,
                         HAS_PARTS: tl.constexpr, LOGIT_PREC: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sample n's whole grid as one P tile (P <= BLOCK_P): the row/column
    offsets and masks, its features' base pointer, and A' and s
    (:func:`_assign_tile`) -- the one-program forwards' common start."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_P)
    mk = offs_k < K
    mp = offs_p < P
    Fn = F_ptr + n * C * P
    Ap, s = _assign_tile(Fn, M_ptr, W_ptr, Z_ptr, n, C, P, B, offs_k, offs_p, mk, mp,
                         HAS_PARTS, LOGIT_PREC, BLOCK_K, BLOCK_P, BLOCK_C)
    return offs_k, offs_p, mk, mp, Fn, Ap, s


@triton.autotune(configs=_cfgs(_SMALL, ("BLOCK_C",)), key=["C", "K", "B", "P_BUCKET", "HAS_PARTS", "NORMALIZE",
                                                               "LOGIT_PREC", "DOT_PREC"])
@triton.jit
def _fwd_single_kernel(
    F_ptr, M_ptr, W_ptr, Z_ptr, CEN_ptr, OUT_ptr, NORM_ptr,
    C, P, K, B, P_BUCKET,
    HAS_PARTS: tl.constexpr, NORMALIZE: tl.constexpr, LOGIT_PREC: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The whole forward of one sample in one program, for P <= BLOCK_P
    (<= SINGLE_MAX_P): G, the part soft-assignments, A' and s stay on chip;
    V is computed twice per C chunk (row norms, then the scaled output)
    instead of going through memory.  Writes the output and the K+1 norms."""
    n = tl.program_id(0).to(tl.int64)
    offs_k, offs_p, mk, mp, Fn, Ap, s = _whole_sample_assign(
        F_ptr, M_ptr, W_ptr, Z_ptr, n, C, P, K, B, HAS_PARTS, LOGIT_PREC, BLOCK_K, BLOCK_P, BLOCK_C)

    On = OUT_ptr + n * K * C
    if NORMALIZE:
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        sst = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            v, offs_c, mc = _v_chunk(Ap, s, Fn, CEN_ptr, offs_k, offs_p, c0, C, P, mk, mp, DOT_PREC, BLOCK_C)
            dss, dsst = _row_sq_sums(v)
            ss += dss
            sst += dsst
        scale = _norms_and_scale(ss, sst, NORM_ptr, n, K, offs_k, mk)
    else:
        scale = tl.full((BLOCK_K,), 1.0, tl.float32)
    for c0 in range(0, C, BLOCK_C):
        v, offs_c, mc = _v_chunk(Ap, s, Fn, CEN_ptr, offs_k, offs_p, c0, C, P, mk, mp, DOT_PREC, BLOCK_C)
        tl.store(On + offs_k[:, None] * C + offs_c[None, :], (v * scale[:, None]).to(OUT_ptr.dtype.element_ty),
                 mask=mk[:, None] & mc[None, :])


@triton.jit
def _is_last_program(CNT_ptr, n, NPROG):
    """Ticket of a program of sample n, which ``NPROG`` programs share:
    whether it is the last of them to get here.

    Memory order: the barrier makes the program's stores happen before its
    ticket (an acq_rel atomic at GPU scope, cumulative over the block); the
    last program then reads the others' stores with ``.cg`` loads (L2), so
    no stale L1 line is read.  Whoever gets True resets ``CNT[n]`` to 0 when
    done (autotuning reruns the kernel)."""
    tl.debug_barrier()
    return tl.atomic_add(CNT_ptr + n, 1) == NPROG - 1


@triton.jit
def _store_v(Vn, On, off, v, msk, V_HALVES: tl.constexpr):
    """A sample's fp32 V (the entries ``off``) to its buffer: float32 at
    ``Vn``, or (``V_HALVES``, a 16-bit output) each float32's high 16 bits
    in the output's own element at ``On`` and its low 16 bits in the int16
    buffer at ``Vn``: every bit kept, and one 16-bit buffer instead of a
    float32 one beside the output.  :func:`_load_v` reads it back."""
    if V_HALVES:
        u = v.to(tl.uint32, bitcast=True)
        tl.store(On + off, (u >> 16).to(tl.uint16).to(On.dtype.element_ty, bitcast=True), mask=msk)
        tl.store(Vn + off, (u & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True), mask=msk)
    else:
        tl.store(Vn + off, v, mask=msk)


@triton.jit
def _load_v(Vn, On, off, msk, V_HALVES: tl.constexpr, CACHE: tl.constexpr):
    """The fp32 V that :func:`_store_v` wrote (0 where masked), loaded with
    ``cache_modifier=CACHE``."""
    if V_HALVES:
        hi = tl.load(On + off, mask=msk, other=0, cache_modifier=CACHE).to(tl.uint16, bitcast=True)
        lo = tl.load(Vn + off, mask=msk, other=0, cache_modifier=CACHE).to(tl.uint16, bitcast=True)
        return ((hi.to(tl.uint32) << 16) | lo.to(tl.uint32)).to(tl.float32, bitcast=True)
    else:
        return tl.load(Vn + off, mask=msk, other=0.0, cache_modifier=CACHE)


@triton.jit
def _write_scaled(OUT_ptr, Vn, scale, n, K, C, offs_k, mk, FIN_C: tl.constexpr, CACHE: tl.constexpr,
                  V_HALVES: tl.constexpr = False):
    """OUT[n] = V * scale (per row) from sample n's fp32 V at ``Vn``
    (:func:`_load_v`; with ``V_HALVES`` read from the output it overwrites,
    each element by the program that wrote it), in FIN_C chunks, loading with
    ``cache_modifier=CACHE``."""
    On = OUT_ptr + n * K * C
    for c0 in range(0, C, FIN_C):
        offs_c = c0 + tl.arange(0, FIN_C)
        msk = mk[:, None] & (offs_c < C)[None, :]
        off = offs_k[:, None] * C + offs_c[None, :]
        v = _load_v(Vn, On, off, msk, V_HALVES, CACHE)
        tl.store(On + off, (v * scale[:, None]).to(OUT_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _normalize_sample(OUT_ptr, Vn, NORM_ptr, n, K, C, offs_k, mk,
                      BLOCK_K: tl.constexpr, FIN_C: tl.constexpr, CACHE: tl.constexpr,
                      V_HALVES: tl.constexpr = False):
    """Sample n's raw fp32 V (at ``Vn``, :func:`_load_v`) to its norms and the
    scaled output: the rows' sums of squares over FIN_C chunks in chunk
    order, then the output (:func:`_write_scaled`)."""
    On = OUT_ptr + n * K * C
    ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
    sst = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for c0 in range(0, C, FIN_C):
        offs_c = c0 + tl.arange(0, FIN_C)
        msk = mk[:, None] & (offs_c < C)[None, :]
        v = _load_v(Vn, On, offs_k[:, None] * C + offs_c[None, :], msk, V_HALVES, CACHE)
        dss, dsst = _row_sq_sums(v)
        ss += dss
        sst += dsst
    scale = _norms_and_scale(ss, sst, NORM_ptr, n, K, offs_k, mk)
    _write_scaled(OUT_ptr, Vn, scale, n, K, C, offs_k, mk, FIN_C, CACHE, V_HALVES)


# No SPLIT_C in the key: one config per shape class whatever the batch, so a
# sample's bits do not depend on how many samples share its launch.
_SPLIT_KEY = ["C", "K", "B", "P_BUCKET", "HAS_PARTS", "NORMALIZE", "LOGIT_PREC", "DOT_PREC"]


@triton.autotune(configs=_cfgs(_SMALL, ("BLOCK_C",)), key=_SPLIT_KEY)
@triton.jit
def _fwd_split_kernel(
    F_ptr, M_ptr, W_ptr, Z_ptr, CEN_ptr, OUT_ptr, V_ptr, SS_ptr, CNT_ptr, NORM_ptr,
    C, P, K, B, P_BUCKET, NCHUNK,
    HAS_PARTS: tl.constexpr, NORMALIZE: tl.constexpr, LOGIT_PREC: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, FIN_C: tl.constexpr, SPLIT_C: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The one-program forward spread over ``cdiv(C, SPLIT_C)`` programs per
    sample (grid (N, slices); SPLIT_C from :func:`split_channels`, a
    multiple of BLOCK_C), for P <= BLOCK_P: each program computes G,
    the soft-assignments, A' and s on chip (as ``_fwd_single``), then V for
    its own C slice, once.  Unnormalised, that is the output.  Normalised,
    it writes the slice to the fp32 workspace ``V`` and each BLOCK_C chunk's
    row sums of squares to ``SS[n, chunk]`` (NCHUNK slots a sample), and
    takes a ticket (:func:`_is_last_program`): the sample's last program
    sums the chunks' sums in chunk order -- the order
    ``_fwd_single`` adds them in, so with the same BLOCK_C the output and
    norms are the same bits as its, for any SPLIT_C -- and writes the
    norms and the scaled output."""
    tl.static_assert(SPLIT_C % BLOCK_C == 0, "SPLIT_C must be a multiple of BLOCK_C")
    n = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    offs_k, offs_p, mk, mp, Fn, Ap, s = _whole_sample_assign(
        F_ptr, M_ptr, W_ptr, Z_ptr, n, C, P, K, B, HAS_PARTS, LOGIT_PREC, BLOCK_K, BLOCK_P, BLOCK_C)
    On = OUT_ptr + n * K * C
    Vn = V_ptr + n * K * C
    SSn = SS_ptr + n * NCHUNK * 2 * BLOCK_K
    for c1 in range(0, SPLIT_C, BLOCK_C):
        c0 = sp * SPLIT_C + c1
        v, offs_c, mc = _v_chunk(Ap, s, Fn, CEN_ptr, offs_k, offs_p, c0, C, P, mk, mp, DOT_PREC, BLOCK_C)
        off = offs_k[:, None] * C + offs_c[None, :]
        if NORMALIZE:
            tl.store(Vn + off, v, mask=mk[:, None] & mc[None, :])
            dss, dsst = _row_sq_sums(v)
            live = (offs_k * 0 + c0) < C  # a chunk past C (the last slice's tail) has no slot
            q = c0 // BLOCK_C
            tl.store(SSn + q * 2 * BLOCK_K + offs_k, dss, mask=live)
            tl.store(SSn + q * 2 * BLOCK_K + BLOCK_K + offs_k, dsst, mask=live)
        else:  # unnormalised, V is the output
            tl.store(On + off, v.to(OUT_ptr.dtype.element_ty), mask=mk[:, None] & mc[None, :])
    if NORMALIZE:
        last = _is_last_program(CNT_ptr, n, tl.cdiv(C, SPLIT_C))
        if last:  # the chunks' row sums in chunk order, as _fwd_single adds them
            ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
            sst = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for q in range(0, tl.cdiv(C, BLOCK_C)):
                ss += tl.load(SSn + q * 2 * BLOCK_K + offs_k, cache_modifier=".cg")
                sst += tl.load(SSn + q * 2 * BLOCK_K + BLOCK_K + offs_k, cache_modifier=".cg")
            scale = _norms_and_scale(ss, sst, NORM_ptr, n, K, offs_k, mk)
            _write_scaled(OUT_ptr, Vn, scale, n, K, C, offs_k, mk, FIN_C, ".cg")
            tl.atomic_xchg(CNT_ptr + n, 0)


# STREAM_C is a function of (C, K) alone: one config and one slicing per
# shape class whatever the batch, so a sample's bits do not depend on how
# many samples share its launch.
_STREAM_KEY = ["C", "K", "B", "P_BUCKET", "HAS_PARTS", "NORMALIZE", "V_IS_OUT", "V_HALVES", "LOGIT_PREC",
               "DOT_PREC"]


@triton.autotune(configs=_cfgs(_STREAM, ("BLOCK_P", "BLOCK_C")), key=_STREAM_KEY)
@triton.jit
def _fwd_stream_kernel(
    F_ptr, M_ptr, W_ptr, Z_ptr, CEN_ptr, OUT_ptr, V_ptr, CNT_ptr, NORM_ptr,
    C, P, K, B, P_BUCKET, NSLICE,
    HAS_PARTS: tl.constexpr, NORMALIZE: tl.constexpr, V_IS_OUT: tl.constexpr, V_HALVES: tl.constexpr,
    LOGIT_PREC: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_K: tl.constexpr, FIN_C: tl.constexpr, STREAM_C: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The whole forward in one launch for any P: grid (N * NSLICE,), program
    n * NSLICE + j (a sample's slices side by side, so they run in the same
    wave and share its features in L2) owns the channels [j STREAM_C,
    (j+1) STREAM_C) of sample n and
    streams the sample's grid through in BLOCK_P tiles: for each tile, G
    = W F over all C (:func:`_assign_tile`), the part soft-assignments, A'
    and s on chip, then ``V_j += A' F_j^T`` into a (BLOCK_K, STREAM_C) fp32
    accumulator that stays in registers.  Neither A' nor G is ever written
    to memory (the tiled forward's (N, K, P) A' workspace); the price is G
    computed once per slice.  At the end ``V_j -= s c_j``.  Unnormalised,
    V_j is the output.  Normalised, the program writes V_j in float32 --
    into the output itself when that is float32 (``V_IS_OUT``); for a
    16-bit output, high halves in the output and low halves in the int16
    ``V`` (``V_HALVES``, :func:`_store_v`); else to the float32 ``V`` --
    and takes a ticket (:func:`_is_last_program`); the sample's last program
    reads all of V back from L2 for the norms and the scaled output, in a
    fixed chunk order (:func:`_normalize_sample`; no per-slice partial sums,
    so at most one 16-bit V is allocated beside a 16-bit output)."""
    pid = tl.program_id(0)
    n = (pid // NSLICE).to(tl.int64)
    sp = pid % NSLICE
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < K
    offs_s = sp * STREAM_C + tl.arange(0, STREAM_C)
    ms = offs_s < C
    Fn = F_ptr + n * C * P
    V = tl.zeros((BLOCK_K, STREAM_C), dtype=tl.float32)
    s = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mp = offs_p < P
        Ap, ds = _assign_tile(Fn, M_ptr, W_ptr, Z_ptr, n, C, P, B, offs_k, offs_p, mk, mp,
                              HAS_PARTS, LOGIT_PREC, BLOCK_K, BLOCK_P, BLOCK_C)
        s += ds
        f = _load_tile(Fn, offs_s, offs_p, P, ms, mp)
        V += tl.dot(Ap, tl.trans(f), input_precision=DOT_PREC)
    V -= s[:, None] * _load_tile(CEN_ptr, offs_k, offs_s, C, mk, ms)
    off = offs_k[:, None] * C + offs_s[None, :]
    msk = mk[:, None] & ms[None, :]
    if NORMALIZE:
        if V_IS_OUT:
            tl.static_assert(OUT_ptr.dtype.element_ty == tl.float32, "V_IS_OUT needs a float32 output")
            tl.static_assert(not V_HALVES, "V_IS_OUT and V_HALVES exclude each other")
            Vn = OUT_ptr + n * K * C
        else:
            Vn = V_ptr + n * K * C
        if V_HALVES:
            tl.static_assert(OUT_ptr.dtype.element_ty.primitive_bitwidth == 16, "V_HALVES needs a 16-bit output")
            tl.static_assert(V_ptr.dtype.element_ty == tl.int16, "V_HALVES keeps the low halves as int16")
        _store_v(Vn, OUT_ptr + n * K * C, off, V, msk, V_HALVES)
        last = _is_last_program(CNT_ptr, n, NSLICE)
        if last:
            _normalize_sample(OUT_ptr, Vn, NORM_ptr, n, K, C, offs_k, mk, BLOCK_K, FIN_C, ".cg", V_HALVES)
            tl.atomic_xchg(CNT_ptr + n, 0)
    else:
        tl.store(OUT_ptr + n * K * C + off, V.to(OUT_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _fwd_normalize_kernel(V_ptr, OUT_ptr, NORM_ptr, K, C,
                          BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    _normalize_sample(OUT_ptr, V_ptr + n * K * C, NORM_ptr, n, K, C, offs_k, offs_k < K, BLOCK_K, BLOCK_C, "")


@triton.jit
def _bwd_normalize_kernel(DY_ptr, Y_ptr, NORM_ptr, CEN_ptr, DV_ptr, DS_ptr, K, C,
                          NORMALIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """dV (fp32) from dY, and ds[k] = -sum_c dV[k,c] cen[k,c].

    y = u / max(||u||, eps), u[k] = V[k] / max(||V[k]||, eps); the backward of
    x / max(||x||, eps) is (dy - y (y.dy) [||x|| >= eps]) / max(||x||, eps)."""
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < K
    DYn = DY_ptr + n * K * C
    Yn = Y_ptr + n * K * C
    DVn = DV_ptr + n * K * C
    if NORMALIZE:
        r = tl.load(NORM_ptr + n * (K + 1) + offs_k, mask=mk, other=1.0)
        gg = tl.load(NORM_ptr + n * (K + 1) + K)
        # clamp by `x < eps` tests: a NaN norm stays NaN (see _norms_and_scale)
        gc = tl.where(gg < 1e-12, 1e-12, gg)
        rc = tl.where(r < 1e-12, 1e-12, r)
        gflag = 1.0 - (gg < 1e-12).to(tl.float32)
        rflag = 1.0 - (r < 1e-12).to(tl.float32)
        # t = y . dy over the whole vector
        t_rows = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mc = offs_c < C
            y = _load_tile(Yn, offs_k, offs_c, C, mk, mc)
            dy = _load_tile(DYn, offs_k, offs_c, C, mk, mc)
            t_rows += tl.sum(y * dy, axis=1)
        t = tl.sum(t_rows, axis=0) * gflag
        # q[k] = u[k] . du[k] with u = y * gc, du = (dy - y t) / gc  ->  q = y.(dy - y t)
        q = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mc = offs_c < C
            y = _load_tile(Yn, offs_k, offs_c, C, mk, mc)
            dy = _load_tile(DYn, offs_k, offs_c, C, mk, mc)
            q += tl.sum(y * (dy - y * t), axis=1)
        q = q * rflag
        ds = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mc = offs_c < C
            y = _load_tile(Yn, offs_k, offs_c, C, mk, mc)
            dy = _load_tile(DYn, offs_k, offs_c, C, mk, mc)
            du = (dy - y * t) / gc
            dv = (du - (y * gc) * q[:, None]) / rc[:, None]
            tl.store(DVn + offs_k[:, None] * C + offs_c[None, :], dv, mask=mk[:, None] & mc[None, :])
            cen = _load_tile(CEN_ptr, offs_k, offs_c, C, mk, mc)
            ds -= tl.sum(dv * cen, axis=1)
    else:
        ds = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mc = offs_c < C
            dv = _load_tile(DYn, offs_k, offs_c, C, mk, mc)
            tl.store(DVn + offs_k[:, None] * C + offs_c[None, :], dv, mask=mk[:, None] & mc[None, :])
            cen = _load_tile(CEN_ptr, offs_k, offs_c, C, mk, mc)
            ds -= tl.sum(dv * cen, axis=1)
    tl.store(DS_ptr + n * K + offs_k, ds, mask=mk)


_BWD_KEY = ["C", "K", "B", "P_BUCKET", "HAS_PARTS", "LOGIT_PREC", "DOT_PREC"]


@triton.autotune(configs=_cfgs(_BWD, ("BLOCK_P", "BLOCK_C")), key=_BWD_KEY)
@triton.jit
def _bwd_main_kernel(
    F_ptr, M_ptr, W_ptr, Z_ptr, DV_ptr, DS_ptr,
    DF_ptr, DM_ptr, DG_ptr, DZPART_ptr, SPART_ptr,
    C, P, K, B, NSLOT, P_BUCKET,
    HAS_PARTS: tl.constexpr, LOGIT_PREC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mk = offs_k < K
    mp = offs_p < P
    Fn = F_ptr + n * C * P
    DVn = DV_ptr + n * K * C

    # recompute G = W F and dA' = dV F in the same pass over C
    G = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    dAp = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        f = _load_tile(Fn, offs_c, offs_p, P, mc, mp)
        w = _load_tile(W_ptr, offs_k, offs_c, C, mk, mc)
        dv = _load_tile(DVn, offs_k, offs_c, C, mk, mc)
        G += tl.dot(w, f, input_precision=LOGIT_PREC)
        dAp += tl.dot(dv, f, input_precision=DOT_PREC)

    z = tl.load(Z_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
    ds = tl.load(DS_ptr + n * K + offs_k, mask=mk, other=0.0)
    Ap = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    dG = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    dz = tl.zeros((BLOCK_K,), dtype=tl.float32)
    s_acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for b in range(B):
        m, a = _part_assign(G, z, M_ptr, n, b, B, P, offs_p, mk, mp, HAS_PARTS, BLOCK_P)
        Ap += a * m[None, :]
        s_acc += tl.sum(a, axis=1)
        da = dAp * m[None, :] + ds[:, None]
        dm = tl.sum(a * dAp, axis=0)
        dl = a * (da - tl.sum(a * da, axis=0)[None, :])
        dz += tl.sum(dl, axis=1)
        dG += dl * m[None, :]
        if HAS_PARTS:
            dm += tl.sum(dl * G, axis=0)
            tl.store(DM_ptr + (n * B + b) * P + offs_p, dm.to(DM_ptr.dtype.element_ty), mask=mp)

    tl.store(DG_ptr + n * K * P + offs_k[:, None] * P + offs_p[None, :], dG,
             mask=mk[:, None] & mp[None, :])
    R: tl.constexpr = BLOCK_P // 16
    slots = pid_p * R + tl.arange(0, R)
    first = tl.arange(0, R)[:, None] == 0
    smask = (slots[:, None] < NSLOT) & mk[None, :]
    soffs = n * NSLOT * K + slots[:, None] * K + offs_k[None, :]
    tl.store(DZPART_ptr + soffs, tl.where(first, dz[None, :], 0.0), mask=smask)
    tl.store(SPART_ptr + soffs, tl.where(first, s_acc[None, :], 0.0), mask=smask)

    # dF = dV^T A' + W^T dG
    DFn = DF_ptr + n * C * P
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        w = _load_tile(W_ptr, offs_k, offs_c, C, mk, mc)
        dv = _load_tile(DVn, offs_k, offs_c, C, mk, mc)
        df = tl.dot(tl.trans(dv), Ap, input_precision=DOT_PREC)
        df += tl.dot(tl.trans(w), dG, input_precision=DOT_PREC)
        tl.store(DFn + offs_c[:, None] * P + offs_p[None, :], df.to(DF_ptr.dtype.element_ty),
                 mask=mc[:, None] & mp[None, :])


# The same kernels with the BLOCK_K = 128 config lists (one jit function, two
# autotuners); the host picks by BLOCK_K.
_fwd_assign_kernel_k128 = triton.autotune(configs=_cfgs(_ASSIGN_K128, ("BLOCK_P", "BLOCK_C")),
                                          key=_ASSIGN_KEY)(_fwd_assign_kernel.fn)
_bwd_main_kernel_k128 = triton.autotune(configs=_cfgs(_BWD_K128, ("BLOCK_P", "BLOCK_C")),
                                        key=_BWD_KEY)(_bwd_main_kernel.fn)
# The split forward on sm_90 (wgmma) also gets BLOCK_C = 32 (half the dependent
# dot steps), which holds the paper's 64 x 128 tile there without spilling
# (bench/kernel_resources.py: 236 registers in bf16, 222 in fp32).  On sm_80
# and sm_75 the same config spilled hundreds of bytes in an ad-hoc compile
# (kernel_resources.py compiles only the lists the host launches there).
_fwd_split_kernel_sm90 = triton.autotune(configs=_cfgs(_SPLIT_SM90, ("BLOCK_C",)),
                                         key=_SPLIT_KEY)(_fwd_split_kernel.fn)
# SPLIT_C >= every BLOCK_C of the list the host launches (sm_9x or not); the
# row-sum slots are sized for the smallest
_SPLIT_MAX_BLOCK_C = {False: max(e[0] for e in _SMALL), True: max(e[0] for e in _SPLIT_SM90)}
_SPLIT_MIN_BLOCK_C = min(e[0] for e in _SMALL + _SPLIT_SM90)


def _k128_lists(block_k) -> bool:
    """Whether ``BLOCK_K`` takes the K > 64 autotune lists."""
    return block_k > 64


def assign_kernel(block_k: int):
    """The autotuned assignment kernel for ``BLOCK_K`` (what the host runs;
    the call sites name each kernel explicitly for triton_op's source scan)."""
    return _fwd_assign_kernel_k128 if _k128_lists(block_k) else _fwd_assign_kernel


def bwd_main_kernel(block_k: int):
    """The autotuned main backward kernel for ``BLOCK_K``."""
    return _bwd_main_kernel_k128 if _k128_lists(block_k) else _bwd_main_kernel


# --------------------------------------------------------------------------
# Host-side helpers (traceable: shapes only, torch ops and wrap_triton launches)
# --------------------------------------------------------------------------
DOT_PRECISIONS = ("tf32x3", "ieee")
_DOT_ENV = "PERSONVLAD_TRITON_DOT"


def dot_precision(device, capability: Optional[Tuple[int, int]] = None) -> str:
    """``input_precision`` of the kernels' ``tl.dot`` s on ``device``.

    ``"tf32x3"`` on CUDA devices of compute capability >= 8.0 (TF32 tensor
    cores, ~fp32 accuracy), ``"ieee"`` on 7.x and under the interpreter.
    ``PERSONVLAD_TRITON_DOT=ieee|tf32x3`` overrides it (read at each call, so
    a benchmark can compare both in one process).  ``capability`` (major,
    minor) stands in for the device's, for compiling ahead of time."""
    env = os.environ.get(_DOT_ENV, "")
    if env:
        if env not in DOT_PRECISIONS:
            raise ValueError(f"{_DOT_ENV}: expected one of {DOT_PRECISIONS}, got {env!r}")
        return env
    if capability is not None:
        return "tf32x3" if capability[0] >= 8 else "ieee"
    if INTERPRET or device.type != "cuda":
        return "ieee"
    if not torch.cuda.is_available():  # tracing on fake CUDA tensors without a device
        return "tf32x3"
    return "tf32x3" if _capability(device)[0] >= 8 else "ieee"


def dot_precisions(device, dtype, capability: Optional[Tuple[int, int]] = None) -> Tuple[str, str]:
    """``(logit, gemm)`` input precisions: ``gemm`` is :func:`dot_precision`
    for every product but the logit GEMM ``G = W F``, which stays ``"ieee"``
    for float32 features (at alpha=1000 its logits are ~1e3 and tf32x3 there
    doubles the fp32 error of the raw descriptor) and follows ``gemm`` for
    half inputs, whose output rounding dwarfs it.  ``PERSONVLAD_TRITON_DOT``
    sets both."""
    prec = dot_precision(device, capability)
    if dtype == torch.float32 and not os.environ.get(_DOT_ENV):
        return "ieee", prec
    return prec, prec


def _pow2_at_least(n, lo=16, hi=None):
    """Smallest power of two >= n (at least lo, at most hi).  Written with
    comparisons only so that it also works (by guarding) on SymInts."""
    b = lo
    while b < n and (hi is None or b < hi):
        b *= 2
    return b


# Stand-ins for the multiprocessor count: the interpreter's (several C slices
# at the tests' tiny shapes) and, tracing on fake CUDA tensors without a
# device, an H100's.
_INTERPRET_SMS = 8
_TRACE_SMS = 132


def _sm_count(device) -> int:
    """The device's multiprocessor count."""
    if INTERPRET or device.type != "cuda":
        return _INTERPRET_SMS
    if not torch.cuda.is_available():
        return _TRACE_SMS
    return _device_props(device).multi_processor_count


def _is_sm90(device) -> bool:
    """Whether ``device`` is an sm_9x GPU (the split forward's wider list)."""
    if INTERPRET or device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _capability(device)[0] == 9


def split_channels(N, C, sms, min_c=16) -> int:
    """SPLIT_C, the channels per program of the split forward: as many C
    slices per sample as one wave of ``sms`` multiprocessors holds (a program
    takes 130-250 registers a thread over 8 warps, one program per SM:
    bench/kernel_resources.py), a power of two (one compiled kernel per
    value) of at least ``min_c`` (the largest BLOCK_C of the kernel's
    configs, which must divide it)."""
    slices = max(1, sms // max(N, 1))
    return min(_pow2_at_least(triton.cdiv(C, slices), min_c), _pow2_at_least(C, min_c))


STREAM_MAX_C = 256


def stream_channels(K, C) -> int:
    """STREAM_C, the channels per program of the streamed forward: as many
    as its fp32 V accumulator holds (``STREAM_TILE // BLOCK_K``), a power of
    two of at least 16 and at most C's and STREAM_MAX_C (its (STREAM_C,
    BLOCK_P) feature tile: 512 channels at K <= 16 spilled at sm_90 and
    took more shared memory than sm_75 has).  A function of (K, C) alone,
    so the slicing and the bits are the same whatever the batch."""
    return min(_pow2_at_least(C), max(16, STREAM_TILE // _block_k(K)), STREAM_MAX_C)


def _block_k(K):
    return _pow2_at_least(K)


def _block_c_rows(BK, C):
    """C chunk for the per-sample (all K rows) normalisation kernels."""
    return _pow2_at_least(C, 16, max(16, 4096 // BK))


def _flatten(features, parts):
    N, C = features.shape[0], features.shape[1]
    P = _prod(features.shape[2:])
    F = features.reshape(N, C, P).contiguous()
    M = None if parts is None else parts.reshape(N, parts.shape[1], P).contiguous()
    return F, M, N, C, P


def _prod(xs):
    out = 1
    for x in xs:
        out = out * x
    return out


SINGLE_MAX_P = 128
# Largest BLOCK_K * BLOCK_P the one-program forward takes before its
# registers spill (bench/kernel_resources.py): the tensor-core (tf32x3) build
# holds a 64 x 128 tile, the FMA (ieee, sm_7x) build a 64 x 64 one.
SINGLE_MAX_TILE = {"tf32x3": 64 * 128, "ieee": 64 * 64}
FORWARD_PATHS = ("auto", "single", "split", "stream", "tiled")
# Elements of the streamed forward's (BLOCK_K, STREAM_C) fp32 accumulator:
# 64 x 128, 32 registers a thread over 8 warps.  The interpreter takes
# 16-channel slices, so that the tests' tiny shapes run several.
STREAM_TILE = 16 * 16 if INTERPRET else 64 * 128
_FWD_ENV = "PERSONVLAD_TRITON_FWD"


def forward_path(P, K=64, dot_prec="tf32x3") -> str:
    """``"single"`` (one program per sample, :func:`_fwd_single_kernel`) when
    the whole grid fits one tile (P <= SINGLE_MAX_P, and BLOCK_K * BLOCK_P
    <= SINGLE_MAX_TILE[dot_prec]), else ``"tiled"`` (three kernels).
    ``PERSONVLAD_TRITON_FWD=tiled`` forces the tiled path; ``single`` and
    ``split`` (:func:`_fwd_split_kernel`: the one-program forward spread over
    C slices, one launch; an ablation until GPU benchmarks decide) are
    honoured only where the tile fits.  ``stream``
    (:func:`_fwd_stream_kernel`: one launch for any P, the grid streamed
    through each C slice's program in tiles, no A' in memory; an ablation
    until GPU benchmarks decide) is honoured everywhere."""
    env = os.environ.get(_FWD_ENV, "") or "auto"
    if env not in FORWARD_PATHS:
        raise ValueError(f"{_FWD_ENV}: expected one of {FORWARD_PATHS}, got {env!r}")
    if env == "stream":
        return "stream"
    if env == "tiled" or P > SINGLE_MAX_P or _block_k(K) * _pow2_at_least(P) > SINGLE_MAX_TILE[dot_prec]:
        return "tiled"
    return "split" if env == "split" else "single"


def _run_forward(F, M, W, z, c, N, C, P, K, normalize, out_dtype, wrap):
    dev = F.device
    B = 1 if M is None else M.shape[1]
    BK = _block_k(K)
    PB = _p_bucket(P)
    Mp = F if M is None else M
    logit_prec, prec = dot_precisions(dev, F.dtype)
    path = forward_path(P, K, prec)
    if path == "single":
        out = torch.empty((N, K * C) if normalize else (N, K, C), device=dev, dtype=out_dtype)
        norms = torch.empty((N, K + 1 if normalize else 0), device=dev, dtype=torch.float32)
        (wrap_triton(_fwd_single_kernel) if wrap else tuned(_fwd_single_kernel))[(N,)](
            F, Mp, W, z, c, out, norms, C, P, K, B, PB,
            HAS_PARTS=M is not None, NORMALIZE=normalize, LOGIT_PREC=logit_prec, DOT_PREC=prec,
            BLOCK_K=BK, BLOCK_P=_pow2_at_least(P),
        )
        return out, norms
    if path == "split":
        sm90 = _is_sm90(dev)
        split_c = split_channels(N, C, _sm_count(dev), _SPLIT_MAX_BLOCK_C[sm90])
        out = torch.empty((N, K * C) if normalize else (N, K, C), device=dev, dtype=out_dtype)
        nchunk = triton.cdiv(C, _SPLIT_MIN_BLOCK_C)  # row-sum slots a sample: room for the smallest BLOCK_C
        if normalize:
            norms = torch.empty((N, K + 1), device=dev, dtype=torch.float32)
            # V in fp32 (never the output itself, even in fp32: a kernel argument
            # aliasing another is lost in functionalization), the chunks' row
            # sums of squares, one ticket counter per sample
            V = torch.empty((N, K, C), device=dev, dtype=torch.float32)
            ss = torch.empty((N, nchunk * 2 * BK), device=dev, dtype=torch.float32)
            cnt = torch.zeros((N,), device=dev, dtype=torch.int32)
        else:  # V, the row sums and the counter are not touched: one empty stands in for all three
            norms = torch.empty((N, 0), device=dev, dtype=torch.float32)
            V = ss = cnt = torch.empty(0, device=dev, dtype=torch.float32)
        args = (F, Mp, W, z, c, out, V, ss, cnt, norms, C, P, K, B, PB, nchunk)
        kw = dict(HAS_PARTS=M is not None, NORMALIZE=normalize, LOGIT_PREC=logit_prec, DOT_PREC=prec,
                  BLOCK_K=BK, BLOCK_P=_pow2_at_least(P), FIN_C=_block_c_rows(BK, C), SPLIT_C=split_c)
        grid = (N, triton.cdiv(C, split_c))
        if sm90:  # each kernel named at its own call (triton_op's source scan)
            (wrap_triton(_fwd_split_kernel_sm90) if wrap else tuned(_fwd_split_kernel_sm90))[grid](*args, **kw)
        else:
            (wrap_triton(_fwd_split_kernel) if wrap else tuned(_fwd_split_kernel))[grid](*args, **kw)
        return out, norms
    if path == "stream":
        stream_c = stream_channels(K, C)
        nslice = triton.cdiv(C, stream_c)
        out = torch.empty((N, K * C) if normalize else (N, K, C), device=dev, dtype=out_dtype)
        # normalised: V in fp32 -- the output itself where that is float32
        # (V_IS_OUT: rescaled in place, no second argument aliasing it); for
        # a 16-bit output its high halves there and the low halves in an
        # int16 V (V_HALVES) -- and one ticket counter per sample
        v_is_out = normalize and out_dtype == torch.float32
        v_halves = normalize and out_dtype in (torch.float16, torch.bfloat16)
        if normalize:
            norms = torch.empty((N, K + 1), device=dev, dtype=torch.float32)
            V = torch.empty(0 if v_is_out else (N, K, C), device=dev,
                            dtype=torch.int16 if v_halves else torch.float32)
            cnt = torch.zeros((N,), device=dev, dtype=torch.int32)
        else:  # V and the counter are not touched: one empty stands in for both
            norms = torch.empty((N, 0), device=dev, dtype=torch.float32)
            V = cnt = torch.empty(0, device=dev, dtype=torch.float32)
        (wrap_triton(_fwd_stream_kernel) if wrap else tuned(_fwd_stream_kernel))[(N * nslice,)](
            F, Mp, W, z, c, out, V, cnt, norms, C, P, K, B, PB, nslice,
            HAS_PARTS=M is not None, NORMALIZE=normalize, V_IS_OUT=v_is_out, V_HALVES=v_halves,
            LOGIT_PREC=logit_prec,
            DOT_PREC=prec, BLOCK_K=BK, FIN_C=_block_c_rows(BK, C), STREAM_C=stream_c,
        )
        return out, norms
    nslot = triton.cdiv(P, _SLOT)
    Ap = torch.empty((N, K, P), device=dev, dtype=torch.float32)
    spart = torch.empty((N, nslot, K), device=dev, dtype=torch.float32)
    args = (F, Mp, W, z, Ap, spart, C, P, K, B, nslot, PB)
    kw = dict(HAS_PARTS=M is not None, LOGIT_PREC=logit_prec, BLOCK_K=BK)
    grid = lambda meta: (N, triton.cdiv(P, meta["BLOCK_P"]))  # noqa: E731
    # each kernel named at its own call, so triton_op's source scan finds both
    if _k128_lists(BK):
        (wrap_triton(_fwd_assign_kernel_k128) if wrap else tuned(_fwd_assign_kernel_k128))[grid](*args, **kw)
    else:
        (wrap_triton(_fwd_assign_kernel) if wrap else tuned(_fwd_assign_kernel))[grid](*args, **kw)
    V = torch.empty((N, K, C), device=dev, dtype=torch.float32 if normalize else out_dtype)
    (wrap_triton(_gemm_kc_kernel) if wrap else tuned(_gemm_kc_kernel))[
        lambda meta: (N, triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(C, meta["BLOCK_C"]))
    ](Ap, F, spart, c, V, N, C, P, K, 1, nslot, PB, SUB_SC=True, DOT_PREC=prec)
    if not normalize:
        return V, torch.empty((N, 0), device=dev, dtype=torch.float32)
    out = torch.empty((N, K * C), device=dev, dtype=out_dtype)
    norms = torch.empty((N, K + 1), device=dev, dtype=torch.float32)
    (wrap_triton(_fwd_normalize_kernel) if wrap else tuned(_fwd_normalize_kernel))[(N,)](
        V, out, norms, K, C, BLOCK_K=BK, BLOCK_C=_block_c_rows(BK, C)
    )
    return out, norms


def _run_backward(dy, F, M, W, z, c, y, norms, N, C, P, K, normalize, wrap):
    dev = F.device
    B = 1 if M is None else M.shape[1]
    BK = _block_k(K)
    PB = _p_bucket(P)
    nslot = triton.cdiv(P, _SLOT)
    dV = torch.empty((N, K, C), device=dev, dtype=torch.float32)
    ds = torch.empty((N, K), device=dev, dtype=torch.float32)
    normp = norms if normalize else dV
    (wrap_triton(_bwd_normalize_kernel) if wrap else tuned(_bwd_normalize_kernel))[(N,)](
        dy, y if normalize else dy, normp, c, dV, ds, K, C,
        NORMALIZE=normalize, BLOCK_K=BK, BLOCK_C=_block_c_rows(BK, C),
    )
    dF = torch.empty((N, C, P), device=dev, dtype=F.dtype)
    dM = torch.empty((N, B, P), device=dev, dtype=M.dtype) if M is not None else F.new_empty(0)
    dG = torch.empty((N, K, P), device=dev, dtype=torch.float32)
    dzpart = torch.empty((N, nslot, K), device=dev, dtype=torch.float32)
    spart = torch.empty((N, nslot, K), device=dev, dtype=torch.float32)
    Mp = F if M is None else M
    logit_prec, prec = dot_precisions(dev, F.dtype)
    args = (F, Mp, W, z, dV, ds, dF, dM if M is not None else dF, dG, dzpart, spart, C, P, K, B, nslot, PB)
    kw = dict(HAS_PARTS=M is not None, LOGIT_PREC=logit_prec, DOT_PREC=prec, BLOCK_K=BK)
    grid = lambda meta: (N, triton.cdiv(P, meta["BLOCK_P"]))  # noqa: E731
    if _k128_lists(BK):
        (wrap_triton(_bwd_main_kernel_k128) if wrap else tuned(_bwd_main_kernel_k128))[grid](*args, **kw)
    else:
        (wrap_triton(_bwd_main_kernel) if wrap else tuned(_bwd_main_kernel))[grid](*args, **kw)
    groups = min(N, 16)
    npg = triton.cdiv(N, groups)
    groups = triton.cdiv(N, npg)
    dWpart = torch.empty((groups, K, C), device=dev, dtype=torch.float32)
    (wrap_triton(_gemm_kc_kernel) if wrap else tuned(_gemm_kc_kernel))[
        lambda meta: (groups, triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(C, meta["BLOCK_C"]))
    ](dG, F, ds, c, dWpart, N, C, P, K, npg, 0, PB, SUB_SC=False, DOT_PREC=prec)
    dW = dWpart.sum(dim=0)
    dz = dzpart.sum(dim=(0, 1))
    s = spart.sum(dim=1)
    dc = -(s.unsqueeze(2) * dV).sum(dim=0)
    return dF, dM, dW, dz, dc


# --------------------------------------------------------------------------
# Op bodies
# --------------------------------------------------------------------------
def _forward_impl(
    features: torch.Tensor,
    parts: Optional[torch.Tensor],
    assign_weight: torch.Tensor,
    assign_bias: torch.Tensor,
    centers: torch.Tensor,
    normalize: bool,
    keep_f32: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # the schema torch 2.11 infers from these annotations
    return _forward_body(features, parts, assign_weight, assign_bias, centers, normalize, keep_f32, _wrapping())


def _forward_body(features, parts, assign_weight, assign_bias, centers, normalize, keep_f32, wrap):
    """The forward op's body; ``wrap``: launch through ``wrap_triton`` (while
    torch.compile / make_fx trace the op), else launch the kernels directly."""
    check_supported(features, parts, assign_weight, assign_bias, centers)
    F, M, N, C, P = _flatten(features, parts)
    K = assign_weight.shape[0]
    if N == 0:
        return _forward_fake(features, parts, assign_weight, assign_bias, centers, normalize, keep_f32)
    W = assign_weight.contiguous()
    z = assign_bias.contiguous()
    c = centers.contiguous()
    if _keeps_f32_output(features.dtype, normalize, keep_f32):
        y32, norms = _run_forward(F, M, W, z, c, N, C, P, K, normalize, torch.float32, wrap)
        return y32.to(features.dtype), norms, y32
    out, norms = _run_forward(F, M, W, z, c, N, C, P, K, normalize, features.dtype, wrap)
    return out, norms, features.new_empty((N, 0), dtype=torch.float32)


def _keeps_f32_output(dtype, normalize, keep_f32) -> bool:
    """Whether the forward also returns its normalised output in float32 for
    the backward (asked for, and half-precision features; see the op's schema above)."""
    return keep_f32 and normalize and dtype != torch.float32


def _backward_impl(
    grad_out: torch.Tensor,
    features: torch.Tensor,
    parts: Optional[torch.Tensor],
    assign_weight: torch.Tensor,
    assign_bias: torch.Tensor,
    centers: torch.Tensor,
    out: torch.Tensor,
    norms: torch.Tensor,
    normalize: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_body(grad_out, features, parts, assign_weight, assign_bias, centers, out, norms, normalize,
                          _wrapping())


def _backward_body(grad_out, features, parts, assign_weight, assign_bias, centers, out, norms, normalize, wrap):
    """The backward op's body (``wrap`` as in :func:`_forward_body`)."""
    F, M, N, C, P = _flatten(features, parts)
    K = assign_weight.shape[0]
    if N == 0:
        dM = torch.zeros_like(parts, memory_format=torch.contiguous_format) if parts is not None \
            else features.new_empty(0)
        return (torch.zeros_like(features, memory_format=torch.contiguous_format), dM,
                torch.zeros_like(assign_weight, memory_format=torch.contiguous_format),
                torch.zeros_like(assign_bias, memory_format=torch.contiguous_format),
                torch.zeros_like(centers, memory_format=torch.contiguous_format))
    W = assign_weight.contiguous()
    z = assign_bias.contiguous()
    c = centers.contiguous()
    dy = grad_out.reshape(N, K, C).contiguous()
    y = out.reshape(N, K, C).contiguous()
    dF, dM, dW, dz, dc = _run_backward(dy, F, M, W, z, c, y, norms.contiguous(), N, C, P, K, normalize, wrap)
    dF = dF.view(features.shape)
    dM = dM.view(parts.shape) if parts is not None else dM
    return (dF, dM, dW.to(assign_weight.dtype), dz.to(assign_bias.dtype), dc.to(centers.dtype))


_FWD_NAME = "personvlad::person_vlad_triton"
_BWD_NAME = "personvlad::person_vlad_triton_backward"
_FWD_SCHEMA = (
    "(Tensor features, Tensor? parts, Tensor assign_weight, Tensor assign_bias, "
    "Tensor centers, bool normalize, bool keep_f32=False) -> (Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor features, Tensor? parts, Tensor assign_weight, "
    "Tensor assign_bias, Tensor centers, Tensor out, Tensor norms, bool normalize) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _forward_fake(features, parts, assign_weight, assign_bias, centers, normalize, keep_f32=False):
    N, C = features.shape[0], features.shape[1]
    K = assign_weight.shape[0]
    shape = (N, K * C) if normalize else (N, K, C)
    keep = _keeps_f32_output(features.dtype, normalize, keep_f32)
    return (features.new_empty(shape),
            features.new_empty((N, K + 1 if normalize else 0), dtype=torch.float32),
            features.new_empty((N, K * C if keep else 0), dtype=torch.float32))


def _backward_fake(grad_out, features, parts, assign_weight, assign_bias, centers, out, norms, normalize):
    def e(t):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)

    return (e(features), e(parts) if parts is not None else features.new_empty(0),
            e(assign_weight), e(assign_bias), e(centers))


if INTERPRET:
    _fwd_op = torch.library.custom_op(_FWD_NAME, _forward_impl, mutates_args=(), schema=_FWD_SCHEMA)
    _fwd_op.register_fake(_forward_fake)
    _bwd_op = torch.library.custom_op(_BWD_NAME, _backward_impl, mutates_args=(), schema=_BWD_SCHEMA)
    _bwd_op.register_fake(_backward_fake)
else:
    _fwd_op = torch.library.triton_op(_FWD_NAME, _forward_impl, mutates_args=(), schema=_FWD_SCHEMA)
    _bwd_op = torch.library.triton_op(_BWD_NAME, _backward_impl, mutates_args=(), schema=_BWD_SCHEMA)

from ..ops import register_flop_formulas  # noqa: E402  (FlopCounterMode counts the op's products)

register_flop_formulas(torch.ops.personvlad.person_vlad_triton, torch.ops.personvlad.person_vlad_triton_backward)


def _setup_context(ctx, inputs, output):
    features, parts, W, z, c, normalize, keep_f32 = inputs
    out, norms, out_f32 = output
    ctx.normalize = normalize
    ctx.has_parts = parts is not None
    ctx.mark_non_differentiable(norms, out_f32)
    # no zero-filled gradients for the two non-differentiable outputs (out_f32
    # is as large as the output in float32): unused ones arrive as None
    ctx.set_materialize_grads(False)
    y = out_f32 if _keeps_f32_output(features.dtype, normalize, keep_f32) else out
    ctx.save_for_backward(features, parts, W, z, c, y, norms)


def _backward(ctx, grad_out, grad_norms, grad_out_f32, direct=False):
    """The op's autograd formula: the backward op.  ``direct`` (the eager
    Function below): the backward body itself where direct_call_ok allows and
    no graph of the gradients is being built (create_graph=True: the backward
    op has no autograd formula, so differentiating it raises, as through the op)."""
    features, parts, W, z, c, out, norms = ctx.saved_tensors
    parts = parts if ctx.has_parts else None
    if grad_out is None:
        grad_out = torch.zeros(out.shape, dtype=features.dtype, device=out.device)
    args = (grad_out, features, parts, W, z, c, out, norms, ctx.normalize)
    if direct and not torch.is_grad_enabled() and direct_call_ok(*args[:-1]):
        dF, dM, dW, dz, dc = _backward_body(*args, False)
    else:
        dF, dM, dW, dz, dc = torch.ops.personvlad.person_vlad_triton_backward(*args)
    return dF, (dM if ctx.has_parts else None), dW, dz, dc, None, None


torch.library.register_autograd(_FWD_NAME, _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------
# Eager calls: the op bodies without the custom-op machinery
# --------------------------------------------------------------------------
# In an eager call, triton_op -> custom_op -> the autograd wrapper cost ~30 us
# of host time around the ~40 us op body (bench/triton_host_overhead.py,
# 2-core Xeon) -- per call of a kernel that runs ~10-100 us on a GPU.  Where
# nothing can observe the op as an op, person_vlad_triton runs the same
# bodies directly (an autograd.Function with the op's setup_context, for the
# same saved tensors and gradients).  It goes through the op whenever
# something could: torch.compile / make_fx / export tracing, any
# TorchDispatchMode (FlopCounterMode, FakeTensorMode, DebugMode, ...), a
# TorchFunctionMode other than torch.device's (which only fills in the
# device of factory calls; the bodies name theirs), the JIT tracer, the
# autograd profiler (whose trace shows the op), tensor subclasses, torch.func
# transforms (vmap's batched tensors have no storage; the op runs under
# vmap's per-sample fallback); and with PERSONVLAD_TRITON_DIRECT=0 (the
# benchmarks' fused-triton-viaop ablation).  Also plain tensors whose memory
# is not what they hold until the dispatcher's fallbacks resolve them: a
# lazily negated view (neg bit), a ZeroTensor (no memory), a functional
# tensor.  Not detected: an ExecutionTraceObserver on its own (no profiler);
# set PERSONVLAD_TRITON_DIRECT=0 to record the op there.  The autograd node
# is PersonVLADTritonBackward, not the op's generated one.
_DIRECT_ENV = "PERSONVLAD_TRITON_DIRECT"
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_jit_tracing = torch._C._get_tracing_state
_profiling = torch._C._autograd._profiler_enabled
_function_mode_stack = torch.overrides._get_current_function_mode_stack
_is_functional = torch._is_functional_tensor


def _only_device_modes() -> bool:
    """Whether every active TorchFunctionMode is ``torch.device``'s context
    (``with torch.device(...)``, ``torch.set_default_device``)."""
    from torch.utils._device import DeviceContext

    return all(isinstance(m, DeviceContext) for m in _function_mode_stack())


def _direct_env() -> bool:
    v = os.environ.get(_DIRECT_ENV, "1")
    if v not in ("0", "1"):
        raise ValueError(f"{_DIRECT_ENV}: expected 0 or 1, got {v!r}")
    return v == "1"


def direct_call_ok(*tensors) -> bool:
    """Whether an eager call may run the op bodies directly (see above)."""
    if (torch.compiler.is_compiling() or _dispatch_modes() or _profiling()
            or _jit_tracing() is not None or functorch_active() or not _direct_env()):
        return False
    if _function_modes() and not _only_device_modes():
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSORS or t.is_neg() or t._is_zerotensor()
                              or _is_functional(t)):
            return False
    return True


class PersonVLADTriton(torch.autograd.Function):
    """The forward op's body and its registered autograd, minus the op.  (The
    op's setup_context is called from forward: a Function that defines
    setup_context has each call's arguments bound by inspect.signature, ~40 us.)"""

    @staticmethod
    def forward(ctx, features, parts, W, z, c, normalize, keep_f32):
        output = _forward_body(features, parts, W, z, c, normalize, keep_f32, False)
        _setup_context(ctx, (features, parts, W, z, c, normalize, keep_f32), output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_norms, grad_out_f32):
        return _backward(ctx, grad_out, grad_norms, grad_out_f32, direct=True)


def person_vlad_triton(
    features: torch.Tensor,
    parts: Optional[torch.Tensor],
    assign_weight: torch.Tensor,
    assign_bias: torch.Tensor,
    centers: torch.Tensor,
    normalize: bool = True,
) -> torch.Tensor:
    """Fused PersonVLAD with the Triton kernels (SPEC §1); inputs are assumed
    validated by :func:`personvlad.ops.validate`.  Raises
    :class:`UnsupportedInput` (a ``ValueError``) outside :func:`supports`."""
    check_supported(features, parts, assign_weight, assign_bias, centers)
    ins = (features, parts, assign_weight, assign_bias, centers)
    keep_f32 = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ins)
    with on_tensor_device(features):
        if direct_call_ok(*ins):
            if keep_f32:
                out, _, _ = PersonVLADTriton.apply(*ins, normalize, keep_f32)
            else:
                out, _, _ = _forward_body(*ins, normalize, False, False)
        else:
            out, _, _ = torch.ops.personvlad.person_vlad_triton(*ins, normalize, keep_f32)
    return out
