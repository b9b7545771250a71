// conv2d CPU: the two algorithms the CPU backend chooses between per shape
// (cpu/conv2d.cpp picks one), and what they share.
//
//  * direct (cpu/conv2d_direct.cpp, kernels in conv2d_direct_kernels.inc for
//    AVX2 and AVX-512): hand-vectorized kernels over output pixels, for small
//    channel counts, where a matrix product is too thin to
//    run at speed.
//  * gemm (cpu/conv2d_gemm.cpp): im2col / col2im in batch chunks plus one
//    matrix product, for large channel counts; also the exact path the
//    others fall back to for special values.
//  * winograd (cpu/conv2d_winograd.cpp): F(2x2, 3x3), 16 matrix products,
//    for 3x3 stride-1 layers with large channel counts (2.25x fewer
//    multiply-adds).
#pragma once

#include "ops/conv2d.h"

#include "common/cpu_simd.h"

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace handgrad {
namespace conv2d {
namespace cpu {

// A 4-D activation (batch, channel, row, column) with its element strides.
template <typename T>
struct View4 {
  T* data;
  int64_t sn, sc, sh, sw;

  T& at(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return data[n * sn + c * sc + h * sh + w * sw];
  }
  T* plane(int64_t n, int64_t c) const { return data + n * sn + c * sc; }
};

template <typename T>
View4<T> view_of(const at::Tensor& t) {
  return View4<T>{const_cast<T*>(t.const_data_ptr<T>()), t.stride(0), t.stride(1), t.stride(2),
                  t.stride(3)};
}

// The few vector operations the kernels need, for float (8 lanes) and double
// (4 lanes) with AVX2, and a one-lane scalar fallback without it.
template <typename T>
struct Simd {
  using V = T;
  static constexpr int kLanes = 1;
  static V zero() { return T(0); }
  static V set1(T v) { return v; }
  static V load(const T* p) { return *p; }
  static void store(T* p, V v) { *p = v; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static T sum(V v) { return v; }
};

#if HG_HAVE_AVX2
template <>
struct Simd<float> {
  using V = __m256;
  static constexpr int kLanes = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float sum(V v) { return simd::reduce_add(v); }
};

template <>
struct Simd<double> {
  using V = __m256d;
  static constexpr int kLanes = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V set1(double v) { return _mm256_set1_pd(v); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static double sum(V v) {
    const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
};
#endif

// Work per parallel task large enough to amortize the thread handoff.
inline int64_t grain_for(int64_t work_per_item) {
  return work_per_item >= 32768 ? 1 : 32768 / (work_per_item > 0 ? work_per_item : 1);
}

namespace direct {
// The weight gradient vectorized over input channels applies (AVX-512, one
// group, stride 1, input channels in whole vectors, at least 8 output
// channels, reduction depth < 1000, a dilated kernel not much wider than the
// output: its scratch holds the whole padded image); it then beats the
// im2col product too.
bool by_channels(const Geometry& g);
void forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
             at::Tensor& output, const Geometry& g);
void grad_input(const at::Tensor& grad_output, const at::Tensor& weight, at::Tensor& grad_input,
                const Geometry& g);
void grad_weight(const at::Tensor& grad_output, const at::Tensor& input, at::Tensor& grad_weight,
                 const Geometry& g);
}  // namespace direct

namespace gemm {
void forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
             at::Tensor& output, const Geometry& g);
void grad_input(const at::Tensor& grad_output, const at::Tensor& weight, at::Tensor& grad_input,
                const Geometry& g);
void grad_weight(const at::Tensor& grad_output, const at::Tensor& input, at::Tensor& grad_weight,
                 const Geometry& g);
}  // namespace gemm

namespace winograd {
// 3x3 kernels, stride 1, no dilation, one group, >= 64 channels in and out
// (>= 128 without AVX-512).
bool applies(const Geometry& g);
// Each returns false, leaving its result to be recomputed exactly, when the
// magnitudes of its operands (inf, NaN, or large enough to overflow the
// transforms) make Winograd's result differ from the direct sum's.
bool forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
             at::Tensor& output, const Geometry& g);
bool grad_input(const at::Tensor& grad_output, const at::Tensor& weight, at::Tensor& grad_input,
                const Geometry& g);
bool grad_weight(const at::Tensor& grad_output, const at::Tensor& input, at::Tensor& grad_weight,
                 const Geometry& g);
}  // namespace winograd

}  // namespace cpu
}  // namespace conv2d
}  // namespace handgrad
