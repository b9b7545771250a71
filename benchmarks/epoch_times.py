"""Training throughput of every model, --backend handgrad against --backend native.

    python benchmarks/epoch_times.py --data-root ../shared/data [--limit 12800]
                                     [--threads 2] [--models lenet5 mnist_cnn ...]

For each model this builds the training run of `handgrad train MODEL` twice in
one process, `--backend native` and `--backend handgrad` (same seed, so the same
initial weights; the model's own batch size, optimizer, augmentation and
learning-rate schedule), and trains one epoch of each on N training images
(--limit's class-balanced subset) with their steps interleaved -- native,
handgrad, handgrad, native, ... -- so both backends meet the same machine at
the same moments. It reports each backend's images per second over the whole
epoch (the sum of its step times: data preparation, forward, backward,
optimizer; evaluation is not timed), the ratio handgrad / native (above 1:
handgrad trains faster) and the median of the per-step ratios. An epoch's
time is the full training set divided by the throughput.

Why one process: on these shared machines the speed of a whole process moves by
up to ~40% from one minute to the next (native mnist_cnn steps measured 29 to
47 ms in consecutive separate runs), which drowns a ~1.3x difference when each
backend trains in its own process.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

from handgrad.training.trainer import Run, TrainConfig  # noqa: E402

MODELS = ["lenet5", "cifar_cnn", "mnist_cnn", "lstm_mnist", "vit_mnist", "mnist_ae", "mnist_cae",
          "mnist_cae_skip", "mnist_vae", "mnist_gan"]
BACKENDS = ("native", "handgrad")


def interleaved_epoch(model, args, tmp):
    """Seconds per step of each backend over one interleaved epoch, and the batch size."""
    runs = {}
    for backend in BACKENDS:
        config = TrainConfig(model=model, data_root=args.data_root, backend=backend,
                             limit=args.limit, threads=args.threads, progress=False,
                             out=os.path.join(tmp, "%s-%s" % (model, backend)))
        runs[backend] = Run(config, log=lambda *_: None)
    batches = {b: list(r.epoch_batches()) for b, r in runs.items()}
    count = len(batches["native"])
    for r in runs.values():
        r.model.train()
    seconds = {b: [] for b in BACKENDS}
    for step in range(count):
        order = BACKENDS if step % 2 == 0 else BACKENDS[::-1]
        for backend in order:
            images, labels = batches[backend][step]
            start = time.perf_counter()
            runs[backend].train_step(images, labels, step, count)
            seconds[backend].append(time.perf_counter() - start)
    return seconds, len(runs["native"].train_data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--limit", type=int, default=12800,
                        help="train on the first N training images (default 12800)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    args = parser.parse_args()

    print("command: %s" % " ".join(["python"] + sys.argv))
    print("| model | native img/s | handgrad img/s | handgrad / native | median step ratio |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            seconds, images = interleaved_epoch(model, args, tmp)
            native, mine = (images / sum(seconds[b]) for b in BACKENDS)
            step_ratio = statistics.median(n / h for n, h in zip(seconds["native"],
                                                                 seconds["handgrad"]))
            print("| %s | %.0f | %.0f | %.2f | %.2f |" % (model, native, mine, mine / native,
                                                          step_ratio), flush=True)


if __name__ == "__main__":
    main()
