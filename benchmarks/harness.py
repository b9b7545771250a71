"""The benchmark harness every op's benchmark uses: handgrad against native PyTorch.

Method (the same for every op):
  * both variants run in the same process, on the same inputs, with the same
    thread count (torch.set_num_threads, reported in the results);
  * runs are interleaved (native, handgrad, handgrad, native, ...), so slow
    drifts of a noisy machine hit both alike;
  * each mode -- forward (under no_grad), backward (forward untimed) and
    forward+backward -- is timed over many runs; the table reports medians,
    the spread (25th-75th percentile) and the speedup, native time divided by
    handgrad time (above 1 means handgrad is faster);
  * peak memory of one forward+backward of each variant: CUDA from the
    caching allocator's statistics, CPU from handgrad's allocator wrapper
    plus handgrad's own scratch buffers outside torch's allocator
    (handgrad.profiling), both counted above what was alive before the run;
  * CUDA timings synchronize the device around every run.

Results are printed as a table and saved as JSON and CSV, together with the
machine, torch and handgrad versions, the git commit and the command line.
"""

import argparse
import csv
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch

import handgrad
from handgrad.profiling import track_cpu_memory

MODES = ("forward", "backward", "fwdbwd")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Case:
    """One benchmark configuration.

    make_inputs() returns the positional arguments shared by both variants;
    tensors that require grad are the ones backward differentiates. The
    variants map those arguments to an output tensor (or a tuple whose first
    element is differentiated).
    """

    name: str
    make_inputs: Callable[[], Sequence[Any]]
    handgrad: Callable[..., Any]
    native: Callable[..., Any]
    flops: Optional[dict] = None  # mode -> floating-point operations of one run
    target: Optional[float] = None  # required fwdbwd speedup, shown in the table
    memory_target: Optional[float] = None  # required handgrad/native peak-memory ratio


@dataclasses.dataclass
class Timing:
    median: float
    p25: float
    p75: float
    runs: int

    @staticmethod
    def of(samples):
        samples = sorted(samples)
        q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
        return Timing(statistics.median(samples), q[0], q[2], len(samples))


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _grad_tensors(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


class _Runner:
    """Runs one variant of a case in a given mode; returns seconds per run."""

    def __init__(self, fn, args, device):
        self.fn, self.args, self.device = fn, args, device
        self.leaves = _grad_tensors(args)
        out = _first(fn(*args))
        self.upstream = None if out.numel() == 1 else torch.randn_like(out)
        self._clear()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _clear(self):
        for leaf in self.leaves:
            leaf.grad = None

    def _backward(self, out):
        _first(out).backward(self.upstream)

    def run(self, mode):
        self._clear()
        if mode == "forward":
            self._sync()
            start = time.perf_counter()
            with torch.no_grad():
                self.fn(*self.args)
            self._sync()
            return time.perf_counter() - start
        if mode == "backward":
            out = self.fn(*self.args)
            self._sync()
            start = time.perf_counter()
            self._backward(out)
            self._sync()
            return time.perf_counter() - start
        self._sync()
        start = time.perf_counter()
        self._backward(self.fn(*self.args))
        self._sync()
        return time.perf_counter() - start

    def peak_memory(self):
        """Peak bytes above the live baseline during one forward+backward."""
        self._clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._backward(self.fn(*self.args))
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - base
        else:
            with track_cpu_memory() as report:
                self._backward(self.fn(*self.args))
            peak = report.peak_bytes
        self._clear()
        return peak


def measure(case, device, modes, reps, warmup=2, max_seconds=20.0):
    """Times one case; returns a list of result rows (one per mode)."""
    args = case.make_inputs()
    runners = {"native": _Runner(case.native, args, device),
               "handgrad": _Runner(case.handgrad, args, device)}
    rows = []
    for mode in modes:
        for _ in range(warmup):
            for runner in runners.values():
                runner.run(mode)
        samples = {name: [] for name in runners}
        began = time.perf_counter()
        for rep in range(reps):
            order = ("native", "handgrad") if rep % 2 == 0 else ("handgrad", "native")
            for name in order:
                samples[name].append(runners[name].run(mode))
            if rep >= 4 and time.perf_counter() - began > max_seconds:
                break
        native, mine = Timing.of(samples["native"]), Timing.of(samples["handgrad"])
        ratios = [n / h for n, h in zip(samples["native"], samples["handgrad"])]
        ratio_spread = Timing.of(ratios)
        row = {
            "case": case.name,
            "mode": mode,
            "runs": native.runs,
            "native_ms": native.median * 1e3,
            "native_p25_ms": native.p25 * 1e3,
            "native_p75_ms": native.p75 * 1e3,
            "handgrad_ms": mine.median * 1e3,
            "handgrad_p25_ms": mine.p25 * 1e3,
            "handgrad_p75_ms": mine.p75 * 1e3,
            "speedup": native.median / mine.median,
            "speedup_p25": ratio_spread.p25,
            "speedup_p75": ratio_spread.p75,
            "target": case.target if mode == "fwdbwd" else None,
        }
        flops = (case.flops or {}).get(mode)
        if flops:
            row["native_gflops"] = flops / native.median / 1e9
            row["handgrad_gflops"] = flops / mine.median / 1e9
        rows.append(row)
    memory = {name: runner.peak_memory() for name, runner in runners.items()}
    for row in rows:
        if row["mode"] == "fwdbwd":
            row["native_peak_mb"] = memory["native"] / 2**20
            row["handgrad_peak_mb"] = memory["handgrad"] / 2**20
            row["memory_ratio"] = memory["handgrad"] / memory["native"] if memory["native"] else None
            row["memory_target"] = case.memory_target
    del runners, args
    gc.collect()
    return rows


def meets_targets(row):
    ok = True
    if row.get("target") is not None:
        ok = ok and row["speedup"] >= row["target"]
    if row.get("memory_target") is not None and row.get("memory_ratio") is not None:
        ok = ok and row["memory_ratio"] <= row["memory_target"]
    return ok


def format_table(rows):
    header = ["case", "mode", "native ms", "handgrad ms", "speedup", "target", "GFLOP/s hg|nat",
              "peak MB hg|nat", "ok"]
    lines = []
    for r in rows:
        spread = "[%.2f-%.2f]" % (r["speedup_p25"], r["speedup_p75"])
        target = []
        if r.get("target") is not None:
            target.append(">=%.2f" % r["target"])
        if r.get("memory_target") is not None:
            target.append("mem<=%.2f" % r["memory_target"])
        gflops = ("%.1f|%.1f" % (r["handgrad_gflops"], r["native_gflops"])
                  if "handgrad_gflops" in r else "")
        mem = ("%.1f|%.1f" % (r["handgrad_peak_mb"], r["native_peak_mb"])
               if "handgrad_peak_mb" in r else "")
        has_target = r.get("target") is not None or r.get("memory_target") is not None
        lines.append([r["case"], r["mode"],
                      "%.3f" % r["native_ms"], "%.3f" % r["handgrad_ms"],
                      "%.2fx %s" % (r["speedup"], spread), " ".join(target), gflops, mem,
                      ("yes" if meets_targets(r) else "NO") if has_target else ""])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths))]
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in lines)
    return "\n".join(out)


def _git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device):
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "git_commit": _git_commit(),
        "handgrad": handgrad.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "handgrad_cpu_isa": handgrad.info()["cpu_isa"],
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def save(results, out_dir, stem):
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(out_dir, "%s-%s" % (stem, stamp))
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=2)
    rows = [dict(benchmark=b["benchmark"], **row) for b in results["benchmarks"] for row in b["rows"]]
    fields = sorted({k for row in rows for k in row}, key=lambda k: (k != "benchmark", k != "case", k))
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return base


def argument_parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both variants (default: torch's default)")
    p.add_argument("--reps", type=int, default=30, help="timed runs per variant and mode")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop adding runs to a case/mode after this long (at least 5 runs)")
    p.add_argument("--modes", default="fwdbwd,forward,backward",
                   help="comma-separated subset of forward, backward, fwdbwd")
    p.add_argument("--cases", default=None, help="only cases whose name contains this text")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"),
                   help="folder for the JSON and CSV results")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when a case misses its target")
    return p


def configure(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is usable on this machine")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit("--modes: unknown mode(s) %s; choose from %s"
                         % (", ".join(sorted(unknown)), ", ".join(MODES)))
    return device, modes


def run_benchmark(name, make_cases, args, device, modes):
    """Runs one op's cases; prints its table and returns its result block."""
    torch.manual_seed(0)
    cases = make_cases(device)
    if args.cases:
        cases = [c for c in cases if args.cases in c.name]
    rows = []
    for case in cases:
        print("  %s: %s ..." % (name, case.name), file=sys.stderr, flush=True)
        rows.extend(measure(case, device, modes, args.reps, max_seconds=args.max_seconds))
    print("\n## %s (%s, %d threads)\n" % (name, device, torch.get_num_threads()))
    print(format_table(rows), flush=True)
    return {"benchmark": name, "rows": rows}


def main(name, make_cases, description=None):
    """Entry point of a benchmarks/bench_<op>.py script."""
    args = argument_parser(description or "Benchmark handgrad.%s against native PyTorch" % name)\
        .parse_args()
    device, modes = configure(args)
    block = run_benchmark(name, make_cases, args, device, modes)
    results = {"environment": environment(device), "benchmarks": [block]}
    if not args.no_save:
        print("\nsaved %s.{json,csv}" % save(results, args.out, "bench_" + name))
    return exit_status(block["rows"], args.strict)


def exit_status(rows, strict):
    missed = [r for r in rows if not meets_targets(r)]
    print("\ntargets met: %d of %d" % (sum(1 for r in rows if r.get("target") is not None
                                              or r.get("memory_target") is not None) - len(missed),
                                     sum(1 for r in rows if r.get("target") is not None
                                         or r.get("memory_target") is not None)))
    return 1 if strict and missed else 0
