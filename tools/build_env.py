"""Where the build tools are and which torch a build is for: shared by setup.py,
the build backend (tools/build_backend.py), the Makefile and .ci/run.

    python tools/build_env.py cuda-home    # the CUDA toolkit folder (empty if none)
    python tools/build_env.py cmake-args   # -D flags for CMakeLists.txt against the pip torch
    python tools/build_env.py target-torch # the torch version this Python has installed
"""

import glob
import os
import re
import shutil
import subprocess
import sys


def is_toolkit(home):
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The CUDA toolkit folder, or None.

    torch guesses the folder above nvcc, which is wrong when nvcc on PATH is a
    symlink or a wrapper script (e.g. /usr/local/bin/nvcc running
    /usr/local/cuda-13.0/bin/nvcc); then cudart is not found at link time.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if is_toolkit(home):
            return home
        try:  # a wrapper script: nvcc itself reports the folder it runs from
            probe = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                                   capture_output=True, text=True, timeout=120)
            found = re.search(r"_HERE_=(\S+)", probe.stdout + probe.stderr)
            if found:
                home = os.path.dirname(os.path.realpath(found.group(1)))
                if is_toolkit(home):
                    return home
        except (OSError, subprocess.SubprocessError):
            pass
    return "/usr/local/cuda" if is_toolkit("/usr/local/cuda") else None


def cmake_args():
    """Flags that let find_package(Torch) work with a pip-installed torch.

    A CUDA build of torch makes CMake look for the CUDA toolkit, nvrtc
    included, even for a CPU-only handgrad; pip ships nvrtc next to torch
    (site-packages/nvidia/cu*/lib) rather than in the toolkit.
    """
    import torch

    args = ["-DCMAKE_PREFIX_PATH=" + torch.utils.cmake_prefix_path]
    if torch.version.cuda:
        home = find_cuda_home()
        if home:
            args += ["-DCUDAToolkit_ROOT=" + home, "-DCUDA_TOOLKIT_ROOT_DIR=" + home]
        site = os.path.dirname(os.path.dirname(torch.__file__))
        candidates = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
        if home:
            candidates = sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*"))) + candidates
        candidates = [c for c in candidates if "builtins" not in c]
        if candidates:
            args.append("-DCUDA_nvrtc_LIBRARY=" + candidates[0])
    return args


def release(version):
    """'2.14.1+cu130' -> '2.14.1': the version without its local (build variant) part."""
    return version.split("+", 1)[0]


def local_version_tag(torch_version, torch_cuda, cuda_kernels):
    """The local version tag of a handgrad build, e.g. 'torch2.14.cu130' for CUDA kernels
    compiled against torch 2.14.x with CUDA 13.0, 'torch2.14.cpu' for a CPU-only build.
    Builds for different torch minors or CUDA versions then carry different names."""
    major_minor = ".".join(release(torch_version).split(".")[:2])
    variant = "cu" + torch_cuda.replace(".", "") if cuda_kernels and torch_cuda else "cpu"
    return "torch%s.%s" % (major_minor, variant)


# Run with -I: ignores PYTHONPATH and the other PYTHON* variables through which an
# isolated build environment hides the target environment's packages.
_TARGET_TORCH_PROBE = ("import importlib.metadata as m\n"
                       "try:\n    print(m.version('torch'))\n"
                       "except m.PackageNotFoundError:\n    print('')\n")


def target_torch_version(python=None):
    """The distribution version of torch (e.g. '2.14.1', '2.13.0+cpu') installed in the
    environment of `python` (default: this interpreter) outside any isolated build
    environment, or None if it has none or cannot tell."""
    try:
        probe = subprocess.run([python or sys.executable, "-I", "-c", _TARGET_TORCH_PROBE],
                               capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    version = probe.stdout.strip()
    return version if probe.returncode == 0 and version else None


def isolated_build_problem(build_torch_version, target_version):
    """Why building against `build_torch_version` (the torch this build imports) is wrong
    for an environment whose own torch is `target_version`, or None when it is right.

    pip builds in an isolated environment unless told not to; its torch is whatever
    the build requirements fetched. handgrad's binary works only with the torch it
    was compiled against, so a build whose torch differs from the target's must stop.
    """
    if target_version is None or release(build_torch_version) == release(target_version):
        return None
    return ("this build would compile handgrad against torch %s, but the environment it "
            "installs into has torch %s, which could not load it; build against the installed "
            "torch instead: pip install --no-build-isolation ."
            % (release(build_torch_version), target_version))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "cuda-home":
        print(find_cuda_home() or "")
    elif what == "cmake-args":
        print(" ".join(cmake_args()))
    elif what == "target-torch":
        print(target_torch_version() or "")
    else:
        sys.exit(__doc__)
