// The finalize op's math, shared by the CPU kernel (csrc/cpu) and the CUDA kernel (csrc/cuda):
// the summed reduce3 statistics in, the packed coefficients of the step out, on the device.
//
// Torch-free and header-only so that csrc/cuda/ofmu_kernels.cu compiles it with a bare nvcc.
// The formulas, argument by argument, and the output layout are in docs/kernels.md ("The
// finalize op"); the torch reference is ofmu.reference.finalize.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define OFMU_HD __host__ __device__
#else
#define OFMU_HD
#include <cmath>
#endif

namespace ofmu {

// Output layout (ofmu.coefficients.FIN_* names the same slots):
//   [0:4]  update coefficients   decay, lr*scale*alpha, lr*scale*gamma, proceed (0: skip)
//   [4:8]  combine coefficients  alpha, gamma, 0, 0  (u = alpha*x + gamma*y)
//   [8]    clip scale (1 without max_norm)
//   [9]    skipped: 1 when an input was non-finite
//   [10]   capped: 1 when finite but the forget loss was at or above the cap
constexpr int64_t kFinalizeLen = 11;

// The host scalars of one finalize call (from the param group and the mode record).
struct FinalizeArgs {
  bool project;  // gamma *= <x, y> / (|y|^2 (1 + eps) + tiny) (the projection), else fixed
  double gamma, eps, lr, weight_decay;
  bool has_max_norm, has_cap, has_ok;
  double max_norm, cap;  // cap compares against checks[0] (the forget loss)
};

template <typename T>
OFMU_HD inline bool finite_value(T v) {
  return v - v == T(0);  // false for NaN and +-Inf (no fast-math in this build)
}

template <typename T>
OFMU_HD inline T sqrt_value(T v) {
#ifdef __CUDA_ARCH__
  return sqrt(v);
#else
  return std::sqrt(v);
#endif
}

// g: summed reduce3 of the direction's operands (gamma's projection reads it); u: reduce3 of the
// direction's two operands for its norm (clipping); checks: values that must be finite, checks[0]
// the forget loss when has_cap; ok_in: an upstream finite flag (read when has_ok). `tiny` is the
// smallest normal of T (the epsilon convention of ofmu.coefficients).
template <typename T>
OFMU_HD inline void finalize_math(const T* g, const T* u, const T* checks, int64_t n_checks,
                                  const bool* ok_in, const FinalizeArgs& a, T tiny, T* out) {
  bool ok = !a.has_ok || *ok_in;
  for (int i = 0; i < 3; ++i) ok = ok && finite_value(g[i]) && finite_value(u[i]);
  for (int64_t i = 0; i < n_checks; ++i) ok = ok && finite_value(checks[i]);
  const bool below = !a.has_cap || static_cast<double>(checks[0]) < a.cap;
  const T alpha = T(1);
  T gamma = static_cast<T>(a.gamma);
  if (a.project) gamma = gamma * (g[0] / (g[2] * static_cast<T>(1.0 + a.eps) + tiny));
  T scale = T(1);
  if (a.has_max_norm) {
    const T sq = alpha * alpha * u[1] + T(2) * alpha * gamma * u[0] + gamma * gamma * u[2];
    scale = static_cast<T>(a.max_norm) / (sqrt_value(sq) + static_cast<T>(1e-6));
    if (scale > T(1)) scale = T(1);  // NaN stays NaN (then ok is false)
  }
  const double abs_lr = a.lr < 0 ? -a.lr : a.lr;
  const T step = a.has_max_norm ? static_cast<T>(a.lr) * scale : static_cast<T>(a.lr);
  const bool proceed = ok && below;
  out[0] = static_cast<T>(1.0 - abs_lr * a.weight_decay);
  out[1] = alpha * step;
  out[2] = gamma * step;
  out[3] = proceed ? T(1) : T(0);
  out[4] = alpha;
  out[5] = gamma;
  out[6] = T(0);
  out[7] = T(0);
  out[8] = scale;
  out[9] = ok ? T(0) : T(1);
  out[10] = (ok && !below) ? T(1) : T(0);
}

}  // namespace ofmu
