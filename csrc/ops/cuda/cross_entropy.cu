// cross_entropy, CUDA kernels.
//
// Algorithm: forward gives each row a group of G threads: a warp (G = 32)
// when C <= 1024, a whole 256-thread block otherwise, and one thread per row
// (G = 1) for K-dim inputs, where neighbouring threads own neighbouring
// positions s and so read neighbouring addresses for every class. Each thread
// keeps an online max and sum of exponentials over its share of the row; the
// group combines them (shuffles, then shared memory across warps) into
// lse = m + log s. Label smoothing and probability targets sweep the row once
// more for the linear terms relative to the final max (no cancellation for
// +-1e4 logits). Rows that native's log_softmax makes NaN (a NaN or +inf
// logit, or only -inf ones) get lse = NaN (row_log_s in ops/cross_entropy.h);
// ignored rows are swept too (only for that) and record 0 or that NaN, so
// backward can give native's NaN gradient there. Saved for backward: lse.
// Reduced losses, the class-weight total and the 'mean' divisor are sums
// over up to 1e7+ rows: a per-row buffer, then a two-stage reduction with
// no atomics -- up to kMaxPartials blocks each add a fixed set of 256-row
// tiles and tree-add their threads' sums, one block adds those partial
// sums the same way -- so every addition's order depends on the row count
// alone and results are bit-identical from call to call (and GPU to GPU).
// Gradient (derivation in ops/cross_entropy.h): dloss/dx_c = scale *
// (p_c a - (1-e) w_t [c==t] - e/C w_c), p_c = exp(x_c - lse), one thread per
// element of grad_input, so no N x C probability matrix is ever stored;
// probability targets first get sum_k w_k y'_k per row. float16 / bfloat16
// inputs accumulate in float and round each result once (the reduced loss
// from its double sum: round_once). As in native's CUDA kernels, an index target
// out of range is a device-side assert (checking it on the host would need a
// synchronization). Contiguous rows whose length is a multiple of 16 bytes
// are read with 16-byte loads in forward; backward reads and writes 16-byte
// packs whenever the sizes and alignment allow.
// Speed: not measured: no GPU was available (every kernel runs in CI on the
// host emulator, csrc/emulation, against native).
#include "ops/cross_entropy.h"

#include "common/cuda_launch.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <type_traits>

namespace handgrad {
namespace cross_entropy {
namespace {

constexpr int kThreads = 256;

// The deterministic reduction (see the top of the file): stage 1 runs
// reduce_blocks(count) blocks of kReduceThreads threads; tile k holds terms
// [256 k, 256 k + 256) and block b adds tiles b, b + B, b + 2B, ...
constexpr int kReduceThreads = 256;
constexpr int64_t kMaxPartials = 1024;  // 8 resident blocks on each of an H100's 132 SMs

int64_t reduce_blocks(int64_t count) {
  return std::clamp<int64_t>((count + kReduceThreads - 1) / kReduceThreads, 1, kMaxPartials);
}

// 16-byte packs for vectorized loads and stores (4 floats, 8 halves, 2 doubles).
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

__device__ __forceinline__ float ce_exp(float v) { return expf(v); }
__device__ __forceinline__ double ce_exp(double v) { return exp(v); }
__device__ __forceinline__ float ce_log(float v) { return logf(v); }
__device__ __forceinline__ double ce_log(double v) { return log(v); }

template <typename A>
__device__ __forceinline__ A lowest();
template <>
__device__ __forceinline__ float lowest<float>() { return -FLT_MAX; }
template <>
__device__ __forceinline__ double lowest<double>() { return -DBL_MAX; }

struct MaxOp {
  template <typename A>
  __device__ A operator()(A a, A b) const { return a > b ? a : b; }
};
struct SumOp {
  template <typename A>
  __device__ A operator()(A a, A b) const { return a + b; }
};

// Reduces v over the G threads of a group; every thread gets the result.
// G > 32 means the group is the whole block (the caller keeps the block uniform).
template <int G, typename A, typename Op>
__device__ A group_reduce(A v, Op op, A* shm) {
  if constexpr (G == 1) {
    return v;
  } else if constexpr (G <= 32) {
    for (int o = G / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o, G));
    return v;
  } else {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (threadIdx.x % 32 == 0) shm[threadIdx.x / 32] = v;
    __syncthreads();
    v = shm[0];
    for (int i = 1; i < G / 32; ++i) v = op(v, shm[i]);
    return v;
  }
}

int grid_for(int64_t work, int per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535 * 8)));
}

// Row r: logits at x + offset(r) with stride S between classes.
__device__ __forceinline__ int64_t row_offset(int64_t r, const Params& p) {
  return p.inner == 1 ? r * p.classes : (r / p.inner) * p.classes * p.inner + r % p.inner;
}

template <typename T, int G>
__global__ void forward_rows_kernel(const T* __restrict__ x, const int64_t* __restrict__ tg,
                                    const T* __restrict__ y, const T* __restrict__ w,
                                    const double* __restrict__ w_sum, Params p, int64_t rows,
                                    bool packed_rows, T* __restrict__ loss_rows,
                                    at::opmath_type<T>* __restrict__ row_loss,
                                    double* __restrict__ row_w,
                                    at::opmath_type<T>* __restrict__ lse) {
  using A = at::opmath_type<T>;
  __shared__ A shm[kThreads / 32];
  const int groups = blockDim.x / G;
  const int lane = threadIdx.x % G;
  const int64_t C = p.classes, S = p.inner;
  const A e = static_cast<A>(p.smoothing), Cf = static_cast<A>(C);
  const A w_total = static_cast<A>(w_sum ? *w_sum : p.weight_total);
  for (int64_t r = blockIdx.x * int64_t(groups) + threadIdx.x / G; r < rows;
       r += int64_t(gridDim.x) * groups) {
    const int64_t off = row_offset(r, p);
    int64_t t = 0;
    bool ignored = false;
    if (!p.prob_target) {
      t = tg[r];
      ignored = is_ignored(t, p.ignore_index);
      CUDA_KERNEL_ASSERT((ignored || in_range(t, C)) && "cross_entropy: target out of bounds");
    }
    // Ignored rows are swept too: their lse records whether native's
    // gradient of the row is NaN (ignored_row_lse).
    A m = lowest<A>(), s = 0;
    auto consume = [&](A v) {
      if (v > m) {
        s = s * ce_exp(m - v) + A(1);
        m = v;
      } else {
        s += ce_exp(v - m);
      }
    };
    if (packed_rows) {
      // Contiguous rows whose length is a multiple of the pack: 16-byte loads.
      constexpr int V = Pack<T>::kSize;
      const Pack<T>* row = reinterpret_cast<const Pack<T>*>(x + off);
      for (int64_t k = lane; k < C / V; k += G) {
        const Pack<T> pack = row[k];
#pragma unroll
        for (int j = 0; j < V; ++j) consume(static_cast<A>(pack.v[j]));
      }
    } else {
      for (int64_t c = lane; c < C; c += G) consume(static_cast<A>(x[off + c * S]));
    }
    const A row_max = group_reduce<G>(m, MaxOp(), shm);
    s = group_reduce<G>(s * ce_exp(m - row_max), SumOp(), shm);
    if (ignored) {  // the whole group skips the rest together
      if (lane == 0) {
        lse[r] = ignored_row_lse<A>(row_is_nan(row_max, s));
        if (loss_rows) loss_rows[r] = T(0);
        if (row_loss) row_loss[r] = 0;
        if (row_w) row_w[r] = 0;
      }
      continue;
    }
    const A log_s = row_log_s(row_max, s, ce_log(s));
    A lin_w = 0, lin_y = 0, mass_y = 0;
    if (p.prob_target || p.smoothing > 0) {
      for (int64_t c = lane; c < C; c += G) {
        const A wc = w ? static_cast<A>(w[c]) : A(1);
        const A gap = row_max - static_cast<A>(x[off + c * S]);
        if (p.prob_target) {
          const A wy = wc * smoothed(static_cast<A>(y[off + c * S]), e, Cf);
          lin_y += wy * gap;
          mass_y += wy;
        } else {
          lin_w += wc * gap;
        }
      }
      if (p.prob_target) {
        lin_y = group_reduce<G>(lin_y, SumOp(), shm);
        mass_y = group_reduce<G>(mass_y, SumOp(), shm);
      } else {
        lin_w = group_reduce<G>(lin_w, SumOp(), shm);
      }
    }
    if (lane == 0) {
      A loss;
      A w_t = 0;
      if (p.prob_target) {
        loss = prob_row_loss(log_s, lin_y, mass_y);
      } else {
        w_t = w ? static_cast<A>(w[t]) : A(1);
        const A gap_t = row_max - static_cast<A>(x[off + t * S]);
        loss = index_row_loss(log_s, gap_t, w_t, lin_w, e, Cf, w_total);
      }
      lse[r] = row_max + log_s;
      if (loss_rows) loss_rows[r] = static_cast<T>(loss);
      if (row_loss) row_loss[r] = loss;
      if (row_w) row_w[r] = static_cast<double>(w_t);
    }
  }
}

// ---------------------------------------------------------------------------
// The deterministic two-stage sum.

struct Sums {
  double loss, weight;
};

// Tree-adds the block's values in a fixed order; every thread gets the total.
__device__ Sums block_sum(Sums v, double* sl, double* sw) {
  sl[threadIdx.x] = v.loss;
  sw[threadIdx.x] = v.weight;
  __syncthreads();
  for (int half = kReduceThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      sl[threadIdx.x] += sl[threadIdx.x + half];
      sw[threadIdx.x] += sw[threadIdx.x + half];
    }
    __syncthreads();
  }
  return {sl[0], sw[0]};
}

// Stage 1: block b adds the terms of tiles b, b + B, b + 2B, ... (each
// thread its column of every tile, in tile order) into partial[b].
template <typename Term>
__global__ void partial_sums_kernel(Term term, int64_t count, Sums* __restrict__ partial) {
  __shared__ double sl[kReduceThreads], sw[kReduceThreads];
  Sums acc{0, 0};
  for (int64_t i = blockIdx.x * int64_t(kReduceThreads) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * kReduceThreads) {
    const Sums v = term(i);
    acc.loss += v.loss;
    acc.weight += v.weight;
  }
  const Sums total = block_sum(acc, sl, sw);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// Stage 2: one block adds the partial sums the same way and hands the
// total to finish.
template <typename Finish>
__global__ void final_sum_kernel(const Sums* __restrict__ partial, int64_t parts, Finish finish) {
  __shared__ double sl[kReduceThreads], sw[kReduceThreads];
  Sums acc{0, 0};
  for (int64_t i = threadIdx.x; i < parts; i += kReduceThreads) {
    acc.loss += partial[i].loss;
    acc.weight += partial[i].weight;
  }
  const Sums total = block_sum(acc, sl, sw);
  if (threadIdx.x == 0) finish(total);
}

// Terms: the per-row losses and target weights of the forward,
template <typename A>
struct RowLossTerm {
  const A* row_loss;
  const double* row_w;  // null unless 'mean' of index targets
  __device__ Sums operator()(int64_t r) const {
    return {static_cast<double>(row_loss[r]), row_w ? row_w[r] : 0.0};
  }
};

// the class weights (their total scales label smoothing),
template <typename T>
struct ClassWeightTerm {
  const T* w;
  __device__ Sums operator()(int64_t c) const { return {0.0, static_cast<double>(w[c])}; }
};

// the target weights of the non-ignored rows (the 'mean' divisor of index targets).
template <typename T>
struct TargetWeightTerm {
  const int64_t* tg;
  const T* w;
  Params p;
  __device__ Sums operator()(int64_t r) const {
    const int64_t t = tg[r];
    if (is_ignored(t, p.ignore_index)) return {0.0, 0.0};
    CUDA_KERNEL_ASSERT(in_range(t, p.classes) && "cross_entropy: target out of bounds");
    return {0.0, w ? static_cast<double>(w[t]) : 1.0};
  }
};

// Finishers: the reduced loss ('mean': over the target weights, or the rows
// for probability targets),
template <typename T>
struct WriteLoss {
  T* loss;
  bool mean;
  bool prob_target;
  double rows;
  __device__ void operator()(Sums total) const {
    double value = total.loss;
    if (mean) value /= prob_target ? rows : total.weight;
    *loss = round_once<T>(value);
  }
};

// or a weight total.
struct WriteWeight {
  double* out;
  __device__ void operator()(Sums total) const { *out = total.weight; }
};

template <typename Term, typename Finish>
void deterministic_sum(Term term, int64_t count, Finish finish, const at::Tensor& like,
                       cudaStream_t stream) {
  const int64_t blocks = reduce_blocks(count);
  at::Tensor partial = at::empty({blocks * 2}, like.options().dtype(at::kDouble));
  Sums* parts = reinterpret_cast<Sums*>(partial.mutable_data_ptr<double>());
  cuda::launch<partial_sums_kernel<Term>>(blocks, kReduceThreads, 0, stream, term, count, parts);
  cuda::launch<final_sum_kernel<Finish>>(1, kReduceThreads, 0, stream, parts, blocks, finish);
}

// sum_c w_c y'_c of every row (probability targets, y' smoothed), one thread per row.
template <typename T>
__global__ void target_mass_kernel(const T* __restrict__ y, const T* __restrict__ w, Params p,
                                   int64_t rows, at::opmath_type<T>* __restrict__ mass) {
  using A = at::opmath_type<T>;
  const A e = static_cast<A>(p.smoothing), Cf = static_cast<A>(p.classes);
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < rows;
       r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t off = row_offset(r, p);
    A acc = 0;
    for (int64_t c = 0; c < p.classes; ++c) {
      acc += (w ? static_cast<A>(w[c]) : A(1)) *
             smoothed(static_cast<A>(y[off + c * p.inner]), e, Cf);
    }
    mass[r] = acc;
  }
}

// The upstream gradient's share of a row: g, or g / divisor for 'mean'.
template <typename A>
__device__ __forceinline__ A mean_scaled(A g, const double* divisor, double rows, const Params& p) {
  return p.reduction == kMean ? static_cast<A>(static_cast<double>(g) / (divisor ? *divisor : rows))
                              : g;
}

// Everything the gradient of one element needs.
template <typename T>
struct BackwardArgs {
  const T* go;
  const T* x;
  const int64_t* tg;
  const T* y;
  const T* w;
  const at::opmath_type<T>* lse;
  const at::opmath_type<T>* mass;
  const double* divisor;
  const double* w_sum;
};

template <typename T>
__device__ __forceinline__ T grad_element(const BackwardArgs<T>& a, const Params& p, int64_t i,
                                          at::opmath_type<T> xc) {
  using A = at::opmath_type<T>;
  const int64_t C = p.classes, S = p.inner;
  const A e = static_cast<A>(p.smoothing), Cf = static_cast<A>(C);
  const A w_total = static_cast<A>(a.w_sum ? *a.w_sum : p.weight_total);
  const int64_t s = i % S, c = (i / S) % C, n = i / (S * C);
  const int64_t r = n * S + s;
  const A g = mean_scaled(static_cast<A>(a.go[p.reduction == kNone ? r : 0]), a.divisor,
                          static_cast<double>(p.outer * p.inner), p);
  const A wc = a.w ? static_cast<A>(a.w[c]) : A(1);
  if (p.prob_target) {
    const A yc = smoothed(static_cast<A>(a.y[i]), e, Cf);
    return static_cast<T>(ce_exp(xc - a.lse[r]) * g * a.mass[r] - g * wc * yc);
  }
  const int64_t t = a.tg[r];
  if (is_ignored(t, p.ignore_index)) {
    const A l = a.lse[r];
    return static_cast<T>(l != l ? l : A(0));  // ignored_row_lse: NaN or 0
  }
  CUDA_KERNEL_ASSERT(in_range(t, C) && "cross_entropy: target out of bounds");
  const A w_t = a.w ? static_cast<A>(a.w[t]) : A(1);
  A out = ce_exp(xc - a.lse[r]) * g * index_row_p_factor(w_t, e, Cf, w_total) - g * e / Cf * wc;
  if (c == t) out -= g * (A(1) - e) * w_t;
  return static_cast<T>(out);
}

// One thread per element of grad_input, or per 16-byte pack of elements when
// the tensors allow it (total a multiple of the pack, aligned pointers).
template <typename T>
__global__ void backward_kernel_impl(BackwardArgs<T> a, Params p, int64_t total, bool packed,
                                     T* __restrict__ gx) {
  using A = at::opmath_type<T>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if (packed) {
    constexpr int V = Pack<T>::kSize;
    const Pack<T>* xp = reinterpret_cast<const Pack<T>*>(a.x);
    Pack<T>* gp = reinterpret_cast<Pack<T>*>(gx);
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total / V; k += stride) {
      const Pack<T> in = xp[k];
      Pack<T> out;
#pragma unroll
      for (int j = 0; j < V; ++j) out.v[j] = grad_element(a, p, k * V + j, static_cast<A>(in.v[j]));
      gp[k] = out;
    }
    return;
  }
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += stride) {
    gx[i] = grad_element(a, p, i, static_cast<A>(a.x[i]));
  }
}

template <typename T>
__global__ void target_backward_kernel_impl(const T* __restrict__ go, const T* __restrict__ x,
                                            const T* __restrict__ w,
                                            const at::opmath_type<T>* __restrict__ lse, Params p,
                                            int64_t total, T* __restrict__ gy) {
  using A = at::opmath_type<T>;
  const int64_t C = p.classes, S = p.inner;
  const double rows = static_cast<double>(p.outer * p.inner);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = i % S, c = (i / S) % C, n = i / (S * C);
    const int64_t r = n * S + s;
    const A g = mean_scaled(static_cast<A>(go[p.reduction == kNone ? r : 0]), nullptr, rows, p);
    const A wc = w ? static_cast<A>(w[c]) : A(1);
    gy[i] = static_cast<T>(g * (A(1) - static_cast<A>(p.smoothing)) * wc *
                           (lse[r] - static_cast<A>(x[i])));
  }
}

// The sum of the class weights, on the device, when label smoothing needs it.
template <typename T>
at::Tensor class_weight_sum(const at::Tensor& weight, const Params& p, cudaStream_t stream) {
  if (!p.has_weight || p.smoothing <= 0) return at::Tensor();
  at::Tensor out = at::empty({1}, weight.options().dtype(at::kDouble));
  deterministic_sum(ClassWeightTerm<T>{weight.const_data_ptr<T>()}, p.classes,
                    WriteWeight{out.mutable_data_ptr<double>()}, weight, stream);
  return out;
}

const double* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<double>() : nullptr;
}

template <typename T, int G>
void launch_forward(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                    const at::Tensor& w_sum, const Params& p, int64_t rows, T* loss_rows,
                    at::opmath_type<T>* row_loss, double* row_w, at::Tensor& lse,
                    cudaStream_t stream) {
  const int per_block = kThreads / G;
  cuda::launch<forward_rows_kernel<T, G>>(
      grid_for(rows, per_block), kThreads, 0, stream, input.const_data_ptr<T>(), p.prob_target ? nullptr : target.const_data_ptr<int64_t>(),
      p.prob_target ? target.const_data_ptr<T>() : nullptr,
      p.has_weight ? weight.const_data_ptr<T>() : nullptr, ptr_or_null(w_sum), p, rows,
      p.inner == 1 && p.classes % Pack<T>::kSize == 0 && aligned16(input.const_data_ptr()),
      loss_rows, row_loss, row_w, lse.mutable_data_ptr<at::opmath_type<T>>());
}

void forward_kernel(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                    const Params& p, at::Tensor& loss, at::Tensor& lse) {
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = p.outer * p.inner;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "handgrad::cross_entropy", [&] {
    using A = at::opmath_type<scalar_t>;
    const at::Tensor w_sum = class_weight_sum<scalar_t>(weight, p, stream);
    at::Tensor row_loss, row_w;
    if (p.reduction != kNone) {
      row_loss = at::empty({rows}, input.options().dtype(c10::CppTypeToScalarType<A>::value));
    }
    if (p.reduction == kMean && !p.prob_target) {
      row_w = at::empty({rows}, input.options().dtype(at::kDouble));
    }
    scalar_t* loss_rows = p.reduction == kNone ? loss.mutable_data_ptr<scalar_t>() : nullptr;
    A* rl = row_loss.defined() ? row_loss.mutable_data_ptr<A>() : nullptr;
    double* rw = row_w.defined() ? row_w.mutable_data_ptr<double>() : nullptr;
    if (rows > 0) {
      auto launch = [&](auto group) {
        launch_forward<scalar_t, decltype(group)::value>(input, target, weight, w_sum, p, rows,
                                                         loss_rows, rl, rw, lse, stream);
      };
      if (p.inner > 1) {
        launch(std::integral_constant<int, 1>());
      } else if (p.classes <= 1024) {
        launch(std::integral_constant<int, 32>());
      } else {
        launch(std::integral_constant<int, kThreads>());
      }
    }
    if (p.reduction != kNone) {
      deterministic_sum(RowLossTerm<A>{rl, rw}, rows,
                        WriteLoss<scalar_t>{loss.mutable_data_ptr<scalar_t>(), p.reduction == kMean,
                                            p.prob_target, static_cast<double>(rows)},
                        input, stream);
    }
  });
}

void backward_kernel(const at::Tensor& grad_loss, const at::Tensor& input,
                     const at::Tensor& target, const at::Tensor& weight, const at::Tensor& lse,
                     const Params& p, at::Tensor& grad_input) {
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = p.outer * p.inner;
  const int64_t total = grad_input.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "handgrad::cross_entropy_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* w = p.has_weight ? weight.const_data_ptr<scalar_t>() : nullptr;
    const at::Tensor w_sum = class_weight_sum<scalar_t>(weight, p, stream);
    at::Tensor divisor, mass;
    if (p.reduction == kMean && !p.prob_target) {
      divisor = at::empty({1}, input.options().dtype(at::kDouble));
      deterministic_sum(TargetWeightTerm<scalar_t>{target.const_data_ptr<int64_t>(), w, p}, rows,
                        WriteWeight{divisor.mutable_data_ptr<double>()}, input, stream);
    }
    if (p.prob_target) {
      mass = at::empty({rows}, input.options().dtype(c10::CppTypeToScalarType<A>::value));
      cuda::launch<target_mass_kernel<scalar_t>>(grid_for(rows, kThreads), kThreads, 0, stream,
                                                 target.const_data_ptr<scalar_t>(), w, p, rows,
                                                 mass.mutable_data_ptr<A>());
    }
    const BackwardArgs<scalar_t> args{
        grad_loss.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
        p.prob_target ? nullptr : target.const_data_ptr<int64_t>(),
        p.prob_target ? target.const_data_ptr<scalar_t>() : nullptr, w, lse.const_data_ptr<A>(),
        mass.defined() ? mass.const_data_ptr<A>() : nullptr, ptr_or_null(divisor),
        ptr_or_null(w_sum)};
    constexpr int V = Pack<scalar_t>::kSize;
    const bool packed =
        total % V == 0 && aligned16(args.x) && aligned16(grad_input.const_data_ptr());
    cuda::launch<backward_kernel_impl<scalar_t>>(grid_for(packed ? total / V : total, kThreads),
                                                 kThreads, 0, stream, args, p, total, packed,
                                                 grad_input.mutable_data_ptr<scalar_t>());
  });
}

void target_backward_kernel(const at::Tensor& grad_loss, const at::Tensor& input,
                            const at::Tensor& weight, const at::Tensor& lse, const Params& p,
                            at::Tensor& grad_target) {
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = grad_target.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "handgrad::cross_entropy_target_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    cuda::launch<target_backward_kernel_impl<scalar_t>>(
        grid_for(total, kThreads), kThreads, 0, stream, grad_loss.const_data_ptr<scalar_t>(),
        input.const_data_ptr<scalar_t>(), p.has_weight ? weight.const_data_ptr<scalar_t>() : nullptr,
        lse.const_data_ptr<A>(), p, total, grad_target.mutable_data_ptr<scalar_t>());
  });
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_cuda(const at::Tensor& input,
                                                      const at::Tensor& target,
                                                      const std::optional<at::Tensor>& weight,
                                                      int64_t ignore_index,
                                                      c10::string_view reduction,
                                                      double label_smoothing) {
  return forward(input, target, weight, ignore_index, reduction, label_smoothing,
                 &forward_kernel);
}

at::Tensor cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& input,
                                       const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight,
                                       int64_t ignore_index, c10::string_view reduction,
                                       double label_smoothing, const at::Tensor& lse) {
  return backward(grad_loss, input, target, weight, ignore_index, reduction, label_smoothing, lse,
                  &backward_kernel);
}

at::Tensor cross_entropy_target_backward_cuda(const at::Tensor& grad_loss,
                                              const at::Tensor& input, const at::Tensor& target,
                                              const std::optional<at::Tensor>& weight,
                                              c10::string_view reduction, double label_smoothing,
                                              const at::Tensor& lse) {
  return target_backward(grad_loss, input, target, weight, reduction, label_smoothing, lse,
                         &target_backward_kernel);
}

}  // namespace
}  // namespace cross_entropy
}  // namespace handgrad

TORCH_LIBRARY_IMPL(handgrad, CUDA, m) {
  m.impl("cross_entropy", &handgrad::cross_entropy::cross_entropy_cuda);
  m.impl("cross_entropy_backward", &handgrad::cross_entropy::cross_entropy_backward_cuda);
  m.impl("cross_entropy_target_backward",
         &handgrad::cross_entropy::cross_entropy_target_backward_cuda);
}
