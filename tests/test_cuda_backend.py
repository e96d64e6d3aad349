"""The CUDA backend (csrc/cuda/person_vlad_cuda.cu) of the fused op.

Without a CUDA device only the build/registration checks run; everything
marked ``@pytest.mark.cuda`` is skipped here (tests/conftest.py) and runs on a
GPU machine.  Every CUDA result is compared with the pure-PyTorch reference
evaluated in float64 on the same (dtype-rounded) inputs.
"""
import pathlib

import pytest
import torch

from conftest import GRIDS, PARTS, make_inputs, tolerance
from personvlad import ops, reference
from personvlad.ops import person_vlad

FWD = torch.ops.personvlad.person_vlad.default
BWD = torch.ops.personvlad.person_vlad_backward.default
NAMES = ("features", "parts", "assign_weight", "assign_bias", "centers")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _so_path():
    return pathlib.Path(ops._C.__file__) if ops.extension_loaded() else None


def built_with_cuda() -> bool:
    """Whether personvlad._C was linked against the CUDA runtime libraries
    (decided from the shared object's dynamic-library names, independently of
    the dispatcher)."""
    so = _so_path()
    if so is None:
        return False
    data = so.read_bytes()
    return b"libc10_cuda.so" in data or b"libcudart.so" in data


def needs_native_cuda():
    if not ops._NATIVE_CUDA:
        pytest.skip("personvlad._C was built without CUDA kernels")


# ---------------------------------------------------------------- no device needed
def test_native_cuda_flag_matches_how_the_extension_was_built():
    if not ops.extension_loaded():
        pytest.skip("personvlad._C is not built")
    assert ops._NATIVE_CUDA == built_with_cuda()


def test_cuda_kernels_registered_from_the_cu_file():
    if not built_with_cuda():
        pytest.skip("personvlad._C was built CPU-only")
    for op in ("personvlad::person_vlad", "personvlad::person_vlad_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        dump = torch._C._dispatch_dump(op)
        cuda_lines = [ln for ln in dump.splitlines() if ln.startswith("CUDA:")]
        assert len(cuda_lines) == 1 and "person_vlad_cuda.cu" in cuda_lines[0], dump


def test_cuda_backend_reported_only_with_a_device():
    if torch.cuda.is_available():
        assert ("cuda" in ops.available_backends()) == ops._NATIVE_CUDA
        assert ("cuda" in ops.available_backends("cuda")) == ops._NATIVE_CUDA
    else:
        assert "cuda" not in ops.available_backends()
    assert "cuda" not in ops.available_backends("cpu")
    F, M, W, z, c = make_inputs(N=1, C=2, S=(3,), B=1, K=2)
    with pytest.raises(ValueError, match="^backend:"):
        person_vlad(F, M, W, z, c, backend="cuda")


# ---------------------------------------------------------------- helpers (GPU)
def _ref64(args, normalize):
    a64 = [None if t is None else t.detach().double() for t in args]
    return reference.person_vlad_ref(*a64, normalize)


def _grads_ref64(gout, args, normalize):
    a64 = [None if t is None else t.detach().double() for t in args]
    return reference.person_vlad_backward_ref(gout.double(), *a64, normalize)


def _check_grads(got, expect, args, dtype):
    """got/expect: five gradients; tolerance of ``dtype`` scaled by each
    gradient's largest magnitude (gradients are not unit-sized).  float32 and
    float64 gradients get 5x the output tolerance (the normalisation backward
    and the extra GEMMs add rounding); half-precision ones are dominated by the
    final rounding to the input dtype, which the output tolerance covers."""
    atol, rtol = tolerance(dtype)
    factor = 5.0 if dtype in (torch.float32, torch.float64) else 1.0
    for name, g, e, t in zip(NAMES, got, expect, args):
        if t is None:
            assert g.numel() == 0, name
            continue
        assert g.shape == t.shape and g.dtype == t.dtype and g.device == t.device, name
        scale = max(e.abs().max().item(), 1.0)
        torch.testing.assert_close(
            g.double(), e, atol=factor * atol * scale, rtol=factor * rtol, msg=lambda m: f"{name}: {m}"
        )


# ---------------------------------------------------------------- forward parity
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("B", PARTS, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("S", GRIDS, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_reference(S, B, normalize, dtype):
    needs_native_cuda()
    args = make_inputs(N=3, C=6, S=S, B=B, K=5, dtype=dtype, device="cuda", seed=21)
    out = FWD(*args, normalize)
    N, C, K = 3, 6, 5
    assert out.dtype == dtype and out.is_cuda and out.is_contiguous()
    assert out.shape == ((N, K * C) if normalize else (N, K, C))
    expect = _ref64(args, normalize)
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(out.double(), expect, atol=atol, rtol=rtol)

    gout = torch.randn(expect.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gout = gout.to("cuda")
    got = BWD(gout.to(dtype), *args, normalize)
    _check_grads(got, _grads_ref64(gout.to(dtype), args, normalize), args, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("B", [None, 2], ids=["noparts", "B2"])
def test_noncontiguous_equals_contiguous(B):
    needs_native_cuda()
    kw = dict(N=3, C=5, S=(2, 3, 4), B=B, K=3, device="cuda", seed=22)
    a = make_inputs(**kw, requires_grad=True)
    b = make_inputs(**kw, noncontig=True, requires_grad=True)
    assert not b[0].is_contiguous()
    oa = person_vlad(*a, backend="cuda")
    ob = person_vlad(*b, backend="cuda")
    torch.testing.assert_close(oa, ob, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(oa)
    oa.backward(g)
    ob.backward(g)
    for name, ta, tb in zip(NAMES, a, b):
        if ta is not None:
            torch.testing.assert_close(ta.grad, tb.grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("normalize", [True, False])
def test_empty_batch_direct_op(normalize):
    needs_native_cuda()
    F, M, W, z, c = make_inputs(N=0, C=4, S=(3, 2), B=2, K=3, device="cuda")
    out = FWD(F, M, W, z, c, normalize)
    assert out.shape == ((0, 12) if normalize else (0, 3, 4)) and out.is_cuda
    dF, dM, dW, dz, dc = BWD(out.new_zeros(out.shape), F, M, W, z, c, normalize)
    assert dF.shape == F.shape and dM.shape == M.shape
    for g, t in ((dW, W), (dz, z), (dc, c)):
        assert g.shape == t.shape and torch.count_nonzero(g) == 0
    dF, dM, dW, dz, dc = BWD(out.new_zeros(out.shape), F, None, W, z, c, normalize)
    assert dM.numel() == 0
    # and through the public door (which short-circuits N=0)
    args = make_inputs(N=0, C=4, S=(3,), B=None, K=3, device="cuda", requires_grad=True)
    person_vlad(*args, normalize=normalize, backend="cuda").sum().backward()
    assert torch.count_nonzero(args[2].grad) == 0


@pytest.mark.cuda
@pytest.mark.parametrize("K,C", [(1, 5), (4, 1), (1, 1), (130, 3)])
@pytest.mark.parametrize("B", [None, 6], ids=["noparts", "B6"])
def test_degenerate_and_many_clusters(K, C, B):
    """K=1 / C=1 edge cases, and K > 128 (the per-column kernel has no K limit)."""
    needs_native_cuda()
    for dtype in (torch.float64, torch.float32):
        args = make_inputs(N=2, C=C, S=(5, 3), B=B, K=K, dtype=dtype, device="cuda", seed=23)
        for normalize in (True, False):
            out = FWD(*args, normalize)
            atol, rtol = tolerance(dtype)
            torch.testing.assert_close(out.double(), _ref64(args, normalize), atol=atol, rtol=rtol)
            gout = torch.randn(out.shape, dtype=dtype, device="cuda")
            _check_grads(BWD(gout, *args, normalize), _grads_ref64(gout, args, normalize), args, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("B", [None, 3], ids=["noparts", "B3"])
def test_gradcheck_float64(B, normalize):
    needs_native_cuda()
    args = make_inputs(N=2, C=3, S=(2, 3), B=B, K=4, dtype=torch.float64, device="cuda", seed=24,
                       requires_grad=True)

    def f(*a):
        return person_vlad(*a, normalize=normalize, backend="cuda")

    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.cuda
def test_opcheck_cuda():
    needs_native_cuda()
    for B, normalize in ((2, True), (None, False)):
        F, M, W, z, c = make_inputs(N=2, C=4, S=(3, 2), B=B, K=3, device="cuda", seed=25, requires_grad=True)
        torch.library.opcheck(FWD, (F, M, W, z, c, normalize))
        gout = torch.randn((2, 12) if normalize else (2, 3, 4), device="cuda")
        torch.library.opcheck(BWD, (gout, F.detach(), None if M is None else M.detach(), W.detach(),
                                    z.detach(), c.detach(), normalize))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_mixed_precision_parameters(dtype):
    """Half features with float32 parameters: each gradient in its input's dtype."""
    needs_native_cuda()
    args = make_inputs(N=2, C=8, S=(3, 3), B=2, K=4, dtype=dtype, device="cuda", seed=26, requires_grad=True)
    assert args[2].dtype == torch.float32
    out = person_vlad(*args, backend="cuda")
    assert out.dtype == dtype
    gout = torch.randn(out.shape, device="cuda", dtype=dtype)
    out.backward(gout)
    _check_grads([t.grad for t in args], _grads_ref64(gout, args, True), args, dtype)


@pytest.mark.cuda
def test_alpha_1000_init():
    """Huge logits (the paper's alpha=1000): finite, and float64 matches the reference."""
    needs_native_cuda()
    for dtype in (torch.float64, torch.float32, torch.float16):
        args = make_inputs(N=2, C=16, S=(2, 3, 3), B=6, K=8, dtype=dtype, alpha=1000.0, device="cuda", seed=27)
        out = FWD(*args, True)
        assert torch.isfinite(out).all()
        gout = torch.randn(out.shape, device="cuda", dtype=dtype)
        assert all(torch.isfinite(g).all() for g in BWD(gout, *args, True))
        if dtype == torch.float64:
            torch.testing.assert_close(out, _ref64(args, True), atol=1e-10, rtol=1e-9)
            _check_grads(BWD(gout, *args, True), _grads_ref64(gout, args, True), args, dtype)
        elif dtype == torch.float32:  # same-precision reference (same cuBLAS GEMM for W F)
            ref = reference.person_vlad_ref(*args, True)
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)


@pytest.mark.cuda
def test_deterministic():
    needs_native_cuda()
    args = make_inputs(N=4, C=16, S=(6, 7), B=3, K=8, device="cuda", seed=28)
    o1, o2 = FWD(*args, True), FWD(*args, True)
    assert torch.equal(o1, o2)
    gout = torch.randn_like(o1)
    for g1, g2 in zip(BWD(gout, *args, True), BWD(gout, *args, True)):
        assert torch.equal(g1, g2)


# ---------------------------------------------------------------- realistic shapes
def _shape_check(N, C, S, B, K, seed):
    args = make_inputs(N=N, C=C, S=S, B=B, K=K, dtype=torch.float32, device="cuda", seed=seed)
    out = FWD(*args, True)
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(out.double(), _ref64(args, True), atol=atol, rtol=rtol)
    gout = torch.randn(out.shape, device="cuda")
    _check_grads(BWD(gout, *args, True), _grads_ref64(gout, args, True), args, torch.float32)


@pytest.mark.cuda
def test_paper_shape():
    """MARS-style clip: N=64, C=256, T x H x W = 2 x 11 x 5, B=6 parts, K=64."""
    needs_native_cuda()
    _shape_check(N=64, C=256, S=(2, 11, 5), B=6, K=64, seed=30)


@pytest.mark.cuda
@pytest.mark.slow
def test_large_shape():
    """N=32, C=512, P=1568 (8 x 14 x 14), B=8, K=64."""
    needs_native_cuda()
    _shape_check(N=32, C=512, S=(8, 14, 14), B=8, K=64, seed=31)
