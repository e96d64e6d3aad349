"""Cross-backend tests of personvlad.ops.person_vlad against a float64 loop
oracle written here, plus argument validation, autograd, opcheck and compile.

Backend-specific depth lives in test_cpu_backend.py, test_triton.py and
test_cuda_backend.py; this file runs the shared matrix over every backend this
install reports (tests/conftest.py).
"""
import math
import os

import pytest
import torch

from conftest import (
    DEVICES,
    GRIDS,
    PARTS,
    backend_device_dtype_params,
    backend_device_params,
    make_inputs,
    tolerance,
)
from personvlad import ops, reference
from personvlad.nn import PersonVLAD
from personvlad.ops import person_vlad


def loop_oracle(F, M, W, z, c, normalize=True):
    """SPEC §1 written as literally as possible, in float64 Python loops."""
    F, W, z, c = (t.detach().double().cpu() for t in (F, W, z, c))
    N, C = F.shape[:2]
    Fp = F.reshape(N, C, -1)
    P = Fp.shape[2]
    K = W.shape[0]
    if M is None:
        Mp = torch.ones(N, 1, P, dtype=torch.float64)
    else:
        Mp = M.detach().double().cpu().reshape(N, M.shape[1], -1)
    B = Mp.shape[1]
    out = []
    for n in range(N):
        V = torch.zeros(K, C, dtype=torch.float64)
        for b in range(B):
            for s in range(P):
                x = Mp[n, b, s] * Fp[n, :, s]
                logit = W @ x + z
                a = torch.exp(logit - logit.max())
                a = a / a.sum()
                for k in range(K):
                    V[k] += a[k] * (x - c[k])
        if normalize:
            for k in range(K):
                V[k] = V[k] / max(V[k].norm().item(), 1e-12)
            v = V.flatten()
            V = v / max(v.norm().item(), 1e-12)
        out.append(V)
    if N == 0:
        return torch.zeros((0, K * C) if normalize else (0, K, C), dtype=torch.float64)
    return torch.stack(out)


def plain_netvlad(F, W, z, c):
    """Textbook NetVLAD (Arandjelović et al.): soft-assign, residual sum,
    intra-norm, L2 — written independently of the package."""
    N, C = F.shape[:2]
    x = F.reshape(N, C, -1).double()
    a = torch.softmax(torch.einsum("kc,ncp->nkp", W.double(), x) + z.double()[None, :, None], dim=1)
    V = torch.einsum("nkp,ncp->nkc", a, x) - a.sum(2)[..., None] * c.double()[None]
    V = torch.nn.functional.normalize(V, dim=2, eps=1e-12)
    return torch.nn.functional.normalize(V.flatten(1), dim=1, eps=1e-12)


# ---------------------------------------------------------------- forward matrix
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("B", PARTS, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("S", GRIDS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend,device,dtype", backend_device_dtype_params(exclude=()))
def test_forward_matches_oracle(backend, device, dtype, S, B, normalize):
    F, M, W, z, c = make_inputs(N=2, C=6, S=S, B=B, K=4, dtype=dtype, device=device, seed=1)
    out = person_vlad(F, M, W, z, c, normalize=normalize, backend=backend)
    assert out.dtype == dtype and out.device.type == device
    assert out.shape == ((2, 24) if normalize else (2, 4, 6))
    expect = loop_oracle(F, M, W, z, c, normalize)
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(out.double().cpu(), expect, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend,device", backend_device_params(exclude=()))
def test_noncontiguous_equals_contiguous(backend, device):
    dtype = torch.float32
    args = make_inputs(N=3, C=5, S=(2, 3, 4), B=2, K=3, dtype=dtype, device=device, seed=2)
    nc = make_inputs(N=3, C=5, S=(2, 3, 4), B=2, K=3, dtype=dtype, device=device, seed=2, noncontig=True)
    assert not nc[0].is_contiguous() and not nc[1].is_contiguous()
    a = person_vlad(*args, backend=backend)
    b = person_vlad(*nc, backend=backend)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("backend,device", backend_device_params(exclude=()))
def test_empty_batch(backend, device, normalize):
    F, M, W, z, c = make_inputs(N=0, C=4, S=(3,), B=2, K=3, device=device, requires_grad=True)
    out = person_vlad(F, M, W, z, c, normalize=normalize, backend=backend)
    assert out.shape == ((0, 12) if normalize else (0, 3, 4))
    out.sum().backward()  # must not raise
    assert W.grad is not None and torch.count_nonzero(W.grad) == 0
    # all five inputs stay in the graph: empty gradients for F and M too
    grads = torch.autograd.grad(person_vlad(F, M, W, z, c, normalize=normalize, backend=backend).sum(),
                                [F, M, W, z, c])
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in (F, M, W, z, c)]
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("num_parts", [0, 3])
def test_layer_empty_batch(num_parts):
    """PersonVLAD on N = 0 clips returns (0, K*C) (and (0, B, *S) part maps),
    with or without part maps."""
    layer = PersonVLAD(8, num_clusters=4, num_parts=num_parts)
    out, parts = layer(torch.randn(0, 8, 3, 4), return_parts=True)
    assert out.shape == (0, 32) and parts.shape == (0, num_parts, 3, 4)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.uint8])
def test_layer_rejects_non_floating_input(dtype):
    """A non-floating input is a ValueError naming x, before any part-map
    arithmetic (which raised NotImplementedError for bool, and cast the
    weights for integers)."""
    layer = PersonVLAD(8, num_clusters=4, num_parts=3)
    with pytest.raises(ValueError, match="x: expected a floating-point dtype"):
        layer(torch.zeros(2, 8, 3, 4, dtype=dtype))
    assert layer.part_weight.dtype == torch.float32


def test_registered_op_rejects_a_meta_parameter_beside_cpu_features():
    """The registered op called directly with one parameter on the meta
    device: the dispatcher runs the fake kernel, which raises instead of
    returning an uninitialised CPU tensor."""
    F, M, W, z, c = make_inputs(N=2, C=4, S=(3,), B=2, K=3)
    with pytest.raises(ValueError, match="centers: expected device cpu"):
        torch.ops.personvlad.person_vlad(F, M, W, z, c.to("meta"), True)
    with pytest.raises(ValueError, match="assign_weight: expected device cpu"):
        torch.ops.personvlad.person_vlad_backward(torch.zeros(2, 12), F, M, W.to("meta"), z, c, True)
    out = torch.ops.personvlad.person_vlad(*[t.to("meta") for t in (F, M, W, z, c)], True)
    assert out.device.type == "meta" and out.shape == (2, 12)
    # the public door names the argument the same way (one shared check)
    for name in ("parts", "assign_weight", "assign_bias", "centers"):
        args = dict(parts=M, assign_weight=W, assign_bias=z, centers=c)
        args[name] = args[name].to("meta")
        with pytest.raises(ValueError, match=rf"^{name}: expected device cpu \(features' device\), got meta$"):
            person_vlad(F, **args)


def test_sparse_inputs_are_rejected():
    F, M, W, z, c = make_inputs(N=2, C=4, S=(3,), B=2, K=3)
    for i, name in enumerate(("features", "parts", "assign_weight", "assign_bias", "centers")):
        ins = [F, M, W, z, c]
        ins[i] = ins[i].to_sparse()
        with pytest.raises(ValueError, match=f"{name}: expected a dense \\(strided\\) tensor"):
            person_vlad(*ins, backend="reference")


@pytest.mark.parametrize("backend,device", backend_device_params(exclude=()))
def test_create_graph_first_order_then_double_backward_refused(backend, device):
    """torch.autograd.grad(..., create_graph=True) -- as a gradient penalty
    elsewhere in a model takes it -- gives the same first-order gradients as
    without; differentiating the op's own gradients again is either supported
    (the reference backend: plain PyTorch) or a clear RuntimeError, never a
    silent zero.  (The cpu backend's kernel ran with autograd on and refused
    inputs that require grad.)"""
    F, M, W, z, c = make_inputs(N=2, C=3, S=(5,), B=2, K=4, device=device, seed=5, requires_grad=True)
    out = person_vlad(F, M, W, z, c, backend=backend)
    g_plain = torch.autograd.grad(out[:, 0].sum(), [F, W])
    out = person_vlad(F, M, W, z, c, backend=backend)
    g_graph = torch.autograd.grad(out[:, 0].sum(), [F, W], create_graph=True)
    for a, b in zip(g_graph, g_plain):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    penalty = sum((g * g).sum() for g in g_graph)
    if backend == "reference":
        penalty.backward()
        assert W.grad is not None and torch.isfinite(W.grad).all()
    else:
        with pytest.raises(RuntimeError, match="double backward|not supported|no autograd"):
            penalty.backward()


@pytest.mark.parametrize("backend,device", backend_device_params(exclude=()))
def test_torch_func_transforms(backend, device):
    """torch.func grad / jacrev / jacfwd / vmap(grad) (per-sample gradients)
    through person_vlad with any backend.  The compiled backends' autograd
    cannot run under a transform (C++ autograd::Function, the Triton op's), so
    the op runs the reference there: the results equal plain autograd through
    the requested backend."""
    dt = torch.float32 if backend == "triton" else torch.float64
    tol = dict(atol=1e-4, rtol=1e-3) if dt == torch.float32 else dict(atol=1e-10, rtol=1e-8)
    F, M, W, z, c = make_inputs(N=3, C=4, S=(2, 3), B=2, K=3, dtype=dt, device=device, seed=11)

    def loss(W_, F_=F, M_=M):
        return person_vlad(F_, M_, W_, z, c, backend=backend).pow(3).sum()

    assert not ops.functorch_active()
    # resolve_backend says what person_vlad runs, inside a transform too
    seen = []
    torch.func.grad(lambda W_: seen.append(ops.resolve_backend(F, M, W_, backend)) or loss(W_))(W)
    assert seen == ["reference"]
    Wg = W.clone().requires_grad_()
    (ref,) = torch.autograd.grad(loss(Wg), [Wg])
    torch.testing.assert_close(torch.func.grad(loss)(W), ref, **tol)
    # the Jacobian of the output w.r.t. the features, both modes
    def out(F_):
        return person_vlad(F_, M, W, z, c, backend=backend)

    jr = torch.func.jacrev(out)(F)
    torch.testing.assert_close(torch.func.jacfwd(out)(F), jr, **tol)
    Fg = F.clone().requires_grad_()
    y = out(Fg)
    row = torch.autograd.grad(y[1, 5], [Fg])[0]
    torch.testing.assert_close(jr[1, 5], row, **tol)
    # per-sample gradients: vmap over grad
    per = torch.func.vmap(torch.func.grad(lambda W_, f, m: loss(W_, f[None], m[None])),
                          in_dims=(None, 0, 0))(W, F, M)
    for i in range(F.shape[0]):
        Wi = W.clone().requires_grad_()
        (gi,) = torch.autograd.grad(loss(Wi, F[i:i + 1], M[i:i + 1]), [Wi])
        torch.testing.assert_close(per[i], gi, **tol)
    assert not ops.functorch_active()


@pytest.mark.parametrize("K,C", [(1, 5), (4, 1), (1, 1)])
@pytest.mark.parametrize("backend,device", backend_device_params(exclude=()))
def test_degenerate_sizes(backend, device, K, C):
    F, M, W, z, c = make_inputs(N=2, C=C, S=(5,), B=2, K=K, device=device, seed=3)
    for normalize in (True, False):
        out = person_vlad(F, M, W, z, c, normalize=normalize, backend=backend)
        torch.testing.assert_close(out.double().cpu(), loop_oracle(F, M, W, z, c, normalize), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("backend,device", backend_device_params(exclude=()))
def test_nan_input_gives_nan_output_and_gradients(backend, device):
    """A NaN feature: that sample's output and gradients are NaN everywhere,
    as torch's clamp_min gives (the reference), not finite garbage; the other
    sample is as without it.  Triton's tl.maximum dropped a NaN norm for eps
    (outputs ~1e24), the cpu backward took NaN as a clamped norm (dF ~1e24)."""
    F, M, W, z, c = make_inputs(N=2, C=6, S=(3, 4), B=3, K=4, device=device, seed=11)
    F = F.clone()
    F[0, 1, 2, 0] = float("nan")
    args = [t.clone().requires_grad_(True) for t in (F, M, W, z, c)]
    out = person_vlad(*args, backend=backend)
    assert out[0].isnan().all() and not out[1].isnan().any()
    clean = [t.detach()[1:] for t in (F, M)] + [t.detach() for t in (W, z, c)]
    torch.testing.assert_close(out[1:].detach(), person_vlad(*clean, backend="reference"), atol=2e-5, rtol=2e-4)
    out.sum().backward()
    assert args[0].grad[0].isnan().all() and not args[0].grad[1].isnan().any()
    assert args[1].grad[0].isnan().all() and not args[1].grad[1].isnan().any()


@pytest.mark.parametrize("backend,device", backend_device_params(exclude=()))
def test_tiny_features_still_give_a_unit_vector(backend, device):
    """float32 V of |V| ~ 1e-24: every row norm is clamped to eps and V_k^2
    underflows; the output is still V / eps normalised (norm 1), as in float64
    (Triton took |u|^2 from sum V^2 / eps^2 = 0 and scaled by up to 1e12)."""
    F, M, W, z, c = make_inputs(N=2, C=6, S=(3, 4), B=3, K=4, device=device, seed=12)
    args = [F * 1e-24, M, W, z, c * 1e-24]
    out = person_vlad(*args, backend=backend)
    expect = reference.person_vlad_ref(*[t.double() for t in args], True)
    torch.testing.assert_close(out.double(), expect, atol=2e-5, rtol=2e-4)
    assert (out.double().norm(dim=1) - 1).abs().max() < 1e-5


def test_parts_none_is_plain_netvlad():
    F, _, W, z, c = make_inputs(N=3, C=6, S=(4, 5), B=None, K=5, dtype=torch.float64, seed=4)
    for backend in ops.available_backends("cpu"):
        if backend == "triton":
            F32, W32, z32, c32 = (t.float() for t in (F, W, z, c))
            out = person_vlad(F32, None, W32, z32, c32, backend=backend).double()
            torch.testing.assert_close(out, plain_netvlad(F, W, z, c), atol=2e-5, rtol=2e-4)
        else:
            out = person_vlad(F, None, W, z, c, backend=backend)
            torch.testing.assert_close(out, plain_netvlad(F, W, z, c), atol=1e-10, rtol=1e-9)


def test_parts_all_ones_single_part_equals_none():
    F, _, W, z, c = make_inputs(N=2, C=6, S=(7,), B=None, K=3, dtype=torch.float64, seed=5)
    ones = torch.ones(2, 1, 7, dtype=torch.float64)
    torch.testing.assert_close(
        person_vlad(F, ones, W, z, c, backend="reference"), person_vlad(F, None, W, z, c, backend="reference")
    )


def test_reference_error_budget():
    """The tolerances in conftest are ~2x the reference's own error vs float64."""
    F, M, W, z, c = make_inputs(N=4, C=32, S=(2, 4, 3), B=6, K=8, dtype=torch.float64, seed=6)
    exact = reference.person_vlad_ref(F, M, W, z, c)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        out = reference.person_vlad_ref(F.to(dt), M.to(dt), W.float(), z.float(), c.float())
        err = (out.double() - exact).abs().max().item()
        atol, _ = tolerance(dt)
        assert err <= atol, (dt, err, atol)


def test_reference_matches_naive_broadcast():
    F, M, W, z, c = make_inputs(N=2, C=5, S=(3, 4), B=3, K=4, dtype=torch.float64, seed=7)
    for normalize in (True, False):
        torch.testing.assert_close(
            reference.person_vlad_ref(F, M, W, z, c, normalize),
            reference.person_vlad_naive(F, M, W, z, c, normalize),
        )


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("B", [None, 3], ids=["noparts", "B3"])
@pytest.mark.parametrize("backend,device", backend_device_params(exclude=()))
def test_gradients_match_reference(backend, device, B):
    """All five gradients vs the float64 reference's autograd (float32 run)."""
    args64 = make_inputs(N=2, C=5, S=(2, 3), B=B, K=3, dtype=torch.float64, device=device, seed=8, requires_grad=True)
    args32 = [None if t is None else t.detach().float().requires_grad_(True) for t in args64]
    gout = torch.randn(2, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    reference.person_vlad_ref(*args64).backward(gout)
    person_vlad(*args32, backend=backend).backward(gout.float())
    for name, t64, t32 in zip(("features", "parts", "weight", "bias", "centers"), args64, args32):
        if t64 is None:
            continue
        torch.testing.assert_close(t32.grad.double(), t64.grad, atol=5e-5, rtol=5e-4, msg=name)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend, normalize):
    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"{backend} backend not built here")
    args = make_inputs(N=2, C=3, S=(2, 2), B=2, K=3, dtype=torch.float64, seed=9, requires_grad=True)

    def f(*a):
        return person_vlad(*a, normalize=normalize, backend=backend)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_alpha_1000_init_is_finite(dtype):
    """The paper's alpha=1000 coupling gives huge logits: outputs and
    gradients stay finite (max-subtracted softmax) on the reference path."""
    args = make_inputs(N=2, C=16, S=(2, 3, 3), B=6, K=8, dtype=dtype, alpha=1000.0, seed=10)
    args = [None if t is None else t.detach().requires_grad_(True) for t in args]
    out = person_vlad(*args, backend="reference")
    assert torch.isfinite(out).all()
    out.float().pow(2).sum().backward()
    for t in args:
        assert torch.isfinite(t.grad).all()
    for backend in ops.available_backends("cpu"):
        if dtype in (torch.float32,) and backend != "reference":
            out2 = person_vlad(*[t.detach() for t in args], backend=backend)
            assert torch.isfinite(out2).all()


def test_mixed_precision_params():
    """float32 parameters with float16/bfloat16 features (autocast layout)."""
    for dt in (torch.float16, torch.bfloat16):
        F, M, W, z, c = make_inputs(N=2, C=8, S=(3, 3), B=2, K=4, dtype=dt, seed=11, requires_grad=True)
        assert W.dtype == torch.float32
        out = person_vlad(F, M, W, z, c, backend="reference")
        assert out.dtype == dt
        out.float().sum().backward()
        assert F.grad.dtype == dt and W.grad.dtype == torch.float32


# ---------------------------------------------------------------- custom op
def test_registered_custom_op_opcheck():
    F, M, W, z, c = make_inputs(N=2, C=4, S=(3, 2), B=2, K=3, seed=12, requires_grad=True)
    torch.library.opcheck(torch.ops.personvlad.person_vlad.default, (F, M, W, z, c, True))
    torch.library.opcheck(torch.ops.personvlad.person_vlad.default, (F, None, W, z, c, False))


def test_layer_compiles_fullgraph():
    torch._dynamo.reset()
    layer = PersonVLAD(8, num_clusters=4, num_parts=2)
    x = torch.randn(2, 8, 2, 3, 3)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)
    out.sum().backward()
    assert layer.assign_weight.grad is not None and layer.part_weight.grad is not None


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_autocast_region_leaves_the_op_in_its_compute_dtype(backend):
    """Every backend computes in fp32 (fp64) inside a torch.autocast region,
    as outside it: same bits, forward and gradients (the backward called
    after the region, as PyTorch recommends).  The reference's own matmuls
    would otherwise run in bf16."""
    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"{backend} not built")
    ins = make_inputs(N=2, C=8, S=(2, 3), B=2, K=4, seed=21, requires_grad=True)
    go = torch.randn(2, 32, generator=torch.Generator().manual_seed(22))
    leaves = [t for t in ins if t is not None]
    out = person_vlad(*ins, backend=backend)
    grads = torch.autograd.grad(out, leaves, go)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = person_vlad(*ins, backend=backend)
    grads_ac = torch.autograd.grad(out_ac, leaves, go)
    assert out_ac.dtype == out.dtype and torch.equal(out_ac, out)
    assert all(torch.equal(a, b) for a, b in zip(grads_ac, grads))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_compiles_fullgraph_cuda_auto(dtype):
    """On CUDA the layer's backend="auto" chooses cuda or triton while Dynamo
    traces: no graph break (fullgraph), same values as eager."""
    torch._dynamo.reset()
    layer = PersonVLAD(16, num_clusters=8, num_parts=3).cuda()
    x = torch.randn(2, 16, 2, 11, 5, device="cuda", dtype=dtype)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(out.float(), eager.float(), atol=2 * atol, rtol=2 * rtol)
    out.float().sum().backward()
    assert layer.assign_weight.grad is not None and layer.part_weight.grad is not None


# ---------------------------------------------------------------- validation
def _good():
    return make_inputs(N=2, C=4, S=(3, 2), B=2, K=3, seed=13)


def _bad_calls():
    F, M, W, z, c = _good()
    cases = [
        ("features", lambda: person_vlad(F.numpy(), M, W, z, c)),
        ("features", lambda: person_vlad(F.long(), M, W, z, c)),
        ("features", lambda: person_vlad(F[0, 0], M, W, z, c)),
        ("features", lambda: person_vlad(F.reshape(2, 4, 6)[..., None, None, None, None], M, W, z, c)),
        ("features", lambda: person_vlad(F[:, :0], M, W[:, :0], z, c[:, :0])),
        ("features", lambda: person_vlad(F[:, :, :0], M[:, :, :0], W, z, c)),
        ("parts", lambda: person_vlad(F, M.int(), W, z, c)),
        ("parts", lambda: person_vlad(F, M[0], W, z, c)),
        ("parts", lambda: person_vlad(F, M[:1], W, z, c)),
        ("parts", lambda: person_vlad(F, M[:, :0], W, z, c)),
        ("parts", lambda: person_vlad(F, M[:, :, :2], W, z, c)),
        ("parts", lambda: person_vlad(F, M.transpose(2, 3), W, z, c)),
        ("assign_weight", lambda: person_vlad(F, M, W[0], z, c)),
        ("assign_weight", lambda: person_vlad(F, M, W[:, :3], z, c)),
        ("assign_weight", lambda: person_vlad(F, M, W[:0], z[:0], c[:0])),
        ("assign_weight", lambda: person_vlad(F, M, W.to(torch.int32), z, c)),
        ("assign_bias", lambda: person_vlad(F, M, W, z[:2], c)),
        ("assign_bias", lambda: person_vlad(F, M, W, z[None], c)),
        ("assign_bias", lambda: person_vlad(F, M, W, [0.0, 0.0, 0.0], c)),
        ("centers", lambda: person_vlad(F, M, W, z, c[:2])),
        ("centers", lambda: person_vlad(F, M, W, z, c.T)),
        ("centers", lambda: person_vlad(F, M, W, z, c.bool())),
        ("normalize", lambda: person_vlad(F, M, W, z, c, normalize="yes")),
        ("backend", lambda: person_vlad(F, M, W, z, c, backend="tpu")),
        ("backend", lambda: person_vlad(F, M, W, z, c, backend="cuda")),
        ("backend", lambda: person_vlad(F, M, W, z, c, backend=None)),
        ("parts", lambda: person_vlad(F, M.to("meta"), W, z, c)),
        ("centers", lambda: person_vlad(F, M, W, z, c.to("meta"))),
    ]
    return cases


@pytest.mark.parametrize("idx", range(len(_bad_calls())))
def test_bad_input_raises_value_error_naming_argument(idx):
    name, call = _bad_calls()[idx]
    with pytest.raises(ValueError) as ei:
        call()
    msg = str(ei.value)
    assert msg.startswith(name + ":"), msg
    assert "expected" in msg or "not available" in msg, msg


def test_available_backends_contract():
    names = ops.available_backends()
    assert "reference" in names
    assert set(names) <= set(ops.BACKENDS)
    if not torch.cuda.is_available():
        assert "cuda" not in names
    if ops.extension_loaded() and ops._NATIVE_CPU:
        assert "cpu" in ops.available_backends("cpu")
        assert ops.resolve_backend(*_good()[:3]) == "cpu"


def test_auto_equals_explicit():
    args = _good()
    auto = person_vlad(*args)
    explicit = person_vlad(*args, backend=ops.resolve_backend(*args[:3]))
    torch.testing.assert_close(auto, explicit, atol=0, rtol=0)


def test_output_is_unit_norm_and_intra_normalised():
    F, M, W, z, c = make_inputs(N=3, C=7, S=(4, 4), B=6, K=5, dtype=torch.float64, seed=14)
    out = person_vlad(F, M, W, z, c, backend="reference").view(3, 5, 7)
    torch.testing.assert_close(out.flatten(1).norm(dim=1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(out.norm(dim=2), torch.full((3, 5), 1 / math.sqrt(5), dtype=torch.float64))


def test_triton_limits_raise_value_error_naming_backend():
    if "triton" not in ops.available_backends("cpu"):
        pytest.skip("triton backend not usable here")
    F, M, W, z, c = make_inputs(N=1, C=4, S=(3,), B=17, K=2, seed=15)
    with pytest.raises(ValueError, match=r"^backend: 'triton' cannot run these inputs: .*17"):
        person_vlad(F, M, W, z, c, backend="triton")
    # the same inputs run on the default backend
    assert person_vlad(F, M, W, z, c).shape == (1, 8)
    # the dtypes of all five inputs count (bias and centers were not checked:
    # the kernels' own UnsupportedInput came out without the prefix, and
    # backend="auto" on CUDA could pick Triton for them)
    F, M, W, z, c = make_inputs(N=1, C=4, S=(3,), B=2, K=2, seed=15)
    for name, args in (("assign_bias", (F, M, W, z.double(), c)), ("centers", (F, M, W, z, c.double()))):
        with pytest.raises(ValueError, match=rf"^backend: 'triton' cannot run these inputs: .*; {name} is float64"):
            person_vlad(*args, backend="triton")
        assert ops.resolve_backend(args[0], args[1], args[2], "auto", assign_bias=args[3], centers=args[4]) == (
            "cpu" if "cpu" in ops.available_backends("cpu") else "reference")


@pytest.mark.parametrize("device", [pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else []) for d in DEVICES])
def test_registered_op_empty_batch_direct(device):
    """The registered op itself (not only the door) handles N=0."""
    F, M, W, z, c = make_inputs(N=0, C=4, S=(3, 2), B=2, K=3, device=device)
    op = torch.ops.personvlad.person_vlad
    assert op(F, M, W, z, c, True).shape == (0, 12)
    assert op(F, None, W, z, c, False).shape == (0, 3, 4)


@pytest.mark.skipif(not ops.extension_loaded(), reason="needs the compiled extension")
def test_autograd_formula_is_the_extensions():
    """With the extension loaded, autograd records the C++ formula
    (csrc/autograd.cpp), not a Python wrapper, in and out of no_grad."""
    F, M, W, z, c = make_inputs(N=2, C=4, S=(3,), B=2, K=3, requires_grad=True)
    assert ops._NATIVE_AUTOGRAD
    out = torch.ops.personvlad.person_vlad(F, M, W, z, c, True)
    assert "PersonVladFunction" in out.grad_fn.name(), out.grad_fn.name()
    with torch.no_grad():
        assert not torch.ops.personvlad.person_vlad(F, M, W, z, c, True).requires_grad
    # parts=None: no slot for a parts gradient, the others arrive
    out = torch.ops.personvlad.person_vlad(F, None, W, z, c, False)
    grads = torch.autograd.grad(out.sum(), (F, W, z, c))
    assert all(g is not None and g.shape == t.shape for g, t in zip(grads, (F, W, z, c)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_available_backends_for_cuda_without_a_device():
    """No CUDA device: nothing runs on CUDA tensors (it used to raise the
    driver's RuntimeError from the capability lookup)."""
    assert ops.available_backends("cuda") == ()
    assert ops.available_backends(torch.device("cuda", 0)) == ()
    assert "cuda" not in ops.available_backends() and "reference" in ops.available_backends("cpu")


def test_registered_op_checks_shapes_on_meta_tensors():
    """On the meta device only the fake kernels run: they check the shapes
    the device kernels would (a (7, 9) centers used to come back as a
    (2, 20) output), and the backward's grad_output."""
    m = dict(device="meta")
    F, M = torch.empty(2, 4, 3, 2, **m), torch.empty(2, 2, 3, 2, **m)
    W, z, c = torch.empty(5, 4, **m), torch.empty(5, **m), torch.empty(5, 4, **m)
    assert torch.ops.personvlad.person_vlad(F, M, W, z, c, True).shape == (2, 20)
    with pytest.raises(ValueError, match=r"^centers: expected shape \(K=5, C=4\)"):
        torch.ops.personvlad.person_vlad(F, M, W, z, torch.empty(7, 9, **m), True)
    with pytest.raises(ValueError, match=r"^parts: expected spatial grid"):
        torch.ops.personvlad.person_vlad(F, M[..., :1], W, z, c, True)
    with pytest.raises(ValueError, match=r"^features: expected a floating-point dtype"):
        torch.ops.personvlad.person_vlad(F.long(), M, W, z, c, True)
    g = torch.empty(2, 20, **m)
    assert torch.ops.personvlad.person_vlad_backward(g, F, M, W, z, c, True)[0].shape == F.shape
    with pytest.raises(ValueError, match=r"grad_output: expected shape \(2, 5, 4\), got \(2, 20\)"):
        torch.ops.personvlad.person_vlad_backward(g, F, M, W, z, c, False)
    with pytest.raises(ValueError, match=r"^assign_weight: expected device meta"):
        torch.ops.personvlad.person_vlad(F, M, torch.empty(5, 4), z, c, True)


def test_package_works_without_compiled_extension():
    """With personvlad._C unavailable the op, its autograd and the layer run
    on the pure-PyTorch fallback, with one warning saying how to rebuild."""
    import subprocess
    import sys

    code = r"""
import sys, warnings
sys.modules["personvlad._C"] = None          # make `from . import _C` fail
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import torch, personvlad
    from personvlad import ops
msgs = [str(x.message) for x in w if "personvlad._C" in str(x.message)]
assert len(msgs) == 1 and "make install" in msgs[0], msgs
assert not ops.extension_loaded() and ops.available_backends("cpu")[0] == "reference"
assert "cpu" not in ops.available_backends("cpu")
F = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
M = torch.rand(2, 2, 3, 2, dtype=torch.float64)
W, z, c = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
out = torch.ops.personvlad.person_vlad(F, M, W, z, c, True)
ref = personvlad.reference.person_vlad_ref(F, M, W, z, c)
assert torch.allclose(out, ref)
assert not ops._NATIVE_AUTOGRAD                 # the Python formula is the one in use
assert "PersonVladFunction" not in out.grad_fn.name(), out.grad_fn.name()
out.sum().backward()
F_ref = F.detach().clone().requires_grad_()
personvlad.reference.person_vlad_ref(F_ref, M, W, z, c).sum().backward()
assert torch.allclose(F.grad, F_ref.grad)
assert personvlad.PersonVLAD(4, num_clusters=3, num_parts=2)(torch.randn(2, 4, 5)).shape == (2, 12)
# the fallback kernels validate as the C++ ones do: no silent broadcast
bad = {"features": (F.detach()[:, :, 0, 0], M, W, z, c), "centers": (F, M, W, z, c[:1]),
       "assign_bias": (F, M, W, z[:1], c), "parts": (F, M[:, :, :2], W, z, c)}
for name, args in bad.items():
    try:
        torch.ops.personvlad.person_vlad(*args, True)
        raise AssertionError(f"{name}: accepted")
    except ValueError as e:
        assert str(e).startswith(name), (name, str(e))
g = torch.ones(2, 12, dtype=torch.float64)
try:
    torch.ops.personvlad.person_vlad_backward(g[:, :5], F.detach(), M, W, z, c, True)
    raise AssertionError("grad_output: accepted")
except ValueError as e:
    assert "grad_output: expected shape (2, 12)" in str(e), str(e)
print("ok")
"""
    env = dict(os.environ, PERSONVLAD_QUIET_EXT="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
