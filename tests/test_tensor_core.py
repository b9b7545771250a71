"""The tensor-core primitives of csrc/common/tensor_core.cuh (mma.sync,
ldmatrix, cp.async, tf32 rounding) on the CUDA emulator, element by element
against plain matrix products -- the kernels built on them are verified on
the emulator, so the emulation itself must follow the PTX ISA exactly."""

import math

import pytest
import torch

from handgrad import cuda_emulation
from conftest import requires_emulation

pytestmark = requires_emulation


def run(name, args=(), values=()):
    return torch.tensor(cuda_emulation._module._self_test(name, list(args), list(values)),
                        dtype=torch.float64)


def rounded(x, dtype):
    return x.to(dtype).double()


@pytest.mark.parametrize("dtype, name", [(torch.float16, "mma_f16"), (torch.bfloat16, "mma_bf16")],
                         ids=["float16", "bfloat16"])
@pytest.mark.parametrize("load", ["layout", "ldmatrix", "ldmatrix_trans"])
def test_mma_m16n8k16_equals_the_matrix_product(dtype, name, load):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(16, 16, generator=g)
    B = torch.randn(16, 8, generator=g)
    C = torch.randn(16, 8, generator=g)
    # Distinct entries everywhere, so a wrong row or column cannot go unseen.
    A += torch.arange(256).reshape(16, 16) / 64
    B += torch.arange(128).reshape(16, 8) / 32
    values = torch.cat([A.flatten(), B.flatten(), C.flatten()]).tolist()
    D = run(name, [["layout", "ldmatrix", "ldmatrix_trans"].index(load)], values).reshape(16, 8)
    # Products of 16-bit inputs are exact in float32; accumulated in float32.
    reference = rounded(A, dtype) @ rounded(B, dtype) + C.double()
    torch.testing.assert_close(D, reference, rtol=1e-6, atol=1e-5)


def test_mma_tf32_equals_the_product_of_tf32_rounded_operands():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(16, 8, generator=g) + torch.arange(128).reshape(16, 8) / 16
    B = torch.randn(8, 8, generator=g) + torch.arange(64).reshape(8, 8) / 16
    C = torch.randn(16, 8, generator=g)
    D = run("mma_tf32", values=torch.cat([A.flatten(), B.flatten(), C.flatten()]).tolist())
    tf32 = lambda t: run("to_tf32", values=t.flatten().tolist()).reshape(t.shape)  # noqa: E731
    reference = tf32(A) @ tf32(B) + C.double()
    torch.testing.assert_close(D.reshape(16, 8), reference, rtol=1e-6, atol=1e-5)
    # tf32 really drops precision: the float32 product differs.
    assert not torch.allclose(D.reshape(16, 8), A.double() @ B.double() + C.double(), rtol=1e-6,
                              atol=1e-6)


def test_tf32_rounding_is_to_nearest_ties_away():
    ulp = 2.0 ** -10  # tf32 keeps 10 mantissa bits: 1 + 2^-10 is the next value after 1
    values = [1.0, 1 + ulp / 4, 1 + ulp / 2, 1 + 3 * ulp / 4, -(1 + ulp / 2), 3.0e38,
              math.inf, -math.inf]
    out = run("to_tf32", values=values).tolist()
    assert out[:5] == [1.0, 1.0, 1 + ulp, 1 + ulp, -(1 + ulp)]
    assert out[6:] == [math.inf, -math.inf]
    assert math.isnan(run("to_tf32", values=[math.nan]).item())


@pytest.mark.parametrize("zero_fill", [False, True])
def test_cp_async_completes_at_the_wait(zero_fill):
    src = torch.arange(256, dtype=torch.float32)
    out = run("cp_async", [int(zero_fill)], src.tolist()).reshape(32, 4, 4)
    first, second = src[:128].reshape(32, 4).double(), src[128:].reshape(32, 4).double()
    if zero_fill:
        second[:, 2:] = 0
    # after wait_group<1>: the first group has landed, the second not yet (poison)
    assert torch.equal(out[:, 0], first) and torch.isnan(out[:, 1]).all()
    # after wait_group<0>: both
    assert torch.equal(out[:, 2], first) and torch.equal(out[:, 3], second)


def test_misaligned_cp_async_is_an_error():
    with pytest.raises(RuntimeError, match="misaligned cp.async"):
        run("cp_async_misaligned")
