"""Training throughput of every model, --backend handgrad against --backend native.

    python benchmarks/epoch_times.py --data-root ../shared/data [--limit 6400] [--rounds 2]
                                     [--threads 2] [--models lenet5 mnist_cnn ...]

Runs `handgrad train MODEL --epochs 1 --limit N` (the real data, the model's own
batch size and optimizer) once per backend per round, alternating which backend
goes first, and reports the median training throughput (images per second,
from each run's metrics.json) and the ratio handgrad / native (above 1 means
handgrad trains faster). Evaluation is not timed. An epoch's time is the full
training set divided by this throughput.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["lenet5", "cifar_cnn", "mnist_cnn", "lstm_mnist", "vit_mnist", "mnist_ae", "mnist_cae",
          "mnist_cae_skip", "mnist_vae", "mnist_gan"]


def throughput(model, backend, args, out):
    cmd = [sys.executable, "-m", "handgrad", "train", model, "--epochs", "1", "--limit",
           str(args.limit), "--backend", backend, "--out", out, "--no-progress",
           "--data-root", args.data_root]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)["history"][-1]["images_per_second"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--limit", type=int, default=6400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()

    print("command: %s" % " ".join(["python"] + sys.argv))
    print("| model | native img/s | handgrad img/s | handgrad / native |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            rates = {"native": [], "handgrad": []}
            for r in range(args.rounds):
                order = ("native", "handgrad") if r % 2 == 0 else ("handgrad", "native")
                for backend in order:
                    out = os.path.join(tmp, "%s-%s-%d" % (model, backend, r))
                    rates[backend].append(throughput(model, backend, args, out))
            native, mine = (statistics.median(rates[b]) for b in ("native", "handgrad"))
            print("| %s | %.0f | %.0f | %.2f |" % (model, native, mine, mine / native), flush=True)


if __name__ == "__main__":
    main()
