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
//
// Packed sequences (a PackedSequence's data, batch_sizes) keep their layout:
// the rows of step t are its first batch_sizes[t] sequences (sorted longest
// first), so a step computes only the sequences still running and no padding
// row exists anywhere. A sequence's state carries over in its own row; in the
// reverse direction a sequence starts (from its row of h0, c0) at its own last
// step, and each sequence's final state is taken at the last step it runs. A
// padded (T, B, I) input is the case batch_sizes = [B] * T. Backward keeps one
// (B, .) buffer for dh and one for dc, updated in place over each step's rows:
// a sequence's rows start from grad_hT, grad_cT and end as grad_h0, grad_c0.
//
// Projection (proj_size P, torch.nn.LSTM's weight_hr): h_t = W_hr m_t with
// m_t = o_t * tanh(c_t); the pointwise pass writes m_t and one more (rows, H)
// x (H, P) product per step gives h_t, the state the next step's product reads
// (W_hh is (4H, P)). Gradient: with dh_t all that reaches h_t (output, the
// next step's dz W_hh, h_n), dm_t = dh_t W_hr enters the pointwise backward
// where dh_t does without a projection, and grad_W_hr = sum_t dh_t^T m_t,
// m_t recomputed from the saved o_t and c_t.
//
// Hidden size 0 (allowed, as by native lstm_cell): every state, gate and
// output is empty, nothing depends on the input, and backward returns zero
// gradients shaped like the input and the (0, .) weights.
#include "ops/lstm.h"

#include "common/checks.h"

#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace handgrad {
namespace lstm {
namespace {

at::Tensor defined_or_empty(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// The sizes of a layer: hidden (H, the cell) and state (the width of h: the
// projection size P with a projection, else H).
struct Sizes {
  int64_t hidden, state;
};

// Checks the weights and biases against the input size. w_hr (P, H), when
// defined, is a projection of the hidden state; w_hh is then (4H, P).
Sizes check_parameters(const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh,
                       const c10::optional<at::Tensor>& b_ih,
                       const c10::optional<at::Tensor>& b_hh, const char* op,
                       const at::Tensor& w_hr = at::Tensor()) {
  check_floating(input, op, "input");
  check_dim_in(w_ih, {2}, op, "w_ih");
  check_dim_in(w_hh, {2}, op, "w_hh");
  int64_t H = w_hh.size(1), R = H;
  if (w_hr.defined()) {
    check_dim_in(w_hr, {2}, op, "w_hr");
    R = w_hr.size(0);
    H = w_hr.size(1);
    TORCH_CHECK(R > 0 && R < H, op,
                ": proj_size (w_hr.size(0)) must be positive and smaller than hidden_size "
                "(w_hr.size(1)), but w_hr has shape ",
                w_hr.sizes());
    TORCH_CHECK(w_hh.size(0) == 4 * H && w_hh.size(1) == R, op,
                ": with a projection, expected w_hh of shape (4*hidden_size, proj_size) = (",
                4 * H, ", ", R, "), but got ", w_hh.sizes());
    check_same_dtype(input, w_hr, op, "input", "w_hr");
    check_same_device(input, w_hr, op, "input", "w_hr");
  }
  TORCH_CHECK(w_hh.size(0) == 4 * H && w_hh.size(1) == R, op,
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
  return {H, R};
}

void check_state(const at::Tensor& input, const at::Tensor& state, int64_t B, int64_t H,
                 const char* op, const char* name, const char* width = "hidden_size") {
  TORCH_CHECK(state.dim() == 2 && state.size(0) == B && state.size(1) == H, op, ": expected ",
              name, " of shape (batch, ", width, ") = (", B, ", ", H, "), but got ",
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

// A (B, 0) state or gradient: with hidden size 0 every state is empty.
at::Tensor empty_state(const at::Tensor& input, int64_t B) {
  return at::empty({B, 0}, input.options());
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
  const int64_t H = check_parameters(input, w_ih, w_hh, b_ih, b_hh, op).hidden;
  const int64_t B = input.size(0);
  check_state(input, hx, B, H, op, "hx");
  check_state(input, cx, B, H, op, "cx");
  if (H == 0) return {empty_state(input, B), empty_state(input, B), empty_state(input, B)};

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
  const int64_t H = check_parameters(input, w_ih, w_hh, c10::nullopt, c10::nullopt, op).hidden;
  const int64_t B = input.size(0);
  check_state(input, hx, B, H, op, "hx");
  check_state(input, cx, B, H, op, "cx");
  check_state(input, cy, B, H, op, "cy");
  TORCH_CHECK(gates.dim() == 2 && gates.size(0) == B && gates.size(1) == 4 * H, op,
              ": expected gates of shape (", B, ", ", 4 * H, "), but got ", gates.sizes());
  check_like(grad_hy, cy, op, "grad_hy");
  check_like(grad_cy, cy, op, "grad_cy");
  if (H == 0) {  // nothing depends on the input: a zero gradient of its shape
    return {at::zeros_like(input, at::MemoryFormat::Contiguous), empty_state(input, B),
            empty_state(input, B), at::zeros(w_ih.sizes(), input.options()),
            at::zeros(w_hh.sizes(), input.options()), at::zeros({0}, input.options())};
  }

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

namespace {

// The time steps of a layer over flattened (N, .) rows: step t covers rows
// [offset[t], offset[t] + rows[t]). Rows never grow with t (a packed batch is
// sorted by length, longest first), so the rows of step t are its first
// rows[t] sequences and a sequence's rows carry over from step to step.
struct Steps {
  std::vector<int64_t> offset, rows;
  int64_t batch = 0, total = 0;
  int64_t count() const { return static_cast<int64_t>(rows.size()); }
};

Steps make_steps(const at::Tensor& input, c10::OptionalIntArrayRef batch_sizes, const char* op) {
  Steps steps;
  if (!batch_sizes.has_value()) {
    const int64_t T = input.size(0), B = input.size(1);
    TORCH_CHECK(T > 0, op,
                ": expected a sequence length of at least 1, but got input of shape ",
                input.sizes());
    for (int64_t t = 0; t < T; ++t) {
      steps.offset.push_back(t * B);
      steps.rows.push_back(B);
    }
    steps.batch = B;
    steps.total = T * B;
    return steps;
  }
  const c10::IntArrayRef sizes = *batch_sizes;
  TORCH_CHECK(!sizes.empty(), op, ": batch_sizes of a packed sequence must not be empty");
  int64_t offset = 0;
  for (size_t t = 0; t < sizes.size(); ++t) {
    TORCH_CHECK(sizes[t] > 0, op, ": batch_sizes must be positive, but batch_sizes[", t,
                "] = ", sizes[t]);
    TORCH_CHECK(t == 0 || sizes[t] <= sizes[t - 1], op,
                ": batch_sizes must not increase (sequences sorted by length, longest first), "
                "but batch_sizes[", t, "] = ", sizes[t], " > batch_sizes[", t - 1,
                "] = ", sizes[t - 1]);
    steps.offset.push_back(offset);
    steps.rows.push_back(sizes[t]);
    offset += sizes[t];
  }
  TORCH_CHECK(offset == input.size(0), op, ": batch_sizes sum to ", offset,
              ", but the packed input has ", input.size(0), " rows");
  steps.batch = sizes[0];
  steps.total = offset;
  return steps;
}

// The shape of a per-step tensor with `width` columns: (T, B, width) padded, (N, width) packed.
std::vector<int64_t> step_shape(const at::Tensor& input, bool packed, int64_t width) {
  if (packed) return {input.size(0), width};
  return {input.size(0), input.size(1), width};
}

void check_step_tensor(const at::Tensor& t, const at::Tensor& input, bool packed, int64_t width,
                       const char* op, const char* name) {
  const std::vector<int64_t> want = step_shape(input, packed, width);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(want), op, ": expected ", name, " of shape ",
              at::IntArrayRef(want), ", but got ", t.sizes());
  check_same_dtype(input, t, op, "input", name);
  check_same_device(input, t, op, "input", name);
}

at::Tensor block(const at::Tensor& rows, const Steps& steps, int64_t t) {
  return rows.narrow(0, steps.offset[t], steps.rows[t]);
}

// The state `r` rows start from at a step: the previously visited step's
// rows (`prev`, undefined at the first step) for the sequences that carry
// on, then `first` (h0 or c0) for those that start here (in reverse
// direction a sequence starts at its own last step).
at::Tensor previous_rows(const at::Tensor& prev, const at::Tensor& first, int64_t r) {
  if (!prev.defined()) return first.narrow(0, 0, r);
  const int64_t carried = std::min(prev.size(0), r);
  if (carried == r) return prev.narrow(0, 0, r);
  return at::cat({prev, first.narrow(0, carried, r - carried)});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse, const c10::optional<at::Tensor>& w_hr_opt,
    c10::OptionalIntArrayRef batch_sizes, const Kernels& k) {
  constexpr const char* op = "handgrad::lstm_layer";
  const bool packed = batch_sizes.has_value();
  check_dim_in(input, {packed ? 2 : 3}, op,
               packed ? "input (total rows, input_size) of a packed sequence"
                      : "input (seq_len, batch, input_size)");
  const at::Tensor w_hr = defined_or_empty(w_hr_opt);
  const Sizes sz = check_parameters(input, w_ih, w_hh, b_ih, b_hh, op, w_hr);
  const int64_t H = sz.hidden, R = sz.state, I = input.size(-1);
  const Steps steps = make_steps(input, batch_sizes, op);
  const int64_t B = steps.batch, N = steps.total, T = steps.count();
  check_state(input, h0, B, R, op, "h0", R < H ? "proj_size" : "hidden_size");
  check_state(input, c0, B, H, op, "c0");
  const bool proj = w_hr.defined();
  if (H == 0) {  // no projection is possible (it needs 0 < proj_size < hidden_size)
    const at::Tensor none = at::empty(step_shape(input, packed, 0), input.options());
    return {none, empty_state(input, B), empty_state(input, B), none, none};
  }

  const at::Tensor bih = defined_or_empty(b_ih), bhh = defined_or_empty(b_hh);
  at::Tensor output = at::empty(step_shape(input, packed, R), input.options());
  at::Tensor cells = at::empty(step_shape(input, packed, H), input.options());
  at::Tensor hT = at::empty({B, R}, input.options());
  at::Tensor cT = at::empty({B, H}, input.options());
  at::Tensor out2 = output.view({N, R}), cells2 = cells.view({N, H});
  const at::Tensor x2 = input.contiguous().view({N, I});
  const at::Tensor h0c = h0.contiguous(), c0c = c0.contiguous();
  // With a projection, the pointwise pass writes m_t = o_t * tanh(c_t) here
  // and h_t = m_t W_hr^T is one more product per step.
  const at::Tensor w_hr_t = proj ? w_hr.t() : at::Tensor();
  const std::shared_ptr<const void> w_hr_packed = proj ? pack(k, w_hr_t) : nullptr;
  at::Tensor m_buf = proj ? at::empty({B, H}, input.options()) : at::Tensor();
  auto visited = [&](int64_t s) { return reverse ? T - 1 - s : s; };
  // A sequence's final state is its state at the last step it takes part in.
  auto keep_final_rows = [&](int64_t t, int64_t r, int64_t r_next) {
    if (r <= r_next) return;
    hT.narrow(0, r_next, r - r_next).copy_(block(out2, steps, t).narrow(0, r_next, r - r_next));
    cT.narrow(0, r_next, r - r_next).copy_(block(cells2, steps, t).narrow(0, r_next, r - r_next));
  };

  if (N > 0 && k.step_forward && k.pack) {
    // The backend's fused steps over one combined product per step:
    // gates_t = [h_prev | x_t | 1] [W_hh^T; W_ih^T; b_ih + b_hh], the operand
    // rows laid out in hx (the rows of step t: the state step t reads, its
    // input, a one), each step writing its h_t into the next step's rows.
    const int64_t K = R + I + 1;
    at::Tensor w_cat = at::empty({K, 4 * H}, input.options());
    w_cat.narrow(0, 0, R).copy_(w_hh.t());
    w_cat.narrow(0, R, I).copy_(w_ih.t());
    at::Tensor bias_row = w_cat.select(0, R + I);
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
      at::Tensor gates = at::empty(step_shape(input, packed, 4 * H), input.options());
      at::Tensor gates2 = gates.view({N, 4 * H});
      at::Tensor hx = at::empty({N, K}, input.options());
      hx.narrow(1, R, I).copy_(x2);
      hx.select(1, R + I).fill_(1);
      for (int64_t s = 0; s < T; ++s) {  // the rows that start at step t read h0
        const int64_t t = visited(s), r = steps.rows[t];
        const int64_t r_prev = s > 0 ? std::min(r, steps.rows[visited(s - 1)]) : 0;
        if (r > r_prev) {
          block(hx, steps, t).narrow(0, r_prev, r - r_prev).narrow(1, 0, R).copy_(
              h0c.narrow(0, r_prev, r - r_prev));
        }
      }
      const at::Tensor none;
      for (int64_t s = 0; s < T; ++s) {
        const int64_t t = visited(s), r = steps.rows[t];
        const int64_t r_next = s + 1 < T ? steps.rows[visited(s + 1)] : 0;
        at::Tensor g_t = block(gates2, steps, t);
        at::Tensor c_t = block(cells2, steps, t);
        at::Tensor h_t = block(out2, steps, t);
        const at::Tensor a_t = block(hx, steps, t);
        const at::Tensor c_prev =
            previous_rows(s > 0 ? block(cells2, steps, visited(s - 1)) : at::Tensor(), c0c, r);
        // The rows of h_t that the next step reads.
        at::Tensor h_next = r_next > 0 ? block(hx, steps, visited(s + 1))
                                             .narrow(0, 0, std::min(r, r_next))
                                             .narrow(1, 0, R)
                                       : at::Tensor();
        at::Tensor m_t = proj ? m_buf.narrow(0, 0, r) : h_t;
        at::Tensor copy_to = proj ? at::Tensor() : h_next;
        if (!k.step_forward(g_t, a_t, w_packed.get(), false, none, none, c_prev, c_t, m_t,
                            copy_to)) {
          mm_into(k, g_t, a_t, w_cat, false, w_packed.get());
          k.forward(g_t, none, none, c_prev, c_t, m_t);
          if (copy_to.defined()) copy_to.copy_(m_t.narrow(0, 0, copy_to.size(0)));
        }
        if (proj) {
          mm_into(k, h_t, m_t, w_hr_t, false, w_hr_packed.get());
          if (h_next.defined()) h_next.copy_(h_t.narrow(0, 0, h_next.size(0)));
        }
        keep_final_rows(t, r, r_next);
      }
      return {output, hT, cT, gates, cells};
    }
  }
  // The input projection of every time step in one product.
  at::Tensor gates2 = mm(k, x2, w_ih.t());
  const at::Tensor w_hh_t = w_hh.t();
  const std::shared_ptr<const void> w_hh_packed = pack(k, w_hh_t);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = visited(s), r = steps.rows[t];
    const int64_t r_next = s + 1 < T ? steps.rows[visited(s + 1)] : 0;
    if (r == 0) continue;
    const int64_t t_prev = s > 0 ? visited(s - 1) : -1;
    const at::Tensor h_prev =
        previous_rows(t_prev >= 0 ? block(out2, steps, t_prev) : at::Tensor(), h0c, r);
    const at::Tensor c_prev =
        previous_rows(t_prev >= 0 ? block(cells2, steps, t_prev) : at::Tensor(), c0c, r);
    at::Tensor g_t = block(gates2, steps, t);
    at::Tensor c_t = block(cells2, steps, t);
    at::Tensor h_t = block(out2, steps, t);
    at::Tensor m_t = proj ? m_buf.narrow(0, 0, r) : h_t;
    at::Tensor no_copy;
    const bool fused = k.step_forward && w_hh_packed &&
                       k.step_forward(g_t, h_prev, w_hh_packed.get(), true, bih, bhh, c_prev,
                                      c_t, m_t, no_copy);
    if (!fused) {
      mm_into(k, g_t, h_prev, w_hh_t, true, w_hh_packed.get());
      k.forward(g_t, bih, bhh, c_prev, c_t, m_t);
    }
    if (proj) mm_into(k, h_t, m_t, w_hr_t, false, w_hr_packed.get());
    keep_final_rows(t, r, r_next);
  }
  return {output, hT, cT, gates2.view(step_shape(input, packed, 4 * H)), cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward(const c10::optional<at::Tensor>& grad_output,
               const c10::optional<at::Tensor>& grad_hT, const c10::optional<at::Tensor>& grad_cT,
               const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
               const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output,
               const at::Tensor& gates, const at::Tensor& cells, bool reverse, bool input_grad,
               const c10::optional<at::Tensor>& w_hr_opt, c10::OptionalIntArrayRef batch_sizes,
               const Kernels& k) {
  constexpr const char* op = "handgrad::lstm_layer_backward";
  const bool packed = batch_sizes.has_value();
  check_dim_in(input, {packed ? 2 : 3}, op,
               packed ? "input (total rows, input_size) of a packed sequence"
                      : "input (seq_len, batch, input_size)");
  const at::Tensor w_hr = defined_or_empty(w_hr_opt);
  const Sizes sz =
      check_parameters(input, w_ih, w_hh, c10::nullopt, c10::nullopt, op, w_hr);
  const int64_t H = sz.hidden, R = sz.state, I = input.size(-1);
  const Steps steps = make_steps(input, batch_sizes, op);
  const int64_t B = steps.batch, N = steps.total, T = steps.count();
  check_state(input, h0, B, R, op, "h0", R < H ? "proj_size" : "hidden_size");
  check_state(input, c0, B, H, op, "c0");
  check_step_tensor(output, input, packed, R, op, "output");
  check_step_tensor(cells, input, packed, H, op, "cells");
  check_step_tensor(gates, input, packed, 4 * H, op, "gates");
  check_like(grad_output, output, op, "grad_output");
  check_like(grad_hT, h0, op, "grad_hT");
  check_like(grad_cT, c0, op, "grad_cT");
  const bool proj = w_hr.defined();
  if (H == 0) {
    return {input_grad ? at::zeros_like(input, at::MemoryFormat::Contiguous)
                       : at::empty({0}, input.options()),
            empty_state(input, B),
            empty_state(input, B),
            at::zeros(w_ih.sizes(), input.options()),
            at::zeros(w_hh.sizes(), input.options()),
            at::zeros({0}, input.options()),
            at::empty({0}, input.options())};
  }
  auto visited = [&](int64_t s) { return reverse ? T - 1 - s : s; };

  const at::Tensor go = defined_or_empty(grad_output);
  const at::Tensor go2 = go.defined() ? go.view({N, R}) : at::Tensor();
  const at::Tensor g2 = gates.contiguous().view({N, 4 * H});
  const at::Tensor c2 = cells.contiguous().view({N, H});
  const at::Tensor o2 = output.contiguous().view({N, R});
  const at::Tensor h0c = h0.contiguous(), c0c = c0.contiguous();
  const std::shared_ptr<const void> w_hh_packed = pack(k, w_hh);
  // The gate gradient of one step (used by that step's products only). For
  // the backend's fused steps its rows are padded by 16 elements: a row
  // stride of 4H floats (a multiple of 1 KiB for the usual sizes) would map
  // the rows the weight-gradient product reads down one column onto a few
  // cache sets.
  at::Tensor dg_buf = w_hh_packed && k.step_backward
                          ? at::empty({B, 4 * H + 16}, input.options()).narrow(1, 0, 4 * H)
                          : at::empty({B, 4 * H}, input.options());
  // dc, dh: the gradients reaching each sequence's current cell and hidden
  // state, updated in place step by step over the step's rows (the first
  // rows); a sequence's rows start from grad_cT / grad_hT at its last step
  // and end as grad_c0 / grad_h0 at its first.
  at::Tensor dc = grad_cT.has_value() && grad_cT->defined() ? grad_cT->contiguous().clone()
                                                            : at::zeros({B, H}, input.options());
  at::Tensor dh = grad_hT.has_value() && grad_hT->defined() ? grad_hT->contiguous().clone()
                                                            : at::zeros({B, R}, input.options());
  // The weight and bias gradients, transposed: [grad_w_hh | grad_w_ih | grad_b]^T =
  // sum_t [h_{t-1} | x_t | 1]^T dgates_t (one product per step, over the
  // step's previous hidden state, input and a column of ones laid side by
  // side in hx; dgates_t, the product's right operand, is read in place) and
  // grad_input_t = dgates_t W_ih are computed step by step while dgates_t is
  // still in cache.
  const int64_t K = R + I + 1;
  at::Tensor grad_w_t = at::zeros({K, 4 * H}, input.options());
  at::Tensor hx = at::empty({N, K}, input.options());
  hx.narrow(1, R, I).copy_(input.contiguous().view({N, I}));
  hx.select(1, R + I).fill_(1);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = visited(s);
    if (steps.rows[t] == 0) continue;
    block(hx, steps, t).narrow(1, 0, R).copy_(previous_rows(
        s > 0 ? block(o2, steps, visited(s - 1)) : at::Tensor(), h0c, steps.rows[t]));
  }
  // Without input_grad (the input is data) grad_input is an empty placeholder.
  at::Tensor grad_input =
      at::empty(input_grad ? input.sizes() : at::IntArrayRef{0}, input.options());
  at::Tensor gx2 = input_grad ? grad_input.view({N, I}) : at::Tensor();
  const std::shared_ptr<const void> w_ih_packed = input_grad ? pack(k, w_ih) : nullptr;
  // With a projection h_t = m_t W_hr^T, m_t = o_t * tanh(c_t) (recomputed
  // here from the saved gates and cells): the gradient dh_t reaching h_t
  // gives grad_W_hr += dh_t^T m_t and dm_t = dh_t W_hr, which enters the
  // pointwise backward where dh enters it without a projection.
  at::Tensor m_all, grad_w_hr, dh_sum, dm_buf;
  std::shared_ptr<const void> w_hr_packed;
  if (proj) {
    m_all = at::mul(g2.narrow(1, 3 * H, H), at::tanh(c2));
    grad_w_hr = at::zeros({R, H}, input.options());
    dh_sum = at::empty({B, R}, input.options());
    dm_buf = at::empty({B, H}, input.options());
    w_hr_packed = pack(k, w_hr);
  }
  for (int64_t s = T - 1; s >= 0; --s) {  // visited steps, last first
    const int64_t t = visited(s), r = steps.rows[t];
    if (r == 0) continue;
    const at::Tensor c_prev =
        previous_rows(s > 0 ? block(c2, steps, visited(s - 1)) : at::Tensor(), c0c, r);
    const at::Tensor go_t = go2.defined() ? block(go2, steps, t) : at::Tensor();
    const at::Tensor g_t = block(g2, steps, t), c_t = block(c2, steps, t);
    at::Tensor gx_t = input_grad ? block(gx2, steps, t) : at::Tensor();
    at::Tensor dh_r = dh.narrow(0, 0, r), dc_r = dc.narrow(0, 0, r);
    at::Tensor dg_t = dg_buf.narrow(0, 0, r);
    at::Tensor dh_a = go_t, dh_b = dh_r;
    if (proj) {
      at::Tensor dh_t = dh_sum.narrow(0, 0, r);
      if (go_t.defined()) {
        at::add_out(dh_t, dh_r, go_t);
      } else {
        dh_t.copy_(dh_r);
      }
      mm_into(k, grad_w_hr, dh_t.t(), block(m_all, steps, t), true);
      dh_a = dm_buf.narrow(0, 0, r);
      mm_into(k, dh_a, dh_t, w_hr, false, w_hr_packed.get());
      dh_b = at::Tensor();
    }
    const bool fused = k.step_backward && w_hh_packed && (!input_grad || w_ih_packed) &&
                       k.step_backward(dh_a, dh_b, dc_r, g_t, c_prev, c_t, dg_t, dc_r,
                                       w_hh_packed.get(), dh_r,
                                       input_grad ? w_ih_packed.get() : nullptr, gx_t);
    if (!fused) {
      k.backward(dh_a, dh_b, dc_r, g_t, c_prev, c_t, dg_t, dc_r);
      mm_into(k, dh_r, dg_t, w_hh, false, w_hh_packed.get());
      if (input_grad) mm_into(k, gx_t, dg_t, w_ih, false, w_ih_packed.get());
    }
    mm_into(k, grad_w_t, block(hx, steps, t).t(), dg_t, true);
  }

  return {grad_input,
          dh,
          dc,
          grad_w_t.narrow(0, R, I).t().contiguous(),
          grad_w_t.narrow(0, 0, R).t().contiguous(),
          grad_w_t.select(0, R + I).clone(),
          proj ? grad_w_hr : at::empty({0}, input.options())};
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
      "Tensor? b_hh, bool reverse=False, Tensor? w_hr=None, int[]? batch_sizes=None) -> (Tensor "
      "output, Tensor hT, Tensor cT, Tensor gates, Tensor cells)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "lstm_layer_backward(Tensor? grad_output, Tensor? grad_hT, Tensor? grad_cT, Tensor input, "
      "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor output, Tensor gates, "
      "Tensor cells, bool reverse, bool input_grad=True, Tensor? w_hr=None, "
      "int[]? batch_sizes=None) -> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b, Tensor grad_w_hr)",
      {at::Tag::pt2_compliant_tag});
}
