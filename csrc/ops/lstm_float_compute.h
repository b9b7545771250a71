// lstm in float16 / bfloat16 on a backend without reduced-precision kernels
// (the CPU): the same drivers and float32 kernels, in float32.
//
// Each entry checks that every tensor has the input's dtype (before any cast,
// so a mixture is still named as one), widens them to float32, runs the
// float32 driver (packed products, gates, cell states, the time loop: all
// float32) and rounds each returned value the user sees (output, h, c and
// every gradient) to the input dtype once, at the end.
//
// What is saved: the activated gates and the cell states (outputs `gates`
// and `cells` of lstm_cell / lstm_layer) stay float32. Rounding them would
// put an error of one half-precision ulp into every factor of the backward
// recurrence (dc_prev = dc' f compounds it over the sequence); kept in
// float32 the gradients are the float32 backward of the float32 forward,
// rounded once. Memory: 2x a half-precision save of those two (5H values
// per step and row, 20 bytes instead of 10).
// The backward needs two float32 states that the op returns rounded: the
// cell's new cell state cy = f cx + i g and the layer's hidden states
// h_t = o_t tanh(c_t) (times W_hr^T with a projection); both are recomputed
// in float32 from the saved float32 gates and cells instead of widening the
// rounded returned values.
#pragma once

#include "ops/lstm.h"

namespace handgrad {
namespace lstm {
namespace float_compute {

// float16 and bfloat16: the dtypes these entries serve.
bool applies(const at::Tensor& input);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const Kernels& k);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cell_backward(
    const c10::optional<at::Tensor>& grad_hy, const c10::optional<at::Tensor>& grad_cy,
    const at::Tensor& gates, const at::Tensor& cx, const at::Tensor& cy, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh, const Kernels& k);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse, const c10::optional<at::Tensor>& w_hr,
    c10::OptionalIntArrayRef batch_sizes, const Kernels& k);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward(const c10::optional<at::Tensor>& grad_output,
               const c10::optional<at::Tensor>& grad_hT, const c10::optional<at::Tensor>& grad_cT,
               const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
               const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output,
               const at::Tensor& gates, const at::Tensor& cells, bool reverse, bool input_grad,
               const c10::optional<at::Tensor>& w_hr, c10::OptionalIntArrayRef batch_sizes,
               const Kernels& k);

}  // namespace float_compute
}  // namespace lstm
}  // namespace handgrad
