// lstm_cell: first-order autograd, registered in C++ (Autograd dispatch key).
//
// Why not the Python kernel of torch.library.register_autograd (as
// lstm_layer keeps): a cell is one small step, called once per time step by
// the models that use nn.LSTMCell, and at (64, 28) -> 128 the Python layer
// around the two kernels was a third of the step. Measured on a 2-core AMD
// EPYC Zen 4, 1 thread, microseconds per forward + backward (median of 30
// interleaved rounds, benchmarks/bench_lstm.py's cell case shape):
// handgrad through the Python kernel 610, the two raw kernels alone 415,
// native nn.LSTMCell 755 (that machine was busy; the proportions are what
// matter). This node calls the same kernels: handgrad::lstm_cell, and
// handgrad::lstm_cell_backward for the gradients, as the Python formulas do.
//
// Saved for backward: input, hx, cx, both weights, and the outputs gates and
// cy (the activated gates i, f, g, o and the new cell state).
//
// The gates are a differentiable output (see _lstm_autograd.py): a second
// differentiation of lstm_cell_backward, which reads them, sends them a
// gradient G. As gates = act(z) with z = x W_ih^T + h W_hh^T + b, G reaches
// z as dz = G * s, s the activations' slopes [i(1-i) | f(1-f) | 1-g^2 |
// o(1-o)], and from z the linear parts: dx = dz W_ih, dh = dz W_hh,
// dW_ih = dz^T x, dW_hh = dz^T h, db = sum_rows dz (no path to cx). These are
// torch operations, so they are differentiable again.
//
// Everything but first-order reverse mode -- forward-mode AD and the
// torch.func transforms -- takes the Python formulas: handgrad.ops.lstm_cell
// applies them itself (handgrad.ops._autograd.call, registered with
// dispatcher=False), and a raw torch.ops call meeting those cases raises
// (csrc/common/autograd_kernel.h). The backward op is called through the
// dispatcher (so it records its graph) only when grad mode is on or an
// incoming gradient is dual, otherwise straight to the CPU/CUDA kernel.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/matmul.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "../common/autograd_kernel.h"

namespace handgrad {
namespace lstm {
namespace {

using autograd_kernel::has_forward_grad;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Six = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("handgrad::lstm_cell", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&)>();
  return op.call(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
}

Six call_backward(const std::optional<at::Tensor>& grad_hy, const std::optional<at::Tensor>& grad_cy,
                  const at::Tensor& gates, const at::Tensor& cx, const at::Tensor& cy,
                  const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                  const at::Tensor& w_hh) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("handgrad::lstm_cell_backward", "")
                       .typed<Six(const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_hy, grad_cy, gates, cx, cy, input, hx, w_ih, w_hh);
}

// d gates / d z, read off the activated gates.
at::Tensor slopes(const at::Tensor& gates) {
  const std::vector<at::Tensor> g = gates.tensor_split(4, -1);
  return at::cat({g[0] * (1 - g[0]), g[1] * (1 - g[1]), 1 - g[2] * g[2], g[3] * (1 - g[3])}, -1);
}

// The gradients a gradient G of the gates sends to input, hx, w_ih, w_hh
// and the bias (see the top of the file), in the gates' dtype: float32 for
// float16 / bfloat16 input on the CPU, which computes those in float32.
std::array<at::Tensor, 6> through_gates(const at::Tensor& grad_gates, const at::Tensor& gates,
                                        const at::Tensor& input, const at::Tensor& hx,
                                        const at::Tensor& w_ih, const at::Tensor& w_hh) {
  const auto wide = [&](const at::Tensor& t) { return t.to(gates.scalar_type()); };
  const at::Tensor dz = wide(grad_gates) * slopes(gates);
  const at::Tensor dz_t = dz.t();
  return {at::matmul(dz, wide(w_ih)), at::matmul(dz, wide(w_hh)), at::Tensor(),
          at::matmul(dz_t, wide(input)), at::matmul(dz_t, wide(hx)), dz.sum(0)};
}

// a + b (either may be undefined), rounded once to `like`'s dtype.
at::Tensor add_like(const at::Tensor& a, const at::Tensor& b, const at::Tensor& like) {
  if (!b.defined()) return a;
  const at::Tensor sum = a.defined() ? a.to(b.scalar_type()) + b : b;
  return sum.to(like.scalar_type());
}

class LstmCellFunction : public torch::autograd::Function<LstmCellFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                               const std::optional<at::Tensor>& b_hh) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [hy, cy, gates] = call_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
    ctx->save_for_backward({input, hx, cx, w_ih, w_hh, gates, cy});
    // An absent optional argument is no input edge of the node: needs_input_grad
    // counts only the biases passed.
    ctx->saved_data["has_b_ih"] = b_ih.has_value() && b_ih->defined();
    ctx->saved_data["has_b_hh"] = b_hh.has_value() && b_hh->defined();
    ctx->set_materialize_grads(false);
    return {hy, cy, gates};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const at::Tensor &grad_hy = grads[0], &grad_cy = grads[1], &grad_gates = grads[2];
    variable_list result(7);
    if (!grad_hy.defined() && !grad_cy.defined() && !grad_gates.defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &hx = saved[1], &cx = saved[2], &w_ih = saved[3],
                     &w_hh = saved[4], &gates = saved[5], &cy = saved[6];
    at::Tensor g[6];  // input, hx, cx, w_ih, w_hh, bias
    if (grad_hy.defined() || grad_cy.defined()) {
      // Straight to the kernels unless these gradients may be differentiated again.
      std::optional<at::AutoDispatchBelowADInplaceOrView> plain;
      if (!at::GradMode::is_enabled() && !has_forward_grad(grad_hy) &&
          !has_forward_grad(grad_cy)) {
        plain.emplace();
      }
      std::tie(g[0], g[1], g[2], g[3], g[4], g[5]) =
          call_backward(autograd_kernel::optional_of(grad_hy),
                        autograd_kernel::optional_of(grad_cy), gates, cx, cy, input, hx, w_ih,
                        w_hh);
    }
    if (grad_gates.defined()) {
      // Only a second differentiation reaches the gates.
      const std::array<at::Tensor, 6> extra =
          through_gates(grad_gates, gates, input, hx, w_ih, w_hh);
      const at::Tensor* likes[6] = {&input, &hx, &cx, &w_ih, &w_hh, &input};
      for (int k = 0; k < 6; ++k) g[k] = add_like(g[k], extra[k], *likes[k]);
    }
    for (int k = 0; k < 5; ++k) {
      if (ctx->needs_input_grad(k)) result[k] = g[k];
    }
    // The same gradient for both biases; the second gets its own copy, so
    // the two .grad tensors never share storage.
    const bool has_ih = ctx->saved_data["has_b_ih"].toBool();
    const bool needs_ih = has_ih && ctx->needs_input_grad(5);
    const bool needs_hh =
        ctx->saved_data["has_b_hh"].toBool() && ctx->needs_input_grad(has_ih ? 6 : 5);
    if (needs_ih) result[5] = g[5];
    if (needs_hh) result[6] = needs_ih && g[5].defined() ? g[5].clone() : g[5];
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_autograd(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh) {
  autograd_kernel::refuse_transforms_and_duals(
      "handgrad::lstm_cell", "handgrad.ops.lstm_cell", "lstm_cell",
      {has_forward_grad(input), has_forward_grad(hx), has_forward_grad(cx),
       has_forward_grad(w_ih), has_forward_grad(w_hh), has_forward_grad(b_ih),
       has_forward_grad(b_hh)});
  const variable_list out = LstmCellFunction::apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace lstm
}  // namespace handgrad

// The backward op's Autograd kernel (double backward) and lstm_layer's are
// registered from Python, with the formulas.
TORCH_LIBRARY_IMPL(handgrad, Autograd, m) {
  m.impl("lstm_cell", &handgrad::lstm::lstm_cell_autograd);
}
