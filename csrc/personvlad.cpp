// Op schema registration for personvlad (the public contract of SPEC §1).
//
// Kernels are registered per device in csrc/cpu/ and csrc/cuda/ with
// TORCH_LIBRARY_IMPL, the autograd formula in csrc/autograd.cpp (Autograd key);
// the fake (meta) kernels are registered from Python (personvlad/ops.py) with
// torch.library.register_fake, as in pytorch/extension-cpp.
#include <torch/library.h>

TORCH_LIBRARY(personvlad, m) {
  // Python-side fake kernels live in personvlad.ops.
  m.set_python_module("personvlad.ops");
  m.def(
      "person_vlad(Tensor features, Tensor? parts, Tensor assign_weight, "
      "Tensor assign_bias, Tensor centers, bool normalize=True) -> Tensor");
  m.def(
      "person_vlad_backward(Tensor grad_output, Tensor features, Tensor? parts, "
      "Tensor assign_weight, Tensor assign_bias, Tensor centers, bool normalize) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
