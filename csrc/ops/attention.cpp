// scaled_dot_product_attention: the operator schemas and the
// backend-independent driver.
//
// The driver validates every argument (CPU, CUDA and LibTorch callers get the
// same errors), flattens the batch dimensions of q/k/v into one (a view
// whenever the strides allow it), broadcasts the mask to (B, Hq, L, S) as a
// strided view (stride 0 along broadcast dimensions; nothing per batch is
// materialized; a bool mask is turned into an additive 0/-inf mask once, at
// its own size), draws the dropout seed from torch's default CPU generator
// and calls the backend kernel.
#include "ops/attention.h"

#include "common/checks.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

namespace handgrad {
namespace attention {
namespace {

constexpr const char* kOp = "handgrad::scaled_dot_product_attention";

// Batch dimensions of an attention operand: all but the last three
// (heads, rows, features).
std::vector<int64_t> batch_shape(const at::Tensor& t) {
  const int64_t n = std::max<int64_t>(0, t.dim() - 3);
  return std::vector<int64_t>(t.sizes().begin(), t.sizes().begin() + n);
}

int64_t heads_of(const at::Tensor& t) { return t.dim() >= 3 ? t.size(-3) : 1; }

// (batch..., H, rows, features) as (B, H, rows, features), a view when the
// strides allow it; the feature dimension is made dense for the kernels.
at::Tensor as_4d(const at::Tensor& t, int64_t batch) {
  at::Tensor r = t.reshape({batch, heads_of(t), t.size(-2), t.size(-1)});
  if (r.size(3) > 1 && r.stride(3) != 1) r = r.contiguous();
  return r;
}

struct Checked {
  Problem p;
  std::vector<int64_t> batch;  // batch shape of the call
  at::Tensor mask;             // (B, Hq, L, S) additive view, or undefined
};

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
  TORCH_CHECK(q.dim() >= 2 && k.dim() == q.dim() && v.dim() == q.dim(), op,
              ": expected query, key and value with the same number (at least 2) of dimensions, "
              "but got shapes ", q.sizes(), ", ", k.sizes(), " and ", v.sizes());
  Checked c;
  c.batch = batch_shape(q);
  TORCH_CHECK(batch_shape(k) == c.batch && batch_shape(v) == c.batch, op,
              ": query, key and value must have the same batch dimensions, but got shapes ",
              q.sizes(), ", ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(-1) == q.size(-1), op,
              ": query and key must have the same head size (last dimension), but got query ",
              q.sizes(), " and key ", k.sizes());
  TORCH_CHECK(k.size(-2) == v.size(-2), op,
              ": key and value must have the same sequence length, but got key ", k.sizes(),
              " and value ", v.sizes());
  const int64_t hq = heads_of(q), hkv = heads_of(k);
  TORCH_CHECK(heads_of(v) == hkv, op, ": key and value must have the same number of heads, but "
              "got key ", k.sizes(), " and value ", v.sizes());
  if (enable_gqa) {
    TORCH_CHECK(hkv > 0 && hq % hkv == 0, op, ": with enable_gqa=True the number of query heads (",
                hq, ") must be a multiple of the number of key/value heads (", hkv, ")");
  } else {
    TORCH_CHECK(hq == hkv, op, ": query has ", hq, " heads and key/value have ", hkv,
                "; pass enable_gqa=True for grouped-query attention");
  }
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op,
                    ": dropout_p must be in [0, 1), but got ", dropout_p);
  TORCH_CHECK(!(attn_mask.has_value() && attn_mask->defined() && is_causal), op,
              ": attn_mask and is_causal=True cannot be used together");

  Problem& p = c.p;
  p.batch = 1;
  for (int64_t s : c.batch) p.batch *= s;
  p.heads_q = hq;
  p.heads_kv = hkv;
  p.L = q.size(-2);
  p.S = k.size(-2);
  p.E = q.size(-1);
  p.Ev = v.size(-1);
  p.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(p.E));
  p.causal = is_causal;
  p.has_mask = attn_mask.has_value() && attn_mask->defined();
  p.dropout = DropoutState{static_cast<float>(dropout_p), 0, 0};

  if (p.has_mask) {
    const at::Tensor& m = *attn_mask;
    check_same_device(q, m, op, "query", "attn_mask");
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), op,
                     ": expected attn_mask to be bool or floating point, but got ",
                     m.scalar_type());
    std::vector<int64_t> target = c.batch;
    target.push_back(hq);
    target.push_back(p.L);
    target.push_back(p.S);
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
    c.mask = additive.expand(target).reshape({p.batch, hq, p.L, p.S});
  }
  return c;
}

at::ScalarType lse_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    c10::optional<double> scale, bool enable_gqa, ForwardKernel kernel) {
  Checked c = check_and_describe(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, kOp);
  Problem& p = c.p;

  at::Tensor rng_state = at::zeros({2}, at::TensorOptions().dtype(at::kLong));
  if (p.dropout.p > 0.0f) {
    // torch.manual_seed reproduces the pattern: seed and offset come from the
    // default CPU generator (for CUDA inputs too), under its lock.
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    auto* impl = at::check_generator<at::CPUGeneratorImpl>(gen);
    p.dropout.seed = impl->random64();
    p.dropout.offset = impl->random64();
    int64_t* state = rng_state.data_ptr<int64_t>();
    std::memcpy(&state[0], &p.dropout.seed, sizeof(int64_t));
    std::memcpy(&state[1], &p.dropout.offset, sizeof(int64_t));
  }

  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = p.Ev;
  at::Tensor out = at::empty(out_shape, q.options());
  std::vector<int64_t> lse_shape(q.sizes().begin(), q.sizes().end() - 1);
  at::Tensor lse = at::empty(lse_shape, q.options().dtype(lse_type(q.scalar_type())));
  if (out.numel() == 0) return {out, lse, rng_state};

  at::Tensor out4 = out.view({p.batch, p.heads_q, p.L, p.Ev});
  at::Tensor lse3 = lse.view({p.batch, p.heads_q, p.L});
  kernel(as_4d(q, p.batch), as_4d(k, p.batch), as_4d(v, p.batch), c.mask, out4, lse3, p);
  return {out, lse, rng_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& attn_mask,
    double dropout_p, bool is_causal, c10::optional<double> scale, bool enable_gqa,
    const at::Tensor& rng_state, BackwardKernel kernel) {
  constexpr const char* op = "handgrad::scaled_dot_product_attention_backward";
  Checked c = check_and_describe(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, op);
  Problem& p = c.p;
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = p.Ev;
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape) && out.sizes() == grad_out.sizes(),
              op, ": expected grad_out and out of shape ", at::IntArrayRef(out_shape),
              ", but got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              op, ": grad_out and out must have the dtype of query (", q.scalar_type(), ")");
  check_same_device(q, grad_out, op, "query", "grad_out");
  check_same_device(q, out, op, "query", "out");
  check_same_device(q, lse, op, "query", "lse");
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, q.dim() - 1) &&
                  lse.scalar_type() == lse_type(q.scalar_type()),
              op, ": lse must have shape ", q.sizes().slice(0, q.dim() - 1), " and dtype ",
              lse_type(q.scalar_type()), ", but got ", lse.sizes(), " and ", lse.scalar_type());
  TORCH_CHECK(rng_state.device().is_cpu() && rng_state.scalar_type() == at::kLong &&
                  rng_state.numel() == 2,
              op, ": rng_state must be the 2-element int64 CPU tensor the forward returned");
  const at::Tensor rs = rng_state.contiguous();
  std::memcpy(&p.dropout.seed, rs.data_ptr<int64_t>(), sizeof(int64_t));
  std::memcpy(&p.dropout.offset, rs.data_ptr<int64_t>() + 1, sizeof(int64_t));

  at::Tensor grad_q = at::zeros(q.sizes(), q.options());
  at::Tensor grad_k = at::zeros(k.sizes(), k.options());
  at::Tensor grad_v = at::zeros(v.sizes(), v.options());
  if (grad_q.numel() == 0 && grad_k.numel() == 0 && grad_v.numel() == 0) {
    return {grad_q, grad_k, grad_v};
  }
  if (p.batch * p.heads_q * p.L == 0 || p.S == 0) return {grad_q, grad_k, grad_v};

  at::Tensor gq4 = grad_q.view({p.batch, p.heads_q, p.L, p.E});
  at::Tensor gk4 = grad_k.view({p.batch, p.heads_kv, p.S, p.E});
  at::Tensor gv4 = grad_v.view({p.batch, p.heads_kv, p.S, p.Ev});
  kernel(as_4d(grad_out, p.batch), as_4d(q, p.batch), as_4d(k, p.batch), as_4d(v, p.batch),
         as_4d(out, p.batch), lse.reshape({p.batch, p.heads_q, p.L}).contiguous(), c.mask, gq4,
         gk4, gv4, p);
  return {grad_q, grad_k, grad_v};
}

}  // namespace attention
}  // namespace handgrad

TORCH_LIBRARY_FRAGMENT(handgrad, m) {
  m.def(
      "scaled_dot_product_attention(Tensor query, Tensor key, Tensor value, "
      "Tensor? attn_mask=None, float dropout_p=0.0, bool is_causal=False, float? scale=None, "
      "bool enable_gqa=False) -> (Tensor out, Tensor lse, Tensor rng_state)",
      {at::Tag::pt2_compliant_tag, at::Tag::nondeterministic_seeded});
  m.def(
      "scaled_dot_product_attention_backward(Tensor grad_out, Tensor query, Tensor key, "
      "Tensor value, Tensor out, Tensor lse, Tensor? attn_mask, float dropout_p, bool is_causal, "
      "float? scale, bool enable_gqa, Tensor rng_state) -> (Tensor grad_query, Tensor grad_key, "
      "Tensor grad_value)",
      {at::Tag::pt2_compliant_tag});
}
