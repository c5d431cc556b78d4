// CPU kernels of the ofmu ops: OpenMP across threads, SIMD-friendly inner loops.
//
// NOTE: [Deterministic CPU reduction]
// reduce3 splits the buffer into fixed blocks of kBlock elements, independent of the thread
// count. Inside a block, fp32/fp64/bf16 are summed in a fixed number of explicit lanes (NOTE:
// [Reduction lanes]; the grouping does not depend on the instruction set), fp16 sequentially;
// the per-block partials are then summed in block order, in double (3 doubles per kBlock
// elements: 0.6% of an fp32 buffer). Threads only decide *who* computes a block, never how the
// sums are grouped, so results are bitwise identical across runs, across
// torch.set_num_threads() and between the portable and the AVX2 code.
//
// With one thread (torch.set_num_threads(1)) no OpenMP parallel region is opened at all
// (parallel_ranges); `#pragma omp` cannot sit inside an AT_DISPATCH lambda, hence the templated
// functions.
//
// NOTE: [16-bit fast path]
// The loops below are compiled for baseline x86-64 (SSE2) so that the extension runs on any
// x86-64 CPU. For fp16 that means c10's software half<->float conversion (no F16C), for bf16 and
// fp32 4-lane SSE2 arithmetic. Every dtype therefore gets a second implementation in namespace
// `avx2` (functions marked `target("avx2,f16c")`, not a global -mavx2: AVX2 + F16C intrinsics
// for bf16/fp16 and for reduce3, the portable elementwise loops recompiled for AVX2 for
// fp32/fp64), chosen at run time by `isa_for<T>()` — the one place of the dispatch, which also
// picks the AVX-512 kernels where the CPU has them (NOTE: [AVX-512 path]). It computes
// exactly what the portable loops compute, bit for bit:
//   * the same IEEE operations in the same order per element (no FMA: `fma` is deliberately not
//     in the target list, so the compiler cannot contract a*b + c);
//   * conversions identical to c10's: bf16 loads are a shift, bf16 stores the round-to-nearest-
//     even of `to_buf` (NaN -> 0x7FC0); fp16 loads are F16C's exact widening (NaN payloads kept
//     and quieted, like c10's software path), fp16 stores F16C's round-to-nearest-even with NaN
//     mapped to sign|0x7E00 as c10 does (F16C would keep part of the payload);
//   * reduce3 with the portable code's grouping (explicit lanes for fp32/fp64/bf16, see
//     avx2::block_sums; one sequential sum per block for fp16, see avx2::block_sums8), plus a
//     software prefetch (NOTE: [Prefetch]).
// OFMU_CPU_PORTABLE=1 in the environment, or torch.ops.ofmu._cpu_fast_path(False), forces the
// portable loops (tests compare the two, every dtype).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <omp.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../finalize.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define OFMU_HAS_AVX2_PATH 1
#include <immintrin.h>
// AVX-512F, and the AVX2/F16C that every AVX-512F CPU has (NOTE: [AVX-512 path]); no "fma".
#define OFMU_AVX512 __attribute__((target("avx512f,avx2,f16c")))
#include "avx512_kernels.h"
#endif

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
constexpr int64_t kChunk = 1 << 14;          // elementwise work per task (a multiple of 16)
constexpr int64_t kBlocksPerTask = 16;       // reduce3 blocks per task

// NOTE: [Prefetch]
// One core streaming from memory is limited by how many cache-line misses it keeps in flight;
// the hardware prefetchers stop at 4 KB page boundaries, where reduce3's 1024-element blocks
// (4 KB of fp32) also end. A software prefetch of every line kPrefetchBytes ahead keeps the
// misses flowing across pages: reduce3 (fp32) went from 11.4 to 14-15 GB/s at 2^24-2^26
// elements on an Intel Xeon (1 thread; torch.compile's reduction: 12.1-12.7 GB/s); 256 B to 4 KB
// ahead all helped, 2 KB was best for fp32 and bf16. In update (3 read streams, 1 write) the
// same prefetch took bf16 from 14 to 19 GB/s and fp32 from 19.7 to 20.8 GB/s at 2^26
// (torch.compile's update: 15 and 20 GB/s). A prefetch changes no result. (Tried and dropped:
// visiting reduce3's blocks last-first so that update starts on data still in cache: ~10%
// slower reduce3, as the hardware prefetchers do not follow a descending sequence of pages.)
constexpr int64_t kPrefetchBytes = 2048;

#define OFMU_INLINE inline __attribute__((always_inline))

// A hint for the cache line kPrefetchBytes past p, for reading (RW = 0) or writing (RW = 1).
// The address is computed as an integer: near the end of a buffer it points past the
// allocation, which a prefetch tolerates (it never faults) but C++ pointer arithmetic does not.
template <int RW>
OFMU_INLINE void prefetch_ahead(const void* p) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes),
                     RW, 3);
}

// Runs f(lo, hi) over [0, n) in pieces of `chunk` across the OpenMP threads; with one thread
// (or a small n) one call covers everything and no parallel region is opened at all.
template <typename F>
void parallel_ranges(int64_t n, int64_t chunk, int64_t work, const F& f) {
  const int64_t nc = (n + chunk - 1) / chunk;
  if (nc <= 1 || work < kParallelMin || omp_get_max_threads() == 1) {
    if (n > 0) f(0, n);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nc; ++c) f(c * chunk, std::min(n, (c + 1) * chunk));
}

// NOTE: [Reduction lanes]
// fp32, fp64 and bf16 blocks are summed in kLanes explicit lanes: lane l accumulates the
// elements i = l (mod kLanes) of the block in order, and the lanes are then added in order
// l = 0, 1, ... . The grouping is written out, not left to the vectoriser, so the portable loops
// (any CPU) and the AVX2 kernels (avx2::block_sums: 16 fp32 lanes are 2 registers per sum, so
// two independent add chains per statistic keep the loop well ahead of memory) give the same
// bits. The AVX2 code runs the last n % kLanes elements through a zero-padded copy: adding +0
// to a lane changes nothing (a lane starts at +0 and cannot become -0).
template <typename A>
constexpr int kLanes = std::is_same_v<A, double> ? 8 : 16;

template <typename T, bool HAS_Y>
OFMU_INLINE void block_sums_lanes(const T* x, const T* y, int64_t n, double* out) {
  using A = acc_t<T>;
  constexpr int L = kLanes<A>;
  A sxy[L] = {}, sxx[L] = {}, syy[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) {
      const A a = static_cast<A>(x[i + l]);
      sxx[l] += a * a;
      if constexpr (HAS_Y) {
        const A b = static_cast<A>(y[i + l]);
        sxy[l] += a * b;
        syy[l] += b * b;
      }
    }
  }
  for (int l = 0; i + l < n; ++l) {
    const A a = static_cast<A>(x[i + l]);
    sxx[l] += a * a;
    if constexpr (HAS_Y) {
      const A b = static_cast<A>(y[i + l]);
      sxy[l] += a * b;
      syy[l] += b * b;
    }
  }
  A rxy = sxy[0], rxx = sxx[0], ryy = syy[0];
  for (int l = 1; l < L; ++l) {
    rxy += sxy[l];
    rxx += sxx[l];
    ryy += syy[l];
  }
  out[0] = static_cast<double>(rxy);
  out[1] = static_cast<double>(rxx);
  out[2] = static_cast<double>(ryy);
}

// fp16 blocks: one sequential sum per block (c10's branchy software conversion keeps the
// compiler from vectorising this loop; avx2::block_sums8 reproduces it bit for bit).
template <bool HAS_Y>
inline void block_sums_seq(const c10::Half* x, const c10::Half* y, int64_t n, double* out) {
  float sxy = 0, sxx = 0, syy = 0;
#pragma omp simd reduction(+ : sxy, sxx, syy)
  for (int64_t i = 0; i < n; ++i) {
    const float a = static_cast<float>(x[i]);
    sxx += a * a;
    if constexpr (HAS_Y) {
      const float b = static_cast<float>(y[i]);
      sxy += a * b;
      syy += b * b;
    }
  }
  out[0] = static_cast<double>(sxy);
  out[1] = static_cast<double>(sxx);
  out[2] = static_cast<double>(syy);
}

// Partials of blocks [b_lo, b_hi) (3 doubles each, see NOTE: [Deterministic CPU reduction]).
template <typename T, bool HAS_Y>
OFMU_INLINE void partials_range(const T* x, const T* y, int64_t n, int64_t b_lo, int64_t b_hi,
                                double* p) {
  for (int64_t b = b_lo; b < b_hi; ++b) {
    const int64_t lo = b * kBlock;
    const int64_t len = std::min(kBlock, n - lo);
    if constexpr (std::is_same_v<T, c10::Half>)
      block_sums_seq<HAS_Y>(x + lo, HAS_Y ? y + lo : nullptr, len, p + 3 * b);
    else
      block_sums_lanes<T, HAS_Y>(x + lo, HAS_Y ? y + lo : nullptr, len, p + 3 * b);
  }
}

// out_a = c0*x + c1*y, out_b = c2*x + c3*y on [lo, hi). Loads precede stores per element, so
// out_a/out_b may be x or y (the whole buffer, as the contract allows). With y absent the
// reference multiplies c1 and c3 by zeros; z1/z3 keep that exactly (a non-finite c1 still
// poisons out_a).
template <typename T, bool HAS_Y, bool HAS_B>
OFMU_INLINE void combine_range_portable(const T* x, const T* y, const acc_t<T>* c, T* out_a,
                                        T* out_b, int64_t lo, int64_t hi) {
  using A = acc_t<T>;
  const A c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  const A z1 = c1 * A(0), z3 = c3 * A(0);
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    const A a = static_cast<A>(x[i]);
    const A b = HAS_Y ? static_cast<A>(y[i]) : A(0);
    const A ra = c0 * a + (HAS_Y ? c1 * b : z1);
    A rb = A(0);
    if constexpr (HAS_B) rb = c2 * a + (HAS_Y ? c3 * b : z3);
    out_a[i] = to_buf<T>(ra);
    if constexpr (HAS_B) out_b[i] = to_buf<T>(rb);
  }
}

// theta = (c0*theta + c1*x) + c2*y on [lo, hi), in the accumulation dtype, rounded once.
template <typename T, bool HAS_Y>
OFMU_INLINE void update_range_portable(T* theta, const T* x, const T* y, const acc_t<T>* c,
                                       int64_t lo, int64_t hi) {
  using A = acc_t<T>;
  const A c0 = c[0], c1 = c[1], c2 = c[2];
  // Runs of 256 B per stream, each line of them prefetched kPrefetchBytes ahead (NOTE: [Prefetch]).
  {
    constexpr int64_t step = 256 / sizeof(T), line = 64 / sizeof(T);
    int64_t j = lo;
    for (; j + step <= hi; j += step) {
      for (int64_t q = 0; q < step; q += line) {
        prefetch_ahead<1>(theta + j + q);
        prefetch_ahead<0>(x + j + q);
        if constexpr (HAS_Y) prefetch_ahead<0>(y + j + q);
      }
#pragma omp simd
      for (int64_t i = j; i < j + step; ++i) {
        A r = c0 * static_cast<A>(theta[i]) + c1 * static_cast<A>(x[i]);
        if constexpr (HAS_Y) r = r + c2 * static_cast<A>(y[i]);
        theta[i] = to_buf<T>(r);
      }
    }
    lo = j;
  }
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    A r = c0 * static_cast<A>(theta[i]) + c1 * static_cast<A>(x[i]);
    if constexpr (HAS_Y) r = r + c2 * static_cast<A>(y[i]);
    theta[i] = to_buf<T>(r);
  }
}

// ------------------------------------------------------------------------------------------
// 16-bit fast path (NOTE: [16-bit fast path]) and its dispatch.
// ------------------------------------------------------------------------------------------

template <typename T>
constexpr bool is16 = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

#ifdef OFMU_HAS_AVX2_PATH
static_assert(avx512::kBlock == kBlock && avx512::kPrefetchBytes == kPrefetchBytes);
static_assert(sizeof(c10::BFloat16) == 2 && sizeof(c10::Half) == 2);

// The buffer dtype as avx512_kernels.h names it; its 16-bit buffers are passed as uint16_t,
// which that header only touches through intrinsics and memcpy.
template <typename T>
constexpr avx512::Fmt fmt_of = std::is_same_v<T, c10::BFloat16> ? avx512::Fmt::bf16
                               : std::is_same_v<T, c10::Half>   ? avx512::Fmt::f16
                                                                : avx512::Fmt::f32;
template <avx512::Fmt F, typename T>
inline auto as_elem(T* p) {
  using E = avx512::elem_t<F>;
  if constexpr (std::is_const_v<T>)
    return reinterpret_cast<const E*>(p);
  else
    return reinterpret_cast<E*>(p);
}
#endif

// NOTE: [AVX-512 path]
// Three instruction sets, best first: `avx512` (csrc/cpu/avx512_kernels.h: fp32, bf16 and fp16
// in 512-bit registers; fp64 buffers keep the avx2 kernels), `avx2` (namespace avx2 below) and
// `portable`. The best the CPU supports is taken at load time (__builtin_cpu_supports, which
// also checks that the OS saves the wider registers); OFMU_CPU_ISA=portable|avx2|avx512 in the
// environment asks for a given one (refused, naming the variable, where the CPU lacks it), the
// older OFMU_CPU_PORTABLE=1 for the portable loops, and torch.ops.ofmu._cpu_isa(name) switches
// at run time (tests). Every path gives the portable loops' bits.
enum class Isa : int { portable = 0, avx2 = 1, avx512 = 2 };
constexpr const char* kIsaNames[] = {"portable", "avx2", "avx512"};

Isa best_isa() {
#ifdef OFMU_HAS_AVX2_PATH
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c")) return Isa::portable;
  return __builtin_cpu_supports("avx512f") ? Isa::avx512 : Isa::avx2;
#else
  return Isa::portable;
#endif
}

// `name` as an Isa this CPU supports; `what` names where it came from in the error.
Isa parse_isa(const std::string& name, const std::string& what) {
  for (int k = 0; k < 3; ++k) {
    if (name != kIsaNames[k]) continue;
    const Isa isa = static_cast<Isa>(k);
    TORCH_CHECK(isa <= best_isa(), what, "=", name, ": this CPU (or build) supports at most ",
                kIsaNames[static_cast<int>(best_isa())]);
    return isa;
  }
  TORCH_CHECK(false, what, "=", name, ": expected one of portable, avx2, avx512");
}

Isa isa_from_env() {
  const char* isa = std::getenv("OFMU_CPU_ISA");
  if (isa != nullptr && *isa != '\0') return parse_isa(isa, "OFMU_CPU_ISA");
  const char* env = std::getenv("OFMU_CPU_PORTABLE");
  const bool portable = env != nullptr && *env != '\0' && std::strcmp(env, "0") != 0;
  return portable ? Isa::portable : best_isa();
}

// The process-wide choice, read from the environment at the first kernel call (a bad
// OFMU_CPU_ISA then raises at every call, as the initialisation is retried); the atomic only
// serves the test switch.
std::atomic<int>& isa_flag() {
  static std::atomic<int> flag{static_cast<int>(isa_from_env())};
  return flag;
}

// The kernels that buffers of dtype T take.
template <typename T>
inline Isa isa_for() {
#ifdef OFMU_HAS_AVX2_PATH
  const Isa isa = static_cast<Isa>(isa_flag().load(std::memory_order_relaxed));
  if (std::is_same_v<T, double> && isa == Isa::avx512) return Isa::avx2;
  return isa;
#else
  return Isa::portable;
#endif
}

#ifdef OFMU_HAS_AVX2_PATH
#define OFMU_AVX2 __attribute__((target("avx2,f16c")))

namespace avx2 {

// 8 buffer elements <-> 8 floats, bit for bit as the scalar conversions of the portable path.
OFMU_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
OFMU_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
OFMU_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {  // = to_buf<BFloat16>
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rne = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i r = _mm256_blendv_epi8(rne, _mm256_set1_epi32(0x7FC0), nan);
  // Every lane is <= 0xFFFF, so the unsigned-saturating pack is exact.
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}
OFMU_AVX2 inline void store8(c10::Half* p, __m256 v) {  // = c10::Half(float), software path
  __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i nan32 = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m128i nan = _mm_packs_epi32(_mm256_castsi256_si128(nan32),
                                      _mm256_extracti128_si256(nan32, 1));
  const __m128i canon = _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(INT16_MIN)),
                                     _mm_set1_epi16(0x7E00));
  h = _mm_blendv_epi8(h, canon, nan);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}

// Applies `vec(i, k)` to the 8 elements at i (k = 8), and to the last n % 8 through zero-padded
// copies (k < 8), so that every element goes through the same vector code.
template <typename T, typename V>
OFMU_AVX2 inline void for_vectors(int64_t lo, int64_t hi, const V& vec) {
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) vec(i, 8);
  if (i < hi) vec(i, static_cast<int>(hi - i));
}

// Pointer to 8 readable elements at p + i: p itself, or a zero-padded copy of the k left.
template <typename T>
inline const T* in8(const T* p, int64_t i, int k, T* pad) {
  if (k == 8) return p + i;
  std::memset(static_cast<void*>(pad), 0, 8 * sizeof(T));
  std::memcpy(static_cast<void*>(pad), p + i, k * sizeof(T));
  return pad;
}
template <typename T>
OFMU_AVX2 inline void out8(T* p, int64_t i, int k, __m256 v) {
  if (k == 8) return store8(p + i, v);
  T pad[8];
  store8(pad, v);
  std::memcpy(static_cast<void*>(p + i), pad, k * sizeof(T));
}

// combine_kernel, 8 elements at a time: same operations, same order.
template <typename T, bool HAS_Y, bool HAS_B>
OFMU_AVX2 void combine_range(const T* x, const T* y, const float* c, T* out_a, T* out_b,
                             int64_t lo, int64_t hi) {
  const __m256 c0 = _mm256_set1_ps(c[0]), c1 = _mm256_set1_ps(c[1]);
  const __m256 c2 = _mm256_set1_ps(c[2]), c3 = _mm256_set1_ps(c[3]);
  const __m256 z1 = _mm256_set1_ps(c[1] * 0.0f), z3 = _mm256_set1_ps(c[3] * 0.0f);
  for_vectors<T>(lo, hi, [&](int64_t i, int k) OFMU_AVX2 {
    T px[8], py[8];
    const __m256 a = load8(in8(x, i, k, px));
    const __m256 b = HAS_Y ? load8(in8(y, i, k, py)) : _mm256_setzero_ps();
    const __m256 ra = _mm256_add_ps(_mm256_mul_ps(c0, a), HAS_Y ? _mm256_mul_ps(c1, b) : z1);
    if constexpr (HAS_B) {
      const __m256 rb = _mm256_add_ps(_mm256_mul_ps(c2, a), HAS_Y ? _mm256_mul_ps(c3, b) : z3);
      out8(out_a, i, k, ra);
      out8(out_b, i, k, rb);
    } else {
      out8(out_a, i, k, ra);
    }
  });
}

// update_kernel, 8 elements at a time: (c0*theta + c1*x) + c2*y.
template <typename T, bool HAS_Y>
OFMU_AVX2 void update_range(T* theta, const T* x, const T* y, const float* c, int64_t lo,
                            int64_t hi) {
  const __m256 c0 = _mm256_set1_ps(c[0]), c1 = _mm256_set1_ps(c[1]), c2 = _mm256_set1_ps(c[2]);
  for_vectors<T>(lo, hi, [&](int64_t i, int k) OFMU_AVX2 {
    if ((i & 31) == 0) {  // every 64 B of a 16-bit buffer (NOTE: [Prefetch])
      prefetch_ahead<0>(theta + i);
      prefetch_ahead<0>(x + i);
      if constexpr (HAS_Y) prefetch_ahead<0>(y + i);
    }
    T pt[8], px[8], py[8];
    __m256 r = _mm256_add_ps(_mm256_mul_ps(c0, load8(in8<T>(theta, i, k, pt))),
                             _mm256_mul_ps(c1, load8(in8(x, i, k, px))));
    if constexpr (HAS_Y) r = _mm256_add_ps(r, _mm256_mul_ps(c2, load8(in8(y, i, k, py))));
    out8(theta, i, k, r);
  });
}

// fp32/fp64/bf16 partials (the lanes of NOTE: [Reduction lanes] in AVX2 registers) and fp32/fp64
// elementwise ops (the portable loops, always_inline, compiled here for AVX2). Same operations
// in the same order, no FMA: the same bits as the portable code, only wider registers.
OFMU_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// block_sums_lanes for fp32/bf16 (16 fp32 lanes = 2 registers per statistic) and fp64 (8 lanes
// = 2 registers of 4 doubles), see NOTE: [Reduction lanes].
template <typename T, bool HAS_Y>
OFMU_AVX2 inline void block_sums(const T* x, const T* y, int64_t n, double* out) {
  __m256 xy0 = _mm256_setzero_ps(), xy1 = xy0, xx0 = xy0, xx1 = xy0, yy0 = xy0, yy1 = xy0;
  auto step = [&](const T* xp, const T* yp) OFMU_AVX2 {
    const __m256 a0 = load8(xp), a1 = load8(xp + 8);
    xx0 = _mm256_add_ps(xx0, _mm256_mul_ps(a0, a0));
    xx1 = _mm256_add_ps(xx1, _mm256_mul_ps(a1, a1));
    if constexpr (HAS_Y) {
      const __m256 b0 = load8(yp), b1 = load8(yp + 8);
      xy0 = _mm256_add_ps(xy0, _mm256_mul_ps(a0, b0));
      xy1 = _mm256_add_ps(xy1, _mm256_mul_ps(a1, b1));
      yy0 = _mm256_add_ps(yy0, _mm256_mul_ps(b0, b0));
      yy1 = _mm256_add_ps(yy1, _mm256_mul_ps(b1, b1));
    }
  };
  // Software prefetch kPrefetchBytes ahead (NOTE: [Prefetch]).
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    prefetch_ahead<0>(x + i);
    if constexpr (HAS_Y) prefetch_ahead<0>(y + i);
    step(x + i, HAS_Y ? y + i : nullptr);
  }
  if (i < n) {
    T px[16], py[16];
    std::memset(static_cast<void*>(px), 0, sizeof(px));
    std::memset(static_cast<void*>(py), 0, sizeof(py));
    std::memcpy(static_cast<void*>(px), x + i, (n - i) * sizeof(T));
    if constexpr (HAS_Y) std::memcpy(static_cast<void*>(py), y + i, (n - i) * sizeof(T));
    step(px, py);
  }
  alignas(32) float l[3][16];
  _mm256_store_ps(l[0], xy0);
  _mm256_store_ps(l[0] + 8, xy1);
  _mm256_store_ps(l[1], xx0);
  _mm256_store_ps(l[1] + 8, xx1);
  _mm256_store_ps(l[2], yy0);
  _mm256_store_ps(l[2] + 8, yy1);
  for (int k = 0; k < 3; ++k) {
    float r = l[k][0];
    for (int j = 1; j < 16; ++j) r += l[k][j];
    out[k] = static_cast<double>(r);
  }
}

template <bool HAS_Y>
OFMU_AVX2 inline void block_sums(const double* x, const double* y, int64_t n, double* out) {
  __m256d xy0 = _mm256_setzero_pd(), xy1 = xy0, xx0 = xy0, xx1 = xy0, yy0 = xy0, yy1 = xy0;
  auto step = [&](const double* xp, const double* yp) OFMU_AVX2 {
    const __m256d a0 = _mm256_loadu_pd(xp), a1 = _mm256_loadu_pd(xp + 4);
    xx0 = _mm256_add_pd(xx0, _mm256_mul_pd(a0, a0));
    xx1 = _mm256_add_pd(xx1, _mm256_mul_pd(a1, a1));
    if constexpr (HAS_Y) {
      const __m256d b0 = _mm256_loadu_pd(yp), b1 = _mm256_loadu_pd(yp + 4);
      xy0 = _mm256_add_pd(xy0, _mm256_mul_pd(a0, b0));
      xy1 = _mm256_add_pd(xy1, _mm256_mul_pd(a1, b1));
      yy0 = _mm256_add_pd(yy0, _mm256_mul_pd(b0, b0));
      yy1 = _mm256_add_pd(yy1, _mm256_mul_pd(b1, b1));
    }
  };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    prefetch_ahead<0>(x + i);
    if constexpr (HAS_Y) prefetch_ahead<0>(y + i);
    step(x + i, HAS_Y ? y + i : nullptr);
  }
  if (i < n) {
    double px[8] = {}, py[8] = {};
    std::memcpy(px, x + i, (n - i) * sizeof(double));
    if constexpr (HAS_Y) std::memcpy(py, y + i, (n - i) * sizeof(double));
    step(px, py);
  }
  alignas(32) double l[3][8];
  _mm256_store_pd(l[0], xy0);
  _mm256_store_pd(l[0] + 4, xy1);
  _mm256_store_pd(l[1], xx0);
  _mm256_store_pd(l[1] + 4, xx1);
  _mm256_store_pd(l[2], yy0);
  _mm256_store_pd(l[2] + 4, yy1);
  for (int k = 0; k < 3; ++k) {
    double r = l[k][0];
    for (int j = 1; j < 8; ++j) r += l[k][j];
    out[k] = r;
  }
}

template <typename T, bool HAS_Y>
OFMU_AVX2 void partials(const T* x, const T* y, int64_t n, int64_t b_lo, int64_t b_hi,
                        double* p) {
  for (int64_t b = b_lo; b < b_hi; ++b) {
    const int64_t lo = b * kBlock;
    const int64_t len = std::min(kBlock, n - lo);
    if constexpr (std::is_same_v<T, double>)
      block_sums<HAS_Y>(x + lo, HAS_Y ? y + lo : nullptr, len, p + 3 * b);
    else
      block_sums<T, HAS_Y>(x + lo, HAS_Y ? y + lo : nullptr, len, p + 3 * b);
  }
}

template <typename T, bool HAS_Y, bool HAS_B>
OFMU_AVX2 void combine_wide(const T* x, const T* y, const acc_t<T>* c, T* out_a, T* out_b,
                            int64_t lo, int64_t hi) {
  combine_range_portable<T, HAS_Y, HAS_B>(x, y, c, out_a, out_b, lo, hi);
}
template <typename T, bool HAS_Y>
OFMU_AVX2 void update_wide(T* theta, const T* x, const T* y, const acc_t<T>* c, int64_t lo,
                           int64_t hi) {
  update_range_portable<T, HAS_Y>(theta, x, y, c, lo, hi);
}

// reduce3, fp16: the portable block_sums<Half> is not vectorised (c10's branchy conversion), so
// each block is one sequential sum s = ((0 + p0) + p1) + ...; no reordering inside a block can
// reproduce it. Blocks are independent, though: lane l here runs the sequential sum of block l
// of 8 consecutive full blocks, reading 8 elements of each block, transposed 8x8.
template <bool HAS_Y>
OFMU_AVX2 void block_sums8(const c10::Half* x, const c10::Half* y, double* out) {
  __m256 vxy = _mm256_setzero_ps(), vxx = _mm256_setzero_ps(), vyy = _mm256_setzero_ps();
  // 8x8 transpose of 16-bit elements: row r of the result holds element j + r of the 8 blocks.
  auto rows = [](const c10::Half* p, int64_t j, __m128i* r) OFMU_AVX2 {
    __m128i v[8];
    for (int b = 0; b < 8; ++b)
      v[b] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + b * kBlock + j));
    const __m128i t0 = _mm_unpacklo_epi16(v[0], v[1]), t1 = _mm_unpackhi_epi16(v[0], v[1]);
    const __m128i t2 = _mm_unpacklo_epi16(v[2], v[3]), t3 = _mm_unpackhi_epi16(v[2], v[3]);
    const __m128i t4 = _mm_unpacklo_epi16(v[4], v[5]), t5 = _mm_unpackhi_epi16(v[4], v[5]);
    const __m128i t6 = _mm_unpacklo_epi16(v[6], v[7]), t7 = _mm_unpackhi_epi16(v[6], v[7]);
    const __m128i u0 = _mm_unpacklo_epi32(t0, t2), u1 = _mm_unpackhi_epi32(t0, t2);
    const __m128i u2 = _mm_unpacklo_epi32(t1, t3), u3 = _mm_unpackhi_epi32(t1, t3);
    const __m128i u4 = _mm_unpacklo_epi32(t4, t6), u5 = _mm_unpackhi_epi32(t4, t6);
    const __m128i u6 = _mm_unpacklo_epi32(t5, t7), u7 = _mm_unpackhi_epi32(t5, t7);
    r[0] = _mm_unpacklo_epi64(u0, u4);
    r[1] = _mm_unpackhi_epi64(u0, u4);
    r[2] = _mm_unpacklo_epi64(u1, u5);
    r[3] = _mm_unpackhi_epi64(u1, u5);
    r[4] = _mm_unpacklo_epi64(u2, u6);
    r[5] = _mm_unpackhi_epi64(u2, u6);
    r[6] = _mm_unpacklo_epi64(u3, u7);
    r[7] = _mm_unpackhi_epi64(u3, u7);
  };
  for (int64_t j = 0; j < kBlock; j += 8) {
    __m128i rx[8], ry[8];
    rows(x, j, rx);
    if constexpr (HAS_Y) rows(y, j, ry);
    for (int r = 0; r < 8; ++r) {
      const __m256 a = _mm256_cvtph_ps(rx[r]);
      vxx = _mm256_add_ps(vxx, _mm256_mul_ps(a, a));
      if constexpr (HAS_Y) {
        const __m256 b = _mm256_cvtph_ps(ry[r]);
        vxy = _mm256_add_ps(vxy, _mm256_mul_ps(a, b));
        vyy = _mm256_add_ps(vyy, _mm256_mul_ps(b, b));
      }
    }
  }
  alignas(32) float lxy[8], lxx[8], lyy[8];
  _mm256_store_ps(lxy, vxy);
  _mm256_store_ps(lxx, vxx);
  _mm256_store_ps(lyy, vyy);
  for (int b = 0; b < 8; ++b) {  // the portable block ends with `sum + 0` (its reduction init)
    out[3 * b + 0] = static_cast<double>(lxy[b] + 0.0f);
    out[3 * b + 1] = static_cast<double>(lxx[b] + 0.0f);
    out[3 * b + 2] = static_cast<double>(lyy[b] + 0.0f);
  }
}

}  // namespace avx2
#endif  // OFMU_HAS_AVX2_PATH

// The per-block partials of reduce3 (3 doubles per block, see NOTE: [Deterministic CPU
// reduction]), through the fast path where it applies. Tasks are runs of whole blocks, so the
// thread count decides only who computes a block.
template <typename T, bool HAS_Y>
void block_partials(const T* x, const T* y, int64_t n, double* p) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  auto run = [&](auto&& blocks) {
    parallel_ranges(nb, kBlocksPerTask, n, [&](int64_t lo, int64_t hi) { blocks(lo, hi); });
  };
#ifdef OFMU_HAS_AVX2_PATH
  const Isa isa = isa_for<T>();
  if constexpr (!std::is_same_v<T, double>) {
    if (isa == Isa::avx512) {
      constexpr auto F = fmt_of<T>;
      constexpr int64_t per = avx512::kBlocksPerUnit<F>;  // blocks per unit (fp16: 16)
      parallel_ranges(avx512::units(n, per), std::max<int64_t>(1, kBlocksPerTask / per), n,
                      [&](int64_t lo, int64_t hi) {
                        avx512::partials<F, HAS_Y>(as_elem<F>(x), as_elem<F>(y), n, lo, hi, p);
                      });
      return;
    }
  }
  if (isa == Isa::avx2) {
    if constexpr (std::is_same_v<T, c10::Half>) {
      const int64_t groups = (n / kBlock) / 8;  // groups of 8 full blocks
      parallel_ranges(groups, 2, n, [&](int64_t g_lo, int64_t g_hi) {
        for (int64_t g = g_lo; g < g_hi; ++g) {
          const int64_t lo = g * 8 * kBlock;
          avx2::block_sums8<HAS_Y>(x + lo, HAS_Y ? y + lo : nullptr, p + 3 * 8 * g);
        }
      });
      // at most 8 blocks left: the portable code
      partials_range<T, HAS_Y>(x, y, n, 8 * groups, nb, p);
    } else {
      run([&](int64_t lo, int64_t hi) { avx2::partials<T, HAS_Y>(x, y, n, lo, hi, p); });
    }
    return;
  }
#endif
  run([&](int64_t lo, int64_t hi) { partials_range<T, HAS_Y>(x, y, n, lo, hi, p); });
}

template <typename T, bool HAS_Y>
void reduce3_kernel(const T* x, const T* y, int64_t n, acc_t<T>* stats) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::unique_ptr<double[]> part(new double[static_cast<size_t>(3 * nb)]);  // no zero-fill
  double* p = part.get();
  block_partials<T, HAS_Y>(x, y, n, p);
  double s[3] = {0.0, 0.0, 0.0};
  for (int64_t b = 0; b < nb; ++b)  // fixed block order (see NOTE above)
    for (int k = 0; k < 3; ++k) s[k] += p[3 * b + k];
  for (int k = 0; k < 3; ++k) stats[k] = static_cast<acc_t<T>>(s[k]);
}

// The elementwise ops: AVX-512 kernels (fp32/bf16/fp16) or AVX2 kernels (intrinsics for
// bf16/fp16, the portable loops compiled for AVX2 for fp32/fp64) on a capable CPU, else the
// portable ones (NOTE: [AVX-512 path]).
template <typename T, bool HAS_Y, bool HAS_B>
void combine_any(const T* x, const T* y, const acc_t<T>* c, T* out_a, T* out_b, int64_t n) {
  parallel_ranges(n, kChunk, n, [&](int64_t lo, int64_t hi) {
#ifdef OFMU_HAS_AVX2_PATH
    const Isa isa = isa_for<T>();
    if constexpr (!std::is_same_v<T, double>) {
      if (isa == Isa::avx512) {
        constexpr auto F = fmt_of<T>;
        return avx512::combine<F, HAS_Y, HAS_B>(as_elem<F>(x), as_elem<F>(y), c,
                                                as_elem<F>(out_a), as_elem<F>(out_b), lo, hi);
      }
    }
    if (isa == Isa::avx2) {
      if constexpr (is16<T>)
        return avx2::combine_range<T, HAS_Y, HAS_B>(x, y, c, out_a, out_b, lo, hi);
      else
        return avx2::combine_wide<T, HAS_Y, HAS_B>(x, y, c, out_a, out_b, lo, hi);
    }
#endif
    combine_range_portable<T, HAS_Y, HAS_B>(x, y, c, out_a, out_b, lo, hi);
  });
}

template <typename T, bool HAS_Y>
void update_any(T* theta, const T* x, const T* y, const acc_t<T>* c, int64_t n) {
  parallel_ranges(n, kChunk, n, [&](int64_t lo, int64_t hi) {
#ifdef OFMU_HAS_AVX2_PATH
    const Isa isa = isa_for<T>();
    if constexpr (!std::is_same_v<T, double>) {
      if (isa == Isa::avx512) {
        constexpr auto F = fmt_of<T>;
        return avx512::update<F, HAS_Y>(as_elem<F>(theta), as_elem<F>(x), as_elem<F>(y), c, lo,
                                        hi);
      }
    }
    if (isa == Isa::avx2) {
      if constexpr (is16<T>)
        return avx2::update_range<T, HAS_Y>(theta, x, y, c, lo, hi);
      else
        return avx2::update_wide<T, HAS_Y>(theta, x, y, c, lo, hi);
    }
#endif
    update_range_portable<T, HAS_Y>(theta, x, y, c, lo, hi);
  });
}

// Test/diagnostic switches (NOTE: [AVX-512 path]). `_cpu_fast_path(None)` reports whether a
// vector path (avx2 or avx512) is in use; `_cpu_fast_path(b)` picks the best one the CPU has
// (True) or the portable loops (False) and returns the old answer.
bool cpu_fast_path(std::optional<bool> enable) {
  const bool old = isa_flag().load() != static_cast<int>(Isa::portable);
  if (enable.has_value()) {
    TORCH_CHECK(!*enable || best_isa() != Isa::portable,
                "ofmu._cpu_fast_path: this CPU (or build) has no AVX2+F16C fast path");
    isa_flag().store(static_cast<int>(*enable ? best_isa() : Isa::portable));
  }
  return old;
}

// `_cpu_isa()`: the kernels in use ("portable", "avx2", "avx512"); with `dtype`, the ones that
// buffers of that dtype take (fp64 has no avx512 kernels); `_cpu_isa(name)` switches to `name`
// (refused where the CPU lacks it) and returns the previous answer. `_cpu_isa(dtype=...,
// best=True)` reports what the CPU supports instead of what is in use.
std::string cpu_isa(std::optional<std::string> set, std::optional<at::ScalarType> dtype,
                    bool best) {
  const Isa chosen = best ? best_isa() : static_cast<Isa>(isa_flag().load());
  Isa now = chosen;
  if (dtype.has_value()) {
    const auto d = *dtype;
    TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf,
                "ofmu._cpu_isa: dtype must be float32, float64, bfloat16 or float16, got ", d);
    if (*dtype == at::kDouble && now == Isa::avx512) now = Isa::avx2;
  }
  if (set.has_value()) isa_flag().store(static_cast<int>(parse_isa(*set, "ofmu._cpu_isa")));
  return kIsaNames[static_cast<int>(now)];
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
    if (yp && bp) combine_any<scalar_t, true, true>(xp, yp, c, ap, bp, n);
    else if (yp) combine_any<scalar_t, true, false>(xp, yp, c, ap, bp, n);
    else if (bp) combine_any<scalar_t, false, true>(xp, yp, c, ap, bp, n);
    else combine_any<scalar_t, false, false>(xp, yp, c, ap, bp, n);
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
      update_any<scalar_t, true>(tp, xp, y->const_data_ptr<scalar_t>(), c, n);
    else
      update_any<scalar_t, false>(tp, xp, nullptr, c, n);
  });
}

at::Tensor finalize_cpu(const at::Tensor& gstats, const at::Tensor& ustats, const at::Tensor& checks,
                        const std::optional<at::Tensor>& ok, bool project, double gamma,
                        double eps, double lr, double weight_decay,
                        std::optional<double> max_norm, std::optional<double> cap) {
  check_finalize(gstats, ustats, checks, ok, cap.has_value());
  at::Tensor out = at::empty({kFinalizeLen}, gstats.options());
  const FinalizeArgs a{project, gamma, eps, lr, weight_decay, max_norm.has_value(),
                       cap.has_value(), ok.has_value(), max_norm.value_or(0.0), cap.value_or(0.0)};
  AT_DISPATCH_FLOATING_TYPES(gstats.scalar_type(), "ofmu.finalize", [&] {
    finalize_math<scalar_t>(gstats.const_data_ptr<scalar_t>(), ustats.const_data_ptr<scalar_t>(),
                            checks.const_data_ptr<scalar_t>(), checks.numel(),
                            ok.has_value() ? ok->const_data_ptr<bool>() : nullptr, a,
                            std::numeric_limits<scalar_t>::min(), out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace ofmu

TORCH_LIBRARY_IMPL(ofmu, CPU, m) {
  m.impl("reduce3", &ofmu::reduce3_cpu);
  m.impl("combine", &ofmu::combine_cpu);
  m.impl("update", &ofmu::update_cpu);
  m.impl("finalize", &ofmu::finalize_cpu);
}

// Internal: which implementation bf16/fp16 buffers use on CPU (NOTE: [16-bit fast path]).
TORCH_LIBRARY_FRAGMENT(ofmu, m) {
  m.def("_cpu_fast_path(bool? enable=None) -> bool", &ofmu::cpu_fast_path);
  m.def("_cpu_isa(str? isa=None, ScalarType? dtype=None, bool best=False) -> str", &ofmu::cpu_isa);
}
