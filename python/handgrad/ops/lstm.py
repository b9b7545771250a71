"""lstm: fake kernels, autograd registration and the public functions.

The kernels are in csrc/ops/{lstm.cpp, cpu/lstm.cpp, cuda/lstm.cu}. Two
differentiable ops:

* ``handgrad::lstm_cell`` -- one step: returns (hy, cy, gates), where gates are
  the activated [i | f | g | o] gates saved for backward;
* ``handgrad::lstm_layer`` -- one direction of one layer over a whole (T, B, I)
  sequence, the time loop in C++: returns (output, hT, cT, gates, cells), the
  last two (all activated gates and cell states) saved for backward.

Their backward ops (``lstm_cell_backward``, ``lstm_layer_backward``) return
the gradients of the input, of both states, of both weights, and one bias
gradient (the same for b_ih and b_hh). ``lstm_layer_backward`` skips the
input gradient (returning an empty placeholder) when input_grad=False, the
usual case for the first layer, whose input is data.
"""

from typing import Optional, Tuple

import torch

__all__ = ["lstm_cell", "lstm_layer"]


def _check_same_device(op, tensors):
    devices = {t.device for t in tensors if t is not None}
    torch._check(len(devices) == 1,
                 lambda: "%s: expected all tensors to be on the same device, but got %s"
                 % (op, sorted(str(d) for d in devices)))


@torch.library.register_fake("handgrad::lstm_cell")
def _lstm_cell_fake(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None):
    torch._check(input.dim() == 2, lambda: "handgrad::lstm_cell: expected 2-D input")
    _check_same_device("handgrad::lstm_cell", (input, hx, cx, w_ih, w_hh, b_ih, b_hh))
    batch, hidden = input.shape[0], w_hh.shape[1]
    return (input.new_empty((batch, hidden)), input.new_empty((batch, hidden)),
            input.new_empty((batch, 4 * hidden)))


@torch.library.register_fake("handgrad::lstm_cell_backward")
def _lstm_cell_backward_fake(grad_hy, grad_cy, gates, cx, cy, input, hx, w_ih, w_hh):
    return (input.new_empty(input.shape), input.new_empty(hx.shape), input.new_empty(cx.shape),
            input.new_empty(w_ih.shape), input.new_empty(w_hh.shape),
            input.new_empty((w_ih.shape[0],)))


@torch.library.register_fake("handgrad::lstm_layer")
def _lstm_layer_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse=False):
    torch._check(input.dim() == 3, lambda: "handgrad::lstm_layer: expected 3-D input")
    _check_same_device("handgrad::lstm_layer", (input, h0, c0, w_ih, w_hh, b_ih, b_hh))
    steps, batch, hidden = input.shape[0], input.shape[1], w_hh.shape[1]
    return (input.new_empty((steps, batch, hidden)), input.new_empty((batch, hidden)),
            input.new_empty((batch, hidden)), input.new_empty((steps, batch, 4 * hidden)),
            input.new_empty((steps, batch, hidden)))


@torch.library.register_fake("handgrad::lstm_layer_backward")
def _lstm_layer_backward_fake(grad_output, grad_hT, grad_cT, input, h0, c0, w_ih, w_hh, output,
                              gates, cells, reverse, input_grad=True):
    return (input.new_empty(input.shape if input_grad else (0,)), input.new_empty(h0.shape),
            input.new_empty(c0.shape), input.new_empty(w_ih.shape), input.new_empty(w_hh.shape),
            input.new_empty((w_ih.shape[0],)))


def _bias_grads(grad_b, b_ih, b_hh):
    # The same gradient for both biases; the second gets its own copy so the
    # two .grad tensors never share storage.
    g_ih = grad_b if b_ih is not None else None
    g_hh = None
    if b_hh is not None:
        g_hh = grad_b.clone() if g_ih is not None else grad_b
    return g_ih, g_hh


def _cell_setup_context(ctx, inputs, output):
    input, hx, cx, w_ih, w_hh = inputs[:5]
    b_ih = inputs[5] if len(inputs) > 5 else None
    b_hh = inputs[6] if len(inputs) > 6 else None
    _, cy, gates = output
    ctx.mark_non_differentiable(gates)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, gates, cy)
    ctx.biases = (b_ih is not None, b_hh is not None)


def _cell_backward(ctx, grad_hy, grad_cy, _grad_gates):
    if grad_hy is None and grad_cy is None:
        return None, None, None, None, None, None, None
    input, hx, cx, w_ih, w_hh, gates, cy = ctx.saved_tensors
    g_in, g_hx, g_cx, g_wih, g_whh, g_b = torch.ops.handgrad.lstm_cell_backward(
        grad_hy, grad_cy, gates, cx, cy, input, hx, w_ih, w_hh)
    g_bih, g_bhh = _bias_grads(g_b, *(True if b else None for b in ctx.biases))
    return g_in, g_hx, g_cx, g_wih, g_whh, g_bih, g_bhh


torch.library.register_autograd("handgrad::lstm_cell", _cell_backward,
                                setup_context=_cell_setup_context)


def _layer_setup_context(ctx, inputs, output):
    input, h0, c0, w_ih, w_hh, b_ih, b_hh = inputs[:7]
    ctx.reverse = bool(inputs[7]) if len(inputs) > 7 else False
    out, _, _, gates, cells = output
    ctx.mark_non_differentiable(gates, cells)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, h0, c0, w_ih, w_hh, out, gates, cells)
    ctx.biases = (b_ih is not None, b_hh is not None)


def _layer_backward(ctx, grad_output, grad_hT, grad_cT, _grad_gates, _grad_cells):
    if grad_output is None and grad_hT is None and grad_cT is None:
        return (None,) * 8
    input, h0, c0, w_ih, w_hh, out, gates, cells = ctx.saved_tensors
    g_in, g_h0, g_c0, g_wih, g_whh, g_b = torch.ops.handgrad.lstm_layer_backward(
        grad_output, grad_hT, grad_cT, input, h0, c0, w_ih, w_hh, out, gates, cells, ctx.reverse,
        ctx.needs_input_grad[0])
    if not ctx.needs_input_grad[0]:
        g_in = None
    g_bih, g_bhh = _bias_grads(g_b, *(True if b else None for b in ctx.biases))
    return g_in, g_h0, g_c0, g_wih, g_whh, g_bih, g_bhh, None


torch.library.register_autograd("handgrad::lstm_layer", _layer_backward,
                                setup_context=_layer_setup_context)


def lstm_cell(input: torch.Tensor, hx: Tuple[torch.Tensor, torch.Tensor], w_ih: torch.Tensor,
              w_hh: torch.Tensor, b_ih: Optional[torch.Tensor] = None,
              b_hh: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step with the semantics of torch's LSTM cell (torch.nn.LSTMCell),
    one fused kernel for the gates.

    Args:
        input: ``(batch, input_size)`` or unbatched ``(input_size,)``.
        hx: the tuple ``(h, c)``, each ``(batch, hidden_size)`` or ``(hidden_size,)``.
        w_ih: ``(4 * hidden_size, input_size)``, gates in the order i, f, g, o.
        w_hh: ``(4 * hidden_size, hidden_size)``.
        b_ih, b_hh: ``(4 * hidden_size,)`` or None.

    Returns:
        ``(hy, cy)``, shaped like ``h`` and ``c``.

    Dtypes and devices: float32 and float64 on the CPU; float32, float64,
    float16 and bfloat16 on CUDA. Differentiable in every tensor; saved for
    backward: the activated gates and the cell states.
    """
    h, c = hx
    if input.dim() == 1:
        hy, cy, _ = torch.ops.handgrad.lstm_cell(input.unsqueeze(0), h.unsqueeze(0),
                                                 c.unsqueeze(0), w_ih, w_hh, b_ih, b_hh)
        return hy.squeeze(0), cy.squeeze(0)
    hy, cy, _ = torch.ops.handgrad.lstm_cell(input, h, c, w_ih, w_hh, b_ih, b_hh)
    return hy, cy


def lstm_layer(input: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor,
               w_hh: torch.Tensor, b_ih: Optional[torch.Tensor] = None,
               b_hh: Optional[torch.Tensor] = None, reverse: bool = False
               ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """One direction of one LSTM layer over a whole sequence, the time loop in C++.

    Args:
        input: ``(seq_len, batch, input_size)``.
        h0, c0: ``(batch, hidden_size)``.
        w_ih, w_hh, b_ih, b_hh: as in :func:`lstm_cell`.
        reverse: read the sequence from the last step to the first (the
            backward direction of a bidirectional LSTM); ``output[t]`` is
            always the hidden state at step t.

    Returns:
        ``(output, (h_T, c_T))``, output ``(seq_len, batch, hidden_size)``.

    Dtypes and devices: as :func:`lstm_cell`. Saved for backward: the
    activated gates and cell states of every step.
    """
    output, h_t, c_t, _, _ = torch.ops.handgrad.lstm_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                           bool(reverse))
    return output, (h_t, c_t)
