// Counting handgrad's own CPU scratch memory (std::vector work buffers and
// per-thread buffers kept between calls), which PyTorch's allocator never
// sees, so that the benchmarks' peak memory includes it.
//
//   ScratchVector<T> buf(n);        // a std::vector whose bytes are counted
//                                   // while it holds them
//   ScratchInUse use(bytes);        // counts a persistent buffer (a
//                                   // thread_local reused between calls) as
//                                   // in use for this scope: its bytes belong
//                                   // to every call that uses it, wherever it
//                                   // was first allocated
//
// The counters are always on (one relaxed atomic add per allocation, not per
// element). memory_tracker.cpp adds them to the tracked tensor bytes, so the
// CPU peak of handgrad::profiling::track_cpu_memory is tensors plus scratch;
// scratch_current_bytes / scratch_peak_bytes report scratch alone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace handgrad {
namespace memory {

void scratch_acquired(int64_t bytes);
void scratch_released(int64_t bytes);
int64_t scratch_current_bytes();
int64_t scratch_peak_bytes();
void reset_scratch_peak();  // peak := current

template <typename T>
struct ScratchAllocator {
  using value_type = T;
  ScratchAllocator() = default;
  template <typename U>
  ScratchAllocator(const ScratchAllocator<U>&) {}  // NOLINT: rebinding is implicit

  T* allocate(std::size_t n) {
    T* p = std::allocator<T>().allocate(n);
    scratch_acquired(static_cast<int64_t>(n * sizeof(T)));
    return p;
  }
  void deallocate(T* p, std::size_t n) {
    scratch_released(static_cast<int64_t>(n * sizeof(T)));
    std::allocator<T>().deallocate(p, n);
  }
  template <typename U>
  bool operator==(const ScratchAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const ScratchAllocator<U>&) const { return false; }
};

template <typename T>
using ScratchVector = std::vector<T, ScratchAllocator<T>>;

class ScratchInUse {
 public:
  explicit ScratchInUse(int64_t bytes) : bytes_(bytes) { scratch_acquired(bytes_); }
  ~ScratchInUse() { scratch_released(bytes_); }
  ScratchInUse(const ScratchInUse&) = delete;
  ScratchInUse& operator=(const ScratchInUse&) = delete;

 private:
  int64_t bytes_;
};

}  // namespace memory
}  // namespace handgrad
