"""handgrad's LSTM cell and layer against native PyTorch.

    python benchmarks/bench_lstm.py [--threads 2] [--device cuda]

Targets (CPU, float32, forward+backward):
  * cell (torch.lstm_cell, the math of nn.LSTMCell) at (batch 64, input 28, hidden 128) and
    (batch 128, input 256, hidden 512): at least 1.5x native;
  * layer (torch.nn.LSTM), sequence 28, batch 128, input 28, hidden 128, 1 and 2 layers: at
    least as fast as native.
The packed case feeds both modules the same PackedSequence (batch 64, lengths drawn
uniformly in 5..100 from a fixed seed, not sorted: enforce_sorted=False; 2 bidirectional
layers, input 28, hidden 128): native's packed oneDNN/ATen path against handgrad's kernel,
which computes only each sequence's own steps.
The cell's upstream gradient reaches hy only (cy feeds it); the layer's reaches the output
sequence. Every weight, bias and state requires grad; the layer's input sequence does not
(it is data, as in the LSTM-on-MNIST model). Both layer variants share the same parameter
tensors. Native nn.LSTM on the CPU is oneDNN's fused RNN (AVX-512 where available), and
torch.lstm_cell is an autograd graph of BLAS products and pointwise ops.

On a shared 2-core machine, --threads 2 runs are dominated by the other processes (a
descheduled thread stalls every per-step barrier); --threads 1 gives stable ratios.
"""

import copy
import sys

import torch

import harness
import handgrad


def make_cases(device):
    def cell(batch, input_size, hidden, target=None, dtype=torch.float32):
        def make_inputs():
            ref = torch.nn.LSTMCell(input_size, hidden, device=device, dtype=dtype)
            x = torch.randn(batch, input_size, device=device, dtype=dtype)
            h = torch.randn(batch, hidden, device=device, dtype=dtype)
            c = torch.randn(batch, hidden, device=device, dtype=dtype)
            params = [p.detach().clone() for p in ref.parameters()]
            return [t.requires_grad_() for t in [x, h, c] + params]

        return harness.Case(
            name="cell B%d I%d H%d" % (batch, input_size, hidden), make_inputs=make_inputs,
            target=target,
            handgrad=lambda x, h, c, *w: handgrad.ops.lstm_cell(x, (h, c), *w),
            native=lambda x, h, c, *w: torch.lstm_cell(x, (h, c), *w))

    def layer(seq, batch, input_size, hidden, layers, target=None, bidirectional=False):
        modules = {}

        def make_inputs():
            ref = torch.nn.LSTM(input_size, hidden, num_layers=layers, batch_first=True,
                                bidirectional=bidirectional, device=device)
            mine = copy.copy(ref)  # shares the parameter objects with ref
            mine.__class__ = handgrad.nn.LSTM
            modules.update(native=ref, handgrad=mine)
            x = torch.randn(batch, seq, input_size, device=device)
            return [x] + list(ref.parameters())

        return harness.Case(
            name="layer T%d B%d I%d H%d L%d%s" % (seq, batch, input_size, hidden, layers,
                                                  " bidir" if bidirectional else ""),
            make_inputs=make_inputs, target=target,
            handgrad=lambda x, *_: modules["handgrad"](x)[0],
            native=lambda x, *_: modules["native"](x)[0])

    def packed_layer(batch, min_len, max_len, input_size, hidden, layers, bidirectional):
        modules, packing = {}, {}

        def make_inputs():
            ref = torch.nn.LSTM(input_size, hidden, num_layers=layers,
                                bidirectional=bidirectional, device=device)
            mine = copy.copy(ref)  # shares the parameter objects with ref
            mine.__class__ = handgrad.nn.LSTM
            modules.update(native=ref, handgrad=mine)
            gen = torch.Generator().manual_seed(0)
            lengths = torch.randint(min_len, max_len + 1, (batch,), generator=gen)
            seqs = [torch.randn(int(n), input_size, device=device) for n in lengths]
            packed = torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
            packing.update(batch_sizes=packed.batch_sizes, sorted_indices=packed.sorted_indices,
                           unsorted_indices=packed.unsorted_indices)
            return [packed.data] + list(ref.parameters())

        def run(which):
            def fn(data, *_):
                seq = torch.nn.utils.rnn.PackedSequence(data, **packing)
                return modules[which](seq)[0].data
            return fn

        return harness.Case(
            name="packed B%d len%d-%d I%d H%d L%d%s" % (batch, min_len, max_len, input_size,
                                                       hidden, layers,
                                                       " bidir" if bidirectional else ""),
            make_inputs=make_inputs, handgrad=run("handgrad"), native=run("native"))

    return [
        cell(64, 28, 128, target=1.5),
        cell(128, 256, 512, target=1.5),
        layer(28, 128, 28, 128, 1, target=1.0),
        layer(28, 128, 28, 128, 2, target=1.0),
        layer(28, 128, 28, 128, 2, bidirectional=True),
        packed_layer(64, 5, 100, 28, 128, 2, bidirectional=True),
    ]


if __name__ == "__main__":
    sys.exit(harness.main("lstm", make_cases))
