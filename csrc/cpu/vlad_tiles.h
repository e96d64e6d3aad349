// Position-tile kernels of the C++ CPU backend (person_vlad_cpu.cpp): the
// soft-assignment forward (A', sum_b a) and backward (dG, sum_b dl, dM) of SPEC
// section 1 on tiles of 16 float / 8 double positions.  Standard C++ and GCC/Clang
// vector extensions only (no ATen), so tests/test_cpu_backend.py can compile
// this header on its own for each instruction set the extension has a clone
// for (avx512f, avx2, x86-64 baseline) and check that all give the same bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>

#if defined(__GNUC__)
#define PV_INLINE inline __attribute__((always_inline))
#else
#define PV_INLINE inline
#endif

namespace personvlad {
namespace cpu_tiles {

// ---- position tiles ----------------------------------------------------------
// The soft-assignment work runs on tiles of L consecutive positions of one
// sample (L lanes = one 512-bit vector: 16 floats or 8 doubles), in the
// k-major layout of the GEMM outputs (G = W F, A', dA', dG are (K, P)).  Every
// per-position reduction over k (the softmax's max and sum, the backward's dot
// products) is then an element-wise operation between vectors, with no
// horizontal folds.  The vectors are GCC/Clang vector extensions: the avx512f
// clone runs them as one zmm register, the avx2 clone as two ymm, the default
// one as four xmm.  Each lane does the same operations in the same order
// whichever lane, tile, thread or alignment it has, so results do not depend
// on the thread count.  A partial last tile is padded (g = 0, m = 0: finite
// logits) and only its valid lanes are stored.
// The vector helpers are always inlined: no vector crosses a call boundary,
// so GCC's note that 512-bit arguments change the ABI does not apply (the
// builds pass -Wno-psabi; a pragma does not silence that note).
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef int32_t itype __attribute__((vector_size(64)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef int64_t itype __attribute__((vector_size(64)));
};
template <typename T>
using V = typename Vec<T>::type;

template <typename T>
PV_INLINE V<T> vsplat(T x) {
  return V<T>{} + x;
}
template <typename T>
PV_INLINE V<T> vload(const T* p) {
  V<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
PV_INLINE void vstore(T* p, const V<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}
// n < L lanes from p, zeros above.
template <typename T>
PV_INLINE V<T> vload_part(const T* p, int64_t n) {
  V<T> v = V<T>{};
  for (int64_t j = 0; j < n; ++j) v[j] = p[j];
  return v;
}
template <typename T>
PV_INLINE V<T> vmax(const V<T>& a, const V<T>& b) {
  return a > b ? a : b;
}

// exp of x <= 0 (max-subtracted logits), 16 float lanes: Cephes-style range
// reduction + degree-6 polynomial, branch-free; about 2 ulp, exactly 0 below
// -87.33 (where expf leaves the normal range).  Doubles use std::exp.
PV_INLINE V<float> vexp_nonpos(V<float> x) {
  typedef Vec<float>::itype VI;
  const V<float> lo = vsplat(-87.33654f);
  const VI under = x < lo;
  x = under ? lo : x;
  const V<float> magic = vsplat(12582912.0f);
  const V<float> t = x * 1.44269504088896341f + magic;
  const V<float> fx = t - magic;
  const VI n = (VI)t - 0x4B400000;  // a vector cast keeps the bits
  V<float> r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  V<float> p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI bits = (n + 127) << 23;
  const V<float> y = p * (V<float>)bits;
  return under ? V<float>{} : y;
}
PV_INLINE V<double> vexp_nonpos(V<double> x) {
  for (int j = 0; j < 8; ++j) x[j] = std::exp(x[j]);
  return x;
}

// 64-byte aligned vectors on the heap (std::vector<V<T>> would not do: GCC
// drops a vector type's alignment when it is a template argument).
template <typename T>
struct VecBuffer {
  explicit VecBuffer(int64_t n)
      : p(static_cast<V<T>*>(::operator new(sizeof(V<T>) * std::max<int64_t>(n, 1),
                                            std::align_val_t(64)))) {}
  ~VecBuffer() { ::operator delete(p, std::align_val_t(64)); }
  VecBuffer(const VecBuffer&) = delete;
  VecBuffer& operator=(const VecBuffer&) = delete;
  V<T>* p;
};

template <typename T>
struct TileArgs {
  const T* G;  // (K, P)  W F of this sample
  const T* M;  // (B, P)  or nullptr (one part, all ones)
  const T* z;  // (K)
  int64_t B, P, K;
  // forward outputs
  T* A = nullptr;  // (K, P)  A'
  T* S = nullptr;  // (K, P)  sum_b a   (summed over s afterwards)
  // backward inputs / outputs
  const T* dA = nullptr;  // (K, P)  dA'
  const T* ds = nullptr;  // (K)
  T* dG = nullptr;        // (K, P)
  T* DZ = nullptr;        // (K, P)  sum_b dl  (summed over s afterwards)
  T* dM = nullptr;        // (B, P)  or nullptr
};

template <typename T>
constexpr int64_t lanes() {
  return int64_t(sizeof(V<T>) / sizeof(T));
}
inline int64_t num_tiles(int64_t P, int64_t L) { return (P + L - 1) / L; }

// t[k] <- columns [s0, s0 + n) of row k of X (K, P), zero padded.
template <typename T>
PV_INLINE void load_tile(const T* X, int64_t K, int64_t P, int64_t s0, int64_t n, V<T>* t) {
  if (n == lanes<T>()) {
    for (int64_t k = 0; k < K; ++k) t[k] = vload(X + k * P + s0);
  } else {
    for (int64_t k = 0; k < K; ++k) t[k] = vload_part(X + k * P + s0, n);
  }
}

// Columns [s0, s0 + n) of X (K, P) <- the first n lanes of t[k].
template <typename T>
PV_INLINE void store_tile(const V<T>* t, int64_t K, int64_t P, int64_t s0, int64_t n, T* X) {
  if (n == lanes<T>()) {
    for (int64_t k = 0; k < K; ++k) vstore(X + k * P + s0, t[k]);
  } else {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < n; ++j) X[k * P + s0 + j] = t[k][j];
  }
}

// Part b's map over the tile (1 without parts), 0 in padding lanes.
template <typename T>
PV_INLINE V<T> load_part_map(const TileArgs<T>& r, int64_t b, int64_t s0, int64_t n) {
  if (!r.M) return vsplat(T(1));
  const T* src = r.M + b * r.P + s0;
  return n == lanes<T>() ? vload(src) : vload_part(src, n);
}

// e[k] <- softmax over k of m * g[k] + z[k], lane by lane (max-subtracted).
template <typename T>
PV_INLINE void softmax_tile(const V<T>* g, const V<T>& m, const T* z, int64_t K, V<T>* e) {
  V<T> mx = vsplat(-std::numeric_limits<T>::infinity());
  for (int64_t k = 0; k < K; ++k) {
    e[k] = m * g[k] + z[k];
    mx = vmax<T>(e[k], mx);
  }
  V<T> sum = V<T>{};
  for (int64_t k = 0; k < K; ++k) {
    e[k] = vexp_nonpos(e[k] - mx);
    sum += e[k];
  }
  const V<T> inv = T(1) / sum;
  for (int64_t k = 0; k < K; ++k) e[k] *= inv;
}

// Forward over tiles [t0, t1): A' and sum_b a.  scratch: 4 K vectors.
template <typename T>
PV_INLINE void forward_tiles_impl(const TileArgs<T>& r, int64_t t0, int64_t t1, V<T>* scratch) {
  const int64_t K = r.K;
  V<T>* g = scratch;
  V<T>* e = g + K;
  V<T>* at = e + K;
  V<T>* st = at + K;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t s0 = t * lanes<T>(), n = std::min<int64_t>(lanes<T>(), r.P - s0);
    load_tile(r.G, K, r.P, s0, n, g);
    for (int64_t k = 0; k < K; ++k) at[k] = st[k] = V<T>{};
    for (int64_t b = 0; b < r.B; ++b) {
      const V<T> m = load_part_map(r, b, s0, n);
      softmax_tile(g, m, r.z, K, e);
      for (int64_t k = 0; k < K; ++k) {
        at[k] += e[k] * m;
        st[k] += e[k];
      }
    }
    store_tile(at, K, r.P, s0, n, r.A);
    store_tile(st, K, r.P, s0, n, r.S);
  }
}

// Backward over tiles [t0, t1): dG, sum_b dl and dM (derivation at the top).
// scratch: 5 K vectors.
template <typename T>
PV_INLINE void backward_tiles_impl(const TileArgs<T>& r, int64_t t0, int64_t t1, V<T>* scratch) {
  const int64_t K = r.K;
  V<T>* g = scratch;
  V<T>* e = g + K;
  V<T>* dat = e + K;
  V<T>* dg = dat + K;
  V<T>* dz = dg + K;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t s0 = t * lanes<T>(), n = std::min<int64_t>(lanes<T>(), r.P - s0);
    load_tile(r.G, K, r.P, s0, n, g);
    load_tile(r.dA, K, r.P, s0, n, dat);
    for (int64_t k = 0; k < K; ++k) dg[k] = dz[k] = V<T>{};
    for (int64_t b = 0; b < r.B; ++b) {
      const V<T> m = load_part_map(r, b, s0, n);
      softmax_tile(g, m, r.z, K, e);
      // da[b,k,s] = dA'[k,s] M[b,s] + ds[k];  adot = sum_k a da
      V<T> dm_assign = V<T>{}, adot = V<T>{}, dm_logit = V<T>{};
      for (int64_t k = 0; k < K; ++k) {
        dm_assign += e[k] * dat[k];  // through A' = sum_b a M
        adot += e[k] * (dat[k] * m + r.ds[k]);
      }
      for (int64_t k = 0; k < K; ++k) {
        const V<T> dl = e[k] * ((dat[k] * m + r.ds[k]) - adot);
        dz[k] += dl;
        dg[k] += dl * m;
        dm_logit += dl * g[k];
      }
      if (r.dM) {
        const V<T> dmv = dm_assign + dm_logit;
        T* dst = r.dM + b * r.P + s0;
        for (int64_t j = 0; j < n; ++j) dst[j] = dmv[j];
      }
    }
    store_tile(dg, K, r.P, s0, n, r.dG);
    store_tile(dz, K, r.P, s0, n, r.DZ);
  }
}

}  // namespace cpu_tiles
}  // namespace personvlad
