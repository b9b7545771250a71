"""What the auto CPU GEMM policy costs: per model of bench_models.py, in a
fresh process each, the seconds spent measuring (handgrad.cpu_gemm) during
the first training steps, against the time of one epoch of training (the
median step time x the steps of an epoch of 60,000 images at the case's
batch size). The decision file is off in the children: this is the cost
of the first process on a machine; later ones read the stored choices.

    python benchmarks/cpu_gemm_tuning_cost.py [--threads 1] [--only mnist_cnn]
"""

import argparse
import statistics
import subprocess
import sys
import time

CHILD = r"""
import statistics, sys, time, torch
sys.path.insert(0, %(here)r)
import handgrad, bench_models
torch.set_num_threads(%(threads)d)
handgrad.cpu_gemm.set_policy("auto")
handgrad.cpu_gemm.set_decision_file(None)  # a first process: nothing stored yet, all measured
case = [c for c in bench_models.make_cases(torch.device("cpu")) if c.name.startswith(%(name)r + " ")][0]
x, y = case.make_inputs()
times = []
for step in range(6):
    t0 = time.perf_counter()
    case.handgrad(x, y).backward()
    times.append(time.perf_counter() - t0)
step = statistics.median(times[2:])
print(handgrad.cpu_gemm.tuning_seconds(), len(handgrad.cpu_gemm.decisions()), step, times[0])
"""


def main():
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    import bench_models
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=None)
    args = p.parse_args()
    names = [(n, b) for n, b in bench_models.CASES
             if args.only is None or n in args.only.split(",")]
    print("| model | batch | classes | tuning ms | step ms | epoch s | tuning / epoch |")
    print("|---|---|---|---|---|---|---|")
    for name, batch in names:
        out = subprocess.run([sys.executable, "-c", CHILD % dict(here=here, threads=args.threads,
                                                                  name=name)],
                             capture_output=True, text=True, check=True).stdout.split()
        tuning, classes, step = float(out[0]), int(out[1]), float(out[2])
        epoch = step * (60000 // batch)
        print("| %s | %d | %d | %.1f | %.1f | %.1f | %.3f%% |" % (
            name, batch, classes, tuning * 1e3, step * 1e3, epoch, 100 * tuning / epoch),
            flush=True)


if __name__ == "__main__":
    main()
