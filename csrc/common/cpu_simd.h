// SIMD building blocks for the CPU kernels (AVX2 + FMA, 8 floats a vector).
//
// The kernels that exponentiate (softmax cross-entropy, attention, the LSTM
// gates) share one vectorized exp, written here once. With AVX2 unavailable
// at compile time (HANDGRAD_CPU_ARCH=generic) the array helpers fall back to
// scalar loops, and callers test HG_HAVE_AVX2 before using __m256 directly.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HG_HAVE_AVX2 1
#else
#define HG_HAVE_AVX2 0
#endif

namespace handgrad {
namespace simd {

#if HG_HAVE_AVX2

constexpr int kFloatLanes = 8;

// ln2 in two parts, the first exact in few bits, so that n ln2 for an integer
// n loses nothing to rounding (exp's range reduction, log's exponent term).
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;

// The range reduction of both exponentials: x = n ln2 + r with n the integer
// nearest x log2(e), |r| <= ln2/2. Returns r, sets n.
inline __m256 reduce_by_ln2(__m256 x, __m256& n) {
  n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  return _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
}

// e^x for 8 floats, within 2 ulp of std::exp over the whole float range.
// x = n ln2 + r with |r| <= ln2/2, e^r from its degree-7 Taylor polynomial
// (truncation error < 6e-9 relative), 2^n assembled in the exponent bits.
// Overflow gives +inf, NaN stays NaN, and results below e^-87 (1.6e-38,
// just above FLT_MIN) are 0: the polynomial never produces a denormal, whose
// arithmetic costs ~100 cycles a lane on the AMD cores measured here (the
// -inf lanes of masked softmax rows used to hit that on every call).
inline __m256 exp(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.7228317f);  // largest x with e^x < FLT_MAX
  const __m256 lo = _mm256_set1_ps(-87.0f);

  const __m256 xc = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 n;
  const __m256 r = reduce_by_ln2(xc, n);

  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));

  // 2^n with n up to 128: 2^min(n,127) * 2^(n - min(n,127)), each a valid float.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_min_epi32(ni, _mm256_set1_epi32(127));
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 scale1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 scale2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  __m256 result = _mm256_mul_ps(_mm256_mul_ps(p, scale1), scale2);

  result = _mm256_blendv_ps(result, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
  result = _mm256_blendv_ps(result, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  return _mm256_blendv_ps(result, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// e^x for x <= 0: the softmax exponential, whose arguments are shifted by
// the row maximum (or the log-sum-exp). Cheaper than exp(): no overflow
// path and one power-of-two scale; e^r on |r| <= ln2/2 is its degree-6
// Taylor polynomial (relative error < 7e-8). Results below e^-87 are 0 (no
// denormal is ever computed, as in exp()); NaN stays NaN (max_ps returns
// its second operand when either is NaN).
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 xc = _mm256_max_ps(lo, x);
  __m256 k;
  const __m256 r = reduce_by_ln2(xc, k);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);
}

inline float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Maximum of the lanes; a NaN lane is not guaranteed to win, so callers that
// must propagate NaN check for it separately.
inline float reduce_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// log x for 8 positive normal floats (the softmax normalizer, a sum >= 1):
// x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(t) with
// t = (m - 1) / (m + 1), |t| <= 0.172, from its series to t^11 (truncation
// error < 2e-11); within 2 ulp of std::log. +inf stays +inf, NaN stays NaN.
inline __m256 log_positive(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F800000)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356237f), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_sub_epi32(e, _mm256_castps_si256(big));  // big lanes are -1: e + 1
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one));
  const __m256 t2 = _mm256_mul_ps(t, t);
  __m256 p = _mm256_set1_ps(2.0f / 11.0f);
  p = _mm256_fmadd_ps(p, t2, _mm256_set1_ps(2.0f / 9.0f));
  p = _mm256_fmadd_ps(p, t2, _mm256_set1_ps(2.0f / 7.0f));
  p = _mm256_fmadd_ps(p, t2, _mm256_set1_ps(2.0f / 5.0f));
  p = _mm256_fmadd_ps(p, t2, _mm256_set1_ps(2.0f / 3.0f));
  p = _mm256_fmadd_ps(p, t2, _mm256_set1_ps(2.0f));
  const __m256 log_m = _mm256_mul_ps(p, t);
  const __m256 ef = _mm256_cvtepi32_ps(e);
  const __m256 y = _mm256_fmadd_ps(ef, _mm256_set1_ps(kLn2Hi),
                                   _mm256_fmadd_ps(ef, _mm256_set1_ps(kLn2Lo), log_m));
  // inf and NaN (exponent bits all ones) pass through unchanged.
  const __m256 special = _mm256_cmp_ps(_mm256_and_ps(x, _mm256_set1_ps(INFINITY)),
                                       _mm256_set1_ps(INFINITY), _CMP_EQ_OQ);
  return _mm256_blendv_ps(y, x, special);
}

// A mask of the first `count` (0..8) lanes, for loads and stores of row tails.
inline __m256i tail_mask(int64_t count) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes);
}

#endif  // HG_HAVE_AVX2

// out[i] = e^(in[i] - shift) for i < n; returns the sum of the outputs.
// The softmax pattern: shift must be >= every in[i] (the row maximum or the
// log-sum-exp), so the arguments are <= 0. in and out may alias.
inline float exp_shifted_sum(const float* in, float* out, int64_t n, float shift) {
  int64_t i = 0;
  float sum = 0.0f;
#if HG_HAVE_AVX2
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + kFloatLanes <= n; i += kFloatLanes) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(in + i), s));
    _mm256_storeu_ps(out + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = reduce_add(acc);
#endif
  for (; i < n; ++i) {
    out[i] = std::exp(in[i] - shift);
    sum += out[i];
  }
  return sum;
}

inline double exp_shifted_sum(const double* in, double* out, int64_t n, double shift) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = std::exp(in[i] - shift);
    sum += out[i];
  }
  return sum;
}

}  // namespace simd
}  // namespace handgrad
