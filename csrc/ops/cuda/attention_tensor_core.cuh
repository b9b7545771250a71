// scaled_dot_product_attention on tensor cores for float16 / bfloat16: the
// FlashAttention-2 forward and backward (Dao, "FlashAttention-2: Faster
// Attention with Better Parallelism and Work Partitioning", 2023) on the
// mma.sync / ldmatrix / cp.async primitives of common/tensor_core.cuh.
// Included by attention.cu, whose host code routes calls here (take()).
//
// Forward (fa2_forward). One block per (batch*head, tile of 16*W query rows),
// W warps; a warp owns 16 query rows for the whole key loop. Its Q fragments
// are loaded once into registers (head tile D <= 128; for D = 256 they are
// re-read from shared memory by ldmatrix per key tile, to stay clear of
// spills). Key and value tiles of N rows stream through shared memory, double
// buffered by cp.async: tile t+1 is in flight while tile t is computed. Per
// tile, per warp:
//   S = Q K^T            mma m16n8k16, A = Q (16 x E), B = K rows (ldmatrix)
//   s = scale*S + mask, -inf where causal-hidden or past the last key
//   m' = max(m, rowmax s); P = e^(s - m'); l = l e^(m - m') + rowsum P
//   O = O e^(m - m') + (P o Z) V
//                        mma, A = P o Z rounded to 16 bits in registers
//                        (the C fragment of S is the A fragment of P, as in
//                        FA2), B = V rows through ldmatrix.trans
// Row maxima and sums live in registers (each row spread over the 4 lanes of
// a quad: 2 shuffles per reduction). The rules for special scores are the
// existing kernels' (attention.h): NaN and +inf make the row NaN, a row that
// sees no key has lse = +inf and output 0. Causal key tiles past a block's
// last row are never loaded, and a warp skips tiles past its own last row.
// Saved: O (rounded once to the dtype, stored through shared memory in
// 16-byte vectors) and lse = m + log l (float32).
// Dropout: Z's keep bits are the existing kernels' Philox stream
// (keep_bits4: one Philox call gives 4 adjacent keys of one query row): per
// tile each warp computes the calls of its 16 rows (each once) into a small
// shared bit table, so forward, backward and the CPU agree bit for bit.
//
// Backward (FA2's split, deterministic, no atomics; P recomputed from lse, Z
// regenerated; D = rowsum(dO o O) from attention.cu's rowdot_kernel):
//   fa2_dkdv: one block per (batch, kv head, tile of 16*W keys); a warp owns
//     16 keys and walks every query tile of the group's query heads (Q / dO
//     tiles double buffered by cp.async), in registers:
//       S^T = K Q^T, dP^T = V dO^T                      (mma, B from ldmatrix)
//       P^T = e^(scale S^T + mask^T - lse), dS^T = P^T o (dP^T o Z - D)
//       dV += (P^T o Z) dO, dK += scale dS^T Q          (A from registers,
//                                                         B via ldmatrix.trans)
//     For D = 256 the dK and dV accumulators (128 registers each) do not fit
//     together: two launches, one for dV (S^T, dV) and one for dK (S^T,
//     dP^T, dK) -- 5 products instead of 4.
//   fa2_dq: one block per (batch*head, tile of 16*W query rows); a warp owns
//     16 query rows and walks the key tiles (double buffered):
//       S = Q K^T, dP = dO V^T, dS = P o (dP o Z - D), dQ += scale dS K
//     and writes dS (float32) as the float mask's gradient when asked for.
// Every sum runs in one fixed order (fixed tiles, fixed lanes), so repeated
// calls are bit-identical.
//
// Head sizes: E and Ev multiples of 8 (whole 16-byte chunks) with
// max(E, Ev) <= 256 are padded to the head tile D = 64, 128 or 256 (zero
// chunks in shared memory; the products skip the 16-wide steps that hold
// only padding, so padding costs shared memory, not mma). Everything else
// -- other head sizes, float32 (kept exact: native's float32 SDPA uses
// 3xTF32, as accurate as float32, so plain TF32 would be less accurate than
// native), float64, need_weights, devices before sm_80 -- keeps the
// one-row-per-thread kernels of attention.cu.
//
// Tiles (W warps x 16 rows; N = key tile of the forward and dQ kernels, M =
// query tile of the dK/dV kernel), shared memory per block (rows of D + 8
// halves: the 16 bytes of padding put the 8 rows of every ldmatrix in
// different banks; plus the keep-bit tables) and registers per thread
// (ptxas -v, sm_90, CUDA 13.0, float16 and bfloat16 alike; no kernel spills
// -- tools/ptxas_report.py, tests/test_cuda_resources.py):
//   D    forward            dQ                 dK/dV
//        W  N  smem   regs  W  N  smem   regs  W  M  smem   regs
//   64   8  64  56.0K 183   4  64  55.0K 202   8  64  74.0K 229
//   128  8  64 104.0K 233   4  32  68.5K 194   8  32 103.0K 250
//   256  4  32  99.5K 240   4  32 132.5K 247   4  32 132.5K 232 (dV) / 248 (dK)
// Occupancy on H100 / H200 (sm_90: 64 K registers, 228 KiB shared memory
// per SM, registers allocated per warp in steps of 8 per thread): forward
// 8 warps per SM for every D (D = 64 and 128: one 8-warp block, limited by
// registers; D = 256: two 4-warp blocks); dQ 8 warps (two blocks) for D <=
// 128, 4 for D = 256 (shared memory); dK/dV 8 warps (one block, registers)
// for D <= 128, 4 for D = 256. Few warps, as in FA2: the latency is hidden
// by the independent mma chains and the cp.async of the next tile.
//
// Roofline, forward, (batch, heads, L = S, E) = (4, 16, 2048, 128) bfloat16,
// not causal: 4 B H L S E = 137.4 GFLOP. Off-chip traffic is Q, K, V, O
// once (4 x 33.6 MB = 134 MB, + 0.5 MB of lse); every block re-reads its
// head's K and V (1 MiB) from L2, 16 blocks per head: 1.07 GB of L2 reads.
// H100 SXM: 989 TFLOP/s dense bfloat16, 3.35 TB/s: 139 us of tensor work
// against 40 us of HBM traffic -- 1025 FLOP/byte, far past the ridge (295),
// so compute-bound (H200: the same tensor peak, 4.8 TB/s: more so). Per
// warp and 64-key tile the kernel issues 128 mma.m16n8k16 (524 K FLOP),
// 1024 exp2 (MUFU: 16 per clock per SM, 64 clocks) and ~16 K other lane
// operations (scale, max, rescale, packing: ~125 clocks at 128 lanes per
// clock). mma.sync reaches about two thirds of the dense peak on sm_90
// (the rest needs wgmma), ~190 clocks per warp-tile; with two warps per
// SM sub-partition the softmax overlaps the other warp's mma only in part.
// Expected: 30-40 % of H100 tensor peak (300-400 TFLOP/s, FA2's range on
// H100) -- short of issue 14's 50 %, which needs Hopper's wgmma, TMA and
// warp specialization (FlashAttention-3). The backward does 7 products per
// tile pair (S and dP are recomputed by the dQ kernel: the price of no
// atomics) against FA2's 5: expect about 0.6-0.7x FA2's backward.
// Speed against native: not measured (no GPU here).
#pragma once

#include "common/macros.h"
#include "common/tensor_core.cuh"
#include "ops/cuda/attention_common.cuh"

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace handgrad {
namespace attention {
namespace {
namespace tensor_core {

namespace tc = cuda::tc;

template <typename T>
constexpr tc::Input kInput =
    std::is_same<T, c10::Half>::value ? tc::Input::kHalf : tc::Input::kBFloat16;

constexpr float kLog2e = 1.4426950408889634f;

// Halves per shared-memory row of a D-wide tile: 16 bytes of padding, so the
// 8 row addresses of an ldmatrix fall in 8 different groups of 4 banks.
template <int D>
constexpr int kStride = D + 8;

struct alignas(16) Chunk {  // 16 bytes: one cp.async, one vector store
  uint32_t x[4];
};

// ------------------------------------------------------ tile configurations

// Per head tile D: warps (W), the key tile of the forward and dQ kernels, the
// query tile of the dK/dV kernel, whether the forward keeps Q in registers,
// whether dK and dV are computed by separate launches, and the blocks per
// SM each kernel is compiled for (__launch_bounds__).
template <int D>
struct Config;

template <>
struct Config<64> {
  static constexpr int kFwdWarps = 8, kFwdKeys = 64, kFwdBlocks = 1;
  static constexpr bool kFwdQInRegisters = true;
  static constexpr int kDqWarps = 4, kDqKeys = 64, kDqBlocks = 2;
  static constexpr int kKvWarps = 8, kKvQueries = 64, kKvBlocks = 1;
  static constexpr bool kKvSplit = false;
};

template <>
struct Config<128> {
  static constexpr int kFwdWarps = 8, kFwdKeys = 64, kFwdBlocks = 1;
  static constexpr bool kFwdQInRegisters = true;
  static constexpr int kDqWarps = 4, kDqKeys = 32, kDqBlocks = 2;
  static constexpr int kKvWarps = 8, kKvQueries = 32, kKvBlocks = 1;
  static constexpr bool kKvSplit = false;
};

template <>
struct Config<256> {
  static constexpr int kFwdWarps = 4, kFwdKeys = 32, kFwdBlocks = 2;
  static constexpr bool kFwdQInRegisters = false;
  static constexpr int kDqWarps = 4, kDqKeys = 32, kDqBlocks = 1;
  static constexpr int kKvWarps = 4, kKvQueries = 32, kKvBlocks = 1;
  static constexpr bool kKvSplit = true;
};

// Shared-memory bytes of each kernel (the layouts at the top of each).
constexpr size_t forward_shared_bytes(int D, int warps, int keys) {
  return size_t(16 * warps + 4 * keys) * (D + 8) * 2 + size_t(warps) * 16 * (keys / 4);
}
constexpr size_t dq_shared_bytes(int D, int warps, int keys) {
  return size_t(2 * 16 * warps + 4 * keys) * (D + 8) * 2 + size_t(warps) * 16 * (keys / 4);
}
constexpr size_t dkdv_shared_bytes(int D, int warps, int queries) {
  return size_t(2 * 16 * warps + 4 * queries) * (D + 8) * 2 + size_t(warps) * queries * 4;
}

// -------------------------------------------------------- block-wide loads

// Rows r0 .. r0 + kRows - 1 of head (b, h) of A, features [0, D), into
// dst[kRows][kStride<D>] by cp.async (the caller commits); rows at or past
// row_end and features at or past `features` are zero-filled.
template <int D, int kRows, int kThreads, typename T>
__device__ __forceinline__ void stage_rows(uint16_t* dst, const Rows<const T>& A, int64_t b,
                                           int64_t h, int64_t r0, int64_t row_end,
                                           int64_t features) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r0 + r < row_end && col < features;
    const void* src = ok ? static_cast<const void*>(A.at(b, h, r0 + r) + col)
                         : static_cast<const void*>(A.data);
    tc::cp_async_16(dst + r * kStride<D> + col, src, ok ? 16 : 0);
  }
}

// --------------------------------------------------- warp-level fragments

__device__ __forceinline__ int lane_index() { return static_cast<int>(threadIdx.x % 32); }

// A fragment: rows row0 .. row0+15, columns col0 .. col0+15 of a [row][col] tile.
template <int D>
__device__ __forceinline__ void load_a(tc::FragA& a, const uint16_t* tile, int row0, int col0) {
  const int lane = lane_index();
  tc::ldmatrix<4>(a.x, tile + (row0 + lane % 16) * kStride<D> + col0 + (lane / 16) * 8);
}

// B fragments of two n-tiles (n0 .. n0+15) over k0 .. k0+15 from a tile
// stored [n][k] (k contiguous: K for S = Q K^T, V for dP = dO V^T).
template <int D>
__device__ __forceinline__ void load_b_nk(tc::FragB& b0, tc::FragB& b1, const uint16_t* tile,
                                          int n0, int k0) {
  const int lane = lane_index();
  uint32_t r[4];
  tc::ldmatrix<4>(r, tile + (n0 + (lane / 16) * 8 + lane % 8) * kStride<D> + k0 +
                         ((lane / 8) % 2) * 8);
  b0.x[0] = r[0];
  b0.x[1] = r[1];
  b1.x[0] = r[2];
  b1.x[1] = r[3];
}

// The same from a tile stored [k][n] (n contiguous: V for O += P V, K for
// dQ += dS K, Q and dO for dK and dV), through ldmatrix.trans.
template <int D>
__device__ __forceinline__ void load_b_kn(tc::FragB& b0, tc::FragB& b1, const uint16_t* tile,
                                          int k0, int n0) {
  const int lane = lane_index();
  uint32_t r[4];
  tc::ldmatrix<4, true>(r, tile + (k0 + lane % 16) * kStride<D> + n0 + (lane / 16) * 8);
  b0.x[0] = r[0];
  b0.x[1] = r[1];
  b1.x[0] = r[2];
  b1.x[1] = r[3];
}

// The A fragment of columns 16t .. 16t+15 of a 16-row float32 result held
// as C fragments lo (columns 16t..16t+7) and hi (16t+8..16t+15): the same
// lanes hold the same elements, only rounded to 16 bits and paired.
template <tc::Input In>
__device__ __forceinline__ tc::FragA to_a(const tc::FragC& lo, const tc::FragC& hi) {
  tc::FragA a;
  a.x[0] = tc::pack_16bit<In>(lo.x[0], lo.x[1]);  // row g,     columns 2q, 2q+1
  a.x[1] = tc::pack_16bit<In>(lo.x[2], lo.x[3]);  // row g + 8
  a.x[2] = tc::pack_16bit<In>(hi.x[0], hi.x[1]);  // row g,     columns 8 + 2q, 8 + 2q+1
  a.x[3] = tc::pack_16bit<In>(hi.x[2], hi.x[3]);  // row g + 8
  return a;
}

template <int N>
__device__ __forceinline__ void zero(tc::FragC (&c)[N]) {
HG_UNROLL
  for (int i = 0; i < N; ++i) c[i].x[0] = c[i].x[1] = c[i].x[2] = c[i].x[3] = 0.f;
}

// acc (16 x N) += A (16 x depth) B^T with B = rows n0 .. n0+N-1 of b_tile
// ([n][k]); A's 16-wide column steps from registers. Steps at or past
// `depth` (padding of the head tile) are skipped.
template <tc::Input In, int D, int N>
__device__ __forceinline__ void mma_abt(tc::FragC (&acc)[N / 8], const tc::FragA (&a)[D / 16],
                                        const uint16_t* b_tile, int n0, int64_t depth) {
HG_UNROLL
  for (int kk = 0; kk < D / 16; ++kk) {
    if (kk * 16 >= depth) break;
HG_UNROLL
    for (int j = 0; j < N / 8; j += 2) {
      tc::FragB b0, b1;
      load_b_nk<D>(b0, b1, b_tile, n0 + j * 8, kk * 16);
      tc::mma_16816<In>(acc[j], a[kk], b0, acc[j]);
      tc::mma_16816<In>(acc[j + 1], a[kk], b1, acc[j + 1]);
    }
  }
}

// The same with A = rows a_row0 .. a_row0+15 of a_tile, read per step.
template <tc::Input In, int D, int N>
__device__ __forceinline__ void mma_abt(tc::FragC (&acc)[N / 8], const uint16_t* a_tile,
                                        int a_row0, const uint16_t* b_tile, int n0,
                                        int64_t depth) {
HG_UNROLL
  for (int kk = 0; kk < D / 16; ++kk) {
    if (kk * 16 >= depth) break;
    tc::FragA a;
    load_a<D>(a, a_tile, a_row0, kk * 16);
HG_UNROLL
    for (int j = 0; j < N / 8; j += 2) {
      tc::FragB b0, b1;
      load_b_nk<D>(b0, b1, b_tile, n0 + j * 8, kk * 16);
      tc::mma_16816<In>(acc[j], a, b0, acc[j]);
      tc::mma_16816<In>(acc[j + 1], a, b1, acc[j + 1]);
    }
  }
}

// acc (16 x D) += P (16 x K, float32 C fragments, rounded to 16 bits here)
// B with B = rows 0 .. K-1 of b_tile ([k][n]); output column pairs of
// 8-wide n-tiles at or past `width` (padding) are skipped.
template <tc::Input In, int D, int K>
__device__ __forceinline__ void mma_pb(tc::FragC (&acc)[D / 8], const tc::FragC (&p)[K / 8],
                                       const uint16_t* b_tile, int64_t width) {
HG_UNROLL
  for (int t = 0; t < K / 16; ++t) {
    const tc::FragA a = to_a<In>(p[2 * t], p[2 * t + 1]);
HG_UNROLL
    for (int n = 0; n < D / 8; n += 2) {
      if (n * 8 >= width) break;
      tc::FragB b0, b1;
      load_b_kn<D>(b0, b1, b_tile, t * 16, n * 8);
      tc::mma_16816<In>(acc[n], a, b0, acc[n]);
      tc::mma_16816<In>(acc[n + 1], a, b1, acc[n + 1]);
    }
  }
}

// Row maximum / sum over the 4 lanes of a quad (they hold one row's columns).
__device__ __forceinline__ float quad_max(float v) {
  v = max_keep_nan(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return max_keep_nan(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// The warp's keep-bit table for one tile: bits[r * kGroups + c] =
// keep_bits4(d, bh, row0 + r, group0 + c) (bit k: key 4 (group0 + c) + k of
// query row row0 + r is kept), each Philox call made once, by the lanes in
// turn; rows at or past row_end get 0.
template <int kRows, int kGroups>
__device__ __forceinline__ void fill_keep_bits(uint8_t* bits, const DropoutState& d, int64_t bh,
                                               int64_t row0, int64_t row_end, int64_t group0) {
  __syncwarp();  // the warp's reads of the previous tile's bits are done
  for (int x = lane_index(); x < kRows * kGroups; x += 32) {
    const int64_t row = row0 + x / kGroups;
    bits[x] = row < row_end ? static_cast<uint8_t>(keep_bits4(d, bh, row, group0 + x % kGroups))
                            : uint8_t(0);
  }
  __syncwarp();
}

// The 16 rows of a warp's float32 result (C fragments, scaled per row) as
// rows row0 .. of `out` (columns < width; rows < row_end), rounded once to
// T, through the warp's own 16 rows of a shared tile (no longer read) so
// the global stores are 16-byte vectors.
template <typename T, int D>
__device__ __forceinline__ void store_rows(const tc::FragC (&acc)[D / 8], const float (&row_scale)[2],
                                           uint16_t* warp_tile, const Rows<T>& out, int64_t b,
                                           int64_t h, int64_t row0, int64_t row_end,
                                           int64_t width) {
  const int lane = lane_index(), g = lane / 4, q = lane % 4;
  __syncwarp();
HG_UNROLL
  for (int n = 0; n < D / 8; ++n) {
HG_UNROLL
    for (int r = 0; r < 2; ++r) {
      *reinterpret_cast<uint32_t*>(warp_tile + (g + 8 * r) * kStride<D> + n * 8 + 2 * q) =
          tc::pack_16bit<kInput<T>>(acc[n].x[2 * r] * row_scale[r],
                                    acc[n].x[2 * r + 1] * row_scale[r]);
    }
  }
  __syncwarp();
  constexpr int kChunks = D / 8;
  for (int c = lane; c < 16 * kChunks; c += 32) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    if (row0 + r < row_end && col < width) {
      *reinterpret_cast<Chunk*>(out.at(b, h, row0 + r) + col) =
          *reinterpret_cast<const Chunk*>(warp_tile + r * kStride<D> + col);
    }
  }
}

// ------------------------------------------------------------------ forward

// grid: batch*heads*q_tiles blocks of 32*kWarps threads.
// Shared memory: Q [16 kWarps][D+8], then two stages of K [kKeys][D+8] and
// V [kKeys][D+8], then the warps' keep bits [kWarps][16][kKeys/4].
template <typename T, int D, int kWarps, int kKeys, bool kQInRegisters, int kMinBlocks>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
    fa2_forward(Rows<const T> Q, Rows<const T> K, Rows<const T> V, Mask<T> mask, Rows<T> O,
                float* __restrict__ lse, const int64_t* rng, Problem p, int64_t q_tiles) {
  constexpr int kThreads = kWarps * 32, kRows = kWarps * 16, kS = kStride<D>;
  constexpr int kGroups = kKeys / 4;
  constexpr tc::Input In = kInput<T>;
  HG_DYNAMIC_SHARED(unsigned char, smem_raw);
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* kv_s = q_s + kRows * kS;
  uint8_t* keep_s = reinterpret_cast<uint8_t*>(kv_s + 4 * kKeys * kS);

  const int warp = threadIdx.x / 32, lane = lane_index(), g = lane / 4, qd = lane % 4;
  const int64_t bh = blockIdx.x / q_tiles;
  // Reversed, so the longest causal rows start first and the short ones fill the tail.
  const int64_t q0 = (q_tiles - 1 - blockIdx.x % q_tiles) * kRows;
  const int64_t b = bh / p.heads_q, h = bh % p.heads_q, hk = h / (p.heads_q / p.heads_kv);
  const int64_t row0 = q0 + warp * 16;
  const bool warp_active = row0 < p.L;
  const int64_t k_end = p.causal ? imin(p.S, imin(p.L, q0 + kRows)) : p.S;
  const int64_t n_tiles = ceil_div(k_end, kKeys);
  const DropoutState drop = dropout_state(p, rng);
  const bool dropout = drop.p > 0.0f;
  const float keep_factor = static_cast<float>(drop.keep_scale), scale = static_cast<float>(p.scale);
  uint8_t* bits = keep_s + warp * 16 * kGroups;

  auto stage_keys = [&](int64_t t) {
    uint16_t* k_dst = kv_s + (t & 1) * 2 * kKeys * kS;
    stage_rows<D, kKeys, kThreads>(k_dst, K, b, hk, t * kKeys, p.S, p.E);
    stage_rows<D, kKeys, kThreads>(k_dst + kKeys * kS, V, b, hk, t * kKeys, p.S, p.Ev);
  };
  stage_rows<D, kRows, kThreads>(q_s, Q, b, h, q0, p.L, p.E);
  if (n_tiles > 0) stage_keys(0);
  tc::cp_async_commit();

  tc::FragA qf[kQInRegisters ? D / 16 : 1];
  tc::FragC o[D / 8];
  zero(o);
  float m[2] = {-inf<float>(), -inf<float>()}, l[2] = {0.f, 0.f};

  for (int64_t t = 0; t < n_tiles; ++t) {
    tc::cp_async_wait<0>();
    __syncthreads();  // tile t has landed for every thread; tile t-1's stage is free
    if (t + 1 < n_tiles) stage_keys(t + 1);
    tc::cp_async_commit();
    if constexpr (kQInRegisters) {
      if (t == 0 && warp_active) {
HG_UNROLL
        for (int kk = 0; kk < D / 16; ++kk) {
          if (kk * 16 < p.E) load_a<D>(qf[kk], q_s, warp * 16, kk * 16);
        }
      }
    }
    const int64_t k0 = t * kKeys;
    if (!warp_active || (p.causal && k0 > row0 + 15)) continue;  // nothing visible to this warp
    const uint16_t* k_t = kv_s + (t & 1) * 2 * kKeys * kS;
    const uint16_t* v_t = k_t + kKeys * kS;

    tc::FragC s[kKeys / 8];
    zero(s);
    if constexpr (kQInRegisters) {
      mma_abt<In, D, kKeys>(s, qf, k_t, 0, p.E);
    } else {
      mma_abt<In, D, kKeys>(s, q_s, warp * 16, k_t, 0, p.E);
    }
    if (dropout) fill_keep_bits<16, kGroups>(bits, drop, bh, row0, p.L, k0 / 4);

    // Scores; the per-element rules only where a tile needs them.
    const bool per_element = mask.data != nullptr || k0 + kKeys > p.S || row0 + 16 > p.L ||
                             (p.causal && k0 + kKeys - 1 > row0);
    float tile_max[2] = {-inf<float>(), -inf<float>()};
HG_UNROLL
    for (int j = 0; j < kKeys / 8; ++j) {
HG_UNROLL
      for (int e = 0; e < 4; ++e) {
        float x = s[j].x[e] * scale;
        if (per_element) {
          const int64_t row = row0 + g + 8 * (e >> 1), col = k0 + j * 8 + 2 * qd + (e & 1);
          if (col >= p.S || row >= p.L || (p.causal && causal_hidden(row, col))) {
            x = -inf<float>();
          } else if (mask.data != nullptr) {
            x += static_cast<float>(mask.at(b, h, row, col));
          }
        }
        s[j].x[e] = x;
        tile_max[e >> 1] = max_keep_nan(tile_max[e >> 1], x);
      }
    }
    float m_use[2], alpha[2];
HG_UNROLL
    for (int r = 0; r < 2; ++r) {
      const float m_new = max_keep_nan(m[r], quad_max(tile_max[r]));
      // A row that has seen nothing yet keeps P = 0 (e^(-inf - 0)); NaN stays NaN.
      m_use[r] = m_new == -inf<float>() ? 0.f : m_new;
      alpha[r] = exp2f((m[r] - m_use[r]) * kLog2e);
      m[r] = m_new;
    }
    float row_sum[2] = {0.f, 0.f};
HG_UNROLL
    for (int j = 0; j < kKeys / 8; ++j) {
HG_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float prob = exp2f((s[j].x[e] - m_use[r]) * kLog2e);
        row_sum[r] += prob;
        if (dropout) {
          const unsigned word = bits[(g + 8 * r) * kGroups + 2 * j + qd / 2];
          prob *= (word >> (2 * (qd & 1) + (e & 1))) & 1u ? keep_factor : 0.f;
        }
        s[j].x[e] = prob;
      }
    }
HG_UNROLL
    for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + row_sum[r];
HG_UNROLL
    for (int n = 0; n < D / 8; ++n) {
HG_UNROLL
      for (int e = 0; e < 4; ++e) o[n].x[e] *= alpha[e >> 1];
    }
    mma_pb<In, D, kKeys>(o, s, v_t, p.Ev);
  }
  tc::cp_async_wait<0>();
  if (!warp_active) return;
  float inv[2];
HG_UNROLL
  for (int r = 0; r < 2; ++r) {
    l[r] = quad_sum(l[r]);
    inv[r] = inverse_sum(l[r]);
  }
  store_rows<T, D>(o, inv, q_s + warp * 16 * kS, O, b, h, row0, p.L, p.Ev);
  if (qd == 0) {
HG_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int64_t row = row0 + g + 8 * r;
      if (row < p.L) lse[bh * p.L + row] = log_sum_exp(m[r], l[r]);
    }
  }
}

// ---------------------------------------------------------------- backward

// dQ (and dS for the mask's gradient). grid: batch*heads*q_tiles blocks.
// Shared memory: Q and dO [16 kWarps][D+8] each, two stages of K and V
// [kKeys][D+8], the warps' keep bits [kWarps][16][kKeys/4].
template <typename T, int D, int kWarps, int kKeys, int kMinBlocks>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
    fa2_dq(BackwardInputs<T, float> in, Rows<T> dQ, float* dmask, Problem p, int64_t q_tiles) {
  constexpr int kThreads = kWarps * 32, kRows = kWarps * 16, kS = kStride<D>;
  constexpr int kGroups = kKeys / 4;
  constexpr tc::Input In = kInput<T>;
  HG_DYNAMIC_SHARED(unsigned char, smem_raw);
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* do_s = q_s + kRows * kS;
  uint16_t* kv_s = do_s + kRows * kS;
  uint8_t* keep_s = reinterpret_cast<uint8_t*>(kv_s + 4 * kKeys * kS);

  const int warp = threadIdx.x / 32, lane = lane_index(), g = lane / 4, qd = lane % 4;
  const int64_t bh = blockIdx.x / q_tiles;
  const int64_t q0 = (q_tiles - 1 - blockIdx.x % q_tiles) * kRows;
  const int64_t b = bh / p.heads_q, h = bh % p.heads_q, hk = h / (p.heads_q / p.heads_kv);
  const int64_t row0 = q0 + warp * 16;
  const bool warp_active = row0 < p.L;
  const int64_t k_end = p.causal ? imin(p.S, imin(p.L, q0 + kRows)) : p.S;
  const int64_t n_tiles = ceil_div(k_end, kKeys);
  const DropoutState drop = dropout_state(p, in.rng);
  const bool dropout = drop.p > 0.0f;
  const float keep_factor = static_cast<float>(drop.keep_scale), scale = static_cast<float>(p.scale);
  uint8_t* bits = keep_s + warp * 16 * kGroups;

  auto stage_keys = [&](int64_t t) {
    uint16_t* k_dst = kv_s + (t & 1) * 2 * kKeys * kS;
    stage_rows<D, kKeys, kThreads>(k_dst, in.K, b, hk, t * kKeys, p.S, p.E);
    stage_rows<D, kKeys, kThreads>(k_dst + kKeys * kS, in.V, b, hk, t * kKeys, p.S, p.Ev);
  };
  stage_rows<D, kRows, kThreads>(q_s, in.Q, b, h, q0, p.L, p.E);
  stage_rows<D, kRows, kThreads>(do_s, in.dO, b, h, q0, p.L, p.Ev);
  if (n_tiles > 0) stage_keys(0);
  tc::cp_async_commit();

  float row_lse[2], row_d[2];
HG_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + g + 8 * r;
    row_lse[r] = row < p.L ? in.lse[bh * p.L + row] : 0.f;
    row_d[r] = row < p.L ? in.D[bh * p.L + row] : 0.f;
  }
  tc::FragC dq[D / 8];
  zero(dq);

  for (int64_t t = 0; t < n_tiles; ++t) {
    tc::cp_async_wait<0>();
    __syncthreads();
    if (t + 1 < n_tiles) stage_keys(t + 1);
    tc::cp_async_commit();
    const int64_t k0 = t * kKeys;
    if (!warp_active || (p.causal && k0 > row0 + 15)) continue;
    const uint16_t* k_t = kv_s + (t & 1) * 2 * kKeys * kS;
    const uint16_t* v_t = k_t + kKeys * kS;

    tc::FragC s[kKeys / 8], dp[kKeys / 8];
    zero(s);
    zero(dp);
    mma_abt<In, D, kKeys>(s, q_s, warp * 16, k_t, 0, p.E);
    mma_abt<In, D, kKeys>(dp, do_s, warp * 16, v_t, 0, p.Ev);
    if (dropout) fill_keep_bits<16, kGroups>(bits, drop, bh, row0, p.L, k0 / 4);
HG_UNROLL
    for (int j = 0; j < kKeys / 8; ++j) {
HG_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int64_t row = row0 + g + 8 * r, col = k0 + j * 8 + 2 * qd + (e & 1);
        float ds = 0.f;
        if (col < p.S && row < p.L) {
          float x = s[j].x[e] * scale;
          if (p.causal && causal_hidden(row, col)) {
            x = -inf<float>();
          } else if (in.mask.data != nullptr) {
            x += static_cast<float>(in.mask.at(b, h, row, col));
          }
          const float prob = exp2f((x - row_lse[r]) * kLog2e);
          float z = 1.f;
          if (dropout) {
            const unsigned word = bits[(g + 8 * r) * kGroups + 2 * j + qd / 2];
            z = (word >> (2 * (qd & 1) + (e & 1))) & 1u ? keep_factor : 0.f;
          }
          ds = prob * (dp[j].x[e] * z - row_d[r]);
          if (dmask != nullptr) dmask[(bh * p.L + row) * p.S + col] = ds;
        }
        s[j].x[e] = ds * scale;
      }
    }
    mma_pb<In, D, kKeys>(dq, s, k_t, p.E);
  }
  tc::cp_async_wait<0>();
  if (!warp_active) return;
  const float one[2] = {1.f, 1.f};
  store_rows<T, D>(dq, one, q_s + warp * 16 * kS, dQ, b, h, row0, p.L, p.E);
}

enum Part { kKeysAndValues, kValuesOnly, kKeysOnly };

// dK and / or dV. grid: batch*kv_heads*k_tiles blocks.
// Shared memory: K and V [16 kWarps][D+8] each, two stages of Q and dO
// [kQueries][D+8], the warps' keep bits [kWarps][kQueries][4].
template <typename T, int D, int kWarps, int kQueries, int kPart, int kMinBlocks>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
    fa2_dkdv(BackwardInputs<T, float> in, Rows<T> dK, Rows<T> dV, Problem p, int64_t k_tiles) {
  constexpr int kThreads = kWarps * 32, kKeys = kWarps * 16, kS = kStride<D>;
  constexpr bool kWantKeys = kPart != kValuesOnly, kWantValues = kPart != kKeysOnly;
  constexpr tc::Input In = kInput<T>;
  HG_DYNAMIC_SHARED(unsigned char, smem_raw);
  uint16_t* k_s = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* v_s = k_s + kKeys * kS;
  uint16_t* qdo_s = v_s + kKeys * kS;
  uint8_t* keep_s = reinterpret_cast<uint8_t*>(qdo_s + 4 * kQueries * kS);

  const int warp = threadIdx.x / 32, lane = lane_index(), g = lane / 4, qd = lane % 4;
  const int64_t bhk = blockIdx.x / k_tiles;
  const int64_t k0 = (blockIdx.x % k_tiles) * kKeys;  // the first key tiles see the most rows
  const int64_t b = bhk / p.heads_kv, hk = bhk % p.heads_kv;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t key0 = k0 + warp * 16;
  const bool warp_active = key0 < p.S;
  // Causal: rows before k0 see none of these keys.
  const int64_t first_row = p.causal ? (k0 / kQueries) * kQueries : 0;
  const int64_t tiles_per_head = first_row < p.L ? ceil_div(p.L - first_row, kQueries) : 0;
  const int64_t n_tiles = group * tiles_per_head;
  const DropoutState drop = dropout_state(p, in.rng);
  const bool dropout = drop.p > 0.0f;
  const float keep_factor = static_cast<float>(drop.keep_scale), scale = static_cast<float>(p.scale);
  uint8_t* bits = keep_s + warp * kQueries * 4;

  auto tile_head = [&](int64_t t) { return hk * group + t / tiles_per_head; };
  auto tile_row = [&](int64_t t) { return first_row + (t % tiles_per_head) * kQueries; };
  auto stage_queries = [&](int64_t t) {
    uint16_t* q_dst = qdo_s + (t & 1) * 2 * kQueries * kS;
    stage_rows<D, kQueries, kThreads>(q_dst, in.Q, b, tile_head(t), tile_row(t), p.L, p.E);
    stage_rows<D, kQueries, kThreads>(q_dst + kQueries * kS, in.dO, b, tile_head(t),
                                      tile_row(t), p.L, p.Ev);
  };
  stage_rows<D, kKeys, kThreads>(k_s, in.K, b, hk, k0, p.S, p.E);
  if constexpr (kWantKeys) stage_rows<D, kKeys, kThreads>(v_s, in.V, b, hk, k0, p.S, p.Ev);
  if (n_tiles > 0) stage_queries(0);
  tc::cp_async_commit();

  tc::FragC dk[kWantKeys ? D / 8 : 1], dv[kWantValues ? D / 8 : 1];
  zero(dk);
  zero(dv);

  for (int64_t t = 0; t < n_tiles; ++t) {
    tc::cp_async_wait<0>();
    __syncthreads();
    if (t + 1 < n_tiles) stage_queries(t + 1);
    tc::cp_async_commit();
    const int64_t h = tile_head(t), r0 = tile_row(t), bh = b * p.heads_q + h;
    if (!warp_active || (p.causal && r0 + kQueries - 1 < key0)) continue;
    const uint16_t* q_t = qdo_s + (t & 1) * 2 * kQueries * kS;
    const uint16_t* do_t = q_t + kQueries * kS;

    // Rows: the warp's 16 keys; columns: the tile's queries.
    tc::FragC st[kQueries / 8], dpt[kWantKeys ? kQueries / 8 : 1];
    zero(st);
    zero(dpt);
    mma_abt<In, D, kQueries>(st, k_s, warp * 16, q_t, 0, p.E);
    if constexpr (kWantKeys) mma_abt<In, D, kQueries>(dpt, v_s, warp * 16, do_t, 0, p.Ev);
    if (dropout) fill_keep_bits<kQueries, 4>(bits, drop, bh, r0, p.L, key0 / 4);
HG_UNROLL
    for (int j = 0; j < kQueries / 8; ++j) {
HG_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int key_local = g + 8 * (e >> 1), query_local = j * 8 + 2 * qd + (e & 1);
        const int64_t key = key0 + key_local, row = r0 + query_local;
        float pz = 0.f, ds = 0.f;
        if (key < p.S && row < p.L) {
          float x = st[j].x[e] * scale;
          if (p.causal && causal_hidden(row, key)) {
            x = -inf<float>();
          } else if (in.mask.data != nullptr) {
            x += static_cast<float>(in.mask.at(b, h, row, key));
          }
          const float prob = exp2f((x - in.lse[bh * p.L + row]) * kLog2e);
          float z = 1.f;
          if (dropout) {
            z = (bits[query_local * 4 + key_local / 4] >> (key_local & 3)) & 1u ? keep_factor
                                                                                : 0.f;
          }
          pz = prob * z;
          if constexpr (kWantKeys) ds = prob * (dpt[j].x[e] * z - in.D[bh * p.L + row]) * scale;
        }
        st[j].x[e] = pz;
        if constexpr (kWantKeys) dpt[j].x[e] = ds;
      }
    }
    if constexpr (kWantValues) mma_pb<In, D, kQueries>(dv, st, do_t, p.Ev);
    if constexpr (kWantKeys) mma_pb<In, D, kQueries>(dk, dpt, q_t, p.E);
  }
  tc::cp_async_wait<0>();
  if (!warp_active) return;
  const float one[2] = {1.f, 1.f};
  if constexpr (kWantKeys) store_rows<T, D>(dk, one, k_s + warp * 16 * kS, dK, b, hk, key0, p.S, p.E);
  if constexpr (kWantValues) {
    store_rows<T, D>(dv, one, v_s + warp * 16 * kS, dV, b, hk, key0, p.S, p.Ev);
  }
}

// ---------------------------------------------------------------- host side

// The head tile a call takes on the tensor cores (64, 128 or 256), or 0 when
// it keeps the kernels of attention.cu.
inline int head_tile(at::ScalarType type, const Problem& p, bool weights) {
  if (type != at::kHalf && type != at::kBFloat16) return 0;
  if (weights || p.E <= 0 || p.Ev <= 0 || p.E % 8 != 0 || p.Ev % 8 != 0) return 0;
  const int64_t widest = imax(p.E, p.Ev);
  if (widest > 256) return 0;
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 8) return 0;  // mma.sync m16n8k16 for bfloat16, ldmatrix, cp.async: sm_80
  return widest <= 64 ? 64 : widest <= 128 ? 128 : 256;
}

// t itself when every row starts on a 16-byte boundary (cp.async and the
// vector stores need it), else a contiguous copy.
inline at::Tensor with_aligned_rows(const at::Tensor& t) {
  const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
                       t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
  return aligned ? t : t.contiguous();
}

// Calls f with std::integral_constant<int, D> for the head tile D.
template <typename F>
void with_head_tile(int tile, F&& f) {
  if (tile == 64) f(std::integral_constant<int, 64>());
  if (tile == 128) f(std::integral_constant<int, 128>());
  if (tile == 256) f(std::integral_constant<int, 256>());
}

inline void forward(ForwardArgs& a, const Problem& p, int tile, const int64_t* rng,
                    cudaStream_t stream) {
  const at::Tensor q = with_aligned_rows(a.q), k = with_aligned_rows(a.k),
                   v = with_aligned_rows(a.v);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(q.scalar_type(), "handgrad::scaled_dot_product_attention (tensor cores)", [&] {
    with_head_tile(tile, [&](auto d) {
      constexpr int D = decltype(d)::value;
      using C = Config<D>;
      const int64_t q_tiles = ceil_div(p.L, 16 * C::kFwdWarps);
      cuda::launch<fa2_forward<scalar_t, D, C::kFwdWarps, C::kFwdKeys, C::kFwdQInRegisters,
                               C::kFwdBlocks>>(
          p.batch * p.heads_q * q_tiles, 32 * C::kFwdWarps,
          forward_shared_bytes(D, C::kFwdWarps, C::kFwdKeys), stream, const_rows<scalar_t>(q),
          const_rows<scalar_t>(k), const_rows<scalar_t>(v), mask_of<scalar_t>(a.mask),
          rows_of<scalar_t>(a.out), a.lse.data_ptr<float>(), rng, p, q_tiles);
    });
  });
}

// D = rowsum(dO o O) is in `row_dot` already (attention.cu's rowdot_kernel).
inline void backward(BackwardArgs& a, const Problem& p, int tile, const float* row_dot,
                     cudaStream_t stream) {
  const int64_t* rng = p.dropout.p > 0.0f ? a.rng_state.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(a.q.scalar_type(), "handgrad::scaled_dot_product_attention_backward (tensor cores)", [&] {
    const at::Tensor q = with_aligned_rows(a.q), k = with_aligned_rows(a.k),
                     v = with_aligned_rows(a.v), grad_out = with_aligned_rows(a.grad_out);
    const BackwardInputs<scalar_t, float> in{
        const_rows<scalar_t>(q), const_rows<scalar_t>(k), const_rows<scalar_t>(v),
        const_rows<scalar_t>(grad_out), mask_of<scalar_t>(a.mask), Mask<scalar_t>{nullptr, 0, 0, 0, 0},
        a.lse.data_ptr<float>(), row_dot, rng};
    with_head_tile(tile, [&](auto d) {
      constexpr int D = decltype(d)::value;
      using C = Config<D>;
      if (a.want_grad_kv) {
        const int64_t k_tiles = ceil_div(p.S, 16 * C::kKvWarps);
        const size_t bytes = dkdv_shared_bytes(D, C::kKvWarps, C::kKvQueries);
        const int64_t blocks = p.batch * p.heads_kv * k_tiles;
        const auto dK = rows_of<scalar_t>(a.grad_k), dV = rows_of<scalar_t>(a.grad_v);
        if constexpr (C::kKvSplit) {
          cuda::launch<fa2_dkdv<scalar_t, D, C::kKvWarps, C::kKvQueries, kValuesOnly,
                                C::kKvBlocks>>(blocks, 32 * C::kKvWarps, bytes, stream, in, dK,
                                               dV, p, k_tiles);
          cuda::launch<fa2_dkdv<scalar_t, D, C::kKvWarps, C::kKvQueries, kKeysOnly,
                                C::kKvBlocks>>(blocks, 32 * C::kKvWarps, bytes, stream, in, dK,
                                               dV, p, k_tiles);
        } else {
          cuda::launch<fa2_dkdv<scalar_t, D, C::kKvWarps, C::kKvQueries, kKeysAndValues,
                                C::kKvBlocks>>(blocks, 32 * C::kKvWarps, bytes, stream, in, dK,
                                               dV, p, k_tiles);
        }
      }
      if (a.want_grad_q || a.grad_mask.defined()) {
        const int64_t q_tiles = ceil_div(p.L, 16 * C::kDqWarps);
        cuda::launch<fa2_dq<scalar_t, D, C::kDqWarps, C::kDqKeys, C::kDqBlocks>>(
            p.batch * p.heads_q * q_tiles, 32 * C::kDqWarps,
            dq_shared_bytes(D, C::kDqWarps, C::kDqKeys), stream, in, rows_of<scalar_t>(a.grad_q),
            a.grad_mask.defined() ? a.grad_mask.data_ptr<float>() : nullptr, p, q_tiles);
      }
    });
  });
}

}  // namespace tensor_core
}  // namespace
}  // namespace attention
}  // namespace handgrad
