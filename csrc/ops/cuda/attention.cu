// scaled_dot_product_attention, CUDA kernels (flash-attention style).
//
// Algorithm: one thread block per (batch*head, tile of kBlockQ query rows),
// one thread per query row. The block stages tiles of kBlockK keys and
// values in shared memory; every thread scores its row against the tile
// (scale * q.k + mask, causal rule), folds the tile into its online softmax
// (running maximum m and sum l, earlier sums rescaled by e^(m_old - m_new))
// and accumulates P V into a shared-memory row accumulator (stored
// column-major so the 64 threads of a block hit 64 different banks). Saved
// for backward: O and lse = m + log l per query row (+inf for rows that see
// no key; those rows output 0, as torch's CPU implementation does).
// Gradient (P recomputed as e^(S - lse), Z the dropout factors regenerated
// with Philox from the stored seed):
//   dV = (P o Z)^T dO,  dP = (dO V^T) o Z,  D = rowsum(dO o O),
//   dS = P o (dP - D),  dQ = scale dS K,  dK = scale dS^T Q.
// Backward is deterministic without atomics: a dK/dV kernel with one block
// per (batch, kv head, key tile) and one thread per key walks all query
// tiles of the group's query heads; a dQ kernel with one block per
// (batch*head, query tile) walks the key tiles. float32, float64 and
// float16/bfloat16 (staged and accumulated in float32). No cuBLAS.
//
// Speed against native: not measured, no GPU here.
#include "ops/attention.h"

#include "common/cuda_launch.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace handgrad {
namespace attention {
namespace {

constexpr int kBlockQ = 64;  // query rows (threads) per forward / dQ block
constexpr int kBlockK = 32;  // keys staged per shared-memory tile
constexpr int kBlockKV = 64; // keys (threads) per dK/dV block
constexpr int kBlockQB = 32; // query rows staged per dK/dV tile

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

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
struct Mask {
  const T* data;  // nullptr: no mask
  int64_t sb, sh, sr, sc;
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
  if (m.data != nullptr) s += static_cast<acc_t>(m.data[b * m.sb + h * m.sh + i * m.sr + j * m.sc]);
  return s;
}

template <typename acc_t>
__device__ __forceinline__ acc_t dropout_factor(const Problem& p, int64_t bh, int64_t i, int64_t j) {
  if (p.dropout.p <= 0.0f) return acc_t(1);
  return keep(p.dropout, bh, i, j) ? static_cast<acc_t>(keep_scale(p.dropout.p)) : acc_t(0);
}

// Thread t's own row (of n features) into column t of a [n][width] shared
// array (column-major, so a warp's threads hit different banks); zeros for
// threads past the last row (row == nullptr).
template <typename T, typename acc_t>
__device__ __forceinline__ void own_row(const T* row, int64_t n, acc_t* dst, int width, int t) {
  for (int64_t e = 0; e < n; ++e) dst[e * width + t] = row != nullptr ? static_cast<acc_t>(row[e]) : acc_t(0);
}

// Rows r0 .. r0+n-1 of head (b, h) of A and B into row-major shared tiles,
// staged by the whole block between two barriers.
template <typename T, typename acc_t>
__device__ __forceinline__ void stage_rows(const Rows<const T>& A, const Rows<const T>& B,
                                           int64_t b, int64_t h, int64_t r0, int n, int64_t ea,
                                           int64_t eb, acc_t* a_s, acc_t* b_s) {
  __syncthreads();
  for (int64_t x = threadIdx.x; x < int64_t(n) * ea; x += blockDim.x) {
    a_s[x] = static_cast<acc_t>(A.at(b, h, r0 + x / ea)[x % ea]);
  }
  for (int64_t x = threadIdx.x; x < int64_t(n) * eb; x += blockDim.x) {
    b_s[x] = static_cast<acc_t>(B.at(b, h, r0 + x / eb)[x % eb]);
  }
  __syncthreads();
}

// The (batch*head, query tile) of this block and the query row of this thread.
struct QueryTile {
  int64_t bh, b, h, hk, q0, i;
  __device__ QueryTile(const Problem& p, int64_t q_tiles) {
    bh = blockIdx.x / q_tiles;
    b = bh / p.heads_q;
    h = bh % p.heads_q;
    hk = h / (p.heads_q / p.heads_kv);
    q0 = (blockIdx.x % q_tiles) * kBlockQ;
    i = q0 + threadIdx.x;
  }
};

// One past the last key the query tile starting at q0 can see.
__device__ __forceinline__ int64_t tile_key_end(const Problem& p, int64_t q0) {
  return p.causal ? imin(p.S, imin(p.L, q0 + kBlockQ)) : p.S;
}

// ------------------------------------------------------------- forward

template <typename T, typename acc_t>
__global__ void forward_kernel_impl(Rows<const T> Q, Rows<const T> K, Rows<const T> V, Mask<T> mask,
                                    Rows<T> O, acc_t* __restrict__ lse, Problem p, int64_t q_tiles) {
  HG_DYNAMIC_SHARED(unsigned char, smem_raw);
  acc_t* q_s = reinterpret_cast<acc_t*>(smem_raw);  // [E][kBlockQ]
  acc_t* acc = q_s + p.E * kBlockQ;                 // [Ev][kBlockQ]
  acc_t* k_s = acc + p.Ev * kBlockQ;                // [kBlockK][E]
  acc_t* v_s = k_s + kBlockK * p.E;                 // [kBlockK][Ev]

  const QueryTile tile(p, q_tiles);
  const int64_t bh = tile.bh, b = tile.b, h = tile.h, hk = tile.hk, q0 = tile.q0, i = tile.i;
  const int t = threadIdx.x;
  const bool active = i < p.L;

  own_row(active ? Q.at(b, h, i) : nullptr, p.E, q_s, kBlockQ, t);
  own_row<T, acc_t>(nullptr, p.Ev, acc, kBlockQ, t);
  acc_t m = -inf<acc_t>(), l = 0;
  acc_t s[kBlockK];

  const int64_t k_end = tile_key_end(p, q0);
  for (int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
    const int nk = static_cast<int>(imin(kBlockK, k_end - k0));
    stage_rows(K, V, b, hk, k0, nk, p.E, p.Ev, k_s, v_s);
    if (!active) continue;
    acc_t tile_max = -inf<acc_t>();
    for (int j = 0; j < nk; ++j) {
      acc_t dot = 0;
      for (int64_t e = 0; e < p.E; ++e) dot += q_s[e * kBlockQ + t] * k_s[j * p.E + e];
      s[j] = score<T, acc_t>(dot, p, mask, b, h, i, k0 + j);
      tile_max = s[j] > tile_max ? s[j] : tile_max;
    }
    const acc_t m_new = tile_max > m ? tile_max : m;
    if (m_new == -inf<acc_t>()) continue;
    const acc_t alpha = m == -inf<acc_t>() ? acc_t(0) : exp(m - m_new);
    acc_t sum = 0;
    for (int j = 0; j < nk; ++j) {
      s[j] = exp(s[j] - m_new);
      sum += s[j];
      s[j] *= dropout_factor<acc_t>(p, bh, i, k0 + j);
    }
    l = l * alpha + sum;
    m = m_new;
    for (int64_t e = 0; e < p.Ev; ++e) {
      acc_t a = acc[e * kBlockQ + t] * alpha;
      for (int j = 0; j < nk; ++j) a += s[j] * v_s[j * p.Ev + e];
      acc[e * kBlockQ + t] = a;
    }
  }
  if (!active) return;
  const acc_t inv = l > acc_t(0) ? acc_t(1) / l : acc_t(0);
  T* o = O.at(b, h, i);
  for (int64_t e = 0; e < p.Ev; ++e) o[e] = static_cast<T>(acc[e * kBlockQ + t] * inv);
  lse[bh * p.L + i] = l > acc_t(0) ? m + log(l) : inf<acc_t>();
}

// ------------------------------------------------------------- backward

template <typename T, typename acc_t>
__global__ void rowdot_kernel(Rows<const T> dO, Rows<const T> O, acc_t* __restrict__ D, Problem p) {
  const int64_t n = p.batch * p.heads_q * p.L;
  for (int64_t x = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; x < n;
       x += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = x % p.L, bh = x / p.L;
    const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
    const T* g = dO.at(b, h, i);
    const T* o = O.at(b, h, i);
    acc_t sum = 0;
    for (int64_t e = 0; e < p.Ev; ++e) sum += static_cast<acc_t>(g[e]) * static_cast<acc_t>(o[e]);
    D[x] = sum;
  }
}

// One block per (batch, kv head, key tile), one thread per key.
template <typename T, typename acc_t>
__global__ void dkdv_kernel(Rows<const T> Q, Rows<const T> K, Rows<const T> V, Rows<const T> dO,
                            Mask<T> mask, const acc_t* __restrict__ lse,
                            const acc_t* __restrict__ D, Rows<T> dK, Rows<T> dV, Problem p,
                            int64_t k_tiles) {
  HG_DYNAMIC_SHARED(unsigned char, smem_raw);
  acc_t* k_s = reinterpret_cast<acc_t*>(smem_raw);  // [E][kBlockKV]
  acc_t* v_s = k_s + p.E * kBlockKV;                // [Ev][kBlockKV]
  acc_t* dk = v_s + p.Ev * kBlockKV;                // [E][kBlockKV]
  acc_t* dv = dk + p.E * kBlockKV;                  // [Ev][kBlockKV]
  acc_t* q_s = dv + p.Ev * kBlockKV;                // [kBlockQB][E]
  acc_t* do_s = q_s + kBlockQB * p.E;               // [kBlockQB][Ev]

  const int64_t bhk = blockIdx.x / k_tiles, kt = blockIdx.x % k_tiles;
  const int64_t b = bhk / p.heads_kv, hk = bhk % p.heads_kv;
  const int64_t group = p.heads_q / p.heads_kv;
  const int t = threadIdx.x;
  const int64_t k0 = kt * kBlockKV, j = k0 + t;
  const bool active = j < p.S;
  own_row(active ? K.at(b, hk, j) : nullptr, p.E, k_s, kBlockKV, t);
  own_row(active ? V.at(b, hk, j) : nullptr, p.Ev, v_s, kBlockKV, t);
  own_row<T, acc_t>(nullptr, p.E, dk, kBlockKV, t);
  own_row<T, acc_t>(nullptr, p.Ev, dv, kBlockKV, t);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const int64_t first_row = p.causal ? (k0 / kBlockQB) * kBlockQB : 0;
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g, bh = b * p.heads_q + h;
    for (int64_t r0 = first_row; r0 < p.L; r0 += kBlockQB) {
      const int nq = static_cast<int>(imin(kBlockQB, p.L - r0));
      stage_rows(Q, dO, b, h, r0, nq, p.E, p.Ev, q_s, do_s);
      if (!active) continue;
      for (int r = 0; r < nq; ++r) {
        const int64_t i = r0 + r;
        acc_t dot = 0;
        for (int64_t e = 0; e < p.E; ++e) dot += q_s[r * p.E + e] * k_s[e * kBlockKV + t];
        const acc_t s = score<T, acc_t>(dot, p, mask, b, h, i, j);
        const acc_t prob = exp(s - lse[bh * p.L + i]);  // same address for the block: broadcast
        if (prob == acc_t(0)) continue;
        const acc_t z = dropout_factor<acc_t>(p, bh, i, j);
        acc_t dp = 0;
        for (int64_t e = 0; e < p.Ev; ++e) {
          const acc_t go = do_s[r * p.Ev + e];
          dv[e * kBlockKV + t] += prob * z * go;
          dp += go * v_s[e * kBlockKV + t];
        }
        const acc_t ds = prob * (dp * z - D[bh * p.L + i]) * scale;
        for (int64_t e = 0; e < p.E; ++e) dk[e * kBlockKV + t] += ds * q_s[r * p.E + e];
      }
    }
  }
  if (!active) return;
  T* dkr = dK.at(b, hk, j);
  T* dvr = dV.at(b, hk, j);
  for (int64_t e = 0; e < p.E; ++e) dkr[e] = static_cast<T>(dk[e * kBlockKV + t]);
  for (int64_t e = 0; e < p.Ev; ++e) dvr[e] = static_cast<T>(dv[e * kBlockKV + t]);
}

// One block per (batch*head, query tile), one thread per query row.
template <typename T, typename acc_t>
__global__ void dq_kernel(Rows<const T> Q, Rows<const T> K, Rows<const T> V, Rows<const T> dO,
                          Mask<T> mask, const acc_t* __restrict__ lse, const acc_t* __restrict__ D,
                          Rows<T> dQ, Problem p, int64_t q_tiles) {
  HG_DYNAMIC_SHARED(unsigned char, smem_raw);
  acc_t* q_s = reinterpret_cast<acc_t*>(smem_raw);  // [E][kBlockQ]
  acc_t* do_s = q_s + p.E * kBlockQ;                // [Ev][kBlockQ]
  acc_t* dq = do_s + p.Ev * kBlockQ;                // [E][kBlockQ]
  acc_t* k_s = dq + p.E * kBlockQ;                  // [kBlockK][E]
  acc_t* v_s = k_s + kBlockK * p.E;                 // [kBlockK][Ev]

  const QueryTile tile(p, q_tiles);
  const int64_t bh = tile.bh, b = tile.b, h = tile.h, hk = tile.hk, q0 = tile.q0, i = tile.i;
  const int t = threadIdx.x;
  const bool active = i < p.L;
  own_row(active ? Q.at(b, h, i) : nullptr, p.E, q_s, kBlockQ, t);
  own_row(active ? dO.at(b, h, i) : nullptr, p.Ev, do_s, kBlockQ, t);
  own_row<T, acc_t>(nullptr, p.E, dq, kBlockQ, t);
  const acc_t row_lse = active ? lse[bh * p.L + i] : acc_t(0);
  const acc_t row_d = active ? D[bh * p.L + i] : acc_t(0);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const int64_t k_end = tile_key_end(p, q0);
  for (int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
    const int nk = static_cast<int>(imin(kBlockK, k_end - k0));
    stage_rows(K, V, b, hk, k0, nk, p.E, p.Ev, k_s, v_s);
    if (!active) continue;
    for (int jj = 0; jj < nk; ++jj) {
      const int64_t j = k0 + jj;
      acc_t dot = 0;
      for (int64_t e = 0; e < p.E; ++e) dot += q_s[e * kBlockQ + t] * k_s[jj * p.E + e];
      const acc_t prob = exp(score<T, acc_t>(dot, p, mask, b, h, i, j) - row_lse);
      if (prob == acc_t(0)) continue;
      acc_t dp = 0;
      for (int64_t e = 0; e < p.Ev; ++e) dp += do_s[e * kBlockQ + t] * v_s[jj * p.Ev + e];
      const acc_t ds = prob * (dp * dropout_factor<acc_t>(p, bh, i, j) - row_d) * scale;
      for (int64_t e = 0; e < p.E; ++e) dq[e * kBlockQ + t] += ds * k_s[jj * p.E + e];
    }
  }
  if (!active) return;
  T* r = dQ.at(b, h, i);
  for (int64_t e = 0; e < p.E; ++e) r[e] = static_cast<T>(dq[e * kBlockQ + t]);
}

void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& mask, at::Tensor& out, at::Tensor& lse, const Problem& p) {
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t q_tiles = (p.L + kBlockQ - 1) / kBlockQ;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "handgrad::scaled_dot_product_attention", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = sizeof(acc_t) * ((p.E + p.Ev) * kBlockQ + kBlockK * (p.E + p.Ev));
    cuda::launch<forward_kernel_impl<scalar_t, acc_t>>(
        p.batch * p.heads_q * q_tiles, kBlockQ, smem, stream,
        Rows<const scalar_t>{static_cast<const scalar_t*>(q.data_ptr()), q.stride(0), q.stride(1), q.stride(2)},
        Rows<const scalar_t>{static_cast<const scalar_t*>(k.data_ptr()), k.stride(0), k.stride(1), k.stride(2)},
        Rows<const scalar_t>{static_cast<const scalar_t*>(v.data_ptr()), v.stride(0), v.stride(1), v.stride(2)},
        mask_of<scalar_t>(mask), rows_of<scalar_t>(out), lse.data_ptr<acc_t>(), p, q_tiles);
  });
}

template <typename T>
Rows<const T> const_rows(const at::Tensor& t) {
  return Rows<const T>{static_cast<const T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

void backward_kernel(const at::Tensor& go, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                     const at::Tensor& mask, at::Tensor& gq, at::Tensor& gk, at::Tensor& gv,
                     const Problem& p) {
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t q_tiles = (p.L + kBlockQ - 1) / kBlockQ;
  const int64_t k_tiles = (p.S + kBlockKV - 1) / kBlockKV;
  at::Tensor D = at::empty({p.batch * p.heads_q * p.L}, lse.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "handgrad::scaled_dot_product_attention_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto Q = const_rows<scalar_t>(q), K = const_rows<scalar_t>(k);
    const auto V = const_rows<scalar_t>(v), dO = const_rows<scalar_t>(go);
    const auto m = mask_of<scalar_t>(mask);
    const int64_t rows = p.batch * p.heads_q * p.L;
    cuda::launch<rowdot_kernel<scalar_t, acc_t>>(std::min<int64_t>((rows + 255) / 256, 65535),
                                                 256, 0, stream, dO, const_rows<scalar_t>(out),
                                                 D.data_ptr<acc_t>(), p);

    const size_t smem_kv = sizeof(acc_t) * (2 * (p.E + p.Ev) * kBlockKV + kBlockQB * (p.E + p.Ev));
    cuda::launch<dkdv_kernel<scalar_t, acc_t>>(
        p.batch * p.heads_kv * k_tiles, kBlockKV, smem_kv, stream, Q, K, V, dO, m,
        lse.data_ptr<acc_t>(), D.data_ptr<acc_t>(), rows_of<scalar_t>(gk), rows_of<scalar_t>(gv),
        p, k_tiles);

    const size_t smem_q = sizeof(acc_t) * ((2 * p.E + p.Ev) * kBlockQ + kBlockK * (p.E + p.Ev));
    cuda::launch<dq_kernel<scalar_t, acc_t>>(
        p.batch * p.heads_q * q_tiles, kBlockQ, smem_q, stream, Q, K, V, dO, m,
        lse.data_ptr<acc_t>(), D.data_ptr<acc_t>(), rows_of<scalar_t>(gq), p, q_tiles);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    c10::optional<double> scale, bool enable_gqa) {
  return forward(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, &forward_kernel);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& attn_mask,
    double dropout_p, bool is_causal, c10::optional<double> scale, bool enable_gqa,
    const at::Tensor& rng_state) {
  return backward(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale,
                  enable_gqa, rng_state, &backward_kernel);
}

}  // namespace
}  // namespace attention
}  // namespace handgrad

TORCH_LIBRARY_IMPL(handgrad, CUDA, m) {
  m.impl("scaled_dot_product_attention", &handgrad::attention::sdpa_cuda);
  m.impl("scaled_dot_product_attention_backward", &handgrad::attention::sdpa_backward_cuda);
}
