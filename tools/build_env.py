"""Where the build tools are: shared by setup.py, the Makefile and .ci/run.

    python tools/build_env.py cuda-home    # the CUDA toolkit folder (empty if none)
    python tools/build_env.py cmake-args   # -D flags for CMakeLists.txt against the pip torch
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


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "cuda-home":
        print(find_cuda_home() or "")
    elif what == "cmake-args":
        print(" ".join(cmake_args()))
    else:
        sys.exit(__doc__)
