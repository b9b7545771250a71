// The direct conv2d kernels for AVX-512 (16 floats / 8 doubles a vector, 32
// registers: blocks of 8 rows x 3 vectors, and 4 rows x 6 taps for the weight
// gradient), compiled per function with a target attribute (the rest of the
// build stays at its baseline ISA) and called only when cpu_gemm::available().
#include "ops/cpu/conv2d_cpu.h"

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_ps(), which trips a
// false -Wmaybe-uninitialized in every function that inlines them.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define CONV_DIRECT_TARGET __attribute__((target("avx512f,avx512vl,fma")))

namespace handgrad {
namespace conv2d {
namespace cpu {
namespace direct {
namespace avx512 {

template <typename T>
struct Simd512;

template <>
struct Simd512<float> {
  using V = __m512;
  static constexpr int kLanes = 16;
  CONV_DIRECT_TARGET static V zero() { return _mm512_setzero_ps(); }
  CONV_DIRECT_TARGET static V set1(float v) { return _mm512_set1_ps(v); }
  CONV_DIRECT_TARGET static V load(const float* p) { return _mm512_loadu_ps(p); }
  CONV_DIRECT_TARGET static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  CONV_DIRECT_TARGET static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
};

template <>
struct Simd512<double> {
  using V = __m512d;
  static constexpr int kLanes = 8;
  CONV_DIRECT_TARGET static V zero() { return _mm512_setzero_pd(); }
  CONV_DIRECT_TARGET static V set1(double v) { return _mm512_set1_pd(v); }
  CONV_DIRECT_TARGET static V load(const double* p) { return _mm512_loadu_pd(p); }
  CONV_DIRECT_TARGET static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  CONV_DIRECT_TARGET static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
};

}  // namespace avx512
}  // namespace direct
}  // namespace cpu
}  // namespace conv2d
}  // namespace handgrad

#define CONV_DIRECT_SIMD Simd512
#define CONV_DIRECT_ROWS 8
#define CONV_DIRECT_TAPS 6
#define CONV_DIRECT_CH_ROWS 8
#define CONV_DIRECT_CH_VECS 3
#else
// No AVX-512 compiler support: the namespace holds the baseline kernels
// (never chosen: cpu_gemm::available() is false there).
#define CONV_DIRECT_TARGET
#define CONV_DIRECT_SIMD Simd
#define CONV_DIRECT_ROWS 4
#define CONV_DIRECT_TAPS 3
#define CONV_DIRECT_CH_ROWS 4
#define CONV_DIRECT_CH_VECS 2
#endif

#define CONV_DIRECT_NS avx512
#include "ops/cpu/conv2d_direct_kernels.inc"
