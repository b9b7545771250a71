"""LSTM autograd: reverse mode, forward mode and double backward, by hand.

Registers lstm_cell, lstm_cell_backward, lstm_layer and lstm_layer_backward
with handgrad.ops._autograd.register_autograd. First-order reverse mode is
the C++ backward ops (handgrad::lstm_cell_backward, lstm_layer_backward);
everything else -- forward-mode tangents, and the gradients of the backward
ops themselves (double backward, Hessian-vector products) -- is composed here
from small matrix products and pointwise tensor algebra on the saved
activated gates and cell states, one time step after another (a Python loop
over time: these paths run for gradient penalties and the torch.func
transforms, not for ordinary training).

One step (gate order i, f, g, o, as in the kernels):
    z  = x W_ih^T + h W_hh^T + b_ih + b_hh                      (B, 4H)
    i, f, o = sigmoid(z_i, z_f, z_o);  g = tanh(z_g);   gates = [i|f|g|o]
    c' = f c + i g;   h' = o tanh(c')
The activations' slopes and curvatures, read off the activated gates:
    s = [i(1-i) | f(1-f) | 1-g^2 | o(1-o)]     (d gate / d z)
    k = [1-2i   | 1-2f   | -2g   | 1-2o  ]     (d s / d gate)

The gates and cell states are differentiable outputs of lstm_cell and
lstm_layer (not hidden constants): the backward ops read them, so a second
differentiation sends gradients to them, and the forward ops' backward adds
those (grad_gates, grad_cells) into the recurrence.

A cell is a one-step layer: the cell formulas call the sequence formulas on
(1, B, ...) views.
"""

import torch

from ._autograd import OPS, register_autograd


# ---- float16 / bfloat16 on the CPU ------------------------------------------------------------
#
# The CPU computes these dtypes in float32 and saves the gates and cells in
# float32 (csrc/ops/lstm_float_compute.h), so the formulas below meet float32
# gates next to half-precision weights. They then run in float32 as well: every
# half-precision tensor argument is widened, and each result is rounded once
# to the dtype of the tensor it is the gradient or tangent of.

_HALF = (torch.float16, torch.bfloat16)


def _in_float32(result_likes):
    """Decorator: result_likes(args) names, per result, the argument whose dtype it takes."""
    def wrap(formula):
        def widened(*args):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if not (any(t.dtype in _HALF for t in tensors)
                    and any(t.dtype == torch.float32 for t in tensors)):
                return formula(*args)
            results = formula(*[a.float() if isinstance(a, torch.Tensor) and a.dtype in _HALF
                                else a for a in args])
            return tuple(r if r is None or like is None else r.to(like.dtype)
                         for r, like in zip(results, result_likes(args)))
        widened.__name__ = formula.__name__
        widened.__doc__ = formula.__doc__
        return widened
    return wrap


def _sum(*terms):
    present = [t for t in terms if t is not None]
    return sum(present[1:], present[0]) if present else None


def _or_zeros(t, like):
    return torch.zeros_like(like) if t is None else t


def _mm(a, b):
    """a @ b, or None when either factor is None (a zero tangent or gradient)."""
    return None if a is None or b is None else torch.matmul(a, b)


def _over_steps(bias_like, gates):
    """A (4H,) tensor broadcast to every step and row, (T, B, 4H)."""
    return None if bias_like is None else bias_like.expand(gates.shape)


def _slopes(gates):
    i, f, g, o = gates.tensor_split(4, -1)
    return torch.cat([i * (1 - i), f * (1 - f), 1 - g * g, o * (1 - o)], -1)


def _curvatures(gates):
    i, f, g, o = gates.tensor_split(4, -1)
    return torch.cat([1 - 2 * i, 1 - 2 * f, -2 * g, 1 - 2 * o], -1)


def _visit_order(steps, reverse):
    """The time steps in the order the forward pass visits them."""
    return range(steps - 1, -1, -1) if reverse else range(steps)


def _previous(sequence, first, reverse):
    """(T, ...) -> the value each step starts from: `first` at the first
    visited step, else the previous visited step's entry of `sequence`."""
    if reverse:
        return torch.cat([sequence[1:], first.unsqueeze(0)])
    return torch.cat([first.unsqueeze(0), sequence[:-1]])


def _previous_tangent(t_sequence, t_first, like_sequence, like_first, reverse):
    """_previous of two tangents, either of which may be None (zero)."""
    if t_sequence is None and t_first is None:
        return None
    return _previous(_or_zeros(t_sequence, like_sequence), _or_zeros(t_first, like_first),
                     reverse)


def _scatter_previous(grad_previous, reverse):
    """The adjoint of _previous: (grad of `first`, grad of `sequence`)."""
    if grad_previous is None:
        return None, None
    zero = torch.zeros_like(grad_previous[:1])
    if reverse:
        return grad_previous[-1], torch.cat([zero, grad_previous[:-1]])
    return grad_previous[0], torch.cat([grad_previous[1:], zero])


# ---- one step, pointwise ------------------------------------------------------------------

# Forward tangent of the pointwise part, from the tangents dz of the
# pre-activations and dc of the previous cell:
#   d gates = s * dz
#   dc' = df c + f dc + di g + i dg
#   dh' = do tanh(c') + o (1 - tanh^2 c') dc'
def _pointwise_tangent(gates, c_prev, c, t_z, t_c_prev):
    i, f, g, o = gates.tensor_split(4, -1)
    t_gates = _slopes(gates) * t_z
    t_i, t_f, t_g, t_o = t_gates.tensor_split(4, -1)
    t_c = t_f * c_prev + f * t_c_prev + t_i * g + i * t_g
    tc = torch.tanh(c)
    t_h = t_o * tc + o * (1 - tc * tc) * t_c
    return t_gates, t_c, t_h


# Backward of the pointwise part (what the C++ kernels compute), with dh, dc
# the gradients reaching h' and c':
#   dct = dc + dh o (1 - tanh^2 c')                (all that reaches c')
#   u   = [dct g | dct c | dct i | dh tanh c']     (reaches the gates)
#   dz  = u * s;   dc_prev = dct f
def _pointwise_backward(dh, dc, gates, c_prev, c):
    i, f, g, o = gates.tensor_split(4, -1)
    tc = torch.tanh(c)
    dct = dc + dh * o * (1 - tc * tc)
    u = torch.cat([dct * g, dct * c_prev, dct * i, dh * tc], -1)
    return u * _slopes(gates), dct * f


# Tangent of _pointwise_backward (each line differentiates the one above):
#   t_tanh = (1 - tanh^2 c') t_c
#   t_dct  = t_dc + t_dh o (1 - tanh^2) + dh t_o (1 - tanh^2) - 2 dh o tanh t_tanh
#   t_u    = [t_dct g + dct t_g | t_dct c + dct t_c_prev | t_dct i + dct t_i
#             | t_dh tanh + dh t_tanh]
#   t_dz   = t_u * s + u * k * t_gates;   t_dc_prev = t_dct f + dct t_f
def _pointwise_backward_tangent(dh, dc, gates, c_prev, c, t_dh, t_dc, t_gates, t_c_prev, t_c):
    i, f, g, o = gates.tensor_split(4, -1)
    t_i, t_f, t_g, t_o = t_gates.tensor_split(4, -1)
    tc = torch.tanh(c)
    sech2 = 1 - tc * tc
    t_tc = sech2 * t_c
    dct = dc + dh * o * sech2
    t_dct = t_dc + t_dh * o * sech2 + dh * t_o * sech2 - 2 * dh * o * tc * t_tc
    u = torch.cat([dct * g, dct * c_prev, dct * i, dh * tc], -1)
    t_u = torch.cat([t_dct * g + dct * t_g, t_dct * c_prev + dct * t_c_prev,
                     t_dct * i + dct * t_i, t_dh * tc + dh * t_tc], -1)
    t_dz = t_u * _slopes(gates) + u * _curvatures(gates) * t_gates
    return t_dz, t_dct * f + dct * t_f


# Adjoint of _pointwise_backward: the transpose of the tangent map above.
# With G_dz, G_dc_prev the gradients reaching dz and dc_prev:
#   G_u = G_dz * s;   G_gates = G_dz * u * k  (through s)
#   G_dct = G_u_i g + G_u_f c + G_u_g i + G_dc_prev f
#   G_gates += [G_u_g dct | G_dc_prev dct | G_u_i dct | G_dct dh (1 - tanh^2)]
#   G_c_prev = G_u_f dct;   G_dh = G_u_o tanh + G_dct o (1 - tanh^2);   G_dc = G_dct
#   G_tanh = G_u_o dh - 2 G_dct dh o tanh;   G_c = G_tanh (1 - tanh^2)
def _pointwise_backward_adjoint(dh, dc, gates, c_prev, c, g_dz, g_dc_prev):
    i, f, g, o = gates.tensor_split(4, -1)
    tc = torch.tanh(c)
    sech2 = 1 - tc * tc
    dct = dc + dh * o * sech2
    u = torch.cat([dct * g, dct * c_prev, dct * i, dh * tc], -1)
    g_u_i, g_u_f, g_u_g, g_u_o = (g_dz * _slopes(gates)).tensor_split(4, -1)
    g_dct = g_u_i * g + g_u_f * c_prev + g_u_g * i + g_dc_prev * f
    g_gates = g_dz * u * _curvatures(gates) + torch.cat(
        [g_u_g * dct, g_dc_prev * dct, g_u_i * dct, g_dct * dh * sech2], -1)
    g_tanh = g_u_o * dh - 2 * g_dct * dh * o * tc
    return (g_u_o * tc + g_dct * o * sech2, g_dct, g_gates, g_u_f * dct, g_tanh * sech2)


# ---- a sequence (one direction of one layer) -------------------------------------------------

def _flat(t):
    return t.flatten(0, -2)


# Tangent of the layer: the pre-activation tangent of step t is
#   t_z_t = t_x_t W_ih^T + x_t t_W_ih^T + h_{t-1} t_W_hh^T + t_b   (all steps at once)
#         + t_h_{t-1} W_hh^T                                      (the recurrence)
# followed by the pointwise tangent, step by step in the forward order.
@_in_float32(lambda a: (a[5], a[5], a[5], a[6], a[7]))  # out, hT, cT like out; gates; cells
def _sequence_tangent(x, h0, c0, w_ih, w_hh, out, gates, cells, reverse,
                      t_x, t_h0, t_c0, t_w_ih, t_w_hh, t_b):
    h_prev = _previous(_or_zeros(out, cells), h0, reverse)
    c_prev = _previous(cells, c0, reverse)
    t_z_input = _sum(_mm(t_x, _t(w_ih)), _mm(x, _t(t_w_ih)), _mm(h_prev, _t(t_w_hh)),
                     _over_steps(t_b, gates))
    t_h = _or_zeros(t_h0, h0)
    t_c = _or_zeros(t_c0, c0)
    t_gates, t_cells, t_out = [None] * len(x), [None] * len(x), [None] * len(x)
    for t in _visit_order(len(x), reverse):
        t_z = _sum(None if t_z_input is None else t_z_input[t], t_h @ w_hh.t())
        t_gates[t], t_c, t_h = _pointwise_tangent(gates[t], c_prev[t], cells[t], t_z, t_c)
        t_cells[t], t_out[t] = t_c, t_h
    return torch.stack(t_out), t_h, t_c, torch.stack(t_gates), torch.stack(t_cells)


def _t(w):
    return None if w is None else w.t()


def _through_time(grad_output, grad_hT, grad_cT, gates, c_prev, cells, w_hh, reverse,
                  grad_gates=None, grad_cells=None):
    """Backward through time, pointwise parts and the recurrence only.

    Returns per step (in time order) the gradients dh_t, dc_t reaching h_t
    and c_t and the gate gradients dz_t (T, B, 4H), then those reaching h0
    and c0. grad_gates / grad_cells (gradients of the gates and cells
    outputs) are added where those are formed: dz_t += grad_gates_t * s_t,
    dc_t += grad_cells_t.
    """
    steps = len(gates)
    dh = _or_zeros(grad_hT, c_prev[0])
    dc = _or_zeros(grad_cT, c_prev[0])
    dhs, dcs, dzs = [None] * steps, [None] * steps, [None] * steps
    for t in reversed(_visit_order(steps, reverse)):
        if grad_output is not None:
            dh = dh + grad_output[t]
        if grad_cells is not None:
            dc = dc + grad_cells[t]
        dhs[t], dcs[t] = dh, dc
        dz, dc = _pointwise_backward(dh, dc, gates[t], c_prev[t], cells[t])
        if grad_gates is not None:
            dz = dz + grad_gates[t] * _slopes(gates[t])
        dzs[t] = dz
        dh = dz @ w_hh
    return dhs, dcs, torch.stack(dzs), dh, dc


# Backward of the layer, with the linear parts over all steps at once:
#   grad_x_t = dz_t W_ih;  grad_W_ih = sum_t dz_t^T x_t;  grad_W_hh = sum_t dz_t^T h_{t-1};
#   grad_b = sum_t,rows dz_t;  and dh_{t-1} = dz_t W_hh inside _through_time.
@_in_float32(lambda a: (a[5],) * 6)  # every gradient like x
def _sequence_backward(grad_output, grad_hT, grad_cT, grad_gates, grad_cells, x, h0, c0, w_ih,
                       w_hh, out, gates, cells, reverse):
    h_prev = _previous(_or_zeros(out, cells), h0, reverse)
    c_prev = _previous(cells, c0, reverse)
    _, _, dz, dh0, dc0 = _through_time(grad_output, grad_hT, grad_cT, gates, c_prev, cells, w_hh,
                                       reverse, grad_gates, grad_cells)
    return (dz @ w_ih, dh0, dc0, _flat(dz).t() @ _flat(x), _flat(dz).t() @ _flat(h_prev),
            _flat(dz).sum(0))


# Tangent of the layer's backward (its inputs: the incoming gradients and
# every saved tensor, each with its own tangent): _through_time's steps
# differentiated one by one in the same order --
#   t_dh_{t-1} = t_dz_t W_hh + dz_t t_W_hh, t_dc_{t-1} from the pointwise tangent --
# then the linear parts' product rule (t_grad_x = t_dz W_ih + dz t_W_ih, ...).
@_in_float32(lambda a: (a[3],) * 6)  # every tangent like x
def _sequence_backward_tangent(grad_output, grad_hT, grad_cT, x, h0, c0, w_ih, w_hh, out, gates,
                               cells, reverse, t_go, t_ghT, t_gcT, t_x, t_h0, t_c0, t_w_ih,
                               t_w_hh, t_out, t_gates, t_cells):
    h_prev = _previous(_or_zeros(out, cells), h0, reverse)
    c_prev = _previous(cells, c0, reverse)
    t_h_prev = _previous_tangent(t_out, t_h0, cells, h0, reverse)
    t_c_prev = _or_zeros(_previous_tangent(t_cells, t_c0, cells, c0, reverse), c_prev)
    t_cells = _or_zeros(t_cells, cells)
    t_gates = _or_zeros(t_gates, gates)
    dhs, dcs, dz, _, _ = _through_time(grad_output, grad_hT, grad_cT, gates, c_prev, cells, w_hh,
                                       reverse)
    t_dh = _or_zeros(t_ghT, h0)
    t_dc = _or_zeros(t_gcT, c0)
    t_dz = [None] * len(x)
    for t in reversed(_visit_order(len(x), reverse)):
        if t_go is not None:
            t_dh = t_dh + t_go[t]
        t_dz[t], t_dc = _pointwise_backward_tangent(dhs[t], dcs[t], gates[t], c_prev[t],
                                                    cells[t], t_dh, t_dc, t_gates[t],
                                                    t_c_prev[t], t_cells[t])
        t_dh = _sum(t_dz[t] @ w_hh, _mm(dz[t], t_w_hh))
    t_dz = torch.stack(t_dz)
    return (_sum(t_dz @ w_ih, _mm(dz, t_w_ih)), t_dh, t_dc,
            _sum(_flat(t_dz).t() @ _flat(x), _mm(_flat(dz).t(), _flat_or_none(t_x))),
            _sum(_flat(t_dz).t() @ _flat(h_prev), _mm(_flat(dz).t(), _flat_or_none(t_h_prev))),
            _flat(t_dz).sum(0))


def _flat_or_none(t):
    return None if t is None else _flat(t)


# Adjoint of the layer's backward, with G_x, G_h0, G_c0, G_W_ih, G_W_hh, G_b
# the gradients reaching its outputs. Its linear parts give, over all steps,
#   G_dz_t  = G_x_t W_ih^T + x_t G_W_ih^T + h_{t-1} G_W_hh^T + G_b + G_dh_{t-1} W_hh^T
#   d x_t   = dz_t G_W_ih;  d h_{t-1} = dz_t G_W_hh;
#   d W_ih  = sum_t dz_t^T G_x_t;  d W_hh = sum_t dz_t^T G_dh_{t-1}
# where G_dh_{t-1} is the gradient reaching dh_{t-1} = dz_t W_hh (G_h0 at
# the first step). The recurrence runs the other way from _through_time --
# forward in time -- carrying G_dh and G_dc through _pointwise_backward_adjoint:
#   d grad_output_t = G_dh_t (dh_t = grad_output_t + dz_{t+1} W_hh)
# and what is left at the last step reaches grad_hT and grad_cT.
@_in_float32(lambda a: a[1:12])  # grad_output ... cells, each like itself
def _sequence_backward_adjoint(needs, grad_output, grad_hT, grad_cT, x, h0, c0, w_ih, w_hh, out,
                               gates, cells, reverse, g_x, g_h0, g_c0, g_w_ih, g_w_hh, g_b):
    h_prev = _previous(_or_zeros(out, cells), h0, reverse)
    c_prev = _previous(cells, c0, reverse)
    dhs, dcs, dz, _, _ = _through_time(grad_output, grad_hT, grad_cT, gates, c_prev, cells, w_hh,
                                       reverse)
    g_z_input = _sum(_mm(g_x, w_ih.t()), _mm(x, _t(g_w_ih)), _mm(h_prev, _t(g_w_hh)),
                     _over_steps(g_b, gates))
    g_dh = _or_zeros(g_h0, h0)
    g_dc = _or_zeros(g_c0, c0)
    g_go, g_gates, g_cells, g_c_prev = ([None] * len(x) for _ in range(4))
    d_w_hh = torch.zeros_like(w_hh)
    for t in _visit_order(len(x), reverse):
        g_dz = _sum(None if g_z_input is None else g_z_input[t], g_dh @ w_hh.t())
        d_w_hh = d_w_hh + dz[t].t() @ g_dh
        g_dh, g_dc, g_gates[t], g_c_prev[t], g_cells[t] = _pointwise_backward_adjoint(
            dhs[t], dcs[t], gates[t], c_prev[t], cells[t], g_dz, g_dc)
        g_go[t] = g_dh
    d_c0, d_cells_as_prev = _scatter_previous(torch.stack(g_c_prev), reverse)
    d_h0, d_out = _scatter_previous(_mm(dz, g_w_hh), reverse)
    d_x = _mm(dz, g_w_ih)
    d_w_ih = _mm(_flat(dz).t(), _flat_or_none(g_x))
    grads = (torch.stack(g_go) if grad_output is not None else None,
             g_dh if grad_hT is not None else None, g_dc if grad_cT is not None else None,
             d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_out, torch.stack(g_gates),
             torch.stack(g_cells) + d_cells_as_prev)
    return tuple(g if n else None for g, n in zip(grads, needs))


# ---- registrations --------------------------------------------------------------------------

def _bias_grads(grad_b, needs_ih, needs_hh):
    # The same gradient for both biases; the second gets its own copy so the
    # two .grad tensors never share storage.
    g_ih = grad_b if needs_ih else None
    g_hh = None
    if needs_hh:
        g_hh = grad_b.clone() if g_ih is not None else grad_b
    return g_ih, g_hh


def _bias_tangent(t_b_ih, t_b_hh):
    return _sum(t_b_ih, t_b_hh)


def _first(t):
    return None if t is None else t.unsqueeze(0)


def _cell_setup_context(ctx, inputs, output):
    input, hx, cx, w_ih, w_hh, b_ih, b_hh = inputs
    _, cy, gates = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, gates, cy)


def _cell_backward(ctx, grad_hy, grad_cy, grad_gates):
    # The dispatcher drops trailing arguments left at their defaults (no biases).
    needs = (*ctx.needs_input_grad, False, False)
    if grad_hy is None and grad_cy is None and grad_gates is None:
        return (None,) * 7
    input, hx, cx, w_ih, w_hh, gates, cy = ctx.saved_tensors
    if grad_gates is None:
        grads = OPS.lstm_cell_backward(grad_hy, grad_cy, gates, cx, cy, input, hx, w_ih, w_hh)
    else:
        # Only a second differentiation reaches the gates: the one-step layer.
        g_x, g_h, g_c, g_w_ih, g_w_hh, g_b = _sequence_backward(
            _first(grad_hy), None, grad_cy, grad_gates.unsqueeze(0), None, input.unsqueeze(0),
            hx, cx, w_ih, w_hh, None, gates.unsqueeze(0), cy.unsqueeze(0), False)
        grads = (g_x[0], g_h, g_c, g_w_ih, g_w_hh, g_b)
    g_b_ih, g_b_hh = _bias_grads(grads[5], needs[5], needs[6])
    return (*(g if n else None for g, n in zip(grads[:5], needs)), g_b_ih, g_b_hh)


def _cell_jvp(ctx, inputs, t_x, t_h, t_c, t_w_ih, t_w_hh, t_b_ih, t_b_hh):
    input, hx, cx, w_ih, w_hh, _, _ = inputs
    hy, cy, gates = ctx.outputs
    t_out, _, t_cy, t_gates, _ = _sequence_tangent(
        input.unsqueeze(0), hx, cx, w_ih, w_hh, hy.unsqueeze(0), gates.unsqueeze(0),
        cy.unsqueeze(0), False, _first(t_x), t_h, t_c, t_w_ih, t_w_hh,
        _bias_tangent(t_b_ih, t_b_hh))
    return t_out[0], t_cy, t_gates[0]


# The op's first-order Autograd kernel is C++ (csrc/ops/lstm_autograd.cpp: the
# Python layer was a third of a small cell's step); these formulas serve
# forward-mode AD and the torch.func transforms, through call().
register_autograd("handgrad::lstm_cell", _cell_backward, _cell_setup_context, _cell_jvp,
                  dispatcher=False)


# lstm_cell_backward(grad_hy, grad_cy, gates, cx, cy, input, hx, w_ih, w_hh)
# is the one-step layer backward with grad_output = grad_hy, grad_cT = grad_cy.
def _cell_backward_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs)


def _cell_backward_backward(ctx, g_x, g_hx, g_cx, g_w_ih, g_w_hh, g_b):
    grad_hy, grad_cy, gates, cx, cy, input, hx, w_ih, w_hh = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # Inputs of the one-step layer backward, in its order (grad_hT is None).
    layer_needs = (needs[0], False, needs[1], needs[5], needs[6], needs[3], needs[7], needs[8],
                   False, needs[2], needs[4])
    (d_go, _, d_gcy, d_x, d_hx, d_cx, d_w_ih, d_w_hh, _, d_gates,
     d_cy) = _sequence_backward_adjoint(
        layer_needs, _first(grad_hy), None, grad_cy, input.unsqueeze(0), hx, cx, w_ih, w_hh,
        None, gates.unsqueeze(0), cy.unsqueeze(0), False, _first(g_x), g_hx, g_cx, g_w_ih,
        g_w_hh, g_b)
    squeeze = lambda t: None if t is None else t[0]  # noqa: E731
    return (squeeze(d_go), d_gcy, squeeze(d_gates), d_cx, squeeze(d_cy), squeeze(d_x), d_hx,
            d_w_ih, d_w_hh)


def _cell_backward_jvp(ctx, inputs, t_ghy, t_gcy, t_gates, t_cx, t_cy, t_x, t_hx, t_w_ih,
                       t_w_hh):
    grad_hy, grad_cy, gates, cx, cy, input, hx, w_ih, w_hh = inputs
    t_gx, t_ghx, t_gcx, t_gw_ih, t_gw_hh, t_gb = _sequence_backward_tangent(
        _first(grad_hy), None, grad_cy, input.unsqueeze(0), hx, cx, w_ih, w_hh, None,
        gates.unsqueeze(0), cy.unsqueeze(0), False, _first(t_ghy), None, t_gcy, _first(t_x),
        t_hx, t_cx, t_w_ih, t_w_hh, None, _first(t_gates), _first(t_cy))
    return t_gx[0], t_ghx, t_gcx, t_gw_ih, t_gw_hh, t_gb


register_autograd("handgrad::lstm_cell_backward", _cell_backward_backward,
                  _cell_backward_setup_context, _cell_backward_jvp)


def _unsupported_variant(what, w_hr, batch_sizes):
    """The formulas composed here cover the plain padded layer; its projected
    (proj_size) and packed (PackedSequence) variants have first-order reverse
    mode only (the C++ backward op). Anything else raises instead of
    returning a wrong answer."""
    variants = []
    if w_hr is not None:
        variants.append("a projection (proj_size > 0)")
    if batch_sizes is not None:
        variants.append("packed sequences (PackedSequence / batch_sizes)")
    if variants:
        raise NotImplementedError(
            "handgrad.ops.lstm_layer: %s is not implemented for LSTM layers with %s; "
            "first-order backward is" % (what, " and ".join(variants)))


def _layer_setup_context(ctx, inputs, output):
    input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, w_hr, batch_sizes = inputs
    out, _, _, gates, cells = output
    ctx.reverse = bool(reverse)
    ctx.batch_sizes = batch_sizes
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, h0, c0, w_ih, w_hh, out, gates, cells, w_hr)


def _layer_backward(ctx, grad_output, grad_hT, grad_cT, grad_gates, grad_cells):
    needs = ctx.needs_input_grad
    if all(g is None for g in (grad_output, grad_hT, grad_cT, grad_gates, grad_cells)):
        return (None,) * 10
    input, h0, c0, w_ih, w_hh, out, gates, cells, w_hr = ctx.saved_tensors
    if grad_gates is None and grad_cells is None:
        grads = OPS.lstm_layer_backward(grad_output, grad_hT, grad_cT, input, h0, c0, w_ih, w_hh,
                                        out, gates, cells, ctx.reverse, needs[0], w_hr,
                                        ctx.batch_sizes)
    else:
        # Only a second differentiation reaches the gates and cells.
        _unsupported_variant("double backward", w_hr, ctx.batch_sizes)
        grads = _sequence_backward(grad_output, grad_hT, grad_cT, grad_gates, grad_cells, input,
                                   h0, c0, w_ih, w_hh, out, gates, cells, ctx.reverse)
    g_b_ih, g_b_hh = _bias_grads(grads[5], needs[5], needs[6])
    g_w_hr = grads[6] if w_hr is not None and needs[8] else None
    return (*(g if n else None for g, n in zip(grads[:5], needs)), g_b_ih, g_b_hh, None, g_w_hr,
            None)


def _layer_jvp(ctx, inputs, t_x, t_h0, t_c0, t_w_ih, t_w_hh, t_b_ih, t_b_hh, _, t_w_hr, __):
    input, h0, c0, w_ih, w_hh, _, _, reverse, w_hr, batch_sizes = inputs
    _unsupported_variant("forward-mode AD", w_hr, batch_sizes)
    out, _, _, gates, cells = ctx.outputs
    return _sequence_tangent(input, h0, c0, w_ih, w_hh, out, gates, cells, bool(reverse), t_x,
                             t_h0, t_c0, t_w_ih, t_w_hh, _bias_tangent(t_b_ih, t_b_hh))


register_autograd("handgrad::lstm_layer", _layer_backward, _layer_setup_context, _layer_jvp)


def _layer_backward_setup_context(ctx, inputs, output):
    tensors, (reverse, input_grad, w_hr, batch_sizes) = inputs[:11], inputs[11:]
    ctx.reverse = bool(reverse)
    ctx.input_grad = bool(input_grad)
    ctx.w_hr_given = w_hr is not None
    ctx.batch_sizes = batch_sizes
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*tensors)


def _layer_backward_backward(ctx, g_x, g_h0, g_c0, g_w_ih, g_w_hh, g_b, g_w_hr=None):
    _unsupported_variant("double backward", True if ctx.w_hr_given else None, ctx.batch_sizes)
    # Without input_grad, grad_input is an empty placeholder: nothing flows back through it.
    g_x = g_x if ctx.input_grad else None
    return (*_sequence_backward_adjoint(ctx.needs_input_grad[:11], *ctx.saved_tensors,
                                        ctx.reverse, g_x, g_h0, g_c0, g_w_ih, g_w_hh, g_b),
            None, None, None, None)


def _layer_backward_jvp(ctx, inputs, *tangents):
    tensors, (reverse, input_grad, w_hr, batch_sizes) = inputs[:11], inputs[11:]
    _unsupported_variant("forward-mode AD of the backward", w_hr, batch_sizes)
    t_gx, *rest = _sequence_backward_tangent(*tensors, bool(reverse), *tangents[:11])
    # grad_w_hr: an empty placeholder without a projection.
    return (t_gx if input_grad else None, *rest, None)


register_autograd("handgrad::lstm_layer_backward", _layer_backward_backward,
                  _layer_backward_setup_context, _layer_backward_jvp)
