"""scaled_dot_product_attention: fake kernels, autograd registration and the public function.

The kernels are in csrc/ops/{attention.cpp, cpu/attention.cpp, cuda/attention.cu}.
Forward returns the output, one log-sum-exp per query row, a 2-element int64
random state on the inputs' device (the dropout seed and offset, drawn from
the CPU generator for CPU tensors and from the CUDA generator's Philox state
for CUDA tensors) and, when asked for, the attention weights; backward
recomputes the attention probabilities tile by tile from those, so no L x S
matrix is saved (memory linear in L) unless the weights were returned or the
mask needs a gradient.
"""

from typing import Optional

import torch

from . import _attention_autograd as _formulas
from ._autograd import OPS, call, register_autograd

__all__ = ["scaled_dot_product_attention"]

_OP = "handgrad::scaled_dot_product_attention"


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _leading_dims(query, key, value, enable_gqa):
    """The output's dimensions before (L, features): the broadcast batch
    dimensions and the number of query heads (as the C++ driver computes them)."""
    nd = max(query.dim(), key.dim(), value.dim())
    if nd == 2:
        return ()
    qs, ks, vs = ((1,) * (nd - t.dim()) + tuple(t.shape) for t in (query, key, value))
    batch = torch.broadcast_shapes(qs[:nd - 3], ks[:nd - 3], vs[:nd - 3])
    hq, hkv = qs[nd - 3], torch.broadcast_shapes(ks[nd - 3:nd - 2], vs[nd - 3:nd - 2])[0]
    heads = hq if (enable_gqa and hq != hkv) or hkv == 1 else hkv
    return (*batch, heads)


def _check_devices(op, **tensors):
    """Every tensor argument on the query's device (a meta tensor among CPU
    ones would otherwise send the call to this fake kernel)."""
    query = tensors["query"]
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == query.device,
                         lambda: "%s: expected query and %s to be on the same device, but query "
                                 "is on %s and %s is on %s" % (op, name, query.device, name,
                                                              t.device))


@torch.library.register_fake(_OP)
def _sdpa_fake(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False, need_weights=False):
    _check_devices(_OP, query=query, key=key, value=value, attn_mask=attn_mask)
    torch._check(query.dim() >= 2 and key.dim() >= 2 and value.dim() >= 2,
                 lambda: _OP + ": expected query, key and value with at least 2 dimensions")
    torch._check(key.shape[-1] == query.shape[-1],
                 lambda: _OP + ": query and key must have the same head size")
    lead = _leading_dims(query, key, value, enable_gqa)
    L, S = query.shape[-2], key.shape[-2]
    out = query.new_empty((*lead, L, value.shape[-1]))
    lse = query.new_empty((*lead, L), dtype=_lse_dtype(query.dtype))
    rng_state = query.new_empty(2, dtype=torch.int64)
    weights = query.new_empty((*lead, L, S) if need_weights else (0,))
    return out, lse, rng_state, weights


@torch.library.register_fake("handgrad::scaled_dot_product_attention_backward")
def _sdpa_backward_fake(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal,
                        scale, enable_gqa, rng_state, weights=None, grad_weights=None,
                        output_mask=(True, True, True, False)):
    _check_devices("handgrad::scaled_dot_product_attention_backward", query=query, key=key,
                   value=value, grad_out=grad_out, out=out, lse=lse, attn_mask=attn_mask,
                   rng_state=rng_state, weights=weights, grad_weights=grad_weights)
    grads = [torch.empty_like(t) if wanted else t.new_empty(0)
             for t, wanted in zip((query, key, value), output_mask)]
    wants_mask = output_mask[3] and attn_mask is not None
    grads.append(torch.empty_like(attn_mask) if wants_mask else query.new_empty(0))
    return tuple(grads)


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, need_weights = inputs
    out, lse, rng_state, weights = output
    # (one call: a second one would replace the first's set)
    ctx.mark_non_differentiable(lse, rng_state, *(() if need_weights else (weights,)))
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(query, key, value, out, lse, attn_mask, rng_state,
                          weights if need_weights else None)
    ctx.args = (dropout_p, is_causal, scale, enable_gqa)


def _backward(ctx, grad_out, _grad_lse, _grad_rng, grad_weights):
    none = (None,) * 9
    if grad_out is None and grad_weights is None:
        return none
    query, key, value, out, lse, attn_mask, rng_state, weights = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_weights is None:
        weights = None
    dropout_p, is_causal, scale, enable_gqa = ctx.args
    needs = tuple(ctx.needs_input_grad[:4]) + (False,) * (4 - len(ctx.needs_input_grad[:4]))
    grads = OPS.scaled_dot_product_attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale,
        enable_gqa, rng_state, weights, grad_weights, list(needs))
    return tuple(g if need else None for g, need in zip(grads, needs)) + none[len(grads):]


# Forward mode: _attention_autograd.forward_tangent (materializes P; see there).
def _jvp(ctx, inputs, t_query, t_key, t_value, t_mask, *_):
    t_out, t_weights = _formulas.forward_tangent(inputs, ctx.outputs, t_query, t_key, t_value,
                                                 t_mask)
    need_weights = inputs[8]
    return t_out, None, None, t_weights if need_weights else None


register_autograd(_OP, _backward, _setup_context, _jvp)


# Double backward and forward-over-reverse: the backward op's own gradient and
# tangent (_attention_autograd.backward_adjoint / backward_tangent). out, lse
# and weights get none: they are functions of query, key, value and the
# mask, and the formulas differentiate through them.
def _backward_setup_context(ctx, inputs, output):
    (grad_out, query, key, value, _out, lse, attn_mask, dropout_p, is_causal, scale, enable_gqa,
     rng_state, _weights, grad_weights, output_mask) = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_out, query, key, value, lse, attn_mask, rng_state, grad_weights)
    ctx.args = (dropout_p, is_causal, scale, enable_gqa)
    ctx.output_mask = tuple(output_mask)


def _materialized_backward(grad_out, query, key, value, lse, attn_mask, rng_state, grad_weights,
                           args):
    dropout_p, is_causal, scale, enable_gqa = args
    return _formulas.Backward(grad_out, query, key, value, lse, attn_mask, dropout_p, is_causal,
                              scale, enable_gqa, rng_state, grad_weights)


def _backward_backward(ctx, g_query, g_key, g_value, g_mask):
    needs = (*ctx.needs_input_grad, *([False] * 15))
    # Gradients of outputs the call did not compute (empty placeholders) are not gradients.
    g_query, g_key, g_value, g_mask = (g if wanted else None for g, wanted in
                                       zip((g_query, g_key, g_value, g_mask), ctx.output_mask))
    if g_query is None and g_key is None and g_value is None and g_mask is None:
        return (None,) * 15
    grad_out, query, key, value, lse, attn_mask, rng_state, grad_weights = ctx.saved_tensors
    b = _materialized_backward(grad_out, query, key, value, lse, attn_mask, rng_state,
                               grad_weights, ctx.args)
    d_go, d_q, d_k, d_v, d_mask, d_gw = _formulas.backward_adjoint(b, g_query, g_key, g_value,
                                                                   g_mask)
    d_mask = _formulas.reduce_to_mask(d_mask, attn_mask) if needs[6] else None
    return (d_go if needs[0] else None, d_q if needs[1] else None, d_k if needs[2] else None,
            d_v if needs[3] else None, None, None, d_mask, None, None, None, None, None, None,
            d_gw if needs[13] else None, None)


def _backward_jvp(ctx, inputs, t_grad_out, t_query, t_key, t_value, _t_out, _t_lse, t_mask,
                  _t_p, _t_causal, _t_scale, _t_gqa, _t_rng, _t_weights, t_grad_weights, *_):
    (grad_out, query, key, value, _out, lse, attn_mask, dropout_p, is_causal, scale, enable_gqa,
     rng_state, _weights, grad_weights, output_mask) = inputs
    b = _materialized_backward(grad_out, query, key, value, lse, attn_mask, rng_state,
                               grad_weights, (dropout_p, is_causal, scale, enable_gqa))
    t_dq, t_dk, t_dv, t_ds = _formulas.backward_tangent(b, t_grad_out, t_query, t_key, t_value,
                                                        t_mask, t_grad_weights)
    t_dmask = (_formulas.reduce_to_mask(t_ds, attn_mask)
               if output_mask[3] and attn_mask is not None else None)
    return tuple(t if wanted else None
                 for t, wanted in zip((t_dq, t_dk, t_dv, t_dmask), output_mask))


register_autograd("handgrad::scaled_dot_product_attention_backward", _backward_backward,
                  _backward_setup_context, _backward_jvp)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """softmax(scale * query @ key^T + mask) @ value, with the semantics of
    torch.nn.functional.scaled_dot_product_attention, in O(L) memory.

    Args:
        query: ``(..., Hq, L, E)``.
        key: ``(..., Hkv, S, E)``.
        value: ``(..., Hkv, S, Ev)``; the leading dimensions broadcast against
            each other (query may have fewer).
        attn_mask: bool (True takes part) or additive float, broadcastable to
            ``(..., Hq, L, S)``; a float mask that requires grad gets its gradient.
        dropout_p: dropout probability on the attention probabilities, in ``[0, 1]``,
            seeded from the generator of the inputs' device
            (``torch.manual_seed`` reproduces it).
        is_causal: mask with the top-left aligned lower triangle.
        scale: multiplier of the scores; default ``1/sqrt(E)``.
        enable_gqa: let ``Hq`` be a multiple of ``Hkv`` (grouped-query attention).

    Returns:
        ``(..., Hq, L, Ev)``, the dtype and device of ``query``.

    Dtypes and devices: float32, float64, float16 and bfloat16 on the CPU
    (half types computed in float32) and on CUDA. Differentiable in query, key,
    value and a float mask; saved for backward: the output and one log-sum-exp
    per query row (plus what a mask gradient needs).
    """
    return call("handgrad::scaled_dot_product_attention",
                query, key, value, attn_mask, float(dropout_p), bool(is_causal),
                None if scale is None else float(scale), bool(enable_gqa))[0]
