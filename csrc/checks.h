// Argument checks shared by the CPU, CUDA and Meta implementations of the ofmu ops.
//
// Every op of the kernel contract (docs/design.md, "Kernel contract") takes 1-D contiguous buffers of
// one dtype and one device, plus a 4-element `coeffs` tensor in the accumulation dtype
// (float64 for float64 buffers, float32 otherwise). The messages name the offending argument
// so that a user of the optimizer can tell which buffer is wrong. Outputs may be exactly an input
// (the whole buffer) but must not partially overlap one (see check_overlap).
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

// Memory overlap (pointer arithmetic on [data_ptr, data_ptr + nbytes)). The kernels load every
// element of the inputs before storing it, so an output may be exactly an input (same pointer,
// and the lengths and dtypes already match); a view shifted against it would read elements
// another lane has already overwritten. Meta tensors and empty buffers have no memory to compare.
inline bool has_memory(const at::Tensor& t) {
  return !t.is_meta() && t.has_storage() && t.numel() > 0;
}

// 0: disjoint, 1: identical (same start, same length), 2: any other overlap.
inline int overlap_kind(const at::Tensor& a, const at::Tensor& b) {
  if (!has_memory(a) || !has_memory(b)) return 0;
  const char* a0 = static_cast<const char*>(a.const_data_ptr());
  const char* b0 = static_cast<const char*>(b.const_data_ptr());
  const char* a1 = a0 + a.numel() * a.element_size();
  const char* b1 = b0 + b.numel() * b.element_size();
  if (a1 <= b0 || b1 <= a0) return 0;
  return (a0 == b0 && a1 == b1) ? 1 : 2;
}

// An output (`out`) against an input: identical is allowed when `may_alias`, any other overlap
// (and identical when not `may_alias`) is an error naming both arguments.
inline void check_overlap(const at::Tensor& out, const char* out_name, const at::Tensor& other,
                          const char* other_name, const char* op, bool may_alias) {
  const int kind = overlap_kind(out, other);
  if (kind == 0 || (kind == 1 && may_alias)) return;
  TORCH_CHECK(kind != 2, "ofmu.", op, ": `", out_name, "` and `", other_name,
              "` partially overlap in memory (views of one buffer at different offsets); `",
              out_name, "` may be exactly `", other_name, "` (the same buffer) or separate "
              "memory, e.g. `", other_name, ".clone()`");
  TORCH_CHECK(false, "ofmu.", op, ": `", out_name, "` and `", other_name,
              "` are the same memory, which this op does not allow; pass separate buffers");
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
  check_overlap(out_a, "out_a", x, "x", "combine", true);
  if (y.has_value()) check_overlap(out_a, "out_a", *y, "y", "combine", true);
  check_overlap(out_a, "out_a", coeffs, "coeffs", "combine", false);
  if (out_b.has_value()) {
    check_overlap(*out_b, "out_b", x, "x", "combine", true);
    if (y.has_value()) check_overlap(*out_b, "out_b", *y, "y", "combine", true);
    check_overlap(*out_b, "out_b", coeffs, "coeffs", "combine", false);
    check_overlap(out_a, "out_a", *out_b, "out_b", "combine", false);
  }
}

inline void check_update(const at::Tensor& theta, const at::Tensor& x,
                         const std::optional<at::Tensor>& y, const at::Tensor& coeffs) {
  check_buffer(theta, "update", "theta");
  check_same(theta, "theta", x, "update", "x");
  if (y.has_value()) check_same(theta, "theta", *y, "update", "y");
  check_coeffs(theta, "theta", coeffs, "update");
  check_overlap(theta, "theta", x, "x", "update", true);
  if (y.has_value()) check_overlap(theta, "theta", *y, "y", "update", true);
  check_overlap(theta, "theta", coeffs, "coeffs", "update", false);
}

// finalize: statistics and checks of one accumulation dtype (float32/float64) on one device.
inline void check_finalize(const at::Tensor& g, const at::Tensor& u, const at::Tensor& checks,
                           const std::optional<at::Tensor>& ok, bool has_cap) {
  const auto st = g.scalar_type();
  TORCH_CHECK(st == c10::kFloat || st == c10::kDouble,
              "ofmu.finalize: `gstats` must be float32 or float64 (an accumulation dtype), got ", st);
  auto shape = [&](const at::Tensor& t, const char* name, int64_t n) {
    TORCH_CHECK(t.dim() == 1 && (n < 0 || t.numel() == n) && t.is_contiguous(), "ofmu.finalize: `",
                name, "` must be a contiguous 1-D tensor", n < 0 ? "" : " of 3 elements",
                ", got shape ", t.sizes());
    TORCH_CHECK(t.device() == g.device(), "ofmu.finalize: `", name, "` is on ", t.device(),
                " but `gstats` is on ", g.device());
    TORCH_CHECK(t.scalar_type() == st, "ofmu.finalize: `", name, "` has dtype ", t.scalar_type(),
                " but `gstats` has dtype ", st);
  };
  shape(g, "gstats", 3);
  shape(u, "ustats", 3);
  shape(checks, "checks", -1);
  TORCH_CHECK(!has_cap || checks.numel() >= 1,
              "ofmu.finalize: `cap` compares against checks[0] (the forget loss), but `checks` is "
              "empty");
  if (ok.has_value()) {
    TORCH_CHECK(ok->scalar_type() == c10::kBool && ok->numel() == 1,
                "ofmu.finalize: `ok` must be a one-element bool tensor, got ", ok->scalar_type(),
                " of shape ", ok->sizes());
    TORCH_CHECK(ok->device() == g.device(), "ofmu.finalize: `ok` is on ", ok->device(),
                " but `gstats` is on ", g.device());
  }
}

}  // namespace ofmu
