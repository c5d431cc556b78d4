// Argument checks shared by the CPU, CUDA and Meta implementations of the ofmu ops.
//
// Every op of the kernel contract (python/ofmu/functional.py) takes 1-D contiguous buffers of
// one dtype and one device, plus a 4-element `coeffs` tensor in the accumulation dtype
// (float64 for float64 buffers, float32 otherwise). The messages name the offending argument
// so that a user of the optimizer can tell which buffer is wrong.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace ofmu {

// Accumulation dtype of a buffer: float64 stays float64, everything else accumulates in fp32.
inline c10::ScalarType acc_dtype(c10::ScalarType t) {
  return t == c10::kDouble ? c10::kDouble : c10::kFloat;
}

inline void check_buffer(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == c10::kFloat || st == c10::kDouble || st == c10::kHalf || st == c10::kBFloat16,
              "ofmu.", op, ": `", name, "` must be float32, float64, float16 or bfloat16, got ",
              st);
  TORCH_CHECK(t.dim() == 1, "ofmu.", op, ": `", name, "` must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "ofmu.", op, ": `", name, "` must be contiguous");
}

// `other` must match the reference buffer `ref` (named `ref_name`) in dtype, device and length.
inline void check_same(const at::Tensor& ref, const char* ref_name, const at::Tensor& other,
                       const char* op, const char* name) {
  check_buffer(other, op, name);
  TORCH_CHECK(other.device() == ref.device(), "ofmu.", op, ": `", name, "` is on ", other.device(),
              " but `", ref_name, "` is on ", ref.device());
  TORCH_CHECK(other.scalar_type() == ref.scalar_type(), "ofmu.", op, ": `", name, "` has dtype ",
              other.scalar_type(), " but `", ref_name, "` has dtype ", ref.scalar_type());
  TORCH_CHECK(other.numel() == ref.numel(), "ofmu.", op, ": `", name, "` has ", other.numel(),
              " elements but `", ref_name, "` has ", ref.numel());
}

inline void check_coeffs(const at::Tensor& ref, const char* ref_name, const at::Tensor& coeffs,
                         const char* op) {
  const auto acc = acc_dtype(ref.scalar_type());
  TORCH_CHECK(coeffs.scalar_type() == acc, "ofmu.", op, ": `coeffs` must have dtype ", acc,
              " (the accumulation dtype of ", ref.scalar_type(), " buffers), got ",
              coeffs.scalar_type());
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.numel() == 4, "ofmu.", op,
              ": `coeffs` must be a 1-D tensor of 4 elements, got shape ", coeffs.sizes());
  TORCH_CHECK(coeffs.is_contiguous(), "ofmu.", op, ": `coeffs` must be contiguous");
  TORCH_CHECK(coeffs.device() == ref.device(), "ofmu.", op, ": `coeffs` is on ", coeffs.device(),
              " but `", ref_name, "` is on ", ref.device());
}

inline void check_reduce3(const at::Tensor& x, const std::optional<at::Tensor>& y) {
  check_buffer(x, "reduce3", "x");
  if (y.has_value()) check_same(x, "x", *y, "reduce3", "y");
}

inline void check_combine(const at::Tensor& x, const std::optional<at::Tensor>& y,
                          const at::Tensor& coeffs, const at::Tensor& out_a,
                          const std::optional<at::Tensor>& out_b) {
  check_buffer(x, "combine", "x");
  if (y.has_value()) check_same(x, "x", *y, "combine", "y");
  check_same(x, "x", out_a, "combine", "out_a");
  if (out_b.has_value()) check_same(x, "x", *out_b, "combine", "out_b");
  check_coeffs(x, "x", coeffs, "combine");
}

inline void check_update(const at::Tensor& theta, const at::Tensor& x,
                         const std::optional<at::Tensor>& y, const at::Tensor& coeffs) {
  check_buffer(theta, "update", "theta");
  check_same(theta, "theta", x, "update", "x");
  if (y.has_value()) check_same(theta, "theta", *y, "update", "y");
  check_coeffs(theta, "theta", coeffs, "update");
}

}  // namespace ofmu
