// lstm: what the CPU and CUDA kernels share.
//
//  * HG_HOST_DEVICE scalar helpers: the activations and the pointwise cell
//    forward and backward, written once for both backends (gate order i, f,
//    g, o as in PyTorch).
//  * The host-side drivers (defined in lstm.cpp) for the cell and for one
//    direction of one layer. They validate arguments, run the matrix products
//    (at::mm / at::addmm_, plain matrix products, on either device) and call
//    the backend's pointwise kernels, so the time loop is written once.
#pragma once

#include "common/macros.h"

#include <cmath>
#include <cstdint>

namespace handgrad {
namespace lstm {

// T is float or double (the CUDA kernels compute half/bfloat16 in float);
// std::exp / std::tanh have float and double overloads on host and device.
template <typename T>
HG_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <typename T>
HG_HOST_DEVICE T tanh_(T x) {
  return std::tanh(x);
}

// Pointwise forward of one hidden unit. gi..go are the gate pre-activations
// (both matrix products and both biases already summed), c the previous cell.
// Writes the activated gates back into gi..go and returns c', h'.
template <typename T>
HG_HOST_DEVICE void cell_forward(T& gi, T& gf, T& gg, T& go, T c, T& c_new, T& h_new) {
  const T i = sigmoid(gi), f = sigmoid(gf), g = tanh_(gg), o = sigmoid(go);
  c_new = f * c + i * g;
  h_new = o * tanh_(c_new);
  gi = i;
  gf = f;
  gg = g;
  go = o;
}

// Pointwise backward of one hidden unit. dh, dc: gradients reaching h' and c'
// (zero where nothing flows back); i, f, g, o the activated gates; c the
// previous cell; tc = tanh(c'). Writes the gradients of the gate
// pre-activations to di..do and returns the gradient of the previous cell.
//   do = dh tanh(c');  dc' = dh o (1 - tanh^2 c') + dc;
//   di = dc' g;  df = dc' c;  dg = dc' i;  dc_prev = dc' f;
//   then sigma' = s(1 - s) for i, f, o and tanh' = 1 - g^2 for g.
template <typename T>
HG_HOST_DEVICE T cell_backward(T dh, T dc, T i, T f, T g, T o, T c, T tc, T& di, T& df, T& dg,
                               T& dout) {
  const T dct = dh * o * (T(1) - tc * tc) + dc;
  dout = dh * tc * o * (T(1) - o);
  di = dct * g * i * (T(1) - i);
  df = dct * c * f * (T(1) - f);
  dg = dct * i * (T(1) - g * g);
  return dct * f;
}

// One hidden unit j of one row, on row-major rows: g = the row's [i|f|g|o]
// gates (in: pre-activations without bias; out: activated), c, c_new, h_new
// = the row's states; bih, bhh may be null. T is the storage type, A the
// type the math runs in (float for half / bfloat16).
template <typename T, typename A>
HG_HOST_DEVICE void forward_unit(T* g, const T* bih, const T* bhh, const T* c, T* c_new,
                                 T* h_new, int64_t H, int64_t j) {
  A pre[4];
  for (int q = 0; q < 4; ++q) {
    pre[q] = static_cast<A>(g[q * H + j]) + (bih ? static_cast<A>(bih[q * H + j]) : A(0)) +
             (bhh ? static_cast<A>(bhh[q * H + j]) : A(0));
  }
  A cn, hn;
  cell_forward(pre[0], pre[1], pre[2], pre[3], static_cast<A>(c[j]), cn, hn);
  c_new[j] = static_cast<T>(cn);
  h_new[j] = static_cast<T>(hn);
  for (int q = 0; q < 4; ++q) g[q * H + j] = static_cast<T>(pre[q]);
}

// The backward of forward_unit: dh = dh_a + dh_b and dc (null: zero) reach
// h' and c'; writes the row's gate-gradient unit j and dc_prev[j] (dc_prev
// may be dc: dc[j] is read first).
template <typename T, typename A>
HG_HOST_DEVICE void backward_unit(const T* dh_a, const T* dh_b, const T* dc, const T* g,
                                  const T* c, const T* c_new, T* dg, T* dc_prev, int64_t H,
                                  int64_t j) {
  const A dh = (dh_a ? static_cast<A>(dh_a[j]) : A(0)) + (dh_b ? static_cast<A>(dh_b[j]) : A(0));
  A d[4];
  const A dcp = cell_backward(dh, dc ? static_cast<A>(dc[j]) : A(0), static_cast<A>(g[j]),
                              static_cast<A>(g[H + j]), static_cast<A>(g[2 * H + j]),
                              static_cast<A>(g[3 * H + j]), static_cast<A>(c[j]),
                              tanh_(static_cast<A>(c_new[j])), d[0], d[1], d[2], d[3]);
  dc_prev[j] = static_cast<T>(dcp);
  for (int q = 0; q < 4; ++q) dg[q * H + j] = static_cast<T>(d[q]);
}

}  // namespace lstm
}  // namespace handgrad

#include <ATen/core/Tensor.h>

#include <c10/util/OptionalArrayRef.h>

#include <memory>
#include <tuple>

namespace handgrad {
namespace lstm {

// Backend kernels. Every tensor is contiguous; B rows, H hidden units, the
// gate rows are [i | f | g | o], each H wide.
struct Kernels {
  // gates (B, 4H): in, the summed matrix products; out, the activated gates.
  // b_ih, b_hh (4H) may be undefined (no bias). c_prev, c_new, h_new (B, H).
  void (*forward)(at::Tensor& gates, const at::Tensor& b_ih, const at::Tensor& b_hh,
                  const at::Tensor& c_prev, at::Tensor& c_new, at::Tensor& h_new);
  // dh = dh_a + dh_b and dc (all (B, H)) may each be undefined (zero).
  // Writes dgates (B, 4H) and dc_prev (B, H); dc_prev may be the same
  // tensor as dc (each element is read before it is written).
  void (*backward)(const at::Tensor& dh_a, const at::Tensor& dh_b, const at::Tensor& dc,
                   const at::Tensor& gates, const at::Tensor& c_prev, const at::Tensor& c_new,
                   at::Tensor& dgates, at::Tensor& dc_prev);
  // out (C) = column sums of m (R, C).
  void (*column_sum)(const at::Tensor& m, at::Tensor& out);
  // Optional matrix product hooks (nullptr: the driver uses at::mm / addmm_).
  // matmul: c = a b, or c += a b with accumulate; c is 2-D with unit column
  // stride, a and b any 2-D views; `packed` is what pack(b) returned, or
  // nullptr. Returns false when it does not handle these tensors.
  bool (*matmul)(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                 const void* packed);
  // b prepared once for many products with the same right-hand side (the
  // recurrent weight of every time step); may return nullptr.
  std::shared_ptr<const void> (*pack)(const at::Tensor& b);
  // Optional fused time steps (nullptr, or false when they do not handle
  // these tensors: the driver then runs the products and forward/backward).
  // step_forward: gates (+)= a W (accumulate), a (B, K) with unit column
  // stride (the previous hidden state, or the layer's combined operand
  // [h_prev | x_t | 1]), w_packed = pack(W) for W (K, 4H); then forward,
  // which also writes h_new into h_copy (B, H) when that is defined.
  // step_backward: backward, then dh_prev = dgates W_hh (w_hh_packed
  // = pack(W_hh)) and, when grad_x is defined, grad_x = dgates W_ih
  // (w_ih_packed = pack(W_ih)). dh_prev may be the tensor passed as dh_b.
  bool (*step_forward)(at::Tensor& gates, const at::Tensor& a, const void* w_packed,
                       bool accumulate, const at::Tensor& b_ih, const at::Tensor& b_hh,
                       const at::Tensor& c_prev, at::Tensor& c_new, at::Tensor& h_new,
                       at::Tensor& h_copy);
  bool (*step_backward)(const at::Tensor& dh_a, const at::Tensor& dh_b, const at::Tensor& dc,
                        const at::Tensor& gates, const at::Tensor& c_prev,
                        const at::Tensor& c_new, at::Tensor& dgates, at::Tensor& dc_prev,
                        const void* w_hh_packed, at::Tensor& dh_prev, const void* w_ih_packed,
                        at::Tensor& grad_x);
};

// (hy, cy, gates)
std::tuple<at::Tensor, at::Tensor, at::Tensor> cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const Kernels& k);

// (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cell_backward(
    const c10::optional<at::Tensor>& grad_hy, const c10::optional<at::Tensor>& grad_cy,
    const at::Tensor& gates, const at::Tensor& cx, const at::Tensor& cy, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh, const Kernels& k);

// One direction of one layer. Padded: input (T, B, I), batch_sizes absent.
// Packed (a PackedSequence's data): input (N, I) with batch_sizes (T), the
// rows of step t being the first batch_sizes[t] sequences. w_hr (P, H), when
// defined, projects every hidden state: h_t = W_hr (o_t * tanh(c_t)), and
// h0, hT, output then have P columns instead of H.
// (output, hT, cT, gates, cells)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse, const c10::optional<at::Tensor>& w_hr,
    c10::OptionalIntArrayRef batch_sizes, const Kernels& k);

// (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b, grad_w_hr); grad_w_hr is an
// empty placeholder without a projection.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward(const c10::optional<at::Tensor>& grad_output,
               const c10::optional<at::Tensor>& grad_hT, const c10::optional<at::Tensor>& grad_cT,
               const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
               const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output,
               const at::Tensor& gates, const at::Tensor& cells, bool reverse, bool input_grad,
               const c10::optional<at::Tensor>& w_hr, c10::OptionalIntArrayRef batch_sizes,
               const Kernels& k);

}  // namespace lstm
}  // namespace handgrad
