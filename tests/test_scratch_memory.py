"""handgrad's own CPU scratch (std::vector work buffers, per-thread buffers;
csrc/common/scratch_memory.h) is counted, and the benchmarks' CPU peak
(handgrad.profiling.track_cpu_memory) includes it."""

import torch

import handgrad
from handgrad import _C
from handgrad.profiling import track_cpu_memory

# A 5x5 stride-2 convolution takes the direct kernels (no Winograd, too small
# for im2col), whose forward and backward stage their rows in std::vectors.
DIRECT_CASE = dict(input=(2, 3, 17, 17), weight=(4, 3, 5, 5), stride=2, padding=1)


def _conv_forward_backward(case):
    x = torch.randn(*case["input"], requires_grad=True)
    w = torch.randn(*case["weight"], requires_grad=True)
    y = handgrad.ops.conv2d(x, w, None, stride=case["stride"], padding=case["padding"])
    y.sum().backward()


def test_conv2d_raises_the_scratch_peak_and_releases_it():
    start = _C._scratch_memory_current()
    _C._reset_scratch_memory_peak()
    _conv_forward_backward(DIRECT_CASE)
    assert _C._scratch_memory_peak() > start, "the direct conv2d kernels allocated no counted scratch"
    assert _C._scratch_memory_current() == start, "scratch still counted after the call returned"


def test_cpu_peak_includes_the_scratch():
    start = _C._scratch_memory_current()
    with track_cpu_memory() as mem:
        _C._reset_scratch_memory_peak()
        _conv_forward_backward(DIRECT_CASE)
        scratch_peak = _C._scratch_memory_peak() - start
    assert scratch_peak > 0
    # The output, the gradients and the graph's saved tensors come on top of
    # the scratch, so the combined peak is strictly larger.
    assert mem.peak_bytes > scratch_peak


def test_max_pool2d_channels_last_backward_scratch_is_counted():
    x = torch.randn(2, 70, 9, 9).to(memory_format=torch.channels_last).requires_grad_()
    start = _C._scratch_memory_current()
    _C._reset_scratch_memory_peak()
    handgrad.ops.max_pool2d(x, 3, 2).sum().backward()
    # one image's float scratch per task: at least one (positions x channels) block
    assert _C._scratch_memory_peak() - start >= 9 * 9 * 4
    assert _C._scratch_memory_current() == start
