"""Peak memory of CPU tensors, for the benchmarks (PyTorch tracks CUDA only)::

    with handgrad.profiling.track_cpu_memory() as mem:
        loss = model(x).sum(); loss.backward()
    print(mem.peak_bytes)   # high-water mark above what was live on entry

Counts the storage of tensors allocated through PyTorch's CPU allocator
while the block runs, plus handgrad's own scratch memory outside that
allocator (the kernels' std::vector work buffers and the per-thread buffers
they reuse between calls, csrc/common/scratch_memory.h), so a handgrad op's
peak includes everything it holds. Memory that other libraries allocate on
their own (e.g. oneDNN inside native ops) is not seen.
"""

import contextlib

from . import _C


class CpuMemoryReport:
    peak_bytes = 0
    retained_bytes = 0  # allocated inside the block and still alive at its end


@contextlib.contextmanager
def track_cpu_memory():
    was_on = _C._cpu_memory_tracking()
    _C._set_cpu_memory_tracking(True)
    start = _C._cpu_memory_current()
    _C._reset_cpu_memory_peak()
    report = CpuMemoryReport()
    try:
        yield report
    finally:
        report.peak_bytes = _C._cpu_memory_peak() - start
        report.retained_bytes = _C._cpu_memory_current() - start
        _C._set_cpu_memory_tracking(was_on)
