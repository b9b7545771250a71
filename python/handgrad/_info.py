"""handgrad.info(): what this installation was built with and can use now."""

import platform

import torch

from . import _C


def _arch_names(archs):
    # nvcc's __CUDA_ARCH_LIST__ spells sm_90 as 900
    return ["sm_%d" % (a // 10) for a in archs]


def info():
    """Build and runtime facts as a dict (``python -m handgrad info`` prints them)."""
    build = _C.build_info()
    toolkit = build["cuda_toolkit_version"]
    return {
        "handgrad": build["version"],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels_compiled": build["cuda_compiled"],
        "cuda_archs": _arch_names(build["cuda_archs"]),
        "cuda_toolkit": "%d.%d" % (toolkit // 1000, toolkit % 1000 // 10) if toolkit else None,
        "gpu_usable": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "openmp": build["openmp"],
        "threads": torch.get_num_threads(),
        "cpu_isa": build["cpu_isa"],
        "machine": platform.machine(),
        "compiler": build["compiler"],
    }


def format_info(facts=None):
    facts = info() if facts is None else facts
    width = max(len(k) for k in facts)
    lines = []
    for key, value in facts.items():
        if isinstance(value, list):
            value = ", ".join(value) if value else "-"
        lines.append("%-*s  %s" % (width, key, value))
    return "\n".join(lines)
