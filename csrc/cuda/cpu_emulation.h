// CPU emulation of the few CUDA features used by the device code of
// person_vlad_cuda.cu (the part between "BEGIN DEVICE CODE" and "END DEVICE
// CODE"), so that tests/test_cuda_backend.py can compile that code with a
// host C++17 compiler and run it without a GPU.  Test-only: never included by
// the extension build (setup.py compiles *.cu and *.cpp, not headers).
//
// - Kernels without barriers run block by block, thread by thread
//   (launch_serial).
// - Kernels with __syncthreads / __shfl_xor_sync run one std::thread per CUDA
//   thread of a block, block after block (launch_threads): __syncthreads is a
//   block-wide barrier and __shfl_xor_sync a per-warp exchange between two
//   warp-wide barriers, so a shuffle that is not reached by all 32 lanes of a
//   warp times out and the launch reports failure instead of silently working.
// - __shared__ variables become function-local statics: shared by the
//   threads of a block, and blocks run one after another.  Dynamic shared
//   memory (PV_DYNAMIC_SMEM) is one buffer of launch_threads' smem_bytes,
//   filled with 0xff bytes (NaN) so a read of a slot never written shows.
// - Blocks run in index order, or in reverse (pv_emu::reverse_blocks), so a
//   kernel that reads blockIdx where it should not (fused_forward_kernel's
//   split samples take their place from the order blocks start in) shows.
//   Blocks never run side by side: a block that would wait for another
//   (pv_wait_turn) finds the turn given, or the launch reports the error.
// - The tensor-core path's nvcuda::wmma tiles and __nv_bfloat16 are emulated
//   too (see there): every lane holds a whole tile.
#pragma once

#define PV_CPU_EMULATION 1  // the device code leaves out what this header defines its own of

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <limits>
#include <mutex>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

struct pv_emu_uint3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local pv_emu_uint3 threadIdx, blockIdx, blockDim;

#define __global__
#define __host__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
// Dynamic shared memory: one buffer, sized by launch_threads' smem_bytes and
// shared by the threads of a block (blocks run one after another).
#define PV_DYNAMIC_SMEM(name) unsigned char* name = pv_emu::dynamic_smem_base()

// CUDA's vector types (vector_types.h), as far as the device code uses them.
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };

template <typename T>
inline T max(T a, T b) {
  return a > b ? a : b;  // CUDA's fmax-like max for finite inputs
}
inline float expf(float x) { return std::exp(x); }
inline float sqrtf(float x) { return std::sqrt(x); }
using std::exp;
using std::sqrt;

namespace pv_emu {
constexpr int kMaxWarps = 32;

// A reusable barrier that gives up after a timeout instead of hanging: a
// barrier not reached by every thread it waits for (a divergent
// __syncthreads or shuffle) sets `broken`, after which every wait returns at
// once so the launch finishes and reports the error.
struct Barrier {
  explicit Barrier(unsigned n) : expected(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex);
    if (broken) return;
    const unsigned gen = generation;
    if (++arrived == expected) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return;
    }
    if (!cv.wait_for(lock, std::chrono::seconds(20), [&] { return generation != gen || broken; })) {
      broken = true;
      cv.notify_all();
    }
  }
  std::mutex mutex;
  std::condition_variable cv;
  unsigned expected, arrived = 0, generation = 0;
  bool broken = false;
};

inline std::unique_ptr<Barrier> block_barrier;
inline std::vector<std::unique_ptr<Barrier>> warp_barriers;
inline double exchange[kMaxWarps][32];
inline std::vector<unsigned char> dynamic_smem;
// The buffer's first 128-byte aligned byte: a GPU's dynamic shared memory is
// aligned (the kernels ask for 32 bytes, what wmma's tiles need).
inline unsigned char* dynamic_smem_base() {
  const uintptr_t a = reinterpret_cast<uintptr_t>(dynamic_smem.data());
  return dynamic_smem.data() + ((128 - a % 128) % 128);
}
inline bool reverse_blocks = false;  // launch_threads: run the blocks last to first

// True when a barrier of the last launch_threads timed out.
inline bool last_launch_broken() {
  bool broken = block_barrier && block_barrier->broken;
  for (const auto& w : warp_barriers) broken = broken || w->broken;
  return broken;
}
}  // namespace pv_emu

inline void __syncthreads() { pv_emu::block_barrier->arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  const unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
  pv_emu::exchange[w][l] = static_cast<double>(v);  // exact for float and double
  pv_emu::warp_barriers[w]->arrive_and_wait();
  const T r = static_cast<T>(pv_emu::exchange[w][l ^ static_cast<unsigned>(lane_mask)]);
  pv_emu::warp_barriers[w]->arrive_and_wait();
  return r;
}

// Blocks run one after another, so device-wide fences are plain fences.
inline void __trap() { std::abort(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
namespace pv_emu {
inline std::atomic<bool> turn_not_given{false};  // pv_wait_turn found a turn not yet given
}
// fused_forward_kernel's chain: a block waits for a block that started
// before it.  Blocks run one after another here, so the turn must already be
// given; where it is not (a block waiting for one that runs later, which
// could hang a GPU) this records the error, for the test to report, instead
// of spinning forever.
inline void pv_wait_turn(const unsigned* turn, unsigned want) {
  if (__atomic_load_n(turn, __ATOMIC_SEQ_CST) != want) pv_emu::turn_not_given = true;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;  // a load that bypasses L1 on the GPU
}

// bfloat16 of the tensor-core path (cuda_bf16.h), as far as the device code
// uses it: built from a float with round-to-nearest-even, read back as a float.
struct __nv_bfloat16 {
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
      bits = static_cast<uint16_t>(u >> 16);
    }
  }
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  uint16_t bits;
};
static_assert(sizeof(__nv_bfloat16) == 2, "bfloat16 is 16 bits");
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }

// nvcuda::wmma (mma.h) for 16x16x16 tiles, as far as the device code uses it.
// On a GPU a fragment is spread over the 32 lanes of a warp in a layout the
// API does not specify; here lane 0 of the warp holds the whole tile (element
// (i, j) at x[16 i + j]), computes the products and stores, and the other
// lanes' fragments stay empty (no work: the emulation runs a thread per lane).
// Code that touches fragments only through these calls -- never their
// elements, whose layout a GPU does not promise -- gets the same result as on
// the GPU (up to the order of the float32 sums inside one product).
// Pointer and ldm rules of the real API (256-bit aligned pointers, ldm a
// multiple of 8 for 16-bit and of 4 for 32-bit elements) are checked, so the
// emulation rejects what the GPU would not run.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has 16x16x16 tiles only");
  static constexpr int num_elements = 256;
  T x[256];
};
inline void pv_check_tile(const void* p, unsigned ldm, unsigned elem_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * elem_bytes) % 16 != 0) {
    std::fprintf(stderr, "wmma: pointer %p not 256-bit aligned or ldm %u not a multiple of 16 bytes\n", p, ldm);
    std::abort();
  }
}
template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  pv_check_tile(p, ldm, sizeof(T));
  if (threadIdx.x % 32 != 0) return;  // lane 0 holds the tile
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.x[16 * i + j] = std::is_same<Layout, col_major>::value ? p[i + j * ldm] : p[i * ldm + j];
}
template <typename T>
inline void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T v) {
  if (threadIdx.x % 32 != 0) return;
  for (auto& e : f.x) e = v;
}
template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  if (threadIdx.x % 32 != 0) return;
  float r[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float t = 0.f;  // each product of two 16-bit floats is exact in float32
      for (int k = 0; k < 16; ++k) t += static_cast<float>(a.x[16 * i + k]) * static_cast<float>(b.x[16 * k + j]);
      r[16 * i + j] = c.x[16 * i + j] + t;
    }
  std::memcpy(d.x, r, sizeof(r));
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  pv_check_tile(p, ldm, sizeof(float));
  if (threadIdx.x % 32 != 0) return;  // lane 0 holds the tile
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) (layout == mem_row_major ? p[i * ldm + j] : p[i + j * ldm]) = f.x[16 * i + j];
}
}  // namespace wmma
}  // namespace nvcuda

template <typename F>
void launch_serial(int64_t blocks, unsigned threads, F kernel) {
  for (int64_t b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < threads; ++t) {
      blockIdx.x = static_cast<unsigned>(b);
      threadIdx.x = t;
      blockDim.x = threads;
      kernel();
    }
}

template <typename F>
bool launch_threads(int64_t blocks, unsigned threads, F kernel, size_t smem_bytes = 0) {  // false: a barrier broke
  // One std::thread per CUDA thread of a block, reused for every block; a
  // block-wide barrier after each block keeps the blocks apart (their
  // __shared__ statics are reused).
  // Dynamic shared memory starts as NaN bytes (0xff), where a GPU has garbage.
  pv_emu::dynamic_smem.assign(smem_bytes + 128, static_cast<unsigned char>(0xff));
  pv_emu::block_barrier = std::make_unique<pv_emu::Barrier>(threads);
  pv_emu::warp_barriers.clear();
  for (unsigned w = 0; w < threads / 32; ++w)
    pv_emu::warp_barriers.push_back(std::make_unique<pv_emu::Barrier>(32));
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([=] {
      for (int64_t i = 0; i < blocks; ++i) {
        const int64_t b = pv_emu::reverse_blocks ? blocks - 1 - i : i;
        blockIdx.x = static_cast<unsigned>(b);
        threadIdx.x = t;
        blockDim.x = threads;
        kernel();
        pv_emu::block_barrier->arrive_and_wait();
      }
    });
  for (auto& th : pool) th.join();
  return !pv_emu::last_launch_broken();
}
