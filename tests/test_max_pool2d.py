"""handgrad.ops.max_pool2d against torch.nn.functional.max_pool2d."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import handgrad
from helpers import LAYOUTS, assert_matches_native, in_layout


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")  # float32, not dtype0


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dtype_id)
def test_matches_native(device, cfg, layout, dtype):
    x = in_layout(torch.randn(cfg[0], dtype=dtype, device=device), layout).requires_grad_()
    (out, idx), _ = assert_matches_native(pool(handgrad.ops.max_pool2d, cfg),
                                          pool(F.max_pool2d, cfg), [x])
    ref_out = F.max_pool2d(x.detach(), *cfg[1:], return_indices=False)
    assert out.stride() == ref_out.stride() or out.numel() <= 1


# The CPU channels_last backward gives each task a block of 64 channels (the
# last block partial); the CUDA kernels cover channels with their thread grid.
# Channel counts on both sides of each block boundary, overlapping windows
# (stride < kernel) so that gradients add up.
@pytest.mark.parametrize("channels", [63, 64, 65, 127, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_channels_last_backward_at_channel_block_boundaries(device, channels, dtype):
    torch.manual_seed(channels)  # float32 is compared exactly: fixed values
    x = torch.randn(2, channels, 7, 6, device=device).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, channels, 4, 3, device=device).to(dtype)
    out, idx = handgrad.ops.max_pool2d(x, 3, 2, 1, return_indices=True)
    (dx,) = torch.autograd.grad(out, x, grad)
    # Reference in float32 from the same values: handgrad accumulates each
    # input's gradient in float32 and rounds once, so bfloat16 must be that
    # sum rounded (native bfloat16 rounds after every addition instead).
    x32 = x.detach().float().requires_grad_()
    ref, ref_idx = F.max_pool2d(x32, 3, 2, 1, return_indices=True)
    (ref_dx,) = torch.autograd.grad(ref, x32, grad.float())
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(out, ref.to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(dx, ref_dx.to(dtype), atol=0, rtol=0)
    assert dx.is_contiguous(memory_format=torch.channels_last)


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
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
        # ceil mode where the last window would start in the right padding
        # (5 + 2 - 2 = 5 -> ceil(5 / 2) + 1 = 4 windows, the 4th dropped), so a
        # fake kernel without that correction gives the wrong shape
        (torch.randn(1, 2, 5, 7, device=device, requires_grad=True), [2, 2], [2, 2], [1, 1],
         [1, 1], True),
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


def test_torch_compile_ceil_mode_correction(device):
    # Sizes where ceil mode's last window would start in the right padding
    # (5, 7 with kernel 2, stride 2, padding 1), so the fake kernel's output
    # shape must drop it as the real kernel does.
    torch._dynamo.reset()

    def step(x):
        out, idx = handgrad.ops.max_pool2d(x, 2, 2, 1, ceil_mode=True, return_indices=True)
        # ops after the pool, sized by the fake kernel in the compiled graph
        return (out * 2).flatten(1).sum(1), idx + 1

    # inductor's on-disk graph cache does not key on the fake kernel: a
    # graph compiled with a different fake kernel must not be reused here
    caches_off = (torch._inductor.config.patch(fx_graph_cache=False),
                  torch._functorch.config.patch(enable_autograd_cache=False))
    with caches_off[0], caches_off[1]:
        compiled = torch.compile(step, fullgraph=True, dynamic=True)
        results = [(x, *compiled(x)) for x in
                   (torch.randn(shape, device=device) for shape in [(1, 2, 5, 5), (2, 3, 7, 7),
                                                                    (1, 1, 9, 7), (1, 2, 8, 6)])]
    for x, total, idx in results:
        ref, ref_idx = F.max_pool2d(x, 2, 2, 1, ceil_mode=True, return_indices=True)
        assert idx.shape == ref_idx.shape and torch.equal(idx, ref_idx + 1)
        torch.testing.assert_close(total, (ref * 2).flatten(1).sum(1))


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


def test_module_passes_every_argument(device):
    # dilation and ceil_mode changed from their defaults, so a module that
    # dropped any of them would give another output shape or other values
    kw = dict(stride=(2, 1), padding=(1, 2), dilation=(2, 3), ceil_mode=True, return_indices=True)
    ref, mine = torch.nn.MaxPool2d((3, 4), **kw), handgrad.nn.MaxPool2d((3, 4), **kw)
    x = torch.randn(2, 3, 11, 13, device=device, requires_grad=True)
    assert_matches_native(mine, ref, [x])


# The fake kernel's output size against native's for every ceil-mode
# situation: without torch.compile (whose tests mutation testing cannot run),
# directly under FakeTensorMode.
@pytest.mark.parametrize("size", range(1, 12))
def test_fake_kernel_output_size_matches_native(size):
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [(k, s, p, d, ceil) for k in (1, 2, 3) for s in (1, 2, 3) for d in (1, 2)
             for p in range(0, k // 2 + 1) for ceil in (False, True)
             if d * (k - 1) + 1 <= size + 2 * p]
    x = torch.randn(1, 2, size, size + 1)
    with FakeTensorMode() as mode:
        fake_x = mode.from_tensor(x)
        fake = [handgrad.ops.max_pool2d(fake_x, k, s, p, d, ceil).shape for k, s, p, d, ceil in cases]
    for case, shape in zip(cases, fake):
        assert shape == F.max_pool2d(x, *case).shape, case


def test_forward_and_double_backward_of_unbatched_input_match_native():
    # Both gather the tangent at the argmax of each plane (..., H, W): a 3-D
    # input checks that the planes are the last two dimensions.
    x, t = torch.randn(3, 7, 6, dtype=torch.float64), torch.randn(3, 7, 6, dtype=torch.float64)
    mine, ref = (lambda x: handgrad.ops.max_pool2d(x, 3, 2, 1)), (lambda x: F.max_pool2d(x, 3, 2, 1))
    torch.testing.assert_close(torch.func.jvp(mine, (x,), (t,)), torch.func.jvp(ref, (x,), (t,)))
    for fn in (mine, ref):
        xr = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(xr).square().sum(), xr, create_graph=True)
        (gg,) = torch.autograd.grad((g * t).sum(), xr)
        if fn is mine:
            mine_gg = gg
    torch.testing.assert_close(mine_gg, gg)


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


# ---------------------------------------------------------------------------
# Windows that cover only padding (possible with dilation, and in ceil mode):
# native gives -inf and the index of the first tap past the padding's start;
# handgrad does the same in both layouts, and its backward sends such a
# window's gradient nowhere (native's own backward aborts on it).

def _empty_windows(size, out, kernel, stride, pad, dilation):
    """Per output position of one axis: whether its window reads no input."""
    return torch.tensor([all(not 0 <= o * stride - pad + t * dilation < size for t in range(kernel))
                         for o in range(out)])


EMPTY_WINDOW_CASES = [
    # (input shape, kernel, stride, padding, dilation, ceil_mode)
    ((4, 64, 2, 2), 2, 1, 1, 3, True),            # issue 16, item 2: every window empty
    ((2, 5, 2, 7), (2, 3), (1, 2), (1, 1), (3, 2), True),
    # Padding above half the kernel (but within half the dilated span) is
    # refused by native, accepted by handgrad: then only some windows are
    # empty (the middle row here), and the reference is the definition.
    ((2, 3, 3, 6), 2, 1, (2, 1), (4, 3), False),
]


@pytest.mark.parametrize("case", EMPTY_WINDOW_CASES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_windows_of_only_padding(device, case, layout):
    shape, kernel, stride, padding, dilation, ceil = case
    k, s, p, d = (v if isinstance(v, tuple) else (v, v) for v in (kernel, stride, padding, dilation))
    x = in_layout(torch.randn(shape, device=device), layout).requires_grad_()
    out, idx = handgrad.ops.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    ref, ref_idx = reference_max_pool2d(x.detach(), k, s, p, d, ceil)
    empty = (_empty_windows(shape[2], out.shape[2], k[0], s[0], p[0], d[0])[:, None]
             | _empty_windows(shape[3], out.shape[3], k[1], s[1], p[1], d[1])[None, :])
    assert bool(empty.any())
    assert torch.equal(out, ref) and bool((out[..., empty] == float("-inf")).all())
    assert torch.equal(idx[..., ~empty], ref_idx[..., ~empty])
    if all(pi <= ki // 2 for pi, ki in zip(p, k)):  # native accepts it: the same indices
        native_out, native_idx = F.max_pool2d(x.detach(), k, s, p, d, ceil, return_indices=True)
        assert torch.equal(out, native_out) and torch.equal(idx, native_idx)
    upstream = torch.randn(out.shape, device=device)
    (grad,) = torch.autograd.grad(out, x, upstream)
    # By definition: each non-empty window's gradient goes to its argmax.
    expected = torch.zeros(shape[0], shape[1], shape[2] * shape[3], device=device)
    keep = (~empty).expand_as(upstream).reshape(shape[0], shape[1], -1)
    expected.scatter_add_(2, ref_idx.reshape(shape[0], shape[1], -1) * keep,
                          (upstream * (~empty)).reshape(shape[0], shape[1], -1))
    assert torch.equal(grad, expected.view(shape))


# ---------------------------------------------------------------------------
# Huge windows: sizes at the limits of int32 and int64 (native converts every
# argument to int and refuses these; the sizes here are exact in int64).

def reference_max_pool2d(x, kernel, stride, padding, dilation, ceil_mode):
    """max_pool2d by definition (Python ints), for small outputs: values and indices."""
    n, c, in_h, in_w = x.shape

    def size(length, k, s, p, d):
        span = d * (k - 1) + 1
        room = length + 2 * p - span
        out = (-(-room // s) if ceil_mode else room // s) + 1
        if ceil_mode and (out - 1) * s >= length + p:
            out -= 1
        return out

    def taps(o, length, k, s, p, d):  # positions o * s - p + t * d inside, t < k
        start = o * s - p
        first, last = max(0, -(start // d)), min(k - 1, (length - 1 - start) // d)
        return [start + t * d for t in range(first, last + 1)]

    oh, ow = (size(in_h, kernel[0], stride[0], padding[0], dilation[0]),
              size(in_w, kernel[1], stride[1], padding[1], dilation[1]))
    out = torch.empty(n, c, oh, ow, dtype=x.dtype)
    idx = torch.empty(n, c, oh, ow, dtype=torch.long)
    flat = x.reshape(n, c, -1)
    for i in range(oh):
        rows = taps(i, in_h, kernel[0], stride[0], padding[0], dilation[0])
        for j in range(ow):
            cols = taps(j, in_w, kernel[1], stride[1], padding[1], dilation[1])
            positions = [r * in_w + q for r in rows for q in cols]
            if not positions:
                out[:, :, i, j] = float("-inf")
                continue
            values = flat[:, :, positions]
            first_nan = torch.isnan(values).int().argmax(-1)
            pick = torch.where(torch.isnan(values).any(-1), first_nan, values.argmax(-1))
            out[:, :, i, j] = values.gather(-1, pick[..., None])[..., 0]
            idx[:, :, i, j] = torch.tensor(positions)[pick]
    return out, idx


HUGE_WINDOWS = [
    # (kernel, stride, padding, dilation, ceil_mode), for a (2, 3, 9, 8) input
    ((3, 3), (1, 1), (2**31, 2**31), (2**31, 2**31), False),  # only the centre tap reads input
    ((2, 2), (1, 1), (2**30, 2**30), (2**31, 2**31), False),  # every window only padding
    ((3, 2), (1, 1), (2**32, 1), (2**32, 1), True),
    ((2, 2), (2**62, 2**63 - 1), (0, 0), (1, 1), True),
    ((2, 2), (2**31, 2**32), (1, 1), (1, 1), False),
    ((2**31, 3), (1, 1), (2**30, 1), (1, 1), False),          # a window wider than int32
    ((2, 2), (3, 2), (0, 2**61 - 4), (1, 2**62 - 1), False),  # padded width and span 2^62
    ((1, 2), (1, 1), (0, 0), (2**63 - 1, 1), True),           # one tap: any dilation
    ((3, 2), (2**63 - 1, 1), (1, 0), (2, 1), True),           # backward's window range, stride 2^63 - 1
]


@pytest.mark.parametrize("window", HUGE_WINDOWS, ids=str)
def test_huge_windows_match_the_definition(device, window):
    kernel, stride, padding, dilation, ceil = window
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, device=device)
    x[0, 0, 4, 4] = float("nan")
    out, idx = torch.ops.handgrad.max_pool2d(x, kernel, stride, padding, dilation, ceil)
    ref, ref_idx = reference_max_pool2d(x, kernel, stride, padding, dilation, ceil)
    assert out.shape == ref.shape
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    reads = ref != float("-inf")
    assert torch.equal(idx[reads], ref_idx[reads])
    upstream = torch.randn(out.shape, dtype=torch.float64, device=device)
    grad = torch.ops.handgrad.max_pool2d_backward(upstream, idx, list(x.shape), kernel, stride,
                                                  padding, dilation)
    expected = torch.zeros(2, 3, 72, dtype=torch.float64)
    expected.scatter_add_(2, (ref_idx * reads).view(2, 3, -1), (upstream * reads).view(2, 3, -1))
    assert torch.equal(grad, expected.view(x.shape))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(kernel_size=2, dilation=2**62), "window span .* must be at most 2\\^62"),
    (dict(kernel_size=3, dilation=2**61), "window span .* must be at most 2\\^62"),
    (dict(kernel_size=2**63 - 1), "window span .* must be at most 2\\^62"),
    (dict(kernel_size=(2**62, 1), padding=(2**61, 0)), "padded input .* must be at most 2\\^62"),
    (dict(kernel_size=(2, 2**31), dilation=(1, 2**31)), "too small"),
], ids=str)
def test_windows_beyond_the_limits_raise(device, kwargs, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        handgrad.ops.max_pool2d(torch.randn(1, 2, 9, 9, device=device), **kwargs)


# ---------------------------------------------------------------------------
# Property-based comparison with native over random geometries, layouts,
# dtypes and special values (hypothesis; derandomized, so CI runs the same
# examples within a fixed budget).

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

POOL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def pool_cases(draw):
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    # at most half the kernel: native refuses more (handgrad accepts up to
    # half the dilated span; test_windows_of_only_padding covers that)
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    ceil = draw(st.booleans())
    sizes = []
    for k, d, p in zip(kernel, dilation, padding):
        smallest = max(1, d * (k - 1) + 1 - 2 * p)
        sizes.append(draw(st.integers(smallest, smallest + 7)))
    batch = draw(st.sampled_from([None, 0, 1, 2, 3]))  # None: unbatched
    channels = draw(st.integers(1, 5))
    shape = (channels, *sizes) if batch is None else (batch, channels, *sizes)
    return dict(shape=shape, kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                ceil=ceil, layout=draw(st.sampled_from(LAYOUTS)),
                dtype=draw(st.sampled_from(POOL_DTYPES)),
                values=draw(st.sampled_from(["normal", "ties", "special"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def _pool_input(case, device):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = case["shape"]
    if case["values"] == "ties":
        x = torch.randint(0, 3, shape, generator=gen).double()
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if case["values"] == "special" and x.numel():
        flat = x.view(-1)
        picks = torch.randint(0, flat.numel(), (3,), generator=gen)
        for pick, value in zip(picks, (float("nan"), float("inf"), float("-inf"))):
            flat[pick] = value
    return in_layout(x.to(case["dtype"]).to(device), case["layout"])


def _check_pool_case(case, device):
    x = _pool_input(case, device)
    args = (case["kernel"], case["stride"], case["padding"], case["dilation"], case["ceil"])
    try:
        ref, ref_idx = F.max_pool2d(x, *args, return_indices=True)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            handgrad.ops.max_pool2d(x, *args, return_indices=True)
        return
    leaf = x.detach().requires_grad_()
    out, idx = handgrad.ops.max_pool2d(leaf, *args, return_indices=True)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert out.stride() == ref.stride() or out.numel() <= 1
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())
    assert torch.equal(idx, ref_idx)
    if out.numel() == 0:
        return
    # The gradient by definition: each window that reads input sends its
    # upstream gradient to its argmax (summed in float64, rounded once).
    batched = x.dim() == 4
    shape4 = x.shape if batched else (1, *x.shape)
    out4 = out if batched else out.unsqueeze(0)
    k, s, p, d = (case[key] for key in ("kernel", "stride", "padding", "dilation"))
    empty = (_empty_windows(shape4[2], out4.shape[2], k[0], s[0], p[0], d[0])[:, None]
             | _empty_windows(shape4[3], out4.shape[3], k[1], s[1], p[1], d[1])[None, :])
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    upstream = torch.randn(out.shape, generator=gen).to(x.dtype)
    (grad,) = torch.autograd.grad(out, leaf, upstream.to(device))
    reads = (~empty).to(torch.float64)
    up64 = upstream.double().reshape(out4.shape) * reads
    expected = torch.zeros(shape4[0], shape4[1], shape4[2] * shape4[3], dtype=torch.float64)
    index = (ref_idx.reshape(out4.shape) * (~empty)).reshape(shape4[0], shape4[1], -1)
    expected.scatter_add_(2, index.cpu(), up64.reshape(shape4[0], shape4[1], -1))
    magnitude = torch.zeros_like(expected).scatter_add_(2, index.cpu(),
                                                        up64.abs().reshape(shape4[0], shape4[1], -1))
    expected, magnitude = expected.view(x.shape), magnitude.view(x.shape)
    # float32 sums of at most kernel_h * kernel_w terms, rounded once to the dtype.
    eps = torch.finfo(x.dtype).eps
    tol = eps * expected.abs() + k[0] * k[1] * torch.finfo(torch.float32).eps * magnitude
    assert bool(((grad.double().cpu() - expected).abs() <= tol).all())


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=pool_cases())
def test_property_matches_native(device, case):
    _check_pool_case(case, device)
