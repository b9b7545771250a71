"""The build: what handgrad.info() reports and which kernels are registered."""

import os
import subprocess
import sys

import pytest
import torch

import handgrad


def handgrad_ops():
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("handgrad::"))
    assert names, "no handgrad ops are registered"
    return names


def test_info_reports_build_and_runtime():
    facts = handgrad.info()
    assert facts["handgrad"] == handgrad.__version__
    assert facts["torch"] == torch.__version__
    assert facts["threads"] == torch.get_num_threads()
    assert facts["gpu_usable"] == torch.cuda.is_available()
    assert isinstance(facts["cuda_kernels_compiled"], bool)
    if facts["cuda_kernels_compiled"]:
        assert facts["cuda_archs"] and all(a.startswith("sm_") for a in facts["cuda_archs"])
    assert facts["openmp"] is True
    assert facts["cpu_isa"]


def test_info_command_line():
    out = subprocess.run([sys.executable, "-m", "handgrad", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "cuda_kernels_compiled" in out and "cpu_isa" in out and handgrad.__version__ in out


def test_every_op_has_a_cpu_kernel():
    for name in handgrad_ops():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name


def test_cuda_build_registered_cuda_kernels():
    """CI builds with CUDA on a machine without a GPU; this proves the CUDA
    kernels compiled and registered (HANDGRAD_EXPECT_CUDA=1 makes a build
    without them fail instead of skip)."""
    compiled = handgrad.info()["cuda_kernels_compiled"]
    if os.environ.get("HANDGRAD_EXPECT_CUDA") == "1":
        assert compiled, "HANDGRAD_EXPECT_CUDA=1 but handgrad was built without CUDA kernels"
    if not compiled:
        pytest.skip("this handgrad build has no CUDA kernels (HANDGRAD_CUDA=0 or CPU-only torch)")
    if os.environ.get("TORCH_CUDA_ARCH_LIST") == "9.0":
        assert "sm_90" in handgrad.info()["cuda_archs"]
    for name in handgrad_ops():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name


def test_every_op_has_a_fake_kernel():
    for name in handgrad_ops():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta") or \
            torch._library.simple_registry.singleton.find(name).fake_impl.kernel is not None, name


def test_cpu_memory_tracking_counts_tensor_storage():
    from handgrad.profiling import track_cpu_memory

    with track_cpu_memory() as mem:
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(1 << 21, dtype=torch.uint8)
        del a, b
    assert mem.peak_bytes >= 3 << 20
    assert mem.retained_bytes == 0


def test_cuda_emulation_module_built():
    """CI runs every CUDA kernel through the emulator (HANDGRAD_EXPECT_EMULATION=1
    makes a build without the emulation module fail instead of skip)."""
    if os.environ.get("HANDGRAD_EXPECT_EMULATION") == "1":
        assert handgrad.cuda_emulation.available(), \
            "HANDGRAD_EXPECT_EMULATION=1 but handgrad was built without HANDGRAD_CUDA_EMULATION=1"
    if not handgrad.cuda_emulation.available():
        pytest.skip("this handgrad build has no CUDA emulation module")
    with handgrad.cuda_emulation.emulated():
        for name in handgrad_ops():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
