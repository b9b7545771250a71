// scaled_dot_product_attention: the operator schemas and the
// backend-independent driver.
//
// The driver validates every argument (CPU, CUDA and LibTorch callers get the
// same errors), broadcasts the batch dimensions of query, key and value
// against each other as torch does (a 2-D query with 4-D keys, batch
// dimensions of size 1; a key/value head shared by every query head becomes
// grouped-query attention with one kv head instead of a copy), flattens them
// into one (a view whenever the strides allow it), views the mask as a
// broadcast (B, Hq, L, S) tensor (stride 0 along broadcast dimensions;
// nothing per batch is materialized; a bool mask is turned into an additive
// 0/-inf mask once, at its own size) and calls the backend kernel. The
// backend draws the dropout seed (from the generator of its device) and
// stores it in the rng_state output. Gradients of broadcast inputs are summed
// back to their shapes here.
#include "ops/attention.h"

#include "common/checks.h"

#include <ATen/ExpandUtils.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace handgrad {
namespace attention {
namespace {

constexpr const char* kOp = "handgrad::scaled_dot_product_attention";
using Shape = std::vector<int64_t>;

// t's sizes with leading 1s up to nd dimensions.
Shape padded(const at::Tensor& t, int64_t nd) {
  Shape s(nd - t.dim(), 1);
  s.insert(s.end(), t.sizes().begin(), t.sizes().end());
  return s;
}

// The broadcast of sizes a and b (equal, or one of them 1), or -1.
int64_t broadcast_size(int64_t a, int64_t b) {
  if (a == b || b == 1) return a;
  return a == 1 ? b : -1;
}

// (B, H, rows, features) view of t expanded to `shape`, whenever the strides
// allow it; the feature dimension is made dense for the kernels.
at::Tensor as_4d(const at::Tensor& t, const Shape& shape, int64_t batch) {
  const int64_t n = static_cast<int64_t>(shape.size());
  const int64_t heads = n >= 3 ? shape[n - 3] : 1;
  at::Tensor r = t.expand(shape).reshape({batch, heads, shape[n - 2], shape[n - 1]});
  if (r.size(3) > 1 && r.stride(3) != 1) r = r.contiguous();
  return r;
}

struct Checked {
  Problem p;
  Shape prefix;          // leading dimensions of the output: batch..., Hq (none for 2-D calls)
  Shape q_shape, k_shape, v_shape;  // q, k, v expanded to the call's batch dimensions
  at::Tensor mask;       // (B, Hq, L, S) additive view, or undefined
  at::Tensor mask_arg;   // the caller's mask
};

// prefix + {a, b}
Shape with(const Shape& prefix, int64_t a, int64_t b) {
  Shape s = prefix;
  s.push_back(a);
  s.push_back(b);
  return s;
}

Checked check_and_describe(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const c10::optional<at::Tensor>& attn_mask, double dropout_p,
                           bool is_causal, c10::optional<double> scale, bool enable_gqa,
                           const char* op) {
  check_floating(q, op, "query");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": expected query, key and value to have the same dtype, but got query ",
              q.scalar_type(), ", key ", k.scalar_type(), " and value ", v.scalar_type());
  check_same_device(q, k, op, "query", "key");
  check_same_device(q, v, op, "query", "value");
  const bool has_mask = attn_mask.has_value() && attn_mask->defined();
  if (has_mask) check_same_device(q, *attn_mask, op, "query", "attn_mask");
  TORCH_CHECK(q.dim() >= 2 && k.dim() >= 2 && v.dim() >= 2, op,
              ": expected query, key and value with at least 2 dimensions (rows, features), "
              "but got shapes ", q.sizes(), ", ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(-1) == q.size(-1), op,
              ": query and key must have the same head size (last dimension), but got query ",
              q.sizes(), " and key ", k.sizes());
  TORCH_CHECK(k.size(-2) == v.size(-2), op,
              ": key and value must have the same sequence length, but got key ", k.sizes(),
              " and value ", v.sizes());
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, op,
                    ": dropout_p must be in [0, 1], but got ", dropout_p);
  TORCH_CHECK(!(has_mask && is_causal), op,
              ": attn_mask and is_causal=True cannot be used together");

  Checked c;
  Problem& p = c.p;
  p.L = q.size(-2);
  p.S = k.size(-2);
  p.E = q.size(-1);
  p.Ev = v.size(-1);
  const int64_t nd = std::max({q.dim(), k.dim(), v.dim()});
  p.batch = 1;
  p.heads_q = p.heads_kv = 1;
  if (nd >= 3) {
    const Shape qs = padded(q, nd), ks = padded(k, nd), vs = padded(v, nd);
    for (int64_t d = 0; d < nd - 3; ++d) {
      const int64_t size = broadcast_size(broadcast_size(qs[d], ks[d]), vs[d]);  // -1 stays -1
      TORCH_CHECK(size >= 0, op,
                  ": the batch dimensions of query, key and value must be broadcastable, but "
                  "got shapes ", q.sizes(), ", ", k.sizes(), " and ", v.sizes());
      c.prefix.push_back(size);
      p.batch *= size;
    }
    const int64_t hq = qs[nd - 3], hkv = broadcast_size(ks[nd - 3], vs[nd - 3]);
    TORCH_CHECK(hkv >= 0, op, ": key and value must have the same number of heads, but got key ",
                k.sizes(), " and value ", v.sizes());
    if (enable_gqa && hq != hkv) {
      TORCH_CHECK(hkv > 0 && hq % hkv == 0, op,
                  ": with enable_gqa=True the number of query heads (", hq,
                  ") must be a multiple of the number of key/value heads (", hkv, ")");
      p.heads_q = hq;
      p.heads_kv = hkv;
    } else if (hkv == 1) {
      // One key/value head for every query head: grouped-query attention
      // with a single group, no copy of the keys.
      p.heads_q = hq;
      p.heads_kv = 1;
    } else {
      TORCH_CHECK(hq == hkv || hq == 1, op, ": query has ", hq, " heads and key/value have ",
                  hkv, "; pass enable_gqa=True for grouped-query attention");
      p.heads_q = p.heads_kv = hkv;
    }
    c.prefix.push_back(p.heads_q);
    Shape batch(c.prefix.begin(), c.prefix.end() - 1);
    batch.push_back(p.heads_kv);
    c.k_shape = with(batch, p.S, p.E);
    c.v_shape = with(batch, p.S, p.Ev);
  } else {
    c.k_shape = {p.S, p.E};
    c.v_shape = {p.S, p.Ev};
  }
  c.q_shape = with(c.prefix, p.L, p.E);
  p.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(p.E));
  p.causal = is_causal;
  p.has_mask = has_mask;
  p.dropout = DropoutState{static_cast<float>(dropout_p), keep_scale(dropout_p), 0, 0};

  if (has_mask) {
    const at::Tensor& m = *attn_mask;
    c.mask_arg = m;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), op,
                     ": expected attn_mask to be bool or floating point, but got ",
                     m.scalar_type());
    const Shape target = with(c.prefix, p.L, p.S);
    bool ok = m.dim() <= static_cast<int64_t>(target.size());
    for (int64_t i = 1; ok && i <= m.dim(); ++i) {
      const int64_t ms = m.size(-i), ts = target[target.size() - i];
      ok = ms == 1 || ms == ts;
    }
    TORCH_CHECK(ok, op, ": attn_mask of shape ", m.sizes(),
                " is not broadcastable to the attention shape ", at::IntArrayRef(target),
                " (batch..., heads, L, S)");
    at::Tensor additive =
        m.scalar_type() == at::kBool
            ? at::where(m, at::zeros({}, q.options()),
                        at::full({}, -std::numeric_limits<double>::infinity(), q.options()))
            : m.to(q.scalar_type());
    c.mask = additive.expand(target).reshape({p.batch, p.heads_q, p.L, p.S});
  }
  return c;
}

at::ScalarType lse_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A (B, Hq, L, S) view of an optional weights-shaped tensor, checked.
at::Tensor weights_view(const c10::optional<at::Tensor>& t, const Checked& c, const at::Tensor& q,
                        const char* op, const char* name) {
  const at::Tensor& w = *t;
  const Shape target = with(c.prefix, c.p.L, c.p.S);
  check_same_device(q, w, op, "query", name);
  TORCH_CHECK(w.sizes() == at::IntArrayRef(target) && w.scalar_type() == q.scalar_type(), op,
              ": expected ", name, " of shape ", at::IntArrayRef(target), " and dtype ",
              q.scalar_type(), ", but got ", w.sizes(), " and ", w.scalar_type());
  return w.reshape({c.p.batch, c.p.heads_q, c.p.L, c.p.S});
}

at::Tensor nothing(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    c10::optional<double> scale, bool enable_gqa, bool need_weights, ForwardKernel kernel) {
  Checked c = check_and_describe(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, kOp);
  Problem& p = c.p;
  ForwardArgs a;
  a.rng_state = at::zeros({2}, q.options().dtype(at::kLong));
  at::Tensor out = at::empty(with(c.prefix, p.L, p.Ev), q.options());
  Shape lse_shape = c.prefix;
  lse_shape.push_back(p.L);
  at::Tensor lse = at::empty(lse_shape, q.options().dtype(lse_type(q.scalar_type())));
  at::Tensor weights =
      need_weights ? at::zeros(with(c.prefix, p.L, p.S), q.options()) : nothing(q);
  if (lse.numel() == 0) return {out, lse, a.rng_state, weights};

  a.q = as_4d(q, c.q_shape, p.batch);
  a.k = as_4d(k, c.k_shape, p.batch);
  a.v = as_4d(v, c.v_shape, p.batch);
  a.mask = c.mask;
  a.out = out.view({p.batch, p.heads_q, p.L, p.Ev});
  a.lse = lse.view({p.batch, p.heads_q, p.L});
  if (need_weights) a.weights = weights.view({p.batch, p.heads_q, p.L, p.S});
  kernel(a, p);
  return {out, lse, a.rng_state, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& attn_mask,
    double dropout_p, bool is_causal, c10::optional<double> scale, bool enable_gqa,
    const at::Tensor& rng_state, const c10::optional<at::Tensor>& weights,
    const c10::optional<at::Tensor>& grad_weights, std::array<bool, 4> output_mask,
    BackwardKernel kernel) {
  constexpr const char* op = "handgrad::scaled_dot_product_attention_backward";
  Checked c = check_and_describe(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, op);
  const Problem& p = c.p;
  const Shape out_shape = with(c.prefix, p.L, p.Ev);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape) && out.sizes() == grad_out.sizes(),
              op, ": expected grad_out and out of shape ", at::IntArrayRef(out_shape),
              ", but got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              op, ": grad_out and out must have the dtype of query (", q.scalar_type(), ")");
  check_same_device(q, grad_out, op, "query", "grad_out");
  check_same_device(q, out, op, "query", "out");
  check_same_device(q, lse, op, "query", "lse");
  check_same_device(q, rng_state, op, "query", "rng_state");
  const Shape lse_shape(out_shape.begin(), out_shape.end() - 1);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lse_shape) &&
                  lse.scalar_type() == lse_type(q.scalar_type()),
              op, ": lse must have shape ", at::IntArrayRef(lse_shape), " and dtype ",
              lse_type(q.scalar_type()), ", but got ", lse.sizes(), " and ", lse.scalar_type());
  TORCH_CHECK(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2, op,
              ": rng_state must be the 2-element int64 tensor the forward returned");
  const bool has_weights = weights.has_value() && weights->defined();
  TORCH_CHECK(has_weights == (grad_weights.has_value() && grad_weights->defined()), op,
              ": weights and grad_weights must be given together");
  const bool want_mask_grad = output_mask[3] && p.has_mask;
  TORCH_CHECK(!want_mask_grad || at::isFloatingType(c.mask_arg.scalar_type()), op,
              ": a bool attn_mask has no gradient");

  BackwardArgs a;
  a.want_grad_q = output_mask[0];
  a.want_grad_kv = output_mask[1] || output_mask[2];
  // Dense buffers of the broadcast shapes (summed back to the inputs' below).
  a.grad_q = at::zeros({p.batch, p.heads_q, p.L, p.E}, q.options());
  a.grad_k = at::zeros({p.batch, p.heads_kv, p.S, p.E}, k.options());
  a.grad_v = at::zeros({p.batch, p.heads_kv, p.S, p.Ev}, v.options());
  if (want_mask_grad) {
    a.grad_mask = at::zeros({p.batch, p.heads_q, p.L, p.S}, lse.options());
  }
  // Nothing reaches the inputs through an empty output (Ev = 0) unless the
  // weights carry a gradient: all zeros then, as native (no 0 * NaN).
  if (p.batch * p.heads_q * p.L > 0 && p.S > 0 && (p.Ev > 0 || has_weights)) {
    a.grad_out = as_4d(grad_out, out_shape, p.batch);
    a.q = as_4d(q, c.q_shape, p.batch);
    a.k = as_4d(k, c.k_shape, p.batch);
    a.v = as_4d(v, c.v_shape, p.batch);
    a.out = as_4d(out, out_shape, p.batch);
    a.lse = lse.reshape({p.batch, p.heads_q, p.L}).contiguous();
    a.mask = c.mask;
    a.rng_state = rng_state.contiguous();
    if (has_weights) {
      a.weights = weights_view(weights, c, q, op, "weights");
      a.grad_weights = weights_view(grad_weights, c, q, op, "grad_weights");
    }
    kernel(a, p);
  }
  auto back_to = [](const at::Tensor& grad, const Shape& expanded, const at::Tensor& input) {
    return at::sum_to(grad.view(expanded), input.sizes());
  };
  at::Tensor grad_mask = nothing(q);
  if (want_mask_grad) {
    grad_mask = at::sum_to(a.grad_mask.view(with(c.prefix, p.L, p.S)), c.mask_arg.sizes())
                    .to(c.mask_arg.scalar_type());
  }
  return {output_mask[0] ? back_to(a.grad_q, c.q_shape, q) : nothing(q),
          output_mask[1] ? back_to(a.grad_k, c.k_shape, k) : nothing(k),
          output_mask[2] ? back_to(a.grad_v, c.v_shape, v) : nothing(v), grad_mask};
}

}  // namespace attention
}  // namespace handgrad

TORCH_LIBRARY_FRAGMENT(handgrad, m) {
  m.def(
      "scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, "
      "Tensor? attn_mask=None, float dropout_p=0.0, bool is_causal=False, float? scale=None, "
      "bool enable_gqa=False, bool need_weights=False) -> (Tensor out, Tensor lse, "
      "Tensor rng_state, Tensor weights)",
      {at::Tag::pt2_compliant_tag, at::Tag::nondeterministic_seeded});
  m.def(
      "scaled_dot_product_attention_backward(Tensor grad_out, Tensor query, Tensor key, "
      "Tensor value, Tensor out, Tensor lse, Tensor? attn_mask, float dropout_p, bool is_causal, "
      "float? scale, bool enable_gqa, Tensor rng_state, Tensor? weights=None, "
      "Tensor? grad_weights=None, bool[4] output_mask=[True, True, True, False]) -> "
      "(Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_attn_mask)",
      {at::Tag::pt2_compliant_tag});
}
