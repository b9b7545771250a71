"""Helpers shared by the op tests: layouts, native comparisons, compile checks."""

import os
import subprocess
import sys

import torch

from handgrad import cuda_emulation

LAYOUTS = ("contiguous", "channels_last", "noncontiguous")


def in_layout(x, layout):
    """The same values as x, stored contiguously, channels_last, or with gaps
    between elements (a strided view that is not contiguous in any format)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    if layout == "noncontiguous":
        wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        view = wide[..., ::2]
        view.copy_(x)
        return view
    raise ValueError(layout)


def runs_cuda_kernels(device):
    """Whether handgrad's CUDA kernels compute on `device`: a GPU, or the CPU
    while the CUDA emulator is switched on (the "cuda-emulated" device)."""
    return device.type == "cuda" or cuda_emulation.active()


def leaves(tensors):
    """Fresh leaf copies (same strides) of the floating tensors that require grad."""
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
            with torch.no_grad():
                leaf.copy_(t)
            out.append(leaf.requires_grad_())
        else:
            out.append(t)
    return out


def first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def forward_backward(fn, inputs, upstream=None, seed=None):
    """Runs fn on fresh leaves; returns (output, grads of the inputs that require grad)."""
    args = leaves(inputs)
    out = fn(*args)
    diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    y = first(out)
    if upstream is None and y.numel() != 1:
        gen = torch.Generator(device="cpu").manual_seed(1234 if seed is None else seed)
        upstream = torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device)
    grads = torch.autograd.grad(y, diff, upstream, allow_unused=True) if diff else ()
    return out, grads


def assert_matches_native(handgrad_fn, native_fn, inputs, atol=None, rtol=None, exact=False):
    """Outputs and input gradients of handgrad_fn equal those of native_fn."""
    mine, my_grads = forward_backward(handgrad_fn, inputs)
    ref, ref_grads = forward_backward(native_fn, inputs)
    mine = mine if isinstance(mine, (tuple, list)) else (mine,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    assert len(mine) == len(ref)
    check = torch.testing.assert_close
    for a, b in zip(mine, ref):
        if exact or not a.is_floating_point():
            check(a, b, atol=0, rtol=0, equal_nan=True)
        else:
            check(a, b, atol=atol, rtol=rtol, equal_nan=True)
    for a, b in zip(my_grads, ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            check(a, b, atol=atol, rtol=rtol, equal_nan=True)
    return mine, my_grads


def assert_script_prints_ok(script, timeout=120, **env):
    """Runs `script` in a fresh Python (extra environment variables from env,
    e.g. HANDGRAD_CPU_AVX512="0": read once per process) and asserts it
    succeeded and printed exactly "ok"."""
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
