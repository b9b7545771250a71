// max_pool2d: the operator schema and the backend-independent driver.
//
// The driver validates every argument (so CPU, CUDA and LibTorch callers get
// the same Python-visible errors), works out the output geometry, allocates
// outputs in the input's memory format (NCHW or channels_last) and hands
// dense 4-D tensors to the backend kernel in cpu/ or cuda/.
#include "ops/max_pool2d.h"

#include "common/checked_math.h"
#include "common/checks.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace handgrad {
namespace max_pool2d {
namespace {

constexpr const char* kOp = "handgrad::max_pool2d";

void check_window(at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation) {
  check_pair(kernel_size, kOp, "kernel_size");
  check_pair(stride, kOp, "stride");
  check_pair(padding, kOp, "padding");
  check_pair(dilation, kOp, "dilation");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(kernel_size[i] > 0, kOp, ": kernel_size must be greater than zero, but got ",
                kernel_size);
    TORCH_CHECK(stride[i] > 0, kOp, ": stride must be greater than zero, but got ", stride);
    TORCH_CHECK(dilation[i] > 0, kOp, ": dilation must be greater than zero, but got ", dilation);
    TORCH_CHECK(padding[i] >= 0, kOp, ": padding must be non-negative, but got ", padding);
    int64_t span = 0;
    TORCH_CHECK(window_span(kernel_size[i], dilation[i], span), kOp,
                ": the window span dilation * (kernel_size - 1) + 1 must be at most 2^62, but "
                "got kernel_size=", kernel_size, " and dilation=", dilation);
    TORCH_CHECK(padding[i] <= span / 2, kOp,
                ": padding should be at most half of the effective kernel size, but got padding=",
                padding, ", kernel_size=", kernel_size, " and dilation=", dilation);
  }
}

// The padded input must fit the size arithmetic of the kernels.
void check_padded_extent(int64_t in_h, int64_t in_w, at::IntArrayRef padding) {
  int64_t padded = 0;
  TORCH_CHECK(padded_extent(in_h, padding[0], padding[0], padded) &&
                  padded_extent(in_w, padding[1], padding[1], padded),
              kOp, ": the padded input (", in_h, "x", in_w, " with padding=", padding,
              ") must be at most 2^62 along each side");
}

Geometry make_geometry(int64_t batch, int64_t channels, int64_t in_h, int64_t in_w,
                       int64_t out_h, int64_t out_w, at::IntArrayRef kernel_size,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       bool channels_last) {
  Geometry g;
  g.batch = batch;
  g.channels = channels;
  // A one-tap window has no dilation; normalizing it keeps the kernels'
  // tap loops (position += dilation) from stepping past 2^63 for dilations
  // the span check lets through (kernel 1, dilation up to 2^63 - 1).
  g.h = Axis{in_h, out_h, kernel_size[0], stride[0], padding[0],
             kernel_size[0] == 1 ? 1 : dilation[0]};
  g.w = Axis{in_w, out_w, kernel_size[1], stride[1], padding[1],
             kernel_size[1] == 1 ? 1 : dilation[1]};
  g.channels_last = channels_last;
  return g;
}

// Unbatched (C, H, W) tensors are computed as a batch of one.
at::Tensor as_batched(const at::Tensor& t) { return t.dim() == 3 ? t.unsqueeze(0) : t; }

at::MemoryFormat layout_of(const at::Tensor& t) {
  return t.dim() == 4 ? t.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, at::IntArrayRef kernel_size,
                                           at::IntArrayRef stride, at::IntArrayRef padding,
                                           at::IntArrayRef dilation, bool ceil_mode,
                                           ForwardKernel kernel) {
  check_floating(input, kOp, "input");
  check_dim_in(input, {3, 4}, kOp, "input");
  for (int64_t d = input.dim() - 3; d < input.dim(); ++d) {
    TORCH_CHECK(input.size(d) > 0, kOp,
                ": expected input with non-zero channel, height and width sizes (only the batch "
                "may be empty), but got shape ",
                input.sizes());
  }
  if (stride.empty()) stride = kernel_size;
  check_window(kernel_size, stride, padding, dilation);

  const at::Tensor x = as_batched(input);
  const int64_t in_h = x.size(2), in_w = x.size(3);
  check_padded_extent(in_h, in_w, padding);
  const int64_t out_h = pooled_size(in_h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode);
  const int64_t out_w = pooled_size(in_w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode);
  TORCH_CHECK(out_h >= 1 && out_w >= 1, kOp, ": the output would be ", out_h, "x", out_w,
              " for an input of ", in_h, "x", in_w, " with kernel_size=", kernel_size,
              ", stride=", stride, ", padding=", padding, ", dilation=", dilation,
              "; the input is too small");

  const at::MemoryFormat format = layout_of(input);
  std::vector<int64_t> out_shape = input.sizes().vec();
  out_shape[out_shape.size() - 2] = out_h;
  out_shape[out_shape.size() - 1] = out_w;
  at::Tensor output = at::empty(out_shape, input.options().memory_format(format));
  at::Tensor indices =
      at::empty(out_shape, input.options().dtype(at::kLong).memory_format(format));
  if (output.numel() == 0) return {output, indices};

  const Geometry g = make_geometry(x.size(0), x.size(1), in_h, in_w, out_h, out_w, kernel_size,
                                   stride, padding, dilation,
                                   format == at::MemoryFormat::ChannelsLast);
  at::Tensor output4 = as_batched(output);
  at::Tensor indices4 = as_batched(indices);
  kernel(x.contiguous(format), output4, indices4, g);
  return {output, indices};
}

at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& indices,
                    at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    BackwardKernel kernel) {
  constexpr const char* op = "handgrad::max_pool2d_backward";
  check_floating(grad_output, op, "grad_output");
  check_dim_in(grad_output, {3, 4}, op, "grad_output");
  check_same_device(grad_output, indices, op, "grad_output", "indices");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op,
                   ": expected indices to be int64, but got ", indices.scalar_type());
  TORCH_CHECK(indices.sizes() == grad_output.sizes(), op,
              ": indices and grad_output must have the same shape, but got ", indices.sizes(),
              " and ", grad_output.sizes());
  TORCH_CHECK(static_cast<int64_t>(input_size.size()) == grad_output.dim(), op,
              ": input_size ", input_size, " must have as many dimensions as grad_output ",
              grad_output.sizes());
  const int64_t lead = grad_output.dim() - 2;
  for (int64_t d = 0; d < lead; ++d) {
    TORCH_CHECK(input_size[d] == grad_output.size(d), op, ": input_size ", input_size,
                " and grad_output ", grad_output.sizes(), " disagree in dimension ", d);
  }
  if (stride.empty()) stride = kernel_size;
  check_window(kernel_size, stride, padding, dilation);
  check_padded_extent(input_size[lead], input_size[lead + 1], padding);

  const at::MemoryFormat format = layout_of(indices);
  at::Tensor grad_input = at::empty(input_size, grad_output.options().memory_format(format));
  if (grad_input.numel() == 0) return grad_input;
  if (grad_output.numel() == 0) return grad_input.zero_();

  const at::Tensor go = as_batched(grad_output);
  const Geometry g = make_geometry(go.size(0), go.size(1), input_size[lead], input_size[lead + 1],
                                   go.size(2), go.size(3), kernel_size, stride, padding, dilation,
                                   format == at::MemoryFormat::ChannelsLast);
  at::Tensor grad_input4 = as_batched(grad_input);
  kernel(go.contiguous(format), as_batched(indices).contiguous(format), grad_input4, g);
  return grad_input;
}

}  // namespace max_pool2d
}  // namespace handgrad

TORCH_LIBRARY_FRAGMENT(handgrad, m) {
  m.def(
      "max_pool2d(Tensor input, int[2] kernel_size, int[2] stride=[], int[2] padding=0, "
      "int[2] dilation=1, bool ceil_mode=False) -> (Tensor output, Tensor indices)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "max_pool2d_backward(Tensor grad_output, Tensor indices, SymInt[] input_size, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}
