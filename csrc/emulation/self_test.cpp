// Kernels that test the CUDA emulator itself (tests/test_cuda_emulation.py):
// shuffle and vote semantics against the PTX ISA's definitions, and the
// errors it must report instead of returning a result -- a missing or
// divergent barrier, a deadlock, a lane mask naming exited or absent lanes,
// a write past the dynamic shared memory, a failed device-side assert, a
// launch over the limits. Written in CUDA C++ like the op kernels and
// launched through cuda::launch like them.
#include "emulation/kernel_unit.h"

#include "common/cuda_launch.cuh"
#include "emulation/self_test.h"

#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace handgrad {
namespace cuda_emulation {
namespace {

enum Shuffle { kIdx, kXor, kDown, kUp };

// out[t] = the value lane t receives from a shuffle of (100 + t); -1 for
// lanes outside `mask` (they do not take part).
__global__ void shuffle_kernel(int mode, int arg, int width, unsigned mask, int* out) {
  const int t = threadIdx.x, lane = t % 32;
  if (!(mask >> lane & 1u)) {
    out[t] = -1;
    return;
  }
  const int v = 100 + t;
  int r = 0;
  if (mode == kIdx) r = __shfl_sync(mask, v, arg, width);
  if (mode == kXor) r = __shfl_xor_sync(mask, v, arg, width);
  if (mode == kDown) r = __shfl_down_sync(mask, v, static_cast<unsigned>(arg), width);
  if (mode == kUp) r = __shfl_up_sync(mask, v, static_cast<unsigned>(arg), width);
  out[t] = r;
}

// out[t] = ballot of (t % 3 == 0) over the warp, then any / all of (t < arg).
__global__ void vote_kernel(int arg, unsigned* out) {
  const int t = threadIdx.x;
  out[3 * t] = __ballot_sync(0xffffffffu, t % 3 == 0);
  out[3 * t + 1] = __any_sync(0xffffffffu, t < arg);
  out[3 * t + 2] = __all_sync(0xffffffffu, t < arg);
}

// Tree sum of 0 .. blockDim-1 in shared memory; with `skip_barrier` the
// first level reads its partner's slot without waiting for it.
__global__ void block_sum_kernel(bool skip_barrier, float* out) {
  __shared__ float partial[256];
  const int t = threadIdx.x;
  partial[t] = static_cast<float>(t);
  if (!skip_barrier) __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (t < half) partial[t] += partial[t + half];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = partial[0];
}

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

// Lane 0 waits for lane 1 in a warp sync while lane 1 waits at the block
// barrier for lane 0.
__global__ void deadlock_kernel() {
  if (threadIdx.x == 0) __syncwarp(0x3u);
  if (threadIdx.x == 1) __syncthreads();
}

__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 1) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
}

__global__ void partial_warp_full_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void shared_overrun_kernel(int bytes) {
  HG_DYNAMIC_SHARED(unsigned char, smem);
  if (threadIdx.x == 0) smem[bytes] = 0;  // one byte past the end
}

__global__ void assert_kernel(int value) { CUDA_KERNEL_ASSERT(value < 3); }

// Every thread of every block adds its global index.
__global__ void atomic_sum_kernel(double* total) {
  atomicAdd(total, static_cast<double>(blockIdx.x * blockDim.x + threadIdx.x));
}

// Reads an uninitialised shared value: the poison must show (NaN).
__global__ void uninitialised_shared_kernel(float* out) {
  __shared__ float never_written[32];
  out[threadIdx.x] = never_written[threadIdx.x];
}

__global__ void big_shared_kernel(int bytes, int* out) {
  HG_DYNAMIC_SHARED(int, smem);
  const int n = bytes / 4;
  for (int i = threadIdx.x; i < n; i += blockDim.x) smem[i] = i;
  __syncthreads();
  int sum = 0;
  for (int i = 0; i < n; ++i) sum += smem[i] & 1;
  out[threadIdx.x] = sum;
}

__global__ void noop_kernel() {}

std::vector<double> as_doubles(const std::vector<int>& v) { return {v.begin(), v.end()}; }

}  // namespace

std::vector<double> run_self_test(const std::string& name, const std::vector<int64_t>& a) {
  auto arg = [&a](size_t i) { return i < a.size() ? a[i] : 0; };
  cudaStream_t stream = nullptr;
  if (name == "shuffle") {  // mode, arg, width, mask, threads
    std::vector<int> out(arg(4));
    cuda::launch<shuffle_kernel>(1, arg(4), 0, stream, static_cast<int>(arg(0)),
                                 static_cast<int>(arg(1)), static_cast<int>(arg(2)),
                                 static_cast<unsigned>(arg(3)), out.data());
    return as_doubles(out);
  }
  if (name == "vote") {
    std::vector<unsigned> out(3 * 64);
    cuda::launch<vote_kernel>(1, 64, 0, stream, static_cast<int>(arg(0)), out.data());
    return {out.begin(), out.end()};
  }
  if (name == "block_sum") {  // skip_barrier, blocks
    std::vector<float> out(arg(1));
    cuda::launch<block_sum_kernel>(arg(1), 256, 0, stream, arg(0) != 0, out.data());
    return {out.begin(), out.end()};
  }
  if (name == "divergent_barrier") {
    cuda::launch<divergent_barrier_kernel>(1, 64, 0, stream);
  } else if (name == "deadlock") {
    cuda::launch<deadlock_kernel>(1, 32, 0, stream);
  } else if (name == "exited_lane") {
    std::vector<int> out(32);
    cuda::launch<exited_lane_kernel>(1, 32, 0, stream, out.data());
  } else if (name == "partial_warp_full_mask") {
    std::vector<int> out(48);
    cuda::launch<partial_warp_full_mask_kernel>(1, 48, 0, stream, out.data());
  } else if (name == "shared_overrun") {
    cuda::launch<shared_overrun_kernel>(1, 32, static_cast<size_t>(arg(0)), stream,
                                        static_cast<int>(arg(0)));
  } else if (name == "assert") {
    cuda::launch<assert_kernel>(2, 32, 0, stream, static_cast<int>(arg(0)));
  } else if (name == "atomic_sum") {  // blocks, threads
    double total = 0;
    cuda::launch<atomic_sum_kernel>(arg(0), arg(1), 0, stream, &total);
    return {total};
  } else if (name == "uninitialised_shared") {
    std::vector<float> out(32);
    cuda::launch<uninitialised_shared_kernel>(1, 32, 0, stream, out.data());
    return {out.begin(), out.end()};
  } else if (name == "big_shared") {  // bytes
    std::vector<int> out(64);
    cuda::launch<big_shared_kernel>(1, 64, static_cast<size_t>(arg(0)), stream,
                                    static_cast<int>(arg(0)), out.data());
    return as_doubles(out);
  } else if (name == "launch") {  // grid x, y, z, block x, y, z
    cuda::launch<noop_kernel>(cuda::Dims(arg(0), arg(1), arg(2)), cuda::Dims(arg(3), arg(4), arg(5)),
                              0, stream);
  } else {
    TORCH_CHECK(false, "no emulator self-test named ", name);
  }
  return {};
}

}  // namespace cuda_emulation
}  // namespace handgrad
