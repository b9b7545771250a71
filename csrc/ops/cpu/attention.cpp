// scaled_dot_product_attention, CPU kernels (flash-attention style).
//
// Algorithm: S = scale * Q K^T (+ additive mask, causal -inf), P = softmax(S)
// (rows), O = (P o Z) V with Z the dropout keep factors (1/(1-p) or 0).
// Forward walks the keys tile by tile (kBlockK keys) for a tile of kBlockQ
// query rows, keeping per row the running maximum m and sum l of the online
// softmax; earlier partial results are rescaled by e^(m_old - m_new). No
// L x S matrix exists: each thread holds one kBlockQ x kBlockK score tile.
// Saved for backward: O and one log-sum-exp per query row (lse = m + log l;
// +inf for a row that sees no key, whose output and gradients are 0, as in
// torch's CPU implementation).
// Gradient: with P recomputed per tile as e^(S - lse):
//   dV = (P o Z)^T dO,  dP = (dO V^T) o Z,  D = rowsum(dO o O) (= rowsum(P o dP)),
//   dS = P o (dP - D),  dQ = scale dS K,  dK = scale dS^T Q.
// The dropout keep pattern is regenerated from (seed, offset, head, row,
// column) with Philox (attention.h), never stored; the CPU runs 8 Philox
// counters at once in AVX2 lanes (bit for bit the scalar stream CUDA uses;
// with one counter at a time the generator took 2/3 of a dropout forward: a
// ViT block's MultiheadAttention went from 1.01x to 1.31x native with it).
// Parallelism, deterministic in both directions (no two threads write the
// same gradient element, every sum has a fixed order): forward over
// (batch*head, query tile). Backward over (batch, key/value head) when there
// are enough of those to keep every thread busy -- each task owns dK/dV of
// its head and dQ of the query heads of its group (grouped-query attention:
// the group's query heads are summed in a fixed order) -- and otherwise in
// two passes, dK/dV over (batch, kv head, key tile) and dQ over
// (batch*head, query tile), which recomputes the score tiles once more.
// The tile products are plain matrix products. float32 ones run the AVX-512
// product of common/cpu_gemm.h (cpu_gemm::matmul_tile: both operands packed
// into per-thread scratch, the scale folded into the packing) when the CPU
// has AVX-512: on the AMD EPYC benchmark machine MKL's sgemm runs its AVX2
// path there, and native's CPU flash attention then ran exactly as fast as
// ours. Elsewhere, and for float64, they are BLAS calls (the sgemm_/dgemm_
// that libtorch_cpu exports, on raw pointers into per-thread scratch;
// at::native::cpublas::gemm itself is not exported; a plain loop stands in if
// a build of torch exports no BLAS). The softmax, masking, dropout and
// reductions are the loops below, the exponential is the AVX2 one of
// common/cpu_simd.h. float16/bfloat16 are computed in float32 and rounded at
// the end.
//
// Speed against native (float32, forward+backward, native / handgrad,
// `python benchmarks/bench_attention.py --threads 1 --reps 10`, AMD EPYC Zen 5,
// the other core busy): (8,4,256,64) 1.64x, (2,8,2048,64) 1.64x, causal
// 1.89x, (32,4,65,32) 1.25x; forward alone 1.3-1.8x. With MKL's sgemm for
// the tiles (before the AVX-512 product) these were 0.99x, 0.99x, 1.15x and
// 1.27x at 2 threads; now, at 2 threads on the quiet machine (`python
// benchmarks/run.py --threads 2 --reps 15 --max-seconds 6 --modes fwdbwd`),
// 1.79x, 1.72x, 1.98x and 1.75x. Peak memory of forward+backward at batch 1, 8 heads,
// E 64: 8.1 / 16.1 / 32.3 MB at L = 1024 / 2048 / 4096 (linear in L; native's
// CPU flash path: 11.0 / 21.1 / 41.1 MB).
#include "ops/attention.h"

#include "common/cpu_gemm.h"
#include "common/cpu_simd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace handgrad {
namespace attention {
namespace {

// ---- BLAS (column-major, Fortran interface) for the tile products.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

enum class TransposeType { NoTranspose, Transpose };

// C (m x n) = alpha op(A) op(B) + beta C, column-major, without BLAS.
template <typename T>
void gemm_loops(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, T alpha,
                const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      T acc = 0;
      for (int64_t l = 0; l < k; ++l) {
        const T av = ta == TransposeType::NoTranspose ? a[i + l * lda] : a[l + i * lda];
        const T bv = tb == TransposeType::NoTranspose ? b[l + j * ldb] : b[j + l * ldb];
        acc += av * bv;
      }
      c[i + j * ldc] = alpha * acc + (beta == T(0) ? T(0) : beta * c[i + j * ldc]);
    }
  }
}

template <typename T>
void gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, T alpha,
          const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char cta = ta == TransposeType::NoTranspose ? 'N' : 'T';
  const char ctb = tb == TransposeType::NoTranspose ? 'N' : 'T';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  // BLAS insists on leading dimensions >= 1 even for empty operands.
  const int ila = static_cast<int>(std::max<int64_t>(1, lda));
  const int ilb = static_cast<int>(std::max<int64_t>(1, ldb));
  const int ilc = static_cast<int>(std::max<int64_t>(1, ldc));
  if constexpr (std::is_same<T, float>::value) {
    if (cpu_gemm::available() && (beta == 0.0f || beta == 1.0f)) {
      // The same product read row-major: C^T (n x m) = op(B)^T (n x k) op(A)^T (k x m).
      const bool nb = tb == TransposeType::NoTranspose, na = ta == TransposeType::NoTranspose;
      cpu_gemm::matmul_tile(n, m, k, alpha, b, nb ? ldb : 1, nb ? 1 : ldb, a, na ? lda : 1,
                            na ? 1 : lda, c, ldc, beta != 0.0f);
      return;
    }
    if (sgemm_ != nullptr) {
      sgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ila, b, &ilb, &beta, c, &ilc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ila, b, &ilb, &beta, c, &ilc);
      return;
    }
  }
  gemm_loops(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Tile sizes (measured: within noise of each other from 64x128 to 256x512;
// these were the best single-thread forward+backward at the target shapes).
constexpr int64_t kBlockQ = 128;      // query rows per forward tile
constexpr int64_t kBlockK = 512;      // keys per forward tile
constexpr int64_t kBlockQBwd = 128;   // query rows per backward tile
constexpr int64_t kBlockKBwd = 64;    // keys per backward tile

// A (B, H, rows, features) tensor with a dense feature dimension.
template <typename T>
struct Rows {
  T* data;
  int64_t sb, sh, sr;
  Rows(const at::Tensor& t)  // NOLINT: implicit on purpose
      : data(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), sh(t.stride(1)), sr(t.stride(2)) {}
  T* at(int64_t b, int64_t h, int64_t row) const { return data + b * sb + h * sh + row * sr; }
};

// The additive mask as a (B, Hq, L, S) view with arbitrary strides.
template <typename T>
struct MaskView {
  const T* data = nullptr;
  int64_t sb = 0, sh = 0, sr = 0, sc = 0;
  explicit MaskView(const at::Tensor& m) {
    if (!m.defined()) return;
    data = static_cast<const T*>(m.data_ptr());
    sb = m.stride(0);
    sh = m.stride(1);
    sr = m.stride(2);
    sc = m.stride(3);
  }
};

// Which tile of which head: shared by the forward and both backward schemes.
template <typename T>
struct TileCtx {
  const Problem* p;
  const MaskView<T>* mask;
  int64_t b, h;     // batch, query head
  int64_t bh;       // b * heads_q + h (the dropout stream)
  const T* q;       // first row of the query tile
  int64_t ldq;
  const T* k;       // first row of the key tile
  int64_t ldk;
  int64_t q0, nq, k0, nk;
};

// s (nq x nk, leading dimension lds) = scale * Q K^T + mask, with -inf where
// causal attention hides a key.
template <typename T>
void scores(const TileCtx<T>& c, T* s, int64_t lds) {
  const Problem& p = *c.p;
  gemm(TransposeType::Transpose, TransposeType::NoTranspose, c.nk, c.nq, p.E,
       static_cast<T>(p.scale), c.k, c.ldk, c.q, c.ldq, T(0), s, lds);
  if (c.mask->data != nullptr) {
    const MaskView<T>& m = *c.mask;
    const T* base = m.data + c.b * m.sb + c.h * m.sh + c.k0 * m.sc;
    for (int64_t i = 0; i < c.nq; ++i) {
      const T* mr = base + (c.q0 + i) * m.sr;
      T* row = s + i * lds;
      if (m.sc == 1) {
        for (int64_t j = 0; j < c.nk; ++j) row[j] += mr[j];
      } else {
        for (int64_t j = 0; j < c.nk; ++j) row[j] += mr[j * m.sc];
      }
    }
  }
  if (p.causal && c.k0 + c.nk - 1 > c.q0) {
    for (int64_t i = 0; i < c.nq; ++i) {
      T* row = s + i * lds;
      // keys j with k0 + j > q0 + i are hidden
      for (int64_t j = std::max<int64_t>(0, c.q0 + i - c.k0 + 1); j < c.nk; ++j) {
        row[j] = -std::numeric_limits<T>::infinity();
      }
    }
  }
}

#if HG_HAVE_AVX2
// (hi, lo) of the 32 x 32 -> 64-bit products m * a, lane by lane: the even
// lanes from one _mm256_mul_epu32, the odd ones shifted down into a second.
inline void mulhilo8(__m256i m, __m256i a, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// keep_bits4's Philox-4x32-10 (attention.h) for the 8 counters col4 .. col4+7
// of one row at once, bit for bit the same: word w of counter col4 + l lands
// in words[w * 8 + l].
inline void philox8_words(const DropoutState& d, int64_t bh, int64_t row, int64_t col4,
                          uint32_t* words) {
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(col4))),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(row)));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(bh) ^
                                                  static_cast<uint32_t>(d.offset >> 32)));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(d.offset) ^
                                                  static_cast<uint32_t>(bh >> 32)));
  uint32_t k0 = static_cast<uint32_t>(d.seed), k1 = static_cast<uint32_t>(d.seed >> 32);
  const __m256i M0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i M1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(M0, c0, hi0, lo0);
    mulhilo8(M1, c2, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words), c0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + 8), c1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + 16), c2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + 24), c3);
}
#endif

// z (nq x nk, leading dimension ldz): the dropout factor of every tile entry.
template <typename T>
void dropout_factors(const TileCtx<T>& c, T* z, int64_t ldz) {
  const DropoutState& d = c.p->dropout;
  const T kept = static_cast<T>(keep_scale(d.p));
  for (int64_t i = 0; i < c.nq; ++i) {
    T* row = z + i * ldz;
    const int64_t r = c.q0 + i;
    int64_t j = 0;
#if HG_HAVE_AVX2
    // 32 columns per step: 8 Philox counters in the vector lanes (the
    // generator is most of the cost of dropout otherwise).
    for (; j + 32 <= c.nk; j += 32) {
      alignas(32) uint32_t words[32];
      philox8_words(d, c.bh, r, (c.k0 + j) >> 2, words);
      for (int64_t l = 0; l < 8; ++l) {
        for (int64_t w = 0; w < 4; ++w) {
          // keep_bits4's test: 24 random bits as a uniform number in [0, 1), kept when >= p.
          const float u = static_cast<float>(words[w * 8 + l] >> 8) * (1.0f / 16777216.0f);
          row[j + 4 * l + w] = u >= d.p ? kept : T(0);
        }
      }
    }
#endif
    // Tiles start at multiples of 4, so one Philox call covers 4 columns.
    for (; j < c.nk; j += 4) {
      const unsigned bits = keep_bits4(d, c.bh, r, (c.k0 + j) >> 2);
      for (int64_t t = 0; t < 4 && j + t < c.nk; ++t) row[j + t] = ((bits >> t) & 1u) ? kept : T(0);
    }
  }
}

template <typename T>
T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
#if HG_HAVE_AVX2
  if constexpr (std::is_same<T, float>::value) {
    __m256 acc = _mm256_set1_ps(-INFINITY);
    for (; j + simd::kFloatLanes <= n; j += simd::kFloatLanes) {
      acc = _mm256_max_ps(acc, _mm256_loadu_ps(x + j));
    }
    m = simd::reduce_max(acc);
  }
#endif
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// ---------------------------------------------------------------- forward

template <typename T>
void forward_typed(const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t,
                   const at::Tensor& mask_t, at::Tensor& out_t, at::Tensor& lse_t,
                   const Problem& p) {
  const Rows<T> Q(q_t), K(k_t), V(v_t), O(out_t);
  const MaskView<T> mask(mask_t);
  T* lse = lse_t.data_ptr<T>();  // (B, Hq, L) contiguous
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t q_tiles = (p.L + kBlockQ - 1) / kBlockQ;
  const bool dropout = p.dropout.p > 0.0f;
  // Every task is a full row of tiles, large enough to be worth a thread.
  at::parallel_for(0, p.batch * p.heads_q * q_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(kBlockQ * kBlockK), z(dropout ? kBlockQ * kBlockK : 0);
    std::vector<T> acc(kBlockQ * p.Ev), m(kBlockQ), l(kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_tiles, qt = task % q_tiles;
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q, hk = h / group;
      TileCtx<T> c{&p, &mask, b, h, bh, Q.at(b, h, qt * kBlockQ), Q.sr, nullptr, K.sr,
                   qt * kBlockQ, std::min(kBlockQ, p.L - qt * kBlockQ), 0, 0};
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      const int64_t k_end = p.causal ? std::min(p.S, c.q0 + c.nq) : p.S;
      for (int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
        c.k0 = k0;
        c.nk = std::min(kBlockK, k_end - k0);
        c.k = K.at(b, hk, k0);
        scores(c, s.data(), kBlockK);
        if (dropout) dropout_factors(c, z.data(), kBlockK);
        for (int64_t i = 0; i < c.nq; ++i) {
          T* row = s.data() + i * kBlockK;
          const T m_new = std::max(m[i], row_max(row, c.nk));
          if (m_new == -std::numeric_limits<T>::infinity()) {
            std::fill(row, row + c.nk, T(0));  // nothing visible yet in this row
            continue;
          }
          const T alpha = m[i] == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(m[i] - m_new);
          const T sum = simd::exp_shifted_sum(row, row, c.nk, m_new);
          l[i] = l[i] * alpha + sum;
          m[i] = m_new;
          if (alpha != T(1)) {
            T* a = acc.data() + i * p.Ev;
            for (int64_t e = 0; e < p.Ev; ++e) a[e] *= alpha;
          }
          if (dropout) {
            const T* zr = z.data() + i * kBlockK;
            for (int64_t j = 0; j < c.nk; ++j) row[j] *= zr[j];
          }
        }
        // acc (nq x Ev) += P (nq x nk) V (nk x Ev)
        if (p.Ev > 0) {
          gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, p.Ev, c.nq, c.nk, T(1),
               V.at(b, hk, k0), V.sr, s.data(), kBlockK, T(1), acc.data(), p.Ev);
        }
      }
      for (int64_t i = 0; i < c.nq; ++i) {
        T* o = O.at(b, h, c.q0 + i);
        const T* a = acc.data() + i * p.Ev;
        const T inv = l[i] > T(0) ? T(1) / l[i] : T(0);
        for (int64_t e = 0; e < p.Ev; ++e) o[e] = a[e] * inv;
        lse[bh * p.L + c.q0 + i] =
            l[i] > T(0) ? m[i] + std::log(l[i]) : std::numeric_limits<T>::infinity();
      }
    }
  });
}

// ---------------------------------------------------------------- backward

template <typename T>
struct BackwardData {
  const Problem* p;
  Rows<T> Q, K, V, dO, dQ, dK, dV;
  MaskView<T> mask;
  const T* lse;
  const T* D;  // rowsum(dO o O), (B, Hq, L)
};

template <typename T>
struct Scratch {
  std::vector<T> s, dp, z;
  explicit Scratch(bool dropout)
      : s(kBlockQBwd * kBlockKBwd), dp(kBlockQBwd * kBlockKBwd), z(dropout ? kBlockQBwd * kBlockKBwd : 0) {}
};

// One (query tile, key tile) pair of head (b, h): recomputes P and dS and
// accumulates into dK/dV of the key tile and/or dQ of the query tile.
template <typename T>
void backward_tile(const BackwardData<T>& d, Scratch<T>& w, int64_t b, int64_t h, int64_t q0,
                   int64_t k0, bool want_dkdv, bool want_dq) {
  const Problem& p = *d.p;
  const int64_t hk = h / (p.heads_q / p.heads_kv), bh = b * p.heads_q + h;
  const int64_t ld = kBlockKBwd;
  TileCtx<T> c{&p, &d.mask, b, h, bh, d.Q.at(b, h, q0), d.Q.sr, d.K.at(b, hk, k0), d.K.sr,
               q0, std::min(kBlockQBwd, p.L - q0), k0, std::min(kBlockKBwd, p.S - k0)};
  T* s = w.s.data();
  T* dp = w.dp.data();
  const bool dropout = p.dropout.p > 0.0f;
  scores(c, s, ld);
  const T* lse = d.lse + bh * p.L + q0;
  // P = e^(S - lse): arguments <= 0 (up to rounding), the softmax exponential.
  for (int64_t i = 0; i < c.nq; ++i) simd::exp_shifted_sum(s + i * ld, s + i * ld, c.nk, lse[i]);
  const T* dO = d.dO.at(b, h, q0);
  const T* v = d.V.at(b, hk, k0);
  // pz = P o Z, needed for dV only
  const T* pz = s;
  if (dropout) {
    dropout_factors(c, w.z.data(), ld);
    if (want_dkdv && p.Ev > 0) {
      for (int64_t i = 0; i < c.nq; ++i) {
        for (int64_t j = 0; j < c.nk; ++j) dp[i * ld + j] = s[i * ld + j] * w.z[i * ld + j];
      }
      pz = dp;
    }
  }
  if (want_dkdv && p.Ev > 0) {
    // dV (nk x Ev) += pz^T (nk x nq) dO (nq x Ev)
    gemm(TransposeType::NoTranspose, TransposeType::Transpose, p.Ev, c.nk, c.nq, T(1), dO,
         d.dO.sr, pz, ld, T(1), d.dV.at(b, hk, k0), d.dV.sr);
  }
  // dP (nq x nk) = dO V^T
  if (p.Ev > 0) {
    gemm(TransposeType::Transpose, TransposeType::NoTranspose, c.nk, c.nq, p.Ev, T(1), v, d.V.sr,
         dO, d.dO.sr, T(0), dp, ld);
  } else {
    std::fill(w.dp.begin(), w.dp.end(), T(0));
  }
  const T* D = d.D + bh * p.L + q0;
  for (int64_t i = 0; i < c.nq; ++i) {
    T* dpr = dp + i * ld;
    const T* pr = s + i * ld;
    const T Di = D[i];
    if (dropout) {
      const T* zr = w.z.data() + i * ld;
      for (int64_t j = 0; j < c.nk; ++j) dpr[j] = pr[j] * (dpr[j] * zr[j] - Di);
    } else {
      for (int64_t j = 0; j < c.nk; ++j) dpr[j] = pr[j] * (dpr[j] - Di);
    }
  }
  const T scale = static_cast<T>(p.scale);
  if (want_dkdv) {
    // dK (nk x E) += scale dS^T (nk x nq) Q (nq x E)
    gemm(TransposeType::NoTranspose, TransposeType::Transpose, p.E, c.nk, c.nq, scale, c.q,
         d.Q.sr, dp, ld, T(1), d.dK.at(b, hk, k0), d.dK.sr);
  }
  if (want_dq) {
    // dQ (nq x E) += scale dS (nq x nk) K (nk x E)
    gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, p.E, c.nq, c.nk, scale, c.k,
         d.K.sr, dp, ld, T(1), d.dQ.at(b, h, q0), d.dQ.sr);
  }
}

// First query tile that can see key k0 (causal: rows i >= k0).
inline int64_t first_q_tile(const Problem& p, int64_t k0) { return p.causal ? k0 / kBlockQBwd : 0; }
// One past the last key a query tile starting at q0 can see.
inline int64_t key_end(const Problem& p, int64_t q0) {
  return p.causal ? std::min(p.S, q0 + kBlockQBwd) : p.S;
}

template <typename T>
void backward_typed(const at::Tensor& go_t, const at::Tensor& q_t, const at::Tensor& k_t,
                    const at::Tensor& v_t, const at::Tensor& out_t, const at::Tensor& lse_t,
                    const at::Tensor& mask_t, at::Tensor& gq_t, at::Tensor& gk_t,
                    at::Tensor& gv_t, const Problem& p) {
  // D = rowsum(dO o O): one value per query row (O(L) memory).
  // (A tensor, so the benchmarks' allocator tracking sees it.)
  at::Tensor D_t = at::empty({p.batch * p.heads_q * p.L}, q_t.options());
  T* D = D_t.data_ptr<T>();
  const Rows<T> dO(go_t), O(out_t);
  at::parallel_for(0, p.batch * p.heads_q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
      for (int64_t i = 0; i < p.L; ++i) {
        const T* g = dO.at(b, h, i);
        const T* o = O.at(b, h, i);
        T acc = 0;
        for (int64_t e = 0; e < p.Ev; ++e) acc += g[e] * o[e];
        D[bh * p.L + i] = acc;
      }
    }
  });
  const BackwardData<T> d{&p, Rows<T>(q_t), Rows<T>(k_t), Rows<T>(v_t), dO, Rows<T>(gq_t),
                          Rows<T>(gk_t), Rows<T>(gv_t), MaskView<T>(mask_t),
                          lse_t.data_ptr<T>(), D};
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t q_tiles = (p.L + kBlockQBwd - 1) / kBlockQBwd;
  const int64_t k_tiles = (p.S + kBlockKBwd - 1) / kBlockKBwd;
  const bool dropout = p.dropout.p > 0.0f;

  if (p.batch * p.heads_kv >= 2 * at::get_num_threads()) {
    // One task per (batch, kv head) computes every gradient of that head.
    at::parallel_for(0, p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
      Scratch<T> w(dropout);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / p.heads_kv, hk = task % p.heads_kv;
        for (int64_t kt = 0; kt < k_tiles; ++kt) {
          for (int64_t g = 0; g < group; ++g) {
            for (int64_t qt = first_q_tile(p, kt * kBlockKBwd); qt < q_tiles; ++qt) {
              backward_tile(d, w, b, hk * group + g, qt * kBlockQBwd, kt * kBlockKBwd, true, true);
            }
          }
        }
      }
    });
    return;
  }
  // Few heads: dK/dV over (batch, kv head, key tile), then dQ over
  // (batch * query head, query tile).
  at::parallel_for(0, p.batch * p.heads_kv * k_tiles, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> w(dropout);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bhk = task / k_tiles, kt = task % k_tiles;
      const int64_t b = bhk / p.heads_kv, hk = bhk % p.heads_kv;
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t qt = first_q_tile(p, kt * kBlockKBwd); qt < q_tiles; ++qt) {
          backward_tile(d, w, b, hk * group + g, qt * kBlockQBwd, kt * kBlockKBwd, true, false);
        }
      }
    }
  });
  at::parallel_for(0, p.batch * p.heads_q * q_tiles, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> w(dropout);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_tiles, qt = task % q_tiles;
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
      const int64_t k_stop = key_end(p, qt * kBlockQBwd);
      for (int64_t k0 = 0; k0 < k_stop; k0 += kBlockKBwd) {
        backward_tile(d, w, b, h, qt * kBlockQBwd, k0, false, true);
      }
    }
  });
}

bool reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

at::Tensor as_float(const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }

void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& mask, at::Tensor& out, at::Tensor& lse, const Problem& p) {
  if (reduced(q)) {
    at::Tensor out_f = at::empty(out.sizes(), out.options().dtype(at::kFloat));
    forward_kernel(as_float(q), as_float(k), as_float(v), as_float(mask), out_f, lse, p);
    out.copy_(out_f);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "handgrad::scaled_dot_product_attention", [&] {
    forward_typed<scalar_t>(q, k, v, mask, out, lse, p);
  });
}

void backward_kernel(const at::Tensor& go, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                     const at::Tensor& mask, at::Tensor& gq, at::Tensor& gk, at::Tensor& gv,
                     const Problem& p) {
  if (reduced(q)) {
    at::Tensor gq_f = at::zeros(gq.sizes(), gq.options().dtype(at::kFloat));
    at::Tensor gk_f = at::zeros(gk.sizes(), gk.options().dtype(at::kFloat));
    at::Tensor gv_f = at::zeros(gv.sizes(), gv.options().dtype(at::kFloat));
    backward_kernel(as_float(go), as_float(q), as_float(k), as_float(v), as_float(out), lse,
                    as_float(mask), gq_f, gk_f, gv_f, p);
    gq.copy_(gq_f);
    gk.copy_(gk_f);
    gv.copy_(gv_f);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "handgrad::scaled_dot_product_attention_backward",
                             [&] { backward_typed<scalar_t>(go, q, k, v, out, lse, mask, gq, gk,
                                                            gv, p); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    c10::optional<double> scale, bool enable_gqa) {
  return forward(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, &forward_kernel);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward_cpu(
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

TORCH_LIBRARY_IMPL(handgrad, CPU, m) {
  m.impl("scaled_dot_product_attention", &handgrad::attention::sdpa_cpu);
  m.impl("scaled_dot_product_attention_backward", &handgrad::attention::sdpa_backward_cpu);
}
