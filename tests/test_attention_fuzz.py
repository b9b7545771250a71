"""Property-based comparison of handgrad.ops.scaled_dot_product_attention
with torch.nn.functional.scaled_dot_product_attention (hypothesis).

Each example draws a problem -- batch dimensions that broadcast between
query, key and value (the query may have fewer), grouped-query heads, sizes
on both sides of the kernels' tile edges, strided layouts (transposed, gaps
between elements, stride 0 along the sequence), bool / float masks (a float
one may require grad), causal, a custom scale, dropout_p = 1, empty
dimensions and NaN / inf inputs -- and checks the output and every gradient
against native on the CPU and on the emulated CUDA kernels. Examples are
derandomized (the same ones every run) and bounded to keep the file under a
minute.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import handgrad
from test_attention import assert_close_to_float64

sdpa = handgrad.ops.scaled_dot_product_attention

FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

LAYOUTS = ["contiguous", "transposed", "gaps", "sequence_broadcast"]


def make_leaf(shape, layout, dtype, device, gen):
    """(leaf that gets the gradient, view in the layout that is passed on)."""
    def randn(s):
        return torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device)
    if layout == "transposed" and len(shape) >= 2:
        leaf = randn((*shape[:-2], shape[-1], shape[-2])).requires_grad_()
        return leaf, lambda t: t.transpose(-1, -2)
    if layout == "gaps":
        leaf = randn((*shape[:-1], 2 * shape[-1])).requires_grad_()
        return leaf, lambda t: t[..., ::2]
    if layout == "sequence_broadcast" and len(shape) >= 2:
        leaf = randn((*shape[:-2], 1, shape[-1])).requires_grad_()
        return leaf, lambda t: t.expand(shape)
    leaf = randn(shape).requires_grad_()
    return leaf, lambda t: t


@st.composite
def problems(draw, dtypes=(torch.float32, torch.float64), special=True):
    dtype = draw(st.sampled_from(dtypes))
    nd = draw(st.integers(2, 5))
    heads_kv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3])) if nd >= 3 else 1
    gqa = group > 1
    L = draw(st.sampled_from([0, 1, 5, 31, 33, 64, 65, 70]))
    S = draw(st.sampled_from([0, 1, 4, 7, 32, 33, 65]))
    E = draw(st.sampled_from([1, 3, 8, 16]))
    Ev = draw(st.sampled_from([0, 1, 5, 8]))
    batch = [draw(st.sampled_from([1, 2])) for _ in range(max(0, nd - 3))]
    if batch and draw(st.booleans()):
        batch[0] = 0 if draw(st.integers(0, 9)) == 0 else batch[0]

    # native gives empty outputs the query's leading dimensions, unbroadcast:
    # broadcasting only where nothing is empty
    empty = L == 0 or S == 0 or Ev == 0 or 0 in batch

    def dims(n_fewer, heads):
        """Leading dimensions of one operand, some broadcast (1) or left out."""
        lead = [b if empty or draw(st.integers(0, 3)) else 1 for b in batch]
        lead += [heads] if nd >= 3 else []
        return lead[min(n_fewer, len(lead)):]

    q_fewer = draw(st.integers(0, 2)) if not (gqa or empty) else 0
    qs = (*dims(q_fewer, heads_kv * group), L, E)
    ks = (*dims(0, heads_kv), S, E)
    vs = (*dims(0, heads_kv), S, Ev)
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    mask = draw(st.sampled_from(["float_grad", None, "bool", "bool_keys", "float"]))
    causal = mask is None and draw(st.booleans())
    scale = draw(st.sampled_from([None, 0.3]))
    value = draw(st.sampled_from(["none"] * 3 + ["nan_mask", "nan_q", "inf_k", "dropout_1"]
                                 if special else ["none"]))
    if value == "nan_mask" and mask not in ("float", "float_grad"):
        value = "none"
    if value != "none" and value != "dropout_1":
        causal = False  # native's CPU kernel skips key blocks past the diagonal: NaN spreads less
    return dict(dtype=dtype, qs=qs, ks=ks, vs=vs, layouts=layouts, mask=mask, causal=causal,
                scale=scale, gqa=gqa, value=value, seed=draw(st.integers(0, 2**31 - 1)))


def build(problem, device):
    gen = torch.Generator().manual_seed(problem["seed"])
    dtype = problem["dtype"]
    made = [make_leaf(s, lay, dtype, device, gen)
            for s, lay in zip((problem["qs"], problem["ks"], problem["vs"]), problem["layouts"])]
    leaves = [leaf for leaf, _ in made]
    views = [view for _, view in made]
    L, S = problem["qs"][-2], problem["ks"][-2]
    mask = None
    kind = problem["mask"]
    if kind in ("bool", "bool_keys"):
        shape = (L, S) if kind == "bool" else (1, S)
        mask = (torch.rand(shape, generator=gen) > 0.3).to(device)
        if S:
            mask[..., 0] = True
    elif kind in ("float", "float_grad"):
        mask = torch.randn(L, S, generator=gen, dtype=torch.float64).to(dtype).to(device)
    with torch.no_grad():
        if problem["value"] == "nan_q" and leaves[0].numel():
            leaves[0].view(-1)[0] = float("nan")
        if problem["value"] == "inf_k" and leaves[1].numel():
            leaves[1].view(-1)[-1] = float("inf")
        if problem["value"] == "nan_mask" and mask.numel():
            mask.view(-1)[mask.numel() // 2] = float("nan")
    if kind == "float_grad":
        mask.requires_grad_()
        leaves.append(mask)
    return leaves, views, mask


def run(fn, problem, leaves, views, mask, grad_dtype=None):
    fresh = [t.detach().clone().requires_grad_() for t in leaves]
    q, k, v = (view(t) for view, t in zip(views, fresh[:3]))
    m = fresh[3] if len(fresh) == 4 else mask
    kw = dict(attn_mask=m, is_causal=problem["causal"], scale=problem["scale"],
              enable_gqa=problem["gqa"], dropout_p=1.0 if problem["value"] == "dropout_1" else 0.0)
    out = fn(q, k, v, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).to(grad_dtype or out.dtype).to(out.dtype)
    grad_out = grad_out.to(out.device)
    grads = torch.autograd.grad(out, fresh, grad_out, allow_unused=True)
    return out, [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, fresh)]


@FUZZ
@given(problem=problems())
def test_matches_native_fuzz(device, problem):
    leaves, views, mask = build(problem, device)
    out, grads = run(sdpa, problem, leaves, views, mask)
    ref, ref_grads = run(F.scaled_dot_product_attention, problem, leaves, views, mask)
    tol = dict(atol=3e-5, rtol=3e-4) if problem["dtype"] == torch.float32 else {}
    assert out.shape == ref.shape and out.dtype == ref.dtype
    for a, b in zip([out] + grads, [ref] + ref_grads):
        assert a.shape == b.shape
        assert torch.equal(a.isnan(), b.isnan()), (a, b)
        torch.testing.assert_close(a, b, equal_nan=True, **tol)


@FUZZ
@given(problem=problems(dtypes=(torch.float16, torch.bfloat16), special=False))
def test_reduced_precision_fuzz(device, problem):
    # float16 / bfloat16 against float64 of the same rounded inputs, at the
    # bounds of test_attention.assert_close_to_float64.
    leaves, views, mask = build(problem, device)
    out, grads = run(sdpa, problem, leaves, views, mask)
    problem64 = dict(problem, dtype=torch.float64)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    mask64 = mask.double() if mask is not None and mask.is_floating_point() else mask
    ref, ref_grads = run(F.scaled_dot_product_attention, problem64, leaves64, views, mask64,
                         grad_dtype=problem["dtype"])  # the same rounded upstream gradient
    L, S = problem["qs"][-2], problem["ks"][-2]
    assert out.dtype == problem["dtype"]
    # Inputs and the upstream gradient are standard normal and the scores
    # scaled by 1/sqrt(E) (or 0.3), so the terms of every sum are O(1): that
    # is the error's scale where a result cancels (term_scale).
    assert_close_to_float64(out, ref, problem["dtype"], max(S, 1), term_scale=1.0)
    # gradients reduce over keys (query), queries (key, value) and broadcast copies
    for g, r in zip(grads, ref_grads):
        assert_close_to_float64(g, r, problem["dtype"], max(L, S, 1) * 4, term_scale=1.0)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
