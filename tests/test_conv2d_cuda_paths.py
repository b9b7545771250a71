"""conv2d's specialised CUDA kernels on the CUDA emulator or a GPU: the
tensor-core implicit GEMMs (csrc/ops/cuda/conv2d_tensor_core.cuh: float16 /
bfloat16 on mma m16n8k16, float32 as TF32 on mma m16n8k8 when
torch.backends.cudnn.allow_tf32 is on, exact float32 when it is off) and the
depthwise kernels (conv2d_depthwise.cuh). Compared by value with a float64
reference at tolerances derived from the dtype's precision and the reduction
length."""

import math

import pytest
import torch
import torch.nn.functional as F

import handgrad
from helpers import runs_cuda_kernels

# (input shape, weight shape, stride, padding, dilation, groups): channels per
# group multiples of 8, tiles with tails in every GEMM dimension.
CASES = [
    ((2, 8, 9, 9), (16, 8, 3, 3), 1, 1, 1, 1),        # K = 72: 2 full + 1 partial k-tile (fp16)
    ((1, 16, 12, 10), (72, 16, 3, 3), 1, 1, 1, 1),    # 72 channels: 2 n-tiles, the last partial
    ((3, 8, 7, 6), (8, 8, 1, 1), 1, 0, 1, 1),         # 1x1
    ((2, 16, 11, 9), (24, 8, 3, 2), (2, 1), (1, 0), (1, 2), 2),  # groups, stride, dilation
    ((1, 32, 6, 6), (8, 32, 5, 5), 1, 2, 1, 1),       # K = 800 over many tiles
    ((2, 8, 17, 16), (8, 8, 3, 3), 1, 1, 2, 1),       # 2 x 17 x 16 = 544 pixels: 5 m-tiles
]

# Unit roundoff of the operands as the tensor cores see them.
EPS = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -11}


def tolerance(dtype, depth):
    # Rounded operands (2 eps per product), float32 accumulation over `depth`
    # terms and one rounding of the result to the dtype.
    out_eps = 2.0 ** -24 if dtype == torch.float32 else EPS[dtype]
    return 2 * EPS[dtype] * math.sqrt(depth) * 4 + depth * 2.0 ** -24 + out_eps


def pair(v):
    return (v, v) if isinstance(v, int) else v


@pytest.fixture
def cuda_device(device):
    if not runs_cuda_kernels(device):
        pytest.skip("these kernels are CUDA paths")
    return device


def reference(x, w, b, cfg):
    _, _, stride, padding, dilation, groups = cfg
    return F.conv2d(x.double(), w.double(), b.double(), stride, padding, dilation, groups)


def check(out, ref, dtype, depth, scale):
    assert out.dtype == dtype
    err = (out.double() - ref).abs().max().item()
    bound = tolerance(dtype, depth) * scale
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("cfg", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_and_input_gradient(cuda_device, cfg, dtype, layout):
    device = cuda_device
    x_shape, w_shape, stride, padding, dilation, groups = cfg
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(x_shape, device=device).to(dtype).contiguous(memory_format=fmt)
    w = (torch.randn(w_shape, device=device) / math.sqrt(w_shape[1] * w_shape[2] * w_shape[3]))
    w = w.to(dtype)
    b = torch.randn(w_shape[0], device=device).to(dtype)
    x.requires_grad_()
    w.requires_grad_()
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = dtype == torch.float32
    try:
        out = handgrad.ops.conv2d(x, w, b, stride, padding, dilation, groups)
        gy = torch.randn(out.shape, device=device).to(dtype)
        gx, gw = torch.autograd.grad(out, (x, w), gy)
    finally:
        torch.backends.cudnn.allow_tf32 = old
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = reference(x64, w64, b, cfg)
    ref_gx, ref_gw = torch.autograd.grad(ref, (x64, w64), gy.double())
    depth = w_shape[1] * w_shape[2] * w_shape[3]
    check(out, ref.detach(), dtype, depth, scale=1 + ref.abs().max().item())
    depth_in = w_shape[0] // groups * w_shape[2] * w_shape[3]
    check(gx, ref_gx, dtype, depth_in, scale=1 + ref_gx.abs().max().item())
    # grad_weight reduces over every output pixel of the batch
    check(gw, ref_gw, dtype, out[0, 0].numel() * out.shape[0], scale=1 + ref_gw.abs().max().item())
    assert out.is_contiguous(memory_format=fmt) or out.numel() <= 1


def test_tf32_is_used_only_when_allowed(cuda_device):
    device = cuda_device
    x = torch.randn(2, 8, 6, 6, device=device) * 3
    w = torch.randn(8, 8, 3, 3, device=device)
    exact = F.conv2d(x.double(), w.double(), padding=1)
    old = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        off = handgrad.ops.conv2d(x, w, padding=1)
        torch.backends.cudnn.allow_tf32 = True
        on = handgrad.ops.conv2d(x, w, padding=1)
    finally:
        torch.backends.cudnn.allow_tf32 = old
    err_off = (off.double() - exact).abs().max().item()
    err_on = (on.double() - exact).abs().max().item()
    assert err_off < 1e-4          # float32 arithmetic
    assert 1e-4 < err_on < 5e-2    # TF32: 10-bit mantissas


# (input shape, weight shape, stride, padding, dilation): groups = input channels
DEPTHWISE = [
    ((2, 8, 9, 9), (8, 1, 3, 3), 1, 1, 1),
    ((2, 6, 10, 7), (12, 1, 3, 3), 2, 1, 1),     # multiplier 2, stride 2
    ((1, 5, 11, 11), (15, 1, 5, 3), 1, (2, 1), (1, 2)),  # multiplier 3, dilation
    ((3, 4, 6, 6), (4, 1, 1, 1), 1, 0, 1),       # 1x1
    ((2, 40, 48, 48), (40, 1, 3, 3), 1, 1, 1),   # 4608 pixels: several weight-gradient splits
]


@pytest.mark.parametrize("cfg", DEPTHWISE, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_depthwise(cuda_device, cfg, dtype, layout):
    device = cuda_device
    x_shape, w_shape, stride, padding, dilation = cfg
    groups = x_shape[1]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(x_shape, device=device).to(dtype).contiguous(memory_format=fmt)
    w = torch.randn(w_shape, device=device).to(dtype)
    b = torch.randn(w_shape[0], device=device).to(dtype)
    x.requires_grad_()
    w.requires_grad_()
    out = handgrad.ops.conv2d(x, w, b, stride, padding, dilation, groups)
    gy = torch.randn(out.shape, device=device).to(dtype)
    gx, gw = torch.autograd.grad(out, (x, w), gy)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = F.conv2d(x64, w64, b.double(), stride, padding, dilation, groups)
    ref_gx, ref_gw = torch.autograd.grad(ref, (x64, w64), gy.double())
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(gx, ref_gx)
        torch.testing.assert_close(gw, ref_gw)
        return
    # float32 accumulation: the operands are exact in float32, so only the
    # accumulation and the final rounding to the dtype err.
    eps = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
    taps = w_shape[2] * w_shape[3]
    multiplier = w_shape[0] // groups
    for mine, exact, depth in ((out, ref, taps), (gx, ref_gx, taps * multiplier),
                               (gw, ref_gw, out[:, 0].numel())):
        bound = (eps + depth * 2.0 ** -24) * (1 + exact.abs().max().item()) * 2
        assert (mine.double() - exact).abs().max().item() <= bound


def test_depthwise_weight_gradient_is_deterministic(cuda_device):
    device = cuda_device
    x = torch.randn(2, 40, 48, 48, device=device)
    w = torch.randn(40, 1, 3, 3, device=device, requires_grad=True)
    grads = []
    for _ in range(2):
        out = handgrad.ops.conv2d(x, w, None, 1, 1, 1, 40)
        grads.append(torch.autograd.grad(out.sum(), w)[0])
    assert torch.equal(grads[0], grads[1])
