"""handgrad's ops under torch.autocast follow native's casting policy (handgrad/ops/_autocast.py)."""

import pytest
import torch
import torch.nn.functional as F

from handgrad import ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_and_cross_entropy_take_the_dtypes_native_gives_them(dtype):
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    logits, target = torch.randn(4, 6), torch.tensor([0, 5, 2, 3])
    with torch.autocast("cpu", dtype=dtype):
        mine = ops.scaled_dot_product_attention(q, k, v)
        native = F.scaled_dot_product_attention(q, k, v)
        loss = ops.cross_entropy(logits.to(dtype), target)
        native_loss = F.cross_entropy(logits.to(dtype), target)
        pooled = ops.max_pool2d(torch.randn(1, 2, 4, 4, dtype=dtype), 2)
        doubles = ops.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert mine.dtype == native.dtype == dtype
    assert loss.dtype == native_loss.dtype == torch.float32
    assert pooled.dtype == dtype  # max_pool2d runs in its input's dtype, as native's
    assert doubles.dtype == torch.float64  # autocast never touches float64
    torch.testing.assert_close(mine.float(), native.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss, native_loss, atol=1e-5, rtol=1e-5)


def test_autocast_outside_a_region_changes_nothing():
    q = torch.randn(1, 2, 5, 8)
    assert ops.scaled_dot_product_attention(q, q, q).dtype == torch.float32


def test_autocast_under_torch_compile():
    q = torch.randn(1, 2, 5, 8)
    compiled = torch.compile(lambda q: ops.scaled_dot_product_attention(q, q, q), fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = ops.scaled_dot_product_attention(q, q, q)
        traced = compiled(q)
    assert traced.dtype == torch.bfloat16
    torch.testing.assert_close(traced, eager)


def test_gradients_reach_float32_leaves_through_the_casts():
    x = torch.randn(2, 3, 5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.scaled_dot_product_attention(x, x, x)
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
