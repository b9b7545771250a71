"""lstm: fake kernels, autograd registration and the public functions.

The kernels are in csrc/ops/{lstm.cpp, cpu/lstm.cpp, cuda/lstm.cu}. Two
differentiable ops:

* ``handgrad::lstm_cell`` -- one step: returns (hy, cy, gates), where gates are
  the activated [i | f | g | o] gates saved for backward;
* ``handgrad::lstm_layer`` -- one direction of one layer over a whole (T, B, I)
  sequence, the time loop in C++: returns (output, hT, cT, gates, cells), the
  last two (all activated gates and cell states) saved for backward. Optional
  ``w_hr`` (proj_size: h_t = W_hr (o_t * tanh(c_t))) and ``batch_sizes`` (the
  input is then a PackedSequence's (N, I) data, and every output is packed
  the same way; each step computes only the sequences still running).

Their backward ops (``lstm_cell_backward``, ``lstm_layer_backward``) return
the gradients of the input, of both states, of both weights, and one bias
gradient (the same for b_ih and b_hh); ``lstm_layer_backward`` also returns
grad_w_hr (an empty placeholder without w_hr). ``lstm_layer_backward`` skips the
input gradient (returning an empty placeholder) when input_grad=False, the
usual case for the first layer, whose input is data.

Autograd (backward, forward mode, double backward of all four ops) is in
_lstm_autograd.py.
"""

from typing import Optional, Sequence, Tuple

import torch

from . import _lstm_autograd  # noqa: F401  (registers the autograd formulas)
from ._autograd import call

__all__ = ["lstm_cell", "lstm_layer"]


def _check_same_device(op, tensors):
    devices = {t.device for t in tensors if t is not None}
    torch._check(len(devices) == 1,
                 lambda: "%s: expected all tensors to be on the same device, but got %s"
                 % (op, sorted(str(d) for d in devices)))


def _saved_dtype(input):
    """The dtype of the saved gates and cells: float32 for float16 / bfloat16
    input on the CPU (computed in float32, saved unrounded; see
    csrc/ops/lstm_float_compute.h), else the input's."""
    if input.device.type == "cpu" and input.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return input.dtype


@torch.library.register_fake("handgrad::lstm_cell")
def _lstm_cell_fake(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None):
    torch._check(input.dim() == 2, lambda: "handgrad::lstm_cell: expected 2-D input")
    _check_same_device("handgrad::lstm_cell", (input, hx, cx, w_ih, w_hh, b_ih, b_hh))
    batch, hidden = input.shape[0], w_hh.shape[1]
    return (input.new_empty((batch, hidden)), input.new_empty((batch, hidden)),
            input.new_empty((batch, 4 * hidden), dtype=_saved_dtype(input)))


@torch.library.register_fake("handgrad::lstm_cell_backward")
def _lstm_cell_backward_fake(grad_hy, grad_cy, gates, cx, cy, input, hx, w_ih, w_hh):
    return (input.new_empty(input.shape), input.new_empty(hx.shape), input.new_empty(cx.shape),
            input.new_empty(w_ih.shape), input.new_empty(w_hh.shape),
            input.new_empty((w_ih.shape[0],)))


@torch.library.register_fake("handgrad::lstm_layer")
def _lstm_layer_fake(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse=False, w_hr=None,
                     batch_sizes=None):
    packed = batch_sizes is not None
    torch._check(input.dim() == (2 if packed else 3),
                 lambda: "handgrad::lstm_layer: expected %s input"
                 % ("2-D (packed)" if packed else "3-D"))
    _check_same_device("handgrad::lstm_layer", (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    hidden = w_hh.shape[0] // 4
    state = w_hr.shape[0] if w_hr is not None else hidden
    steps = tuple(input.shape[:-1])  # (T, B) padded, (N,) packed
    batch = h0.shape[0]
    return (input.new_empty((*steps, state)), input.new_empty((batch, state)),
            input.new_empty((batch, hidden)),
            input.new_empty((*steps, 4 * hidden), dtype=_saved_dtype(input)),
            input.new_empty((*steps, hidden), dtype=_saved_dtype(input)))


@torch.library.register_fake("handgrad::lstm_layer_backward")
def _lstm_layer_backward_fake(grad_output, grad_hT, grad_cT, input, h0, c0, w_ih, w_hh, output,
                              gates, cells, reverse, input_grad=True, w_hr=None,
                              batch_sizes=None):
    return (input.new_empty(input.shape if input_grad else (0,)), input.new_empty(h0.shape),
            input.new_empty(c0.shape), input.new_empty(w_ih.shape), input.new_empty(w_hh.shape),
            input.new_empty((w_ih.shape[0],)),
            input.new_empty(w_hr.shape if w_hr is not None else (0,)))


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

    Dtypes and devices: float32, float64, float16 and bfloat16 on the CPU and
    on CUDA. On the CPU, float16 and bfloat16 are computed in float32 (the
    float32 kernels) and each result is rounded once. Differentiable in every
    tensor; saved for backward: the activated gates and the cell states (in
    float32 for float16 / bfloat16 on the CPU). hidden_size may be 0 (empty
    states, zero input gradient), as for native.
    """
    h, c = hx
    if input.dim() == 1:
        hy, cy, _ = call("handgrad::lstm_cell", input.unsqueeze(0), h.unsqueeze(0),
                         c.unsqueeze(0), w_ih, w_hh, b_ih, b_hh)
        return hy.squeeze(0), cy.squeeze(0)
    hy, cy, _ = call("handgrad::lstm_cell", input, h, c, w_ih, w_hh, b_ih, b_hh)
    return hy, cy


def lstm_layer(input: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor,
               w_hh: torch.Tensor, b_ih: Optional[torch.Tensor] = None,
               b_hh: Optional[torch.Tensor] = None, reverse: bool = False,
               w_hr: Optional[torch.Tensor] = None,
               batch_sizes: Optional[Sequence[int]] = None
               ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """One direction of one LSTM layer over a whole sequence, the time loop in C++.

    Args:
        input: ``(seq_len, batch, input_size)``; with ``batch_sizes``, the
            ``(total_rows, input_size)`` data of a PackedSequence.
        h0, c0: ``(batch, hidden_size)`` (h0: ``(batch, proj_size)`` with
            ``w_hr``); with ``batch_sizes``, batch is ``batch_sizes[0]``.
        w_ih, w_hh, b_ih, b_hh: as in :func:`lstm_cell`; with ``w_hr``, w_hh
            is ``(4 * hidden_size, proj_size)``.
        reverse: read the sequence from the last step to the first (the
            backward direction of a bidirectional LSTM); ``output[t]`` is
            always the hidden state at step t. Packed, each sequence starts at
            its own last step.
        w_hr: ``(proj_size, hidden_size)``, the projection of torch.nn.LSTM's
            ``proj_size``: h_t = W_hr (o_t * tanh(c_t)).
        batch_sizes: a PackedSequence's batch sizes (non-increasing): step t
            computes only its first ``batch_sizes[t]`` rows, the sequences
            still running.

    Returns:
        ``(output, (h_T, c_T))``, output ``(seq_len, batch, hidden_size or
        proj_size)`` (packed: ``(total_rows, ...)``); h_T, c_T the state of
        each sequence at its last step.

    Dtypes and devices: as :func:`lstm_cell`. Saved for backward: the
    activated gates and cell states of every step.
    """
    if batch_sizes is not None:
        batch_sizes = [int(b) for b in batch_sizes]
    output, h_t, c_t, _, _ = call("handgrad::lstm_layer", input, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                  bool(reverse), w_hr, batch_sizes)
    return output, (h_t, c_t)
