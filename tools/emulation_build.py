"""Instrumented builds of the CUDA emulation module: ThreadSanitizer and coverage.

    python tools/emulation_build.py build tsan|coverage
    python tools/emulation_build.py tsan-check      # TSan sees a missing __syncthreads
    python tools/emulation_build.py test tsan|coverage [pytest arguments]
    python tools/emulation_build.py coverage-report # lines and branches of the .cu files run

tsan: the emulator runs each CUDA thread as a fiber and tells
ThreadSanitizer about them (csrc/emulation/runtime.cpp): every fiber is a
TSan thread and the only happens-before edges between fibers are the ones
CUDA gives (__syncthreads, warp syncs, kernel boundaries). Built with
-fsanitize=thread, a kernel that reads shared memory another thread wrote
without a barrier in between is reported as a data race at its source line,
even where the emulator's fixed schedule happens to give the right numbers.
Only the kernels and drivers are instrumented; the emulator's scheduler is
not (its bookkeeping is shared by all fibers by design). Python loads the
instrumented module in place of handgrad._cuda_emulation through
HANDGRAD_CUDA_EMULATION_MODULE, with libtsan preloaded and torch's own CPU
ops on one thread (libgomp is not instrumented).

coverage: the kernels compiled with gcov instrumentation; after `test
coverage`, `coverage-report` prints, per .cu file, the lines and branches
the emulated tests executed.
"""

import concurrent.futures
import glob
import os
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNINSTRUMENTED = ("csrc/emulation/runtime.cpp", "csrc/emulation/registry.cpp",
                  "pyext/cuda_emulation.cpp")
VARIANTS = {
    # variant: (flags of the instrumented units, link flags)
    "tsan": (["-O1", "-g", "-fsanitize=thread"], ["-fsanitize=thread"]),
    "coverage": (["-O0", "--coverage"], ["--coverage"]),
}


def out_dir(variant):
    return os.path.join(ROOT, "build", "emulation-" + variant)


def module_path(variant):
    return os.path.join(out_dir(variant),
                        "_cuda_emulation" + sysconfig.get_config_var("EXT_SUFFIX"))


def libtsan():
    return subprocess.run(["gcc", "-print-file-name=libtsan.so"], capture_output=True,
                          text=True, check=True).stdout.strip()


def sources():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from build_env import emulation_units  # noqa: E402  (the units setup.py compiles)

    emulation = sorted(os.path.relpath(p, ROOT)
                       for p in glob.glob(os.path.join(ROOT, "csrc", "emulation", "*.cpp")))
    return emulation + emulation_units(ROOT) + ["pyext/cuda_emulation.cpp"]


def compile_flags():
    import torch
    from torch.utils.cpp_extension import include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-std=c++20", "-fPIC", "-DHANDGRAD_CUDA_EMULATION",
             "-D_GLIBCXX_USE_CXX11_ABI=%d" % abi,
             "-I" + os.path.join(ROOT, "csrc", "emulation", "include"),
             "-I" + os.path.join(ROOT, "csrc"), "-I" + sysconfig.get_paths()["include"]]
    return flags + ["-I" + p for p in include_paths()]


def build(variant):
    import torch

    instrumented, link_flags = VARIANTS[variant]
    out = out_dir(variant)
    os.makedirs(out, exist_ok=True)
    flags = compile_flags()
    jobs = []
    for source in sources():
        obj = os.path.join(out, os.path.splitext(os.path.basename(source))[0] + ".o")
        extra = ["-O2"] if source in UNINSTRUMENTED else instrumented
        jobs.append((["g++", *flags, *extra, "-c", os.path.join(ROOT, source), "-o", obj], obj))

    def compile_one(job):
        command, obj = job
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit("%s build failed:\n%s\n%s" % (variant, " ".join(command),
                                                          done.stderr))
        return obj

    workers = int(os.environ.get("MAX_JOBS", "2"))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        objects = list(pool.map(compile_one, jobs))
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    link = ["g++", "-shared", *link_flags, *objects, "-o", module_path(variant),
            "-L" + torch_lib, "-Wl,-rpath," + torch_lib,
            "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    subprocess.run(link, check=True)
    print("built", module_path(variant))


def environment(variant):
    env = dict(os.environ)
    env["HANDGRAD_CUDA_EMULATION_MODULE"] = module_path(variant)
    if variant == "tsan":
        env["LD_PRELOAD"] = libtsan()
        env.setdefault("TSAN_OPTIONS", "halt_on_error=1 exitcode=66 report_signal_unsafe=0")
        # One thread for torch's own CPU ops (the native references): libgomp is not
        # instrumented, so its synchronisation would look like races to TSan.
        env["OMP_NUM_THREADS"] = "1"
    return env


def tsan_check():
    """A kernel with its first __syncthreads left out must be reported."""
    script = ("import handgrad; m = handgrad.cuda_emulation._module; "
              "print(m.__file__); m._self_test('block_sum', [1, 2])")
    done = subprocess.run([sys.executable, "-c", script], env=environment("tsan"),
                          capture_output=True, text=True, cwd=ROOT)
    reported = "WARNING: ThreadSanitizer: data race" in done.stderr and \
        "self_test.cpp" in done.stderr
    if not reported or module_path("tsan") not in done.stdout:
        print(done.stdout[-2000:], done.stderr[-3000:])
        raise SystemExit("tsan check FAILED: the racy self-test kernel was not reported")
    summary = [line for line in done.stderr.splitlines() if line.startswith("SUMMARY")]
    print("tsan check: the missing __syncthreads was reported:", *summary)


def test(variant, pytest_args):
    if variant == "coverage":  # counts start from zero for this run
        for stale in glob.glob(os.path.join(out_dir(variant), "*.gcda")):
            os.remove(stale)
    # TSan ends the process at its first report (halt_on_error): with pytest's
    # output capture on, the report would go down with the captured stderr.
    capture = ["-s"] if variant == "tsan" else []
    command = [sys.executable, "-m", "pytest", *capture, *pytest_args]
    return subprocess.run(command, env=environment(variant), cwd=ROOT).returncode


def coverage_report():
    """Per .cu file: lines and branches executed by the last `test coverage`."""
    out = out_dir("coverage")
    rows = []
    for unit in sorted(glob.glob(os.path.join(out, "*_kernels.o"))):
        done = subprocess.run(["gcov", "-b", "-n", "-o", out, unit], capture_output=True,
                              text=True, cwd=out)
        lines = done.stdout.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("File ") and "/ops/cuda/" in line:
                stats = {}
                for detail in lines[i + 1:i + 6]:
                    if ":" in detail and "% of " in detail:
                        key, value = detail.split(":", 1)
                        stats[key.strip()] = value.strip()
                rows.append((os.path.basename(line.split("'")[1]), stats))
    print("| file | lines executed | branches executed | branches taken at least once |")
    print("|---|---|---|---|")
    for name, stats in rows:
        print("| %s | %s | %s | %s |" % (name, stats.get("Lines executed", "-"),
                                         stats.get("Branches executed", "-"),
                                         stats.get("Taken at least once", "-")))
    return 0 if rows else 1


def main():
    what, rest = sys.argv[1:2], sys.argv[2:]
    if what == ["build"] and rest[:1] and rest[0] in VARIANTS:
        build(rest[0])
    elif what == ["tsan-check"]:
        tsan_check()
    elif what == ["test"] and rest[:1] and rest[0] in VARIANTS:
        return test(rest[0], rest[1:])
    elif what == ["coverage-report"]:
        return coverage_report()
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
