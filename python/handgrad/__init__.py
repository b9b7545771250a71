"""handgrad: hand-written CPU and CUDA kernels with hand-derived gradients.

Every op is a real PyTorch operator (``torch.ops.handgrad.*``) with CPU and
CUDA kernels, a fake implementation for torch.compile and autograd that calls
the op's own backward kernel. Use them through:

* ``handgrad.ops``: functions with the signatures of torch.nn.functional;
* ``handgrad.nn``: drop-in modules for their torch.nn counterparts;
* ``handgrad.patch(model)``: runs an existing torch.nn model on them.
"""

from . import _compat

# Checked before the binary loads: with another torch it would fail with an
# "undefined symbol" (or load and misbehave). The `handgrad` command still starts
# without it, so that --help, --version and `handgrad info` can say what is wrong.
try:
    import torch
except ImportError:
    _load_problem = _compat.missing_torch_message()
else:
    _load_problem = _compat.torch_mismatch(torch.__version__, torch.version.cuda)

if _load_problem is None:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.handgrad.*)
    except ImportError as e:
        _load_problem = _compat.load_failure_message(e)

if _load_problem is not None:
    if not _compat.loading_for_the_command_line():
        raise ImportError(_load_problem)
    __version__ = _compat.build.version if _compat.build is not None else "unknown"

    def __getattr__(name):
        raise ImportError(_load_problem)
else:
    from . import cpu_gemm, cuda_emulation, nn, ops
    from ._info import info
    from .patch import patch, unpatch

    def cpu_gemm_decisions():
        """The measured CPU matrix-product decisions (see handgrad.cpu_gemm)."""
        return cpu_gemm.decisions()

    __version__ = (_compat.build.version if _compat.build is not None
                   else _C.build_info()["version"])

__all__ = ["cpu_gemm", "cpu_gemm_decisions", "cuda_emulation", "info", "nn", "ops", "patch",
           "unpatch", "__version__"]
