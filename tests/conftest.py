"""Shared test fixtures: every test that takes `device` runs on the CPU, on
the CUDA emulator (the .cu kernels compiled for the host, run on CPU tensors;
see handgrad.cuda_emulation) and, where a GPU is usable, on CUDA. Without a
GPU the CUDA cases are skipped with the reason shown by `pytest -ra`."""

import os

import pytest
import torch

import handgrad  # noqa: F401  (registers torch.ops.handgrad)
from handgrad import cuda_emulation

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU; none is usable on this machine")
requires_emulation = pytest.mark.skipif(
    not cuda_emulation.available(),
    reason="handgrad was built without its CUDA emulation module (HANDGRAD_CUDA_EMULATION=1)")

DEVICES = ["cpu", pytest.param("cuda-emulated", marks=requires_emulation),
           pytest.param("cuda", marks=requires_cuda)]


def pytest_configure(config):
    # `make gpu-check` sets this: on a GPU machine, skipping CUDA tests would hide failures.
    if os.environ.get("HANDGRAD_REQUIRE_GPU") == "1" and not torch.cuda.is_available():
        raise pytest.UsageError("HANDGRAD_REQUIRE_GPU=1 but no CUDA GPU is usable")


@pytest.fixture(params=DEVICES)
def device(request):
    """The device to put tensors on. For "cuda-emulated" that is the CPU, with
    handgrad's ops switched to their emulated CUDA kernels for the test."""
    if request.param == "cuda-emulated":
        with cuda_emulation.emulated():
            yield torch.device("cpu")
    else:
        yield torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
