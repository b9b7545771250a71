#include "common/memory_tracker.h"

#include "common/scratch_memory.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <mutex>
#include <unordered_map>

namespace handgrad {
namespace memory {
namespace {

std::atomic<bool> g_enabled{false};
std::atomic<int64_t> g_current{0};  // tracked tensor bytes
std::atomic<int64_t> g_peak{0};     // of tensor + scratch bytes
std::atomic<int64_t> g_scratch_current{0};
std::atomic<int64_t> g_scratch_peak{0};

void raise(std::atomic<int64_t>& peak_of, int64_t value) {
  int64_t peak = peak_of.load();
  while (value > peak && !peak_of.compare_exchange_weak(peak, value)) {
  }
}

void raise_peak(int64_t value) { raise(g_peak, value); }

// Sizes of the blocks allocated while tracking, by address. The wrapper's
// DataPtrs keep the address as their context (as the default CPU allocator
// does), so Allocator::raw_allocate / raw_deallocate -- which oneDNN-backed
// native ops use -- work through the wrapper too.
std::mutex g_blocks_mutex;
std::unordered_map<void*, int64_t>& tracked_blocks() {
  static auto* blocks = new std::unordered_map<void*, int64_t>();
  return *blocks;
}
c10::DeleterFnPtr g_base_deleter = nullptr;

void free_tracked(void* ptr) {
  {
    std::lock_guard<std::mutex> lock(g_blocks_mutex);
    auto& blocks = tracked_blocks();
    const auto it = blocks.find(ptr);
    if (it != blocks.end()) {
      g_current.fetch_sub(it->second);
      blocks.erase(it);
    }
  }
  g_base_deleter(ptr);
}

class TrackingAllocator final : public c10::Allocator {
 public:
  explicit TrackingAllocator(c10::Allocator* base) : base_(base) {
    g_base_deleter = base->raw_deleter();
  }

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr inner = base_->allocate(n);
    // Only blocks whose context is their address (and whose deleter is the
    // base's raw deleter) can be re-wrapped; others pass through untracked.
    if (!g_enabled.load(std::memory_order_relaxed) || g_base_deleter == nullptr ||
        inner.get() != inner.get_context() || inner.get_deleter() != g_base_deleter) {
      return inner;
    }
    void* data = inner.get();
    const c10::Device device = inner.device();
    inner.release_context();
    {
      std::lock_guard<std::mutex> lock(g_blocks_mutex);
      tracked_blocks()[data] = static_cast<int64_t>(n);
    }
    raise_peak(g_current.fetch_add(static_cast<int64_t>(n)) + static_cast<int64_t>(n) +
               g_scratch_current.load());
    return {data, data, &free_tracked, device};
  }

  // Frees both tracked blocks and blocks the base allocated while tracking was off.
  c10::DeleterFnPtr raw_deleter() const override {
    return g_base_deleter ? &free_tracked : nullptr;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    base_->copy_data(dest, src, count);
  }

 private:
  c10::Allocator* base_;
};

std::once_flag g_install_once;

void install() {
  static TrackingAllocator* tracker = new TrackingAllocator(c10::GetCPUAllocator());
  // A priority above the default allocator's, so the wrapper stays in place.
  c10::SetCPUAllocator(tracker, /*priority=*/100);
}

}  // namespace

void set_cpu_tracking(bool enabled) {
  if (enabled) std::call_once(g_install_once, install);
  g_enabled.store(enabled);
}

bool cpu_tracking() { return g_enabled.load(); }
int64_t cpu_current_bytes() { return g_current.load() + g_scratch_current.load(); }
int64_t cpu_peak_bytes() { return g_peak.load(); }
void reset_cpu_peak() { g_peak.store(cpu_current_bytes()); }

void scratch_acquired(int64_t bytes) {
  const int64_t scratch = g_scratch_current.fetch_add(bytes) + bytes;
  raise(g_scratch_peak, scratch);
  raise_peak(g_current.load() + scratch);
}
void scratch_released(int64_t bytes) { g_scratch_current.fetch_sub(bytes); }
int64_t scratch_current_bytes() { return g_scratch_current.load(); }
int64_t scratch_peak_bytes() { return g_scratch_peak.load(); }
void reset_scratch_peak() { g_scratch_peak.store(g_scratch_current.load()); }

}  // namespace memory
}  // namespace handgrad
