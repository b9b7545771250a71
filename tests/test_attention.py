"""handgrad.ops.scaled_dot_product_attention and handgrad.nn.MultiheadAttention
against torch.nn.functional.scaled_dot_product_attention / torch.nn.MultiheadAttention."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import handgrad
from conftest import requires_cuda, requires_emulation
from handgrad import cuda_emulation
from helpers import assert_matches_native, assert_script_prints_ok, in_layout, runs_cuda_kernels

sdpa = handgrad.ops.scaled_dot_product_attention

# (query shape, key shape, value shape, enable_gqa)
SHAPES = [
    ((2, 3, 7, 5), (2, 3, 9, 5), (2, 3, 9, 4), False),           # L != S, Ev != E
    ((2, 2, 129, 16), (2, 2, 129, 16), (2, 2, 129, 16), False),  # several tiles, partial last
    ((1, 1, 1, 8), (1, 1, 7, 8), (1, 1, 7, 8), False),           # L = 1
    ((1, 2, 200, 8), (1, 2, 70, 8), (1, 2, 70, 12), False),      # L > S, two-pass backward
    ((2, 4, 65, 8), (2, 2, 130, 8), (2, 2, 130, 8), True),       # grouped-query attention
    ((1, 6, 33, 8), (1, 2, 150, 8), (1, 2, 150, 4), True),       # GQA, two-pass backward
    ((3, 2, 2, 5, 6), (3, 2, 2, 8, 6), (3, 2, 2, 8, 6), False),  # two batch dimensions
    ((5, 7, 4), (5, 9, 4), (5, 9, 3), False),                    # no batch dimension
    ((7, 4), (9, 4), (9, 3), False),                             # 2-D
    ((1, 2, 300, 4), (1, 2, 1100, 4), (1, 2, 1100, 3), False),   # several forward key tiles
]


def make_qkv(shapes, dtype=torch.float64, device="cpu"):
    return [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in shapes[:3]]


def make_mask(kind, q, k, device="cpu"):
    """Masks broadcastable to (..., Hq, L, S); every row keeps at least key 0."""
    L, S = q.shape[-2], k.shape[-2]
    batch = q.shape[:-2]
    if kind is None:
        return None
    if kind == "bool_2d":
        m = torch.rand(L, S, device=device) > 0.4
    elif kind == "bool_full":
        m = torch.rand(*batch, L, S, device=device) > 0.4
    elif kind == "bool_keys":  # key padding: (batch..., 1, 1, S)
        m = torch.rand(*batch[:-1], 1, 1, S, device=device) > 0.3 if len(batch) >= 1 else \
            torch.rand(1, S, device=device) > 0.3
    elif kind == "float_heads":  # varies over heads only: (Hq, L, S)
        return torch.randn(*batch[-1:], L, S, dtype=q.dtype, device=device)
    elif kind == "float_2d":
        return torch.randn(L, S, dtype=q.dtype, device=device).masked_fill(
            torch.rand(L, S, device=device) > 0.7, float("-inf")).index_fill(
            -1, torch.tensor([0], device=device), 0.0)
    else:
        raise ValueError(kind)
    m[..., 0] = True
    return m


def call(fn, mask=None, **kw):
    return lambda q, k, v: fn(q, k, v, attn_mask=mask, **kw)


MASKS = [None, "bool_2d", "bool_full", "bool_keys", "float_heads", "float_2d"]


@pytest.mark.parametrize("shapes", SHAPES, ids=str)
@pytest.mark.parametrize("mask", MASKS + ["causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_native(device, shapes, mask, dtype):
    q, k, v = make_qkv(shapes, dtype, device)
    kw = dict(enable_gqa=shapes[3])
    if mask == "causal":
        kw["is_causal"] = True
        m = None
    else:
        m = make_mask(mask, q, k, device)
    # float32: sums over keys and features are ordered differently (tiles, BLAS).
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else {}
    assert_matches_native(call(sdpa, m, **kw), call(F.scaled_dot_product_attention, m, **kw),
                          [q, k, v], **tol)


@pytest.mark.parametrize("layout", ["noncontiguous", "transposed"])
def test_strided_inputs(device, layout):
    def lay(x):
        if layout == "transposed":  # (B, L, H, E) storage, as MultiheadAttention produces
            return x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        return in_layout(x.detach(), layout).requires_grad_()

    q, k, v = (lay(t) for t in make_qkv(SHAPES[1], torch.float64, device))
    m = make_mask("bool_keys", q, k, device)
    assert_matches_native(call(sdpa, m), call(F.scaled_dot_product_attention, m), [q, k, v])


def test_custom_scale_and_empty(device):
    q, k, v = make_qkv(SHAPES[0], torch.float64, device)
    assert_matches_native(call(sdpa, scale=0.37), call(F.scaled_dot_product_attention, scale=0.37),
                          [q, k, v])
    q, k, v = make_qkv(((0, 2, 5, 4), (0, 2, 6, 4), (0, 2, 6, 3)), torch.float64, device)
    out, grads = assert_matches_native(call(sdpa), call(F.scaled_dot_product_attention), [q, k, v])
    assert out[0].shape == (0, 2, 5, 3)
    for shapes in (((2, 2, 5, 4), (2, 2, 0, 4), (2, 2, 0, 3)),   # no keys: output 0
                   ((2, 2, 0, 4), (2, 2, 6, 4), (2, 2, 6, 3))):  # no queries
        q, k, v = make_qkv(shapes, torch.float64, device)
        assert_matches_native(call(sdpa), call(F.scaled_dot_product_attention), [q, k, v])


def test_rows_whose_first_key_tiles_are_masked(device):
    # Online softmax: a row sees nothing in the first key tiles, then some keys.
    q, k, v = make_qkv(((1, 2, 20, 4), (1, 2, 1300, 4), (1, 2, 1300, 5), False), torch.float64,
                       device)
    m = torch.rand(20, 1300, device=device) > 0.5
    m[:10, :1200] = False
    m[15] = False  # and one row that sees nothing at all
    assert_matches_native(call(sdpa, m), call(F.scaled_dot_product_attention, m), [q, k, v])
    m[:10, 1200:] = False
    m[:10, 0] = True  # only the very first key
    assert_matches_native(call(sdpa, m), call(F.scaled_dot_product_attention, m), [q, k, v])


def test_fully_masked_rows_match_native(device):
    q, k, v = make_qkv(SHAPES[1], torch.float64, device)
    m = torch.rand(129, 129, device=device) > 0.5
    m[3] = False
    m[100] = False
    out, _ = assert_matches_native(call(sdpa, m), call(F.scaled_dot_product_attention, m),
                                   [q, k, v])
    fm = torch.zeros(129, 129, dtype=torch.float64, device=device)
    fm[5] = float("-inf")
    assert_matches_native(call(sdpa, fm), call(F.scaled_dot_product_attention, fm), [q, k, v])
    assert torch.isfinite(out[0]).all()


def assert_close_to_float64(actual, reference, dtype, n, term_scale=0.0):
    """actual (dtype) against the float64 reference of the same (already
    rounded) inputs, element by element: the kernels compute in float32 and
    round each result to the dtype once (relative eps / 2), and recompute
    from saved tensors rounded to the dtype (the output in D = rowsum(dO o O)),
    whose errors add up over the n terms of the reduction like a random
    walk -- so |actual - reference| <= eps * (|reference| + sqrt(n) * rms),
    rms the size of a term: the reference's root mean square, or term_scale
    when that is larger (a sum that cancels -- a gradient that is 0 because
    the values are all equal -- is as uncertain as its terms are large)."""
    eps = torch.finfo(dtype).eps
    reference = reference.detach().double()
    rms = max(reference.square().mean().sqrt().item() if reference.numel() else 0.0, term_scale)
    bound = eps * (reference.abs() + math.sqrt(n) * rms)
    err = (actual.detach().double() - reference).abs()
    ratio = torch.where(err == 0, torch.zeros_like(err), err / bound)  # exact zeros need no bound
    worst = ratio.max().item() if err.numel() else 0.0
    assert worst <= 1.0, "error %.3g x the bound (eps %g, n %d)" % (worst, eps, n)


def assert_reduced_precision_matches_float64(fn_kw, shapes, dtype, device):
    q, k, v = (torch.randn(s, device=device).to(dtype).requires_grad_() for s in shapes)
    out = sdpa(q, k, v, **fn_kw)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, **fn_kw)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    L, S = q.shape[-2], k.shape[-2]
    assert_close_to_float64(out, ref, dtype, S)
    for g, r, n in zip(grads, ref_grads, (S, L, L)):  # dQ sums over keys, dK/dV over queries
        assert_close_to_float64(g, r, dtype, n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision(device, dtype):
    assert_reduced_precision_matches_float64(dict(enable_gqa=True, is_causal=True), SHAPES[4][:3],
                                             dtype, device)


GRADCHECK = [
    (((2, 2, 7, 3), (2, 2, 5, 3), (2, 2, 5, 2), False), None, {}),
    (((2, 2, 7, 3), (2, 2, 5, 3), (2, 2, 5, 2), False), "bool_2d", {}),
    (((2, 2, 7, 3), (2, 2, 5, 3), (2, 2, 5, 2), False), "bool_keys", {}),
    (((2, 2, 7, 3), (2, 2, 5, 3), (2, 2, 5, 2), False), "float_heads", {}),
    (((2, 2, 7, 3), (2, 2, 5, 3), (2, 2, 5, 2), False), "float_2d", {"scale": 0.8}),
    (((2, 2, 7, 3), (2, 2, 9, 3), (2, 2, 9, 4), False), None, {"is_causal": True}),
    (((1, 4, 7, 3), (1, 2, 6, 3), (1, 2, 6, 3), True), None, {}),
    (((2, 4, 6, 3), (2, 1, 7, 3), (2, 1, 7, 2), True), None, {"is_causal": True}),
    (((1, 1, 1, 3), (1, 1, 4, 3), (1, 1, 4, 3), False), None, {}),
    (((1, 1, 129, 2), (1, 1, 70, 2), (1, 1, 70, 1), False), None, {"is_causal": True}),
    (((1, 1, 129, 2), (1, 1, 129, 2), (1, 1, 129, 2), False), "bool_2d", {}),
]


@pytest.mark.parametrize("shapes,mask,kw", GRADCHECK, ids=str)
def test_gradcheck(device, shapes, mask, kw):
    q, k, v = make_qkv(shapes, torch.float64, device)
    m = make_mask(mask, q, k, device)
    fast = q.shape[-2] > 100  # long sequences: random-projection gradcheck keeps it quick
    assert torch.autograd.gradcheck(call(sdpa, m, enable_gqa=shapes[3], **kw), (q, k, v),
                                    fast_mode=fast)


def _dropout_inputs(device, L=256, S=256):
    # q = 0: uniform probabilities 1/S; v = I: the output is the dropped-out P itself.
    q = torch.zeros(1, 1, L, 4, dtype=torch.float64, device=device)
    k = torch.randn(1, 1, S, 4, dtype=torch.float64, device=device)
    v = torch.eye(S, dtype=torch.float64, device=device).view(1, 1, S, S)
    return q, k, v


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_expected_fraction(device, p):
    q, k, v = _dropout_inputs(device)
    out = sdpa(q, k, v, dropout_p=p)
    kept = (out != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 0.01
    # kept entries are scaled by 1 / (1 - p), so the expected row sum stays 1
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / (256 * (1 - p))))
    assert abs(out.sum(-1).mean().item() - 1.0) < 0.01
    # a second call draws a different pattern
    assert not torch.equal(out != 0, sdpa(q, k, v, dropout_p=p) != 0)


def test_dropout_same_seed_same_result(device):
    q, k, v = make_qkv(SHAPES[4], torch.float64, device)
    results = []
    for _ in range(2):
        args = [t.detach().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(123)
        o = sdpa(*args, dropout_p=0.3, enable_gqa=True)
        results.append((o, torch.autograd.grad(o, args, torch.ones_like(o))))
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    no_drop = sdpa(q, k, v, enable_gqa=True)
    assert not torch.allclose(o1, no_drop)


def test_dropout_gradcheck(device):
    q, k, v = make_qkv(((2, 2, 9, 3), (2, 2, 11, 3), (2, 2, 11, 2), False), torch.float64, device)
    m = make_mask("bool_2d", q, k, device)

    def fn(q, k, v):
        torch.manual_seed(7)  # gradcheck calls fn repeatedly: the same pattern every time
        return sdpa(q, k, v, attn_mask=m, dropout_p=0.4)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert not torch.allclose(fn(q, k, v), sdpa(q, k, v, attn_mask=m))


def test_backward_is_deterministic(device):
    for shapes in (SHAPES[1], SHAPES[3]):  # one-pass and two-pass backward
        q, k, v = make_qkv(shapes, torch.float32, device)
        grads = []
        for _ in range(2):
            o = sdpa(q, k, v, is_causal=True)
            grads.append(torch.autograd.grad(o, (q, k, v), torch.ones_like(o)))
        for a, b in zip(*grads):
            assert torch.equal(a, b)


_TILE_PRODUCTS_SCRIPT = r"""
import torch, torch.nn.functional as F, handgrad
torch.manual_seed(0)
# (q, k, v shapes, causal, mask): every tile-product shape of forward and both
# backward schemes, E past one k-block (256) of the AVX-512 product, edge tiles.
cases = [((2, 4, 300, 64), (2, 4, 600, 64), (2, 4, 600, 64), False, False),
         ((1, 2, 130, 300), (1, 2, 70, 300), (1, 2, 70, 40), True, False),
         ((8, 4, 65, 32), (8, 4, 65, 32), (8, 4, 65, 32), False, True),
         ((1, 1, 1, 3), (1, 1, 5, 3), (1, 1, 5, 1), False, True)]
for qs, ks, vs, causal, masked in cases:
    q, k, v = (torch.randn(s, requires_grad=True) for s in (qs, ks, vs))
    mask = torch.rand(qs[-2], ks[-2]) > 0.3 if masked else None
    if masked:
        mask[:, 0] = True
    results = []
    for fn in (handgrad.ops.scaled_dot_product_attention, F.scaled_dot_product_attention):
        o = fn(q, k, v, attn_mask=mask, is_causal=causal)
        results.append([o, *torch.autograd.grad(o.sin().sum(), (q, k, v))])
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4)
print("ok")
"""


@pytest.mark.parametrize("avx512", ["1", "0"])
def test_float32_tile_products_with_and_without_avx512(avx512):
    # float32 tile products run the AVX-512 kernel of common/cpu_gemm.h when
    # the CPU has it and the BLAS sgemm otherwise; HANDGRAD_CPU_AVX512=0 forces
    # the latter, so both are compared with native on an AVX-512 machine.
    assert_script_prints_ok(_TILE_PRODUCTS_SCRIPT, timeout=300, HANDGRAD_CPU_AVX512=avx512)


def test_memory_linear_in_length(device):
    # Only O(L) tensors are saved for backward: q, k, v, the output, one
    # log-sum-exp per row and the 2-element random state.
    saved = []
    q, k, v = make_qkv(((1, 2, 300, 8), (1, 2, 300, 8), (1, 2, 300, 8), False), torch.float32,
                       device)
    mask = torch.rand(300, 300, device=device) > 0.1  # the caller's mask may be saved as is
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sdpa(q, k, v, attn_mask=mask, dropout_p=0.1)
    big = [t.shape for t in saved if t.numel() >= 300 * 300 and t is not mask]
    assert not big, big


# (query, key, value, enable_gqa): broadcast batch dimensions, operands of
# different ranks, one key/value head shared by every query head, GQA, no batch.
_FAKE_SHAPES = [
    ((2, 3, 4), (2, 5, 4), (2, 5, 6), False),
    ((2, 4, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8), True),
    ((2, 4, 3, 8), (2, 1, 5, 8), (2, 1, 5, 8), False),
    ((2, 1, 3, 8), (2, 4, 5, 8), (2, 4, 5, 8), False),
    ((3, 1, 4, 3, 8), (1, 2, 4, 5, 8), (2, 4, 5, 8), False),
    ((4, 3, 8), (2, 4, 5, 8), (1, 4, 5, 8), False),
    ((2, 4, 3, 8), (2, 4, 5, 8), (2, 1, 5, 8), False),
    ((2, 4, 3, 8), (2, 1, 5, 8), (2, 4, 5, 8), False),
    ((3, 8), (5, 8), (5, 2), False),
    ((2, 3, 4, 3, 8), (4, 5, 8), (4, 5, 6), False),
    ((2, 1, 3, 8), (2, 4, 5, 8), (2, 1, 5, 8), False),
    ((2, 1, 3, 8), (2, 1, 5, 8), (2, 4, 5, 8), False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("need_weights", [False, True], ids=["out", "weights"])
@pytest.mark.parametrize("shapes", _FAKE_SHAPES, ids=lambda s: "%s-%s-%s-gqa%d" % s)
def test_fake_kernel_output_shapes_and_dtypes_match_the_kernel(shapes, need_weights, dtype):
    # What torch.compile and opcheck see of the op; opcheck alone ran few of these shapes.
    from torch._subclasses.fake_tensor import FakeTensorMode
    *sizes, gqa = shapes
    q, k, v = (torch.randn(size, dtype=dtype) for size in sizes)
    flags = (None, 0.0, False, None, gqa, need_weights)
    real = torch.ops.handgrad.scaled_dot_product_attention(q, k, v, *flags)
    with FakeTensorMode() as mode:
        fake = torch.ops.handgrad.scaled_dot_product_attention(
            *(mode.from_tensor(t) for t in (q, k, v)), *flags)
    assert [(tuple(t.shape), t.dtype) for t in fake] == [(tuple(t.shape), t.dtype) for t in real]


def test_opcheck(device):
    q, k, v = make_qkv(SHAPES[4], torch.float64, device)
    m = make_mask("bool_keys", q, k, device)
    fm = torch.randn(65, 130, dtype=torch.float64, device=device, requires_grad=True)
    cases = [(q, k, v, m, 0.0, False, None, True), (q, k, v, None, 0.0, True, 0.5, True),
             (q, k, v, fm, 0.0, False, None, True, True),   # weights, a mask with a gradient
             (q[0, :, :5], k[0], v[0], None, 0.0, False, None, True, True)]
    for args in cases:
        torch.library.opcheck(torch.ops.handgrad.scaled_dot_product_attention, args)
    out, lse, rng, weights = torch.ops.handgrad.scaled_dot_product_attention(
        q, k, v, None, 0.2, True, None, True, True)
    # (The backward op's own gradients -- double backward -- are tested in
    # tests/test_autograd_transforms.py.)
    q, k, v, out, weights = (t.detach() for t in (q, k, v, out, weights))
    backward = torch.ops.handgrad.scaled_dot_product_attention_backward
    torch.library.opcheck(backward, (torch.randn_like(out), q, k, v, out, lse, None, 0.2, True,
                                     None, True, rng))
    torch.library.opcheck(backward, (torch.randn_like(out), q, k, v, out, lse, None, 0.2, True,
                                     None, True, rng, weights, torch.randn_like(weights),
                                     [False, True, False, False]))
    out, lse, rng, _ = torch.ops.handgrad.scaled_dot_product_attention(q, k, v, fm, 0.0, False,
                                                                       None, True)
    torch.library.opcheck(backward, (torch.randn_like(out), q, k, v, out.detach(), lse,
                                     fm.detach(), 0.0, False, None, True, rng, None, None,
                                     [True, False, False, True]))


def test_compile_fullgraph(device):
    q, k, v = make_qkv(SHAPES[0], torch.float32, device)
    m = make_mask("bool_keys", q, k, device)
    fn = torch.compile(lambda q, k, v: sdpa(q, k, v, attn_mask=m) * 2, fullgraph=True)
    assert_matches_native(fn, lambda q, k, v: sdpa(q, k, v, attn_mask=m) * 2, [q, k, v])


def _mha_pair(device, dtype=torch.float64, **kw):
    native = torch.nn.MultiheadAttention(16, 4, device=device, dtype=dtype, **kw)
    mine = copy.deepcopy(native)
    mine.__class__ = handgrad.nn.MultiheadAttention
    return native, mine


MHA_OPTIONS = [{}, {"bias": False}, {"kdim": 5, "vdim": 6}, {"bias": False, "kdim": 5, "vdim": 6},
               {"add_bias_kv": True}, {"add_zero_attn": True, "batch_first": True},
               {"batch_first": True, "kdim": 7}]


@pytest.mark.parametrize("options", MHA_OPTIONS, ids=str)
@pytest.mark.parametrize("masks", ["none", "bool", "float3d", "kpm", "kpm+bool"])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_multihead_attention_matches_native(device, options, masks, need_weights, average):
    native, mine = _mha_pair(device, **options)
    L, S, N = 5, 7, 3
    bf = options.get("batch_first", False)
    shape = (lambda s, d: (N, s, d)) if bf else (lambda s, d: (s, N, d))
    q = torch.randn(shape(L, 16), dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(shape(S, options.get("kdim", 16)), dtype=torch.float64, device=device,
                    requires_grad=True)
    v = torch.randn(shape(S, options.get("vdim", 16)), dtype=torch.float64, device=device,
                    requires_grad=True)
    kw = dict(need_weights=need_weights, average_attn_weights=average)
    if "kpm" in masks:
        kpm = torch.rand(N, S, device=device) > 0.6
        kpm[:, 0] = False
        kw["key_padding_mask"] = kpm
    if "bool" in masks:
        am = torch.rand(L, S, device=device) > 0.6
        am[:, 0] = False
        kw["attn_mask"] = am
    if masks == "float3d":
        kw["attn_mask"] = torch.randn(N * 4, L, S, dtype=torch.float64, device=device)

    def run(module):
        out, weights = module(q, k, v, **kw)
        loss = out.square().sum() + (weights.sum() * 0.5 if weights is not None else 0)
        params = [p for p in module.parameters()]
        return out, weights, torch.autograd.grad(loss, [q, k, v] + params)

    o1, w1, g1 = run(native)
    o2, w2, g2 = run(mine)
    torch.testing.assert_close(o2, o1)
    assert (w1 is None) == (w2 is None)
    if w1 is not None:
        torch.testing.assert_close(w2, w1)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_unbatched_and_causal(device, need_weights):
    native, mine = _mha_pair(device)
    x = torch.randn(6, 16, dtype=torch.float64, device=device)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64,
                                                                  device=device)
    for kw in (dict(), dict(attn_mask=causal, is_causal=True),
               dict(key_padding_mask=torch.tensor([False] * 5 + [True], device=device))):
        o1, w1 = native(x, x, x, need_weights=need_weights, **kw)
        o2, w2 = mine(x, x, x, need_weights=need_weights, **kw)
        torch.testing.assert_close(o2, o1)
        if need_weights:
            torch.testing.assert_close(w2, w1)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        mine(x, x, x, is_causal=True)


def test_multihead_attention_dropout_and_patch(device):
    model = torch.nn.Sequential()
    model.append(torch.nn.MultiheadAttention(16, 4, dropout=0.3, device=device))
    handgrad.patch(model, strict=True)
    mha = model[0]
    assert type(mha) is handgrad.nn.MultiheadAttention
    x = torch.randn(5, 2, 16, device=device)
    torch.manual_seed(3)
    o1, w1 = mha(x, x, x)
    torch.manual_seed(3)
    o2, w2 = mha(x, x, x)
    assert torch.equal(o1, o2) and torch.equal(w1, w2)
    # the returned weights are the dropped-out ones that produced the output
    assert (w1 == 0).any()
    mha.eval()
    o3, w3 = mha(x, x, x)
    assert not torch.allclose(o1, o3)
    # In eval mode no dropout at all: native's eval output, whatever the RNG.
    native = torch.nn.MultiheadAttention(16, 4, dropout=0.3, device=device).eval()
    native.load_state_dict(mha.state_dict())
    o4, w4 = native(x, x, x)
    torch.testing.assert_close((o3, w3), (o4, w4), atol=1e-6, rtol=1e-5)
    assert set(mha.state_dict()) == set(torch.nn.MultiheadAttention(16, 4).state_dict())


def test_multihead_attention_compile(device):
    native, mine = _mha_pair(device, dtype=torch.float32, batch_first=True)
    x = torch.randn(2, 5, 16, device=device)
    compiled = torch.compile(mine, fullgraph=True)
    o1, w1 = compiled(x, x, x)
    o2, w2 = native(x, x, x)
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w1, w2, atol=1e-5, rtol=1e-4)


def test_bad_input(device):
    q, k, v = make_qkv(SHAPES[0], torch.float32, device)
    with pytest.raises(RuntimeError, match="same head size"):
        sdpa(q, k[..., :3], v)
    with pytest.raises(RuntimeError, match="not broadcastable"):
        sdpa(q, k, v, attn_mask=torch.ones(3, 9, dtype=torch.bool, device=device))
    with pytest.raises(RuntimeError, match="cannot be used together"):
        sdpa(q, k, v, attn_mask=torch.ones(7, 9, dtype=torch.bool, device=device),
             is_causal=True)
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dropout_p must be in"):
            sdpa(q, k, v, dropout_p=p)
    with pytest.raises(RuntimeError, match="same dtype"):
        sdpa(q, k.double(), v)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        sdpa(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="attn_mask to be bool or floating"):
        sdpa(q, k, v, attn_mask=torch.ones(7, 9, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="enable_gqa"):
        sdpa(torch.randn(1, 4, 3, 2, device=device), torch.randn(1, 2, 3, 2, device=device),
             torch.randn(1, 2, 3, 2, device=device))
    with pytest.raises(RuntimeError, match="multiple of"):
        sdpa(torch.randn(1, 3, 3, 2, device=device), torch.randn(1, 2, 3, 2, device=device),
             torch.randn(1, 2, 3, 2, device=device), enable_gqa=True)
    with pytest.raises(RuntimeError, match="same sequence length"):
        sdpa(q, k, v[..., :4, :])
    with pytest.raises(RuntimeError, match="batch dimensions of query, key and value must be "
                                           "broadcastable"):
        sdpa(q, k[:1].expand(3, -1, -1, -1), v[:1].expand(3, -1, -1, -1))
    with pytest.raises(RuntimeError, match="at least 2 dimensions"):
        sdpa(q, k[0, 0, 0], v)
    with pytest.raises(RuntimeError, match="same number of heads"):
        sdpa(q, k, v[:, :2])
    with pytest.raises(RuntimeError, match="no gradient"):
        out, lse, rng, _ = torch.ops.handgrad.scaled_dot_product_attention(q, k, v)
        bool_mask = torch.ones(7, 9, dtype=torch.bool, device=device)
        torch.ops.handgrad.scaled_dot_product_attention_backward(
            out, q, k, v, out, lse, bool_mask, 0.0, False, None, False, rng, None, None,
            [True, True, True, True])
    out, lse, rng, weights = torch.ops.handgrad.scaled_dot_product_attention(
        q, k, v, None, 0.0, False, None, False, True)
    backward = torch.ops.handgrad.scaled_dot_product_attention_backward
    with pytest.raises(RuntimeError, match="weights and grad_weights must be given together"):
        backward(out, q, k, v, out, lse, None, 0.0, False, None, False, rng, weights)
    with pytest.raises(RuntimeError, match="expected grad_weights of shape"):
        backward(out, q, k, v, out, lse, None, 0.0, False, None, False, rng, weights,
                 weights[..., :3])
    with pytest.raises(RuntimeError, match="rng_state must be"):
        backward(out, q, k, v, out, lse, None, 0.0, False, None, False, rng[:1])


@pytest.mark.gpu  # kept when a run is narrowed to the GPU (HANDGRAD_TEST_DEVICES=cuda)
@requires_cuda
def test_mixed_devices_cuda():
    q, k, v = make_qkv(SHAPES[0], torch.float32)
    with pytest.raises(RuntimeError, match="same device"):
        sdpa(q.cuda(), k, v)
    with pytest.raises(RuntimeError, match="query and attn_mask to be on the same device"):
        sdpa(q.cuda(), k.cuda(), v.cuda(), attn_mask=torch.ones(7, 9, dtype=torch.bool))


MIXED_DEVICES = [("cpu", "meta", "cpu", None), ("meta", "cpu", "cpu", None),
                 ("cpu", "cpu", "meta", None), ("cpu", "cpu", "cpu", "meta"),
                 ("meta", "meta", "meta", "cpu"), ("meta", "cpu", "cpu", "cpu")]


@pytest.mark.parametrize("devices", MIXED_DEVICES, ids=str)
def test_mixed_devices_meta(devices):
    # Without a GPU, a meta tensor stands in for the second device. A meta
    # mask beside CPU inputs used to reach the fake kernel, which returned an
    # uninitialised CPU output.
    dq, dk, dv, dm = devices
    q, k, v = (t.to(d) for t, d in zip(make_qkv(SHAPES[0], torch.float32), (dq, dk, dv)))
    mask = None if dm is None else torch.ones(7, 9, dtype=torch.bool, device=dm)
    name, other = next((n, d) for n, d in zip(("key", "value", "attn_mask"), (dk, dv, dm))
                       if d is not None and d != dq)
    with pytest.raises(RuntimeError) as error:
        sdpa(q, k, v, attn_mask=mask)
    assert str(error.value) == (
        "handgrad::scaled_dot_product_attention: expected query and %s to be on the same "
        "device, but query is on %s and %s is on %s" % (name, dq, name, other))


def test_mixed_devices_in_backward():
    q, k, v = make_qkv(SHAPES[0], torch.float64)
    out, lse, rng, _ = torch.ops.handgrad.scaled_dot_product_attention(q, k, v)
    backward = torch.ops.handgrad.scaled_dot_product_attention_backward
    args = [out, q, k, v, out, lse, None, 0.0, False, None, False, rng]
    for index in (0, 4, 5, 11):
        bad = list(args)
        bad[index] = bad[index].to("meta")
        with pytest.raises(RuntimeError, match="same device"):
            backward(*bad)


def _philox4x32_10(counter, key):
    """Philox-4x32-10 (Salmon et al., SC'11) in plain Python: the reference for the kernels'."""
    mask = 0xFFFFFFFF
    x, k0, k1 = list(counter), key[0], key[1]
    for _ in range(10):
        p0, p1 = 0xD2511F53 * x[0], 0xCD9E8D57 * x[2]
        x = [(p1 >> 32) ^ x[1] ^ k0, p1 & mask, (p0 >> 32) ^ x[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return x


def _documented_keep_pattern(rng_state, p, heads, L, S):
    """Column 4*c + w of query row r of flattened head bh is kept when word w
    of Philox(counter (draw lo, draw hi, r, bh), key = seed) with draw =
    offset / 4 + c gives 24 bits u / 2^24 >= p (attention.h; curand's counter
    layout for draw number offset/4 + c of subsequence (r, bh))."""
    seed, offset = (int(v) & 0xFFFFFFFFFFFFFFFF for v in rng_state.cpu())
    key = (seed & 0xFFFFFFFF, seed >> 32)
    p32 = float(torch.tensor(p, dtype=torch.float32))  # the kernels compare with float p
    keep = torch.zeros(heads, L, S, dtype=torch.bool)
    for bh in range(heads):
        for r in range(L):
            for c in range((S + 3) // 4):
                draw = ((offset >> 2) + c) & 0xFFFFFFFFFFFFFFFF
                words = _philox4x32_10((draw & 0xFFFFFFFF, draw >> 32, r, bh), key)
                for w in range(4):
                    if 4 * c + w < S:
                        keep[bh, r, 4 * c + w] = (words[w] >> 8) / 16777216.0 >= p32
    return keep


def test_dropout_pattern_is_the_documented_philox_stream(device):
    # The CPU kernel computes 8 counters at once in vector lanes, CUDA one per
    # element: both must give the documented stream bit for bit, with the
    # seed and offset the call returns in rng_state (on the inputs' device;
    # on CUDA unpacked from the CUDA generator's Philox state by a kernel).
    # value = I exposes the pattern.
    p, B, H, L, S = 0.3, 1, 2, 5, 77  # 77 keys: two 32-column vector steps and a tail
    torch.manual_seed(5)
    q, k = torch.randn(B, H, L, 8, device=device), torch.randn(B, H, S, 8, device=device)
    eye = torch.eye(S, device=device).expand(B, H, S, S)
    if runs_cuda_kernels(device) and device.type == "cpu":
        cuda_emulation.reset_launch_statistics()
    out, _, rng_state, _ = torch.ops.handgrad.scaled_dot_product_attention(
        q, k, eye, None, p, False, None, False)
    assert rng_state.device == q.device and rng_state.dtype == torch.int64
    if runs_cuda_kernels(device) and device.type == "cpu":
        assert any("store_rng_state" in name for name in cuda_emulation.launch_statistics())
    expected = _documented_keep_pattern(rng_state, p, B * H, L, S)
    assert torch.equal(out.reshape(B * H, L, S).cpu() != 0, expected)
    # torch.manual_seed reproduces the call; the next call draws another state
    torch.manual_seed(5)
    torch.randn(B, H, L, 8, device=device), torch.randn(B, H, S, 8, device=device)
    again = torch.ops.handgrad.scaled_dot_product_attention(q, k, eye, None, p, False, None, False)
    assert torch.equal(again[2], rng_state) and torch.equal(again[0], out)
    other = torch.ops.handgrad.scaled_dot_product_attention(q, k, eye, None, p, False, None, False)
    assert not torch.equal(other[2], rng_state)


def test_dropout_counter_crossing_a_32_bit_boundary(device):
    # The draw number offset/4 + c carries into its high word within a row:
    # the CPU's 8-lane generator must then agree with the documented stream
    # too. Backward takes rng_state as an input, so a chosen one is passed,
    # with out and lse of the matching reference.
    p, L, S = 0.4, 3, 150
    # draws 2^32 - 13 .. 2^32 + 24: the CPU's 64-key backward tiles step 8
    # counters at a time -- one step ends just before the carry, the next
    # contains it (scalar), the next tile starts past it (high word 1)
    offset = 4 * (2**32 - 13)
    rng_state = torch.tensor([0x1234567890ABCDEF, offset], dtype=torch.int64, device=device)
    keep = _documented_keep_pattern(rng_state, p, 1, L, S).view(1, 1, L, S).to(device)
    q, k, v = make_qkv(((1, 1, L, 4), (1, 1, S, 4), (1, 1, S, 3)), torch.float64, device)

    def reference(q, k, v):
        scores = q @ k.transpose(-1, -2) / 2
        return (torch.softmax(scores, -1) * keep / (1 - p)) @ v, torch.logsumexp(scores, -1)

    out, lse = reference(q, k, v)
    grad_out = torch.randn_like(out)
    grads = torch.ops.handgrad.scaled_dot_product_attention_backward(
        grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, p, False,
        None, False, rng_state)
    expected = torch.autograd.grad(out, (q, k, v), grad_out)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@requires_cuda
def test_cuda_dropout_uses_the_cuda_generator_and_graph_capture():
    q, k, v = make_qkv(((2, 2, 33, 8), (2, 2, 70, 8), (2, 2, 70, 6), False), torch.float32,
                       "cuda")
    cpu_state = torch.get_rng_state()
    torch.cuda.manual_seed(3)
    first = torch.ops.handgrad.scaled_dot_product_attention(q, k, v, None, 0.3)
    assert torch.equal(torch.get_rng_state(), cpu_state)  # the CPU generator is not touched
    torch.cuda.manual_seed(3)
    again = torch.ops.handgrad.scaled_dot_product_attention(q, k, v, None, 0.3)
    assert torch.equal(first[0], again[0]) and torch.equal(first[2], again[2])
    # Captured in a CUDA graph, every replay draws a new pattern from the
    # generator's advancing offset, and the rng_state written on the device
    # reproduces it.
    q, k, v = (t.detach() for t in (q, k, v))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.handgrad.scaled_dot_product_attention(q, k, v, None, 0.3)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _, rng_state, _ = torch.ops.handgrad.scaled_dot_product_attention(q, k, v, None, 0.3)
    graph.replay()
    first_out, first_state = out.clone(), rng_state.clone()
    graph.replay()
    assert not torch.equal(first_state, rng_state) and not torch.equal(first_out, out)
    keep = _documented_keep_pattern(rng_state, 0.3, 4, 33, 70).view(2, 2, 33, 70).cuda()
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
    torch.testing.assert_close(out, (probs * keep / 0.7) @ v, atol=1e-5, rtol=1e-4)


def _with_explicit_dropout(q, k, p, seed, enable_gqa=False):
    """(handgrad's sdpa with dropout under `seed`, the same function written out,
    the keep mask). The keep pattern depends on (seed, head, row, column) only,
    so a call with value = I under the same seed exposes it; the reference
    then differentiates softmax(...) o Z / (1 - p) @ V with torch's autograd."""
    S = k.shape[-2]
    group = q.shape[-3] // k.shape[-3]
    torch.manual_seed(seed)
    eye = torch.eye(S, dtype=q.dtype, device=q.device).expand(*k.shape[:-2], S, S)
    kept = sdpa(q.detach(), k.detach(), eye, dropout_p=p, enable_gqa=enable_gqa) != 0

    def reference(q, k, v):
        kk = k.repeat_interleave(group, dim=-3)
        vv = v.repeat_interleave(group, dim=-3)
        probs = torch.softmax(q @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return (probs * kept / (1 - p)) @ vv

    def mine(q, k, v):
        torch.manual_seed(seed)
        return sdpa(q, k, v, dropout_p=p, enable_gqa=enable_gqa)

    return mine, reference, kept


@pytest.mark.parametrize("shapes", [((1, 2, 150, 8), (1, 2, 700, 8), (1, 2, 700, 6), False),
                                    ((2, 4, 70, 8), (2, 2, 300, 8), (2, 2, 300, 6), True)],
                         ids=str)
def test_dropout_gradients_match_explicit_reference(device, shapes):
    q, k, v = make_qkv(shapes, torch.float64, device)
    mine, reference, _ = _with_explicit_dropout(q, k, 0.25, seed=11, enable_gqa=shapes[3])
    # Near float64's rounding: a keep factor 1/(1 - p) rounded to float32 is
    # off by 1e-8 relative at some p, inside assert_close's default (1e-7).
    assert_matches_native(mine, reference, [q, k, v], atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------- head sizes (issue 13)

# (E = Ev, dtype): past every shared-memory step of the CUDA kernels' tile
# choice on sm_90 (227 KiB per block): float32 E = 64 fits the default 48 KiB
# in the forward, 128 needs the opt-in; 192 and 256 need smaller tiles in
# the dK/dV kernel (float32) or feature chunks (float64 from 192, fp16/bf16
# accumulate in float32 like float32).
LARGE_HEADS = [(64, torch.float32), (128, torch.float32), (192, torch.float32),
               (256, torch.float32), (192, torch.float64), (256, torch.float64),
               (300, torch.float64)]


@pytest.mark.parametrize("E,dtype", LARGE_HEADS, ids=str)
def test_large_head_sizes(device, E, dtype):
    shapes = ((1, 4, 70, E), (1, 2, 45, E), (1, 2, 45, E))  # GQA, partial tiles
    q, k, v = make_qkv(shapes, dtype, device)
    m = torch.randn(70, 45, dtype=dtype, device=device)
    tol = dict(atol=3e-5, rtol=1e-4) if dtype == torch.float32 else {}
    assert_matches_native(call(sdpa, m, enable_gqa=True), call(F.scaled_dot_product_attention, m,
                                                               enable_gqa=True), [q, k, v], **tol)


@pytest.mark.parametrize("E", [192, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_head_sizes_reduced_precision(device, E, dtype):
    assert_reduced_precision_matches_float64(dict(is_causal=True),
                                             ((1, 2, 37, E), (1, 2, 45, E), (1, 2, 45, E)),
                                             dtype, device)


def _threads_and_chunks(name):
    """(threads per block, blocks) of the emulated launches of one kernel."""
    return {(t // b, b) for k, (n, b, t) in cuda_emulation.launch_statistics().items()
            if name in k}


@requires_emulation
def test_cuda_tile_choice_reaches_every_branch():
    # Which tiles the kernels got, read from the emulator's launch statistics
    # (threads per block = query rows or keys per block; extra blocks =
    # feature chunks over blockIdx.y), for one size on each side of every step.
    def launches(E, Ev, dtype):
        q, k, v = make_qkv(((1, 1, 64, E), (1, 1, 64, E), (1, 1, 64, Ev)), dtype)
        cuda_emulation.reset_launch_statistics()
        with cuda_emulation.emulated():
            o = sdpa(q, k, v)
            torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
        return {name: _threads_and_chunks(name) for name in ("forward_kernel_impl", "dkdv_kernel",
                                                              "dq_kernel")}
    # everything fits with 64 threads: one block per tile of 64 rows
    assert launches(128, 128, torch.float32) == {n: {(64, 1)} for n in ("forward_kernel_impl",
                                                                        "dkdv_kernel", "dq_kernel")}
    # float32 192: the dK/dV kernel (64 + 64 + 32 rows x 384 features) needs 32-row blocks
    got = launches(192, 192, torch.float32)
    assert got["forward_kernel_impl"] == {(64, 1)} and got["dkdv_kernel"] == {(32, 2)}
    # float64 256: features in two chunks (two blocks per tile over blockIdx.y)
    got = launches(256, 256, torch.float64)
    assert got["dkdv_kernel"] == {(32, 4)} and got["forward_kernel_impl"] == {(32, 2)}
    # a value dimension far past any tile: only the values are chunked
    got = launches(8, 1500, torch.float64)
    assert got["forward_kernel_impl"] == {(32, 2 * 4)}  # 2 query tiles x 4 chunks of 375


def test_dropout_gradients_with_large_value_dim_and_head_sizes(device):
    # The explicit-reference dropout test with V = I needs Ev = S: 300 keys
    # in float64 (feature chunks in every CUDA kernel).
    p, S = 0.3, 300
    q, k = make_qkv(((1, 2, 40, 192), (1, 2, S, 192), (1, 2, S, 4), False), torch.float64,
                    device)[:2]
    v = torch.randn(1, 2, S, 256, dtype=torch.float64, device=device, requires_grad=True)
    mine, reference, _ = _with_explicit_dropout(q, k, p, seed=11)
    assert_matches_native(mine, reference, [q, k, v])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_lse_when_the_value_dim_is_zero(device, dtype):
    # Ev = 0: the output is empty, but lse (and the weights) are not.
    q, k = torch.randn(2, 3, 7, 4, device=device), torch.randn(2, 3, 9, 4, device=device)
    q, k = q.to(dtype), k.to(dtype)
    v = torch.randn(2, 3, 9, 0, device=device, dtype=dtype)
    mask = torch.rand(7, 9, device=device) > 0.3
    mask[:, 0] = True
    mask[3] = False  # a row that sees nothing: lse +inf
    out, lse, _, weights = torch.ops.handgrad.scaled_dot_product_attention(
        q, k, v, mask, 0.0, False, None, False, True)
    scores = (q.double() @ k.double().transpose(-1, -2) / 2).masked_fill(~mask, float("-inf"))
    assert out.shape == (2, 3, 7, 0)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1).nan_to_num(
        posinf=float("inf"), neginf=float("inf")), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights.double(), torch.softmax(scores, -1).nan_to_num(0.0),
                               rtol=5e-3, atol=1e-3)


# ---------------------------------------------------------------- hostile input (issue 16)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_stride_zero_along_the_sequence(device, dtype):
    # Keys, values and queries broadcast along the sequence (stride 0): BLAS
    # rejects a leading dimension smaller than a row (it printed an error and
    # skipped the product: an all-zero output in float64).
    bases = [torch.randn(s, dtype=dtype, device=device, requires_grad=True)
             for s in ((2, 3, 1, 8), (1, 1, 1, 8), (2, 3, 1, 4))]

    def expanded(fn):
        return lambda q, k, v: fn(q.expand(2, 3, 5, 8), k.expand(2, 3, 7, 8), v.expand(2, 3, 7, 4))

    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else {}
    out, _ = assert_matches_native(expanded(sdpa), expanded(F.scaled_dot_product_attention),
                                   bases, **tol)
    assert out[0].abs().sum() > 0


_SEQUENCE_BROADCAST_SCRIPT = r"""
import torch, torch.nn.functional as F, handgrad
torch.manual_seed(0)
q = torch.randn(2, 3, 1, 8).expand(2, 3, 5, 8)
k = torch.randn(1, 1, 1, 8).expand(2, 3, 7, 8)
v = torch.randn(2, 3, 7, 4)
a = handgrad.ops.scaled_dot_product_attention(q, k, v)
torch.testing.assert_close(a, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-5)
print("ok")
"""


def test_stride_zero_float32_on_the_blas_path():
    # float32 tiles go to BLAS (not the AVX-512 product) with HANDGRAD_CPU_AVX512=0.
    assert_script_prints_ok(_SEQUENCE_BROADCAST_SCRIPT, HANDGRAD_CPU_AVX512="0")


# (query, key, value shapes, enable_gqa): batch dimensions broadcast, the
# query with fewer dimensions, heads shared by broadcasting
BROADCAST_SHAPES = [((7, 5), (2, 3, 9, 5), (2, 3, 9, 4), False),
                    ((3, 7, 5), (2, 3, 9, 5), (2, 3, 9, 4), False),
                    ((2, 1, 7, 5), (1, 3, 9, 5), (2, 3, 9, 4), False),
                    ((2, 3, 7, 5), (3, 9, 5), (9, 4), False),
                    ((2, 4, 7, 5), (2, 1, 9, 5), (2, 1, 9, 4), False),
                    ((4, 7, 5), (2, 2, 9, 5), (2, 2, 9, 4), True),
                    ((2, 1, 2, 7, 5), (3, 2, 9, 5), (1, 2, 9, 4), False)]


@pytest.mark.parametrize("shapes", BROADCAST_SHAPES, ids=str)
def test_broadcast_batch_dimensions(device, shapes):
    q, k, v = make_qkv(shapes, torch.float64, device)
    m = torch.rand(7, 9, device=device) > 0.3
    m[:, 0] = True
    kw = dict(enable_gqa=shapes[3])
    assert_matches_native(call(sdpa, m, **kw), call(F.scaled_dot_product_attention, m, **kw),
                          [q, k, v])
    assert torch.autograd.gradcheck(call(sdpa, m, **kw), (q, k, v), fast_mode=True)


def test_dropout_probability_one(device):
    q, k, v = make_qkv(SHAPES[0], torch.float64, device)
    out, grads = assert_matches_native(call(sdpa, dropout_p=1.0),
                                       call(F.scaled_dot_product_attention, dropout_p=1.0),
                                       [q, k, v])
    assert not out[0].any() and not any(g.any() for g in grads)
    # p = 1 drops every probability whatever the seed, so the function is
    # deterministic (zero) and its higher derivatives can be checked too: the
    # double backward and forward-mode formulas recover the keep mask and its
    # factor 1/(1 - p) separately at p = 1 (no division by zero, no keep mask
    # of ones, nothing treated as "no dropout").
    def dropped_everything(q, k, v):
        return sdpa(q, k, v, dropout_p=1.0)
    assert torch.autograd.gradcheck(dropped_everything, (q, k, v), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(dropped_everything, (q, k, v), check_fwd_over_rev=True)
    _, tangent = torch.func.jvp(dropped_everything, (q, k, v), tuple(map(torch.ones_like,
                                                                          (q, k, v))))
    assert not tangent.any()
    grads = torch.autograd.grad(dropped_everything(q, k, v).sum(), (q, k, v), create_graph=True)
    assert not any(g.any() for g in torch.autograd.grad(sum(g.sum() for g in grads), (q, k, v),
                                                        allow_unused=True) if g is not None)


def test_dropout_second_order_and_forward_mode_match_explicit_reference(device):
    # The double backward and jvp formulas rebuild the keep mask Z / (1 - p)
    # from the kernel; compared with torch's autograd of the explicit
    # softmax(...) o Z / (1 - p) @ V (Z exposed as in the test above) at a
    # tolerance near float64's rounding. p = 0.3: 1/(1 - p) is not a float32
    # number, so a keep factor held in float32 shows as a relative error of
    # about 1e-8 -- far inside assert_close's float64 default (1e-7), hence the
    # explicit tolerance.
    p = 0.3
    q, k, v = make_qkv(((1, 2, 9, 5), (1, 2, 13, 5), (1, 2, 13, 4)), torch.float64, device)
    mine, reference, kept = _with_explicit_dropout(q, k, p, seed=5)
    assert 0 < kept.sum() < kept.numel()
    weights = torch.randn(1, 2, 9, 4, dtype=torch.float64, device=device)
    directions = [torch.randn_like(t) for t in (q, k, v)]

    def derivatives(fn):
        grads = torch.autograd.grad((fn(q, k, v) * weights).sum(), (q, k, v), create_graph=True)
        # Hessian-vector product (the double backward)
        hvp = torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, directions)),
                                  (q, k, v))
        # forward mode, and forward over reverse
        jvp = torch.func.jvp(fn, (q, k, v), tuple(directions))[1]
        fwd_over_rev = torch.func.jvp(
            lambda *a: torch.func.grad(lambda *b: (fn(*b) * weights).sum(),
                                       argnums=(0, 1, 2))(*a),
            (q.detach(), k.detach(), v.detach()), tuple(directions))[1]
        return (*grads, *hvp, jvp, *fwd_over_rev)

    for a, b in zip(derivatives(mine), derivatives(reference), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


# masks broadcastable to (2, 3, 7, 9) whose gradient is summed over the broadcast
FLOAT_MASK_SHAPES = [(2, 3, 7, 9), (7, 9), (3, 1, 9), (2, 1, 1, 9), (1, 7, 1)]


@pytest.mark.parametrize("mask_shape", FLOAT_MASK_SHAPES, ids=str)
def test_float_mask_gradient(device, mask_shape):
    # A learned position bias: the mask's gradient is dS (summed over the
    # dimensions it is broadcast along); it used to be None.
    q, k, v = make_qkv(((2, 3, 7, 5), (2, 3, 9, 5), (2, 3, 9, 4)), torch.float64, device)
    m = torch.randn(mask_shape, dtype=torch.float64, device=device, requires_grad=True)
    assert_matches_native(sdpa, F.scaled_dot_product_attention, [q, k, v, m])
    assert torch.autograd.gradcheck(sdpa, (q, k, v, m), fast_mode=True)
    # the mask alone, in float32 with float64 inputs (gradient in the mask's dtype)
    m32 = m.detach().float().requires_grad_()
    out = sdpa(q.detach(), k.detach(), v.detach(), m32)
    (g,) = torch.autograd.grad(out.sum(), m32)
    m64 = m.detach().requires_grad_()
    (ref,) = torch.autograd.grad(F.scaled_dot_product_attention(q.detach(), k.detach(),
                                                                v.detach(), m64).sum(), m64)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, ref.float())


def test_float_mask_gradient_long_rows_and_gqa(device):
    # Several key tiles of the CPU backward (64) and of the CUDA dQ kernel
    # (32), both CPU backward schemes (1 and 8 kv heads), GQA.
    for heads_kv in (1, 8):
        q, k, v = make_qkv(((1, 8, 130, 4), (1, heads_kv, 150, 4), (1, heads_kv, 150, 3)),
                           torch.float64, device)
        m = torch.randn(8, 130, 150, dtype=torch.float64, device=device, requires_grad=True)
        assert_matches_native(lambda *a: sdpa(*a, enable_gqa=True),
                              lambda *a: F.scaled_dot_product_attention(*a, enable_gqa=True),
                              [q, k, v, m])


def test_float_mask_gradient_with_dropout(device):
    p = 0.3
    q, k, v = make_qkv(((1, 2, 9, 3), (1, 2, 11, 3), (1, 2, 11, 2)), torch.float64, device)
    m = torch.randn(9, 11, dtype=torch.float64, device=device, requires_grad=True)

    def fn(q, k, v, m):
        torch.manual_seed(7)
        return sdpa(q, k, v, m, dropout_p=p)

    assert torch.autograd.gradcheck(fn, (q, k, v, m))


SPECIAL_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


@pytest.mark.parametrize("where", ["query", "key", "mask"])
@pytest.mark.parametrize("value", list(SPECIAL_VALUES), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_non_finite_inputs_spread_like_native(device, where, value, dtype):
    # A NaN (or +inf) score makes its whole softmax row NaN: the output row,
    # and through lse and D every gradient it reaches -- all of grad_v.
    q, k, v = make_qkv(((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3)), dtype, device)
    m = torch.zeros(5, 6, dtype=dtype, device=device)
    with torch.no_grad():
        target = {"query": q[0, 0, 2], "key": k[0, 1, 3], "mask": m[2, 3:4]}[where]
        target[0] = SPECIAL_VALUES[value]
    out, grads = forward_and_grads(sdpa, q, k, v, m)
    ref, ref_grads = forward_and_grads(F.scaled_dot_product_attention, q, k, v, m)
    for a, b in zip([out] + grads, [ref] + ref_grads):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, equal_nan=True, atol=1e-5, rtol=1e-4)


def forward_and_grads(fn, q, k, v, m):
    args = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*args, attn_mask=m)
    return out, list(torch.autograd.grad(out, args, torch.ones_like(out)))


_THREAD_COUNT_SCRIPT = r"""
import torch, handgrad
sdpa = handgrad.ops.scaled_dot_product_attention
# (q, k, v shapes, kwargs): one-task problems (MKL may thread them itself),
# batch * kv heads 2 and 3 (the backward scheme follows the thread count),
# float64 (dgemm), dropout, a float mask with a gradient, GQA.
cases = [((1, 1, 100, 64), (1, 1, 700, 64), (1, 1, 700, 64), {}),
         ((1, 2, 130, 48), (1, 2, 200, 48), (1, 2, 200, 40), {"is_causal": True}),
         ((1, 3, 257, 64), (1, 3, 300, 64), (1, 3, 300, 64), {"dropout_p": 0.2}),
         ((2, 4, 65, 32), (2, 2, 65, 32), (2, 2, 65, 32), {"enable_gqa": True}),
         ((1, 2, 140, 16), (1, 2, 90, 16), (1, 2, 90, 8), {"mask": True})]
results = {}
for threads in (1, 2):
    torch.set_num_threads(threads)
    out = []
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        for qs, ks, vs, kw in cases:
            kw = dict(kw)
            args = [torch.randn(s, dtype=dtype, requires_grad=True) for s in (qs, ks, vs)]
            if kw.pop("mask", False):
                args.append(torch.randn(qs[-2], ks[-2], dtype=dtype, requires_grad=True))
            torch.manual_seed(1)
            o = sdpa(*args, **kw)
            out += [o] + list(torch.autograd.grad(o.sin().sum(), args))
    results[threads] = out
for a, b in zip(results[1], results[2]):
    assert torch.equal(a, b), (a - b).abs().max()
print("ok")
"""


@pytest.mark.parametrize("avx512", ["1", "0"])
def test_results_do_not_depend_on_the_thread_count(avx512):
    # The header promises bit-identical results for any thread count; with
    # HANDGRAD_CPU_AVX512=0 the float32 tiles go through MKL's sgemm.
    assert_script_prints_ok(_THREAD_COUNT_SCRIPT, timeout=600, HANDGRAD_CPU_AVX512=avx512)


# ---------------------------------------------------------------- which inputs need grad (issue 20)

@pytest.mark.parametrize("needs", ["q", "k", "v", "mask", "kv", "qm"])
def test_only_some_inputs_require_grad(device, needs):
    # Each gradient must be returned exactly for the inputs that require it
    # (a backward gating grad_k by needs_input_grad of v went unnoticed).
    shapes = ((2, 4, 7, 5), (2, 2, 9, 5), (2, 2, 9, 4))
    tensors = [torch.randn(s, dtype=torch.float64, device=device) for s in shapes]
    tensors.append(torch.randn(7, 9, dtype=torch.float64, device=device))
    wanted = {"q": [0], "k": [1], "v": [2], "mask": [3], "kv": [1, 2], "qm": [0, 3]}[needs]
    results = []
    for fn in (sdpa, F.scaled_dot_product_attention):
        args = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(tensors)]
        out = fn(*args, enable_gqa=True)
        out.backward(torch.ones_like(out))
        results.append([a.grad for a in args])
    for i, (mine, ref) in enumerate(zip(*results)):
        assert (mine is None) == (i not in wanted) and (ref is None) == (i not in wanted)
        if mine is not None:
            torch.testing.assert_close(mine, ref)


# ---------------------------------------------------------------- attention weights (issue 20)

def test_weights_output_and_its_gradient(device):
    # need_weights=True returns softmax(S) o Z; gradients through both outputs.
    q, k, v = make_qkv(((2, 4, 70, 5), (2, 2, 90, 5), (2, 2, 90, 3)), torch.float64, device)
    m = make_mask("float_2d", q, k, device).requires_grad_()

    def mine(q, k, v, m):
        out, _, _, weights = torch.ops.handgrad.scaled_dot_product_attention(
            q, k, v, m, 0.0, False, None, True, True)
        return out * 1.5 + weights[..., :3] ** 2  # both outputs reach the loss

    def reference(q, k, v, m):
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        weights = torch.softmax(q @ kk.transpose(-1, -2) / 5 ** 0.5 + m, -1)
        return (weights @ vv) * 1.5 + weights[..., :3] ** 2

    assert_matches_native(mine, reference, [q, k, v, m])
    small = [torch.randn(s, dtype=torch.float64, device=device, requires_grad=True)
             for s in ((1, 4, 6, 3), (1, 2, 5, 3), (1, 2, 5, 3), (6, 5))]
    assert torch.autograd.gradcheck(mine, small)


def test_weights_with_dropout_are_the_ones_that_made_the_output(device):
    q, k, v = make_qkv(((1, 2, 40, 8), (1, 2, 77, 8), (1, 2, 77, 6)), torch.float64, device)
    out, _, rng_state, weights = torch.ops.handgrad.scaled_dot_product_attention(
        q, k, v, None, 0.4, True, None, False, True)
    keep = _documented_keep_pattern(rng_state, 0.4, 2, 40, 77).view(1, 2, 40, 77).to(device)
    probs = torch.softmax((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(
        torch.ones(40, 77, dtype=torch.bool, device=device).triu(1), float("-inf")), -1)
    torch.testing.assert_close(weights, probs * keep / 0.6)
    torch.testing.assert_close(out, weights @ v)


# The CPU forward visits keys in tiles of 512 (write_weights recomputes the
# weights tile by tile): key counts on both sides of the tile boundaries, a
# causal case whose last rows end inside the second tile.
@pytest.mark.parametrize("S,causal", [(511, False), (512, False), (513, False), (1100, False),
                                      (1030, True)], ids=str)
def test_weights_across_key_tiles(device, S, causal):
    L = 1030 if causal else 20
    q, k, v = make_qkv(((1, 2, L, 4), (1, 2, S, 4), (1, 2, S, 3)), torch.float64, device)

    def mine(q, k, v):
        out, _, _, weights = torch.ops.handgrad.scaled_dot_product_attention(
            q, k, v, None, 0.0, causal, None, False, True)
        return out, weights

    def reference(q, k, v):
        scores = q @ k.transpose(-1, -2) / 2.0
        if causal:
            scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool, device=device).triu(1),
                                        float("-inf"))
        weights = torch.softmax(scores, -1)
        return weights @ v, weights

    assert_matches_native(mine, reference, [q, k, v])


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_long_sequences(device, need_weights):
    # Head size 64, S = 480: the weights used to come from an identity V
    # (Ev = 64 + S), past the CUDA kernels' shared memory from S ~ 477.
    native = torch.nn.MultiheadAttention(128, 2, dtype=torch.float64, device=device)
    mine = copy.deepcopy(native)
    mine.__class__ = handgrad.nn.MultiheadAttention
    x = torch.randn(480, 1, 128, dtype=torch.float64, device=device, requires_grad=True)
    results = []
    for module in (native, mine):
        out, weights = module(x, x, x, need_weights=need_weights, average_attn_weights=False)
        loss = out.square().sum() + (weights[..., :5].sum() if need_weights else 0)
        results.append([out, weights] + list(torch.autograd.grad(loss, [x, module.in_proj_weight])))
    for a, b in zip(*results):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- MultiheadAttention's arguments
# (mutation testing: the argument checks and the is_causal hint must behave as native's)

def _mha_bad_calls():
    """name: (args, kwargs, handgrad's exception type, its whole message)."""
    L, S, N = 5, 6, 2
    q, kv = torch.randn(L, N, 16, dtype=torch.float64), torch.randn(S, N, 16, dtype=torch.float64)
    q12, kv12 = torch.randn(L, N, 12, dtype=torch.float64), torch.randn(S, N, 12, dtype=torch.float64)
    bool_mask = lambda *shape: torch.zeros(*shape, dtype=torch.bool)  # noqa: E731
    return {
        "embed dim": ((q12, kv12, kv12), {}, RuntimeError,
                      "was expecting embedding dimension of 16, but got 12"),
        "key_padding_mask shape": ((q, kv, kv), dict(key_padding_mask=bool_mask(N, S + 1)),
                                   RuntimeError,
                                   "expecting key_padding_mask shape of (2, 6), but got (2, 7)"),
        "key_padding_mask 3-D": ((q, kv, kv), dict(key_padding_mask=bool_mask(1, N, S)),
                                 AssertionError, "For batched (3-D) `query`, expected "
                                 "`key_padding_mask` to be `None` or 2-D but found 3-D tensor "
                                 "instead"),
        "attn_mask shape 2-D": ((q, kv, kv), dict(attn_mask=bool_mask(L, S + 1)), RuntimeError,
                                "The shape of the 2D attn_mask is (5, 7), but should be (5, 6)."),
        "attn_mask shape 3-D": ((q, kv, kv), dict(attn_mask=bool_mask(3, L, S)), RuntimeError,
                                "The shape of the 3D attn_mask is (3, 5, 6), but should be "
                                "(8, 5, 6)."),
        "attn_mask 4-D": ((q, kv, kv), dict(attn_mask=bool_mask(1, 1, L, S)), AssertionError,
                          "For batched (3-D) `query`, expected `attn_mask` to be `None`, 2-D or "
                          "3-D but found 4-D tensor instead"),
        "unbatched attn_mask heads": ((q[:, 0], kv[:, 0], kv[:, 0]),
                                      dict(attn_mask=bool_mask(3, L, S)), AssertionError,
                                      "Expected `attn_mask` shape to be (4, 5, 6) but got "
                                      "torch.Size([3, 5, 6])"),
        "causal hint without mask": ((q, kv, kv), dict(is_causal=True), RuntimeError,
                                     "Need attn_mask if specifying the is_causal hint (as in "
                                     "torch.nn.MultiheadAttention)"),
        "integer key_padding_mask": ((q, kv, kv),
                                     dict(key_padding_mask=torch.zeros(N, S, dtype=torch.int64)),
                                     AssertionError,
                                     "only bool and floating types of key_padding_mask are "
                                     "supported"),
        "integer attn_mask": ((q, kv, kv), dict(attn_mask=torch.zeros(L, S, dtype=torch.int64)),
                              AssertionError,
                              "only bool and floating types of attn_mask are supported"),
    }


@pytest.mark.parametrize("case", list(_mha_bad_calls()))
def test_multihead_attention_bad_arguments_raise_a_clear_error(case):
    # Native raises too (its messages differ where it uses bare asserts);
    # handgrad's own checks raise RuntimeError, torch's shared helpers
    # (_mha_shape_check, _canonical_mask) their AssertionError.
    native, mine = _mha_pair("cpu")
    args, kw, error, message = _mha_bad_calls()[case]
    with pytest.raises((RuntimeError, AssertionError)):
        native(*args, **kw)
    with pytest.raises(error) as info:
        mine(*args, **kw)
    assert str(info.value) == message


def test_multihead_attention_mismatched_mask_types_warn_like_native():
    native, mine = _mha_pair("cpu")
    x = torch.randn(5, 2, 16, dtype=torch.float64)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[:, -1] = True
    attn = torch.zeros(5, 5, dtype=torch.float64)
    messages = []
    for module in (native, mine):
        with pytest.warns(UserWarning) as record:
            module(x, x, x, key_padding_mask=kpm, attn_mask=attn)
        messages.append(sorted(str(w.message) for w in record if "mismatched" in str(w.message)))
    assert messages[0] and messages[1] == messages[0]


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("with_kpm", [False, True])
def test_multihead_attention_causal_hint_uses_the_mask_when_native_does(need_weights, with_kpm):
    # is_causal is a hint that attn_mask is causal. Native drops the mask for
    # the hint only without key_padding_mask and need_weights; otherwise it
    # uses the mask. A mask that is not causal shows which one was used.
    native, mine = _mha_pair("cpu")
    x = torch.randn(6, 2, 16, dtype=torch.float64)
    not_causal = torch.ones(6, 6, dtype=torch.bool).tril(-2)  # hides the diagonal and one more
    kpm = torch.zeros(2, 6, dtype=torch.bool) if with_kpm else None
    kw = dict(attn_mask=not_causal, is_causal=True, need_weights=need_weights, key_padding_mask=kpm)
    ref_out, ref_w = native(x, x, x, **kw)
    out, w = mine(x, x, x, **kw)
    torch.testing.assert_close(out, ref_out)
    if need_weights:
        torch.testing.assert_close(w, ref_w)
