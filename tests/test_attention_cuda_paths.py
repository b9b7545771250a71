"""scaled_dot_product_attention's tensor-core kernels on the CUDA emulator or a
GPU: the FlashAttention-2 forward, dK/dV and dQ kernels of
csrc/ops/cuda/attention_tensor_core.cuh (float16 / bfloat16 on mma m16n8k16,
head tiles 64 / 128 / 256). Compared by value with float64 references of the
same rounded inputs, element by element, at bounds from a rounding analysis
in the dtype's epsilon over the terms of each reduction (error_bounds); the
emulator's launch statistics prove which kernels ran.

Sizes are small on purpose: the emulator runs every CUDA thread as a fiber,
and each warp-wide mma costs about 64 fiber switches."""

import math

import pytest
import torch
import torch.nn.functional as F

import handgrad
from handgrad import cuda_emulation
from helpers import runs_cuda_kernels
from test_attention import _documented_keep_pattern

sdpa = handgrad.ops.scaled_dot_product_attention
DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["float16", "bfloat16"]
TENSOR_CORE_KERNELS = ("fa2_forward", "fa2_dq", "fa2_dkdv")
ROW_KERNELS = ("forward_kernel_impl", "dq_kernel", "dkdv_kernel")


@pytest.fixture
def cuda_device(device):
    if not runs_cuda_kernels(device):
        pytest.skip("these kernels are CUDA paths")
    return device


def emulated(device):
    return device.type == "cpu" and cuda_emulation.active()


def launches(names):
    """{name: launches} of the emulated kernels whose names contain each name."""
    stats = cuda_emulation.launch_statistics()
    return {n: sum(v[0] for k, v in stats.items() if n in k) for n in names}


def head_tiles():
    """The head tiles (template argument D) of the emulated fa2_forward launches."""
    tiles = set()
    for name in cuda_emulation.launch_statistics():
        if "fa2_forward" in name:
            args = name[name.index("fa2_forward<") + len("fa2_forward<"):].split(",")
            tiles.add(int(args[1]))
    return tiles


def expect_kernels(device, tensor_cores, backward=True):
    """Asserts (on the emulator) which kernels the last call launched."""
    if not emulated(device):
        return
    got = launches(TENSOR_CORE_KERNELS + ROW_KERNELS)
    wanted = TENSOR_CORE_KERNELS if backward else TENSOR_CORE_KERNELS[:1]
    others = ROW_KERNELS if backward else ROW_KERNELS[:1]
    if not tensor_cores:
        wanted, others = others, wanted
    assert all(got[n] > 0 for n in wanted), got
    assert all(got[n] == 0 for n in others), got


def reset(device):
    if emulated(device):
        cuda_emulation.reset_launch_statistics()


def reference(q, k, v, mask=None, **kw):
    """float64 native SDPA of the same (rounded) values; returns leaves and output."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    m64 = mask
    if mask is not None and mask.is_floating_point():
        m64 = mask.detach().double().requires_grad_(mask.requires_grad)
    out = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=m64, **kw)
    return (q64, k64, v64, m64), out


def error_bounds(q, k, v, grad_out, out, mask=None, keep=None, p=0.0, is_causal=False,
                 scale=None, enable_gqa=False):
    """Per-element bounds on |kernel - float64 reference| for out, dQ, dK, dV
    and dS (the float mask's gradient, before summing over its broadcast).

    First-order rounding analysis, u = eps / 2 the unit roundoff: each result
    is rounded once to the dtype (u |result|); inside, every product term has
    one 16-bit factor that the exact computation does not round -- P o Z in
    O and dV, dS in dQ and dK (u per term, so u times the sum of the terms'
    magnitudes) -- and D = rowsum(dO o O) is formed from the output rounded to
    the dtype (|dD| <= u sum |dO o O|, entering dS through P). P itself
    carries the float32 error of the score products (E 2^-24 sum |q k| scale,
    twice: the score and lse). The bound charges eps = 2u where the analysis
    gives u, which also covers the float32 accumulation (n 2^-24 per sum, n
    <= a few hundred here) and second-order terms."""
    eps = torch.finfo(q.dtype).eps
    q, k, v, go, rounded_out = (t.detach().double() for t in (q, k, v, grad_out, out))
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    L, S = q.shape[-2], k.shape[-2]
    scores = q @ kk.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + (mask.detach().double() if mask.is_floating_point() else
                           torch.zeros(mask.shape, dtype=torch.float64,
                                       device=mask.device).masked_fill(~mask, float("-inf")))
    if is_causal:
        scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1),
                                    float("-inf"))
    P = torch.softmax(scores, -1).nan_to_num(0.0)
    Z = keep.double() / (1 - p) if keep is not None else torch.ones_like(P)
    PZ = P * Z
    O = PZ @ vv
    dP = go @ vv.transpose(-1, -2)
    D = (go * O).sum(-1, keepdim=True)
    dS = P * (dP * Z - D)
    P_err = P * 2 * q.shape[-1] * 2.0 ** -24 * (q.abs() @ kk.abs().transpose(-1, -2)) * scale
    dS_err = eps * (dS.abs() + P * (go.abs() * rounded_out.abs()).sum(-1, keepdim=True)) + \
        P_err * (dP * Z - D).abs()
    PZ_err = eps * PZ + P_err * Z

    def per_kv_head(t):  # sums the query heads of each group (GQA)
        return t.view(t.shape[0], k.shape[1], group, *t.shape[2:]).sum(2)

    dQ = dS @ kk * scale
    dK = per_kv_head(dS.transpose(-1, -2) @ q) * scale
    dV = per_kv_head(PZ.transpose(-1, -2) @ go)
    return {
        "out": eps * O.abs() + PZ_err @ vv.abs(),
        "dq": eps * dQ.abs() + scale * dS_err @ kk.abs(),
        "dk": eps * dK.abs() + scale * per_kv_head(dS_err.transpose(-1, -2) @ q.abs()),
        "dv": eps * dV.abs() + per_kv_head(PZ_err.transpose(-1, -2) @ go.abs()),
        "ds": dS_err,
    }


def assert_within(actual, reference, bound, what):
    err = (actual.detach().double() - reference.detach().double()).abs()
    assert err.shape == bound.shape
    ratio = (err / bound).nan_to_num(0.0, posinf=float("inf"))  # 0 / 0: exact
    worst = ratio.max().item() if ratio.numel() else 0.0
    assert worst <= 1.0, "%s: error %.3g x its bound" % (what, worst)


def make(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen).to(dtype).to(device).requires_grad_()


# (query, key, value shapes, kwargs, mask): tails of every tile (forward rows
# 128 / 64, keys 64 / 32; dK/dV keys 128 / 64, queries 64 / 32), causal
# diagonals, GQA, E != Ev, padded head sizes (8, 24, 136), every head tile.
CASES = [
    ((2, 2, 77, 64), (2, 2, 77, 64), (2, 2, 77, 64), {}, None),
    ((1, 2, 150, 64), (1, 2, 130, 64), (1, 2, 130, 64), {"is_causal": True}, None),
    ((1, 2, 40, 128), (1, 2, 100, 128), (1, 2, 100, 128), {}, "bool_2d"),
    ((1, 4, 37, 128), (1, 2, 70, 128), (1, 2, 70, 64), {"enable_gqa": True}, "float_heads"),
    ((1, 4, 33, 256), (1, 2, 70, 256), (1, 2, 70, 256), {"is_causal": True, "enable_gqa": True},
     None),
    ((2, 1, 20, 256), (2, 1, 45, 256), (2, 1, 45, 136), {"scale": 0.05}, "bool_keys"),
    ((1, 3, 19, 8), (1, 3, 200, 8), (1, 3, 200, 24), {}, "float_2d"),
    ((1, 1, 1, 64), (1, 1, 5, 64), (1, 1, 5, 64), {}, None),
    ((3, 1, 70, 32), (3, 1, 70, 32), (3, 1, 70, 32), {"is_causal": True}, None),
]


def make_mask(kind, q_shape, k_shape, dtype, device, gen):
    B, H, L, S = q_shape[0], q_shape[1], q_shape[2], k_shape[2]
    if kind is None:
        return None
    if kind == "bool_2d":
        m = torch.rand(L, S, generator=gen) > 0.4
    elif kind == "bool_keys":  # key padding, broadcast over heads and rows
        m = torch.rand(B, 1, 1, S, generator=gen) > 0.3
    elif kind == "float_heads":  # (H, L, S): broadcast over the batch
        return torch.randn(H, L, S, generator=gen).to(dtype).to(device)
    elif kind == "float_2d":
        return torch.randn(L, S, generator=gen).masked_fill(
            torch.rand(L, S, generator=gen) > 0.8, float("-inf")).index_fill(
            -1, torch.tensor([0]), 0.0).to(dtype).to(device)
    m[..., 0] = True
    return m.to(device)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "%s-%s-%s" % (c[0], c[2][-1], c[3] or c[4]))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_and_backward_match_float64(cuda_device, case, dtype):
    device = cuda_device
    q_shape, k_shape, v_shape, kw, mask_kind = case
    gen = torch.Generator().manual_seed(sum(q_shape) + k_shape[-1] + v_shape[-1])
    q, k, v = (make(s, dtype, device, gen) for s in (q_shape, k_shape, v_shape))
    mask = make_mask(mask_kind, q_shape, k_shape, dtype, device, gen)
    reset(device)
    out = sdpa(q, k, v, attn_mask=mask, **kw)
    grad_out = torch.randn(out.shape, generator=gen).to(dtype).to(device)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expect_kernels(device, tensor_cores=True)
    if emulated(device):
        widest = max(q_shape[-1], v_shape[-1])
        assert head_tiles() == {64 if widest <= 64 else 128 if widest <= 128 else 256}
    (q64, k64, v64, _), ref = reference(q, k, v, mask, **kw)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    bounds = error_bounds(q, k, v, grad_out, out, mask, **kw)
    for name, mine, exact in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert_within(mine, exact, bounds[name], name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_lse_and_rows_that_see_no_key(cuda_device, dtype):
    device = cuda_device
    gen = torch.Generator().manual_seed(2)
    q, k, v = (make((1, 2, 21, 64), dtype, device, gen) for _ in range(3))
    mask = torch.rand(21, 21, generator=gen) > 0.5
    mask[:, 0] = True
    mask[4] = False  # sees nothing: output 0, lse +inf, no gradient
    mask = mask.to(device)
    reset(device)
    out, lse, _, _ = torch.ops.handgrad.scaled_dot_product_attention(q, k, v, mask)
    expect_kernels(device, tensor_cores=True, backward=False)
    scores = (q.double() @ k.double().transpose(-1, -2) / 8).masked_fill(~mask, float("-inf"))
    expected = torch.logsumexp(scores, -1).nan_to_num(neginf=float("inf"))
    assert lse.dtype == torch.float32
    assert torch.isinf(lse[:, :, 4]).all() and (out[:, :, 4] == 0).all()
    finite = torch.isfinite(expected)
    torch.testing.assert_close(lse[finite].double(), expected[finite], rtol=0, atol=1e-5)
    grads = torch.autograd.grad(sdpa(q, k, v, attn_mask=mask), (q,), torch.ones_like(out))
    assert (grads[0][:, :, 4] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_rows_spread_like_the_float64_kernels(cuda_device, dtype):
    # A NaN query makes its row NaN (output, lse, and through D every dK / dV
    # it reaches); the same positions as the one-row-per-thread kernels in
    # float64, which test_attention holds to native.
    device = cuda_device
    gen = torch.Generator().manual_seed(4)
    q, k, v = (make((1, 2, 19, 64), dtype, device, gen) for _ in range(3))
    with torch.no_grad():
        q[0, 1, 7, 3] = float("nan")
    results = []
    for args in ((q, k, v), tuple(t.detach().double().requires_grad_() for t in (q, k, v))):
        out = sdpa(*args)
        results.append([out] + list(torch.autograd.grad(out, args, torch.ones_like(out))))
    for mine, exact in zip(*results):
        assert torch.equal(mine.isnan(), exact.isnan())
        assert mine.isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_pattern_and_gradients(cuda_device, dtype):
    # value = I exposes the keep pattern: it must be the documented Philox
    # stream (the one the existing CUDA kernels and the CPU kernel draw), and
    # backward must regenerate it -- compared with an explicit float64
    # reference that applies that pattern.
    device = cuda_device
    p, L, S = 0.3, 37, 72
    gen = torch.Generator().manual_seed(6)
    q, k = make((1, 2, L, 16), dtype, device, gen), make((1, 2, S, 16), dtype, device, gen)
    eye = torch.eye(S, dtype=dtype, device=device).expand(1, 2, S, S)
    reset(device)
    torch.manual_seed(21)
    out, _, rng_state, _ = torch.ops.handgrad.scaled_dot_product_attention(q, k, eye, None, p)
    expect_kernels(device, tensor_cores=True, backward=False)
    keep = _documented_keep_pattern(rng_state, p, 2, L, S).view(1, 2, L, S).to(device)
    assert torch.equal(out != 0, keep)
    assert 0.6 < keep.double().mean().item() < 0.8

    v = make((1, 2, S, 40), dtype, device, gen)
    torch.manual_seed(21)
    reset(device)
    out = sdpa(q, k, v, dropout_p=p)
    grad_out = torch.randn(out.shape, generator=gen).to(dtype).to(device)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expect_kernels(device, tensor_cores=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    probs = torch.softmax(q64 @ k64.transpose(-1, -2) / 4, -1)
    ref = (probs * keep / (1 - p)) @ v64
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    bounds = error_bounds(q, k, v, grad_out, out, keep=keep, p=p)
    for name, mine, exact in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert_within(mine, exact, bounds[name], name)


@pytest.mark.parametrize("mask_shape", [(37, 70), (2, 1, 1, 70), (4, 37, 70)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_float_mask_gradient(cuda_device, dtype, mask_shape):
    # dS written by fa2_dq (float32), summed over the mask's broadcast.
    device = cuda_device
    gen = torch.Generator().manual_seed(8)
    q = make((2, 4, 37, 64), dtype, device, gen)
    k, v = make((2, 2, 70, 64), dtype, device, gen), make((2, 2, 70, 32), dtype, device, gen)
    mask = make(mask_shape, dtype, device, gen)
    reset(device)
    out = sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    grad_out = torch.randn(out.shape, generator=gen).to(dtype).to(device)
    grads = torch.autograd.grad(out, (q, k, v, mask), grad_out)
    expect_kernels(device, tensor_cores=True)
    (q64, k64, v64, m64), ref = reference(q, k, v, mask, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64, m64), grad_out.double())
    assert grads[3].dtype == dtype and grads[3].shape == mask.shape
    bounds = error_bounds(q, k, v, grad_out, out, mask, enable_gqa=True)
    # the mask's gradient: dS summed over the copies the mask is broadcast to
    # (in float32, then rounded once to the dtype)
    mask_bound = bounds["ds"].sum_to_size(mask.shape) + \
        torch.finfo(dtype).eps * ref_grads[3].abs()
    assert_within(grads[3], ref_grads[3], mask_bound, "dmask")
    for name, mine, exact in zip(("dq", "dk", "dv"), grads[:3], ref_grads[:3]):
        assert_within(mine, exact, bounds[name], name)


def test_backward_is_bit_identical_across_runs(cuda_device):
    device = cuda_device
    gen = torch.Generator().manual_seed(10)
    q = make((2, 4, 90, 64), torch.bfloat16, device, gen)
    k, v = make((2, 2, 90, 64), torch.bfloat16, device, gen), make((2, 2, 90, 64),
                                                                    torch.bfloat16, device, gen)
    mask = make((90, 90), torch.bfloat16, device, gen)
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        out = sdpa(q, k, v, attn_mask=mask, dropout_p=0.2, enable_gqa=True)
        results.append([out] + list(torch.autograd.grad(out.float().sin().sum(), (q, k, v, mask))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_unaligned_rows_are_copied_not_misread(cuda_device):
    # Rows 68 elements apart (not a multiple of 8): cp.async needs 16-byte
    # rows, so the kernels read a contiguous copy; same bits as contiguous input.
    device = cuda_device
    gen = torch.Generator().manual_seed(12)
    wide = [make((1, 2, 33, 68), torch.float16, device, gen) for _ in range(3)]
    views = [t[..., :64] for t in wide]
    dense = [t.detach().contiguous().requires_grad_() for t in views]
    a = sdpa(*views, is_causal=True)
    b = sdpa(*dense, is_causal=True)
    assert views[0].stride(2) == 68 and torch.equal(a, b)
    ga = torch.autograd.grad(a, wide, torch.ones_like(a))
    gb = torch.autograd.grad(b, dense, torch.ones_like(b))
    for x, y in zip(ga, gb):
        assert torch.equal(x[..., :64], y) and not x[..., 64:].any()


@pytest.mark.parametrize("what", ["float32", "head_size_12", "head_size_264", "need_weights",
                                  "value_size_0"])
def test_other_calls_keep_the_row_kernels(cuda_device, what):
    # The tensor cores take float16 / bfloat16 with E, Ev multiples of 8 up
    # to 256 and no weights output; everything else the existing kernels.
    device = cuda_device
    if not emulated(device):
        pytest.skip("reads the emulator's launch statistics")
    dtype = torch.float32 if what == "float32" else torch.float16
    E = {"head_size_12": 12, "head_size_264": 264}.get(what, 64)
    Ev = 0 if what == "value_size_0" else E
    q, k = torch.randn(1, 2, 9, E).to(dtype), torch.randn(1, 2, 11, E).to(dtype)
    v = torch.randn(1, 2, 11, Ev).to(dtype)
    reset(device)
    torch.ops.handgrad.scaled_dot_product_attention(q, k, v, None, 0.0, False, None, False,
                                                    what == "need_weights")
    expect_kernels(device, tensor_cores=False, backward=False)
    # and the same call in a size the tensor cores take does go there
    reset(device)
    torch.ops.handgrad.scaled_dot_product_attention(*(torch.randn(1, 2, 9, 8).bfloat16()
                                                      for _ in range(3)))
    expect_kernels(device, tensor_cores=True, backward=False)


def test_no_keys(cuda_device):
    device = cuda_device
    q = torch.randn(1, 2, 5, 64, device=device).half()
    k, v = torch.randn(1, 2, 0, 64, device=device).half(), torch.randn(1, 2, 0, 64,
                                                                       device=device).half()
    out, lse, _, _ = torch.ops.handgrad.scaled_dot_product_attention(q, k, v)
    assert (out == 0).all() and torch.isinf(lse).all()
