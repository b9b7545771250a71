// lstm: the operator schemas and the backend-independent drivers.
//
// The drivers validate every argument (so CPU, CUDA and LibTorch callers get
// the same Python-visible errors), run the matrix products (the backend's
// own product when it provides one -- the CPU's AVX-512 kernel in
// common/cpu_gemm.cpp for float32 -- else at::mm / at::addmm_, plain matrix
// products, allowed by the project rules) and call the backend's fused
// pointwise kernels. The layer's time loop is here, in C++. With the
// backend's fused steps (the CPU's, float32) each step is ONE product,
// [h_{t-1} | x_t | 1] (B, H+I+1) times [W_hh^T; W_ih^T; b_ih + b_hh] packed
// once, followed on the same rows by the pointwise pass, which writes h_t
// into the output, into the next step's operand row and c_t into the saved
// cell buffer. Otherwise (CUDA, float64, a CPU without AVX-512) the
// input projection of all time steps is one product (T*B, I) x (I, 4H) and
// each step adds one (B, H) x (H, 4H) product into its slice of the gate
// buffer before the pointwise kernel.
// Backward through time is one loop over the saved gates; each step's gate
// gradient (one reused (B, 4H) buffer) feeds, while in cache, dh_{t-1} =
// dgates_t W_hh, grad_input_t = dgates_t W_ih, and the weight and bias
// gradients, accumulated as [h_{t-1} | x_t | 1]^T dgates_t (the last row,
// from the column of ones, is the bias gradient).
#include "ops/lstm.h"

#include "common/checks.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace handgrad {
namespace lstm {
namespace {

at::Tensor defined_or_empty(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// Checks the weights and biases against the input size; returns the hidden size.
int64_t check_parameters(const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const c10::optional<at::Tensor>& b_ih,
                         const c10::optional<at::Tensor>& b_hh, const char* op) {
  check_floating(input, op, "input");
  check_dim_in(w_ih, {2}, op, "w_ih");
  check_dim_in(w_hh, {2}, op, "w_hh");
  const int64_t H = w_hh.size(1);
  TORCH_CHECK(H > 0, op, ": the hidden size (w_hh.size(1)) must be positive, but w_hh has shape ",
              w_hh.sizes());
  TORCH_CHECK(w_hh.size(0) == 4 * H, op,
              ": expected w_hh of shape (4*hidden_size, hidden_size) = (", 4 * H, ", ", H,
              "), but got ", w_hh.sizes());
  TORCH_CHECK(w_ih.size(0) == 4 * H, op, ": expected w_ih to have 4*hidden_size = ", 4 * H,
              " rows, but got shape ", w_ih.sizes());
  TORCH_CHECK(input.size(-1) == w_ih.size(1), op,
              ": input has inconsistent input_size: got ", input.size(-1), ", expected ",
              w_ih.size(1), " (w_ih.size(1))");
  check_same_dtype(input, w_ih, op, "input", "w_ih");
  check_same_dtype(input, w_hh, op, "input", "w_hh");
  check_same_device(input, w_ih, op, "input", "w_ih");
  check_same_device(input, w_hh, op, "input", "w_hh");
  const char* names[2] = {"b_ih", "b_hh"};
  const c10::optional<at::Tensor>* biases[2] = {&b_ih, &b_hh};
  for (int k = 0; k < 2; ++k) {
    if (!biases[k]->has_value() || !(*biases[k])->defined()) continue;
    const at::Tensor& b = **biases[k];
    TORCH_CHECK(b.dim() == 1 && b.size(0) == 4 * H, op, ": expected ", names[k],
                " of shape (4*hidden_size,) = (", 4 * H, ",), but got ", b.sizes());
    check_same_dtype(input, b, op, "input", names[k]);
    check_same_device(input, b, op, "input", names[k]);
  }
  return H;
}

void check_state(const at::Tensor& input, const at::Tensor& state, int64_t B, int64_t H,
                 const char* op, const char* name) {
  TORCH_CHECK(state.dim() == 2 && state.size(0) == B && state.size(1) == H, op, ": expected ",
              name, " of shape (batch, hidden_size) = (", B, ", ", H, "), but got ",
              state.sizes());
  check_same_dtype(input, state, op, "input", name);
  check_same_device(input, state, op, "input", name);
}

void check_like(const c10::optional<at::Tensor>& t, const at::Tensor& like, const char* op,
                const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->sizes() == like.sizes(), op, ": expected ", name, " of shape ", like.sizes(),
              ", but got ", t->sizes());
  check_same_dtype(like, *t, op, "the saved tensors", name);
  check_same_device(like, *t, op, "the saved tensors", name);
}

// c = a b (or c += a b): the backend's product when it has one, else at::mm.
void mm_into(const Kernels& k, at::Tensor c, const at::Tensor& a, const at::Tensor& b,
             bool accumulate, const void* packed = nullptr) {
  if (k.matmul && k.matmul(c, a, b, accumulate, packed)) return;
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

at::Tensor mm(const Kernels& k, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options());
  mm_into(k, c, a, b, false);
  return c;
}

std::shared_ptr<const void> pack(const Kernels& k, const at::Tensor& b) {
  return k.pack ? k.pack(b) : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const Kernels& k) {
  constexpr const char* op = "handgrad::lstm_cell";
  check_dim_in(input, {2}, op, "input");
  const int64_t H = check_parameters(input, w_ih, w_hh, b_ih, b_hh, op);
  const int64_t B = input.size(0);
  check_state(input, hx, B, H, op, "hx");
  check_state(input, cx, B, H, op, "cx");

  // One gate matrix from both products: x W_ih^T, then += h W_hh^T in place.
  at::Tensor gates = mm(k, input, w_ih.t());
  mm_into(k, gates, hx, w_hh.t(), true);
  at::Tensor hy = at::empty({B, H}, input.options());
  at::Tensor cy = at::empty({B, H}, input.options());
  if (B > 0) {
    k.forward(gates, defined_or_empty(b_ih), defined_or_empty(b_hh), cx.contiguous(), cy, hy);
  }
  return {hy, cy, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cell_backward(
    const c10::optional<at::Tensor>& grad_hy, const c10::optional<at::Tensor>& grad_cy,
    const at::Tensor& gates, const at::Tensor& cx, const at::Tensor& cy, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh, const Kernels& k) {
  constexpr const char* op = "handgrad::lstm_cell_backward";
  check_dim_in(input, {2}, op, "input");
  const int64_t H = check_parameters(input, w_ih, w_hh, c10::nullopt, c10::nullopt, op);
  const int64_t B = input.size(0);
  check_state(input, hx, B, H, op, "hx");
  check_state(input, cx, B, H, op, "cx");
  check_state(input, cy, B, H, op, "cy");
  TORCH_CHECK(gates.dim() == 2 && gates.size(0) == B && gates.size(1) == 4 * H, op,
              ": expected gates of shape (", B, ", ", 4 * H, "), but got ", gates.sizes());
  check_like(grad_hy, cy, op, "grad_hy");
  check_like(grad_cy, cy, op, "grad_cy");

  at::Tensor dgates = at::empty({B, 4 * H}, input.options());
  at::Tensor grad_cx = at::empty({B, H}, input.options());
  if (B > 0) {
    k.backward(defined_or_empty(grad_hy), at::Tensor(), defined_or_empty(grad_cy),
               gates.contiguous(), cx.contiguous(), cy.contiguous(), dgates, grad_cx);
  }
  at::Tensor grad_b = at::empty({4 * H}, input.options());
  k.column_sum(dgates, grad_b);
  return {mm(k, dgates, w_ih), mm(k, dgates, w_hh), grad_cx, mm(k, dgates.t(), input),
          mm(k, dgates.t(), hx), grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse, const Kernels& k) {
  constexpr const char* op = "handgrad::lstm_layer";
  check_dim_in(input, {3}, op, "input (seq_len, batch, input_size)");
  const int64_t H = check_parameters(input, w_ih, w_hh, b_ih, b_hh, op);
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  TORCH_CHECK(T > 0, op, ": expected a sequence length of at least 1, but got input of shape ",
              input.sizes());
  check_state(input, h0, B, H, op, "h0");
  check_state(input, c0, B, H, op, "c0");

  const at::Tensor bih = defined_or_empty(b_ih), bhh = defined_or_empty(b_hh);
  at::Tensor output = at::empty({T, B, H}, input.options());
  at::Tensor cells = at::empty({T, B, H}, input.options());
  if (B > 0 && k.step_forward && k.pack) {
    // The backend's fused steps over one combined product per step:
    // gates_t = [h_prev | x_t | 1] [W_hh^T; W_ih^T; b_ih + b_hh], the operand
    // rows laid out in hx (row t: the state step t reads, its input, a one),
    // each step writing its h_t into the next step's row.
    const int64_t K = H + I + 1;
    at::Tensor w_cat = at::empty({K, 4 * H}, input.options());
    w_cat.narrow(0, 0, H).copy_(w_hh.t());
    w_cat.narrow(0, H, I).copy_(w_ih.t());
    at::Tensor bias_row = w_cat.select(0, H + I);
    if (bih.defined()) {
      bias_row.copy_(bih);
      if (bhh.defined()) bias_row.add_(bhh);
    } else if (bhh.defined()) {
      bias_row.copy_(bhh);
    } else {
      bias_row.zero_();
    }
    const std::shared_ptr<const void> w_packed = pack(k, w_cat);
    if (w_packed) {
      at::Tensor gates = at::empty({T, B, 4 * H}, input.options());
      at::Tensor hx = at::empty({T, B, K}, input.options());
      hx.narrow(2, H, I).copy_(input);
      hx.select(2, H + I).fill_(1);
      hx.select(0, reverse ? T - 1 : 0).narrow(1, 0, H).copy_(h0);
      const at::Tensor none;
      at::Tensor h_prev, c_prev = c0.contiguous();
      for (int64_t s = 0; s < T; ++s) {
        const int64_t t = reverse ? T - 1 - s : s;
        at::Tensor g_t = gates.select(0, t);
        at::Tensor c_t = cells.select(0, t);
        at::Tensor h_t = output.select(0, t);
        const at::Tensor a_t = hx.select(0, t);
        at::Tensor h_next =
            s + 1 < T ? hx.select(0, reverse ? t - 1 : t + 1).narrow(1, 0, H) : at::Tensor();
        if (!k.step_forward(g_t, a_t, w_packed.get(), false, none, none, c_prev, c_t, h_t,
                            h_next)) {
          mm_into(k, g_t, a_t, w_cat, false, w_packed.get());
          k.forward(g_t, none, none, c_prev, c_t, h_t);
          if (h_next.defined()) h_next.copy_(h_t);
        }
        h_prev = h_t;
        c_prev = c_t;
      }
      return {output, h_prev.clone(), c_prev.clone(), gates, cells};
    }
  }
  const at::Tensor x = input.contiguous();
  // The input projection of every time step in one product.
  at::Tensor gates = mm(k, x.view({T * B, I}), w_ih.t()).view({T, B, 4 * H});
  const at::Tensor w_hh_t = w_hh.t();
  const std::shared_ptr<const void> w_hh_packed = pack(k, w_hh_t);
  at::Tensor h_prev = h0.contiguous(), c_prev = c0.contiguous();
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    at::Tensor g_t = gates.select(0, t);
    at::Tensor c_t = cells.select(0, t);
    at::Tensor h_t = output.select(0, t);
    at::Tensor no_copy;
    const bool fused = B > 0 && k.step_forward && w_hh_packed &&
                       k.step_forward(g_t, h_prev, w_hh_packed.get(), true, bih, bhh, c_prev,
                                      c_t, h_t, no_copy);
    if (!fused) {
      mm_into(k, g_t, h_prev, w_hh_t, true, w_hh_packed.get());
      if (B > 0) k.forward(g_t, bih, bhh, c_prev, c_t, h_t);
    }
    h_prev = h_t;
    c_prev = c_t;
  }
  return {output, h_prev.clone(), c_prev.clone(), gates, cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_backward(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_hT,
    const c10::optional<at::Tensor>& grad_cT, const at::Tensor& input, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells, bool reverse,
    bool input_grad, const Kernels& k) {
  constexpr const char* op = "handgrad::lstm_layer_backward";
  check_dim_in(input, {3}, op, "input (seq_len, batch, input_size)");
  const int64_t H = check_parameters(input, w_ih, w_hh, c10::nullopt, c10::nullopt, op);
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  TORCH_CHECK(T > 0, op, ": expected a sequence length of at least 1, but got input of shape ",
              input.sizes());
  check_state(input, h0, B, H, op, "h0");
  check_state(input, c0, B, H, op, "c0");
  check_like(output, cells, op, "output");
  TORCH_CHECK(cells.dim() == 3 && cells.size(0) == T && cells.size(1) == B && cells.size(2) == H,
              op, ": expected cells of shape (", T, ", ", B, ", ", H, "), but got ", cells.sizes());
  TORCH_CHECK(gates.dim() == 3 && gates.size(0) == T && gates.size(1) == B &&
                  gates.size(2) == 4 * H,
              op, ": expected gates of shape (", T, ", ", B, ", ", 4 * H, "), but got ",
              gates.sizes());
  check_like(grad_output, output, op, "grad_output");
  check_like(grad_hT, h0, op, "grad_hT");
  check_like(grad_cT, c0, op, "grad_cT");

  const at::Tensor go = defined_or_empty(grad_output);
  const at::Tensor g_all = gates.contiguous(), c_all = cells.contiguous();
  const at::Tensor c0c = c0.contiguous();
  const std::shared_ptr<const void> w_hh_packed = pack(k, w_hh);
  // The gate gradient of one step (used by that step's products only). For
  // the backend's fused steps its rows are padded by 16 elements: a row
  // stride of 4H floats (a multiple of 1 KiB for the usual sizes) would map
  // the rows the weight-gradient product reads down one column onto a few
  // cache sets.
  at::Tensor dg_t = w_hh_packed && k.step_backward
                        ? at::empty({B, 4 * H + 16}, input.options()).narrow(1, 0, 4 * H)
                        : at::empty({B, 4 * H}, input.options());
  // dc: gradient reaching the current step's cell; updated in place step by step.
  at::Tensor dc = grad_cT.has_value() && grad_cT->defined() ? grad_cT->contiguous().clone()
                                                            : at::zeros({B, H}, input.options());
  at::Tensor dh_rec = defined_or_empty(grad_hT);  // gradient reaching h_t through h_{t+1}
  at::Tensor dh_buf = at::empty({B, H}, input.options());
  // The weight and bias gradients, transposed: [grad_w_hh | grad_w_ih | grad_b]^T =
  // sum_t [h_{t-1} | x_t | 1]^T dgates_t (one product per step, over the
  // step's previous hidden state, input and a column of ones laid side by
  // side in hx; dgates_t, the product's right operand, is read in place) and
  // grad_input_t = dgates_t W_ih are computed step by step while dgates_t is
  // still in cache.
  const int64_t K = H + I + 1;
  at::Tensor grad_w_t = at::empty({K, 4 * H}, input.options());
  at::Tensor hx = at::empty({T, B, K}, input.options());
  hx.narrow(2, H, I).copy_(input);
  hx.select(2, H + I).fill_(1);
  hx.select(0, reverse ? T - 1 : 0).narrow(1, 0, H).copy_(h0);
  if (T > 1) {
    hx.narrow(0, reverse ? 0 : 1, T - 1)
        .narrow(2, 0, H)
        .copy_(output.narrow(0, reverse ? 1 : 0, T - 1));
  }
  // Without input_grad (the input is data) grad_input is an empty placeholder.
  at::Tensor grad_input = at::empty(input_grad ? at::IntArrayRef{T, B, I} : at::IntArrayRef{0},
                                    input.options());
  const std::shared_ptr<const void> w_ih_packed = input_grad ? pack(k, w_ih) : nullptr;
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? s : T - 1 - s;  // forward steps, last first
    const bool first = reverse ? t == T - 1 : t == 0;
    const int64_t t_prev = reverse ? t + 1 : t - 1;
    const at::Tensor c_prev = first ? c0c : c_all.select(0, t_prev);
    const at::Tensor go_t = go.defined() ? go.select(0, t) : at::Tensor();
    at::Tensor gx_t = input_grad ? grad_input.select(0, t) : at::Tensor();
    const bool fused = B > 0 && k.step_backward && w_hh_packed && (!input_grad || w_ih_packed) &&
                       k.step_backward(go_t, dh_rec, dc, g_all.select(0, t), c_prev,
                                       c_all.select(0, t), dg_t, dc, w_hh_packed.get(), dh_buf,
                                       input_grad ? w_ih_packed.get() : nullptr, gx_t);
    if (!fused) {
      if (B > 0) {
        k.backward(go_t, dh_rec, dc, g_all.select(0, t), c_prev, c_all.select(0, t), dg_t, dc);
      } else {
        dg_t.zero_();
      }
      mm_into(k, dh_buf, dg_t, w_hh, false, w_hh_packed.get());
      if (input_grad) mm_into(k, gx_t, dg_t, w_ih, false, w_ih_packed.get());
    }
    dh_rec = dh_buf;
    mm_into(k, grad_w_t, hx.select(0, t).t(), dg_t, s > 0);
  }

  return {grad_input, dh_buf, dc, grad_w_t.narrow(0, H, I).t().contiguous(),
          grad_w_t.narrow(0, 0, H).t().contiguous(), grad_w_t.select(0, H + I).clone()};
}

}  // namespace lstm
}  // namespace handgrad

TORCH_LIBRARY_FRAGMENT(handgrad, m) {
  m.def(
      "lstm_cell(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih=None, "
      "Tensor? b_hh=None) -> (Tensor hy, Tensor cy, Tensor gates)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "lstm_cell_backward(Tensor? grad_hy, Tensor? grad_cy, Tensor gates, Tensor cx, Tensor cy, "
      "Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh) -> (Tensor grad_input, Tensor grad_hx, "
      "Tensor grad_cx, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "lstm_layer(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, bool reverse=False) -> (Tensor output, Tensor hT, Tensor cT, Tensor gates, "
      "Tensor cells)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "lstm_layer_backward(Tensor? grad_output, Tensor? grad_hT, Tensor? grad_cT, Tensor input, "
      "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor output, Tensor gates, "
      "Tensor cells, bool reverse, bool input_grad=True) -> (Tensor grad_input, "
      "Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b)",
      {at::Tag::pt2_compliant_tag});
}
