"""Attention autograd beyond first-order reverse mode, by hand.

First-order reverse mode is the flash-style backward kernel
(scaled_dot_product_attention_backward), which never forms the L x S
probabilities. The formulas here -- the forward op's tangent (forward-mode
AD), and the backward op's gradient (double backward) and tangent
(forward-over-reverse) -- DO materialize them: P and its dropped-out version
(B, H, L, S) are formed once per call, so these paths cost O(L S) memory per
head, like PyTorch's math attention. They serve gradient penalties, Hessian-
vector products and the torch.func transforms, not ordinary training.

P comes from the backward kernel itself, so it follows the kernel's rules
exactly (mask, causal triangle, dropout pattern, fully masked rows): the
value gradient of attention is dV = P~^T dO, so with dO = the identity (one
column per query row, value and out set to zeros) the kernel returns P~^T,
with dropout_p = 0 it returns P. Everything else is plain tensor algebra.

Notation, one head (batch and heads broadcast; grouped key/value heads are
repeated per query head and their gradients summed back):
    S = scale q k^T + M,   P = softmax(S) row-wise,   P~ = P * Z   (Z: the
        dropout keep mask over (1 - dropout_p); Z = 1 without dropout)
    out = P~ v
The row-wise softmax Jacobian, symmetric, so also its own transpose:
    J(X) = P * (X - rowsum(P * X))
Forward tangent:
    t_S = scale (t_q k^T + q t_k^T) + t_M
    t_out = (J(t_S) * Z) v + P~ t_v;   t_weights = J(t_S) * Z   (weights = P~)
With need_weights the op also returns weights = P~; its gradient G_W
joins the backward:
Backward (the kernel; D = rowsum(P * dP) = rowsum(dO * out) + rowsum(P~ * G_W)):
    dP = (dO v^T + G_W) * Z;   dS = J(dP) = P * (dP - D)
    dq = scale dS k;   dk = scale dS^T q;   dv = P~^T dO;   dM = dS
out, lse and weights, inputs of the backward op, are the forward's
functions of q, k, v and the mask: the formulas differentiate through them
(via P) and give them no gradient and read no tangent for them.
"""

import torch

from ._autograd import OPS


def _sum(*terms):
    present = [t for t in terms if t is not None]
    return sum(present[1:], present[0]) if present else None


def _mm(a, b):
    return None if a is None or b is None else torch.matmul(a, b)


def _mT(t):
    return None if t is None else t.transpose(-1, -2)


def _scaled(t, scale):
    return None if t is None else t * scale


def _softmax_jvp(p, t):
    """J(t) = p * (t - rowsum(p * t)) for the row-wise softmax p."""
    return p * (t - (p * t).sum(-1, keepdim=True))


class _Problem:
    """One call's operands broadcast to the output's leading dimensions, with
    one key/value head per query head, and how to sum gradients back."""

    def __init__(self, query, key, value, enable_gqa):
        self.shapes = (query.shape, key.shape, value.shape)
        nd = max(query.dim(), key.dim(), value.dim())
        padded = [t.reshape((1,) * (nd - t.dim()) + tuple(t.shape)) for t in (query, key, value)]
        q, k, v = padded
        self.groups = 1
        if nd >= 3 and enable_gqa and k.shape[-3] not in (1, q.shape[-3]):
            self.groups = q.shape[-3] // k.shape[-3]
            k = k.repeat_interleave(self.groups, dim=-3)
            v = v.repeat_interleave(self.groups, dim=-3)
        self.padded = [t.shape for t in padded]
        self.lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        self.q, self.k, self.v = (t.expand(*self.lead, *t.shape[-2:]) for t in (q, k, v))
        self.scale = None

    def expand(self, t, which):
        """A tensor shaped like query (0), key (1) or value (2), expanded like it."""
        if t is None:
            return None
        t = t.reshape(self.padded[which])
        if which and self.groups > 1:
            t = t.repeat_interleave(self.groups, dim=-3)
        return t.expand(*self.lead, *t.shape[-2:])

    def reduce(self, grad, which):
        """The adjoint of expand: sums over broadcast dimensions and head groups."""
        if grad is None:
            return None
        if which and self.groups > 1:
            grad = grad.unflatten(-3, (-1, self.groups)).sum(-3)
        return grad.sum_to_size(self.padded[which]).reshape(self.shapes[which])


def reduce_to_mask(grad, mask):
    """A gradient over (*lead, L, S) summed to the mask's (broadcast) shape."""
    return None if grad is None else grad.sum_to_size(mask.shape)


def _kernel_probabilities(problem, lse, attn_mask, dropout_p, is_causal, scale, rng_state):
    """(P, P~, Z) from the backward kernel (see the module docstring); Z is
    None without dropout (P~ is P)."""
    q, k = problem.q, problem.k
    L, S = q.shape[-2], k.shape[-2]
    eye = torch.eye(L, dtype=q.dtype, device=q.device).expand(*problem.lead, L, L)
    zeros_v = q.new_zeros((*problem.lead, S, L))
    zeros_out = q.new_zeros((*problem.lead, L, L))
    lse = lse.expand(*problem.lead, L)

    # Through OPS, differentiable: a further derivative of these formulas
    # (third order, or reverse over forward) differentiates P too, by the
    # backward op's own formulas -- which hold here, as out = P~ 0 = 0 is
    # consistent with the zero value.
    def transposed_probabilities(p):
        _, _, grad_v, _ = OPS.scaled_dot_product_attention_backward(
            eye, q, k, zeros_v, zeros_out, lse, attn_mask, p, is_causal, scale, False, rng_state,
            None, None, [False, False, True, False])
        return grad_v.transpose(-1, -2)

    p = transposed_probabilities(0.0)
    if dropout_p == 0.0:
        return p, p, None
    dropped = transposed_probabilities(dropout_p)
    keep = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    z = (dropped != 0).to(p.dtype) * keep
    return p, dropped, z


def _times(t, z):
    return t if z is None or t is None else t * z


def _score_tangent(problem, t_q, t_k, t_mask):
    """t_S = scale (t_q k^T + q t_k^T) + t_M (each term where its tangent exists)."""
    return _sum(_scaled(_mm(t_q, _mT(problem.k)), problem.scale),
                _scaled(_mm(problem.q, _mT(t_k)), problem.scale), t_mask)


# ---- the forward op ---------------------------------------------------------------------------

def forward_tangent(inputs, outputs, t_query, t_key, t_value, t_mask):
    """(t_out, t_weights) of (out, weights = P~) = attention(query, key, value, attn_mask, ...)."""
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = inputs[:8]
    lse, rng_state = outputs[1], outputs[2]
    problem = _Problem(query, key, value, enable_gqa)
    problem.scale = scale if scale is not None else query.shape[-1] ** -0.5
    p, dropped, z = _kernel_probabilities(problem, lse, attn_mask, dropout_p, is_causal, scale,
                                          rng_state)
    t_q, t_k, t_v = problem.expand(t_query, 0), problem.expand(t_key, 1), problem.expand(t_value, 2)
    t_s = _score_tangent(problem, t_q, t_k, t_mask)
    t_weights = None if t_s is None else _times(_softmax_jvp(p, t_s), z)
    return _sum(_mm(t_weights, problem.v), _mm(dropped, t_v)), t_weights


# ---- the backward op --------------------------------------------------------------------------

class Backward:
    """The backward op's quantities, materialized: dP, D and dS. grad_weights
    (G_W, the gradient of the weights output P~, or None) joins dO v^T."""

    def __init__(self, grad_out, query, key, value, lse, attn_mask, dropout_p, is_causal, scale,
                 enable_gqa, rng_state, grad_weights):
        self.problem = problem = _Problem(query, key, value, enable_gqa)
        problem.scale = scale if scale is not None else query.shape[-1] ** -0.5
        self.p, self.dropped, self.z = _kernel_probabilities(
            problem, lse, attn_mask, dropout_p, is_causal, scale, rng_state)
        self.grad_out = grad_out.expand(*problem.lead, *grad_out.shape[-2:])
        self.dp = _times(_sum(_mm(self.grad_out, _mT(problem.v)), grad_weights), self.z)
        self.d = (self.p * self.dp).sum(-1, keepdim=True)
        self.ds = self.p * (self.dp - self.d)


# Tangent of the backward op, each line differentiating the backward above:
#   t_P  = J(t_S)
#   t_dP = (t_dO v^T + dO t_v^T + t_G_W) * Z
#   t_D  = rowsum(t_P * dP + P * t_dP)
#   t_dS = t_P * (dP - D) + P * (t_dP - t_D)
#   t_dq = scale (t_dS k + dS t_k);  t_dk = scale (t_dS^T q + dS^T t_q)
#   t_dv = (t_P * Z)^T dO + P~^T t_dO
def backward_tangent(b, t_grad_out, t_query, t_key, t_value, t_mask, t_grad_weights):
    problem = b.problem
    t_q, t_k, t_v = problem.expand(t_query, 0), problem.expand(t_key, 1), problem.expand(t_value, 2)
    t_go = None if t_grad_out is None else t_grad_out.expand(b.grad_out.shape)
    t_s = _score_tangent(problem, t_q, t_k, t_mask)
    t_p = None if t_s is None else _softmax_jvp(b.p, t_s)
    t_dp = _times(_sum(_mm(t_go, _mT(problem.v)), _mm(b.grad_out, _mT(t_v)), t_grad_weights),
                  b.z)
    t_ds = _sum(None if t_p is None else t_p * (b.dp - b.d),
                None if t_dp is None else b.p * t_dp,
                None if t_p is None and t_dp is None else -b.p * _sum(
                    None if t_p is None else (t_p * b.dp).sum(-1, keepdim=True),
                    None if t_dp is None else (b.p * t_dp).sum(-1, keepdim=True)))
    scale = problem.scale
    t_dq = _scaled(_sum(_mm(t_ds, problem.k), _mm(b.ds, t_k)), scale)
    t_dk = _scaled(_sum(_mm(_mT(t_ds), problem.q), _mm(_mT(b.ds), t_q)), scale)
    t_dv = _sum(_mm(_mT(_times(t_p, b.z)), b.grad_out), _mm(_mT(b.dropped), t_go))
    return (problem.reduce(t_dq, 0), problem.reduce(t_dk, 1), problem.reduce(t_dv, 2), t_ds)


# Adjoint of the backward op, with G_q, G_k, G_v (and G_M) the gradients
# reaching dq, dk, dv (and dM), transposing the lines above:
#   G_dS = scale (G_q k^T + q G_k^T) + G_M
#   G_k  = scale dS^T G_q;   G_q = scale dS G_k                (dS's factors)
#   G_dP = J(G_dS) * Z          (also the gradient reaching G_W)
#   G_P  = G_dS * (dP - D) - rowsum(G_dS * P) dP + (dO G_v^T) * Z
#   G_dO = G_dP v + P~ G_v;   G_v = G_dP^T dO
#   G_S  = J(G_P):   G_q += scale G_S k;  G_k += scale G_S^T q;  G_M += G_S
def backward_adjoint(b, g_q, g_k, g_v, g_mask):
    problem = b.problem
    scale = problem.scale
    g_q, g_k, g_v = problem.expand(g_q, 0), problem.expand(g_k, 1), problem.expand(g_v, 2)
    g_ds = _score_tangent(problem, g_q, g_k, g_mask)
    g_p = _times(_mm(b.grad_out, _mT(g_v)), b.z)
    d_q = _scaled(_mm(b.ds, g_k), scale)
    d_k = _scaled(_mm(_mT(b.ds), g_q), scale)
    d_v = d_go = g_dp = None
    if g_ds is not None:
        g_dp = _times(_softmax_jvp(b.p, g_ds), b.z)
        g_p = _sum(g_p, g_ds * (b.dp - b.d) - (g_ds * b.p).sum(-1, keepdim=True) * b.dp)
        d_go = _mm(g_dp, problem.v)
        d_v = _mm(_mT(g_dp), b.grad_out)
    d_go = _sum(d_go, _mm(b.dropped, g_v))
    g_s = None if g_p is None else _softmax_jvp(b.p, g_p)
    d_q = _sum(d_q, _scaled(_mm(g_s, problem.k), scale))
    d_k = _sum(d_k, _scaled(_mm(_mT(g_s), problem.q), scale))
    return (d_go, problem.reduce(d_q, 0), problem.reduce(d_k, 1), problem.reduce(d_v, 2), g_s,
            g_dp)
