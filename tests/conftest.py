"""Shared test fixtures: every test that takes `device` runs on the CPU, on
the CUDA emulator (the .cu kernels compiled for the host, run on CPU tensors;
see handgrad.cuda_emulation) and, where a GPU is usable, on CUDA. Without a
GPU the CUDA cases are skipped with the reason shown by `pytest -ra`."""

import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

# The CPU GEMM policy's decisions go to a file of this test session (not the
# user's ~/.cache): every process the tests start reads the same choices, so
# runs compared bit for bit across processes (a killed and resumed training
# run) see the same kernels, and no earlier run's decisions leak in.
os.environ.setdefault("HANDGRAD_CPU_GEMM_CACHE",
                      os.path.join(tempfile.mkdtemp(prefix="handgrad-tests-"),
                                   "cpu_gemm_decisions.txt"))

import handgrad  # noqa: E402,F401  (registers torch.ops.handgrad)
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
    # HANDGRAD_TEST_ONE_CASE=1 keeps the first case of each test function: the
    # ThreadSanitizer run in CI (every kernel family once; TSan slows the
    # emulator about tenfold, and a race shows at any size) and the CI run of
    # the installed CPU-only wheel (every test function once against that
    # build; the kernels are the ones `make test` checked case by case).
    narrowed = "cpu" not in _selected_devices()
    one_case = os.environ.get("HANDGRAD_TEST_ONE_CASE") == "1"
    if not narrowed and not one_case:
        return
    seen = set()
    kept, dropped = [], []
    for item in items:
        uses_device = "device" in getattr(item, "fixturenames", ())
        wanted = uses_device or item.get_closest_marker("gpu") or not narrowed
        if wanted and one_case:
            function = item.nodeid.split("[")[0]
            wanted = function not in seen
            seen.add(function)
        (kept if wanted else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(params=DEVICES)
def device(request):
    """The device to put tensors on. For "cuda-emulated" that is the CPU, with
    handgrad's ops switched to their emulated CUDA kernels for the test.

    CUDA cases run with TF32 off, so float32 is compared exactly; the
    tensor-core tests switch it on where they mean to."""
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        if request.param == "cuda-emulated":
            with cuda_emulation.emulated():
                yield torch.device("cpu")
        else:
            yield torch.device(request.param)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------- CUDA emulation coverage

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "ops" / "cuda"


def cuda_kernels():
    """{(op, kernel)} for every __global__ function of the op .cu files and
    the .cuh files they include (conv2d_tensor_core.cuh belongs to conv2d)."""
    ops = sorted((p.stem for p in CUDA_DIR.glob("*.cu")), key=len, reverse=True)
    pattern = r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)*(\w+)"
    found = set()
    for path in list(CUDA_DIR.glob("*.cu")) + list(CUDA_DIR.glob("*.cuh")):
        op = next(o for o in ops if path.stem.startswith(o))
        found |= {(op, name) for name in re.findall(pattern, path.read_text())}
    return found


# Launch counts of the whole session: tests may reset the emulator's
# statistics (to check what their own code launched), so they are moved here
# around every test.
_SESSION_LAUNCHES = {}


def _absorb_launch_statistics():
    if not cuda_emulation.available():
        return
    for name, counts in cuda_emulation.launch_statistics().items():
        total = _SESSION_LAUNCHES.setdefault(name, [0, 0, 0])
        for i, c in enumerate(counts):
            total[i] += c
    cuda_emulation.reset_launch_statistics()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _absorb_launch_statistics()
    yield
    _absorb_launch_statistics()


def kernels_run():
    """{(op, kernel)} the emulator launched in this session, with the totals."""
    _absorb_launch_statistics()
    stats = _SESSION_LAUNCHES
    ran = set()
    for name in stats:
        parts = name.split("<", 1)[0].split("::")
        if len(parts) >= 3 and parts[0] == "handgrad":
            ran.add((parts[1], parts[-1]))
    launches = sum(v[0] for v in stats.values())
    threads = sum(v[2] for v in stats.values())
    return ran, launches, threads


def _ran_every_op_test(session):
    """Whether this run included every op's whole test file (no -k / -m)."""
    option = session.config.option
    if getattr(option, "keyword", "") or getattr(option, "markexpr", ""):
        return False
    files = {Path(str(item.fspath)).name for item in session.items}
    return all("test_%s.py" % path.stem in files for path in CUDA_DIR.glob("*.cu"))


def pytest_sessionfinish(session, exitstatus):
    ran, launches, threads = kernels_run()
    if not launches:
        return
    missing = sorted(cuda_kernels() - ran)
    session.config._hg_emulation = (len(cuda_kernels()) - len(missing), len(cuda_kernels()),
                                    launches, threads, missing)
    # CI: every CUDA kernel must have run through the emulator.
    if (missing and os.environ.get("HANDGRAD_EXPECT_EMULATION") == "1"
            and _ran_every_op_test(session) and exitstatus == 0):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    report = getattr(config, "_hg_emulation", None)
    if report is None:
        return
    covered, total, launches, threads, missing = report
    terminalreporter.write_sep("-", "CUDA emulation")
    terminalreporter.write_line("%d of %d CUDA kernels ran on the emulator (%d launches, %d "
                                "emulated threads)" % (covered, total, launches, threads))
    if missing:
        terminalreporter.write_line("not run: " + ", ".join("%s.cu:%s" % m for m in missing))


def pytest_make_parametrize_id(config, val, argname):
    """Readable test ids for dtypes and devices: float32, not dtype0."""
    if isinstance(val, torch.dtype):
        return str(val).replace("torch.", "")
    if isinstance(val, torch.device):
        return str(val)
    if (isinstance(val, (tuple, list)) and all(type(v) in (int, float) for v in val)
            and len(val) <= 8):
        return "x".join(str(v) for v in val)  # a shape: 2x3x9x9, not shape0
    return None
