"""Training throughput (images/s) of ``handgrad train`` on 1 process against N
processes under torchrun (DistributedDataParallel, gloo on the CPU), one thread
per process, runs interleaved, median of --repeats.

    python benchmarks/distributed_throughput.py --data-root ../shared/data --model mnist_cnn \
        --limit 8192 --batch-size 64 --processes 2 --repeats 3

The images/s are those metrics.json records for the epoch (global images over the
slowest process's training time; evaluation excluded).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def one_run(processes, args, out):
    train = ["-m", "handgrad", "train", args.model, "--data-root", args.data_root, "--out", out,
             "--epochs", "1", "--batch-size", str(args.batch_size), "--limit", str(args.limit),
             "--threads", "1", "--no-progress", "--backend", args.backend]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(processes)] if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(launcher + train, check=True, capture_output=True, env=env)
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)["history"][-1]["images_per_second"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--model", default="mnist_cnn")
    p.add_argument("--backend", default="handgrad")
    p.add_argument("--limit", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rates = {1: [], args.processes: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for n in rates:
                rates[n].append(one_run(n, args, os.path.join(tmp, "%d-%d" % (n, r))))
    base = statistics.median(rates[1])
    print("| processes | images/s (median of %d) | speed-up |" % args.repeats)
    print("|---|---|---|")
    for n, values in rates.items():
        median = statistics.median(values)
        print("| %d | %.0f | %.2f |" % (n, median, median / base))
    print("runs: %s" % {n: [round(v) for v in values] for n, values in rates.items()})


if __name__ == "__main__":
    main()
