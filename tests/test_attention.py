"""handgrad.ops.scaled_dot_product_attention and handgrad.nn.MultiheadAttention
against torch.nn.functional.scaled_dot_product_attention / torch.nn.MultiheadAttention."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import handgrad
from helpers import assert_matches_native, assert_script_prints_ok, in_layout

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision(device, dtype):
    q, k, v = make_qkv(SHAPES[4], dtype, device)
    kw = dict(enable_gqa=True, is_causal=True)
    assert_matches_native(call(sdpa, **kw), call(F.scaled_dot_product_attention, **kw),
                          [q, k, v], atol=2e-2, rtol=2e-2)


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


def test_opcheck(device):
    q, k, v = make_qkv(SHAPES[4], torch.float64, device)
    m = make_mask("bool_keys", q, k, device)
    cases = [(q, k, v, m, 0.0, False, None, True), (q, k, v, None, 0.0, True, 0.5, True)]
    for args in cases:
        torch.library.opcheck(torch.ops.handgrad.scaled_dot_product_attention, args)
    out, lse, rng = torch.ops.handgrad.scaled_dot_product_attention(q, k, v, None, 0.2, True,
                                                                     None, True)
    # (The backward op's own gradients -- double backward -- are tested in
    # tests/test_autograd_transforms.py.)
    torch.library.opcheck(torch.ops.handgrad.scaled_dot_product_attention_backward,
                          (torch.randn_like(out), q, k, v, out.detach(), lse, None, 0.2, True,
                           None, True, rng))


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


MHA_OPTIONS = [{}, {"bias": False}, {"kdim": 5, "vdim": 6}, {"add_bias_kv": True},
               {"add_zero_attn": True, "batch_first": True}, {"batch_first": True, "kdim": 7}]


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
    o3, _ = mha(x, x, x)
    assert not torch.allclose(o1, o3)
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
    for p in (-0.1, 1.0, 1.5):
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
    with pytest.raises(RuntimeError, match="same batch dimensions"):
        sdpa(q, k[:1], v[:1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is usable")
def test_mixed_devices_cuda():
    q, k, v = make_qkv(SHAPES[0], torch.float32)
    with pytest.raises(RuntimeError, match="same device"):
        sdpa(q.cuda(), k, v)


def test_mixed_devices_meta():
    # Without a GPU, a meta tensor stands in for the second device.
    q, k, v = make_qkv(SHAPES[0], torch.float32)
    with pytest.raises(RuntimeError, match="same device"):
        sdpa(q, k.to("meta"), v)


def _philox4x32_10(counter, key):
    """Philox-4x32-10 (Salmon et al., SC'11) in plain Python: the reference for the kernels'."""
    mask = 0xFFFFFFFF
    x, k0, k1 = list(counter), key[0], key[1]
    for _ in range(10):
        p0, p1 = 0xD2511F53 * x[0], 0xCD9E8D57 * x[2]
        x = [(p1 >> 32) ^ x[1] ^ k0, p1 & mask, (p0 >> 32) ^ x[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return x


def test_dropout_pattern_is_the_documented_philox_stream():
    # Column 4*c + w of query row r of flattened head bh is kept when word w
    # of Philox(counter (c, r, bh ^ offset_hi, offset_lo ^ bh_hi), key = seed)
    # gives 24 bits u / 2^24 >= p (attention.h); the CPU kernel computes 8
    # counters at once in vector lanes, CUDA one per thread: both must give
    # this stream bit for bit. value = I exposes the pattern.
    p, B, H, L, S = 0.3, 1, 2, 5, 77  # 77 keys: two 32-column vector steps and a tail
    torch.manual_seed(5)
    q, k = torch.randn(B, H, L, 8), torch.randn(B, H, S, 8)
    eye = torch.eye(S).expand(B, H, S, S)
    out, _, rng_state = torch.ops.handgrad.scaled_dot_product_attention(
        q, k, eye, None, p, False, None, False)
    seed, offset = (int(v) & 0xFFFFFFFFFFFFFFFF for v in rng_state)
    key = (seed & 0xFFFFFFFF, seed >> 32)
    p32 = float(torch.tensor(p, dtype=torch.float32))  # the kernels compare with float p
    expected = torch.zeros(B * H, L, S, dtype=torch.bool)
    for bh in range(B * H):
        for r in range(L):
            for c in range((S + 3) // 4):
                words = _philox4x32_10((c, r, bh ^ (offset >> 32), (offset & 0xFFFFFFFF) ^ (bh >> 32)), key)
                for w in range(4):
                    if 4 * c + w < S:
                        expected[bh, r, 4 * c + w] = (words[w] >> 8) / 16777216.0 >= p32
    assert torch.equal(out.reshape(B * H, L, S) != 0, expected)


@pytest.mark.parametrize("shapes", [((1, 2, 150, 8), (1, 2, 700, 8), (1, 2, 700, 6), False),
                                    ((2, 4, 70, 8), (2, 2, 300, 8), (2, 2, 300, 6), True)],
                         ids=str)
def test_dropout_gradients_match_explicit_reference(device, shapes):
    # The keep pattern depends on (seed, head, row, column) only, so a call
    # with value = I under the same seed exposes it; the reference then
    # differentiates softmax(...) o Z / (1 - p) @ V with torch's autograd.
    p = 0.25
    q, k, v = make_qkv(shapes, torch.float64, device)
    S = k.shape[-2]
    group = q.shape[1] // k.shape[1]
    torch.manual_seed(11)
    eye = torch.eye(S, dtype=torch.float64, device=device).expand(*k.shape[:2], S, S)
    kept = sdpa(q.detach(), k.detach(), eye, dropout_p=p, enable_gqa=shapes[3]) != 0

    def reference(q, k, v):
        kk = k.repeat_interleave(group, dim=1)
        vv = v.repeat_interleave(group, dim=1)
        probs = torch.softmax(q @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return (probs * kept / (1 - p)) @ vv

    def mine(q, k, v):
        torch.manual_seed(11)
        return sdpa(q, k, v, dropout_p=p, enable_gqa=shapes[3])

    assert_matches_native(mine, reference, [q, k, v])
