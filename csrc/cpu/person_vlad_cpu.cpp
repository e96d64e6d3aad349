// CPU kernels of the fused PersonVLAD op (SPEC §1):
//   personvlad::person_vlad           (forward)
//   personvlad::person_vlad_backward  (all five input gradients)
//
// ---------------------------------------------------------------------------
// Notation (one sample n; the batch is independent):
//   F  (C x P)   features, spatial grid flattened, P = prod(S)
//   M  (B x P)   part maps (parts=None: B = 1, M == 1)
//   W  (K x C), z (K), c (K x C)
//   G  = W F                                  (K x P)   GEMM
//   l[b,k,s]   = M[b,s] G[k,s] + z[k]
//   a[b,:,s]   = softmax_k l[b,:,s]           (max-subtracted)
//   A'[k,s]    = sum_b a[b,k,s] M[b,s]        (K x P)
//   s[k]       = sum_{b,s} a[b,k,s]
//   V          = A' F^T - s c                 (K x C)   GEMM
//   normalize: r_k = ||V_k||, U_k = V_k / max(r_k, eps),
//              u = flatten_k-major(U), R = ||u||, out = u / max(R, eps)
//
// Everything is kept in "s-major" layout (P x K row-major, i.e. G^T, A'^T)
// so that the softmax over k and all per-(b,s) work run over contiguous
// memory.  Only K-sized scratch exists per (b,s): nothing of size B*K*P,
// B*C*P or B*K*C*P is ever allocated; the per-sample scratch is O(P*K + K*C).
//
// Backward (derivation).  Given g = dL/dout:
//   Global L2 norm, out = u / max(R, eps):
//     R >= eps:  du = (g - out (out . g)) / R          (Jacobian (I - o o^T)/R)
//     R <  eps:  du = g / eps                           (clamp active: the norm
//                                                       is a constant)
//   Intra norm, U_k = V_k / max(r_k, eps), for each k:
//     r_k >= eps: dV_k = (du_k - U_k (U_k . du_k)) / r_k
//     r_k <  eps: dV_k = du_k / eps
//   (normalize=False: dV = g.)  The ">=" matches torch's clamp_min backward.
//   V = A' F^T - s c:
//     dA' = dV F            (K x P)      -> computed as dA'^T = F^T dV^T
//     dF  = dV^T A'         (C x P)      (first part of dF)
//     ds[k] = -dV_k . c_k,  dc_k = -s[k] dV_k
//   A' = sum_b a M,  s = sum_{b,s} a:
//     da[b,k,s] = dA'[k,s] M[b,s] + ds[k]
//     dM[b,s]   = sum_k a[b,k,s] dA'[k,s]                       (via A')
//   Softmax over k:
//     dl[b,k,s] = a[b,k,s] (da[b,k,s] - sum_j a[b,j,s] da[b,j,s])
//   l = M G + z:
//     dz[k]   = sum_{b,s} dl[b,k,s]
//     dG[k,s] = sum_b dl[b,k,s] M[b,s]
//     dM[b,s] += sum_k dl[b,k,s] G[k,s]
//   G = W F:
//     dW = dG F^T          (summed over the batch)
//     dF += W^T dG
// The backward recomputes G, a, A', s and V from the inputs (no activations
// are saved by the autograd formula).  The per-(b,s) soft-assignment is
// recomputed twice (forward pass for A'/s/V, then in the backward row loop),
// which costs 2x the exponentials but no B*K*P storage.
//
// Structure.  Phases over the whole batch: every GEMM is one batched ATen
// call (bmm, threaded by ATen/BLAS) made outside our own parallel regions, so
// BLAS threading never nests; the per-position loops (softmax, A', s, and
// their backward) run in at::parallel_for over samples (N >= threads) or over
// positions (N < threads) and call no ATen op.  Buffers of size N*P*K and
// N*K*C only (never N*B*K*P).  Batch reductions (dW, dz, dc) are sums over
// the batch dimension in a fixed order: deterministic.
//
// Dtypes.  Compute dtype: float64 if features is float64, else float32
// (float16/bfloat16 features and mixed-dtype parameters are converted once).
// The output has features' dtype; every gradient has its input's dtype,
// shape and (dense) layout.
// ---------------------------------------------------------------------------
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "person_vlad_common.h"

namespace personvlad {
namespace {

// GCC on x86-64 Linux: build AVX-512 / AVX2 clones of the hot loops and pick
// one at load time (ifunc), so the extension needs no -march flag.
// Build with -ffp-contract=off (setup.py, CMakeLists.txt): with GCC's default
// FMA contraction the AVX-512 clone's results differed in the last bits in
// about 1 call in 15-20 made from a fresh thread (as autograd's backward is),
// so training was not bitwise resumable; without contraction every path
// rounds each multiply and add the same way, and the speed is unchanged
// (backward ~15% slower at the paper-like shape).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PV_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PV_MULTIVERSION
#endif

#if defined(__GNUC__)
#define PV_INLINE inline __attribute__((always_inline))
#else
#define PV_INLINE inline
#endif

// ---- vectorisable exp ------------------------------------------------------
// x <= 0 always (max-subtracted logits).  float: Cephes-style range reduction
// + degree-6 polynomial, written branch-free so the compiler vectorises it;
// about 2 ulp, exactly 0 below -87.33 (where expf leaves the normal range).
PV_INLINE float exp_nonpos(float x) {
  const float lo = -87.33654f;
  const bool under = x < lo;
  x = x < lo ? lo : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: round-to-nearest trick
  float t = x * 1.44269504088896341f + magic;
  float fx = t - magic;
  int32_t ti;
  std::memcpy(&ti, &t, sizeof(ti));
  const int32_t n = ti - 0x4B400000;  // the integer fx
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return under ? 0.0f : y;
}
PV_INLINE double exp_nonpos(double x) { return std::exp(x); }

// Reductions written with independent lanes so that they vectorise without
// -ffast-math (the lane order is fixed: results are deterministic).
template <typename T>
struct Lanes {
  static constexpr int64_t L = 64 / sizeof(T);  // one 512-bit register
};

// Pairwise (tree) folding of the lane accumulators: each level is a vector
// operation, unlike a sequential scalar chain.
template <typename T, int64_t L>
PV_INLINE T fold_sum(T* acc) {
  for (int64_t w = L / 2; w >= 1; w /= 2)
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}
template <typename T, int64_t L>
PV_INLINE T fold_max(T* acc) {
  for (int64_t w = L / 2; w >= 1; w /= 2)
    for (int64_t j = 0; j < w; ++j) acc[j] = acc[j + w] > acc[j] ? acc[j + w] : acc[j];
  return acc[0];
}

template <typename T>
PV_INLINE T row_max(const T* x, int64_t K) {
  constexpr int64_t L = Lanes<T>::L;
  T acc[L];
  for (int64_t j = 0; j < L; ++j) acc[j] = -std::numeric_limits<T>::infinity();
  int64_t k = 0;
  for (; k + L <= K; k += L)
    for (int64_t j = 0; j < L; ++j) acc[j] = x[k + j] > acc[j] ? x[k + j] : acc[j];
  T m = fold_max<T, L>(acc);
  for (; k < K; ++k) m = x[k] > m ? x[k] : m;
  return m;
}

template <typename T>
PV_INLINE T row_dot(const T* x, const T* y, int64_t K) {
  constexpr int64_t L = Lanes<T>::L;
  T acc[L];
  for (int64_t j = 0; j < L; ++j) acc[j] = T(0);
  int64_t k = 0;
  for (; k + L <= K; k += L)
    for (int64_t j = 0; j < L; ++j) acc[j] += x[k + j] * y[k + j];
  T tail = T(0);
  for (; k < K; ++k) tail += x[k] * y[k];
  return fold_sum<T, L>(acc) + tail;
}

// e[k] = exp(e[k] - mx), returns sum_k e[k].
template <typename T>
PV_INLINE T row_exp_sum(T* e, T mx, int64_t K) {
  constexpr int64_t L = Lanes<T>::L;
  T acc[L];
  for (int64_t j = 0; j < L; ++j) acc[j] = T(0);
  int64_t k = 0;
  for (; k + L <= K; k += L)
    for (int64_t j = 0; j < L; ++j) {
      const T v = exp_nonpos(e[k + j] - mx);
      e[k + j] = v;
      acc[j] += v;
    }
  T tail = T(0);
  for (; k < K; ++k) {
    const T v = exp_nonpos(e[k] - mx);
    e[k] = v;
    tail += v;
  }
  return fold_sum<T, L>(acc) + tail;
}

// a[k] = softmax_k(m * g[k] + z[k]).
template <typename T>
PV_INLINE void softmax_row(const T* g, T m, const T* z, int64_t K, T* a) {
  for (int64_t k = 0; k < K; ++k) a[k] = m * g[k] + z[k];
  const T mx = row_max(a, K);
  const T sum = row_exp_sum(a, mx, K);
  const T inv = T(1) / sum;
  for (int64_t k = 0; k < K; ++k) a[k] *= inv;
}

// ---- per-position loops ------------------------------------------------------
// Arguments for one sample, rows [s0, s1) of the P x K (s-major) buffers.
template <typename T>
struct RowArgs {
  const T* GT;   // (P, K)  G^T
  const T* M;    // (B, P)  or nullptr (one part, all ones)
  const T* z;    // (K)
  int64_t B, P, K;
  int64_t ldy = 0;  // row stride of AT and dGT
  // forward outputs
  T* AT = nullptr;  // (P, K)  A'^T, row stride ldy
  T* ST = nullptr;  // (P, K)  sum_b a  (reduced over s afterwards)
  // backward inputs / outputs
  const T* dAT = nullptr;  // (P, K)  dA'^T
  const T* ds = nullptr;   // (K)
  T* dGT = nullptr;        // (P, K)  dG^T, row stride ldy
  T* DZ = nullptr;         // (P, K)  sum_b dl (reduced over s afterwards)
  T* dM = nullptr;         // (B, P)  or nullptr
};

template <typename T>
PV_INLINE void forward_rows_impl(const RowArgs<T>& r, int64_t s0, int64_t s1, T* a) {
  const int64_t K = r.K;
  for (int64_t s = s0; s < s1; ++s) {
    const T* g = r.GT + s * K;
    T* at = r.AT + s * r.ldy;
    T* st = r.ST + s * K;
    for (int64_t k = 0; k < K; ++k) {
      at[k] = T(0);
      st[k] = T(0);
    }
    for (int64_t b = 0; b < r.B; ++b) {
      const T m = r.M ? r.M[b * r.P + s] : T(1);
      softmax_row(g, m, r.z, K, a);
      for (int64_t k = 0; k < K; ++k) {
        at[k] += a[k] * m;
        st[k] += a[k];
      }
    }
  }
}

template <typename T>
PV_INLINE void backward_rows_impl(const RowArgs<T>& r, int64_t s0, int64_t s1, T* a) {
  const int64_t K = r.K;
  T* da = a + K;
  for (int64_t s = s0; s < s1; ++s) {
    const T* g = r.GT + s * K;
    const T* dat = r.dAT + s * K;
    T* dg = r.dGT + s * r.ldy;
    T* dz = r.DZ + s * K;
    for (int64_t k = 0; k < K; ++k) {
      dg[k] = T(0);
      dz[k] = T(0);
    }
    for (int64_t b = 0; b < r.B; ++b) {
      const T m = r.M ? r.M[b * r.P + s] : T(1);
      softmax_row(g, m, r.z, K, a);
      for (int64_t k = 0; k < K; ++k) da[k] = dat[k] * m + r.ds[k];
      const T dm_assign = row_dot(a, dat, K);  // through A' = sum_b a M
      const T adot = row_dot(a, da, K);
      for (int64_t k = 0; k < K; ++k) {
        const T dl = a[k] * (da[k] - adot);
        da[k] = dl;
        dz[k] += dl;
        dg[k] += dl * m;
      }
      if (r.dM) r.dM[b * r.P + s] = dm_assign + row_dot(da, g, K);
    }
  }
}

PV_MULTIVERSION void forward_rows_f32(const RowArgs<float>& r, int64_t s0, int64_t s1, float* a) {
  forward_rows_impl(r, s0, s1, a);
}
PV_MULTIVERSION void backward_rows_f32(const RowArgs<float>& r, int64_t s0, int64_t s1, float* a) {
  backward_rows_impl(r, s0, s1, a);
}
void forward_rows(const RowArgs<float>& r, int64_t s0, int64_t s1, float* a) {
  forward_rows_f32(r, s0, s1, a);
}
void backward_rows(const RowArgs<float>& r, int64_t s0, int64_t s1, float* a) {
  backward_rows_f32(r, s0, s1, a);
}
void forward_rows(const RowArgs<double>& r, int64_t s0, int64_t s1, double* a) {
  forward_rows_impl(r, s0, s1, a);
}
void backward_rows(const RowArgs<double>& r, int64_t s0, int64_t s1, double* a) {
  backward_rows_impl(r, s0, s1, a);
}

// Run fn(s0, s1, scratch) over [0, P): inline when `inner_parallel` is false
// (we already run inside a batch-parallel loop), else split over P.
template <typename T, typename Fn>
void over_positions(int64_t P, int64_t K, int64_t B, bool inner_parallel, const Fn& fn) {
  auto run = [&](int64_t s0, int64_t s1) {
    std::vector<T> scratch(2 * K);
    fn(s0, s1, scratch.data());
  };
  if (!inner_parallel) {
    run(0, P);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, B * K));
  at::parallel_for(0, P, grain, run);
}

// Column sums of a (P, K) row-major buffer into out (K).
template <typename T>
void column_sums(const T* X, int64_t P, int64_t K, T* out, bool accumulate) {
  if (!accumulate)
    for (int64_t k = 0; k < K; ++k) out[k] = T(0);
  for (int64_t s = 0; s < P; ++s) {
    const T* x = X + s * K;
    for (int64_t k = 0; k < K; ++k) out[k] += x[k];
  }
}

// The flattened, compute-dtype, contiguous inputs of one call.
struct Inputs {
  VladDims d;
  at::ScalarType cd;
  at::Tensor F;  // (N, C, P)
  at::Tensor M;  // (N, B, P) or undefined
  at::Tensor W;  // (K, C)
  at::Tensor z;  // (K)
  at::Tensor c;  // (K, C)
};

Inputs prepare(const at::Tensor& features, const std::optional<at::Tensor>& parts,
               const at::Tensor& W, const at::Tensor& z, const at::Tensor& c, const char* what) {
  Inputs in;
  in.d = check_inputs(features, parts, W, z, c, what);
  TORCH_CHECK(features.device().is_cpu(), what, ": expected CPU tensors, got ", features.device());
  in.cd = compute_dtype(features);
  const VladDims& d = in.d;
  in.F = flat_contig(features, in.cd, {d.N, d.C, d.P});
  if (d.has_parts) in.M = flat_contig(*parts, in.cd, {d.N, d.B, d.P});
  in.W = W.to(in.cd).contiguous();
  in.z = z.to(in.cd).contiguous();
  in.c = c.to(in.cd).contiguous();
  return in;
}

// In-place intra + global L2 normalisation of V (K, C) (contiguous).
template <typename T>
void normalize_inplace(T* V, int64_t K, int64_t C) {
  const T eps = T(kNormEps);
  T total = T(0);
  for (int64_t k = 0; k < K; ++k) {
    T* v = V + k * C;
    const T r = std::sqrt(row_dot(v, v, C));
    const T inv = T(1) / std::max(r, eps);
    T sq = T(0);
    for (int64_t j = 0; j < C; ++j) {
      v[j] *= inv;
      sq += v[j] * v[j];
    }
    total += sq;
  }
  const T inv = T(1) / std::max(std::sqrt(total), eps);
  for (int64_t i = 0; i < K * C; ++i) V[i] *= inv;
}

// dV from g (both (K, C)) through the two normalisations; V is the raw VLAD.
// Uses U (K, C) as scratch.  Writes dV in place of g.
template <typename T>
void normalize_backward_inplace(const T* V, T* g, T* U, int64_t K, int64_t C) {
  const T eps = T(kNormEps);
  std::vector<T> rk(K);
  T usq = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* v = V + k * C;
    T* u = U + k * C;
    const T r = std::sqrt(row_dot(v, v, C));
    rk[k] = r;
    const T inv = T(1) / std::max(r, eps);
    for (int64_t j = 0; j < C; ++j) u[j] = v[j] * inv;
    usq += row_dot(u, u, C);
  }
  const T R = std::sqrt(usq);
  const int64_t KC = K * C;
  if (R >= eps) {
    // out = U / R; du = (g - out (out . g)) / R = (g - U (U . g) / R^2) / R
    const T ug = row_dot(U, g, KC);
    const T coef = ug / (R * R);
    const T invR = T(1) / R;
    for (int64_t i = 0; i < KC; ++i) g[i] = (g[i] - U[i] * coef) * invR;
  } else {
    const T inv = T(1) / eps;
    for (int64_t i = 0; i < KC; ++i) g[i] *= inv;
  }
  for (int64_t k = 0; k < K; ++k) {
    T* du = g + k * C;
    const T* u = U + k * C;
    const T r = rk[k];
    if (r >= eps) {
      const T proj = row_dot(u, du, C);
      const T inv = T(1) / r;
      for (int64_t j = 0; j < C; ++j) du[j] = (du[j] - u[j] * proj) * inv;
    } else {
      const T inv = T(1) / eps;
      for (int64_t j = 0; j < C; ++j) du[j] *= inv;
    }
  }
}

// Run per_sample(n, inner_parallel) for every sample: batch-parallel when
// there are at least as many samples as threads (each sample then runs on one
// thread), else samples in turn with the position loop split over threads.
// Only plain loops run inside these parallel regions: every GEMM is a batched
// ATen call made outside them (no nested BLAS threading).
template <typename Fn>
void for_each_sample(int64_t N, const Fn& per_sample) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (N >= threads || at::in_parallel_region()) {
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) per_sample(n, false);
    });
  } else {
    for (int64_t n = 0; n < N; ++n) per_sample(n, true);
  }
}

// W^T broadcast over the batch as a (N, C, K) view (no copy).
inline at::Tensor batched_Wt(const at::Tensor& W, int64_t N) {
  return W.t().unsqueeze(0).expand({N, W.size(1), W.size(0)});
}

// Forward up to the soft-assignment statistics for the whole batch:
// The per-sample inputs shared by the forward and backward row kernels.
template <typename T>
RowArgs<T> sample_rows(const Inputs& in, const T* gt, int64_t n) {
  const VladDims& d = in.d;
  RowArgs<T> r;
  r.GT = gt + n * d.P * d.K;
  r.M = d.has_parts ? in.M.data_ptr<T>() + n * d.B * d.P : nullptr;
  r.z = in.z.data_ptr<T>();
  r.B = d.B;
  r.P = d.P;
  r.K = d.K;
  r.ldy = d.K;
  return r;
}

// GT = F^T W^T (N, P, K), AT = A'^T (N, P, K), s (N, K).
template <typename T>
void assign_phase(const Inputs& in, const at::Tensor& FT, at::Tensor& GT, at::Tensor& AT,
                  at::Tensor& s) {
  const VladDims& d = in.d;
  at::bmm_out(GT, FT, batched_Wt(in.W, d.N));
  const T* gt = GT.data_ptr<T>();
  T* atp = AT.data_ptr<T>();
  T* sp = s.data_ptr<T>();
  for_each_sample(d.N, [&](int64_t n, bool inner) {
    std::vector<T> ST(d.P * d.K);
    RowArgs<T> r = sample_rows<T>(in, gt, n);
    r.AT = atp + n * d.P * d.K;
    r.ST = ST.data();
    over_positions<T>(d.P, d.K, d.B, inner,
                      [&](int64_t s0, int64_t s1, T* a) { forward_rows(r, s0, s1, a); });
    column_sums(ST.data(), d.P, d.K, sp + n * d.K, false);
  });
}

// V = A' F^T - s c for the whole batch, into V (N, K, C).
template <typename T>
void vlad_phase(const Inputs& in, const at::Tensor& FT, const at::Tensor& AT, const at::Tensor& s,
                at::Tensor& V) {
  const VladDims& d = in.d;
  at::bmm_out(V, AT.transpose(1, 2), FT);
  T* v = V.data_ptr<T>();
  const T* sp = s.data_ptr<T>();
  const T* c = in.c.data_ptr<T>();
  at::parallel_for(0, d.N * d.K, std::max<int64_t>(1, 8192 / d.C), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T sk = sp[i];
      const T* ck = c + (i % d.K) * d.C;
      T* row = v + i * d.C;
      for (int64_t j = 0; j < d.C; ++j) row[j] -= sk * ck[j];
    }
  });
}

template <typename T>
at::Tensor forward_impl(const Inputs& in, bool normalize) {
  const VladDims& d = in.d;
  const auto o = in.F.options();
  at::Tensor out = at::empty({d.N, d.K, d.C}, o);
  if (d.N == 0) return out;
  const at::Tensor FT = in.F.transpose(1, 2);  // (N, P, C) view
  at::Tensor GT = at::empty({d.N, d.P, d.K}, o);
  at::Tensor AT = at::empty({d.N, d.P, d.K}, o);
  at::Tensor s = at::empty({d.N, d.K}, o);
  assign_phase<T>(in, FT, GT, AT, s);
  vlad_phase<T>(in, FT, AT, s, out);
  if (normalize) {
    T* v = out.data_ptr<T>();
    at::parallel_for(0, d.N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) normalize_inplace(v + n * d.K * d.C, d.K, d.C);
    });
  }
  return out;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const Inputs& in, const at::Tensor& grad, bool normalize) {
  const VladDims& d = in.d;
  const auto o = in.F.options();
  at::Tensor dM = d.has_parts ? at::empty({d.N, d.B, d.P}, o) : at::Tensor();
  if (d.N == 0) {
    return {at::empty({d.N, d.C, d.P}, o), dM, at::zeros({d.K, d.C}, o), at::zeros({d.K}, o),
            at::zeros({d.K, d.C}, o)};
  }
  const at::Tensor FT = in.F.transpose(1, 2);  // (N, P, C) view
  at::Tensor GT = at::empty({d.N, d.P, d.K}, o);
  at::Tensor AT = at::empty({d.N, d.P, d.K}, o);
  at::Tensor s = at::empty({d.N, d.K}, o);
  assign_phase<T>(in, FT, GT, AT, s);

  // dV (N, K, C): grad through the normalisations (needs V), then ds.
  at::Tensor dV = grad.clone();
  if (normalize) {
    at::Tensor V = at::empty({d.N, d.K, d.C}, o);
    vlad_phase<T>(in, FT, AT, s, V);
    const T* vp = V.data_ptr<T>();
    T* dvp = dV.data_ptr<T>();
    at::parallel_for(0, d.N, 1, [&](int64_t n0, int64_t n1) {
      std::vector<T> U(d.K * d.C);
      for (int64_t n = n0; n < n1; ++n)
        normalize_backward_inplace(vp + n * d.K * d.C, dvp + n * d.K * d.C, U.data(), d.K, d.C);
    });
  }
  at::Tensor ds = at::empty({d.N, d.K}, o);
  {
    const T* dvp = dV.data_ptr<T>();
    const T* c = in.c.data_ptr<T>();
    T* dsp = ds.data_ptr<T>();
    for (int64_t i = 0; i < d.N * d.K; ++i)
      dsp[i] = -row_dot(dvp + i * d.C, c + (i % d.K) * d.C, d.C);
  }
  at::Tensor dAT = at::bmm(FT, dV.transpose(1, 2));  // dA'^T = F^T dV^T   (N, P, K)
  at::Tensor dGT = at::empty({d.N, d.P, d.K}, o);
  at::Tensor dz_n = at::empty({d.N, d.K}, o);
  {
    const T* gt = GT.data_ptr<T>();
    const T* dat = dAT.data_ptr<T>();
    const T* dsp = ds.data_ptr<T>();
    T* dgt = dGT.data_ptr<T>();
    T* dzp = dz_n.data_ptr<T>();
    T* dMp = d.has_parts ? dM.data_ptr<T>() : nullptr;
    for_each_sample(d.N, [&](int64_t n, bool inner) {
      std::vector<T> DZ(d.P * d.K);
      RowArgs<T> r = sample_rows<T>(in, gt, n);
      r.dAT = dat + n * d.P * d.K;
      r.ds = dsp + n * d.K;
      r.dGT = dgt + n * d.P * d.K;
      r.DZ = DZ.data();
      r.dM = dMp ? dMp + n * d.B * d.P : nullptr;
      over_positions<T>(d.P, d.K, d.B, inner,
                        [&](int64_t s0, int64_t s1, T* a) { backward_rows(r, s0, s1, a); });
      column_sums(DZ.data(), d.P, d.K, dzp + n * d.K, false);
    });
  }
  // Batch reductions (fixed order: deterministic).
  at::Tensor dz = dz_n.sum(0);
  at::Tensor dc = (dV * s.unsqueeze(2)).sum(0).neg_();
  at::Tensor dW = at::bmm(dGT.transpose(1, 2), FT).sum(0);  // sum_n dG F^T
  // dF = dV^T A' + W^T dG   (N, C, P)
  at::Tensor dF = at::bmm(dV.transpose(1, 2), AT.transpose(1, 2));
  dF.baddbmm_(batched_Wt(in.W, d.N), dGT.transpose(1, 2));
  return {dF, dM, dW, dz, dc};
}

// ---- dispatcher entry points -------------------------------------------------
at::Tensor person_vlad_cpu(const at::Tensor& features, const std::optional<at::Tensor>& parts,
                           const at::Tensor& assign_weight, const at::Tensor& assign_bias,
                           const at::Tensor& centers, bool normalize) {
  const Inputs in =
      prepare(features, parts, assign_weight, assign_bias, centers, "person_vlad (CPU)");
  at::Tensor out = in.cd == at::kDouble ? forward_impl<double>(in, normalize)
                                        : forward_impl<float>(in, normalize);
  out = out.reshape(output_shape(in.d, normalize));
  return out.scalar_type() == features.scalar_type() ? out : out.to(features.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> person_vlad_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& features,
    const std::optional<at::Tensor>& parts, const at::Tensor& assign_weight,
    const at::Tensor& assign_bias, const at::Tensor& centers, bool normalize) {
  const char* what = "person_vlad_backward (CPU)";
  const Inputs in = prepare(features, parts, assign_weight, assign_bias, centers, what);
  const VladDims& d = in.d;
  TORCH_CHECK(grad_output.defined() && grad_output.device().is_cpu(), what,
              ": grad_output must be a CPU tensor");
  TORCH_CHECK(grad_output.is_floating_point(), what,
              ": grad_output: expected a floating-point dtype, got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(output_shape(d, normalize)), what,
              ": grad_output: expected shape ", at::IntArrayRef(output_shape(d, normalize)),
              ", got ", grad_output.sizes());
  const at::Tensor grad = flat_contig(grad_output, in.cd, {d.N, d.K, d.C});
  auto res = in.cd == at::kDouble ? backward_impl<double>(in, grad, normalize)
                                  : backward_impl<float>(in, grad, normalize);
  at::Tensor dF = like_input(std::get<0>(res), features);
  at::Tensor dM = d.has_parts ? like_input(std::get<1>(res), *parts)
                              : at::empty({0}, features.options());
  return {dF, dM, like_input(std::get<2>(res), assign_weight),
          like_input(std::get<3>(res), assign_bias), like_input(std::get<4>(res), centers)};
}

}  // namespace
}  // namespace personvlad

TORCH_LIBRARY_IMPL(personvlad, CPU, m) {
  m.impl("person_vlad", &personvlad::person_vlad_cpu);
  m.impl("person_vlad_backward", &personvlad::person_vlad_backward_cpu);
}
