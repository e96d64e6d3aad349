// C++ test of the personvlad ops through the dispatcher (no Python):
//   * personvlad::person_vlad on CPU tensors against a direct nested-loop
//     implementation of SPEC §1 (x = M F, softmax of W x + z, residuals x - c,
//     intra + global L2 normalisation) for 1/2/3-D grids, parts present or
//     absent, normalize true/false, float64 and float32, non-contiguous input;
//   * personvlad::person_vlad_backward against central finite differences;
//   * autograd through the op (csrc/autograd.cpp): torch::autograd::grad of
//     <g, out> gives the backward op's gradients, on CPU and CUDA;
//   * malformed input raises c10::ValueError naming the argument;
//   * with CUDA kernels built: the CUDA op against the CPU op (SKIP when no
//     device is present).
// Exit status 0 iff every check passed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <ATen/core/grad_mode.h>
#ifdef PERSONVLAD_TEST_CUDA
#include <torch/cuda.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using OptT = std::optional<at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

int g_failures = 0;
int g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

at::Tensor op_forward(const at::Tensor& F, const OptT& M, const at::Tensor& W, const at::Tensor& z,
                      const at::Tensor& c, bool normalize) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("personvlad::person_vlad", "")
                       .typed<at::Tensor(const at::Tensor&, const OptT&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(F, M, W, z, c, normalize);
}

Grads op_backward(const at::Tensor& g, const at::Tensor& F, const OptT& M, const at::Tensor& W,
                  const at::Tensor& z, const at::Tensor& c, bool normalize) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("personvlad::person_vlad_backward", "")
                       .typed<Grads(const at::Tensor&, const at::Tensor&, const OptT&,
                                    const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(g, F, M, W, z, c, normalize);
}

// SPEC §1 literally, in double, with nested loops.  Returns (N, K*C) or (N, K, C).
at::Tensor naive(const at::Tensor& F_, const OptT& M_, const at::Tensor& W_, const at::Tensor& z_,
                 const at::Tensor& c_, bool normalize) {
  const int64_t N = F_.size(0), C = F_.size(1), K = W_.size(0);
  const at::Tensor F = F_.to(at::kDouble).contiguous().reshape({N, C, -1});
  const int64_t P = F.size(2);
  const int64_t B = M_ ? M_->size(1) : 1;
  const at::Tensor M = M_ ? M_->to(at::kDouble).contiguous().reshape({N, B, P})
                          : at::ones({N, 1, P}, at::kDouble);
  const at::Tensor W = W_.to(at::kDouble).contiguous(), z = z_.to(at::kDouble).contiguous(),
                   c = c_.to(at::kDouble).contiguous();
  auto f = F.accessor<double, 3>();
  auto m = M.accessor<double, 3>();
  auto w = W.accessor<double, 2>();
  auto zz = z.accessor<double, 1>();
  auto cc = c.accessor<double, 2>();
  at::Tensor V = at::zeros({N, K, C}, at::kDouble);
  auto v = V.accessor<double, 3>();
  std::vector<double> x(C), logit(K);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < P; ++s) {
        for (int64_t ch = 0; ch < C; ++ch) x[ch] = m[n][b][s] * f[n][ch][s];
        double mx = -INFINITY;
        for (int64_t k = 0; k < K; ++k) {
          double l = zz[k];
          for (int64_t ch = 0; ch < C; ++ch) l += w[k][ch] * x[ch];
          logit[k] = l;
          mx = std::max(mx, l);
        }
        double sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += (logit[k] = std::exp(logit[k] - mx));
        for (int64_t k = 0; k < K; ++k) {
          const double a = logit[k] / sum;
          for (int64_t ch = 0; ch < C; ++ch) v[n][k][ch] += a * (x[ch] - cc[k][ch]);
        }
      }
  if (!normalize) return V;
  at::Tensor out = at::empty({N, K * C}, at::kDouble);
  auto o = out.accessor<double, 2>();
  for (int64_t n = 0; n < N; ++n) {
    double total = 0;
    for (int64_t k = 0; k < K; ++k) {
      double r = 0;
      for (int64_t ch = 0; ch < C; ++ch) r += v[n][k][ch] * v[n][k][ch];
      r = std::max(std::sqrt(r), 1e-12);
      for (int64_t ch = 0; ch < C; ++ch) {
        o[n][k * C + ch] = v[n][k][ch] / r;
        total += o[n][k * C + ch] * o[n][k * C + ch];
      }
    }
    total = std::max(std::sqrt(total), 1e-12);
    for (int64_t i = 0; i < K * C; ++i) o[n][i] /= total;
  }
  return out;
}

struct Case {
  std::string name;
  int64_t N, C;
  std::vector<int64_t> S;
  int64_t B;  // 0: parts = None
  int64_t K;
};

struct Inputs {
  at::Tensor F;
  OptT M;
  at::Tensor W, z, c;
};

Inputs make(const Case& cs, at::ScalarType dt) {
  std::vector<int64_t> fs{cs.N, cs.C}, ms{cs.N, cs.B};
  fs.insert(fs.end(), cs.S.begin(), cs.S.end());
  ms.insert(ms.end(), cs.S.begin(), cs.S.end());
  const auto o = at::TensorOptions().dtype(at::kDouble);
  Inputs in;
  in.F = at::randn(fs, o).to(dt);
  if (cs.B > 0) in.M = at::rand(ms, o).to(dt);
  in.W = (at::randn({cs.K, cs.C}, o) / std::sqrt(double(cs.C))).to(dt);
  in.z = (at::randn({cs.K}, o) * 0.1).to(dt);
  in.c = (at::randn({cs.K, cs.C}, o) * 0.5).to(dt);
  return in;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 && b.numel() == 0) return 0.0;
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

void test_forward(const Case& cs) {
  for (at::ScalarType dt : {at::kDouble, at::kFloat}) {
    const double tol = dt == at::kDouble ? 1e-10 : 2e-5;
    Inputs in = make(cs, dt);
    for (bool normalize : {true, false}) {
      const at::Tensor got = op_forward(in.F, in.M, in.W, in.z, in.c, normalize);
      const at::Tensor want = naive(in.F, in.M, in.W, in.z, in.c, normalize);
      const std::string tag = cs.name + (dt == at::kDouble ? " f64" : " f32") +
                              (normalize ? " normalize" : " raw");
      check(got.scalar_type() == dt, tag + ": output dtype");
      check(got.sizes() == want.sizes(), tag + ": output shape");
      if (got.sizes() != want.sizes()) continue;
      // raw VLAD entries grow with P: compare relative to their scale
      const double scale = normalize ? 1.0 : std::max(1.0, want.abs().max().item<double>());
      const double err = max_abs_diff(got, want);
      check(err <= tol * scale, tag + ": max error " + std::to_string(err));
    }
  }
}

void test_noncontiguous() {
  Inputs in = make({"nc", 3, 5, {4, 3}, 2, 4}, at::kDouble);
  // same values, transposed memory
  const at::Tensor Fnc = in.F.transpose(0, 3).contiguous().transpose(0, 3);
  const at::Tensor Wnc = in.W.t().contiguous().t();
  check(!Fnc.is_contiguous() && !Wnc.is_contiguous(), "non-contiguous views");
  const double err = max_abs_diff(op_forward(Fnc, in.M, Wnc, in.z, in.c, true),
                                  op_forward(in.F, in.M, in.W, in.z, in.c, true));
  check(err < 1e-14, "non-contiguous input: error " + std::to_string(err));
}

void test_empty_batch() {
  Inputs in = make({"empty", 0, 4, {2, 3}, 2, 3}, at::kFloat);
  const at::Tensor out = op_forward(in.F, in.M, in.W, in.z, in.c, true);
  check(out.dim() == 2 && out.size(0) == 0 && out.size(1) == 12, "N=0 forward shape");
  const Grads g = op_backward(out, in.F, in.M, in.W, in.z, in.c, true);
  check(std::get<0>(g).sizes() == in.F.sizes(), "N=0 dF shape");
  check(std::get<2>(g).sizes() == in.W.sizes() && std::get<2>(g).abs().sum().item<double>() == 0,
        "N=0 dW zero");
}

// Malformed input: c10::ValueError (Python's ValueError) naming the argument,
// also for a C++ caller that goes straight to the dispatcher.
bool raises_value_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
  } catch (const c10::ValueError& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  } catch (const std::exception&) {
    return false;
  }
  return false;
}

void test_bad_input() {
  Inputs in = make({"bad", 2, 4, {2, 3}, 2, 3}, at::kFloat);
  check(raises_value_error([&] { op_forward(in.F, in.M, in.W.narrow(1, 0, 3), in.z, in.c, true); },
                           "assign_weight"),
        "bad assign_weight shape: c10::ValueError naming it");
  check(raises_value_error([&] { op_forward(in.F, in.M, in.W, in.z, in.c.narrow(0, 0, 2), true); },
                           "centers"),
        "bad centers shape: c10::ValueError naming it");
  check(raises_value_error([&] { op_forward(in.F.to(at::kLong), in.M, in.W, in.z, in.c, true); },
                           "features"),
        "integer features: c10::ValueError naming them");
  const at::Tensor out = op_forward(in.F, in.M, in.W, in.z, in.c, true);
  check(raises_value_error([&] { op_backward(out.narrow(1, 0, 5), in.F, in.M, in.W, in.z, in.c, true); },
                           "grad_output"),
        "bad grad_output shape: c10::ValueError naming it");
}

// Central finite differences of L = <g, f(inputs)> against person_vlad_backward.
void test_backward_fd(const Case& cs, bool normalize) {
  Inputs in = make(cs, at::kDouble);
  const at::Tensor out = op_forward(in.F, in.M, in.W, in.z, in.c, normalize);
  const at::Tensor g = at::randn(out.sizes(), at::kDouble);
  const Grads grads = op_backward(g, in.F, in.M, in.W, in.z, in.c, normalize);
  std::vector<at::Tensor> xs{in.F, in.M ? *in.M : at::Tensor(), in.W, in.z, in.c};
  std::vector<at::Tensor> gs{std::get<0>(grads), std::get<1>(grads), std::get<2>(grads),
                             std::get<3>(grads), std::get<4>(grads)};
  const char* names[] = {"features", "parts", "assign_weight", "assign_bias", "centers"};
  const double h = 1e-6;
  for (int i = 0; i < 5; ++i) {
    if (!xs[i].defined()) {
      check(gs[i].numel() == 0, cs.name + ": dparts empty without parts");
      continue;
    }
    check(gs[i].sizes() == xs[i].sizes(), cs.name + ": grad shape of " + names[i]);
    at::Tensor flat = xs[i].view({-1});
    at::Tensor gflat = gs[i].contiguous().view({-1});
    double worst = 0;
    for (int64_t j = 0; j < flat.numel(); ++j) {
      const double x0 = flat[j].item<double>();
      flat[j] = x0 + h;
      const double lp = (g * op_forward(in.F, in.M, in.W, in.z, in.c, normalize)).sum().item<double>();
      flat[j] = x0 - h;
      const double lm = (g * op_forward(in.F, in.M, in.W, in.z, in.c, normalize)).sum().item<double>();
      flat[j] = x0;
      const double fd = (lp - lm) / (2 * h);
      const double an = gflat[j].item<double>();
      worst = std::max(worst, std::abs(fd - an) / (1e-6 + 1e-4 * std::abs(fd)));
    }
    check(worst <= 1.0, cs.name + (normalize ? " normalize" : " raw") + ": backward vs finite " +
                            "differences for " + names[i] + " (worst ratio " +
                            std::to_string(worst) + ")");
  }
}

// Autograd through the op: grad of <g, out> with respect to the leaves is the
// backward op's output, for the inputs that require grad; parts=None gives
// five leaves' worth of gradient slots but no parts gradient.
void test_autograd(const Case& cs, bool normalize, at::Device device) {
  Inputs in = make(cs, at::kDouble);
  auto leaf = [&](const at::Tensor& t) { return t.to(device).detach().requires_grad_(true); };
  const at::Tensor F = leaf(in.F), W = leaf(in.W), z = leaf(in.z), c = leaf(in.c);
  const OptT M = in.M ? OptT(leaf(*in.M)) : OptT();
  const std::string tag = cs.name + (device.is_cuda() ? " cuda" : " cpu") +
                          (normalize ? " normalize" : " raw") + ": autograd ";
  const at::Tensor out = op_forward(F, M, W, z, c, normalize);
  check(out.requires_grad(), tag + "output requires grad");
  const at::Tensor g = at::randn(out.sizes(), out.options().requires_grad(false));
  std::vector<at::Tensor> leaves{F, W, z, c};
  if (M) leaves.push_back(*M);
  const auto got = torch::autograd::grad({(g * out).sum()}, leaves);
  const Grads want = op_backward(g, F.detach(), M ? OptT(M->detach()) : OptT(), W.detach(),
                                 z.detach(), c.detach(), normalize);
  const std::vector<at::Tensor> expect{std::get<0>(want), std::get<2>(want), std::get<3>(want),
                                       std::get<4>(want), std::get<1>(want)};
  const char* names[] = {"features", "assign_weight", "assign_bias", "centers", "parts"};
  for (size_t i = 0; i < leaves.size(); ++i) {
    const bool ok = got[i].defined() && got[i].sizes() == leaves[i].sizes() &&
                    max_abs_diff(got[i].cpu(), expect[i].cpu()) <= 1e-12;
    check(ok, tag + "gradient of " + names[i]);
  }
  {
    at::NoGradGuard no_grad;
    check(!op_forward(F, M, W, z, c, normalize).requires_grad(), tag + "no_grad output");
  }
}

#ifdef PERSONVLAD_TEST_CUDA
void test_cuda(const std::vector<Case>& cases) {
  if (!torch::cuda::is_available()) {
    std::printf("SKIP: CUDA cases (no CUDA device)\n");
    return;
  }
  for (const Case& cs : cases) {
    for (at::ScalarType dt : {at::kDouble, at::kFloat}) {
      const double tol = dt == at::kDouble ? 1e-10 : 1e-4;
      Inputs in = make(cs, dt);
      auto cu = [](const at::Tensor& t) { return t.to(at::kCUDA); };
      const OptT Mc = in.M ? OptT(cu(*in.M)) : OptT();
      for (bool normalize : {true, false}) {
        const std::string tag = cs.name + " cuda" + (dt == at::kDouble ? " f64" : " f32") +
                                (normalize ? " normalize" : " raw");
        const at::Tensor cpu = op_forward(in.F, in.M, in.W, in.z, in.c, normalize);
        const at::Tensor gpu = op_forward(cu(in.F), Mc, cu(in.W), cu(in.z), cu(in.c), normalize);
        const double scale = normalize ? 1.0 : std::max(1.0, cpu.abs().max().item<double>());
        check(max_abs_diff(gpu.cpu(), cpu) <= tol * scale, tag + ": forward vs CPU");
        const at::Tensor g = at::randn(cpu.sizes(), at::kDouble).to(dt);
        const Grads a = op_backward(g, in.F, in.M, in.W, in.z, in.c, normalize);
        const Grads b = op_backward(cu(g), cu(in.F), Mc, cu(in.W), cu(in.z), cu(in.c), normalize);
        const double gs = std::max(1.0, std::get<0>(a).abs().max().item<double>());
        check(max_abs_diff(std::get<0>(b).cpu(), std::get<0>(a)) <= 10 * tol * gs, tag + ": dF");
        check(max_abs_diff(std::get<2>(b).cpu(), std::get<2>(a)) <= 10 * tol * gs, tag + ": dW");
        check(max_abs_diff(std::get<4>(b).cpu(), std::get<4>(a)) <= 10 * tol * gs, tag + ": dc");
      }
    }
  }
  test_autograd({"ag-2d-B2", 2, 3, {2, 2}, 2, 3}, true, at::kCUDA);
  test_autograd({"ag-1d-noparts", 2, 3, {3}, 0, 2}, false, at::kCUDA);
}
#endif

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<Case> cases = {
      {"1d-B3", 2, 5, {7}, 3, 4},     {"1d-noparts", 3, 4, {9}, 0, 3},
      {"2d-noparts", 3, 4, {3, 5}, 0, 6}, {"2d-B6", 2, 6, {3, 4}, 6, 5},
      {"3d-B1", 2, 6, {2, 3, 4}, 1, 5}, {"3d-B2", 1, 3, {2, 2, 3}, 2, 2},
      {"K1", 2, 4, {5}, 2, 1},        {"C1", 2, 1, {2, 3}, 0, 3},
  };
  try {
    for (const Case& cs : cases) test_forward(cs);
    test_noncontiguous();
    test_empty_batch();
    test_bad_input();
    test_backward_fd({"fd-2d-B2", 2, 3, {2, 2}, 2, 3}, true);
    test_backward_fd({"fd-1d-noparts", 2, 3, {3}, 0, 2}, false);
    test_autograd({"ag-2d-B2", 2, 3, {2, 2}, 2, 3}, true, at::kCPU);
    test_autograd({"ag-1d-noparts", 2, 3, {3}, 0, 2}, false, at::kCPU);
#ifdef PERSONVLAD_TEST_CUDA
    test_cuda(cases);
#else
    std::printf("SKIP: CUDA cases (built without CUDA kernels)\n");
#endif
  } catch (const std::exception& e) {
    std::printf("FAIL: exception: %s\n", e.what());
    return 1;
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
