"""handgrad.ops.max_pool2d against torch.nn.functional.max_pool2d.

    python benchmarks/bench_max_pool2d.py [--threads 2] [--device cuda]

Targets (CPU, float32, forward+backward): at least as fast as native at
(128,64,32,32), (128,6,28,28) and (128,4,28,28) with a 2x2 window, stride 2.
"""

import sys

import torch
import torch.nn.functional as F

import harness
import handgrad


def make_cases(device):
    def case(shape, kernel, stride, padding=0, target=None, channels_last=False, dtype=torch.float32):
        def make_inputs():
            x = torch.randn(shape, device=device, dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return [x.requires_grad_()]

        name = "%s k%d s%d%s%s%s" % (tuple(shape), kernel, stride, " p%d" % padding if padding else "",
                                     " channels_last" if channels_last else "",
                                     "" if dtype == torch.float32 else " " + str(dtype)[6:])
        return harness.Case(
            name=name, make_inputs=make_inputs, target=target,
            handgrad=lambda x: handgrad.ops.max_pool2d(x, kernel, stride, padding),
            native=lambda x: F.max_pool2d(x, kernel, stride, padding))

    return [
        case((128, 64, 32, 32), 2, 2, target=1.0),
        case((128, 6, 28, 28), 2, 2, target=1.0),
        case((128, 4, 28, 28), 2, 2, target=1.0),
        case((128, 64, 32, 32), 3, 2, 1),
        case((128, 64, 32, 32), 2, 2, channels_last=True),
        case((32, 64, 56, 56), 3, 2, 1, channels_last=True),
    ]


if __name__ == "__main__":
    sys.exit(harness.main("max_pool2d", make_cases))
