"""handgrad.nn.LSTM's dropout against native's: between layers only, never
after the last one. (test_lstm.py's dropout test compares handgrad with
itself, so dropout applied after the last layer too survived it.)"""

import copy

import pytest
import torch
from torch import nn

import handgrad


def _copy_module(native):
    mine = copy.deepcopy(native)
    mine.__class__ = handgrad.nn.LSTM
    return mine


def _run(module, x, seed):
    torch.manual_seed(seed)
    out, (h, c) = module(x)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in (out, h, c))
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return [out.detach(), h.detach(), c.detach(), *grads]


# p = 0.3 besides 0.5: F.dropout's default probability is 0.5, so 0.5 alone
# would not notice a dropout called without the module's own p.
@pytest.mark.parametrize("p", [0.3, 0.5])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidirectional", "bidirectional"])
def test_training_mode_dropout_matches_native(bidirectional, p):
    # On the CPU native draws its masks with the same generator calls
    # (one bernoulli per layer boundary, same shape and order), so the
    # outputs and gradients agree to rounding. (On a GPU native's cuDNN
    # LSTM draws its own masks: test_single_layer_dropout_changes_nothing
    # covers every device.)
    torch.manual_seed(0)
    native = nn.LSTM(4, 5, num_layers=3, dropout=p, bidirectional=bidirectional,
                     dtype=torch.float64)
    mine = _copy_module(native)
    native.train(), mine.train()
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    for seed in (3, 4):
        for a, b in zip(_run(mine, x, seed), _run(native, x, seed)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_single_layer_dropout_changes_nothing(device):
    # Dropout acts between layers: with one layer there is none, so training
    # and eval give the same outputs (a mask after the last layer would not).
    with pytest.warns(UserWarning, match="dropout"):
        lstm = handgrad.nn.LSTM(4, 6, num_layers=1, dropout=0.5, device=device,
                                dtype=torch.float64)
    x = torch.randn(7, 2, 4, device=device, dtype=torch.float64)
    lstm.eval()
    ref = lstm(x)
    lstm.train()
    torch.manual_seed(1)
    got = lstm(x)
    torch.testing.assert_close(got[0], ref[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=0, rtol=0)
