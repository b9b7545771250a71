"""handgrad's CUDA kernels on the host CUDA emulator (csrc/emulation).

The emulation module (built with ``HANDGRAD_CUDA_EMULATION=1``; ``make test``
does) holds every .cu file compiled by the host C++ compiler against an
emulation of the CUDA execution model: fibers for threads, checked barriers
and warp operations, poisoned shared memory, sm_90's launch limits. Inside
``with handgrad.cuda_emulation.emulated():`` every handgrad op called on CPU
tensors runs its CUDA kernels there -- through the same drivers, autograd
formulas, fake kernels and torch.compile paths as on a GPU -- so the tests
prove the CUDA code on machines without one::

    with handgrad.cuda_emulation.emulated():
        y = handgrad.ops.conv2d(x, w)     # x, w on the CPU; conv2d.cu computes y

The emulator runs one block at a time; keep problem sizes small.
"""

import contextlib
import importlib.util
import os


def _load():
    # HANDGRAD_CUDA_EMULATION_MODULE names another build of the module, e.g.
    # the ThreadSanitizer one of tools/emulation_tsan.py.
    path = os.environ.get("HANDGRAD_CUDA_EMULATION_MODULE")
    if path:
        spec = importlib.util.spec_from_file_location("handgrad._cuda_emulation", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    try:
        from . import _cuda_emulation
    except ImportError:  # built without HANDGRAD_CUDA_EMULATION=1
        return None
    return _cuda_emulation


_module = _load()

__all__ = ["available", "active", "emulated", "launch_statistics", "reset_launch_statistics",
           "emulated_files"]

_MISSING = ("handgrad was built without its CUDA emulation module; rebuild with "
            "HANDGRAD_CUDA_EMULATION=1 pip install --no-build-isolation -e .")


def available():
    """Whether this build has the emulation module."""
    return _module is not None


def active():
    """Whether handgrad ops on CPU tensors run the emulated CUDA kernels now."""
    return _module is not None and _module.enabled()


@contextlib.contextmanager
def emulated():
    """Runs handgrad ops on CPU tensors through the emulated CUDA kernels.

    Process-wide (the dispatcher's CPU kernels are swapped), not thread-local.
    Errors a GPU would report -- a failed device-side assert, a launch over
    the limits, a deadlocked or divergent barrier -- raise RuntimeError.
    """
    if _module is None:
        raise RuntimeError(_MISSING)
    was_on = _module.enabled()
    _module.set_enabled(True)
    try:
        yield
    finally:
        _module.set_enabled(was_on)


def launch_statistics():
    """{kernel name: (launches, blocks, threads)} run by the emulator so far."""
    if _module is None:
        raise RuntimeError(_MISSING)
    return {name: tuple(v) for name, v in _module.launch_statistics().items()}


def reset_launch_statistics():
    if _module is None:
        raise RuntimeError(_MISSING)
    _module.reset_launch_statistics()


def emulated_files():
    """The .cu files compiled into the emulation module."""
    if _module is None:
        raise RuntimeError(_MISSING)
    return list(_module.emulated_files())
