"""Which kernel runs handgrad's CPU matrix products: its own AVX-512
micro-kernel or the BLAS behind ``torch.mm`` (MKL/OpenBLAS).

Under the default policy ``"auto"`` each problem class (log2 buckets of
m, n, k, operand layouts, call site) is timed the first time it is seen, and
the faster kernel is kept (like cuDNN's benchmark mode).
``HANDGRAD_CPU_GEMM=own|blas|auto`` in the environment or :func:`set_policy`
force a choice; ``HANDGRAD_CPU_GEMM_VERBOSE=1`` prints each decision as it is
made.

Reproducibility: each kernel's results are independent of the thread count,
and ``own`` and ``blas`` differ by rounding only. So that a seeded run repeats
bit for bit under ``"auto"`` too, the decisions are stored in a decision file
(:func:`decision_file`: ``HANDGRAD_CPU_GEMM_CACHE``, by default
``~/.cache/handgrad/cpu_gemm_decisions.txt``), keyed by the machine (CPU
model, BLAS, torch version) and the thread count: the first process to see a
class measures it, every later one -- and every concurrent one, such as the
other ranks of a DDP run -- reads the same choice. Delete the file to measure
again; ``HANDGRAD_CPU_GEMM_CACHE=off`` keeps decisions per process.
"""

from typing import Any, Dict, List, Optional

from . import _C


def policy() -> str:
    """The current policy: ``"own"``, ``"blas"`` or ``"auto"``."""
    return _C.cpu_gemm_policy()


def set_policy(name: str) -> None:
    """Forces ``"own"`` or ``"blas"``, or measures per class (``"auto"``)."""
    _C.set_cpu_gemm_policy(name)


def decisions() -> List[Dict[str, Any]]:
    """The classes decided so far in this process, in order: the first problem
    of each (m, n, k, layouts, site, threads), both kernels' fastest time in
    microseconds, the ``kernel`` kept and whether the decision was ``stored``
    (read from the decision file) rather than measured here."""
    return _C.cpu_gemm_decisions()


def decision_file() -> Optional[str]:
    """The file the decisions are stored in and read from, or None."""
    return _C.cpu_gemm_decision_file() or None


def set_decision_file(path: Optional[str]) -> None:
    """Stores and reads decisions in ``path`` from now on (None: keep them in
    this process only). Decisions already made in this process stay."""
    _C.set_cpu_gemm_decision_file("" if path is None else str(path))


def tuning_seconds() -> float:
    """Seconds this process has spent measuring."""
    return _C.cpu_gemm_tuning_seconds()


def clear_decisions() -> None:
    """Forgets this process's decisions; a class seen again is read from the
    decision file, or measured when the file has none."""
    _C.clear_cpu_gemm_decisions()


def kernels() -> Dict[str, Any]:
    """The CPU kernels active on this machine: the ISA chosen at run time,
    whether the own matrix kernel can run, the policy, the BLAS torch calls."""
    return _C.cpu_kernels()
