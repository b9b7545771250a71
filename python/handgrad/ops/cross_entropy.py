"""cross_entropy: fake kernels and the public function (autograd is in C++).

The kernels are in csrc/ops/{cross_entropy.cpp, cpu/cross_entropy.cpp,
cuda/cross_entropy.cu}. Forward returns the loss and the log-sum-exp of every
row (float32, float64 for float64 input; an ignored row records 0, or NaN where
native's gradient of that row is NaN); lse is the only tensor saved besides
the inputs. float32, float64, float16 and bfloat16 on the CPU and CUDA
(reduced precision computes in float32 and rounds each result once). Backward recomputes p - y from the logits and lse and writes the
input gradient directly (torch.ops.handgrad.cross_entropy_backward);
probability targets that require grad get theirs from
torch.ops.handgrad.cross_entropy_target_backward.

Autograd is registered in C++ (csrc/ops/cross_entropy_autograd.cpp, a
torch::autograd::Function on the Autograd key) instead of with
torch.library.register_autograd: at (128, 10) the Python autograd layer alone
cost more than native's whole forward + backward (measurements in that file).
That kernel serves first-order reverse mode; forward mode, the torch.func
transforms and double backward use the formulas in _cross_entropy_autograd.py
(cross_entropy() below reaches them through _autograd.call). A weight that
requires grad raises.
"""

from typing import Optional

import torch
from torch.nn import _reduction

from . import _cross_entropy_autograd  # noqa: F401  (registers the Python formulas)
from ._autograd import call

__all__ = ["cross_entropy"]


def _row_shape(input):
    return () if input.dim() == 1 else (input.shape[0], *input.shape[2:])


def _lse_dtype(input):
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _check_devices(op, input, **tensors):
    """Every tensor argument on the input's device, as the C++ drivers check.

    The fake kernels are also the Meta kernels, so a CPU input with a meta
    weight or target lands here, not in the driver: without this check it
    returned an uninitialised CPU loss. Native's wording."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == input.device,
                         lambda: "%s: Tensor on device %s is not on the expected device %s! "
                                 "(argument '%s' must be on the input's device)"
                                 % (op, t.device, input.device, name))


@torch.library.register_fake("handgrad::cross_entropy")
def _cross_entropy_fake(input, target, weight=None, ignore_index=-100, reduction="mean",
                        label_smoothing=0.0):
    _check_devices("handgrad::cross_entropy", input, target=target, weight=weight)
    torch._check(input.dim() >= 1,
                 lambda: "handgrad::cross_entropy: expected a 1-D or larger input")
    torch._check(reduction in ("none", "mean", "sum"),
                 lambda: "%s is not a valid value for reduction" % reduction)
    rows = _row_shape(input)
    loss = input.new_empty(rows if reduction == "none" else ())
    return loss, input.new_empty(rows, dtype=_lse_dtype(input))


@torch.library.register_fake("handgrad::cross_entropy_backward")
def _cross_entropy_backward_fake(grad_loss, input, target, weight, ignore_index, reduction,
                                 label_smoothing, lse):
    _check_devices("handgrad::cross_entropy_backward", input, grad_loss=grad_loss, target=target,
                   weight=weight, lse=lse)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("handgrad::cross_entropy_target_backward")
def _cross_entropy_target_backward_fake(grad_loss, input, target, weight, reduction,
                                        label_smoothing, lse):
    _check_devices("handgrad::cross_entropy_target_backward", input, grad_loss=grad_loss,
                   target=target, weight=weight, lse=lse)
    return torch.empty_like(input, dtype=target.dtype, memory_format=torch.contiguous_format)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  size_average: Optional[bool] = None, ignore_index: int = -100,
                  reduce: Optional[bool] = None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of softmax(input), fused, with the semantics of
    torch.nn.functional.cross_entropy.

    Args:
        input: logits ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``.
        target: class indices (int64, the input's shape without dim 1, or ``(1)``
            for a ``(C)`` input; entries equal to ``ignore_index`` are skipped) or
            class probabilities (the input's shape).
        weight: per-class weights ``(C,)`` or None.
        size_average, reduce: deprecated, as in torch.
        ignore_index: the target value that contributes neither loss nor gradient.
        reduction: ``'none'``, ``'mean'`` (native's weighted mean) or ``'sum'``.
        label_smoothing: in ``[0, 1]``, for both target kinds.

    Returns:
        A scalar, or the per-element losses ``(N, d1, ..., dK)`` with ``'none'``.

    Dtypes and devices: float32, float64, float16 and bfloat16 on the CPU and
    CUDA (16-bit inputs are computed in float32 and rounded once). NaN and
    infinite logits give native's NaN and inf results, in the loss and the
    gradients. Differentiable in input (and in probability targets); saved
    for backward: one log-sum-exp per row, no N x C matrix.
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if target.dtype != input.dtype and target.is_floating_point():
        # Probabilities of another dtype: compute in the promoted one, as native does.
        dtype = torch.promote_types(input.dtype, target.dtype)
        input, target = input.to(dtype), target.to(dtype)
        weight = None if weight is None else weight.to(dtype)
    return call("handgrad::cross_entropy", input, target, weight, ignore_index, reduction,
                label_smoothing)[0]
