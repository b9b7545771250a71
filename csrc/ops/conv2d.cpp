// conv2d: the operator schemas and the backend-independent driver.
//
// Four ops, so that backward computes exactly the gradients autograd asks
// for (each is a separate call, none returns an undefined tensor):
//   conv2d              forward, bias optional
//   conv2d_grad_input   the input gradient
//   conv2d_grad_weight  the weight gradient
//   conv2d_grad_bias    the bias gradient
// Padding is (top, bottom, left, right): the Python wrapper resolves 'same',
// 'valid', ints and pairs into explicit per-side pads.
//
// The driver validates every argument with native-like messages (so CPU,
// CUDA and LibTorch callers see the same errors), works out the geometry,
// allocates outputs (channels_last when the input or weight is, as native)
// and hands 4-D tensors to the backend kernel in cpu/ or cuda/.
#include "ops/conv2d.h"

#include "common/checked_math.h"
#include "common/checks.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace handgrad {
namespace conv2d {
namespace {

constexpr const char* kOp = "handgrad::conv2d";

void check_window(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  int64_t groups, const char* op) {
  check_pair(stride, op, "stride");
  check_pair(dilation, op, "dilation");
  TORCH_CHECK(padding.size() == 4, op,
              ": expected padding to have 4 values (top, bottom, left, right), but got ",
              padding.size(), " (", padding, ")");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(stride[i] > 0, op, ": non-positive stride is not supported, but got stride=",
                stride);
    TORCH_CHECK(dilation[i] > 0, op, ": dilation should be greater than zero, but got dilation=",
                dilation);
  }
  for (int64_t p : padding) {
    TORCH_CHECK(p >= 0, op, ": negative padding is not supported, but got padding=", padding);
  }
  TORCH_CHECK(groups > 0, op, ": non-positive groups is not supported, but got groups=", groups);
}

void check_weight(const at::Tensor& weight, int64_t groups, const char* op) {
  TORCH_CHECK(weight.dim() == 4, op,
              ": expected weight to be 4-D (out_channels, in_channels / groups, kH, kW), but got "
              "weight of size ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) % groups == 0, op, ": given groups=", groups,
              ", expected weight to be divisible by ", groups,
              " at dimension 0, but got weight of size ", weight.sizes(), " instead");
}

// Unbatched (C, H, W) tensors are computed as a batch of one.
at::Tensor as_batched(const at::Tensor& t) { return t.dim() == 3 ? t.unsqueeze(0) : t; }

bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// Native rule: the result is channels_last when either operand is.
at::MemoryFormat result_format(const at::Tensor& activation, const at::Tensor& weight) {
  return is_channels_last(activation) || is_channels_last(weight) ? at::MemoryFormat::ChannelsLast
                                                                  : at::MemoryFormat::Contiguous;
}

Geometry make_geometry(int64_t batch, int64_t in_channels, int64_t in_h, int64_t in_w,
                       at::IntArrayRef weight_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  Geometry g;
  g.batch = batch;
  g.in_channels = in_channels;
  g.out_channels = weight_size[0];
  g.groups = groups;
  const int64_t kh = weight_size[2], kw = weight_size[3];
  g.h = Axis{in_h, out_size(in_h, kh, stride[0], padding[0], padding[1], dilation[0]), kh,
             stride[0], padding[0], padding[1], dilation[0]};
  g.w = Axis{in_w, out_size(in_w, kw, stride[1], padding[2], padding[3], dilation[1]), kw,
             stride[1], padding[2], padding[3], dilation[1]};
  return g;
}

// The padded input and the dilated kernel must fit the kernels' size
// arithmetic (each at most kMaxExtent along a side, so that no sum of
// positions wraps), and the kernel must fit the padded input. Called before
// the geometry is made: out_size() relies on it.
void check_extents(int64_t in_h, int64_t in_w, at::IntArrayRef kernel_size,
                   at::IntArrayRef padding, at::IntArrayRef dilation, const char* op) {
  TORCH_CHECK(in_h >= 0 && in_w >= 0, op, ": expected non-negative spatial sizes, but got ",
              in_h, " x ", in_w);
  TORCH_CHECK(kernel_size[0] > 0 && kernel_size[1] > 0, op,
              ": kernel size should be greater than zero, but got kernel_height: ",
              kernel_size[0], " kernel_width: ", kernel_size[1]);
  int64_t padded_h = 0, padded_w = 0;
  TORCH_CHECK(padded_extent(in_h, padding[0], padding[1], padded_h) &&
                  padded_extent(in_w, padding[2], padding[3], padded_w),
              op, ": the padded input (", in_h, " x ", in_w, " with padding ", padding,
              ") must be at most 2^62 along each side");
  int64_t span_h = 0, span_w = 0;
  const bool spans_fit = window_span(kernel_size[0], dilation[0], span_h) &&
                         window_span(kernel_size[1], dilation[1], span_w);
  TORCH_CHECK(spans_fit && padded_h >= span_h && padded_w >= span_w, op,
              ": calculated padded input size per channel: (", padded_h, " x ", padded_w,
              "). Kernel size: (",
              spans_fit ? std::to_string(span_h) : std::string("beyond 2^62"), " x ",
              spans_fit ? std::to_string(span_w) : std::string("beyond 2^62"),
              ") with dilation ", dilation, ". Kernel size can't be greater than actual input size");
}

void check_activation_dim(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.dim() == 3 || t.dim() == 4, op, ": expected 3-D (unbatched) or 4-D (batched) ",
              arg, ", but got ", arg, " of size: ", t.sizes());
}

void check_channels(int64_t channels, at::IntArrayRef weight_size, int64_t groups,
                    at::IntArrayRef activation_size, const char* op, const char* arg) {
  TORCH_CHECK(channels == weight_size[1] * groups, op, ": given groups=", groups,
              ", weight of size ", weight_size, ", expected ", arg, activation_size, " to have ",
              weight_size[1] * groups, " channels, but got ", channels, " channels instead");
}

}  // namespace

at::Tensor forward(const at::Tensor& input, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias_opt, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                   const Backend& backend) {
  check_activation_dim(input, kOp, "input");
  check_floating(input, kOp, "input");
  check_same_dtype(input, weight, kOp, "input", "weight");
  check_same_device(input, weight, kOp, "input", "weight");
  check_window(stride, padding, dilation, groups, kOp);
  check_weight(weight, groups, kOp);
  const at::Tensor x = as_batched(input);
  check_channels(x.size(1), weight.sizes(), groups, input.sizes(), kOp, "input");
  at::Tensor bias;
  if (bias_opt.has_value() && bias_opt->defined()) {
    bias = *bias_opt;
    check_same_dtype(input, bias, kOp, "input", "bias");
    check_same_device(input, bias, kOp, "input", "bias");
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), kOp, ": given weight of size ",
                weight.sizes(), ", expected bias to be 1-D with ", weight.size(0),
                " elements, but got bias of size ", bias.sizes(), " instead");
    bias = bias.contiguous();
  }
  check_extents(x.size(2), x.size(3), weight.sizes().slice(2), padding, dilation, kOp);
  const Geometry g = make_geometry(x.size(0), x.size(1), x.size(2), x.size(3), weight.sizes(),
                                   stride, padding, dilation, groups);

  std::vector<int64_t> out_shape = input.sizes().vec();
  out_shape[out_shape.size() - 3] = g.out_channels;
  out_shape[out_shape.size() - 2] = g.h.out_size;
  out_shape[out_shape.size() - 1] = g.w.out_size;
  at::Tensor output =
      at::empty(out_shape, input.options().memory_format(
                               input.dim() == 4 ? result_format(input, weight)
                                                : at::MemoryFormat::Contiguous));
  if (output.numel() == 0) return output;
  at::Tensor output4 = as_batched(output);
  backend.forward(x, weight.contiguous(), bias, output4, g);
  return output;
}

at::Tensor grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                      at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, int64_t groups, const Backend& backend) {
  constexpr const char* op = "handgrad::conv2d_grad_input";
  check_activation_dim(grad_output, op, "grad_output");
  check_floating(grad_output, op, "grad_output");
  check_same_dtype(grad_output, weight, op, "grad_output", "weight");
  check_same_device(grad_output, weight, op, "grad_output", "weight");
  check_window(stride, padding, dilation, groups, op);
  check_weight(weight, groups, op);
  TORCH_CHECK(static_cast<int64_t>(input_size.size()) == grad_output.dim(), op, ": input_size ",
              input_size, " must have as many dimensions as grad_output ", grad_output.sizes());
  const at::Tensor go = as_batched(grad_output);
  const int64_t lead = grad_output.dim() - 3;
  check_channels(input_size[lead], weight.sizes(), groups, input_size, op, "input");
  check_extents(input_size[lead + 1], input_size[lead + 2], weight.sizes().slice(2), padding,
                dilation, op);
  const Geometry g = make_geometry(go.size(0), input_size[lead], input_size[lead + 1],
                                   input_size[lead + 2], weight.sizes(), stride, padding, dilation,
                                   groups);
  TORCH_CHECK((lead == 0 || input_size[0] == go.size(0)) && go.size(1) == g.out_channels &&
                  go.size(2) == g.h.out_size && go.size(3) == g.w.out_size,
              op, ": grad_output of size ", grad_output.sizes(),
              " does not match the output of a convolution of input ", input_size,
              " with weight ", weight.sizes());

  at::Tensor result = at::empty(
      input_size, grad_output.options().memory_format(grad_output.dim() == 4
                                                          ? result_format(grad_output, weight)
                                                          : at::MemoryFormat::Contiguous));
  if (result.numel() == 0) return result;
  if (weight.numel() == 0) return result.zero_();
  at::Tensor result4 = as_batched(result);
  backend.grad_input(go, weight.contiguous(), result4, g);
  return result;
}

at::Tensor grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                       at::IntArrayRef weight_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       const Backend& backend) {
  constexpr const char* op = "handgrad::conv2d_grad_weight";
  check_activation_dim(grad_output, op, "grad_output");
  check_activation_dim(input, op, "input");
  check_floating(grad_output, op, "grad_output");
  check_same_dtype(grad_output, input, op, "grad_output", "input");
  check_same_device(grad_output, input, op, "grad_output", "input");
  check_window(stride, padding, dilation, groups, op);
  TORCH_CHECK(weight_size.size() == 4 && weight_size[0] % groups == 0, op,
              ": expected weight_size to be 4 values with the first divisible by groups=", groups,
              ", but got ", weight_size);
  const at::Tensor x = as_batched(input);
  const at::Tensor go = as_batched(grad_output);
  check_channels(x.size(1), weight_size, groups, input.sizes(), op, "input");
  check_extents(x.size(2), x.size(3), weight_size.slice(2), padding, dilation, op);
  const Geometry g = make_geometry(x.size(0), x.size(1), x.size(2), x.size(3), weight_size,
                                   stride, padding, dilation, groups);
  TORCH_CHECK(grad_output.dim() == input.dim() && go.size(0) == g.batch &&
                  go.size(1) == g.out_channels && go.size(2) == g.h.out_size &&
                  go.size(3) == g.w.out_size,
              op, ": grad_output of size ", grad_output.sizes(),
              " does not match the output of a convolution of input ", input.sizes(),
              " with weight ", weight_size);

  at::Tensor result = at::empty(weight_size, grad_output.options());
  if (result.numel() == 0) return result;
  if (go.numel() == 0 || x.numel() == 0) return result.zero_();
  backend.grad_weight(go, x, result, g);
  return result;
}

at::Tensor grad_bias(const at::Tensor& grad_output, const Backend& backend) {
  constexpr const char* op = "handgrad::conv2d_grad_bias";
  check_activation_dim(grad_output, op, "grad_output");
  check_floating(grad_output, op, "grad_output");
  const at::Tensor go = as_batched(grad_output);
  at::Tensor result = at::empty({go.size(1)}, grad_output.options());
  if (result.numel() == 0) return result;
  if (go.numel() == 0) return result.zero_();
  backend.grad_bias(go, result);
  return result;
}

}  // namespace conv2d
}  // namespace handgrad

TORCH_LIBRARY_FRAGMENT(handgrad, m) {
  m.def(
      "conv2d(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, "
      "int[4] padding=0, int[2] dilation=1, int groups=1) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "conv2d_grad_input(Tensor grad_output, Tensor weight, SymInt[] input_size, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "conv2d_grad_weight(Tensor grad_output, Tensor input, SymInt[] weight_size, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def("conv2d_grad_bias(Tensor grad_output) -> Tensor", {at::Tag::pt2_compliant_tag});
}
