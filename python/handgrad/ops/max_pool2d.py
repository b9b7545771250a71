"""max_pool2d: fake kernel, autograd registration and the public function.

The kernels are in csrc/ops/{max_pool2d.cpp, cpu/max_pool2d.cpp,
cuda/max_pool2d.cu}. Forward returns the pooled values and the int64 index
of each maximum; backward routes each output gradient to its argmax, so the
indices are the only tensor saved for backward.
"""

import torch
from torch._prims_common import suggest_memory_format

from ._args import pair

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


# The schema's defaults: callers of torch.ops.handgrad.max_pool2d may omit them.
_DEFAULTS = ((), (0, 0), (1, 1), False)


def _all_args(args):
    return tuple(args) + _DEFAULTS[len(args) - 2:]


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
    input, kernel_size, stride, padding, dilation, _ceil_mode = _all_args(inputs)
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
        grad_input = torch.ops.handgrad.max_pool2d_backward(grad_output, indices, ctx.input_size,
                                                            *ctx.window)
    return grad_input, None, None, None, None, None


torch.library.register_autograd("handgrad::max_pool2d", _backward, setup_context=_setup_context)


# Double backward: max_pool2d_backward is linear in grad_output; its adjoint
# picks, for every output, the incoming gradient at that output's argmax.
def _setup_backward_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward_backward(ctx, grad_grad_input):
    (indices,) = ctx.saved_tensors
    flat = grad_grad_input.flatten(-2)
    grad_grad_output = flat.gather(-1, indices.flatten(-2)).view(indices.shape)
    return grad_grad_output, None, None, None, None, None, None


torch.library.register_autograd("handgrad::max_pool2d_backward", _backward_backward,
                                setup_context=_setup_backward_context)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """2-D max pooling with the semantics of torch.nn.functional.max_pool2d.

    Accepts (C, H, W) or (N, C, H, W) input in NCHW or channels_last layout.
    Returns the pooled tensor, and with ``return_indices=True`` also the flat
    index (h * W + w within each input plane) of every maximum.
    """
    kernel_size = pair(kernel_size, "kernel_size")
    stride = kernel_size if stride is None or stride == [] or stride == () else pair(stride, "stride")
    output, indices = torch.ops.handgrad.max_pool2d(input, kernel_size, stride,
                                                    pair(padding, "padding"),
                                                    pair(dilation, "dilation"), bool(ceil_mode))
    return (output, indices) if return_indices else output
