"""scaled_dot_product_attention: fake kernels, autograd registration and the public function.

The kernels are in csrc/ops/{attention.cpp, cpu/attention.cpp, cuda/attention.cu}.
Forward returns the output, one log-sum-exp per query row and a 2-element
int64 random state (the dropout seed and offset drawn from torch's default
CPU generator); backward recomputes the attention probabilities tile by tile
from those, so no L x S matrix is saved (memory linear in L).
"""

from typing import Optional

import torch

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
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = (
        tuple(inputs) + (None, 0.0, False, None, False)[len(inputs) - 3:])
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
    grad_q, grad_k, grad_v = torch.ops.handgrad.scaled_dot_product_attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale,
        enable_gqa, rng_state)
    needs = ctx.needs_input_grad
    return (grad_q if needs[0] else None, grad_k if needs[1] else None,
            grad_v if needs[2] else None, None, None, None, None, None)


torch.library.register_autograd("handgrad::scaled_dot_product_attention", _backward,
                                setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("handgrad::scaled_dot_product_attention does not support double "
                              "backward")


torch.library.register_autograd("handgrad::scaled_dot_product_attention_backward",
                                _no_double_backward, setup_context=lambda ctx, inputs, output: None)


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
        dropout_p: dropout probability on the attention weights, in ``[0, 1]``,
            seeded from the generator of the inputs' device
            (``torch.manual_seed`` reproduces it).
        is_causal: mask with the top-left aligned lower triangle.
        scale: multiplier of the scores; default ``1/sqrt(E)``.
        enable_gqa: let ``Hq`` be a multiple of ``Hkv`` (grouped-query attention).

    Returns:
        ``(..., Hq, L, Ev)``, the dtype and device of ``query``.

    Dtypes and devices: float32, float64, float16 and bfloat16 on the CPU
    (half types computed in float32) and on CUDA. Differentiable in query, key
    and value; saved for backward: the output and one log-sum-exp per query row.
    """
    return torch.ops.handgrad.scaled_dot_product_attention(
        query, key, value, attn_mask, float(dropout_p), bool(is_causal),
        None if scale is None else float(scale), bool(enable_gqa))[0]
