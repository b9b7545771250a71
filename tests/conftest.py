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

_ALL_DEVICES = {"cpu": "cpu",
                "cuda-emulated": pytest.param("cuda-emulated", marks=requires_emulation),
                "cuda": pytest.param("cuda", marks=requires_cuda)}


def _selected_devices():
    """HANDGRAD_TEST_DEVICES=cuda (comma-separated names) narrows the device
    cases, e.g. to the real GPU in the one-shot GPU check."""
    wanted = os.environ.get("HANDGRAD_TEST_DEVICES")
    if not wanted:
        return list(_ALL_DEVICES)
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    unknown = [n for n in names if n not in _ALL_DEVICES]
    if unknown:
        raise pytest.UsageError("HANDGRAD_TEST_DEVICES: unknown device %s (known: %s)"
                                % (", ".join(unknown), ", ".join(_ALL_DEVICES)))
    return names


DEVICES = [_ALL_DEVICES[name] for name in _selected_devices()]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a real CUDA GPU (and takes no `device`)")
    # `make gpu-check` sets this: on a GPU machine, skipping CUDA tests would hide failures.
    if os.environ.get("HANDGRAD_REQUIRE_GPU") == "1" and not torch.cuda.is_available():
        raise pytest.UsageError("HANDGRAD_REQUIRE_GPU=1 but no CUDA GPU is usable")


def pytest_collection_modifyitems(config, items):
    # Narrowed to devices other than the CPU, the run keeps only the tests
    # about those devices: the device cases and the tests marked `gpu`.
    if "cpu" in _selected_devices():
        return
    kept, dropped = [], []
    for item in items:
        uses_device = "device" in getattr(item, "fixturenames", ())
        (kept if uses_device or item.get_closest_marker("gpu") else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


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
