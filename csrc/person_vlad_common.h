// Shared, device-independent helpers for the personvlad kernels (CPU and CUDA).
//
// The Python door (personvlad.ops.validate) raises ValueError for malformed
// input before any kernel runs; the TORCH_CHECKs here are the last line of
// defence for callers that go straight to torch.ops.personvlad.* (or to the
// dispatcher from C++), so they must never be weaker than the door, and they
// raise the same ValueError (TORCH_CHECK_VALUE: c10::ValueError in C++).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace personvlad {

// Held by every kernel entry point (CPU and CUDA).  The op has no Autocast
// kernel, so a caller's autocast region is still active inside the kernels,
// and the ATen GEMMs they call (bmm, matmul, mm) would come back in
// bf16/fp16 where the kernels expect their fp32/fp64 compute dtype.
struct NoAutocastGuard {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Clamp used by both L2 normalisations (SPEC §1).
constexpr double kNormEps = 1e-12;

// Problem sizes of one call, after flattening the spatial grid.
struct VladDims {
  int64_t N = 0;  // batch
  int64_t C = 0;  // channels
  int64_t P = 0;  // prod(spatial)
  int64_t B = 1;  // parts (1 when parts is None)
  int64_t K = 0;  // clusters
  bool has_parts = false;
};

// Accumulation dtype: float64 stays float64, everything else uses float32.
inline at::ScalarType compute_dtype(const at::Tensor& features) {
  return features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool has_parts(const std::optional<at::Tensor>& parts) {
  return parts.has_value() && parts->defined();
}

// Validate the five op inputs (same rules as personvlad.ops.validate) and
// return the flattened sizes.  `what` names the calling kernel in messages.
inline VladDims check_inputs(const at::Tensor& features,
                             const std::optional<at::Tensor>& parts,
                             const at::Tensor& W, const at::Tensor& z,
                             const at::Tensor& c, const char* what) {
  VladDims d;
  TORCH_CHECK_VALUE(features.defined(), what, ": features is undefined");
  TORCH_CHECK_VALUE(features.is_floating_point(), what,
                    ": features: expected a floating-point dtype, got ", features.scalar_type());
  TORCH_CHECK_VALUE(features.dim() >= 3 && features.dim() <= 5, what,
                    ": features: expected shape (N, C, *S) with 1-3 spatial dims, got ",
                    features.sizes());
  d.N = features.size(0);
  d.C = features.size(1);
  TORCH_CHECK_VALUE(d.C >= 1, what, ": features: expected C >= 1, got ", features.sizes());
  d.P = 1;
  for (int64_t i = 2; i < features.dim(); ++i) d.P *= features.size(i);
  TORCH_CHECK_VALUE(d.P >= 1, what, ": features: expected a non-empty spatial grid, got ",
                    features.sizes());

  d.has_parts = has_parts(parts);
  if (d.has_parts) {
    const at::Tensor& M = *parts;
    TORCH_CHECK_VALUE(M.is_floating_point(), what,
                      ": parts: expected a floating-point dtype, got ", M.scalar_type());
    TORCH_CHECK_VALUE(M.dim() == features.dim(), what, ": parts: expected rank ", features.dim(),
                      " (N, B, *S), got ", M.sizes());
    TORCH_CHECK_VALUE(M.size(0) == d.N, what, ": parts: expected N=", d.N, ", got ", M.sizes());
    TORCH_CHECK_VALUE(M.size(1) >= 1, what, ": parts: expected B >= 1, got ", M.sizes());
    for (int64_t i = 2; i < features.dim(); ++i) {
      TORCH_CHECK_VALUE(M.size(i) == features.size(i), what,
                        ": parts: spatial grid must match features, got parts ", M.sizes(),
                        " and features ", features.sizes());
    }
    TORCH_CHECK_VALUE(M.device() == features.device(), what, ": parts: expected device ",
                      features.device(), ", got ", M.device());
    d.B = M.size(1);
  }

  TORCH_CHECK_VALUE(W.is_floating_point() && z.is_floating_point() && c.is_floating_point(), what,
                    ": assign_weight, assign_bias and centers must be floating point, got ",
                    W.scalar_type(), ", ", z.scalar_type(), ", ", c.scalar_type());
  TORCH_CHECK_VALUE(W.dim() == 2 && W.size(1) == d.C && W.size(0) >= 1, what,
                    ": assign_weight: expected shape (K, C=", d.C, "), got ", W.sizes());
  d.K = W.size(0);
  TORCH_CHECK_VALUE(z.dim() == 1 && z.size(0) == d.K, what, ": assign_bias: expected shape (K=", d.K,
                    ",), got ", z.sizes());
  TORCH_CHECK_VALUE(c.dim() == 2 && c.size(0) == d.K && c.size(1) == d.C, what,
                    ": centers: expected shape (K=", d.K, ", C=", d.C, "), got ", c.sizes());
  for (const at::Tensor* t : {&W, &z, &c}) {
    TORCH_CHECK_VALUE(t->device() == features.device(), what,
                      ": parameters must be on features' device ", features.device(), ", got ",
                      t->device());
  }
  return d;
}

// Expected shape of the forward output.
inline std::vector<int64_t> output_shape(const VladDims& d, bool normalize) {
  if (normalize) return {d.N, d.K * d.C};
  return {d.N, d.K, d.C};
}

// `t` converted to dtype `dt`, contiguous, viewed as (rows, cols...).
inline at::Tensor flat_contig(const at::Tensor& t, at::ScalarType dt, at::IntArrayRef shape) {
  return t.to(dt).contiguous().reshape(shape);
}

// Return `result` (contiguous, compute dtype, any shape with numel == like.numel())
// as a fresh tensor with like's shape, dtype and memory layout (the layout
// torch.empty_like(like) gives, which is what the fake kernels promise).
inline at::Tensor like_input(const at::Tensor& result, const at::Tensor& like) {
  at::Tensor out = at::empty_like(like);
  if (out.is_contiguous() && out.scalar_type() == result.scalar_type()) {
    return result.reshape(like.sizes());
  }
  out.copy_(result.reshape(like.sizes()));
  return out;
}

}  // namespace personvlad
