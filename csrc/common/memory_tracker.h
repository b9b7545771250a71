// Peak-memory measurement for CPU tensors.
//
// PyTorch keeps allocator statistics for CUDA only. The benchmarks compare
// the peak memory of handgrad and native ops on the CPU too, so handgrad can
// install a thin wrapper around the CPU allocator that counts the bytes of
// live tensor storage and their high-water mark. When tracking is off the
// wrapper forwards to the original allocator without any bookkeeping.
// handgrad's own scratch outside PyTorch's allocator (std::vector work
// buffers, per-thread buffers; common/scratch_memory.h) is counted always and
// added: current and peak are tensor bytes plus scratch bytes. Memory that
// other libraries allocate outside PyTorch's allocator is not seen.
#pragma once

#include <cstdint>

namespace handgrad {
namespace memory {

void set_cpu_tracking(bool enabled);  // installs the wrapper on first use
bool cpu_tracking();
int64_t cpu_current_bytes();          // live tensor bytes allocated while tracking was on,
                                      // plus live scratch bytes
int64_t cpu_peak_bytes();
void reset_cpu_peak();                // peak := current

}  // namespace memory
}  // namespace handgrad
