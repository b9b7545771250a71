// The CUDA emulator's scheduler: fibers for threads, barriers, shuffles,
// launch checks and the emulated runtime API (see cuda_emulation.h).
//
// Why fibers and not one OS thread per CUDA thread: a block of 256 threads
// would cost 256 thread creations and, at every barrier, 256 futex wake-ups
// on a 2-core machine; a fiber switch is a few register moves, so the whole
// CUDA test suite runs through the emulator in about a minute. Results stay
// deterministic (a fixed schedule per block) and every wait is checked.
//
// This file is compiled without sanitizer instrumentation even in the
// ThreadSanitizer build: the scheduler's own bookkeeping is shared by all
// fibers by design; it tells TSan about fibers and barriers through the
// annotation API instead (weak symbols, live only when libtsan is loaded).
#include "emulation/cuda_emulation.h"
#include "emulation/registry.h"

#include <cuda_runtime_api.h>

#include <c10/util/Exception.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <exception>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

thread_local uint3 threadIdx{0, 0, 0};
thread_local uint3 blockIdx{0, 0, 0};
thread_local dim3 blockDim{1, 1, 1};
thread_local dim3 gridDim{1, 1, 1};

// Sanitizer interfaces: null unless libtsan / libasan is in the process.
extern "C" {
void* __tsan_get_current_fiber() __attribute__((weak));
void* __tsan_create_fiber(unsigned flags) __attribute__((weak));
void __tsan_destroy_fiber(void* fiber) __attribute__((weak));
void __tsan_switch_to_fiber(void* fiber, unsigned flags) __attribute__((weak));
void __tsan_acquire(void* addr) __attribute__((weak));
void __tsan_release(void* addr) __attribute__((weak));
void AnnotateNewMemory(const char* file, int line, const volatile void* mem, size_t size)
    __attribute__((weak));
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size)
    __attribute__((weak));
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                     size_t* size_old) __attribute__((weak));
// Bounds of the section holding every kernel's static __shared__ variables.
extern char __start_hg_emu_shared[] __attribute__((weak));
extern char __stop_hg_emu_shared[] __attribute__((weak));
}

#if defined(__x86_64__)
// Saves the callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer in *save and continues on `load`.
// A new fiber's stack is prepared so that the final `ret` lands in the
// trampoline, which calls r13(r12).
extern "C" void hg_emu_switch_context(void** save, void* load);
extern "C" void hg_emu_fiber_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl hg_emu_switch_context
  .hidden hg_emu_switch_context
  .type hg_emu_switch_context,@function
hg_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size hg_emu_switch_context,.-hg_emu_switch_context

  .p2align 4
  .globl hg_emu_fiber_trampoline
  .hidden hg_emu_fiber_trampoline
  .type hg_emu_fiber_trampoline,@function
hg_emu_fiber_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size hg_emu_fiber_trampoline,.-hg_emu_fiber_trampoline
)");
#else
#include <ucontext.h>
#endif

namespace handgrad {
namespace cuda_emulation {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSharedGuardBytes = 64;
constexpr unsigned char kPoison = 0xFF;  // NaN in every floating type, -1 in integers

// sm_90 (H100) answers to cudaDeviceGetAttribute.
constexpr int kSharedPerBlock = 48 * 1024;
constexpr int kSharedPerBlockOptin = 232448;

enum class Wait : unsigned char { kRunnable, kBlockBarrier, kWarpSync, kDone };

// One queued cp.async copy.
struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes, src_bytes;
};

struct EmuThread {
  uint3 idx;
  Wait wait = Wait::kRunnable;
  std::vector<std::vector<AsyncCopy>> committed;  // cp.async groups, oldest first
  std::vector<AsyncCopy> open_group;
  const char* file = nullptr;  // where it waits
  int line = 0;
  unsigned mask = 0;           // lanes a warp sync waits for
  void* tsan_fiber = nullptr;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
};

// Fiber stacks, kept for the whole process (mapped lazily, a guard page at
// the bottom turns an overflow into a fault instead of silent corruption).
class StackPool {
 public:
  char* get(size_t i) {
    while (stacks_.size() <= i) {
      void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      TORCH_CHECK(p != MAP_FAILED, "CUDA emulation: cannot map a fiber stack");
      mprotect(p, static_cast<size_t>(sysconf(_SC_PAGESIZE)), PROT_NONE);
      stacks_.push_back(static_cast<char*>(p));
    }
    return stacks_[i];
  }

 private:
  std::vector<char*> stacks_;
};

struct KernelStats {
  int64_t launches = 0, blocks = 0, threads = 0;
};

// Everything about the launch in progress (one at a time per process: the
// static __shared__ variables exist once).
struct Runner {
  const LaunchRequest* request = nullptr;
  std::vector<EmuThread> threads;
  std::vector<std::array<uint64_t, 32>> slots;  // per warp, for shuffles and votes
  std::vector<std::array<unsigned char, 32 * 64>> gather;  // per warp, for fragments
  std::vector<unsigned char> dynamic_shared;
  EmuThread* current = nullptr;
  int thread_count = 0;
  bool failed = false;
  cudaError_t error = cudaSuccess;
  std::string message;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_context;
#endif
  void* scheduler_tsan_fiber = nullptr;
  const void* scheduler_stack_bottom = nullptr;  // ASan's view of the host stack
  size_t scheduler_stack_size = 0;
  char launch_token = 0;   // happens-before: host -> threads
  char retire_token = 0;   // happens-before: threads -> host (block end, launch end)
  char block_token = 0;    // __syncthreads
  std::array<char, 32> warp_tokens{};
};

std::mutex g_launch_mutex;
Runner* g_runner = nullptr;
StackPool g_stacks;
std::mutex g_state_mutex;
std::map<const void*, int> g_shared_optin;
std::map<std::string, KernelStats> g_stats;
thread_local cudaError_t g_last_error = cudaSuccess;
thread_local std::string g_last_details;

bool tsan_active() { return __tsan_switch_to_fiber != nullptr; }

std::string coords(uint3 v) {
  std::ostringstream s;
  s << "(" << v.x << ", " << v.y << ", " << v.z << ")";
  return s.str();
}

int linear_of(uint3 idx, dim3 block) {
  return static_cast<int>(idx.x + block.x * (idx.y + block.y * idx.z));
}

// ------------------------------------------------------------ switching

void switch_to_scheduler(Runner& r) {
  EmuThread& t = *r.current;
  void* fake_stack = nullptr;
  // Whatever a thread did so far happens before the host's next step once
  // its block retires, also for threads a failing launch never resumes.
  // Threads never acquire this token, so it adds no edge between them.
  if (__tsan_release) __tsan_release(&r.retire_token);
  if (__tsan_switch_to_fiber) __tsan_switch_to_fiber(r.scheduler_tsan_fiber, 1);
  if (__sanitizer_start_switch_fiber) {
    __sanitizer_start_switch_fiber(t.wait == Wait::kDone ? nullptr : &fake_stack,
                                   r.scheduler_stack_bottom, r.scheduler_stack_size);
  }
#if defined(__x86_64__)
  hg_emu_switch_context(&t.sp, r.scheduler_sp);
#else
  swapcontext(&t.context, &r.scheduler_context);
#endif
  if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
}

void resume(Runner& r, EmuThread& t, size_t stack_index) {
  r.current = &t;
  threadIdx = t.idx;
  void* fake_stack = nullptr;
  if (__sanitizer_start_switch_fiber) {
    __sanitizer_start_switch_fiber(&fake_stack, g_stacks.get(stack_index), kStackBytes);
  }
  if (__tsan_switch_to_fiber) __tsan_switch_to_fiber(t.tsan_fiber, 1);
#if defined(__x86_64__)
  hg_emu_switch_context(&r.scheduler_sp, t.sp);
#else
  swapcontext(&r.scheduler_context, &t.context);
#endif
  if (__sanitizer_finish_switch_fiber) {
    __sanitizer_finish_switch_fiber(fake_stack, &r.scheduler_stack_bottom,
                                    &r.scheduler_stack_size);
  }
}

// Ends the current thread's part in the launch: it never runs again.
[[noreturn]] void finish_thread(Runner& r) {
  r.current->wait = Wait::kDone;
  switch_to_scheduler(r);
  __builtin_trap();  // a finished fiber is never resumed
}

void fail(Runner& r, cudaError_t error, const std::string& message) {
  if (r.failed) return;
  r.failed = true;
  r.error = error;
  r.message = message;
}

// Records an error of the running thread and leaves the launch.
[[noreturn]] void fail_current(const std::string& what, const char* file, int line,
                               cudaError_t error = cudaErrorLaunchFailure) {
  Runner& r = *g_runner;
  std::ostringstream s;
  s << what << " at " << file << ":" << line << " (block " << coords(blockIdx) << ", thread "
    << coords(r.current->idx) << ")";
  fail(r, error, s.str());
  finish_thread(r);
}

void fiber_main(void*) {
  Runner& r = *g_runner;
  if (__sanitizer_finish_switch_fiber) {
    __sanitizer_finish_switch_fiber(nullptr, &r.scheduler_stack_bottom, &r.scheduler_stack_size);
  }
  if (__tsan_acquire) __tsan_acquire(&r.launch_token);
  try {
    r.request->body();
  } catch (const std::exception& e) {
    fail(r, cudaErrorLaunchFailure, std::string("device code threw: ") + e.what());
  } catch (...) {
    fail(r, cudaErrorLaunchFailure, "device code threw an exception");
  }
  finish_thread(r);
}

#if !defined(__x86_64__)
void fiber_entry() { fiber_main(nullptr); }
#endif

void start_fiber(EmuThread& t, char* stack) {
#if defined(__x86_64__)
  // Frame popped by hg_emu_switch_context: x87 CW and MXCSR, r15, r14, r13
  // (entry), r12 (argument), rbx, rbp, return address (the trampoline).
  // After the `ret` the stack is 16-byte aligned, as a call site needs.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~uintptr_t(15);
  uint64_t* frame = reinterpret_cast<uint64_t*>(top - 88);
  uint32_t mxcsr;
  uint16_t fpu_cw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_cw));
  frame[0] = fpu_cw;
  frame[1] = mxcsr;
  frame[2] = 0;                                            // r15
  frame[3] = 0;                                            // r14
  frame[4] = reinterpret_cast<uint64_t>(&fiber_main);     // r13
  frame[5] = 0;                                            // r12
  frame[6] = 0;                                            // rbx
  frame[7] = 0;                                            // rbp
  frame[8] = reinterpret_cast<uint64_t>(&hg_emu_fiber_trampoline);
  t.sp = frame;
#else
  getcontext(&t.context);
  t.context.uc_stack.ss_sp = stack + sysconf(_SC_PAGESIZE);
  t.context.uc_stack.ss_size = kStackBytes - sysconf(_SC_PAGESIZE);
  t.context.uc_link = nullptr;
  makecontext(&t.context, &fiber_entry, 0);
#endif
}

// ------------------------------------------------------------- barriers

std::string describe_wait(const EmuThread& t) {
  std::ostringstream s;
  s << "thread " << coords(t.idx);
  if (t.wait == Wait::kBlockBarrier) s << " waits at __syncthreads " << t.file << ":" << t.line;
  if (t.wait == Wait::kWarpSync) {
    s << " waits at a warp operation " << t.file << ":" << t.line << " (mask 0x" << std::hex
      << t.mask << std::dec << ")";
  }
  return s.str();
}

// Lanes of warp w that exist in this block (the last warp may be partial).
unsigned existing_lanes(const Runner& r, int warp) {
  const int n = std::min(32, r.thread_count - warp * 32);
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

// Releases the warps and the block barrier that every thread they wait
// for has reached; reports inconsistent waits. Returns whether any thread
// became runnable.
bool release_barriers(Runner& r, int done) {
  bool released = false;
  const int warps = (r.thread_count + 31) / 32;
  for (int w = 0; w < warps; ++w) {
    unsigned waiting = 0, exited = 0;
    for (int l = 0; l < 32 && w * 32 + l < r.thread_count; ++l) {
      const EmuThread& t = r.threads[w * 32 + l];
      if (t.wait == Wait::kWarpSync) waiting |= 1u << l;
      if (t.wait == Wait::kDone) exited |= 1u << l;
    }
    unsigned ready = 0;
    for (int l = 0; l < 32; ++l) {
      if (!(waiting >> l & 1u)) continue;
      const EmuThread& t = r.threads[w * 32 + l];
      if (t.mask & exited) {
        fail(r, cudaErrorLaunchFailure,
             describe_wait(t) + ", but its mask names lanes that have exited");
        return false;
      }
      bool all_there = (t.mask & waiting) == t.mask;
      for (int o = 0; all_there && o < 32; ++o) {
        if (!(t.mask >> o & 1u)) continue;
        const EmuThread& other = r.threads[w * 32 + o];
        if (other.mask != t.mask) {
          fail(r, cudaErrorLaunchFailure,
               describe_wait(t) + " while " + describe_wait(other) +
                   ": the lanes of one warp operation must pass the same mask");
          return false;
        }
      }
      if (all_there) ready |= 1u << l;
    }
    for (int l = 0; l < 32; ++l) {
      if (ready >> l & 1u) r.threads[w * 32 + l].wait = Wait::kRunnable;
    }
    released = released || ready != 0;
  }

  int at_barrier = 0;
  const EmuThread* first = nullptr;
  for (const EmuThread& t : r.threads) {
    if (t.wait != Wait::kBlockBarrier) continue;
    ++at_barrier;
    if (first == nullptr) {
      first = &t;
    } else if (t.file != first->file || t.line != first->line) {
      fail(r, cudaErrorLaunchFailure,
           "divergent __syncthreads: " + describe_wait(*first) + " while " + describe_wait(t));
      return false;
    }
  }
  if (at_barrier > 0 && at_barrier + done == r.thread_count) {
    for (EmuThread& t : r.threads) {
      if (t.wait == Wait::kBlockBarrier) t.wait = Wait::kRunnable;
    }
    released = true;
  }
  return released;
}

void report_deadlock(Runner& r) {
  std::ostringstream s;
  s << "deadlock in block " << coords(blockIdx) << ": ";
  int shown = 0;
  const EmuThread* previous = nullptr;
  for (const EmuThread& t : r.threads) {
    if (t.wait == Wait::kDone) continue;
    if (previous && previous->wait == t.wait && previous->file == t.file &&
        previous->line == t.line && previous->mask == t.mask) {
      continue;  // one line per group of threads waiting at the same place
    }
    if (shown++ == 6) {
      s << "; ...";
      break;
    }
    s << (shown > 1 ? "; " : "") << describe_wait(t);
    previous = &t;
  }
  fail(r, cudaErrorLaunchFailure, s.str());
}

void poison_shared(Runner& r) {
  if (__start_hg_emu_shared != nullptr && __stop_hg_emu_shared != nullptr) {
    const size_t bytes = static_cast<size_t>(__stop_hg_emu_shared - __start_hg_emu_shared);
    std::memset(__start_hg_emu_shared, kPoison, bytes);
    if (AnnotateNewMemory) AnnotateNewMemory(__FILE__, __LINE__, __start_hg_emu_shared, bytes);
  }
  std::fill(r.dynamic_shared.begin(), r.dynamic_shared.end(), kPoison);
  if (AnnotateNewMemory && !r.dynamic_shared.empty()) {
    AnnotateNewMemory(__FILE__, __LINE__, r.dynamic_shared.data(), r.dynamic_shared.size());
  }
}

bool shared_guard_intact(const Runner& r) {
  const size_t bytes = r.request->dynamic_shared_bytes;
  for (size_t i = bytes; i < r.dynamic_shared.size(); ++i) {
    if (r.dynamic_shared[i] != kPoison) return false;
  }
  return true;
}

void run_block(Runner& r, uint3 block, bool reverse) {
  blockIdx = block;
  poison_shared(r);
  if (__tsan_release) __tsan_release(&r.launch_token);  // the host's setup of this block
  const dim3 dims = r.request->block;
  const int n = r.thread_count;
  for (int i = 0; i < n; ++i) {
    EmuThread& t = r.threads[i];
    t = EmuThread();
    t.idx = uint3{static_cast<unsigned>(i % dims.x), static_cast<unsigned>(i / dims.x % dims.y),
                  static_cast<unsigned>(i / (dims.x * dims.y))};
    start_fiber(t, g_stacks.get(i));
    if (tsan_active()) t.tsan_fiber = __tsan_create_fiber(0);
  }
  int done = 0;
  while (done < n && !r.failed) {
    bool ran = false;
    for (int k = 0; k < n && !r.failed; ++k) {
      const int i = reverse ? n - 1 - k : k;
      EmuThread& t = r.threads[i];
      if (t.wait != Wait::kRunnable) continue;
      resume(r, t, static_cast<size_t>(i));
      ran = true;
      if (t.wait == Wait::kDone) ++done;
    }
    if (r.failed || done == n) break;
    const bool released = release_barriers(r, done);
    if (!r.failed && !ran && !released) report_deadlock(r);
  }
  if (tsan_active()) {
    // The block retires: its threads' writes (to shared memory too, which
    // the next block's poisoning overwrites) happen before what follows.
    __tsan_acquire(&r.retire_token);
    for (EmuThread& t : r.threads) __tsan_destroy_fiber(t.tsan_fiber);
  }
  if (!r.failed && !shared_guard_intact(r)) {
    fail(r, cudaErrorLaunchFailure,
         "block " + coords(block) + " wrote past the end of its " +
             std::to_string(r.request->dynamic_shared_bytes) + " bytes of dynamic shared memory");
  }
}

std::string check_configuration(const LaunchRequest& q) {
  std::ostringstream s;
  const uint64_t threads = uint64_t(q.block.x) * q.block.y * q.block.z;
  if (q.grid.x == 0 || q.grid.y == 0 || q.grid.z == 0 || q.grid.y > 65535 || q.grid.z > 65535 ||
      q.grid.x > 2147483647u) {
    s << "invalid grid " << q.grid.x << " x " << q.grid.y << " x " << q.grid.z;
  } else if (threads == 0 || threads > 1024 || q.block.z > 64) {
    s << "invalid block " << q.block.x << " x " << q.block.y << " x " << q.block.z;
  } else if (q.dynamic_shared_bytes > static_cast<size_t>(kSharedPerBlock)) {
    std::lock_guard<std::mutex> lock(g_state_mutex);
    const auto it = g_shared_optin.find(q.function);
    const size_t allowed = it == g_shared_optin.end() ? kSharedPerBlock : it->second;
    if (q.dynamic_shared_bytes > allowed) {
      s << q.dynamic_shared_bytes << " bytes of dynamic shared memory without the opt-in "
        << "(cudaFuncSetAttribute(MaxDynamicSharedMemorySize) allows " << allowed << ")";
    }
  }
  return s.str();
}

}  // namespace

// ------------------------------------------------------------ public API

void launch(const LaunchRequest& request) {
  std::lock_guard<std::mutex> serial(g_launch_mutex);
  g_last_error = cudaSuccess;
  g_last_details.clear();
  const std::string bad = check_configuration(request);
  if (!bad.empty()) {
    g_last_error = cudaErrorInvalidConfiguration;
    g_last_details = std::string(request.kernel) + ": " + bad;
    return;
  }
  Runner r;
  r.request = &request;
  r.thread_count = static_cast<int>(request.block.x * request.block.y * request.block.z);
  r.threads.resize(r.thread_count);
  r.slots.resize((r.thread_count + 31) / 32);
  r.gather.resize((r.thread_count + 31) / 32);
  r.dynamic_shared.assign(request.dynamic_shared_bytes + kSharedGuardBytes, kPoison);
  if (tsan_active()) r.scheduler_tsan_fiber = __tsan_get_current_fiber();
  {
    std::lock_guard<std::mutex> lock(g_state_mutex);
    KernelStats& stats = g_stats[request.kernel];
    stats.launches += 1;
    stats.blocks += int64_t(request.grid.x) * request.grid.y * request.grid.z;
    stats.threads += int64_t(request.grid.x) * request.grid.y * request.grid.z * r.thread_count;
  }
  const uint3 saved_thread = threadIdx, saved_block = blockIdx;
  const dim3 saved_block_dim = blockDim, saved_grid_dim = gridDim;
  g_runner = &r;
  blockDim = request.block;
  gridDim = request.grid;
  if (__tsan_release) __tsan_release(&r.launch_token);
  uint64_t block_number = 0;
  for (unsigned z = 0; z < request.grid.z && !r.failed; ++z) {
    for (unsigned y = 0; y < request.grid.y && !r.failed; ++y) {
      for (unsigned x = 0; x < request.grid.x && !r.failed; ++x) {
        run_block(r, uint3{x, y, z}, block_number++ % 2 == 1);
      }
    }
  }
  if (__tsan_acquire) __tsan_acquire(&r.retire_token);
  g_runner = nullptr;
  threadIdx = saved_thread;
  blockIdx = saved_block;
  blockDim = saved_block_dim;
  gridDim = saved_grid_dim;
  if (r.failed) {
    g_last_error = r.error;
    g_last_details = std::string(request.kernel) + ": " + r.message;
  }
}

void sync_block(const char* file, int line) {
  Runner& r = *g_runner;
  EmuThread& t = *r.current;
  t.wait = Wait::kBlockBarrier;
  t.file = file;
  t.line = line;
  if (__tsan_release) __tsan_release(&r.block_token);
  switch_to_scheduler(r);
  if (__tsan_acquire) __tsan_acquire(&r.block_token);
}

void sync_warp(unsigned mask, const char* file, int line) {
  Runner& r = *g_runner;
  EmuThread& t = *r.current;
  const int linear = linear_of(t.idx, blockDim);
  const int warp = linear / 32, lane = linear % 32;
  if (!(mask >> lane & 1u)) {
    fail_current("a warp operation whose mask does not include the calling lane", file, line);
  }
  if (mask & ~existing_lanes(r, warp)) {
    std::ostringstream s;
    s << "a warp operation with mask 0x" << std::hex << mask << std::dec
      << " names lanes that do not exist (the block has " << r.thread_count
      << " threads; its last warp is partial)";
    fail_current(s.str(), file, line);
  }
  t.wait = Wait::kWarpSync;
  t.file = file;
  t.line = line;
  t.mask = mask;
  if (__tsan_release) __tsan_release(&r.warp_tokens[warp]);
  switch_to_scheduler(r);
  if (__tsan_acquire) __tsan_acquire(&r.warp_tokens[warp]);
}

uint64_t exchange(unsigned mask, uint64_t mine, int src_lane, const char* file, int line) {
  Runner& r = *g_runner;
  const int linear = linear_of(r.current->idx, blockDim);
  const int warp = linear / 32, lane = linear % 32;
  if (src_lane < 0 || src_lane > 31 || !(mask >> src_lane & 1u)) {
    std::ostringstream s;
    s << "a shuffle by lane " << lane << " reads lane " << src_lane << ", outside its mask 0x"
      << std::hex << mask;
    fail_current(s.str(), file, line);
  }
  r.slots[warp][lane] = mine;
  sync_warp(mask, file, line);
  const uint64_t value = r.slots[warp][src_lane];
  sync_warp(mask, file, line);
  return value;
}

unsigned ballot(unsigned mask, bool predicate, const char* file, int line) {
  Runner& r = *g_runner;
  const int linear = linear_of(r.current->idx, blockDim);
  const int warp = linear / 32, lane = linear % 32;
  r.slots[warp][lane] = predicate ? 1u : 0u;
  sync_warp(mask, file, line);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) && r.slots[warp][l] != 0) bits |= 1u << l;
  }
  sync_warp(mask, file, line);
  return bits;
}

void warp_all_gather(const void* mine, size_t bytes, void* all, const char* file, int line) {
  Runner& r = *g_runner;
  const int linear = linear_of(r.current->idx, blockDim);
  const int warp = linear / 32, lane = linear % 32;
  if (bytes > 64) fail_current("warp_all_gather of more than 64 bytes per lane", file, line);
  std::memcpy(r.gather[warp].data() + lane * 64, mine, bytes);
  sync_warp(0xffffffffu, file, line);
  for (int l = 0; l < 32; ++l) {
    std::memcpy(static_cast<unsigned char*>(all) + l * bytes, r.gather[warp].data() + l * 64, bytes);
  }
  sync_warp(0xffffffffu, file, line);
}

namespace {

bool in_shared_memory(const Runner& r, const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  const unsigned char* dyn = r.dynamic_shared.data();
  if (c >= dyn && c + bytes <= dyn + r.request->dynamic_shared_bytes) return true;
  const auto* lo = reinterpret_cast<const unsigned char*>(__start_hg_emu_shared);
  const auto* hi = reinterpret_cast<const unsigned char*>(__stop_hg_emu_shared);
  return lo != nullptr && c >= lo && c + bytes <= hi;
}

void run_copy(const AsyncCopy& c) {
  std::memcpy(c.dst, c.src, c.src_bytes);
  std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
}

}  // namespace

void cp_async(void* shared_dst, const void* global_src, size_t bytes, size_t src_bytes,
              const char* file, int line) {
  Runner& r = *g_runner;
  if (bytes != 4 && bytes != 8 && bytes != 16) {
    fail_current("cp.async copies 4, 8 or 16 bytes, not " + std::to_string(bytes), file, line);
  }
  if (src_bytes > bytes) fail_current("cp.async with a source size over the copy size", file, line);
  if (reinterpret_cast<uintptr_t>(shared_dst) % bytes != 0 ||
      (src_bytes > 0 && reinterpret_cast<uintptr_t>(global_src) % bytes != 0)) {
    fail_current("misaligned cp.async (addresses must be aligned to the copy size)", file, line);
  }
  if (!in_shared_memory(r, shared_dst, bytes)) {
    fail_current("cp.async to an address outside the block's shared memory", file, line);
  }
  r.current->open_group.push_back({shared_dst, global_src, bytes, src_bytes});
}

void cp_async_commit() {
  EmuThread& t = *g_runner->current;
  t.committed.push_back(std::move(t.open_group));
  t.open_group.clear();
}

void cp_async_wait(int pending_groups) {
  EmuThread& t = *g_runner->current;
  const size_t keep = static_cast<size_t>(std::max(pending_groups, 0));
  while (t.committed.size() > keep) {
    for (const AsyncCopy& c : t.committed.front()) run_copy(c);
    t.committed.erase(t.committed.begin());
  }
}

void* dynamic_shared_memory() { return g_runner->dynamic_shared.data(); }

void device_assert_failed(const char* condition, const char* file, int line) {
  fail_current(std::string("device-side assertion `") + condition + "` failed", file, line,
               cudaErrorAssert);
}

void device_error(const char* what, const char* file, int line) {
  fail_current(what, file, line);
}

const char* last_error_details() { return g_last_details.c_str(); }

// Launch counts per kernel since the process started (or the last reset).
std::map<std::string, std::array<int64_t, 3>> launch_statistics() {
  std::lock_guard<std::mutex> lock(g_state_mutex);
  std::map<std::string, std::array<int64_t, 3>> out;
  for (const auto& [name, s] : g_stats) out[name] = {s.launches, s.blocks, s.threads};
  return out;
}

void reset_launch_statistics() {
  std::lock_guard<std::mutex> lock(g_state_mutex);
  g_stats.clear();
}

}  // namespace cuda_emulation
}  // namespace handgrad

// ------------------------------------------------- emulated runtime API

using handgrad::cuda_emulation::g_last_error;

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; break;
    case cudaDevAttrMaxGridDimY:
    case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = handgrad::cuda_emulation::kSharedPerBlock; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = 132; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 233472; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = handgrad::cuda_emulation::kSharedPerBlockOptin;
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  namespace emu = handgrad::cuda_emulation;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > emu::kSharedPerBlockOptin) {
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(emu::g_state_mutex);
  emu::g_shared_optin[func] = value;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return g_last_error; }

cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
