// conv2d, CUDA kernels.
//
// Algorithm: implicit GEMM. Each pass is a matrix product C[m][n] = sum_k
// A[m][k] B[k][n] whose operands are never materialized: a tile loader maps
// (m, k) and (k, n) to tensor elements (zero in the padding) with the shared
// geometry helpers of ops/conv2d.h. One kernel template runs all three
// passes: 64x64 output tiles, 16-deep k steps staged in shared memory, 256
// threads each accumulating a 4x4 block in registers (rows/columns strided
// by 16 so shared-memory reads are conflict-free).
//   forward      m = output channel, n = (image, oh, ow), k = (ci, kh, kw);
//                A = W, B = input at the tap's position
//   grad_input   m = input channel, n = (image, ih, iw), k = (co, kh, kw);
//                A = W, B = dOut at the output position whose tap reads
//                (ih, iw) (zero between strides): the full correlation of
//                dOut with the flipped kernel. When a weight is inf or NaN
//                (a device-side flag set by a scan of the weights, read by
//                two launches of which one returns at once), the exact
//                kernel skips the absent B entries instead of multiplying
//                them, as native sums only the (output, tap) pairs that
//                read an input: W * 0 would be NaN
//   grad_weight  m = output channel, n = (ci, kh, kw), k = (image, oh, ow);
//                A = dOut, B = input at the tap's position. The long k range
//                is split over blocks into partial sums that a second kernel
//                adds in a fixed order (deterministic, no atomics)
//   grad_bias    one block per channel, a fixed-order tree reduction
// Forward and grad_weight multiply the padding's zeros, as native does (a
// NaN weight makes its whole output channel NaN). Groups are the grid's z
// dimension. float16/bfloat16 load into float
// accumulators (at::opmath_type); float64 accumulates in double. Saved for
// backward: input and weight only. Activations are addressed through their
// strides (NCHW, channels_last, any view).
// Speed: not measured -- the machine this was written on has no GPU; the
// kernels are compiled (sm_90) and registered, and the tests parametrized
// over CUDA run them against native on a GPU machine (make gpu-check).
#include "ops/conv2d.h"

#include "common/cuda_launch.cuh"
#include "ops/cuda/conv2d_depthwise.cuh"
#include "ops/cuda/conv2d_tensor_core.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace handgrad {
namespace conv2d {
namespace {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kThreads = 256;  // 16 x 16, each thread a 4 x 4 block

struct Strides4 {
  int64_t n, c, h, w;
  __device__ int64_t at(int64_t in, int64_t ic, int64_t ih, int64_t iw) const {
    return in * n + ic * c + ih * h + iw * w;
  }
};

Strides4 strides_of(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Splits a flat pixel number of an (images, rows, cols) grid.
struct PixelGrid {
  int64_t rows, cols;
  __device__ void split(int64_t flat, int64_t& image, int64_t& row, int64_t& col) const {
    col = flat % cols;
    row = (flat / cols) % rows;
    image = flat / (cols * rows);
  }
};

template <typename T, typename Acc>
struct ForwardProblem {
  const T* input;
  const T* weight;
  const T* bias;
  T* output;
  Strides4 in_s, out_s;
  Geometry g;
  int64_t M, N, K;

  __device__ int64_t group(int z) const { return z; }
  __device__ void k_range(int, int64_t& begin, int64_t& end) const { begin = 0; end = K; }
  __device__ Acc a(int z, int64_t m, int64_t k) const {
    return static_cast<Acc>(weight[(z * M + m) * K + k]);
  }
  __device__ bool exact() const { return false; }
  __device__ Acc b(int z, int64_t k, int64_t n, bool& present) const {
    present = true;  // the padding's zeros are multiplied, as native does
    const int64_t taps = g.h.kernel * g.w.kernel;
    const int64_t ci = k / taps, kh = (k / g.w.kernel) % g.h.kernel, kw = k % g.w.kernel;
    int64_t image, oh, ow;
    PixelGrid{g.h.out_size, g.w.out_size}.split(n, image, oh, ow);
    const int64_t ih = input_pos(g.h, oh, kh), iw = input_pos(g.w, ow, kw);
    if (!inside(ih, g.h.in_size) || !inside(iw, g.w.in_size)) return Acc(0);
    return static_cast<Acc>(input[in_s.at(image, z * g.in_per_group() + ci, ih, iw)]);
  }
  __device__ void store(int z, int64_t m, int64_t n, Acc v) const {
    int64_t image, oh, ow;
    PixelGrid{g.h.out_size, g.w.out_size}.split(n, image, oh, ow);
    const int64_t co = z * M + m;
    if (bias != nullptr) v += static_cast<Acc>(bias[co]);
    output[out_s.at(image, co, oh, ow)] = static_cast<T>(v);
  }
};

template <typename T, typename Acc>
struct GradInputProblem {
  const T* grad_output;
  const T* weight;
  T* grad_input;
  const int* weight_nonfinite;  // device flag: some weight is inf or NaN
  Strides4 go_s, gi_s;
  Geometry g;
  int64_t M, N, K;

  // With a non-finite weight, the (input, tap) pairs that read no dOut
  // (padding, between strides) must be skipped rather than multiplied by
  // zero, or W * 0 = NaN reaches inputs native leaves finite.
  __device__ bool exact() const { return *weight_nonfinite != 0; }
  __device__ int64_t group(int z) const { return z; }
  __device__ void k_range(int, int64_t& begin, int64_t& end) const { begin = 0; end = K; }
  __device__ Acc a(int z, int64_t m, int64_t k) const {
    const int64_t taps = g.h.kernel * g.w.kernel;
    const int64_t co = k / taps, tap = k % taps;
    return static_cast<Acc>(weight[((z * g.out_per_group() + co) * M + m) * taps + tap]);
  }
  __device__ Acc b(int z, int64_t k, int64_t n, bool& present) const {
    const int64_t taps = g.h.kernel * g.w.kernel;
    const int64_t co = k / taps, kh = (k / g.w.kernel) % g.h.kernel, kw = k % g.w.kernel;
    int64_t image, ih, iw;
    PixelGrid{g.h.in_size, g.w.in_size}.split(n, image, ih, iw);
    const int64_t oh = output_pos_reading(g.h, ih, kh);
    const int64_t ow = output_pos_reading(g.w, iw, kw);
    present = oh >= 0 && ow >= 0;
    if (!present) return Acc(0);
    return static_cast<Acc>(grad_output[go_s.at(image, z * g.out_per_group() + co, oh, ow)]);
  }
  __device__ void store(int z, int64_t m, int64_t n, Acc v) const {
    int64_t image, ih, iw;
    PixelGrid{g.h.in_size, g.w.in_size}.split(n, image, ih, iw);
    grad_input[gi_s.at(image, z * M + m, ih, iw)] = static_cast<T>(v);
  }
};

template <typename T, typename Acc>
struct GradWeightProblem {
  const T* grad_output;
  const T* input;
  Acc* partial;  // [splits][out_channels][patch]
  Strides4 go_s, in_s;
  Geometry g;
  int64_t M, N, K;
  int64_t splits, split_len;

  __device__ int64_t group(int z) const { return z / splits; }
  __device__ void k_range(int z, int64_t& begin, int64_t& end) const {
    begin = (z % splits) * split_len;
    end = begin + split_len < K ? begin + split_len : K;
  }
  __device__ Acc a(int z, int64_t m, int64_t k) const {
    int64_t image, oh, ow;
    PixelGrid{g.h.out_size, g.w.out_size}.split(k, image, oh, ow);
    return static_cast<Acc>(grad_output[go_s.at(image, group(z) * M + m, oh, ow)]);
  }
  __device__ bool exact() const { return false; }
  __device__ Acc b(int z, int64_t k, int64_t n, bool& present) const {
    present = true;  // the padding's zeros are multiplied, as native does
    const int64_t taps = g.h.kernel * g.w.kernel;
    const int64_t ci = n / taps, kh = (n / g.w.kernel) % g.h.kernel, kw = n % g.w.kernel;
    int64_t image, oh, ow;
    PixelGrid{g.h.out_size, g.w.out_size}.split(k, image, oh, ow);
    const int64_t ih = input_pos(g.h, oh, kh), iw = input_pos(g.w, ow, kw);
    if (!inside(ih, g.h.in_size) || !inside(iw, g.w.in_size)) return Acc(0);
    return static_cast<Acc>(input[in_s.at(image, group(z) * g.in_per_group() + ci, ih, iw)]);
  }
  __device__ void store(int z, int64_t m, int64_t n, Acc v) const {
    partial[((z % splits) * g.out_channels + group(z) * M + m) * N + n] = v;
  }
};

// One 64x64 output tile per block. With kExact, B entries the problem marks
// absent (not a zero of the data but no term at all) are skipped instead of
// multiplied, so that an inf or NaN in A does not turn them into NaN. The
// two modes are separate kernels (the exact one's flags would cost the
// ordinary one registers, and with them occupancy: 64 -> 76 for float
// grad_input); a problem whose mode is decided on the device (grad_input:
// are the weights finite?) launches both, and the one not matching returns
// at once in every block.
template <typename Acc, typename Problem, bool kExact>
__global__ void __launch_bounds__(kThreads) implicit_gemm(Problem p) {
  if (p.exact() != kExact) return;  // uniform: the same for every block
  __shared__ Acc a_tile[kTileK][kTileM];
  __shared__ Acc b_tile[kTileK][kTileN];
  __shared__ bool b_present[kExact ? kTileK : 1][kExact ? kTileN : 1];
  const int z = blockIdx.z;
  const int64_t m0 = int64_t(blockIdx.y) * kTileM;
  const int64_t n0 = int64_t(blockIdx.x) * kTileN;
  const int tid = threadIdx.x;
  const int tm = tid / 16, tn = tid % 16;
  int64_t k_begin, k_end;
  p.k_range(z, k_begin, k_end);

  Acc acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);
  }

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    // Not unrolled: each element's 64-bit index math (divisions by the
    // geometry) would otherwise be live four times over next to the 16
    // accumulators, and ptxas spills.
#pragma unroll 1
    for (int e = tid; e < kTileM * kTileK; e += kThreads) {
      const int mm = e % kTileM, kk = e / kTileM;
      const int64_t m = m0 + mm, k = k0 + kk;
      a_tile[kk][mm] = (m < p.M && k < k_end) ? p.a(z, m, k) : Acc(0);
    }
#pragma unroll 1
    for (int e = tid; e < kTileN * kTileK; e += kThreads) {
      const int nn = e % kTileN, kk = e / kTileN;
      const int64_t n = n0 + nn, k = k0 + kk;
      bool present = false;
      b_tile[kk][nn] = (n < p.N && k < k_end) ? p.b(z, k, n, present) : Acc(0);
      if constexpr (kExact) b_present[kk][nn] = present;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      Acc a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = a_tile[kk][tm + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = b_tile[kk][tn + 16 * j];
      if constexpr (kExact) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (!b_present[kk][tn + 16 * j]) continue;
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[i][j] += a[i] * b[j];
        }
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + tm + 16 * i, n = n0 + tn + 16 * j;
      if (m < p.M && n < p.N) p.store(z, m, n, acc[i][j]);
    }
  }
}

// flag = 1 when some value is inf or NaN (x - x is 0 for every finite x).
template <typename T>
__global__ void flag_nonfinite(const T* values, int64_t count, int* flag) {
  using Acc = at::opmath_type<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Acc v = static_cast<Acc>(values[i]);
    if (!(v - v == Acc(0))) *flag = 1;
  }
}

template <typename Acc, typename Problem, bool kExact = false>
void launch(const Problem& p, int64_t grid_z, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return;
  const int64_t tiles_n = (p.N + kTileN - 1) / kTileN;
  const int64_t tiles_m = (p.M + kTileM - 1) / kTileM;
  cuda::launch<implicit_gemm<Acc, Problem, kExact>>(cuda::Dims(tiles_n, tiles_m, grid_z),
                                                    kThreads, 0, stream, p);
}

template <typename T, typename Acc>
__global__ void sum_splits(const Acc* partial, T* out, int64_t splits, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    Acc total = 0;
    for (int64_t s = 0; s < splits; ++s) total += partial[s * count + i];
    out[i] = static_cast<T>(total);
  }
}

template <typename T, typename Acc>
__global__ void channel_sums(const T* grad_output, Strides4 s, int64_t images, int64_t rows,
                             int64_t cols, T* out) {
  __shared__ Acc partial[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t per_channel = images * rows * cols;
  Acc total = 0;
  for (int64_t i = threadIdx.x; i < per_channel; i += kThreads) {
    int64_t image, h, w;
    PixelGrid{rows, cols}.split(i, image, h, w);
    total += static_cast<Acc>(grad_output[s.at(image, c, h, w)]);
  }
  partial[threadIdx.x] = total;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[c] = static_cast<T>(partial[0]);
}

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

void forward_kernel(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    at::Tensor& output, const Geometry& g) {
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (depthwise::applicable(g)) {
    const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
    depthwise::into(output, [&](at::Tensor& y) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                      "handgrad::conv2d (depthwise)", [&] {
        cuda::launch<depthwise::forward_kernel<scalar_t>>(
            depthwise::blocks_for(y.numel()), depthwise::kThreads, 0, stream,
            x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
            bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
            y.mutable_data_ptr<scalar_t>(), depthwise::shape_of(g), g);
      });
    });
    return;
  }
  if (tensor_core::try_forward(input, weight, bias, output, g, stream)) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "handgrad::conv2d", [&] {
    using Acc = at::opmath_type<scalar_t>;
    ForwardProblem<scalar_t, Acc> p{input.const_data_ptr<scalar_t>(),
                                    weight.const_data_ptr<scalar_t>(),
                                    bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                    output.mutable_data_ptr<scalar_t>(),
                                    strides_of(input),
                                    strides_of(output),
                                    g,
                                    g.out_per_group(),
                                    g.batch * g.h.out_size * g.w.out_size,
                                    g.patch()};
    launch<Acc>(p, g.groups, stream);
  });
}

void grad_input_kernel(const at::Tensor& grad_output, const at::Tensor& weight,
                       at::Tensor& grad_input, const Geometry& g) {
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (depthwise::applicable(g)) {
    const at::Tensor dy = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
    depthwise::into(grad_input, [&](at::Tensor& dx) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(),
                                      "handgrad::conv2d_grad_input (depthwise)", [&] {
        cuda::launch<depthwise::grad_input_kernel<scalar_t>>(
            depthwise::blocks_for(dx.numel()), depthwise::kThreads, 0, stream,
            dy.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
            dx.mutable_data_ptr<scalar_t>(), depthwise::shape_of(g), g);
      });
    });
    return;
  }
  // The tensor-core pass multiplies the zeros around dOut like the ordinary
  // one; the exact pass below redoes either when a weight is not finite.
  const bool tensor_cores = tensor_core::try_grad_input(grad_output, weight, grad_input, g, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "handgrad::conv2d_grad_input", [&] {
    using Acc = at::opmath_type<scalar_t>;
    at::Tensor nonfinite = at::zeros({1}, weight.options().dtype(at::kInt));
    cuda::launch<flag_nonfinite<scalar_t>>(blocks_for(weight.numel()), kThreads, 0, stream,
                                           weight.const_data_ptr<scalar_t>(), weight.numel(),
                                           nonfinite.mutable_data_ptr<int>());
    GradInputProblem<scalar_t, Acc> p{grad_output.const_data_ptr<scalar_t>(),
                                      weight.const_data_ptr<scalar_t>(),
                                      grad_input.mutable_data_ptr<scalar_t>(),
                                      nonfinite.const_data_ptr<int>(),
                                      strides_of(grad_output),
                                      strides_of(grad_input),
                                      g,
                                      g.in_per_group(),
                                      g.batch * g.h.in_size * g.w.in_size,
                                      g.out_per_group() * g.taps()};
    if (!tensor_cores) launch<Acc>(p, g.groups, stream);
    launch<Acc, decltype(p), /*kExact=*/true>(p, g.groups, stream);
  });
}

void grad_weight_kernel(const at::Tensor& grad_output, const at::Tensor& input,
                        at::Tensor& grad_weight, const Geometry& g) {
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t reduction = g.batch * g.h.out_size * g.w.out_size;
  const int64_t weights = g.out_channels * g.patch();
  // Enough splits of the reduction to fill the GPU, few enough that the
  // partial sums stay small.
  constexpr int64_t kSplitDepth = 4096;
  constexpr int64_t kMaxPartials = int64_t(1) << 26;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(64, reduction / kSplitDepth));
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, kMaxPartials / weights,
                                                  65535 / g.groups}));
  const int64_t split_len = (reduction + splits - 1) / splits;
  if (depthwise::applicable(g)) {
    // One thread per (channel, tap) and split: splits of ~2048 pixels.
    const int64_t dw_splits = std::max<int64_t>(1, std::min<int64_t>(256, reduction / 2048));
    const int64_t dw_len = (reduction + dw_splits - 1) / dw_splits;
    const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor dy = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                    "handgrad::conv2d_grad_weight (depthwise)", [&] {
      using Acc = at::opmath_type<scalar_t>;
      at::Tensor partial = at::empty({dw_splits * weights},
                                     input.options().dtype(c10::CppTypeToScalarType<Acc>::value));
      cuda::launch<depthwise::grad_weight_kernel<scalar_t>>(
          cuda::Dims(depthwise::blocks_for(weights), dw_splits), depthwise::kThreads, 0, stream,
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          partial.mutable_data_ptr<Acc>(), depthwise::shape_of(g), g, dw_len);
      cuda::launch<sum_splits<scalar_t, Acc>>(blocks_for(weights), kThreads, 0, stream,
                                              partial.const_data_ptr<Acc>(),
                                              grad_weight.mutable_data_ptr<scalar_t>(), dw_splits,
                                              weights);
    });
    return;
  }
  if (tensor_core::weight_applicable(input.scalar_type(), g)) {
    // Tensor cores: partial sums in (co, kh, kw, ci) order, added here in a
    // fixed order, then laid out as (co, ci, kh, kw).
    at::Tensor partial = at::empty({splits * weights}, input.options().dtype(at::kFloat));
    tensor_core::weight_partials(grad_output, input, partial, g, splits, split_len, stream);
    at::Tensor krsc = at::empty({g.out_channels, g.h.kernel, g.w.kernel, g.in_per_group()},
                                grad_weight.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                    "handgrad::conv2d_grad_weight", [&] {
      cuda::launch<sum_splits<scalar_t, float>>(blocks_for(weights), kThreads, 0, stream,
                                                partial.const_data_ptr<float>(),
                                                krsc.mutable_data_ptr<scalar_t>(), splits,
                                                weights);
    });
    grad_weight.copy_(krsc.permute({0, 3, 1, 2}));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "handgrad::conv2d_grad_weight", [&] {
    using Acc = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({splits * weights},
                                   input.options().dtype(c10::CppTypeToScalarType<Acc>::value));
    GradWeightProblem<scalar_t, Acc> p{grad_output.const_data_ptr<scalar_t>(),
                                       input.const_data_ptr<scalar_t>(),
                                       partial.mutable_data_ptr<Acc>(),
                                       strides_of(grad_output),
                                       strides_of(input),
                                       g,
                                       g.out_per_group(),
                                       g.patch(),
                                       reduction,
                                       splits,
                                       split_len};
    launch<Acc>(p, g.groups * splits, stream);
    cuda::launch<sum_splits<scalar_t, Acc>>(blocks_for(weights), kThreads, 0, stream,
                                            partial.const_data_ptr<Acc>(),
                                            grad_weight.mutable_data_ptr<scalar_t>(), splits,
                                            weights);
  });
}

void grad_bias_kernel(const at::Tensor& grad_output, at::Tensor& grad_bias) {
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t channels = grad_output.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "handgrad::conv2d_grad_bias", [&] {
    using Acc = at::opmath_type<scalar_t>;
    cuda::launch<channel_sums<scalar_t, Acc>>(
        channels, kThreads, 0, stream, grad_output.const_data_ptr<scalar_t>(),
        strides_of(grad_output), grad_output.size(0), grad_output.size(2), grad_output.size(3),
        grad_bias.mutable_data_ptr<scalar_t>());
  });
}

const Backend kBackend{&forward_kernel, &grad_input_kernel, &grad_weight_kernel,
                       &grad_bias_kernel};

at::Tensor conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return forward(input, weight, bias, stride, padding, dilation, groups, kBackend);
}

at::Tensor conv2d_grad_input_cuda(const at::Tensor& grad_output, const at::Tensor& weight,
                                  at::IntArrayRef input_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  return grad_input(grad_output, weight, input_size, stride, padding, dilation, groups, kBackend);
}

at::Tensor conv2d_grad_weight_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                   at::IntArrayRef weight_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups) {
  return grad_weight(grad_output, input, weight_size, stride, padding, dilation, groups, kBackend);
}

at::Tensor conv2d_grad_bias_cuda(const at::Tensor& grad_output) {
  return grad_bias(grad_output, kBackend);
}

}  // namespace
}  // namespace conv2d
}  // namespace handgrad

TORCH_LIBRARY_IMPL(handgrad, CUDA, m) {
  m.impl("conv2d", &handgrad::conv2d::conv2d_cuda);
  m.impl("conv2d_grad_input", &handgrad::conv2d::conv2d_grad_input_cuda);
  m.impl("conv2d_grad_weight", &handgrad::conv2d::conv2d_grad_weight_cuda);
  m.impl("conv2d_grad_bias", &handgrad::conv2d::conv2d_grad_bias_cuda);
}
