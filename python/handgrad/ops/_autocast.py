"""handgrad's ops under torch.autocast, with native PyTorch's casting policy.

Custom operators get no autocast behaviour of their own: inside an autocast
region a handgrad op would receive whatever mixture of dtypes the layers
before it produced (a bfloat16 activation and a float32 weight) and refuse
it. These kernels, registered for the AutocastCPU and AutocastCUDA dispatch
keys, cast the op's floating-point inputs as autocast casts the native op
they replace, then call the op below autocast:

* conv2d, scaled_dot_product_attention, lstm_cell, lstm_layer: to the
  region's lower-precision dtype (torch.get_autocast_dtype: bfloat16 or
  float16), like native conv2d, SDPA and the LSTM layers;
* cross_entropy: to float32, like native's log_softmax and nll_loss;
* max_pool2d: not cast; it runs in its input's dtype, like native's.

float64 tensors are never cast (autocast leaves them alone too). Whether the
op then has kernels for that dtype on that device is the op's business: where
it has none, it raises its usual error naming the dtype.
"""

import torch

LOWER_PRECISION = ("conv2d", "scaled_dot_product_attention", "lstm_cell", "lstm_layer")
FLOAT32 = ("cross_entropy",)
_DEVICE_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_AUTOCAST_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA))

_library = torch.library.Library("handgrad", "IMPL")


def _cast(value, dtype):
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.dtype != torch.float64
        return value.to(dtype) if eligible and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _kernel(op, device_type, fixed_dtype):
    def autocast_kernel(*args, **kwargs):
        dtype = fixed_dtype or torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
            return op(*_cast(args, dtype), **_cast(kwargs, dtype))

    return autocast_kernel


def _register():
    for name, dtype in [(n, None) for n in LOWER_PRECISION] + [(n, torch.float32) for n in FLOAT32]:
        op = getattr(torch.ops.handgrad, name).default
        for device_type, key in _DEVICE_KEYS.items():
            _library.impl(name, _kernel(op, device_type, dtype), key)


_register()
