// The AVX-512 CPU kernels (reduce3 partials, combine, update for fp32, bf16, fp16): one source,
// compiled twice.
//
//  * In the extension (csrc/cpu/ofmu_cpu.cpp) with <immintrin.h> and OFMU_AVX512 defined as
//    __attribute__((target("avx512f,avx2,f16c"))): native code, chosen at run time when the CPU
//    has AVX-512F (NOTE: [16-bit fast path] and NOTE: [AVX-512 path] there).
//  * In the test harness (tests/csrc/avx512_simde.cpp) against SIMDe with its native aliases and
//    OFMU_AVX512 empty: the same intrinsics run on any x86-64 CPU, so the bit-equality of this
//    code with the portable loops is tested on machines without AVX-512 too.
//
// Whoever includes this header provides the intrinsics (one of the two ways above) and defines
// OFMU_AVX512 first. It includes no torch header: 16-bit buffers are passed as uint16_t and
// are only ever touched through intrinsics and memcpy.
//
// Only AVX-512F is used (plus the AVX2/F16C it implies on every CPU that has it): no AVX512BW
// masked loads (tails go through zero-padded copies, as in the AVX2 code) and no AVX512_BF16
// (its VCVTNEPS2BF16 flushes denormal inputs and outputs to zero and keeps NaN payloads, where
// the portable conversion rounds denormals to nearest-even and writes NaN as 0x7FC0).
//
// Every result is bitwise the portable loops' (ofmu_cpu.cpp): the same IEEE operations in the
// same order per element, no FMA (the build passes -ffp-contract=off: with AVX-512F enabled the
// compiler could otherwise fuse a*b + c), the same conversions, and reduce3 with the portable
// grouping: 16 fp32 lanes for fp32/bf16 (exactly one 512-bit register per statistic), one
// sequential sum per block for fp16 (16 blocks side by side, one per lane).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#ifndef OFMU_AVX512
#error "define OFMU_AVX512 (the target attribute, or empty under SIMDe) before including this"
#endif

// GCC 12's avx512fintrin.h initialises its "undefined" vectors with themselves, which
// -Wuninitialized reports at every use of the conversions below (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace ofmu {
namespace avx512 {

enum class Fmt { f32, bf16, f16 };

template <Fmt F>
using elem_t = std::conditional_t<F == Fmt::f32, float, uint16_t>;

constexpr int64_t kBlock = 1024;          // = ofmu_cpu.cpp's kBlock (checked there)
constexpr int64_t kPrefetchBytes = 2048;  // = ofmu_cpu.cpp's kPrefetchBytes (NOTE: [Prefetch])

#define OFMU_AVX512_INLINE OFMU_AVX512 inline __attribute__((always_inline))

template <int RW>
inline __attribute__((always_inline)) void prefetch(const void* p) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes),
                     RW, 3);
}

// ---------------------------------------------------------------- 16 elements <-> 16 floats
// Bit for bit the portable conversions: bf16 loads are a shift; bf16 stores c10's
// round-to-nearest-even with NaN -> 0x7FC0; fp16 loads the exact widening; fp16 stores
// round-to-nearest-even with NaN -> sign|0x7E00 (c10's software conversion).

template <Fmt F>
OFMU_AVX512_INLINE __m512 load16(const elem_t<F>* p) {
  if constexpr (F == Fmt::f32) {
    return _mm512_loadu_ps(p);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (F == Fmt::bf16)
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else
      return _mm512_cvtph_ps(h);
  }
}

template <Fmt F>
OFMU_AVX512_INLINE void store16(elem_t<F>* p, __m512 v) {
  if constexpr (F == Fmt::f32) {
    _mm512_storeu_ps(p, v);
  } else {
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i u = _mm512_castps_si512(v);
    __m256i h;
    if constexpr (F == Fmt::bf16) {
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      const __m512i rne = _mm512_srli_epi32(
          _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
      // Every lane is <= 0xFFFF, so the truncating narrow is exact.
      h = _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rne, _mm512_set1_epi32(0x7FC0)));
    } else {
      // A NaN becomes the quiet NaN sign|0x7FC00000 first, which converts to sign|0x7E00 (the
      // conversion would otherwise keep the top of the payload).
      const __m512i canon = _mm512_or_si512(
          _mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0x80000000u))),
          _mm512_set1_epi32(0x7FC00000));
      const __m512 w = _mm512_castsi512_ps(_mm512_mask_blend_epi32(nan, u, canon));
      h = _mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }
}

// Pointer to 16 readable elements at p + i: p itself, or a zero-padded copy of the k left.
template <typename E>
OFMU_AVX512_INLINE const E* in16(const E* p, int64_t i, int k, E* pad) {
  if (k == 16) return p + i;
  std::memset(static_cast<void*>(pad), 0, 16 * sizeof(E));
  std::memcpy(static_cast<void*>(pad), p + i, k * sizeof(E));
  return pad;
}
template <Fmt F>
OFMU_AVX512_INLINE void out16(elem_t<F>* p, int64_t i, int k, __m512 v) {
  if (k == 16) return store16<F>(p + i, v);
  elem_t<F> pad[16];
  store16<F>(pad, v);
  std::memcpy(static_cast<void*>(p + i), pad, k * sizeof(elem_t<F>));
}

// ------------------------------------------------------------------------- combine, update
// out_a = c0*x + c1*y, out_b = c2*x + c3*y on [lo, hi): combine_range_portable, 16 at a time.
// Every element is loaded before any store, so the outputs may alias x or y.
template <Fmt F, bool HAS_Y, bool HAS_B>
OFMU_AVX512 void combine(const elem_t<F>* x, const elem_t<F>* y, const float* c, elem_t<F>* out_a,
                         elem_t<F>* out_b, int64_t lo, int64_t hi) {
  using E = elem_t<F>;
  const __m512 c0 = _mm512_set1_ps(c[0]), c1 = _mm512_set1_ps(c[1]);
  const __m512 c2 = _mm512_set1_ps(c[2]), c3 = _mm512_set1_ps(c[3]);
  const __m512 z1 = _mm512_set1_ps(c[1] * 0.0f), z3 = _mm512_set1_ps(c[3] * 0.0f);
  auto vec = [&](int64_t i, int k) OFMU_AVX512 {
    E px[16], py[16];
    const __m512 a = load16<F>(in16(x, i, k, px));
    const __m512 b = HAS_Y ? load16<F>(in16(y, i, k, py)) : _mm512_setzero_ps();
    const __m512 ra = _mm512_add_ps(_mm512_mul_ps(c0, a), HAS_Y ? _mm512_mul_ps(c1, b) : z1);
    if constexpr (HAS_B) {
      const __m512 rb = _mm512_add_ps(_mm512_mul_ps(c2, a), HAS_Y ? _mm512_mul_ps(c3, b) : z3);
      out16<F>(out_a, i, k, ra);
      out16<F>(out_b, i, k, rb);
    } else {
      out16<F>(out_a, i, k, ra);
    }
  };
  int64_t i = lo;
  for (; i + 16 <= hi; i += 16) vec(i, 16);
  if (i < hi) vec(i, static_cast<int>(hi - i));
}

// theta = (c0*theta + c1*x) + c2*y on [lo, hi): update_range_portable, 16 at a time, every cache
// line of the three streams prefetched kPrefetchBytes ahead (NOTE: [Prefetch]).
template <Fmt F, bool HAS_Y>
OFMU_AVX512 void update(elem_t<F>* theta, const elem_t<F>* x, const elem_t<F>* y, const float* c,
                        int64_t lo, int64_t hi) {
  using E = elem_t<F>;
  constexpr int64_t line = 64 / sizeof(E);  // 16 fp32 or 32 16-bit elements
  const __m512 c0 = _mm512_set1_ps(c[0]), c1 = _mm512_set1_ps(c[1]), c2 = _mm512_set1_ps(c[2]);
  auto vec = [&](int64_t i, int k) OFMU_AVX512 {
    if ((i & (line - 1)) == 0) {
      prefetch<1>(theta + i);
      prefetch<0>(x + i);
      if constexpr (HAS_Y) prefetch<0>(y + i);
    }
    E pt[16], px[16], py[16];
    __m512 r = _mm512_add_ps(_mm512_mul_ps(c0, load16<F>(in16<E>(theta, i, k, pt))),
                             _mm512_mul_ps(c1, load16<F>(in16(x, i, k, px))));
    if constexpr (HAS_Y) r = _mm512_add_ps(r, _mm512_mul_ps(c2, load16<F>(in16(y, i, k, py))));
    out16<F>(theta, i, k, r);
  };
  int64_t i = lo;
  for (; i + 16 <= hi; i += 16) vec(i, 16);
  if (i < hi) vec(i, static_cast<int>(hi - i));
}

// ------------------------------------------------------------------------ reduce3 partials
// Lanes added in order 0, 1, ..., 15 in fp32, then widened: the portable block's epilogue.
OFMU_AVX512_INLINE double sum_lanes(__m512 v) {
  alignas(64) float l[16];
  _mm512_store_ps(l, v);
  float r = l[0];
  for (int j = 1; j < 16; ++j) r += l[j];
  return static_cast<double>(r);
}

// One fp32/bf16 block (n <= kBlock elements): block_sums_lanes with its 16 lanes in one register
// per statistic; the last n % 16 elements through a zero-padded copy (adding +0 to a lane
// changes nothing: a lane starts at +0 and cannot become -0).
template <Fmt F, bool HAS_Y>
OFMU_AVX512_INLINE void block_sums(const elem_t<F>* x, const elem_t<F>* y, int64_t n, double* out) {
  using E = elem_t<F>;
  __m512 xy = _mm512_setzero_ps(), xx = xy, yy = xy;
  auto step = [&](const E* xp, const E* yp) OFMU_AVX512 {
    const __m512 a = load16<F>(xp);
    xx = _mm512_add_ps(xx, _mm512_mul_ps(a, a));
    if constexpr (HAS_Y) {
      const __m512 b = load16<F>(yp);
      xy = _mm512_add_ps(xy, _mm512_mul_ps(a, b));
      yy = _mm512_add_ps(yy, _mm512_mul_ps(b, b));
    }
  };
  constexpr int64_t line = 64 / sizeof(E);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    if ((i & (line - 1)) == 0) {
      prefetch<0>(x + i);
      if constexpr (HAS_Y) prefetch<0>(y + i);
    }
    step(x + i, HAS_Y ? y + i : nullptr);
  }
  if (i < n) {
    E px[16], py[16];
    const int k = static_cast<int>(n - i);
    step(in16(x, i, k, px), HAS_Y ? in16(y, i, k, py) : nullptr);
  }
  out[0] = sum_lanes(xy);
  out[1] = sum_lanes(xx);
  out[2] = sum_lanes(yy);
}

// fp16: the portable block is one sequential sum s = ((0 + p0) + p1) + ... per statistic, so
// lane b here runs the sum of block b of a group of 16 consecutive blocks. Row j of the group is
// element j of its 16 blocks: 8 rows at a time come from an 8x8 transpose of 16-bit elements in
// each 128-bit half (blocks 0-7 in the low halves, 8-15 in the high ones). Blocks shorter than
// kBlock (the buffer's last) read zeros past their end, which leave a sequential sum unchanged
// (it starts at +0 and cannot become -0); `len` of the group's blocks are written.
template <bool HAS_Y, bool FULL>
OFMU_AVX512 void half_group(const uint16_t* x, const uint16_t* y, int64_t n, int64_t g,
                            double* p) {
  const int64_t base = g * 16 * kBlock;
  auto chunk = [&](const uint16_t* s, int b, int64_t j) OFMU_AVX512 {
    const int64_t at = base + b * kBlock + j;
    if (FULL || at + 8 <= n) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + at));
    alignas(16) uint16_t pad[8] = {};
    if (at < n) std::memcpy(pad, s + at, (n - at) * sizeof(uint16_t));
    return _mm_load_si128(reinterpret_cast<const __m128i*>(pad));
  };
  auto rows = [&](const uint16_t* s, int64_t j, __m256i* r) OFMU_AVX512 {
    __m256i v[8];
    for (int b = 0; b < 8; ++b)
      v[b] = _mm256_inserti128_si256(_mm256_castsi128_si256(chunk(s, b, j)), chunk(s, b + 8, j), 1);
    const __m256i t0 = _mm256_unpacklo_epi16(v[0], v[1]), t1 = _mm256_unpackhi_epi16(v[0], v[1]);
    const __m256i t2 = _mm256_unpacklo_epi16(v[2], v[3]), t3 = _mm256_unpackhi_epi16(v[2], v[3]);
    const __m256i t4 = _mm256_unpacklo_epi16(v[4], v[5]), t5 = _mm256_unpackhi_epi16(v[4], v[5]);
    const __m256i t6 = _mm256_unpacklo_epi16(v[6], v[7]), t7 = _mm256_unpackhi_epi16(v[6], v[7]);
    const __m256i u0 = _mm256_unpacklo_epi32(t0, t2), u1 = _mm256_unpackhi_epi32(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi32(t1, t3), u3 = _mm256_unpackhi_epi32(t1, t3);
    const __m256i u4 = _mm256_unpacklo_epi32(t4, t6), u5 = _mm256_unpackhi_epi32(t4, t6);
    const __m256i u6 = _mm256_unpacklo_epi32(t5, t7), u7 = _mm256_unpackhi_epi32(t5, t7);
    r[0] = _mm256_unpacklo_epi64(u0, u4);
    r[1] = _mm256_unpackhi_epi64(u0, u4);
    r[2] = _mm256_unpacklo_epi64(u1, u5);
    r[3] = _mm256_unpackhi_epi64(u1, u5);
    r[4] = _mm256_unpacklo_epi64(u2, u6);
    r[5] = _mm256_unpackhi_epi64(u2, u6);
    r[6] = _mm256_unpacklo_epi64(u3, u7);
    r[7] = _mm256_unpackhi_epi64(u3, u7);
  };
  __m512 vxy = _mm512_setzero_ps(), vxx = vxy, vyy = vxy;
  for (int64_t j = 0; j < kBlock; j += 8) {
    __m256i rx[8], ry[8];
    rows(x, j, rx);
    if constexpr (HAS_Y) rows(y, j, ry);
    for (int r = 0; r < 8; ++r) {
      const __m512 a = _mm512_cvtph_ps(rx[r]);
      vxx = _mm512_add_ps(vxx, _mm512_mul_ps(a, a));
      if constexpr (HAS_Y) {
        const __m512 b = _mm512_cvtph_ps(ry[r]);
        vxy = _mm512_add_ps(vxy, _mm512_mul_ps(a, b));
        vyy = _mm512_add_ps(vyy, _mm512_mul_ps(b, b));
      }
    }
  }
  alignas(64) float lxy[16], lxx[16], lyy[16];
  _mm512_store_ps(lxy, vxy);
  _mm512_store_ps(lxx, vxx);
  _mm512_store_ps(lyy, vyy);
  const int64_t nb = (n + kBlock - 1) / kBlock;
  const int len = FULL ? 16 : static_cast<int>(nb - 16 * g);
  for (int b = 0; b < len; ++b) {  // the portable block ends with `sum + 0` (its reduction init)
    double* o = p + 3 * (16 * g + b);
    o[0] = static_cast<double>(lxy[b] + 0.0f);
    o[1] = static_cast<double>(lxx[b] + 0.0f);
    o[2] = static_cast<double>(lyy[b] + 0.0f);
  }
}

// How partials() splits a buffer into tasks: fp32/bf16 per block, fp16 per group of 16 blocks.
template <Fmt F>
constexpr int64_t kBlocksPerUnit = F == Fmt::f16 ? 16 : 1;

inline int64_t units(int64_t n, int64_t per_unit) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  return (nb + per_unit - 1) / per_unit;
}

// reduce3's partials (3 doubles per block, block order) of units [u_lo, u_hi) of an n-element
// buffer (a unit is kBlocksPerUnit<F> blocks; see NOTE: [Deterministic CPU reduction]).
template <Fmt F, bool HAS_Y>
OFMU_AVX512 void partials(const elem_t<F>* x, const elem_t<F>* y, int64_t n, int64_t u_lo,
                          int64_t u_hi, double* p) {
  for (int64_t u = u_lo; u < u_hi; ++u) {
    if constexpr (F == Fmt::f16) {
      if ((u + 1) * 16 * kBlock <= n)
        half_group<HAS_Y, true>(x, y, n, u, p);
      else
        half_group<HAS_Y, false>(x, y, n, u, p);
    } else {
      const int64_t lo = u * kBlock;
      const int64_t len = n - lo < kBlock ? n - lo : kBlock;
      block_sums<F, HAS_Y>(x + lo, HAS_Y ? y + lo : nullptr, len, p + 3 * u);
    }
  }
}

#undef OFMU_AVX512_INLINE

}  // namespace avx512
}  // namespace ofmu

#pragma GCC diagnostic pop
