"""Registers, spills, stack and shared memory of every CUDA kernel, from ptxas.

    python tools/ptxas_report.py [--arch sm_90] [--out build/ptxas]

Compiles each csrc/ops/cuda/*.cu to a cubin for one architecture with
`ptxas -v` (no GPU is needed) and prints one row per kernel: registers per
thread, spill stores / loads, stack frame, static shared memory. The exit
status is 1 when any kernel spills registers (tests/test_cuda_resources.py
runs this in CI). Results are cached per source digest under --out, so a
second run after no change is immediate.
"""

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from build_env import find_cuda_home  # noqa: E402

ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
USAGE = re.compile(r"Used (\d+) registers")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
SMEM = re.compile(r"(\d+) bytes smem")


def demangle(names):
    done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return done.stdout.splitlines() if done.returncode == 0 else names


def sources_digest(cu):
    """The .cu file and every header of csrc it may include."""
    h = hashlib.sha256()
    for folder, _, files in sorted(os.walk(os.path.join(ROOT, "csrc"))):
        for f in sorted(files):
            if f.endswith((".h", ".cuh", ".inc")) or os.path.join(folder, f) == cu:
                with open(os.path.join(folder, f), "rb") as fh:
                    h.update(f.encode() + fh.read())
    return h.hexdigest()[:16]


def compile_report(cu, arch, out):
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    key = os.path.join(out, "%s-%s-%s.json" % (os.path.basename(cu), arch, sources_digest(cu)))
    if os.path.exists(key):
        with open(key) as f:
            return json.load(f)
    nvcc = os.path.join(find_cuda_home(), "bin", "nvcc")
    command = [nvcc, "-cubin", "-arch=" + arch, "-O3", "-std=c++20", "-Xptxas", "-v",
               "-DHANDGRAD_WITH_CUDA", "-D_GLIBCXX_USE_CXX11_ABI=%d" % torch._C._GLIBCXX_USE_CXX11_ABI,
               *COMMON_NVCC_FLAGS, "-I" + os.path.join(ROOT, "csrc"),
               *["-I" + p for p in include_paths(device_type="cuda")],
               "-o", os.devnull, cu]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit("nvcc failed on %s:\n%s" % (cu, done.stderr[-4000:]))
    kernels, current = [], None
    for line in done.stderr.splitlines():
        m = ENTRY.search(line)
        if m:
            current = {"kernel": m.group(1), "registers": 0, "stack": 0, "spill_stores": 0,
                       "spill_loads": 0, "smem": 0}
            kernels.append(current)
            continue
        if current is None:
            continue
        if (m := SPILL.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        if (m := USAGE.search(line)):
            current["registers"] = int(m.group(1))
        if (m := SMEM.search(line)):
            current["smem"] = int(m.group(1))
    for k, name in zip(kernels, demangle([k["kernel"] for k in kernels])):
        k["kernel"] = name
    os.makedirs(out, exist_ok=True)
    with open(key, "w") as f:
        json.dump(kernels, f, indent=1)
    return kernels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "ptxas"))
    args = parser.parse_args(argv)
    if not find_cuda_home():
        raise SystemExit("no CUDA toolkit found (set CUDA_HOME)")
    cuda_dir = os.path.join(ROOT, "csrc", "ops", "cuda")
    spilled = []
    print("| file | kernel | registers | spill stores / loads (bytes) | stack | static smem |")
    print("|---|---|---|---|---|---|")
    for name in sorted(os.listdir(cuda_dir)):
        if not name.endswith(".cu"):
            continue
        for k in compile_report(os.path.join(cuda_dir, name), args.arch, args.out):
            short = k["kernel"] if len(k["kernel"]) < 90 else k["kernel"][:87] + "..."
            print("| %s | `%s` | %d | %d / %d | %d | %d |" % (
                name, short, k["registers"], k["spill_stores"], k["spill_loads"], k["stack"],
                k["smem"]))
            if k["spill_stores"] or k["spill_loads"]:
                spilled.append((name, k["kernel"]))
    if spilled:
        print("\nkernels that spill registers:", *("%s: %s" % s for s in spilled), sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
