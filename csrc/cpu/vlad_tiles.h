// Position-tile kernels of the C++ CPU backend (person_vlad_cpu.cpp): the
// soft-assignment forward (A', sum_b a) and backward (dG, sum_b dl, dM) of SPEC
// section 1 on tiles of positions one vector register wide.  Standard C++ and
// GCC/Clang vector extensions only (no ATen), so tests/test_cpu_backend.py can
// compile this header on its own for each instruction set the extension has an
// instance for (avx512f, avx2, x86-64 baseline) and check that all give the
// same bits.
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
// sample (L lanes = one vector register of NB bytes: 16 floats under avx512f,
// 8 under avx2, 4 with SSE or NEON), in the k-major layout of the GEMM outputs
// (G = W F, A', dA', dG are (K, P)).  Every per-position reduction over k (the
// softmax's max and sum, the backward's dot products) is then an element-wise
// operation between vectors, with no horizontal folds.  The vectors are
// GCC/Clang vector extensions of exactly the register width of the
// instruction set the caller is built for (person_vlad_cpu.cpp builds an
// avx512f, an avx2 and a baseline instance and picks one at run time).  The
// width must match: GCC splits arithmetic on a vector wider than the
// registers into register pieces, but lowers comparisons and selects on it
// lane by lane in scalar code, and a 64-byte vector under avx2 moved its
// halves through general registers: the avx2 build ran ~9x slower than the
// avx512f one on the same 64-byte type, ~7x slower than at its own width
// (bench/cpu_tiles_probe.py).  Each lane does the same operations
// in the same order whatever the width, lane, tile, thread or alignment, so
// every instance gives the same bits for a position.  A partial last tile is
// padded (g = 0, m = 0: finite logits) and only its valid lanes are stored.
// The vector helpers are always inlined: no vector crosses a call boundary,
// so GCC's note that 512-bit arguments change the ABI does not apply (the
// builds pass -Wno-psabi; a pragma does not silence that note).
template <typename T, int NB>
struct Vec {
  static_assert(NB == 16 || NB == 32 || NB == 64, "NB: a vector register of 16, 32 or 64 bytes");
  typedef T type __attribute__((vector_size(NB)));
};
template <int NB>
struct VecInt {
  typedef int32_t type __attribute__((vector_size(NB)));
};
template <typename T, int NB>
using V = typename Vec<T, NB>::type;

// Lanes of one NB-byte vector of T.
template <typename T, int NB>
constexpr int64_t lanes() {
  return int64_t(NB / sizeof(T));
}
// Positions per unit of work: 64 bytes' worth (16 floats, 8 doubles), a
// whole number of tiles of every instance.  Callers split the positions over
// threads in these units, so the split does not depend on the instance.
template <typename T>
constexpr int64_t block_positions() {
  return int64_t(64 / sizeof(T));
}
inline int64_t num_tiles(int64_t P, int64_t L) { return (P + L - 1) / L; }

template <typename T, int NB>
PV_INLINE V<T, NB> vsplat(T x) {
  return V<T, NB>{} + x;
}
template <typename T, int NB>
PV_INLINE V<T, NB> vload(const T* p) {
  V<T, NB> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T, int NB>
PV_INLINE void vstore(T* p, const V<T, NB>& v) {
  std::memcpy(p, &v, sizeof(v));
}
// n < L lanes from p, zeros above.
template <typename T, int NB>
PV_INLINE V<T, NB> vload_part(const T* p, int64_t n) {
  V<T, NB> v = V<T, NB>{};
  for (int64_t j = 0; j < n; ++j) v[j] = p[j];
  return v;
}
template <typename T, int NB>
PV_INLINE V<T, NB> vmax(const V<T, NB>& a, const V<T, NB>& b) {
  return a > b ? a : b;
}

// exp of x <= 0 (max-subtracted logits), float lanes: Cephes-style range
// reduction + degree-6 polynomial, branch-free; about 2 ulp, exactly 0 below
// -87.33 (where expf leaves the normal range).  Doubles use std::exp.
template <int NB>
PV_INLINE V<float, NB> vexp_nonpos(V<float, NB> x) {
  typedef V<float, NB> VF;
  typedef typename VecInt<NB>::type VI;
  const VF lo = vsplat<float, NB>(-87.33654f);
  const VI under = x < lo;
  x = under ? lo : x;
  const VF magic = vsplat<float, NB>(12582912.0f);
  const VF t = x * 1.44269504088896341f + magic;
  const VF fx = t - magic;
  const VI n = (VI)t - 0x4B400000;  // a vector cast keeps the bits
  VF r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  VF p = vsplat<float, NB>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI bits = (n + 127) << 23;
  const VF y = p * (VF)bits;
  return under ? VF{} : y;
}
template <int NB>
PV_INLINE V<double, NB> vexp_nonpos(V<double, NB> x) {
  for (int64_t j = 0; j < lanes<double, NB>(); ++j) x[j] = std::exp(x[j]);
  return x;
}

// Raw 64-byte aligned heap memory for `n` vectors of up to 64 bytes (the
// tile scratch of any instance).
struct VecBuffer {
  explicit VecBuffer(int64_t n)
      : p(::operator new(64 * std::max<int64_t>(n, 1), std::align_val_t(64))) {}
  ~VecBuffer() { ::operator delete(p, std::align_val_t(64)); }
  VecBuffer(const VecBuffer&) = delete;
  VecBuffer& operator=(const VecBuffer&) = delete;
  template <typename T, int NB>
  V<T, NB>* as() const {
    return static_cast<V<T, NB>*>(p);
  }
  void* p;
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

// t[k] <- columns [s0, s0 + n) of row k of X (K, P), zero padded.
template <typename T, int NB>
PV_INLINE void load_tile(const T* X, int64_t K, int64_t P, int64_t s0, int64_t n, V<T, NB>* t) {
  if (n == lanes<T, NB>()) {
    for (int64_t k = 0; k < K; ++k) t[k] = vload<T, NB>(X + k * P + s0);
  } else {
    for (int64_t k = 0; k < K; ++k) t[k] = vload_part<T, NB>(X + k * P + s0, n);
  }
}

// Columns [s0, s0 + n) of X (K, P) <- the first n lanes of t[k].
template <typename T, int NB>
PV_INLINE void store_tile(const V<T, NB>* t, int64_t K, int64_t P, int64_t s0, int64_t n, T* X) {
  if (n == lanes<T, NB>()) {
    for (int64_t k = 0; k < K; ++k) vstore<T, NB>(X + k * P + s0, t[k]);
  } else {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < n; ++j) X[k * P + s0 + j] = t[k][j];
  }
}

// Part b's map over the tile (1 without parts), 0 in padding lanes.
template <typename T, int NB>
PV_INLINE V<T, NB> load_part_map(const TileArgs<T>& r, int64_t b, int64_t s0, int64_t n) {
  if (!r.M) return vsplat<T, NB>(T(1));
  const T* src = r.M + b * r.P + s0;
  return n == lanes<T, NB>() ? vload<T, NB>(src) : vload_part<T, NB>(src, n);
}

// e[k] <- softmax over k of m * g[k] + z[k], lane by lane (max-subtracted).
template <typename T, int NB>
PV_INLINE void softmax_tile(const V<T, NB>* g, const V<T, NB>& m, const T* z, int64_t K, V<T, NB>* e) {
  V<T, NB> mx = vsplat<T, NB>(-std::numeric_limits<T>::infinity());
  for (int64_t k = 0; k < K; ++k) {
    e[k] = m * g[k] + z[k];
    mx = vmax<T, NB>(e[k], mx);
  }
  V<T, NB> sum = V<T, NB>{};
  for (int64_t k = 0; k < K; ++k) {
    e[k] = vexp_nonpos<NB>(e[k] - mx);
    sum += e[k];
  }
  const V<T, NB> inv = T(1) / sum;
  for (int64_t k = 0; k < K; ++k) e[k] *= inv;
}

// Forward over positions [p0, p1) (p0 a multiple of the tile width; p1 too,
// or P): A' and sum_b a.  scratch: 4 K vectors.  No lambdas in these loops:
// a lambda is a function of its own, built for the baseline target and not
// always inlined into the avx2 / avx512f instances, where its 32 / 64-byte
// vectors then run in scalar code.
template <typename T, int NB>
PV_INLINE void forward_tiles_impl(const TileArgs<T>& r, int64_t p0, int64_t p1, V<T, NB>* scratch) {
  const int64_t K = r.K;
  V<T, NB>* g = scratch;
  V<T, NB>* e = g + K;
  V<T, NB>* at = e + K;
  V<T, NB>* st = at + K;
  for (int64_t s0 = p0; s0 < p1; s0 += lanes<T, NB>()) {
    const int64_t n = std::min<int64_t>(lanes<T, NB>(), p1 - s0);  // valid lanes
    load_tile<T, NB>(r.G, K, r.P, s0, n, g);
    for (int64_t k = 0; k < K; ++k) at[k] = st[k] = V<T, NB>{};
    for (int64_t b = 0; b < r.B; ++b) {
      const V<T, NB> m = load_part_map<T, NB>(r, b, s0, n);
      softmax_tile<T, NB>(g, m, r.z, K, e);
      for (int64_t k = 0; k < K; ++k) {
        at[k] += e[k] * m;
        st[k] += e[k];
      }
    }
    store_tile<T, NB>(at, K, r.P, s0, n, r.A);
    store_tile<T, NB>(st, K, r.P, s0, n, r.S);
  }
}

// Backward over positions [p0, p1): dG, sum_b dl and dM (derivation at the
// top of person_vlad_cpu.cpp).  scratch: 5 K vectors.
template <typename T, int NB>
PV_INLINE void backward_tiles_impl(const TileArgs<T>& r, int64_t p0, int64_t p1, V<T, NB>* scratch) {
  const int64_t K = r.K;
  V<T, NB>* g = scratch;
  V<T, NB>* e = g + K;
  V<T, NB>* dat = e + K;
  V<T, NB>* dg = dat + K;
  V<T, NB>* dz = dg + K;
  for (int64_t s0 = p0; s0 < p1; s0 += lanes<T, NB>()) {
    const int64_t n = std::min<int64_t>(lanes<T, NB>(), p1 - s0);  // valid lanes
    load_tile<T, NB>(r.G, K, r.P, s0, n, g);
    load_tile<T, NB>(r.dA, K, r.P, s0, n, dat);
    for (int64_t k = 0; k < K; ++k) dg[k] = dz[k] = V<T, NB>{};
    for (int64_t b = 0; b < r.B; ++b) {
      const V<T, NB> m = load_part_map<T, NB>(r, b, s0, n);
      softmax_tile<T, NB>(g, m, r.z, K, e);
      // da[b,k,s] = dA'[k,s] M[b,s] + ds[k];  adot = sum_k a da
      V<T, NB> dm_assign = V<T, NB>{}, adot = V<T, NB>{}, dm_logit = V<T, NB>{};
      for (int64_t k = 0; k < K; ++k) {
        dm_assign += e[k] * dat[k];  // through A' = sum_b a M
        adot += e[k] * (dat[k] * m + r.ds[k]);
      }
      for (int64_t k = 0; k < K; ++k) {
        const V<T, NB> dl = e[k] * ((dat[k] * m + r.ds[k]) - adot);
        dz[k] += dl;
        dg[k] += dl * m;
        dm_logit += dl * g[k];
      }
      if (r.dM) {
        const V<T, NB> dmv = dm_assign + dm_logit;
        T* dst = r.dM + b * r.P + s0;
        for (int64_t j = 0; j < n; ++j) dst[j] = dmv[j];
      }
    }
    store_tile<T, NB>(dg, K, r.P, s0, n, r.dG);
    store_tile<T, NB>(dz, K, r.P, s0, n, r.DZ);
  }
}

}  // namespace cpu_tiles
}  // namespace personvlad
