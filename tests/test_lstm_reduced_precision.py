"""LSTM in float16 / bfloat16 on the CPU, and hidden size 0 (issue 16).

The CPU computes float16 / bfloat16 in float32 through its float32 kernels
(csrc/ops/lstm_float_compute.h): each returned value is the float32 result
rounded once to the input's dtype. Against float64 on the same (exactly
representable) inputs, a result y is then within
    eps/2 |y|                  (the one rounding; eps = torch.finfo(dtype).eps)
  + the float32 error          (at most n eps32 max|y|, n the reduction length:
                                every product and time-step sum feeding y)
  + half a subnormal spacing   (float16 results under 2^-14).
The tests use rtol = eps (twice the rounding bound) and atol = 4 n eps32 max(1, max|y|) plus
the subnormal spacing: well under one ulp of the dtype, so a second rounding anywhere
(an intermediate state stored in the dtype) would fail them.
"""

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import handgrad
from helpers import runs_cuda_kernels

REDUCED = [torch.float16, torch.bfloat16]
EPS32 = torch.finfo(torch.float32).eps


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def representable(shape, dtype, scale=1.0, requires_grad=False):
    """Random values exactly representable in dtype, as float64 (the reference's inputs)."""
    t = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).double()
    return t.requires_grad_(requires_grad)


def tolerance(dtype, n, ref):
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    info = torch.finfo(dtype)
    return dict(rtol=info.eps, atol=4 * n * EPS32 * scale + info.tiny * info.eps)


def assert_within(mine, ref, dtype, n, what):
    assert mine.dtype == dtype, what
    assert mine.shape == ref.shape, (what, mine.shape, ref.shape)
    torch.testing.assert_close(mine.double(), ref, **tolerance(dtype, n, ref),
                               msg=lambda m: "%s: %s" % (what, m))


def outputs_and_grads(fn, inputs, upstream_seed=1):
    """fn(*inputs) -> tensors; returns them and the gradients of every input
    requiring grad for random upstream gradients (the same values in any
    dtype: drawn in float64, rounded to the outputs' dtype)."""
    outs = fn(*inputs)
    gen = torch.Generator().manual_seed(upstream_seed)
    ups = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(torch.bfloat16)
           .to(o.dtype) for o in outs]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outs, leaves, ups)
    return [o.detach() for o in outs], list(grads)


def cast(inputs, dtype):
    return [t.detach().to(dtype).requires_grad_(t.requires_grad)
            if isinstance(t, torch.Tensor) else t for t in inputs]


def check_against_float64(fn, inputs64, dtype, n):
    ref_out, ref_grads = outputs_and_grads(fn, inputs64)
    out, grads = outputs_and_grads(fn, cast(inputs64, dtype))
    assert len(grads) == len(ref_grads)
    for k, (a, b) in enumerate(zip(out + grads, ref_out + ref_grads)):
        assert_within(a, b, dtype, n, "result %d" % k)


# ---------------------------------------------------------------------------------------------
# ops against float64


@pytest.mark.parametrize("dtype", REDUCED, ids=dtype_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_cell_equals_float64_rounded_once(dtype, bias):
    B, I, H = 5, 7, 6
    inputs = [representable((B, I), dtype, requires_grad=True),
              representable((B, H), dtype, requires_grad=True),
              representable((B, H), dtype, requires_grad=True),
              representable((4 * H, I), dtype, 0.4, True),
              representable((4 * H, H), dtype, 0.4, True)]
    if bias:
        inputs += [representable((4 * H,), dtype, 0.4, True),
                   representable((4 * H,), dtype, 0.4, True)]

    def cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
        return handgrad.ops.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)

    # Reductions: I + H + 2 terms per gate, B rows per weight gradient.
    check_against_float64(cell, inputs, dtype, n=I + H + 2 + B)


LAYER_CASES = list(itertools.product(["padded", "packed"], [False, True], [False, True]))


@pytest.mark.parametrize("dtype", REDUCED, ids=dtype_id)
@pytest.mark.parametrize("layout,reverse,proj", LAYER_CASES,
                         ids=lambda v: v if isinstance(v, str) else str(v))
def test_layer_equals_float64_rounded_once(dtype, layout, reverse, proj):
    I, H, P = 6, 7, 3
    R = P if proj else H
    batch_sizes = [3, 3, 2, 2, 1] if layout == "packed" else None
    T, B = 5, 3
    x_shape = (sum(batch_sizes), I) if batch_sizes else (T, B, I)
    inputs = [representable(x_shape, dtype, requires_grad=True),
              representable((B, R), dtype, requires_grad=True),
              representable((B, H), dtype, requires_grad=True),
              representable((4 * H, I), dtype, 0.4, True),
              representable((4 * H, R), dtype, 0.4, True),
              representable((4 * H,), dtype, 0.4, True),
              representable((4 * H,), dtype, 0.4, True),
              representable((P, H), dtype, 0.4, True) if proj else None]

    def layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        out, (h, c) = handgrad.ops.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, w_hr,
                                              batch_sizes)
        return out, h, c

    # Reductions: per step I + R + H + 2 terms (products, projection), through T
    # steps of recurrence, and T * B rows per weight gradient.
    check_against_float64(layer, inputs, dtype, n=T * (I + R + H + 2 + B))


@pytest.mark.parametrize("dtype", REDUCED, ids=dtype_id)
def test_layer_forward_is_the_float32_result_rounded(dtype):
    # The same float32 kernels: forward values are bit-identical to float32's, rounded.
    args = [representable(s, dtype).float() for s in [(4, 3, 5), (3, 6), (3, 6), (24, 5),
                                                      (24, 6), (24,), (24,)]]
    ref = handgrad.ops.lstm_layer(*args)
    mine = handgrad.ops.lstm_layer(*[a.to(dtype) for a in args])
    for a, b in zip([mine[0], *mine[1]], [ref[0], *ref[1]]):
        assert a.dtype == dtype
        assert torch.equal(a, b.to(dtype))


@pytest.mark.parametrize("dtype", REDUCED, ids=dtype_id)
def test_saved_gates_and_cells_stay_float32(dtype):
    x = torch.randn(3, 2, 4, dtype=dtype)
    w_ih, w_hh = torch.randn(20, 4, dtype=dtype), torch.randn(20, 5, dtype=dtype)
    h0 = torch.zeros(2, 5, dtype=dtype)
    out, hT, cT, gates, cells = torch.ops.handgrad.lstm_layer(x, h0, h0, w_ih, w_hh, None, None)
    assert (out.dtype, hT.dtype, cT.dtype) == (dtype,) * 3
    assert gates.dtype == cells.dtype == torch.float32
    hy, cy, cell_gates = torch.ops.handgrad.lstm_cell(x[0], h0, h0, w_ih, w_hh)
    assert hy.dtype == cy.dtype == dtype and cell_gates.dtype == torch.float32
    # Gates in the dtype (not what the forward returns) are named, not misread.
    with pytest.raises(TypeError, match="saved gates are float32"):
        torch.ops.handgrad.lstm_layer_backward(out, None, None, x, h0, h0, w_ih, w_hh, out,
                                               gates.to(dtype), cells, False)
    with pytest.raises(TypeError, match="saved gates are float32"):
        torch.ops.handgrad.lstm_cell_backward(hy, None, cell_gates.to(dtype), h0, cy, x[0], h0,
                                              w_ih, w_hh)


@pytest.mark.parametrize("dtype", REDUCED, ids=dtype_id)
def test_mixed_dtypes_are_named_before_widening(dtype):
    x = torch.randn(3, 2, 4, dtype=dtype)
    h0 = torch.zeros(2, 5, dtype=dtype)
    with pytest.raises(TypeError, match="input and w_hh to have the same dtype"):
        torch.ops.handgrad.lstm_layer(x, h0, h0, torch.randn(20, 4, dtype=dtype),
                                      torch.randn(20, 5), None, None)
    with pytest.raises(TypeError, match="input and hx to have the same dtype"):
        torch.ops.handgrad.lstm_cell(x[0], h0.float(), h0, torch.randn(20, 4, dtype=dtype),
                                     torch.randn(20, 5, dtype=dtype))


def test_other_floating_dtypes_are_named():
    x = torch.zeros(2, 3, dtype=torch.float8_e4m3fn)
    h = torch.zeros(2, 4, dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="support float32, float64, float16 and bfloat16, but got Float8"):
        torch.ops.handgrad.lstm_cell(x, h, h, torch.zeros(16, 3, dtype=torch.float8_e4m3fn),
                                     torch.zeros(16, 4, dtype=torch.float8_e4m3fn))


# ---------------------------------------------------------------------------------------------
# nn.LSTM against native nn.LSTM in the same dtype
#
# Native's CPU LSTM in float16 / bfloat16 stores each step's states in the
# dtype, so its error grows with the sequence: up to about (T + 4) roundings
# of eps/2 relative to the state's scale (4: the gates and cell products of a
# step), and as much again through backward. Both sides are compared with
# float64 first (handgrad at the tight tolerance above), then with each other
# at native's bound: 2 (T + 4) eps, relative to max(1, max|y|).


def native_bound(dtype, T, ref):
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    return dict(rtol=0, atol=2 * (T + 4) * torch.finfo(dtype).eps * scale)


def module_outputs_and_grads(module, x, seed=1):
    out, (h, c) = module(x)
    data = out.data if isinstance(out, PackedSequence) else out
    gen = torch.Generator().manual_seed(seed)
    loss = sum((t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64)).sum()
               for t in (data, h, c))
    inputs = x.data if isinstance(x, PackedSequence) else x
    grads = torch.autograd.grad(loss, [inputs, *module.parameters()])
    return [data.detach(), h.detach(), c.detach(), *grads]


def as_packed(packed, dtype):
    return PackedSequence(packed.data.detach().to(dtype).requires_grad_(), packed.batch_sizes,
                          packed.sorted_indices, packed.unsorted_indices)


@pytest.mark.parametrize("dtype", REDUCED, ids=dtype_id)
@pytest.mark.parametrize("layout,proj", list(itertools.product(["padded", "packed"],
                                                               [False, True])),
                         ids=lambda v: v if isinstance(v, str) else ("proj" if v else "no_proj"))
def test_nn_lstm_matches_native_in_the_same_dtype(dtype, layout, proj):
    T = 6
    native = nn.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3 if proj else 0)
    native = native.to(dtype)  # weights representable in dtype
    mine = copy.deepcopy(native)
    mine.__class__ = handgrad.nn.LSTM
    if layout == "packed":
        x64 = pack_sequence([torch.randn(n, 5).to(dtype).double() for n in (T, 3, 5)],
                            enforce_sorted=False)
        x = as_packed(x64, dtype)
        x_native = as_packed(x64, dtype)
        x64 = as_packed(x64, torch.float64)
    else:
        x64 = torch.randn(T, 3, 5).to(dtype).double().requires_grad_()
        x = x64.detach().to(dtype).requires_grad_()
        x_native = x64.detach().to(dtype).requires_grad_()
    ref = module_outputs_and_grads(copy.deepcopy(mine).double(), x64)
    got = module_outputs_and_grads(mine, x)
    theirs = module_outputs_and_grads(native, x_native)
    # Each op rounds once, but the module rounds between its ops: every layer's
    # output (the next layer's input) and every layer's input gradient. With L = 2
    # layers that is L roundings of eps/2 each way, relative to the scale; a factor
    # 2 covers their propagation through the other layer: 2 L eps. (Per-op
    # accuracy, one rounding, is test_layer_equals_float64_rounded_once's.)
    eps = torch.finfo(dtype).eps
    for k, (a, r, b) in enumerate(zip(got, ref, theirs)):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a.double(), r, rtol=0,
                                   atol=2 * 2 * eps * max(1.0, r.abs().max().item()),
                                   msg=lambda m: "result %d vs float64: %s" % (k, m))
        torch.testing.assert_close(a, b, **native_bound(dtype, T, r),
                                   msg=lambda m: "result %d vs native: %s" % (k, m))


@pytest.mark.parametrize("dtype", REDUCED, ids=dtype_id)
def test_nn_lstm_cell_matches_native_in_the_same_dtype(dtype):
    native = nn.LSTMCell(5, 8).to(dtype)
    mine = copy.deepcopy(native)
    mine.__class__ = handgrad.nn.LSTMCell
    x = torch.randn(4, 5).to(dtype)
    hx = (torch.randn(4, 8).to(dtype), torch.randn(4, 8).to(dtype))
    results = []
    for module in (mine, native, copy.deepcopy(mine).double()):
        t = module.weight_ih.dtype
        xs = x.to(t).requires_grad_()
        h, c = module(xs, (hx[0].to(t), hx[1].to(t)))
        loss = (h.double() * 0.5 - c.double() * 0.25).sum()
        results.append([h.detach(), c.detach(),
                        *torch.autograd.grad(loss, [xs, *module.parameters()])])
    got, theirs, ref = results
    for k, (a, b, r) in enumerate(zip(got, theirs, ref)):
        assert_within(a, r, dtype, 5 + 8 + 2 + 4, "result %d" % k)
        torch.testing.assert_close(a, b, **native_bound(dtype, 1, r),
                                   msg=lambda m: "result %d vs native: %s" % (k, m))


# ---------------------------------------------------------------------------------------------
# autocast, opcheck


class Tagger(nn.Module):
    """Linear -> LSTM -> Linear, a per-step classifier."""

    def __init__(self, lstm_class):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.lstm = lstm_class(8, 10, num_layers=2, batch_first=True)
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        return self.head(self.lstm(self.embed(x))[0])


def test_autocast_cpu_bfloat16_through_handgrad_lstm_matches_native():
    native = Tagger(nn.LSTM)
    mine = copy.deepcopy(native)
    mine.lstm.__class__ = handgrad.nn.LSTM
    x = torch.randn(3, 7, 6)
    target = torch.randint(0, 4, (3, 7))
    results = []
    for model in (mine, native):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        assert logits.dtype == torch.bfloat16
        grads = torch.autograd.grad(loss, list(model.parameters()))
        assert all(g.dtype == torch.float32 for g in grads)
        results.append([logits.float(), loss, *grads])
    # Both run the LSTM in bfloat16 (native storing every step's state in it):
    # native's bound over T = 7 steps, with the float32 linear layers around it.
    bound = 2 * (7 + 4) * torch.finfo(torch.bfloat16).eps
    for k, (a, b) in enumerate(zip(*results)):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=0, atol=bound * scale,
                                   msg=lambda m: "result %d: %s" % (k, m))


@pytest.mark.parametrize("dtype", REDUCED, ids=dtype_id)
def test_opcheck_reduced_precision(dtype):
    opt = dict(dtype=dtype)
    layer_args = [torch.randn(4, 2, 3, **opt, requires_grad=True), torch.randn(2, 5, **opt),
                  torch.randn(2, 5, **opt), torch.randn(20, 3, **opt, requires_grad=True),
                  torch.randn(20, 5, **opt), torch.randn(20, **opt, requires_grad=True), None]
    torch.library.opcheck(torch.ops.handgrad.lstm_layer.default, layer_args + [True])
    out, hT, cT, gates, cells = torch.ops.handgrad.lstm_layer(*layer_args)
    detached = [t.detach() for t in layer_args[:5]]
    torch.library.opcheck(torch.ops.handgrad.lstm_layer_backward.default,
                          (torch.randn_like(out), None, torch.randn_like(cT), *detached,
                           out.detach(), gates, cells, False))
    cell_args = [t[0] if k == 0 else t for k, t in enumerate(layer_args)]
    torch.library.opcheck(torch.ops.handgrad.lstm_cell.default, cell_args)
    hy, cy, cell_gates = torch.ops.handgrad.lstm_cell(*cell_args)
    torch.library.opcheck(torch.ops.handgrad.lstm_cell_backward.default,
                          (torch.randn_like(hy), None, cell_gates, detached[2], cy.detach(),
                           detached[0][0], detached[1], detached[3], detached[4]))


# ---------------------------------------------------------------------------------------------
# hidden size 0


def test_cell_hidden_size_zero_matches_native(device):
    native = nn.LSTMCell(3, 0, device=device, dtype=torch.float64)
    mine = copy.deepcopy(native)
    mine.__class__ = handgrad.nn.LSTMCell
    results = []
    for module in (mine, native):
        x = torch.randn(2, 3, device=device, dtype=torch.float64, requires_grad=True)
        h, c = module(x)
        assert h.shape == c.shape == (2, 0)
        grads = torch.autograd.grad((h.sum() + c.sum()), [x, *module.parameters()])
        results.append([h, c, *grads])
    for a, b in zip(*results):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
    assert results[0][2].shape == (2, 3) and results[0][3].shape == (0, 3)


def native_layer_by_cells(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse):
    """A layer as a loop of native lstm_cell steps (native nn.LSTM refuses hidden size 0)."""
    h, c, outs = h0, c0, []
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        h, c = torch.lstm_cell(x[t], (h, c), w_ih, w_hh, b_ih, b_hh)
        outs.append(h)
    if reverse:
        outs.reverse()
    return torch.stack(outs), h, c


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_layer_hidden_size_zero_matches_native(device, reverse):
    f64 = dict(device=device, dtype=torch.float64)
    inputs = [torch.randn(4, 2, 3, **f64, requires_grad=True),
              torch.zeros(2, 0, **f64, requires_grad=True),
              torch.zeros(2, 0, **f64, requires_grad=True),
              torch.randn(0, 3, **f64, requires_grad=True), torch.randn(0, 0, **f64,
                                                                         requires_grad=True),
              torch.randn(0, **f64, requires_grad=True), torch.randn(0, **f64,
                                                                     requires_grad=True)]
    results = []
    for fn in (lambda *a: (lambda o: (o[0], *o[1]))(handgrad.ops.lstm_layer(*a, reverse)),
               lambda *a: native_layer_by_cells(*a, reverse)):
        out = fn(*inputs)
        grads = torch.autograd.grad(sum(o.sum() for o in out), inputs)
        results.append([*out, *grads])
    for a, b in zip(*results):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
    assert results[0][0].shape == (4, 2, 0) and results[0][3].shape == (4, 2, 3)
    assert results[0][6].shape == (0, 3)


def test_layer_hidden_size_zero_packed_and_input_grad_off(device):
    f64 = dict(device=device, dtype=torch.float64)
    x = torch.randn(6, 3, **f64)
    state = torch.zeros(3, 0, **f64)
    w_ih, w_hh = torch.randn(0, 3, **f64), torch.randn(0, 0, **f64)
    out, hT, cT, gates, cells = torch.ops.handgrad.lstm_layer(
        x, state, state, w_ih, w_hh, None, None, batch_sizes=[3, 2, 1])
    assert out.shape == (6, 0) and hT.shape == cT.shape == (3, 0)
    assert gates.shape == (6, 0) and cells.shape == (6, 0)
    grads = torch.ops.handgrad.lstm_layer_backward(out, hT, cT, x, state, state, w_ih, w_hh, out,
                                                   gates, cells, False, False,
                                                   batch_sizes=[3, 2, 1])
    assert [tuple(g.shape) for g in grads] == [(0,), (3, 0), (3, 0), (0, 3), (0, 0), (0,), (0,)]
    # Bad packing is still named with hidden size 0.
    with pytest.raises(RuntimeError, match="batch_sizes sum to 5"):
        torch.ops.handgrad.lstm_layer(x, state, state, w_ih, w_hh, None, None,
                                      batch_sizes=[3, 2])
    if runs_cuda_kernels(device):
        return  # the remaining check is about the CPU's half-precision entry
    half = torch.ops.handgrad.lstm_layer(x.bfloat16(), state.bfloat16(), state.bfloat16(),
                                         w_ih.bfloat16(), w_hh.bfloat16(), None, None,
                                         batch_sizes=[3, 2, 1])
    assert half[0].shape == (6, 0) and half[0].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", REDUCED, ids=dtype_id)
def test_forward_ad_and_double_backward_in_float32_too(dtype):
    # The Python-composed formulas (tangents, gradients of the backward) meet the
    # float32 saved gates and run in float32 too. A tangent is rounded once
    # (bound 2 eps relative to the scale: the rounding's eps/2 with a factor 4
    # margin); a gradient of a gradient twice (the first-order gradient is
    # returned rounded, then differentiated): 4 eps.
    eps = torch.finfo(dtype).eps
    x, h, w_ih, w_hh = (representable(s, dtype, 0.4) for s in [(3, 2, 4), (2, 5), (20, 4),
                                                                 (20, 5)])

    def tangent(t):
        x_, h_, w_ih_, w_hh_ = (a.to(t) for a in (x, h, w_ih, w_hh))
        return torch.func.jvp(lambda a, w: handgrad.ops.lstm_layer(a, h_, h_, w, w_hh_)[0],
                              (x_, w_ih_), (torch.ones_like(x_), torch.ones_like(w_ih_)))[1]

    def second_order(t):
        x_ = x.to(t).requires_grad_()
        w_ih_ = w_ih.to(t).requires_grad_()
        h_, w_hh_ = h.to(t), w_hh.to(t)
        out = handgrad.ops.lstm_layer(x_, h_, h_, w_ih_, w_hh_)[0]
        g, = torch.autograd.grad(out.double().pow(2).sum(), w_ih_, create_graph=True)
        return torch.autograd.grad(g.double().pow(2).sum(), x_)[0]

    for fn, roundings in ((tangent, 1), (second_order, 2)):
        mine, ref = fn(dtype), fn(torch.float64)
        assert mine.dtype == dtype
        torch.testing.assert_close(mine.double(), ref, rtol=0,
                                   atol=4 * roundings * eps / 2 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("dtype", REDUCED, ids=dtype_id)
def test_torch_compile_fullgraph(dtype):
    # The fake kernels give the float32 saved gates and cells, so the compiled
    # graph is the eager computation: results equal exactly.
    torch._dynamo.reset()
    lstm = handgrad.nn.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=3).to(dtype)
    x = torch.randn(6, 3, 4, dtype=dtype, requires_grad=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        out, (h, c) = torch.compile(lstm, fullgraph=True)(x)
    ref, (rh, rc) = lstm(x)
    for a, b in [(out, ref), (h, rh), (c, rc)]:
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    g = torch.autograd.grad(out.sum() + c.sum(), [x, *lstm.parameters()])
    rg = torch.autograd.grad(ref.sum() + rc.sum(), [x, *lstm.parameters()])
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
