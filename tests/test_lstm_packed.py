"""handgrad LSTMs with projections (proj_size) and PackedSequence input, against native."""

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence

import handgrad
from helpers import assert_script_prints_ok

F64 = dict(atol=1e-10, rtol=1e-8)
# float32: the products and the sums over rows and steps run in another order than native's.
F32 = dict(atol=1e-4, rtol=1e-4)


def pair(device, dtype=torch.float64, **kwargs):
    """A native nn.LSTM and a handgrad.nn.LSTM with the same weights (through state_dict)."""
    native = nn.LSTM(device=device, dtype=dtype, **kwargs)
    mine = handgrad.nn.LSTM(device=device, dtype=dtype, **kwargs)
    mine.load_state_dict(native.state_dict())
    return native, mine


def packed_run(module, packed, hx, seed=0):
    """Forward on a PackedSequence, then backward of a random mix of every output.

    Returns the output data, h_n, c_n and the gradients of the packed data,
    of the given states and of every parameter."""
    data = packed.data.detach().clone().requires_grad_()
    packed = PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                            packed.unsorted_indices)
    out, (h, c) = module(packed, hx) if hx is not None else module(packed)
    assert isinstance(out, PackedSequence)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    # The output keeps the input's order (pad_packed_sequence unsorts with it).
    for name in ("sorted_indices", "unsorted_indices"):
        given, kept = getattr(packed, name), getattr(out, name)
        assert (kept is None) == (given is None) and (given is None or torch.equal(kept, given))
    gen = torch.Generator().manual_seed(seed)
    outs = [out.data, h, c]
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)).sum()
               for o in outs)
    leaves = [data, *(hx if hx is not None else ())] + list(module.parameters())
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


def assert_all_close(mine, ref, **tol):
    assert len(mine) == len(ref)
    for k, (a, b) in enumerate(zip(mine, ref)):
        assert a.shape == b.shape, (k, a.shape, b.shape)
        torch.testing.assert_close(a, b, msg=lambda m: "tensor %d: %s" % (k, m), **tol)


# lengths: one step each, a single sequence, all equal, one long outlier, mixed.
LENGTHS = {"ones": [1, 1, 1], "single": [4], "equal": [3, 3, 3, 3], "outlier": [9, 2, 1, 2],
           "mixed": [2, 5, 1, 4, 3]}
# (lengths, proj_size, layers, bidirectional, enforce_sorted, with_state, bias)
PACKED_CASES = [
    ("mixed", 0, 1, False, False, False, True),
    ("mixed", 0, 2, True, False, True, True),
    ("mixed", 2, 2, True, False, True, True),
    ("mixed", 3, 1, False, True, True, False),
    ("ones", 0, 1, True, True, True, True),
    ("ones", 2, 2, True, False, False, True),
    ("single", 2, 1, True, True, True, True),
    ("equal", 0, 2, True, True, True, False),
    ("equal", 3, 1, False, False, True, True),
    ("outlier", 0, 1, True, False, True, True),
    ("outlier", 2, 2, True, False, True, True),
    ("outlier", 3, 2, False, True, False, True),
]


@pytest.mark.parametrize("case", PACKED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_packed_matches_native(device, case):
    name, proj, layers, bidirectional, enforce_sorted, with_state, bias = case
    lengths = LENGTHS[name]
    if enforce_sorted:
        lengths = sorted(lengths, reverse=True)
    native, mine = pair(device, input_size=3, hidden_size=5, num_layers=layers,
                        bidirectional=bidirectional, proj_size=proj, bias=bias)
    B, T = len(lengths), max(lengths)
    padded = torch.randn(T, B, 3, device=device, dtype=torch.float64)
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=enforce_sorted)
    hx = None
    if with_state:
        D = 2 if bidirectional else 1
        hx = (torch.randn(layers * D, B, proj or 5, device=device, dtype=torch.float64,
                          requires_grad=True),
              torch.randn(layers * D, B, 5, device=device, dtype=torch.float64,
                          requires_grad=True))
    assert_all_close(packed_run(mine, packed, hx), packed_run(native, packed, hx), **F64)


def test_packed_float32_matches_native(device):
    # Wider layers: the float32 CPU path runs the fused vector kernels (and their tails).
    for proj in (0, 7):
        native, mine = pair(device, torch.float32, input_size=6, hidden_size=20, num_layers=2,
                            bidirectional=True, proj_size=proj)
        seqs = [torch.randn(n, 6, device=device) for n in (4, 11, 1, 7, 7, 2)]
        packed = pack_sequence(seqs, enforce_sorted=False)
        assert_all_close(packed_run(mine, packed, None), packed_run(native, packed, None),
                         **F32)


def test_packed_layer_computes_only_valid_steps(device):
    # The gates and cells saved for backward have one row per valid (step,
    # sequence): no row is computed for padding.
    lengths = [6, 3, 1]
    x = torch.randn(sum(lengths), 2, device=device, dtype=torch.float64)
    batch_sizes = [3, 2, 2, 1, 1, 1]
    w = [torch.randn(s, device=device, dtype=torch.float64) for s in [(12, 2), (12, 2), (2, 3)]]
    h0 = torch.zeros(3, 2, device=device, dtype=torch.float64)
    c0 = torch.zeros(3, 3, device=device, dtype=torch.float64)
    for reverse in (False, True):
        out, hT, cT, gates, cells = torch.ops.handgrad.lstm_layer(
            x, h0, c0, w[0], w[1], None, None, reverse, w[2], batch_sizes)
        assert out.shape == (10, 2) and gates.shape == (10, 12) and cells.shape == (10, 3)
        assert hT.shape == (3, 2) and cT.shape == (3, 3)


_BASELINE_SCRIPT = """
import torch, handgrad
from torch.nn.utils.rnn import pack_sequence
torch.manual_seed(0)
for H, P in ((16, 0), (13, 5)):  # vector rows only; and a projection with scalar tails
    ref = torch.nn.LSTM(7, H, num_layers=2, bidirectional=True, proj_size=P)
    mine = handgrad.nn.LSTM(7, H, num_layers=2, bidirectional=True, proj_size=P)
    mine.load_state_dict(ref.state_dict())
    packed = pack_sequence([torch.randn(n, 7) for n in (3, 8, 1, 5)], enforce_sorted=False)
    results = []
    for m in (mine, ref):
        data = packed.data.clone().requires_grad_()
        seq = torch.nn.utils.rnn.PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                                                packed.unsorted_indices)
        out, (h, c) = m(seq)
        g = torch.autograd.grad(out.data.sin().sum() + c.sum(), [data, *m.parameters()])
        results.append([out.data, h, c, *g])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
print("ok")
"""


def test_packed_and_proj_on_baseline_cpu_kernels():
    # HANDGRAD_CPU_AVX512=0: the baseline (AVX2) pointwise kernels and at::mm
    # instead of the fused AVX-512 steps (test_lstm.py's baseline test).
    assert_script_prints_ok(_BASELINE_SCRIPT, HANDGRAD_CPU_AVX512="0")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_proj_reduced_precision_against_float32(device, dtype):
    # Both backends (the CPU computes in float32 and rounds once).
    native = nn.LSTM(8, 16, num_layers=2, bidirectional=True, proj_size=4, device=device)
    mine = handgrad.nn.LSTM(8, 16, num_layers=2, bidirectional=True, proj_size=4,
                            device=device)
    mine.load_state_dict(native.state_dict())
    packed = pack_sequence([torch.randn(n, 8, device=device) for n in (5, 2, 6)],
                           enforce_sorted=False)
    ref, _ = native(packed)  # float32 reference
    mine = mine.to(dtype)
    out, (h, c) = mine(PackedSequence(packed.data.to(dtype), packed.batch_sizes,
                                      packed.sorted_indices, packed.unsorted_indices))
    assert out.data.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(out.data.float(), ref.data, atol=tol, rtol=tol)
    grads = torch.autograd.grad(out.data.float().sum(), list(mine.parameters()))
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


PROJ_GRID = list(itertools.product([1, 2], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("layers,bidirectional,batch_first,with_state", PROJ_GRID,
                         ids=lambda v: str(v))
def test_proj_padded_matches_native(device, layers, bidirectional, batch_first, with_state):
    native, mine = pair(device, input_size=4, hidden_size=5, num_layers=layers,
                        bidirectional=bidirectional, batch_first=batch_first, proj_size=3)
    T, B = 4, 3
    x = torch.randn((B, T, 4) if batch_first else (T, B, 4), device=device, dtype=torch.float64,
                    requires_grad=True)
    hx = None
    if with_state:
        D = 2 if bidirectional else 1
        hx = (torch.randn(layers * D, B, 3, device=device, dtype=torch.float64,
                          requires_grad=True),
              torch.randn(layers * D, B, 5, device=device, dtype=torch.float64,
                          requires_grad=True))
    results = []
    for module in (mine, native):
        out, (h, c) = module(x, hx) if hx is not None else module(x)
        loss = (out * out.detach().cos()).sum() + (h * 2).sum() + c.sin().sum()
        leaves = [x, *(hx or ())] + list(module.parameters())
        results.append([out, h, c, *torch.autograd.grad(loss, leaves)])
    assert_all_close([t.detach() for t in results[0]], [t.detach() for t in results[1]], **F64)


def test_proj_size_one_matches_native(device):
    # The smallest projection: each state is one number.
    native, mine = pair(device, input_size=3, hidden_size=4, num_layers=2, proj_size=1)
    x = torch.randn(5, 2, 3, device=device, dtype=torch.float64)
    results = []
    for module in (mine, native):
        out, (h, c) = module(x)
        grads = torch.autograd.grad(out.sum() + h.sin().sum() + c.sum(), list(module.parameters()))
        results.append([out, h, c, *grads])
    assert results[0][0].shape == (5, 2, 1) and results[0][1].shape == (2, 2, 1)
    assert_all_close([t.detach() for t in results[0]], [t.detach() for t in results[1]], **F64)


def test_gradient_through_the_raw_ops_gates_of_a_projected_layer_is_refused():
    # torch.ops.handgrad.lstm_layer returns the saved gates and cells as
    # outputs; gradients through them (what a double backward sends) are not
    # composed for projected or packed layers, and say so.
    args, w_hr, steps = layer_args("cpu", 2)
    args[0] = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    out, h, c, gates, cells = torch.ops.handgrad.lstm_layer(*args, False, w_hr, None)
    with pytest.raises(NotImplementedError,
                       match="^handgrad.ops.lstm_layer: double backward is not implemented for "
                             r"LSTM layers with a projection \(proj_size > 0\)"):
        torch.autograd.grad(out.sum() + gates.sum(), [args[0]])


def test_proj_unbatched_and_empty_batch(device):
    native, mine = pair(device, input_size=4, hidden_size=5, num_layers=2, proj_size=2)
    x = torch.randn(6, 4, device=device, dtype=torch.float64)
    for a, b in zip(mine(x)[1] + (mine(x)[0],), native(x)[1] + (native(x)[0],)):
        torch.testing.assert_close(a, b, **F64)
    empty = torch.randn(3, 0, 4, device=device, dtype=torch.float64)
    out, (h, c) = mine(empty)
    assert out.shape == (3, 0, 2) and h.shape == (2, 0, 2) and c.shape == (2, 0, 5)


def test_proj_state_dict_both_ways():
    kwargs = dict(input_size=3, hidden_size=6, num_layers=2, bidirectional=True, proj_size=2)
    native = nn.LSTM(**kwargs)
    mine = handgrad.nn.LSTM(**kwargs)
    assert list(mine.state_dict()) == list(native.state_dict())
    assert "weight_hr_l1_reverse" in mine.state_dict()
    mine.load_state_dict(native.state_dict())
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(mine(x)[0], native(x)[0], **F32)
    torch.manual_seed(1)
    other = handgrad.nn.LSTM(**kwargs)
    fresh = nn.LSTM(**kwargs)
    fresh.load_state_dict(other.state_dict())
    torch.testing.assert_close(other(x)[0], fresh(x)[0], **F32)
    assert not torch.allclose(other(x)[0], mine(x)[0])


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile


def layer_args(device, proj, steps=(3, 3, 2, 1), input_size=2, hidden=3):
    """Arguments of a packed lstm_layer call: x, h0, c0, w_ih, w_hh, b_ih, b_hh."""
    state = proj or hidden
    shapes = [(sum(steps), input_size), (steps[0], state), (steps[0], hidden),
              (4 * hidden, input_size), (4 * hidden, state), (4 * hidden,), (4 * hidden,)]
    args = [torch.randn(s, device=device, dtype=torch.float64, requires_grad=True)
            for s in shapes]
    w_hr = (torch.randn(proj, hidden, device=device, dtype=torch.float64, requires_grad=True)
            if proj else None)
    return args, w_hr, list(steps)


@pytest.mark.parametrize("proj,packed", [(2, False), (0, True), (2, True)])
def test_gradcheck_layer_op(device, proj, packed):
    args, w_hr, steps = layer_args(device, proj)
    if not packed:
        args[0] = torch.randn(3, 3, 2, device=device, dtype=torch.float64, requires_grad=True)
    for reverse in (False, True):
        def fn(*a, reverse=reverse):
            *tensors, w = a if proj else (*a, None)
            out, (h, c) = handgrad.ops.lstm_layer(*tensors, reverse=reverse, w_hr=w,
                                                  batch_sizes=steps if packed else None)
            return out, h, c

        assert torch.autograd.gradcheck(fn, args + ([w_hr] if proj else []))


def test_gradcheck_packed_module_two_layers_bidirectional_proj(device):
    lstm = handgrad.nn.LSTM(2, 3, num_layers=2, bidirectional=True, proj_size=2, device=device,
                            dtype=torch.float64)
    names = [n for n, _ in lstm.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in lstm.parameters()]
    packed = pack_sequence([torch.randn(n, 2, device=device, dtype=torch.float64)
                            for n in (2, 3, 1)], enforce_sorted=False)
    data = packed.data.clone().requires_grad_()
    h0 = torch.randn(4, 3, 2, device=device, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 3, 3, device=device, dtype=torch.float64, requires_grad=True)

    def fn(data, h0, c0, *ps):
        seq = PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                             packed.unsorted_indices)
        out, (h, c) = torch.func.functional_call(lstm, dict(zip(names, ps)), (seq, (h0, c0)))
        return out.data, h, c

    assert torch.autograd.gradcheck(fn, (data, h0, c0, *params))


# opcheck's test_aot_dispatch_* differentiate every output of the op, the
# saved gates and cells included, and the backward op itself: second-order
# gradients, which raise NotImplementedError for the projected and packed
# variants (test_forward_ad_and_double_backward_raise_for_proj_and_packed).
# Their first-order compiled backward is checked in test_torch_compile_fullgraph.
FIRST_ORDER_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck_proj_and_packed(device):
    op, backward = torch.ops.handgrad.lstm_layer.default, torch.ops.handgrad.lstm_layer_backward
    tests = dict(test_utils=FIRST_ORDER_OPCHECK)
    for proj, packed in [(2, False), (0, True), (2, True)]:
        args, w_hr, steps = layer_args(device, proj)
        if not packed:
            args[0] = torch.randn(3, 3, 2, device=device, dtype=torch.float64, requires_grad=True)
        sizes = steps if packed else None
        for reverse in (False, True):
            torch.library.opcheck(op, (*args, reverse, w_hr, sizes), **tests)
            out, hT, cT, gates, cells = op(*args, reverse, w_hr, sizes)
            detached = [t.detach() for t in args[:5]]
            saved = (out.detach(), gates.detach(), cells.detach())
            w = None if w_hr is None else w_hr.detach()
            for grads in [(torch.randn_like(out), torch.randn_like(hT), torch.randn_like(cT)),
                          (None, None, torch.randn_like(cT))]:
                for input_grad in (True, False):
                    torch.library.opcheck(backward.default, (*grads, *detached, *saved, reverse,
                                                             input_grad, w, sizes), **tests)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    args, w_hr, steps = layer_args(device, 2)

    def packed_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        out, (h, c) = handgrad.ops.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, True, w_hr,
                                              steps)
        return (out * out).sum() + h.sum() + c.sum()

    compiled = torch.compile(packed_layer, fullgraph=True)
    inputs = args + [w_hr]
    loss, ref = compiled(*inputs), packed_layer(*inputs)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(a, b)

    # The module with a projection (padded input), as test_lstm's module test.
    torch._dynamo.reset()
    lstm = handgrad.nn.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=3, device=device)
    x = torch.randn(6, 2, 4, device=device, requires_grad=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        out, (h, c) = torch.compile(lstm, fullgraph=True)(x)
    ref, (rh, rc) = lstm(x)
    for a, b in [(out, ref), (h, rh), (c, rc)]:
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# what is not implemented, and bad input


def test_forward_ad_and_double_backward_raise_for_proj_and_packed():
    for proj, packed, word in [(2, False, "proj_size"), (0, True, "PackedSequence")]:
        args, w_hr, steps = layer_args("cpu", proj)
        if not packed:
            args[0] = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
        sizes = steps if packed else None
        with pytest.raises(NotImplementedError,
                           match="^handgrad.ops.lstm_layer: forward-mode AD is not implemented "
                                 "for LSTM layers with .*" + word):
            torch.func.jvp(lambda x: handgrad.ops.lstm_layer(
                x, *args[1:], w_hr=w_hr, batch_sizes=sizes)[0], (args[0],),
                (torch.ones_like(args[0]),))
        # Forward-mode AD through the backward op (jvp of a vjp) is refused too.
        from handgrad.ops._autograd import OPS
        out, h, c, gates, cells = (t.detach() for t in torch.ops.handgrad.lstm_layer(
            *args[:7], False, w_hr, sizes))
        grads = (torch.ones_like(out), None, None, args[0].detach(), *(a.detach() for a in args[1:5]),
                 out, gates, cells, False, True, w_hr, sizes)
        with pytest.raises(NotImplementedError,
                           match="^handgrad.ops.lstm_layer: forward-mode AD of the backward is "
                                 "not implemented for LSTM layers with .*" + word):
            torch.func.jvp(lambda w: OPS.lstm_layer_backward(
                *grads[:6], w, *grads[7:])[3], (grads[6],), (torch.ones_like(grads[6]),))
        out, (h, c) = handgrad.ops.lstm_layer(*args, w_hr=w_hr, batch_sizes=sizes)
        (g,) = torch.autograd.grad(out.sum() + c.sum(), [args[3]], create_graph=True)
        with pytest.raises(NotImplementedError,
                           match="^handgrad.ops.lstm_layer: double backward is not implemented "
                                 "for LSTM layers with .*" + word):
            torch.autograd.grad(g.sum(), [args[0]])


def test_bad_input_raises():
    args, w_hr, steps = layer_args("cpu", 2)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = (t.detach() for t in args)
    w_hr = w_hr.detach()
    layer = torch.ops.handgrad.lstm_layer
    cases = [
        # the projection must be narrower than the hidden state
        ((x, h0, c0, w_ih, w_hh, b_ih, b_hh, False, torch.randn(3, 3, dtype=torch.float64),
          steps), "proj_size"),
        ((x, h0, c0, w_ih, torch.randn(12, 3, dtype=torch.float64), b_ih, b_hh, False, w_hr,
          steps), "w_hh of shape \\(4\\*hidden_size, proj_size\\)"),
        ((x, c0, c0, w_ih, w_hh, b_ih, b_hh, False, w_hr, steps), "h0 of shape \\(batch, proj"),
        ((x, h0, h0, w_ih, w_hh, b_ih, b_hh, False, w_hr, steps), "c0 of shape"),
        ((x, h0, c0, w_ih, w_hh, b_ih, b_hh, False, w_hr, [3, 1, 2, 3]), "must not increase"),
        ((x, h0, c0, w_ih, w_hh, b_ih, b_hh, False, w_hr, [3, 3, 2]), "sum to 8"),
        ((x, h0, c0, w_ih, w_hh, b_ih, b_hh, False, w_hr, [3, 3, 3, 0]), "positive"),
        ((x, h0, c0, w_ih, w_hh, b_ih, b_hh, False, w_hr, []), "must not be empty"),
        ((x.unsqueeze(0), h0, c0, w_ih, w_hh, b_ih, b_hh, False, w_hr, steps), "2-D"),
    ]
    for call_args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            layer(*call_args)
    with pytest.raises(TypeError, match="input and w_hr to have the same dtype"):
        layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, False, w_hr.float(), steps)
    # The module: native's constructor and shape checks, native's messages.
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        handgrad.nn.LSTM(4, 3, proj_size=3)
    with pytest.raises(ValueError, match="proj_size should be a positive integer or zero"):
        handgrad.nn.LSTM(4, 3, proj_size=-1)
    lstm = handgrad.nn.LSTM(4, 5, proj_size=2)
    with pytest.raises(RuntimeError, match="Expected hidden\\[0\\] size"):
        lstm(torch.randn(3, 2, 4), (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5)))
    packed = pack_sequence([torch.randn(n, 4) for n in (3, 1)])
    with pytest.raises(RuntimeError, match="Expected hidden\\[1\\] size"):
        lstm(packed, (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)))
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        lstm(pack_sequence([torch.randn(2, 3)]))
