"""handgrad.ops.max_pool2d against torch.nn.functional.max_pool2d."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import handgrad
from helpers import LAYOUTS, assert_matches_native, in_layout

# (input shape, kernel_size, stride, padding, dilation, ceil_mode)
CONFIGS = [
    ((2, 3, 8, 8), 2, None, 0, 1, False),
    ((2, 3, 9, 7), 2, 2, 0, 1, False),
    ((2, 3, 9, 7), 2, 2, 0, 1, True),
    ((2, 3, 10, 10), 3, 2, 1, 1, False),
    ((2, 3, 10, 10), 3, 2, 1, 1, True),
    ((1, 2, 11, 13), (3, 2), (2, 1), (1, 0), (2, 1), True),
    ((3, 4, 12, 9), (2, 4), (3, 2), (1, 2), 1, False),
    ((2, 5, 7, 7), 3, 1, 1, 2, False),
    ((2, 2, 5, 5), 5, 1, 2, 1, True),
    ((2, 3, 6, 6), 1, 1, 0, 1, False),
    ((1, 1, 1, 1), 1, None, 0, 1, False),
    ((2, 4, 4, 4), 4, 4, 0, 1, False),
    ((3, 8, 8), 2, None, 0, 1, False),  # unbatched
    ((4, 9, 9), 3, 2, 1, (1, 2), True),  # unbatched
    ((0, 3, 8, 8), 2, None, 0, 1, False),  # empty batch
    ((2, 3, 33, 17), 2, 2, 0, 1, False),
]


def pool(fn, cfg, return_indices=True):
    _, kernel, stride, padding, dilation, ceil = cfg
    return lambda x: fn(x, kernel, stride, padding, dilation, ceil, return_indices)


def distinct_values(shape, dtype, device):
    """Values without ties, so every window has a unique maximum."""
    n = max(1, int(torch.Size(shape).numel()))
    return (torch.randperm(n, dtype=torch.float64) / n).reshape(shape).to(device, dtype)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_native(device, cfg, layout, dtype):
    x = in_layout(torch.randn(cfg[0], dtype=dtype, device=device), layout).requires_grad_()
    (out, idx), _ = assert_matches_native(pool(handgrad.ops.max_pool2d, cfg),
                                          pool(F.max_pool2d, cfg), [x])
    ref_out = F.max_pool2d(x.detach(), *cfg[1:], return_indices=False)
    assert out.stride() == ref_out.stride() or out.numel() <= 1


@pytest.mark.parametrize("cfg", CONFIGS[:8], ids=str)
def test_ties_pick_the_same_index_as_native(device, cfg):
    # Small integers: most windows hold several equal maxima.
    x = torch.randint(0, 3, cfg[0], device=device).float().requires_grad_()
    assert_matches_native(pool(handgrad.ops.max_pool2d, cfg), pool(F.max_pool2d, cfg), [x],
                          exact=True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_and_infinity_propagate_like_native(device, layout):
    x = torch.randn(2, 3, 9, 9, device=device)
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 0:3, 0:3] = float("-inf")
    x[1, 2, 4, 4] = float("inf")
    x[1, 0, 2, 2] = x[1, 0, 2, 3] = float("nan")  # two NaNs in one window
    x = in_layout(x, layout).requires_grad_()
    for cfg in [((), 2, 2, 0, 1, False), ((), 3, 2, 1, 1, True), ((), 3, 1, 1, 1, False)]:
        assert_matches_native(pool(handgrad.ops.max_pool2d, cfg), pool(F.max_pool2d, cfg), [x])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_matches_float64(device, dtype):
    # Overlapping windows, so an input gathers up to four output gradients.
    # handgrad adds them in float32 and rounds once: the result is the exact
    # float64 sum rounded to the dtype (native CPU adds in the dtype itself
    # and can be several ulp off after cancellation, so it is no reference).
    x = torch.randn(2, 3, 10, 10, device=device, dtype=dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    out, idx = handgrad.ops.max_pool2d(x, 3, 2, 1, 1, True, return_indices=True)
    ref, ref_idx = F.max_pool2d(x64, 3, 2, 1, 1, True, return_indices=True)
    assert out.dtype == dtype and torch.equal(out, ref.to(dtype)) and torch.equal(idx, ref_idx)
    upstream = torch.randn(out.shape, device=device).to(dtype)
    (grad,) = torch.autograd.grad(out, x, upstream)
    (ref_grad,) = torch.autograd.grad(ref, x64, upstream.double())
    assert torch.equal(grad, ref_grad.to(dtype))


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0][0] != 0][:10], ids=str)
def test_gradcheck(device, cfg):
    x = distinct_values(cfg[0], torch.float64, device).requires_grad_()
    fn = pool(handgrad.ops.max_pool2d, cfg, return_indices=False)
    assert torch.autograd.gradcheck(fn, (x,))


def test_gradgradcheck(device):
    x = distinct_values((2, 2, 6, 6), torch.float64, device).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: handgrad.ops.max_pool2d(x, 3, 2, 1), (x,))


def test_indices_are_the_only_saved_tensor(device):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, idx = handgrad.ops.max_pool2d(x, 2, return_indices=True)
    assert len(saved) == 1 and saved[0].dtype == torch.int64 and saved[0].shape == idx.shape


def test_backward_only_when_needed(device):
    x = torch.randn(2, 3, 8, 8, device=device)
    out = handgrad.ops.max_pool2d(x, 2)
    assert not out.requires_grad


def _opcheck_cases(device):
    x = torch.randn(2, 3, 9, 9, device=device, requires_grad=True)
    xl = torch.randn(2, 4, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    return [
        (x, [3, 3], [2, 2], [1, 1], [1, 1], True),
        (xl.requires_grad_(), [2, 2], [2, 2], [0, 0], [1, 1], False),
        (torch.randn(3, 7, 7, device=device, dtype=torch.float64, requires_grad=True),
         [2, 3], [1, 2], [1, 1], [1, 1], False),
    ]


def test_opcheck(device):
    for args in _opcheck_cases(device):
        torch.library.opcheck(torch.ops.handgrad.max_pool2d.default, args)
        out, idx = torch.ops.handgrad.max_pool2d(*args)
        back_args = (torch.randn_like(out), idx, list(args[0].shape), *args[1:5])
        torch.library.opcheck(torch.ops.handgrad.max_pool2d_backward.default, back_args)


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(device, dynamic):
    torch._dynamo.reset()

    def step(x):
        y, idx = handgrad.ops.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
        return (y * y).sum(), idx

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for shape in [(2, 3, 11, 11), (3, 3, 13, 12)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        loss, idx = compiled(x)
        (grad,) = torch.autograd.grad(loss, x)
        ref_loss, ref_idx = step(x)
        (ref_grad,) = torch.autograd.grad(ref_loss, x)
        torch.testing.assert_close(loss, ref_loss)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(grad, ref_grad)


def test_module_is_a_drop_in(device):
    ref = torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True, return_indices=True)
    mine = handgrad.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True, return_indices=True)
    assert isinstance(mine, torch.nn.MaxPool2d)
    assert repr(mine) == repr(ref)
    assert mine.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 3, 10, 10, device=device, requires_grad=True)
    assert_matches_native(mine, ref, [x])
    plain = handgrad.nn.MaxPool2d(2)
    assert plain.stride == 2
    torch.testing.assert_close(plain(x), torch.nn.MaxPool2d(2)(x))


def test_tuple_arguments_of_length_one_are_accepted(device):
    x = torch.randn(1, 2, 6, 6, device=device)
    torch.testing.assert_close(handgrad.ops.max_pool2d(x, (2,), (2,)), F.max_pool2d(x, (2,), (2,)))


BAD_INPUTS = [
    # (description, input shape / dtype, kwargs, exception, message pattern)
    ("kernel_size 0", (1, 1, 4, 4), torch.float32, dict(kernel_size=0), RuntimeError,
     "kernel_size must be greater than zero"),
    ("stride 0", (1, 1, 4, 4), torch.float32, dict(kernel_size=2, stride=0), RuntimeError,
     "stride must be greater than zero"),
    ("negative padding", (1, 1, 4, 4), torch.float32, dict(kernel_size=2, padding=-1), RuntimeError,
     "padding must be non-negative"),
    ("dilation 0", (1, 1, 4, 4), torch.float32, dict(kernel_size=2, dilation=0), RuntimeError,
     "dilation must be greater than zero"),
    ("padding above half the kernel", (1, 1, 4, 4), torch.float32, dict(kernel_size=2, padding=2),
     RuntimeError, "padding should be at most half of the effective kernel size"),
    ("output below 1", (1, 1, 2, 2), torch.float32, dict(kernel_size=3), RuntimeError,
     "too small"),
    ("2-D input", (4, 4), torch.float32, dict(kernel_size=2), RuntimeError, "3 or 4-D"),
    ("5-D input", (1, 1, 1, 4, 4), torch.float32, dict(kernel_size=2), RuntimeError, "3 or 4-D"),
    ("integer input", (1, 1, 4, 4), torch.int64, dict(kernel_size=2), TypeError,
     "float32, float64, float16 or bfloat16"),
    ("zero channels", (1, 0, 4, 4), torch.float32, dict(kernel_size=2), RuntimeError,
     "non-zero channel"),
    ("kernel of three values", (1, 1, 4, 4), torch.float32, dict(kernel_size=(2, 2, 2)),
     ValueError, "kernel_size must be an int or a tuple of two ints"),
    ("kernel not an int", (1, 1, 4, 4), torch.float32, dict(kernel_size=2.5), TypeError,
     "kernel_size must be an int"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(case):
    _, shape, dtype, kwargs, exc, pattern = case
    x = torch.zeros(shape, dtype=dtype)
    with pytest.raises(exc, match=pattern):
        handgrad.ops.max_pool2d(x, **kwargs)


def test_backward_rejects_inconsistent_arguments():
    grad = torch.randn(1, 1, 2, 2)
    with pytest.raises(TypeError, match="int64"):
        torch.ops.handgrad.max_pool2d_backward(grad, torch.zeros(1, 1, 2, 2, dtype=torch.int32),
                                               [1, 1, 4, 4], [2, 2], [2, 2], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.handgrad.max_pool2d_backward(grad, torch.zeros(1, 1, 3, 2, dtype=torch.long),
                                               [1, 1, 4, 4], [2, 2], [2, 2], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.handgrad.max_pool2d_backward(grad, torch.full((1, 1, 2, 2), 99, dtype=torch.long),
                                               [1, 1, 4, 4], [2, 2], [2, 2], [0, 0], [1, 1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is usable here")
def test_mixed_devices_raise():
    grad = torch.randn(1, 1, 2, 2, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.handgrad.max_pool2d_backward(grad, torch.zeros(1, 1, 2, 2, dtype=torch.long),
                                               [1, 1, 4, 4], [2, 2], [2, 2], [0, 0], [1, 1])
