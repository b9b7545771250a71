"""The LSTM layer benchmark of bench_lstm.py timed in thread CPU time.

    PYTHONPATH=python python benchmarks/lstm_thread_time.py [--runs 60]

Same modules and inputs as bench_lstm.py's layer cases (T28 B128 I28 H128,
batch_first, 1 and 2 layers, float32, upstream gradient of ones on the
output), one torch thread, native and handgrad interleaved. Each run is timed
with time.thread_time() (CPU time of the calling thread), which leaves out
the time the thread spends descheduled: on a shared machine whose other
processes come and go, wall-clock medians swing by 2x between runs while
these stay within a few percent. Only meaningful with one thread (all the
work runs on the calling thread). Prints min and median per variant and
their ratios (native / handgrad: above 1 means handgrad is faster).
"""

import argparse
import copy
import time

import torch

import handgrad


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=60)
    args = p.parse_args()
    torch.set_num_threads(1)
    T, B, I, H = 28, 128, 28, 128
    for layers in (1, 2):
        torch.manual_seed(0)
        native = torch.nn.LSTM(I, H, num_layers=layers, batch_first=True)
        mine = copy.copy(native)  # shares the parameters
        mine.__class__ = handgrad.nn.LSTM
        x = torch.randn(B, T, I)

        def fwdbwd(m):
            y = m(x)[0]
            y.backward(torch.ones_like(y))

        def forward(m):
            with torch.no_grad():
                m(x)

        for name, f in (("forward", forward), ("fwdbwd", fwdbwd)):
            times = {"native": [], "handgrad": []}
            for _ in range(3):
                f(native)
                f(mine)
            for i in range(args.runs):
                order = [("native", native), ("handgrad", mine)]
                for key, m in order if i % 2 == 0 else order[::-1]:
                    start = time.thread_time()
                    f(m)
                    times[key].append(time.thread_time() - start)
            n, h = sorted(times["native"]), sorted(times["handgrad"])
            mid = len(n) // 2
            print("layer L%d %-8s native min %.3f med %.3f ms | handgrad min %.3f med %.3f ms"
                  " | speedup min %.3f med %.3f" % (layers, name, n[0] * 1e3, n[mid] * 1e3,
                                                    h[0] * 1e3, h[mid] * 1e3, n[0] / h[0],
                                                    n[mid] / h[mid]))


if __name__ == "__main__":
    main()
