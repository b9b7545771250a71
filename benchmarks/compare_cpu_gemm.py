"""Op targets of benchmarks/run.py under the three CPU GEMM policies, in one
process, interleaved: for every case native, handgrad with HANDGRAD_CPU_GEMM
own, blas and auto take turns (the order rotates each repetition), and each
column is the median of the per-repetition ratios native time / handgrad time.

    python benchmarks/compare_cpu_gemm.py [--threads 2] [--reps 10] [--only lstm,conv2d]

Prints a markdown table with the CPU model and ISA flags, the auto policy's
decisions count and its total tuning time.
"""

import argparse
import statistics
import subprocess
import sys
import time

import torch

import handgrad
import harness
import run as run_module

POLICIES = ("own", "blas", "auto")


def cpu_description():
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    model = flags = ""
    for line in text.splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("Flags:"):
            flags = " ".join(f for f in line.split(":", 1)[1].split() if f.startswith("avx"))
    return "%s; %s" % (model, flags)


def compare(case, reps, max_seconds):
    args = case.make_inputs()
    runners = {"native": harness._Runner(case.native, args, torch.device("cpu"))}
    for policy in POLICIES:
        runners[policy] = harness._Runner(case.handgrad, args, torch.device("cpu"))

    def timed(name):
        if name in POLICIES:
            handgrad.cpu_gemm.set_policy(name)
        return runners[name].run("fwdbwd")

    names = list(runners)
    for _ in range(2):  # warm-up; auto measures its classes here
        for name in names:
            timed(name)
    samples = {name: [] for name in names}
    began = time.perf_counter()
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            samples[name].append(timed(name))
        if rep >= 4 and time.perf_counter() - began > max_seconds:
            break
    ratios = {p: statistics.median(n / h for n, h in zip(samples["native"], samples[p]))
              for p in POLICIES}
    return ratios, statistics.median(samples["native"]) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=8.0)
    parser.add_argument("--only", default=None, help="comma-separated op names")
    parser.add_argument("--cases", default=None, help="only cases whose name contains this")
    parser.add_argument("--all-cases", action="store_true",
                        help="also the cases without a target")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    benches = run_module.discover()
    if args.only:
        benches = {n: benches[n] for n in args.only.split(",")}
    print("CPU: %s; %d threads; BLAS: %s; own kernel available: %s\n"
          % (cpu_description(), torch.get_num_threads(), handgrad.cpu_gemm.kernels()["blas"],
             handgrad.cpu_gemm.kernels()["own_gemm_available"]))
    print("| op | case | native ms | own | blas | auto | target |")
    print("|---|---|---|---|---|---|---|")
    for name, module in benches.items():
        torch.manual_seed(0)
        for case in module.make_cases(torch.device("cpu")):
            if args.cases and args.cases not in case.name:
                continue
            if case.target is None and not args.all_cases:
                continue
            print("  %s: %s ..." % (name, case.name), file=sys.stderr, flush=True)
            ratios, native_ms = compare(case, args.reps, args.max_seconds)
            print("| %s | %s | %.2f | %.2fx | %.2fx | %.2fx | %s |" % (
                name, case.name, native_ms, ratios["own"], ratios["blas"], ratios["auto"],
                "%.2f" % case.target if case.target is not None else "-"), flush=True)
    decisions = handgrad.cpu_gemm.decisions()
    print("\nauto: %d classes decided (%d read from the decision file %s), %.1f ms tuning in "
          "all, %d chose own"
          % (len(decisions), sum(d["stored"] for d in decisions),
             handgrad.cpu_gemm.decision_file(), handgrad.cpu_gemm.tuning_seconds() * 1e3,
             sum(d["kernel"] == "own" for d in decisions)))


if __name__ == "__main__":
    main()
