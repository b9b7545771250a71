"""Builds handgrad._C: every op in csrc/ plus the pybind11 module in pyext/.

Install with `pip install --no-build-isolation -e .`: the build compiles
against the torch already installed. The binary works only with that torch,
so the build records it (handgrad/_build_config.py, checked on import), pins
it in the wheel's requirements (torch==2.14.1) and names it in a local version
tag (0.1.0+torch2.14.cu130, 0.1.0+torch2.14.cpu). An isolated build (plain
`pip install .`) asks for the target environment's torch through
tools/build_backend.py and stops if it got another one.

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
  HANDGRAD_NO_SPILLS=1     fail the build when ptxas spills registers in any CUDA kernel
                           (CI sets it; tools/ptxas_report.py prints the usage per kernel).
  MAX_JOBS                 parallel compile jobs (ninja).
"""

import glob
import os
import platform
import re
import sys

import setuptools

# pyproject.toml's SPDX `license` string needs setuptools 77; older ones fail on it
# with a schema error that does not say so.
SETUPTOOLS_FLOOR = (77, 0)
if tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2]) < SETUPTOOLS_FLOOR:
    sys.exit("handgrad: building needs setuptools >= %d.%d, but this environment has %s: "
             "pip install -U 'setuptools>=%d.%d'"
             % (SETUPTOOLS_FLOOR + (setuptools.__version__,) + SETUPTOOLS_FLOOR))

from setuptools import find_packages, setup  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from build_env import (emulation_units, find_cuda_home, isolated_build_problem,  # noqa: E402
                       local_version_tag, release, target_torch_version, write_if_changed)

DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;9.0+PTX"
BUILD_CONFIG = os.path.join("handgrad", "_build_config.py")
# Commands that only package the sources: they need neither torch nor a compiler.
SOURCE_ONLY_COMMANDS = {"sdist", "egg_info", "--version", "--name", "check"}


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


def import_torch():
    """The torch this build compiles against, after checking it is the one the
    installing environment will use."""
    try:
        import torch
    except ImportError:
        sys.exit("handgrad: building compiles against an installed torch, and this environment "
                 "has none: pip install torch, then pip install --no-build-isolation .")
    if not os.path.realpath(torch.__file__).startswith(os.path.realpath(sys.prefix) + os.sep):
        # An isolated build environment (pip's default): its torch is not the target's.
        problem = isolated_build_problem(torch.__version__, target_torch_version())
        if problem:
            sys.exit("handgrad: " + problem)
    return torch


def build_facts(torch, build_cuda):
    """What the binary is tied to, recorded in handgrad/_build_config.py."""
    tag = local_version_tag(torch.__version__, torch.version.cuda, build_cuda)
    return {
        "version": "%s+%s" % (read_version(), tag),
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda if build_cuda else None,
        "cuda_kernels": build_cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


def build_config_source(facts):
    lines = ["# Generated by setup.py when this handgrad was built: the torch its binary",
             "# is tied to (handgrad/_compat.py compares it with the torch on import).", ""]
    lines += ["%s = %r" % item for item in facts.items()]
    return "\n".join(lines) + "\n"


def extension_modules(build_cuda, cuda_home, reason):
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
        if os.environ.get("HANDGRAD_NO_SPILLS") == "1":
            # CI: a kernel that spills registers to local memory fails the build.
            nvcc.append("-Xptxas=--warn-on-spills,--warning-as-error")
        compiled = cpp_extension.CUDAExtension(sources=sources + cuda_sources,
                                               extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                               **args)
    else:
        compiled = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx},
                                              **args)
    return [compiled] + emulation_module(cpp_extension)


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


def build_ext_class(config_source):
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            # One fixed folder for object files (pip's editable builds would
            # use a new temporary one each time): ninja then recompiles only
            # what changed since the last `make install`.
            self.build_temp = os.path.join(ROOT, "build", "temp")

        def run(self):
            super().run()
            # Next to the binary it describes: the source package for in-place
            # (editable) builds, the wheel's staging folder otherwise.
            base = os.path.join(ROOT, "python") if self.inplace else self.build_lib
            write_if_changed(os.path.join(base, BUILD_CONFIG), config_source)

    return Build


def main():
    options = dict(package_dir={"": "python"}, packages=find_packages("python"),
                   package_data={"handgrad": ["py.typed"]})
    if SOURCE_ONLY_COMMANDS.intersection(sys.argv[1:]) and "bdist_wheel" not in sys.argv:
        setup(version=read_version(), install_requires=["torch", "numpy"], **options)
        return
    torch = import_torch()
    build_cuda, cuda_home, reason = decide_cuda(torch)
    facts = build_facts(torch, build_cuda)
    setup(
        version=facts["version"],
        # The binary loads only into the torch release it was compiled against.
        install_requires=["torch==%s" % release(torch.__version__), "numpy"],
        ext_modules=extension_modules(build_cuda, cuda_home, reason),
        cmdclass={"build_ext": build_ext_class(build_config_source(facts))},
        **options)


main()
