// Depthwise conv2d (groups == input channels, each input channel feeding
// `multiplier` output channels), CUDA kernels of its own (included by
// conv2d.cu). As a GEMM a depthwise layer has one row per group, so the
// implicit-GEMM tiles of conv2d.cu would compute 1 of every 64 rows; here
// each output element is its own small dot product instead.
//
// Activations are NHWC (converted once per call when they are not): one
// thread per output element with the channel fastest, so a warp reads and
// writes 32 consecutive channels of one pixel (coalesced), and the taps'
// weights of a channel are few and shared by the threads of other pixels.
//   forward      y[n,oh,ow,co] = sum_{kh,kw} x[n, oh*s-p+kh*d, ow*s-p+kw*d, co/m] w[co][kh][kw]
//   grad_input   dx[n,ih,iw,c] = sum_{j<m} sum_{kh,kw} dy[n,oh,ow,c*m+j] w[c*m+j][kh][kw]
//                over the output positions (oh, ow) whose tap (kh, kw) reads (ih, iw)
//                (output_pos_reading of ops/conv2d.h, shared with the CPU kernels)
//   grad_weight  dw[co][kh][kw] = sum over pixels of dy[n,oh,ow,co] x[n,ih,iw,co/m]:
//                one thread per (co, tap) and split of the pixels, partial sums
//                added in a fixed order by conv2d.cu (deterministic, no atomics)
// Accumulation in at::opmath_type (float for float16/bfloat16). Special
// values follow native's reference rules: forward and grad_weight multiply
// the padding's zeros, grad_input sums only the (output, tap) pairs that
// read an input.
#pragma once

#include "common/cuda_launch.cuh"
#include "ops/conv2d.h"

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

namespace handgrad {
namespace conv2d {
namespace depthwise {

constexpr int kThreads = 256;

struct Shape {
  int64_t batch, in_h, in_w, channels;  // x: [batch][in_h][in_w][channels]
  int64_t out_h, out_w, out_channels;   // y: [batch][out_h][out_w][out_channels]
  int64_t multiplier;                   // out_channels / channels
};

inline int64_t blocks_for(int64_t n) {
  return std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20);
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ w,
                               const T* __restrict__ bias, T* __restrict__ y, Shape s,
                               Geometry g) {
  using Acc = at::opmath_type<T>;
  const int64_t total = s.batch * s.out_h * s.out_w * s.out_channels;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t co = e % s.out_channels, pixel = e / s.out_channels;
    const int64_t ow = pixel % s.out_w, oh = (pixel / s.out_w) % s.out_h;
    const int64_t n = pixel / (s.out_w * s.out_h);
    const int64_t c = co / s.multiplier;
    Acc acc = bias != nullptr ? static_cast<Acc>(bias[co]) : Acc(0);
    // Padding taps multiply their zero too (native's rule: a non-finite
    // weight makes 0 * w = NaN there).
    for (int64_t kh = 0; kh < g.h.kernel; ++kh) {
      const int64_t ih = input_pos(g.h, oh, kh);
      for (int64_t kw = 0; kw < g.w.kernel; ++kw) {
        const int64_t iw = input_pos(g.w, ow, kw);
        const Acc xv = inside(ih, s.in_h) && inside(iw, s.in_w)
                           ? static_cast<Acc>(x[((n * s.in_h + ih) * s.in_w + iw) * s.channels + c])
                           : Acc(0);
        acc += xv * static_cast<Acc>(w[(co * g.h.kernel + kh) * g.w.kernel + kw]);
      }
    }
    y[e] = static_cast<T>(acc);
  }
}

template <typename T>
__global__ void grad_input_kernel(const T* __restrict__ dy, const T* __restrict__ w,
                                  T* __restrict__ dx, Shape s, Geometry g) {
  using Acc = at::opmath_type<T>;
  const int64_t total = s.batch * s.in_h * s.in_w * s.channels;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e % s.channels, pixel = e / s.channels;
    const int64_t iw = pixel % s.in_w, ih = (pixel / s.in_w) % s.in_h;
    const int64_t n = pixel / (s.in_w * s.in_h);
    Acc acc = 0;
    for (int64_t kh = 0; kh < g.h.kernel; ++kh) {
      const int64_t oh = output_pos_reading(g.h, ih, kh);
      if (oh < 0) continue;
      for (int64_t kw = 0; kw < g.w.kernel; ++kw) {
        const int64_t ow = output_pos_reading(g.w, iw, kw);
        if (ow < 0) continue;
        const T* row = dy + ((n * s.out_h + oh) * s.out_w + ow) * s.out_channels;
        for (int64_t j = 0; j < s.multiplier; ++j) {
          const int64_t co = c * s.multiplier + j;
          acc += static_cast<Acc>(row[co]) *
                 static_cast<Acc>(w[(co * g.h.kernel + kh) * g.w.kernel + kw]);
        }
      }
    }
    dx[e] = static_cast<T>(acc);
  }
}

// partial[split][co][tap]: the sum over split `split` of the pixels.
template <typename T>
__global__ void grad_weight_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                   at::opmath_type<T>* __restrict__ partial, Shape s, Geometry g,
                                   int64_t split_len) {
  using Acc = at::opmath_type<T>;
  const int64_t taps = g.h.kernel * g.w.kernel;
  const int64_t weights = s.out_channels * taps;
  const int64_t split = blockIdx.y;
  const int64_t pixels = s.batch * s.out_h * s.out_w;
  const int64_t first = split * split_len;
  const int64_t last = first + split_len < pixels ? first + split_len : pixels;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < weights;
       e += int64_t(gridDim.x) * blockDim.x) {
    // Channel fastest: neighbouring threads read neighbouring channels.
    const int64_t co = e % s.out_channels, tap = e / s.out_channels;
    const int64_t kh = tap / g.w.kernel, kw = tap % g.w.kernel, c = co / s.multiplier;
    Acc acc = 0;
    int64_t ow = first % s.out_w, oh = (first / s.out_w) % s.out_h;
    int64_t n = first / (s.out_w * s.out_h);
    for (int64_t pixel = first; pixel < last; ++pixel) {
      const int64_t ih = input_pos(g.h, oh, kh), iw = input_pos(g.w, ow, kw);
      const Acc xv = inside(ih, s.in_h) && inside(iw, s.in_w)
                         ? static_cast<Acc>(x[((n * s.in_h + ih) * s.in_w + iw) * s.channels + c])
                         : Acc(0);  // padding: dy * 0, NaN for a non-finite dy as in native
      acc += static_cast<Acc>(dy[pixel * s.out_channels + co]) * xv;
      if (++ow == s.out_w) {  // the next pixel, without dividing
        ow = 0;
        if (++oh == s.out_h) {
          oh = 0;
          ++n;
        }
      }
    }
    partial[(split * s.out_channels + co) * taps + tap] = acc;
  }
}

// Host side ------------------------------------------------------------

inline bool applicable(const Geometry& g) {
  return g.groups > 1 && g.groups == g.in_channels;
}

inline Shape shape_of(const Geometry& g) {
  return Shape{g.batch, g.h.in_size, g.w.in_size, g.in_channels, g.h.out_size, g.w.out_size,
               g.out_channels, g.out_channels / g.in_channels};
}

// `out` in any layout: written through an NHWC buffer when it is not one.
template <typename Fill>
void into(at::Tensor& out, Fill fill) {
  const bool direct = out.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor buffer = direct ? out : at::empty(out.sizes(), out.options().memory_format(
                                                              at::MemoryFormat::ChannelsLast));
  fill(buffer);
  if (!direct) out.copy_(buffer);
}

}  // namespace depthwise
}  // namespace conv2d
}  // namespace handgrad
