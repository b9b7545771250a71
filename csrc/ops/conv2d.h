// conv2d: what the CPU and CUDA kernels share.
//
//  * HG_HOST_DEVICE geometry helpers: where an output position's taps land in
//    the (padded, dilated) input, and which output position, if any, a tap of
//    an input position came from (the transposed map the input gradient
//    gathers through). Compiled for both backends, so the index math of the
//    convolution is written once.
//  * The host-side driver (defined in conv2d.cpp): argument checks with
//    native-like messages, output shapes and layouts, then a backend kernel
//    receiving 4-D tensors (any strides) and the resolved geometry.
#pragma once

#include "common/macros.h"

#include <cstdint>

namespace handgrad {
namespace conv2d {

// One spatial axis. Padding may differ on the two sides (padding='same' with
// an even effective kernel pads one more at the end, as native does).
struct Axis {
  int64_t in_size;
  int64_t out_size;
  int64_t kernel;
  int64_t stride;
  int64_t pad_begin;
  int64_t pad_end;
  int64_t dilation;
};

HG_HOST_DEVICE int64_t effective_kernel(int64_t kernel, int64_t dilation) {
  return dilation * (kernel - 1) + 1;
}

// Output length of one axis; < 1 means the kernel does not fit the padded input.
// The driver has checked that the padded extent and the span are at most
// 2^62 (common/checked_math.h), so no position computed from a geometry
// wraps: positions stay within [-2^62, 2^63).
HG_HOST_DEVICE int64_t out_size(int64_t in_size, int64_t kernel, int64_t stride, int64_t pad_begin,
                                int64_t pad_end, int64_t dilation) {
  const int64_t room = in_size + pad_begin + pad_end - effective_kernel(kernel, dilation);
  return room < 0 ? 0 : room / stride + 1;
}

// Input position read by tap `tap` of output position `out_pos` (may fall in
// the padding: < 0 or >= in_size).
HG_HOST_DEVICE int64_t input_pos(const Axis& a, int64_t out_pos, int64_t tap) {
  return out_pos * a.stride - a.pad_begin + tap * a.dilation;
}

HG_HOST_DEVICE bool inside(int64_t pos, int64_t size) { return pos >= 0 && pos < size; }

// The output position whose tap `tap` reads input position `in_pos`, or -1
// when there is none (between strides, or outside the output).
HG_HOST_DEVICE int64_t output_pos_reading(const Axis& a, int64_t in_pos, int64_t tap) {
  const int64_t shifted = in_pos + a.pad_begin - tap * a.dilation;
  if (shifted < 0 || shifted % a.stride != 0) return -1;
  const int64_t out_pos = shifted / a.stride;
  return out_pos < a.out_size ? out_pos : -1;
}

// The output positions [begin, end) whose tap `tap` reads inside the input
// (the others read padding).
HG_HOST_DEVICE void positions_inside(const Axis& a, int64_t tap, int64_t& begin, int64_t& end) {
  const int64_t first = a.pad_begin - tap * a.dilation;         // out_pos * stride >= first
  const int64_t past = a.in_size + a.pad_begin - tap * a.dilation;  // out_pos * stride < past
  // ceil(v / stride) for v > 0, written without v + stride (a stride may be 2^63 - 1)
  begin = first <= 0 ? 0 : (first - 1) / a.stride + 1;
  end = past <= 0 ? 0 : (past - 1) / a.stride + 1;
  if (end > a.out_size) end = a.out_size;
  if (begin > end) begin = end;
}

}  // namespace conv2d
}  // namespace handgrad

#include <ATen/core/Tensor.h>

namespace handgrad {
namespace conv2d {

struct Geometry {
  int64_t batch;
  int64_t in_channels;   // all groups
  int64_t out_channels;  // all groups
  int64_t groups;
  Axis h;
  Axis w;

  HG_HOST_DEVICE int64_t in_per_group() const { return in_channels / groups; }
  HG_HOST_DEVICE int64_t out_per_group() const { return out_channels / groups; }
  HG_HOST_DEVICE int64_t taps() const { return h.kernel * w.kernel; }
  // Length of one row of the weight matrix: (input channel of the group, kh, kw).
  HG_HOST_DEVICE int64_t patch() const { return in_per_group() * taps(); }
};

// Backend kernels. Activations are 4-D (batch first) with any strides; the
// weight is contiguous (out_channels, in_channels / groups, kh, kw); outputs
// are allocated by the driver and fully written by the kernel.
struct Backend {
  // output = conv(input, weight) + bias (bias may be undefined)
  void (*forward)(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                  at::Tensor& output, const Geometry& g);
  void (*grad_input)(const at::Tensor& grad_output, const at::Tensor& weight,
                     at::Tensor& grad_input, const Geometry& g);
  // grad_weight is contiguous (out_channels, in_channels / groups, kh, kw)
  void (*grad_weight)(const at::Tensor& grad_output, const at::Tensor& input,
                      at::Tensor& grad_weight, const Geometry& g);
  // grad_bias[c] = sum of grad_output over batch and pixels of channel c
  void (*grad_bias)(const at::Tensor& grad_output, at::Tensor& grad_bias);
};

// padding holds (top, bottom, left, right).
at::Tensor forward(const at::Tensor& input, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                   const Backend& backend);

at::Tensor grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                      at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, int64_t groups, const Backend& backend);

at::Tensor grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                       at::IntArrayRef weight_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       const Backend& backend);

at::Tensor grad_bias(const at::Tensor& grad_output, const Backend& backend);

}  // namespace conv2d
}  // namespace handgrad
