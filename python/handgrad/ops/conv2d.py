"""conv2d: fake kernels, autograd registration and the public function.

The kernels are in csrc/ops/{conv2d.cpp, cpu/conv2d*.cpp, cuda/conv2d.cu}.
Forward saves only the input and the weight. Backward calls one op per
gradient autograd asks for (conv2d_grad_input, conv2d_grad_weight,
conv2d_grad_bias), so a first layer whose input needs no gradient never
computes one. Padding is passed to the ops as (top, bottom, left, right).
"""

import numbers
from typing import Optional, Tuple, Union

import torch
from torch._prims_common import suggest_memory_format

from ._args import pair
from ._autograd import OPS, call, register_autograd

__all__ = ["conv2d"]


def _out_size(size, kernel, stride, pad_begin, pad_end, dilation):
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def _is_channels_last(t):
    return t.dim() == 4 and suggest_memory_format(t) == torch.channels_last


def _result_format(activation, weight):
    if activation.dim() == 4 and (_is_channels_last(activation) or _is_channels_last(weight)):
        return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("handgrad::conv2d")
def _conv2d_fake(input, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1),
                 groups=1):
    torch._check(input.dim() in (3, 4),
                 lambda: "handgrad::conv2d: expected 3-D (unbatched) or 4-D (batched) input")
    torch._check(weight.dim() == 4, lambda: "handgrad::conv2d: expected 4-D weight")
    torch._check(input.shape[-3] == weight.shape[1] * groups,
                 lambda: "handgrad::conv2d: input channels do not match weight and groups")
    out_h = _out_size(input.shape[-2], weight.shape[2], stride[0], padding[0], padding[1],
                      dilation[0])
    out_w = _out_size(input.shape[-1], weight.shape[3], stride[1], padding[2], padding[3],
                      dilation[1])
    torch._check(out_h >= 1 and out_w >= 1,
                 lambda: "handgrad::conv2d: kernel size can't be greater than actual input size")
    shape = (*input.shape[:-3], weight.shape[0], out_h, out_w)
    return torch.empty(shape, dtype=input.dtype, device=input.device,
                       memory_format=_result_format(input, weight))


@torch.library.register_fake("handgrad::conv2d_grad_input")
def _conv2d_grad_input_fake(grad_output, weight, input_size, stride, padding, dilation, groups):
    return torch.empty(input_size, dtype=grad_output.dtype, device=grad_output.device,
                       memory_format=_result_format(grad_output, weight))


@torch.library.register_fake("handgrad::conv2d_grad_weight")
def _conv2d_grad_weight_fake(grad_output, input, weight_size, stride, padding, dilation, groups):
    return grad_output.new_empty(weight_size)


@torch.library.register_fake("handgrad::conv2d_grad_bias")
def _conv2d_grad_bias_fake(grad_output):
    return grad_output.new_empty((grad_output.shape[-3],))


# The schema's defaults: callers of torch.ops.handgrad.conv2d may omit them.
_DEFAULTS = (None, (1, 1), (0, 0, 0, 0), (1, 1), 1)


def _all_args(args):
    return tuple(args) + _DEFAULTS[len(args) - 2:]


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups = _all_args(inputs)
    saved_input = input if ctx.needs_input_grad[1] else None
    saved_weight = weight if ctx.needs_input_grad[0] else None
    ctx.save_for_backward(saved_input, saved_weight)
    ctx.input_size = input.shape
    ctx.weight_size = weight.shape
    ctx.window = (stride, padding, dilation, groups)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    grad_input = grad_weight = grad_bias = None
    if grad_output is not None:
        ops = OPS
        if ctx.needs_input_grad[0]:
            grad_input = ops.conv2d_grad_input(grad_output, weight, ctx.input_size, *ctx.window)
        if ctx.needs_input_grad[1]:
            grad_weight = ops.conv2d_grad_weight(grad_output, input, ctx.weight_size, *ctx.window)
        if len(ctx.needs_input_grad) > 2 and ctx.needs_input_grad[2]:
            grad_bias = ops.conv2d_grad_bias(grad_output)
    return grad_input, grad_weight, grad_bias, None, None, None, None


# Forward mode: conv2d is bilinear in (input, weight) and linear in bias:
#   d(conv2d(x, W, b)) = conv2d(dx, W) + conv2d(x, dW) + db.
def _jvp(ctx, inputs, t_input, t_weight, t_bias, *_):
    input, weight, bias, *window = inputs
    # db is broadcast to the output's shape: alone (only the bias has a
    # tangent) a (C, 1, 1) tangent would not be the output's size.
    return _sum_terms(
        OPS.conv2d(t_input, weight, None, *window) if t_input is not None else None,
        OPS.conv2d(input, t_weight, None, *window) if t_weight is not None else None,
        t_bias.reshape(-1, 1, 1).expand(ctx.outputs[0].shape) if t_bias is not None else None)


def _sum_terms(*terms):
    present = [t for t in terms if t is not None]
    return sum(present[1:], present[0]) if present else None


register_autograd("handgrad::conv2d", _backward, _setup_context, _jvp)


# Double backward. Each backward op is linear in each argument, and its
# adjoints are the other ops:
#   gi = grad_input(go, W):  d/dgo = conv2d(ggi, W),      d/dW = grad_weight(go, ggi)
#   gw = grad_weight(go, x): d/dgo = conv2d(x, ggw),      d/dx = grad_input(go, ggw)
#   gb = grad_bias(go):      d/dgo = ggb broadcast over batch and pixels
def _setup_grad_input_context(ctx, inputs, output):
    grad_output, weight, input_size, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(grad_output, weight)
    ctx.window = (stride, padding, dilation, groups)
    ctx.weight_size = weight.shape


def _grad_input_backward(ctx, ggi):
    grad_output, weight = ctx.saved_tensors
    ops = OPS
    d_go = ops.conv2d(ggi, weight, None, *ctx.window) if ctx.needs_input_grad[0] else None
    d_w = (ops.conv2d_grad_weight(grad_output, ggi, ctx.weight_size, *ctx.window)
           if ctx.needs_input_grad[1] else None)
    return d_go, d_w, None, None, None, None, None


def _setup_grad_weight_context(ctx, inputs, output):
    grad_output, input, weight_size, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(grad_output, input)
    ctx.window = (stride, padding, dilation, groups)
    ctx.input_size = input.shape


def _grad_weight_backward(ctx, ggw):
    grad_output, input = ctx.saved_tensors
    ops = OPS
    d_go = ops.conv2d(input, ggw, None, *ctx.window) if ctx.needs_input_grad[0] else None
    d_x = (ops.conv2d_grad_input(grad_output, ggw, ctx.input_size, *ctx.window)
           if ctx.needs_input_grad[1] else None)
    return d_go, d_x, None, None, None, None, None


def _setup_grad_bias_context(ctx, inputs, output):
    ctx.grad_output_shape = inputs[0].shape


def _grad_bias_backward(ctx, ggb):
    shape = ctx.grad_output_shape
    return ggb.reshape(ggb.shape[0], 1, 1).expand(shape)


# Forward mode of the backward ops (for forward-over-reverse, e.g. Hessian-
# vector products): each is bilinear, so its tangent is the op applied to
# one tangent at a time.
def _grad_input_jvp(ctx, inputs, t_go, t_w, *_):
    grad_output, weight, input_size, *window = inputs
    return _sum_terms(
        OPS.conv2d_grad_input(t_go, weight, input_size, *window) if t_go is not None else None,
        OPS.conv2d_grad_input(grad_output, t_w, input_size, *window) if t_w is not None else None)


def _grad_weight_jvp(ctx, inputs, t_go, t_x, *_):
    grad_output, input, weight_size, *window = inputs
    return _sum_terms(
        OPS.conv2d_grad_weight(t_go, input, weight_size, *window) if t_go is not None else None,
        OPS.conv2d_grad_weight(grad_output, t_x, weight_size, *window) if t_x is not None else None)


def _grad_bias_jvp(ctx, inputs, t_go):
    return OPS.conv2d_grad_bias(t_go) if t_go is not None else None


register_autograd("handgrad::conv2d_grad_input", _grad_input_backward, _setup_grad_input_context,
                  _grad_input_jvp)
register_autograd("handgrad::conv2d_grad_weight", _grad_weight_backward,
                  _setup_grad_weight_context, _grad_weight_jvp)
register_autograd("handgrad::conv2d_grad_bias", _grad_bias_backward, _setup_grad_bias_context,
                  _grad_bias_jvp)


# torch.autocast: native conv2d is a lower-precision op (CPU and CUDA), so
# inside an autocast region its floating-point operands other than float64
# are cast to the region's dtype (bfloat16 or float16) and it runs there.
# handgrad's conv2d does the same: its CPU kernels compute float16/bfloat16
# in float32 and round once, its CUDA kernels accumulate in float32. The
# casts are ordinary differentiable ops, so gradients reach the float32
# parameters as with native conv2d.
_AUTOCAST_LIB = torch.library.Library("handgrad", "IMPL")


def _autocast_cast(value, device_type, dtype):
    if (isinstance(value, torch.Tensor) and value.is_floating_point()
            and value.dtype != torch.float64 and value.device.type == device_type):
        return value.to(dtype)
    return value


def _register_autocast(device_type):
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    op = torch.ops.handgrad.conv2d.default

    def run(*args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*(_autocast_cast(a, device_type, dtype) for a in args))

    # The Python kernel serves torch.compile's tracing, the dispatcher one eager calls.
    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key, None)
    op.py_impl(key)(run)
    _AUTOCAST_LIB.impl("conv2d", lambda _keyset, *args: run(*args), key_name, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    _register_autocast(_device_type)


def _resolve_padding(padding, weight, stride, dilation):
    """padding as (top, bottom, left, right), the way F.conv2d reads it."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError("Invalid padding string %r, should be one of {'valid', 'same'}"
                             % padding)
        if stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions")
        pads = []
        for i in range(2):
            total = dilation[i] * (weight.shape[2 + i] - 1)
            # The odd one out goes at the end, as in native conv2d.
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    top, left = pair(padding, "padding")
    return (top, top, left, left)


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride: Union[int, Tuple[int, int]] = 1,
           padding: Union[int, Tuple[int, int], str] = 0,
           dilation: Union[int, Tuple[int, int]] = 1, groups: int = 1) -> torch.Tensor:
    """2-D convolution (cross-correlation) with the semantics of torch.nn.functional.conv2d.

    Args:
        input: ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``, any layout.
        weight: ``(C_out, C_in / groups, kH, kW)``.
        bias: ``(C_out,)`` or None.
        stride: an int or a pair.
        padding: an int, a pair, ``'valid'`` or ``'same'`` (zeros).
        dilation: an int or a pair.
        groups: split the channels into this many independent convolutions.

    Returns:
        ``(N, C_out, H_out, W_out)`` (or unbatched), channels_last when the
        input or the weight is.

    Dtypes and devices: float32 and float64 on the CPU; float32, float64,
    float16 and bfloat16 on CUDA. Differentiable in input, weight and bias
    (also twice); saved for backward: input and weight.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError("handgrad.ops.conv2d: expected a 4-D weight tensor, but got %r"
                         % (getattr(weight, "shape", weight),))
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError("groups must be an int, but got %r" % (groups,))
    stride = pair(stride, "stride")
    dilation = pair(dilation, "dilation")
    pads = _resolve_padding(padding, weight, stride, dilation)
    return call("handgrad::conv2d", input, weight, bias, stride, pads, dilation, int(groups))
