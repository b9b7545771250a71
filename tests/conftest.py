"""Shared test fixtures: every test that takes `device` runs on the CPU and,
where a GPU is usable, on CUDA; without one the CUDA cases are skipped with
the reason shown by `pytest -ra`."""

import os

import pytest
import torch

import handgrad  # noqa: F401  (registers torch.ops.handgrad)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU; none is usable on this machine")

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def pytest_configure(config):
    # `make gpu-check` sets this: on a GPU machine, skipping CUDA tests would hide failures.
    if os.environ.get("HANDGRAD_REQUIRE_GPU") == "1" and not torch.cuda.is_available():
        raise pytest.UsageError("HANDGRAD_REQUIRE_GPU=1 but no CUDA GPU is usable")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
