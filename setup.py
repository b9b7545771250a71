"""Builds handgrad._C: every op in csrc/ plus the pybind11 module in pyext/.

Install with `pip install --no-build-isolation -e .` (the build compiles
against the torch already installed, so it must not run in an isolated
environment with a different torch).

Environment switches:
  HANDGRAD_CUDA=auto|1|0   build the CUDA kernels: auto (default) builds them when the
                           installed torch is a CUDA build and a CUDA toolkit is found;
                           1 insists (and fails loudly if impossible); 0 skips them.
                           Whether a GPU is present never matters: CUDA code compiles
                           on machines without one.
  TORCH_CUDA_ARCH_LIST     architectures to compile for; default below (includes 9.0).
  HANDGRAD_CPU_ARCH=avx2|native|generic
                           instruction set of the CPU kernels (default avx2 on x86-64:
                           AVX2 + FMA + F16C).
  CUDA_HOME                the toolkit folder; found from nvcc when unset.
  HANDGRAD_CUDA_EMULATION=1
                           also build handgrad._cuda_emulation: the CUDA kernels compiled
                           by the host compiler against the CUDA emulator (csrc/emulation),
                           so the tests run every CUDA kernel without a GPU. Needs neither
                           nvcc nor a CUDA build of torch. Off by default (the Makefile
                           turns it on for `make test`).
  MAX_JOBS                 parallel compile jobs (ninja).
"""

import glob
import os
import platform
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from build_env import emulation_units, find_cuda_home  # noqa: E402
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;9.0+PTX"


def read_version():
    with open(os.path.join(ROOT, "csrc", "version.h")) as f:
        return re.search(r'#define HANDGRAD_VERSION "([^"]+)"', f.read()).group(1)


def decide_cuda(torch):
    """(build_cuda, cuda_home, reason) from the torch build and the toolkit."""
    choice = os.environ.get("HANDGRAD_CUDA", "auto").strip().lower()
    if choice in ("0", "off", "false", "no"):
        return False, None, "HANDGRAD_CUDA=0"
    home = find_cuda_home()
    if choice in ("1", "on", "true", "yes"):
        if not torch.version.cuda:
            sys.exit("HANDGRAD_CUDA=1, but the installed torch %s is not a CUDA build"
                     % torch.__version__)
        if not home:
            sys.exit("HANDGRAD_CUDA=1, but no CUDA toolkit was found: set CUDA_HOME to it")
        return True, home, "HANDGRAD_CUDA=1"
    if not torch.version.cuda:
        return False, None, "torch %s is a CPU-only build" % torch.__version__
    if not home:
        return False, None, "no CUDA toolkit found (set CUDA_HOME)"
    return True, home, "torch CUDA %s, toolkit %s" % (torch.version.cuda, home)


def cpu_arch_flags():
    choice = os.environ.get("HANDGRAD_CPU_ARCH", "").strip().lower()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if not choice:
        choice = "avx2" if x86 else "generic"
    if choice == "native":
        return ["-march=native"]
    if choice == "avx2":
        return ["-mavx2", "-mfma", "-mf16c"]
    if choice == "generic":
        return []
    sys.exit("HANDGRAD_CPU_ARCH must be avx2, native or generic, not %r" % choice)


def extension_modules():
    import torch

    build_cuda, cuda_home, reason = decide_cuda(torch)
    if build_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    # cpp_extension reads CUDA_HOME when it is first imported.
    from torch.utils import cpp_extension

    if build_cuda:
        cpp_extension.CUDA_HOME = cuda_home
    print("handgrad: CUDA kernels %s (%s)%s" % (
        "ON" if build_cuda else "OFF", reason,
        ", archs " + os.environ["TORCH_CUDA_ARCH_LIST"] if build_cuda else ""))

    sources = sorted(p for p in glob.glob("csrc/**/*.cpp", recursive=True)
                     if not p.startswith("csrc/emulation/")) + ["pyext/module.cpp"]
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    defines = ["-DHANDGRAD_WITH_CUDA"] if build_cuda else []
    # -g0: Python's default CFLAGS ask for debug info, which doubles compile time.
    cxx = ["-O3", "-g0", "-fopenmp"] + cpu_arch_flags() + defines
    args = dict(
        name="handgrad._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if build_cuda:
        nvcc = ["-O3", "-lineinfo"] + defines
        main = cpp_extension.CUDAExtension(sources=sources + cuda_sources,
                                           extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **args)
    else:
        main = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx},
                                          **args)
    return [main] + emulation_module(cpp_extension)


def emulation_module(cpp_extension):
    choice = os.environ.get("HANDGRAD_CUDA_EMULATION", "0").strip().lower()
    if choice in ("0", "off", "false", "no", ""):
        return []
    if choice not in ("1", "on", "true", "yes"):
        sys.exit("HANDGRAD_CUDA_EMULATION must be 0 or 1, not %r" % choice)
    print("handgrad: CUDA emulation module ON (handgrad._cuda_emulation)")
    sources = (sorted(glob.glob("csrc/emulation/*.cpp")) + emulation_units(ROOT)
               + ["pyext/cuda_emulation.cpp"])
    return [cpp_extension.CppExtension(
        name="handgrad._cuda_emulation",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "emulation", "include"),
                      os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O2", "-g0", "-DHANDGRAD_CUDA_EMULATION"]},
    )]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            # One fixed folder for object files (pip's editable builds would
            # use a new temporary one each time): ninja then recompiles only
            # what changed since the last `make install`.
            self.build_temp = os.path.join(ROOT, "build", "temp")

    return Build


setup(
    version=read_version(),
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=extension_modules(),
    cmdclass={"build_ext": build_ext_class()},
)
