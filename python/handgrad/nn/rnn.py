import torch
from torch.nn.utils.rnn import PackedSequence

from .. import ops


class LSTMCell(torch.nn.LSTMCell):
    """torch.nn.LSTMCell computed by handgrad.ops.lstm_cell (one fused kernel per step).

    A subclass: same constructor, parameters, state_dict keys and repr.
    """

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is None:
            zeros = torch.zeros(*input.shape[:-1], self.hidden_size, dtype=input.dtype,
                                device=input.device)
            hx = (zeros, zeros)
        else:
            for idx, value in enumerate(hx):
                if value.dim() != input.dim():
                    raise ValueError(
                        f"LSTMCell: Expected hx[{idx}] to be {input.dim()}D like the input, "
                        f"got {value.dim()}D instead")
        return ops.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


_PROJ_REASON = "proj_size > 0 (LSTM with projections) is not supported by handgrad"
_PACKED_REASON = "PackedSequence input is not supported by handgrad; pass a padded tensor"


class LSTM(torch.nn.LSTM):
    """torch.nn.LSTM computed by handgrad.ops.lstm_layer, one call per layer and direction.

    A subclass: same constructor, parameters (weight_ih_l0, weight_hh_l0_reverse,
    ...), state_dict keys and repr, so native weights load unchanged. Supports
    num_layers, bias, batch_first, dropout between layers, bidirectional,
    optional (h_0, c_0) and unbatched input; proj_size > 0 and PackedSequence
    input raise NotImplementedError.
    """

    @classmethod
    def handgrad_unsupported_reason(cls, module):
        if getattr(module, "proj_size", 0) > 0:
            return _PROJ_REASON
        return None

    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence):
            raise NotImplementedError(_PACKED_REASON)
        if self.proj_size > 0:
            raise NotImplementedError(_PROJ_REASON)
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        self._update_flat_weights()
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        directions = 2 if self.bidirectional else 1
        batch = input.size(batch_dim)
        if hx is None:
            zeros = torch.zeros(self.num_layers * directions, batch, self.hidden_size,
                                dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        else:
            want = 3 if is_batched else 2
            if hx[0].dim() != want or hx[1].dim() != want:
                raise RuntimeError(
                    f"For {'batched 3-D' if is_batched else 'unbatched 2-D'} input, hx and cx "
                    f"should also be {want}-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            if not is_batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        # Native's own shape checks (input size, hidden-state shapes), same messages.
        self.check_forward_args(input, hx, None)

        x = input.transpose(0, 1) if self.batch_first else input  # (T, B, I)
        h0, c0 = hx
        weights = self._flat_weights
        per_layer = 4 if self.bias else 2
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                k = layer * directions + direction
                w = weights[k * per_layer:(k + 1) * per_layer]
                b_ih, b_hh = (w[2], w[3]) if self.bias else (None, None)
                out, (h_t, c_t) = ops.lstm_layer(x, h0[k], c0[k], w[0], w[1], b_ih, b_hh,
                                                 direction == 1)
                outputs.append(out)
                h_n.append(h_t)
                c_n.append(c_t)
            x = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = torch.nn.functional.dropout(x, self.dropout, training=True)
        output = x.transpose(0, 1) if self.batch_first else x
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if not is_batched:
            output = output.squeeze(batch_dim)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)
