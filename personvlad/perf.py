"""Performance tools for the 3D-conv backbone (issue 10).

- :class:`FusedBiasReLUPool3d` — ``max_pool3d(relu(y + bias))`` as one module
  holding the bias; Triton kernel (:mod:`personvlad.kernels.conv_epilogue`) on
  CUDA (or CPU under ``TRITON_INTERPRET=1``), the eager composition elsewhere.
- :class:`FusedConv3d` — an ``nn.Conv3d`` (same parameters, same state_dict
  keys ``weight``/``bias``) whose forward runs the convolution with
  ``bias=None`` (cuDNN) and then the fused bias + ReLU (+ max pool) epilogue.
- :func:`fuse_conv_relu_pool` — rewrites a model in place: every
  Conv3d -> ReLU [-> MaxPool3d] run in an ``nn.Sequential`` and every conv of a
  :class:`personvlad.models.C3DBackbone` (without batch norm) becomes a
  :class:`FusedConv3d`; the ReLU / MaxPool3d modules it absorbed become
  ``nn.Identity``.  The state_dict keys and shapes do not change, so
  checkpoints load both ways.
- :func:`pad_input_channels` — conv1 with 3 input channels padded to 8 (zero
  weights, zero input channels): same result, tensor-core friendly cuDNN
  kernels in channels_last_3d half precision.  Inference-only (changes the
  weight shape).
- :func:`check_cudnn_3d` — detects half-precision 3D-conv configurations
  where PyTorch does not use cuDNN (several x slower, many x more memory);
  :func:`guard_cudnn_3d` runs it once per device at the start of training
  and of :func:`optimize_for_inference` (bf16/fp16 on a GPU) and warns.
- :func:`cudnn_benchmark_scope` — a scope with ``torch.backends.cudnn.benchmark``
  on (cuDNN times its algorithms once per shape and keeps the fastest), as
  the trainer runs, unless the process asked for deterministic algorithms.
- :func:`optimize_for_inference` — bf16 autocast + channels_last_3d + fused
  epilogues (+ padded conv1) + cuDNN benchmark mode + CUDA graph for a fixed
  input shape.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FusedBiasReLUPool3d",
    "FusedConv3d",
    "ChannelPadConv3d",
    "fuse_conv_relu_pool",
    "count_fused",
    "pad_input_channels",
    "check_cudnn_3d",
    "guard_cudnn_3d",
    "cudnn_benchmark_scope",
    "deterministic_requested",
    "cudnn_3d_known_problems",
    "optimize_for_inference",
    "InferenceRunner",
    "epilogue_ref",
    "triton_epilogue_usable",
]

IntOr3 = Union[int, Sequence[int]]
_BACKENDS = ("auto", "triton", "reference")


# --------------------------------------------------------------------------
# Fused epilogue
# --------------------------------------------------------------------------
_KMOD = None  # the kernel module once imported (read directly while torch.compile traces)


@functools.lru_cache(maxsize=None)
def _kernel_module():
    """``personvlad.kernels.conv_epilogue`` or None when Triton is unusable."""
    global _KMOD
    try:
        from .kernels import conv_epilogue as mod  # type: ignore
    except Exception as e:  # ImportError, or Triton failing to initialise
        _kernel_module.error = e  # type: ignore[attr-defined]
        return None
    _KMOD = mod
    return mod


def triton_epilogue_usable(device: Union[torch.device, str]) -> Tuple[bool, str]:
    """``(True, "")`` when the Triton epilogue can run on ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        major, _ = torch.cuda.get_device_capability(idx)
        if major < 7:
            return False, f"Triton needs compute capability >= 7.0, {dev} has {major}.x"
    elif not (dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return False, f"Triton runs on CUDA tensors (or CPU with TRITON_INTERPRET=1), got {dev}"
    if _kernel_module() is None:
        return False, f"Triton epilogue could not be imported: {getattr(_kernel_module, 'error', '?')}"
    return True, ""


def _triple(v: IntOr3, name: str) -> Tuple[int, int, int]:
    if isinstance(v, int):
        return (int(v),) * 3
    t = tuple(int(x) for x in v)
    if len(t) == 1:
        return t * 3
    if len(t) != 3:
        raise ValueError(f"{name}: expected an int or 3 ints, got {tuple(v)!r}")
    return t  # type: ignore[return-value]


def _pool_args(kernel_size, stride, padding):
    if kernel_size is None:
        return None, None, (0, 0, 0)
    k = _triple(kernel_size, "kernel_size")
    s = k if stride is None else _triple(stride, "stride")
    p = _triple(padding, "padding")
    if min(k) < 1 or min(s) < 1:
        raise ValueError(f"kernel_size/stride: expected positive sizes, got kernel {k}, stride {s}")
    if min(p) < 0 or any(pi > ki // 2 for pi, ki in zip(p, k)):
        raise ValueError(f"padding: expected 0 <= padding <= kernel_size // 2, got {p} for kernel {k}")
    if k[0] * k[1] * k[2] > 127:
        raise ValueError(f"kernel_size: at most 127 elements per window, got {k}")
    return k, s, p


def epilogue_ref(y: torch.Tensor, bias: torch.Tensor, kernel_size=None, stride=None, padding=0,
                 ceil_mode: bool = False) -> torch.Tensor:
    """Eager ``max_pool3d(relu(y + bias))`` in float32 math (float64 for float64
    ``y``: at least float32, never narrower than ``y``), result in ``y.dtype``."""
    ct = torch.promote_types(y.dtype, torch.float32)
    z = F.relu(y.to(ct) + bias.to(ct).view(1, -1, 1, 1, 1))
    if kernel_size is not None:
        z = F.max_pool3d(z, kernel_size, stride if stride is not None else kernel_size, padding,
                         ceil_mode=ceil_mode)
    return z.to(y.dtype)


def _triton_dtype_ok(y: torch.Tensor) -> bool:
    """Whether the Triton kernel takes ``y``'s dtype: float32/float16, and
    bfloat16 on CUDA only (the interpreter has no bf16); never float64."""
    return y.dtype in (torch.float32, torch.float16) or (y.dtype == torch.bfloat16 and y.is_cuda)


def _run_epilogue(y, bias, kernel_size, stride, padding, ceil_mode, backend):
    if backend != "reference" and torch.compiler.is_compiling():
        # Traced by dynamo: no device queries or cached imports, only what the
        # eager checks below would have decided for a usable install.
        kmod = _KMOD
        ok = kmod is not None and (y.is_cuda or (y.device.type == "cpu" and kmod.INTERPRET))
        if ok and _triton_dtype_ok(y):  # the eager "auto" branch's dtype condition
            return kmod.bias_relu_pool3d(y, bias, kernel_size, stride, padding, ceil_mode)
        if backend == "triton":
            raise ValueError(f"backend: 'triton' is not usable here (y: {y.dtype} on {y.device})")
        return epilogue_ref(y, bias, kernel_size, stride, padding, ceil_mode)
    use_triton = backend == "triton"
    if backend == "auto":
        # The kernel has no float64 and the interpreter (CPU) no bf16: those take the eager path.
        use_triton = _triton_dtype_ok(y) and triton_epilogue_usable(y.device)[0]
    elif backend == "triton":
        ok, why = triton_epilogue_usable(y.device)
        if not ok:
            raise ValueError(f"backend: 'triton' is not usable here: {why}")
    if use_triton:
        return _kernel_module().bias_relu_pool3d(y, bias, kernel_size, stride, padding, ceil_mode)
    return epilogue_ref(y, bias, kernel_size, stride, padding, ceil_mode)


def _check_backend(backend: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
    return backend


class FusedBiasReLUPool3d(nn.Module):
    """``max_pool3d(relu(y + bias[c]))`` in one pass (``kernel_size=None``: bias + ReLU).

    ``bias`` is an existing ``nn.Parameter`` (shared, e.g. a conv's bias), a
    tensor (copied into a new parameter) or an int number of channels (zeros).
    ``backend``: ``"auto"`` (Triton where usable, else eager), ``"triton"``,
    ``"reference"``.
    """

    def __init__(self, bias: Union[nn.Parameter, torch.Tensor, int], kernel_size: Optional[IntOr3] = None,
                 stride: Optional[IntOr3] = None, padding: IntOr3 = 0, ceil_mode: bool = False,
                 backend: str = "auto") -> None:
        super().__init__()
        if isinstance(bias, nn.Parameter):
            param = bias
        elif isinstance(bias, torch.Tensor):
            param = nn.Parameter(bias.detach().clone())
        elif isinstance(bias, int) and bias > 0:
            param = nn.Parameter(torch.zeros(bias))
        else:
            raise ValueError(f"bias: expected a Parameter, a 1-D tensor or a positive channel count, got {bias!r}")
        if param.dim() != 1:
            raise ValueError(f"bias: expected a 1-D tensor (C,), got shape {tuple(param.shape)}")
        self.bias = param
        self.kernel_size, self.stride, self.padding = _pool_args(kernel_size, stride, padding)
        self.ceil_mode = bool(ceil_mode)
        self.backend = _check_backend(backend)
        if backend != "reference":
            _kernel_module()  # import now, not while torch.compile traces forward

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return _run_epilogue(y, self.bias, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                             self.backend)

    def extra_repr(self) -> str:
        pool = "none" if self.kernel_size is None else (
            f"kernel={self.kernel_size}, stride={self.stride}, padding={self.padding}, ceil_mode={self.ceil_mode}")
        return f"channels={self.bias.numel()}, pool={pool}, backend={self.backend!r}"


class FusedConv3d(nn.Conv3d):
    """Conv3d (cuDNN, ``bias=None``) followed by the fused bias + ReLU (+ max
    pool) epilogue.  Parameters and state_dict keys are those of the
    ``nn.Conv3d`` it was made from (:meth:`from_conv` shares them)."""

    def __init__(self, *args, pool: Optional[Dict[str, Any]] = None, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.bias is None:  # like from_conv: the epilogue adds the bias, there must be one
            raise ValueError("bias: expected bias=True (FusedConv3d fuses the conv bias into its "
                             "bias + ReLU epilogue), got bias=False")
        self._set_epilogue(pool, backend)

    def _set_epilogue(self, pool, backend):
        pool = dict(pool or {})
        if pool.get("dilation", 1) not in (1, (1, 1, 1), [1, 1, 1]) or pool.get("return_indices", False):
            raise ValueError(f"pool: dilation != 1 and return_indices are not supported, got {pool}")
        self.pool_kernel, self.pool_stride, self.pool_padding = _pool_args(
            pool.get("kernel_size"), pool.get("stride"), pool.get("padding", 0))
        self.pool_ceil_mode = bool(pool.get("ceil_mode", False))
        self.backend = _check_backend(backend)
        if backend != "reference":
            _kernel_module()  # import now, not while torch.compile traces forward

    @classmethod
    def from_conv(cls, conv: nn.Conv3d, pool: Optional[nn.MaxPool3d] = None, backend: str = "auto") -> "FusedConv3d":
        if type(conv) is not nn.Conv3d:
            raise ValueError(f"conv: expected a plain nn.Conv3d, got {type(conv).__name__}")
        if conv.bias is None:
            raise ValueError("conv: expected a Conv3d with a bias (nothing to fuse otherwise)")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in conv.__dict__.items()
                             if k not in ("_parameters", "_buffers", "_modules")})
        new._parameters = dict(conv._parameters)  # the same Parameter objects
        new._buffers = dict(conv._buffers)
        new._modules = dict(conv._modules)
        pool_cfg = None
        if pool is not None:
            pool_cfg = dict(kernel_size=pool.kernel_size, stride=pool.stride, padding=pool.padding,
                            dilation=pool.dilation, ceil_mode=pool.ceil_mode, return_indices=pool.return_indices)
        new._set_epilogue(pool_cfg, backend)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight, None)
        return _run_epilogue(y, self.bias, self.pool_kernel, self.pool_stride, self.pool_padding,
                             self.pool_ceil_mode, self.backend)

    def extra_repr(self) -> str:
        pool = "none" if self.pool_kernel is None else (
            f"kernel={self.pool_kernel}, stride={self.pool_stride}, padding={self.pool_padding}, "
            f"ceil_mode={self.pool_ceil_mode}")
        return super().extra_repr() + f", epilogue=bias+relu, pool={pool}, backend={self.backend!r}"


def _fusable_conv(m: nn.Module) -> bool:
    return type(m) is nn.Conv3d and m.bias is not None


def _fusable_pool(m: nn.Module) -> bool:
    """A MaxPool3d the epilogue can absorb: no indices, dilation 1 and a
    window / padding :func:`_pool_args` accepts (at most 127 elements: the
    kernel's int8 offsets).  Any other pool stays a module of its own."""
    if type(m) is not nn.MaxPool3d or m.return_indices:
        return False
    if m.dilation not in (1, (1, 1, 1), [1, 1, 1]):
        return False
    try:
        _pool_args(m.kernel_size, m.stride, m.padding)
    except (ValueError, TypeError):
        return False
    return True


def _fuse_sequential(seq: nn.Sequential, backend: str) -> int:
    names = list(seq._modules.keys())
    mods = [seq._modules[n] for n in names]
    i, fused = 0, 0
    while i < len(mods) - 1:
        conv, relu = mods[i], mods[i + 1]
        if _fusable_conv(conv) and type(relu) is nn.ReLU:
            pool = mods[i + 2] if i + 2 < len(mods) and _fusable_pool(mods[i + 2]) else None
            seq._modules[names[i]] = FusedConv3d.from_conv(conv, pool, backend)
            seq._modules[names[i + 1]] = nn.Identity()
            if pool is not None:
                seq._modules[names[i + 2]] = nn.Identity()
            fused += 1
            i += 3 if pool is not None else 2
        else:
            i += 1
    return fused


def _fuse_c3d(backbone: nn.Module, backend: str) -> int:
    """All convs of a C3DBackbone (they share one ReLU), or none.  A pool the
    epilogue cannot absorb (:func:`_fusable_pool`) stays after its fused conv."""
    from .models.backbone import POOLS

    if getattr(backbone, "batch_norm", True) or type(backbone.relu) is not nn.ReLU:
        return 0
    convs = backbone.convs()
    pools = {name: getattr(backbone, "pool" + name[4]) for name, _ in convs if name in POOLS}
    if not all(_fusable_conv(c) for _, c in convs):
        return 0
    for name, conv in convs:
        pool = pools.get(name)
        if pool is not None and not _fusable_pool(pool):
            pool = None  # conv + ReLU fused; the pool module runs after it as before
        setattr(backbone, name, FusedConv3d.from_conv(conv, pool, backend))
        if pool is not None:
            setattr(backbone, "pool" + name[4], nn.Identity())
    backbone.relu = nn.Identity()
    return len(convs)


def fuse_conv_relu_pool(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Fuse conv bias + ReLU (+ MaxPool3d) epilogues of ``model`` in place.

    Handled: ``Conv3d -> ReLU [-> MaxPool3d]`` runs inside any ``nn.Sequential``
    and the convs of a :class:`personvlad.models.C3DBackbone` without batch
    norm.  A MaxPool3d the kernel cannot absorb (dilation, ``return_indices``,
    a window of over 127 elements) stays a module of its own after the fused
    conv + ReLU.  Returns ``model``; ``count_fused(model)`` says how many convs were
    fused.  Works the same before or after ``.to(device)``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    _check_backend(backend)
    try:
        from .models.backbone import C3DBackbone
    except Exception:  # pragma: no cover - models package broken
        C3DBackbone = ()  # type: ignore[assignment]
    for m in list(model.modules()):
        if C3DBackbone and isinstance(m, C3DBackbone):
            _fuse_c3d(m, backend)
        elif isinstance(m, nn.Sequential):
            _fuse_sequential(m, backend)
    return model


def count_fused(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, FusedConv3d))


# --------------------------------------------------------------------------
# conv1 input-channel padding
# --------------------------------------------------------------------------
class ChannelPadConv3d(nn.Module):
    """Wraps a conv whose weight was zero-padded along input channels to
    ``conv.in_channels``; pads the input with zero channels to match."""

    def __init__(self, conv: nn.Conv3d, orig_in_channels: int) -> None:
        super().__init__()
        self.conv = conv
        self.orig_in_channels = int(orig_in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.orig_in_channels:
            raise ValueError(f"x: expected {self.orig_in_channels} channels, got {x.shape[1]}")
        extra = self.conv.in_channels - self.orig_in_channels
        pad = x.new_zeros((x.shape[0], extra, *x.shape[2:]))
        cl = (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last_3d)
        xp = torch.cat([x, pad], dim=1)
        if cl:
            xp = xp.contiguous(memory_format=torch.channels_last_3d)
        return self.conv(xp)

    def extra_repr(self) -> str:
        return f"in_channels {self.orig_in_channels} -> {self.conv.in_channels}"


def pad_input_channels(model: nn.Module, multiple: int = 8) -> nn.Module:
    """Zero-pad the input channels of the model's first Conv3d (3 -> ``multiple``).

    The padded weight channels are zero and so are the padded input channels,
    so the output is the same (up to summation order).  In place; changes
    the state_dict of that conv (inference-only).  Returns ``model``.
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple: expected a positive int, got {multiple!r}")
    first = None
    for name, mod in model.named_modules():
        if isinstance(mod, ChannelPadConv3d):
            return model  # already padded
        if isinstance(mod, nn.Conv3d):
            first = (name, mod)
            break
    if first is None:
        return model
    name, child = first
    cin = child.in_channels
    if child.groups != 1 or cin % multiple == 0:
        return model
    new_cin = -(-cin // multiple) * multiple
    conv = copy.copy(child)
    conv._parameters = dict(child._parameters)
    w = child.weight
    padded = torch.cat([w.detach(), w.new_zeros((w.shape[0], new_cin - cin, *w.shape[2:]))], dim=1)
    if w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous():
        padded = padded.contiguous(memory_format=torch.channels_last_3d)
    conv.weight = nn.Parameter(padded, requires_grad=w.requires_grad)
    conv.in_channels = new_cin
    wrapped = ChannelPadConv3d(conv, cin)
    if name == "":
        return wrapped
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, wrapped)
    return model


# --------------------------------------------------------------------------
# cuDNN guard
# --------------------------------------------------------------------------
def _version_tuple(v: str) -> Tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", v)
    if not m:
        return (0, 0, 0)
    return tuple(int(x or 0) for x in m.groups())


def _fmt_cudnn(v: Optional[int]) -> str:
    if not v:
        return "none"
    return f"{v // 10000}.{(v // 100) % 100}.{v % 100}"


def cudnn_3d_known_problems(torch_version: str, cudnn_version: Optional[int],
                            cudnn_enabled: bool = True) -> List[Dict[str, str]]:
    """Known configurations where half-precision 3D convs skip cuDNN.

    Each entry: ``{"problem": ..., "layouts": "all"|"ncdhw", "fix": ...}``.

    - cuDNN disabled (``torch.backends.cudnn.enabled = False``).
    - PyTorch 2.9.0 with cuDNN >= 9.8: fp16/bf16 3D convs with kernel != 1 never
      use cuDNN (slow fallback, about 4x slower and up to ~17x the memory).
    - PyTorch >= 2.9.1 with cuDNN 9.8 - 9.14: the same fallback for
      contiguous (NCDHW) inputs; channels_last_3d still uses cuDNN.
    """
    out: List[Dict[str, str]] = []
    if not cudnn_enabled:
        out.append(dict(problem="torch.backends.cudnn.enabled is False: every 3D conv runs PyTorch's slow "
                                "fallback kernels", layouts="all",
                        fix="set torch.backends.cudnn.enabled = True"))
    if not cudnn_version:
        return out
    tv = _version_tuple(torch_version)
    cv = int(cudnn_version)
    if tv[:3] == (2, 9, 0) and cv >= 90800:
        out.append(dict(
            problem=f"PyTorch {torch_version} with cuDNN {_fmt_cudnn(cv)} (>= 9.8) disables cuDNN for fp16/bf16 "
                    "3D convolutions: the fallback is ~4x slower and uses up to ~17x the memory",
            layouts="all",
            fix="upgrade to torch >= 2.9.1 together with cuDNN >= 9.15 (pip install 'nvidia-cudnn-cu12>=9.15', "
                "or the cu13 wheel), or keep the 3D convs in float32 (TF32)"))
    elif tv >= (2, 9, 1) and 90800 <= cv < 91500:
        out.append(dict(
            problem=f"PyTorch {torch_version} with cuDNN {_fmt_cudnn(cv)} (9.8 - 9.14) skips cuDNN for fp16/bf16 "
                    "3D convolutions in contiguous NCDHW layout (slow, memory-hungry fallback)",
            layouts="ncdhw",
            fix="use channels_last_3d (optimize_for_inference does), or install cuDNN >= 9.15 "
                "(pip install 'nvidia-cudnn-cu12>=9.15'), or fall back to float32"))
    return out


def _allocated_bytes_total(device: torch.device) -> int:
    """Bytes the caching allocator has handed out on ``device`` since the
    start (a running total, which the user's peak statistics do not touch)."""
    return int(torch.cuda.memory_stats(device).get("allocated_bytes.all.allocated", 0))


def _fmt_mb(mb: Optional[float]) -> str:
    return "? MiB" if mb is None else f"{mb:.0f} MiB"


def _probe(device: torch.device) -> Dict[str, Any]:
    """Time one small 3x3x3 Conv3d in fp32, bf16 NCDHW and bf16 channels_last_3d,
    and count the memory each call allocates (output, workspace and any
    fallback buffers) from the allocator's running total: resetting the peak
    statistics instead would wipe the caller's ``max_memory_allocated``."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x32 = torch.randn(8, 64, 8, 32, 32, generator=g).to(device)
    w32 = (torch.randn(64, 64, 3, 3, 3, generator=g) * 0.05).to(device)
    res: Dict[str, Any] = {}
    cases = {
        "fp32": (x32, w32),
        "bf16": (x32.bfloat16(), w32.bfloat16()),
        "bf16_cl": (x32.bfloat16().contiguous(memory_format=torch.channels_last_3d),
                    w32.bfloat16().contiguous(memory_format=torch.channels_last_3d)),
    }
    for name, (x, w) in cases.items():
        with torch.no_grad(), torch.cuda.device(device):  # the events record on the current device
            for _ in range(2):
                F.conv3d(x, w, padding=1)
            torch.cuda.synchronize(device)
            total0 = _allocated_bytes_total(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                F.conv3d(x, w, padding=1)
            end.record()
            torch.cuda.synchronize(device)
        moved = _allocated_bytes_total(device) - total0
        # None where the allocator keeps no running total (cudaMallocAsync
        # reports only current and peak bytes): nothing to compare then
        res[name] = dict(ms=start.elapsed_time(end) / 5,
                         alloc_mb_per_call=moved / 5 / 2 ** 20 if moved > 0 else None)
    return res


def check_cudnn_3d(warn: bool = True, probe: bool = True, device: Optional[Union[str, torch.device]] = None
                   ) -> Dict[str, Any]:
    """Detect half-precision 3D-conv configurations that skip cuDNN.

    Returns a dict with ``status``: ``"no-gpu"`` (no CUDA device; nothing is
    checked or warned), ``"ok"`` or ``"bad"``, plus ``torch``, ``cudnn``
    (e.g. 91002), ``cudnn_enabled``, ``problems`` (see
    :func:`cudnn_3d_known_problems`) and, with ``probe=True``, ``probe``:
    ms and MiB allocated per call (``alloc_mb_per_call``; None under an
    allocator without a running total, e.g. cudaMallocAsync) of one small
    Conv3d in fp32 / bf16 / bf16 channels_last_3d.  A bf16 conv slower than fp32, or
    allocating over 4x its memory, is reported as a problem too.  The probe
    leaves the CUDA memory statistics (peaks included) as they were, apart
    from the running totals its convolutions add to.  ``warn=True`` issues one
    ``RuntimeWarning`` with the fixes when status is ``"bad"``.
    """
    cudnn = torch.backends.cudnn
    info: Dict[str, Any] = dict(torch=torch.__version__, cudnn=cudnn.version() if cudnn.is_available() else None,
                                cudnn_enabled=bool(cudnn.enabled))
    if not torch.cuda.is_available():
        return dict(status="no-gpu", **info)
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    problems = cudnn_3d_known_problems(torch.__version__, info["cudnn"], info["cudnn_enabled"])
    if probe:
        p = _probe(dev)
        info["probe"] = p
        for name, layout in (("bf16", "ncdhw"), ("bf16_cl", "channels_last_3d")):
            slow = p[name]["ms"] > p["fp32"]["ms"]
            mb, mb32 = p[name]["alloc_mb_per_call"], p["fp32"]["alloc_mb_per_call"]
            fat = mb is not None and mb32 is not None and mb > 4 * max(mb32, 1.0)
            if slow or fat:
                problems.append(dict(
                    problem=f"probe: bf16 Conv3d ({layout}) took {p[name]['ms']:.3f} ms and "
                            f"{_fmt_mb(mb)} allocated per call vs fp32 "
                            f"{p['fp32']['ms']:.3f} ms / {_fmt_mb(mb32)}",
                    layouts="ncdhw" if layout == "ncdhw" else "all",
                    fix="use channels_last_3d, upgrade torch / install cuDNN >= 9.15, or run the convs in fp32"))
    info["problems"] = problems
    info["status"] = "bad" if problems else "ok"
    if warn and problems:
        _warn_cudnn(problems, stacklevel=3)
    return info


def _warn_cudnn(problems: List[Dict[str, str]], stacklevel: int) -> None:
    lines = "\n".join(f"  - {p['problem']}\n    fix: {p['fix']}" for p in problems)
    warnings.warn(f"personvlad: slow half-precision 3D convolutions on this install:\n{lines}",
                  RuntimeWarning, stacklevel=stacklevel)


_CUDNN_GUARDED: set = set()


def guard_cudnn_3d(device: Union[str, torch.device], channels_last: bool) -> List[Dict[str, str]]:
    """The start-up guard the trainer and :func:`optimize_for_inference` run
    before half-precision 3D convolutions on a GPU: :func:`check_cudnn_3d`
    (with its probe) once per device and layout in this process, and one
    ``RuntimeWarning`` for the problems that apply to that layout (an
    NCDHW-only problem does not, with ``channels_last``).  Returns those
    problems ([] off CUDA, or when already checked)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return []
    key = (dev.index if dev.index is not None else torch.cuda.current_device(), bool(channels_last))
    if key in _CUDNN_GUARDED:
        return []
    _CUDNN_GUARDED.add(key)
    info = check_cudnn_3d(warn=False, device=dev)
    problems = [p for p in info.get("problems", []) if not (channels_last and p.get("layouts") == "ncdhw")]
    if problems:
        _warn_cudnn(problems, stacklevel=3)
    return problems


def deterministic_requested() -> bool:
    """Whether this process asked for reproducible kernels
    (``torch.use_deterministic_algorithms`` or ``torch.backends.cudnn.deterministic``)."""
    return torch.are_deterministic_algorithms_enabled() or bool(torch.backends.cudnn.deterministic)


@contextlib.contextmanager
def cudnn_benchmark_scope(on: bool = True):
    """``torch.backends.cudnn.benchmark`` set to ``on`` inside, restored on exit.

    In benchmark mode cuDNN times the candidate algorithms of each new
    convolution shape once (the first call at that shape is slower; its
    workspace comes from PyTorch's caching allocator) and runs the fastest
    from then on; off, it takes its heuristics' first choice.  The trainer
    turns it on for the whole run (``engine.trainer``); inference and feature
    extraction take this scope, so that a library call leaves the process's
    setting as it found it.  Where the process asked for deterministic
    algorithms (:func:`deterministic_requested`) the scope does not turn it
    on (it keeps the process's setting): which algorithm wins a timing can
    differ between runs, and with it the last bits of the output.  Turning
    it off is always honoured.  The flag is process-wide: another thread's
    convolutions inside the scope see it too."""
    prev = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = _benchmark_flag(on)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = prev


def _benchmark_flag(on: bool) -> bool:
    """The flag :func:`cudnn_benchmark_scope` sets for ``on``: off when asked,
    on when asked unless deterministic algorithms were requested (then the
    process's current setting)."""
    if on and deterministic_requested():
        return bool(torch.backends.cudnn.benchmark)
    return bool(on)


# --------------------------------------------------------------------------
# optimize_for_inference
# --------------------------------------------------------------------------
class InferenceRunner:
    """Callable returned by :func:`optimize_for_inference`.

    ``runner(clips) -> descriptors`` (float32).  With a CUDA graph, batches of
    the captured shape replay it; smaller batches are copied into the front
    of the static buffer (the rest is left as is: rows are independent in
    eval mode) and larger ones are split into chunks.  Other (T, H, W) or
    dtypes raise ``ValueError``.  ``.model`` is the transformed module,
    ``.info`` what was applied.
    """

    def __init__(self, model, run, device, static_in=None, static_out=None, graph=None, info=None):
        self.model = model
        self._run = run
        self.device = device
        self.static_in = static_in
        self.static_out = static_out
        self.graph = graph
        self.info = dict(info or {})

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        if not isinstance(clips, torch.Tensor):
            raise ValueError(f"clips: expected a tensor, got {type(clips).__name__}")
        if self.graph is None:
            with torch.no_grad():
                return self._run(clips.to(self.device, non_blocking=True))
        s = self.static_in
        if clips.dim() != s.dim() or tuple(clips.shape[1:]) != tuple(s.shape[1:]) or clips.dtype != s.dtype:
            raise ValueError(f"clips: the CUDA graph was captured for (N<={s.shape[0]}, "
                             f"{', '.join(map(str, s.shape[1:]))}) {s.dtype}; got {tuple(clips.shape)} {clips.dtype}")
        B, n = s.shape[0], clips.shape[0]
        if n > B:
            return torch.cat([self(clips[i:i + B]) for i in range(0, n, B)])
        if n == B:
            s.copy_(clips, non_blocking=True)
        else:
            s[:n].copy_(clips, non_blocking=True)
        self.graph.replay()
        return self.static_out[:n].clone()


def optimize_for_inference(model: nn.Module, example_clips: torch.Tensor, dtype: Optional[torch.dtype] = torch.bfloat16,
                           channels_last: bool = True, cuda_graph: bool = True, compile: bool = False,
                           fuse: bool = True, pad_channels: Optional[int] = 8, inplace: bool = False,
                           warmup: int = 3, cudnn_benchmark: bool = True) -> InferenceRunner:
    """A fast inference callable for ``model`` at ``example_clips``'s shape.

    Applies, on a copy of ``model`` (``inplace=False``) in eval mode: the
    fused conv epilogues (``fuse``), conv1 input channels padded to
    ``pad_channels`` (None: off), ``channels_last_3d`` weights and inputs,
    ``torch.autocast(dtype)`` (``dtype=None`` or float32: off), the
    convolutions in cuDNN's benchmark mode (``cudnn_benchmark``, see
    :func:`cudnn_benchmark_scope`: each call runs inside that scope, and the
    graph's warm-up calls are where cuDNN times its algorithms), optional
    ``torch.compile`` and, on CUDA with ``cuda_graph``, a CUDA graph captured
    for ``example_clips.shape`` / dtype (feed that dtype: uint8 clips keep the
    host-to-device copy 4x smaller; the model divides them by 255 inside
    the graph).  The model's device decides where it runs.  On CPU there is no
    graph: the returned callable runs the transformed model eagerly.
    Descriptors come back as float32.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example_clips, torch.Tensor) or example_clips.dim() != 5:
        raise ValueError(f"example_clips: expected a 5-D tensor (N, 3, T, H, W), got "
                         f"{tuple(example_clips.shape) if isinstance(example_clips, torch.Tensor) else type(example_clips).__name__}")
    if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype: expected None, float32, float16 or bfloat16, got {dtype}")
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else example_clips.device
    m = model if inplace else copy.deepcopy(model)
    m.eval()
    info: Dict[str, Any] = dict(device=str(device), dtype=str(dtype).replace("torch.", ""),
                                channels_last=bool(channels_last), compile=bool(compile),
                                cudnn_benchmark=_benchmark_flag(cudnn_benchmark))
    if fuse:
        fuse_conv_relu_pool(m)
    info["fused_convs"] = count_fused(m)
    if pad_channels:
        m = pad_input_channels(m, pad_channels)
        info["pad_channels"] = int(pad_channels)
    if channels_last:
        m = m.to(memory_format=torch.channels_last_3d)
    autocast = dtype is not None and dtype != torch.float32
    dev_type = device.type
    if autocast:
        guard_cudnn_3d(device, channels_last)

    fwd = torch.compile(m) if compile else m

    def run(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with cudnn_benchmark_scope(cudnn_benchmark), torch.autocast(dev_type, dtype=dtype, enabled=autocast):
            out = fwd(x)
        return out.float()

    use_graph = bool(cuda_graph) and dev_type == "cuda"
    info["cuda_graph"] = use_graph
    if not use_graph:
        return InferenceRunner(m, run, device, info=info)

    static_in = example_clips.to(device).clone()
    # on the model's device, also where it is not the current one: warm-up,
    # side stream and capture all use the current device's streams
    with torch.no_grad(), torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                run(static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = run(static_in)
    return InferenceRunner(m, run, device, static_in, static_out, graph, info)
