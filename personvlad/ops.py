"""The single door to the fused PersonVLAD op (SPEC §1).

``person_vlad(...)`` validates its arguments, picks a backend and calls it:

- ``"reference"`` — :func:`personvlad.reference.person_vlad_ref`, pure PyTorch,
  differentiable by autograd; the executable form of the spec.
- ``"cpu"``       — the C++ extension (``personvlad._C``), registered as
  ``torch.ops.personvlad.person_vlad`` for CPU tensors (float32/float64;
  float16/bfloat16 features are computed in float32).
- ``"cuda"``      — the CUDA kernels of the same extension, same op, CUDA key.
- ``"triton"``    — Triton kernels, registered as
  ``torch.ops.personvlad.person_vlad_triton`` through ``torch.library.triton_op``.
- ``"auto"``      — CPU tensors: ``cpu`` when the extension is built, else
  ``reference``; CUDA tensors: the faster of ``cuda``/``triton`` for the shape
  class, from the committed benchmark table (:mod:`personvlad._backend_table`):
  faster forward alone when no backward can follow (grad mode off, or no
  input requires grad), faster forward + backward otherwise; falling back
  to whichever is available, else ``reference``.

``torch.ops.personvlad.person_vlad`` always exists: when the extension is not
built (or was built without CUDA) the missing device kernels are filled with
the pure-PyTorch reference so the op, its fake kernel and its autograd formula
keep working.  Those fallbacks are *not* reported by :func:`available_backends`.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from . import reference
from ._backend_table import pick_cuda_backend

__all__ = ["person_vlad", "available_backends", "BACKENDS", "extension_loaded", "functorch_active"]

BACKENDS = ("reference", "cpu", "cuda", "triton")
OP_NAME = "personvlad::person_vlad"
BWD_NAME = "personvlad::person_vlad_backward"
SCHEMA = (
    "person_vlad(Tensor features, Tensor? parts, Tensor assign_weight, "
    "Tensor assign_bias, Tensor centers, bool normalize=True) -> Tensor"
)
BWD_SCHEMA = (
    "person_vlad_backward(Tensor grad_output, Tensor features, Tensor? parts, "
    "Tensor assign_weight, Tensor assign_bias, Tensor centers, bool normalize) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

# --------------------------------------------------------------------------
# Extension loading and op registration
# --------------------------------------------------------------------------
_EXT_ERROR: Optional[BaseException] = None
try:  # the compiled extension defines the schema (TORCH_LIBRARY) + CPU/CUDA kernels
    from . import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by the no-extension CI job
    _C = None
    _EXT_ERROR = e
    if os.environ.get("PERSONVLAD_QUIET_EXT") != "1":
        warnings.warn(
            "personvlad: compiled extension personvlad._C not available "
            f"({e}); using the pure-PyTorch fallback. Rebuild with "
            "`make install` (or `pip install --no-build-isolation -e .`).",
            RuntimeWarning,
            stacklevel=2,
        )


def extension_loaded() -> bool:
    """True when the compiled C++ (and maybe CUDA) extension is loaded."""
    return _C is not None


def _has_kernel(name: str, key: str) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(name, key))


_FRAGMENT = torch.library.Library("personvlad", "FRAGMENT")  # noqa: F841 (kept alive)
if not hasattr(torch.ops.personvlad, "person_vlad"):  # no extension: define in Python
    torch.library.define(OP_NAME, SCHEMA.split("person_vlad", 1)[1])
    torch.library.define(BWD_NAME, BWD_SCHEMA.split("person_vlad_backward", 1)[1])

# Which device kernels are real (compiled) — decided before fallbacks are added.
_NATIVE_CPU = _has_kernel(OP_NAME, "CPU") and _has_kernel(BWD_NAME, "CPU")
_NATIVE_CUDA = _has_kernel(OP_NAME, "CUDA") and _has_kernel(BWD_NAME, "CUDA")


def _ref_forward_impl(features, parts, assign_weight, assign_bias, centers, normalize=True):
    # the op called directly (not through person_vlad) validates as the C++
    # kernels do: the reference alone would broadcast a (1, C) centers
    _validate(features, parts, assign_weight, assign_bias, centers, normalize, "reference")
    with torch.no_grad():
        return reference.person_vlad_ref(
            features, parts, assign_weight, assign_bias, centers, normalize
        ).contiguous()


def _ref_backward_impl(grad_output, features, parts, assign_weight, assign_bias, centers, normalize):
    _validate(features, parts, assign_weight, assign_bias, centers, normalize, "reference")
    _check_grad_output("person_vlad_backward", grad_output, features, assign_weight, normalize)
    return tuple(
        g.contiguous()
        for g in reference.person_vlad_backward_ref(
            grad_output, features, parts, assign_weight, assign_bias, centers, normalize
        )
    )


for _key, _native in (("CPU", _NATIVE_CPU), ("CUDA", _NATIVE_CUDA)):
    if not _native:
        torch.library.impl(OP_NAME, _key)(_ref_forward_impl)
        torch.library.impl(BWD_NAME, _key)(_ref_backward_impl)


def _out_shape(features, assign_weight, normalize):
    N, C = features.shape[0], features.shape[1]
    K = assign_weight.shape[0]
    return (N, K * C) if normalize else (N, K, C)


def _check_same_device(op, features, **others):
    """ValueError unless every tensor in ``others`` (None skipped) is on the
    features' device; ``op`` (may be empty) prefixes the message.

    :func:`_validate` uses it, and so do the fake/meta kernels: they are the
    only ones that run when a tensor is on the meta device (the dispatcher
    picks the Meta key), so they check what the backends' kernels would.
    Otherwise a direct call with CPU features and one meta parameter returned
    an uninitialised CPU tensor."""
    dev = features.device
    prefix = f"{op}: " if op else ""
    for name, t in others.items():
        if t is not None and t.device != dev:
            raise ValueError(f"{prefix}{name}: expected device {dev} (features' device), got {t.device}")


def _check_grad_output(op, grad_output, features, assign_weight, normalize):
    """ValueError unless ``grad_output`` is a floating tensor of the op's
    output shape on the features' device (as the C++ backward checks)."""
    gs = _check_tensor(f"{op}: grad_output", grad_output)
    want = tuple(_out_shape(features, assign_weight, normalize))
    if gs != want:
        raise ValueError(f"{op}: grad_output: expected shape {_fmt_shape(want)}, got {_fmt_shape(gs)}")
    _check_same_device(op, features, grad_output=grad_output)


@torch.library.register_fake(OP_NAME)
def _person_vlad_fake(features, parts, assign_weight, assign_bias, centers, normalize=True):
    # the only kernel that runs on meta tensors (and while tracing): it checks
    # what the device kernels would, shapes included
    _validate(features, parts, assign_weight, assign_bias, centers, normalize, "reference")
    return features.new_empty(_out_shape(features, assign_weight, normalize))


@torch.library.register_fake(BWD_NAME)
def _person_vlad_backward_fake(grad_output, features, parts, assign_weight, assign_bias, centers, normalize):
    _validate(features, parts, assign_weight, assign_bias, centers, normalize, "reference")
    _check_grad_output("person_vlad_backward", grad_output, features, assign_weight, normalize)
    dparts = features.new_empty(0) if parts is None else torch.empty_like(parts)
    return (
        torch.empty_like(features),
        dparts,
        torch.empty_like(assign_weight),
        torch.empty_like(assign_bias),
        torch.empty_like(centers),
    )


# The autograd formula: save the five inputs; backward calls the backward op.
def _setup_context(ctx, inputs, output):
    features, parts, W, z, c, normalize = inputs
    ctx.normalize = normalize
    ctx.has_parts = parts is not None
    ctx.save_for_backward(features, parts if parts is not None else features.new_empty(0), W, z, c)


def _backward(ctx, grad):
    features, parts, W, z, c = ctx.saved_tensors
    grads = torch.ops.personvlad.person_vlad_backward(
        grad.contiguous(), features, parts if ctx.has_parts else None, W, z, c, ctx.normalize
    )
    dF, dM, dW, dz, dc = grads
    return dF, (dM if ctx.has_parts else None), dW, dz, dc, None


# The extension registers the same formula in C++ (csrc/autograd.cpp: libtorch
# users can train through the op, and Python callers skip this wrapper); this
# Python one serves when the extension is absent.
_NATIVE_AUTOGRAD = _has_kernel(OP_NAME, "Autograd")
if not _NATIVE_AUTOGRAD:
    torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)


# FLOP formulas, so that torch.utils.flop_counter.FlopCounterMode (and tools on
# it) count the op like the matmuls it replaces: 4·N·K·C·P for the forward's
# two products (W F, A' Fᵀ), 8·N·K·C·P for the backward's four (dA', dF twice,
# dW), as personvlad.roofline.op_cost.  Recomputation inside a kernel is not
# counted.  Arguments arrive as shapes.
def _op_products(features_shape, assign_weight_shape) -> int:
    N, C = features_shape[0], features_shape[1]
    return N * int(assign_weight_shape[0]) * C * math.prod(features_shape[2:])


def _flops_forward(features, parts, assign_weight, *args, out_shape=None, **kwargs) -> int:
    return 4 * _op_products(features, assign_weight)


def _flops_backward(grad_output, features, parts, assign_weight, *args, out_shape=None, **kwargs) -> int:
    return 8 * _op_products(features, assign_weight)


def register_flop_formulas(forward_op, backward_op) -> None:
    """Register :func:`_flops_forward` / :func:`_flops_backward` for an op pair
    whose arguments start like ``person_vlad`` / ``person_vlad_backward``
    (the Triton ops call this too).  A no-op where torch lacks the API."""
    try:
        from torch.utils.flop_counter import flop_registry, register_flop_formula
    except ImportError:  # pragma: no cover - very old torch
        return
    for op, f in ((forward_op, _flops_forward), (backward_op, _flops_backward)):
        if op not in flop_registry:
            register_flop_formula(op)(f)


register_flop_formulas(torch.ops.personvlad.person_vlad, torch.ops.personvlad.person_vlad_backward)


# --------------------------------------------------------------------------
# Triton backend (lazy: importing triton is slow and may be absent)
# --------------------------------------------------------------------------
_TRITON = {"loaded": False, "module": None, "error": None}


def _triton_module():
    """Return ``personvlad.kernels.person_vlad`` or None if Triton is unusable
    (imported once; a plain cache so torch.compile traces through it)."""
    if not _TRITON["loaded"]:
        _TRITON["loaded"] = True
        try:
            from .kernels import person_vlad as mod  # type: ignore
            _TRITON["module"] = mod
        except Exception as e:  # ImportError, or triton failing to initialise
            _TRITON["error"] = e
    return _TRITON["module"]


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_DEVICE_PROPS: Dict[int, "torch._C._CudaDeviceProperties"] = {}


def _device_props(device: torch.device):
    """The CUDA device's properties, looked up once per device (this runs on
    every call of the op)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_PROPS:
        _DEVICE_PROPS[idx] = torch.cuda.get_device_properties(idx)
    return _DEVICE_PROPS[idx]


def _capability(device: torch.device) -> Tuple[int, int]:
    """The device's compute capability (major, minor)."""
    props = _device_props(device)
    return props.major, props.minor


def _triton_usable(device: torch.device) -> Tuple[bool, str]:
    if device.type == "cuda":
        major, _ = _capability(device)
        if major < 7:
            return False, f"Triton needs compute capability >= 7.0, {device} has {major}.x"
    elif not (device.type == "cpu" and _triton_interpret()):
        return False, f"Triton runs on CUDA tensors (or CPU with TRITON_INTERPRET=1), got {device}"
    if _triton_module() is None:
        return False, f"Triton kernels could not be imported: {_TRITON['error']}"
    return True, ""


def _backend_usable(name: str, device: torch.device) -> Tuple[bool, str]:
    if name == "reference":
        return True, ""
    if name == "cpu":
        if device.type != "cpu":
            return False, f"backend 'cpu' takes CPU tensors, got {device}"
        if not _NATIVE_CPU:
            return False, "backend 'cpu' needs the compiled extension personvlad._C (run `make install`)"
        return True, ""
    if name == "cuda":
        if device.type != "cuda":
            return False, f"backend 'cuda' takes CUDA tensors, got {device}"
        if not _NATIVE_CUDA:
            return False, "backend 'cuda' needs personvlad._C built with nvcc (FORCE_CUDA=1 make install)"
        return True, ""
    if name == "triton":
        return _triton_usable(device)
    raise AssertionError(name)


def available_backends(device: Optional[torch.device | str] = None) -> Tuple[str, ...]:
    """Backends this install can run.

    With ``device`` given, the backends usable for tensors on that device;
    without, every backend usable on some device present here (``"cuda"`` and
    ``"triton"`` only when a CUDA device exists, or ``"triton"`` on CPU under
    ``TRITON_INTERPRET=1``).
    """
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            return ()  # no CUDA tensor can exist here
        return tuple(b for b in BACKENDS if _backend_usable(b, dev)[0])
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    found = []
    for b in BACKENDS:
        if any(_backend_usable(b, d)[0] for d in devices):
            found.append(b)
    return tuple(found)


def _auto_backend(features: torch.Tensor, parts: Optional[torch.Tensor], W: torch.Tensor,
                  z: Optional[torch.Tensor] = None, c: Optional[torch.Tensor] = None) -> str:
    dev = features.device
    if dev.type == "cpu":
        return "cpu" if _NATIVE_CPU else "reference"
    if dev.type == "cuda":
        candidates = [b for b in ("cuda", "triton") if _backend_usable(b, dev)[0]]
        if "triton" in candidates and not _triton_module().supports(features, parts, W, z, c)[0]:
            candidates.remove("triton")  # outside the kernels' limits (B<=16, K<=128, C<=1024, dtypes)
        if not candidates:
            return "reference"
        # the table's forward-only choice where no backward can follow (inference)
        backward = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (features, parts, W, z, c))
        return pick_cuda_backend(features, parts, W.shape[0], candidates, backward=backward)
    return "reference"


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------
def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _check_tensor(name: str, t) -> tuple:
    """``t``'s shape, once ``t`` is a floating-point tensor."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point dtype, got {t.dtype}")
    if t.layout != torch.strided:
        raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    return tuple(t.shape)


_BACKEND_NAMES = BACKENDS + ("auto",)


def validate(features, parts, assign_weight, assign_bias, centers, normalize, backend) -> None:
    """Raise ``ValueError`` naming the argument for any malformed input."""
    _validate(features, parts, assign_weight, assign_bias, centers, normalize, backend)


def _validate(features, parts, assign_weight, assign_bias, centers, normalize, backend) -> tuple:
    """:func:`validate`, returning the features' shape.  This runs on every
    eager call of the op, so each tensor's shape and device are read once
    (reading a tensor attribute costs ~0.1 us)."""
    fs = _check_tensor("features", features)
    if len(fs) not in (3, 4, 5):
        raise ValueError(
            "features: expected shape (N, C, *S) with 1, 2 or 3 spatial dims "
            f"(rank 3-5), got rank {len(fs)} shape {_fmt_shape(fs)}"
        )
    N, C = fs[0], fs[1]
    S = fs[2:]
    if C == 0:
        raise ValueError(f"features: expected C >= 1 channels, got shape {_fmt_shape(fs)}")
    if 0 in S:
        raise ValueError(f"features: expected a non-empty spatial grid, got shape {_fmt_shape(fs)}")
    if parts is not None:
        ps = _check_tensor("parts", parts)
        if len(ps) != len(fs):
            raise ValueError(
                f"parts: expected rank {len(fs)} (N, B, *S) matching features, "
                f"got rank {len(ps)} shape {_fmt_shape(ps)}"
            )
        if ps[0] != N:
            raise ValueError(f"parts: expected batch size N={N}, got {ps[0]} (shape {_fmt_shape(ps)})")
        if ps[1] == 0:
            raise ValueError("parts: expected B >= 1 part maps (use parts=None for plain NetVLAD), got B=0")
        if ps[2:] != S:
            raise ValueError(f"parts: expected spatial grid {S} matching features, got {ps[2:]}")
        _check_same_device("", features, parts=parts)
    ws = _check_tensor("assign_weight", assign_weight)
    if len(ws) != 2:
        raise ValueError(f"assign_weight: expected shape (K, C), got shape {_fmt_shape(ws)}")
    K = ws[0]
    if K == 0:
        raise ValueError("assign_weight: expected K >= 1 clusters, got K=0")
    if ws[1] != C:
        raise ValueError(f"assign_weight: expected shape (K, C={C}), got shape {_fmt_shape(ws)}")
    bs = _check_tensor("assign_bias", assign_bias)
    if bs != (K,):
        raise ValueError(f"assign_bias: expected shape (K={K},), got shape {_fmt_shape(bs)}")
    cs = _check_tensor("centers", centers)
    if cs != (K, C):
        raise ValueError(f"centers: expected shape (K={K}, C={C}), got shape {_fmt_shape(cs)}")
    _check_same_device("", features, assign_weight=assign_weight, assign_bias=assign_bias, centers=centers)
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize: expected a bool, got {type(normalize).__name__}")
    if not isinstance(backend, str) or backend not in _BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {_BACKEND_NAMES}, got {backend!r}")
    return fs


# --------------------------------------------------------------------------
# The public op
# --------------------------------------------------------------------------
def _call_native(features, parts, W, z, c, normalize):
    return torch.ops.personvlad.person_vlad(features, parts, W, z, c, normalize)


def _call_triton(features, parts, W, z, c, normalize):
    return _triton_module().person_vlad_triton(features, parts, W, z, c, normalize)


def _call_reference(features, parts, W, z, c, normalize):
    # The kernels compute in their fp32 (fp64) accumulation dtype whatever
    # autocast region surrounds the op; so does the reference backend.
    dev = features.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        with torch.autocast(dev, enabled=False):
            return reference.person_vlad_ref(features, parts, W, z, c, normalize)
    return reference.person_vlad_ref(features, parts, W, z, c, normalize)


_DISPATCH: Dict[str, Callable] = {
    "reference": _call_reference,
    "cpu": _call_native,
    "cuda": _call_native,
    "triton": _call_triton,
}


_PEEK_FUNCTORCH = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``,
    ``jacfwd``, ``jvp``, ``vmap``, ...) is running.

    The compiled backends' autograd cannot run under one: the C++ autograd
    of the ``cpu``/``cuda`` op ("cannot use C++ torch::autograd::Function
    with functorch transforms", even where the op's own inputs are not
    transformed) and the Triton op's.  :func:`person_vlad` then runs the
    ``reference`` backend, whose PyTorch ops every transform supports (higher
    derivatives and batching rules included).  Not consulted while
    ``torch.compile`` traces."""
    if _PEEK_FUNCTORCH is None or torch.compiler.is_compiling():
        return False
    return _PEEK_FUNCTORCH() is not None


def resolve_backend(features, parts, assign_weight, backend: str = "auto", *, assign_bias=None,
                    centers=None) -> str:
    """The backend ``person_vlad`` would use for these tensors (pass
    ``assign_bias`` and ``centers`` too: their dtypes matter to Triton):
    ``"reference"`` inside a ``torch.func`` transform (:func:`functorch_active`),
    once an explicitly named backend has been checked."""
    if backend == "auto":
        name = _auto_backend(features, parts, assign_weight, assign_bias, centers)
    else:
        ok, why = _backend_usable(backend, features.device)
        if not ok:
            raise ValueError(f"backend: {backend!r} is not available here: {why}; "
                             f"available: {available_backends(features.device)}")
        if backend == "triton":
            ok, why = _triton_module().supports(features, parts, assign_weight, assign_bias, centers)
            if not ok:
                raise ValueError(f"backend: 'triton' cannot run these inputs: {why}")
        name = backend
    if name != "reference" and functorch_active():
        return "reference"  # the compiled backends' autograd cannot run under torch.func
    return name


def person_vlad(
    features: torch.Tensor,
    parts: Optional[torch.Tensor],
    assign_weight: torch.Tensor,
    assign_bias: torch.Tensor,
    centers: torch.Tensor,
    *,
    normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused part reweighting + VLAD aggregation + intra/L2 normalisation.

    See SPEC §1 and the module docstring.  ``features`` (N, C, *S), ``parts``
    (N, B, *S) or None, ``assign_weight`` (K, C), ``assign_bias`` (K,),
    ``centers`` (K, C).  Returns (N, K*C) with ``normalize=True`` else
    (N, K, C), in ``features.dtype``; differentiable in all five inputs.
    Under a ``torch.func`` transform (``grad``, ``vmap``, ...) every backend
    runs the reference (:func:`functorch_active`).
    """
    fs = _validate(features, parts, assign_weight, assign_bias, centers, normalize, backend)
    name = resolve_backend(features, parts, assign_weight, backend, assign_bias=assign_bias, centers=centers)
    if fs[0] == 0:
        # Empty batch: nothing to compute; keep all five inputs in the graph,
        # so each gets its (empty or zero) gradient, as from the op itself.
        out = features.new_zeros(_out_shape(features, assign_weight, normalize))
        t = features.sum() + assign_weight.sum() + assign_bias.sum() + centers.sum()
        if parts is not None:
            t = t + parts.sum()
        return out + 0 * t.to(out.dtype)
    return _DISPATCH[name](features, parts, assign_weight, assign_bias, centers, normalize)
