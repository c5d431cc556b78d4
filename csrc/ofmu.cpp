// ofmu._C: op schemas, Meta (fake-tensor) implementations and the Python module entry point.
//
// The four ops implement the kernel contract (docs/design.md, "Kernel contract"). They are registered
// with TORCH_LIBRARY so that torch.compile and FakeTensorMode see them as ordinary ops:
// the Meta kernels below only validate arguments and describe outputs. The CPU kernels live in
// csrc/cpu/, the CUDA kernels (when built) in csrc/cuda/.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "finalize.h"

namespace ofmu {
namespace {

at::Tensor reduce3_meta(const at::Tensor& x, const std::optional<at::Tensor>& y) {
  check_reduce3(x, y);
  return at::empty({3}, x.options().dtype(acc_dtype(x.scalar_type())));
}

void combine_meta(const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& coeffs,
                  const at::Tensor& out_a, const std::optional<at::Tensor>& out_b) {
  check_combine(x, y, coeffs, out_a, out_b);
}

void update_meta(const at::Tensor& theta, const at::Tensor& x, const std::optional<at::Tensor>& y,
                 const at::Tensor& coeffs) {
  check_update(theta, x, y, coeffs);
}

at::Tensor finalize_meta(const at::Tensor& gstats, const at::Tensor& ustats,
                         const at::Tensor& checks, const std::optional<at::Tensor>& ok,
                         bool project, double gamma, double eps, double lr, double weight_decay,
                         std::optional<double> max_norm, std::optional<double> cap) {
  check_finalize(gstats, ustats, checks, ok, cap.has_value());
  return at::empty({kFinalizeLen}, gstats.options());
}

}  // namespace
}  // namespace ofmu

TORCH_LIBRARY(ofmu, m) {
  // stats = [<x, y>, <x, x>, <y, y>] in the accumulation dtype; deterministic.
  m.def("reduce3(Tensor x, Tensor? y) -> Tensor", {at::Tag::pt2_compliant_tag});
  // out_a = c0*x + c1*y; out_b = c2*x + c3*y (outputs may alias x or y).
  m.def(
      "combine(Tensor x, Tensor? y, Tensor coeffs, Tensor(a!) out_a, Tensor(b!)? out_b=None) "
      "-> ()",
      {at::Tag::pt2_compliant_tag});
  // theta = c0*theta + c1*x + c2*y unless c3 == 0 (theta then untouched).
  m.def("update(Tensor(a!) theta, Tensor x, Tensor? y, Tensor coeffs) -> ()",
        {at::Tag::pt2_compliant_tag});
  // The summed statistics -> the packed coefficients of a step (finalize.h has the layout).
  m.def(
      "finalize(Tensor gstats, Tensor ustats, Tensor checks, Tensor? ok, bool project, "
      "float gamma, float eps, float lr, float weight_decay, float? max_norm, float? cap) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(ofmu, Meta, m) {
  m.impl("reduce3", &ofmu::reduce3_meta);
  m.impl("combine", &ofmu::combine_meta);
  m.impl("update", &ofmu::update_meta);
  m.impl("finalize", &ofmu::finalize_meta);
}

// The GPU targets the CUDA kernels were compiled for, e.g. "sm_80,sm_90,compute_90" (setup.py
// passes them as a token list; "" in a CPU-only build). ofmu.backends refuses the cuda backend
// on a GPU that none of them runs on, instead of failing at the first launch.
#define OFMU_STRINGIFY_(...) #__VA_ARGS__
#define OFMU_STRINGIFY(...) OFMU_STRINGIFY_(__VA_ARGS__)
#ifdef OFMU_CUDA_TARGETS
static const char kCudaTargets[] = OFMU_STRINGIFY(OFMU_CUDA_TARGETS);
#else
static const char kCudaTargets[] = "";
#endif

// A minimal Python module: importing ofmu._C loads this library, whose static initialisers
// above register the ops with the dispatcher (torch must be imported first, which
// ofmu.backends does). Its one attribute, cuda_archs, is kCudaTargets.
static PyModuleDef ofmu_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Compiled ofmu kernels; the ops live under torch.ops.ofmu (reduce3, combine, update, "
    "finalize).", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&ofmu_module);
  if (m != nullptr && PyModule_AddStringConstant(m, "cuda_archs", kCudaTargets) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
