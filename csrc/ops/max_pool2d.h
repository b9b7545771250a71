// max_pool2d: what the CPU and CUDA kernels share.
//
//  * HG_HOST_DEVICE scalar helpers (window geometry, the max/NaN rule),
//    compiled for both backends so the pooling semantics are written once.
//  * The host-side driver (defined in max_pool2d.cpp) that validates
//    arguments, computes the output geometry, allocates outputs in the
//    input's memory format and hands 4-D, densely laid out tensors to a
//    backend kernel.
#pragma once

#include "common/macros.h"

#include <cstdint>

namespace handgrad {
namespace max_pool2d {

// One spatial axis of the pooling window.
struct Axis {
  int64_t in_size;
  int64_t out_size;
  int64_t kernel;
  int64_t stride;
  int64_t pad;
  int64_t dilation;
};

HG_HOST_DEVICE int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

HG_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// Number of windows along one axis. In ceil mode a partial window at the end
// counts, unless it would start in the right padding (it would see nothing
// but padding), which is the rule torch.nn.functional.max_pool2d uses. The
// driver has checked that in_size + 2 * pad and the window span fit
// (common/checked_math.h); the formula avoids adding the stride to them, so
// any stride up to 2^63 - 1 works.
HG_HOST_DEVICE int64_t pooled_size(int64_t in_size, int64_t kernel, int64_t stride, int64_t pad,
                                   int64_t dilation, bool ceil_mode) {
  const int64_t span = dilation * (kernel - 1) + 1;
  const int64_t room = in_size + 2 * pad - span;
  int64_t out = (ceil_mode ? ceil_div(room, stride) : floor_div(room, stride)) + 1;
  // (out - 1) * stride >= in_size + pad, without the product
  if (ceil_mode && out - 1 >= ceil_div(in_size + pad, stride)) --out;
  return out;
}

// The input positions [begin, end) (step `dilation`) that window `out_pos`
// reads after dropping the taps that fall into the padding; begin >= end
// when every tap falls into the padding (possible with dilation > 1, or in
// ceil mode).
HG_HOST_DEVICE void window_taps(const Axis& a, int64_t out_pos, int64_t& begin, int64_t& end) {
  const int64_t start = out_pos * a.stride - a.pad;
  // first tap at or after position 0 (written without start + dilation,
  // which could wrap for a huge dilation)
  const int64_t behind = start < 0 ? (-start) % a.dilation : 0;
  begin = start >= 0 ? start : (behind == 0 ? 0 : a.dilation - behind);
  const int64_t stop = start + (a.kernel - 1) * a.dilation + 1;
  end = stop < a.in_size ? stop : a.in_size;
}

// Whether window `out_pos` reads at least one input position along this axis.
HG_HOST_DEVICE bool window_reads_input(const Axis& a, int64_t out_pos) {
  int64_t begin, end;
  window_taps(a, out_pos, begin, end);
  return begin < end;
}

// The flat index a window reports when it reads no input at all (its
// maximum is -inf): native's, the position of its first tap past the
// padding's start. No input element has it as its argmax; the backward
// kernels give such windows no gradient. Computed modulo 2^64, as a huge
// dilation can place that tap anywhere.
HG_HOST_DEVICE int64_t empty_window_index(int64_t h0, int64_t w0, int64_t width) {
  return static_cast<int64_t>(static_cast<uint64_t>(h0) * static_cast<uint64_t>(width) +
                              static_cast<uint64_t>(w0));
}

// The output positions [begin, end) whose windows can cover input position
// `in_pos` (used by the gather-style backward, which visits each input once).
HG_HOST_DEVICE void windows_covering(const Axis& a, int64_t in_pos, int64_t& begin, int64_t& end) {
  const int64_t reach = (a.kernel - 1) * a.dilation;
  const int64_t lo = in_pos + a.pad - reach;
  begin = lo <= 0 ? 0 : ceil_div(lo, a.stride);  // not lo + stride - 1: a stride may be 2^63 - 1
  const int64_t hi = floor_div(in_pos + a.pad, a.stride) + 1;
  end = hi < a.out_size ? hi : a.out_size;
}

// The running maximum is replaced by a strictly larger value or by a NaN, so
// NaN propagates and, among equal values, the first one in row-major scan
// order keeps the index (native tie-breaking).
template <typename T>
HG_HOST_DEVICE bool replaces_max(T candidate, T best) {
  return candidate > best || candidate != candidate;
}

}  // namespace max_pool2d
}  // namespace handgrad

#include <ATen/core/Tensor.h>

#include <tuple>

namespace handgrad {
namespace max_pool2d {

struct Geometry {
  int64_t batch;
  int64_t channels;
  Axis h;
  Axis w;
  bool channels_last;  // kernels receive NHWC-dense tensors when true, NCHW-dense otherwise
};

// Backend kernels: all tensors are 4-D and dense in the layout Geometry names.
using ForwardKernel = void (*)(const at::Tensor& input, at::Tensor& output, at::Tensor& indices,
                               const Geometry& g);
using BackwardKernel = void (*)(const at::Tensor& grad_output, const at::Tensor& indices,
                                at::Tensor& grad_input, const Geometry& g);

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, at::IntArrayRef kernel_size,
                                           at::IntArrayRef stride, at::IntArrayRef padding,
                                           at::IntArrayRef dilation, bool ceil_mode,
                                           ForwardKernel kernel);

at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& indices,
                    at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    BackwardKernel kernel);

}  // namespace max_pool2d
}  // namespace handgrad
