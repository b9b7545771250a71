// The direct conv2d algorithm's vector kernels (cpu/conv2d_direct_kernels.inc),
// instantiated twice: for the build's baseline ISA (namespace baseline: AVX2,
// or scalar loops when the build targets generic x86-64) and for AVX-512
// (namespace avx512, used only when cpu_gemm::available(): the CPU has
// AVX-512F/VL and HANDGRAD_CPU_AVX512 is not 0). cpu/conv2d_direct.cpp lays
// the images out and calls one of the two through kernels<T>().
#pragma once

#include <cstdint>

namespace handgrad {
namespace conv2d {
namespace cpu {
namespace direct {

template <typename T>
struct Kernels {
  // Wide rows are processed in whole vectors: their lengths are multiples of this.
  int64_t lanes;
  // out[r * length + j] = init[r] (0 without init) + sum_k w[r * K + k] * buf[off[k] + j]
  // for r < rows, j < length.
  void (*correlate)(const T* buf, const int64_t* off, int64_t K, const T* w, int64_t rows,
                    const T* init, T* out, int64_t length);
  // dw[r][k] += sum_j g[r * length + j] * buf[off[k] + j], j < length, as
  // vector partial sums: dw[r][k] is the sum of dwl[(r * K + k) * lanes + 0..lanes).
  void (*reduce)(const T* g, int64_t rows, const T* buf, const int64_t* off, int64_t K,
                 int64_t length, T* dwl);
  // The weight gradient vectorized over input channels (cin a multiple of
  // lanes), from pixel-major images: for tap t < taps and every valid pixel
  // (oh < rows, ow < width) at q = oh * cols + ow,
  //   dwt[(t * cout + co) * cin + ci] += gt[q * cout + co] * xt[(q + off[t]) * cin + ci].
  void (*reduce_channels)(const T* gt, int64_t cout, const T* xt, int64_t cin,
                          const int64_t* off, int64_t taps, int64_t rows, int64_t width,
                          int64_t cols, T* dwt);
};

#define HG_CONV_DIRECT_DECLARE(ns)     \
  namespace ns {                       \
  extern const Kernels<float> kFloat;  \
  extern const Kernels<double> kDouble; \
  }

HG_CONV_DIRECT_DECLARE(baseline)
HG_CONV_DIRECT_DECLARE(avx512)

#undef HG_CONV_DIRECT_DECLARE

}  // namespace direct
}  // namespace cpu
}  // namespace conv2d
}  // namespace handgrad
