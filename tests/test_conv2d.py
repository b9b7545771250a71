"""handgrad.ops.conv2d and handgrad.nn.Conv2d against torch.nn.functional.conv2d."""


import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import handgrad
from helpers import (LAYOUTS, assert_matches_native, assert_script_prints_ok, in_layout,
                     runs_cuda_kernels)


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")  # float32, not dtype0


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dtype_id)
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


# Run under each forced CPU GEMM policy: each kernel's results are
# thread-count independent. Under "auto" a product inside a parallel region
# is a separate class from the same product outside one, measured on its own;
# where the two kernels tie (AMD Zen 4) it can pick the other kernel and round
# differently -- CI saw this fail once under auto.
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


@pytest.mark.parametrize("policy", ["own", "blas"])
def test_cpu_results_do_not_depend_on_the_thread_count(policy):
    assert_script_prints_ok(_THREADS_SCRIPT, HANDGRAD_CPU_GEMM=policy)


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
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        handgrad.ops.conv2d(x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn))


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




# ---------------------------------------------------------------------------
# Reduced precision: float16 / bfloat16 on the CPU (float32 kernels on widened
# operands, each result rounded once) and on CUDA (float32 accumulators),
# compared by value with the float64 result of the same (rounded) operands.

def _reduction_bounds(x, w, go, cfg):
    """For every entry of forward, grad_input, grad_weight and grad_bias: the
    number of summed products and the sum of their magnitudes (float64)."""
    _, w_shape, stride, padding, dilation, groups, _ = cfg
    ax, aw, ag = x.detach().abs().double(), w.detach().abs().double(), go.abs().double()
    fwd = F.conv2d(ax, aw, None, stride, padding, dilation, groups)
    gin = torch.nn.grad.conv2d_input(x.shape, aw, ag, stride, padding, dilation, groups)
    gw = torch.nn.grad.conv2d_weight(ax, w.shape, ag, stride, padding, dilation, groups)
    gb = ag.sum((0, 2, 3))
    taps = w_shape[2] * w_shape[3]
    pixels = go.shape[0] * go.shape[2] * go.shape[3]
    return [(w_shape[1] * taps, fwd), (w_shape[0] // groups * taps, gin), (pixels, gw),
            (pixels, gb)]


REDUCED_CONFIGS = [
    ((2, 4, 11, 13), (8, 2, 3, 2), (2, 3), (1, 2), (2, 1), 1 * 2, True),  # direct, groups
    ((3, 40, 7, 9), (64, 40, 3, 3), 2, 1, 2, 1, True),                  # im2col + product
    ((2, 64, 6, 5), (64, 64, 3, 3), 1, 1, 1, 1, True),                  # Winograd
]


@pytest.mark.parametrize("cfg", REDUCED_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_reduced_precision_matches_float64_by_value(device, dtype, cfg):
    if runs_cuda_kernels(device) and cfg[1][0] >= 64:
        pytest.skip("kept small on the emulator: the CUDA kernels are the same code for every size")
    x, w, b = make_inputs(cfg, dtype, device)
    fn = conv_fn(handgrad.ops.conv2d, cfg)
    y = fn(x, w, b)
    go = torch.randn(y.shape, device=device).to(dtype)
    got = [y, *torch.autograd.grad(y, (x, w, b), go)]
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = conv_fn(F.conv2d, cfg)(x64, w64, b64)
    ref = [y64, *torch.autograd.grad(y64, (x64, w64, b64), go.double())]
    # Each entry is a float32 sum of `terms` products rounded once to dtype:
    # |error| <= eps(dtype) |exact| + terms eps(float32) sum|product| (the
    # factor 8 covers blocked / Winograd summation orders). Summing in the
    # reduced type instead would be off by ~terms eps(dtype) sum|product|,
    # thousands of times more.
    bounds = _reduction_bounds(x, w, go, cfg)
    bounds[0] = (bounds[0][0], bounds[0][1] + b64.detach().abs().view(1, -1, 1, 1))
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    for name, a, r, (terms, magnitude) in zip(["output", "grad_input", "grad_weight", "grad_bias"],
                                              got, ref, bounds):
        assert a.dtype == dtype
        err = (a.double() - r.detach()).abs()
        tol = eps * r.detach().abs() + 8 * terms * eps32 * magnitude + torch.finfo(dtype).tiny
        assert bool((err <= tol).all()), (name, float((err / tol).max()))


def test_cpu_reduced_precision_rounds_once():
    # A float32 sum rounded once to bfloat16 equals the float64 sum rounded to
    # bfloat16 unless it lies within float32 rounding of a rounding boundary:
    # with small integers every product and sum is exact in float32, so the
    # result must equal the exactly rounded float64 value everywhere.
    x = torch.randint(-8, 9, (2, 8, 9, 9)).to(torch.bfloat16)
    w = torch.randint(-8, 9, (5, 8, 3, 3)).to(torch.bfloat16)
    got = handgrad.ops.conv2d(x, w, padding=1)
    ref = F.conv2d(x.double(), w.double(), padding=1).to(torch.bfloat16)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dtype_id)
def test_autocast_casts_like_native_conv2d(dtype):
    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(4)
    with torch.autocast("cpu", dtype=dtype):
        got = handgrad.ops.conv2d(x, w, b, padding=1)
        ref = F.conv2d(x, w, b, padding=1)
        # float64 operands are not cast (native's rule), so they stay float64
        got64 = handgrad.ops.conv2d(x.double(), w.double().detach(), None, padding=1)
    assert got.dtype == ref.dtype == dtype and got64.dtype == torch.float64
    torch.testing.assert_close(got.double(), ref.double(), atol=4 * torch.finfo(dtype).eps * 10,
                               rtol=4 * torch.finfo(dtype).eps)
    (grad,) = torch.autograd.grad(got.float().sum(), w)
    assert grad.dtype == torch.float32  # through the cast, onto the float32 weight
    # and under torch.compile
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: handgrad.ops.conv2d(x, w, padding=1), fullgraph=True)
    with torch.autocast("cpu", dtype=dtype):
        assert compiled(x, w.detach()).dtype == dtype


def test_autocast_bfloat16_runs_patched_classifiers_like_native():
    # torch.autocast on the CPU with bfloat16 casts native conv2d's operands;
    # the patched models' handgrad conv2d does the same, so a patched
    # classifier trains under autocast and matches the native model.
    from handgrad import models
    for name, shape in (("lenet5", (4, 3, 32, 32)), ("mnist_cnn", (4, 1, 28, 28)),
                        ("cifar_cnn", (4, 3, 32, 32))):
        torch.manual_seed(0)
        native = models.build(name, backend="native").train()
        mine = models.build(name, backend="native")
        mine.load_state_dict(native.state_dict())
        handgrad.patch(mine, strict=False)
        assert any(type(m) is handgrad.nn.Conv2d for m in mine.modules())
        x = torch.randn(shape)
        target = torch.randint(0, 10, (shape[0],))
        results, conv_dtypes = [], []
        for model in (native, mine):
            dtypes = []
            hooks = [m.register_forward_hook(lambda m, i, o: dtypes.append((i[0].dtype, o.dtype)))
                     for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
            torch.manual_seed(1)  # same dropout masks
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            for hook in hooks:
                hook.remove()
            loss = F.cross_entropy(logits.float(), target)
            grads = torch.autograd.grad(loss, [p for p in model.parameters()])
            results.append((logits, grads))
            conv_dtypes.append(dtypes)
        # every convolution ran in bfloat16, as native's do under autocast
        assert conv_dtypes[0] == conv_dtypes[1]
        assert all(out == torch.bfloat16 for _, out in conv_dtypes[1]), conv_dtypes[1]
        (logits, grads), (ref_logits, ref_grads) = results[1], results[0]
        assert logits.dtype == ref_logits.dtype == torch.bfloat16
        # Both round every conv output to bfloat16 (eps 2^-7) after float32
        # sums in different orders, so an output may differ by one bfloat16
        # ulp, and the difference grows through the layers: compare norms.
        def rel(a, r):
            return float((a.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30))
        assert rel(logits, ref_logits) < 0.05, name
        assert all(g.dtype == rg.dtype == torch.float32 for g, rg in zip(grads, ref_grads))
        # All parameters' gradients as one vector (a conv bias followed by
        # batch norm has a gradient that is zero up to rounding noise, so it
        # is not compared on its own).
        flat, ref_flat = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads])
        assert rel(flat, ref_flat) < 0.1, name


# ---------------------------------------------------------------------------
# Huge strides, paddings and dilations: sizes at the limits of int32, int64
# and of the kernels' scratch arithmetic.

def reference_conv2d(x, w, b, stride, pads, dilation, groups):
    """conv2d by definition, in float64, for any geometry with a small output:
    every tap gathers its input positions (Python ints: no overflow), zero in
    the padding (multiplied, as native's reference path does)."""
    n, c, in_h, in_w = x.shape
    co, cg, kh, kw = w.shape

    def positions(size, k, s, p0, p1, d):
        out = (size + p0 + p1 - d * (k - 1) - 1) // s + 1
        pos = [[o * s - p0 + t * d for t in range(k)] for o in range(out)]
        valid = torch.tensor([[0 <= q < size for q in row] for row in pos])
        index = torch.tensor([[q if 0 <= q < size else 0 for q in row] for row in pos])
        return index, valid

    ih, vh = positions(in_h, kh, stride[0], pads[0], pads[1], dilation[0])
    iw, vw = positions(in_w, kw, stride[1], pads[2], pads[3], dilation[1])
    xd = x.double()
    patches = xd[:, :, ih][:, :, :, :, iw]  # n, c, oh, kh, ow, kw
    valid = vh[:, :, None, None] & vw[None, None]  # oh, kh, ow, kw
    patches = torch.where(valid, patches, torch.zeros((), dtype=torch.float64))
    patches = patches.view(n, groups, cg, *patches.shape[2:])
    wd = w.double().view(groups, co // groups, cg, kh, kw)
    out = torch.einsum("ngcxiyj,gocij->ngoxy", patches, wd).reshape(n, co, ih.shape[0], iw.shape[0])
    return out if b is None else out + b.double().view(1, -1, 1, 1)


HUGE_GEOMETRIES = [
    # (stride, padding (top, bottom, left, right), dilation), with x (2,3,9,9), w (4,3,3,3)
    ((4096, 4096), (0, 0, 0, 0), (1, 1)),                   # was ~200 MB of scratch
    ((65536, 65536), (0, 0, 0, 0), (1, 1)),                 # was std::bad_alloc
    ((2**31, 2**31), (1, 1, 1, 1), (1, 1)),
    ((2**32, 2**32), (0, 0, 0, 0), (1, 1)),                 # was a segfault
    ((2**62, 2**63 - 1), (0, 0, 0, 0), (1, 1)),
    ((2**32, 2**33), (2**31, 2**31, 2**32, 2**32), (1, 1)),  # outputs in the padding only
    ((1, 1), (2**31, 2**31, 2**31, 2**31 + 1), (2**31, 2**31)),  # only the centre tap reads input
    ((3, 1), (2**40, 2**40, 2**32, 2**32), (2**40, 2**32)),
    ((2**33, 1), (2**33, 2**33, 2**20, 2**20), (1, 2**20)),
]


@pytest.mark.parametrize("geometry", HUGE_GEOMETRIES, ids=str)
def test_huge_geometry_matches_the_definition(device, geometry):
    stride, pads, dilation = geometry
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    out = torch.ops.handgrad.conv2d(x, w, b, stride, pads, dilation, 1)
    ref = reference_conv2d(x, w, b, stride, pads, dilation, 1)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x, w, b), go)
    want = torch.autograd.grad(ref, (x, w, b), go)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r)


def test_huge_stride_matches_native(device):
    x, w = torch.randn(2, 3, 9, 9, device=device), torch.randn(4, 3, 3, 3, device=device)
    for stride in (4096, 65536, 2**31, 2**32, 2**62, 2**63 - 1):
        out = handgrad.ops.conv2d(x, w, stride=stride)
        assert out.shape == (2, 4, 1, 1)
        torch.testing.assert_close(out, F.conv2d(x, w, stride=stride), atol=1e-5, rtol=1e-5)


_SCRATCH_SCRIPT = """
import resource, torch, handgrad
x, w = torch.randn(2, 3, 9, 9, requires_grad=True), torch.randn(4, 3, 3, 3, requires_grad=True)
handgrad.ops.conv2d(x, w, stride=2).sum().backward()   # load everything first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for stride in (4096, 65536, 2**20):
    handgrad.ops.conv2d(x, w, stride=stride).sum().backward()
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
assert grown_mb < 20, grown_mb
print("ok")
"""


def test_huge_stride_allocates_no_huge_scratch():
    # The direct path's scratch once held every stride phase of the padded
    # input (channels x stride_h x stride_w x rows x cols: ~200 MB at stride
    # 4096 for a 9x9 image). The process's peak resident memory must not grow.
    assert_script_prints_ok(_SCRATCH_SCRIPT)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(padding=2**62), "must be at most 2\\^62"),
    (dict(padding=(2**61, 2**61)), "must be at most 2\\^62"),
    (dict(padding=2**63 - 1), "must be at most 2\\^62"),
    (dict(dilation=2**62), "Kernel size: \\(beyond 2\\^62"),
    (dict(dilation=2**63 - 1), "Kernel size: \\(beyond 2\\^62"),
    (dict(dilation=2**31), "Kernel size can't be greater than actual input size"),
    (dict(dilation=(1, 2**32)), "Kernel size can't be greater than actual input size"),
], ids=str)
def test_geometry_beyond_the_limits_raises(device, kwargs, pattern):
    x, w = torch.randn(1, 3, 9, 9, device=device), torch.randn(4, 3, 3, 3, device=device)
    with pytest.raises(RuntimeError, match=pattern):
        handgrad.ops.conv2d(x, w, **kwargs)


def test_backward_ops_check_the_geometry_too():
    ops = torch.ops.handgrad
    go, w, x = torch.zeros(1, 4, 1, 1), torch.zeros(4, 3, 3, 3), torch.zeros(1, 3, 9, 9)
    with pytest.raises(RuntimeError, match="must be at most 2\\^62"):
        ops.conv2d_grad_input(go, w, [1, 3, 9, 9], [1, 1], [2**62] * 4, [1, 1], 1)
    with pytest.raises(RuntimeError, match="beyond 2\\^62"):
        ops.conv2d_grad_weight(go, x, [4, 3, 3, 3], [1, 1], [0] * 4, [2**62, 1], 1)
    with pytest.raises(RuntimeError, match="kernel size should be greater than zero"):
        ops.conv2d_grad_weight(go, x, [4, 3, 0, 3], [1, 1], [0] * 4, [1, 1], 1)
    with pytest.raises(RuntimeError, match="kernel size should be greater than zero"):
        handgrad.ops.conv2d(x, torch.zeros(4, 3, 3, 0))


# ---------------------------------------------------------------------------
# inf and NaN. handgrad follows native conv2d's reference rules, which native
# float64 (and float16, and float32 without a batch) follow on the CPU: the
# forward pass and the weight gradient multiply the zero padding (a NaN
# weight makes its whole output channel NaN; an inf in dOut makes NaN the
# weight-gradient taps that read padding), while the input gradient sums
# only the (output, tap) pairs that read an input element. (Native float32
# with a batch runs oneDNN, which skips the padding in the forward pass and
# the weight gradient too; bfloat16 mixes the two.) So the reference here is
# native float64 on the same values.

def assert_same_special_values(got, ref, atol, rtol, what):
    got, ref = got.detach().double(), ref.detach()
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        mismatch = test(got) != test(ref)
        assert not bool(mismatch.any()), "%s: %s pattern differs at %d entries" % (
            what, name, int(mismatch.sum()))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], atol=atol, rtol=rtol, msg=what)


def _special(kind, x, w, go):
    if kind == "nan weight":
        w.view(-1)[0] = float("nan")
    elif kind == "inf weight":
        w.view(-1)[-1] = float("-inf")
    elif kind == "inf input":
        x[0, 0, 0, 0] = float("inf")
        x[-1, -1, -1, -1] = float("-inf")  # read by no output of the strided configs
    elif kind == "nan input":
        x[0, 0, 2, 1] = float("nan")
    elif kind == "inf grad_output":
        go[0, 0, 0, 0] = float("inf")
        go[-1, -1, -1, -1] = float("nan")
    elif kind == "huge input":  # Winograd's transforms overflowed here (issue 16, item 9)
        x[0, 0, 1, 1] = 3e38 if x.dtype != torch.float64 else 1e308
        x[0, 1, 2, 2] = -2e38 if x.dtype != torch.float64 else -1e308
        w.mul_(1e-3)
        go.mul_(1e-3)


SPECIAL_KINDS = ["nan weight", "inf weight", "inf input", "nan input", "inf grad_output",
                 "huge input"]

SPECIAL_CONFIGS = [  # one per CPU algorithm (and the CUDA kernels' tiling)
    ((2, 3, 9, 9), (4, 3, 3, 3), 1, 1, 1, 1, True),        # direct
    ((2, 3, 10, 9), (4, 3, 3, 3), 2, 1, 1, 1, True),       # direct, stride phases
    ((2, 4, 9, 9), (6, 2, 3, 3), 2, 1, 2, 2, True),        # direct, groups, dilation
    ((2, 16, 9, 9), (8, 16, 3, 3), 1, 1, 1, 1, True),      # weight gradient by channels
    ((2, 40, 9, 9), (64, 40, 3, 3), 2, 1, 1, 1, True),     # im2col + product
    ((2, 64, 6, 6), (64, 64, 1, 1), 1, 0, 1, 1, True),     # 1x1
    ((2, 64, 8, 8), (64, 64, 3, 3), 1, 1, 1, 1, True),     # Winograd (AVX-512)
    ((2, 128, 6, 5), (128, 128, 3, 3), 1, 1, 1, 1, True),  # Winograd (AVX2 too)
]


def _special_case(cfg, kind, dtype, device):
    torch.manual_seed(0)
    x, w, b = (t.detach() for t in make_inputs(cfg, dtype, device))
    y_shape = conv_fn(F.conv2d, cfg)(x.double(), w.double(), b.double()).shape
    go = torch.randn(y_shape, dtype=dtype, device=device)
    _special(kind, x, w, go)
    got = forward_backward_all(conv_fn(handgrad.ops.conv2d, cfg), x, w, b, go)
    ref = forward_backward_all(conv_fn(F.conv2d, cfg), x.double(), w.double(), b.double(),
                               go.double())
    return got, ref


def forward_backward_all(fn, x, w, b, go):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    return [y, *torch.autograd.grad(y, (x, w, b), go)]


@pytest.mark.parametrize("cfg", SPECIAL_CONFIGS, ids=str)
@pytest.mark.parametrize("kind", SPECIAL_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dtype_id)
def test_special_values_follow_native(device, cfg, kind, dtype):
    if runs_cuda_kernels(device) and cfg[1][0] >= 64:
        pytest.skip("kept small on the emulator: the CUDA kernels are the same code for every size")
    got, ref = _special_case(cfg, kind, dtype, device)
    # "huge input": sums of ~1e35 products, compared at float32's precision of those.
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for name, a, r in zip(["output", "grad_input", "grad_weight", "grad_bias"], got, ref):
        r = r.detach()
        scale = float(r[torch.isfinite(r)].abs().max()) if bool(torch.isfinite(r).any()) else 1.0
        assert_same_special_values(a, r, atol=tol * max(scale, 1.0), rtol=tol, what=name)


_SPECIAL_SCRIPT = """
import sys, torch
sys.path.insert(0, %r)
import test_conv2d as t
for cfg in t.SPECIAL_CONFIGS:
    for kind in t.SPECIAL_KINDS:
        got, ref = t._special_case(cfg, kind, torch.float32, torch.device("cpu"))
        for name, a, r in zip(["output", "grad_input", "grad_weight", "grad_bias"], got, ref):
            finite = torch.isfinite(r)
            scale = float(r[finite].abs().max()) if bool(finite.any()) else 1.0
            t.assert_same_special_values(a, r, atol=1e-4 * max(scale, 1.0), rtol=1e-4,
                                         what=str((cfg, kind, name)))
print("ok")
"""


def test_special_values_follow_native_without_avx512():
    # HANDGRAD_CPU_AVX512=0: the AVX2 direct kernels, at::mm, and Winograd
    # (its scalar transforms) from 128 channels.
    import os
    assert_script_prints_ok(_SPECIAL_SCRIPT % os.path.dirname(os.path.abspath(__file__)),
                            timeout=600, HANDGRAD_CPU_AVX512="0")


@pytest.mark.parametrize("where", [(0, 0, 3, 3), (1, 63, 7, 7)], ids=["first", "last"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_winograd_huge_and_infinite_inputs_issue_example(layout, where):
    # Issue 16, item 9: 3x3, stride 1, >= 64 channels. channels_last runs the
    # transforms in place (their magnitude scan reads the chunk as one run):
    # the value must be found at either end of it.
    torch.manual_seed(0)
    x = in_layout(torch.randn(2, 64, 8, 8), layout)
    w = torch.randn(64, 64, 3, 3) / 24
    for value in (8.5e37, 1e38, 3e38):
        xs = x.clone()
        xs[where] = value
        got, ref = handgrad.ops.conv2d(xs, w, padding=1), F.conv2d(xs.double(), w.double(), padding=1)
        assert bool(torch.isfinite(ref).all()) and bool(torch.isfinite(got).all())
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    xs = x.clone()
    xs[where] = float("inf")
    got, ref = handgrad.ops.conv2d(xs, w, padding=1), F.conv2d(xs.double(), w.double(), padding=1)
    assert_same_special_values(got, ref, atol=1e-4, rtol=1e-4, what="output")
    reach = 9 if where[2] == 3 else 4  # an interior pixel feeds 3x3 outputs, a corner 2x2
    assert int(torch.isnan(got).sum()) == 0 and int(torch.isinf(got).sum()) == 64 * reach


# ---------------------------------------------------------------------------
# The CUDA weight gradient splits its reduction over N * OH * OW >= 8192
# pixels into partial sums (a second kernel adds them in order).

def test_cuda_weight_gradient_split_matches_native(device):
    if not runs_cuda_kernels(device):
        pytest.skip("the split is the CUDA kernel's (on the CPU: the emulated device)")
    from handgrad import cuda_emulation
    # 97 x 97 = 9409 pixels: 2 splits of 4705 and 4704 (a partial last split);
    # 3 images of 61 x 61: 11163 pixels in 2 splits; 129 x 131: 16899, 4 splits.
    for shape, pad in (((1, 2, 97, 97), 1), ((3, 3, 61, 61), 1), ((1, 1, 131, 133), 0)):
        x = torch.randn(shape, dtype=torch.float64)
        w = torch.randn(3, shape[1], 3, 3, dtype=torch.float64, requires_grad=True)
        pixels = shape[0] * (shape[2] + 2 * pad - 2) * (shape[3] + 2 * pad - 2)
        splits = min(64, pixels // 4096)
        assert splits >= 2 and pixels % splits != 0
        go = torch.randn(shape[0], 3, shape[2] + 2 * pad - 2, shape[3] + 2 * pad - 2,
                         dtype=torch.float64)
        if cuda_emulation.active():
            cuda_emulation.reset_launch_statistics()
        (got,) = torch.autograd.grad(handgrad.ops.conv2d(x, w, padding=pad), w, go)
        (ref,) = torch.autograd.grad(F.conv2d(x, w, padding=pad), w, go)
        torch.testing.assert_close(got, ref)
        if cuda_emulation.active():
            launches = {k: v for k, v in cuda_emulation.launch_statistics().items()
                        if "implicit_gemm" in k and "GradWeight" in k}
            assert launches and all(blocks == splits for _, blocks, _ in launches.values()), \
                launches


# ---------------------------------------------------------------------------
# Property-based comparison with native over random geometries ('same' and
# 'valid' included), layouts, dtypes and special values (hypothesis;
# derandomized, so CI runs the same examples within a fixed budget). The
# reference is native conv2d in float64 on the same values; tolerances follow
# from the dtype's epsilon and the number of summed products.

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

CONV_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def conv_cases(draw, max_channels):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, max(1, max_channels // groups)))
    cout = groups * draw(st.integers(1, max(1, max_channels // groups)))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(st.one_of(st.just("same"), st.just("valid"), st.integers(0, 3),
                             st.tuples(st.integers(0, 3), st.integers(0, 3))))
    stride = (1, 1) if padding == "same" else (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    pads = ((0, 0) if padding in ("same", "valid") else
            (padding, padding) if isinstance(padding, int) else padding)
    sizes = []
    for k, d, p in zip(kernel, dilation, pads):
        smallest = max(1, d * (k - 1) + 1 - 2 * p)
        sizes.append(draw(st.integers(smallest, smallest + 6)))
    batch = draw(st.sampled_from([None, 0, 1, 2, 3]))  # None: unbatched
    x_shape = (cin, *sizes) if batch is None else (batch, cin, *sizes)
    return dict(x_shape=x_shape, w_shape=(cout, cin // groups, *kernel), stride=stride,
                padding=padding, dilation=dilation, groups=groups, bias=draw(st.booleans()),
                layout=draw(st.sampled_from(LAYOUTS)), dtype=draw(st.sampled_from(CONV_DTYPES)),
                special=draw(st.sampled_from([None, None, "x", "w", "grad_output"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def _check_conv_case(case, device):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    x = torch.randn(case["x_shape"], generator=gen, dtype=torch.float64)
    w = torch.randn(case["w_shape"], generator=gen, dtype=torch.float64)
    b = torch.randn(case["w_shape"][0], generator=gen, dtype=torch.float64) if case["bias"] else None
    args = (case["stride"], case["padding"], case["dilation"], case["groups"])
    y_shape = F.conv2d(x, w, b, *args).shape
    go = torch.randn(y_shape, generator=gen, dtype=torch.float64)
    target = dict(x=x, w=w, grad_output=go).get(case["special"])
    if target is not None and target.numel():
        flat = target.view(-1)
        picks = torch.randint(0, flat.numel(), (2,), generator=gen)
        flat[picks[0]] = float("nan")
        flat[picks[1]] = float("inf") if case["seed"] % 2 else float("-inf")
    # the operands in the tested dtype, and the reference on exactly those values
    x, w, go = x.to(dtype), w.to(dtype), go.to(dtype)
    b = b.to(dtype) if b is not None else None
    xs = in_layout(x.to(device), case["layout"]).requires_grad_()
    ws, bs = w.to(device).requires_grad_(), b.to(device).requires_grad_() if b is not None else None
    y = handgrad.ops.conv2d(xs, ws, bs, *args)
    assert y.dtype == dtype and y.shape == y_shape
    got = [y, *torch.autograd.grad(y, [t for t in (xs, ws, bs) if t is not None], go.to(device),
                                   allow_unused=True)]
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    y64 = F.conv2d(x64, w64, b64, *args)
    ref = [y64, *torch.autograd.grad(y64, [t for t in (x64, w64, b64) if t is not None],
                                     go.double(), allow_unused=True)]
    # Error bound of each entry: eps(dtype) |exact| + 8 terms eps(accumulator) sum|products|.
    pads = handgrad.ops.conv2d.__globals__["_resolve_padding"](
        case["padding"], w, tuple(case["stride"]), tuple(case["dilation"]))
    with torch.no_grad():
        ax, aw, ag = x.double().abs(), w.double().abs(), go.double().abs()
        xb, gb = (ax, ag) if ax.dim() == 4 else (ax[None], ag[None])
        xp = F.pad(xb, (pads[2], pads[3], pads[0], pads[1]))
        magnitudes = [F.conv2d(xp, aw, None, case["stride"], 0, case["dilation"], case["groups"]),
                      torch.nn.grad.conv2d_input(xp.shape, aw, gb, case["stride"], 0,
                                                 case["dilation"], case["groups"]),
                      torch.nn.grad.conv2d_weight(xp, w.shape, gb, case["stride"], 0,
                                                  case["dilation"], case["groups"]),
                      gb.sum((0, 2, 3))]
        magnitudes[1] = magnitudes[1][:, :, pads[0]:pads[0] + xb.shape[2],
                                      pads[2]:pads[2] + xb.shape[3]]
        if ax.dim() == 3:
            magnitudes[0], magnitudes[1] = magnitudes[0][0], magnitudes[1][0]
        if b is not None:
            magnitudes[0] = magnitudes[0] + b.double().abs().view(-1, 1, 1)
    cout, cg, kh, kw = case["w_shape"]
    pixels = go.numel() // max(1, cout)
    terms = [cg * kh * kw, cout // case["groups"] * kh * kw, pixels, pixels]
    eps = torch.finfo(dtype).eps
    eps_acc = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    for name, a, r, n, m in zip(["output", "grad_input", "grad_weight", "grad_bias"], got, ref,
                                terms, magnitudes):
        if r is None:
            continue
        a, r = a.detach().double().cpu(), r.detach()
        assert a.shape == r.shape, name
        for test in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(test(a), test(r)), (name, test.__name__)
        tol = eps * r.abs() + 8 * n * eps_acc * m + torch.finfo(dtype).tiny
        finite = torch.isfinite(r) & torch.isfinite(tol)
        assert bool(((a - r).abs() <= tol)[finite].all()), name


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=conv_cases(max_channels=6))
def test_property_matches_native(device, case):
    _check_conv_case(case, device)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(case=conv_cases(max_channels=72))
def test_property_matches_native_large_channels(case):
    # Channel counts that reach the im2col + product and Winograd paths (CPU
    # only: the emulated CUDA kernels run the same tiling as above).
    _check_conv_case(case, torch.device("cpu"))


@pytest.mark.parametrize("which", ["input", "weight"])
def test_gradient_penalty_with_one_argument_frozen_matches_native(which):
    # Double backward where only one of input and weight requires grad: each
    # backward op must return the gradient of exactly the arguments that need
    # one (the first-order backward's needs_input_grad pattern differs).
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=which == "input")
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=which == "weight")
    leaf = x if which == "input" else w
    results = []
    for conv in (handgrad.ops.conv2d, F.conv2d):
        y = conv(x, w, None, 1, 1)
        (g,) = torch.autograd.grad(y.square().sum(), leaf, create_graph=True)
        results.append(torch.autograd.grad(g.square().sum(), leaf))
    torch.testing.assert_close(results[0], results[1])
