"""Triton backend of the fused op (kernels/person_vlad.py).

Without a GPU these run the kernels under the Triton interpreter
(``TRITON_INTERPRET=1``, set by conftest.py) on CPU tensors, so shapes are tiny
and the dtypes are float32/float16 (the interpreter has no bfloat16).  The
``cuda``-marked tests exercise the real kernels, bf16 included, at the paper
shape and a large shape.
"""
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import HAS_CUDA, make_inputs, tolerance
from personvlad import ops, reference

pytest.importorskip("triton")
if "triton" not in ops.available_backends():
    pytest.skip("Triton backend not usable here", allow_module_level=True)

from personvlad.kernels import person_vlad as tk  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
NAMES = ("features", "parts", "assign_weight", "assign_bias", "centers")


def _f64(ts):
    return [None if t is None else t.detach().double() for t in ts]


def _oracle(ins, normalize):
    return reference.person_vlad_ref(*_f64(ins), normalize=normalize)


def _grads(fn, ins, normalize, grad_out, cast=None):
    """Gradients of sum(fn(ins) * grad_out) w.r.t. every non-None input."""
    leaves = [None if t is None else (t.detach() if cast is None else t.detach().to(cast)).requires_grad_(True)
              for t in ins]
    out = fn(*leaves, normalize=normalize)
    req = [t for t in leaves if t is not None]
    gs = torch.autograd.grad(out, req, grad_out.to(out.dtype))
    it = iter(gs)
    return [None if t is None else next(it) for t in leaves]


def _triton(*ins, normalize=True):
    return ops.person_vlad(*ins, normalize=normalize, backend="triton")


def _ref(*ins, normalize=True):
    return reference.person_vlad_ref(*ins, normalize=normalize)


# ---------------------------------------------------------------------------
# forward vs the float64 oracle
# ---------------------------------------------------------------------------
FWD_CASES = [
    # grid, B, normalize, dtype, alpha
    pytest.param((7,), None, True, torch.float32, None, id="1d-noparts-norm-f32"),
    pytest.param((3, 5), 3, True, torch.float32, None, id="2d-B3-norm-f32"),
    pytest.param((2, 3, 4), 2, False, torch.float32, None, id="3d-B2-raw-f32"),
    pytest.param((20,), 3, True, torch.float16, None, id="1d-B3-norm-f16"),
    pytest.param((4, 5), None, False, torch.float16, None, id="2d-noparts-raw-f16"),
    pytest.param((2, 2, 5), 2, True, torch.float32, 1000.0, id="3d-B2-norm-f32-alpha1000"),
]


@pytest.fixture(params=["single", "split", "stream", "tiled"])
def fwd_path(request, monkeypatch):
    """The forward paths: one program per sample (the default for P <= 128),
    the same spread over C slices (forced; one slice at C = 12 under the
    interpreter, see test_split_forward_over_several_slices), the streamed
    one-launch forward (forced; C = 12 is one slice of 16, see
    test_stream_forward_over_several_slices) and the three tiled kernels
    (forced)."""
    monkeypatch.setenv("PERSONVLAD_TRITON_FWD", request.param)
    return request.param


@pytest.mark.parametrize("grid,B,normalize,dtype,alpha", FWD_CASES)
def test_forward_matches_float64_oracle(grid, B, normalize, dtype, alpha, fwd_path):
    assert tk.forward_path(torch.Size(grid).numel(), 5, tk.dot_precision(torch.device(DEV))) == fwd_path
    ins = make_inputs(N=2, C=12, S=grid, B=B, K=5, dtype=dtype, alpha=alpha, device=DEV)
    out = _triton(*ins, normalize=normalize)
    K, C = 5, 12
    assert out.shape == ((2, K * C) if normalize else (2, K, C))
    assert out.dtype == dtype
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(out.double(), _oracle(ins, normalize), atol=atol, rtol=rtol)


def test_forward_path_choice(monkeypatch):
    monkeypatch.delenv("PERSONVLAD_TRITON_FWD", raising=False)
    assert tk.forward_path(tk.SINGLE_MAX_P) == "single"
    assert tk.forward_path(tk.SINGLE_MAX_P + 1) == "tiled"
    assert tk.forward_path(60, K=128) == "single"  # BLOCK_K * BLOCK_P = 128 * 64
    assert tk.forward_path(100, K=128) == "tiled"  # 128 * 128 would spill
    assert tk.forward_path(100, K=64, dot_prec="ieee") == "tiled"  # 64 * 128 spills without tensor cores
    assert tk.forward_path(60, K=64, dot_prec="ieee") == "single"
    monkeypatch.setenv("PERSONVLAD_TRITON_FWD", "single")  # honoured only where P fits
    assert tk.forward_path(tk.SINGLE_MAX_P + 1) == "tiled"
    monkeypatch.setenv("PERSONVLAD_TRITON_FWD", "tiled")
    assert tk.forward_path(8) == "tiled"
    monkeypatch.setenv("PERSONVLAD_TRITON_FWD", "split")  # honoured where the single-program tile fits
    assert tk.forward_path(tk.SINGLE_MAX_P) == "split"
    assert tk.forward_path(tk.SINGLE_MAX_P + 1) == "tiled"
    assert tk.forward_path(100, K=64, dot_prec="ieee") == "tiled"
    monkeypatch.setenv("PERSONVLAD_TRITON_FWD", "stream")  # honoured everywhere
    for P, K, prec in ((8, 64, "tf32x3"), (tk.SINGLE_MAX_P + 1, 64, "tf32x3"), (1568, 128, "ieee")):
        assert tk.forward_path(P, K, prec) == "stream"
    monkeypatch.setenv("PERSONVLAD_TRITON_FWD", "fast")
    with pytest.raises(ValueError, match="PERSONVLAD_TRITON_FWD"):
        tk.forward_path(8)


def _ticketed_forward(monkeypatch, ins, normalize, dtype):
    """The forward op on ``ins`` with the path the environment asks for (one
    whose programs share a sample through a ticket counter): output and
    norms against float64, a second call bit-identical (whichever program
    finishes last), and its counter (normalised only) left at zero."""
    counters = []
    real_zeros = torch.zeros

    def zeros(*a, **kw):  # the op body's ticket counters
        t = real_zeros(*a, **kw)
        if kw.get("dtype") == torch.int32:
            counters.append(t)
        return t

    monkeypatch.setattr(torch, "zeros", zeros)
    out, norms, _ = torch.ops.personvlad.person_vlad_triton(*ins, normalize)
    monkeypatch.setattr(torch, "zeros", real_zeros)
    assert len(counters) == (1 if normalize else 0)
    assert all(int(c.abs().sum()) == 0 for c in counters)
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(out.double(), _oracle(ins, normalize).reshape(out.shape), atol=atol, rtol=rtol)
    again, norms2, _ = torch.ops.personvlad.person_vlad_triton(*ins, normalize)
    assert torch.equal(out, again) and torch.equal(norms, norms2)
    if normalize:
        V = _oracle(ins, False)
        r = V.norm(dim=2)
        g = (V / r[..., None]).flatten(1).norm(dim=1)
        torch.testing.assert_close(norms.double(), torch.cat([r, g[:, None]], 1), atol=1e-4, rtol=1e-3)
    return out, norms


def _assert_alone_same_bits(ins, out, norms, normalize, i):
    """Sample ``i`` run alone gives the same output and norms, to the bit, as
    in the batch ``ins`` (``out``, ``norms``)."""
    alone = [None if t is None else (t[i:i + 1] if t.dim() > 2 else t) for t in ins]
    out1, norms1, _ = torch.ops.personvlad.person_vlad_triton(*alone, normalize)
    assert torch.equal(out1, out[i:i + 1]) and torch.equal(norms1, norms[i:i + 1])


def _assert_grads_match_path(monkeypatch, ins, normalize, out, seed, path, exact):
    """The gradients (of a random gradient like ``out``, from ``seed``)
    through the forward the environment asks for against those through
    forward path ``path`` (the backward is shared, fed from each forward's
    output and norms): the same bits where ``exact``, else within fp32
    rounding."""
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    grads = _grads(_triton, ins, normalize, gout)
    monkeypatch.setenv("PERSONVLAD_TRITON_FWD", path)
    for a, b in zip(grads, _grads(_triton, ins, normalize, gout)):
        if a is not None:
            if exact:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("B,normalize,dtype", [
    (3, True, torch.float32), (None, True, torch.float16), (2, False, torch.float32), (None, False, torch.float16)],
    ids=["B3-norm-f32", "noparts-norm-f16", "B2-raw-f32", "noparts-raw-f16"])
def test_split_forward_over_several_slices(monkeypatch, B, normalize, dtype):
    """C = 40 over slices of SPLIT_C channels, the last one ragged (32 + 8
    under the interpreter, 16 x 2 + 8 on an H100): the output and the norms
    match float64, a second call is bit-identical (the last program sums the
    chunks' norms in chunk order, whichever program finishes last), the
    ticket counter is left at zero, and output, norms and gradients are the
    same bits as the one-program forward's and as a sample's alone."""
    monkeypatch.setenv("PERSONVLAD_TRITON_FWD", "split")
    N, C, K, S = 3, 40, 5, (3, 4)
    split_c = tk.split_channels(N, C, tk._sm_count(torch.device(DEV)))
    assert C // split_c >= 1 and C % split_c != 0  # two or more slices, the last one ragged
    ins = make_inputs(N=N, C=C, S=S, B=B, K=K, dtype=dtype, device=DEV, seed=7)
    out, norms = _ticketed_forward(monkeypatch, ins, normalize, dtype)
    # the same bits as the one-program forward (same BLOCK_C under the
    # interpreter): each chunk's row sums are added in chunk order, as there;
    # and so the same bits for a sample alone (3 slices of 16 channels here)
    # as in the batch of 3 (2 slices of 32)
    assert tk.split_channels(1, C, tk._sm_count(torch.device(DEV))) != split_c
    _assert_alone_same_bits(ins, out, norms, normalize, 0)
    monkeypatch.setenv("PERSONVLAD_TRITON_FWD", "single")
    single, snorms, _ = torch.ops.personvlad.person_vlad_triton(*ins, normalize)
    assert torch.equal(single, out) and torch.equal(snorms, norms)
    if dtype == torch.float32:  # "single" set: its gradients against the split forward's
        _assert_grads_match_path(monkeypatch, ins, normalize, out, 1, "split", exact=True)


@pytest.mark.parametrize("B,normalize,dtype", [
    (3, True, torch.float32), (None, True, torch.float16), (2, False, torch.float32), (None, False, torch.float16)],
    ids=["B3-norm-f32", "noparts-norm-f16", "B2-raw-f32", "noparts-raw-f16"])
def test_stream_forward_over_several_slices(monkeypatch, B, normalize, dtype):
    """The streamed forward at C = 40 (three slices of 16 channels under the
    interpreter, the last one ragged) and P = 21 (two tiles of 16, the last
    one ragged): output and norms match float64, a second call is
    bit-identical whichever program finishes last, the ticket counter is
    left at zero, a sample alone gives the same bits as in the batch, and
    the gradients (the shared backward, from this forward's output and
    norms) match the tiled forward's."""
    monkeypatch.setenv("PERSONVLAD_TRITON_FWD", "stream")
    N, C, K, S = 3, 40, 5, (3, 7)
    assert tk.forward_path(21, K) == "stream"
    if tk.INTERPRET:  # 16-channel slices there (on a GPU 64: one slice; test_cuda_stream_forward has several)
        assert tk.stream_channels(K, C) == 16
    ins = make_inputs(N=N, C=C, S=S, B=B, K=K, dtype=dtype, device=DEV, seed=11)
    out, norms = _ticketed_forward(monkeypatch, ins, normalize, dtype)
    _assert_alone_same_bits(ins, out, norms, normalize, 1)
    if dtype == torch.float32:
        _assert_grads_match_path(monkeypatch, ins, normalize, out, 2, "tiled", exact=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("path", ["stream", "tiled"])
def test_forward_extra_memory(monkeypatch, dtype, path):
    """What the forward allocates besides its output and norms (issue 4: at
    most 2x the output).  The streamed forward: nothing of size K x P, no
    partial sums; in float32 no V beside the output (V is written into it
    and rescaled in place), in half precision the low halves of the float32
    V (an int16 buffer, 1x the output; the high halves live in the output),
    and a ticket counter per sample.  The tiled
    forward keeps its (N, K, P) A' and an fp32 V: over the bound at this P,
    so the bound fails where it should."""
    monkeypatch.setenv("PERSONVLAD_TRITON_FWD", path)
    N, C, K, S, B = 2, 24, 5, (5, 9), 2
    P = 45
    ins = make_inputs(N=N, C=C, S=S, B=B, K=K, dtype=dtype, device=DEV, seed=3)
    sizes = []
    real_empty, real_zeros = torch.empty, torch.zeros

    def record(real):
        def alloc(*a, **kw):
            t = real(*a, **kw)
            sizes.append((tuple(t.shape), t.dtype, t.numel() * t.element_size()))
            return t
        return alloc

    monkeypatch.setattr(torch, "empty", record(real_empty))
    monkeypatch.setattr(torch, "zeros", record(real_zeros))
    with torch.no_grad():
        out = ops.person_vlad(*ins, backend="triton")
    monkeypatch.setattr(torch, "empty", real_empty)
    monkeypatch.setattr(torch, "zeros", real_zeros)
    torch.testing.assert_close(out.double(), _oracle(ins, True), atol=tolerance(dtype)[0], rtol=tolerance(dtype)[1])
    out_bytes = out.numel() * out.element_size()
    ours = [x for x in sizes if x[0] not in ((N, K * C), (N, K + 1))]  # the output and the norms
    extra = sum(x[2] for x in ours)
    kp = [x for x in sizes if x[0] == (N, K, P)]
    if path == "stream":
        assert kp == [], sizes
        assert extra <= out_bytes + 4 * N, (extra, out_bytes, sizes)  # and a ticket counter a sample
        v = [x for x in ours if x[0] == (N, K, C)]
        assert [x[1] for x in v] == ([] if dtype == torch.float32 else [torch.int16]), sizes
    else:
        assert kp and extra > 2 * out_bytes, (extra, out_bytes, sizes)


def test_split_channels_fill_one_wave():
    """The split forward's C slices: as many per sample as one wave of SMs
    holds (one program an SM), powers of two of at least 16 channels."""
    assert tk.split_channels(64, 256, 132) == 128  # the paper's batch on an H100/H200: 2 slices
    assert tk.split_channels(32, 256, 132) == 64
    assert tk.split_channels(256, 256, 132) == 256  # more samples than SMs: one slice
    assert tk.split_channels(1, 1024, 132) == 16
    assert tk.split_channels(2, 40, 8) == 16  # 4 slices wanted, 10 channels each: 16
    assert tk.split_channels(64, 40, 132) == 32
    assert tk.split_channels(0, 256, 132) == 16
    assert tk.split_channels(8, 256, 132, 32) == 32  # the sm_90 list's BLOCK_C = 32 must divide it
    assert tk.split_channels(64, 16, 132, 32) == 32


def test_forward_large_grid_takes_tiled_path(monkeypatch):
    """P = 147 > SINGLE_MAX_P: the default path is the tiled one, and it is
    exact against float64 (both normalisations)."""
    monkeypatch.delenv("PERSONVLAD_TRITON_FWD", raising=False)
    ins = make_inputs(N=2, C=6, S=(3, 7, 7), B=2, K=3, device=DEV, seed=4)
    assert tk.forward_path(147) == "tiled"
    atol, rtol = tolerance(torch.float32)
    for normalize in (True, False):
        torch.testing.assert_close(_triton(*ins, normalize=normalize).double(), _oracle(ins, normalize),
                                   atol=atol, rtol=rtol)


def test_forward_op_returns_norms(fwd_path):
    """The raw op returns (out, norms): row norms of V then the global norm."""
    ins = make_inputs(N=2, C=8, S=(3, 4), B=2, K=4, device=DEV)
    out, norms, out_f32 = torch.ops.personvlad.person_vlad_triton(*ins, True)
    assert out_f32.shape == (2, 0) and out_f32.dtype == torch.float32  # float32 features: not kept
    V = _oracle(ins, False)
    r = V.norm(dim=2)
    g = (V / r[..., None]).flatten(1).norm(dim=1)
    assert norms.shape == (2, 5) and norms.dtype == torch.float32
    torch.testing.assert_close(norms.double(), torch.cat([r, g[:, None]], 1), atol=1e-5, rtol=1e-5)
    raw, rnorms, _ = torch.ops.personvlad.person_vlad_triton(*ins, False)
    assert rnorms.shape == (2, 0)
    torch.testing.assert_close(raw.double(), V, atol=2e-5, rtol=2e-4)


def test_noncontiguous_inputs_give_identical_results():
    ins = make_inputs(N=2, C=8, S=(3, 5), B=2, K=4, device=DEV, seed=3)
    nc = make_inputs(N=2, C=8, S=(3, 5), B=2, K=4, device=DEV, seed=3, noncontig=True)
    assert not nc[0].is_contiguous() and not nc[1].is_contiguous()
    go = torch.randn(2, 4 * 8, generator=torch.Generator().manual_seed(1)).to(DEV)
    a = _triton(*ins)
    b = _triton(*nc)
    assert torch.equal(a, b)
    ga = _grads(_triton, ins, True, go)
    gb = _grads(_triton, nc, True, go)
    for x, y, t in zip(ga, gb, nc):
        assert x.shape == t.shape
        assert torch.equal(x, y)


def test_empty_batch():
    for normalize in (True, False):
        ins = make_inputs(N=0, C=6, S=(3, 4), B=2, K=3, device=DEV, requires_grad=True)
        out = tk.person_vlad_triton(*ins, normalize)
        assert out.shape == ((0, 18) if normalize else (0, 3, 6))
        gs = torch.autograd.grad(out.sum(), ins, allow_unused=True)
        for g, t in zip(gs, ins):
            assert g is not None and g.shape == t.shape and g.dtype == t.dtype
            assert not g.any()


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------
GRAD_CASES = [
    pytest.param((7,), None, True, None, id="1d-noparts-norm"),
    pytest.param((3, 5), 3, True, None, id="2d-B3-norm"),
    pytest.param((2, 3, 4), 2, False, None, id="3d-B2-raw"),
    pytest.param((20,), 3, True, 10.0, id="1d-B3-norm-alpha10"),
]


def _assert_grads_within_2x_reference(ins, normalize, go, floor):
    """The Triton op's gradients against the float64 oracle: each in its
    input's dtype and shape, and within 2x the reference's own error in the
    inputs' dtypes plus ``floor`` times the gradient's scale."""
    g_tri = _grads(_triton, ins, normalize, go)
    g_64 = _grads(_ref, ins, normalize, go, cast=torch.float64)
    g_same = _grads(_ref, ins, normalize, go)
    for name, t, gt, g64, gs in zip(NAMES, ins, g_tri, g_64, g_same):
        if t is None:
            continue
        assert gt.dtype == t.dtype and gt.shape == t.shape, name
        scale = g64.abs().max().item()
        ref_err = (gs.double() - g64).abs().max().item()
        err = (gt.double() - g64).abs().max().item()
        assert err <= 2 * ref_err + floor * scale, f"{name}: err {err:.3e} vs the reference's own {ref_err:.3e}"


@pytest.mark.parametrize("grid,B,normalize,alpha", GRAD_CASES)
def test_gradients_float32(grid, B, normalize, alpha, fwd_path):
    """All five gradients within ~2x of the reference's own float32 error
    against the float64 oracle (plus a floor of 1e-6 of the gradient scale)."""
    ins = make_inputs(N=2, C=12, S=grid, B=B, K=5, alpha=alpha, device=DEV, seed=7)
    shape = (2, 60) if normalize else (2, 5, 12)
    go = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEV)
    _assert_grads_within_2x_reference(ins, normalize, go, floor=1e-6)


def test_gradients_half_features_float32_params():
    """fp16 features/parts with fp32 parameters (autocast layout): each
    gradient comes back in its input's dtype and is as accurate as the
    reference's own fp16 path."""
    ins = make_inputs(N=2, C=12, S=(3, 5), B=2, K=5, dtype=torch.float16, device=DEV, seed=11)
    assert ins[2].dtype == torch.float32
    go = torch.randn(2, 60, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEV)
    _assert_grads_within_2x_reference(ins, True, go, floor=1e-3)


def test_half_forward_keeps_float32_output_for_backward():
    """Half features with keep_f32: the op's third output is the normalised
    descriptor before rounding (float32), and ``out`` is exactly its rounding;
    without keep_f32 (the default), or unnormalised, it is empty."""
    ins = make_inputs(N=2, C=8, S=(3, 4), B=2, K=4, dtype=torch.float16, device=DEV, seed=2)
    out, norms, out_f32 = torch.ops.personvlad.person_vlad_triton(*ins, True, True)
    assert out.dtype == torch.float16 and out_f32.dtype == torch.float32 and out_f32.shape == out.shape
    assert torch.equal(out, out_f32.to(torch.float16))
    torch.testing.assert_close(out_f32.double(), _oracle(ins, True), atol=1e-5, rtol=1e-4)
    out2, _, none = torch.ops.personvlad.person_vlad_triton(*ins, True)
    assert torch.equal(out2, out) and none.shape == (2, 0) and none.dtype == torch.float32
    raw, _, none = torch.ops.personvlad.person_vlad_triton(*ins, False, True)
    assert raw.dtype == torch.float16 and none.shape == (2, 0)


class _RecordOpCalls(TorchDispatchMode):
    """keep_f32 and the third output's shape of each person_vlad_triton call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.personvlad.person_vlad_triton:
            keep = args[6] if len(args) > 6 else (kwargs or {}).get("keep_f32", False)
            self.calls.append((keep, tuple(out[2].shape)))
        return out


def test_float32_output_kept_only_when_a_backward_can_follow():
    """The layer's path asks for the float32 output only with grad mode on and
    an input that requires grad: inference keeps one output buffer."""
    ins = make_inputs(N=2, C=8, S=(3, 4), B=2, K=4, dtype=torch.float16, device=DEV, seed=3)
    cases = [(False, True, False), (True, False, False), (True, True, True)]  # grad mode, requires_grad, kept
    for grad_mode, req, kept in cases:
        leaves = [t.detach().requires_grad_(req) for t in ins]
        rec = _RecordOpCalls()
        with torch.set_grad_enabled(grad_mode), rec:
            out = _triton(*leaves)
        assert rec.calls == [(kept, (2, 32) if kept else (2, 0))], (grad_mode, req, rec.calls)
        if kept:
            out.float().sum().backward()
            assert all(t.grad is not None for t in leaves)


# ---------------------------------------------------------------------------
# eager calls without the custom-op machinery, where nothing observes the op
# ---------------------------------------------------------------------------
class _BodyCallers:
    """Who called the op bodies: ``_forward_body`` from ``_forward_impl`` (the
    op), ``person_vlad_triton`` (direct, no autograd) or ``forward``
    (``PersonVLADTriton``); ``_backward_body`` from ``_backward_impl`` (the op) or ``_backward`` (direct)."""

    def __init__(self, monkeypatch):
        import sys

        self.fwd, self.bwd = [], []
        for name, log in (("_forward_body", self.fwd), ("_backward_body", self.bwd)):
            real = getattr(tk, name)

            def wrapped(*a, _real=real, _log=log):
                _log.append(sys._getframe(1).f_code.co_name)
                return _real(*a)

            monkeypatch.setattr(tk, name, wrapped)

    def clear(self):
        self.fwd.clear()
        self.bwd.clear()


def test_eager_calls_run_the_op_bodies_directly(monkeypatch):
    """A plain eager call runs the op bodies without triton_op/custom_op and
    the autograd wrapper (~30 us of host time a call), with the same values
    and gradients, bit for bit, as through the op (PERSONVLAD_TRITON_DIRECT=0):
    float32 and float16 features (whose forward keeps a float32 output for the
    backward), with and without parts, normalised or not, with only some
    inputs requiring grad; differentiating its gradients fails as through
    the op."""
    rec = _BodyCallers(monkeypatch)
    cases = [(torch.float32, 2, True, 5), (torch.float16, 2, True, 5), (torch.float32, None, True, 2),
             (torch.float16, 3, False, 1), (torch.float32, 2, False, 3)]  # dtype, B, normalize, inputs needing grad
    for dtype, B, normalize, n_req in cases:
        ins = make_inputs(N=2, C=8, S=(3, 5), B=B, K=4, dtype=dtype, device=DEV, seed=11)
        shape = (2, 32) if normalize else (2, 4, 8)
        go = torch.randn(shape, generator=torch.Generator().manual_seed(12), dtype=torch.float32).to(DEV, dtype)
        results = {}
        for direct in ("1", "0"):
            monkeypatch.setenv("PERSONVLAD_TRITON_DIRECT", direct)
            rec.clear()
            with torch.no_grad():
                y = _triton(*ins, normalize=normalize)
            leaves = [None if t is None else t.detach().requires_grad_(i < n_req) for i, t in enumerate(ins)]
            out = _triton(*leaves, normalize=normalize)
            req = [t for t in leaves if t is not None and t.requires_grad]
            grads = torch.autograd.grad(out, req, go)
            if direct == "1":
                assert rec.fwd == ["person_vlad_triton", "forward"] and rec.bwd == ["_backward"], (rec.fwd, rec.bwd)
                assert type(out.grad_fn).__name__ == "PersonVLADTritonBackward"
            else:
                assert rec.fwd == ["_forward_impl", "_forward_impl"] and rec.bwd == ["_backward_impl"], \
                    (rec.fwd, rec.bwd)
            results[direct] = [y, out.detach(), *grads]
        case = (dtype, B, normalize, n_req)
        assert len(results["1"]) == len(results["0"]) == 2 + n_req - (B is None and n_req > 1), case
        for a, b in zip(results["1"], results["0"]):
            assert a.dtype == b.dtype and torch.equal(a, b), case
        atol, rtol = tolerance(dtype)
        torch.testing.assert_close(results["1"][0].double(), _oracle(ins, normalize), atol=atol, rtol=rtol)
    # no double backward: the same error either way
    ins = make_inputs(N=2, C=8, S=(3, 5), B=2, K=4, device=DEV, seed=11)
    go = torch.randn(2, 32, generator=torch.Generator().manual_seed(12)).to(DEV)
    for direct in ("1", "0"):
        monkeypatch.setenv("PERSONVLAD_TRITON_DIRECT", direct)
        leaves = [t.detach().requires_grad_(True) for t in ins]
        (gF,) = torch.autograd.grad(_triton(*leaves), leaves[:1], go, create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula"):
            torch.autograd.grad(gF.sum(), leaves[2])
    monkeypatch.setenv("PERSONVLAD_TRITON_DIRECT", "yes")
    with pytest.raises(ValueError, match="PERSONVLAD_TRITON_DIRECT: expected 0 or 1"):
        _triton(*ins)


def test_direct_path_leaves_unresolved_tensors_to_the_op(monkeypatch):
    """Plain tensors whose memory is not yet what they hold take the op, whose
    dispatcher fallbacks resolve them: a lazily negated view (neg bit; the
    kernels read raw memory: the direct path gave wrong values), a ZeroTensor
    gradient (no memory), functional tensors; and torch.device's function
    mode keeps the direct path (it only fills in factory calls' devices)."""
    rec = _BodyCallers(monkeypatch)
    ins = make_inputs(N=2, C=8, S=(3, 5), B=2, K=4, device=DEV, seed=14)
    with torch.no_grad():
        want = _triton(*ins, normalize=False)
        neg = torch._neg_view(ins[0].neg())
        assert neg.is_neg() and neg.is_contiguous()
        rec.clear()
        got = _triton(neg, *ins[1:], normalize=False)
    assert rec.fwd == ["_forward_impl"] and torch.equal(got, want), rec.fwd
    leaves = [t.detach().requires_grad_(True) for t in ins]
    out = _triton(*leaves)
    rec.clear()
    zero = torch._efficientzerotensor(out.shape, dtype=out.dtype, device=out.device)
    grads = torch.autograd.grad(out, leaves, zero)
    assert rec.bwd == ["_backward_impl"] and all(torch.count_nonzero(g) == 0 for g in grads), rec.bwd
    rec.clear()
    fins = [torch._to_functional_tensor(t) for t in ins]  # C++ functionalization, a plain Tensor type
    torch._enable_functionalization(reapply_views=True)
    try:
        with torch.no_grad():
            fout = _triton(*fins, normalize=False)
    finally:
        torch._disable_functionalization()
    torch._sync(fout)
    assert rec.fwd == ["_forward_impl"] and torch.equal(torch._from_functional_tensor(fout), want), rec.fwd
    rec.clear()
    with torch.device(DEV), torch.no_grad():
        got = _triton(*ins, normalize=False)
    assert rec.fwd == ["person_vlad_triton"] and torch.equal(got, want), rec.fwd


def test_observed_calls_go_through_the_op(monkeypatch):
    """Whatever can see ops sees the op: a TorchDispatchMode (FlopCounterMode
    counts its products), the autograd profiler (its events name the op), a
    TorchFunctionMode, a tensor subclass, torch.compile (its graph holds the
    op), the backward under a mode."""
    from torch.utils.flop_counter import FlopCounterMode

    rec = _BodyCallers(monkeypatch)
    ins = make_inputs(N=2, C=8, S=(3, 5), B=2, K=4, device=DEV, seed=13)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        _triton(*ins)
    assert rec.fwd == ["_forward_impl"] and fc.get_total_flops() > 0, rec.fwd
    rec.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
        _triton(*ins)
    assert rec.fwd == ["_forward_impl"], rec.fwd
    assert any(e.name == "personvlad::person_vlad_triton" for e in prof.events())
    rec.clear()

    class _Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with _Mode(), torch.no_grad():
        _triton(*ins)
    assert rec.fwd == ["_forward_impl"], rec.fwd
    rec.clear()

    class _Sub(torch.Tensor):
        pass

    with torch.no_grad():
        tk.person_vlad_triton(ins[0].as_subclass(_Sub), *ins[1:], True)
    assert rec.fwd == ["_forward_impl"], rec.fwd
    rec.clear()
    # vmap called on the kernels' own entry point (ops.person_vlad runs the
    # reference under torch.func): the op, through vmap's per-sample fallback
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no batching rule ... performance drop"
        got = torch.vmap(lambda f, m: tk.person_vlad_triton(f[None], m[None], *ins[2:], True)[0])(ins[0], ins[1])
        want = tk.person_vlad_triton(*ins, True)
    assert "_forward_impl" in rec.fwd and "person_vlad_triton" in rec.fwd, rec.fwd
    assert torch.equal(got, want)
    rec.clear()
    # forward direct, backward under a dispatch mode: the backward op
    leaves = [t.detach().requires_grad_(True) for t in ins]
    out = _triton(*leaves)
    with FlopCounterMode(display=False) as fc:
        out.sum().backward()
    assert rec.fwd == ["forward"] and rec.bwd == ["_backward_impl"] and fc.get_total_flops() > 0, (rec.fwd, rec.bwd)
    rec.clear()
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(_triton, backend=backend, fullgraph=True)(*ins)
    assert any(n.op == "call_function" and n.target in (torch.ops.personvlad.person_vlad_triton,
                                                        torch.ops.personvlad.person_vlad_triton.default)
               for g in graphs for n in g.graph.nodes), [str(g.graph) for g in graphs]
    torch._dynamo.reset()


def test_gradients_half_match_float32_reference():
    """fp16 everywhere at a grid large enough (P=72, B=4) that the
    ``assign_bias`` gradient, a sum over positions and parts that cancels,
    shows the backward's inputs' rounding: with the half-rounded output
    as ``y`` its error was 18x the reference's (seen on an H200 first)."""
    ins = make_inputs(N=4, C=32, S=(4, 6, 3), B=4, K=16, dtype=torch.float16, device=DEV, seed=8)
    go = torch.randn(4, 16 * 32, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(DEV)
    _assert_grads_within_2x_reference(ins, True, go, floor=1e-3)


def test_mixed_input_dtypes():
    """Each input may have its own dtype; each gradient comes back in it."""
    F, M, W, z, c = make_inputs(N=2, C=8, S=(9,), B=2, K=3, device=DEV, seed=13)
    ins = [F.half(), M, W.half(), z, c.half()]
    out = _triton(*ins)
    assert out.dtype == torch.float16
    atol, rtol = tolerance(torch.float16)
    torch.testing.assert_close(out.double(), _oracle(ins, True), atol=atol, rtol=rtol)
    gs = _grads(_triton, ins, True, torch.randn(2, 24, dtype=torch.float64).to(DEV))
    assert [g.dtype for g in gs] == [t.dtype for t in ins]


# ---------------------------------------------------------------------------
# memory: nothing of size N*B*K*P is allocated
# ---------------------------------------------------------------------------
class _RecordAllocs(TorchDispatchMode):
    """Sizes of the tensors produced by the host code.  ``set_``/``copy_`` are
    skipped: the Triton interpreter uses them to mirror kernel arguments."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.copy_.default,) or func.overloadpacket is torch.ops.aten.set_:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((t.numel(), str(func)))
        return out


def test_no_per_part_intermediate_is_allocated():
    """Forward and backward host code allocate nothing of size N*B*K*P (the
    kernels only write into what the host allocates)."""
    N, C, S, B, K = 2, 4, (10,), 6, 8
    P = 10
    F, M, W, z, c = make_inputs(N=N, C=C, S=S, B=B, K=K, device=DEV)
    # once outside the recording: on a GPU, autotuning's first call allocates
    # Triton's cache-flush buffer (256 MB), which is not the op's
    out, norms = tk._run_forward(F, M, W, z, c, N, C, P, K, True, F.dtype, False)
    tk._run_backward(torch.ones_like(out).reshape(N, K, C), F, M, W, z, c, out.reshape(N, K, C), norms,
                     N, C, P, K, True, False)
    rec = _RecordAllocs()
    with rec:
        out, norms = tk._run_forward(F, M, W, z, c, N, C, P, K, True, F.dtype, False)
        dy = torch.ones_like(out).reshape(N, K, C)
        tk._run_backward(dy, F, M, W, z, c, out.reshape(N, K, C), norms, N, C, P, K, True, False)
    assert rec.sizes
    biggest = max(rec.sizes)
    assert biggest[0] <= N * K * P < N * B * K * P, biggest
    # and the result is still right
    torch.testing.assert_close(out.double(), _oracle([F, M, W, z, c], True), atol=2e-5, rtol=2e-4)


# ---------------------------------------------------------------------------
# support contract
# ---------------------------------------------------------------------------
def test_supports_contract():
    F, M, W, z, c = make_inputs(N=1, C=4, S=(2,), B=2, K=3, device=DEV)
    assert tk.supports(F, M, W, z, c) == (True, "")
    assert tk.supports(F, None, W) == (True, "")
    big_b = torch.zeros(1, tk.MAX_PARTS + 1, 2, device=DEV)
    big_k = torch.zeros(tk.MAX_CLUSTERS + 1, 4, device=DEV)
    big_c = torch.zeros(1, tk.MAX_CHANNELS + 1, 2, device=DEV)
    cases = [
        ((F, big_b, W), "at most 16 parts"),
        ((F, M, big_k), "at most 128 clusters"),
        ((big_c, None, torch.zeros(3, tk.MAX_CHANNELS + 1, device=DEV)), "at most 1024 channels"),
        ((F.double(), M, W), "features is float64"),
        ((F, M, W, z, c.double()), "centers is float64"),
    ]
    if not HAS_CUDA:
        cases.append(((F.bfloat16(), M, W), "features is bfloat16"))
    for args, msg in cases:
        ok, why = tk.supports(*args)
        assert not ok and msg in why, (msg, why)
        with pytest.raises(tk.UnsupportedInput, match=msg):
            tk.check_supported(*args)
        assert issubclass(tk.UnsupportedInput, ValueError)
    with pytest.raises(ValueError, match="at most 128 clusters"):
        tk.person_vlad_triton(F, M, big_k, torch.zeros(tk.MAX_CLUSTERS + 1, device=DEV),
                              torch.zeros(tk.MAX_CLUSTERS + 1, 4, device=DEV), True)


# ---------------------------------------------------------------------------
# torch.library.opcheck and torch.compile
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck_forward(normalize):
    ins = make_inputs(N=2, C=8, S=(3, 5), B=2, K=4, device=DEV, requires_grad=True)
    res = torch.library.opcheck(torch.ops.personvlad.person_vlad_triton, tuple(ins) + (normalize,))
    assert set(res) == {"test_schema", "test_autograd_registration", "test_faketensor",
                        "test_aot_dispatch_dynamic"}
    assert all(v == "SUCCESS" for v in res.values()), res


def test_op_bodies_annotations_match_the_schemas():
    """torch 2.11's triton_op ignores ``schema=`` and infers the schema from the
    op body's annotations; a return annotation left at two Tensors when the
    forward gained its third output crashed the op there (segfault under
    FakeTensorMode) while 2.14, which takes the explicit schema, passed."""
    assert torch.library.infer_schema(tk._forward_impl, mutates_args=()) == tk._FWD_SCHEMA
    assert torch.library.infer_schema(tk._backward_impl, mutates_args=()) == tk._BWD_SCHEMA


def test_opcheck_forward_no_parts():
    F, _, W, z, c = make_inputs(N=2, C=8, S=(6,), B=None, K=4, device=DEV, requires_grad=True)
    res = torch.library.opcheck(torch.ops.personvlad.person_vlad_triton, (F, None, W, z, c, True))
    assert all(v == "SUCCESS" for v in res.values()), res


def test_opcheck_backward():
    ins = make_inputs(N=2, C=8, S=(3, 5), B=2, K=4, device=DEV)
    out, norms, _ = torch.ops.personvlad.person_vlad_triton(*ins, True)
    go = torch.randn_like(out)
    args = (go, *ins, out, norms, True)
    # the backward op has no autograd formula of its own (no double backward)
    res = torch.library.opcheck(torch.ops.personvlad.person_vlad_triton_backward, args,
                                test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    assert all(v == "SUCCESS" for v in res.values()), res


def test_torch_compile_fullgraph():
    """fullgraph=True through the public door: no graph breaks, same values and
    gradients as eager.  Under the interpreter the op is opaque to Inductor
    (see the module docstring of personvlad.kernels.person_vlad); on CUDA
    Inductor sees the Triton kernels themselves."""
    torch._dynamo.reset()
    ins = make_inputs(N=2, C=8, S=(3, 5), B=2, K=4, device=DEV, requires_grad=True)

    def f(F, M, W, z, c):
        return ops.person_vlad(F, M, W, z, c, backend="triton") * 2.0

    cf = torch.compile(f, fullgraph=True, backend="inductor")
    y = cf(*ins)
    y0 = f(*ins)
    torch.testing.assert_close(y, y0)
    go = torch.randn_like(y0)
    g = torch.autograd.grad(y, ins, go)
    g0 = torch.autograd.grad(y0, ins, go)
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b)


_GPU_PATH_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch._library.triton import get_triton_kernels_for_op
from personvlad.kernels import person_vlad as tk

assert not tk.INTERPRET
# 1. registered as triton_op: torch knows the kernels behind both ops (the
#    assignment and main backward kernels twice: K <= 64 and K = 128 lists)
fwd_k = get_triton_kernels_for_op("personvlad::person_vlad_triton")
bwd_k = get_triton_kernels_for_op("personvlad::person_vlad_triton_backward")
assert len(fwd_k) == 8 and tk._fwd_assign_kernel_k128 in fwd_k and tk._fwd_split_kernel in fwd_k, fwd_k
assert tk._fwd_split_kernel_sm90 in fwd_k and tk._fwd_stream_kernel in fwd_k, fwd_k
assert len(bwd_k) == 4 and tk._bwd_main_kernel_k128 in bwd_k, bwd_k

# 2. the op body traces on fake CUDA tensors into visible Triton kernel calls
with FakeTensorMode():
    ins = [torch.empty(s, device="cuda") for s in [(2, 8, 3, 5), (2, 2, 3, 5), (4, 8), (4,), (4, 8)]]
    gm = make_fx(lambda *a: tk._forward_impl(*a, True))(*ins)  # P=15: the single-program path
    hops = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(hops) == 1, gm.code
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    for path, kern in (("split", tk._fwd_split_kernel), ("stream", tk._fwd_stream_kernel)):
        os.environ["PERSONVLAD_TRITON_FWD"] = path  # one launch, as the single-program path
        gm = make_fx(lambda *a: tk._forward_impl(*a, True))(*ins)
        hops = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        assert len(hops) == 1 and kernel_side_table.get_kernel(hops[0].kwargs["kernel_idx"]) is kern, gm.code
    # functionalized (aot_eager, AOTAutograd), the op's output is the kernel's
    # OUT_ptr: no other argument aliases it (one that did, an fp32 V written in
    # place, came back as the output unnormalised)
    for path in ("split", "stream", "single"):
        os.environ["PERSONVLAD_TRITON_FWD"] = path
        gm = make_fx(torch.func.functionalize(lambda *a: tk._forward_impl(*a, True)))(*ins)
        first = [n for n in gm.graph.nodes if n.op == "output"][0].args[0][0]
        assert first.args[1] == "OUT_ptr", (path, gm.code)
    os.environ["PERSONVLAD_TRITON_FWD"] = "tiled"
    gm = make_fx(lambda *a: tk._forward_impl(*a, True))(*ins)
    del os.environ["PERSONVLAD_TRITON_FWD"]
    hops = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(hops) == 3, gm.code
    out, norms, _ = torch.ops.personvlad.person_vlad_triton(*ins, True)
    assert out.shape == (2, 32) and norms.shape == (2, 5)
    g = torch.empty(2, 32, device="cuda")
    gm = make_fx(lambda *a: tk._backward_impl(*a, True))(g, *ins, out, norms)
    assert len([n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]) == 3

# 3. every kernel compiles for real GPU targets in bf16 (the interpreter has no
#    bf16), with each dot precision the host can pick: tf32x3 on sm_80/sm_90,
#    ieee on sm_75 (no TF32 there)
def comp(fn, sig, consts, warps, stages):
    names = fn.arg_names
    for cap, prec in ((80, "tf32x3"), (90, "tf32x3"), (75, "ieee")):
        cs = dict(consts)
        cs.update({k: prec for k in ("DOT_PREC", "LOGIT_PREC") if k in names})
        full = {n: ("constexpr" if n in cs else sig[n]) for n in names}
        src = ASTSource(fn=fn, signature=full, constexprs={(names.index(k),): v for k, v in cs.items()})
        k = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": warps, "num_stages": stages})
        assert len(k.asm["ptx"]) > 0
        if cap >= 80 and ("DOT_PREC" in names or "LOGIT_PREC" in names):
            assert "tf32" in k.asm["ptx"], f"{fn.__name__} sm_{cap}: no TF32 tensor-core instruction"

ints = {n: "i32" for n in ("C", "P", "K", "B", "NSLOT", "P_BUCKET", "N", "NPG", "NCHUNK")}
f, f32 = "*bf16", "*fp32"
comp(tk._fwd_assign_kernel.fn, dict(ints, F_ptr=f, M_ptr=f, W_ptr=f32, Z_ptr=f32, AP_ptr=f32, SPART_ptr=f32),
     dict(HAS_PARTS=True, BLOCK_K=64, BLOCK_P=64, BLOCK_C=32), 4, 3)
comp(tk._gemm_kc_kernel.fn, dict(ints, X_ptr=f32, F_ptr=f, S_ptr=f32, CEN_ptr=f32, OUT_ptr=f),
     dict(SUB_SC=True, BLOCK_K=64, BLOCK_C=64, BLOCK_P=32), 4, 3)
comp(tk._fwd_single_kernel.fn, dict(ints, F_ptr=f, M_ptr=f, W_ptr=f32, Z_ptr=f32, CEN_ptr=f32, OUT_ptr=f, NORM_ptr=f32),
     dict(HAS_PARTS=True, NORMALIZE=True, BLOCK_K=64, BLOCK_P=128, BLOCK_C=32), 8, 2)
comp(tk._fwd_split_kernel.fn, dict(ints, F_ptr=f, M_ptr=f, W_ptr=f32, Z_ptr=f32, CEN_ptr=f32, OUT_ptr=f, V_ptr=f32,
     SS_ptr=f32, CNT_ptr="*i32", NORM_ptr=f32),
     dict(HAS_PARTS=True, NORMALIZE=True, BLOCK_K=64, BLOCK_P=128, FIN_C=64, BLOCK_C=16, SPLIT_C=64), 8, 1)
for v_buf in ("out", "halves", "fp32"):  # V in the float32 output, in halves beside a bf16 one, in fp32
    comp(tk._fwd_stream_kernel.fn, dict(ints, F_ptr=f, M_ptr=f, W_ptr=f32, Z_ptr=f32, CEN_ptr=f32,
         OUT_ptr=f32 if v_buf == "out" else f, V_ptr="*i16" if v_buf == "halves" else f32, CNT_ptr="*i32",
         NORM_ptr=f32, NSLICE="i32"),
         dict(HAS_PARTS=True, NORMALIZE=True, V_IS_OUT=v_buf == "out", V_HALVES=v_buf == "halves", BLOCK_K=64,
              FIN_C=64, STREAM_C=128, BLOCK_P=64, BLOCK_C=32), 8, 2)
comp(tk._fwd_normalize_kernel, dict(ints, V_ptr=f32, OUT_ptr=f, NORM_ptr=f32), dict(BLOCK_K=64, BLOCK_C=64), 4, 1)
comp(tk._bwd_normalize_kernel, dict(ints, DY_ptr=f, Y_ptr=f, NORM_ptr=f32, CEN_ptr=f32, DV_ptr=f32, DS_ptr=f32),
     dict(NORMALIZE=True, BLOCK_K=64, BLOCK_C=64), 4, 1)
comp(tk._bwd_main_kernel.fn, dict(ints, F_ptr=f, M_ptr=f, W_ptr=f32, Z_ptr=f32, DV_ptr=f32, DS_ptr=f32, DF_ptr=f,
     DM_ptr=f, DG_ptr=f32, DZPART_ptr=f32, SPART_ptr=f32), dict(HAS_PARTS=True, BLOCK_K=64, BLOCK_P=32, BLOCK_C=32), 4, 2)
# 4. the host picks tf32x3 when tracing for CUDA without a device, and the
#    environment override is honoured and validated
cuda0 = torch.device("cuda", 0)
assert tk.dot_precision(cuda0) == "tf32x3"
assert tk.dot_precisions(cuda0, torch.float32) == ("ieee", "tf32x3")
assert tk.dot_precisions(cuda0, torch.bfloat16) == ("tf32x3", "tf32x3")
os.environ["PERSONVLAD_TRITON_DOT"] = "ieee"
assert tk.dot_precisions(cuda0, torch.bfloat16) == ("ieee", "ieee")
os.environ["PERSONVLAD_TRITON_DOT"] = "tf32x3"
assert tk.dot_precisions(cuda0, torch.float32) == ("tf32x3", "tf32x3")
os.environ["PERSONVLAD_TRITON_DOT"] = "tf32"
try:
    tk.dot_precision(torch.device("cuda", 0))
    raise AssertionError("plain tf32 accepted")
except ValueError as e:
    assert "PERSONVLAD_TRITON_DOT" in str(e)
del os.environ["PERSONVLAD_TRITON_DOT"]

# 5. eager calls of the ops launch the kernels themselves, not through
#    wrap_triton (torch has it off there, and returns the kernel only after
#    ~8 us of checks per autotuned kernel); with wrapping on (tracing, or a
#    body called outside its op) every launch goes through wrap_triton.
#    Launches recorded, not run (CPU tensors, no GPU here).
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
launched, wrapped, jit_kwargs = [], [], []
def autotuner_run(self, *a, **k):  # as Autotuner.run: settles on a config, which kernels.tuned reads
    launched.append(self)
    self.best_config = self.configs[0]
def jit_run(self, *a, **k):
    launched.append(self)
    jit_kwargs.append(k)
Autotuner.run = autotuner_run
JITFunction.run = jit_run
def K(ks):  # a launch, by kernel: the autotuner, or the JITFunction an eager launch calls past it
    return [k.fn if isinstance(k, Autotuner) else k for k in ks]
tk.check_supported = lambda *a, **k: None
real_wrap = tk.wrap_triton
tk.wrap_triton = lambda k: (wrapped.append(k), k)[1]
x = [torch.randn(s, dtype=torch.float64).float() for s in [(2, 8, 3, 5), (2, 2, 3, 5), (4, 8), (4,), (4, 8)]]
x[0].requires_grad_()
for direct in ("1", "0"):  # the op bodies run directly, and through the op
    os.environ["PERSONVLAD_TRITON_DIRECT"] = direct
    y = tk.person_vlad_triton(*x, True)
    assert K(launched) == K([tk._fwd_single_kernel]) and wrapped == [], (direct, launched, wrapped)
    assert (type(y.grad_fn).__name__ == "PersonVLADTritonBackward") == (direct == "1"), type(y.grad_fn)
    y.backward(torch.ones_like(y))
    assert K(launched[1:]) == K([tk._bwd_normalize_kernel, tk._bwd_main_kernel, tk._gemm_kc_kernel]), launched
    assert wrapped == []
    # kernels.tuned: the first launch of a key goes through the autotuner, the
    # next ones straight to its JITFunction with the config it chose
    if direct == "1":
        assert launched[0] is tk._fwd_single_kernel and launched[2] is tk._bwd_main_kernel, launched
    else:
        assert launched[0] is tk._fwd_single_kernel.fn and launched[2] is tk._bwd_main_kernel.fn, launched
        cfg = tk._fwd_single_kernel.configs[0]
        assert all(jit_kwargs[0][n] == v for n, v in cfg.all_kwargs().items()), jit_kwargs[0]
        assert jit_kwargs[0]["grid"] == (2,) and jit_kwargs[0]["warmup"] is False, jit_kwargs[0]
    launched.clear()
    jit_kwargs.clear()
del os.environ["PERSONVLAD_TRITON_DIRECT"]
os.environ["PERSONVLAD_TRITON_FWD"] = "tiled"
with torch.no_grad():
    tk.person_vlad_triton(*x, True)
    assert K(launched) == K([tk._fwd_assign_kernel, tk._gemm_kc_kernel, tk._fwd_normalize_kernel]), launched
    assert wrapped == []
    launched.clear()
    tk._forward_impl(*x, True)  # outside the op: wrapping is on
del os.environ["PERSONVLAD_TRITON_FWD"]
assert wrapped == [tk._fwd_assign_kernel, tk._gemm_kc_kernel, tk._fwd_normalize_kernel], wrapped
assert launched == wrapped, launched
launched.clear()
wrapped.clear()
for path, kern in (("split", tk._fwd_split_kernel), ("stream", tk._fwd_stream_kernel)):
    os.environ["PERSONVLAD_TRITON_FWD"] = path
    with torch.no_grad():
        tk.person_vlad_triton(*x, True)
    del os.environ["PERSONVLAD_TRITON_FWD"]
    assert K(launched) == K([kern]) and wrapped == [], (path, launched, wrapped)
    launched.clear()
tk.wrap_triton = real_wrap
print("GPU-PATH-OK")
"""


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch (Triton's NVIDIA backend)")
def test_autotune_configs_do_not_spill_registers():
    """Every autotune config of every kernel, compiled ahead of time for sm_90
    (tf32x3) and sm_75 (ieee) in bf16 and fp32 at BLOCK_K=64 and 128 (each
    with its own lists), keeps its registers off the stack (<= 128 bytes of
    spill): a spilling config is several times slower, and autotuning would
    only hide it at the shapes it was tuned on.  Reads the cubins with
    bench/kernel_resources.py."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PERSONVLAD_QUIET_EXT"] = "1"
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "kernel_resources.py")
    r = subprocess.run([sys.executable, script, "--targets", "90", "75", "--dtypes", "bf16", "fp32",
                        "--block-k", "64", "128", "--max-stack", "128"], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert " 0 spilling" in r.stdout


@pytest.mark.skipif(HAS_CUDA, reason="the cuda-marked tests run the real GPU path")
@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch (fake CUDA tensors, ptxas)")
def test_gpu_registration_path_without_gpu():
    """Without the interpreter the ops are torch.library.triton_op s.  In a
    fresh process without TRITON_INTERPRET: both ops know their kernels, the
    op bodies trace on fake CUDA tensors into triton_kernel_wrapper calls, and
    every kernel compiles (bf16) for sm_75/sm_80/sm_90 targets with the dot
    precision the host picks there; eager calls launch the kernels without
    wrap_triton, both the direct ones and those through the ops, a body
    called outside its op through it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PERSONVLAD_QUIET_EXT"] = "1"
    r = subprocess.run([sys.executable, "-c", _GPU_PATH_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "GPU-PATH-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


# ---------------------------------------------------------------------------
# The dot precision on sm_80+ (tf32x3), emulated on CPU
# ---------------------------------------------------------------------------
def _round_tf32(x):
    """Round fp32 to TF32 (10-bit mantissa), to nearest, ties away from zero
    (PTX cvt.rna.tf32.f32, which Triton's tf32x3 split uses)."""
    i = x.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def _emulated_mm(mode, orig):
    """a @ b with fp32 operands rounded as Triton's dot does in ``mode``."""
    def mm(a, b):
        if mode == "ieee":
            return orig(a, b)
        ah, bh = _round_tf32(a), _round_tf32(b)
        if mode == "tf32":
            return orig(ah, bh)
        al, bl = _round_tf32(a - ah), _round_tf32(b - bh)  # tf32x3: drop only lo*lo
        return orig(ah, bl) + orig(al, bh) + orig(ah, bh)
    return mm


def _emulated_matmul(logit_mode, gemm_mode, orig):
    """torch.matmul for the reference: the logit GEMM G = W F (the only one
    with a 2-D left operand) forward in ``logit_mode``; every other product,
    the backward ones of G included, in ``gemm_mode`` -- as the kernels do."""
    def make(fwd, bwd):
        class MM(torch.autograd.Function):
            @staticmethod
            def forward(ctx, a, b):
                ctx.save_for_backward(a, b)
                return fwd(a, b)

            @staticmethod
            def backward(ctx, g):
                a, b = ctx.saved_tensors
                ga, gb = bwd(g, b.transpose(-1, -2)), bwd(a.transpose(-1, -2), g)
                return ga.sum_to_size(a.shape), gb.sum_to_size(b.shape)
        return MM

    gemm = _emulated_mm(gemm_mode, orig)
    logit_mm, other_mm = make(_emulated_mm(logit_mode, orig), gemm), make(gemm, gemm)

    def matmul(a, b):
        if a.dtype != torch.float32 or b.dtype != torch.float32:
            return orig(a, b)
        return (logit_mm if a.dim() == 2 else other_mm).apply(a, b)

    return matmul


def _precision_violations(logit_mode, gemm_mode, dtype):
    """Run the matmul-form reference with its GEMMs (forward and backward)
    rounded as the kernels' dots would be, and list where it breaks the bounds
    the CUDA tests hold the kernels to, at a paper-like shape with alpha=1000
    included: forward, _assert_forward_accurate's criterion; gradients, 2x the
    reference's own error in ``dtype`` vs float64 plus 1e-6 (fp32) or 1e-3
    (half) of the gradient's scale."""
    from unittest import mock

    shape = dict(N=8, C=256, S=(2, 11, 5), B=6, K=64)
    slack = 1e-6 if dtype == torch.float32 else 1e-3
    bad = []
    for alpha in (None, 1000.0):
        ins = make_inputs(alpha=alpha, seed=5, dtype=dtype, **shape)
        go = torch.randn(8, 64 * 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for normalize in (True, False):
            o64 = _oracle(ins, normalize)
            ref_err = (_ref(*ins, normalize=normalize).double() - o64).abs().max().item()
            with mock.patch.object(torch, "matmul", _emulated_matmul(logit_mode, gemm_mode, torch.matmul)):
                out = _ref(*ins, normalize=normalize)
                g_emu = _grads(_ref, ins, True, go) if normalize and alpha is None else None
            atol, rtol = tolerance(dtype)
            atol = atol if normalize else atol * o64.abs().max().item()
            err = (out.double() - o64).abs()
            if not bool((err <= atol + rtol * o64.abs()).all()) and err.max().item() > 2 * ref_err:
                bad.append(f"forward alpha={alpha} normalize={normalize}: {err.max().item():.2e} > 2 x {ref_err:.2e}")
            if g_emu is not None:
                g64 = _grads(_ref, ins, True, go, cast=torch.float64)
                g_own = _grads(_ref, ins, True, go)
                for name, ge, gd, gs in zip(NAMES, g_emu, g64, g_own):
                    bound = 2 * (gs.double() - gd).abs().max().item() + slack * gd.abs().max().item()
                    e = (ge.double() - gd).abs().max().item()
                    if e > bound:
                        bad.append(f"d{name}: {e:.2e} > {bound:.2e}")
    return bad


def test_tf32x3_dot_precision_is_accurate_enough():
    """Why the kernels may use tensor cores on sm_80+ (emulated on CPU): with
    the logit GEMM G = W F in ieee fp32 for fp32 inputs and every other
    product (V = A' F^T and all backward products) as Triton's tf32x3 split,
    the op stays within the CUDA tests' bounds; for half inputs G may be
    tf32x3 too (its error is far below the half output rounding).  G itself
    stays ieee for fp32 because at alpha=1000 (logits ~1e3) a tf32x3 G was
    measured at up to 2.4x the fp32 reference's raw-V error.  Plain TF32
    (never used) breaks the bounds everywhere."""
    assert _precision_violations("ieee", "tf32x3", torch.float32) == []
    assert _precision_violations("tf32x3", "tf32x3", torch.float16) == []
    assert _precision_violations("tf32x3", "tf32x3", torch.bfloat16) == []
    assert len(_precision_violations("tf32", "tf32", torch.float32)) >= 5


# ---------------------------------------------------------------------------
# CUDA: real kernels at realistic shapes
# ---------------------------------------------------------------------------
CUDA_SHAPES = [
    pytest.param(dict(N=64, C=256, S=(2, 11, 5), B=6, K=64), id="paper-64x256x2x11x5-B6-K64"),
    pytest.param(dict(N=32, C=512, S=(8, 14, 14), B=8, K=64), id="large-32x512x8x14x14-B8-K64"),
]


def _assert_forward_accurate(out, ins, normalize):
    """``out`` vs the float64 oracle: within conftest.tolerance(dtype) (atol
    scaled by the magnitude for raw V, which grows with P), or within 2x the
    reference's own error in that dtype.  The second clause matters at
    alpha=1000: logits ~1e3 make even the float32 reference miss the raw-V
    tolerance (measured: 1.2e-3 max error on |V| ~ 30 at the paper shape)."""
    dtype = ins[0].dtype
    o64 = _oracle(ins, normalize)
    atol, rtol = tolerance(dtype)
    if not normalize:
        atol = atol * o64.abs().max().item()
    err = (out.double() - o64).abs()
    if bool((err <= atol + rtol * o64.abs()).all()):
        return
    ref_err = (_ref(*ins, normalize=normalize).double() - o64).abs().max().item()
    assert err.max().item() <= 2 * ref_err, (
        f"max error {err.max().item():.3e} exceeds tolerance ({atol:.1e}, {rtol:.1e}) "
        f"and 2x the reference's own {dtype} error {ref_err:.3e}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("alpha", [None, 1000.0], ids=["randinit", "alpha1000"])
def test_cuda_forward_realistic_shapes(shape, dtype, alpha):
    ins = make_inputs(dtype=dtype, device="cuda", alpha=alpha, seed=5, **shape)
    for normalize in (True, False):
        out = tk.person_vlad_triton(*ins, normalize)
        assert out.dtype == dtype
        _assert_forward_accurate(out, ins, normalize)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid,path", [((3, 7, 5), "tiled"), ((3, 4, 5), "single")], ids=["P105", "P60"])
def test_cuda_forward_at_support_limits(dtype, grid, path):
    """K=128, C=1024, B=16 (the largest accepted), P not a multiple of any
    block: P=105 takes the tiled forward (a 128x128 tile would spill), P=60
    the one-program forward at its largest tile (128x64)."""
    P = torch.Size(grid).numel()
    assert tk.forward_path(P, tk.MAX_CLUSTERS, tk.dot_precision(torch.device("cuda"))) == path
    ins = make_inputs(N=3, C=tk.MAX_CHANNELS, S=grid, B=tk.MAX_PARTS, K=tk.MAX_CLUSTERS,
                      dtype=dtype, device="cuda", seed=12)
    for normalize in (True, False):
        _assert_forward_accurate(tk.person_vlad_triton(*ins, normalize), ins, normalize)


def _assert_accurate_and_repeatable(ins, normalize):
    """The Triton forward of ``ins`` (the path the environment asks for):
    accurate against float64, and the same bits in three more calls (the
    ticketed paths: whichever program finishes last).  Returns it."""
    out = tk.person_vlad_triton(*ins, normalize)
    _assert_forward_accurate(out, ins, normalize)
    for _ in range(3):
        assert torch.equal(tk.person_vlad_triton(*ins, normalize), out)
    return out


def _assert_compiled_call_matches(ins):
    """torch.compile(fullgraph) of the public op on the Triton backend (the
    traced launch of the path the environment asks for) against the eager call."""
    torch._dynamo.reset()
    cf = torch.compile(lambda *a: ops.person_vlad(*a, backend="triton"), fullgraph=True)
    torch.testing.assert_close(cf(*ins), tk.person_vlad_triton(*ins, True))
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_split_forward(monkeypatch, dtype):
    """PERSONVLAD_TRITON_FWD=split on the GPU, where its programs run
    concurrently and the ticket decides which one normalises: the paper
    shape (2 C slices a sample on an H100/H200), three samples at the
    support limits (32-channel slices: 32 programs a sample) and
    a compiled call (bf16); accurate against float64 and bit-identical from call
    to call."""
    monkeypatch.setenv("PERSONVLAD_TRITON_FWD", "split")
    cases = [make_inputs(N=64, C=256, S=(2, 11, 5), B=6, K=64, dtype=dtype, device="cuda", seed=21),
             make_inputs(N=3, C=tk.MAX_CHANNELS, S=(3, 4, 5), B=tk.MAX_PARTS, K=tk.MAX_CLUSTERS, dtype=dtype,
                         device="cuda", seed=22)]
    for i, ins in enumerate(cases):
        P, K = ins[0][0, 0].numel(), ins[2].shape[0]
        path = tk.forward_path(P, K, tk.dot_precision(torch.device("cuda")))
        if i == 1 and path == "tiled":  # sm_7x (FMA dots): a 128 x 64 tile would spill there
            continue
        assert path == "split"
        for normalize in (True, False):
            _assert_accurate_and_repeatable(ins, normalize)
    if dtype == torch.bfloat16:  # one compilation is enough for the traced launch (compiling costs step time)
        _assert_compiled_call_matches(cases[0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_stream_forward(monkeypatch, dtype):
    """PERSONVLAD_TRITON_FWD=stream on the GPU, where a sample's programs run
    concurrently and the ticket decides which one normalises: the large
    shape (4 slices of 128 channels a sample) and three samples at the
    support limits (K = 128: 16 slices of 64 channels), raw and normalised
    (float32: V in the output, rescaled in place); accurate against float64
    and bit-identical from call to call; a sample alone gives the batch's
    bits; and a compiled call (bf16)."""
    monkeypatch.setenv("PERSONVLAD_TRITON_FWD", "stream")
    cases = [make_inputs(N=32, C=512, S=(8, 14, 14), B=8, K=64, dtype=dtype, device="cuda", seed=31),
             make_inputs(N=3, C=tk.MAX_CHANNELS, S=(3, 7, 9), B=tk.MAX_PARTS, K=tk.MAX_CLUSTERS, dtype=dtype,
                         device="cuda", seed=32)]
    for ins in cases:
        C, K = ins[0].shape[1], ins[2].shape[0]
        assert C // tk.stream_channels(K, C) >= 4
        assert tk.forward_path(ins[0][0, 0].numel(), K, tk.dot_precision(torch.device("cuda"))) == "stream"
        for normalize in (True, False):
            out = _assert_accurate_and_repeatable(ins, normalize)
            alone = [None if t is None else (t[1:2] if t.dim() > 2 else t) for t in ins]
            assert torch.equal(tk.person_vlad_triton(*alone, normalize), out[1:2])
    if dtype == torch.bfloat16:  # one compilation is enough for the traced launch (compiling costs step time)
        _assert_compiled_call_matches(cases[0])


@pytest.mark.cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_gradients_realistic_shapes(shape):
    ins = make_inputs(device="cuda", seed=6, **shape)
    N, C, K = shape["N"], shape["C"], shape["K"]
    go = torch.randn(N, K * C, device="cuda", dtype=torch.float64)
    _assert_grads_within_2x_reference(ins, True, go, floor=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_gradients_half(dtype):
    ins = make_inputs(N=8, C=64, S=(4, 6, 3), B=4, K=16, dtype=dtype, device="cuda", seed=8)
    go = torch.randn(8, 16 * 64, device="cuda", dtype=torch.float64)
    _assert_grads_within_2x_reference(ins, True, go, floor=1e-3)


@pytest.mark.cuda
def test_cuda_deterministic():
    ins = make_inputs(N=16, C=128, S=(4, 7, 5), B=6, K=32, device="cuda", seed=9)
    go = torch.randn(16, 32 * 128, device="cuda")
    a = _triton(*ins)
    ga = _grads(_triton, ins, True, go)
    for _ in range(2):
        assert torch.equal(_triton(*ins), a)
        for x, y in zip(_grads(_triton, ins, True, go), ga):
            assert torch.equal(x, y)


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    ins = make_inputs(N=4, C=32, S=(2, 5, 3), B=3, K=16, device="cuda", requires_grad=True)
    for normalize in (True, False):
        res = torch.library.opcheck(torch.ops.personvlad.person_vlad_triton, tuple(ins) + (normalize,))
        assert all(v == "SUCCESS" for v in res.values()), res
    torch._dynamo.reset()

    def f(F, M, W, z, c):
        return ops.person_vlad(F, M, W, z, c, backend="triton")

    cf = torch.compile(f, fullgraph=True)
    y, y0 = cf(*ins), f(*ins)
    torch.testing.assert_close(y, y0, atol=1e-6, rtol=1e-5)
    go = torch.randn_like(y0)
    for a, b in zip(torch.autograd.grad(y, ins, go), torch.autograd.grad(y0, ins, go)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_interpreter_k_above_64_runs_the_k128_kernels(monkeypatch):
    """K in (64, 128] (BLOCK_K = 128) runs the assignment and backward
    kernels with their own config lists; forward (tiled) and gradients match
    the float64 reference within the fp32 budget."""
    monkeypatch.setenv("PERSONVLAD_TRITON_FWD", "tiled")
    calls = {"assign": 0, "bwd": 0}
    for name, attr in (("assign", "_fwd_assign_kernel_k128"), ("bwd", "_bwd_main_kernel_k128")):
        kern = getattr(tk, attr)
        orig = kern.run

        def counted(*a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(kern, "run", counted)
    assert tk.assign_kernel(128) is tk._fwd_assign_kernel_k128 and tk.assign_kernel(64) is tk._fwd_assign_kernel
    assert tk.bwd_main_kernel(128) is tk._bwd_main_kernel_k128 and tk.bwd_main_kernel(32) is tk._bwd_main_kernel
    ins = make_inputs(N=2, C=8, S=(3, 5), B=2, K=70, seed=3, device=DEV)  # the interpreter, or a GPU
    go = torch.randn(2, 70 * 8, dtype=torch.float64, device=DEV)
    g_tri = _grads(_triton, ins, True, go)
    g_64 = _grads(_ref, ins, True, go, cast=torch.float64)
    assert calls == {"assign": 1, "bwd": 1}
    atol, rtol = tolerance(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(_triton(*ins).double(), _ref(*_f64(ins)), atol=atol, rtol=rtol)
    for name, gt, g64 in zip(NAMES, g_tri, g_64):
        torch.testing.assert_close(gt.double(), g64, atol=atol * max(1.0, g64.abs().max().item()), rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------
# kernels._launch.tuned: eager launches past Autotuner.run
# ---------------------------------------------------------------------------
def test_tuned_launch_skips_the_autotuner_once_it_has_chosen(monkeypatch):
    """A key's first launch goes through Autotuner.run (which chooses); the
    next ones call the JITFunction with that config, same results; a new key
    (another key argument, another dtype) goes through the autotuner again.
    Autotuners with hooks, and plain JITFunctions, are launched as they are;
    an autotuner that records no best_config is called every time."""
    import triton
    from triton.runtime.autotuner import Autotuner

    from personvlad.kernels._launch import _Tuned, tuned

    assert isinstance(tuned(tk._fwd_single_kernel), _Tuned)
    assert tuned(tk._fwd_single_kernel) is tuned(tk._fwd_single_kernel)  # made once
    assert tuned(tk._fwd_normalize_kernel) is tk._fwd_normalize_kernel  # not autotuned
    hooked = triton.autotune(configs=[triton.Config({})], key=["C"], reset_to_zero=["OUT_ptr"])(
        tk._fwd_normalize_kernel)
    assert tuned(hooked) is hooked

    calls = []
    real_run = Autotuner.run

    def counting_run(self, *a, **k):
        calls.append(self)
        return real_run(self, *a, **k)

    monkeypatch.setattr(Autotuner, "run", counting_run)
    monkeypatch.setenv("PERSONVLAD_TRITON_FWD", "single")
    fresh = triton.autotune(configs=list(tk._fwd_single_kernel.configs), key=list(tk._fwd_single_kernel.keys))(
        tk._fwd_single_kernel.fn)
    monkeypatch.setattr(tk, "_fwd_single_kernel", fresh)  # a tuner no other test has launched
    ins = make_inputs(N=2, C=12, S=(3, 4), B=2, K=5, device=DEV, seed=3)
    first = _triton(*ins)
    assert calls == [fresh]
    for _ in range(2):
        assert torch.equal(_triton(*ins), first)
    assert calls == [fresh]  # looked up, not re-run through the autotuner
    torch.testing.assert_close(first.double(), _oracle(ins, True), atol=2e-5, rtol=2e-4)
    _triton(*make_inputs(N=2, C=16, S=(3, 4), B=2, K=5, device=DEV, seed=3))  # key argument C
    assert calls == [fresh, fresh]
    half = make_inputs(N=2, C=12, S=(3, 4), B=2, K=5, dtype=torch.float16, device=DEV, seed=3)
    _triton(*half)  # the features' dtype
    assert calls == [fresh, fresh, fresh]
    _triton(*half)
    assert calls == [fresh, fresh, fresh]

    def silent_run(self, *a, **k):  # a Triton whose autotuner does not record best_config
        calls.append(self)
        ret = real_run(self, *a, **k)
        del self.best_config
        return ret

    monkeypatch.setattr(Autotuner, "run", silent_run)
    silent = triton.autotune(configs=list(tk._fwd_single_kernel.configs), key=list(tk._fwd_single_kernel.keys))(
        tk._fwd_single_kernel.fn)
    monkeypatch.setattr(tk, "_fwd_single_kernel", silent)
    calls.clear()
    for _ in range(3):
        assert torch.equal(_triton(*ins), first)
    assert calls == [silent] * 3  # nothing to look up: through the autotuner every time
