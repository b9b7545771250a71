"""The CUDA emulator itself: warp semantics, and the errors it must report
instead of returning a result (the op kernels' emulated runs rely on both)."""

import math
import os
from pathlib import Path

import pytest
import torch

import handgrad
from handgrad import cuda_emulation
from conftest import requires_emulation

pytestmark = requires_emulation

IDX, XOR, DOWN, UP = range(4)
ROOT = Path(__file__).resolve().parents[1]


def run(name, *args):
    return cuda_emulation._module._self_test(name, list(args))


def shuffle(mode, arg, width=32, mask=0xFFFFFFFF, threads=32):
    return [int(v) for v in run("shuffle", mode, arg, width, mask, threads)]


def test_shuffle_xor_swaps_partners():
    assert shuffle(XOR, 1) == [100 + (t ^ 1) for t in range(32)]
    # a butterfly over 8-lane segments: the xor partner stays in the segment
    assert shuffle(XOR, 4, width=8, threads=64) == [100 + (t ^ 4) for t in range(64)]


def test_shuffle_down_and_up_keep_their_own_value_past_the_segment():
    down = shuffle(DOWN, 1, width=8)
    assert down == [100 + (t if t % 8 == 7 else t + 1) for t in range(32)]
    up = shuffle(UP, 2, width=16)
    assert up == [100 + (t if t % 16 < 2 else t - 2) for t in range(32)]


def test_shuffle_idx_reads_the_lane_of_each_segment():
    assert shuffle(IDX, 3, width=8) == [100 + (t // 8) * 8 + 3 for t in range(32)]
    assert shuffle(IDX, 35) == [103] * 32  # the lane number is taken modulo the width


def test_shuffle_with_a_partial_mask():
    out = shuffle(XOR, 1, mask=0x0000FFFF)
    assert out[:16] == [100 + (t ^ 1) for t in range(16)] and out[16:] == [-1] * 16


def test_shuffle_reading_a_lane_outside_the_mask_is_an_error():
    with pytest.raises(RuntimeError, match="reads lane 16, outside its mask"):
        shuffle(XOR, 16, mask=0x0000FFFF)


def test_votes():
    out = [int(v) for v in run("vote", 40)]
    for t in range(64):
        warp = t // 32
        ballot = sum(1 << lane for lane in range(32) if (warp * 32 + lane) % 3 == 0)
        assert out[3 * t] == ballot
        assert out[3 * t + 1] == (1 if warp * 32 < 40 else 0)     # any lane below 40
        assert out[3 * t + 2] == (1 if warp * 32 + 31 < 40 else 0)  # all lanes below 40


def test_block_reduction_and_a_missing_barrier():
    assert run("block_sum", 0, 3) == [sum(range(256))] * 3
    # Without the barrier, a thread reads its partner's slot before the
    # partner wrote it: the poisoned shared memory makes that visible. Blocks
    # alternate the order their threads run in, so one of two blocks fails.
    if "libtsan" in os.environ.get("LD_PRELOAD", ""):
        # ThreadSanitizer reports this race and halts (tools/emulation_build.py
        # tsan-check asserts exactly that); the poisoned values are its
        # uninstrumented counterpart.
        return
    broken = run("block_sum", 1, 2)
    assert any(math.isnan(v) for v in broken)


def test_uninitialised_shared_memory_reads_as_nan():
    assert all(math.isnan(v) for v in run("uninitialised_shared"))


def test_divergent_barrier_is_reported():
    with pytest.raises(RuntimeError, match="divergent __syncthreads"):
        run("divergent_barrier")


def test_deadlock_is_reported_not_hung():
    with pytest.raises(RuntimeError, match="deadlock in block"):
        run("deadlock")


def test_warp_operation_waiting_for_an_exited_lane_is_reported():
    with pytest.raises(RuntimeError, match="names lanes that have exited"):
        run("exited_lane")


def test_full_mask_on_a_partial_warp_is_reported():
    with pytest.raises(RuntimeError, match="names lanes that do not exist"):
        run("partial_warp_full_mask")


def test_write_past_dynamic_shared_memory_is_reported():
    with pytest.raises(RuntimeError, match="wrote past the end of its 100 bytes"):
        run("shared_overrun", 100)


def test_device_side_assert():
    run("assert", 2)
    with pytest.raises(RuntimeError, match=r"device-side assert.*value < 3.*block \(0, 0, 0\)"):
        run("assert", 3)
    run("assert", 1)  # the emulated device stays usable afterwards


def test_atomics_from_every_block():
    assert run("atomic_sum", 5, 96) == [sum(range(5 * 96))]


def test_dynamic_shared_memory_over_48k_is_opted_into():
    n = 100 * 1024
    assert run("big_shared", n) == [n // 4 // 2] * 64
    with pytest.raises(RuntimeError, match="needs 240000 bytes of shared memory"):
        run("big_shared", 240000)  # over sm_90's 227 KiB opt-in limit


@pytest.mark.parametrize("grid, block, message", [
    ((1, 65536, 1), (32, 1, 1), "too large for one CUDA launch"),
    ((1, 1, 70000), (32, 1, 1), "too large for one CUDA launch"),
    ((1 << 31, 1, 1), (32, 1, 1), "too large for one CUDA launch"),
    ((0, 1, 1), (32, 1, 1), "too large for one CUDA launch"),
    ((1, 1, 1), (1025, 1, 1), "invalid block"),
    ((1, 1, 1), (2, 2, 65), "invalid block"),
])
def test_launch_limits(grid, block, message):
    with pytest.raises(RuntimeError, match=message):
        run("launch", *grid, *block)


def test_emulation_swaps_the_cpu_kernels_in_and_out():
    x = torch.randn(1, 1, 4, 4)
    cuda_emulation.reset_launch_statistics()
    handgrad.ops.max_pool2d(x, 2)
    assert not cuda_emulation.launch_statistics()
    with cuda_emulation.emulated():
        assert cuda_emulation.active()
        handgrad.ops.max_pool2d(x, 2)
    assert not cuda_emulation.active()
    assert any("max_pool2d" in k for k in cuda_emulation.launch_statistics())


def test_every_cuda_file_is_emulated():
    files = {Path(f).name for f in cuda_emulation.emulated_files()}
    assert files == {p.name for p in (ROOT / "csrc" / "ops" / "cuda").glob("*.cu")}
