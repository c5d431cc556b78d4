// CPU kernels of the ofmu ops: OpenMP across threads, SIMD-friendly inner loops.
//
// NOTE: [Deterministic CPU reduction]
// reduce3 splits the buffer into fixed blocks of kBlock elements, independent of the thread
// count. Inside a block, an `omp simd` reduction keeps one accumulator per vector lane (so the
// loop vectorises without -ffast-math; the lane count is fixed at compile time); the per-block
// partials are then summed in block order, in double (3 doubles per kBlock elements: 0.6% of an
// fp32 buffer). Threads only decide *who* computes a block, never how the sums are grouped, so
// results are bitwise identical across runs and across torch.set_num_threads().
//
// `#pragma omp` cannot sit inside an AT_DISPATCH lambda, hence the templated functions.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../checks.h"

namespace ofmu {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Rounds an accumulator back to the buffer dtype. For bf16 this is c10's round-to-nearest-even
// (same bits, NaN -> 0x7FC0) written as a select instead of a branch, so the loops vectorise.
template <typename T>
inline T to_buf(acc_t<T> v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 to_buf<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rne = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? UINT32_C(0x7FC0) : rne),
                       c10::BFloat16::from_bits());
}

constexpr int64_t kBlock = 1024;             // elements per reduction partial (fixed)
constexpr int64_t kParallelMin = 1 << 16;    // below this, one thread beats the fork/join

// Sums of one block: out = [<x,y>, <x,x>, <y,y>]. The simd reduction keeps one partial sum per
// vector lane; how many lanes is fixed when the extension is compiled, never at run time.
template <typename T, bool HAS_Y>
inline void block_sums(const T* x, const T* y, int64_t n, double* out) {
  using A = acc_t<T>;
  A sxy = 0, sxx = 0, syy = 0;
#pragma omp simd reduction(+ : sxy, sxx, syy)
  for (int64_t i = 0; i < n; ++i) {
    const A a = static_cast<A>(x[i]);
    sxx += a * a;
    if constexpr (HAS_Y) {
      const A b = static_cast<A>(y[i]);
      sxy += a * b;
      syy += b * b;
    }
  }
  out[0] = static_cast<double>(sxy);
  out[1] = static_cast<double>(sxx);
  out[2] = static_cast<double>(syy);
}

template <typename T, bool HAS_Y>
void reduce3_kernel(const T* x, const T* y, int64_t n, acc_t<T>* stats) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<double> part(static_cast<size_t>(3 * nb));
  double* p = part.data();
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * kBlock;
    const int64_t len = std::min(kBlock, n - lo);
    block_sums<T, HAS_Y>(x + lo, HAS_Y ? y + lo : nullptr, len, p + 3 * b);
  }
  double s[3] = {0.0, 0.0, 0.0};
  for (int64_t b = 0; b < nb; ++b)  // fixed block order (see NOTE above)
    for (int k = 0; k < 3; ++k) s[k] += p[3 * b + k];
  for (int k = 0; k < 3; ++k) stats[k] = static_cast<acc_t<T>>(s[k]);
}

// out_a = c0*x + c1*y, out_b = c2*x + c3*y. Loads precede stores per element, so out_a/out_b may
// alias x or y (the whole buffer, as the contract allows). With y absent the reference multiplies
// c1 and c3 by zeros; z1/z3 keep that exactly (a non-finite c1 still poisons out_a).
template <typename T, bool HAS_Y, bool HAS_B>
void combine_kernel(const T* x, const T* y, const acc_t<T>* c, T* out_a, T* out_b, int64_t n) {
  using A = acc_t<T>;
  const A c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  const A z1 = c1 * A(0), z3 = c3 * A(0);
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const A a = static_cast<A>(x[i]);
    const A b = HAS_Y ? static_cast<A>(y[i]) : A(0);
    const A ra = c0 * a + (HAS_Y ? c1 * b : z1);
    A rb = A(0);
    if constexpr (HAS_B) rb = c2 * a + (HAS_Y ? c3 * b : z3);
    out_a[i] = to_buf<T>(ra);
    if constexpr (HAS_B) out_b[i] = to_buf<T>(rb);
  }
}

// theta = (c0*theta + c1*x) + c2*y, computed in the accumulation dtype and rounded once.
template <typename T, bool HAS_Y>
void update_kernel(T* theta, const T* x, const T* y, const acc_t<T>* c, int64_t n) {
  using A = acc_t<T>;
  const A c0 = c[0], c1 = c[1], c2 = c[2];
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    A r = c0 * static_cast<A>(theta[i]) + c1 * static_cast<A>(x[i]);
    if constexpr (HAS_Y) r = r + c2 * static_cast<A>(y[i]);
    theta[i] = to_buf<T>(r);
  }
}

at::Tensor reduce3_cpu(const at::Tensor& x, const std::optional<at::Tensor>& y) {
  check_reduce3(x, y);
  at::Tensor stats = at::empty({3}, x.options().dtype(acc_dtype(x.scalar_type())));
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ofmu.reduce3", [&] {
    auto* s = stats.data_ptr<acc_t<scalar_t>>();
    const auto* xp = x.const_data_ptr<scalar_t>();
    if (y.has_value())
      reduce3_kernel<scalar_t, true>(xp, y->const_data_ptr<scalar_t>(), n, s);
    else
      reduce3_kernel<scalar_t, false>(xp, nullptr, n, s);
  });
  return stats;
}

void combine_cpu(const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& coeffs,
                 const at::Tensor& out_a, const std::optional<at::Tensor>& out_b) {
  check_combine(x, y, coeffs, out_a, out_b);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ofmu.combine", [&] {
    const auto* c = coeffs.const_data_ptr<acc_t<scalar_t>>();
    const auto* xp = x.const_data_ptr<scalar_t>();
    const auto* yp = y.has_value() ? y->const_data_ptr<scalar_t>() : nullptr;
    auto* ap = out_a.data_ptr<scalar_t>();
    auto* bp = out_b.has_value() ? out_b->data_ptr<scalar_t>() : nullptr;
    if (yp && bp) combine_kernel<scalar_t, true, true>(xp, yp, c, ap, bp, n);
    else if (yp) combine_kernel<scalar_t, true, false>(xp, yp, c, ap, bp, n);
    else if (bp) combine_kernel<scalar_t, false, true>(xp, yp, c, ap, bp, n);
    else combine_kernel<scalar_t, false, false>(xp, yp, c, ap, bp, n);
  });
}

void update_cpu(const at::Tensor& theta, const at::Tensor& x, const std::optional<at::Tensor>& y,
                const at::Tensor& coeffs) {
  check_update(theta, x, y, coeffs);
  const int64_t n = theta.numel();
  const auto dtype = theta.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ofmu.update", [&] {
    const auto* c = coeffs.const_data_ptr<acc_t<scalar_t>>();
    if (c[3] == 0) return;  // the non-finite flag: theta is not even rewritten
    auto* tp = theta.data_ptr<scalar_t>();
    const auto* xp = x.const_data_ptr<scalar_t>();
    if (y.has_value())
      update_kernel<scalar_t, true>(tp, xp, y->const_data_ptr<scalar_t>(), c, n);
    else
      update_kernel<scalar_t, false>(tp, xp, nullptr, c, n);
  });
}

}  // namespace
}  // namespace ofmu

TORCH_LIBRARY_IMPL(ofmu, CPU, m) {
  m.impl("reduce3", &ofmu::reduce3_cpu);
  m.impl("combine", &ofmu::combine_cpu);
  m.impl("update", &ofmu::update_cpu);
}
