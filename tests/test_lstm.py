"""handgrad.ops.lstm_cell / lstm_layer and handgrad.nn.LSTM / LSTMCell against native PyTorch."""

import copy
import importlib
import itertools

import pytest
import torch
from torch import nn

import handgrad
from helpers import assert_matches_native, assert_script_prints_ok

# float32 tolerances: the pointwise math agrees with native to ~1e-7, but the
# matrix products and the backward-through-time sums (over batch rows and time
# steps) are summed in a different order than native's oneDNN / autograd path.
F32 = dict(atol=1e-4, rtol=1e-4)


def copy_module(native, cls):
    """A handgrad module of class cls with native's constructor arguments and weights."""
    mine = copy.deepcopy(native)
    mine.__class__ = cls
    return mine


def outputs_and_grads(module, x, hx, seed=0):
    """Forward, then backward of a random mix of every output; returns tensors to compare."""
    out = module(x, hx) if hx is not None else module(x)
    flat = list(out[:1]) + list(out[1]) if isinstance(out[1], tuple) else list(out)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)).sum()
               for o in flat)
    leaves = [t for t in [x, *(hx if hx is not None else ())] if t.requires_grad]
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, leaves + params, allow_unused=True)
    return [o.detach() for o in flat] + list(grads)


def assert_all_close(mine, ref, **tol):
    assert len(mine) == len(ref)
    for k, (a, b) in enumerate(zip(mine, ref)):
        assert (a is None) == (b is None), k
        if a is not None:
            assert a.shape == b.shape, (k, a.shape, b.shape)
            torch.testing.assert_close(a, b, msg=lambda m: "tensor %d: %s" % (k, m), **tol)


# ---------------------------------------------------------------------------------------------
# nn.LSTM


LSTM_GRID = list(itertools.product([1, 2], [False, True], [False, True], [False, True],
                                   [False, True]))


@pytest.mark.parametrize("layers,bidirectional,batch_first,bias,with_state", LSTM_GRID,
                         ids=lambda v: str(v))
def test_lstm_matches_native(device, layers, bidirectional, batch_first, bias, with_state):
    native = nn.LSTM(5, 6, num_layers=layers, bidirectional=bidirectional,
                     batch_first=batch_first, bias=bias, device=device, dtype=torch.float64)
    mine = copy_module(native, handgrad.nn.LSTM)
    T, B = 4, 3
    shape = (B, T, 5) if batch_first else (T, B, 5)
    x = torch.randn(shape, device=device, dtype=torch.float64, requires_grad=True)
    hx = None
    if with_state:
        D = 2 if bidirectional else 1
        hx = tuple(torch.randn(layers * D, B, 6, device=device, dtype=torch.float64,
                               requires_grad=True) for _ in range(2))
    assert_all_close(outputs_and_grads(mine, x, hx), outputs_and_grads(native, x, hx),
                     atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("case", ["seq1", "unbatched", "unbatched_state", "empty_batch",
                                  "noncontiguous", "float32", "batch_first_unbatched"])
def test_lstm_edge_cases_match_native(device, case):
    dtype = torch.float32 if case == "float32" else torch.float64
    native = nn.LSTM(4, 5, num_layers=2, bidirectional=True, device=device, dtype=dtype,
                     batch_first=case == "batch_first_unbatched")
    mine = copy_module(native, handgrad.nn.LSTM)
    hx = None
    if case == "seq1":
        x = torch.randn(1, 3, 4)
    elif case in ("unbatched", "batch_first_unbatched"):
        x = torch.randn(6, 4)
    elif case == "unbatched_state":
        x = torch.randn(6, 4)
        hx = tuple(torch.randn(4, 5, dtype=dtype, device=device, requires_grad=True)
                   for _ in range(2))
    elif case == "empty_batch":
        x = torch.randn(3, 0, 4)
    elif case == "noncontiguous":
        x = torch.randn(3, 7, 8)[:, ::2, ::2]
    else:
        x = torch.randn(9, 16, 4)
    x = x.to(device, dtype).requires_grad_()
    tol = F32 if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-8)
    if case == "empty_batch":
        out, (h, c) = mine(x)
        ref, (rh, rc) = native(x)
        assert out.shape == ref.shape and h.shape == rh.shape and c.shape == rc.shape
        return
    assert_all_close(outputs_and_grads(mine, x, hx), outputs_and_grads(native, x, hx), **tol)


def test_lstm_dropout_between_layers(device):
    native = nn.LSTM(4, 5, num_layers=3, dropout=0.5, device=device, dtype=torch.float64)
    mine = copy_module(native, handgrad.nn.LSTM)
    x = torch.randn(5, 3, 4, device=device, dtype=torch.float64, requires_grad=True)
    # Eval mode: dropout off, identical to native.
    mine.eval(), native.eval()
    assert_all_close(outputs_and_grads(mine, x, None), outputs_and_grads(native, x, None),
                     atol=1e-10, rtol=1e-8)
    # Training mode: the same random mask as native when the generator state matches
    # (both draw one dropout mask per layer boundary, in the same order and shape).
    mine.train(), native.train()
    torch.manual_seed(3)
    out, _ = mine(x)
    torch.manual_seed(3)
    out2, _ = mine(x)
    torch.testing.assert_close(out, out2)
    torch.manual_seed(4)
    out3, _ = mine(x)
    assert not torch.allclose(out, out3)


def test_lstm_state_dict_interchangeable_with_native():
    native = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    mine = handgrad.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    assert mine.state_dict().keys() == native.state_dict().keys()
    assert "weight_ih_l1_reverse" in mine.state_dict()
    mine.load_state_dict(native.state_dict())
    fresh = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    fresh.load_state_dict(mine.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(mine(x)[0], fresh(x)[0], **F32)


def test_lstm_has_no_unsupported_configurations():
    # proj_size and PackedSequence are supported (tests/test_lstm_packed.py):
    # handgrad.patch finds nothing to leave native.
    assert getattr(handgrad.nn.LSTM, "handgrad_unsupported_reason", None) is None
    patch_module = importlib.import_module("handgrad.patch")  # handgrad.patch is the function
    for module in (nn.LSTM(4, 6, proj_size=3), nn.LSTM(4, 6, 2, bidirectional=True)):
        assert patch_module.unsupported_reason(module, handgrad.nn.LSTM) is None


def test_lstm_bad_input_raises():
    lstm = handgrad.nn.LSTM(4, 5)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        lstm(torch.randn(3, 2, 7))
    with pytest.raises(RuntimeError, match="Expected hidden\\[0\\] size"):
        lstm(torch.randn(3, 2, 4), (torch.zeros(1, 3, 5), torch.zeros(1, 2, 5)))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D"):
        lstm(torch.randn(4))
    with pytest.raises(RuntimeError, match="should also be 3-D"):
        lstm(torch.randn(3, 2, 4), (torch.zeros(2, 5), torch.zeros(2, 5)))
    with pytest.raises(ValueError, match="input dtype \\(torch.float64\\) does not match"):
        lstm(torch.randn(3, 2, 4, dtype=torch.float64))


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("wrong", ["hx", "cx", "both"])
def test_lstm_state_dims_are_checked_like_native(batched, wrong):
    # Either state of the wrong rank is refused (not only both), with native's message.
    native = nn.LSTM(4, 5)
    mine = copy_module(native, handgrad.nn.LSTM)
    x = torch.randn(3, 2, 4) if batched else torch.randn(3, 4)
    good, bad = ((1, 2, 5), (2, 5)) if batched else ((1, 5), (1, 1, 5))
    h = torch.zeros(bad if wrong in ("hx", "both") else good)
    c = torch.zeros(bad if wrong in ("cx", "both") else good)
    messages = []
    for module in (native, mine):
        with pytest.raises(RuntimeError) as error:
            module(x, (h, c))
        messages.append(str(error.value))
    assert messages[1] == messages[0]


def test_lstm_patch_swaps_module_and_matches():
    model = nn.Sequential(nn.LSTM(4, 5, batch_first=True))
    x = torch.randn(2, 3, 4)
    ref = model(x)[0]
    handgrad.patch(model)
    assert type(model[0]) is handgrad.nn.LSTM
    torch.testing.assert_close(model(x)[0], ref, **F32)


# ---------------------------------------------------------------------------------------------
# nn.LSTMCell and ops.lstm_cell


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_lstm_cell_matches_native(device, bias, batched, with_state):
    native = nn.LSTMCell(5, 7, bias=bias, device=device, dtype=torch.float64)
    mine = copy_module(native, handgrad.nn.LSTMCell)
    lead = (3,) if batched else ()
    x = torch.randn(*lead, 5, device=device, dtype=torch.float64, requires_grad=True)
    hx = None
    if with_state:
        hx = tuple(torch.randn(*lead, 7, device=device, dtype=torch.float64, requires_grad=True)
                   for _ in range(2))

    def collect(m):
        h, c = m(x, hx) if hx is not None else m(x)
        loss = (h * torch.arange(h.numel(), dtype=h.dtype, device=device).view(h.shape)).sum() \
            + (c * c).sum()
        leaves = [x] + (list(hx) if hx is not None else []) + list(m.parameters())
        return [h.detach(), c.detach()] + list(torch.autograd.grad(loss, leaves))

    assert_all_close(collect(mine), collect(native), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("given", ["b_ih", "b_hh", "both", "neither"])
def test_raw_cell_op_with_either_bias_alone(device, given):
    # The cell's Autograd kernel is C++ (csrc/ops/lstm_autograd.cpp), where an
    # absent optional argument is no input edge: a b_hh passed without b_ih
    # is the node's input 5, not 6. Each tensor alone requiring grad, then
    # all of them: first and second order against finite differences, and
    # the gradients against native's torch.lstm_cell (which takes one bias too).
    ops = torch.ops.handgrad
    B, I, H = 3, 4, 5
    args = [torch.randn(s, dtype=torch.float64, device=device)
            for s in [(B, I), (B, H), (B, H), (4 * H, I), (4 * H, H)]]
    biases = [torch.randn(4 * H, dtype=torch.float64, device=device)
              if given in (name, "both") else None for name in ("b_ih", "b_hh")]
    args += biases
    present = [k for k, a in enumerate(args) if a is not None]

    def cell(*tensors):
        call = list(args)
        for k, t in zip(present, tensors):
            call[k] = t
        return ops.lstm_cell(*call)[:2]

    for chosen in [[k] for k in present] + [present]:
        leaves = [args[k].clone().requires_grad_(k in chosen) for k in present]
        assert torch.autograd.gradcheck(cell, leaves, fast_mode=True), chosen
        if len(chosen) == 1 and chosen[0] >= 5:  # the bias alone (the edge in question)
            assert torch.autograd.gradgradcheck(cell, leaves, fast_mode=True), chosen
        hy, cy = cell(*leaves)
        wanted = [leaves[present.index(k)] for k in chosen]
        mine = torch.autograd.grad((hy * hy).sum() + cy.sum(), wanted)
        native_leaves = [t.detach().requires_grad_(t.requires_grad) for t in leaves]
        call = list(args)
        for k, t in zip(present, native_leaves):
            call[k] = t
        n_hy, n_cy = torch.lstm_cell(call[0], (call[1], call[2]), *call[3:])
        native = torch.autograd.grad((n_hy * n_hy).sum() + n_cy.sum(),
                                     [native_leaves[present.index(k)] for k in chosen])
        for a, b in zip(mine, native):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", [(64, 28, 128), (5, 3, 9), (0, 4, 6), (1, 1, 1)])
def test_lstm_cell_float32_matches_native(device, shape):
    B, I, H = shape
    native = nn.LSTMCell(I, H, device=device)
    mine = copy_module(native, handgrad.nn.LSTMCell)
    x = (3 * torch.randn(B, I, device=device)).requires_grad_()
    hx = tuple((2 * torch.randn(B, H, device=device)).requires_grad_() for _ in range(2))
    for grad_h, grad_c in [(True, True), (True, False), (False, True)]:
        def collect(m):
            h, c = m(x, hx)
            loss = (h.sin().sum() if grad_h else 0) + ((c * c).sum() if grad_c else 0)
            return [h.detach(), c.detach()] + list(
                torch.autograd.grad(loss, [x, *hx, *m.parameters()]))
        assert_all_close(collect(mine), collect(native), **F32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lstm_cell_noncontiguous_inputs(device, dtype):
    f64 = dict(device=device, dtype=dtype)
    x = torch.randn(3, 6, **f64)[:, ::2]
    h = torch.randn(2, 3, **f64).t()
    c = torch.randn(3, 4, **f64)[:, 1:3]
    w_ih = torch.randn(3, 8, **f64).t()
    w_hh = torch.randn(2, 8, **f64).t()
    b = torch.randn(16, **f64)[::2]
    inputs = [t.requires_grad_() for t in (x, h, c, w_ih, w_hh, b)]
    assert_matches_native(
        lambda x, h, c, wi, wh, b: handgrad.ops.lstm_cell(x, (h, c), wi, wh, b, b),
        lambda x, h, c, wi, wh, b: torch.lstm_cell(x, (h, c), wi, wh, b, b),
        inputs, **(F32 if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-8)))


def test_lstm_cell_state_dict_and_bad_input():
    native = nn.LSTMCell(3, 4)
    mine = handgrad.nn.LSTMCell(3, 4)
    mine.load_state_dict(native.state_dict())
    assert mine.state_dict().keys() == native.state_dict().keys()
    with pytest.raises(RuntimeError, match="inconsistent input_size: got 5, expected 3"):
        mine(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="hx of shape \\(batch, hidden_size\\) = \\(2, 4\\)"):
        mine(torch.randn(2, 3), (torch.zeros(3, 4), torch.zeros(2, 4)))
    with pytest.raises(RuntimeError, match="cx of shape"):
        mine(torch.randn(2, 3), (torch.zeros(2, 4), torch.zeros(2, 5)))
    with pytest.raises(TypeError, match="same dtype"):
        mine(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        handgrad.ops.lstm_cell(torch.ones(2, 3, dtype=torch.long),
                               (torch.zeros(2, 4), torch.zeros(2, 4)), mine.weight_ih,
                               mine.weight_hh)
    with pytest.raises(ValueError, match="Expected input to be 1D or 2D"):
        mine(torch.randn(1, 2, 3))
    # float16 / bfloat16 run on the CPU (tests/test_lstm_reduced_precision.py); a mixture is named.
    half = copy_module(native, handgrad.nn.LSTMCell).half()
    with pytest.raises(TypeError, match="same dtype"):
        half(torch.randn(2, 3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="w_hh of shape"):
        handgrad.ops.lstm_cell(torch.randn(2, 3), (torch.zeros(2, 4), torch.zeros(2, 4)),
                               mine.weight_ih, torch.randn(16, 5))


@pytest.mark.parametrize("wrong", [0, 1])
def test_lstm_cell_state_of_another_rank_is_named(wrong):
    cell = handgrad.nn.LSTMCell(3, 4)
    state = [torch.zeros(2, 4), torch.zeros(2, 4)]
    state[wrong] = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError) as error:
        cell(torch.randn(2, 3), tuple(state))
    assert str(error.value) == (f"LSTMCell: Expected hx[{wrong}] to be 2D like the input, "
                                "got 3D instead")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is usable")
def test_mixed_devices_raise():
    cell = handgrad.nn.LSTMCell(3, 4)
    with pytest.raises(RuntimeError, match="same device"):
        cell(torch.randn(2, 3, device="cuda"))


def test_mixed_devices_raise_meta():
    # Without a GPU, a CPU weight next to a meta-device input exercises the same check.
    cell = handgrad.nn.LSTMCell(3, 4)
    meta = torch.zeros(2, 4, device="meta")
    message = "^handgrad::%s: expected all tensors to be on the same device, but got " \
              r"\['cpu', 'meta'\]$"
    with pytest.raises(RuntimeError, match=message % "lstm_layer"):
        torch.ops.handgrad.lstm_layer(torch.randn(2, 2, 3), torch.zeros(2, 4), meta,
                                      cell.weight_ih, cell.weight_hh, None, None, False)
    with pytest.raises(RuntimeError, match=message % "lstm_cell"):
        torch.ops.handgrad.lstm_cell(torch.randn(2, 3), torch.zeros(2, 4), meta, cell.weight_ih,
                                     cell.weight_hh)


class _NoGradient(torch.autograd.Function):
    """The identity, whose backward sends no gradient on."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad):
        return None


def test_bias_gradients_do_not_share_storage():
    # b_ih and b_hh get the same gradient values, in two tensors: scaling one
    # in place (an optimizer, a clipping step) must not scale the other.
    # (.backward() would copy an aliased pair into .grad; autograd.grad and
    # torch.func.grad hand the formula's tensors over as they are.)
    x, h, c = torch.randn(2, 3), torch.zeros(2, 4), torch.zeros(2, 4)
    w_ih, w_hh = torch.randn(16, 3), torch.randn(16, 4)
    b_ih, b_hh = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)

    def loss(b_ih, b_hh):
        return handgrad.ops.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)[0].sum()

    layer_loss = lambda b_ih, b_hh: handgrad.ops.lstm_layer(  # noqa: E731
        x.unsqueeze(0), h, c, w_ih, w_hh, b_ih, b_hh)[0].sum()
    for fn in (loss, layer_loss):
        for g_ih, g_hh in (torch.autograd.grad(fn(b_ih, b_hh), [b_ih, b_hh]),
                           torch.func.grad(fn, argnums=(0, 1))(b_ih.detach(), b_hh.detach())):
            assert torch.equal(g_ih, g_hh)
            assert g_ih.untyped_storage().data_ptr() != g_hh.untyped_storage().data_ptr()
            g_ih.mul_(2)
            assert torch.equal(g_hh * 2, g_ih)


def test_cell_backward_reached_by_no_gradient_sends_none():
    # Autograd still runs a node whose every incoming gradient is None; it
    # must answer with one None per input, not fail.
    x = torch.randn(2, 3, requires_grad=True)
    w = [t.requires_grad_() for t in (torch.randn(8, 3), torch.randn(8, 2))]
    hy, cy = handgrad.ops.lstm_cell(x, (torch.zeros(2, 2), torch.zeros(2, 2)), *w)
    (_NoGradient.apply(hy).sum() + _NoGradient.apply(cy).sum() + x.sum()).backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert w[0].grad is None and w[1].grad is None


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile


def test_gradcheck_cell(device):
    args = [torch.randn(s, device=device, dtype=torch.float64, requires_grad=True)
            for s in [(3, 4), (3, 5), (3, 5), (20, 4), (20, 5), (20,), (20,)]]

    def fn(x, h, c, w_ih, w_hh, b_ih, b_hh):
        return handgrad.ops.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradcheck(lambda x, h, c, wi, wh: fn(x, h, c, wi, wh, None, None)[1],
                                    args[:5])


def test_gradcheck_two_layer_bidirectional(device):
    lstm = handgrad.nn.LSTM(3, 4, num_layers=2, bidirectional=True, device=device,
                            dtype=torch.float64)
    names = [n for n, _ in lstm.named_parameters()]
    x = torch.randn(3, 2, 3, device=device, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 4, device=device, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 4, device=device, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in lstm.parameters()]

    def fn(x, h0, c0, *ps):
        out, (h, c) = torch.func.functional_call(lstm, dict(zip(names, ps)), (x, (h0, c0)))
        return out, h, c

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params))


@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_layer_op(device, reverse):
    ts = [torch.randn(s, device=device, dtype=torch.float64, requires_grad=True)
          for s in [(4, 2, 3), (2, 5), (2, 5), (20, 3), (20, 5), (20,), (20,)]]
    fn = lambda *a: handgrad.ops.lstm_layer(*a, reverse=reverse)  # noqa: E731
    assert torch.autograd.gradcheck(lambda *a: (fn(*a)[0], *fn(*a)[1]), ts)
    # Only the final cell state used: the other gradients arrive as None.
    assert torch.autograd.gradcheck(lambda *a: fn(*a)[1][1], ts)


def test_layer_op_runs_forward_by_default_like_native_nn_lstm():
    native = nn.LSTM(3, 5, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    h0, c0 = torch.randn(1, 2, 5, dtype=torch.float64), torch.randn(1, 2, 5, dtype=torch.float64)
    ref, (h_ref, c_ref) = native(x, (h0, c0))
    out, (h, c) = handgrad.ops.lstm_layer(x, h0[0], c0[0], *native.parameters())
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((h, c), (h_ref[0], c_ref[0]), rtol=1e-12, atol=1e-12)


def test_opcheck(device):
    f64 = dict(device=device, dtype=torch.float64)
    cell_args = [torch.randn(3, 4, **f64, requires_grad=True), torch.randn(3, 5, **f64),
                 torch.randn(3, 5, **f64, requires_grad=True), torch.randn(20, 4, **f64),
                 torch.randn(20, 5, **f64, requires_grad=True), torch.randn(20, **f64),
                 torch.randn(20, **f64)]
    torch.library.opcheck(torch.ops.handgrad.lstm_cell.default, cell_args)
    torch.library.opcheck(torch.ops.handgrad.lstm_cell.default, cell_args[:5] + [None, None])
    hy, cy, gates = torch.ops.handgrad.lstm_cell(*cell_args)
    x, h, c, w_ih, w_hh = (t.detach() for t in cell_args[:5])
    for gh, gc in [(torch.randn_like(hy), torch.randn_like(cy)), (None, torch.randn_like(cy))]:
        torch.library.opcheck(torch.ops.handgrad.lstm_cell_backward.default,
                              (gh, gc, gates.detach(), c, cy.detach(), x, h, w_ih, w_hh))

    layer_args = [torch.randn(4, 2, 3, **f64, requires_grad=True), torch.randn(2, 5, **f64),
                  torch.randn(2, 5, **f64), torch.randn(20, 3, **f64, requires_grad=True),
                  torch.randn(20, 5, **f64), torch.randn(20, **f64, requires_grad=True), None]
    for reverse in (False, True):
        torch.library.opcheck(torch.ops.handgrad.lstm_layer.default, layer_args + [reverse])
        out, hT, cT, gates, cells = torch.ops.handgrad.lstm_layer(*layer_args, reverse)
        detached = [t.detach() if t is not None else None for t in layer_args[:5]]
        for grads in [(torch.randn_like(out), torch.randn_like(hT), torch.randn_like(cT)),
                      (None, None, torch.randn_like(cT))]:
            torch.library.opcheck(torch.ops.handgrad.lstm_layer_backward.default,
                                  (*grads, *detached, out.detach(), gates, cells, reverse))
        # input_grad=False: the input is data, grad_input is an empty placeholder.
        torch.library.opcheck(torch.ops.handgrad.lstm_layer_backward.default,
                              (torch.randn_like(out), None, None, *detached, out.detach(), gates,
                               cells, reverse, False))


def test_torch_compile_cell_fullgraph(device):
    torch._dynamo.reset()
    cell = handgrad.nn.LSTMCell(4, 6, device=device)

    def step(x, h, c):
        for _ in range(3):
            h, c = cell(x, (h, c))
        return (h * h).sum() + c.sum()

    compiled = torch.compile(step, fullgraph=True)
    x, h, c = (torch.randn(2, n, device=device, requires_grad=True) for n in (4, 6, 6))
    loss = compiled(x, h, c)
    grads = torch.autograd.grad(loss, [x, h, c, *cell.parameters()])
    ref = step(x, h, c)
    ref_grads = torch.autograd.grad(ref, [x, h, c, *cell.parameters()])
    torch.testing.assert_close(loss, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_torch_compile_lstm_module_fullgraph(device):
    # Dynamo refuses to trace any nn.LSTM instance (subclasses included) unless
    # torch._dynamo.config.allow_rnn is set; with it, the handgrad ops trace into
    # one graph (their fake kernels give the shapes).
    torch._dynamo.reset()
    lstm = handgrad.nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True,
                            device=device)
    x = torch.randn(3, 6, 4, device=device, requires_grad=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(lstm, fullgraph=True)
        out, (h, c) = compiled(x)
    ref, (rh, rc) = lstm(x)
    for a, b in [(out, ref), (h, rh), (c, rc)]:
        torch.testing.assert_close(a, b)
    g = torch.autograd.grad(out.sum() + c.sum(), [x, *lstm.parameters()])
    rg = torch.autograd.grad(ref.sum() + rc.sum(), [x, *lstm.parameters()])
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b)


def test_saved_tensors_of_the_layer(device):
    saved = []
    x = torch.randn(5, 2, 3, device=device, requires_grad=True)
    w = [torch.randn(s, device=device, requires_grad=True) for s in [(16, 3), (16, 4)]]
    h0 = torch.zeros(2, 4, device=device)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        handgrad.ops.lstm_layer(x, h0, h0, *w)
    # input, h0, c0, both weights, output, activated gates, cell states: no per-step tensors.
    assert len(saved) == 8
    assert sorted(tuple(t.shape) for t in saved if t.dim() == 3) == [(5, 2, 3), (5, 2, 4),
                                                                      (5, 2, 4), (5, 2, 16)]


_BASELINE_SCRIPT = """
import torch, handgrad
torch.manual_seed(0)
for H in (128, 13):  # vector rows only, and vector rows plus a scalar tail
    ref = torch.nn.LSTM(7, H, num_layers=2, bidirectional=True)
    mine = handgrad.nn.LSTM(7, H, num_layers=2, bidirectional=True)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(5, 9, 7, requires_grad=True)
    results = []
    for m in (mine, ref):
        out, (h, c) = m(x)
        g = torch.autograd.grad(out.sin().sum() + c.sum(), [x, *m.parameters()])
        results.append([out, h, c, *g])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
print("ok")
"""


def test_baseline_cpu_kernels_without_avx512():
    # The float32 kernels pick AVX-512 at run time when the CPU has it;
    # HANDGRAD_CPU_AVX512=0 forces the baseline (AVX2) pointwise kernels and
    # at::mm, so both paths are tested on an AVX-512 machine.
    assert_script_prints_ok(_BASELINE_SCRIPT, HANDGRAD_CPU_AVX512="0")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_against_float32(device, dtype):
    # CUDA computes in the dtype's kernels, the CPU in float32 rounded once
    # (tests/test_lstm_reduced_precision.py holds the CPU to tighter bounds).
    native = nn.LSTM(8, 16, num_layers=2, bidirectional=True, device=device)
    mine = copy_module(native, handgrad.nn.LSTM)
    x = torch.randn(6, 4, 8, device=device)
    ref, _ = native(x)  # float32 reference
    out, (h, c) = mine.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    grads = torch.autograd.grad(out.float().sum(), list(mine.parameters()))
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)
