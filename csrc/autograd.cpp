// The autograd formula of personvlad::person_vlad, in C++ (Autograd key).
//
// Registered here rather than with torch.library.register_autograd from
// Python so that
//   * libtorch users (no Python) can train through the op: torch::autograd
//     records it and calls personvlad::person_vlad_backward;
//   * Python callers of the cpu/cuda backends skip the Python autograd
//     wrapper (setup_context + backward in Python on every call).
// The formula is the one personvlad/ops.py registers when the extension is
// absent: save the five inputs, and in backward call the backward op on a
// contiguous gradient.  Both ops are called through the dispatcher, below
// the autograd keys, so every backend kernel (CPU, CUDA, the Python
// fallbacks and the fake kernels under torch.compile) is reached the same way.
// The backward op has an Autograd kernel too (PersonVladBackwardFunction):
// it runs the backend below the autograd keys, so a first-order gradient
// taken with create_graph=True (gradient penalties, HVPs elsewhere in a
// model) works, and it records a node that raises a clear error if those
// gradients are differentiated again (no double backward).  Without it the
// backend kernel ran with autograd on, and the CPU kernel's out= GEMMs
// refused inputs that require grad.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace personvlad {
namespace {

using OptTensor = std::optional<at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

const auto& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("personvlad::person_vlad", "")
          .typed<at::Tensor(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, bool)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("personvlad::person_vlad_backward", "")
          .typed<Grads(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                       const at::Tensor&, const at::Tensor&, bool)>();
  return op;
}

class PersonVladFunction : public torch::autograd::Function<PersonVladFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& features,
                            const OptTensor& parts, const at::Tensor& assign_weight,
                            const at::Tensor& assign_bias, const at::Tensor& centers, bool normalize) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = forward_op().call(features, parts, assign_weight, assign_bias, centers, normalize);
    }
    const bool has_parts = parts.has_value() && parts->defined();
    ctx->save_for_backward({features, has_parts ? *parts : at::Tensor(), assign_weight, assign_bias, centers});
    ctx->saved_data["normalize"] = normalize;
    ctx->saved_data["has_parts"] = has_parts;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const bool normalize = ctx->saved_data["normalize"].toBool();
    const bool has_parts = ctx->saved_data["has_parts"].toBool();
    const OptTensor parts = has_parts ? OptTensor(saved[1]) : std::nullopt;
    auto [d_features, d_parts, d_weight, d_bias, d_centers] = backward_op().call(
        grad_outputs[0].contiguous(), saved[0], parts, saved[2], saved[3], saved[4], normalize);
    // one entry per forward argument; none for `normalize`, nor for absent parts
    return {d_features, has_parts ? d_parts : at::Tensor(), d_weight, d_bias, d_centers, at::Tensor()};
  }
};

// personvlad::person_vlad_backward under autograd: the five gradients,
// computed below the autograd keys; differentiating them raises.
class PersonVladBackwardFunction : public torch::autograd::Function<PersonVladBackwardFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* /*ctx*/,
                                                const at::Tensor& grad_output, const at::Tensor& features,
                                                const OptTensor& parts, const at::Tensor& assign_weight,
                                                const at::Tensor& assign_bias, const at::Tensor& centers,
                                                bool normalize) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [d_features, d_parts, d_weight, d_bias, d_centers] =
        backward_op().call(grad_output, features, parts, assign_weight, assign_bias, centers, normalize);
    return {d_features, d_parts, d_weight, d_bias, d_centers};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* /*ctx*/,
                                                 torch::autograd::variable_list /*grad_outputs*/) {
    TORCH_CHECK(false,
                "personvlad::person_vlad: double backward (differentiating the op's gradients, e.g. a "
                "gradient penalty through it) is not supported; the first-order gradients are exact");
  }
};

Grads person_vlad_backward_autograd(const at::Tensor& grad_output, const at::Tensor& features,
                                    const OptTensor& parts, const at::Tensor& assign_weight,
                                    const at::Tensor& assign_bias, const at::Tensor& centers, bool normalize) {
  auto g = PersonVladBackwardFunction::apply(grad_output, features, parts, assign_weight, assign_bias, centers,
                                             normalize);
  return {g[0], g[1], g[2], g[3], g[4]};
}

at::Tensor person_vlad_autograd(const at::Tensor& features, const OptTensor& parts,
                                const at::Tensor& assign_weight, const at::Tensor& assign_bias,
                                const at::Tensor& centers, bool normalize) {
  return PersonVladFunction::apply(features, parts, assign_weight, assign_bias, centers, normalize);
}

}  // namespace
}  // namespace personvlad

TORCH_LIBRARY_IMPL(personvlad, Autograd, m) {
  m.impl("person_vlad", &personvlad::person_vlad_autograd);
  m.impl("person_vlad_backward", &personvlad::person_vlad_backward_autograd);
}
