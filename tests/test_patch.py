"""handgrad.patch on models built from torch.nn layers."""

import copy
import warnings

import pytest
import torch
from torch import nn

import handgrad


class Mixed(nn.Module):
    """Every layer kind handgrad replaces, next to layers it leaves alone."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.cell = nn.LSTMCell(16, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 5)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x, y):
        h = self.pool(torch.relu(self.bn(self.conv(x))))  # (N, 8, 4, 4)
        seq = h.flatten(2).transpose(1, 2)  # (N, 16, 8)
        out, _ = self.lstm(seq)
        a, _ = self.attn(out, out, out, need_weights=False)
        hx, _ = self.cell(a[:, -1])
        return self.loss(self.head(hx), y)


def test_patch_swaps_every_supported_module_and_keeps_parameters():
    torch.manual_seed(0)
    model = Mixed()
    params = {n: p for n, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    patched = handgrad.patch(model)
    assert patched is model
    for name in ("conv", "pool", "lstm", "cell", "attn", "loss"):
        module = getattr(model, name)
        assert type(module).__module__.startswith("handgrad.nn"), name
        assert isinstance(module, type(getattr(Mixed(), name)))
    assert type(model.bn) is nn.BatchNorm2d and type(model.head) is nn.Linear
    for n, p in model.named_parameters():
        assert p is params[n]
    assert model.state_dict().keys() == state.keys()
    assert model.handgrad_patch_report == []


def test_patched_model_matches_the_unpatched_one():
    torch.manual_seed(0)
    native = Mixed().eval()
    mine = handgrad.patch(copy.deepcopy(native))
    x = torch.randn(3, 3, 8, 8)
    y = torch.tensor([0, 3, 4])
    losses, grads = [], []
    for model in (native, mine):
        loss = model(x, y)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)


def test_unsupported_configurations_stay_native_and_are_reported(monkeypatch):
    # No drop-in refuses a configuration any more (LSTM's proj_size and
    # PackedSequence were the last); the mechanism, with a reason of our own.
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.LSTM(4, 4, proj_size=2), nn.MaxPool2d(2))
    handgrad.patch(copy.deepcopy(model), strict=True)
    monkeypatch.setattr(handgrad.nn.LSTM, "handgrad_unsupported_reason",
                        classmethod(lambda cls, m: "proj_size %d refused" % m.proj_size),
                        raising=False)
    with pytest.warns(UserWarning, match=r"left 1 module\(s\) native"):
        handgrad.patch(model)
    assert type(model[1]) is nn.LSTM
    assert type(model[0]).__module__.startswith("handgrad.nn")
    (name, cls, reason), = model.handgrad_patch_report
    assert name == "1" and cls == "LSTM" and reason == "proj_size 2 refused"
    with pytest.raises(ValueError, match="proj_size"):
        handgrad.patch(nn.Sequential(nn.LSTM(4, 4, proj_size=2)), strict=True)


def test_subclasses_with_their_own_forward_are_left_alone():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyConv(1, 1, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handgrad.patch(model)
    assert type(model[0]) is MyConv


def test_unpatch_restores_native_classes():
    model = handgrad.patch(nn.Sequential(nn.Conv2d(1, 1, 3), nn.MaxPool2d(2)))
    handgrad.unpatch(model)
    assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.MaxPool2d


def test_patched_model_on_each_device_matches_native(device):
    """handgrad.patch on a model living on the device: the CPU, the CUDA kernels
    (emulated on the CPU, or a GPU where one is usable)."""
    torch.manual_seed(0)
    native = Mixed().eval().to(device)
    mine = handgrad.patch(copy.deepcopy(native))
    x = torch.randn(2, 3, 8, 8, device=device)
    y = torch.tensor([0, 3], device=device)
    losses = []
    for model in (native, mine):
        loss = model(x, y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (n, p), q in zip(native.named_parameters(), mine.parameters()):
        assert q.device == p.device
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=n)
