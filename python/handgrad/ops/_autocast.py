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

float64 tensors and tensors on another device are never cast (autocast leaves
them alone too). Whether the op then has kernels for that dtype on that device
is the op's business: where it has none, it raises its usual error naming the
dtype. An op module that registers its own autocast kernel (before this module
is imported, from handgrad/ops/__init__.py) keeps it.
"""

import torch

LOWER_PRECISION = ("conv2d", "scaled_dot_product_attention", "lstm_cell", "lstm_layer")
FLOAT32 = ("cross_entropy",)
_DEVICE_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_AUTOCAST_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA))

_library = torch.library.Library("handgrad", "IMPL")


def _cast(value, device_type, dtype):
    if isinstance(value, torch.Tensor):
        eligible = (value.is_floating_point() and value.dtype not in (torch.float64, dtype)
                    and value.device.type == device_type)
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def _kernel(op, device_type, fixed_dtype):
    def autocast_kernel(*args, **kwargs):
        dtype = fixed_dtype or torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
            return op(*_cast(args, device_type, dtype), **_cast(kwargs, device_type, dtype))

    return autocast_kernel


def _register():
    for name, dtype in [(n, None) for n in LOWER_PRECISION] + [(n, torch.float32) for n in FLOAT32]:
        op = getattr(torch.ops.handgrad, name).default
        for device_type, key in _DEVICE_KEYS.items():
            if torch._C._dispatch_has_kernel_for_dispatch_key("handgrad::" + name, key):
                continue  # the op module registered its own
            kernel = _kernel(op, device_type, dtype)
            # The dispatcher's kernel serves eager calls; the Python one torch.compile's tracing.
            op.py_impl(getattr(torch._C.DispatchKey, key))(kernel)
            _library.impl(name, kernel, key)


_register()
