"""Shared test matrices for personvlad.

Without a CUDA device the Triton kernels run under the interpreter
(``TRITON_INTERPRET=1`` must be set before Triton kernels are defined, so it is
set here, before anything imports ``personvlad.kernels``).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PERSONVLAD_QUIET_EXT", "0")

import pytest  # noqa: E402

from personvlad.ops import available_backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# Spatial grids: 1-D, 2-D and 3-D.
GRIDS = [(7,), (3, 5), (2, 3, 4)]
# Parts: None (plain NetVLAD), one part, six parts.
PARTS = [None, 1, 6]

# Devices and the backends usable on each, as this install reports them.
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
BACKENDS_BY_DEVICE = {d: available_backends(d) for d in DEVICES}

# dtypes each backend accepts, per device.  The Triton interpreter has no bf16
# and no float64; the C++ CPU backend is float32/float64.
_DTYPES = {
    ("reference", "cpu"): [torch.float32, torch.float64, torch.float16, torch.bfloat16],
    ("cpu", "cpu"): [torch.float32, torch.float64],
    ("triton", "cpu"): [torch.float32, torch.float16],
    ("reference", "cuda"): [torch.float32, torch.float64, torch.float16, torch.bfloat16],
    ("cuda", "cuda"): [torch.float32, torch.float64, torch.float16, torch.bfloat16],
    ("triton", "cuda"): [torch.float32, torch.float16, torch.bfloat16],
}


def backend_device_params(exclude=("reference",)):
    """pytest params (backend, device) for every usable backend here."""
    out = []
    for dev in DEVICES:
        for b in BACKENDS_BY_DEVICE[dev]:
            if b in exclude:
                continue
            marks = [pytest.mark.cuda] if dev == "cuda" else []
            out.append(pytest.param(b, dev, id=f"{b}-{dev}", marks=marks))
    return out


def backend_device_dtype_params(exclude=("reference",)):
    out = []
    for p in backend_device_params(exclude):
        b, dev = p.values
        for dt in _DTYPES[(b, dev)]:
            out.append(pytest.param(b, dev, dt, id=f"{b}-{dev}-{str(dt).replace('torch.', '')}", marks=p.marks))
    return out


def dtypes_for(backend, device):
    return list(_DTYPES[(backend, device)])


def tolerance(dtype):
    """(atol, rtol) for comparing a backend's output with the float64 oracle.

    About 2x what the reference itself shows against float64 in that dtype
    (see tests/test_ops.py::test_reference_error_budget).
    """
    return {
        torch.float64: (1e-10, 1e-9),
        torch.float32: (2e-5, 2e-4),
        torch.float16: (4e-3, 2e-2),
        torch.bfloat16: (3e-2, 1e-1),
    }[dtype]


def make_inputs(N=2, C=8, S=(3, 5), B=3, K=5, dtype=torch.float32, device="cpu",
                param_dtype=None, alpha=None, seed=0, noncontig=False, requires_grad=False):
    """Random op inputs.  ``B=None`` gives parts=None.  ``alpha`` couples
    W = 2*alpha*c, z = -alpha*||c||^2 (the paper's initialisation).
    ``noncontig`` returns non-contiguous views holding the same values."""
    g = torch.Generator().manual_seed(seed)
    pdt = param_dtype or (dtype if dtype in (torch.float32, torch.float64) else torch.float32)
    F = torch.randn(N, C, *S, generator=g, dtype=torch.float64)
    M = None if B is None else torch.rand(N, B, *S, generator=g, dtype=torch.float64)
    c = torch.randn(K, C, generator=g, dtype=torch.float64) * 0.5
    if alpha is None:
        W = torch.randn(K, C, generator=g, dtype=torch.float64) / C ** 0.5
        z = torch.randn(K, generator=g, dtype=torch.float64) * 0.1
    else:
        c = c / C ** 0.5
        W = 2 * alpha * c
        z = -alpha * (c * c).sum(1)
    F = F.to(dtype)
    M = None if M is None else M.to(dtype)
    W, z, c = W.to(pdt), z.to(pdt), c.to(pdt)
    ts = [F, M, W, z, c]
    ts = [None if t is None else t.to(device) for t in ts]
    if noncontig:
        ts = [None if t is None else _noncontig(t) for t in ts]
    if requires_grad:
        ts = [None if t is None else t.detach().requires_grad_(True) for t in ts]
    return ts


def _noncontig(t):
    """A non-contiguous view with the same values: transpose-copy-transpose,
    or, where that is still contiguous (1-D, or size-1 dims such as C=1 or
    K=1), every other element of a buffer twice as long in the innermost dim
    of size > 1."""
    v = t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() > 1 else t
    if v.is_contiguous() and t.numel() > 1:
        d = max(i for i in range(t.dim()) if t.shape[i] > 1)
        shape = list(t.shape)
        shape[d] *= 2
        big = torch.empty(shape, dtype=t.dtype, device=t.device)
        v = big[(slice(None),) * d + (slice(None, None, 2),)]
        v.copy_(t)
    assert torch.equal(v, t)
    if t.numel() > 1:
        assert not v.is_contiguous()
    return v


def pytest_collection_modifyitems(config, items):
    # The CUDA device code run on the CPU emulation or compiled by ptxas: it
    # depends on the host and CUDA compilers, not on torch's version, so
    # `make compat-test` (the suite on the oldest torch) leaves it out.
    for item in items:
        if "emulated_kernels" in getattr(item, "fixturenames", ()) or \
                item.name.startswith("test_fused_forward_kernel_keeps_registers_off_the_stack"):
            item.add_marker(pytest.mark.emulation)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
