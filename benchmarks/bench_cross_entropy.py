"""handgrad.ops.cross_entropy against torch.nn.functional.cross_entropy.

    python benchmarks/bench_cross_entropy.py [--threads 2] [--device cuda]

Targets (CPU, float32, forward+backward, index targets): (4096, 32000) at
least 1.5x native with at most 0.7 of native's peak memory (native keeps the
N x C log_softmax for backward and builds two more N x C tensors there;
handgrad keeps one log-sum-exp per row and writes grad_input directly);
(128, 10) at least as fast as native (per-call overhead); the
segmentation-style (8, 21, 128, 128) at least as fast as native.
"""

import sys

import torch
import torch.nn.functional as F

import harness
import handgrad


def make_cases(device):
    def case(shape, target=None, memory_target=None, ignore=False, smoothing=0.0, prob=False,
             dtype=torch.float32):
        def make_inputs():
            x = torch.randn(shape, device=device, dtype=dtype)
            rows = (shape[0], *shape[2:])
            if prob:
                t = torch.rand(shape, device=device, dtype=dtype).softmax(1)
            else:
                t = torch.randint(0, shape[1], rows, device=device)
                if ignore:
                    t[torch.rand(rows, device=device) < 0.1] = -100
            return [x.requires_grad_(), t]

        name = "%s%s%s%s%s" % (tuple(shape), " prob" if prob else "",
                               " ignore 10%" if ignore else "",
                               " smoothing %g" % smoothing if smoothing else "",
                               "" if dtype == torch.float32 else " " + str(dtype)[6:])
        return harness.Case(
            name=name, make_inputs=make_inputs, target=target, memory_target=memory_target,
            handgrad=lambda x, t: handgrad.ops.cross_entropy(x, t, label_smoothing=smoothing),
            native=lambda x, t: F.cross_entropy(x, t, label_smoothing=smoothing))

    return [
        case((4096, 32000), target=1.5, memory_target=0.7),
        case((128, 10), target=1.0),
        case((8, 21, 128, 128), target=1.0),
        case((8, 21, 128, 128), ignore=True, smoothing=0.1),
        case((512, 1000), prob=True),
        # Reduced precision against native in the same dtype (float32 inside).
        case((8, 21, 128, 128), dtype=torch.bfloat16),
        case((1024, 8000), dtype=torch.float16),
        case((1024, 8000), dtype=torch.bfloat16),
    ]


if __name__ == "__main__":
    sys.exit(harness.main("cross_entropy", make_cases))
