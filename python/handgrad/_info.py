"""handgrad.info(): what this installation was built with and can use now."""

import platform
from typing import Any, Dict, List, Optional

from . import _compat


def _arch_names(archs: List[int]) -> List[str]:
    # nvcc's __CUDA_ARCH_LIST__ spells sm_90 as 900
    return ["sm_%d" % (a // 10) for a in archs]


def _torch_facts() -> Dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"torch": None, "torch_cuda": None, "gpu_usable": False, "gpus": [], "threads": None}
    usable = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu_usable": usable,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if usable else [],
        "threads": torch.get_num_threads(),
    }


def info() -> Dict[str, Any]:
    """Build and runtime facts as a dict (``handgrad info`` prints them).

    Keys: ``handgrad`` (version, with the local tag of the torch it was built
    for), ``built_for_torch`` (the torch version it was compiled against),
    ``torch`` and ``torch_cuda`` (the torch running now), whether the CUDA
    kernels were compiled and for which ``cuda_archs``, the ``cuda_toolkit``,
    whether a GPU is usable and which, ``openmp``, ``threads``, the ``cpu_isa``
    the CPU kernels were compiled for, ``machine`` and ``compiler``; and the CPU
    kernels active now: ``cpu_kernels_isa`` (chosen at run time),
    ``cpu_gemm_policy``, ``cpu_gemm_blas``, ``cpu_gemm_decisions`` (one line per
    decided class, "(stored)" when read from the decision file),
    ``cpu_gemm_decision_file`` and ``cpu_gemm_tuning_ms`` (see
    :mod:`handgrad.cpu_gemm`). When the
    compiled module cannot load (another torch than the build's), ``problem``
    says why and the compiled-in facts are ``None``.
    """
    import handgrad

    build = _compat.build
    problem = getattr(handgrad, "_load_problem", None)
    facts: Dict[str, Any] = {"handgrad": handgrad.__version__,
                             "built_for_torch": build.torch_version if build else None}
    runtime = _torch_facts()
    facts.update(torch=runtime["torch"], torch_cuda=runtime["torch_cuda"])
    compiled: Optional[Dict[str, Any]] = None
    if problem is None:
        from . import _C

        compiled = _C.build_info()
    toolkit = compiled["cuda_toolkit_version"] if compiled else 0
    facts.update({
        "cuda_kernels_compiled": compiled["cuda_compiled"] if compiled
        else (build.cuda_kernels if build else None),
        "cuda_archs": _arch_names(compiled["cuda_archs"]) if compiled else None,
        "cuda_toolkit": "%d.%d" % (toolkit // 1000, toolkit % 1000 // 10) if toolkit else None,
        "gpu_usable": runtime["gpu_usable"],
        "gpus": runtime["gpus"],
        "openmp": compiled["openmp"] if compiled else None,
        "threads": runtime["threads"],
        "cpu_isa": compiled["cpu_isa"] if compiled else None,
        "machine": platform.machine(),
        "compiler": compiled["compiler"] if compiled else None,
    })
    if problem is None:
        kernels = _C.cpu_kernels()
        decisions = _C.cpu_gemm_decisions()
        facts.update({
            "cpu_kernels_isa": kernels["isa"],
            "cpu_gemm_policy": kernels["gemm_policy"],
            "cpu_gemm_blas": kernels["blas"],
            "cpu_gemm_decisions": ["%dx%dx%d%s%s %s t%d: %s%s" % (
                d["m"], d["n"], d["k"], " A^T" if d["a_transposed"] else "",
                " B^T" if d["b_transposed"] else "", d["site"], d["threads"], d["kernel"],
                " (stored)" if d["stored"] else "")
                for d in decisions],
            "cpu_gemm_decision_file": _C.cpu_gemm_decision_file() or None,
            "cpu_gemm_tuning_ms": round(_C.cpu_gemm_tuning_seconds() * 1e3, 3),
        })
    if problem is not None:
        facts["problem"] = problem
    return facts


def format_info(facts: Optional[Dict[str, Any]] = None) -> str:
    """The facts of :func:`info` as aligned ``key  value`` lines."""
    facts = info() if facts is None else facts
    width = max(len(k) for k in facts)
    lines = []
    for key, value in facts.items():
        if isinstance(value, list):
            value = ", ".join(value) if value else "-"
        elif value is None:
            value = "-"
        lines.append("%-*s  %s" % (width, key, value))
    return "\n".join(lines)
