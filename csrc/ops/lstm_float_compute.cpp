// lstm in float16 / bfloat16 through the float32 drivers: see
// ops/lstm_float_compute.h for what is computed, saved and rounded.
#include "ops/lstm_float_compute.h"

#include "common/checks.h"

#include <ATen/ops/addcmul.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/tanh.h>

namespace handgrad {
namespace lstm {
namespace float_compute {
namespace {

// t (which must have input's dtype and device) in float32; undefined stays undefined.
at::Tensor widened(const at::Tensor& t, const at::Tensor& input, const char* op,
                   const char* name) {
  if (!t.defined()) return t;
  check_same_dtype(input, t, op, "input", name);
  check_same_device(input, t, op, "input", name);
  return t.to(at::kFloat);
}

c10::optional<at::Tensor> widened(const c10::optional<at::Tensor>& t, const at::Tensor& input,
                                  const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  return widened(*t, input, op, name);
}

// The saved gates and cells come from the forward op as float32.
void check_saved(const at::Tensor& t, const at::Tensor& input, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": for ", input.scalar_type(),
                   " input on ", input.device(), " the saved ", name,
                   " are float32 (as the forward op returns them), but got ", t.scalar_type());
  check_same_device(input, t, op, "input", name);
}

at::Tensor rounded(const at::Tensor& t, at::ScalarType type) { return t.to(type); }

}  // namespace

bool applies(const at::Tensor& input) {
  return input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const Kernels& k) {
  constexpr const char* op = "handgrad::lstm_cell";
  const at::ScalarType type = input.scalar_type();
  auto [hy, cy, gates] = lstm::cell_forward(
      input.to(at::kFloat), widened(hx, input, op, "hx"), widened(cx, input, op, "cx"),
      widened(w_ih, input, op, "w_ih"), widened(w_hh, input, op, "w_hh"),
      widened(b_ih, input, op, "b_ih"), widened(b_hh, input, op, "b_hh"), k);
  return {rounded(hy, type), rounded(cy, type), gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cell_backward(
    const c10::optional<at::Tensor>& grad_hy, const c10::optional<at::Tensor>& grad_cy,
    const at::Tensor& gates, const at::Tensor& cx, const at::Tensor& cy, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh, const Kernels& k) {
  constexpr const char* op = "handgrad::lstm_cell_backward";
  const at::ScalarType type = input.scalar_type();
  check_saved(gates, input, op, "gates");
  const at::Tensor cx32 = widened(cx, input, op, "cx");
  check_same_dtype(input, cy, op, "input", "cy");  // recomputed in float32 below
  check_same_device(input, cy, op, "input", "cy");
  // cy in float32: f cx + i g from the saved gates, as the forward computed it.
  at::Tensor cy32 = cy.to(at::kFloat);
  if (gates.dim() == 2 && cx.dim() == 2 && gates.size(0) == cx.size(0) &&
      gates.size(1) == 4 * cx.size(1)) {
    const int64_t H = cx.size(1);
    cy32 = at::addcmul(at::mul(gates.narrow(1, H, H), cx32), gates.narrow(1, 0, H),
                       gates.narrow(1, 2 * H, H));
  }  // else: the driver names the shape mismatch
  auto [gx, ghx, gcx, gw_ih, gw_hh, gb] = lstm::cell_backward(
      widened(grad_hy, input, op, "grad_hy"), widened(grad_cy, input, op, "grad_cy"), gates,
      cx32, cy32, input.to(at::kFloat), widened(hx, input, op, "hx"),
      widened(w_ih, input, op, "w_ih"), widened(w_hh, input, op, "w_hh"), k);
  return {rounded(gx, type),    rounded(ghx, type),   rounded(gcx, type),
          rounded(gw_ih, type), rounded(gw_hh, type), rounded(gb, type)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse, const c10::optional<at::Tensor>& w_hr,
    c10::OptionalIntArrayRef batch_sizes, const Kernels& k) {
  constexpr const char* op = "handgrad::lstm_layer";
  const at::ScalarType type = input.scalar_type();
  auto [output, hT, cT, gates, cells] = lstm::layer_forward(
      input.to(at::kFloat), widened(h0, input, op, "h0"), widened(c0, input, op, "c0"),
      widened(w_ih, input, op, "w_ih"), widened(w_hh, input, op, "w_hh"),
      widened(b_ih, input, op, "b_ih"), widened(b_hh, input, op, "b_hh"), reverse,
      widened(w_hr, input, op, "w_hr"), batch_sizes, k);
  return {rounded(output, type), rounded(hT, type), rounded(cT, type), gates, cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward(const c10::optional<at::Tensor>& grad_output,
               const c10::optional<at::Tensor>& grad_hT, const c10::optional<at::Tensor>& grad_cT,
               const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
               const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output,
               const at::Tensor& gates, const at::Tensor& cells, bool reverse, bool input_grad,
               const c10::optional<at::Tensor>& w_hr, c10::OptionalIntArrayRef batch_sizes,
               const Kernels& k) {
  constexpr const char* op = "handgrad::lstm_layer_backward";
  const at::ScalarType type = input.scalar_type();
  check_saved(gates, input, op, "gates");
  check_saved(cells, input, op, "cells");
  const c10::optional<at::Tensor> w_hr32 = widened(w_hr, input, op, "w_hr");
  at::Tensor output32 = widened(output, input, op, "output");
  // h_t in float32 from the saved o_t and c_t (the driver checks the shapes;
  // recomputed only where they agree, else the widened output is passed on
  // for the driver to name the mismatch).
  const int64_t H = cells.dim() > 0 ? cells.size(-1) : 0;
  if (cells.dim() > 0 && gates.dim() == cells.dim() && gates.size(-1) == 4 * H &&
      gates.sizes().slice(0, gates.dim() - 1) == cells.sizes().slice(0, cells.dim() - 1)) {
    at::Tensor m = at::mul(gates.narrow(-1, 3 * H, H), at::tanh(cells));
    if (w_hr32.has_value() && w_hr32->dim() == 2 && w_hr32->size(1) == H) {
      m = at::matmul(m, w_hr32->t());
    }
    if (m.sizes() == output.sizes()) output32 = m;
  }
  auto [gx, gh0, gc0, gw_ih, gw_hh, gb, gw_hr] = lstm::layer_backward(
      widened(grad_output, input, op, "grad_output"), widened(grad_hT, input, op, "grad_hT"),
      widened(grad_cT, input, op, "grad_cT"), input.to(at::kFloat),
      widened(h0, input, op, "h0"), widened(c0, input, op, "c0"),
      widened(w_ih, input, op, "w_ih"), widened(w_hh, input, op, "w_hh"), output32, gates, cells,
      reverse, input_grad, w_hr32, batch_sizes, k);
  return {rounded(gx, type),    rounded(gh0, type),   rounded(gc0, type), rounded(gw_ih, type),
          rounded(gw_hh, type), rounded(gb, type),    rounded(gw_hr, type)};
}

}  // namespace float_compute
}  // namespace lstm
}  // namespace handgrad
