"""The CUDA backend (csrc/cuda/person_vlad_cuda.cu) of the fused op.

Without a CUDA device two kinds of tests run: the build/registration checks,
and ``test_kernel_source_emulated_*``, which compile the .cu's device code for
the CPU (csrc/cuda/cpu_emulation.h) and check the kernels' arithmetic and
indexing against the reference (the one-kernel forward of
PERSONVLAD_CUDA_FWD=fused too, at its real block size).  Everything marked ``@pytest.mark.cuda`` is
skipped here (tests/conftest.py) and runs on a GPU machine, where every CUDA
result is compared with the pure-PyTorch reference evaluated in float64 on the
same (dtype-rounded) inputs.  bench/gpu_cuda_memcheck.sh runs the kernels
under compute-sanitizer.
"""
import ctypes
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import GRIDS, PARTS, make_inputs, tolerance
from personvlad import ops, reference
from personvlad.ops import person_vlad

FWD = torch.ops.personvlad.person_vlad.default
BWD = torch.ops.personvlad.person_vlad_backward.default
ROOT = pathlib.Path(__file__).resolve().parents[1]
CU_SOURCE = ROOT / "csrc" / "cuda" / "person_vlad_cuda.cu"
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


def test_memcheck_driver_runs_on_cpu():
    """bench/memcheck_driver.py (what compute-sanitizer runs on the GPU) goes
    through all its cases on the CPU kernels: a bug in the driver would
    otherwise first show on a GPU machine (its non-contiguous inputs for C=1
    failed there once)."""
    if not ops.extension_loaded():
        pytest.skip("personvlad._C is not built")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memcheck_driver.py"), "--device", "cpu"],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "72 configurations" in proc.stdout  # 9 cases x 4 dtypes x normalize on/off


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


# ---------------------------------------------------------------- kernel source on the CPU
# The device code of person_vlad_cuda.cu (between its BEGIN/END DEVICE CODE
# markers) is compiled with the host C++ compiler against
# csrc/cuda/cpu_emulation.h and driven by a Python copy of the .cu's host
# pipeline (same GEMMs, same buffers).  Outputs start as NaN, so an element a
# kernel forgets to write fails the comparison.  This runs the real kernel
# arithmetic and indexing without a GPU (not the launch configuration, the
# half/bfloat16 output casts or the C++ host glue: the @cuda tests do those).
_EMU_API = r"""
#define PV_EXPORTS(T, SFX)                                                                      \
  extern "C" void stats_fwd_##SFX(const T* G, const T* M, const T* z, T* mx, T* iv, int64_t N,  \
                                  int64_t B, int64_t K, int64_t P) {                           \
    launch_serial((N * B * P + kFlatThreads - 1) / kFlatThreads, kFlatThreads,                  \
                  [&] { softmax_stats_forward_kernel<T>(G, M, z, mx, iv, N, B, K, P); });       \
  }                                                                                             \
  extern "C" void acc_fwd_##SFX(const T* G, const T* M, const T* z, const T* mx, const T* iv,   \
                                T* Ap, T* Sc, int64_t N, int64_t B, int64_t K, int64_t P) {     \
    launch_serial((N * K * P + kFlatThreads - 1) / kFlatThreads, kFlatThreads, [&] {            \
      assign_accumulate_forward_kernel<T>(G, M, z, mx, iv, Ap, Sc, N, B, K, P);                 \
    });                                                                                         \
  }                                                                                             \
  extern "C" void stats_bwd_##SFX(const T* G, const T* M, const T* z, const T* dAp,             \
                                  const T* dS, T* mx, T* iv, T* dot, T* dM, int64_t N,          \
                                  int64_t B, int64_t K, int64_t P) {                           \
    launch_serial((N * B * P + kFlatThreads - 1) / kFlatThreads, kFlatThreads, [&] {            \
      softmax_stats_backward_kernel<T>(G, M, z, dAp, dS, mx, iv, dot, dM, N, B, K, P);          \
    });                                                                                         \
  }                                                                                             \
  extern "C" void acc_bwd_##SFX(const T* G, const T* M, const T* z, const T* dAp, const T* dS,  \
                                const T* mx, const T* iv, const T* dot, T* dG, T* dZc,          \
                                int64_t N, int64_t B, int64_t K, int64_t P) {                  \
    launch_serial((N * K * P + kFlatThreads - 1) / kFlatThreads, kFlatThreads, [&] {            \
      assign_accumulate_backward_kernel<T>(G, M, z, dAp, dS, mx, iv, dot, dG, dZc, N, B, K, P); \
    });                                                                                         \
  }                                                                                             \
  extern "C" int epi_fwd_##SFX(const T* Vraw, const T* S, const T* c, T* out, T* rn,            \
                               int64_t N, int64_t K, int64_t C, int normalize, int threads) {   \
    return launch_threads(N, threads, [=] {                                                     \
      epilogue_forward_kernel<T, T>(Vraw, S, c, out, rn, K, C, normalize != 0);                 \
    }) ? 0 : 1;                                                                                 \
  }                                                                                             \
  extern "C" int epi_bwd_##SFX(const T* Vraw, const T* S, const T* c, const T* dO, T* dV,       \
                               T* dS, T* nrm, int64_t N, int64_t K, int64_t C, int normalize,   \
                               int threads) {                                                   \
    return launch_threads(N, threads, [=] {                                                     \
      epilogue_backward_kernel<T>(Vraw, S, c, dO, dV, dS, nrm, K, C, normalize != 0);           \
    }) ? 0 : 1;                                                                                 \
  }
PV_EXPORTS(float, f32)
PV_EXPORTS(double, f64)
#define PV_FUSED_EXPORT(IN, ACC, TC, NAME)                                                      \
  extern "C" int64_t NAME(const IN* F, const IN* M, const ACC* W, const ACC* z, const ACC* c,   \
                          IN* out, int64_t N, int64_t C, int64_t P, int64_t B, int64_t K,       \
                          int normalize, int64_t sms, int64_t smem_limit, int64_t forced,       \
                          int reverse) {                                                        \
    /* returns the splits used, -1 when a barrier broke, -2 when no plan, -3 when the */        \
    /* chain's counters are not where a whole launch leaves them, -4 when a block */            \
    /* found a turn not yet given (on a GPU it would have waited for a later block) */          \
    const FusedSplit plan = fused_forward_split(N, P, K, B, sms, smem_limit, forced, TC);       \
    if (plan.splits == 0) return -2;                                                            \
    const bool split = plan.splits > 1;                                                         \
    std::vector<ACC> part_s(split ? N * plan.splits * K : 0, std::numeric_limits<ACC>::quiet_NaN()); \
    std::vector<uint16_t> lo(split && sizeof(IN) == 2 ? N * K * C : 0, uint16_t(0xffff));      \
    const int64_t nch = fused_v_chunks(K, C);                                                   \
    std::vector<unsigned> sync(split ? 1 + N * nch : 0, 0u);                                    \
    ACC* ps = split ? part_s.data() : nullptr;                                                  \
    uint16_t* vl = lo.empty() ? nullptr : lo.data();                                            \
    unsigned* sy = split ? sync.data() : nullptr;                                               \
    pv_emu::reverse_blocks = reverse != 0;                                                      \
    pv_emu::turn_not_given = false;                                                             \
    const bool ok = launch_threads(N * plan.splits, kFusedThreads, [=] {                        \
      fused_forward_kernel<IN, IN, ACC, TC>(F, M, W, z, c, out, static_cast<int>(C),            \
                                            static_cast<int>(P), static_cast<int>(B),           \
                                            static_cast<int>(K), normalize != 0,                \
                                            static_cast<int>(plan.splits),                      \
                                            static_cast<int>(plan.chunk), vl, ps, sy);          \
    }, static_cast<size_t>(plan.smem_elems) * sizeof(ACC));                                     \
    pv_emu::reverse_blocks = false;                                                             \
    if (!ok) return -1;                                                                         \
    if (pv_emu::turn_not_given) return -4;                                                      \
    if (split) {                                                                                \
      if (sync[0] != N * plan.splits) return -3;                                                \
      for (int64_t i = 1; i <= N * nch; ++i)                                                    \
        if (sync[i] != static_cast<unsigned>(plan.splits - 1)) return -3;                       \
    }                                                                                           \
    return plan.splits;                                                                         \
  }
PV_FUSED_EXPORT(float, float, false, fused_fwd_f32)
PV_FUSED_EXPORT(double, double, false, fused_fwd_f64)
// PERSONVLAD_CUDA_FWD=fused-tc: phase B on the emulated tensor cores
PV_FUSED_EXPORT(__nv_bfloat16, float, true, fused_fwd_tc_bf16)
#define PV_FUSED_BWD_EXPORT(T, SFX)                                                             \
  extern "C" int fused_bwd_##SFX(const T* gO, const T* F, const T* M, const T* W, const T* z,  \
                                 const T* c, T* dF, T* dM, T* dWp, T* dcp, T* dzp, int64_t N,   \
                                 int64_t C, int64_t P, int64_t B, int64_t K, int normalize) {   \
    const size_t smem = static_cast<size_t>(fused_bwd_smem_elems(K, P, B, C)) * sizeof(T);      \
    return launch_threads(N, kFusedThreads, [=] {                                               \
      fused_backward_kernel<T, T, T>(gO, F, M, W, z, c, dF, dM, dWp, dcp, dzp,                  \
                                     static_cast<int>(C), static_cast<int>(P),                  \
                                     static_cast<int>(B), static_cast<int>(K), normalize != 0); \
    }, smem) ? 0 : 1;                                                                           \
  }
PV_FUSED_BWD_EXPORT(float, f32)
PV_FUSED_BWD_EXPORT(double, f64)
extern "C" int epilogue_threads() { return kEpilogueThreads; }
extern "C" void fused_split_plan(int64_t N, int64_t P, int64_t K, int64_t B, int64_t sms, int64_t smem_limit,
                                 int64_t forced, int tc, int64_t* out) {
  const FusedSplit plan = fused_forward_split(N, P, K, B, sms, smem_limit, forced, tc != 0);
  out[0] = plan.splits;
  out[1] = plan.chunk;
  out[2] = plan.smem_elems;
}
"""


@pytest.fixture(scope="module")
def emulated_kernels(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build the emulated kernels")
    src = CU_SOURCE.read_text()
    begin, end = src.index("// BEGIN DEVICE CODE"), src.index("// END DEVICE CODE")
    code = (
        '#include "cpu_emulation.h"\nnamespace pv_kernels {\n' + src[begin:end]
        + "\n}  // namespace pv_kernels\nusing namespace pv_kernels;\n" + _EMU_API
    )
    d = tmp_path_factory.mktemp("cuda_emulation")
    (d / "emu.cpp").write_text(code)
    lib = d / "libpv_emu.so"
    cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
           "-I", str(CU_SOURCE.parent), "-o", str(lib), str(d / "emu.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, "device code does not compile for the CPU emulation:\n" + r.stderr[-4000:]
    return ctypes.CDLL(str(lib))


class _Emu:
    """Python copy of person_vlad_cuda.cu's host code around the emulated kernels.

    ``epi_threads``: block size of the epilogue kernels; the .cu launches
    kEpilogueThreads (256), fewer (a multiple of 32) keeps the emulation quick
    on small machines and gives each warp more rows."""

    def __init__(self, lib, epi_threads=64, split=False):
        self.lib = lib
        self.epi_threads = epi_threads
        self.split = split  # PERSONVLAD_CUDA_BF16_GEMM=split3 (bfloat16 features only)

    def _call(self, name, acc, *args):
        conv = []
        for a in args:
            if a is None or isinstance(a, torch.Tensor):
                conv.append(ctypes.c_void_p(None if a is None else a.data_ptr()))
            elif isinstance(a, bool):
                conv.append(ctypes.c_int(int(a)))
            else:
                conv.append(ctypes.c_int64(a))
        if not name.startswith("fused_fwd_tc"):  # those are named in full
            name = f"{name}_{'f64' if acc == torch.float64 else 'f32'}"
        fn = getattr(self.lib, name)
        fn.restype = ctypes.c_int64 if name.startswith("fused_fwd") else ctypes.c_int
        rc = fn(*conv)
        if name.startswith("fused_fwd"):  # the splits it ran with
            assert rc != -1, f"{name}: a __syncthreads/__shfl_xor_sync was not reached by all threads"
            assert rc != -2, f"{name}: no split of the sample fits the shared memory given"
            assert rc != -3, f"{name}: the split samples' chain did not run its whole course (start counter, turns)"
            assert rc != -4, f"{name}: a block of a split sample found its turn not given (it would wait on a GPU)"
            assert rc >= 1, rc
            return rc
        if name.startswith(("epi", "fused")):
            assert rc == 0, f"{name}: a __syncthreads/__shfl_xor_sync was not reached by all threads"

    @staticmethod
    def _nan(shape, acc):
        return torch.full(shape, float("nan"), dtype=acc)

    def flatten(self, features, parts, W, z, c):
        N, C = features.shape[:2]
        acc = torch.float64 if features.dtype == torch.float64 else torch.float32
        self.on = self.split and features.dtype == torch.bfloat16
        F = features.reshape(N, C, -1).to(torch.bfloat16 if self.on else acc).contiguous()
        M = None if parts is None else parts.reshape(N, parts.shape[1], -1).to(acc).contiguous()
        B = 1 if parts is None else parts.shape[1]
        return F, M, W.to(acc).contiguous(), z.to(acc).contiguous(), c.to(acc).contiguous(), B, acc

    def gemm(self, a, b):
        """gemm_with_F: a @ b, b = F or F^T (bf16 under the split path)."""
        return _gemm_split3(a, b) if self.on else torch.matmul(a, b)

    def core(self, F, M, W, z, B, acc):
        N, C, P = F.shape
        K = W.shape[0]
        G = self.gemm(W, F).contiguous()
        Ap, Sc = self._nan((N, K, P), acc), self._nan((N, K, P), acc)
        mx, iv = self._nan((N, B, P), acc), self._nan((N, B, P), acc)
        self._call("stats_fwd", acc, G, M, z, mx, iv, N, B, K, P)
        self._call("acc_fwd", acc, G, M, z, mx, iv, Ap, Sc, N, B, K, P)
        return G, Ap, Sc.sum(2), self.gemm(Ap, F.transpose(1, 2)).contiguous()

    def forward(self, features, parts, W, z, c, normalize):
        F, M, Wc, zc, cc, B, acc = self.flatten(features, parts, W, z, c)
        N, C, _ = F.shape
        K = Wc.shape[0]
        _, _, S, Vraw = self.core(F, M, Wc, zc, B, acc)
        out, rn = self._nan((N, K, C), acc), self._nan((N, K), acc)
        self._call("epi_fwd", acc, Vraw, S, cc, out, rn, N, K, C, normalize, self.epi_threads)
        return (out.reshape(N, K * C) if normalize else out).to(features.dtype)

    def fused_forward(self, features, parts, W, z, c, normalize, sms=None, smem_limit=1 << 40, forced=0,
                      reverse=False):
        """fused_forward of the .cu (PERSONVLAD_CUDA_FWD=fused): one launch
        of fused_forward_kernel, N * splits blocks of kFusedThreads, split
        by fused_forward_split for a GPU of ``sms`` SMs (default N: one block
        per sample unless A' does not fit ``smem_limit`` elements) or
        ``forced`` splits; blocks run last to first with ``reverse``.  F in
        its own dtype (here the accumulation dtype: the emulation has no
        half types).  Sets ``self.splits`` to the splits it ran with."""
        F, M, Wc, zc, cc, B, acc = self.flatten(features, parts, W, z, c)
        N, C, P = F.shape
        K = Wc.shape[0]
        out = self._nan((N, K, C), acc)
        self.splits = self._call("fused_fwd", acc, F, M, Wc, zc, cc, out, N, C, P, B, K, normalize,
                                 N if sms is None else sms, smem_limit, forced, bool(reverse))
        return (out.reshape(N, K * C) if normalize else out).to(features.dtype)

    def fused_forward_tc(self, features, parts, W, z, c, normalize, sms=None, smem_limit=1 << 40, forced=0,
                         reverse=False):
        """fused_forward with PERSONVLAD_CUDA_FWD=fused-tc: fused_forward_kernel
        with phase B on the emulated tensor cores, for float16 / bfloat16
        features; F, M and the output in that dtype, W, z, c in float32, as
        the .cu launches it.  Sets ``self.splits``."""
        dt = features.dtype
        N, C = features.shape[:2]
        F = features.reshape(N, C, -1).contiguous()
        P = F.shape[2]
        M = None if parts is None else parts.reshape(N, parts.shape[1], -1).to(dt).contiguous()
        B = 1 if parts is None else parts.shape[1]
        Wc, zc, cc = (t.float().contiguous() for t in (W, z, c))
        K = Wc.shape[0]
        out = self._nan((N, K, C), dt)
        name = {torch.bfloat16: "fused_fwd_tc_bf16", torch.float16: "fused_fwd_tc_f16"}[dt]
        self.splits = self._call(name, None, F, M, Wc, zc, cc, out, N, C, P, B, K, normalize,
                                 N if sms is None else sms, smem_limit, forced, bool(reverse))
        return out.reshape(N, K * C) if normalize else out

    def fused_backward(self, grad, features, parts, W, z, c, normalize):
        """fused_backward of the .cu (PERSONVLAD_CUDA_BWD=fused): one launch
        of fused_backward_kernel, then the batch sums of the partials."""
        F, M, Wc, zc, cc, B, acc = self.flatten(features, parts, W, z, c)
        N, C, P = F.shape
        K = Wc.shape[0]
        gO = grad.reshape(N, K, C).to(acc).contiguous()
        dF, dWp, dcp = self._nan((N, C, P), acc), self._nan((N, K, C), acc), self._nan((N, K, C), acc)
        dzp = self._nan((N, K), acc)
        dM = None if M is None else self._nan((N, B, P), acc)
        self._call("fused_bwd", acc, gO, F, M, Wc, zc, cc, dF, dM, dWp, dcp, dzp, N, C, P, B, K, normalize)
        return (
            dF.to(features.dtype).reshape(features.shape),
            features.new_empty(0) if parts is None else dM.to(parts.dtype).reshape(parts.shape),
            dWp.sum(0).to(W.dtype), dzp.sum(0).to(z.dtype), dcp.sum(0).to(c.dtype),
        )

    def backward(self, grad, features, parts, W, z, c, normalize):
        F, M, Wc, zc, cc, B, acc = self.flatten(features, parts, W, z, c)
        N, C, P = F.shape
        K = Wc.shape[0]
        G, Ap, S, Vraw = self.core(F, M, Wc, zc, B, acc)
        gO = grad.reshape(N, K, C).to(acc).contiguous()
        dV, dS, nrm = self._nan((N, K, C), acc), self._nan((N, K), acc), self._nan((N, K), acc)
        self._call("epi_bwd", acc, Vraw, S, cc, gO, dV, dS, nrm, N, K, C, normalize, self.epi_threads)
        dAp = self.gemm(dV, F).contiguous()
        dc = -(dV * S.unsqueeze(2)).sum(0)
        dG, dZc = self._nan((N, K, P), acc), self._nan((N, K, P), acc)
        dM = None if M is None else self._nan((N, B, P), acc)
        mx, iv, dot = (self._nan((N, B, P), acc) for _ in range(3))
        self._call("stats_bwd", acc, G, M, zc, dAp, dS, mx, iv, dot, dM, N, B, K, P)
        self._call("acc_bwd", acc, G, M, zc, dAp, dS, mx, iv, dot, dG, dZc, N, B, K, P)
        dF = torch.baddbmm(torch.matmul(Wc.t(), dG), dV.transpose(1, 2), Ap)
        dW = self.gemm(dG, F.transpose(1, 2)).sum(0)
        return (
            dF.to(features.dtype).reshape(features.shape),
            features.new_empty(0) if parts is None else dM.to(parts.dtype).reshape(parts.shape),
            dW.to(W.dtype), dZc.sum((0, 2)).to(z.dtype), dc.to(c.dtype),
        )


def _split3(a):
    """split3_rows of the .cu: float32 ``a`` as bf16 pieces hi, mid, lo (as float32)."""
    hi = a.to(torch.bfloat16).float()
    r = a - hi
    mid = r.to(torch.bfloat16).float()
    return hi, mid, (r - mid).to(torch.bfloat16).float()


def _gemm_split3(a, b):
    """bmm_split3 of the .cu: each piece times the bf16 ``b`` is exact in float32
    (8-bit mantissas), accumulated in float32; then (hi + mid) + lo."""
    hi, mid, lo = _split3(a)
    bf = b.float()
    return (torch.matmul(hi, bf) + torch.matmul(mid, bf)) + torch.matmul(lo, bf)


_EMU_CASES = (
    [dict(S=S, B=B, K=5, C=6) for S in GRIDS for B in PARTS]
    + [dict(S=(3, 5), B=B, K=K, C=C) for B in (None, 6) for K, C in ((1, 3), (4, 1), (19, 40))]
    + [dict(S=(7, 13), B=2, K=3, C=5)]  # N*B*P and N*K*P not multiples of the block size
)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", _EMU_CASES, ids=lambda c: f"S{'x'.join(map(str, c['S']))}-B{c['B']}-K{c['K']}-C{c['C']}")
def test_kernel_source_emulated_on_cpu(emulated_kernels, case, dtype):
    # the many-rows case with the real block size, the others with 2 warps
    threads = emulated_kernels.epilogue_threads() if case["K"] == 19 else 64
    emu = _Emu(emulated_kernels, epi_threads=threads)
    alphas = (None, 30.0) if case["B"] == 6 else (None,)  # alpha couples W, z to the centers
    for normalize in (True, False):
        for alpha in alphas:
            args = make_inputs(N=3, dtype=dtype, alpha=alpha, seed=case["K"] + case["C"], **case)
            out = emu.forward(*args, normalize)
            atol, rtol = tolerance(dtype)
            torch.testing.assert_close(out.double(), _ref64(args, normalize), atol=atol, rtol=rtol)
            gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
            gout = gout.to(dtype)
            _check_grads(emu.backward(gout, *args, normalize), _grads_ref64(gout, args, normalize), args, dtype)


@pytest.mark.parametrize("alpha", [None, 1000.0], ids=["randinit", "alpha1000"])
def test_split_bf16_gemms_emulated_match_float32_gemms(emulated_kernels, alpha):
    """PERSONVLAD_CUDA_BF16_GEMM=split3 (bf16 tensor-core GEMMs with the float32
    operand in three bf16 pieces): the emulated host pipeline is as accurate as
    the float32-GEMM path against float64 (within 2x, for the logits, A', S,
    raw V and the float32 parameter gradients), also at alpha=1000 where
    logits are ~1e3, and the output and gradients pass the bf16 check."""
    args = make_inputs(N=3, C=40, S=(7, 13), B=3, K=9, dtype=torch.bfloat16, alpha=alpha, seed=21)
    assert args[0].dtype == torch.bfloat16 and args[2].dtype == torch.float32
    split, plain = _Emu(emulated_kernels, split=True), _Emu(emulated_kernels, split=False)
    cores = []
    for emu, a in ((split, args), (plain, args), (plain, [t.double() for t in args])):
        F, M, W, z, c, B, acc = emu.flatten(*a)
        cores.append(emu.core(F, M, W, z, B, acc))
    assert split.on and not plain.on
    for name, a, b, e in zip(("G", "Ap", "S", "Vraw"), *cores):
        err_split, err_plain = ((t.double() - e).abs().max().item() for t in (a, b))
        assert err_split <= 2 * err_plain + 1e-7 * e.abs().max().item(), (name, err_split, err_plain)
    for normalize in (True, False):
        out = split.forward(*args, normalize)
        atol, rtol = tolerance(torch.bfloat16)
        torch.testing.assert_close(out.double(), _ref64(args, normalize), atol=atol, rtol=rtol)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
        g_split = split.backward(gout, *args, normalize)
        _check_grads(g_split, _grads_ref64(gout, args, normalize), args, torch.bfloat16)
        g_plain = plain.backward(gout, *args, normalize)
        g_64 = plain.backward(gout.double(), *[t.double() for t in args], normalize)
        for name, a, b, e in list(zip(NAMES, g_split, g_plain, g_64))[2:]:  # W, z, c: float32 gradients
            err_split, err_plain = ((t.double() - e).abs().max().item() for t in (a, b))
            assert err_split <= 2 * err_plain + 1e-7 * e.abs().max().item(), (name, err_split, err_plain)


# The one-kernel forward: one tile of 32 positions and one V chunk (the
# paper-like path, V kept in registers); several position tiles and staged F
# chunks (P = 91); two row chunks (K = 70 > 64) and two column chunks
# (C = 300 > 256), where V is computed twice; every grid rank; K = 1 and C = 1.
_FUSED_CASES = (
    [dict(S=S, B=B, K=5, C=6) for S in GRIDS for B in PARTS]
    + [dict(S=(7, 13), B=2, K=3, C=5), dict(S=(3, 5), B=6, K=19, C=40), dict(S=(3, 5), B=3, K=70, C=20),
       dict(S=(2, 9), B=None, K=3, C=300), dict(S=(5,), B=2, K=1, C=4), dict(S=(5,), B=2, K=4, C=1),
       dict(S=(2, 3, 6), B=16, K=6, C=9)]
)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", _FUSED_CASES,
                         ids=lambda c: f"S{'x'.join(map(str, c['S']))}-B{c['B']}-K{c['K']}-C{c['C']}")
def test_fused_forward_emulated_on_cpu(emulated_kernels, case, dtype):
    """fused_forward_kernel (PERSONVLAD_CUDA_FWD=fused) with its real block
    size, against the float64 reference and the emulated default path;
    dynamic shared memory starts as NaN, so a read of a slot the kernel never
    wrote shows in the output."""
    emu = _Emu(emulated_kernels)
    alphas = (None, 30.0) if case["B"] in (6, 16) else (None,)
    for normalize in (True, False):
        for alpha in alphas:
            args = make_inputs(N=3, dtype=dtype, alpha=alpha, seed=case["K"] + case["C"] + 1, **case)
            out = emu.fused_forward(*args, normalize)
            atol, rtol = tolerance(dtype)
            torch.testing.assert_close(out.double(), _ref64(args, normalize), atol=atol, rtol=rtol)
            torch.testing.assert_close(out, emu.forward(*args, normalize), atol=atol, rtol=rtol)


# Split samples: several blocks per sample (forced, or because A' of the whole
# grid is over the shared memory given), partial sums handed to the last block.
_SPLIT_CASES = [
    (dict(S=(7, 13), B=2, K=3, C=5), dict(forced=2)),        # P = 91: 3 tiles, 2 blocks (64 + 27)
    (dict(S=(7, 13), B=2, K=3, C=5), dict(forced=3)),        # one tile per block
    (dict(S=(2, 5, 9), B=6, K=19, C=40), dict(sms=9)),       # filling 9 SMs with N = 3: 3 blocks each
    (dict(S=(3, 30), B=None, K=70, C=300), dict(forced=2)),  # two row and two column chunks of V
    (dict(S=(100,), B=16, K=6, C=9), dict(smem_limit=5200)),  # all of A' over the limit: 2 blocks of 64
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case,plan", _SPLIT_CASES,
                         ids=[f"P{math.prod(c['S'])}-K{c['K']}-C{c['C']}-{next(iter(p))}" for c, p in _SPLIT_CASES])
def test_fused_forward_split_emulated_on_cpu(emulated_kernels, case, plan, dtype):
    """fused_forward_kernel with samples split over several blocks: against
    float64 and the unsplit kernel; run with the blocks in reverse order
    (the blocks take their place in the chain from the order they start in,
    not from blockIdx) it gives the same bits; the export checks that the
    chain ran its whole course and that no block found its turn not given."""
    emu = _Emu(emulated_kernels)
    atol, rtol = tolerance(dtype)
    for normalize in (True, False):
        args = make_inputs(N=3, dtype=dtype, alpha=30.0 if case["B"] else None, seed=case["K"] + 3, **case)
        out = emu.fused_forward(*args, normalize, **plan)
        assert emu.splits > 1
        torch.testing.assert_close(out.double(), _ref64(args, normalize), atol=atol, rtol=rtol)
        whole = emu.fused_forward(*args, normalize)
        assert emu.splits == 1
        torch.testing.assert_close(out, whole, atol=atol, rtol=rtol)
        assert torch.equal(emu.fused_forward(*args, normalize, reverse=True, **plan), out)


# The one-kernel forward with both products on tensor cores
# (PERSONVLAD_CUDA_FWD=fused-tc), emulated: one V chunk kept in registers (the paper's K and C),
# masked rows (K = 19, 6, 1) and columns (C = 40, 9, 4), two row chunks
# (K = 70), two column chunks (C = 300), P not a multiple of the 16-position
# step, 16 parts; and samples split over blocks (forced), the partials then
# taking the tensor-core products.
_TC_CASES = [
    (dict(S=(2, 5), B=6, K=64, C=256), {}),
    (dict(S=(3, 5), B=6, K=19, C=40), {}),
    (dict(S=(3, 5), B=6, K=19, C=40, alpha=1000.0), {}),  # logits ~1e3: W's three pieces keep fp32's bits
    (dict(S=(3, 5), B=3, K=70, C=20), {}),
    (dict(S=(2, 9), B=None, K=3, C=300), {}),
    (dict(S=(5,), B=2, K=1, C=4), {}),
    (dict(S=(2, 3, 6), B=16, K=6, C=9), {}),
    (dict(S=(7, 13), B=2, K=3, C=5), dict(forced=2)),
    (dict(S=(3, 30), B=None, K=70, C=300), dict(forced=2)),
    (dict(S=(3, 30), B=2, K=70, C=300), dict(forced=3)),  # a chain of 3 blocks on 4 chunks, 16-bit sums
]


@pytest.mark.parametrize("case,plan", _TC_CASES, ids=[
    f"S{'x'.join(map(str, c['S']))}-B{c['B']}-K{c['K']}-C{c['C']}" + (f"-alpha{c['alpha']:g}" if "alpha" in c else "")
    + ("-split" if p else "") for c, p in _TC_CASES])
def test_fused_forward_tc_emulated_on_cpu(emulated_kernels, case, plan):
    """fused_forward_kernel<..., TC = true> (PERSONVLAD_CUDA_FWD=fused-tc) on
    the emulated wmma tiles, bfloat16 features: against float64 within the
    dtype's budget, and within one bf16 rounding step from the float32
    one-kernel forward on the same inputs -- W's three bf16 pieces keep its
    float32 bits (logits of 1e3 included) and A' hi + lo keeps 2^-17, far
    below the output's own rounding (2^-9): within 2x the error of the
    float32 kernel rounded to bf16, and at most 0.5% of the outputs round the
    other way (at alpha = 1000 the float32 logits' own rounding moves A' by
    ~1e-4, and more outputs round differently in either kernel).  Split samples give the same bits
    whichever block sums the partials.  NaN-filled shared memory and outputs
    catch a tile staged or stored short."""
    emu = _Emu(emulated_kernels)
    dtype = torch.bfloat16
    atol, rtol = tolerance(dtype)
    ulp = 2.0 ** -8  # bf16's relative rounding step (at most)
    for normalize in (True, False):
        kw = dict(case)
        alpha = kw.pop("alpha", 30.0 if case["B"] else None)
        args = make_inputs(N=3, dtype=dtype, alpha=alpha, seed=case["K"] + 7, **kw)
        assert args[0].dtype == dtype and args[2].dtype == torch.float32
        out = emu.fused_forward_tc(*args, normalize, **plan)
        assert out.dtype == dtype and (emu.splits > 1) == bool(plan)
        torch.testing.assert_close(out.double(), _ref64(args, normalize), atol=atol, rtol=rtol)
        f32 = emu.fused_forward(*[None if t is None else t.float() for t in args], normalize, **plan)
        scale = f32.abs().max().item()
        torch.testing.assert_close(out.float(), f32, atol=1e-5 * scale, rtol=ulp)
        # as accurate as the float32 kernel rounded to bf16, against float64
        ref = _ref64(args, normalize)
        err_tc, err_f32 = ((t.double() - ref).abs().max().item() for t in (out, f32.to(dtype)))
        assert err_tc <= 2 * err_f32 + 1e-6 * scale, (err_tc, err_f32)
        if alpha != 1000.0:  # there float32's own logit rounding moves ~1e-4 of A'
            assert (out != f32.to(dtype)).float().mean().item() <= 0.005
        if plan:
            assert torch.equal(emu.fused_forward_tc(*args, normalize, reverse=True, **plan), out)


def _plan(lib, N, P, K, B, sms, smem_bytes, forced=0, tc=False):
    out = (ctypes.c_int64 * 3)()
    lib.fused_split_plan(*(ctypes.c_int64(v) for v in (N, P, K, B, sms, smem_bytes // 4, forced)),
                         ctypes.c_int(int(tc)), out)
    return tuple(out)


def test_fused_forward_split_plan(emulated_kernels):
    """fused_forward_split: the fewest splits whose A' fits, raised to fill one
    wave of SMs (never below a 32-position tile per block), or forced."""
    lib, h200 = emulated_kernels, 232448  # an H100/H200's 227 KB opt-in shared memory per block
    # the paper's shape: 64 samples on 132 SMs, 2 blocks each (64 + 46 positions)
    assert _plan(lib, 64, 110, 64, 6, 132, h200)[:2] == (2, 64)
    # the large shape: all of A' (1568 positions) is over 227 KB; 4 blocks a sample fill 128 of 132 SMs
    splits, chunk, smem = _plan(lib, 32, 1568, 64, 8, 132, h200)
    assert (splits, chunk) == (4, 416) and smem * 4 <= h200
    # within 48 KB (sm_75): chunks of at most 160 positions
    splits, chunk, smem = _plan(lib, 32, 1568, 64, 8, 40, 48 * 1024)
    assert chunk <= 160 and splits * chunk >= 1568 and (splits - 1) * chunk < 1568 and smem * 4 <= 48 * 1024
    # as many samples as SMs: one block each, the whole grid
    assert _plan(lib, 132, 110, 64, 6, 132, h200)[:2] == (1, 110)
    # forced: as asked, but not below one tile per block, nor above what fits;
    # chunks are whole tiles, the same for every block: 3 asked of 4 tiles gives 2 x 2
    assert _plan(lib, 64, 110, 64, 6, 132, h200, forced=1)[:2] == (1, 110)
    assert _plan(lib, 64, 110, 64, 6, 132, h200, forced=3)[:2] == (2, 64)
    assert _plan(lib, 64, 110, 64, 6, 132, h200, forced=4)[:2] == (4, 32)
    assert _plan(lib, 64, 110, 64, 6, 132, h200, forced=50)[:2] == (4, 32)
    assert _plan(lib, 8, 1568, 64, 8, 132, h200, forced=1)[0] == 2
    # not one tile within the limit
    assert _plan(lib, 8, 110, 128, 16, 132, 8 * 1024)[0] == 0


# The one-kernel backward takes K <= 64 and C <= 256 (V and dV one register chunk).
_FUSED_BWD_CASES = [c for c in _FUSED_CASES if c["K"] <= 64 and c["C"] <= 256] + [
    dict(S=(2, 5), B=6, K=64, C=256)]  # the paper's K and C on a small grid


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", _FUSED_BWD_CASES,
                         ids=lambda c: f"S{'x'.join(map(str, c['S']))}-B{c['B']}-K{c['K']}-C{c['C']}")
def test_fused_backward_emulated_on_cpu(emulated_kernels, case, dtype):
    """fused_backward_kernel (PERSONVLAD_CUDA_BWD=fused) with its real block
    size: the five gradients against float64 and against the emulated default
    (gemm) path; NaN-filled outputs and shared memory catch unwritten or
    unread slots."""
    emu = _Emu(emulated_kernels)
    alphas = (None, 30.0) if case["B"] in (6, 16) else (None,)
    for normalize in (True, False):
        for alpha in alphas:
            args = make_inputs(N=2, dtype=dtype, alpha=alpha, seed=case["K"] + case["C"] + 2, **case)
            N, K, C = 2, case["K"], case["C"]
            gout = torch.randn((N, K * C) if normalize else (N, K, C),
                               generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(dtype)
            got = emu.fused_backward(gout, *args, normalize)
            _check_grads(got, _grads_ref64(gout, args, normalize), args, dtype)
            atol, rtol = tolerance(dtype)
            for name, a, b in zip(NAMES, got, emu.backward(gout, *args, normalize)):
                scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
                torch.testing.assert_close(a, b, atol=5 * atol * scale, rtol=5 * rtol, msg=lambda m: f"{name}: {m}")


_PTXAS_SOURCE = r"""
#include <algorithm>
#include <cstdint>
#include <cuda_bf16.h>
#include <mma.h>
#define PV_DYNAMIC_SMEM(name) extern __shared__ __align__(32) unsigned char name[]
namespace pv {
%s
#define PV_FUSED(IN, M, ACC) template __global__ void fused_forward_kernel<IN, M, ACC>( \
    const IN*, const M*, const ACC*, const ACC*, const ACC*, IN*, int, int, int, int, bool, int, int, \
    uint16_t*, ACC*, unsigned*); \
  template __global__ void fused_backward_kernel<IN, M, ACC>(const IN*, const IN*, const M*, const ACC*, \
    const ACC*, const ACC*, IN*, ACC*, ACC*, ACC*, ACC*, int, int, int, int, bool);
PV_FUSED(float, float, float)
PV_FUSED(__nv_bfloat16, __nv_bfloat16, float)
template __global__ void fused_forward_kernel<__nv_bfloat16, __nv_bfloat16, float, true>(
    const __nv_bfloat16*, const __nv_bfloat16*, const float*, const float*, const float*, __nv_bfloat16*, int,
    int, int, int, bool, int, int, uint16_t*, float*, unsigned*);
}
"""


def _nvcc():
    home = subprocess.run([sys.executable, str(ROOT / "setup.py"), "--print-cuda-home"], cwd=str(ROOT),
                          capture_output=True, text=True).stdout.strip()
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    return nvcc if nvcc and os.path.exists(nvcc) else None


@pytest.mark.parametrize("arch", ["90", "75"])
def test_fused_forward_kernel_keeps_registers_off_the_stack(tmp_path, arch):
    """ptxas on the .cu's device code, the one-kernel forward and backward
    instantiated as the extension does (float and bfloat16, and the forward
    with its tensor-core products for bfloat16; cuda_bf16's type standing in
    for c10's): no stack frame and no spills on sm_90 and sm_75.
    (Without the minimum of one block per SM in their __launch_bounds__,
    ptxas held the forward to 128 registers and spilled 64-100 bytes; the
    backward spilled 116 bytes while it held dO beside V in registers.)"""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc")
    src = CU_SOURCE.read_text()
    begin, end = src.index("// BEGIN DEVICE CODE"), src.index("// END DEVICE CODE")
    (tmp_path / "k.cu").write_text(_PTXAS_SOURCE % src[begin:end])
    r = subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "-Xptxas", "-v",
                        "-o", str(tmp_path / "k.cubin"), str(tmp_path / "k.cu")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    entries = r.stderr.split("Compiling entry function")[1:]
    fused = [e for e in entries if "fused_forward_kernel" in e.split("\n")[0]
             or "fused_backward_kernel" in e.split("\n")[0]]
    assert len(fused) == 5, r.stderr[-4000:]
    for e in fused:
        assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in e, e[:1500]


def test_kernel_source_emulated_empty_cluster(emulated_kernels):
    """One cluster that no position picks (alpha=1000, its center far away):
    its row of V is exactly 0, so its norm is clamped while the others' are
    not; the default path and the one-kernel passes against float64.  (The
    global normalisation's <out, dO> term does not reach the gradients even
    here: the intra-normalisation's backward projects it out of unclamped
    rows, and it multiplies V_k / eps = 0 in the clamped one; only a row with
    0 < |V_k| < eps would feel it, far below any precision.)"""
    emu = _Emu(emulated_kernels)
    F, M, W, z, c = make_inputs(N=2, C=6, S=(3, 5), B=2, K=4, dtype=torch.float64, alpha=1000.0, seed=8)
    c = c.clone()
    c[3] = 3.0
    W, z = 2 * 1000.0 * c, -1000.0 * (c * c).sum(1)
    args = [F, M, W, z, c]
    ref = _ref64(args, False)
    assert torch.equal(ref[:, 3], torch.zeros_like(ref[:, 3])) and ref[:, :3].abs().min() > 0
    for normalize in (True, False):
        expect = _ref64(args, normalize)
        gout = torch.randn(expect.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        gexp = _grads_ref64(gout, args, normalize)
        for fwd, bwd in ((emu.forward, emu.backward), (emu.fused_forward, emu.fused_backward)):
            torch.testing.assert_close(fwd(*args, normalize), expect, atol=1e-12, rtol=1e-9)
            _check_grads(bwd(gout, *args, normalize), gexp, args, torch.float64)


def test_kernel_source_emulated_zero_vlad(emulated_kernels):
    """V == 0 (features 0, centers 0): every norm is clamped to eps, in both
    forward paths (the default one and the one-kernel forward) and the backward."""
    emu = _Emu(emulated_kernels)
    F, M, W, z, c = make_inputs(N=2, C=4, S=(3,), B=2, K=3, dtype=torch.float64, seed=5)
    F = F.clone()
    F[0] = 0
    args = [F, M, W, z, torch.zeros_like(c)]
    for normalize in (True, False):
        out = emu.forward(*args, normalize)
        torch.testing.assert_close(out, _ref64(args, normalize), atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(emu.fused_forward(*args, normalize), _ref64(args, normalize),
                                   atol=1e-12, rtol=1e-9)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        _check_grads(emu.fused_backward(gout, *args, normalize), _grads_ref64(gout, args, normalize), args,
                     torch.float64)
        gout = torch.randn(out.shape, dtype=torch.float64)
        _check_grads(emu.backward(gout, *args, normalize), _grads_ref64(gout, args, normalize), args,
                     torch.float64)


def test_kernel_source_emulated_tiny_vlad_stays_a_unit_vector(emulated_kernels):
    """float32 inputs scaled so |V| ~ 1e-24: V_k^2 underflows, every row's
    norm is clamped, and |u|^2 must come from the sums of (V_k / eps)^2
    (unit_row_sq), not from sum V_k^2 / eps^2 (0: the output was then scaled
    by up to 1e12 instead of being a unit vector).  Both forward paths and
    both backward paths against float64."""
    emu = _Emu(emulated_kernels)
    F, M, W, z, c = make_inputs(N=2, C=6, S=(3, 5), B=2, K=4, dtype=torch.float32, seed=3)
    args = [F * 1e-24, M, W, z, c * 1e-24]
    expect = _ref64(args, True)
    assert (expect.norm(dim=1) - 1).abs().max() < 1e-12
    gout = torch.randn(expect.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    gexp = _grads_ref64(gout, args, True)
    for fwd, bwd in ((emu.forward, emu.backward), (emu.fused_forward, emu.fused_backward)):
        out = fwd(*args, True)
        torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-4)
        _check_grads(bwd(gout.float(), *args, True), gexp, args, torch.float32)


def test_kernel_source_emulated_nan_propagates(emulated_kernels):
    """A NaN feature makes its sample's output and gradients NaN, as torch's
    clamp_min does, not finite garbage: device max() (fmax) dropped a NaN norm
    for eps, and the backward's `!(x >= eps)` took NaN as clamped (gradients
    ~1e24).  The other sample is untouched."""
    emu = _Emu(emulated_kernels)
    F, M, W, z, c = make_inputs(N=2, C=6, S=(3, 5), B=2, K=4, dtype=torch.float64, seed=6)
    F = F.clone()
    F[0, 2, 1, 3] = float("nan")
    args = [F, M, W, z, c]
    expect = _ref64(args, True)
    assert expect[0].isnan().all() and not expect[1].isnan().any()
    gout = torch.randn(expect.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gexp = _grads_ref64(gout, args, True)
    assert gexp[0][0].isnan().all() and not gexp[0][1].isnan().any()
    for fwd, bwd in ((emu.forward, emu.backward), (emu.fused_forward, emu.fused_backward)):
        out = fwd(*args, True)
        assert out[0].isnan().all(), fwd.__name__
        torch.testing.assert_close(out[1], expect[1], atol=1e-12, rtol=1e-9)
        dF = bwd(gout, *args, True)[0]
        assert dF[0].isnan().all(), bwd.__name__
        torch.testing.assert_close(dF[1], gexp[0][1], atol=1e-9, rtol=1e-7)


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


def _shared_matrix(test):
    """Parametrises ``test`` over the shared matrix: grids, parts, normalize, dtypes."""
    for mark in (pytest.mark.parametrize("S", GRIDS, ids=lambda s: "x".join(map(str, s))),
                 pytest.mark.parametrize("B", PARTS, ids=lambda b: f"B{b}"),
                 pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"]),
                 pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))):
        test = mark(test)  # innermost first, as stacked decorators apply
    return test


# ---------------------------------------------------------------- forward parity
@pytest.mark.cuda
@_shared_matrix
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
@pytest.mark.parametrize("shape", [dict(N=3, C=40, S=(7, 13), B=3, K=9), dict(N=4, C=256, S=(8, 14, 14), B=8, K=64)],
                         ids=["small", "large"])
@pytest.mark.parametrize("alpha", [None, 1000.0], ids=["randinit", "alpha1000"])
def test_split_bf16_gemms_as_accurate_as_float32_gemms(monkeypatch, shape, alpha):
    """PERSONVLAD_CUDA_BF16_GEMM=split3 on the device: output and gradients
    within 2x the float32-GEMM path's error against float64 (plus a bf16-sized
    slack for the final rounding), and within the bf16 tolerance."""
    needs_native_cuda()
    args = make_inputs(**shape, dtype=torch.bfloat16, alpha=alpha, device="cuda", seed=23)
    a64 = [t.double() for t in args]
    gout = torch.randn((shape["N"], shape["K"] * shape["C"]), device="cuda", dtype=torch.bfloat16)
    results = {}
    for mode in ("split3", "fp32"):
        monkeypatch.setenv("PERSONVLAD_CUDA_BF16_GEMM", mode)
        results[mode] = [FWD(*args, True), *BWD(gout, *args, True)]
    expect = [_ref64(args, True), *_grads_ref64(gout.double(), a64, True)]
    for name, a, b, e in zip(("out",) + NAMES, results["split3"], results["fp32"], expect):
        scale = e.abs().max().item()
        err_split, err_plain = ((t.double() - e).abs().max().item() for t in (a, b))
        assert err_split <= 2 * err_plain + 4e-3 * scale, (name, err_split, err_plain)
    torch.testing.assert_close(results["split3"][0].double(), expect[0], atol=3e-2, rtol=1e-1)
    _check_grads(results["split3"][1:], expect[1:], args, torch.bfloat16)


@pytest.mark.cuda
def test_split_bf16_gemms_switch_rejects_unknown_values(monkeypatch):
    needs_native_cuda()
    args = make_inputs(N=2, C=8, S=(3,), B=2, K=3, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setenv("PERSONVLAD_CUDA_BF16_GEMM", "split")
    with pytest.raises(ValueError, match="PERSONVLAD_CUDA_BF16_GEMM: expected 'split3' or 'fp32'"):
        FWD(*args, True)


# ---------------------------------------------------------------- one-kernel forward
def _kernel_names(fn):
    """Names of the CUDA kernels one call of ``fn`` launches (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.cuda
@_shared_matrix
def test_fused_forward_matches_reference(monkeypatch, S, B, normalize, dtype):
    """PERSONVLAD_CUDA_FWD=fused: the one-kernel forward over the shared
    matrix (float64 runs the gemm path), non-contiguous inputs included, and
    the gradient through it."""
    needs_native_cuda()
    monkeypatch.setenv("PERSONVLAD_CUDA_FWD", "fused")
    atol, rtol = tolerance(dtype)
    for noncontig in (False, True):
        args = make_inputs(N=3, C=6, S=S, B=B, K=5, dtype=dtype, device="cuda", seed=41, noncontig=noncontig,
                           requires_grad=True)
        out = person_vlad(*args, normalize=normalize, backend="cuda")
        assert out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out.double(), _ref64(args, normalize), atol=atol, rtol=rtol)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to("cuda", dtype)
        out.backward(gout)
        _check_grads([t.grad if t is not None else torch.empty(0) for t in args],
                     _grads_ref64(gout, args, normalize), args, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["float32", "bfloat16", "float16"])
def test_fused_forward_paper_shape_is_one_kernel(monkeypatch, dtype):
    """At the paper shape (N=64, C=256, P=110, B=6, K=64) the switch runs
    fused_forward_kernel and no other kernel (a split run adds one memset of
    its chain's counters), within the dtype's tolerance of float64 and of the default
    path, deterministic, with every PERSONVLAD_CUDA_FWD_SPLITS."""
    needs_native_cuda()
    args = make_inputs(N=64, C=256, S=(2, 11, 5), B=6, K=64, dtype=dtype, device="cuda", alpha=10.0, seed=42)
    default = FWD(*args, True)
    monkeypatch.setenv("PERSONVLAD_CUDA_FWD", "fused")
    atol, rtol = tolerance(dtype)
    # split runs (more than one block per sample) add the counters' memset;
    # "auto" splits (fused_forward_split: max(1, SMs / N) blocks, A' fits
    # one block here) only on a GPU with at least 2 * 64 SMs (H100 SXM: 132)
    sms = torch.cuda.get_device_properties(args[0].device).multi_processor_count
    split_run = {"1": False, "auto": sms // 64 >= 2, "4": True}
    for splits in ("1", "auto", "4"):
        monkeypatch.setenv("PERSONVLAD_CUDA_FWD_SPLITS", splits)
        names = _kernel_names(lambda: FWD(*args, True))
        kernels = [n for n in names if "memset" not in n.lower()]
        assert len(kernels) == 1 and "fused_forward_kernel" in kernels[0], names
        assert len(names) - len(kernels) == (1 if split_run[splits] else 0), (splits, sms, names)
        out = FWD(*args, True)
        torch.testing.assert_close(out.double(), _ref64(args, True), atol=atol, rtol=rtol)
        torch.testing.assert_close(out, default, atol=atol, rtol=rtol)
        assert torch.equal(out, FWD(*args, True))  # deterministic


@pytest.mark.cuda
@pytest.mark.parametrize("shape", ["paper", "large"])
def test_fused_tc_forward_bfloat16(monkeypatch, shape):
    """PERSONVLAD_CUDA_FWD=fused-tc, bfloat16 features on sm_80+: the one-kernel
    forward with both products on tensor cores, one fused kernel (a split run adds
    the counters' memset), within bf16's tolerance of float64 and within one
    bf16 rounding step of the FMA one-kernel forward (at most 0.5% of the
    outputs rounding the other way), deterministic.  float32 features (and
    sm_7x) take the FMA kernel: same bits as PERSONVLAD_CUDA_FWD=fused."""
    needs_native_cuda()
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the tensor-core products need sm_80+")
    dims = (dict(N=64, C=256, S=(2, 11, 5), B=6, K=64) if shape == "paper"
            else dict(N=4, C=512, S=(8, 14, 14), B=8, K=64))
    args = make_inputs(dtype=torch.bfloat16, device="cuda", alpha=10.0, seed=45, **dims)
    monkeypatch.setenv("PERSONVLAD_CUDA_FWD", "fused")
    fma = FWD(*args, True)
    monkeypatch.setenv("PERSONVLAD_CUDA_FWD", "fused-tc")
    names = [n for n in _kernel_names(lambda: FWD(*args, True)) if "memset" not in n.lower()]
    assert len(names) == 1 and "fused_forward_kernel" in names[0], names
    out = FWD(*args, True)
    atol, rtol = tolerance(torch.bfloat16)
    torch.testing.assert_close(out.double(), _ref64(args, True), atol=atol, rtol=rtol)
    # one bf16 rounding step apart: neighbouring bf16 values differ by up to 2^-7 relative
    torch.testing.assert_close(out.float(), fma.float(), atol=1e-5 * fma.float().abs().max().item(), rtol=2.0 ** -7)
    assert (out != fma).float().mean().item() <= 0.005
    assert torch.equal(out, FWD(*args, True))
    args32 = [t.float() for t in args]
    tc32 = FWD(*args32, True)
    monkeypatch.setenv("PERSONVLAD_CUDA_FWD", "fused")
    assert torch.equal(tc32, FWD(*args32, True))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_forward_large_grid_is_split(monkeypatch, dtype):
    """A grid whose A' is over a block's shared memory (the large benchmark
    shape's P = 1568) runs split over several blocks per sample: one fused
    kernel, within tolerance of float64, deterministic, with a gradient.
    The split samples sum their V in the output's memory: a float32 forward
    allocates little besides its output, a bfloat16 one the low halves of
    the float32 sums (as large as the output) besides (per-block partials
    of V took 8x the output at the large benchmark shape)."""
    needs_native_cuda()
    args = make_inputs(N=4, C=512, S=(8, 14, 14), B=8, K=64, dtype=dtype, device="cuda", alpha=10.0, seed=44,
                       requires_grad=True)
    monkeypatch.setenv("PERSONVLAD_CUDA_FWD", "fused")
    with torch.no_grad():
        names = _kernel_names(lambda: FWD(*args, True))
    assert sum("fused_forward_kernel" in n for n in names) == 1, names
    with torch.no_grad():
        FWD(*args, True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = FWD(*args, True)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()
        del out
    lo_halves = args[0].shape[0] * 64 * 512 * 2 if dtype == torch.bfloat16 else 0
    assert extra <= lo_halves + 64 * 1024, (extra, lo_halves)  # + s per block and the turns
    out = person_vlad(*args, backend="cuda")
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(out.double(), _ref64(args, True), atol=atol, rtol=rtol)
    with torch.no_grad():
        assert torch.equal(out.detach(), FWD(*args, True))
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["float32", "bfloat16", "float16"])
def test_fused_forward_split_chain_over_waves(monkeypatch, dtype):
    """Split samples whose blocks sum V in a chain, with more blocks than one
    wave (64 samples x 4 blocks, one block an SM) and four V chunks (K = 70,
    C = 300): within tolerance of float64 and of the unsplit kernel,
    normalised or not, and the same bits on every call whatever the blocks'
    timing; a 16-bit output's sums go through its low halves."""
    needs_native_cuda()
    args = make_inputs(N=64, C=300, S=(2, 11, 5), B=6, K=70, dtype=dtype, device="cuda", alpha=10.0, seed=46)
    monkeypatch.setenv("PERSONVLAD_CUDA_FWD", "fused")
    atol, rtol = tolerance(dtype)
    for normalize in (True, False):
        monkeypatch.setenv("PERSONVLAD_CUDA_FWD_SPLITS", "1")
        whole = FWD(*args, normalize)
        monkeypatch.setenv("PERSONVLAD_CUDA_FWD_SPLITS", "4")
        names = _kernel_names(lambda: FWD(*args, normalize))
        assert sum("fused_forward_kernel" in n for n in names) == 1, names
        out = FWD(*args, normalize)
        torch.testing.assert_close(out.double(), _ref64(args, normalize), atol=atol, rtol=rtol)
        torch.testing.assert_close(out, whole, atol=atol, rtol=rtol)
        for _ in range(3):
            assert torch.equal(FWD(*args, normalize), out)


@pytest.mark.cuda
@pytest.mark.parametrize("K,C,S,B,dtype", [(130, 3, (5, 3), 2, "float32"), (4, 8, (3, 5), 17, "float32"),
                                           (64, 512, (8, 14, 14), 8, "float32"), (70, 300, (4, 9), 3, "float32"),
                                           (4, 8, (3, 5), 2, "float64"), (4, 8, (3, 5), 2, "mixed")],
                         ids=["K130", "B17", "P1568", "twochunks", "float64", "mixed"])
def test_fused_forward_falls_back_where_it_does_not_fit(monkeypatch, K, C, S, B, dtype):
    """K > 128, B > 16, float64 features, or parts in another dtype than the
    features: the switch falls back to the gemm path (no fused kernel
    launched), same result; K = 70, C = 300 does fit (four V chunks,
    computed twice), and so does P = 1568 (split over blocks)."""
    needs_native_cuda()
    dt = {"float32": torch.float32, "float64": torch.float64, "mixed": torch.bfloat16}[dtype]
    args = make_inputs(N=2, C=C, S=S, B=B, K=K, dtype=dt, device="cuda", seed=43)
    if dtype == "mixed":
        args[1] = args[1].float()
    monkeypatch.setenv("PERSONVLAD_CUDA_FWD", "fused")
    names = _kernel_names(lambda: FWD(*args, True))
    fits = K <= 128 and B <= 16 and dtype == "float32"  # any P: a large grid is split
    assert any("fused_forward_kernel" in n for n in names) == fits, names
    atol, rtol = tolerance(dt)
    torch.testing.assert_close(FWD(*args, True).double(), _ref64(args, True), atol=atol, rtol=rtol)


@pytest.mark.cuda
def test_fused_switches_reject_unknown_values(monkeypatch):
    needs_native_cuda()
    for N in (2, 0):
        args = make_inputs(N=N, C=8, S=(3,), B=2, K=3, device="cuda")
        monkeypatch.setenv("PERSONVLAD_CUDA_FWD", "one")
        with pytest.raises(ValueError, match="PERSONVLAD_CUDA_FWD: expected 'fused', 'fused-tc' or 'gemm'"):
            FWD(*args, True)
        monkeypatch.delenv("PERSONVLAD_CUDA_FWD")
        monkeypatch.setenv("PERSONVLAD_CUDA_BWD", "one")
        with pytest.raises(ValueError, match="PERSONVLAD_CUDA_BWD: expected 'fused' or 'gemm'"):
            BWD(torch.zeros(N, 3 * 8, device="cuda"), *args, True)
        monkeypatch.delenv("PERSONVLAD_CUDA_BWD")
        monkeypatch.setenv("PERSONVLAD_CUDA_FWD", "fused")
        for bad in ("0", "two", "-1", "3x"):
            monkeypatch.setenv("PERSONVLAD_CUDA_FWD_SPLITS", bad)
            with pytest.raises(ValueError, match="PERSONVLAD_CUDA_FWD_SPLITS: expected 'auto' or an integer"):
                FWD(*args, True)
        monkeypatch.delenv("PERSONVLAD_CUDA_FWD_SPLITS")
        monkeypatch.delenv("PERSONVLAD_CUDA_FWD")


def _fused_backward_fits():
    """The one-kernel backward's paper-shape shared memory (~140 KB in float32)
    needs an sm_80+ opt-in; smaller shapes fit everywhere."""
    return torch.cuda.get_device_properties(0).major >= 8


@pytest.mark.cuda
@_shared_matrix
def test_fused_backward_matches_reference(monkeypatch, S, B, normalize, dtype):
    """PERSONVLAD_CUDA_BWD=fused over the shared matrix (float64 runs the
    gemm path), non-contiguous inputs included: the five gradients against
    float64 and the gemm path's."""
    needs_native_cuda()
    for noncontig in (False, True):
        args = make_inputs(N=3, C=6, S=S, B=B, K=5, dtype=dtype, device="cuda", seed=44, noncontig=noncontig)
        gout = torch.randn((3, 30) if normalize else (3, 5, 6), generator=torch.Generator().manual_seed(4))
        gout = gout.to("cuda", dtype)
        monkeypatch.setenv("PERSONVLAD_CUDA_BWD", "gemm")
        plain = BWD(gout, *args, normalize)
        monkeypatch.setenv("PERSONVLAD_CUDA_BWD", "fused")
        got = BWD(gout, *args, normalize)
        _check_grads(got, _grads_ref64(gout, args, normalize), args, dtype)
        atol, rtol = tolerance(dtype)
        for name, a, b, t in zip(NAMES, got, plain, args):
            assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride(), name
            if t is not None:
                scale = max(b.abs().max().item(), 1.0)
                torch.testing.assert_close(a, b, atol=5 * atol * scale, rtol=5 * rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_backward_paper_shape(monkeypatch, dtype):
    """At the paper shape (sm_80+: ~140 KB of shared memory) the backward is
    fused_backward_kernel plus the three batch sums, no GEMM; gradients
    within tolerance of float64 and deterministic; gradcheck-style autograd
    through person_vlad with both switches on."""
    needs_native_cuda()
    if not _fused_backward_fits():
        pytest.skip("the paper shape's one-kernel backward needs sm_80+ shared memory")
    args = make_inputs(N=64, C=256, S=(2, 11, 5), B=6, K=64, dtype=dtype, device="cuda", alpha=10.0, seed=45)
    gout = torch.randn(64, 64 * 256, device="cuda").to(dtype)
    monkeypatch.setenv("PERSONVLAD_CUDA_BWD", "fused")
    names = _kernel_names(lambda: BWD(gout, *args, True))
    assert any("fused_backward_kernel" in n for n in names), names
    assert not any("gemm" in n.lower() or "fused_forward_kernel" in n for n in names), names
    got = BWD(gout, *args, True)
    _check_grads(got, _grads_ref64(gout, args, True), args, dtype)
    assert all(torch.equal(a, b) for a, b in zip(got, BWD(gout, *args, True)))  # deterministic
    monkeypatch.setenv("PERSONVLAD_CUDA_FWD", "fused")
    leaves = [t.detach().requires_grad_(True) for t in args]
    out = person_vlad(*leaves, backend="cuda")
    out.backward(gout)
    _check_grads([t.grad for t in leaves], _grads_ref64(gout, args, True), args, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("K,C,dtype", [(65, 8, "float32"), (8, 257, "float32"), (130, 3, "float32"),
                                       (8, 8, "float64"), (8, 8, "mixed")],
                         ids=["K65", "C257", "K130", "float64", "mixed"])
def test_fused_backward_falls_back_where_it_does_not_fit(monkeypatch, K, C, dtype):
    """K > 64, C > 256, float64 features or parts in another dtype: the switch
    runs the gemm path (no fused kernel), same gradients."""
    needs_native_cuda()
    dt = {"float32": torch.float32, "float64": torch.float64, "mixed": torch.bfloat16}[dtype]
    args = make_inputs(N=2, C=C, S=(3, 4), B=2, K=K, dtype=dt, device="cuda", seed=46)
    if dtype == "mixed":
        args[1] = args[1].float()
    gout = torch.randn(2, K * C, device="cuda").to(dt)
    monkeypatch.setenv("PERSONVLAD_CUDA_BWD", "fused")
    names = _kernel_names(lambda: BWD(gout, *args, True))
    assert not any("fused_backward_kernel" in n for n in names), names
    _check_grads(BWD(gout, *args, True), _grads_ref64(gout, args, True), args, dt)


@pytest.mark.cuda
def test_alpha_1000_init():
    """Huge logits (the paper's alpha=1000): finite, and float64 matches the reference."""
    needs_native_cuda()
    for dtype in (torch.float64, torch.float32, torch.float16):
        args = make_inputs(N=2, C=16, S=(2, 3, 3), B=6, K=8, dtype=dtype, alpha=1000.0, device="cuda", seed=10)
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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_autocast_region_does_not_reach_the_kernels(dtype):
    """The trainer and the inference path run the model under bf16 autocast.
    The op has no Autocast kernel, so the CUDA kernels exclude autocast
    themselves: otherwise their fp32 ATen GEMMs return bf16 and the kernels
    fail on data_ptr<float>.  Same bits inside and outside the region,
    forward and backward (run inside the region)."""
    needs_native_cuda()
    args = make_inputs(N=3, C=16, S=(2, 3, 2), B=3, K=8, dtype=dtype, device="cuda", seed=31,
                       requires_grad=True)
    gout = torch.randn(3, 8 * 16, device="cuda", dtype=dtype)
    out = person_vlad(*args, backend="cuda")
    grads = torch.autograd.grad(out, [t for t in args if t is not None], gout)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_ac = person_vlad(*args, backend="cuda")
        grads_ac = torch.autograd.grad(out_ac, [t for t in args if t is not None], gout)
    assert out_ac.dtype == dtype and torch.equal(out_ac, out)
    assert all(torch.equal(a, b) for a, b in zip(grads_ac, grads))


@pytest.mark.cuda
def test_logits_stay_ieee_fp32_when_tf32_is_allowed():
    """With TF32 allowed for cuBLAS, the logit GEMM W F still runs in IEEE
    fp32: at alpha=1000 TF32's rounding (~0.5 on logits of ~1e3) would move the
    soft-assignments by up to e^0.5.  The forward then matches a float32
    reference computed without TF32 to within what TF32 in the other GEMM
    (A' F^T) costs, and the process-wide switch is restored."""
    needs_native_cuda()
    args = make_inputs(N=2, C=64, S=(2, 11, 5), B=6, K=16, dtype=torch.float32, alpha=1000.0,
                       device="cuda", seed=33)
    ref = _ref64(args, True)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        out = FWD(*args, True)
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    torch.testing.assert_close(out.double(), ref, atol=3e-3, rtol=3e-2)


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
