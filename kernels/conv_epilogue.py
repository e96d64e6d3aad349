"""Fused Conv3d epilogue: bias + ReLU + MaxPool3d in one Triton pass.

The convolution itself stays with cuDNN, run with ``bias=None``; this kernel
reads its raw output ``y`` (N, C, D, H, W) -- contiguous NCDHW or
``channels_last_3d`` (NDHWC), any strides in fact -- and writes

    out = max_pool3d(relu(y + bias[c]), kernel, stride, padding, ceil_mode)

with float32 math whatever the storage dtype (float32/float16/bfloat16).
Because ``+bias`` and ReLU are monotone, the window maximum is taken on ``y``
and the epilogue is applied once per output element.

Besides ``out`` the forward writes ``offsets`` (int8, same shape/layout as
``out``): the index of the window's maximum inside the window
(``kd*KH*KW + kh*KW + kw``, first occurrence in d, h, w order like PyTorch's
max pool), or ``-1`` where ReLU clipped the output to 0 (no gradient flows).
The backward is a gather over input positions (it handles overlapping
windows, i.e. stride < kernel, without atomics):

    grad_y[n,c,i] = sum over windows o containing i with offsets[o] == i - start(o)
                    of grad_out[n,c,o]
    grad_bias[c]  = sum over n, o of grad_out[n,c,o] * (offsets[o] >= 0)

Both directions are registered as ``torch.library.triton_op`` custom ops
(``personvlad::bias_relu_pool3d`` and ``personvlad::bias_relu_pool3d_backward``)
with ``register_autograd``, so ``torch.compile`` traces into the kernels.

Without pooling (``kernel_size=(1, 1, 1)``) the same op is a fused bias+ReLU.

:func:`bias_relu_pool3d_ref` is the eager composition it must match.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import os

import triton
import triton.language as tl

from ._device import on_tensor_device

# Under TRITON_INTERPRET=1 interpreted kernels are plain Python that cannot run
# on FakeTensors, so ``wrap_triton``/``triton_op`` cannot trace them: there the
# same schemas are registered with ``custom_op`` plus explicit fake kernels
# (opaque to torch.compile, identical otherwise).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:

    def wrap_triton(kernel):
        return kernel

else:
    from torch.library import wrap_triton

__all__ = [
    "bias_relu_pool3d",
    "bias_relu_pool3d_ref",
    "pool_output_size",
    "normalize_pool_args",
    "SUPPORTED_DTYPES",
    "INTERPRET",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_WINDOW = 127  # offsets are int8 (-1 marks "no gradient")
_BLOCK = 4096 if os.environ.get("TRITON_INTERPRET") == "1" else 512  # fewer, wider programs for the interpreter


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------
@triton.jit
def _unravel(idx, C, D, H, W, CHANNELS_LAST: tl.constexpr):
    """(n, c, d, h, w) of flat element indices of an (N, C, D, H, W) tensor
    walked in its memory order (NDHWC when CHANNELS_LAST, else NCDHW)."""
    if CHANNELS_LAST:
        c = idx % C
        t = idx // C
        w = t % W
        t = t // W
        h = t % H
        t = t // H
        d = t % D
        n = t // D
    else:
        w = idx % W
        t = idx // W
        h = t % H
        t = t // H
        d = t % D
        t = t // D
        c = t % C
        n = t // C
    return n, c, d, h, w


@triton.jit
def _bias_relu_pool3d_fwd_kernel(
    y_ptr, b_ptr, out_ptr, off_ptr,
    total, C, D, H, W, Do, Ho, Wo,
    sy_n, sy_c, sy_d, sy_h, sy_w,
    so_n, so_c, so_d, so_h, so_w,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, USE_I64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if USE_I64:  # 64-bit index math only where an offset can pass 2**31
        idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    # Walk the output in its memory order so stores (and most loads) coalesce.
    n, c, od, oh, ow = _unravel(idx, C, Do, Ho, Wo, CHANNELS_LAST)
    base = n * sy_n + c * sy_c
    d0 = od * SD - PD
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK], dtype=tl.int32)
    for kd in tl.static_range(KD):
        d = d0 + kd
        vd = (d >= 0) & (d < D)
        for kh in tl.static_range(KH):
            h = h0 + kh
            vh = vd & (h >= 0) & (h < H)
            for kw in tl.static_range(KW):
                w = w0 + kw
                valid = mask & vh & (w >= 0) & (w < W)
                v = tl.load(y_ptr + base + d * sy_d + h * sy_h + w * sy_w,
                            mask=valid, other=float("-inf")).to(tl.float32)
                upd = (v > m) | (v != v)  # NaN propagates, as in max_pool3d
                m = tl.where(upd, v, m)
                arg = tl.where(upd, kd * KH * KW + kh * KW + kw, arg)
    bias = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
    z = m + bias
    live = (z > 0) | (z != z)
    out = tl.where(live, z, 0.0)
    o_ptr = n * so_n + c * so_c + od * so_d + oh * so_h + ow * so_w
    tl.store(out_ptr + o_ptr, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(off_ptr + o_ptr, tl.where(live, arg, -1).to(tl.int8), mask=mask)


@triton.jit
def _bias_relu_pool3d_bwd_kernel(
    go_ptr, off_ptr, gy_ptr,
    total, C, D, H, W, Do, Ho, Wo,
    sg_n, sg_c, sg_d, sg_h, sg_w,
    sf_n, sf_c, sf_d, sf_h, sf_w,
    sy_n, sy_c, sy_d, sy_h, sy_w,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    ND: tl.constexpr, NH: tl.constexpr, NW: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, USE_I64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if USE_I64:  # 64-bit index math only where an offset can pass 2**31
        idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    n, c, d, h, w = _unravel(idx, C, D, H, W, CHANNELS_LAST)
    gbase = n * sg_n + c * sg_c
    fbase = n * sf_n + c * sf_c
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # Output windows that may contain this input position: o = (i + P)//S - j,
    # j < ceil(K/S), valid when 0 <= o < Out and i + P - o*S < K.
    for jd in tl.static_range(ND):
        od = (d + PD) // SD - jd
        rd = d + PD - od * SD
        vd = mask & (od >= 0) & (od < Do) & (rd < KD)
        for jh in tl.static_range(NH):
            oh = (h + PH) // SH - jh
            rh = h + PH - oh * SH
            vh = vd & (oh >= 0) & (oh < Ho) & (rh < KH)
            for jw in tl.static_range(NW):
                ow = (w + PW) // SW - jw
                rw = w + PW - ow * SW
                valid = vh & (ow >= 0) & (ow < Wo) & (rw < KW)
                o = tl.load(off_ptr + fbase + od * sf_d + oh * sf_h + ow * sf_w,
                            mask=valid, other=-1).to(tl.int32)
                hit = valid & (o == rd * KH * KW + rh * KW + rw)
                g = tl.load(go_ptr + gbase + od * sg_d + oh * sg_h + ow * sg_w,
                            mask=hit, other=0.0).to(tl.float32)
                acc += g
    y_off = n * sy_n + c * sy_c + d * sy_d + h * sy_h + w * sy_w
    tl.store(gy_ptr + y_off, acc.to(gy_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------
IntOr3 = Union[int, Sequence[int]]


def _triple(v: IntOr3, name: str) -> List[int]:
    if isinstance(v, int):
        return [int(v)] * 3
    t = [int(x) for x in v]
    if len(t) == 1:
        return t * 3
    if len(t) != 3:
        raise ValueError(f"{name}: expected an int or 3 ints, got {tuple(v)!r}")
    return t


def normalize_pool_args(kernel_size: Optional[IntOr3], stride: Optional[IntOr3] = None,
                        padding: IntOr3 = 0) -> Tuple[List[int], List[int], List[int]]:
    """(kernel, stride, padding) as 3-lists; ``kernel_size=None`` means no pool."""
    if kernel_size is None:
        return [1, 1, 1], [1, 1, 1], [0, 0, 0]
    k = _triple(kernel_size, "kernel_size")
    s = k if stride is None else _triple(stride, "stride")
    p = _triple(padding, "padding")
    if any(x < 1 for x in k):
        raise ValueError(f"kernel_size: expected positive sizes, got {k}")
    if any(x < 1 for x in s):
        raise ValueError(f"stride: expected positive sizes, got {s}")
    if any(x < 0 for x in p) or any(pi > ki // 2 for pi, ki in zip(p, k)):
        raise ValueError(f"padding: expected 0 <= padding <= kernel_size // 2 = {[ki // 2 for ki in k]}, got {p}")
    if k[0] * k[1] * k[2] > MAX_WINDOW:
        raise ValueError(f"kernel_size: window of at most {MAX_WINDOW} elements supported "
                         f"(int8 offsets), got {k} = {k[0] * k[1] * k[2]}")
    return k, s, p


def pool_output_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """MaxPool output length along one dim (PyTorch's rule, dilation 1)."""
    num = size + 2 * p - k
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1  # the last window must start inside the input or left padding
    return out


def _is_channels_last(t: torch.Tensor) -> bool:
    return (not t.is_contiguous()) and t.is_contiguous(memory_format=torch.channels_last_3d)


def _memory_format(channels_last: bool):
    return torch.channels_last_3d if channels_last else torch.contiguous_format


def _launch_params(*tensors):
    return dict(BLOCK=_BLOCK, USE_I64=_needs_i64(*tensors))


def _needs_i64(*tensors) -> bool:
    """True when an element offset (or the padded element count) of any
    tensor may not fit in int32."""
    lim = 2 ** 31 - 1 - 2 * _BLOCK
    for t in tensors:
        span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0)
        if span > lim or t.numel() > lim:
            return True
    return False


# --------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------
_FWD_NAME = "personvlad::bias_relu_pool3d"
_BWD_NAME = "personvlad::bias_relu_pool3d_backward"


def _fwd_alloc(y, kernel_size, stride, padding, ceil_mode):
    N, C, D, H, W = y.shape
    size = [pool_output_size(x, k, s, p, ceil_mode)
            for x, k, s, p in zip((D, H, W), kernel_size, stride, padding)]
    fmt = _memory_format(_is_channels_last(y))
    out = torch.empty((N, C, *size), dtype=y.dtype, device=y.device, memory_format=fmt)
    off = torch.empty((N, C, *size), dtype=torch.int8, device=y.device, memory_format=fmt)
    return out, off


def _bwd_alloc(grad_out, input_size, channels_last):
    return torch.empty(tuple(input_size), dtype=grad_out.dtype, device=grad_out.device,
                       memory_format=_memory_format(channels_last))


def _bias_relu_pool3d_fake(y: torch.Tensor, bias: torch.Tensor, kernel_size: List[int], stride: List[int],
                           padding: List[int], ceil_mode: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return _fwd_alloc(y, kernel_size, stride, padding, ceil_mode)


def _bias_relu_pool3d_backward_fake(grad_out: torch.Tensor, offsets: torch.Tensor, input_size: List[int],
                                    channels_last: bool, kernel_size: List[int], stride: List[int],
                                    padding: List[int]) -> torch.Tensor:
    return _bwd_alloc(grad_out, input_size, channels_last)


def _bias_relu_pool3d_impl(y: torch.Tensor, bias: torch.Tensor, kernel_size: List[int], stride: List[int],
                           padding: List[int], ceil_mode: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    N, C, D, H, W = y.shape
    KD, KH, KW = kernel_size
    SD, SH, SW = stride
    PD, PH, PW = padding
    cl = _is_channels_last(y)
    out, off = _fwd_alloc(y, kernel_size, stride, padding, ceil_mode)
    Do, Ho, Wo = out.shape[2:]
    total = out.numel()
    if total > 0:
        grid = (triton.cdiv(total, _BLOCK),)
        wrap_triton(_bias_relu_pool3d_fwd_kernel)[grid](
            y, bias, out, off, total, C, D, H, W, Do, Ho, Wo,
            *y.stride(), *out.stride(),
            KD=KD, KH=KH, KW=KW, SD=SD, SH=SH, SW=SW, PD=PD, PH=PH, PW=PW,
            CHANNELS_LAST=cl, **_launch_params(y, out),
        )
    return out, off


def _bias_relu_pool3d_backward_impl(grad_out: torch.Tensor, offsets: torch.Tensor, input_size: List[int],
                                  channels_last: bool, kernel_size: List[int], stride: List[int],
                                  padding: List[int]) -> torch.Tensor:
    N, C, D, H, W = input_size
    KD, KH, KW = kernel_size
    SD, SH, SW = stride
    PD, PH, PW = padding
    Do, Ho, Wo = offsets.shape[2:]
    gy = _bwd_alloc(grad_out, input_size, channels_last)
    total = gy.numel()
    if total > 0:
        grid = (triton.cdiv(total, _BLOCK),)
        wrap_triton(_bias_relu_pool3d_bwd_kernel)[grid](
            grad_out, offsets, gy, total, C, D, H, W, Do, Ho, Wo,
            *grad_out.stride(), *offsets.stride(), *gy.stride(),
            KD=KD, KH=KH, KW=KW, SD=SD, SH=SH, SW=SW, PD=PD, PH=PH, PW=PW,
            ND=-(-KD // SD), NH=-(-KH // SH), NW=-(-KW // SW),
            CHANNELS_LAST=channels_last, **_launch_params(grad_out, offsets, gy),
        )
    return gy


def _setup_context(ctx, inputs, output):
    y, bias, kernel_size, stride, padding, ceil_mode = inputs
    _, off = output
    ctx.save_for_backward(off)
    ctx.input_size = list(y.shape)
    ctx.channels_last = _is_channels_last(y)
    ctx.pool = (list(kernel_size), list(stride), list(padding))
    ctx.bias_dtype = bias.dtype
    ctx.mark_non_differentiable(off)


def _backward(ctx, grad_out, grad_off):
    (off,) = ctx.saved_tensors
    k, s, p = ctx.pool
    grad_y = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_y = torch.ops.personvlad.bias_relu_pool3d_backward(
            grad_out, off, ctx.input_size, ctx.channels_last, k, s, p)
    if ctx.needs_input_grad[1]:
        live = off >= 0
        grad_bias = torch.where(live, grad_out.float(), 0.0).sum(dim=(0, 2, 3, 4)).to(ctx.bias_dtype)
    return grad_y, grad_bias, None, None, None, None


if INTERPRET:
    _fwd_op = torch.library.custom_op(_FWD_NAME, _bias_relu_pool3d_impl, mutates_args=())
    _fwd_op.register_fake(_bias_relu_pool3d_fake)
    _bwd_op = torch.library.custom_op(_BWD_NAME, _bias_relu_pool3d_backward_impl, mutates_args=())
    _bwd_op.register_fake(_bias_relu_pool3d_backward_fake)
else:
    _fwd_op = torch.library.triton_op(_FWD_NAME, _bias_relu_pool3d_impl, mutates_args=())
    _bwd_op = torch.library.triton_op(_BWD_NAME, _bias_relu_pool3d_backward_impl, mutates_args=())
torch.library.register_autograd(_FWD_NAME, _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------
def _check(y: torch.Tensor, bias: torch.Tensor):
    if not isinstance(y, torch.Tensor) or y.dim() != 5:
        raise ValueError(f"y: expected a 5-D tensor (N, C, D, H, W), got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if not (y.is_cuda or (INTERPRET and y.device.type == "cpu")):
        raise ValueError(f"y: expected a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1 set before "
                         f"this module is imported), got device {y.device}")
    if y.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"y: expected dtype in {[str(d) for d in SUPPORTED_DTYPES]}, got {y.dtype}")
    if not isinstance(bias, torch.Tensor) or bias.shape != (y.shape[1],):
        raise ValueError(f"bias: expected shape ({y.shape[1]},) (one per channel of y), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if bias.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"bias: expected a floating dtype in {[str(d) for d in SUPPORTED_DTYPES]}, got {bias.dtype}")
    if bias.device != y.device:
        raise ValueError(f"bias: expected device {y.device} (same as y), got {bias.device}")


def bias_relu_pool3d(y: torch.Tensor, bias: torch.Tensor, kernel_size: Optional[IntOr3] = None,
                     stride: Optional[IntOr3] = None, padding: IntOr3 = 0,
                     ceil_mode: bool = False) -> torch.Tensor:
    """``max_pool3d(relu(y + bias), ...)`` in one Triton kernel (see module doc).

    ``kernel_size=None``: no pooling, a fused bias + ReLU.  Differentiable in
    ``y`` and ``bias``.  Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
    """
    _check(y, bias)
    k, s, p = normalize_pool_args(kernel_size, stride, padding)
    for i, name in enumerate("DHW"):
        if pool_output_size(y.shape[2 + i], k[i], s[i], p[i], ceil_mode) < 1:
            raise ValueError(f"y: size {name}={y.shape[2 + i]} too small for kernel {k[i]} "
                             f"(padding {p[i]}); output would be empty")
    if bias.dtype != torch.float32 and bias.dtype != y.dtype:
        bias = bias.to(y.dtype)
    with on_tensor_device(y):
        out, _ = torch.ops.personvlad.bias_relu_pool3d(y, bias.contiguous(), k, s, p, bool(ceil_mode))
    return out


def bias_relu_pool3d_ref(y: torch.Tensor, bias: torch.Tensor, kernel_size: Optional[IntOr3] = None,
                         stride: Optional[IntOr3] = None, padding: IntOr3 = 0,
                         ceil_mode: bool = False, *, fp32_math: bool = True) -> torch.Tensor:
    """The eager composition the kernel matches: ``max_pool3d(relu(y + b))``.

    ``fp32_math=True`` computes in float32 and casts back (the kernel's
    numerics); ``False`` stays in ``y.dtype`` (what an unfused model does).
    """
    k, s, p = normalize_pool_args(kernel_size, stride, padding)
    x = y.float() if fp32_math else y
    z = F.relu(x + bias.to(x.dtype).view(1, -1, 1, 1, 1))
    if kernel_size is not None:
        z = F.max_pool3d(z, k, s, p, ceil_mode=ceil_mode)
    return z.to(y.dtype)
