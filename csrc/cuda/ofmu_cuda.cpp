// Torch glue of the CUDA kernels: argument checks, device guard, stream, workspace, and the
// TORCH_LIBRARY_IMPL(ofmu, CUDA) registration. The kernels themselves are in ofmu_kernels.cu.
//
// Nothing here reads device memory: coeffs stay on the device (the update's skip flag is read by
// the kernel), so the ops are free of host syncs and capturable in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "ofmu_kernels.cuh"

namespace ofmu {
namespace {

cuda::DType kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return cuda::DType::kFloat32;
    case c10::kDouble: return cuda::DType::kFloat64;
    case c10::kHalf: return cuda::DType::kFloat16;
    case c10::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "ofmu: unsupported dtype ", t);  // check_buffer rejects these first
  }
}

void* current_stream(const at::Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}

const void* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr() : nullptr;
}

void check_launch(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, "ofmu.", op, ": CUDA kernel launch failed: ", err);
}

at::Tensor reduce3_cuda(const at::Tensor& x, const std::optional<at::Tensor>& y) {
  check_reduce3(x, y);
  TORCH_CHECK(x.is_cuda(), "ofmu.reduce3: `x` must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t n = x.numel();
  at::Tensor stats = at::empty({3}, x.options().dtype(acc));
  // Per-block partials of the deterministic two-stage reduction (ofmu_kernels.cu).
  at::Tensor work = at::empty({cuda::reduce3_workspace_elems(n)}, x.options().dtype(acc));
  check_launch(cuda::reduce3(kernel_dtype(x.scalar_type()), x.const_data_ptr(), opt_ptr(y), n,
                             work.data_ptr(), stats.data_ptr(), current_stream(x)),
               "reduce3");
  return stats;
}

void combine_cuda(const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& coeffs,
                  const at::Tensor& out_a, const std::optional<at::Tensor>& out_b) {
  check_combine(x, y, coeffs, out_a, out_b);
  TORCH_CHECK(x.is_cuda(), "ofmu.combine: `x` must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(cuda::combine(kernel_dtype(x.scalar_type()), x.const_data_ptr(), opt_ptr(y),
                             coeffs.const_data_ptr(), out_a.data_ptr(),
                             out_b.has_value() ? out_b->data_ptr() : nullptr, x.numel(),
                             current_stream(x)),
               "combine");
}

void update_cuda(const at::Tensor& theta, const at::Tensor& x, const std::optional<at::Tensor>& y,
                 const at::Tensor& coeffs) {
  check_update(theta, x, y, coeffs);
  TORCH_CHECK(theta.is_cuda(), "ofmu.update: `theta` must be a CUDA tensor, got ", theta.device());
  const c10::cuda::CUDAGuard guard(theta.device());
  check_launch(cuda::update(kernel_dtype(theta.scalar_type()), theta.data_ptr(), x.const_data_ptr(),
                            opt_ptr(y), coeffs.const_data_ptr(), theta.numel(),
                            current_stream(theta)),
               "update");
}

at::Tensor finalize_cuda(const at::Tensor& gstats, const at::Tensor& ustats,
                         const at::Tensor& checks, const std::optional<at::Tensor>& ok,
                         bool project, double gamma, double eps, double lr, double weight_decay,
                         std::optional<double> max_norm, std::optional<double> cap) {
  check_finalize(gstats, ustats, checks, ok, cap.has_value());
  TORCH_CHECK(gstats.is_cuda(), "ofmu.finalize: `gstats` must be a CUDA tensor, got ",
              gstats.device());
  const c10::cuda::CUDAGuard guard(gstats.device());
  at::Tensor out = at::empty({kFinalizeLen}, gstats.options());
  const FinalizeArgs a{project, gamma, eps, lr, weight_decay, max_norm.has_value(),
                       cap.has_value(), ok.has_value(), max_norm.value_or(0.0), cap.value_or(0.0)};
  check_launch(cuda::finalize(gstats.scalar_type() == c10::kDouble, gstats.const_data_ptr(),
                              ustats.const_data_ptr(), checks.const_data_ptr(), checks.numel(),
                              opt_ptr(ok), a, out.data_ptr(), current_stream(gstats)),
               "finalize");
  return out;
}

}  // namespace
}  // namespace ofmu

TORCH_LIBRARY_IMPL(ofmu, CUDA, m) {
  m.impl("reduce3", &ofmu::reduce3_cuda);
  m.impl("combine", &ofmu::combine_cuda);
  m.impl("update", &ofmu::update_cuda);
  m.impl("finalize", &ofmu::finalize_cuda);
}
