"""handgrad.ops.conv2d and handgrad.nn.Conv2d against torch.nn.functional.conv2d."""


import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import handgrad
from helpers import (LAYOUTS, assert_matches_native, assert_script_prints_ok, in_layout,
                     runs_cuda_kernels)

# Native conv2d warns that 'same' with an even kernel copies the input; that
# is native's own warning about its implementation, not about handgrad.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

# (input shape, weight shape, stride, padding, dilation, groups, bias)
CONFIGS = [
    ((2, 3, 9, 9), (6, 3, 3, 3), 1, 0, 1, 1, True),
    ((2, 3, 10, 8), (4, 3, 5, 3), (2, 1), (2, 1), 1, 1, True),         # non-square kernel
    ((2, 4, 11, 13), (8, 2, 3, 2), (2, 3), (1, 2), (2, 1), 2, False),  # groups, mixed pairs
    ((2, 6, 7, 7), (6, 1, 3, 3), 1, 1, 1, 6, True),                    # depthwise
    ((2, 6, 8, 7), (12, 1, 3, 3), 2, 1, 1, 6, False),                  # depthwise, multiplier 2
    ((1, 3, 8, 8), (5, 3, 4, 4), 1, "same", 1, 1, True),               # 'same', asymmetric pads
    ((2, 2, 9, 8), (3, 2, 2, 3), 1, "same", (2, 1), 1, True),
    ((2, 3, 6, 6), (4, 3, 3, 3), 1, "valid", 1, 1, True),
    ((2, 3, 5, 5), (4, 3, 5, 5), 1, 0, 1, 1, True),                    # kernel = input: 1x1 out
    ((2, 3, 4, 5), (4, 3, 1, 1), 1, 0, 1, 1, True),                    # 1x1 kernel
    ((2, 3, 5, 5), (4, 3, 3, 3), 1, 4, 1, 1, True),                    # padding beyond the kernel
    ((2, 3, 11, 11), (4, 3, 2, 2), 3, 0, 1, 1, True),                  # stride above kernel
    ((3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, True),                       # unbatched
    ((0, 3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, True),                    # empty batch
    # channel counts that take the im2col + matrix-product path on the CPU
    ((2, 64, 6, 6), (64, 64, 3, 3), 1, 1, 1, 1, True),                 # (Winograd with AVX-512)
    ((3, 40, 7, 9), (64, 40, 3, 3), 2, 1, 2, 1, True),
    ((2, 96, 5, 5), (64, 48, 3, 3), 1, 2, 1, 2, False),
    ((2, 64, 5, 5), (48, 64, 3, 3), 3, 4, 1, 1, True),
    ((1, 32, 4, 4), (40, 32, 3, 3), 1, "same", 1, 1, True),
    ((9, 16, 4, 4), (64, 16, 2, 2), 1, 0, 1, 1, True),                 # several images per chunk
    ((2, 40, 9, 8), (64, 40, 3, 3), (2, 1), 1, (2, 1), 1, True),       # col2im by rows: h stride/dilation
    ((2, 32, 5, 6), (40, 32, 4, 4), 1, "same", 1, 1, True),            # col2im by rows: uneven padding
    # 3x3, stride 1, >= 64 channels (128 without AVX-512): the Winograd F(2x2, 3x3) path on the CPU
    ((5, 64, 9, 7), (64, 64, 3, 3), 1, 1, 1, 1, True),                 # 100 tiles: 6 x 16 + 4
    ((4, 64, 6, 5), (96, 64, 3, 3), 1, 0, 1, 1, False),                # no padding
    ((2, 128, 5, 4), (128, 128, 3, 3), 1, 1, 1, 1, True),              # odd sizes: partial tiles
    ((3, 128, 4, 6), (160, 128, 3, 3), 1, (2, 0), 1, 1, False),        # uneven padding
]


def conv_fn(fn, cfg):
    _, _, stride, padding, dilation, groups, _ = cfg
    return lambda x, w, b=None: fn(x, w, b, stride, padding, dilation, groups)


def make_inputs(cfg, dtype, device, layout="contiguous"):
    x_shape, w_shape, *_, bias = cfg
    fan_in = w_shape[1] * w_shape[2] * w_shape[3]
    x = in_layout(torch.randn(x_shape, dtype=dtype, device=device), layout).requires_grad_()
    w = (torch.randn(w_shape, dtype=dtype, device=device) / fan_in ** 0.5).requires_grad_()
    b = torch.randn(w_shape[0], dtype=dtype, device=device).requires_grad_() if bias else None
    return [x, w] + ([b] if bias else [])


# float32: the kernels sum the products in another order than native (blocked
# vector accumulators, BLAS tiles), so float32 results differ by rounding that
# grows with the number of summed terms (up to ~10^4 here for the weight
# gradient); float64 uses the default (tight) tolerances.
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict()}


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_native(device, cfg, layout, dtype):
    inputs = make_inputs(cfg, dtype, device, layout)
    (out,), _ = assert_matches_native(conv_fn(handgrad.ops.conv2d, cfg), conv_fn(F.conv2d, cfg),
                                      inputs, **TOLERANCES[dtype])
    ref = conv_fn(F.conv2d, cfg)(*[t.detach() for t in inputs])
    assert out.shape == ref.shape
    assert out.stride() == ref.stride() or out.numel() <= 1


def test_channels_last_weight_gives_channels_last_output(device):
    cfg = CONFIGS[0]
    x, w, b = make_inputs(cfg, torch.float32, device)
    w = w.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    (out,), _ = assert_matches_native(conv_fn(handgrad.ops.conv2d, cfg), conv_fn(F.conv2d, cfg),
                                      [x, w, b], **TOLERANCES[torch.float32])
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0][0] != 0], ids=str)
def test_gradcheck(device, cfg):
    inputs = make_inputs(cfg, torch.float64, device)
    # A numerical Jacobian costs two forward passes per element; the large
    # channel counts are checked by test_gradcheck_large_channel_paths.
    if max(t.numel() for t in inputs) > 1500:
        pytest.skip("covered by the native comparison; too large for a numerical Jacobian")
    assert torch.autograd.gradcheck(conv_fn(handgrad.ops.conv2d, cfg), tuple(inputs))


@pytest.mark.parametrize("cfg", [
    ((2, 16, 4, 4), (32, 16, 2, 2), 1, 1, 1, 1, True),  # the smallest im2col + matrix-product cases
    ((1, 32, 3, 3), (32, 32, 2, 2), 2, 1, (2, 1), 1, False),
    ((2, 64, 3, 3), (64, 32, 1, 2), 1, (0, 1), 1, 2, True),
    ((1, 128, 3, 4), (128, 128, 3, 3), 1, 1, 1, 1, True),  # Winograd F(2x2, 3x3)
], ids=str)
def test_gradcheck_large_channel_paths(device, cfg):
    # Thousands of weights: fast mode checks random projections of the
    # Jacobian (vector-Jacobian products against finite differences) instead
    # of every column.
    inputs = make_inputs(cfg, torch.float64, device)
    assert torch.autograd.gradcheck(conv_fn(handgrad.ops.conv2d, cfg), tuple(inputs),
                                    fast_mode=True)


@pytest.mark.parametrize("cfg", [CONFIGS[2], CONFIGS[5]], ids=str)
def test_gradgradcheck(device, cfg):
    inputs = make_inputs(cfg, torch.float64, device)
    assert torch.autograd.gradgradcheck(conv_fn(handgrad.ops.conv2d, cfg), tuple(inputs))


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("needs", [(False, True, True), (True, False, False), (False, True, False),
                                   (False, False, True)])
def test_backward_computes_only_the_needed_gradients(device, needs):
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=needs[0])
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=needs[1])
    b = torch.randn(4, device=device, requires_grad=needs[2])
    out = handgrad.ops.conv2d(x, w, b, padding=1)
    with OpLog() as log:
        out.sum().backward()
    called = {n.split(".")[-1] for n in log.names if "handgrad" in n}
    expected = {name for name, need in zip(["conv2d_grad_input", "conv2d_grad_weight",
                                            "conv2d_grad_bias"], needs) if need}
    assert called == expected


def test_first_layer_saves_no_weight(device):
    saved = []
    x = torch.randn(2, 3, 8, 8, device=device)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        handgrad.ops.conv2d(x, w)
    assert len(saved) == 1 and saved[0] is x


def test_no_grad_anywhere(device):
    x = torch.randn(2, 3, 8, 8, device=device)
    w = torch.randn(4, 3, 3, 3, device=device)
    assert not handgrad.ops.conv2d(x, w).requires_grad


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[14]], ids=str)
def test_deterministic(device, cfg):
    x, w, b = make_inputs(cfg, torch.float32, device)
    fn = conv_fn(handgrad.ops.conv2d, cfg)
    first = torch.autograd.grad(fn(x, w, b).square().sum(), (x, w, b))
    again = torch.autograd.grad(fn(x, w, b).square().sum(), (x, w, b))
    for a, c in zip(first, again):
        assert torch.equal(a, c)


_PRODUCTS_SCRIPT = """
import torch, torch.nn.functional as F, handgrad
torch.manual_seed(0)
cases = [  # (input shape, weight shape, padding, groups)
    ((3, 64, 9, 7), (72, 64, 3, 3), 1, 1),    # Winograd path with AVX-512, im2col without
    ((3, 24, 9, 7), (72, 24, 5, 5), 2, 1),    # im2col path: K = 600 (3 k-blocks), edge tiles
    ((3, 24, 9, 7), (64, 24, 5, 5), 2, 1),    # im2col path, weight gradient built transposed
    ((2, 48, 6, 6), (64, 24, 3, 3), 1, 2),    # the same with groups (32 output channels each)
    ((2, 96, 5, 5), (40, 48, 3, 3), 2, 2),    # im2col path with groups, no NCHW view of the output
    ((3, 128, 6, 5), (136, 128, 3, 3), 1, 1),  # Winograd path: 16 products, partial tiles
    # 289 pixels / tiles: a depth between one k-block (256) and 1.25 of one,
    # which the products take in one block -- the packing must agree.
    ((1, 64, 21, 21), (40, 64, 5, 5), 0, 1),   # im2col weight gradient, col^T packed
    ((1, 64, 21, 21), (64, 64, 5, 5), 0, 1),   # im2col weight gradient built transposed
    ((1, 128, 34, 34), (128, 128, 3, 3), 1, 1),  # Winograd weight gradient, V^T packed
]
for x_shape, w_shape, padding, groups in cases:
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
        w = (torch.randn(w_shape, dtype=dtype) / (w_shape[1] * 9) ** 0.5).requires_grad_()
        b = torch.randn(w_shape[0], dtype=dtype, requires_grad=True)
        results = []
        for fn in (handgrad.ops.conv2d, F.conv2d):
            y = fn(x, w, b, 1, padding, 1, groups)
            results.append([y, *torch.autograd.grad(y.sin().sum(), (x, w, b))])
        for a, r in zip(*results):
            torch.testing.assert_close(a, r, atol=tol, rtol=tol)
print("ok")
"""


_DIRECT_SCRIPT = """
import torch, torch.nn.functional as F, handgrad
torch.manual_seed(0)
# The direct kernels block 8 (AVX-512) or 4 (AVX2) output rows -- channels out
# for forward and the weight gradient, channels in for grad_input -- then one
# smaller block for the rest; pixels in blocks of 3 vectors then single vectors;
# the weight gradient in blocks of 6 or 3 taps then single taps.
cases = [  # (input shape, weight shape, stride, padding, dilation, groups)
    ((2, 3, 13, 11), (c, 3, 5, 5), 1, 0, 1, 1) for c in range(1, 10)] + [
    ((2, c, 9, 10), (5, c, 3, 3), 1, 1, 1, 1) for c in (1, 2, 5, 6, 7, 9)] + [
    ((3, 6, 14, 14), (16, 6, 5, 5), 1, 0, 1, 1),   # LeNet's second layer
    ((2, 4, 15, 12), (6, 2, 3, 2), 2, 1, 2, 2),    # strided, dilated, grouped
    ((1, 1, 3, 40), (7, 1, 1, 3), 1, 0, 1, 1),     # one-row kernel, long rows
] + [  # input channels in whole vectors: the weight gradient vectorized over them
    ((2, 16, 9, 10), (c, 16, 3, 3), 1, 1, 1, 1) for c in (1, 7, 9, 17)] + [
    ((2, 48, 7, 6), (5, 48, 3, 2), 1, 1, 2, 1),    # 3 vectors, dilated, non-square
    ((3, 32, 6, 5), (8, 32, 1, 1), 1, 0, 1, 1),    # 1x1
]
for x_shape, w_shape, stride, padding, dilation, groups in cases:
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
        w = torch.randn(w_shape, dtype=dtype, requires_grad=True)
        b = torch.randn(w_shape[0], dtype=dtype, requires_grad=True)
        results = []
        for fn in (handgrad.ops.conv2d, F.conv2d):
            y = fn(x, w, b, stride, padding, dilation, groups)
            results.append([y, *torch.autograd.grad(y.sin().sum(), (x, w, b))])
        for a, r in zip(*results):
            torch.testing.assert_close(a, r, atol=tol, rtol=tol)
print("ok")
"""


@pytest.mark.parametrize("avx512", ["1", "0"])
def test_direct_kernels_with_and_without_avx512(avx512):
    # Small-channel layers run the direct kernels: AVX-512 ones when the CPU
    # has it, the baseline (AVX2) ones otherwise; HANDGRAD_CPU_AVX512=0 forces
    # the latter, so both are compared with native on an AVX-512 machine.
    assert_script_prints_ok(_DIRECT_SCRIPT, HANDGRAD_CPU_AVX512=avx512)


@pytest.mark.parametrize("avx512", ["1", "0"])
def test_cpu_matrix_products_with_and_without_avx512(avx512):
    # float32 products run the AVX-512 kernel (common/cpu_gemm.h) when the CPU
    # has it, at::mm / at::bmm otherwise; HANDGRAD_CPU_AVX512=0 forces the
    # latter, so both are compared with native here (the first only differs
    # from the second on an AVX-512 machine).
    assert_script_prints_ok(_PRODUCTS_SCRIPT, HANDGRAD_CPU_AVX512=avx512)


_THREADS_SCRIPT = """
import torch, handgrad
torch.manual_seed(0)
cases = [  # (input shape, weight shape, padding): several chunks and weight-gradient slots
    ((20, 64, 8, 8), (64, 64, 3, 3), 1),     # Winograd (with AVX-512)
    ((12, 40, 12, 12), (64, 40, 5, 5), 0),   # im2col, transposed weight gradient
    ((12, 40, 12, 12), (80, 40, 5, 5), 0),   # im2col, col2im by rows
]
for x_shape, w_shape, padding in cases:
    x = torch.randn(x_shape, requires_grad=True)
    w = (torch.randn(w_shape) / (w_shape[1] * w_shape[2] ** 2) ** 0.5).requires_grad_()
    b = torch.randn(w_shape[0], requires_grad=True)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        y = handgrad.ops.conv2d(x, w, b, 1, padding)
        results.append([y, *torch.autograd.grad(y.sin().sum(), (x, w, b))])
    for a, c in zip(*results):
        assert torch.equal(a, c)
print("ok")
"""


def test_cpu_results_do_not_depend_on_the_thread_count():
    assert_script_prints_ok(_THREADS_SCRIPT)


def _opcheck_cases(device):
    x = torch.randn(2, 4, 7, 6, device=device, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    xl = torch.randn(2, 64, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    wl = torch.randn(32, 64, 3, 3, device=device, requires_grad=True)
    return [
        (x, w, b, [2, 1], [1, 2, 0, 1], [1, 2], 2),
        (xl.requires_grad_(), wl, None, [1, 1], [1, 1, 1, 1], [1, 1], 1),
        (torch.randn(3, 6, 6, device=device, dtype=torch.float64, requires_grad=True),
         torch.randn(4, 3, 3, 3, device=device, dtype=torch.float64, requires_grad=True),
         None, [1, 1], [0, 1, 0, 1], [1, 1], 1),
    ]


def test_opcheck(device):
    ops = torch.ops.handgrad
    for x, w, b, stride, padding, dilation, groups in _opcheck_cases(device):
        window = (stride, padding, dilation, groups)
        torch.library.opcheck(ops.conv2d.default, (x, w, b, *window))
        out = ops.conv2d(x, w, b, *window)
        go = torch.randn_like(out).requires_grad_()
        torch.library.opcheck(ops.conv2d_grad_input.default, (go, w, list(x.shape), *window))
        torch.library.opcheck(ops.conv2d_grad_weight.default, (go, x, list(w.shape), *window))
        torch.library.opcheck(ops.conv2d_grad_bias.default, (go,))


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(device, dynamic):
    torch._dynamo.reset()

    def step(x, w, b):
        y = handgrad.ops.conv2d(x, w, b, stride=(2, 1), padding=1, dilation=(1, 2))
        return (y * y).sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    w = torch.randn(5, 3, 3, 3, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True)
    for shape in [(2, 3, 9, 9), (3, 3, 11, 10)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        got = torch.autograd.grad(compiled(x, w, b), (x, w, b))
        ref = torch.autograd.grad(step(x, w, b), (x, w, b))
        for a, c in zip(got, ref):
            torch.testing.assert_close(a, c)


def test_torch_compile_same_padding(device):
    torch._dynamo.reset()
    model = handgrad.nn.Conv2d(3, 4, 4, padding="same").to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 8, 8, device=device)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_module_is_a_drop_in(device, padding_mode):
    kwargs = dict(stride=(1, 2), padding=(1, 2), dilation=1, groups=2, bias=True,
                  padding_mode=padding_mode)
    torch.manual_seed(3)
    ref = torch.nn.Conv2d(4, 6, (3, 4), **kwargs).to(device)
    torch.manual_seed(3)
    mine = handgrad.nn.Conv2d(4, 6, (3, 4), **kwargs).to(device)
    assert isinstance(mine, torch.nn.Conv2d)
    assert repr(mine) == repr(ref)
    assert mine.state_dict().keys() == ref.state_dict().keys()
    for a, c in zip(mine.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, c)  # same initialization
    x = torch.randn(2, 4, 9, 10, device=device)
    torch.testing.assert_close(mine(x), ref(x))
    mine(x).square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad)
    torch.testing.assert_close(mine.bias.grad, ref.bias.grad)


def test_module_same_padding_and_no_bias(device):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(3, 4, (2, 4), padding="same", dilation=(1, 2), bias=False).to(device)
    mine = handgrad.nn.Conv2d(3, 4, (2, 4), padding="same", dilation=(1, 2), bias=False).to(device)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 7, 9, device=device, requires_grad=True)
    assert_matches_native(mine, ref, [x])


BAD_INPUTS = [
    # (description, input shape, weight shape, kwargs, exception, message pattern)
    ("channel mismatch", (1, 3, 8, 8), (4, 2, 3, 3), {}, RuntimeError,
     r"expected input\[1, 3, 8, 8\] to have 2 channels, but got 3 channels"),
    ("groups not dividing out channels", (1, 4, 8, 8), (3, 2, 3, 3), dict(groups=2), RuntimeError,
     "expected weight to be divisible by 2"),
    ("groups not matching in channels", (1, 5, 8, 8), (4, 2, 3, 3), dict(groups=2), RuntimeError,
     "to have 4 channels, but got 5"),
    ("kernel larger than padded input", (1, 3, 2, 2), (4, 3, 3, 3), {}, RuntimeError,
     "Kernel size can't be greater than actual input size"),
    ("dilated kernel larger than input", (1, 3, 4, 4), (4, 3, 3, 3), dict(dilation=2),
     RuntimeError, "Kernel size can't be greater than actual input size"),
    ("negative padding", (1, 3, 8, 8), (4, 3, 3, 3), dict(padding=-1), RuntimeError,
     "negative padding is not supported"),
    ("stride 0", (1, 3, 8, 8), (4, 3, 3, 3), dict(stride=0), RuntimeError,
     "non-positive stride is not supported"),
    ("dilation 0", (1, 3, 8, 8), (4, 3, 3, 3), dict(dilation=(1, 0)), RuntimeError,
     "dilation should be greater than zero"),
    ("groups 0", (1, 3, 8, 8), (4, 3, 3, 3), dict(groups=0), RuntimeError,
     "non-positive groups is not supported"),
    ("2-D input", (8, 8), (4, 3, 3, 3), {}, RuntimeError, "expected 3-D .unbatched. or 4-D"),
    ("5-D input", (1, 1, 3, 8, 8), (4, 3, 3, 3), {}, RuntimeError,
     "expected 3-D .unbatched. or 4-D"),
    ("3-D weight", (1, 3, 8, 8), (4, 3, 3), {}, ValueError, "expected a 4-D weight"),
    ("'same' with stride 2", (1, 3, 8, 8), (4, 3, 3, 3), dict(padding="same", stride=2),
     ValueError, "padding='same' is not supported for strided convolutions"),
    ("unknown padding string", (1, 3, 8, 8), (4, 3, 3, 3), dict(padding="full"), ValueError,
     "Invalid padding string"),
    ("three-value stride", (1, 3, 8, 8), (4, 3, 3, 3), dict(stride=(1, 1, 1)), ValueError,
     "stride must be an int or a tuple of two ints"),
    ("float groups", (1, 3, 8, 8), (4, 3, 3, 3), dict(groups=1.5), TypeError,
     "groups must be an int"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(case):
    _, x_shape, w_shape, kwargs, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        handgrad.ops.conv2d(torch.zeros(x_shape), torch.zeros(w_shape), **kwargs)


def test_bad_dtypes_raise_a_clear_error():
    x, w = torch.zeros(1, 3, 8, 8), torch.zeros(4, 3, 3, 3)
    with pytest.raises(TypeError, match="input and weight to have the same dtype"):
        handgrad.ops.conv2d(x, w.double())
    with pytest.raises(TypeError, match="input and bias to have the same dtype"):
        handgrad.ops.conv2d(x, w, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        handgrad.ops.conv2d(x.long(), w.long())
    with pytest.raises(RuntimeError, match="expected bias to be 1-D with 4 elements"):
        handgrad.ops.conv2d(x, w, torch.zeros(5))
    # The CPU kernels are float32/float64 (as the issue asks); other types are refused.
    with pytest.raises(RuntimeError, match="not implemented for 'Half'"):
        handgrad.ops.conv2d(x.half(), w.half())


def test_backward_ops_reject_inconsistent_shapes():
    ops = torch.ops.handgrad
    go, w, x = torch.zeros(1, 4, 6, 6), torch.zeros(4, 3, 3, 3), torch.zeros(1, 3, 8, 8)
    window = ([1, 1], [0, 0, 0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="does not match the output"):
        ops.conv2d_grad_input(go, w, [1, 3, 9, 9], *window)
    with pytest.raises(RuntimeError, match="does not match the output"):
        ops.conv2d_grad_weight(go, torch.zeros(1, 3, 7, 7), [4, 3, 3, 3], *window)
    with pytest.raises(RuntimeError, match="padding to have 4 values"):
        ops.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is usable here")
def test_mixed_devices_raise():
    with pytest.raises(RuntimeError, match="same device"):
        handgrad.ops.conv2d(torch.zeros(1, 3, 8, 8, device="cuda"), torch.zeros(4, 3, 3, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_on_cuda(device, dtype):
    if not runs_cuda_kernels(device):
        pytest.skip("float16/bfloat16 kernels are CUDA-only (the CPU kernels are float32/float64)")
    cfg = CONFIGS[2]
    inputs = make_inputs(cfg, dtype, device)
    assert_matches_native(conv_fn(handgrad.ops.conv2d, cfg), conv_fn(F.conv2d, cfg), inputs,
                          atol=2e-2, rtol=2e-2)
