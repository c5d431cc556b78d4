// Test harness: csrc/cpu/avx512_kernels.h compiled against SIMDe ("SIMD Everywhere", header
// only, Debian package libsimde-dev), so that the very source the extension runs on AVX-512
// CPUs runs here on any x86-64 CPU. tests/test_kernels_avx512.py builds it into a small shared
// library (no torch headers: a few seconds) and calls the C functions below through ctypes.
//
// SIMDe up to at least 0.7.4 lacks a few AVX-512F conversions; they are defined below from
// SIMDe's 256-bit operations (native AVX2/F16C instructions when the test compiles with
// -mavx2 -mf16c, on CPUs that have them), with the instructions' documented semantics.
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>

#include <cstdint>
#include <cstring>

#ifndef _mm512_cvtph_ps  // VCVTPH2PS zmm: 16 halves -> 16 floats, exact
static inline simde__m512 ofmu_cvtph_ps(simde__m256i h) {
  const simde__m256 lo = simde_mm256_cvtph_ps(simde_mm256_castsi256_si128(h));
  const simde__m256 hi = simde_mm256_cvtph_ps(simde_mm256_extracti128_si256(h, 1));
  return simde_mm512_insertf32x8(simde_mm512_castps256_ps512(lo), hi, 1);
}
#define _mm512_cvtph_ps(h) ofmu_cvtph_ps(h)
#endif

#ifndef _mm512_cvtps_ph  // VCVTPS2PH zmm: 16 floats -> 16 halves, rounding from the immediate
static inline simde__m256i ofmu_cvtps_ph(simde__m512 v, int) {
  const simde__m128i lo = simde_mm256_cvtps_ph(simde_mm512_castps512_ps256(v), SIMDE_MM_FROUND_NO_EXC);
  const simde__m128i hi = simde_mm256_cvtps_ph(simde_mm256_castpd_ps(simde_mm512_extractf64x4_pd(simde_mm512_castps_pd(v), 1)), SIMDE_MM_FROUND_NO_EXC);
  return simde_mm256_inserti128_si256(simde_mm256_castsi128_si256(lo), hi, 1);
}
#define _mm512_cvtps_ph(v, imm) ofmu_cvtps_ph(v, imm)
#endif

#ifndef _mm512_cvtepu16_epi32  // VPMOVZXWD zmm: zero-extend 16 x u16
static inline simde__m512i ofmu_cvtepu16_epi32(simde__m256i h) {
  uint16_t in[16];
  uint32_t out[16];
  std::memcpy(in, &h, sizeof(in));
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  simde__m512i r;
  std::memcpy(&r, out, sizeof(r));
  return r;
}
#define _mm512_cvtepu16_epi32(h) ofmu_cvtepu16_epi32(h)
#endif

#ifndef _mm512_cvtepi32_epi16  // VPMOVDW zmm: truncate 16 x 32-bit to their low 16 bits
static inline simde__m256i ofmu_cvtepi32_epi16(simde__m512i v) {
  uint32_t in[16];
  uint16_t out[16];
  std::memcpy(in, &v, sizeof(in));
  for (int i = 0; i < 16; ++i) out[i] = static_cast<uint16_t>(in[i]);
  simde__m256i r;
  std::memcpy(&r, out, sizeof(r));
  return r;
}
#define _mm512_cvtepi32_epi16(v) ofmu_cvtepi32_epi16(v)
#endif

#define OFMU_AVX512
#include "cpu/avx512_kernels.h"

namespace {

using ofmu::avx512::elem_t;
using ofmu::avx512::Fmt;

// fmt: 0 fp32, 1 bf16, 2 fp16.
template <template <Fmt> class Op, typename... Args>
void by_fmt(int fmt, Args... args) {
  if (fmt == 0) Op<Fmt::f32>::run(args...);
  else if (fmt == 1) Op<Fmt::bf16>::run(args...);
  else Op<Fmt::f16>::run(args...);
}

template <Fmt F>
struct Partials {
  static void run(const void* x, const void* y, int64_t n, double* p) {
    auto* xe = static_cast<const elem_t<F>*>(x);
    auto* ye = static_cast<const elem_t<F>*>(y);
    const int64_t nu = ofmu::avx512::units(n, ofmu::avx512::kBlocksPerUnit<F>);
    // Two calls, as two threads would split the units.
    const int64_t mid = nu / 2;
    if (y) {
      ofmu::avx512::partials<F, true>(xe, ye, n, 0, mid, p);
      ofmu::avx512::partials<F, true>(xe, ye, n, mid, nu, p);
    } else {
      ofmu::avx512::partials<F, false>(xe, nullptr, n, 0, mid, p);
      ofmu::avx512::partials<F, false>(xe, nullptr, n, mid, nu, p);
    }
  }
};

template <Fmt F>
struct Combine {
  static void run(const void* x, const void* y, const float* c, void* a, void* b, int64_t n) {
    auto* xe = static_cast<const elem_t<F>*>(x);
    auto* ye = static_cast<const elem_t<F>*>(y);
    auto* ae = static_cast<elem_t<F>*>(a);
    auto* be = static_cast<elem_t<F>*>(b);
    if (y && b) ofmu::avx512::combine<F, true, true>(xe, ye, c, ae, be, 0, n);
    else if (y) ofmu::avx512::combine<F, true, false>(xe, ye, c, ae, be, 0, n);
    else if (b) ofmu::avx512::combine<F, false, true>(xe, ye, c, ae, be, 0, n);
    else ofmu::avx512::combine<F, false, false>(xe, ye, c, ae, be, 0, n);
  }
};

template <Fmt F>
struct Update {
  static void run(void* t, const void* x, const void* y, const float* c, int64_t n) {
    if (c[3] == 0) return;  // the non-finite flag, as in update_cpu
    auto* te = static_cast<elem_t<F>*>(t);
    auto* xe = static_cast<const elem_t<F>*>(x);
    auto* ye = static_cast<const elem_t<F>*>(y);
    if (y) ofmu::avx512::update<F, true>(te, xe, ye, c, 0, n);
    else ofmu::avx512::update<F, false>(te, xe, ye, c, 0, n);
  }
};

}  // namespace

extern "C" {

// The reduce3 partials: 3 doubles per 1024-element block, block order.
void ofmu_simde_partials(int fmt, const void* x, const void* y, int64_t n, double* p) {
  by_fmt<Partials>(fmt, x, y, n, p);
}
void ofmu_simde_combine(int fmt, const void* x, const void* y, const float* c, void* a, void* b,
                        int64_t n) {
  by_fmt<Combine>(fmt, x, y, c, a, b, n);
}
void ofmu_simde_update(int fmt, void* t, const void* x, const void* y, const float* c, int64_t n) {
  by_fmt<Update>(fmt, t, x, y, c, n);
}

}  // extern "C"
