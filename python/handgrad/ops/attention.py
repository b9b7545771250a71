"""scaled_dot_product_attention: fake kernels, autograd registration and the public function.

The kernels are in csrc/ops/{attention.cpp, cpu/attention.cpp, cuda/attention.cu}.
Forward returns the output, one log-sum-exp per query row and a 2-element
int64 random state (the dropout seed and offset drawn from torch's default
CPU generator); backward recomputes the attention probabilities tile by tile
from those, so no L x S matrix is saved (memory linear in L).
"""

import torch

from . import _attention_autograd as _formulas
from ._autograd import OPS, call, register_autograd

__all__ = ["scaled_dot_product_attention"]


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("handgrad::scaled_dot_product_attention")
def _sdpa_fake(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    torch._check(query.dim() >= 2 and key.dim() == query.dim() and value.dim() == query.dim(),
                 lambda: "handgrad::scaled_dot_product_attention: query, key and value need the "
                         "same number (at least 2) of dimensions")
    torch._check(key.device == query.device and value.device == query.device,
                 lambda: "handgrad::scaled_dot_product_attention: expected query, key and value "
                         "to be on the same device")
    torch._check(key.shape[-1] == query.shape[-1],
                 lambda: "handgrad::scaled_dot_product_attention: query and key must have the "
                         "same head size")
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    lse = query.new_empty(query.shape[:-1], dtype=_lse_dtype(query.dtype))
    rng_state = torch.empty(2, dtype=torch.int64, device="cpu")
    return out, lse, rng_state


@torch.library.register_fake("handgrad::scaled_dot_product_attention_backward")
def _sdpa_backward_fake(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal,
                        scale, enable_gqa, rng_state):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = inputs
    out, lse, rng_state = output
    ctx.mark_non_differentiable(lse, rng_state)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(query, key, value, out, lse, attn_mask, rng_state)
    ctx.args = (dropout_p, is_causal, scale, enable_gqa)


def _backward(ctx, grad_out, _grad_lse, _grad_rng):
    if grad_out is None:
        return None, None, None, None, None, None, None, None
    query, key, value, out, lse, attn_mask, rng_state = ctx.saved_tensors
    dropout_p, is_causal, scale, enable_gqa = ctx.args
    grad_q, grad_k, grad_v = OPS.scaled_dot_product_attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale,
        enable_gqa, rng_state)
    needs = ctx.needs_input_grad
    return (grad_q if needs[0] else None, grad_k if needs[1] else None,
            grad_v if needs[2] else None, None, None, None, None, None)


# Forward mode: _attention_autograd.forward_tangent (materializes P; see there).
def _jvp(ctx, inputs, t_query, t_key, t_value, t_mask, *_):
    t_out = _formulas.forward_tangent(inputs, ctx.outputs, t_query, t_key, t_value, t_mask)
    return t_out, None, None


register_autograd("handgrad::scaled_dot_product_attention", _backward, _setup_context, _jvp)


# Double backward and forward-over-reverse: the backward op's own gradient and
# tangent (_attention_autograd.backward_adjoint / backward_tangent). out and
# lse get none: they are functions of query, key, value and the mask, and the
# formulas differentiate through them.
def _backward_setup_context(ctx, inputs, output):
    (grad_out, query, key, value, _out, lse, attn_mask, dropout_p, is_causal, scale, enable_gqa,
     rng_state) = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_out, query, key, value, lse, attn_mask, rng_state)
    ctx.args = (dropout_p, is_causal, scale, enable_gqa)


def _materialized_backward(grad_out, query, key, value, lse, attn_mask, rng_state, args):
    dropout_p, is_causal, scale, enable_gqa = args
    return _formulas._Backward(grad_out, query, key, value, lse, attn_mask, dropout_p, is_causal,
                               scale, enable_gqa, rng_state)


def _backward_backward(ctx, g_query, g_key, g_value):
    needs = ctx.needs_input_grad
    if g_query is None and g_key is None and g_value is None:
        return (None,) * 12
    grad_out, query, key, value, lse, attn_mask, rng_state = ctx.saved_tensors
    b = _materialized_backward(grad_out, query, key, value, lse, attn_mask, rng_state, ctx.args)
    d_go, d_q, d_k, d_v, d_mask = _formulas.backward_adjoint(b, g_query, g_key, g_value, None)
    d_mask = _formulas.reduce_to_mask(d_mask, attn_mask) if needs[6] else None
    return (d_go if needs[0] else None, d_q if needs[1] else None, d_k if needs[2] else None,
            d_v if needs[3] else None, None, None, d_mask, None, None, None, None, None)


def _backward_jvp(ctx, inputs, t_grad_out, t_query, t_key, t_value, _t_out, _t_lse, t_mask,
                  *_):
    grad_out, query, key, value, _out, lse, attn_mask, *args = inputs
    rng_state = args[-1]
    b = _materialized_backward(grad_out, query, key, value, lse, attn_mask, rng_state, args[:4])
    t_dq, t_dk, t_dv, _ = _formulas.backward_tangent(b, t_grad_out, t_query, t_key, t_value,
                                                     t_mask)
    return t_dq, t_dk, t_dv


register_autograd("handgrad::scaled_dot_product_attention_backward", _backward_backward,
                  _backward_setup_context, _backward_jvp)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """softmax(scale * query @ key^T + mask) @ value, with the semantics of
    torch.nn.functional.scaled_dot_product_attention.

    query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev).
    attn_mask is bool (True takes part) or additive float, broadcastable to
    (..., Hq, L, S); is_causal uses the top-left aligned lower triangle;
    scale defaults to 1/sqrt(E); enable_gqa lets Hq be a multiple of Hkv.
    Dropout (on the attention probabilities) is seeded from torch's default
    CPU generator, so torch.manual_seed reproduces it. The mask gets no
    gradient.
    """
    return call("handgrad::scaled_dot_product_attention",
                query, key, value, attn_mask, float(dropout_p), bool(is_causal),
                None if scale is None else float(scale), bool(enable_gqa))[0]
