"""Which kernel runs handgrad's CPU matrix products: its own AVX-512
micro-kernel or the BLAS behind ``torch.mm`` (MKL/OpenBLAS).

Under the default policy ``"auto"`` each problem class (log2 buckets of
m, n, k, operand layouts, call site, thread count) is timed once per process
the first time it is seen, and the faster kernel is kept (like cuDNN's
benchmark mode). ``HANDGRAD_CPU_GEMM=own|blas|auto`` in the environment or
:func:`set_policy` force a choice; ``HANDGRAD_CPU_GEMM_VERBOSE=1`` prints
each decision as it is made. Each kernel's results are independent of the
thread count; ``own`` and ``blas`` differ by rounding only, so force one of
them when results must be bitwise reproducible across processes.
"""

from typing import Any, Dict, List

from . import _C


def policy() -> str:
    """The current policy: ``"own"``, ``"blas"`` or ``"auto"``."""
    return _C.cpu_gemm_policy()


def set_policy(name: str) -> None:
    """Forces ``"own"`` or ``"blas"``, or measures per class (``"auto"``)."""
    _C.set_cpu_gemm_policy(name)


def decisions() -> List[Dict[str, Any]]:
    """The classes measured so far, in order: the first problem of each
    (m, n, k, layouts, site, threads), both kernels' fastest time in
    microseconds and the ``kernel`` kept."""
    return _C.cpu_gemm_decisions()


def tuning_seconds() -> float:
    """Seconds this process has spent measuring."""
    return _C.cpu_gemm_tuning_seconds()


def clear_decisions() -> None:
    """Forgets the decisions; each class is measured again when next seen."""
    _C.clear_cpu_gemm_decisions()


def kernels() -> Dict[str, Any]:
    """The CPU kernels active on this machine: the ISA chosen at run time,
    whether the own matrix kernel can run, the policy, the BLAS torch calls."""
    return _C.cpu_kernels()
