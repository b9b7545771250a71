// scaled_dot_product_attention, CUDA kernels (flash-attention style).
//
// Algorithm: one thread block per (batch*head, tile of query rows), one
// thread per query row. The block stages tiles of keys and values in shared
// memory; every thread scores its row against the tile (scale * q.k + mask,
// causal rule), folds the tile into its online softmax (running maximum m
// and sum l, earlier sums rescaled by e^(m_old - m_new); NaN and +inf scores
// make the row NaN, as in torch) and accumulates P V into a shared-memory row
// accumulator (stored column-major so the threads of a warp hit different
// banks). Saved for backward: O and lse = m + log l per query row (+inf for
// rows that see no key; those rows output 0, as torch's CPU implementation
// does). need_weights adds a kernel that recomputes each row's scores once
// its lse is known and writes the weights e^(S - lse) o Z.
// Gradient (P recomputed as e^(S - lse), Z the dropout factors regenerated
// with Philox from the stored seed, dW the incoming gradient of the weights
// output, if any -- out = W V with W = P o Z):
//   dV = (P o Z)^T dO,  dP = (dO V^T + dW) o Z,  D = rowsum(dO o O) + rowsum(W o dW),
//   dS = P o (dP - D),  dQ = scale dS K,  dK = scale dS^T Q,  dMask = dS.
// Backward is deterministic without atomics: a dK/dV kernel with one block
// per (batch, kv head, key tile) and one thread per key walks all query
// tiles of the group's query heads; a dQ kernel with one block per
// (batch*head, query tile) walks the key tiles and writes dS as the mask's
// gradient when it needs one (L x S per head, as the mask itself).
// Any head size: the tile shapes are chosen on the host from the head sizes
// and the device's shared-memory limit (choose_tiles): 64 rows per block and
// 32 staged rows while everything fits, then smaller tiles, then the feature
// dimensions are tiled too -- dot products summed over feature chunks staged
// one after another, and output features split over blockIdx.y (the scores
// are then recomputed once per output chunk). float32, float64 and
// float16/bfloat16 (staged and accumulated in float32). No cuBLAS.
// Dropout: the CUDA generator's Philox seed and offset (a PhiloxCudaState,
// so also under CUDA-graph capture) are unpacked on the device into the
// op's rng_state tensor by a one-thread kernel; every other kernel, backward
// included, reads them from there.
//
// Speed against native: not measured, no GPU here.
#include "ops/attention.h"

#include "common/cuda_launch.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#ifdef HANDGRAD_CUDA_EMULATION
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/zeros.h>
#else
#include <ATen/cuda/CUDAGeneratorImpl.h>
#endif

#include <algorithm>
#include <limits>
#include <mutex>

namespace handgrad {
namespace attention {
namespace {

constexpr int kMaxStage = 32;  // staged rows per tile at most (per-thread score arrays)

// The shape of one launch (choose_tiles).
struct Tiles {
  int rows;    // threads per block: one query row (forward, dQ) or key (dK/dV) each
  int stage;   // rows of the other operand staged per shared tile (<= kMaxStage)
  int64_t ce;  // query/key features staged per pass (E when they all fit)
  int64_t cv;  // value features staged per pass (Ev when they all fit)
};

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename acc_t>
__device__ __forceinline__ acc_t inf() { return static_cast<acc_t>(INFINITY); }

template <typename T>
struct Rows {
  T* data;
  int64_t sb, sh, sr;
  __device__ T* at(int64_t b, int64_t h, int64_t r) const { return data + b * sb + h * sh + r * sr; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return Rows<T>{static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
Rows<const T> const_rows(const at::Tensor& t) {
  return Rows<const T>{static_cast<const T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// A (B, Hq, L, S) tensor with any strides (the mask, the weights and their
// gradient), or none.
template <typename T>
struct Mask {
  const T* data;  // nullptr: none
  int64_t sb, sh, sr, sc;
  __device__ T at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return data[b * sb + h * sh + i * sr + j * sc];
  }
};

template <typename T>
Mask<T> mask_of(const at::Tensor& m) {
  if (!m.defined()) return Mask<T>{nullptr, 0, 0, 0, 0};
  return Mask<T>{static_cast<const T*>(m.data_ptr()), m.stride(0), m.stride(1), m.stride(2),
                 m.stride(3)};
}

// scale * dot + mask, or -inf where the key is hidden.
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t score(acc_t dot, const Problem& p, const Mask<T>& m, int64_t b,
                                       int64_t h, int64_t i, int64_t j) {
  if (p.causal && causal_hidden(i, j)) return -inf<acc_t>();
  acc_t s = dot * static_cast<acc_t>(p.scale);
  if (m.data != nullptr) s += static_cast<acc_t>(m.at(b, h, i, j));
  return s;
}

// The call's dropout state, seed and offset read from rng_state on the device.
__device__ __forceinline__ DropoutState dropout_state(const Problem& p, const int64_t* rng) {
  DropoutState d = p.dropout;
  if (d.p > 0.0f) {
    d.seed = static_cast<uint64_t>(rng[0]);
    d.offset = static_cast<uint64_t>(rng[1]);
  }
  return d;
}

template <typename acc_t>
__device__ __forceinline__ acc_t dropout_factor(const DropoutState& d, int64_t bh, int64_t i, int64_t j) {
  if (d.p <= 0.0f) return acc_t(1);
  return keep(d, bh, i, j) ? static_cast<acc_t>(keep_scale(d.p)) : acc_t(0);
}

// n features of thread t's own row into column t of a [n][width] shared
// array (column-major, so a warp's threads hit different banks); zeros for
// threads past the last row (row == nullptr).
template <typename T, typename acc_t>
__device__ __forceinline__ void own_row(const T* row, int64_t n, acc_t* dst, int width, int t) {
  for (int64_t e = 0; e < n; ++e) dst[e * width + t] = row != nullptr ? static_cast<acc_t>(row[e]) : acc_t(0);
}

// Features f0 .. f0+nf-1 of rows r0 .. r0+n-1 of head (b, h) of A into a
// row-major [n][nf] shared tile, by the whole block (between barriers).
template <typename T, typename acc_t>
__device__ __forceinline__ void stage(const Rows<const T>& A, int64_t b, int64_t h, int64_t r0,
                                      int n, int64_t f0, int64_t nf, acc_t* dst) {
  if (nf <= 0) return;
  for (int64_t x = threadIdx.x; x < int64_t(n) * nf; x += blockDim.x) {
    dst[x] = static_cast<acc_t>(A.at(b, h, r0 + x / nf)[f0 + x % nf]);
  }
}

// out[j] = own . other_j for the n staged rows other_j = rows r0.. of head
// (b, h) of `other`, over F features in chunks of `chunk` (one pass, two
// barriers, per chunk). The thread's own row lives in column t of own_s:
// loaded once by the caller when `resident` (chunk >= F), else chunk by
// chunk from own_row (nullptr for inactive threads). Every thread of the
// block calls this with the same F, chunk and n.
template <typename T, typename acc_t>
__device__ void dots(const T* own_row_ptr, bool resident, acc_t* own_s, int width,
                     const Rows<const T>& other, int64_t b, int64_t h, int64_t r0, int n,
                     int64_t F, int64_t chunk, acc_t* other_s, bool active, acc_t* out) {
  const int t = threadIdx.x;
  for (int j = 0; j < n; ++j) out[j] = 0;
  for (int64_t f0 = 0; f0 < F; f0 += chunk) {
    const int64_t nf = imin(chunk, F - f0);
    __syncthreads();
    if (!resident) own_row(own_row_ptr != nullptr ? own_row_ptr + f0 : nullptr, nf, own_s, width, t);
    stage(other, b, h, r0, n, f0, nf, other_s);
    __syncthreads();
    if (!active) continue;
    const acc_t* mine = own_s + (resident ? f0 : 0) * width + t;
    for (int j = 0; j < n; ++j) {
      acc_t dot = out[j];
      for (int64_t f = 0; f < nf; ++f) dot += mine[f * width] * other_s[j * nf + f];
      out[j] = dot;
    }
  }
}

// The (batch*head, query tile) of this block and the query row of this thread.
struct QueryTile {
  int64_t bh, b, h, hk, q0, i;
  __device__ QueryTile(const Problem& p, int64_t q_tiles, int rows) {
    bh = blockIdx.x / q_tiles;
    b = bh / p.heads_q;
    h = bh % p.heads_q;
    hk = h / (p.heads_q / p.heads_kv);
    q0 = (blockIdx.x % q_tiles) * rows;
    i = q0 + threadIdx.x;
  }
};

// One past the last key the query tile starting at q0 can see.
__device__ __forceinline__ int64_t tile_key_end(const Problem& p, int64_t q0, int rows) {
  return p.causal ? imin(p.S, imin(p.L, q0 + rows)) : p.S;
}

// ------------------------------------------------------------- forward

// Unpacks the generator's Philox state (values, or pointers under graph
// capture) into rng_state on the device.
__global__ void store_rng_state_kernel(at::PhiloxCudaState philox, int64_t* rng) {
  const auto seeds = at::cuda::philox::unpack(philox);
  rng[0] = static_cast<int64_t>(std::get<0>(seeds));
  rng[1] = static_cast<int64_t>(std::get<1>(seeds));
}

// grid (batch*head*query tiles, value-feature chunks of t.cv)
template <typename T, typename acc_t>
__global__ void forward_kernel_impl(Rows<const T> Q, Rows<const T> K, Rows<const T> V, Mask<T> mask,
                                    Rows<T> O, acc_t* __restrict__ lse, const int64_t* rng,
                                    Problem p, Tiles tiles, int64_t q_tiles) {
  const int rows = tiles.rows;
  HG_DYNAMIC_SHARED(unsigned char, smem_raw);
  acc_t* q_s = reinterpret_cast<acc_t*>(smem_raw);  // [ce][rows]
  acc_t* k_s = q_s + tiles.ce * rows;               // [stage][ce]
  acc_t* acc = k_s + tiles.stage * tiles.ce;        // [cv][rows]
  acc_t* v_s = acc + tiles.cv * rows;               // [stage][cv]

  const QueryTile tile(p, q_tiles, rows);
  const int64_t bh = tile.bh, b = tile.b, h = tile.h, hk = tile.hk, q0 = tile.q0, i = tile.i;
  const int t = threadIdx.x;
  const bool active = i < p.L;
  const int64_t v0 = blockIdx.y * tiles.cv, nv = imax(0, imin(tiles.cv, p.Ev - v0));
  const DropoutState drop = dropout_state(p, rng);
  const T* q_row = active ? Q.at(b, h, i) : nullptr;
  const bool q_resident = tiles.ce >= p.E;
  if (q_resident) own_row(q_row, p.E, q_s, rows, t);
  own_row<T, acc_t>(nullptr, nv, acc, rows, t);
  acc_t m = -inf<acc_t>(), l = 0;
  acc_t s[kMaxStage];

  const int64_t k_end = tile_key_end(p, q0, rows);
  for (int64_t k0 = 0; k0 < k_end; k0 += tiles.stage) {
    const int nk = static_cast<int>(imin(tiles.stage, k_end - k0));
    dots(q_row, q_resident, q_s, rows, K, b, hk, k0, nk, p.E, tiles.ce, k_s, active, s);
    __syncthreads();
    stage(V, b, hk, k0, nk, v0, nv, v_s);
    __syncthreads();
    if (!active) continue;
    acc_t tile_max = -inf<acc_t>();
    for (int j = 0; j < nk; ++j) {
      s[j] = score<T, acc_t>(s[j], p, mask, b, h, i, k0 + j);
      tile_max = max_keep_nan(tile_max, s[j]);
    }
    const acc_t m_new = max_keep_nan(m, tile_max);
    if (m_new == -inf<acc_t>()) continue;  // nothing visible yet in this row
    const acc_t alpha = m == -inf<acc_t>() ? acc_t(0) : exp(m - m_new);  // NaN when m_new is
    acc_t sum = 0;
    for (int j = 0; j < nk; ++j) {
      s[j] = exp(s[j] - m_new);
      sum += s[j];
      s[j] *= dropout_factor<acc_t>(drop, bh, i, k0 + j);
    }
    l = l * alpha + sum;
    m = m_new;
    for (int64_t e = 0; e < nv; ++e) {
      acc_t a = acc[e * rows + t] * alpha;
      for (int j = 0; j < nk; ++j) a += s[j] * v_s[j * nv + e];
      acc[e * rows + t] = a;
    }
  }
  if (!active) return;
  const acc_t inv = inverse_sum(l);
  T* o = O.at(b, h, i) + v0;
  for (int64_t e = 0; e < nv; ++e) o[e] = static_cast<T>(acc[e * rows + t] * inv);
  if (blockIdx.y == 0) lse[bh * p.L + i] = log_sum_exp(m, l);
}

// The weights e^(S - lse) o Z of every visible key, (B, Hq, L, S)
// contiguous; grid (batch*head*query tiles).
template <typename T, typename acc_t>
__global__ void weights_kernel(Rows<const T> Q, Rows<const T> K, Mask<T> mask,
                               const acc_t* __restrict__ lse, const int64_t* rng, T* weights,
                               Problem p, Tiles tiles, int64_t q_tiles) {
  const int rows = tiles.rows;
  HG_DYNAMIC_SHARED(unsigned char, smem_raw);
  acc_t* q_s = reinterpret_cast<acc_t*>(smem_raw);  // [ce][rows]
  acc_t* k_s = q_s + tiles.ce * rows;               // [stage][ce]
  const QueryTile tile(p, q_tiles, rows);
  const int64_t bh = tile.bh, b = tile.b, h = tile.h, hk = tile.hk, i = tile.i;
  const int t = threadIdx.x;
  const bool active = i < p.L;
  const DropoutState drop = dropout_state(p, rng);
  const T* q_row = active ? Q.at(b, h, i) : nullptr;
  const bool q_resident = tiles.ce >= p.E;
  if (q_resident) own_row(q_row, p.E, q_s, rows, t);
  const acc_t row_lse = active ? lse[bh * p.L + i] : acc_t(0);
  acc_t s[kMaxStage];
  const int64_t k_end = tile_key_end(p, tile.q0, rows);
  for (int64_t k0 = 0; k0 < k_end; k0 += tiles.stage) {
    const int nk = static_cast<int>(imin(tiles.stage, k_end - k0));
    dots(q_row, q_resident, q_s, rows, K, b, hk, k0, nk, p.E, tiles.ce, k_s, active, s);
    if (!active) continue;
    T* w = weights + (bh * p.L + i) * p.S + k0;
    for (int j = 0; j < nk; ++j) {
      const acc_t prob = exp(score<T, acc_t>(s[j], p, mask, b, h, i, k0 + j) - row_lse);
      w[j] = static_cast<T>(prob * dropout_factor<acc_t>(drop, bh, i, k0 + j));
    }
  }
}

// ------------------------------------------------------------- backward

// D = rowsum(dO o O) (+ rowsum(W o dW)), one per query row.
template <typename T, typename acc_t>
__global__ void rowdot_kernel(Rows<const T> dO, Rows<const T> O, Mask<T> W, Mask<T> dW,
                              acc_t* __restrict__ D, Problem p) {
  const int64_t n = p.batch * p.heads_q * p.L;
  for (int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; x < n;
       x += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = x % p.L, bh = x / p.L;
    const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
    const T* g = dO.at(b, h, i);
    const T* o = O.at(b, h, i);
    acc_t sum = 0;
    for (int64_t e = 0; e < p.Ev; ++e) sum += static_cast<acc_t>(g[e]) * static_cast<acc_t>(o[e]);
    if (W.data != nullptr) {
      for (int64_t j = 0; j < p.S; ++j) {
        sum += static_cast<acc_t>(W.at(b, h, i, j)) * static_cast<acc_t>(dW.at(b, h, i, j));
      }
    }
    D[x] = sum;
  }
}

// Read-only inputs of both backward kernels.
template <typename T, typename acc_t>
struct BackwardInputs {
  Rows<const T> Q, K, V, dO;
  Mask<T> mask, dW;
  const acc_t* lse;
  const acc_t* D;
  const int64_t* rng;
};

// One block per (batch, kv head, key tile), one thread per key; blockIdx.y
// picks the output features: dK's [y ce, (y+1) ce) and dV's [y cv, (y+1) cv).
template <typename T, typename acc_t>
__global__ void dkdv_kernel(BackwardInputs<T, acc_t> in, Rows<T> dK, Rows<T> dV, Problem p,
                            Tiles tiles, int64_t k_tiles) {
  const int rows = tiles.rows;
  HG_DYNAMIC_SHARED(unsigned char, smem_raw);
  acc_t* k_s = reinterpret_cast<acc_t*>(smem_raw);  // [ce][rows]
  acc_t* v_s = k_s + tiles.ce * rows;               // [cv][rows]
  acc_t* dk = v_s + tiles.cv * rows;                // [ce][rows]
  acc_t* dv = dk + tiles.ce * rows;                 // [cv][rows]
  acc_t* q_s = dv + tiles.cv * rows;                // [stage][ce]
  acc_t* do_s = q_s + tiles.stage * tiles.ce;       // [stage][cv]

  const int64_t bhk = blockIdx.x / k_tiles, kt = blockIdx.x % k_tiles;
  const int64_t b = bhk / p.heads_kv, hk = bhk % p.heads_kv;
  const int64_t group = p.heads_q / p.heads_kv;
  const int t = threadIdx.x;
  const int64_t k0 = kt * rows, j = k0 + t;
  const bool active = j < p.S;
  const int64_t ko0 = blockIdx.y * tiles.ce, nko = imax(0, imin(tiles.ce, p.E - ko0));
  const int64_t vo0 = blockIdx.y * tiles.cv, nvo = imax(0, imin(tiles.cv, p.Ev - vo0));
  const bool k_resident = tiles.ce >= p.E, v_resident = tiles.cv >= p.Ev;
  const T* k_row = active ? in.K.at(b, hk, j) : nullptr;
  const T* v_row = active ? in.V.at(b, hk, j) : nullptr;
  if (k_resident) own_row(k_row, p.E, k_s, rows, t);
  if (v_resident) own_row(v_row, p.Ev, v_s, rows, t);
  own_row<T, acc_t>(nullptr, nko, dk, rows, t);
  own_row<T, acc_t>(nullptr, nvo, dv, rows, t);
  const DropoutState drop = dropout_state(p, in.rng);
  const acc_t scale = static_cast<acc_t>(p.scale);
  acc_t pz[kMaxStage], ds[kMaxStage];
  const int64_t first_row = p.causal ? (k0 / tiles.stage) * tiles.stage : 0;
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g, bh = b * p.heads_q + h;
    for (int64_t r0 = first_row; r0 < p.L; r0 += tiles.stage) {
      const int nq = static_cast<int>(imin(tiles.stage, p.L - r0));
      dots(k_row, k_resident, k_s, rows, in.Q, b, h, r0, nq, p.E, tiles.ce, q_s, active, pz);
      dots(v_row, v_resident, v_s, rows, in.dO, b, h, r0, nq, p.Ev, tiles.cv, do_s, active, ds);
      if (active) {
        for (int r = 0; r < nq; ++r) {
          const int64_t i = r0 + r;
          // lse and D: the same address for the whole block (a broadcast read)
          const acc_t prob = exp(score<T, acc_t>(pz[r], p, in.mask, b, h, i, j) - in.lse[bh * p.L + i]);
          const acc_t z = dropout_factor<acc_t>(drop, bh, i, j);
          const acc_t dw = in.dW.data != nullptr ? static_cast<acc_t>(in.dW.at(b, h, i, j)) : acc_t(0);
          pz[r] = prob * z;
          ds[r] = prob * ((ds[r] + dw) * z - in.D[bh * p.L + i]) * scale;
        }
      }
      // The output features of this block, unless the passes above left them staged.
      if (!k_resident || !v_resident) {
        __syncthreads();
        if (!k_resident) stage(in.Q, b, h, r0, nq, ko0, nko, q_s);
        if (!v_resident) stage(in.dO, b, h, r0, nq, vo0, nvo, do_s);
        __syncthreads();
      }
      if (!active) continue;
      for (int64_t e = 0; e < nvo; ++e) {
        acc_t a = dv[e * rows + t];
        for (int r = 0; r < nq; ++r) a += pz[r] * do_s[r * nvo + e];
        dv[e * rows + t] = a;
      }
      for (int64_t e = 0; e < nko; ++e) {
        acc_t a = dk[e * rows + t];
        for (int r = 0; r < nq; ++r) a += ds[r] * q_s[r * nko + e];
        dk[e * rows + t] = a;
      }
    }
  }
  if (!active) return;
  T* dkr = dK.at(b, hk, j) + ko0;
  T* dvr = dV.at(b, hk, j) + vo0;
  for (int64_t e = 0; e < nko; ++e) dkr[e] = static_cast<T>(dk[e * rows + t]);
  for (int64_t e = 0; e < nvo; ++e) dvr[e] = static_cast<T>(dv[e * rows + t]);
}

// One block per (batch*head, query tile), one thread per query row;
// blockIdx.y picks dQ's features [y ce, (y+1) ce). Blocks with y = 0 write
// dS into dmask ((B, Hq, L, S) contiguous) when it is not null.
template <typename T, typename acc_t>
__global__ void dq_kernel(BackwardInputs<T, acc_t> in, Rows<T> dQ, acc_t* dmask, Problem p,
                          Tiles tiles, int64_t q_tiles) {
  const int rows = tiles.rows;
  HG_DYNAMIC_SHARED(unsigned char, smem_raw);
  acc_t* q_s = reinterpret_cast<acc_t*>(smem_raw);  // [ce][rows]
  acc_t* do_s = q_s + tiles.ce * rows;              // [cv][rows]
  acc_t* dq = do_s + tiles.cv * rows;               // [ce][rows]
  acc_t* k_s = dq + tiles.ce * rows;                // [stage][ce]
  acc_t* v_s = k_s + tiles.stage * tiles.ce;        // [stage][cv]

  const QueryTile tile(p, q_tiles, rows);
  const int64_t bh = tile.bh, b = tile.b, h = tile.h, hk = tile.hk, q0 = tile.q0, i = tile.i;
  const int t = threadIdx.x;
  const bool active = i < p.L;
  const int64_t o0 = blockIdx.y * tiles.ce, no = imax(0, imin(tiles.ce, p.E - o0));
  const bool q_resident = tiles.ce >= p.E, do_resident = tiles.cv >= p.Ev;
  const T* q_row = active ? in.Q.at(b, h, i) : nullptr;
  const T* do_row = active ? in.dO.at(b, h, i) : nullptr;
  if (q_resident) own_row(q_row, p.E, q_s, rows, t);
  if (do_resident) own_row(do_row, p.Ev, do_s, rows, t);
  own_row<T, acc_t>(nullptr, no, dq, rows, t);
  const DropoutState drop = dropout_state(p, in.rng);
  const acc_t row_lse = active ? in.lse[bh * p.L + i] : acc_t(0);
  const acc_t row_d = active ? in.D[bh * p.L + i] : acc_t(0);
  const acc_t scale = static_cast<acc_t>(p.scale);
  acc_t ds[kMaxStage], dp[kMaxStage];
  const int64_t k_end = tile_key_end(p, q0, rows);
  for (int64_t k0 = 0; k0 < k_end; k0 += tiles.stage) {
    const int nk = static_cast<int>(imin(tiles.stage, k_end - k0));
    dots(q_row, q_resident, q_s, rows, in.K, b, hk, k0, nk, p.E, tiles.ce, k_s, active, ds);
    dots(do_row, do_resident, do_s, rows, in.V, b, hk, k0, nk, p.Ev, tiles.cv, v_s, active, dp);
    if (active) {
      for (int jj = 0; jj < nk; ++jj) {
        const int64_t j = k0 + jj;
        const acc_t prob = exp(score<T, acc_t>(ds[jj], p, in.mask, b, h, i, j) - row_lse);
        const acc_t dw = in.dW.data != nullptr ? static_cast<acc_t>(in.dW.at(b, h, i, j)) : acc_t(0);
        ds[jj] = prob * ((dp[jj] + dw) * dropout_factor<acc_t>(drop, bh, i, j) - row_d);
        if (dmask != nullptr && blockIdx.y == 0) dmask[(bh * p.L + i) * p.S + j] = ds[jj];
      }
    }
    // dQ's features of this block, unless the pass above left them staged.
    if (!q_resident) {
      __syncthreads();
      stage(in.K, b, hk, k0, nk, o0, no, k_s);
      __syncthreads();
    }
    if (!active) continue;
    for (int64_t e = 0; e < no; ++e) {
      acc_t a = dq[e * rows + t];
      for (int jj = 0; jj < nk; ++jj) a += ds[jj] * scale * k_s[jj * no + e];
      dq[e * rows + t] = a;
    }
  }
  if (!active) return;
  T* r = dQ.at(b, h, i) + o0;
  for (int64_t e = 0; e < no; ++e) r[e] = static_cast<T>(dq[e * rows + t]);
}

// ------------------------------------------------------------- host side

enum class KernelKind { kForward, kWeights, kDkdv, kDq };

// Shared-memory elements of a launch (the layouts at the top of each kernel).
int64_t shared_elements(KernelKind kind, const Tiles& t) {
  switch (kind) {
    case KernelKind::kForward: return (t.ce + t.cv) * (t.rows + t.stage);
    case KernelKind::kWeights: return t.ce * (t.rows + t.stage);
    case KernelKind::kDkdv: return (t.ce + t.cv) * (2 * t.rows + t.stage);
    case KernelKind::kDq: return t.ce * (2 * t.rows + t.stage) + t.cv * (t.rows + t.stage);
  }
  return 0;
}

size_t shared_limit() {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(limit);
}

// The largest tiles whose shared memory fits: 64 rows per block and 32
// staged rows (every head size up to 128 in float64, 256 in float32 in the
// forward), then smaller tiles, then feature chunks (halving the larger of
// the two chunk sizes until it fits; a small head dimension stays whole).
Tiles choose_tiles(KernelKind kind, const Problem& p, size_t elem_bytes, size_t limit) {
  const int64_t E = imax(1, p.E), Ev = imax(1, p.Ev);
  auto fits = [&](const Tiles& t) {
    return static_cast<size_t>(shared_elements(kind, t)) * elem_bytes <= limit;
  };
  constexpr int kCandidates[][2] = {{64, kMaxStage}, {32, kMaxStage}, {32, 16}};
  for (const auto& c : kCandidates) {
    const Tiles t{c[0], c[1], E, Ev};
    if (fits(t)) return t;
  }
  Tiles t{32, kMaxStage, E, Ev};
  while (!fits(t)) {
    if (t.ce >= t.cv) {
      t.ce = (t.ce + 1) / 2;
    } else {
      t.cv = (t.cv + 1) / 2;
    }
  }
  return t;
}

size_t shared_bytes(KernelKind kind, const Tiles& t, size_t elem_bytes) {
  return static_cast<size_t>(shared_elements(kind, t)) * elem_bytes;
}

// The Philox state of one call from the generator of the inputs' device,
// with `increment` offsets reserved for it (as native's CUDA dropout does;
// CUDA-graph safe: under capture the state holds device pointers that only
// the kernel reads). `holder` keeps alive what the state points to.
at::PhiloxCudaState philox_state(const at::Tensor& like, uint64_t increment, at::Tensor& holder) {
#ifdef HANDGRAD_CUDA_EMULATION
  // The emulator has no CUDA generator. Seed and offset come from torch's
  // default CPU generator (so torch.manual_seed reproduces emulated runs) and
  // reach the kernel the way a graph capture hands them over: through memory
  // behind the pointers of a captured PhiloxCudaState.
  (void)increment;
  holder = at::zeros({2}, like.options().dtype(at::kLong));
  auto gen = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    auto* impl = at::check_generator<at::CPUGeneratorImpl>(gen);
    holder.data_ptr<int64_t>()[0] = static_cast<int64_t>(impl->random64());
    holder.data_ptr<int64_t>()[1] = static_cast<int64_t>(impl->random64());
  }
  int64_t* state = holder.data_ptr<int64_t>();
  return at::PhiloxCudaState(state, state + 1, 0);
#else
  (void)holder;
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(like.device().index()));
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->philox_cuda_state(increment);
#endif
}

void forward_kernel(ForwardArgs& a, Problem& p) {
  const c10::cuda::CUDAGuard guard(a.q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t limit = shared_limit();
  const int64_t* rng = nullptr;
  at::Tensor holder;
  if (p.dropout.p > 0.0f) {
    // keep_bits4 uses ceil(S / 4) Philox counters per (head, row) after offset / 4.
    const uint64_t increment = 4 * static_cast<uint64_t>(ceil_div(p.S, 4));
    const at::PhiloxCudaState philox = philox_state(a.q, increment, holder);
    cuda::launch<store_rng_state_kernel>(1, 1, 0, stream, philox, a.rng_state.data_ptr<int64_t>());
    rng = a.rng_state.data_ptr<int64_t>();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.q.scalar_type(),
                                  "handgrad::scaled_dot_product_attention", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto Q = const_rows<scalar_t>(a.q), K = const_rows<scalar_t>(a.k);
    const auto mask = mask_of<scalar_t>(a.mask);
    const Tiles t = choose_tiles(KernelKind::kForward, p, sizeof(acc_t), limit);
    const int64_t q_tiles = ceil_div(p.L, t.rows);
    cuda::launch<forward_kernel_impl<scalar_t, acc_t>>(
        cuda::Dims(p.batch * p.heads_q * q_tiles, imax(1, ceil_div(p.Ev, t.cv))), t.rows,
        shared_bytes(KernelKind::kForward, t, sizeof(acc_t)), stream, Q, K,
        const_rows<scalar_t>(a.v), mask, rows_of<scalar_t>(a.out), a.lse.data_ptr<acc_t>(), rng,
        p, t, q_tiles);
    if (a.weights.defined()) {
      const Tiles tw = choose_tiles(KernelKind::kWeights, p, sizeof(acc_t), limit);
      const int64_t w_tiles = ceil_div(p.L, tw.rows);
      cuda::launch<weights_kernel<scalar_t, acc_t>>(
          p.batch * p.heads_q * w_tiles, tw.rows, shared_bytes(KernelKind::kWeights, tw, sizeof(acc_t)),
          stream, Q, K, mask, a.lse.data_ptr<acc_t>(), rng, a.weights.data_ptr<scalar_t>(), p, tw,
          w_tiles);
    }
  });
}

void backward_kernel(BackwardArgs& a, const Problem& p) {
  const c10::cuda::CUDAGuard guard(a.q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t limit = shared_limit();
  at::Tensor D = at::empty({p.batch * p.heads_q * p.L}, a.lse.options());
  const int64_t* rng = p.dropout.p > 0.0f ? a.rng_state.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.q.scalar_type(),
                                  "handgrad::scaled_dot_product_attention_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardInputs<scalar_t, acc_t> in{
        const_rows<scalar_t>(a.q), const_rows<scalar_t>(a.k), const_rows<scalar_t>(a.v),
        const_rows<scalar_t>(a.grad_out), mask_of<scalar_t>(a.mask),
        mask_of<scalar_t>(a.grad_weights), a.lse.data_ptr<acc_t>(), D.data_ptr<acc_t>(), rng};
    const int64_t rows = p.batch * p.heads_q * p.L;
    cuda::launch<rowdot_kernel<scalar_t, acc_t>>(std::min<int64_t>(ceil_div(rows, 256), 65535), 256,
                                                 0, stream, in.dO, const_rows<scalar_t>(a.out),
                                                 mask_of<scalar_t>(a.weights), in.dW,
                                                 D.data_ptr<acc_t>(), p);
    if (a.want_grad_kv) {
      const Tiles t = choose_tiles(KernelKind::kDkdv, p, sizeof(acc_t), limit);
      const int64_t k_tiles = ceil_div(p.S, t.rows);
      const int64_t chunks = imax(1, imax(ceil_div(p.E, t.ce), ceil_div(p.Ev, t.cv)));
      cuda::launch<dkdv_kernel<scalar_t, acc_t>>(
          cuda::Dims(p.batch * p.heads_kv * k_tiles, chunks), t.rows,
          shared_bytes(KernelKind::kDkdv, t, sizeof(acc_t)), stream, in, rows_of<scalar_t>(a.grad_k),
          rows_of<scalar_t>(a.grad_v), p, t, k_tiles);
    }
    if (a.want_grad_q || a.grad_mask.defined()) {
      const Tiles t = choose_tiles(KernelKind::kDq, p, sizeof(acc_t), limit);
      const int64_t q_tiles = ceil_div(p.L, t.rows);
      cuda::launch<dq_kernel<scalar_t, acc_t>>(
          cuda::Dims(p.batch * p.heads_q * q_tiles, imax(1, ceil_div(p.E, t.ce))), t.rows,
          shared_bytes(KernelKind::kDq, t, sizeof(acc_t)), stream, in, rows_of<scalar_t>(a.grad_q),
          a.grad_mask.defined() ? a.grad_mask.data_ptr<acc_t>() : nullptr, p, t, q_tiles);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpa_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    c10::optional<double> scale, bool enable_gqa, bool need_weights) {
  return forward(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, need_weights,
                 &forward_kernel);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpa_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& attn_mask,
    double dropout_p, bool is_causal, c10::optional<double> scale, bool enable_gqa,
    const at::Tensor& rng_state, const c10::optional<at::Tensor>& weights,
    const c10::optional<at::Tensor>& grad_weights, std::array<bool, 4> output_mask) {
  return backward(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale,
                  enable_gqa, rng_state, weights, grad_weights, output_mask, &backward_kernel);
}

}  // namespace
}  // namespace attention
}  // namespace handgrad

TORCH_LIBRARY_IMPL(handgrad, CUDA, m) {
  m.impl("scaled_dot_product_attention", &handgrad::attention::sdpa_cuda);
  m.impl("scaled_dot_product_attention_backward", &handgrad::attention::sdpa_backward_cuda);
}
