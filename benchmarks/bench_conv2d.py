"""handgrad.ops.conv2d against torch.nn.functional.conv2d.

    python benchmarks/bench_conv2d.py --threads 2 [--device cuda]

Targets (CPU, float32, forward+backward, native time / handgrad time >= 1.0)
at the nine shapes of issue 3: LeNet, the CIFAR CNN, the MNIST CNN and the
conv autoencoder. Layers that read the images themselves ("first layer") are
run as in a network: the images need no gradient, so neither variant
computes grad_input; those shapes are also run with every gradient, without
a target. GFLOP/s count 2 * MACs of every computed product (forward, plus one
forward's worth per gradient of input or weight). The run starts by
measuring the machine's BLAS matrix product (torch.mm, float32) in the same
process, for reference.
"""

import sys
import time

import torch
import torch.nn.functional as F

import harness
import handgrad


def blas_gflops(n=2048, reps=10):
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / sorted(times)[len(times) // 2] / 1e9


def make_cases(device):
    if device.type == "cpu":
        print("BLAS reference: torch.mm float32 %d^3 = %.1f GFLOP/s (%d threads)"
              % (2048, blas_gflops(), torch.get_num_threads()), flush=True)

    def case(shape, out_channels, kernel, padding=0, stride=1, first_layer=False, target=None,
             channels_last=False, dtype=torch.float32):
        n, cin, h, w = shape
        input_grad = not first_layer

        def make_inputs():
            x = torch.randn(shape, device=device, dtype=dtype)
            weight = torch.randn(out_channels, cin, kernel, kernel, device=device, dtype=dtype)
            weight = weight / (cin * kernel * kernel) ** 0.5
            bias = torch.randn(out_channels, device=device, dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return [x.requires_grad_(input_grad), weight.requires_grad_(), bias.requires_grad_()]

        oh = (h + 2 * padding - kernel) // stride + 1
        ow = (w + 2 * padding - kernel) // stride + 1
        forward_flops = 2 * n * out_channels * oh * ow * cin * kernel * kernel
        backward_flops = forward_flops * (2 if input_grad else 1)
        name = "%s->%d k%d%s%s%s%s%s" % (
            tuple(shape), out_channels, kernel, " p%d" % padding if padding else "",
            " s%d" % stride if stride != 1 else "",
            " (input needs no grad)" if first_layer else "",
            " channels_last" if channels_last else "",
            "" if dtype == torch.float32 else " " + str(dtype)[6:])
        return harness.Case(
            name=name, make_inputs=make_inputs, target=target,
            flops={"forward": forward_flops, "backward": backward_flops,
                   "fwdbwd": forward_flops + backward_flops},
            handgrad=lambda x, w, b: handgrad.ops.conv2d(x, w, b, stride, padding),
            native=lambda x, w, b: F.conv2d(x, w, b, stride, padding))

    cases = [
        # the nine targets
        case((4, 3, 32, 32), 6, 5, first_layer=True, target=1.0),
        case((128, 3, 32, 32), 6, 5, first_layer=True, target=1.0),
        case((128, 6, 14, 14), 16, 5, target=1.0),
        case((128, 3, 32, 32), 64, 3, 1, first_layer=True, target=1.0),
        case((128, 64, 16, 16), 128, 3, 1, target=1.0),
        case((128, 256, 4, 4), 512, 3, 1, target=1.0),
        case((128, 1, 28, 28), 40, 5, first_layer=True, target=1.0),
        case((128, 1, 28, 28), 4, 3, 1, first_layer=True, target=1.0),
        case((128, 4, 14, 14), 8, 3, 1, target=1.0),
        # the first layers with every gradient, and other layouts (no targets)
        case((4, 3, 32, 32), 6, 5),
        case((128, 3, 32, 32), 6, 5),
        case((128, 3, 32, 32), 64, 3, 1),
        case((128, 1, 28, 28), 40, 5),
        case((128, 1, 28, 28), 4, 3, 1),
        case((128, 64, 16, 16), 128, 3, 1, channels_last=True),
        case((128, 64, 32, 32), 64, 3, 1, stride=2),
        case((128, 40, 12, 12), 80, 5),  # the MNIST CNN's second layer
    ]
    if device.type == "cuda":
        # ResNet-50's 3x3 and 1x1 layers at batch 64, NHWC, on the tensor-core
        # implicit GEMMs (conv2d_tensor_core.cuh): bfloat16, and float32 as
        # TF32 (torch.backends.cudnn.allow_tf32, native's default for
        # convolutions, which handgrad follows). Issue 14's target: >= 0.5x cuDNN.
        resnet50 = [((64, 64, 56, 56), 64, 3, 1), ((64, 128, 28, 28), 128, 3, 1),
                    ((64, 256, 14, 14), 256, 3, 1), ((64, 512, 7, 7), 512, 3, 1),
                    ((64, 256, 56, 56), 64, 1, 0), ((64, 64, 56, 56), 256, 1, 0),
                    ((64, 512, 28, 28), 128, 1, 0), ((64, 1024, 14, 14), 256, 1, 0),
                    ((64, 2048, 7, 7), 512, 1, 0)]
        for dtype in (torch.bfloat16, torch.float32):
            for shape, out_channels, kernel, padding in resnet50:
                cases.append(case(shape, out_channels, kernel, padding, channels_last=True,
                                  dtype=dtype, target=0.5))
    return cases


if __name__ == "__main__":
    sys.exit(harness.main("conv2d", make_cases))
