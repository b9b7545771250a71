#include "common/memory_tracker.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <mutex>

namespace handgrad {
namespace memory {
namespace {

std::atomic<bool> g_enabled{false};
std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};

void raise_peak(int64_t value) {
  int64_t peak = g_peak.load();
  while (value > peak && !g_peak.compare_exchange_weak(peak, value)) {
  }
}

// The storage allocated while tracking, plus the original allocation that
// owns it; freeing one subtracts its size, whenever that happens.
struct TrackedBlock {
  c10::DataPtr inner;
  int64_t bytes;
};

void free_tracked(void* context) {
  auto* block = static_cast<TrackedBlock*>(context);
  g_current.fetch_sub(block->bytes);
  delete block;
}

class TrackingAllocator final : public c10::Allocator {
 public:
  explicit TrackingAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr inner = base_->allocate(n);
    if (!g_enabled.load(std::memory_order_relaxed)) return inner;
    void* data = inner.get();
    const c10::Device device = inner.device();
    auto* block = new TrackedBlock{std::move(inner), static_cast<int64_t>(n)};
    raise_peak(g_current.fetch_add(block->bytes) + block->bytes);
    return {data, block, &free_tracked, device};
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
int64_t cpu_current_bytes() { return g_current.load(); }
int64_t cpu_peak_bytes() { return g_peak.load(); }
void reset_cpu_peak() { g_peak.store(g_current.load()); }

}  // namespace memory
}  // namespace handgrad
