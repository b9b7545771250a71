"""Autograd beyond first-order reverse mode, for every op (issue 16 items 4, 5):
forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd), double
backward (gradgradcheck, gradient penalties), the torch.func transforms (grad,
vjp, jacrev, vmap, hessian) -- each against native PyTorch -- and the clear
errors where a raw torch.ops call bypasses the formulas.

The formulas are in python/handgrad/ops/{conv2d, max_pool2d, _lstm_autograd,
_cross_entropy_autograd, ...}.py. Sizes are small: the cuda-emulated device
runs every CUDA thread as a fiber, and the transforms loop over the ops'
batching fallback.
"""

import copy
import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import func
from torch.nn.attention import SDPBackend, sdpa_kernel

import handgrad
from handgrad.ops._autograd import OPS

# Under vmap (and the transforms built on it: jacfwd, jacrev, hessian) the
# ops run through PyTorch's per-sample batching fallback, which warns that
# it is slower than a batching rule would be; correct, and expected here.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

D = torch.float64
HG = handgrad.ops


def randn(*shape, device):
    return torch.randn(shape, dtype=D, device=device)


# ---- native references ------------------------------------------------------------------------

def reference_lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One LSTM step written with PyTorch ops (torch.lstm_cell has no vmap rule)."""
    z = x @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh
    i, f, g, o = z.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def reference_lstm_layer(x, h, c, w_ih, w_hh, b_ih, b_hh, reverse):
    outputs = [None] * len(x)
    for t in (range(len(x) - 1, -1, -1) if reverse else range(len(x))):
        h, c = reference_lstm_cell(x[t], h, c, w_ih, w_hh, b_ih, b_hh)
        outputs[t] = h
    return torch.stack(outputs), h, c


# ---- the cases: (handgrad function, native function, inputs) ----------------------------------
# Every tensor input is float64 and differentiable; the functions return a
# tensor or a flat tuple of tensors.

def _conv2d(device):
    x, w = randn(2, 4, 5, 6, device=device), randn(6, 2, 3, 2, device=device)
    b = randn(6, device=device)
    kw = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    return (lambda x, w, b: HG.conv2d(x, w, b, **kw),
            lambda x, w, b: F.conv2d(x, w, b, **kw), (x, w, b))


def _max_pool2d(device):
    kw = dict(kernel_size=3, stride=2, padding=1, dilation=1)
    return (lambda x: HG.max_pool2d(x, **kw), lambda x: F.max_pool2d(x, **kw),
            (randn(2, 3, 6, 7, device=device),))


def _max_pool2d_channels_last(device):
    kw = dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), ceil_mode=True)
    x = randn(2, 3, 5, 7, device=device).contiguous(memory_format=torch.channels_last)
    return (lambda x: HG.max_pool2d(x, **kw), lambda x: F.max_pool2d(x, **kw), (x,))


def _lstm_params(device, input_size=3, hidden=2):
    return (randn(4 * hidden, input_size, device=device), randn(4 * hidden, hidden, device=device),
            randn(4 * hidden, device=device), randn(4 * hidden, device=device))


def _lstm_cell(device):
    inputs = (randn(2, 3, device=device), randn(2, 2, device=device), randn(2, 2, device=device),
              *_lstm_params(device))
    return (lambda x, h, c, *p: HG.lstm_cell(x, (h, c), *p), reference_lstm_cell, inputs)


def _lstm_layer(reverse):
    def case(device):
        inputs = (randn(3, 2, 3, device=device), randn(2, 2, device=device),
                  randn(2, 2, device=device), *_lstm_params(device))

        def mine(x, h, c, *p):
            out, (h, c) = HG.lstm_layer(x, h, c, *p, reverse=reverse)
            return out, h, c

        return mine, lambda *a: reference_lstm_layer(*a, reverse), inputs
    return case


def _cross_entropy_index(reduction):
    def case(device):
        weight = torch.rand(5, dtype=D, device=device) + 0.5
        target = torch.tensor([1, -100, 4, 0], device=device)
        kw = dict(weight=weight, ignore_index=-100, reduction=reduction, label_smoothing=0.2)
        return (lambda x: HG.cross_entropy(x, target, **kw),
                lambda x: F.cross_entropy(x, target, **kw), (randn(4, 5, device=device),))
    return case


def _cross_entropy_probabilities(reduction, weighted=False):
    def case(device):
        kw = dict(reduction=reduction, label_smoothing=0.1)
        if weighted:  # class weights reach the target's gradient and the row scale of 'mean'
            kw["weight"] = torch.rand(4, dtype=D, device=device) + 0.5
        target = torch.softmax(randn(2, 4, 3, device=device), 1)
        return (lambda x, y: HG.cross_entropy(x, y, **kw),
                lambda x, y: F.cross_entropy(x, y, **kw), (randn(2, 4, 3, device=device), target))
    return case


def _cross_entropy_unbatched(device):
    return (lambda x: HG.cross_entropy(x, torch.tensor(2, device=device)),
            lambda x: F.cross_entropy(x, torch.tensor(2, device=device)),
            (randn(5, device=device),))


def _native_attention(*args, **kw):
    # The math backend: PyTorch's fused CPU attention has no double backward.
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kw)


def _attention(q_shape, k_shape, v_shape, mask=None, **kw):
    def case(device):
        q, k, v = (randn(*s, device=device) for s in (q_shape, k_shape, v_shape))
        if mask == "float":
            kw["attn_mask"] = randn(q_shape[-2], k_shape[-2], device=device)
        elif mask == "bool":
            keep = torch.rand(q_shape[-2], k_shape[-2], device=device) > 0.4
            keep[:, 0] = True  # no fully masked row
            kw["attn_mask"] = keep
        return (lambda q, k, v: HG.scaled_dot_product_attention(q, k, v, **kw),
                lambda q, k, v: _native_attention(q, k, v, **kw), (q, k, v))
    return case


def _attention_learned_mask(device):
    # A float mask that requires grad (a learned position bias): a fourth input.
    inputs = (randn(1, 2, 3, 4, device=device), randn(1, 2, 5, 4, device=device),
              randn(1, 2, 5, 2, device=device), randn(2, 1, 5, device=device))
    return (lambda q, k, v, m: HG.scaled_dot_product_attention(q, k, v, attn_mask=m),
            lambda q, k, v, m: _native_attention(q, k, v, attn_mask=m), inputs)


def _attention_weights(device):
    # need_weights (what MultiheadAttention uses): the weights P are an output too.
    def mine(q, k, v):
        out, _, _, weights = OPS.scaled_dot_product_attention(q, k, v, None, 0.0, False, 0.6,
                                                              False, True)
        return out, weights

    def native(q, k, v):
        weights = torch.softmax(q @ k.transpose(-1, -2) * 0.6, dim=-1)
        return weights @ v, weights
    return mine, native, tuple(randn(2, 3, 4, device=device) for _ in range(3))


CASES = {
    "conv2d": _conv2d,
    "max_pool2d": _max_pool2d,
    "max_pool2d_channels_last": _max_pool2d_channels_last,
    "lstm_cell": _lstm_cell,
    "lstm_layer": _lstm_layer(False),
    "lstm_layer_reverse": _lstm_layer(True),
    "cross_entropy_mean": _cross_entropy_index("mean"),
    "cross_entropy_none": _cross_entropy_index("none"),
    "cross_entropy_probabilities_sum": _cross_entropy_probabilities("sum"),
    "cross_entropy_probabilities_none": _cross_entropy_probabilities("none"),
    "cross_entropy_probabilities_mean_weighted": _cross_entropy_probabilities("mean", True),
    "cross_entropy_unbatched": _cross_entropy_unbatched,
    "attention": _attention((2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 3)),
    "attention_gqa": _attention((1, 4, 3, 4), (1, 2, 5, 4), (1, 2, 5, 2), enable_gqa=True),
    "attention_causal_scale": _attention((1, 2, 4, 3), (1, 2, 4, 3), (1, 2, 4, 2),
                                         is_causal=True, scale=0.7),
    "attention_float_mask": _attention((2, 3, 4), (2, 5, 4), (2, 5, 2), mask="float"),
    "attention_bool_mask": _attention((2, 3, 4), (2, 5, 4), (2, 5, 2), mask="bool"),
    "attention_broadcast_batch": _attention((2, 1, 3, 4), (1, 2, 5, 4), (1, 2, 5, 2)),
    # The query of a higher rank than key and value; one query head against
    # two key heads and one value head; GQA on 3-D (heads, L, E) operands.
    "attention_ranks_and_heads_broadcast": _attention((2, 1, 3, 4), (2, 5, 4), (1, 5, 2)),
    "attention_gqa_3d": _attention((4, 3, 4), (2, 5, 4), (2, 5, 2), enable_gqa=True),
    "attention_learned_mask": _attention_learned_mask,
    "attention_weights": _attention_weights,
}


@pytest.fixture(params=list(CASES))
def case(request, device):
    return CASES[request.param](device)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _tangents(inputs):
    gen = torch.Generator().manual_seed(7)
    return tuple(torch.randn(t.shape, generator=gen, dtype=D).to(t.device) for t in inputs)


def _scalar(fn):
    """A scalar function of the op's outputs whose second derivatives are not trivial."""
    return lambda *args: sum((o * o.sin()).sum() for o in _as_tuple(fn(*args)))


# ---- gradcheck ---------------------------------------------------------------------------------

def test_gradcheck_reverse_and_forward_mode(case):
    mine, _, inputs = case
    inputs = tuple(t.requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(mine, inputs, check_forward_ad=True, check_backward_ad=True,
                                    check_undefined_grad=True, check_batched_grad=True)


def test_gradgradcheck(case):
    mine, _, inputs = case
    inputs = tuple(t.requires_grad_() for t in inputs)
    # check_fwd_over_rev: the backward ops' jvp formulas (Hessian-vector products).
    assert torch.autograd.gradgradcheck(mine, inputs, check_fwd_over_rev=True)


def _each_input_alone(fn, args, chosen):
    """For each index in `chosen`: (index, fn of that argument alone -- every
    other tensor argument detached -- and a fresh leaf for it).

    With every input requiring grad, a formula that reads the wrong entry of
    needs_input_grad (b_ih's gradient computed only when b_hh asks for one,
    say) goes unnoticed; with one input at a time it returns None where a
    gradient is due, or a gradient nobody asked for. Forward mode too: the
    jvp formulas then meet tangents that are None for every input but one."""
    fixed = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    for index in chosen:
        def alone(t, index=index):
            call = list(fixed)
            call[index] = t
            return fn(*call)
        yield index, alone, args[index].detach().requires_grad_()


def test_one_input_at_a_time_gradcheck_and_gradgradcheck(case):
    mine, _, inputs = case
    for index, alone, leaf in _each_input_alone(mine, inputs, range(len(inputs))):
        assert torch.autograd.gradcheck(alone, [leaf], check_forward_ad=True), index
        assert torch.autograd.gradgradcheck(alone, [leaf], check_fwd_over_rev=True), index


# ---- against native ----------------------------------------------------------------------------

def test_forward_ad_dual_tensors_match_native(case):
    mine, native, inputs = case
    tangents = _tangents(inputs)
    results = []
    for fn in (mine, native):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(inputs, tangents)]
            results.append([fwAD.unpack_dual(o) for o in _as_tuple(fn(*duals))])
    for a, b in zip(*results):
        torch.testing.assert_close(a.primal, b.primal)
        assert a.tangent is not None
        torch.testing.assert_close(a.tangent, b.tangent)


def _both(mine, native, transform):
    got, want = transform(mine), transform(native)
    torch.testing.assert_close(got, want)


def test_func_jvp_and_jacfwd_match_native(case):
    mine, native, inputs = case
    tangents = _tangents(inputs)
    _both(mine, native, lambda fn: func.jvp(fn, inputs, tangents))
    argnums = tuple(range(len(inputs)))
    _both(mine, native, lambda fn: func.jacfwd(fn, argnums=argnums)(*inputs))


def test_func_grad_vjp_jacrev_match_native(case):
    mine, native, inputs = case
    argnums = tuple(range(len(inputs)))
    _both(mine, native, lambda fn: func.grad(_scalar(fn), argnums=argnums)(*inputs))
    _both(mine, native, lambda fn: func.jacrev(fn, argnums=argnums)(*inputs))

    def vjp(fn):
        out, pullback = func.vjp(fn, *inputs)
        return out, pullback(tuple(torch.ones_like(o) * 0.5 for o in _as_tuple(out))
                             if isinstance(out, tuple) else torch.ones_like(out) * 0.5)
    _both(mine, native, vjp)


def test_func_vmap_matches_native(case):
    mine, native, inputs = case
    batched = tuple(torch.stack([t, 2 * t]) for t in inputs)
    _both(mine, native, lambda fn: func.vmap(fn)(*batched))


def test_func_hessian_matches_native(case):
    mine, native, inputs = case
    # jacfwd(jacrev): the forward mode of the backward ops. Over the first
    # argument only, to keep the Hessian small.
    _both(mine, native,
          lambda fn: func.hessian(lambda first: _scalar(fn)(first, *inputs[1:]))(inputs[0]))


def test_attention_with_dropout_gradcheck_and_gradgradcheck(device):
    # Dropout draws its pattern from torch's generator: reseeded, every call
    # of the function sees the same pattern, which the formulas read back
    # from the backward kernel.
    inputs = tuple(randn(1, 2, 3, 4, device=device).requires_grad_() for _ in range(3))

    def attention(q, k, v):
        torch.manual_seed(5)
        return HG.scaled_dot_product_attention(q, k, v, dropout_p=0.4, enable_gqa=True)
    assert torch.autograd.gradcheck(attention, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(attention, inputs, check_fwd_over_rev=True)


def test_attention_third_derivative_matches_native(device):
    q, k, v = (randn(1, 2, 3, 4, device=device).requires_grad_() for _ in range(3))
    results = []
    for attention in (HG.scaled_dot_product_attention, _native_attention):
        (g1,) = torch.autograd.grad(attention(q, k, v).sin().sum(), q, create_graph=True)
        (g2,) = torch.autograd.grad(g1.pow(2).sum(), k, create_graph=True)
        results.append(torch.autograd.grad(g2.sum(), (q, k, v)))
    torch.testing.assert_close(results[0], results[1])


# ---- gradient penalties: one training step against native ------------------------------------

def _penalty_step(model, x, loss_fn):
    """One SGD step on loss + (|d loss / d x| - 1)^2 (a WGAN-GP-style penalty);
    returns the parameters after the step."""
    x = x.clone().requires_grad_()
    loss = loss_fn(model(x))
    (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    penalty = (grad_x.flatten(1).norm(dim=1) - 1).pow(2).mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    (loss + 10 * penalty).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _assert_same_step(native, mine, x, loss_fn):
    mine.load_state_dict(native.state_dict())
    torch.testing.assert_close(_penalty_step(mine, x, loss_fn), _penalty_step(native, x, loss_fn))


class _Critic(torch.nn.Module):
    def __init__(self, conv, pool, features=3 * 2 * 2):
        super().__init__()
        self.conv, self.pool = conv, pool
        self.head = torch.nn.Linear(features, 1)

    def forward(self, x):
        return self.head(self.pool(torch.tanh(self.conv(x))).flatten(1))


def test_gradient_penalty_conv_critic_matches_native(device):
    native = _Critic(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.MaxPool2d(2)).to(device, D)
    mine = _Critic(handgrad.nn.Conv2d(2, 3, 3, padding=1), handgrad.nn.MaxPool2d(2)).to(device, D)
    _assert_same_step(native, mine, randn(3, 2, 4, 4, device=device), lambda y: y.mean())


class _Classifier(torch.nn.Module):
    def __init__(self, cross_entropy):
        super().__init__()
        self.linear = torch.nn.Linear(6, 4)
        self.cross_entropy = cross_entropy

    def forward(self, x):
        return self.cross_entropy(self.linear(x), torch.tensor([0, 3, 1], device=x.device),
                                  label_smoothing=0.1)


def test_gradient_penalty_through_cross_entropy_matches_native(device):
    native = _Classifier(F.cross_entropy).to(device, D)
    mine = _Classifier(HG.cross_entropy).to(device, D)
    _assert_same_step(native, mine, randn(3, 6, device=device), lambda loss: loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("uses", ["output", "output_and_state"])
def test_gradient_penalty_lstm_matches_native(device, dtype, uses):
    # Issue 16 item 4: the weights got grad None (float32) or an unrelated
    # "mm(): out=" error (float64) before. With the final state in the loss
    # too, the layers' backward receives all five incoming gradients (output,
    # h_T, c_T, gates, cells) at once.
    native = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    native = native.to(device, dtype)
    mine = copy.deepcopy(native)
    mine.__class__ = handgrad.nn.LSTM
    x = torch.randn(2, 5, 3, dtype=dtype, device=device)

    def loss_fn(out):
        loss = out[0].pow(2).mean()
        if uses == "output_and_state":
            h, c = out[1]
            loss = loss + h.sin().sum() + c.pow(2).sum()
        return loss
    mine.load_state_dict(native.state_dict())
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(_penalty_step(mine, x, loss_fn),
                               _penalty_step(native, x, loss_fn), **tol)


def test_gradient_penalty_lstm_cell_matches_native(device):
    native = torch.nn.LSTMCell(3, 4).to(device, D)
    mine = copy.deepcopy(native)
    mine.__class__ = handgrad.nn.LSTMCell
    _assert_same_step(native, mine, randn(2, 3, device=device),
                      lambda hc: (hc[0] * hc[1]).sum())


class _AttentionCritic(torch.nn.Module):
    def __init__(self, attention, need_weights):
        super().__init__()
        self.attention, self.need_weights = attention, need_weights
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        with sdpa_kernel(SDPBackend.MATH):
            mixed, weights = self.attention(x, x, x, need_weights=self.need_weights)
        score = self.head(mixed).mean()
        return score if weights is None else score + weights.pow(2).mean()


@pytest.mark.parametrize("need_weights", [False, True])
def test_gradient_penalty_attention_matches_native(device, need_weights):
    native = _AttentionCritic(torch.nn.MultiheadAttention(8, 2, batch_first=True), need_weights)
    mine = _AttentionCritic(handgrad.nn.MultiheadAttention(8, 2, batch_first=True),
                            need_weights)
    _assert_same_step(native.to(device, D), mine.to(device, D), randn(2, 5, 8, device=device),
                      lambda y: y)


# ---- the backward ops themselves ---------------------------------------------------------------

def _backward_op_cases(device):
    """(op, arguments) for every backward op, with differentiable tensors where
    the op's formulas give gradients."""
    ops = torch.ops.handgrad
    r = lambda *s: randn(*s, device=device).requires_grad_()  # noqa: E731
    x, w = r(2, 4, 5, 6), r(6, 2, 3, 2)
    window = ([2, 1], [1, 1, 0, 1], [1, 2], 2)
    go = r(*ops.conv2d(x, w, None, *window).shape)
    cases = [(ops.conv2d_grad_input, (go, w, list(x.shape), *window)),
             (ops.conv2d_grad_weight, (go, x, list(w.shape), *window)),
             (ops.conv2d_grad_bias, (go,))]
    pooled, indices = ops.max_pool2d(x.detach(), [3, 2], [2, 1], [1, 0], [1, 2], False)
    cases.append((ops.max_pool2d_backward,
                  (r(*pooled.shape), indices, list(x.shape), [3, 2], [2, 1], [1, 0], [1, 2])))
    # LSTM: the gates and cell states are inputs of their own (the forward's outputs).
    xs, h, c, *params = r(3, 2, 3), r(2, 2), r(2, 2), *_lstm_params(device)
    params = [p.requires_grad_() for p in params]
    out, _, _, gates, cells = (t.detach() for t in ops.lstm_layer(xs, h, c, *params, False))
    cases.append((ops.lstm_cell_backward,
                  (r(2, 2), r(2, 2), gates[0].clone().requires_grad_(), c,
                   cells[0].clone().requires_grad_(), xs[0].detach().requires_grad_(), h,
                   params[0], params[1])))
    for reverse, input_grad in [(False, True), (True, False)]:
        cases.append((ops.lstm_layer_backward,
                      (r(3, 2, 2), r(2, 2), r(2, 2), xs, h, c, params[0], params[1],
                       out.clone().requires_grad_(), gates.clone().requires_grad_(),
                       cells.clone().requires_grad_(), reverse, input_grad)))
    return cases


def test_backward_ops_gradcheck_and_opcheck(device):
    for op, args in _backward_op_cases(device):
        torch.library.opcheck(op.default, args)
        tensors = [i for i, a in enumerate(args)
                   if isinstance(a, torch.Tensor) and a.requires_grad]

        def fn(*diff, op=op, args=args, tensors=tensors):
            full = list(args)
            for i, t in zip(tensors, diff):
                full[i] = t
            out = op(*full)
            # lstm_layer_backward without input_grad: an empty placeholder first.
            return tuple(o for o in _as_tuple(out) if o.numel())

        assert torch.autograd.gradcheck(fn, [args[i] for i in tensors], check_forward_ad=True)


def test_backward_ops_gradcheck_one_input_at_a_time(device):
    # (See _each_input_alone.)
    for op, args in _backward_op_cases(device):
        def outputs(*call, op=op):
            return tuple(o for o in _as_tuple(op(*call)) if o.numel())

        differentiable = [i for i, a in enumerate(args)
                          if isinstance(a, torch.Tensor) and a.requires_grad]
        for index, alone, leaf in _each_input_alone(outputs, args, differentiable):
            assert torch.autograd.gradcheck(alone, [leaf], check_forward_ad=True), (op, index)


@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_backward_op_gradcheck(device, need_weights):
    # out, lse (and weights) are inputs of the backward op but functions of
    # query, key, value and the mask (the formulas differentiate through them):
    # made by the forward. grad_out and grad_weights are inputs of their own.
    ops = torch.ops.handgrad
    q = randn(1, 4, 3, 4, device=device).requires_grad_()
    k, v = (randn(1, 2, 5, 4, device=device).requires_grad_() for _ in range(2))
    mask = randn(3, 5, device=device).requires_grad_()
    grad_out = randn(1, 4, 3, 4, device=device).requires_grad_()
    grad_weights = randn(1, 4, 3, 5, device=device).requires_grad_()

    def grads(grad_out, grad_weights, q, k, v, mask):
        out, lse, rng, weights = ops.scaled_dot_product_attention(q, k, v, mask, 0.0, False, 0.8,
                                                                  True, need_weights)
        return ops.scaled_dot_product_attention_backward(
            grad_out, q, k, v, out, lse, mask, 0.0, False, 0.8, True, rng,
            weights if need_weights else None, grad_weights if need_weights else None,
            [True, True, True, True])
    inputs = (grad_out, grad_weights, q, k, v, mask)
    assert torch.autograd.gradcheck(grads, inputs, check_forward_ad=True)
    # One input at a time (see _each_input_alone).
    for index, alone, leaf in _each_input_alone(grads, inputs, range(len(inputs))):
        assert torch.autograd.gradcheck(alone, [leaf], check_forward_ad=True), index
    out, lse, rng, weights = ops.scaled_dot_product_attention(q, k, v, mask, 0.0, False, 0.8,
                                                              True, need_weights)
    torch.library.opcheck(ops.scaled_dot_product_attention_backward.default,
                          (grad_out, q, k, v, out.detach(), lse, mask, 0.0, False, 0.8, True, rng,
                           weights.detach() if need_weights else None,
                           grad_weights if need_weights else None, [True, False, True, True]))


def _cross_entropy_backward_inputs(device):
    x = randn(4, 5, device=device).requires_grad_()
    y = torch.softmax(randn(4, 5, device=device), 1).requires_grad_()
    g = randn(4, device=device).requires_grad_()
    return x, y, g


def test_cross_entropy_backward_ops_gradcheck(device):
    ops = torch.ops.handgrad
    x, y, g = _cross_entropy_backward_inputs(device)
    weight = torch.rand(5, dtype=D, device=device) + 0.5

    # lse is given as the function of x it is (the formulas differentiate through it).
    def grad_input(x, y, g):
        return ops.cross_entropy_backward(g, x, y, weight, -100, "none", 0.1,
                                          torch.logsumexp(x, 1))

    def grad_target(x, g):
        return ops.cross_entropy_target_backward(g, x, y.detach(), weight, "none", 0.1,
                                                 torch.logsumexp(x, 1))

    assert torch.autograd.gradcheck(grad_input, (x, y, g), check_forward_ad=True)
    assert torch.autograd.gradcheck(grad_target, (x, g), check_forward_ad=True)
    lse = ops.cross_entropy(x.detach(), y.detach(), None, -100, "sum", 0.0)[1]
    gs = torch.ones((), dtype=D, device=device, requires_grad=True)
    torch.library.opcheck(ops.cross_entropy_backward.default,
                          (gs, x, y, None, -100, "sum", 0.0, lse))
    torch.library.opcheck(ops.cross_entropy_target_backward.default,
                          (gs, x, y, None, "sum", 0.0, lse))


# ---- raw operators: a clear error, never a silent zero ----------------------------------------

def _raw_calls(device):
    ops = torch.ops.handgrad
    x4, w = randn(1, 2, 4, 4, device=device), randn(3, 2, 3, 3, device=device)
    p = _lstm_params(device, 2, 2)
    h = randn(1, 2, device=device)
    return {
        "conv2d": lambda x: ops.conv2d(x4 * x, w, None, [1, 1], [0, 0, 0, 0], [1, 1], 1),
        "max_pool2d": lambda x: ops.max_pool2d(x4 * x, [2, 2])[0],
        "lstm_cell": lambda x: ops.lstm_cell(h * x, h, h, *p)[0],
        "lstm_layer": lambda x: ops.lstm_layer((h * x).unsqueeze(0), h, h, *p, False)[0],
        "attention": lambda x: ops.scaled_dot_product_attention(
            x4[0] * x, x4[0], x4[0], None, 0.0, False, None, False)[0],
        "cross_entropy": lambda x: ops.cross_entropy(
            h * x, torch.tensor([1], device=device), None, -100, "mean", 0.0)[0],
    }


@pytest.mark.parametrize("transform", ["grad", "jvp", "jacrev"])
def test_raw_op_under_a_differentiating_transform_raises(transform):
    one = torch.ones((), dtype=D)
    for name, raw in _raw_calls(torch.device("cpu")).items():
        run = {"grad": lambda: func.grad(lambda x: raw(x).sum())(one),
               "jvp": lambda: func.jvp(raw, (one,), (one,)),
               "jacrev": lambda: func.jacrev(raw)(one)}[transform]
        with pytest.raises(RuntimeError, match="under a torch.func transform"):
            run()


def test_raw_op_under_vmap_alone_is_right():
    # vmap without differentiation needs no formulas: PyTorch's batching
    # fallback runs the op once per sample, below the transform.
    xs = torch.tensor([1.0, -2.0], dtype=D)
    for name, raw in _raw_calls(torch.device("cpu")).items():
        torch.testing.assert_close(func.vmap(raw)(xs), torch.stack([raw(x) for x in xs]))


def _dual_calls():
    """(raw op call, public function call) of the ops whose Autograd kernel is
    C++ (for speed) and has no tangent formula."""
    t = torch.tensor([0, 3, 1])
    h = torch.randn(3, 2, dtype=D)
    w_ih, w_hh = torch.randn(8, 4, dtype=D), torch.randn(8, 2, dtype=D)
    return {
        "cross_entropy": (lambda x: torch.ops.handgrad.cross_entropy(x, t, None, -100, "mean",
                                                                     0.0)[0],
                          lambda x: HG.cross_entropy(x, t),
                          lambda x: F.cross_entropy(x, t)),
        "lstm_cell": (lambda x: torch.ops.handgrad.lstm_cell(x, h, h, w_ih, w_hh)[1],
                      lambda x: HG.lstm_cell(x, (h, h), w_ih, w_hh)[1],
                      lambda x: torch.lstm_cell(x, (h, h), w_ih, w_hh)[1]),
    }


@pytest.mark.parametrize("name", ["cross_entropy", "lstm_cell"])
def test_raw_op_with_a_dual_tensor_raises(name):
    # The raw op refuses dual tensors (its C++ Autograd kernel would drop the
    # tangent); the public function applies the formulas: native's tangent.
    raw, public, native = _dual_calls()[name]
    x = torch.randn(3, 4, dtype=D)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="^handgrad::%s was called through torch.ops with "
                                               "a forward-mode AD \\(dual\\) tensor" % name):
            raw(dual)
        tangent = fwAD.unpack_dual(public(dual)).tangent
        expected = fwAD.unpack_dual(native(dual)).tangent
    assert tangent is not None and tangent.abs().sum() > 0
    torch.testing.assert_close(tangent, expected)


def test_cross_entropy_weight_gets_no_silent_gradient():
    x = torch.randn(3, 4, dtype=D)
    t = torch.tensor([0, 3, 1])
    w = torch.rand(4, dtype=D) + 0.5
    reason = "handgrad::cross_entropy is not differentiable with respect to argument 'weight'"
    with pytest.raises(RuntimeError, match="^" + re.escape(reason + ".") + "$"):
        func.grad(lambda w: HG.cross_entropy(x, t, weight=w))(w)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError,
                           match="^" + re.escape(reason + " (forward-mode AD)") + "$"):
            HG.cross_entropy(x, t, weight=fwAD.make_dual(w, torch.ones_like(w)))
    # The ordinary path (the op's C++ autograd kernel) refuses at once.
    with pytest.raises(RuntimeError, match="^" + re.escape(
            reason + ". This input cannot have requires_grad True.") + "$"):
        HG.cross_entropy(x.requires_grad_(), t, weight=w.clone().requires_grad_())


# ---- cross_entropy: the Python formulas' reading of the kernels -------------------------------

@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("target_kind", ["index", "probabilities"])
def test_cross_entropy_formula_terms_match_the_kernel(device, reduction, target_kind):
    # The double-backward formulas rebuild G_x = s (A p - W) from their own
    # reading of the loss (_target_weights, _row_scale); this holds them to the
    # kernel's first derivative, option by option.
    from handgrad.ops import _cross_entropy_autograd as ce
    x = randn(5, 4, 3, device=device)
    weight = torch.rand(4, dtype=D, device=device) + 0.5
    if target_kind == "index":
        target = torch.randint(0, 4, (5, 3), device=device)
        target[0, 1] = target[3, 2] = -1
    else:
        target = torch.softmax(randn(5, 4, 3, device=device), 1)
    for w in (None, weight):
        for smoothing in (0.0, 0.3):
            loss, lse = torch.ops.handgrad.cross_entropy(x, target, w, -1, reduction, smoothing)
            g = randn(*loss.shape, device=device)
            kernel = torch.ops.handgrad.cross_entropy_backward(g, x, target, w, -1, reduction,
                                                               smoothing, lse)
            W, w_t = ce._target_weights(x, target, w, -1, smoothing)
            s = ce._per_row(ce._row_scale(g, x, w_t, reduction), x)
            p = ce._probabilities(x, lse)
            torch.testing.assert_close(kernel, s * (W.sum(1, keepdim=True) * p - W))


# ---------------------------------------------------------------------------
# The Autograd kernel records a node only when there is something to record:
# with no input needing a gradient, or grad mode off (every first-order
# backward), it goes straight to the kernel, as native ops do; raw calls that
# leave trailing arguments at their defaults give the formulas every argument.

def test_autograd_kernel_records_only_what_needs_recording():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    out, _ = torch.ops.handgrad.max_pool2d(x, [2, 2])
    assert out.grad_fn is None and not out.requires_grad
    xg = x.clone().requires_grad_()
    out, indices = torch.ops.handgrad.max_pool2d(xg, [2, 2])
    assert type(out.grad_fn).__name__.startswith("handgrad_max_pool2d_autograd")
    assert not indices.requires_grad
    with torch.no_grad():
        assert torch.ops.handgrad.max_pool2d(xg, [2, 2])[0].grad_fn is None
    # A tangent without requires_grad still reaches the jvp formula.
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        tangent = fwAD.unpack_dual(torch.ops.handgrad.max_pool2d(dual, [2, 2])[0]).tangent
    assert tangent is not None and bool((tangent == 1).all())


def test_autograd_kernel_fills_the_defaults_the_dispatcher_drops():
    # stride=[] (the kernel size), padding 0, dilation 1 left out, then given.
    x = torch.randn(1, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    for args in ([[3, 3]], [[3, 3], [2, 2]], [[3, 3], [2, 2], [1, 1]],
                 [[3, 3], [2, 2], [1, 1], [1, 1], True]):
        out = torch.ops.handgrad.max_pool2d(x, *args)[0]
        full = args + [[], [0, 0], [1, 1], False][len(args) - 1:]
        ref = F.max_pool2d(x, full[0], full[1] or None, full[2], full[3], ceil_mode=full[4])
        (got,) = torch.autograd.grad(out.sum(), x)
        (want,) = torch.autograd.grad(ref.sum(), x)
        assert out.shape == ref.shape, args
        torch.testing.assert_close(got, want)


def test_conv2d_forward_mode_with_only_the_bias_tangent_matches_native():
    # The bias term of the tangent is broadcast to the output; alone it used
    # to be returned as (C, 1, 1), which forward-mode AD refuses ("a forward
    # gradient that has a different size"). Found by the one-input-at-a-time
    # gradgradcheck (forward over reverse).
    import torch.autograd.forward_ad as fwAD
    x, w, b = torch.randn(2, 3, 5, 6, dtype=D), torch.randn(4, 3, 3, 2, dtype=D), \
        torch.randn(4, dtype=D)
    t_b = torch.randn(4, dtype=D)
    for conv in (HG.conv2d, F.conv2d):
        with fwAD.dual_level():
            out = conv(x, w, fwAD.make_dual(b, t_b), padding=1)
            tangents = [fwAD.unpack_dual(out).tangent]
        tangents.append(func.jvp(lambda bias: conv(x, w, bias, padding=1), (b,), (t_b,))[1])
        tangents.append(func.jacfwd(lambda bias: conv(x, w, bias, padding=1))(b))
        if conv is HG.conv2d:
            mine = tangents
    for a, r in zip(mine, tangents):
        assert a.shape == r.shape
        torch.testing.assert_close(a, r)


def test_conv2d_backward_ops_jvp_with_one_tangent():
    # conv2d_grad_input / conv2d_grad_weight are bilinear and conv2d_grad_bias
    # linear: a jvp with a tangent on only one tensor argument (the other
    # held constant) is the op applied to that tangent. (Autograd hands the
    # jvp formulas a zero tangent for the constant argument, not None, so
    # their `is not None` guards only save work: mutation testing's
    # "... or True" mutants of them are equivalent.)
    ops = torch.ops.handgrad
    window = ([2, 1], [1, 1, 0, 0], [1, 1], 1)  # padding: top, bottom, left, right
    x = torch.randn(2, 3, 7, 6, dtype=D)
    w = torch.randn(4, 3, 3, 2, dtype=D)
    go = torch.randn(2, 4, 4, 5, dtype=D)
    t_go, t_w, t_x = torch.randn_like(go), torch.randn_like(w), torch.randn_like(x)

    def jvp(fn, primal, tangent):
        return func.jvp(fn, (primal,), (tangent,))[1]

    gi = lambda g, weight: OPS.conv2d_grad_input(g, weight, list(x.shape), *window)
    gw = lambda g, inp: OPS.conv2d_grad_weight(g, inp, list(w.shape), *window)
    torch.testing.assert_close(jvp(lambda g: gi(g, w), go, t_go), gi(t_go, w))
    torch.testing.assert_close(jvp(lambda v: gi(go, v), w, t_w), gi(go, t_w))
    torch.testing.assert_close(jvp(lambda g: gw(g, x), go, t_go), gw(t_go, x))
    torch.testing.assert_close(jvp(lambda v: gw(go, v), x, t_x), gw(go, t_x))
    torch.testing.assert_close(jvp(lambda g: OPS.conv2d_grad_bias(g), go, t_go),
                               ops.conv2d_grad_bias(t_go))
