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
// The soft-assignment work runs on tiles of consecutive positions, one vector
// register wide (16 floats under AVX-512, 8 under AVX2, 4 on the baseline),
// in the k-major layout of the GEMM outputs (G, A', dA', dG are K x P), so the
// softmax over k and every other per-position reduction over k are
// element-wise across the tile's lanes (see "position tiles" in
// vlad_tiles.h).  Only 5 K vectors of scratch exist per thread: nothing of
// size B*K*P, B*C*P or
// B*K*C*P is ever allocated; the per-sample scratch is O(P*K + K*C).
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
// recomputed twice (forward pass for A'/s/V, then in the backward tile loop),
// which costs 2x the exponentials but no B*K*P storage.
//
// Structure.  Phases over the whole batch: every GEMM is one batched ATen
// call (bmm, threaded by ATen/BLAS) made outside our own parallel regions, so
// BLAS threading never nests; the per-position loops (softmax, A', s, and
// their backward) run in at::parallel_for over samples (N >= threads) or over
// position tiles (N < threads) and call no ATen op.  Buffers of size N*K*P and
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
#include <new>
#include <tuple>
#include <vector>

#include "person_vlad_common.h"
#include "vlad_tiles.h"

// at::parallel_for is a header template: where torch's threads are OpenMP's,
// it parallelises only if this file is compiled with OpenMP, and otherwise
// runs every loop below on the calling thread, with the same results and no
// warning (the extension was built that way until the build passed -fopenmp).
// setup.py and CMakeLists.txt pass the flag; a build whose compiler lacks
// OpenMP must say PERSONVLAD_SERIAL_CPU to go on single-threaded.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP) && !defined(PERSONVLAD_SERIAL_CPU)
#error "personvlad: compile csrc/cpu with OpenMP (-fopenmp), or define PERSONVLAD_SERIAL_CPU for one-thread loops"
#endif

namespace personvlad {
namespace {

// GCC on x86-64 Linux: build AVX-512 / AVX2 clones of the epilogue loops and
// pick one at load time (ifunc), so the extension needs no -march flag (the
// tile loops have their own instances, see tile_isa).
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

using namespace cpu_tiles;

// Reductions written with independent lanes (one 512-bit vector's worth,
// block_positions) so that they vectorise without -ffast-math; the lane order
// is fixed, so results are deterministic.

// Pairwise (tree) folding of the lane accumulators: each level is a vector
// operation, unlike a sequential scalar chain.
template <typename T, int64_t L>
PV_INLINE T fold_sum(T* acc) {
  for (int64_t w = L / 2; w >= 1; w /= 2)
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// sum_{i < n} term(i), lane by lane.
template <typename T, typename Term>
PV_INLINE T lane_sum(int64_t n, const Term& term) {
  constexpr int64_t L = block_positions<T>();
  T acc[L];
  for (int64_t j = 0; j < L; ++j) acc[j] = T(0);
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int64_t j = 0; j < L; ++j) acc[j] += term(i + j);
  T tail = T(0);
  for (; i < n; ++i) tail += term(i);
  return fold_sum<T, L>(acc) + tail;
}

template <typename T>
PV_INLINE T row_dot(const T* x, const T* y, int64_t K) {
  return lane_sum<T>(K, [&](int64_t i) { return x[i] * y[i]; });
}

template <typename T>
PV_INLINE T row_sum(const T* x, int64_t P) {
  return lane_sum<T>(P, [&](int64_t i) { return x[i]; });
}

// The tile loops (vlad_tiles.h), one instance per instruction set, each on
// vectors of its register width; tile_isa() picks one per op call, and
// run_tiles runs a pass with it.
// Unlike the other hot loops (PV_MULTIVERSION: the same source built for
// each target), these need a different vector type per target, so they are
// separate instances behind an explicit dispatch.
#if defined(__GNUC__) && defined(__x86_64__)
#define PV_TILE_X86 1
#define PV_TARGET(isa) __attribute__((target(isa)))
#else
#define PV_TILE_X86 0
#endif

enum class TileIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The two tile passes, each at a given vector width (always inlined into the
// instance that calls it, so it runs on that instance's target).
struct ForwardPass {
  template <typename T, int NB>
  static PV_INLINE void run(const TileArgs<T>& r, int64_t p0, int64_t p1, void* s) {
    forward_tiles_impl<T, NB>(r, p0, p1, static_cast<V<T, NB>*>(s));
  }
};
struct BackwardPass {
  template <typename T, int NB>
  static PV_INLINE void run(const TileArgs<T>& r, int64_t p0, int64_t p1, void* s) {
    backward_tiles_impl<T, NB>(r, p0, p1, static_cast<V<T, NB>*>(s));
  }
};

// One instance per instruction set, for either pass.
template <typename Pass, typename T>
void tiles_baseline(const TileArgs<T>& r, int64_t p0, int64_t p1, void* s) {
  Pass::template run<T, 16>(r, p0, p1, s);
}
#if PV_TILE_X86
template <typename Pass, typename T>
PV_TARGET("avx2") void tiles_avx2(const TileArgs<T>& r, int64_t p0, int64_t p1, void* s) {
  Pass::template run<T, 32>(r, p0, p1, s);
}
template <typename Pass, typename T>
PV_TARGET("avx512f") void tiles_avx512(const TileArgs<T>& r, int64_t p0, int64_t p1, void* s) {
  Pass::template run<T, 64>(r, p0, p1, s);
}
#endif

// The widest instance this CPU runs (looked up once), or the one
// PERSONVLAD_CPU_TILES names: avx512f, avx2 or baseline (unset or empty: the
// widest).  Read at each call, like the CUDA backend's switches, so tests and
// benchmarks can compare the instances in one process.
TileIsa widest_tile_isa() {
  static const TileIsa best = [] {
    TileIsa b = TileIsa::kBaseline;
#if PV_TILE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) b = TileIsa::kAvx2;
    if (__builtin_cpu_supports("avx512f")) b = TileIsa::kAvx512;
#endif
    return b;
  }();
  return best;
}
TileIsa tile_isa() {
  const TileIsa best = widest_tile_isa();
  const char* v = std::getenv("PERSONVLAD_CPU_TILES");
  if (v == nullptr || *v == '\0') return best;
  TileIsa want = TileIsa::kBaseline;
  if (std::strcmp(v, "avx512f") == 0) {
    want = TileIsa::kAvx512;
  } else if (std::strcmp(v, "avx2") == 0) {
    want = TileIsa::kAvx2;
  } else {
    TORCH_CHECK_VALUE(std::strcmp(v, "baseline") == 0,
                      "PERSONVLAD_CPU_TILES: expected avx512f, avx2 or baseline, got '", v, "'");
  }
  TORCH_CHECK_VALUE(static_cast<int>(want) <= static_cast<int>(best), "PERSONVLAD_CPU_TILES: '", v,
                    "' is not supported by this CPU (or this build)");
  return want;
}

// A tile pass (ForwardPass / BackwardPass) over positions [p0, p1) of one
// sample with instance `isa`; scratch: 5 K vectors of up to 64 bytes, 64-byte
// aligned.
template <typename Pass, typename T>
void run_tiles(TileIsa isa, const TileArgs<T>& r, int64_t p0, int64_t p1, void* scratch) {
  switch (isa) {
#if PV_TILE_X86
    case TileIsa::kAvx512: return tiles_avx512<Pass, T>(r, p0, p1, scratch);
    case TileIsa::kAvx2: return tiles_avx2<Pass, T>(r, p0, p1, scratch);
#endif
    default: return tiles_baseline<Pass, T>(r, p0, p1, scratch);
  }
}

// Run fn(p0, p1, scratch) over the positions of one sample: inline when
// `inner_parallel` is false (we already run inside a batch-parallel loop),
// else split over threads in blocks of block_positions<T>() positions (a
// whole number of tiles of every instance: the arithmetic stays the same).
template <typename T, typename Fn>
void over_tiles(int64_t P, int64_t K, int64_t B, bool inner_parallel, const Fn& fn) {
  const int64_t L = block_positions<T>();
  const int64_t blocks = num_tiles(P, L);
  auto run = [&](int64_t b0, int64_t b1) {
    VecBuffer scratch(5 * K);
    fn(b0 * L, std::min(b1 * L, P), scratch.p);
  };
  if (!inner_parallel) {
    run(0, blocks);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 1024 / std::max<int64_t>(1, B * K));
  at::parallel_for(0, blocks, grain, run);
}

// Row sums of a (K, P) row-major buffer into out (K), in a fixed order.
template <typename T>
void row_sums(const T* X, int64_t K, int64_t P, T* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = row_sum(X + k * P, P);
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
  TORCH_CHECK_VALUE(features.device().is_cpu(), what, ": expected CPU tensors, got ", features.device());
  in.cd = compute_dtype(features);
  const VladDims& d = in.d;
  in.F = flat_contig(features, in.cd, {d.N, d.C, d.P});
  if (d.has_parts) in.M = flat_contig(*parts, in.cd, {d.N, d.B, d.P});
  in.W = W.to(in.cd).contiguous();
  in.z = z.to(in.cd).contiguous();
  in.c = c.to(in.cd).contiguous();
  return in;
}

// One sample's epilogue, in place on V (K, C) = A' F^T: V -= s c, then with
// `normalize` the intra + global L2 normalisation.
template <typename T>
PV_INLINE void epilogue_impl(T* V, const T* s, const T* c, int64_t K, int64_t C, bool normalize) {
  const T eps = T(kNormEps);
  T total = T(0);
  for (int64_t k = 0; k < K; ++k) {
    T* v = V + k * C;
    const T* ck = c + k * C;
    const T sk = s[k];
    for (int64_t j = 0; j < C; ++j) v[j] -= sk * ck[j];
    if (!normalize) continue;
    const T r = std::sqrt(row_dot(v, v, C));
    const T inv = T(1) / std::max(r, eps);
    for (int64_t j = 0; j < C; ++j) v[j] *= inv;
    total += row_dot(v, v, C);
  }
  if (!normalize) return;
  const T inv = T(1) / std::max(std::sqrt(total), eps);
  for (int64_t i = 0; i < K * C; ++i) V[i] *= inv;
}
PV_MULTIVERSION void epilogue_f32(float* V, const float* s, const float* c, int64_t K, int64_t C,
                                  bool normalize) {
  epilogue_impl(V, s, c, K, C, normalize);
}
void epilogue(float* V, const float* s, const float* c, int64_t K, int64_t C, bool normalize) {
  epilogue_f32(V, s, c, K, C, normalize);
}
void epilogue(double* V, const double* s, const double* c, int64_t K, int64_t C, bool normalize) {
  epilogue_impl(V, s, c, K, C, normalize);
}

// dV from g (both (K, C)) through the two normalisations; V is the raw VLAD.
// Uses U (K, C) as scratch.  Writes dV in place of g.
template <typename T>
PV_INLINE void normalize_backward_impl(const T* V, T* g, T* U, int64_t K, int64_t C) {
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
  if (!(R < eps)) {  // not `R >= eps`: a NaN norm must give NaN, not the clamped branch
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
    if (!(r < eps)) {  // NaN: the unclamped formula (NaN), as torch
      const T proj = row_dot(u, du, C);
      const T inv = T(1) / r;
      for (int64_t j = 0; j < C; ++j) du[j] = (du[j] - u[j] * proj) * inv;
    } else {
      const T inv = T(1) / eps;
      for (int64_t j = 0; j < C; ++j) du[j] *= inv;
    }
  }
}

PV_MULTIVERSION void normalize_backward_f32(const float* V, float* g, float* U, int64_t K, int64_t C) {
  normalize_backward_impl(V, g, U, K, C);
}
void normalize_backward_inplace(const float* V, float* g, float* U, int64_t K, int64_t C) {
  normalize_backward_f32(V, g, U, K, C);
}
void normalize_backward_inplace(const double* V, double* g, double* U, int64_t K, int64_t C) {
  normalize_backward_impl(V, g, U, K, C);
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

// W broadcast over the batch as a (N, K, C) view and W^T as (N, C, K) (no copy).
inline at::Tensor batched_W(const at::Tensor& W, int64_t N) {
  return W.unsqueeze(0).expand({N, W.size(0), W.size(1)});
}
inline at::Tensor batched_Wt(const at::Tensor& W, int64_t N) {
  return W.t().unsqueeze(0).expand({N, W.size(1), W.size(0)});
}

// The per-sample inputs shared by the forward and backward tile kernels.
template <typename T>
TileArgs<T> sample_tiles(const Inputs& in, const T* g, int64_t n) {
  const VladDims& d = in.d;
  TileArgs<T> r;
  r.G = g + n * d.K * d.P;
  r.M = d.has_parts ? in.M.data_ptr<T>() + n * d.B * d.P : nullptr;
  r.z = in.z.data_ptr<T>();
  r.B = d.B;
  r.P = d.P;
  r.K = d.K;
  return r;
}

// G = W F (N, K, P), A = A' (N, K, P), s (N, K), with tile instance `isa`
// (tile_isa(), read by the caller outside any parallel region: it may throw).
template <typename T>
void assign_phase(const Inputs& in, TileIsa isa, at::Tensor& G, at::Tensor& A, at::Tensor& s) {
  const VladDims& d = in.d;
  at::bmm_out(G, batched_W(in.W, d.N), in.F);
  const T* gp = G.data_ptr<T>();
  T* ap = A.data_ptr<T>();
  T* sp = s.data_ptr<T>();
  for_each_sample(d.N, [&](int64_t n, bool inner) {
    std::vector<T> S(d.K * d.P);
    TileArgs<T> r = sample_tiles<T>(in, gp, n);
    r.A = ap + n * d.K * d.P;
    r.S = S.data();
    over_tiles<T>(d.P, d.K, d.B, inner,
                  [&](int64_t p0, int64_t p1, void* scratch) { run_tiles<ForwardPass, T>(isa, r, p0, p1, scratch); });
    row_sums(S.data(), d.K, d.P, sp + n * d.K);
  });
}

// V = A' F^T - s c for the whole batch, into V (N, K, C), normalised with
// `normalize`.
template <typename T>
void vlad_phase(const Inputs& in, const at::Tensor& A, const at::Tensor& s, at::Tensor& V,
                bool normalize) {
  const VladDims& d = in.d;
  at::bmm_out(V, A, in.F.transpose(1, 2));
  T* v = V.data_ptr<T>();
  const T* sp = s.data_ptr<T>();
  const T* c = in.c.data_ptr<T>();
  at::parallel_for(0, d.N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) epilogue(v + n * d.K * d.C, sp + n * d.K, c, d.K, d.C, normalize);
  });
}

template <typename T>
at::Tensor forward_impl(const Inputs& in, bool normalize) {
  const VladDims& d = in.d;
  const auto o = in.F.options();
  at::Tensor out = at::empty({d.N, d.K, d.C}, o);
  if (d.N == 0) return out;
  at::Tensor G = at::empty({d.N, d.K, d.P}, o);
  at::Tensor A = at::empty({d.N, d.K, d.P}, o);
  at::Tensor s = at::empty({d.N, d.K}, o);
  assign_phase<T>(in, tile_isa(), G, A, s);
  vlad_phase<T>(in, A, s, out, normalize);
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
  const TileIsa isa = tile_isa();  // once per call, before any parallel region (it may throw)
  const at::Tensor FT = in.F.transpose(1, 2);  // (N, P, C) view
  at::Tensor G = at::empty({d.N, d.K, d.P}, o);
  at::Tensor A = at::empty({d.N, d.K, d.P}, o);
  at::Tensor s = at::empty({d.N, d.K}, o);
  assign_phase<T>(in, isa, G, A, s);

  // dV (N, K, C): grad through the normalisations (needs V), then ds.
  at::Tensor dV = grad.clone();
  if (normalize) {
    at::Tensor V = at::empty({d.N, d.K, d.C}, o);
    vlad_phase<T>(in, A, s, V, false);
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
  at::Tensor dA = at::bmm(dV, in.F);  // dA' = dV F   (N, K, P)
  at::Tensor dG = at::empty({d.N, d.K, d.P}, o);
  at::Tensor dz_n = at::empty({d.N, d.K}, o);
  {
    const T* gp = G.data_ptr<T>();
    const T* dap = dA.data_ptr<T>();
    const T* dsp = ds.data_ptr<T>();
    T* dgp = dG.data_ptr<T>();
    T* dzp = dz_n.data_ptr<T>();
    T* dMp = d.has_parts ? dM.data_ptr<T>() : nullptr;
    for_each_sample(d.N, [&](int64_t n, bool inner) {
      std::vector<T> DZ(d.K * d.P);
      TileArgs<T> r = sample_tiles<T>(in, gp, n);
      r.dA = dap + n * d.K * d.P;
      r.ds = dsp + n * d.K;
      r.dG = dgp + n * d.K * d.P;
      r.DZ = DZ.data();
      r.dM = dMp ? dMp + n * d.B * d.P : nullptr;
      over_tiles<T>(d.P, d.K, d.B, inner,
                    [&](int64_t p0, int64_t p1, void* scratch) { run_tiles<BackwardPass, T>(isa, r, p0, p1, scratch); });
      row_sums(DZ.data(), d.K, d.P, dzp + n * d.K);
    });
  }
  // Batch reductions (fixed order: deterministic).
  at::Tensor dz = dz_n.sum(0);
  at::Tensor dc = (dV * s.unsqueeze(2)).sum(0).neg_();
  at::Tensor dW = at::bmm(dG, FT).sum(0);  // sum_n dG F^T
  // dF = dV^T A' + W^T dG   (N, C, P)
  at::Tensor dF = at::bmm(dV.transpose(1, 2), A);
  dF.baddbmm_(batched_Wt(in.W, d.N), dG);
  return {dF, dM, dW, dz, dc};
}

// ---- dispatcher entry points -------------------------------------------------
at::Tensor person_vlad_cpu(const at::Tensor& features, const std::optional<at::Tensor>& parts,
                           const at::Tensor& assign_weight, const at::Tensor& assign_bias,
                           const at::Tensor& centers, bool normalize) {
  const NoAutocastGuard no_autocast;
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
  const NoAutocastGuard no_autocast;
  const Inputs in = prepare(features, parts, assign_weight, assign_bias, centers, what);
  const VladDims& d = in.d;
  TORCH_CHECK_VALUE(grad_output.defined() && grad_output.device().is_cpu(), what,
                    ": grad_output must be a CPU tensor");
  TORCH_CHECK_VALUE(grad_output.is_floating_point(), what,
                    ": grad_output: expected a floating-point dtype, got ", grad_output.scalar_type());
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(output_shape(d, normalize)), what,
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
