// conv2d on tensor cores: the forward pass and the stride-1 input gradient as
// one pipelined implicit GEMM on mma.sync (included by conv2d.cu).
//
// GEMM view (NHWC activations, KRSC weights, per group g):
//   D[m][n] = sum_k A[m][k] B[n][k]
//   m = output pixel (image, oh, ow), n = output channel, k = (kh, kw, ci)
//   A[m][k] = x[image][oh*s - p + kh*d][ow*s - p + kw*d][g*Cig + ci] (0 in the padding)
//   B[n][k] = w[g*Cog + n][kh][kw][ci]
// The input gradient of a stride-1 convolution is the same GEMM run on dOut
// with the weight flipped and its channel axes swapped, padded by
// d*(k-1) - p on each side (dx[ih] = sum_kh dy[ih + p - kh*d] w[kh]; with
// kh' = k-1-kh the offset becomes ih - (d*(k-1) - p) + kh'*d): one kernel
// serves both.
//
// Block tile 128 (pixels) x 64 (channels) x BK (32 for float16/bfloat16, 16
// for float32 as TF32), 4 warps of 64 x 32 (4 x 4 mma tiles of 16 x 8).
// Operands stream through a 3-stage cp.async pipeline in 16-byte chunks
// (8 halves or 4 floats): each thread owns one chunk column and four A rows
// (two B rows), so the (kh, kw, ci) position of its chunk is kept
// incrementally -- no division in the main loop -- and the per-row input
// coordinates are computed once. Chunks in the padding or past the ends are
// zero-filled by cp.async (src-size 0). Shared rows are padded to 80 bytes
// so that ldmatrix (16-bit types) and the 32-bit fragment loads (TF32) hit
// 32 different banks. float16/bfloat16 use ldmatrix + mma m16n8k16; float32
// loads fragments directly and rounds them with cvt.rna.tf32 for mma
// m16n8k8. Accumulation is float32 in registers (64 per thread); the
// epilogue adds the bias and rounds once.
//
// Applies when the channels per group are a multiple of the chunk (8 or 4),
// so that a chunk never straddles two taps and every chunk is 16-byte
// aligned; other convolutions (the 3-channel first layers, depthwise) keep
// the generic kernel of conv2d.cu.
//
// Resources (ptxas -v, sm_90): see tests/test_cuda_resources.py; shared
// memory 3 x 15 KiB = 45 KiB per block (no opt-in), 128 threads.
// Roofline (H100 SXM, bf16 dense 989 TFLOP/s, 3.35 TB/s): a ResNet-50 3x3
// layer (64 ch, 56x56, batch 64) is 2*64*56*56*64*64*9 = 14.8 GFLOP over
// ~26 MB moved -- 570 FLOP/byte, compute-bound; this tile shape (no warp
// specialization, 3 stages, 4 warps per 128x64 tile) is expected to reach
// roughly 40-60% of tensor peak. Not measured: no GPU here.
#pragma once

#include "common/tensor_core.cuh"
#include "ops/conv2d.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace handgrad {
namespace conv2d {
namespace tensor_core {

namespace tc = cuda::tc;

constexpr int kBM = 128, kBN = 64, kThreads = 128, kStages = 3;
constexpr int kRowBytes = 80;  // one shared row: BK elements (64 bytes) + 16 bytes of padding

template <typename T>
struct Traits {  // float16 / bfloat16: mma m16n8k16 through ldmatrix
  using Elem = uint16_t;
  static constexpr int kBK = 32, kChunk = 8;
  static constexpr tc::Input kInput =
      std::is_same<T, c10::Half>::value ? tc::Input::kHalf : tc::Input::kBFloat16;
};
template <>
struct Traits<float> {  // float32 as TF32: mma m16n8k8, fragments loaded directly
  using Elem = float;
  static constexpr int kBK = 16, kChunk = 4;
};

template <typename T>
constexpr int kRowElems = kRowBytes / static_cast<int>(sizeof(typename Traits<T>::Elem));

template <typename T>
struct Stage {
  using Elem = typename Traits<T>::Elem;
  alignas(16) Elem a[kBM][kRowElems<T>];
  alignas(16) Elem b[kBN][kRowElems<T>];
};

// Everything about one GEMM: the activation (NHWC), the weight (KRSC).
struct Params {
  int64_t batch, in_h, in_w, channels;     // x: [batch][in_h][in_w][channels]
  int64_t out_h, out_w, out_channels;      // y: [batch][out_h][out_w][out_channels]
  int64_t in_per_group, out_per_group;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t pixels, depth;                   // M = batch*out_h*out_w, K = kernel_h*kernel_w*in_per_group
};

// The (kh, kw, ci) position of a thread's chunk column, advanced by BK per
// step without dividing.
struct TapCursor {
  int64_t k, kh, kw, ci;
  __device__ void start(int64_t k0, const Params& p) {
    k = k0;
    ci = k0 % p.in_per_group;
    const int64_t tap = k0 / p.in_per_group;
    kh = tap / p.kernel_w;
    kw = tap % p.kernel_w;
  }
  __device__ void advance(int64_t step, const Params& p) {
    k += step;
    ci += step;
    while (ci >= p.in_per_group) {
      ci -= p.in_per_group;
      if (++kw == p.kernel_w) {
        kw = 0;
        ++kh;
      }
    }
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    implicit_gemm_tc(const T* __restrict__ x, const T* __restrict__ w,
                     const T* __restrict__ bias, T* __restrict__ y, Params p) {
  using Tr = Traits<T>;
  using Elem = typename Tr::Elem;
  constexpr int kBK = Tr::kBK, kChunk = Tr::kChunk;
  HG_DYNAMIC_SHARED(unsigned char, smem_raw);
  Stage<T>* stages = reinterpret_cast<Stage<T>*>(smem_raw);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / 2, warp_n = warp % 2;
  const int group = blockIdx.z;
  const int64_t m0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;
  const int column = tid % 4;  // this thread's chunk column in a tile row

  // The four A rows (output pixels) this thread loads, located once.
  int64_t row_base[4], row_ih[4], row_iw[4];
  bool row_ok[4];
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + tid / 4 + 32 * i;
    row_ok[i] = m < p.pixels;
    const int64_t mm = row_ok[i] ? m : 0;
    const int64_t ow = mm % p.out_w, oh = (mm / p.out_w) % p.out_h, image = mm / (p.out_w * p.out_h);
    row_base[i] = image * p.in_h * p.in_w * p.channels + group * p.in_per_group;
    row_ih[i] = oh * p.stride_h - p.pad_h;
    row_iw[i] = ow * p.stride_w - p.pad_w;
  }
  TapCursor cursor;
  cursor.start(int64_t(column) * kChunk, p);

  auto load_stage = [&](Stage<T>& s) {
    const bool k_ok = cursor.k < p.depth;
    for (int i = 0; i < 4; ++i) {
      const int64_t ih = row_ih[i] + cursor.kh * p.dilation_h;
      const int64_t iw = row_iw[i] + cursor.kw * p.dilation_w;
      const bool ok = k_ok && row_ok[i] && inside(ih, p.in_h) && inside(iw, p.in_w);
      const T* src = ok ? x + row_base[i] + (ih * p.in_w + iw) * p.channels + cursor.ci : x;
      tc::cp_async_16(&s.a[tid / 4 + 32 * i][column * kChunk], src, ok ? 16 : 0);
    }
    for (int i = 0; i < 2; ++i) {
      const int64_t n = n0 + tid / 4 + 32 * i;
      const bool ok = k_ok && n < p.out_per_group;
      const T* src = ok ? w + (group * p.out_per_group + n) * p.depth + cursor.k : w;
      tc::cp_async_16(&s.b[tid / 4 + 32 * i][column * kChunk], src, ok ? 16 : 0);
    }
    cursor.advance(kBK, p);
  };

  tc::FragC acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j)
      for (int e = 0; e < 4; ++e) acc[i][j].x[e] = 0.f;

  const int64_t k_tiles = (p.depth + kBK - 1) / kBK;
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(stages[s]);
    tc::cp_async_commit();
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    tc::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt has landed for every thread; stage kt-1 is free
    if (kt + kStages - 1 < k_tiles) load_stage(stages[(kt + kStages - 1) % kStages]);
    tc::cp_async_commit();
    const Stage<T>& s = stages[kt % kStages];
    if constexpr (std::is_same<T, float>::value) {
      const int g = lane / 4, q = lane % 4;
      for (int kk = 0; kk < kBK; kk += 8) {
        tc::FragA a[4];
        tc::FragB b[4];
        for (int i = 0; i < 4; ++i) {
          const int r = warp_m * 64 + i * 16 + g;
          a[i].x[0] = tc::to_tf32(s.a[r][kk + q]);
          a[i].x[1] = tc::to_tf32(s.a[r + 8][kk + q]);
          a[i].x[2] = tc::to_tf32(s.a[r][kk + q + 4]);
          a[i].x[3] = tc::to_tf32(s.a[r + 8][kk + q + 4]);
        }
        for (int j = 0; j < 4; ++j) {
          const int n = warp_n * 32 + j * 8 + g;
          b[j].x[0] = tc::to_tf32(s.b[n][kk + q]);
          b[j].x[1] = tc::to_tf32(s.b[n][kk + q + 4]);
        }
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) tc::mma_1688_tf32(acc[i][j], a[i], b[j], acc[i][j]);
      }
    } else {
      for (int kk = 0; kk < kBK; kk += 16) {
        tc::FragA a[4];
        tc::FragB b[4];
        for (int i = 0; i < 4; ++i) {
          tc::ldmatrix<4>(a[i].x, &s.a[warp_m * 64 + i * 16 + lane % 16][kk + (lane / 16) * 8]);
        }
        for (int j = 0; j < 4; j += 2) {
          uint32_t r[4];
          tc::ldmatrix<4>(r, &s.b[warp_n * 32 + (j + lane / 16) * 8 + lane % 8]
                                 [kk + ((lane / 8) % 2) * 8]);
          b[j].x[0] = r[0];
          b[j].x[1] = r[1];
          b[j + 1].x[0] = r[2];
          b[j + 1].x[1] = r[3];
        }
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) tc::mma_16816<Tr::kInput>(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
  }
  tc::cp_async_wait<0>();

  const int g = lane / 4, q = lane % 4;
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) {
      for (int e = 0; e < 4; ++e) {
        const int64_t m = m0 + warp_m * 64 + i * 16 + g + 8 * (e >= 2);
        const int64_t n = n0 + warp_n * 32 + j * 8 + 2 * q + (e & 1);
        if (m >= p.pixels || n >= p.out_per_group) continue;
        const int64_t channel = group * p.out_per_group + n;
        float v = acc[i][j].x[e];
        if (bias != nullptr) v += static_cast<float>(bias[channel]);
        y[m * p.out_channels + channel] = static_cast<T>(v);
      }
    }
  }
}

// ---------------------------------------------------------- weight gradient
//
// dW[co][kh][kw][ci] = sum over pixels (image, oh, ow) of
//   dy[image][oh][ow][g*Cog + co] * x[image][oh*s - p + kh*d][ow*s - p + kw*d][g*Cig + ci]
// as the GEMM D[m = co][n = (kh, kw, ci)] = sum_k A[m][k] B[k][n] over k = pixel.
// Both operands come in pixel-major (dy's channels and x's channels are the
// contiguous axes), so both tiles are staged as [k][m] / [k][n] and read
// with ldmatrix.trans (16-bit types) or transposed fragment loads (TF32).
// The long pixel range is split over blocks (grid z = group * splits +
// split); each block writes its partial sums and conv2d.cu adds the splits
// in a fixed order (deterministic, no atomics). Tile 64 (co) x 128 (taps x
// ci) x BK (pixels), 4 warps of 32 x 64, 3-stage cp.async pipeline; each
// thread walks its pixel rows incrementally (no division in the loop).

constexpr int kWM = 64, kWN = 128;

template <typename T>
constexpr int kWeightAStride = kWM + 16 / static_cast<int>(sizeof(typename Traits<T>::Elem));
template <typename T>
constexpr int kWeightBStride = kWN + 16 / static_cast<int>(sizeof(typename Traits<T>::Elem));

template <typename T>
struct WeightStage {
  using Elem = typename Traits<T>::Elem;
  alignas(16) Elem a[Traits<T>::kBK][kWeightAStride<T>];  // [pixel][co]
  alignas(16) Elem b[Traits<T>::kBK][kWeightBStride<T>];  // [pixel][(tap, ci)]
};

struct WeightParams {
  Params conv;        // the forward geometry (x: input, y: dOut)
  int64_t splits, split_len;
};

// A pixel row's coordinates, advanced by BK pixels per step without dividing.
struct PixelCursor {
  int64_t pixel, image, oh, ow;
  __device__ void start(int64_t first, const Params& p) {
    pixel = first;
    ow = first % p.out_w;
    oh = (first / p.out_w) % p.out_h;
    image = first / (p.out_w * p.out_h);
  }
  __device__ void advance(int64_t step, const Params& p) {
    pixel += step;
    ow += step;
    while (ow >= p.out_w) {
      ow -= p.out_w;
      if (++oh == p.out_h) {
        oh = 0;
        ++image;
      }
    }
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    weight_gemm_tc(const T* __restrict__ dy, const T* __restrict__ x, float* __restrict__ partial,
                   WeightParams wp) {
  using Tr = Traits<T>;
  constexpr int kBK = Tr::kBK, kChunk = Tr::kChunk;
  constexpr int kAChunksPerRow = kWM / kChunk, kBChunksPerRow = kWN / kChunk;
  constexpr int kBRowsPerPass = kThreads / kBChunksPerRow;
  constexpr int kBRows = kBK / kBRowsPerPass;  // B rows (pixels) per thread: 4
  const Params& p = wp.conv;
  HG_DYNAMIC_SHARED(unsigned char, smem_raw);
  WeightStage<T>* stages = reinterpret_cast<WeightStage<T>*>(smem_raw);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / 2, warp_n = warp % 2;
  const int64_t group = blockIdx.z / wp.splits, split = blockIdx.z % wp.splits;
  const int64_t k_begin = split * wp.split_len;
  const int64_t k_end = k_begin + wp.split_len < p.pixels ? k_begin + wp.split_len : p.pixels;
  const int64_t m0 = int64_t(blockIdx.y) * kWM, n0 = int64_t(blockIdx.x) * kWN;
  const int64_t n_total = p.kernel_h * p.kernel_w * p.in_per_group;

  // B: this thread's chunk column, i.e. one (tap, ci) chunk, fixed for the loop.
  const int64_t n_chunk = n0 + (tid % kBChunksPerRow) * kChunk;
  const bool n_ok = n_chunk < n_total;
  const int64_t tap = n_ok ? n_chunk / p.in_per_group : 0, ci = n_ok ? n_chunk % p.in_per_group : 0;
  const int64_t kh = tap / p.kernel_w, kw = tap % p.kernel_w;
  PixelCursor rows[kBRows];
  for (int i = 0; i < kBRows; ++i) rows[i].start(k_begin + tid / kBChunksPerRow + kBRowsPerPass * i, p);
  int64_t a_pixel[2];
  for (int i = 0; i < 2; ++i) a_pixel[i] = k_begin + (tid + kThreads * i) / kAChunksPerRow;

  auto load_stage = [&](WeightStage<T>& s) {
    for (int i = 0; i < 2; ++i) {
      const int c = tid + kThreads * i, r = c / kAChunksPerRow, col = (c % kAChunksPerRow) * kChunk;
      const int64_t co = m0 + col;
      const bool ok = a_pixel[i] < k_end && co < p.out_per_group;
      const T* src = ok ? dy + a_pixel[i] * p.out_channels + group * p.out_per_group + co : dy;
      tc::cp_async_16(&s.a[r][col], src, ok ? 16 : 0);
      a_pixel[i] += kBK;
    }
    for (int i = 0; i < kBRows; ++i) {
      const PixelCursor& c = rows[i];
      const int64_t ih = c.oh * p.stride_h - p.pad_h + kh * p.dilation_h;
      const int64_t iw = c.ow * p.stride_w - p.pad_w + kw * p.dilation_w;
      const bool ok = n_ok && c.pixel < k_end && inside(ih, p.in_h) && inside(iw, p.in_w);
      const T* src = ok ? x + ((c.image * p.in_h + ih) * p.in_w + iw) * p.channels +
                              group * p.in_per_group + ci
                        : x;
      tc::cp_async_16(&s.b[tid / kBChunksPerRow + kBRowsPerPass * i][(tid % kBChunksPerRow) * kChunk],
                      src, ok ? 16 : 0);
      rows[i].advance(kBK, p);
    }
  };

  tc::FragC acc[2][8];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 8; ++j)
      for (int e = 0; e < 4; ++e) acc[i][j].x[e] = 0.f;

  const int64_t k_tiles = k_end > k_begin ? (k_end - k_begin + kBK - 1) / kBK : 0;
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(stages[s]);
    tc::cp_async_commit();
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    tc::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (kt + kStages - 1 < k_tiles) load_stage(stages[(kt + kStages - 1) % kStages]);
    tc::cp_async_commit();
    const WeightStage<T>& s = stages[kt % kStages];
    if constexpr (std::is_same<T, float>::value) {
      const int g = lane / 4, q = lane % 4;
      for (int kk = 0; kk < kBK; kk += 8) {
        tc::FragA a[2];
        tc::FragB b[8];
        for (int i = 0; i < 2; ++i) {
          const int m = warp_m * 32 + i * 16 + g;
          a[i].x[0] = tc::to_tf32(s.a[kk + q][m]);
          a[i].x[1] = tc::to_tf32(s.a[kk + q][m + 8]);
          a[i].x[2] = tc::to_tf32(s.a[kk + q + 4][m]);
          a[i].x[3] = tc::to_tf32(s.a[kk + q + 4][m + 8]);
        }
        for (int j = 0; j < 8; ++j) {
          const int n = warp_n * 64 + j * 8 + g;
          b[j].x[0] = tc::to_tf32(s.b[kk + q][n]);
          b[j].x[1] = tc::to_tf32(s.b[kk + q + 4][n]);
        }
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 8; ++j) tc::mma_1688_tf32(acc[i][j], a[i], b[j], acc[i][j]);
      }
    } else {
      for (int kk = 0; kk < kBK; kk += 16) {
        tc::FragA a[2];
        tc::FragB b[8];
        for (int i = 0; i < 2; ++i) {
          tc::ldmatrix<4, true>(a[i].x, &s.a[kk + lane % 8 + 8 * (lane / 16)]
                                            [warp_m * 32 + i * 16 + 8 * ((lane / 8) % 2)]);
        }
        for (int j = 0; j < 8; j += 2) {
          uint32_t r[4];
          tc::ldmatrix<4, true>(r, &s.b[kk + lane % 16][warp_n * 64 + (j + lane / 16) * 8]);
          b[j].x[0] = r[0];
          b[j].x[1] = r[1];
          b[j + 1].x[0] = r[2];
          b[j + 1].x[1] = r[3];
        }
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 8; ++j) tc::mma_16816<Tr::kInput>(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
  }
  tc::cp_async_wait<0>();

  const int g = lane / 4, q = lane % 4;
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 8; ++j) {
      for (int e = 0; e < 4; ++e) {
        const int64_t co = m0 + warp_m * 32 + i * 16 + g + 8 * (e >= 2);
        const int64_t n = n0 + warp_n * 64 + j * 8 + 2 * q + (e & 1);
        if (co >= p.out_per_group || n >= n_total) continue;
        partial[(split * p.out_channels + group * p.out_per_group + co) * n_total + n] =
            acc[i][j].x[e];
      }
    }
  }
}

// Host side ------------------------------------------------------------

// The tensor-core path takes a call when the device has tensor-core mma
// (sm_80 or newer), the dtype has one (float16 / bfloat16; float32 only
// while TF32 is allowed, as native cuDNN decides) and the GEMM's input
// channels per group fill whole 16-byte chunks.
inline bool applicable(at::ScalarType type, int64_t channels_per_group) {
  int chunk = 0;
  if (type == at::kHalf || type == at::kBFloat16) chunk = 8;
  if (type == at::kFloat && at::globalContext().allowTF32CuDNN()) chunk = 4;
  if (chunk == 0 || channels_per_group % chunk != 0) return false;
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

// Runs the GEMM on NHWC x and KRSC w into `out` (any layout: written through
// an NHWC buffer when it is not channels_last itself).
inline void run(const at::Tensor& x_nhwc, const at::Tensor& w_krsc, const at::Tensor& bias,
                at::Tensor& out, const Params& p, int64_t groups, cudaStream_t stream) {
  if (p.pixels == 0 || p.out_per_group == 0) return;
  const bool direct = out.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = direct ? out : at::empty(out.sizes(), out.options().memory_format(
                                                           at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_nhwc.scalar_type(),
                                  "handgrad::conv2d (tensor cores)", [&] {
    if constexpr (std::is_same<scalar_t, double>::value) {
      TORCH_CHECK(false, "handgrad::conv2d: no tensor-core path for float64");
    } else {
      const int64_t tiles_m = (p.pixels + kBM - 1) / kBM;
      const int64_t tiles_n = (p.out_per_group + kBN - 1) / kBN;
      cuda::launch<implicit_gemm_tc<scalar_t>>(
          cuda::Dims(tiles_m, tiles_n, groups), kThreads, sizeof(Stage<scalar_t>) * kStages,
          stream, x_nhwc.const_data_ptr<scalar_t>(), w_krsc.const_data_ptr<scalar_t>(),
          bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
          y.mutable_data_ptr<scalar_t>(), p);
    }
  });
  if (!direct) out.copy_(y);
}

inline bool try_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                        at::Tensor& output, const Geometry& g, cudaStream_t stream) {
  if (!applicable(input.scalar_type(), g.in_per_group())) return false;
  const Params p{g.batch, g.h.in_size, g.w.in_size, g.in_channels,
                 g.h.out_size, g.w.out_size, g.out_channels, g.in_per_group(), g.out_per_group(),
                 g.h.kernel, g.w.kernel, g.h.stride, g.w.stride, g.h.pad_begin, g.w.pad_begin,
                 g.h.dilation, g.w.dilation, g.batch * g.h.out_size * g.w.out_size, g.patch()};
  run(input.contiguous(at::MemoryFormat::ChannelsLast),
      weight.permute({0, 2, 3, 1}).contiguous(), bias, output, p, g.groups, stream);
  return true;
}

// Stride 1: the forward GEMM over dOut with the flipped, channel-swapped
// weight (see the header comment).
inline bool try_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                           at::Tensor& grad_input, const Geometry& g, cudaStream_t stream) {
  if (g.h.stride != 1 || g.w.stride != 1 ||
      !applicable(grad_output.scalar_type(), g.out_per_group())) {
    return false;
  }
  const int64_t G = g.groups, kh = g.h.kernel, kw = g.w.kernel;
  // w[G*Cog + co][ci][kh][kw] -> w'[G*Cig + ci][kh'][kw'][co], kh' = kh-1-kh
  const at::Tensor flipped = weight.view({G, g.out_per_group(), g.in_per_group(), kh, kw})
                                 .flip({3, 4})
                                 .permute({0, 2, 3, 4, 1})
                                 .contiguous()
                                 .view({g.in_channels, kh, kw, g.out_per_group()});
  const Params p{g.batch, g.h.out_size, g.w.out_size, g.out_channels,
                 g.h.in_size, g.w.in_size, g.in_channels, g.out_per_group(), g.in_per_group(),
                 kh, kw, 1, 1, g.h.dilation * (kh - 1) - g.h.pad_begin,
                 g.w.dilation * (kw - 1) - g.w.pad_begin, g.h.dilation, g.w.dilation,
                 g.batch * g.h.in_size * g.w.in_size, kh * kw * g.out_per_group()};
  run(grad_output.contiguous(at::MemoryFormat::ChannelsLast), flipped, at::Tensor(), grad_input,
      p, G, stream);
  return true;
}

// Whether the weight gradient takes the tensor-core path (dOut's channels
// per group also fill whole chunks).
inline bool weight_applicable(at::ScalarType type, const Geometry& g) {
  return g.out_per_group() % 8 == 0 && applicable(type, g.in_per_group());
}

// Fills partial ([splits][out_channels][kh][kw][ci_per_group], float32) with
// the sums of each split of the pixels.
inline void weight_partials(const at::Tensor& grad_output, const at::Tensor& input,
                            at::Tensor& partial, const Geometry& g, int64_t splits,
                            int64_t split_len, cudaStream_t stream) {
  const WeightParams wp{
      Params{g.batch, g.h.in_size, g.w.in_size, g.in_channels, g.h.out_size, g.w.out_size,
             g.out_channels, g.in_per_group(), g.out_per_group(), g.h.kernel, g.w.kernel,
             g.h.stride, g.w.stride, g.h.pad_begin, g.w.pad_begin, g.h.dilation, g.w.dilation,
             g.batch * g.h.out_size * g.w.out_size, g.patch()},
      splits, split_len};
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor dy = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t tiles_n = (g.patch() + kWN - 1) / kWN, tiles_m = (g.out_per_group() + kWM - 1) / kWM;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "handgrad::conv2d_grad_weight (tensor cores)", [&] {
    if constexpr (!std::is_same<scalar_t, double>::value) {
      cuda::launch<weight_gemm_tc<scalar_t>>(
          cuda::Dims(tiles_n, tiles_m, g.groups * splits), kThreads,
          sizeof(WeightStage<scalar_t>) * kStages, stream, dy.const_data_ptr<scalar_t>(),
          x.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<float>(), wp);
    }
  });
}

}  // namespace tensor_core
}  // namespace conv2d
}  // namespace handgrad
