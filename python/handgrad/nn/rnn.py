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


class LSTM(torch.nn.LSTM):
    """torch.nn.LSTM computed by handgrad.ops.lstm_layer, one call per layer and direction.

    A subclass: same constructor, parameters (weight_ih_l0, weight_hh_l0_reverse,
    weight_hr_l0, ...), state_dict keys and repr, so native weights load
    unchanged. Supports everything native does: num_layers, bias,
    batch_first, dropout between layers, bidirectional, proj_size, optional
    (h_0, c_0), unbatched input and PackedSequence input (sorted or not; the
    kernel computes only each sequence's own steps).
    """

    def forward(self, input, hx=None):
        self._update_flat_weights()
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        batch = input.size(batch_dim)
        if hx is None:
            hx = self._zero_state(input, batch)
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
        x, h_n, c_n = self._layers(x, hx, None)
        output = x.transpose(0, 1) if self.batch_first else x
        if not is_batched:
            output = output.squeeze(batch_dim)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _forward_packed(self, packed, hx):
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        if hx is None:
            hx = self._zero_state(data, int(batch_sizes[0]))
        else:
            # As native: the given states follow the caller's batch order.
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(data, hx, batch_sizes)
        x, h_n, c_n = self._layers(data, hx, batch_sizes.tolist())
        output = PackedSequence(x, batch_sizes, sorted_indices, unsorted_indices)
        return output, self.permute_hidden((h_n, c_n), unsorted_indices)

    def _zero_state(self, like, batch):
        directions = 2 if self.bidirectional else 1
        state = self.proj_size if self.proj_size > 0 else self.hidden_size
        h = torch.zeros(self.num_layers * directions, batch, state, dtype=like.dtype,
                        device=like.device)
        c = torch.zeros(self.num_layers * directions, batch, self.hidden_size, dtype=like.dtype,
                        device=like.device)
        return h, c

    def _layers(self, x, hx, batch_sizes):
        """Every layer and direction over x ((T, B, I) or packed (N, I))."""
        directions = 2 if self.bidirectional else 1
        h0, c0 = hx
        weights = self._flat_weights
        proj = self.proj_size > 0
        # Per layer and direction, in native's order: w_ih, w_hh[, b_ih, b_hh][, w_hr].
        per_layer = 2 + (2 if self.bias else 0) + (1 if proj else 0)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                k = layer * directions + direction
                w = weights[k * per_layer:(k + 1) * per_layer]
                b_ih, b_hh = (w[2], w[3]) if self.bias else (None, None)
                out, (h_t, c_t) = ops.lstm_layer(x, h0[k], c0[k], w[0], w[1], b_ih, b_hh,
                                                 direction == 1, w[-1] if proj else None,
                                                 batch_sizes)
                outputs.append(out)
                h_n.append(h_t)
                c_n.append(c_t)
            x = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = torch.nn.functional.dropout(x, self.dropout, training=True)
        return x, torch.stack(h_n), torch.stack(c_n)
