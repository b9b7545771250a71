"""max_pool2d: fake kernel, autograd registration and the public function.

The kernels are in csrc/ops/{max_pool2d.cpp, cpu/max_pool2d.cpp,
cuda/max_pool2d.cu}. Forward returns the pooled values and the int64 index
of each maximum; backward routes each output gradient to its argmax, so the
indices are the only tensor saved for backward.
"""

from typing import Optional, Tuple, Union

import torch
from torch._prims_common import suggest_memory_format

from ._args import pair
from ._autograd import OPS, call, register_autograd

__all__ = ["max_pool2d"]


def _pooled_size(size, kernel, stride, pad, dilation, ceil_mode):
    span = dilation * (kernel - 1) + 1
    if not ceil_mode:
        return (size + 2 * pad - span) // stride + 1
    # Ceil mode counts the windows o with o * stride < room + stride (room =
    # size + 2 pad - span: ceil(room / stride) + 1 of them) whose start
    # o * stride - pad lies left of the input's end (native's correction
    # drops a last window that would start in the right padding): o * stride
    # < size + pad + min(0, stride + pad - span). One expression in the size
    # instead of native's branch on it, so a symbolic size gets no guard on
    # its parity (no recompilation between odd and even sizes). Equal to
    # native's formula for every pad <= span / 2 (which the op checks).
    return (size + pad + min(0, stride + pad - span) + stride - 1) // stride


def _layout(t):
    return suggest_memory_format(t) if t.dim() == 4 else torch.contiguous_format


@torch.library.register_fake("handgrad::max_pool2d")
def _max_pool2d_fake(input, kernel_size, stride=(), padding=(0, 0), dilation=(1, 1),
                     ceil_mode=False):
    torch._check(input.dim() in (3, 4), lambda: "handgrad::max_pool2d: expected 3-D or 4-D input")
    stride = stride or kernel_size
    out_h, out_w = (_pooled_size(input.shape[-2 + i], kernel_size[i], stride[i], padding[i],
                                 dilation[i], ceil_mode) for i in range(2))
    torch._check(out_h >= 1 and out_w >= 1,
                 lambda: "handgrad::max_pool2d: the input is too small for the window")
    shape = (*input.shape[:-2], out_h, out_w)
    fmt = _layout(input)
    output = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)
    indices = torch.empty(shape, dtype=torch.int64, device=input.device, memory_format=fmt)
    return output, indices


@torch.library.register_fake("handgrad::max_pool2d_backward")
def _max_pool2d_backward_fake(grad_output, indices, input_size, kernel_size, stride, padding,
                              dilation):
    return torch.empty(input_size, dtype=grad_output.dtype, device=grad_output.device,
                       memory_format=_layout(indices))


def _setup_context(ctx, inputs, output):
    input, kernel_size, stride, padding, dilation, _ceil_mode = inputs
    _, indices = output
    # Without these, autograd would allocate a zero int64 gradient for the
    # indices output on every backward call.
    ctx.mark_non_differentiable(indices)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(indices)
    ctx.input_size = input.shape
    ctx.window = (kernel_size, stride or kernel_size, padding, dilation)


def _backward(ctx, grad_output, _grad_indices):
    (indices,) = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0] and grad_output is not None:
        grad_input = OPS.max_pool2d_backward(grad_output, indices, ctx.input_size, *ctx.window)
    return grad_input, None, None, None, None, None


def _gather_at(values, indices):
    """values (..., H, W) read at the flat in-plane indices (..., oH, oW)."""
    return values.flatten(-2).gather(-1, indices.flatten(-2)).view(indices.shape)


# Forward mode: max pooling is piecewise linear -- away from ties each output
# is one input element, the one its index names, so
#   d(max_pool2d(x))[n, c, p] = dx[n, c, indices[n, c, p]].
# (At a tie the index picks one of the equal elements, the same one backward
# routes the gradient to.) The indices output is integer: no tangent.
def _jvp(ctx, inputs, t_input, *_):
    if t_input is None:
        return None, None
    _, indices = ctx.outputs
    return _gather_at(t_input, indices), None


register_autograd("handgrad::max_pool2d", _backward, _setup_context, _jvp)


# Double backward: max_pool2d_backward is linear in grad_output (a scatter-
# add of each output gradient to its argmax); its adjoint picks, for every
# output, the incoming gradient at that output's argmax, and its tangent is
# the same scatter of the grad_output tangent. The indices get neither.
def _setup_backward_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.set_materialize_grads(False)


def _backward_backward(ctx, grad_grad_input):
    (indices,) = ctx.saved_tensors
    grad_grad_output = None
    if ctx.needs_input_grad[0] and grad_grad_input is not None:
        grad_grad_output = _gather_at(grad_grad_input, indices)
    return grad_grad_output, None, None, None, None, None, None


def _backward_jvp(ctx, inputs, t_grad_output, *_):
    if t_grad_output is None:
        return None
    _, indices, *window = inputs
    return OPS.max_pool2d_backward(t_grad_output, indices, *window)


register_autograd("handgrad::max_pool2d_backward", _backward_backward, _setup_backward_context,
                  _backward_jvp)


def max_pool2d(input: torch.Tensor, kernel_size: Union[int, Tuple[int, int]],
               stride: Optional[Union[int, Tuple[int, int]]] = None,
               padding: Union[int, Tuple[int, int]] = 0,
               dilation: Union[int, Tuple[int, int]] = 1, ceil_mode: bool = False,
               return_indices: bool = False
               ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """2-D max pooling with the semantics of torch.nn.functional.max_pool2d.

    Args:
        input: ``(N, C, H, W)`` or unbatched ``(C, H, W)``, NCHW or channels_last.
        kernel_size: the window, an int or a pair.
        stride: an int or a pair; default ``kernel_size``.
        padding: implicit -inf padding on both sides, at most half the window.
        dilation: spacing of the window's taps.
        ceil_mode: count a partial window at the end (as native does).
        return_indices: also return the indices of the maxima.

    Returns:
        The pooled ``(N, C, H_out, W_out)`` tensor in the input's layout, and
        with ``return_indices=True`` also the int64 flat index
        (``h * W + w`` within each input plane) of every maximum.

    Dtypes and devices: float32, float64, float16 and bfloat16 on the CPU and
    on CUDA. Differentiable (also twice); saved for backward: the indices only.
    """
    kernel_size = pair(kernel_size, "kernel_size")
    stride = kernel_size if stride is None or stride == [] or stride == () else pair(stride, "stride")
    output, indices = call("handgrad::max_pool2d", input, kernel_size, stride,
                           pair(padding, "padding"), pair(dilation, "dilation"), bool(ceil_mode))
    return (output, indices) if return_indices else output
