"""The C++ CPU backend of the fused op (csrc/cpu/person_vlad_cpu.cpp).

The cross-backend matrix lives in another file; this one covers what is
specific to the C++ kernels: agreement with the float64 oracle for every grid
rank / parts mode / normalize flag, the hand-written backward (against the
autograd reference and torch.autograd.gradcheck), torch.library.opcheck,
mixed input dtypes, empty batches, degenerate sizes, alpha=1000, non-contiguous
inputs, both parallel code paths, determinism, the position-tile kernels
built for each instruction set the extension has a clone for, and the
kernels' own checks.
"""
import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import GRIDS, PARTS, make_inputs, tolerance
from personvlad import ops
from personvlad._tile_isa import CXX_FLAGS, TILE_ISAS, host_cxx, runnable_tile_isas
from personvlad.reference import person_vlad_backward_ref, person_vlad_ref

pytestmark = pytest.mark.skipif(
    "cpu" not in ops.available_backends("cpu"),
    reason="personvlad._C was built without the C++ CPU kernels",
)

OP = torch.ops.personvlad.person_vlad
BWD = torch.ops.personvlad.person_vlad_backward


def f64(ts):
    return [None if t is None else t.detach().to(torch.float64) for t in ts]


def oracle(ins, normalize):
    return person_vlad_ref(*f64(ins), normalize=normalize)


def oracle_grads(grad, ins, normalize):
    return person_vlad_backward_ref(grad.to(torch.float64), *f64(ins), normalize=normalize)


def assert_close(got, want, dtype, scale=1.0):
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(got.to(torch.float64), want.to(torch.float64),
                               atol=atol * scale, rtol=rtol * scale)


def test_backend_is_native():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("personvlad::person_vlad", "CPU")
    F, M, W, z, c = make_inputs()
    assert ops.resolve_backend(F, M, W, "auto") == "cpu"


# --------------------------------------------------------------------------
# forward and backward against the float64 oracle
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("B", PARTS, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("S", GRIDS, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_vs_oracle(S, B, normalize, dtype):
    ins = make_inputs(N=3, C=6, S=S, B=B, K=4, dtype=dtype, seed=len(S) * 10 + (B or 0))
    out = ops.person_vlad(*ins, normalize=normalize, backend="cpu")
    want = oracle(ins, normalize)
    assert out.dtype == dtype and out.shape == want.shape
    assert_close(out, want, dtype)

    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = BWD(grad.to(dtype), *ins, normalize)
    ref = oracle_grads(grad, ins, normalize)
    names = ["features", "parts", "assign_weight", "assign_bias", "centers"]
    for name, t, g, r in zip(names, ins, got, ref):
        if t is None:
            assert g.numel() == 0, name
            continue
        assert g.shape == t.shape and g.dtype == t.dtype, name
        # gradients are sums of more terms than the output: a little more slack
        assert_close(g, r, dtype, scale=5.0)


def test_paper_shape_float32():
    # the shape of the paper (N=8, C=256, grid 2x11x5, B=6, K=64), fewer samples
    ins = make_inputs(N=2, C=256, S=(2, 11, 5), B=6, K=64, dtype=torch.float32)
    assert_close(ops.person_vlad(*ins, backend="cpu"), oracle(ins, True), torch.float32)


# --------------------------------------------------------------------------
# gradcheck (float64, all five inputs) and opcheck
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "S,B,normalize",
    [((5,), None, True), ((2, 3), 2, True), ((2, 2, 2), 3, False), ((3, 2), 1, False)],
    ids=["1d-noparts-norm", "2d-B2-norm", "3d-B3-raw", "2d-B1-raw"],
)
def test_gradcheck(S, B, normalize):
    ins = make_inputs(N=2, C=3, S=S, B=B, K=3, dtype=torch.float64, requires_grad=True, seed=3)
    F, M, W, z, c = ins

    def fn(F, M, W, z, c):
        return ops.person_vlad(F, M, W, z, c, normalize=normalize, backend="cpu")

    assert torch.autograd.gradcheck(fn, (F, M, W, z, c), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_noncontiguous_and_large_alpha():
    # alpha = 10 keeps finite differences meaningful while the softmax is peaked
    ins = make_inputs(N=2, C=3, S=(2, 3), B=2, K=3, dtype=torch.float64, alpha=10.0,
                      noncontig=True, requires_grad=True, seed=5)

    def fn(*a):
        return ops.person_vlad(*a, normalize=True, backend="cpu")

    assert torch.autograd.gradcheck(fn, tuple(ins), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("B", [None, 3], ids=["noparts", "B3"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_opcheck(dtype, B, normalize):
    F, M, W, z, c = make_inputs(N=2, C=4, S=(2, 3), B=B, K=3, dtype=dtype, requires_grad=True)
    torch.library.opcheck(OP, (F, M, W, z, c, normalize))


# --------------------------------------------------------------------------
# dtypes, layouts, sizes
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fdt,pdt",
    [(torch.float64, torch.float32), (torch.float32, torch.float64),
     (torch.float16, torch.float32), (torch.bfloat16, torch.float32)],
    ids=["f64-feat-f32-params", "f32-feat-f64-params", "f16-feat", "bf16-feat"],
)
def test_mixed_dtypes(fdt, pdt):
    ins = make_inputs(N=2, C=5, S=(3, 4), B=2, K=3, dtype=fdt, param_dtype=pdt, requires_grad=True)
    out = ops.person_vlad(*ins, backend="cpu")
    assert out.dtype == fdt
    # compute dtype: float64 only when features are float64
    cd = torch.float64 if fdt == torch.float64 else torch.float32
    want = oracle(ins, True)
    assert_close(out, want, fdt if fdt in (torch.float16, torch.bfloat16) else cd)
    out.float().square().sum().backward()
    for t in ins:
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape
        assert torch.isfinite(t.grad.float()).all()
    # grads agree with the reference run on the same (mixed) inputs
    ref_ins = [t.detach().clone().requires_grad_(True) for t in ins]
    person_vlad_ref(*ref_ins).float().square().sum().backward()
    for t, r in zip(ins, ref_ins):
        tol = tolerance(fdt if fdt in (torch.float16, torch.bfloat16) else cd)
        torch.testing.assert_close(t.grad.double(), r.grad.double(), atol=tol[0] * 20, rtol=tol[1] * 20)


def test_noncontiguous_inputs_same_result():
    kw = dict(N=3, C=5, S=(2, 3, 2), B=4, K=3, dtype=torch.float64, seed=9)
    ins = make_inputs(**kw)
    nc = make_inputs(noncontig=True, **kw)
    assert not nc[0].is_contiguous() and not nc[2].is_contiguous()
    torch.testing.assert_close(OP(*nc, True), OP(*ins, True), atol=1e-14, rtol=1e-12)
    g = torch.randn(3, 15, dtype=torch.float64)
    g_nc = torch.empty(15, 3, dtype=torch.float64).t().copy_(g)
    assert not g_nc.is_contiguous()
    for a, b, t in zip(BWD(g_nc, *nc, True), BWD(g, *ins, True), nc):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-11)
        if t is not None:
            # gradients keep their input's layout, as the fake kernel promises
            assert a.stride() == torch.empty_like(t).stride()


@pytest.mark.parametrize("B", [None, 2], ids=["noparts", "B2"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_empty_batch(B, normalize):
    F, M, W, z, c = make_inputs(N=0, C=4, S=(2, 3), B=B, K=3)
    out = OP(F, M, W, z, c, normalize)
    assert out.shape == ((0, 12) if normalize else (0, 3, 4)) and out.dtype == F.dtype
    dF, dM, dW, dz, dc = BWD(out, F, M, W, z, c, normalize)
    assert dF.shape == F.shape
    assert dM.shape == (M.shape if M is not None else (0,))
    for g, t in ((dW, W), (dz, z), (dc, c)):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert torch.equal(g, torch.zeros_like(t))
    # and through the public door + autograd
    ins = make_inputs(N=0, C=4, S=(2, 3), B=B, K=3, requires_grad=True)
    y = ops.person_vlad(*ins, normalize=normalize, backend="cpu")
    y.sum().backward()
    assert all(t.grad is None or t.grad.abs().sum() == 0 for t in ins if t is not None)


@pytest.mark.parametrize("K,C", [(1, 4), (3, 1), (1, 1)], ids=["K1", "C1", "K1C1"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_degenerate_sizes(K, C, normalize):
    ins = make_inputs(N=2, C=C, S=(5,), B=2, K=K, dtype=torch.float64, seed=K * 7 + C)
    out = OP(*ins, normalize)
    assert_close(out, oracle(ins, normalize), torch.float64)
    grad = torch.randn(out.shape, dtype=torch.float64)
    for g, r in zip(BWD(grad, *ins, normalize), oracle_grads(grad, ins, normalize)):
        assert_close(g, r, torch.float64, scale=10.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_alpha_1000_finite(dtype):
    # the paper's initialisation: W = 2*alpha*c, z = -alpha*||c||^2, alpha = 1000
    ins = make_inputs(N=3, C=16, S=(2, 4, 3), B=6, K=8, dtype=dtype, alpha=1000.0,
                      requires_grad=True, seed=11)
    out = ops.person_vlad(*ins, backend="cpu")
    assert torch.isfinite(out).all()
    assert_close(out, oracle(ins, True), dtype, scale=10.0)
    out.square().sum().backward()
    for t in ins:
        assert torch.isfinite(t.grad).all()
    raw = ops.person_vlad(*ins, normalize=False, backend="cpu")
    assert torch.isfinite(raw).all()


def test_zero_vlad_rows_clamped():
    # A cluster nobody is assigned to has V_k == 0: the intra-normalisation clamp
    # is active there, so its gradient must follow the clamp (norm = constant),
    # exactly as the autograd reference does.
    F, M, W, z, c = make_inputs(N=2, C=4, S=(3,), B=2, K=3, dtype=torch.float64)
    z = z.clone()
    z[2] = -1e4  # cluster 2 never wins: a[:, 2, :] underflows to 0
    ins = [F, M, W, z, c]
    out = OP(*ins, True)
    assert torch.equal(out.view(2, 3, 4)[:, 2], torch.zeros(2, 4, dtype=torch.float64))
    grad = torch.randn(out.shape, dtype=torch.float64)
    for g, r in zip(BWD(grad, *ins, True), oracle_grads(grad, ins, True)):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-9)


# --------------------------------------------------------------------------
# parallel code paths and determinism
# --------------------------------------------------------------------------
@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def test_parallel_paths_agree(two_threads):
    # N=1 < threads: per-sample loop split over positions; N=5: batch chunks.
    ins = make_inputs(N=5, C=8, S=(3, 7), B=3, K=6, dtype=torch.float64, seed=2)
    full = OP(*ins, True)
    grad = torch.randn(full.shape, dtype=torch.float64)
    gfull = BWD(grad, *ins, True)
    dW_sum = torch.zeros_like(ins[2])
    for n in range(5):
        one = [t[n:n + 1] for t in ins[:2]] + ins[2:]
        torch.testing.assert_close(OP(*one, True), full[n:n + 1], atol=1e-14, rtol=1e-12)
        g1 = BWD(grad[n:n + 1], *one, True)
        torch.testing.assert_close(g1[0], gfull[0][n:n + 1], atol=1e-13, rtol=1e-11)
        torch.testing.assert_close(g1[1], gfull[1][n:n + 1], atol=1e-13, rtol=1e-11)
        dW_sum += g1[2]
    torch.testing.assert_close(dW_sum, gfull[2], atol=1e-12, rtol=1e-10)
    torch.set_num_threads(1)
    for a, b in zip(BWD(grad, *ins, True), gfull):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


_THREAD_PROBE = r"""
import os, threading, torch
from personvlad import ops  # noqa: F401  (loads the extension's kernels)
from conftest import make_inputs
torch.set_num_threads(2)

def cpu_seconds_by_thread():  # utime + stime of each thread of this process
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out

# the same work on both parallel paths: one sample (its positions split over
# the threads) and two samples (one per thread)
cases = [make_inputs(N=1, C=1, S=(64, 64), B=16, K=128, dtype=torch.float32, seed=9),
         make_inputs(N=2, C=1, S=(64, 32), B=16, K=128, dtype=torch.float32, seed=9)]
op = torch.ops.personvlad.person_vlad
for ins in cases:
    op(*ins, True)  # starts the thread pool
start = os.times()
before = cpu_seconds_by_thread()
for i in range(3000):  # until 0.6 s of CPU time are spent (about 30 calls on the 2-core dev machine)
    for ins in cases:
        op(*ins, True)
    if i % 5 == 4 and sum(os.times()[:2]) - sum(start[:2]) > 0.6:
        break
after = cpu_seconds_by_thread()
spent = {t: after[t] - before.get(t, 0.0) for t in after}
own = spent.pop(threading.get_native_id())
print(own, sum(spent.values()))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads per-thread CPU time from /proc")
def test_tile_loops_run_on_every_thread():
    """The kernels' at::parallel_for loops really run on torch's threads.
    at::parallel_for is a header template: compiled without -fopenmp it runs
    every loop on the calling thread, which the extension once did with no
    test noticing (the results are the same).  With C=1 the GEMMs are
    negligible and nearly all the work is the tile loops, so with 2 threads
    the other thread must do about half of it, on both parallel paths
    (equal work on each: were one serial, the other thread would do a third
    of the calling thread's share and the test fail).  CPU time, not wall time (a
    busy machine does not change it), in a fresh process with
    OMP_WAIT_POLICY=passive, so that idle OpenMP threads sleep instead of
    spinning (spinning counts as CPU time)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's intra-op threads are not OpenMP's")
    env = dict(os.environ, OMP_WAIT_POLICY="passive", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _THREAD_PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    own, others = map(float, r.stdout.split()[-2:])
    assert own + others > 0.3, f"too little work to judge: {own + others:.2f} s of CPU"
    assert others > 0.5 * own, (f"the other thread spent {others:.2f} s of CPU against the calling thread's "
                                f"{own:.2f} s: the loops ran on one thread (extension built without OpenMP?)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_position_tiles_split_over_threads(two_threads, dtype):
    """One sample with B*K > 1024 splits its position tiles (16 floats or 8
    doubles, the last one partial here: P=45) over the threads; the result
    has the same bits as one thread's run, and matches the oracle."""
    ins = make_inputs(N=1, C=12, S=(5, 9), B=4, K=260, dtype=dtype, seed=6)
    grad = torch.randn(1, 260 * 12, dtype=dtype, generator=torch.Generator().manual_seed(3))
    out2, g2 = OP(*ins, True), BWD(grad, *ins, True)
    torch.set_num_threads(1)
    out1, g1 = OP(*ins, True), BWD(grad, *ins, True)
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert_close(out2, oracle(ins, True), dtype)
    for got, want in zip(g2, oracle_grads(grad, ins, True)):
        assert_close(got, want, dtype, scale=4.0)


def test_backward_deterministic(two_threads):
    ins = make_inputs(N=7, C=8, S=(4, 5), B=3, K=6, dtype=torch.float32, seed=4)
    grad = torch.randn(7, 48)
    first = BWD(grad, *ins, True)
    for _ in range(3):
        for a, b in zip(BWD(grad, *ins, True), first):
            assert torch.equal(a, b)


def test_bitwise_same_on_a_fresh_thread():
    """Forward and backward give the same bits whichever thread runs them.
    autograd runs the backward on its own thread; with GCC's default FMA
    contraction the AVX-512 clone differed in the last bits in about 1 call
    in 15-20 from a fresh thread (at this, the engine tests' training shape),
    so a killed-and-resumed run drifted from the uninterrupted one.  The
    extension is built with -ffp-contract=off."""
    import threading

    ins = make_inputs(N=8, C=64, S=(1, 2, 1), B=2, K=8, dtype=torch.float32, seed=0)
    grad = torch.randn(8, 8 * 64, generator=torch.Generator().manual_seed(1))
    ref_out, ref_g = OP(*ins, True), BWD(grad, *ins, True)
    bad = []
    for i in range(120):
        res = {}

        def work():
            fresh = [t.clone() for t in ins]  # new addresses each time, like a training step
            res["out"] = OP(*fresh, True)
            res["g"] = BWD(grad.clone(), *fresh, True)

        t = threading.Thread(target=work)
        t.start()
        t.join()
        if not torch.equal(res["out"], ref_out) or not all(torch.equal(a, b) for a, b in zip(res["g"], ref_g)):
            bad.append(i)
    assert bad == [], f"{len(bad)} of 120 calls from fresh threads differed from the main thread's result"


def test_autocast_region_does_not_reach_the_kernels():
    """The op has no Autocast kernel; the C++ kernels exclude autocast
    themselves, else the backward's ATen bmm calls return bf16 under
    torch.autocast("cpu") and the kernel fails on data_ptr<float>.  Same bits
    inside and outside the region, direct calls and through autograd."""
    ins = make_inputs(N=3, C=8, S=(2, 3), B=2, K=5, dtype=torch.float32, seed=1)
    grad = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    out, g = OP(*ins, True), BWD(grad, *ins, True)
    leaves = [t.detach().requires_grad_(True) for t in ins]
    ag = torch.autograd.grad(ops.person_vlad(*leaves, backend="cpu"), leaves, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(OP(*ins, True), out)
        assert all(torch.equal(a, b) for a, b in zip(BWD(grad, *ins, True), g))
        ag_ac = torch.autograd.grad(ops.person_vlad(*leaves, backend="cpu"), leaves, grad)
    assert all(torch.equal(a, b) for a, b in zip(ag_ac, ag))


# --------------------------------------------------------------------------
# the position-tile kernels (csrc/cpu/vlad_tiles.h) on every instruction set
# --------------------------------------------------------------------------
# The extension builds its tile loops three times (avx512f on 64-byte
# vectors, avx2 on 32, the x86-64 baseline on 16) and runs the widest the CPU
# supports (PERSONVLAD_CPU_TILES picks another), so a test run of the
# extension covers one.  These tests compile the header alone for each
# instruction set this CPU can run, with that instance's vector width, and
# check that all give the same bits (same operations in the same order,
# whatever the vector width) and match a float64 computation of the formulas.
TILES_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cpu"
_TILES_API = r"""
#include "vlad_tiles.h"
using namespace personvlad::cpu_tiles;
extern "C" void tiles_fwd(const float* G, const float* M, const float* z, int64_t B, int64_t P,
                          int64_t K, float* A, float* S) {
  TileArgs<float> r;
  r.G = G; r.M = M; r.z = z; r.B = B; r.P = P; r.K = K; r.A = A; r.S = S;
  VecBuffer buf(5 * K);
  forward_tiles_impl<float, PV_TEST_NB>(r, 0, P, buf.as<float, PV_TEST_NB>());
}
extern "C" void tiles_bwd(const float* G, const float* M, const float* z, const float* dA,
                          const float* ds, int64_t B, int64_t P, int64_t K, float* dG, float* DZ,
                          float* dM) {
  TileArgs<float> r;
  r.G = G; r.M = M; r.z = z; r.B = B; r.P = P; r.K = K;
  r.dA = dA; r.ds = ds; r.dG = dG; r.DZ = DZ; r.dM = dM;
  VecBuffer buf(5 * K);
  backward_tiles_impl<float, PV_TEST_NB>(r, 0, P, buf.as<float, PV_TEST_NB>());
}
"""
@pytest.fixture(scope="module")
def tile_libs(tmp_path_factory):
    """{isa: ctypes library} for every instruction set this CPU runs."""
    cxx = host_cxx()
    if cxx is None:
        pytest.skip("needs an x86-64 host C++ compiler")
    d = tmp_path_factory.mktemp("tiles")
    (d / "tiles.cpp").write_text(_TILES_API)
    libs = {}
    for isa in runnable_tile_isas():
        extra, nb = TILE_ISAS[isa]
        lib = d / f"libtiles_{isa}.so"
        # the extension's own flags (setup.py), at the instance's vector width
        cmd = [cxx, *CXX_FLAGS, *extra, f"-DPV_TEST_NB={nb}", "-shared", "-fPIC",
               "-I", str(TILES_DIR), "-o", str(lib), str(d / "tiles.cpp")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"vlad_tiles.h does not compile for {isa}:\n" + r.stderr[-4000:]
        libs[isa] = ctypes.CDLL(str(lib))
    return libs


def _ptr(t):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _run_tiles(lib, G, M, z, dA, ds):
    K, P = G.shape
    B = 1 if M is None else M.shape[0]
    i64 = ctypes.c_int64
    A, S, dG, DZ = (torch.full((K, P), float("nan")) for _ in range(4))
    dM = None if M is None else torch.full((B, P), float("nan"))
    lib.tiles_fwd(_ptr(G), _ptr(M), _ptr(z), i64(B), i64(P), i64(K), _ptr(A), _ptr(S))
    lib.tiles_bwd(_ptr(G), _ptr(M), _ptr(z), _ptr(dA), _ptr(ds), i64(B), i64(P), i64(K),
                  _ptr(dG), _ptr(DZ), _ptr(dM))
    return [A, S, dG, DZ] + ([] if dM is None else [dM])


def _tiles_f64(G, M, z, dA, ds):
    """The tile kernels' outputs from their formulas, in float64."""
    G, z, dA, ds = (t.double() for t in (G, z, dA, ds))
    M = torch.ones(1, G.shape[1], dtype=torch.float64) if M is None else M.double()
    a = torch.softmax(M[:, None, :] * G[None] + z[None, :, None], dim=1)  # (B, K, P)
    A, S = (a * M[:, None]).sum(0), a.sum(0)
    da = dA[None] * M[:, None] + ds[None, :, None]
    dl = a * (da - (a * da).sum(1, keepdim=True))
    dM = (a * dA[None]).sum(1) + (dl * G[None]).sum(1)
    return [A, S, (dl * M[:, None]).sum(0), dl.sum(0), dM]


@pytest.mark.parametrize("P, K, parts", [(45, 13, 3), (16, 64, 6), (7, 5, 0)])
def test_tile_kernels_same_bits_on_every_instruction_set(tile_libs, P, K, parts):
    g = torch.Generator().manual_seed(P * K + parts)
    G = torch.randn(K, P, generator=g) * 8  # logits of a few units: a peaked softmax
    M = torch.rand(parts, P, generator=g) if parts else None
    z = torch.randn(K, generator=g)
    dA, ds = torch.randn(K, P, generator=g), torch.randn(K, generator=g)
    results = {isa: _run_tiles(lib, G, M, z, dA, ds) for isa, lib in tile_libs.items()}
    first_isa, first = next(iter(results.items()))
    want = _tiles_f64(G, M, z, dA, ds)[: len(first)]
    for got, w, name in zip(first, want, ["A'", "sum_b a", "dG", "sum_b dl", "dM"]):
        torch.testing.assert_close(got.double(), w, atol=2e-5, rtol=2e-4, msg=lambda m: f"{name}: {m}")
    for isa, outs in results.items():
        for a, b, name in zip(outs, first, ["A'", "sum_b a", "dG", "sum_b dl", "dM"]):
            assert torch.equal(a, b), f"{name}: {isa} differs from {first_isa}"
    assert "baseline" in results  # the x86-64 baseline always builds and runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("normalize", [True, False])
def test_extension_tile_instances_give_the_same_bits(monkeypatch, normalize, dtype):
    """The op (forward and all five gradients) with each tile instance this CPU
    runs, chosen by PERSONVLAD_CPU_TILES (read at each call): the same bits.
    P = 21: a partial last tile at every vector width."""
    g = torch.Generator().manual_seed(7)
    F = torch.randn(3, 24, 3, 7, generator=g, dtype=dtype)
    M = torch.rand(3, 4, 3, 7, generator=g, dtype=dtype)
    W = torch.randn(10, 24, generator=g, dtype=dtype) * 3
    z, c = torch.randn(10, generator=g, dtype=dtype), torch.randn(10, 24, generator=g, dtype=dtype)
    shape = (3, 240) if normalize else (3, 10, 24)
    grad = torch.randn(shape, generator=g, dtype=dtype)
    results = {}
    for isa in runnable_tile_isas():
        monkeypatch.setenv("PERSONVLAD_CPU_TILES", isa)
        out = OP(F, M, W, z, c, normalize)
        results[isa] = [out, *BWD(grad, F, M, W, z, c, normalize)]
    first_isa, first = next(iter(results.items()))
    atol, rtol = tolerance(dtype)
    want = person_vlad_ref(*(t.double() for t in (F, M, W, z, c)), normalize)
    torch.testing.assert_close(first[0].double(), want, atol=atol, rtol=rtol)
    for isa, outs in results.items():
        for a, b, name in zip(outs, first, ["out", "dF", "dM", "dW", "dz", "dc"]):
            assert torch.equal(a, b), f"{name}: {isa} differs from {first_isa}"


def test_extension_tile_loops_are_inlined_into_their_instances():
    """Each instance (built with its target attribute) must hold its tile loops
    inline: code left out of line, such as a lambda's body, is built for the
    baseline target, where the instance's wide vectors run in scalar code
    (a lambda in the backward loop once slowed the AVX-512 backward that way).
    So the extension has no out-of-line symbol of the loop templates."""
    nm = shutil.which("nm")
    lib = getattr(ops._C, "__file__", None)
    if nm is None or lib is None:
        pytest.skip("needs binutils' nm and the compiled extension")
    r = subprocess.run([nm, "-C", lib], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    if "BackwardPass" not in r.stdout:
        pytest.skip("the extension's local symbols are stripped: nothing to read")
    names = [line for line in r.stdout.splitlines()
             if ("cpu_tiles::" in line and "_tiles_impl" in line) or "Pass::run" in line]
    assert names == [], "tile loop code out of line:\n" + "\n".join(names[:10])


def test_extension_tile_instance_switch_rejects_bad_values(monkeypatch):
    F, M, W, z, c = make_inputs(N=2, C=4, S=(2, 3), B=2, K=3)
    monkeypatch.setenv("PERSONVLAD_CPU_TILES", "sse9")
    with pytest.raises(ValueError, match="PERSONVLAD_CPU_TILES: expected avx512f, avx2 or baseline"):
        OP(F, M, W, z, c, True)
    monkeypatch.setenv("PERSONVLAD_CPU_TILES", "")  # empty: the widest, like unset
    atol, rtol = tolerance(torch.float32)
    want = person_vlad_ref(*(t.double() for t in (F, M, W, z, c)), True)
    torch.testing.assert_close(OP(F, M, W, z, c, True).double(), want, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------
# the kernels' own checks (direct op calls bypass the Python door)
# --------------------------------------------------------------------------
def test_kernel_rejects_bad_input():
    """The registered op raises ValueError naming the argument, as the
    Python door does (SPEC §1), not TORCH_CHECK's RuntimeError."""
    F, M, W, z, c = make_inputs(N=2, C=4, S=(2, 3), B=2, K=3)
    with pytest.raises(ValueError, match=r"assign_weight: expected shape \(K, C=4\)"):
        OP(F, M, W[:, :3], z, c, True)
    with pytest.raises(ValueError, match="parts"):
        OP(F, M[:, :, :1], W, z, c, True)
    with pytest.raises(ValueError, match="centers"):
        OP(F, M, W, z, c[:2], True)
    with pytest.raises(ValueError, match="features"):
        OP(F.flatten(1), None, W, z, c, True)
    with pytest.raises(ValueError, match="features: expected a floating-point dtype"):
        OP(F.long(), M, W, z, c, True)
    with pytest.raises(ValueError, match="parts: expected a floating-point dtype"):
        OP(F, M.long(), W, z, c, True)
    out = OP(F, M, W, z, c, True)
    with pytest.raises(ValueError, match="grad_output"):
        BWD(out[:, :5], F, M, W, z, c, True)
    with pytest.raises(ValueError, match="grad_output"):
        BWD(out.long(), F, M, W, z, c, True)
