// CUDA kernels of the ofmu ops. Torch-free: see ofmu_kernels.cuh.
//
// NOTE: [Vector loads and 64-bit indexing]
// Each thread moves 16-byte packs (4 fp32, 2 fp64, 8 fp16/bf16) when every pointer of the call
// is 16-byte aligned (OFMU's flat buffers are: each is a whole allocation, padded to 64
// elements, ofmu/flat.py), else single elements.
// The n % pack elements past the last whole pack form a scalar tail. All indices are int64_t:
// buffers of more than 2^31 elements are normal for LLM flat buffers.
//
// NOTE: [Deterministic two-stage reduction]
// reduce3 launches a grid whose size depends only on n and the pack width; every block writes
// its three partial sums (fixed-shape shared-memory/warp-shuffle tree) to a workspace, then a
// single-block finalize kernel sums the partials in a fixed order. No atomics touch the result,
// so the same buffers give bitwise identical stats on every run on the same GPU model.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../finalize.h"
#include "ofmu_kernels.cuh"

namespace ofmu {
namespace cuda {
namespace {

constexpr int kThreads = 256;            // threads per block, every kernel
constexpr int64_t kReduceBlocks = 1024;  // cap on reduce3 partials (~ two waves on H100/H200)
constexpr int64_t kElemBlocks = 4096;    // cap on the grid of the elementwise kernels

template <typename T>
using acc_t = std::conditional_t<std::is_same<T, double>::value, double, float>;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements moved as one 16-byte (or, for N == 1, one-element) memory transaction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, bool VEC>
__host__ __device__ constexpr int pack_width() {
  return VEC ? 16 / static_cast<int>(sizeof(T)) : 1;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Fixed-shape block sum of three values; the result is valid in thread 0.
template <typename A>
__device__ __forceinline__ void block_sum3(A& a, A& b, A& c) {
  __shared__ A sh[3][kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  c = warp_sum(c);
  if (lane == 0) {
    sh[0][warp] = a;
    sh[1][warp] = b;
    sh[2][warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    const bool live = lane < kThreads / 32;
    a = warp_sum(live ? sh[0][lane] : A(0));
    b = warp_sum(live ? sh[1][lane] : A(0));
    c = warp_sum(live ? sh[2][lane] : A(0));
  }
}

template <typename T, bool HAS_Y, bool VEC>
__global__ void __launch_bounds__(kThreads)
    reduce3_partials_kernel(const T* x, const T* y, int64_t n, acc_t<T>* part) {
  using A = acc_t<T>;
  constexpr int N = pack_width<T, VEC>();
  A sxy = 0, sxx = 0, syy = 0;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t npacks = n / N;
  for (int64_t p = tid; p < npacks; p += stride) {
    const Pack<T, N> px = reinterpret_cast<const Pack<T, N>*>(x)[p];
    Pack<T, N> py;
    if (HAS_Y) py = reinterpret_cast<const Pack<T, N>*>(y)[p];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A a = to_acc(px.v[k]);
      sxx += a * a;
      if (HAS_Y) {
        const A b = to_acc(py.v[k]);
        sxy += a * b;
        syy += b * b;
      }
    }
  }
  const int64_t t = npacks * N + tid;  // scalar tail: fewer than N elements
  if (t < n) {
    const A a = to_acc(x[t]);
    sxx += a * a;
    if (HAS_Y) {
      const A b = to_acc(y[t]);
      sxy += a * b;
      syy += b * b;
    }
  }
  block_sum3(sxy, sxx, syy);
  if (threadIdx.x == 0) {
    part[3 * blockIdx.x + 0] = sxy;
    part[3 * blockIdx.x + 1] = sxx;
    part[3 * blockIdx.x + 2] = syy;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    reduce3_finalize_kernel(const A* part, int64_t nparts, A* stats) {
  A s0 = 0, s1 = 0, s2 = 0;
  for (int64_t i = threadIdx.x; i < nparts; i += kThreads) {  // fixed order per thread
    s0 += part[3 * i + 0];
    s1 += part[3 * i + 1];
    s2 += part[3 * i + 2];
  }
  block_sum3(s0, s1, s2);
  if (threadIdx.x == 0) {
    stats[0] = s0;
    stats[1] = s1;
    stats[2] = s2;
  }
}

// Pointers are deliberately not __restrict__: out_a/out_b may alias x or y. Each pack is loaded
// in full before anything is stored, so whole-buffer aliasing is safe.
template <typename T, bool HAS_Y, bool HAS_B, bool VEC>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const T* x, const T* y, const acc_t<T>* coeffs, T* out_a, T* out_b, int64_t n) {
  using A = acc_t<T>;
  constexpr int N = pack_width<T, VEC>();
  const A c0 = coeffs[0], c1 = coeffs[1], c2 = coeffs[2], c3 = coeffs[3];
  // Without y the reference multiplies c1 and c3 by zeros: keep that (a non-finite c1 poisons).
  const A z1 = c1 * A(0), z3 = c3 * A(0);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t npacks = n / N;
  for (int64_t p = tid; p < npacks; p += stride) {
    const Pack<T, N> px = reinterpret_cast<const Pack<T, N>*>(x)[p];
    Pack<T, N> py;
    if (HAS_Y) py = reinterpret_cast<const Pack<T, N>*>(y)[p];
    Pack<T, N> ra, rb;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A a = to_acc(px.v[k]);
      const A b = HAS_Y ? to_acc(py.v[k]) : A(0);
      ra.v[k] = from_acc<T>(c0 * a + (HAS_Y ? c1 * b : z1));
      if (HAS_B) rb.v[k] = from_acc<T>(c2 * a + (HAS_Y ? c3 * b : z3));
    }
    reinterpret_cast<Pack<T, N>*>(out_a)[p] = ra;
    if (HAS_B) reinterpret_cast<Pack<T, N>*>(out_b)[p] = rb;
  }
  const int64_t t = npacks * N + tid;
  if (t < n) {
    const A a = to_acc(x[t]);
    const A b = HAS_Y ? to_acc(y[t]) : A(0);
    const A ra = c0 * a + (HAS_Y ? c1 * b : z1);
    const A rb = c2 * a + (HAS_Y ? c3 * b : z3);
    out_a[t] = from_acc<T>(ra);
    if (HAS_B) out_b[t] = from_acc<T>(rb);
  }
}

template <typename T, bool HAS_Y, bool VEC>
__global__ void __launch_bounds__(kThreads)
    update_kernel(T* theta, const T* x, const T* y, const acc_t<T>* coeffs, int64_t n) {
  using A = acc_t<T>;
  constexpr int N = pack_width<T, VEC>();
  // The non-finite flag is read here, on the device: the host never syncs on it, and a skipped
  // step does not even rewrite theta.
  if (coeffs[3] == A(0)) return;
  const A c0 = coeffs[0], c1 = coeffs[1], c2 = coeffs[2];
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t npacks = n / N;
  for (int64_t p = tid; p < npacks; p += stride) {
    Pack<T, N> pt = reinterpret_cast<const Pack<T, N>*>(theta)[p];
    const Pack<T, N> px = reinterpret_cast<const Pack<T, N>*>(x)[p];
    Pack<T, N> py;
    if (HAS_Y) py = reinterpret_cast<const Pack<T, N>*>(y)[p];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      A r = c0 * to_acc(pt.v[k]) + c1 * to_acc(px.v[k]);
      if (HAS_Y) r = r + c2 * to_acc(py.v[k]);
      pt.v[k] = from_acc<T>(r);
    }
    reinterpret_cast<Pack<T, N>*>(theta)[p] = pt;
  }
  const int64_t t = npacks * N + tid;
  if (t < n) {
    A r = c0 * to_acc(theta[t]) + c1 * to_acc(x[t]);
    if (HAS_Y) r = r + c2 * to_acc(y[t]);
    theta[t] = from_acc<T>(r);
  }
}

// ------------------------------------------------------------------------------------------
// Host side: dtype / alignment dispatch and grid sizes.
// ------------------------------------------------------------------------------------------

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(static_cast<float*>(nullptr)); break;
    case DType::kFloat64: f(static_cast<double*>(nullptr)); break;
    case DType::kFloat16: f(static_cast<__half*>(nullptr)); break;
    case DType::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
  }
}

inline bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

inline const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Grid of a kernel that gives one pack to each thread (capped, grid-stride beyond the cap);
// at least one block so that the scalar tail of a tiny buffer is covered.
inline unsigned grid_for(int64_t n, int pack, int64_t cap) {
  const int64_t npacks = n / pack;
  int64_t blocks = (npacks + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned>(blocks);
}

// One thread: a handful of scalar operations, launched in place of ~40 tiny torch ops.
template <typename A>
__global__ void finalize_kernel(const A* g, const A* u, const A* checks, int64_t n_checks,
                                const bool* ok, FinalizeArgs args, A tiny, A* out) {
  finalize_math<A>(g, u, checks, n_checks, ok, args, tiny, out);
}

}  // namespace

int64_t reduce3_workspace_elems(int64_t n) {
  return 3 * (n > 0 ? static_cast<int64_t>(grid_for(n, 1, kReduceBlocks)) : 1);
}

const char* reduce3(DType dtype, const void* x, const void* y, int64_t n, void* workspace,
                    void* stats, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool vec = aligned16(x) && aligned16(y);
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    const T* xp = static_cast<const T*>(x);
    const T* yp = static_cast<const T*>(y);
    A* part = static_cast<A*>(workspace);
    int64_t blocks = 0;
    if (n > 0) {
      // The grid depends only on n and the pack width (NOTE: [Deterministic two-stage reduction]);
      // it never exceeds grid_for(n, 1, ...), the size reduce3_workspace_elems reserves.
      const int pack = vec ? pack_width<T, true>() : 1;
      blocks = grid_for(n, pack, kReduceBlocks);
      const unsigned g = static_cast<unsigned>(blocks);
      if (vec && yp) reduce3_partials_kernel<T, true, true><<<g, kThreads, 0, s>>>(xp, yp, n, part);
      else if (vec) reduce3_partials_kernel<T, false, true><<<g, kThreads, 0, s>>>(xp, yp, n, part);
      else if (yp) reduce3_partials_kernel<T, true, false><<<g, kThreads, 0, s>>>(xp, yp, n, part);
      else reduce3_partials_kernel<T, false, false><<<g, kThreads, 0, s>>>(xp, yp, n, part);
    }
    reduce3_finalize_kernel<A><<<1, kThreads, 0, s>>>(part, blocks, static_cast<A*>(stats));
  });
  return last_error();
}

const char* combine(DType dtype, const void* x, const void* y, const void* coeffs, void* out_a,
                    void* out_b, int64_t n, void* stream) {
  if (n == 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool vec = aligned16(x) && aligned16(y) && aligned16(out_a) && aligned16(out_b);
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    const T* xp = static_cast<const T*>(x);
    const T* yp = static_cast<const T*>(y);
    const A* c = static_cast<const A*>(coeffs);
    T* ap = static_cast<T*>(out_a);
    T* bp = static_cast<T*>(out_b);
    const unsigned g = grid_for(n, vec ? pack_width<T, true>() : 1, kElemBlocks);
    const int sel = (yp ? 1 : 0) | (bp ? 2 : 0);
#define OFMU_COMBINE(HY, HB)                                                                  \
  (vec ? combine_kernel<T, HY, HB, true><<<g, kThreads, 0, s>>>(xp, yp, c, ap, bp, n)         \
       : combine_kernel<T, HY, HB, false><<<g, kThreads, 0, s>>>(xp, yp, c, ap, bp, n))
    switch (sel) {
      case 0: OFMU_COMBINE(false, false); break;
      case 1: OFMU_COMBINE(true, false); break;
      case 2: OFMU_COMBINE(false, true); break;
      default: OFMU_COMBINE(true, true); break;
    }
#undef OFMU_COMBINE
  });
  return last_error();
}

const char* update(DType dtype, void* theta, const void* x, const void* y, const void* coeffs,
                   int64_t n, void* stream) {
  if (n == 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool vec = aligned16(theta) && aligned16(x) && aligned16(y);
  dispatch_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using A = acc_t<T>;
    T* tp = static_cast<T*>(theta);
    const T* xp = static_cast<const T*>(x);
    const T* yp = static_cast<const T*>(y);
    const A* c = static_cast<const A*>(coeffs);
    const unsigned g = grid_for(n, vec ? pack_width<T, true>() : 1, kElemBlocks);
    if (vec && yp) update_kernel<T, true, true><<<g, kThreads, 0, s>>>(tp, xp, yp, c, n);
    else if (vec) update_kernel<T, false, true><<<g, kThreads, 0, s>>>(tp, xp, yp, c, n);
    else if (yp) update_kernel<T, true, false><<<g, kThreads, 0, s>>>(tp, xp, yp, c, n);
    else update_kernel<T, false, false><<<g, kThreads, 0, s>>>(tp, xp, yp, c, n);
  });
  return last_error();
}

const char* finalize(bool float64, const void* gstats, const void* ustats, const void* checks,
                     int64_t n_checks, const void* ok, const FinalizeArgs& args, void* out,
                     void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool* okp = static_cast<const bool*>(ok);
  if (float64) {
    finalize_kernel<double><<<1, 1, 0, s>>>(
        static_cast<const double*>(gstats), static_cast<const double*>(ustats),
        static_cast<const double*>(checks), n_checks, okp, args, 2.2250738585072014e-308,
        static_cast<double*>(out));
  } else {
    finalize_kernel<float><<<1, 1, 0, s>>>(
        static_cast<const float*>(gstats), static_cast<const float*>(ustats),
        static_cast<const float*>(checks), n_checks, okp, args, 1.17549435e-38f,
        static_cast<float*>(out));
  }
  return last_error();
}

}  // namespace cuda
}  // namespace ofmu
