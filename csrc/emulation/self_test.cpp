// Kernels that test the CUDA emulator itself (tests/test_cuda_emulation.py):
// shuffle and vote semantics against the PTX ISA's definitions, and the
// errors it must report instead of returning a result -- a missing or
// divergent barrier, a deadlock, a lane mask naming exited or absent lanes,
// a write past the dynamic shared memory, a failed device-side assert, a
// launch over the limits. Written in CUDA C++ like the op kernels and
// launched through cuda::launch like them.
#include "emulation/kernel_unit.h"

#include "common/cuda_launch.cuh"
#include "common/tensor_core.cuh"
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

// ---- tensor-core primitives (tests/test_tensor_core.py)

namespace tc = ::handgrad::cuda::tc;
using tc::FragA;
using tc::FragB;
using tc::FragC;
using tc::Input;

template <Input In>
uint16_t bits16(float v) {
  if constexpr (In == Input::kHalf) return c10::Half(v).x;
  return c10::BFloat16(v).x;
}

// D = A B + C for one m16n8k16 tile, the fragments loaded by the layout
// formulas of the PTX ISA (A 16x16 and C 16x8 row-major, B 16x8 row-major).
template <Input In>
__global__ void mma_by_layout_kernel(const float* A, const float* B, const float* C, float* D) {
  const int lane = threadIdx.x, g = lane / 4, q = lane % 4;
  FragA a;
  FragB b;
  FragC c, d;
  for (int r = 0; r < 4; ++r) {
    uint32_t pair = 0;
    for (int h = 0; h < 2; ++h) {
      const int i = 2 * r + h;
      const int row = (i == 2 || i == 3 || i == 6 || i == 7) ? g + 8 : g;
      const int col = 2 * q + h + (i >= 4 ? 8 : 0);
      pair |= static_cast<uint32_t>(bits16<In>(A[row * 16 + col])) << (16 * h);
    }
    a.x[r] = pair;
  }
  for (int r = 0; r < 2; ++r) {
    uint32_t pair = 0;
    for (int h = 0; h < 2; ++h) {
      const int k = 2 * q + h + (r == 1 ? 8 : 0);
      pair |= static_cast<uint32_t>(bits16<In>(B[k * 8 + g])) << (16 * h);
    }
    b.x[r] = pair;
  }
  for (int i = 0; i < 4; ++i) c.x[i] = C[(i < 2 ? g : g + 8) * 8 + 2 * q + (i & 1)];
  tc::mma_16816<In>(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(i < 2 ? g : g + 8) * 8 + 2 * q + (i & 1)] = d.x[i];
}

// The same product with A and B staged in shared memory and loaded with
// ldmatrix (A by x4; B stored as rows of B^T by x2, or as rows of B by
// x2.trans), as real kernels do.
template <Input In>
__global__ void mma_by_ldmatrix_kernel(const float* A, const float* B, const float* C, float* D,
                                       bool b_transposed_load) {
  __shared__ __align__(16) uint16_t a_s[16][16];
  __shared__ __align__(16) uint16_t b_s[16][8];   // [k][n]
  __shared__ __align__(16) uint16_t bt_s[8][16];  // [n][k]
  const int lane = threadIdx.x, g = lane / 4, q = lane % 4;
  for (int e = lane; e < 256; e += 32) a_s[e / 16][e % 16] = bits16<In>(A[e]);
  for (int e = lane; e < 128; e += 32) {
    b_s[e / 8][e % 8] = bits16<In>(B[e]);
    bt_s[e % 8][e / 8] = bits16<In>(B[e]);
  }
  __syncwarp();
  FragA a;
  FragB b;
  FragC c, d;
  uint32_t ra[4];
  tc::ldmatrix<4>(ra, &a_s[lane % 16][(lane / 16) * 8]);
  for (int i = 0; i < 4; ++i) a.x[i] = ra[i];
  uint32_t rb[2];
  if (b_transposed_load) {
    tc::ldmatrix<2, true>(rb, &b_s[lane % 16][0]);
  } else {
    tc::ldmatrix<2>(rb, &bt_s[lane % 8][((lane / 8) % 2) * 8]);
  }
  b.x[0] = rb[0];
  b.x[1] = rb[1];
  for (int i = 0; i < 4; ++i) c.x[i] = C[(i < 2 ? g : g + 8) * 8 + 2 * q + (i & 1)];
  tc::mma_16816<In>(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(i < 2 ? g : g + 8) * 8 + 2 * q + (i & 1)] = d.x[i];
}

// D = A B + C for one m16n8k8 tf32 tile (A 16x8, B 8x8, C 16x8, row-major),
// operands rounded with cvt.rna.tf32.
__global__ void mma_tf32_kernel(const float* A, const float* B, const float* C, float* D) {
  const int lane = threadIdx.x, g = lane / 4, q = lane % 4;
  FragA a;
  FragB b;
  FragC c, d;
  for (int i = 0; i < 4; ++i) a.x[i] = tc::to_tf32(A[(g + 8 * (i & 1)) * 8 + q + 4 * (i >= 2)]);
  for (int i = 0; i < 2; ++i) b.x[i] = tc::to_tf32(B[(q + 4 * i) * 8 + g]);
  for (int i = 0; i < 4; ++i) c.x[i] = C[(i < 2 ? g : g + 8) * 8 + 2 * q + (i & 1)];
  tc::mma_1688_tf32(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(i < 2 ? g : g + 8) * 8 + 2 * q + (i & 1)] = d.x[i];
}

// Each thread copies 16 bytes (4 floats) per group, two groups; out gets
// what thread t sees of both chunks after wait_group<1> and after <0>.
// With `zero_fill`, the second group's copies bring only 8 bytes.
__global__ void cp_async_kernel(const float* src, float* out, bool zero_fill) {
  __shared__ __align__(16) float s[2][32][4];
  const int t = threadIdx.x;
  tc::cp_async_16(&s[0][t][0], src + 4 * t);
  tc::cp_async_commit();
  tc::cp_async_16(&s[1][t][0], src + 128 + 4 * t, zero_fill ? 8 : 16);
  tc::cp_async_commit();
  tc::cp_async_wait<1>();
  for (int j = 0; j < 4; ++j) out[t * 16 + j] = s[0][t][j];
  for (int j = 0; j < 4; ++j) out[t * 16 + 4 + j] = s[1][t][j];
  tc::cp_async_wait<0>();
  for (int j = 0; j < 4; ++j) out[t * 16 + 8 + j] = s[0][t][j];
  for (int j = 0; j < 4; ++j) out[t * 16 + 12 + j] = s[1][t][j];
}

__global__ void cp_async_misaligned_kernel(const float* src) {
  __shared__ __align__(16) float s[8];
  tc::cp_async_16(&s[1], src);
}

float tf32_rounded(float x) {
  const uint32_t bits = tc::to_tf32(x);
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

std::vector<double> as_doubles(const std::vector<int>& v) { return {v.begin(), v.end()}; }

}  // namespace

std::vector<double> run_self_test(const std::string& name, const std::vector<int64_t>& a,
                                  const std::vector<double>& values) {
  auto arg = [&a](size_t i) { return i < a.size() ? a[i] : 0; };
  cudaStream_t stream = nullptr;
  const std::vector<float> in(values.begin(), values.end());
  if (name == "mma_f16" || name == "mma_bf16") {  // values: A (256), B (128), C (128); arg: load
    TORCH_CHECK(in.size() == 512, "mma test: expected 512 values");
    std::vector<float> d(128);
    const float *A = in.data(), *B = A + 256, *C = B + 128;
    const bool half = name == "mma_f16";
    if (arg(0) == 0) {
      if (half) cuda::launch<mma_by_layout_kernel<Input::kHalf>>(1, 32, 0, stream, A, B, C, d.data());
      else cuda::launch<mma_by_layout_kernel<Input::kBFloat16>>(1, 32, 0, stream, A, B, C, d.data());
    } else {
      const bool trans = arg(0) == 2;
      if (half) cuda::launch<mma_by_ldmatrix_kernel<Input::kHalf>>(1, 32, 0, stream, A, B, C, d.data(), trans);
      else cuda::launch<mma_by_ldmatrix_kernel<Input::kBFloat16>>(1, 32, 0, stream, A, B, C, d.data(), trans);
    }
    return {d.begin(), d.end()};
  }
  if (name == "mma_tf32") {  // values: A (128), B (64), C (128)
    TORCH_CHECK(in.size() == 320, "mma_tf32 test: expected 320 values");
    std::vector<float> d(128);
    cuda::launch<mma_tf32_kernel>(1, 32, 0, stream, in.data(), in.data() + 128, in.data() + 192,
                                  d.data());
    return {d.begin(), d.end()};
  }
  if (name == "to_tf32") {
    std::vector<double> out;
    for (float v : in) out.push_back(tf32_rounded(v));
    return out;
  }
  if (name == "cp_async") {  // values: 256 floats; arg: zero_fill
    TORCH_CHECK(in.size() == 256, "cp_async test: expected 256 values");
    std::vector<float> out(32 * 16);
    cuda::launch<cp_async_kernel>(1, 32, 0, stream, in.data(), out.data(), arg(0) != 0);
    return {out.begin(), out.end()};
  }
  if (name == "cp_async_misaligned") {
    std::vector<float> src(8);
    cuda::launch<cp_async_misaligned_kernel>(1, 1, 0, stream, src.data());
    return {};
  }
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
