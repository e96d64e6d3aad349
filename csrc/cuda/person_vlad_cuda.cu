// CUDA kernels of the fused PersonVLAD op (SPEC §1):
//   torch.ops.personvlad.person_vlad / person_vlad_backward, CUDA dispatch key.
//
// ---------------------------------------------------------------------------
// Math, per sample n (F: C x P, M: B x P, W: K x C, z: K, c: K x C; P = prod(S)).
// Parts None is one part equal to 1 everywhere (B = 1, M = 1).
//
// Forward
//   G        = W F                                   (K x P)   GEMM (cuBLAS)
//   logit    = M[b,s] G[k,s] + z[k]
//   a[b,:,s] = softmax_k(logit[b,:,s])               (max-subtracted)
//   A'[k,s]  = sum_b a[b,k,s] M[b,s]                 (K x P)   } two kernels: softmax
//   S[k]     = sum_{b,s} a[b,k,s]                    (K)       } statistics per (n,b,s),
//                                                                then sums over b per
//                                                                (n,k,s); S via at::sum
//   V        = A' F^T - S c                          (K x C)   GEMM + epilogue
//   normalize: r_k = max(|V_k|, eps), U_k = V_k / r_k, u = flatten_kmajor(U),
//              g = max(|u|, eps), out = u / g                  epilogue kernel
//
// Backward (dO = grad_output; everything above is recomputed)
//   normalisation:  if |u| >= eps: du = (dO - out <out,dO>) / g, else du = dO / eps
//                   (<out,dO> = (1/g) sum_k <V_k,dO_k> / r_k)
//                   if |V_k| >= eps: dV_k = (du_k - U_k <U_k,du_k>) / r_k,
//                   else dV_k = du_k / eps                      (clamp_min passes
//                   the gradient where x >= eps, like torch)
//                   normalize=False: dV = dO
//   V = A' F^T - S c:
//     dA'  = dV F                                    (K x P)   GEMM
//     dF  += dV^T A'                                 (C x P)   GEMM
//     dS_k = -<dV_k, c_k>                                      epilogue kernel
//     dc_k = -sum_n S[n,k] dV[n,k]
//   A' = sum_b a M, S = sum_{b,s} a:
//     da[b,k,s] = dA'[k,s] M[b,s] + dS[k]
//     dM[b,s]  += sum_k a[b,k,s] dA'[k,s]
//   softmax: dlogit[b,k,s] = a[b,k,s] (da[b,k,s] - sum_j a[b,j,s] da[b,j,s])
//   logit = M G + z:
//     dM[b,s] += sum_k dlogit[b,k,s] G[k,s]                    kernel per (n,b,s)
//     dG[k,s]  = sum_b dlogit[b,k,s] M[b,s]                    kernel per (n,k,s)
//     dz[k]    = sum_{n,b,s} dlogit[b,k,s]                     (per-(n,k,s) partials
//                                                               sum_b, then at::sum)
//   G = W F:
//     dW  = sum_n dG F^T    (one GEMM over the batch: (K, N*P) x (N*P, C))
//     dF += W^T dG                                   (C x P)   GEMM
//
// Everything is computed in the accumulation dtype acc_t (float64 for float64
// features, else float32); half/bfloat16 features are converted to float32 up
// front (so cuBLAS runs in fp32; bfloat16 features under the opt-in
// PERSONVLAD_CUDA_BF16_GEMM=split3 stay bf16, see bf16_split_gemms), and
// results are cast to each input's dtype.
// The largest temporaries are of size N*K*P (G, A', per-(n,k,s) S partials, dA',
// dG, per-(n,k,s) dz partials) and N*K*C; nothing of size N*B*K*P is allocated
// (the per-(b,s) softmax statistics are N*B*P).  All reductions are done in a
// fixed order (in-thread loops, warp shuffles, at::sum), so results are
// deterministic.  Only plain CUDA (no tensor-core intrinsics, no sm_70+-only
// features, no bf16 arithmetic intrinsics) outside the opt-in tensor-core
// functions, whose bodies are compiled for sm_80+ only (PV_TENSOR_CORES), so a
// CUDA 12 toolkit builds it for Pascal (TORCH_CUDA_ARCH_LIST=6.1); CUDA 13
// itself starts at sm_75.  The GEMMs
// are ATen's (cuBLAS); the logit GEMM W F is kept out of TF32 (NoTF32CuBLAS).
//
// PERSONVLAD_CUDA_FWD=fused (opt-in) runs the forward instead as one kernel,
// fused_forward_kernel (one or more blocks per sample, everything on chip,
// only the output written, plus partials where a sample is split), for the
// shapes fused_forward_plan accepts; and
// PERSONVLAD_CUDA_BWD=fused the backward as fused_backward_kernel plus three
// batch sums (fused_backward_smem).  See there.  PERSONVLAD_CUDA_FWD=fused-tc
// (bfloat16 features, sm_80+) runs the one-kernel forward's two products on
// tensor cores (fused_g_tile_tc, fused_v_chunk_tc): the only tensor-core
// code, compiled to a trap below sm_80 and never launched there.
// ---------------------------------------------------------------------------
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "person_vlad_common.h"

namespace personvlad {
namespace cuda {
namespace {

// Dynamic shared memory of a kernel as bytes (the CPU emulation defines its own).
// 32-byte aligned: the tensor-core tiles (wmma) need 256-bit aligned pointers.
#define PV_DYNAMIC_SMEM(name) extern __shared__ __align__(32) unsigned char name[]

// BEGIN DEVICE CODE: from here to END DEVICE CODE the file is also compiled for
// the CPU (csrc/cuda/cpu_emulation.h) and run by tests/test_cuda_backend.py, so
// keep it free of ATen/c10 and of CUDA features the emulation lacks.
constexpr int kFlatThreads = 128;      // threads per block of the flat (n,b,s)/(n,k,s) kernels
constexpr int kEpilogueThreads = 256;  // threads per block (one block per sample)
constexpr int kWarp = 32;
constexpr double kEps = 1e-12;

__device__ __forceinline__ float vexp(float x) { return expf(x); }
__device__ __forceinline__ double vexp(double x) { return exp(x); }
__device__ __forceinline__ float vsqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double vsqrt(double x) { return sqrt(x); }

// max(x, eps) for the normalisations' clamps, keeping NaN: device max() is
// fmax, which returns eps for a NaN norm, and the output came out finite
// (garbage) where torch's clamp_min gives NaN.  The clamped-or-not tests are
// `x < eps` for the same reason (NaN: the unclamped formulas, NaN).
template <typename acc_t>
__device__ __forceinline__ acc_t clamp_eps(acc_t x, acc_t eps) {
  return x < eps ? eps : x;
}

constexpr double kInvEps = 1e12;  // 1 / kEps

// Row k's share of |u|^2, u = flatten(V_k / max(|V_k|, eps)), from the sums of
// squares of V_k (ss) and of V_k / eps (sst): ss / |V_k|^2, or for a clamped
// row sst, which, unlike ss / eps^2, does not underflow where V_k^2 does
// (|V| ~ 1e-22 in float32; the output was then not a unit vector).  NaN
// stays NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t unit_row_sq(acc_t ss, acc_t sst, acc_t eps) {
  const acc_t r = vsqrt(ss);
  return r < eps ? sst : ss / (r * r);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;  // every lane holds the (same) total
}

// One row's sums of squares of V_k (ss) and of V_k / eps (sst), the inputs
// of unit_row_sq: every pass that normalises accumulates them the same way.
template <typename acc_t>
struct RowSq {
  acc_t ss = 0, sst = 0;
  __device__ __forceinline__ void add(acc_t v) {
    const acc_t vt = v * acc_t(kInvEps);
    ss += v * v;
    sst += vt * vt;
  }
  __device__ __forceinline__ void warp_reduce() {  // every lane gets the warp's sums
    ss = warp_sum(ss);
    sst = warp_sum(sst);
  }
};

// Sum over the block of one value per warp (all lanes of a warp pass the same
// value).  Every thread returns the same total, summed in warp order.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum_of_warps(acc_t v, acc_t* smem) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, nw = blockDim.x / kWarp;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  acc_t t = 0;
  for (int w = 0; w < nw; ++w) t += smem[w];
  return t;
}

template <typename acc_t>
__device__ __forceinline__ acc_t logit_of(acc_t m, acc_t g, acc_t z) {
  return m * g + z;
}

// The soft-assignment of one (part, cluster, position) from its softmax
// statistics (softmax_stats): exp(m g + z - max) * inv.  Every kernel that
// recomputes an assignment goes through here, so the forward and the
// backward round it identically.
template <typename acc_t>
__device__ __forceinline__ acc_t soft_assignment(acc_t m, acc_t g, acc_t z, acc_t vmax, acc_t inv) {
  return vexp(logit_of(m, g, z) - vmax) * inv;
}

// Softmax statistics over k of the logits m g[k * stride] + z[k]: their
// maximum, and 1 / sum_k exp(logit - max) (the sum is >= 1: the max term is
// exp(0)).  idx_t: 64-bit in the flat kernels, 32-bit in the one-kernel passes.
template <typename acc_t, typename idx_t>
__device__ __forceinline__ void softmax_stats(const acc_t* g, idx_t stride, const acc_t* __restrict__ z,
                                              acc_t m, idx_t K, acc_t& vmax, acc_t& inv) {
  vmax = logit_of(m, g[0], z[0]);
  for (idx_t k = 1; k < K; ++k) vmax = max(vmax, logit_of(m, g[k * stride], z[k]));
  acc_t sum = 0;
  for (idx_t k = 0; k < K; ++k) sum += vexp(logit_of(m, g[k * stride], z[k]) - vmax);
  inv = acc_t(1) / sum;
}

// The softmax backward of one (part, position) column, with the column's
// logits m g[k * g_stride] + z[k] and, per cluster, the gradients dAp[k *
// dap_stride] of A' = sum_b a M and dS[k] of s = sum_b a:
//   vmax, inv: its softmax statistics (softmax_stats);
//   dot = sum_k a[k] da[k], with da[k] = dAp[k] m + dS[k];
//   returns dM = sum_k a dAp[k] + sum_k a (da[k] - dot) g[k]   (with_parts; else 0).
// The flat backward (softmax_stats_backward_kernel) and the one-kernel
// backward (phase C) both go through here, so they agree to the last bit.
template <typename acc_t, typename idx_t>
__device__ __forceinline__ acc_t softmax_column_backward(const acc_t* g, idx_t g_stride, const acc_t* __restrict__ z,
                                                         acc_t m, const acc_t* dAp, idx_t dap_stride,
                                                         const acc_t* dS, idx_t K, bool with_parts, acc_t& vmax,
                                                         acc_t& inv, acc_t& dot) {
  softmax_stats(g, g_stride, z, m, K, vmax, inv);
  acc_t d = 0, dm = 0;
  for (idx_t k = 0; k < K; ++k) {
    const acc_t a = soft_assignment(m, g[k * g_stride], z[k], vmax, inv);
    const acc_t dap = dAp[k * dap_stride];
    d += a * (dap * m + dS[k]);
    dm += a * dap;  // through A' = sum_b a M
  }
  dot = d;
  if (!with_parts) return acc_t(0);
  for (idx_t k = 0; k < K; ++k) {
    const acc_t gk = g[k * g_stride];
    const acc_t a = soft_assignment(m, gk, z[k], vmax, inv);
    dm += a * (dAp[k * dap_stride] * m + dS[k] - d) * gk;  // through logit = M G + z
  }
  return dm;
}

// ---------------------------------------------------------------------------
// Soft-assignment kernels.  Each is a flat 1-D launch over either the
// (n, b, s) "part columns" (N*B*P threads: softmax statistics over k) or the
// (n, k, s) entries (N*K*P threads: accumulation over b).  Consecutive threads
// take consecutive s, so every global access is coalesced; each thread writes
// only its own outputs (no atomics), and every sum is a fixed-order loop.
// Parts None: M is nullptr and B = 1 (M = 1).
//
// Tensor layouts (contiguous, acc_t): G, Ap, Sc, dAp, dG, dZc (N,K,P);
// M, dM, st_* (N,B,P); z (K); dS (N,K).
// ---------------------------------------------------------------------------

// Forward statistics, one thread per (n, b, s): st_max = max_k logit,
// st_inv = 1 / sum_k exp(logit - st_max).
template <typename acc_t>
__global__ void __launch_bounds__(kFlatThreads) softmax_stats_forward_kernel(
    const acc_t* __restrict__ G, const acc_t* __restrict__ M, const acc_t* __restrict__ z,
    acc_t* __restrict__ st_max, acc_t* __restrict__ st_inv, int64_t N, int64_t B, int64_t K,
    int64_t P) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // (n, b, s)
  if (i >= N * B * P) return;
  const int64_t n = i / (B * P), s = i % P;
  const acc_t mb = (M != nullptr) ? M[i] : acc_t(1);
  softmax_stats(G + n * K * P + s, P, z, mb, K, st_max[i], st_inv[i]);  // G[n,k,s] at k * P
}

// Forward accumulation, one thread per (n, k, s):
//   Ap[n,k,s] = sum_b a[b,k,s] M[b,s],  Sc[n,k,s] = sum_b a[b,k,s].
template <typename acc_t>
__global__ void __launch_bounds__(kFlatThreads) assign_accumulate_forward_kernel(
    const acc_t* __restrict__ G, const acc_t* __restrict__ M, const acc_t* __restrict__ z,
    const acc_t* __restrict__ st_max, const acc_t* __restrict__ st_inv, acc_t* __restrict__ Ap,
    acc_t* __restrict__ Sc, int64_t N, int64_t B, int64_t K, int64_t P) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // (n, k, s)
  if (i >= N * K * P) return;
  const int64_t n = i / (K * P), k = (i / P) % K, s = i % P;
  const int64_t j0 = n * B * P + s;  // (n, 0, s) in the (N,B,P) tensors
  const acc_t gk = G[i], zk = z[k];
  acc_t acc_a = 0, acc_s = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t j = j0 + b * P;
    const acc_t mb = (M != nullptr) ? M[j] : acc_t(1);
    const acc_t a = soft_assignment(mb, gk, zk, st_max[j], st_inv[j]);
    acc_a += a * mb;
    acc_s += a;
  }
  Ap[i] = acc_a;
  Sc[i] = acc_s;
}

// Backward statistics and dM, one thread per (n, b, s):
//   st_max, st_inv as in the forward; st_dot = sum_k a[b,k,s] da[b,k,s] with
//   da[b,k,s] = dAp[k,s] M[b,s] + dS[k];
//   dM[b,s] = sum_k a dAp[k,s] + sum_k a (da - st_dot) G[k,s]   (if M given).
template <typename acc_t>
__global__ void __launch_bounds__(kFlatThreads) softmax_stats_backward_kernel(
    const acc_t* __restrict__ G, const acc_t* __restrict__ M, const acc_t* __restrict__ z,
    const acc_t* __restrict__ dAp, const acc_t* __restrict__ dS, acc_t* __restrict__ st_max,
    acc_t* __restrict__ st_inv, acc_t* __restrict__ st_dot, acc_t* __restrict__ dM, int64_t N,
    int64_t B, int64_t K, int64_t P) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // (n, b, s)
  if (i >= N * B * P) return;
  const int64_t n = i / (B * P), s = i % P;
  const acc_t mb = (M != nullptr) ? M[i] : acc_t(1);
  const int64_t col = n * K * P + s;  // (n, 0, s) in the (N,K,P) tensors
  acc_t vmax, inv, dot;
  const acc_t dm = softmax_column_backward(G + col, P, z, mb, dAp + col, P, dS + n * K, K, M != nullptr,
                                           vmax, inv, dot);
  if (M != nullptr) dM[i] = dm;
  st_max[i] = vmax;
  st_inv[i] = inv;
  st_dot[i] = dot;
}

// Backward accumulation, one thread per (n, k, s), with
// dlogit[b,k,s] = a (dAp[k,s] M[b,s] + dS[k] - st_dot[b,s]):
//   dG[n,k,s] = sum_b dlogit M[b,s],  dZc[n,k,s] = sum_b dlogit.
template <typename acc_t>
__global__ void __launch_bounds__(kFlatThreads) assign_accumulate_backward_kernel(
    const acc_t* __restrict__ G, const acc_t* __restrict__ M, const acc_t* __restrict__ z,
    const acc_t* __restrict__ dAp, const acc_t* __restrict__ dS, const acc_t* __restrict__ st_max,
    const acc_t* __restrict__ st_inv, const acc_t* __restrict__ st_dot, acc_t* __restrict__ dG,
    acc_t* __restrict__ dZc, int64_t N, int64_t B, int64_t K, int64_t P) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // (n, k, s)
  if (i >= N * K * P) return;
  const int64_t n = i / (K * P), k = (i / P) % K, s = i % P;
  const int64_t j0 = n * B * P + s;
  const acc_t gk = G[i], zk = z[k], dapk = dAp[i], dsk = dS[n * K + k];
  acc_t acc_g = 0, acc_z = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t j = j0 + b * P;
    const acc_t mb = (M != nullptr) ? M[j] : acc_t(1);
    const acc_t a = soft_assignment(mb, gk, zk, st_max[j], st_inv[j]);
    const acc_t dl = a * (dapk * mb + dsk - st_dot[j]);
    acc_g += dl * mb;
    acc_z += dl;
  }
  dG[i] = acc_g;
  dZc[i] = acc_z;
}

// ---------------------------------------------------------------------------
// Forward epilogue: one block per sample n.  V = Vraw - S c, then (optionally)
// intra- and global L2 normalisation; writes out (N, K*C) in out_t.  Warp w
// owns the rows k = w, w + nwarps, ...; lanes stride over channels.  rn (N,K)
// is scratch for the row norms.
// ---------------------------------------------------------------------------
template <typename out_t, typename acc_t>
__global__ void __launch_bounds__(kEpilogueThreads) epilogue_forward_kernel(
    const acc_t* __restrict__ Vraw, const acc_t* __restrict__ S, const acc_t* __restrict__ cen,
    out_t* __restrict__ out, acc_t* __restrict__ rn, int64_t K, int64_t C, bool normalize) {
  __shared__ acc_t smem[kEpilogueThreads / kWarp];
  const int64_t n = blockIdx.x;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, nw = blockDim.x / kWarp;
  const acc_t eps = acc_t(kEps);
  const acc_t* vr = Vraw + n * K * C;
  out_t* o = out + n * K * C;

  acc_t local = 0;  // sum over this warp's rows of |V_k / r_k|^2
  for (int64_t k = warp; k < K; k += nw) {
    const acc_t sk = S[n * K + k];
    RowSq<acc_t> sq;
    for (int64_t c = lane; c < C; c += kWarp) {
      const acc_t v = vr[k * C + c] - sk * cen[k * C + c];
      if (normalize) {
        sq.add(v);
      } else {
        o[k * C + c] = static_cast<out_t>(v);
      }
    }
    if (normalize) {
      sq.warp_reduce();
      const acc_t r = clamp_eps(vsqrt(sq.ss), eps);
      if (lane == 0) rn[n * K + k] = r;
      local += unit_row_sq(sq.ss, sq.sst, eps);
    }
  }
  if (!normalize) return;  // uniform over the block
  const acc_t total = block_sum_of_warps(local, smem);  // __syncthreads inside
  const acc_t gn = clamp_eps(vsqrt(total), eps);
  for (int64_t k = warp; k < K; k += nw) {
    const acc_t sk = S[n * K + k];
    const acc_t r = rn[n * K + k];
    for (int64_t c = lane; c < C; c += kWarp) {
      const acc_t v = vr[k * C + c] - sk * cen[k * C + c];
      o[k * C + c] = static_cast<out_t>((v / r) / gn);
    }
  }
}

// ---------------------------------------------------------------------------
// Backward epilogue: one block per sample n.  From Vraw, S, c and dO (all
// acc_t) computes dV (N,K,C) through the normalisation (or dV = dO) and
// dS[n,k] = -<dV_k, c_k>.  nrm (N,K) is scratch (unclamped row norms).
// ---------------------------------------------------------------------------
template <typename acc_t>
__global__ void __launch_bounds__(kEpilogueThreads) epilogue_backward_kernel(
    const acc_t* __restrict__ Vraw, const acc_t* __restrict__ S, const acc_t* __restrict__ cen,
    const acc_t* __restrict__ dO, acc_t* __restrict__ dV, acc_t* __restrict__ dS,
    acc_t* __restrict__ nrm, int64_t K, int64_t C, bool normalize) {
  __shared__ acc_t smem_a[kEpilogueThreads / kWarp];
  __shared__ acc_t smem_b[kEpilogueThreads / kWarp];
  const int64_t n = blockIdx.x;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, nw = blockDim.x / kWarp;
  const acc_t eps = acc_t(kEps);
  const acc_t* vr = Vraw + n * K * C;
  const acc_t* go = dO + n * K * C;
  acc_t* dv = dV + n * K * C;

  if (!normalize) {
    for (int64_t k = warp; k < K; k += nw) {
      acc_t dsum = 0;
      for (int64_t c = lane; c < C; c += kWarp) {
        const acc_t d = go[k * C + c];
        dv[k * C + c] = d;
        dsum += d * cen[k * C + c];
      }
      dsum = warp_sum(dsum);
      if (lane == 0) dS[n * K + k] = -dsum;
    }
    return;
  }

  // Pass 1: row norms, |u|^2 and <out, dO> * g.
  acc_t local_ss = 0, local_pd = 0;
  for (int64_t k = warp; k < K; k += nw) {
    const acc_t sk = S[n * K + k];
    RowSq<acc_t> sq;
    acc_t pd = 0;
    for (int64_t c = lane; c < C; c += kWarp) {
      const acc_t v = vr[k * C + c] - sk * cen[k * C + c];
      sq.add(v);
      pd += v * go[k * C + c];
    }
    sq.warp_reduce();
    pd = warp_sum(pd);
    const acc_t nk = vsqrt(sq.ss);
    const acc_t r = clamp_eps(nk, eps);
    if (lane == 0) nrm[n * K + k] = nk;
    local_ss += unit_row_sq(sq.ss, sq.sst, eps);
    local_pd += pd / r;
  }
  const acc_t tot_ss = block_sum_of_warps(local_ss, smem_a);
  const acc_t tot_pd = block_sum_of_warps(local_pd, smem_b);
  const acc_t graw = vsqrt(tot_ss);
  const bool g_clamped = graw < eps;  // NaN: not clamped, stays NaN
  const acc_t gn = g_clamped ? eps : graw;
  const acc_t od = tot_pd / gn;  // <out, dO>

  // Pass 2: du (global normalisation), then dV (intra normalisation), dS.
  for (int64_t k = warp; k < K; k += nw) {
    const acc_t sk = S[n * K + k];
    const acc_t nk = nrm[n * K + k];
    const bool r_clamped = nk < eps;
    const acc_t r = r_clamped ? eps : nk;
    acc_t udu = 0;  // <U_k, du_k>
    if (!r_clamped) {
      for (int64_t c = lane; c < C; c += kWarp) {
        const acc_t u = (vr[k * C + c] - sk * cen[k * C + c]) / r;
        const acc_t d = go[k * C + c];
        const acc_t du = g_clamped ? d / eps : (d - (u / gn) * od) / gn;
        udu += u * du;
      }
      udu = warp_sum(udu);
    }
    acc_t dsum = 0;
    for (int64_t c = lane; c < C; c += kWarp) {
      const acc_t u = (vr[k * C + c] - sk * cen[k * C + c]) / r;
      const acc_t d = go[k * C + c];
      const acc_t du = g_clamped ? d / eps : (d - (u / gn) * od) / gn;
      const acc_t dvk = r_clamped ? du / eps : (du - u * udu) / r;
      dv[k * C + c] = dvk;
      dsum += dvk * cen[k * C + c];
    }
    dsum = warp_sum(dsum);
    if (lane == 0) dS[n * K + k] = -dsum;
  }
}

// ---------------------------------------------------------------------------
// One-kernel forward (PERSONVLAD_CUDA_FWD=fused; see fused_forward_plan for
// the shapes it takes): one block of kFusedThreads per sample computes G, the
// part soft-assignments, A', s, V and both normalisations, and writes only
// the output.  Plain fp32 (fp64) FMA arithmetic, like the IEEE cuBLAS GEMMs
// of the default path; every sum in a fixed order, so deterministic.
//
// Split samples (fused_forward_split: where A' of all P positions would not
// fit a block's shared memory, or to fill the GPU when N is below its SM
// count): `splits` blocks per sample, block j taking positions
// [j * chunk, (j + 1) * chunk).  Each runs phase A on its range and computes
// its A' F^T (K x C) chunk by chunk; the blocks of a sample add these in a
// chain, block after block, into a running sum kept in the output's own
// memory (VSum: a 16-bit output adds one 16-bit half per element), and the
// last block in the chain subtracts s c and runs phase B's norms and output
// on the sum.  The sums run in block order whatever the blocks' timing, so
// the result is deterministic; the extra memory is at most one 16-bit
// element per output element (no per-block partials of V).
//
// Both phases stage their operands through shared memory chunk by chunk, with
// the next chunk's global loads issued into registers before the current
// chunk is computed (so their latency is hidden behind the products).
// Phase A, per tile of kFusedTP = 32 positions:
//   G tile (K x 32) = W F over chunks of kFusedTC channels staged in shared
//   memory (W transposed, so that a thread's 4 rows are one 16-byte load);
//   thread t holds rows 4*(t/16) + {0..3} (and 64 more when K > 64) at
//   positions 2*(t%16) + {0, 1}: 2 loads per 8 (16) FMAs.  Then, one lane per
//   position, the softmax statistics per (part, position) and, per (k,
//   position), A'[k,p] = sum_b a M (into shared memory, all of K x P) and the
//   lane's partial of s[k] = sum_{b,p} a (registers; summed over the warp at
//   the end).
// Phase B, per chunk of 64 rows x 256 columns of V (warp w: rows
//   8w..8w+7; lane l: columns l, l+32, ..., l+224): V = A' F^T - s c with F
//   staged in kFusedPC positions at a time.  With normalize, the row sums of
//   squares are taken first; when V is one chunk (K <= 64, C <= 256, the
//   paper's shape) its values stay in registers for the write, otherwise each
//   chunk is computed twice (norms, then the scaled output), as the Triton
//   one-program forward does.
// Shared memory (acc_t elements, fused_smem_elems): A' (K*P), s and the row
// sums of squares of V and of V / eps (3K), the block-sum scratch, then (16-byte aligned) a work
// area used by phase A (W chunk / G tile, F chunk, statistics) and then by
// phase B (F chunk).  F is read in its own dtype and converted on load: no
// float32 copy.  Indices within a sample are 32-bit (the host checks C*P,
// K*C and B*P fit); sample offsets are 64-bit.
// ---------------------------------------------------------------------------
constexpr int kFusedThreads = 256;
constexpr int kFusedWarps = kFusedThreads / kWarp;          // 8
constexpr int kFusedTP = kWarp;                             // positions per phase-A tile
constexpr int kFusedTC = 32;                                // channels per staged W/F chunk
constexpr int kFusedMaxK = 128;
constexpr int kFusedMaxB = 16;
constexpr int kFusedRowsA = kFusedMaxK / kFusedWarps;       // statistics rows per warp (16)
constexpr int kGRows = 4;                                   // G rows per thread (per half)
constexpr int kGPos = 2;                                    // G positions per thread
constexpr int kGHalf = kGRows * (kFusedThreads / (kFusedTP / kGPos));  // rows per half: 64
constexpr int kVRows = 8;                                   // V rows per warp in a chunk
constexpr int kVCols = 8;                                   // V columns per lane in a chunk
constexpr int kChunkRows = kVRows * kFusedWarps;            // 64
constexpr int kChunkCols = kVCols * kWarp;                  // 256
constexpr int kFusedPC = 16;                                // positions per staged F chunk (phase B)
constexpr int kFbStride = kChunkCols + 1;                   // padded: fewer bank conflicts
// Per-thread shares of a staged chunk, loaded into registers one chunk ahead
// (the loads of chunk i+1 are in flight while chunk i is computed).
constexpr int kStageW = kFusedMaxK * kFusedTC / kFusedThreads;   // 16 (8 used at K <= 64)
constexpr int kStageF = kFusedTC * kFusedTP / kFusedThreads;     // 4
constexpr int kStageB = kFusedPC * kChunkCols / kFusedThreads;   // 16
// Tensor-core phase B (fused_v_chunk_tc): 16-position steps; the staged A'
// pieces and F rows are 16 positions + 8 of padding (16-bit elements: rows
// of 48 bytes keep every 16-row tile 256-bit aligned); the V chunk goes
// through shared memory as float32 rows of 256 + 4.
constexpr int kTcK = 16;
constexpr int kTcLd = kTcK + 8;
constexpr int kTcVLd = kChunkCols + 4;
constexpr int kTcFrags = kChunkCols / 2 / 16;                    // 8 16x16 tiles per warp

// Row stride of the transposed W chunk: the rows one or two halves cover, plus
// 4 (fewer bank conflicts when staging, 16-byte rows kept).
__host__ __device__ inline int fused_ws_stride(int K) { return (K <= kGHalf ? kGHalf : 2 * kGHalf) + 4; }

// Offset of the work area: after A', s, the two row sums and the block-sum
// scratch, rounded up to 8 elements (32 bytes for float: the tensor-core
// tiles' alignment; 64 for double).
__host__ __device__ inline int64_t fused_work_offset(int64_t K, int64_t P) {
  return (K * P + 3 * K + kFusedWarps + 7) / 8 * 8;
}

// Shared memory of fused_forward_kernel in acc_t elements; `tc`: its
// tensor-core products (float32 acc_t only), whose V chunk (64 x kTcVLd
// floats, ~65 KB) is the largest use of the work area.
__host__ __device__ inline int64_t fused_smem_elems(int64_t K, int64_t P, int64_t B, bool tc = false) {
  const int64_t phase_a = int64_t(kFusedTC) * fused_ws_stride(static_cast<int>(K)) + kFusedTC * kFusedTP +
                          3 * B * kFusedTP;
  const int64_t phase_b = tc ? int64_t(kChunkRows) * kTcVLd : int64_t(kFusedPC) * kFbStride;
  return fused_work_offset(K, P) + (phase_a > phase_b ? phase_a : phase_b);
}

// How fused_forward_kernel splits each sample's P positions over blocks:
// `splits` blocks per sample, each taking `chunk` positions (a multiple of
// the 32-position tile; the last block takes the rest; chunk = P when
// splits = 1), with `smem_elems` elements of shared memory.  The fewest
// splits whose A' (K x chunk) fits `smem_limit` elements, raised so that the
// N * splits blocks fill one wave of `sms` blocks (one per SM; never below
// one tile per block), or `forced` splits when > 0 (never below the fewest
// that fit).  splits = 0: not even one tile fits.  Host code (the .cu's host
// side and the CPU emulation's tests call it).
struct FusedSplit {
  int64_t splits, chunk, smem_elems;
};
inline FusedSplit fused_forward_split(int64_t N, int64_t P, int64_t K, int64_t B, int64_t sms, int64_t smem_limit,
                                      int64_t forced, bool tc = false) {
  const int64_t tiles = (P + kFusedTP - 1) / kFusedTP;
  int64_t fit = 0;  // the most tiles per block that fit (at most all of them)
  if (fused_smem_elems(K, P, B, tc) <= smem_limit) {
    fit = tiles;
  } else {
    const int64_t fixed = fused_smem_elems(K, 0, B, tc) + 8;  // the K * chunk term is all that grows
    fit = smem_limit > fixed ? (smem_limit - fixed) / (K * kFusedTP) : 0;
    while (fit > 0 && fused_smem_elems(K, fit * kFusedTP, B, tc) > smem_limit) --fit;
  }
  if (fit == 0 || N < 1 || P < 1) return {0, 0, 0};
  const int64_t fewest = (tiles + fit - 1) / fit;
  const int64_t wanted = forced > 0 ? forced : std::max<int64_t>(1, sms / N);
  int64_t splits = std::max(fewest, std::min(wanted, tiles));
  const int64_t per = (tiles + splits - 1) / splits;  // tiles per block
  splits = (tiles + per - 1) / per;
  const int64_t chunk = splits == 1 ? P : per * kFusedTP;
  return {splits, chunk, fused_smem_elems(K, chunk, B, tc)};
}

// 4 (2) consecutive values from 16-byte (float: 8-byte) aligned shared memory.
__device__ __forceinline__ void load4(const float* p, float (&o)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
}
__device__ __forceinline__ void load4(const double* p, double (&o)[4]) {
  const double2 a = *reinterpret_cast<const double2*>(p), b = *reinterpret_cast<const double2*>(p + 2);
  o[0] = a.x; o[1] = a.y; o[2] = b.x; o[3] = b.y;
}
__device__ __forceinline__ void load2(const float* p, float (&o)[2]) {
  const float2 v = *reinterpret_cast<const float2*>(p);
  o[0] = v.x; o[1] = v.y;
}
__device__ __forceinline__ void load2(const double* p, double (&o)[2]) {
  const double2 v = *reinterpret_cast<const double2*>(p);
  o[0] = v.x; o[1] = v.y;
}

// Phase A staging, in two halves so that the global loads of the next chunk
// overlap the current chunk's products: this thread's share of the F chunk
// (channels c0..c0+31, positions p0..p0+31, zero outside C x P; kept in in_t
// until stored) and of the W chunk (rows < K, the same channels).  In these
// helpers P is the number of positions the block takes and ld the distance
// between F's rows (channels) and M's rows (parts): the sample's whole grid,
// which is P itself unless the forward splits the sample.
template <typename in_t>
__device__ __forceinline__ void fused_load_f(in_t (&f)[kStageF], const in_t* __restrict__ Fn, int c0, int p0,
                                             int C, int P, int ld) {
#pragma unroll
  for (int t = 0; t < kStageF; ++t) {
    const int i = threadIdx.x + t * kFusedThreads, c = c0 + i / kFusedTP, q = p0 + i % kFusedTP;
    f[t] = (c < C && q < P) ? Fn[c * ld + q] : in_t(0);
  }
}

template <typename in_t, typename acc_t>
__device__ __forceinline__ void fused_load_a(acc_t (&w)[kStageW], in_t (&f)[kStageF],
                                             const acc_t* __restrict__ W, const in_t* __restrict__ Fn,
                                             int c0, int p0, int C, int P, int K, int ld) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int t = 0; t < kStageW; ++t) {
    const int i = tid + t * kFusedThreads, k = i / kFusedTC, c = c0 + i % kFusedTC;  // coalesced along c
    w[t] = (k < K && c < C) ? W[k * C + c] : acc_t(0);
  }
  fused_load_f(f, Fn, c0, p0, C, P, ld);
}

template <typename in_t, typename acc_t>
__device__ __forceinline__ void fused_store_a(const acc_t (&w)[kStageW], const in_t (&f)[kStageF], acc_t* Ws,
                                              acc_t* Fs, int KS, int K) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int t = 0; t < kStageW; ++t) {
    const int i = tid + t * kFusedThreads, k = i / kFusedTC;
    if (k < K) Ws[(i % kFusedTC) * KS + k] = w[t];  // transposed
  }
#pragma unroll
  for (int t = 0; t < kStageF; ++t) Fs[tid + t * kFusedThreads] = static_cast<acc_t>(f[t]);
}

// Phase B staging: this thread's share of F (channels c0..c0+255, positions
// q0..q0+15, zero outside C x P), loaded one chunk ahead like phase A's.
template <typename in_t>
__device__ __forceinline__ void fused_load_b(in_t (&fb)[kStageB], const in_t* __restrict__ Fn, int c0, int q0,
                                             int C, int P, int ld) {
#pragma unroll
  for (int t = 0; t < kStageB; ++t) {
    const int i = threadIdx.x + t * kFusedThreads, cl = i / kFusedPC, ql = i % kFusedPC;
    const int c = c0 + cl, q = q0 + ql;
    fb[t] = (c < C && q < P) ? Fn[c * ld + q] : in_t(0);
  }
}

// v -= s c on the V chunk at rows r0.., columns c0.. (fused_v_chunk's
// register layout), inside K x C; nothing when s_sum is null.
template <typename acc_t>
__device__ __forceinline__ void subtract_sc(acc_t (&v)[kVRows][kVCols], const acc_t* __restrict__ cen,
                                            const acc_t* s_sum, int r0, int c0, int C, int K) {
  if (s_sum == nullptr) return;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int i = 0; i < kVRows; ++i) {
    const int k = r0 + warp * kVRows + i;
#pragma unroll
    for (int jj = 0; jj < kVCols; ++jj) {
      const int c = c0 + lane + kWarp * jj;
      if (k < K && c < C) v[i][jj] -= s_sum[k] * cen[k * C + c];
    }
  }
}

// V[r0.., c0..] chunk of one sample into v (rows k = r0 + 8*warp + i, columns
// c = c0 + lane + 32*jj); zero outside K x C.  With s_sum == nullptr, just
// Ap F^T (the backward's dW = dG F^T).
template <typename in_t, typename acc_t>
__device__ __forceinline__ void fused_v_chunk(acc_t (&v)[kVRows][kVCols], const in_t* __restrict__ Fn,
                                              const acc_t* __restrict__ cen, const acc_t* Ap,
                                              const acc_t* s_sum, acc_t* Fb, int r0, int c0, int C,
                                              int P, int K, int ld) {
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
#pragma unroll
  for (int i = 0; i < kVRows; ++i)
#pragma unroll
    for (int jj = 0; jj < kVCols; ++jj) v[i][jj] = acc_t(0);
  in_t fb[kStageB];
  fused_load_b(fb, Fn, c0, 0, C, P, ld);
  for (int q0 = 0; q0 < P; q0 += kFusedPC) {
    __syncthreads();  // every thread is done with the work area's previous contents
#pragma unroll
    for (int t = 0; t < kStageB; ++t) {
      const int i = tid + t * kFusedThreads;
      Fb[(i % kFusedPC) * kFbStride + i / kFusedPC] = static_cast<acc_t>(fb[t]);
    }
    __syncthreads();
    if (q0 + kFusedPC < P) fused_load_b(fb, Fn, c0, q0 + kFusedPC, C, P, ld);  // the next chunk, in flight
    const int qn = P - q0 < kFusedPC ? P - q0 : kFusedPC;
    for (int ql = 0; ql < qn; ++ql) {
      acc_t f[kVCols];
#pragma unroll
      for (int jj = 0; jj < kVCols; ++jj) f[jj] = Fb[ql * kFbStride + lane + kWarp * jj];
#pragma unroll
      for (int i = 0; i < kVRows; ++i) {
        const int k = r0 + warp * kVRows + i;
        const acc_t a = k < K ? Ap[k * P + q0 + ql] : acc_t(0);
#pragma unroll
        for (int jj = 0; jj < kVCols; ++jj) v[i][jj] += a * f[jj];
      }
    }
  }
  subtract_sc(v, cen, s_sum, r0, c0, C, K);
}

// The 16-bit float type of the tensor cores for features of type in_t
// (specialised for c10::BFloat16 -> __nv_bfloat16 after the device code; the
// CPU emulation's own type maps to itself).
template <typename T>
struct tc_type {
  using type = T;
};

// The tensor-core path needs sm_80 (bf16 mma).  Below, its kernels are never
// launched (the host checks the device) and their body is a trap.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define PV_TENSOR_CORES 1
#else
#define PV_TENSOR_CORES 0
#endif

// float <-> bfloat16, round to nearest even, by name: torch builds with
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which removes the implicit conversions.
__device__ __forceinline__ void tc_from_float(float x, __nv_bfloat16& h) { h = __float2bfloat16_rn(x); }
__device__ __forceinline__ float tc_to_float(__nv_bfloat16 h) { return __bfloat162float(h); }

// fused_v_chunk on tensor cores (PERSONVLAD_CUDA_FWD=fused-tc; bfloat16
// features, float32 acc_t, sm_80+): the same V chunk into the same register
// layout.  A' (float32, in [0, B]) is split into two bf16 pieces hi + lo
// (hi = A' rounded, lo = the rest rounded: 2^-17 relative, where the output
// keeps 2^-9); F is exact in bf16, so each piece times F is one mma.sync with
// float32 accumulation.  Not for half features: half's 5-bit exponent puts
// the lo piece of a small A' entry among the subnormals, and the rows of a
// rarely assigned cluster (all entries small) lost ~2^-11 of relative
// accuracy -- which intra-normalisation then shows in full (in an ad-hoc
// check on the CPU emulation, many times more float16 outputs were a
// rounding step off than with float32 arithmetic; bfloat16 has float32's
// exponent range).
// Per 16-position step the block stages the 64 rows of A' (as hi and lo)
// and the 256 columns of F; warp w multiplies rows 16 (w % 4).. by columns
// 128 (w / 4).. (8 tiles of 16 x 16).  At the end the tiles go through
// shared memory (the work area, kChunkRows x kTcVLd floats) into the
// registers of fused_v_chunk's layout.  Rows >= K and columns >= C are
// staged as zeros, so those entries of v are zero too.
template <typename in_t, typename acc_t>
__device__ __forceinline__ void fused_v_chunk_tc(acc_t (&v)[kVRows][kVCols], const in_t* __restrict__ Fn,
                                                 const acc_t* __restrict__ cen, const acc_t* Ap,
                                                 const acc_t* s_sum, acc_t* work, int r0, int c0, int C,
                                                 int P, int K, int ld) {
  static_assert(std::is_same<acc_t, float>::value, "the tensor-core path accumulates in float32");
#if PV_TENSOR_CORES
  using tc_t = typename tc_type<in_t>::type;
  static_assert(sizeof(tc_t) == 2 && sizeof(in_t) == 2, "bfloat16 features only");
  namespace wmma = nvcuda::wmma;
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  const int rb = warp % 4, cb = (warp / 4) * (kChunkCols / 2);  // this warp's 16 rows, 128 columns
  tc_t* Ahi = reinterpret_cast<tc_t*>(work);
  tc_t* Alo = Ahi + kChunkRows * kTcLd;
  tc_t* Fs = Alo + kChunkRows * kTcLd;  // Fs[c * kTcLd + q]: F^T (position x channel), column-major
  const tc_t* Ft = reinterpret_cast<const tc_t*>(Fn);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kTcFrags];
#pragma unroll
  for (int j = 0; j < kTcFrags; ++j) wmma::fill_fragment(acc[j], 0.0f);
  for (int q0 = 0; q0 < P; q0 += kTcK) {
    __syncthreads();  // every warp is done with the previous step's tiles (or the caller's work area)
    for (int i = tid; i < kChunkRows * kTcK; i += kFusedThreads) {
      const int r = i / kTcK, q = i % kTcK, k = r0 + r, p = q0 + q;
      const float a = (k < K && p < P) ? Ap[k * P + p] : 0.0f;
      tc_t hi, lo;
      tc_from_float(a, hi);
      tc_from_float(a - tc_to_float(hi), lo);
      Ahi[r * kTcLd + q] = hi;
      Alo[r * kTcLd + q] = lo;
    }
    tc_t zero;
    tc_from_float(0.0f, zero);
    for (int i = tid; i < kChunkCols * kTcK; i += kFusedThreads) {
      const int cl = i / kTcK, q = i % kTcK, c = c0 + cl, p = q0 + q;
      Fs[cl * kTcLd + q] = (c < C && p < P) ? Ft[c * ld + p] : zero;
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, tc_t, wmma::row_major> a_hi, a_lo;
    wmma::load_matrix_sync(a_hi, Ahi + rb * 16 * kTcLd, kTcLd);
    wmma::load_matrix_sync(a_lo, Alo + rb * 16 * kTcLd, kTcLd);
#pragma unroll
    for (int j = 0; j < kTcFrags; ++j) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, tc_t, wmma::col_major> b;
      wmma::load_matrix_sync(b, Fs + (cb + 16 * j) * kTcLd, kTcLd);
      wmma::mma_sync(acc[j], a_lo, b, acc[j]);  // the small piece first
      wmma::mma_sync(acc[j], a_hi, b, acc[j]);
    }
  }
  __syncthreads();  // the staged tiles are no longer read: the work area takes the V chunk
  float* Vs = work;
#pragma unroll
  for (int j = 0; j < kTcFrags; ++j)
    wmma::store_matrix_sync(Vs + rb * 16 * kTcVLd + cb + 16 * j, acc[j], kTcVLd, wmma::mem_row_major);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kVRows; ++i)
#pragma unroll
    for (int jj = 0; jj < kVCols; ++jj) v[i][jj] = Vs[(warp * kVRows + i) * kTcVLd + lane + kWarp * jj];
  subtract_sc(v, cen, s_sum, r0, c0, C, K);
#else
  __trap();  // never launched below sm_80 (the host checks)
#endif
}

// Phase A's G tile (K x kFusedTP positions from p0) on tensor cores
// (PERSONVLAD_CUDA_FWD=fused-tc; bfloat16 features, sm_80+), into Gs (rows of
// kFusedTP floats, all kTcRows(K) rows; rows >= K are zero).  W (float32) is
// split as it is staged into three bf16 pieces hi, mid, lo (as split3_rows
// does on the host for the split3 GEMMs), which keep all 24 bits of its
// mantissa -- the logits of a trained model are ~10^3 and need them; F is
// exact in bf16, so each piece times F is exact before the float32
// accumulation.  No host work: the launch stays one kernel.  Per 16-channel
// step the block stages the three pieces (kTcRows(K) x 16) and F (16 x 32
// positions);
// warp w multiplies row block w % 4 (and w % 4 + 4 where K > 64) by
// position block w / 4.  The staging lies within phase A's work area (W
// chunk + F chunk of the FMA path), below the statistics.
__host__ __device__ inline int kTcRows(int K) { return K <= kGHalf ? kGHalf : 2 * kGHalf; }
constexpr int kTcLdF = kFusedTP + 8;  // staged F rows (16-bit): 32 positions + 8 of padding
// The staged pieces and F (16-bit), and then the G tile (float32), fit the
// FMA path's W and F chunks, below the statistics, for one and two halves.
static_assert((3 * kGHalf * kTcLd + kTcK * kTcLdF) / 2 <= kFusedTC * (kGHalf + 4) + kFusedTC * kFusedTP &&
                  (3 * 2 * kGHalf * kTcLd + kTcK * kTcLdF) / 2 <= kFusedTC * (2 * kGHalf + 4) + kFusedTC * kFusedTP &&
                  2 * kGHalf * kFusedTP <= kFusedTC * (2 * kGHalf + 4),
              "tensor-core phase A staging within the work area");

template <typename in_t>
__device__ __forceinline__ void fused_g_tile_tc(const in_t* __restrict__ Fn, const float* __restrict__ W,
                                                float* Gs, int p0, int C, int P, int K, int ld) {
#if PV_TENSOR_CORES
  using tc_t = typename tc_type<in_t>::type;
  namespace wmma = nvcuda::wmma;
  const int tid = threadIdx.x, warp = tid / kWarp;
  const int rows = kTcRows(K), halves = rows / kGHalf;
  const int pb = warp / 4;  // this warp's 16 positions of the tile
  tc_t* Wst = reinterpret_cast<tc_t*>(Gs);  // 3 pieces x rows x kTcLd, then F
  tc_t* Fst = Wst + 3 * rows * kTcLd;       // 16 channels x kTcLdF
  const tc_t* Ft = reinterpret_cast<const tc_t*>(Fn);
  tc_t zero;
  tc_from_float(0.0f, zero);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  for (int c0 = 0; c0 < C; c0 += kTcK) {
    __syncthreads();  // the previous step's tiles (or the previous G tile's readers) are done
    for (int i = tid; i < rows * kTcK; i += kFusedThreads) {
      const int r = i / kTcK, cc = i % kTcK, c = c0 + cc;
      const float w = (r < K && c < C) ? W[r * C + c] : 0.0f;
      tc_t hi, mid, lo;  // w = hi + mid + lo, each rounded to nearest
      tc_from_float(w, hi);
      const float rest = w - tc_to_float(hi);
      tc_from_float(rest, mid);
      tc_from_float(rest - tc_to_float(mid), lo);
      Wst[r * kTcLd + cc] = hi;
      Wst[(rows + r) * kTcLd + cc] = mid;
      Wst[(2 * rows + r) * kTcLd + cc] = lo;
    }
    for (int i = tid; i < kTcK * kFusedTP; i += kFusedThreads) {
      const int cl = i / kFusedTP, q = i % kFusedTP, c = c0 + cl, p = p0 + q;
      Fst[cl * kTcLdF + q] = (c < C && p < P) ? Ft[c * ld + p] : zero;
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_b, 16, 16, 16, tc_t, wmma::row_major> b;
    wmma::load_matrix_sync(b, Fst + 16 * pb, kTcLdF);
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // a constant bound: acc[h] stays in registers
      if (h < halves) {
        const int rb = warp % 4 + 4 * h;
#pragma unroll
        for (int piece = 2; piece >= 0; --piece) {  // lo, mid, hi: the small pieces first
          wmma::fragment<wmma::matrix_a, 16, 16, 16, tc_t, wmma::row_major> a;
          wmma::load_matrix_sync(a, Wst + (piece * rows + 16 * rb) * kTcLd, kTcLd);
          wmma::mma_sync(acc[h], a, b, acc[h]);
        }
      }
    }
  }
  __syncthreads();  // the staged pieces are no longer read: Gs takes the tile
#pragma unroll
  for (int h = 0; h < 2; ++h)
    if (h < halves)
      wmma::store_matrix_sync(Gs + (16 * (warp % 4 + 4 * h)) * kFusedTP + 16 * pb, acc[h], kFusedTP,
                              wmma::mem_row_major);
#else
  __trap();  // never launched below sm_80 (the host checks)
#endif
}

// Phase A of both one-kernel passes, for one sample: G = W F tile by tile,
// the part softmax, A' (K x P) and s (K) into shared memory, and, when Gf is
// given, all of G (K x P) too.  Uses the work area; ends with a barrier.
// TC: the G tiles on tensor cores (fused_g_tile_tc; the forward only, Gf
// unused).
template <typename in_t, typename m_t, typename acc_t, bool TC = false>
__device__ __forceinline__ void fused_assign(const in_t* __restrict__ Fn, const m_t* __restrict__ Mn,
                                             const acc_t* __restrict__ W, const acc_t* __restrict__ z, acc_t* Ap,
                                             acc_t* s_sum, acc_t* Gf, acc_t* work, int C, int P, int B, int K,
                                             int ld) {
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  const int gp = kGPos * (tid % (kFusedTP / kGPos)), gk = kGRows * (tid / (kFusedTP / kGPos));
  const int halves = K <= kGHalf ? 1 : 2;
  const int KS = fused_ws_stride(K);
  acc_t* Ws = work;                                // kFusedTC x KS: W chunk transposed, then the G tile (K x kFusedTP)
  acc_t* Fs = Ws + kFusedTC * KS;                  // kFusedTC x kFusedTP
  acc_t* st_max = Fs + kFusedTC * kFusedTP;        // B x kFusedTP
  acc_t* st_inv = st_max + B * kFusedTP;
  acc_t* st_m = st_inv + B * kFusedTP;
  acc_t s_part[kFusedRowsA];
#pragma unroll
  for (int j = 0; j < kFusedRowsA; ++j) s_part[j] = acc_t(0);
  for (int p0 = 0; p0 < P; p0 += kFusedTP) {
    acc_t* Gs = Ws;  // the G tile (K x kFusedTP), once the W chunk is no longer read
    if constexpr (TC) {
      static_assert(std::is_same<acc_t, float>::value, "the tensor-core path accumulates in float32");
      fused_g_tile_tc(Fn, W, Gs, p0, C, P, K, ld);
    } else {
      acc_t g[2][kGRows][kGPos];
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < kGRows; ++i)
#pragma unroll
          for (int pj = 0; pj < kGPos; ++pj) g[h][i][pj] = acc_t(0);
      acc_t w_next[kStageW];
      in_t f_next[kStageF];
      fused_load_a(w_next, f_next, W, Fn, 0, p0, C, P, K, ld);
      for (int c0 = 0; c0 < C; c0 += kFusedTC) {
        __syncthreads();  // the previous chunk / G tile / statistics are no longer read
        fused_store_a(w_next, f_next, Ws, Fs, KS, K);
        __syncthreads();
        if (c0 + kFusedTC < C) fused_load_a(w_next, f_next, W, Fn, c0 + kFusedTC, p0, C, P, K, ld);  // in flight
        // rows >= K of the chunk hold stale values: their sums are never used
#pragma unroll 4
        for (int cc = 0; cc < kFusedTC; ++cc) {  // zero-padded beyond C
          acc_t f[kGPos];
          load2(Fs + cc * kFusedTP + gp, f);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if (h < halves) {
              acc_t w[kGRows];
              load4(Ws + cc * KS + h * kGHalf + gk, w);
#pragma unroll
              for (int i = 0; i < kGRows; ++i)
#pragma unroll
                for (int pj = 0; pj < kGPos; ++pj) g[h][i][pj] += w[i] * f[pj];
            }
          }
        }
      }
      __syncthreads();  // the W chunk is no longer read: its space holds the G tile
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < kGRows; ++i) {
          const int k = h * kGHalf + gk + i;
          if (k < K) {
#pragma unroll
            for (int pj = 0; pj < kGPos; ++pj) {
              Gs[k * kFusedTP + gp + pj] = g[h][i][pj];
              if (Gf != nullptr && p0 + gp + pj < P) Gf[k * P + p0 + gp + pj] = g[h][i][pj];
            }
          }
        }
    }
    __syncthreads();
    for (int i = tid; i < B * kFusedTP; i += kFusedThreads) {  // (part, position)
      const int b = i / kFusedTP, pl = i % kFusedTP;
      acc_t vmax = 0, inv = 0, mb = 0;
      if (p0 + pl < P) {
        mb = (Mn != nullptr) ? static_cast<acc_t>(Mn[b * ld + p0 + pl]) : acc_t(1);
        softmax_stats(Gs + pl, kFusedTP, z, mb, K, vmax, inv);
      }
      st_max[i] = vmax;
      st_inv[i] = inv;
      st_m[i] = mb;
    }
    __syncthreads();
    const int p = p0 + lane;
#pragma unroll
    for (int j = 0; j < kFusedRowsA; ++j) {
      const int k = warp + j * kFusedWarps;
      if (k < K && p < P) {
        const acc_t gk_ = Gs[k * kFusedTP + lane], zk = z[k];
        acc_t acc_a = 0, acc_s = 0;
        for (int b = 0; b < B; ++b) {
          const int t = b * kFusedTP + lane;
          const acc_t mb = st_m[t];
          const acc_t a = soft_assignment(mb, gk_, zk, st_max[t], st_inv[t]);
          acc_a += a * mb;
          acc_s += a;
        }
        Ap[k * P + p] = acc_a;
        s_part[j] += acc_s;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kFusedRowsA; ++j) {
    const int k = warp + j * kFusedWarps;  // the same for the whole warp
    if (k < K) {
      const acc_t t = warp_sum(s_part[j]);
      if (lane == 0) s_sum[k] = t;
    }
  }
  __syncthreads();
}

// One thread of a block waits until another block of the launch, already
// running, sets *turn to `want` (fused_forward_kernel's chain).  A volatile
// load: from L2, never a stale L1 line.  A turn that never comes (a bug: the
// chain's counters not zeroed, say) traps after ~2^34 clock cycles (seconds;
// a block waits microseconds, milliseconds under compute-sanitizer), so the
// launch fails instead of hanging the GPU.  The CPU emulation, whose blocks
// run one after another, has its own that never waits but reports a turn
// not yet given.
#ifndef PV_CPU_EMULATION
__device__ __forceinline__ void pv_wait_turn(const unsigned* turn, unsigned want) {
  const long long start = clock64();
  while (*reinterpret_cast<const volatile unsigned*>(turn) != want) {
    if (clock64() - start > (1LL << 34)) __trap();
  }
  __threadfence();  // what the other block wrote before its turn is read after this
}
#endif

// The running sum of a split sample's V partials (fused_forward_kernel), kept
// in the output's own memory so that a split sample has no buffer of
// partials: a float32 (float64) output holds it as it is; a 16-bit output
// holds the high 16 bits of each float32 and `lo` (N x K x C) the low 16, so
// the sum keeps every bit.  Written by one block, read by the next through L2
// (__ldcg), after the chain's fences (fused_forward_kernel).
template <typename in_t, typename acc_t>
struct VSum {
  in_t* out;
  uint16_t* lo;
  __device__ __forceinline__ void store(int64_t i, acc_t v) const {
    if constexpr (sizeof(in_t) == sizeof(acc_t)) {
      reinterpret_cast<acc_t*>(out)[i] = v;
    } else {
      static_assert(sizeof(in_t) == 2 && sizeof(acc_t) == 4, "a 16-bit output holds float32 sums in two halves");
      const unsigned u = __float_as_uint(v);
      reinterpret_cast<uint16_t*>(out)[i] = static_cast<uint16_t>(u >> 16);
      lo[i] = static_cast<uint16_t>(u & 0xffffu);
    }
  }
  __device__ __forceinline__ acc_t load(int64_t i) const {
    if constexpr (sizeof(in_t) == sizeof(acc_t)) {
      return __ldcg(reinterpret_cast<const acc_t*>(out) + i);
    } else {
      const unsigned hi = __ldcg(reinterpret_cast<const uint16_t*>(out) + i), l = __ldcg(lo + i);
      return __uint_as_float((hi << 16) | l);
    }
  }
};

// How many V chunks (kChunkRows x kChunkCols) a sample's K x C has: the
// turns of a split sample's chain (fused_forward_kernel) are counted per
// chunk.  Host and device.
__host__ __device__ inline int fused_v_chunks(int64_t K, int64_t C) {
  return static_cast<int>(((K + kChunkRows - 1) / kChunkRows) * ((C + kChunkCols - 1) / kChunkCols));
}

// F and the output in in_t, M in m_t (in_t or acc_t), W, z, c in acc_t.
// At least one block per SM: without it ptxas held the kernel to 128
// registers and spilled (tests/test_cuda_backend.py reads ptxas' report);
// with it, ~200-245 registers (float, bf16) and no spills on sm_75 and sm_90.
// A block then takes more than half the register file: one block per SM, so
// fused_forward_split gives a sample several blocks until the N x splits
// blocks fill one wave (2 per sample at the paper shape on a 132-SM H200).  The
// extension instantiates both one-kernel passes for float, half and bfloat16
// features with parts of the same dtype only (fused_dtypes); the CPU
// emulation runs them in float and double as well.  TC: both products on
// tensor cores (bfloat16 features, sm_80+): G = W F (fused_g_tile_tc) and
// V = A' F^T (fused_v_chunk_tc), the work area sized by
// fused_smem_elems(..., tc = true).
//
// Split samples (splits > 1) sum their blocks' partial V in a chain, chunk
// by chunk, in the output's memory (VSum): block j of a sample waits for its
// turn on a chunk (turns[chunk] == j), adds the running sum to its own
// partial, stores it and hands the turn on (j + 1); the last block (j =
// splits - 1) subtracts s c and goes on to phase B with the whole V.  The
// blocks' own s (K floats each) go to slots of part_s, summed in slot order
// by the last block.  So the sums run in slot order whatever the blocks'
// timing (deterministic), and the only extra memory is part_s, the `lo`
// halves of a 16-bit output and the turns.  A block's place (n, j) is the
// order it started in (an atomicAdd on sync[0]), not blockIdx: a block waits
// only for blocks that started before it, so the chain cannot wait for a block
// the GPU has not scheduled.  sync = [start counter, N x fused_v_chunks
// turns], all zero at launch (the host's memset).
template <typename in_t, typename m_t, typename acc_t, bool TC = false>
__global__ void __launch_bounds__(kFusedThreads, 1) fused_forward_kernel(
    const in_t* __restrict__ F, const m_t* __restrict__ M, const acc_t* __restrict__ W,
    const acc_t* __restrict__ z, const acc_t* __restrict__ cen, in_t* out, int C, int P,
    int B, int K, bool normalize, int splits, int chunk, uint16_t* v_lo, acc_t* __restrict__ part_s,
    unsigned* __restrict__ sync) {
  PV_DYNAMIC_SMEM(smem_raw);
  acc_t* Ap = reinterpret_cast<acc_t*>(smem_raw);  // K x chunk
  acc_t* s_sum = Ap + K * chunk;                   // K
  acc_t* rowss = s_sum + K;                        // K
  acc_t* rowsst = rowss + K;                       // K: the sums of squares of V / eps (unit_row_sq)
  acc_t* red = rowsst + K;                         // kFusedWarps
  acc_t* work = reinterpret_cast<acc_t*>(smem_raw) + fused_work_offset(K, chunk);
  acc_t* Fb = work;                                // phase B: kFusedPC x kFbStride
  __shared__ unsigned order;                       // split samples: the block's place in the launch

  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  if (splits > 1) {
    if (tid == 0) order = atomicAdd(sync, 1u);
    __syncthreads();
  }
  const int64_t n = splits > 1 ? order / splits : blockIdx.x;
  const int j = splits > 1 ? static_cast<int>(order % splits) : 0;  // this block's range of positions
  const int p_begin = j * chunk, Pj = P - p_begin < chunk ? P - p_begin : chunk;
  const in_t* Fn = F + n * C * P + p_begin;
  const m_t* Mn = (M != nullptr) ? M + n * B * P + p_begin : nullptr;
  const acc_t eps = acc_t(kEps);
  const VSum<in_t, acc_t> vsum{out + n * K * C, v_lo != nullptr ? v_lo + n * K * C : nullptr};

  for (int k = tid; k < K; k += kFusedThreads) rowss[k] = rowsst[k] = 0;  // read after phase A's barriers
  fused_assign<in_t, m_t, acc_t, TC>(Fn, Mn, W, z, Ap, s_sum, static_cast<acc_t*>(nullptr), work, C, Pj, B, K,
                                     P);  // ends with a barrier

  // ---- split: the chain (see above)
  if (splits > 1) {
    for (int k = tid; k < K; k += kFusedThreads) part_s[(n * splits + j) * K + k] = s_sum[k];  // before any turn
    unsigned* turns = sync + 1 + n * fused_v_chunks(K, C);  // this sample's, one per V chunk
    const bool last = j == splits - 1;
    int ch = 0;
    acc_t v[kVRows][kVCols];
    for (int r0 = 0; r0 < K; r0 += kChunkRows)
      for (int c0 = 0; c0 < C; c0 += kChunkCols, ++ch) {
        if constexpr (TC)
          fused_v_chunk_tc(v, Fn, cen, Ap, static_cast<const acc_t*>(nullptr), work, r0, c0, C, Pj, K, P);
        else
          fused_v_chunk(v, Fn, cen, Ap, static_cast<const acc_t*>(nullptr), Fb, r0, c0, C, Pj, K, P);
        if (j > 0) {
          if (tid == 0) pv_wait_turn(turns + ch, static_cast<unsigned>(j));
          __syncthreads();
          __threadfence();  // the previous blocks' sums (and part_s) are read after their turn
          if (last && ch == 0) {  // s of the whole sample, in slot order (its own slot was read above)
            for (int k = tid; k < K; k += kFusedThreads) {
              acc_t t = 0;
              for (int js = 0; js < splits; ++js) t += __ldcg(part_s + (n * splits + js) * K + k);
              s_sum[k] = t;
            }
            __syncthreads();
          }
#pragma unroll
          for (int i = 0; i < kVRows; ++i)
#pragma unroll
            for (int jj = 0; jj < kVCols; ++jj) {
              const int k = r0 + warp * kVRows + i, c = c0 + lane + kWarp * jj;
              if (k < K && c < C) v[i][jj] = vsum.load(k * C + c) + v[i][jj];
            }
        }
        // the running sum back, for the next block; the last block's is V
        // (v - s c), for phase B (read back by this same thread; a float32
        // output without normalize is then written)
        if (last) subtract_sc(v, cen, s_sum, r0, c0, C, K);
#pragma unroll
        for (int i = 0; i < kVRows; ++i)
#pragma unroll
          for (int jj = 0; jj < kVCols; ++jj) {
            const int k = r0 + warp * kVRows + i, c = c0 + lane + kWarp * jj;
            if (k < K && c < C) vsum.store(k * C + c, v[i][jj]);
          }
        if (!last) {
          __threadfence();  // this block's sum is visible device-wide before the turn is handed on
          __syncthreads();
          if (tid == 0) atomicExch(turns + ch, static_cast<unsigned>(j + 1));
        }
      }
    if (j != splits - 1 || (!normalize && sizeof(in_t) == sizeof(acc_t))) return;
  }
  // V[r0.., c0..] of the sample: computed here, or read back from the
  // chain's sum.
  auto v_chunk = [&](acc_t (&vc)[kVRows][kVCols], int r0, int c0) {
    if (splits == 1) {
      if constexpr (TC)
        fused_v_chunk_tc(vc, Fn, cen, Ap, s_sum, work, r0, c0, C, P, K, P);
      else
        fused_v_chunk(vc, Fn, cen, Ap, s_sum, Fb, r0, c0, C, P, K, P);
      return;
    }
#pragma unroll
    for (int i = 0; i < kVRows; ++i)
#pragma unroll
      for (int jj = 0; jj < kVCols; ++jj) {
        const int k = r0 + warp * kVRows + i, c = c0 + lane + kWarp * jj;
        vc[i][jj] = (k < K && c < C) ? vsum.load(k * C + c) : acc_t(0);
      }
  };

  // ---- phase B
  const bool in_registers = K <= kChunkRows && C <= kChunkCols;  // V is one chunk
  acc_t v[kVRows][kVCols];
  acc_t gn = 1;
  if (normalize) {
    for (int r0 = 0; r0 < K; r0 += kChunkRows)
      for (int c0 = 0; c0 < C; c0 += kChunkCols) {
        v_chunk(v, r0, c0);
#pragma unroll
        for (int i = 0; i < kVRows; ++i) {
          const int k = r0 + warp * kVRows + i;  // the same for the whole warp
          RowSq<acc_t> sq;
#pragma unroll
          for (int jj = 0; jj < kVCols; ++jj) sq.add(v[i][jj]);  // zero outside K x C
          sq.warp_reduce();
          if (lane == 0 && k < K) {  // column chunks in order: deterministic
            rowss[k] += sq.ss;
            rowsst[k] += sq.sst;
          }
        }
      }
    __syncthreads();
    acc_t local = 0;  // sum over this warp's rows of |V_k / r_k|^2
    for (int k = warp; k < K; k += kFusedWarps) local += unit_row_sq(rowss[k], rowsst[k], eps);
    gn = clamp_eps(vsqrt(block_sum_of_warps(local, red)), eps);  // __syncthreads inside
  }
  in_t* o = out + n * K * C;
  for (int r0 = 0; r0 < K; r0 += kChunkRows)
    for (int c0 = 0; c0 < C; c0 += kChunkCols) {
      if (!(normalize && in_registers)) v_chunk(v, r0, c0);
#pragma unroll
      for (int i = 0; i < kVRows; ++i) {
        const int k = r0 + warp * kVRows + i;
        if (k >= K) continue;
        const acc_t r = normalize ? clamp_eps(vsqrt(rowss[k]), eps) : acc_t(1);
#pragma unroll
        for (int jj = 0; jj < kVCols; ++jj) {
          const int c = c0 + lane + kWarp * jj;
          if (c < C) o[k * C + c] = static_cast<in_t>(normalize ? (v[i][jj] / r) / gn : v[i][jj]);
        }
      }
    }
}

// ---------------------------------------------------------------------------
// One-kernel backward (PERSONVLAD_CUDA_BWD=fused; K <= 64, C <= 256, see
// fused_backward_smem): one block per sample recomputes phase A (keeping all
// of G) and V (in registers, one chunk), then
//   B. dV through both normalisations (the formulas of
//      epilogue_backward_kernel), dS[k] = -<dV_k, c_k> and this sample's dc
//      partial -s dV; dV is kept transposed in shared memory;
//   C. per tile of 32 positions: dA' = dV F (the register tile of G = W F),
//      the softmax backward's statistics and dM (softmax_stats_backward_kernel),
//      then dG (over G's slots) and the lane's dz partial
//      (assign_accumulate_backward_kernel);
//   D. dF = dV^T A' + W^T dG (lane: channels, warp: 4 positions);
//   E. this sample's dW partial dG F^T.
// The partials (N x K x C for dW and dc, N x K for dz) are summed over the
// batch by the host in a fixed order: deterministic.
// ---------------------------------------------------------------------------
constexpr int kDVStride = kChunkRows + 1;  // dV transposed (C x 65): odd, so column reads do not conflict

__host__ __device__ inline int64_t fused_bwd_work_offset(int64_t K, int64_t P, int64_t C) {
  return (2 * K * P + C * kDVStride + 2 * K + 2 * kFusedWarps + 3) / 4 * 4;
}

__host__ __device__ inline int64_t fused_bwd_smem_elems(int64_t K, int64_t P, int64_t B, int64_t C) {
  const int64_t phase_c = int64_t(kFusedTC) * fused_ws_stride(static_cast<int>(K)) + kFusedTC * kFusedTP +
                          4 * B * kFusedTP;  // also covers phase A's work area
  const int64_t phase_b = int64_t(kFusedPC) * kFbStride;
  return fused_bwd_work_offset(K, P, C) + (phase_c > phase_b ? phase_c : phase_b);
}

// dO, F and dF in in_t, M in m_t (in_t or acc_t), W, z, c, dM and the
// partials in acc_t.
template <typename in_t, typename m_t, typename acc_t>
__global__ void __launch_bounds__(kFusedThreads, 1) fused_backward_kernel(
    const in_t* __restrict__ gO, const in_t* __restrict__ F, const m_t* __restrict__ M,
    const acc_t* __restrict__ W, const acc_t* __restrict__ z, const acc_t* __restrict__ cen,
    in_t* __restrict__ dF, acc_t* __restrict__ dM, acc_t* __restrict__ dWp, acc_t* __restrict__ dcp,
    acc_t* __restrict__ dzp, int C, int P, int B, int K, bool normalize) {
  PV_DYNAMIC_SMEM(smem_raw);
  acc_t* Ap = reinterpret_cast<acc_t*>(smem_raw);  // K x P
  acc_t* Gf = Ap + K * P;                          // K x P: G, then dG
  acc_t* dVT = Gf + K * P;                         // C x kDVStride
  acc_t* s_sum = dVT + C * kDVStride;              // K
  acc_t* dS = s_sum + K;                           // K
  acc_t* red = dS + K;                             // 2 x kFusedWarps
  acc_t* work = reinterpret_cast<acc_t*>(smem_raw) + fused_bwd_work_offset(K, P, C);
  acc_t* dAt = work;                               // phase C: K x kFusedTP
  acc_t* Fs = work + kFusedTC * fused_ws_stride(K);  // kFusedTC x kFusedTP
  acc_t* st_max = Fs + kFusedTC * kFusedTP;        // B x kFusedTP each
  acc_t* st_inv = st_max + B * kFusedTP;
  acc_t* st_m = st_inv + B * kFusedTP;
  acc_t* st_dot = st_m + B * kFusedTP;

  const int64_t n = blockIdx.x;
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  const in_t* Fn = F + n * C * P;
  const m_t* Mn = (M != nullptr) ? M + n * B * P : nullptr;
  const acc_t eps = acc_t(kEps);

  // ---- A: G (kept), A', s
  fused_assign(Fn, Mn, W, z, Ap, s_sum, Gf, work, C, P, B, K, P);

  // ---- B: dV, dS, the dc partial.  dO is read from global memory in each
  // pass rather than held beside V (which would spill registers).
  acc_t v[kVRows][kVCols];
  fused_v_chunk(v, Fn, cen, Ap, s_sum, work, 0, 0, C, P, K, P);
  const in_t* gOn = gO + n * K * C;
  acc_t nrm[kVRows];
  acc_t gn = 1, od = 0;
  bool g_clamped = false;
  if (normalize) {
    acc_t loc_ss = 0, loc_pd = 0;
#pragma unroll
    for (int i = 0; i < kVRows; ++i) {
      const int k = warp * kVRows + i;
      RowSq<acc_t> sq;
      acc_t pd = 0;
#pragma unroll
      for (int jj = 0; jj < kVCols; ++jj) {
        const int c = lane + kWarp * jj;
        sq.add(v[i][jj]);
        if (k < K && c < C) pd += v[i][jj] * static_cast<acc_t>(gOn[k * C + c]);
      }
      sq.warp_reduce();
      pd = warp_sum(pd);
      nrm[i] = vsqrt(sq.ss);
      const acc_t r = clamp_eps(nrm[i], eps);
      if (k < K) {
        loc_ss += unit_row_sq(sq.ss, sq.sst, eps);
        loc_pd += pd / r;
      }
    }
    const acc_t tot_ss = block_sum_of_warps(loc_ss, red);
    const acc_t tot_pd = block_sum_of_warps(loc_pd, red + kFusedWarps);
    const acc_t graw = vsqrt(tot_ss);
    g_clamped = graw < eps;
    gn = g_clamped ? eps : graw;
    od = tot_pd / gn;  // <out, dO>
  }
#pragma unroll
  for (int i = 0; i < kVRows; ++i) {
    const int k = warp * kVRows + i;  // the same for the whole warp
    const bool r_clamped = normalize && nrm[i] < eps;
    const acc_t r = !normalize ? acc_t(1) : r_clamped ? eps : nrm[i];
    acc_t udu = 0;  // <U_k, du_k>
    if (normalize && !r_clamped) {
#pragma unroll
      for (int jj = 0; jj < kVCols; ++jj) {
        const int c = lane + kWarp * jj;
        const acc_t dO = (k < K && c < C) ? static_cast<acc_t>(gOn[k * C + c]) : acc_t(0);
        const acc_t u = v[i][jj] / r;
        udu += u * (g_clamped ? dO / eps : (dO - (u / gn) * od) / gn);
      }
      udu = warp_sum(udu);
    }
    acc_t dsum = 0;
#pragma unroll
    for (int jj = 0; jj < kVCols; ++jj) {
      const int c = lane + kWarp * jj;
      if (k < K && c < C) {
        const acc_t dO = static_cast<acc_t>(gOn[k * C + c]);
        acc_t dv = dO;
        if (normalize) {
          const acc_t u = v[i][jj] / r;
          const acc_t du = g_clamped ? dO / eps : (dO - (u / gn) * od) / gn;
          dv = r_clamped ? du / eps : (du - u * udu) / r;
        }
        dsum += dv * cen[k * C + c];
        dVT[c * kDVStride + k] = dv;
        dcp[(n * K + k) * C + c] = -s_sum[k] * dv;
      }
    }
    dsum = warp_sum(dsum);
    if (lane == 0 && k < K) dS[k] = -dsum;
  }
  __syncthreads();

  // ---- C: per tile of positions, dA', the softmax backward, dG and dz
  const int gp = kGPos * (tid % (kFusedTP / kGPos)), gk = kGRows * (tid / (kFusedTP / kGPos));
  acc_t z_part[kFusedRowsA];
#pragma unroll
  for (int j = 0; j < kFusedRowsA; ++j) z_part[j] = acc_t(0);
  for (int p0 = 0; p0 < P; p0 += kFusedTP) {
    acc_t da[kGRows][kGPos];
#pragma unroll
    for (int i = 0; i < kGRows; ++i)
#pragma unroll
      for (int pj = 0; pj < kGPos; ++pj) da[i][pj] = acc_t(0);
    in_t f_next[kStageF];
    fused_load_f(f_next, Fn, 0, p0, C, P, P);
    for (int c0 = 0; c0 < C; c0 += kFusedTC) {
      __syncthreads();  // the previous chunk / tile's dA' and statistics are no longer read
#pragma unroll
      for (int t = 0; t < kStageF; ++t) Fs[tid + t * kFusedThreads] = static_cast<acc_t>(f_next[t]);
      __syncthreads();
      if (c0 + kFusedTC < C) fused_load_f(f_next, Fn, c0 + kFusedTC, p0, C, P, P);  // in flight
      const int ccn = C - c0 < kFusedTC ? C - c0 : kFusedTC;
      for (int cc = 0; cc < ccn; ++cc) {
        acc_t f[kGPos];
        load2(Fs + cc * kFusedTP + gp, f);
        const acc_t* dv = dVT + (c0 + cc) * kDVStride + gk;  // rows >= K: stale, never used
#pragma unroll
        for (int i = 0; i < kGRows; ++i)
#pragma unroll
          for (int pj = 0; pj < kGPos; ++pj) da[i][pj] += dv[i] * f[pj];
      }
    }
#pragma unroll
    for (int i = 0; i < kGRows; ++i)
      if (gk + i < K) {
#pragma unroll
        for (int pj = 0; pj < kGPos; ++pj) dAt[(gk + i) * kFusedTP + gp + pj] = da[i][pj];
      }
    __syncthreads();
    for (int i = tid; i < B * kFusedTP; i += kFusedThreads) {  // (part, position)
      const int b = i / kFusedTP, pl = i % kFusedTP, p = p0 + pl;
      acc_t vmax = 0, inv = 0, mb = 0, dot = 0;
      if (p < P) {
        mb = (Mn != nullptr) ? static_cast<acc_t>(Mn[b * P + p]) : acc_t(1);
        // G[k, p] at Gf[p + k * P]; dA'[k, p] at dAt[pl + k * kFusedTP]
        const acc_t dm = softmax_column_backward(Gf + p, P, z, mb, dAt + pl, kFusedTP, dS, K, Mn != nullptr,
                                                 vmax, inv, dot);
        if (Mn != nullptr) dM[(n * B + b) * P + p] = dm;
      }
      st_max[i] = vmax;
      st_inv[i] = inv;
      st_m[i] = mb;
      st_dot[i] = dot;
    }
    __syncthreads();
    const int p = p0 + lane;
#pragma unroll
    for (int j = 0; j < kFusedRowsA; ++j) {
      const int k = warp + j * kFusedWarps;
      if (k < K && p < P) {
        const acc_t gk_ = Gf[k * P + p], zk = z[k], dap = dAt[k * kFusedTP + lane], dsk = dS[k];
        acc_t acc_g = 0, acc_z = 0;
        for (int b = 0; b < B; ++b) {
          const int t = b * kFusedTP + lane;
          const acc_t mb = st_m[t];
          const acc_t a = soft_assignment(mb, gk_, zk, st_max[t], st_inv[t]);
          const acc_t dl = a * (dap * mb + dsk - st_dot[t]);
          acc_g += dl * mb;
          acc_z += dl;
        }
        Gf[k * P + p] = acc_g;  // dG over G: this thread alone reads and writes it in this pass
        z_part[j] += acc_z;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kFusedRowsA; ++j) {
    const int k = warp + j * kFusedWarps;  // the same for the whole warp
    if (k < K) {
      const acc_t t = warp_sum(z_part[j]);
      if (lane == 0) dzp[n * K + k] = t;
    }
  }
  __syncthreads();  // dG complete

  // ---- D: dF = dV^T A' + W^T dG
  in_t* dFn = dF + n * C * P;
  constexpr int kDPos = kFusedTP / kFusedWarps;  // positions per warp per round (4)
  for (int p0 = 0; p0 < P; p0 += kFusedTP) {
    acc_t acc[kDPos][kVCols];
#pragma unroll
    for (int i = 0; i < kDPos; ++i)
#pragma unroll
      for (int jj = 0; jj < kVCols; ++jj) acc[i][jj] = acc_t(0);
    for (int k = 0; k < K; ++k) {
      acc_t dv[kVCols], w[kVCols];
#pragma unroll
      for (int jj = 0; jj < kVCols; ++jj) {
        const int c = lane + kWarp * jj;
        dv[jj] = c < C ? dVT[c * kDVStride + k] : acc_t(0);
        w[jj] = c < C ? W[k * C + c] : acc_t(0);
      }
#pragma unroll
      for (int i = 0; i < kDPos; ++i) {
        const int p = p0 + warp * kDPos + i;  // the same for the whole warp
        const acc_t a = p < P ? Ap[k * P + p] : acc_t(0), g = p < P ? Gf[k * P + p] : acc_t(0);
#pragma unroll
        for (int jj = 0; jj < kVCols; ++jj) acc[i][jj] += dv[jj] * a + w[jj] * g;
      }
    }
#pragma unroll
    for (int i = 0; i < kDPos; ++i) {
      const int p = p0 + warp * kDPos + i;
#pragma unroll
      for (int jj = 0; jj < kVCols; ++jj) {
        const int c = lane + kWarp * jj;
        if (p < P && c < C) dFn[c * P + p] = static_cast<in_t>(acc[i][jj]);
      }
    }
  }

  // ---- E: the dW partial dG F^T
  fused_v_chunk(v, Fn, cen, Gf, static_cast<const acc_t*>(nullptr), work, 0, 0, C, P, K, P);
#pragma unroll
  for (int i = 0; i < kVRows; ++i)
#pragma unroll
    for (int jj = 0; jj < kVCols; ++jj) {
      const int k = warp * kVRows + i, c = lane + kWarp * jj;
      if (k < K && c < C) dWp[(n * K + k) * C + c] = v[i][jj];
    }
}

// END DEVICE CODE

// The tensor-core path reads ATen's 16-bit features as CUDA's own types (the
// same bits).
template <>
struct tc_type<c10::BFloat16> {
  using type = __nv_bfloat16;
};
static_assert(sizeof(c10::BFloat16) == sizeof(__nv_bfloat16), "bfloat16 layouts");

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------
struct Flat {
  // acc dtype, contiguous; M undefined when parts is None.  F is the
  // bfloat16 features themselves when `split` (see bf16_split_gemms).
  at::Tensor F, M, W, z, c;
  int64_t N, C, P, B, K;
  at::ScalarType acc;
  bool split = false;
};

// The attributes of the tensor's device that the host code plans with,
// looked up once per device: the forward plans on every call, and
// cudaDeviceGetAttribute is a driver call.  (ATen's cached
// getDeviceProperties would need CUDAContext.h, which needs the cuSPARSE
// and cuBLAS headers; a toolkit without them still builds this file.)
struct DeviceLimits {
  int64_t smem_optin = 0;  // cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes
  int64_t sms = 0;         // cudaDevAttrMultiProcessorCount
  int major = 0;           // cudaDevAttrComputeCapabilityMajor
};

const DeviceLimits& device_limits(const at::Tensor& t) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<DeviceLimits>> cache;  // by device index
  const int dev = t.device().index();
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() <= static_cast<size_t>(dev)) cache.resize(static_cast<size_t>(dev) + 1);
  if (!cache[dev]) {
    int optin = 0, sms = 0, major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    auto limits = std::make_unique<DeviceLimits>();
    limits->smem_optin = optin;
    limits->sms = sms;
    limits->major = major;
    cache[dev] = std::move(limits);
  }
  return *cache[dev];
}

// Opt-in (PERSONVLAD_CUDA_BF16_GEMM=split3, read at each call): for bfloat16
// features, every GEMM with F runs on bf16 tensor cores instead of as an IEEE
// fp32 GEMM over a float32 copy of F.  The other operand (W, A', dV or dG,
// float32) is split into three bf16 pieces, hi + mid + lo, which together
// keep its 24 mantissa bits (bf16 has float32's exponent range); each piece
// times F (exact in bf16) is exact before accumulation; the tensor cores'
// fp32 accumulation (reported to truncate rather than round on A100/H100)
// adds an error of the order of an fp32 GEMM's, far below the bf16 output's.
// Three bf16 products cost less than one fp32 SIMT GEMM on sm_80+, and F is
// never copied to float32 (at the large benchmark shape, 103 MB).  Off by
// default until a GPU benchmark of both paths in one run decides
// (bench/test_bench_ops.py, fused-cuda-split3).  sm_80 and newer only (bf16
// tensor cores); elsewhere the fp32 path runs.  Each entry point calls this
// once, before its N == 0 return, so a bad value fails for every batch.
bool bf16_split_gemms(const at::Tensor& features) {
  const char* v = std::getenv("PERSONVLAD_CUDA_BF16_GEMM");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "fp32") == 0) return false;
  TORCH_CHECK_VALUE(std::strcmp(v, "split3") == 0,
                    "PERSONVLAD_CUDA_BF16_GEMM: expected 'split3' or 'fp32', got '", v, "'");
  if (features.scalar_type() != at::kBFloat16) return false;
  return device_limits(features).major >= 8;
}

// The float32 matrices a (..., M, L) as their bf16 pieces stacked along dim
// -2: (..., 3M, L) = [hi; mid; lo], hi + mid + lo == a to ~2^-24 relative.
at::Tensor split3_rows(const at::Tensor& a) {
  const at::Tensor hi = a.to(at::kBFloat16);
  const at::Tensor r = a - hi.to(at::kFloat);
  const at::Tensor mid = r.to(at::kBFloat16);
  const at::Tensor lo = (r - mid.to(at::kFloat)).to(at::kBFloat16);
  return at::cat({hi, mid, lo}, -2);
}

// a @ b for a float32 (N, M, L) and b bfloat16 (N, L, Q), float32 (N, M, Q):
// one bf16 GEMM of the stacked pieces with float32 output, then
// (hi + mid) + lo.  `a3` is split3_rows(a), possibly expanded over N.
at::Tensor bmm_split3(const at::Tensor& a3, const at::Tensor& b) {
  const int64_t M = a3.size(-2) / 3;
  const at::Tensor r = at::bmm(a3, b, at::kFloat);  // (N, 3M, Q)
  return (r.narrow(1, 0, M) + r.narrow(1, M, M)).add_(r.narrow(1, 2 * M, M));
}

// a @ b with b = F or F^T (its bf16 self when f.split), in the acc dtype.
at::Tensor gemm_with_F(const Flat& f, const at::Tensor& a, const at::Tensor& b) {
  return f.split ? bmm_split3(split3_rows(a), b) : at::bmm(a, b);
}

// The shared checks (person_vlad_common.h: ValueError naming the argument),
// plus: the tensors are on a CUDA device.
void check_inputs(const at::Tensor& features, const std::optional<at::Tensor>& parts,
                  const at::Tensor& W, const at::Tensor& z, const at::Tensor& c) {
  ::personvlad::check_inputs(features, parts, W, z, c, "personvlad (CUDA)");
  TORCH_CHECK_VALUE(features.is_cuda(), "personvlad (CUDA): features: expected a CUDA tensor, got device ",
                    features.device());
}

Flat flatten_inputs(const at::Tensor& features, const std::optional<at::Tensor>& parts,
                    const at::Tensor& W, const at::Tensor& z, const at::Tensor& c, bool split) {
  Flat f;
  f.N = features.size(0);
  f.C = features.size(1);
  f.P = 1;
  for (int64_t d = 2; d < features.dim(); ++d) f.P *= features.size(d);
  f.K = W.size(0);
  f.B = parts.has_value() ? parts->size(1) : 1;
  f.acc = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  f.split = split;
  f.F = features.reshape({f.N, f.C, f.P}).to(f.split ? at::kBFloat16 : f.acc).contiguous();
  if (parts.has_value()) f.M = parts->reshape({f.N, f.B, f.P}).to(f.acc).contiguous();
  f.W = W.to(f.acc).contiguous();
  f.z = z.to(f.acc).contiguous();
  f.c = c.to(f.acc).contiguous();
  return f;
}

unsigned int flat_blocks(int64_t count) {
  const int64_t blocks = (count + kFlatThreads - 1) / kFlatThreads;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(),
              "personvlad (CUDA): problem too large (", count, " threads)");
  return static_cast<unsigned int>(blocks);
}

unsigned int sample_blocks(int64_t N) {
  TORCH_CHECK_VALUE(N <= std::numeric_limits<int32_t>::max(), "personvlad (CUDA): batch too large, N=", N);
  return static_cast<unsigned int>(N);
}

// Scoped: cuBLAS float32 GEMMs in IEEE fp32, not TF32.
struct NoTF32CuBLAS {
  bool prev = at::globalContext().allowTF32CuBLAS();
  NoTF32CuBLAS() {
    if (prev) at::globalContext().setAllowTF32CuBLAS(false);
  }
  ~NoTF32CuBLAS() {
    if (prev) at::globalContext().setAllowTF32CuBLAS(true);
  }
  NoTF32CuBLAS(const NoTF32CuBLAS&) = delete;
  NoTF32CuBLAS& operator=(const NoTF32CuBLAS&) = delete;
};

// The switches PERSONVLAD_CUDA_FWD and PERSONVLAD_CUDA_BWD, read at each
// call of the forward / backward: "gemm" (the default, also when unset or
// empty) runs the cuBLAS GEMMs and small kernels (forward_core + the
// epilogues); "fused" runs the one-kernel pass (fused_forward_kernel, one
// launch; fused_backward_kernel, one launch plus three batch sums) where it
// takes the shape (fused_forward_plan / fused_backward_smem), and the gemm
// path elsewhere.  Opt-in until a GPU benchmark of both in one run decides
// (bench/test_bench_ops.py, fused-cuda-1k, which sets both).  Any other
// value is a ValueError naming the variable.
bool fused_requested(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0' || std::strcmp(v, "gemm") == 0) return false;
  TORCH_CHECK_VALUE(std::strcmp(v, "fused") == 0, name, ": expected 'fused' or 'gemm', got '", v, "'");
  return true;
}

// PERSONVLAD_CUDA_FWD as above, plus "fused-tc": the one-kernel forward with
// both products on tensor cores (fused_g_tile_tc, fused_v_chunk_tc) where
// the features are bfloat16 and the device is sm_80+; elsewhere "fused".
// Opt-in until a GPU benchmark decides (fused-cuda-1k-tc).
enum class FwdPath { kGemm, kFused, kFusedTc };
FwdPath forward_path_requested() {
  const char* v = std::getenv("PERSONVLAD_CUDA_FWD");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "gemm") == 0) return FwdPath::kGemm;
  if (std::strcmp(v, "fused") == 0) return FwdPath::kFused;
  TORCH_CHECK_VALUE(std::strcmp(v, "fused-tc") == 0,
                    "PERSONVLAD_CUDA_FWD: expected 'fused', 'fused-tc' or 'gemm', got '", v, "'");
  return FwdPath::kFusedTc;
}

// Whether the one-kernel forward runs its products on tensor cores for these
// features (path kFusedTc, bfloat16, sm_80+).
bool tensor_core_forward(FwdPath path, const at::Tensor& features) {
  return path == FwdPath::kFusedTc && features.scalar_type() == at::kBFloat16 &&
         device_limits(features).major >= 8;
}

// The one-kernel passes take float32, float16 and bfloat16 features with the
// parts in the same dtype (or None), as the model has them; float64 (a
// correctness path) and mixed dtypes run the gemm path.  Fewer template
// instances: each costs ptxas seconds per architecture in every build.
bool fused_dtypes(const at::Tensor& features, const std::optional<at::Tensor>& parts) {
  const at::ScalarType t = features.scalar_type();
  return (t == at::kFloat || t == at::kHalf || t == at::kBFloat16) &&
         (!parts.has_value() || parts->scalar_type() == t);
}

// The most dynamic shared memory one block on the features' device may have,
// in bytes: 48 KB everywhere, more with the sm_70+ opt-in.
int64_t shared_memory_limit(const at::Tensor& features) {
  return std::max<int64_t>(device_limits(features).smem_optin, 48 * 1024);
}

// `bytes` if one block on the features' device may have that much dynamic
// shared memory (shared_memory_limit), else -1.
int64_t within_shared_memory(int64_t bytes, const at::Tensor& features) {
  return bytes <= shared_memory_limit(features) ? bytes : -1;
}

// Lets `kernel` use `smem` bytes of dynamic shared memory (needed above 48 KB).
template <typename Kernel>
void allow_shared_memory(Kernel kernel, int64_t smem) {
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
}

// PERSONVLAD_CUDA_FWD_SPLITS: how many blocks the one-kernel forward gives
// each sample (fused_forward_split): unset, "" or "auto" (0) fills one wave
// of the GPU's SMs; a positive integer forces that many (raised where A'
// would not fit, lowered to one 32-position tile per block).  Any other
// value is a ValueError naming the variable.
int64_t forced_splits() {
  const char* v = std::getenv("PERSONVLAD_CUDA_FWD_SPLITS");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return 0;
  char* end = nullptr;
  const long long k = std::strtoll(v, &end, 10);
  TORCH_CHECK_VALUE(end != v && *end == '\0' && k >= 1 && k <= (1 << 20),
                    "PERSONVLAD_CUDA_FWD_SPLITS: expected 'auto' or an integer >= 1, got '", v, "'");
  return k;
}

// The split of fused_forward_kernel for these inputs (P positions, K
// clusters), or splits = 0 where it does not take them: other dtypes
// (fused_dtypes), K > 128, B > 16, 32-bit indices within a sample
// overflowing, or not even one 32-position tile of A' within a block's
// shared memory (48 KB everywhere, more with the sm_70+ opt-in).  Any P
// otherwise: a sample whose A' does not fit one block is split over several.
FusedSplit fused_forward_plan(const at::Tensor& features, const std::optional<at::Tensor>& parts, int64_t K,
                              int64_t P, int64_t forced, bool tc) {
  const int64_t N = features.size(0), B = parts.has_value() ? parts->size(1) : 1;
  if (!fused_dtypes(features, parts) || K > kFusedMaxK || B > kFusedMaxB || P < 1) return {0, 0, 0};
  const int64_t C = features.size(1), imax = std::numeric_limits<int32_t>::max();
  if (C * P > imax || K * C > imax || B * P > imax) return {0, 0, 0};  // 32-bit indices within a sample
  const int64_t limit = shared_memory_limit(features) / int64_t(sizeof(float));
  const FusedSplit plan =
      fused_forward_split(N, P, K, B, device_limits(features).sms, limit, forced, tc);
  if (plan.splits == 0 || N * plan.splits > imax) return {0, 0, 0};
  return plan;
}

// One launch of fused_forward_kernel for features of type scalar_t (`tc`:
// the tensor-core instance, bfloat16 only; fused_dtypes: no float64).  A
// function template, so that the instances no dtype launches are never
// referenced: in AT_DISPATCH's lambda, which is no template, both branches of
// an `if constexpr` are instantiated, and nvcc warned about the host stubs of
// kernels that were never compiled for the device.
template <typename scalar_t>
void launch_fused_forward(const at::Tensor& F, const at::Tensor& M, const at::Tensor& Wa, const at::Tensor& za,
                          const at::Tensor& ca, bool tc, at::Tensor& out, int64_t C, int64_t P,
                          int64_t B, int64_t K, bool normalize, const FusedSplit& plan, uint16_t* v_lo,
                          float* part_s, unsigned* sync, cudaStream_t stream) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    TORCH_INTERNAL_ASSERT(false, "the one-kernel forward takes no float64 (fused_dtypes)");
  } else {
    auto kernel = fused_forward_kernel<scalar_t, scalar_t, float, false>;
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (tc) kernel = fused_forward_kernel<scalar_t, scalar_t, float, true>;
    }
    const int64_t smem = plan.smem_elems * int64_t(sizeof(float));
    allow_shared_memory(kernel, smem);
    kernel<<<sample_blocks(F.size(0) * plan.splits), kFusedThreads, static_cast<size_t>(smem), stream>>>(
        F.data_ptr<scalar_t>(), M.defined() ? M.data_ptr<scalar_t>() : nullptr, Wa.data_ptr<float>(),
        za.data_ptr<float>(), ca.data_ptr<float>(), out.data_ptr<scalar_t>(), static_cast<int>(C),
        static_cast<int>(P), static_cast<int>(B), static_cast<int>(K), normalize, static_cast<int>(plan.splits),
        static_cast<int>(plan.chunk), v_lo, part_s, sync);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The whole forward in fused_forward_kernel (N >= 1, a plan from
// fused_forward_plan): one launch where the inputs are contiguous and the
// parameters float32, as in the model (otherwise their copies come first).
// Split samples sum their blocks' V in the output's memory; they add, per
// sample, the blocks' s (splits x K floats), the chain's turns (one int per V
// chunk, plus one start counter, zeroed by a memset) and, for a 16-bit
// output, the low halves of the float32 sum (K x C uint16, as large as the
// output): at the large benchmark shape in bfloat16, 1.02x the output where
// per-block partials of V took 8x.  `tc` (bfloat16 features, sm_80+:
// tensor_core_forward) runs the tensor-core instance.
void fused_forward(const at::Tensor& features, const std::optional<at::Tensor>& parts,
                   const at::Tensor& W, const at::Tensor& z, const at::Tensor& c, bool normalize,
                   const FusedSplit& plan, bool tc, at::Tensor& out) {
  const int64_t N = features.size(0), C = features.size(1), K = W.size(0);
  const int64_t P = features.numel() / (N * C);
  const int64_t B = parts.has_value() ? parts->size(1) : 1;
  const at::Tensor F = features.reshape({N, C, P}).contiguous();  // its own dtype: no float32 copy
  const at::Tensor M = parts.has_value() ? parts->reshape({N, B, P}).contiguous() : at::Tensor();
  const at::Tensor Wa = W.to(at::kFloat).contiguous(), za = z.to(at::kFloat).contiguous(),
                   ca = c.to(at::kFloat).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor s_parts, lo, sync_t;  // held until the launch is enqueued (the allocator is stream-ordered)
  float* part_s = nullptr;
  uint16_t* v_lo = nullptr;
  unsigned* sync = nullptr;
  if (plan.splits > 1) {
    s_parts = at::empty({N * plan.splits * K}, Wa.options());
    part_s = s_parts.data_ptr<float>();
    if (out.element_size() == 2) {
      lo = at::empty({N * K * C}, features.options().dtype(at::kShort));
      v_lo = reinterpret_cast<uint16_t*>(lo.data_ptr<int16_t>());
    }
    const int64_t counters = 1 + N * fused_v_chunks(K, C);
    sync_t = at::empty({counters}, features.options().dtype(at::kInt));
    C10_CUDA_CHECK(cudaMemsetAsync(sync_t.data_ptr(), 0, counters * sizeof(int32_t), stream));  // a memset, not a kernel
    sync = reinterpret_cast<unsigned*>(sync_t.data_ptr<int32_t>());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(),
                                  "person_vlad_cuda_fused_forward", [&] {
    launch_fused_forward<scalar_t>(F, M, Wa, za, ca, tc, out, C, P, B, K, normalize, plan, v_lo, part_s, sync,
                                   stream);
  });
}

// Bytes of dynamic shared memory fused_backward_kernel needs, or -1 where it
// does not take the inputs: other dtypes (fused_dtypes), K > 64 or C > 256
// (V and dV are one register chunk), B > 16, or A', G, dV^T and the work
// area over what one block may have.  The paper's shape (K = 64, C = 256,
// P = 110) needs ~140 KB: sm_80 and sm_90 (their 163 / 227 KB opt-in), not
// sm_75 or sm_86/89.
int64_t fused_backward_smem(const at::Tensor& features, const std::optional<at::Tensor>& parts, int64_t K,
                            int64_t P) {
  const int64_t C = features.size(1), B = parts.has_value() ? parts->size(1) : 1;
  if (!fused_dtypes(features, parts) || K > kChunkRows || C > kChunkCols || B > kFusedMaxB || P < 1) return -1;
  if (C * P > std::numeric_limits<int32_t>::max()) return -1;  // 32-bit indices within a sample
  return within_shared_memory(fused_bwd_smem_elems(K, P, B, C) * int64_t(sizeof(float)), features);
}

// G, A', S and A' F^T for the flattened inputs (N >= 1).
struct Core {
  at::Tensor G, Ap, S, Vraw;
};

Core forward_core(const Flat& f) {
  const auto opts = f.W.options();
  Core r;
  if (f.split) {
    r.G = bmm_split3(split3_rows(f.W).expand({f.N, 3 * f.K, f.C}), f.F);  // (N, K, P)
  } else {
    // The logits W F stay IEEE fp32 even where the process lets cuBLAS use
    // TF32 (allow_tf32 / set_float32_matmul_precision("high")): TF32 keeps 10
    // mantissa bits, an error of ~0.5 on logits of ~1e3 (alpha = 1000), which
    // would scale soft-assignments by up to e^0.5.  The switch is process-wide:
    // set for this one GEMM and restored.
    const NoTF32CuBLAS ieee;
    r.G = at::bmm(f.W.expand({f.N, f.K, f.C}), f.F);  // (N, K, P)
  }
  r.Ap = at::empty({f.N, f.K, f.P}, opts);
  at::Tensor Sc = at::empty({f.N, f.K, f.P}, opts);
  // An empty spatial grid (P = 0, rejected by ops.py but legal for the raw op)
  // launches nothing: A' and S stay empty / zero.
  at::Tensor st_max = at::empty({f.N, f.B, f.P}, opts);
  at::Tensor st_inv = at::empty({f.N, f.B, f.P}, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (f.P > 0) AT_DISPATCH_FLOATING_TYPES(f.acc, "person_vlad_cuda_assign_forward", [&] {
    const scalar_t* M = f.M.defined() ? f.M.data_ptr<scalar_t>() : nullptr;
    softmax_stats_forward_kernel<scalar_t><<<flat_blocks(f.N * f.B * f.P), kFlatThreads, 0, stream>>>(
        r.G.data_ptr<scalar_t>(), M, f.z.data_ptr<scalar_t>(), st_max.data_ptr<scalar_t>(),
        st_inv.data_ptr<scalar_t>(), f.N, f.B, f.K, f.P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    assign_accumulate_forward_kernel<scalar_t>
        <<<flat_blocks(f.N * f.K * f.P), kFlatThreads, 0, stream>>>(
            r.G.data_ptr<scalar_t>(), M, f.z.data_ptr<scalar_t>(), st_max.data_ptr<scalar_t>(),
            st_inv.data_ptr<scalar_t>(), r.Ap.data_ptr<scalar_t>(), Sc.data_ptr<scalar_t>(), f.N,
            f.B, f.K, f.P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  r.S = Sc.sum(2);                                       // (N, K)
  r.Vraw = gemm_with_F(f, r.Ap, f.F.transpose(1, 2));    // (N, K, C)
  return r;
}

// Gradient `g` (any shape with like.numel() elements, acc dtype) in the dtype
// and layout of `like` (the layout at::empty_like(like) has, which is what the
// fake kernel returns).
at::Tensor like_input(const at::Tensor& g, const at::Tensor& like) {
  at::Tensor t = g.to(like.scalar_type()).reshape(like.sizes());
  if (like.is_contiguous()) return t.contiguous();
  at::Tensor out = at::empty_like(like);
  out.copy_(t);
  return out;
}

// One launch of fused_backward_kernel for features of type scalar_t; a
// function template for the reason given at launch_fused_forward (no float64
// instance is referenced).
template <typename scalar_t>
void launch_fused_backward(const at::Tensor& gO, const at::Tensor& F, const at::Tensor& M, const at::Tensor& Wa,
                           const at::Tensor& za, const at::Tensor& ca, at::Tensor& dF, at::Tensor& dM,
                           at::Tensor& dWp, at::Tensor& dcp, at::Tensor& dzp, int64_t C, int64_t P, int64_t B,
                           int64_t K, bool normalize, int64_t smem, cudaStream_t stream) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    TORCH_INTERNAL_ASSERT(false, "the one-kernel backward takes no float64 (fused_dtypes)");
  } else {
    const auto kernel = fused_backward_kernel<scalar_t, scalar_t, float>;
    allow_shared_memory(kernel, smem);
    kernel<<<sample_blocks(F.size(0)), kFusedThreads, static_cast<size_t>(smem), stream>>>(
        gO.data_ptr<scalar_t>(), F.data_ptr<scalar_t>(), M.defined() ? M.data_ptr<scalar_t>() : nullptr,
        Wa.data_ptr<float>(), za.data_ptr<float>(), ca.data_ptr<float>(), dF.data_ptr<scalar_t>(),
        dM.defined() ? dM.data_ptr<float>() : nullptr, dWp.data_ptr<float>(), dcp.data_ptr<float>(),
        dzp.data_ptr<float>(), static_cast<int>(C), static_cast<int>(P), static_cast<int>(B),
        static_cast<int>(K), normalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The whole backward in fused_backward_kernel (N >= 1, smem from
// fused_backward_smem, grad_output in the features' dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const at::Tensor& grad_output, const at::Tensor& features, const std::optional<at::Tensor>& parts,
    const at::Tensor& W, const at::Tensor& z, const at::Tensor& c, bool normalize, int64_t smem) {
  const int64_t N = features.size(0), C = features.size(1), K = W.size(0);
  const int64_t P = features.numel() / (N * C);
  const int64_t B = parts.has_value() ? parts->size(1) : 1;
  const at::Tensor F = features.reshape({N, C, P}).contiguous();
  const at::Tensor M = parts.has_value() ? parts->reshape({N, B, P}).contiguous() : at::Tensor();
  const at::Tensor Wa = W.to(at::kFloat).contiguous(), za = z.to(at::kFloat).contiguous(),
                   ca = c.to(at::kFloat).contiguous();
  const at::Tensor gO = grad_output.reshape({N, K, C}).contiguous();
  const auto opts = Wa.options();
  at::Tensor dF = at::empty({N, C, P}, features.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dM = parts.has_value() ? at::empty({N, B, P}, opts) : at::Tensor();
  at::Tensor dWp = at::empty({N, K, C}, opts), dcp = at::empty({N, K, C}, opts), dzp = at::empty({N, K}, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(),
                                  "person_vlad_cuda_fused_backward", [&] {
    launch_fused_backward<scalar_t>(gO, F, M, Wa, za, ca, dF, dM, dWp, dcp, dzp, C, P, B, K, normalize, smem,
                                    stream);
  });
  return std::make_tuple(
      like_input(dF, features),
      parts.has_value() ? like_input(dM, *parts) : at::empty({0}, features.options()),
      like_input(dWp.sum(0), W), like_input(dzp.sum(0), z), like_input(dcp.sum(0), c));
}

at::Tensor person_vlad_cuda(const at::Tensor& features, const std::optional<at::Tensor>& parts,
                            const at::Tensor& assign_weight, const at::Tensor& assign_bias,
                            const at::Tensor& centers, bool normalize) {
  check_inputs(features, parts, assign_weight, assign_bias, centers);
  const at::cuda::OptionalCUDAGuard guard(at::device_of(features));
  const NoAutocastGuard no_autocast;  // the ATen GEMMs below stay fp32/fp64
  const int64_t N = features.size(0), C = features.size(1), K = assign_weight.size(0);
  at::Tensor out = normalize ? at::empty({N, K * C}, features.options())
                             : at::empty({N, K, C}, features.options());
  const bool split = bf16_split_gemms(features);
  const FwdPath path = forward_path_requested();  // the switches are checked at N == 0 too
  const bool fused = path != FwdPath::kGemm;
  const int64_t forced = fused ? forced_splits() : 0;
  if (N == 0) return out;
  if (fused) {
    const bool tc = tensor_core_forward(path, features);
    const FusedSplit plan = fused_forward_plan(features, parts, K, features.numel() / (N * C), forced, tc);
    if (plan.splits > 0) {
      fused_forward(features, parts, assign_weight, assign_bias, centers, normalize, plan, tc, out);
      return out;
    }
  }

  const Flat f = flatten_inputs(features, parts, assign_weight, assign_bias, centers, split);
  const Core core = forward_core(f);
  at::Tensor rn = at::empty({N, K}, f.W.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(),
                                  "person_vlad_cuda_epilogue", [&] {
    using out_t = scalar_t;
    using acc_t = at::opmath_type<scalar_t>;  // double for double, else float (== f.acc)
    TORCH_INTERNAL_ASSERT(c10::CppTypeToScalarType<acc_t>::value == f.acc);
    epilogue_forward_kernel<out_t, acc_t><<<sample_blocks(N), kEpilogueThreads, 0, stream>>>(
        core.Vraw.data_ptr<acc_t>(), core.S.data_ptr<acc_t>(), f.c.data_ptr<acc_t>(),
        out.data_ptr<out_t>(), rn.data_ptr<acc_t>(), K, C, normalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> person_vlad_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& features,
    const std::optional<at::Tensor>& parts, const at::Tensor& assign_weight,
    const at::Tensor& assign_bias, const at::Tensor& centers, bool normalize) {
  check_inputs(features, parts, assign_weight, assign_bias, centers);
  TORCH_CHECK_VALUE(grad_output.device() == features.device(),
              "personvlad (CUDA): grad_output: expected device ", features.device(), ", got ",
              grad_output.device());
  const at::cuda::OptionalCUDAGuard guard(at::device_of(features));
  const NoAutocastGuard no_autocast;  // the ATen GEMMs below stay fp32/fp64
  const int64_t N = features.size(0), C = features.size(1), K = assign_weight.size(0);
  TORCH_CHECK_VALUE(grad_output.numel() == N * K * C, "personvlad (CUDA): grad_output: expected ",
              N * K * C, " elements (N=", N, ", K=", K, ", C=", C, "), got shape ",
              grad_output.sizes());

  const bool split = bf16_split_gemms(features);
  const bool fused = fused_requested("PERSONVLAD_CUDA_BWD");  // both switches checked at N == 0 too
  if (N == 0) {
    return std::make_tuple(at::empty_like(features),
                           parts.has_value() ? at::empty_like(*parts)
                                             : at::empty({0}, features.options()),
                           at::zeros_like(assign_weight), at::zeros_like(assign_bias),
                           at::zeros_like(centers));
  }

  if (fused && grad_output.scalar_type() == features.scalar_type()) {
    const int64_t smem = fused_backward_smem(features, parts, K, features.numel() / (N * C));
    if (smem >= 0)
      return fused_backward(grad_output, features, parts, assign_weight, assign_bias, centers, normalize,
                            smem);
  }

  const Flat f = flatten_inputs(features, parts, assign_weight, assign_bias, centers, split);
  const int64_t B = f.B, P = f.P;
  const auto opts = f.W.options();
  const Core core = forward_core(f);  // recompute
  const at::Tensor gO = grad_output.reshape({N, K, C}).to(f.acc).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();

  // dV and dS through the normalisation.
  at::Tensor dV = at::empty({N, K, C}, opts);
  at::Tensor dS = at::empty({N, K}, opts);
  at::Tensor nrm = at::empty({N, K}, opts);
  AT_DISPATCH_FLOATING_TYPES(f.acc, "person_vlad_cuda_epilogue_backward", [&] {
    epilogue_backward_kernel<scalar_t><<<sample_blocks(N), kEpilogueThreads, 0, stream>>>(
        core.Vraw.data_ptr<scalar_t>(), core.S.data_ptr<scalar_t>(), f.c.data_ptr<scalar_t>(),
        gO.data_ptr<scalar_t>(), dV.data_ptr<scalar_t>(), dS.data_ptr<scalar_t>(),
        nrm.data_ptr<scalar_t>(), K, C, normalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // Through V = A' F^T - S c.
  const at::Tensor dAp = gemm_with_F(f, dV, f.F);              // (N, K, P)
  const at::Tensor dc = (dV * core.S.unsqueeze(2)).sum(0).neg_();  // (K, C)

  // Through the part-reweighted softmax.
  at::Tensor dG = at::empty({N, K, P}, opts);
  at::Tensor dZc = at::empty({N, K, P}, opts);
  at::Tensor dM = f.M.defined() ? at::empty({N, B, P}, opts) : at::Tensor();
  at::Tensor st_max = at::empty({N, B, P}, opts);
  at::Tensor st_inv = at::empty({N, B, P}, opts);
  at::Tensor st_dot = at::empty({N, B, P}, opts);
  if (P > 0) AT_DISPATCH_FLOATING_TYPES(f.acc, "person_vlad_cuda_assign_backward", [&] {
    const scalar_t* M = f.M.defined() ? f.M.data_ptr<scalar_t>() : nullptr;
    softmax_stats_backward_kernel<scalar_t><<<flat_blocks(N * B * P), kFlatThreads, 0, stream>>>(
        core.G.data_ptr<scalar_t>(), M, f.z.data_ptr<scalar_t>(), dAp.data_ptr<scalar_t>(),
        dS.data_ptr<scalar_t>(), st_max.data_ptr<scalar_t>(), st_inv.data_ptr<scalar_t>(),
        st_dot.data_ptr<scalar_t>(), dM.defined() ? dM.data_ptr<scalar_t>() : nullptr, N, B, K, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    assign_accumulate_backward_kernel<scalar_t>
        <<<flat_blocks(N * K * P), kFlatThreads, 0, stream>>>(
            core.G.data_ptr<scalar_t>(), M, f.z.data_ptr<scalar_t>(), dAp.data_ptr<scalar_t>(),
            dS.data_ptr<scalar_t>(), st_max.data_ptr<scalar_t>(), st_inv.data_ptr<scalar_t>(),
            st_dot.data_ptr<scalar_t>(), dG.data_ptr<scalar_t>(), dZc.data_ptr<scalar_t>(), N, B, K,
            P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // Through G = W F, and V's dependence on F.
  const at::Tensor dF = at::baddbmm(at::bmm(f.W.t().expand({N, C, K}), dG), dV.transpose(1, 2),
                                    core.Ap);  // (N, C, P)
  // sum_n dG F^T: N*K*C of scratch, not the permuted copies of F and dG.
  const at::Tensor dW = gemm_with_F(f, dG, f.F.transpose(1, 2)).sum(0);  // (K, C)
  const at::Tensor dz = dZc.sum(at::IntArrayRef{0, 2});                          // (K,)

  return std::make_tuple(
      like_input(dF, features),
      parts.has_value() ? like_input(dM, *parts) : at::empty({0}, features.options()),
      like_input(dW, assign_weight), like_input(dz, assign_bias), like_input(dc, centers));
}

}  // namespace
}  // namespace cuda
}  // namespace personvlad

TORCH_LIBRARY_IMPL(personvlad, CUDA, m) {
  m.impl("person_vlad", &personvlad::cuda::person_vlad_cuda);
  m.impl("person_vlad_backward", &personvlad::cuda::person_vlad_backward_cuda);
}
