// Host emulation of the CUDA execution model, for running handgrad's .cu
// files on a machine without a GPU (the CUDA-emulation build; see
// csrc/emulation/README.md).
//
// A .cu file is compiled by the host C++ compiler with this header in front
// of it (csrc/emulation/kernel_unit.h). Device code then runs as ordinary C++:
//  * every CUDA thread of a block is a fiber (a user-level thread with its
//    own stack) on the launching OS thread; blocks run one after another;
//  * __syncthreads and the warp-synchronous operations (shuffles, votes,
//    __syncwarp) switch fibers until every thread they wait for arrives, and
//    report divergent barriers, deadlocks and bad lane masks as errors;
//  * __shared__ variables live in one linker section that is poisoned with
//    0xFF bytes (NaN for every floating type) before each block, as is the
//    dynamic shared memory, so a read before a write shows up as NaN;
//  * launches are checked against sm_90's limits (grid, block, shared
//    memory and its opt-in), and a failed CUDA_KERNEL_ASSERT is reported by
//    the next C10_CUDA_KERNEL_LAUNCH_CHECK as a device-side assert.
// The order in which a block's threads run alternates from block to block
// (first to last, then last to first), so a missing barrier breaks results
// whichever thread writes first. Under ThreadSanitizer (LD_PRELOAD of
// libtsan with a -fsanitize=thread build of the kernels) each fiber is a
// separate TSan thread and barriers are the only happens-before edges, so
// a missing __syncthreads is reported as a data race at its line.
#pragma once

#include <math.h>  // float overloads of exp/log/... in the global namespace, as in CUDA

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------- keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ static
// Static shared variables of every kernel share one section, so the runtime
// can poison all of them before each block (they are function-local
// statics: one copy, used by one block at a time).
#define __shared__ __attribute__((section("hg_emu_shared"))) static

// --------------------------------------------------------- built-in types
struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

constexpr int warpSize = 32;

// The running thread's coordinates; the scheduler stores them before it
// switches to a fiber.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace handgrad {
namespace cuda_emulation {

// ------------------------------------------------------------ runtime API
// (defined in runtime.cpp)

// One kernel launch: `body` runs once per emulated thread.
struct LaunchRequest {
  const char* kernel;          // name, for messages and launch statistics
  dim3 grid, block;
  size_t dynamic_shared_bytes;
  const void* function;        // identity of the kernel (for the shared-memory opt-in)
  std::function<void()> body;
};
// Runs the whole grid; errors are recorded for cudaGetLastError().
void launch(const LaunchRequest& request);

// Blocks until every thread of the block arrives (the call site names the
// barrier in error messages).
void sync_block(const char* file, int line);
// Blocks until every lane of `mask` (in the caller's warp) arrives.
void sync_warp(unsigned mask, const char* file, int line);
// Lane exchange for shuffles and votes: publish 8 bytes, wait for the mask,
// read lane `src`'s bytes, wait again (so the slot is not overwritten early).
uint64_t exchange(unsigned mask, uint64_t mine, int src_lane, const char* file, int line);
// OR / AND over the lanes of `mask` of a 0/1 value.
unsigned ballot(unsigned mask, bool predicate, const char* file, int line);
// Every lane of the caller's (full) warp publishes `bytes` (<= 64) bytes;
// `all` receives the 32 lanes' bytes in lane order (tensor-core fragments).
void warp_all_gather(const void* mine, size_t bytes, void* all, const char* file, int line);
// cp.async: the copy is queued and happens when a cp.async.wait_group lets
// it complete, so data read before the wait shows the poison.
void cp_async(void* shared_dst, const void* global_src, size_t bytes, size_t src_bytes,
              const char* file, int line);
void cp_async_commit();
void cp_async_wait(int pending_groups);
void* dynamic_shared_memory();
// Records a failed device assertion and ends the launch (never returns).
[[noreturn]] void device_assert_failed(const char* condition, const char* file, int line);
// Ends the launch with an error (never returns).
[[noreturn]] void device_error(const char* what, const char* file, int line);

// -------------------------------------------------------- warp intrinsics
inline int lane_id() {
  const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  return static_cast<int>(linear % 32);
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// The source lane of each shuffle mode, as the PTX ISA defines shfl.sync
// (a lane outside its width-segment's bounds reads its own value).
inline int shuffle_source(int lane, int target, bool inside) { return inside ? target : lane; }

template <typename T>
T shfl_idx(unsigned mask, T v, int src, int width, const char* file, int line) {
  const int lane = lane_id(), seg = lane & ~(width - 1);
  return from_bits<T>(exchange(mask, to_bits(v), seg + (src & (width - 1)), file, line));
}

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask, int width, const char* file, int line) {
  const int lane = lane_id(), j = lane ^ lane_mask;
  const int max_lane = (lane & ~(width - 1)) | (width - 1);
  return from_bits<T>(exchange(mask, to_bits(v), shuffle_source(lane, j, j <= max_lane), file, line));
}

template <typename T>
T shfl_down(unsigned mask, T v, unsigned delta, int width, const char* file, int line) {
  const int lane = lane_id(), j = lane + static_cast<int>(delta);
  const int max_lane = (lane & ~(width - 1)) | (width - 1);
  return from_bits<T>(exchange(mask, to_bits(v), shuffle_source(lane, j, j <= max_lane), file, line));
}

template <typename T>
T shfl_up(unsigned mask, T v, unsigned delta, int width, const char* file, int line) {
  const int lane = lane_id(), j = lane - static_cast<int>(delta);
  const int min_lane = lane & ~(width - 1);
  return from_bits<T>(exchange(mask, to_bits(v), shuffle_source(lane, j, j >= min_lane), file, line));
}

// --------------------------------------------------------------- atomics
// Fibers of one launch never run at the same time, but atomic_ref keeps the
// accesses atomic for ThreadSanitizer and for any future parallel scheduler.
template <typename T>
T atomic_add(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (!ref.compare_exchange_weak(old, static_cast<T>(old + value))) {
  }
  return old;
}

}  // namespace cuda_emulation
}  // namespace handgrad

#define __syncthreads() ::handgrad::cuda_emulation::sync_block(__FILE__, __LINE__)
#define __syncwarp(...) ::handgrad::cuda_emulation::sync_warp(HG_EMU_MASK_OR_ALL(__VA_ARGS__), __FILE__, __LINE__)
#define HG_EMU_MASK_OR_ALL(...) (0xffffffffu __VA_OPT__(& (__VA_ARGS__)))

#define HG_EMU_WIDTH(...) (32 __VA_OPT__(* 0 + (__VA_ARGS__)))
#define __shfl_sync(mask, var, src, ...) \
  ::handgrad::cuda_emulation::shfl_idx(mask, var, src, HG_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, var, lane_mask, ...) \
  ::handgrad::cuda_emulation::shfl_xor(mask, var, lane_mask, HG_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, var, delta, ...) \
  ::handgrad::cuda_emulation::shfl_down(mask, var, delta, HG_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, var, delta, ...) \
  ::handgrad::cuda_emulation::shfl_up(mask, var, delta, HG_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __ballot_sync(mask, pred) \
  ::handgrad::cuda_emulation::ballot(mask, (pred) != 0, __FILE__, __LINE__)
#define __any_sync(mask, pred) (__ballot_sync(mask, pred) != 0u)
#define __all_sync(mask, pred) (__ballot_sync(mask, pred) == (mask))

template <typename T>
inline T atomicAdd(T* address, T value) {
  return ::handgrad::cuda_emulation::atomic_add(address, value);
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Fast-math intrinsics: the emulation computes them exactly (the device's
// approximations are within a few ulp; tests compare at float tolerances).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
