// Peak-memory measurement for CPU tensors.
//
// PyTorch keeps allocator statistics for CUDA only. The benchmarks compare
// the peak memory of handgrad and native ops on the CPU too, so handgrad can
// install a thin wrapper around the CPU allocator that counts the bytes of
// live tensor storage and their high-water mark. When tracking is off the
// wrapper forwards to the original allocator without any bookkeeping.
// Memory that libraries allocate outside PyTorch's allocator is not seen.
#pragma once

#include <cstdint>

namespace handgrad {
namespace memory {

void set_cpu_tracking(bool enabled);  // installs the wrapper on first use
bool cpu_tracking();
int64_t cpu_current_bytes();          // live bytes allocated while tracking was on
int64_t cpu_peak_bytes();
void reset_cpu_peak();                // peak := current

}  // namespace memory
}  // namespace handgrad
