"""The float32 matrix-product rate this CPU reaches, to read the op ratios against:
torch.mm at 2048^3 (the BLAS behind at::mm), and the LSTM cell's forward (its two
products and the fused pointwise pass) under the own and blas CPU GEMM policies,
at a large shape and at bench_lstm.py's (128, 256, 512). GFLOP/s of the products,
best of 3 interleaved rounds of 15-call medians.

    python benchmarks/cpu_gemm_peak.py [--threads 2]

An op that is all matrix products cannot beat native by more than the ratio of
this peak to the rate native already reaches.
"""

import argparse
import statistics
import time

import torch

import handgrad
from handgrad import cpu_gemm


def median_seconds(fn, calls=15):
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    print("torch.mm 2048^3: %.0f GFLOP/s" % (2 * 2048 ** 3 / median_seconds(lambda: a @ b) / 1e9))
    policy = cpu_gemm.policy()
    try:
        for batch, inputs, hidden in ((512, 1024, 1024), (128, 256, 512)):
            x, h, c = torch.randn(batch, inputs), torch.randn(batch, hidden), torch.randn(batch, hidden)
            w_ih, w_hh = torch.randn(4 * hidden, inputs), torch.randn(4 * hidden, hidden)
            flops = 2 * batch * (inputs + hidden) * 4 * hidden
            best = {}
            for _ in range(3):
                for name in ("own", "blas"):
                    cpu_gemm.set_policy(name)
                    rate = flops / median_seconds(
                        lambda: torch.ops.handgrad.lstm_cell(x, h, c, w_ih, w_hh)) / 1e9
                    best[name] = max(best.get(name, 0.0), rate)
            print("lstm_cell forward B%d I%d H%d: own %.0f, blas %.0f GFLOP/s"
                  % (batch, inputs, hidden, best["own"], best["blas"]))
    finally:
        cpu_gemm.set_policy(policy)
    print("threads %d, own kernel available: %s" % (args.threads,
                                                    handgrad.cpu_gemm.kernels()["own_gemm_available"]))


if __name__ == "__main__":
    main()
