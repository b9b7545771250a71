// scaled_dot_product_attention, CPU kernels (flash-attention style).
//
// Algorithm: S = scale * Q K^T (+ additive mask, causal -inf), P = softmax(S)
// (rows), O = (P o Z) V with Z the dropout keep factors (1/(1-p) or 0).
// Forward walks the keys tile by tile (kBlockK keys) for a tile of kBlockQ
// query rows, keeping per row the running maximum m and sum l of the online
// softmax; earlier partial results are rescaled by e^(m_old - m_new). No
// L x S matrix exists: each thread holds one kBlockQ x kBlockK score tile.
// Special scores follow torch (attention.h): a NaN or +inf score makes its
// row NaN -- the running maximum keeps a NaN, lse is NaN -- so the NaN
// reaches every gradient the row touches, all of dV included.
// Saved for backward: O and one log-sum-exp per query row (lse = m + log l;
// +inf for a row that sees no key, whose output and gradients are 0, as in
// torch's CPU implementation). need_weights adds the weights W = P o Z as an
// output (L x S per head, as native's), recomputed tile by tile once a row's
// lse is known.
// Gradient: with P recomputed per tile as e^(S - lse) and dW the incoming
// gradient of the weights output (out = W V, so W receives dO V^T + dW):
//   dV = (P o Z)^T dO,  dP = (dO V^T + dW) o Z,
//   D = rowsum(dO o O) + rowsum(W o dW) (= rowsum(P o dP)),
//   dS = P o (dP - D),  dQ = scale dS K,  dK = scale dS^T Q,  dMask = dS
// (the tile's dS is copied out when a float mask needs its gradient; the
// driver sums it over the mask's broadcast dimensions).
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
// (batch*head, query tile), which recomputes the score tiles once more (a
// pass whose gradients nobody asked for is skipped). Both schemes add the
// tiles of each gradient element in the same order, so results do not
// depend on the thread count; neither does BLAS, which runs each tile
// product on the calling thread (MKL's thread-local count is set to 1) on
// 64-byte aligned scratch.
// The tile products are plain matrix products. float32 ones run the AVX-512
// product of common/cpu_gemm.h (cpu_gemm::matmul_tile: both operands packed
// into per-thread scratch, the scale folded into the packing) when the CPU
// has AVX-512: on the AMD EPYC benchmark machine MKL's sgemm runs its AVX2
// path there, and native's CPU flash attention then ran exactly as fast as
// ours. Per tile shape the measured policy of common/cpu_gemm_policy.h
// picks between that product and sgemm_ (MKL's AVX-512 code wins on Intel).
// Elsewhere, and for float64, they are BLAS calls (the sgemm_/dgemm_
// that libtorch_cpu exports, on raw pointers into per-thread scratch;
// at::native::cpublas::gemm itself is not exported; a plain loop stands in if
// a build of torch exports no BLAS, or for sizes BLAS's int arguments cannot
// carry). Rows whose stride is not a legal leading dimension (stride 0 of a
// sequence broadcast by expand) are copied dense first. The softmax,
// masking, dropout and reductions are the loops below, the exponential is
// the AVX2 one of common/cpu_simd.h. float16/bfloat16 are computed in
// float32 and rounded at the end.
//
// Speed against native (float32, forward+backward, native / handgrad,
// `python benchmarks/bench_attention.py --threads 1 --reps 10`, AMD EPYC Zen 5,
// the other core busy): (8,4,256,64) 1.64x, (2,8,2048,64) 1.64x, causal
// 1.89x, (32,4,65,32) 1.25x; forward alone 1.3-1.8x. With MKL's sgemm for
// the tiles (before the AVX-512 product) these were 0.99x, 0.99x, 1.15x and
// 1.27x at 2 threads; now, at 2 threads on the quiet machine (`python
// benchmarks/run.py --threads 2 --reps 15 --max-seconds 6 --modes fwdbwd`),
// 1.79x, 1.72x, 1.98x and 1.75x. After the NaN rules, mask gradient and
// weights output (`python benchmarks/run.py --only attention --threads 2
// --reps 10`, AMD EPYC, load average ~11 on 2 cores, so +-20% noise), before
// / after: 1.00x / 1.42x, 1.08x / 1.09x, 1.34x / 1.29x, 1.66x / 2.97x; no
// change beyond the noise. Peak memory of forward+backward at batch 1, 8 heads,
// E 64: 8.1 / 16.1 / 32.3 MB at L = 1024 / 2048 / 4096 (linear in L; native's
// CPU flash path: 11.0 / 21.1 / 41.1 MB); the per-thread scratch now comes
// from torch's allocator, so these include it (+0.1 MB).
#include "ops/attention.h"

#include "common/cpu_gemm.h"
#include "common/cpu_gemm_policy.h"
#include "common/cpu_simd.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Generator.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>

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
// MKL's per-thread thread count (libtorch_cpu exports it when torch uses MKL;
// this is the C entry point, mkl_service.h's mkl_set_num_threads_local).
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

// Every tile product runs on its calling thread only. A task that runs
// outside a parallel region (a problem of one task) would otherwise let MKL
// split the product over its own threads, whose number follows
// torch.set_num_threads, and the sums inside it could then depend on the
// thread count.
struct SequentialBlas {
  int previous = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;
};

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

// A leading dimension BLAS accepts for a column-major rows x cols operand:
// at least max(1, rows) -- also when there is one column and it is never
// used, so it is replaced then -- and an int. -1 when ld cannot be passed.
int64_t blas_ld(int64_t ld, int64_t rows, int64_t cols) {
  if (cols <= 1) ld = std::max<int64_t>(1, rows);
  return ld >= std::max<int64_t>(1, rows) && ld <= INT_MAX ? ld : -1;
}

// Whether the own kernel runs this float32 tile product (the measured policy
// of common/cpu_gemm_policy.h, on the calling thread), read row-major as
// C^T (n x m) = op(B)^T op(A)^T.
bool own_tile(bool na, bool nb, int64_t m, int64_t n, int64_t k) {
  if (!cpu_gemm::available()) return false;
  cpu_gemm::Problem p;
  p.m = n;
  p.n = m;
  p.k = k;
  p.a_transposed = !nb;
  p.b_transposed = !na;
  p.site = cpu_gemm::Site::tile;
  p.calling_thread = true;
  return cpu_gemm::choose(p) == cpu_gemm::Kernel::own;
}

template <typename T>
void gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, T alpha,
          const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: C = beta C
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = 0; i < m; ++i) c[i + j * ldc] = beta == T(0) ? T(0) : beta * c[i + j * ldc];
    }
    return;
  }
  const bool na = ta == TransposeType::NoTranspose, nb = tb == TransposeType::NoTranspose;
  if constexpr (std::is_same<T, float>::value) {
    if ((beta == 0.0f || beta == 1.0f) && own_tile(na, nb, m, n, k)) {
      // The same product read row-major: C^T (n x m) = op(B)^T (n x k) op(A)^T (k x m).
      cpu_gemm::matmul_tile(n, m, k, alpha, b, nb ? ldb : 1, nb ? 1 : ldb, a, na ? lda : 1,
                            na ? 1 : lda, c, ldc, beta != 0.0f);
      return;
    }
  }
  const int64_t la = blas_ld(lda, na ? m : k, na ? k : m);
  const int64_t lb = blas_ld(ldb, nb ? k : n, nb ? n : k);
  const int64_t lc = blas_ld(ldc, m, n);
  const bool blas = (std::is_same<T, float>::value ? sgemm_ != nullptr : dgemm_ != nullptr) &&
                    la > 0 && lb > 0 && lc > 0 && m <= INT_MAX && n <= INT_MAX && k <= INT_MAX;
  if (!blas) {  // no BLAS in this torch, or sizes BLAS's int arguments cannot carry
    gemm_loops(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const char cta = na ? 'N' : 'T', ctb = nb ? 'N' : 'T';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ila = static_cast<int>(la), ilb = static_cast<int>(lb), ilc = static_cast<int>(lc);
  if constexpr (std::is_same<T, float>::value) {
    sgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ila, b, &ilb, &beta, c, &ilc);
  } else {
    dgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ila, b, &ilb, &beta, c, &ilc);
  }
}

// Tile sizes (measured: within noise of each other from 64x128 to 256x512;
// these were the best single-thread forward+backward at the target shapes).
constexpr int64_t kBlockQ = 128;      // query rows per forward tile
constexpr int64_t kBlockK = 512;      // keys per forward tile
constexpr int64_t kBlockQBwd = 128;   // query rows per backward tile
constexpr int64_t kBlockKBwd = 64;    // keys per backward tile

// Per-thread scratch from torch's CPU allocator: 64-byte aligned wherever
// it lands (BLAS may take another path for other alignments) and counted by
// the benchmarks' memory tracker.
template <typename T>
struct Buffer {
  at::Tensor storage;
  T* data;
  explicit Buffer(int64_t n)
      : storage(at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))),
        data(storage.data_ptr<T>()) {}
  T& operator[](int64_t i) { return data[i]; }
};

// A (B, H, rows, features) tensor with a dense feature dimension.
template <typename T>
struct Rows {
  T* data;
  int64_t sb, sh, sr;
  Rows(const at::Tensor& t)  // NOLINT: implicit on purpose
      : data(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), sh(t.stride(1)), sr(t.stride(2)) {}
  T* at(int64_t b, int64_t h, int64_t row) const { return data + b * sb + h * sh + row * sr; }
};

// A (B, Hq, L, S) tensor with arbitrary strides (the additive mask, the
// weights and their gradient), or none.
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
  const T* row(int64_t b, int64_t h, int64_t r) const { return data + b * sb + h * sh + r * sr; }
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
    for (int64_t i = 0; i < c.nq; ++i) {
      const T* mr = m.row(c.b, c.h, c.q0 + i) + c.k0 * m.sc;
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
// in words[w * 8 + l]. The caller makes sure the draw numbers' low words do
// not wrap within the 8 (the high word is the same in every lane).
inline void philox8_words(const DropoutState& d, int64_t bh, int64_t row, int64_t col4,
                          uint32_t* words) {
  const Philox4 first = dropout_counter(d, bh, row, col4);
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first.x[0])),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(first.x[1]));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(first.x[2]));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(first.x[3]));
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
  const T scale = static_cast<T>(d.keep_scale);
  for (int64_t i = 0; i < c.nq; ++i) {
    T* row = z + i * ldz;
    const int64_t r = c.q0 + i;
    int64_t j = 0;
#if HG_HAVE_AVX2
    // 32 columns per step: 8 Philox counters in the vector lanes (the
    // generator is most of the cost of dropout otherwise).
    for (; j + 32 <= c.nk; j += 32) {
      const int64_t col4 = (c.k0 + j) >> 2;
      if (dropout_counter(d, c.bh, r, col4).x[0] > 0xFFFFFFFFu - 7u) break;  // (rare) carry: scalar
      alignas(32) uint32_t words[32];
      philox8_words(d, c.bh, r, col4, words);
      for (int64_t l = 0; l < 8; ++l) {
        for (int64_t w = 0; w < 4; ++w) row[j + 4 * l + w] = kept(words[w * 8 + l], d.p) ? scale : T(0);
      }
    }
#endif
    // Tiles start at multiples of 4, so one Philox call covers 4 columns.
    for (; j < c.nk; j += 4) {
      const unsigned bits = keep_bits4(d, c.bh, r, (c.k0 + j) >> 2);
      for (int64_t t = 0; t < 4 && j + t < c.nk; ++t) row[j + t] = ((bits >> t) & 1u) ? scale : T(0);
    }
  }
}

// The row maximum, NaN if any entry is NaN (max_keep_nan's rule).
template <typename T>
T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
#if HG_HAVE_AVX2
  if constexpr (std::is_same<T, float>::value) {
    __m256 acc = _mm256_set1_ps(-INFINITY);
    __m256 nan = _mm256_setzero_ps();
    for (; j + simd::kFloatLanes <= n; j += simd::kFloatLanes) {
      const __m256 x8 = _mm256_loadu_ps(x + j);
      acc = _mm256_max_ps(acc, x8);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(x8, x8, _CMP_UNORD_Q));
    }
    m = _mm256_movemask_ps(nan) != 0 ? std::numeric_limits<T>::quiet_NaN() : simd::reduce_max(acc);
  }
#endif
  for (; j < n; ++j) m = max_keep_nan(m, x[j]);
  return m;
}

// The dropout seed and offset of a call: drawn from torch's default CPU
// generator (under its lock, so torch.manual_seed reproduces the pattern) and
// kept in rng_state for backward.
void draw_dropout_state(Problem& p, at::Tensor& rng_state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    auto* impl = at::check_generator<at::CPUGeneratorImpl>(gen);
    p.dropout.seed = impl->random64();
    p.dropout.offset = impl->random64();
  }
  int64_t* state = rng_state.data_ptr<int64_t>();
  std::memcpy(&state[0], &p.dropout.seed, sizeof(int64_t));
  std::memcpy(&state[1], &p.dropout.offset, sizeof(int64_t));
}

void read_dropout_state(Problem& p, const at::Tensor& rng_state) {
  const int64_t* state = rng_state.data_ptr<int64_t>();
  std::memcpy(&p.dropout.seed, &state[0], sizeof(int64_t));
  std::memcpy(&p.dropout.offset, &state[1], sizeof(int64_t));
}

// ---------------------------------------------------------------- forward

// Row i of the tile's weights, e^(s - lse_i) o Z, for every visible key
// (those past a causal row's end stay 0): the scores are recomputed tile by
// tile once the row's lse is known.
template <typename T>
void write_weights(TileCtx<T> c, int64_t k_end, const T* lse, T* weights, T* s, T* z,
                   const Rows<const T>& K) {
  const Problem& p = *c.p;
  const bool dropout = p.dropout.p > 0.0f;
  for (int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
    c.k0 = k0;
    c.nk = std::min(kBlockK, k_end - k0);
    c.k = K.at(c.b, c.h / (p.heads_q / p.heads_kv), k0);
    scores(c, s, kBlockK);
    if (dropout) dropout_factors(c, z, kBlockK);
    for (int64_t i = 0; i < c.nq; ++i) {
      T* w = weights + ((c.bh * p.L) + c.q0 + i) * p.S + k0;
      simd::exp_shifted_sum(s + i * kBlockK, w, c.nk, lse[i]);
      if (dropout) {
        const T* zr = z + i * kBlockK;
        for (int64_t j = 0; j < c.nk; ++j) w[j] *= zr[j];
      }
    }
  }
}

template <typename T>
void forward_typed(ForwardArgs& a, const Problem& p) {
  const Rows<const T> Q(a.q), K(a.k), V(a.v);
  const Rows<T> O(a.out);
  const MaskView<T> mask(a.mask);
  T* lse = a.lse.data_ptr<T>();  // (B, Hq, L) contiguous
  T* weights = a.weights.defined() ? a.weights.data_ptr<T>() : nullptr;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t q_tiles = (p.L + kBlockQ - 1) / kBlockQ;
  const bool dropout = p.dropout.p > 0.0f;
  // Every task is a full row of tiles, large enough to be worth a thread.
  at::parallel_for(0, p.batch * p.heads_q * q_tiles, 1, [&](int64_t begin, int64_t end) {
    const SequentialBlas sequential;
    Buffer<T> s(kBlockQ * kBlockK), z(dropout ? kBlockQ * kBlockK : 0);
    Buffer<T> acc(kBlockQ * p.Ev), m(kBlockQ), l(kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_tiles, qt = task % q_tiles;
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q, hk = h / group;
      TileCtx<T> c{&p, &mask, b, h, bh, Q.at(b, h, qt * kBlockQ), Q.sr, nullptr, K.sr,
                   qt * kBlockQ, std::min(kBlockQ, p.L - qt * kBlockQ), 0, 0};
      std::fill(acc.data, acc.data + c.nq * p.Ev, T(0));
      std::fill(m.data, m.data + c.nq, -std::numeric_limits<T>::infinity());
      std::fill(l.data, l.data + c.nq, T(0));
      const int64_t k_end = p.causal ? std::min(p.S, c.q0 + c.nq) : p.S;
      for (int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
        c.k0 = k0;
        c.nk = std::min(kBlockK, k_end - k0);
        c.k = K.at(b, hk, k0);
        scores(c, s.data, kBlockK);
        if (dropout) dropout_factors(c, z.data, kBlockK);
        for (int64_t i = 0; i < c.nq; ++i) {
          T* row = s.data + i * kBlockK;
          const T m_new = max_keep_nan(m[i], row_max(row, c.nk));
          if (m_new == -std::numeric_limits<T>::infinity()) {
            std::fill(row, row + c.nk, T(0));  // nothing visible yet in this row
            continue;
          }
          // (NaN when m_new is: the row is NaN from here on.)
          const T alpha = m[i] == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(m[i] - m_new);
          const T sum = simd::exp_shifted_sum(row, row, c.nk, m_new);
          l[i] = l[i] * alpha + sum;
          m[i] = m_new;
          if (!(alpha == T(1))) {
            T* r = acc.data + i * p.Ev;
            for (int64_t e = 0; e < p.Ev; ++e) r[e] *= alpha;
          }
          if (dropout) {
            const T* zr = z.data + i * kBlockK;
            for (int64_t j = 0; j < c.nk; ++j) row[j] *= zr[j];
          }
        }
        // acc (nq x Ev) += P (nq x nk) V (nk x Ev)
        if (p.Ev > 0) {
          gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, p.Ev, c.nq, c.nk, T(1),
               V.at(b, hk, k0), V.sr, s.data, kBlockK, T(1), acc.data, p.Ev);
        }
      }
      T* tile_lse = lse + bh * p.L + c.q0;
      for (int64_t i = 0; i < c.nq; ++i) {
        T* o = O.at(b, h, c.q0 + i);
        const T* r = acc.data + i * p.Ev;
        const T inv = inverse_sum(l[i]);
        for (int64_t e = 0; e < p.Ev; ++e) o[e] = r[e] * inv;
        tile_lse[i] = log_sum_exp(m[i], l[i]);
      }
      if (weights != nullptr) write_weights(c, k_end, tile_lse, weights, s.data, z.data, K);
    }
  });
}

// ---------------------------------------------------------------- backward

template <typename T>
struct BackwardData {
  const Problem* p;
  Rows<const T> Q, K, V, dO;
  Rows<T> dQ, dK, dV;
  MaskView<T> mask;
  MaskView<T> dW;   // incoming gradient of the weights output, or none
  const T* lse;
  const T* D;       // rowsum(dO o O) + rowsum(W o dW), (B, Hq, L)
  T* dmask;         // dS, (B, Hq, L, S) contiguous, or nullptr
};

template <typename T>
struct Scratch {
  Buffer<T> s, dp, z;
  explicit Scratch(bool dropout)
      : s(kBlockQBwd * kBlockKBwd), dp(kBlockQBwd * kBlockKBwd), z(dropout ? kBlockQBwd * kBlockKBwd : 0) {}
};

// What one visit of a tile contributes to.
struct Wanted {
  bool dkdv, dq, dmask;
};

// One (query tile, key tile) pair of head (b, h): recomputes P and dS and
// accumulates into dK/dV of the key tile and/or dQ of the query tile (and
// writes the tile's dS as the mask's gradient).
template <typename T>
void backward_tile(const BackwardData<T>& d, Scratch<T>& w, int64_t b, int64_t h, int64_t q0,
                   int64_t k0, Wanted want) {
  const Problem& p = *d.p;
  const int64_t hk = h / (p.heads_q / p.heads_kv), bh = b * p.heads_q + h;
  const int64_t ld = kBlockKBwd;
  TileCtx<T> c{&p, &d.mask, b, h, bh, d.Q.at(b, h, q0), d.Q.sr, d.K.at(b, hk, k0), d.K.sr,
               q0, std::min(kBlockQBwd, p.L - q0), k0, std::min(kBlockKBwd, p.S - k0)};
  T* s = w.s.data;
  T* dp = w.dp.data;
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
    dropout_factors(c, w.z.data, ld);
    if (want.dkdv && p.Ev > 0) {
      for (int64_t i = 0; i < c.nq; ++i) {
        for (int64_t j = 0; j < c.nk; ++j) dp[i * ld + j] = s[i * ld + j] * w.z[i * ld + j];
      }
      pz = dp;
    }
  }
  if (want.dkdv && p.Ev > 0) {
    // dV (nk x Ev) += pz^T (nk x nq) dO (nq x Ev)
    gemm(TransposeType::NoTranspose, TransposeType::Transpose, p.Ev, c.nk, c.nq, T(1), dO,
         d.dO.sr, pz, ld, T(1), d.dV.at(b, hk, k0), d.dV.sr);
  }
  // dP (nq x nk) = dO V^T (+ the weights' own gradient: out = W V, so the
  // gradient reaching W is dO V^T + dW)
  if (p.Ev > 0) {
    gemm(TransposeType::Transpose, TransposeType::NoTranspose, c.nk, c.nq, p.Ev, T(1), v, d.V.sr,
         dO, d.dO.sr, T(0), dp, ld);
  } else {
    for (int64_t i = 0; i < c.nq; ++i) std::fill(dp + i * ld, dp + i * ld + c.nk, T(0));
  }
  if (d.dW.data != nullptr) {
    for (int64_t i = 0; i < c.nq; ++i) {
      const T* g = d.dW.row(b, h, q0 + i) + k0 * d.dW.sc;
      for (int64_t j = 0; j < c.nk; ++j) dp[i * ld + j] += g[j * d.dW.sc];
    }
  }
  const T* D = d.D + bh * p.L + q0;
  for (int64_t i = 0; i < c.nq; ++i) {
    T* dpr = dp + i * ld;
    const T* pr = s + i * ld;
    const T Di = D[i];
    if (dropout) {
      const T* zr = w.z.data + i * ld;
      for (int64_t j = 0; j < c.nk; ++j) dpr[j] = pr[j] * (dpr[j] * zr[j] - Di);
    } else {
      for (int64_t j = 0; j < c.nk; ++j) dpr[j] = pr[j] * (dpr[j] - Di);
    }
  }
  if (want.dmask) {  // S = scale Q K^T + mask: dS is the mask's gradient
    for (int64_t i = 0; i < c.nq; ++i) {
      std::copy(dp + i * ld, dp + i * ld + c.nk, d.dmask + (bh * p.L + q0 + i) * p.S + k0);
    }
  }
  const T scale = static_cast<T>(p.scale);
  if (want.dkdv) {
    // dK (nk x E) += scale dS^T (nk x nq) Q (nq x E)
    gemm(TransposeType::NoTranspose, TransposeType::Transpose, p.E, c.nk, c.nq, scale, c.q,
         d.Q.sr, dp, ld, T(1), d.dK.at(b, hk, k0), d.dK.sr);
  }
  if (want.dq) {
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
void backward_typed(BackwardArgs& a, const Problem& p) {
  // D = rowsum(dO o O) (+ rowsum(W o dW)): one value per query row (O(L) memory).
  // (A tensor, so the benchmarks' allocator tracking sees it.)
  at::Tensor D_t = at::empty({p.batch * p.heads_q * p.L}, a.q.options());
  T* D = D_t.data_ptr<T>();
  const Rows<const T> dO(a.grad_out), O(a.out);
  const MaskView<T> W(a.weights), dW(a.grad_weights);
  at::parallel_for(0, p.batch * p.heads_q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
      for (int64_t i = 0; i < p.L; ++i) {
        const T* g = dO.at(b, h, i);
        const T* o = O.at(b, h, i);
        T acc = 0;
        for (int64_t e = 0; e < p.Ev; ++e) acc += g[e] * o[e];
        if (W.data != nullptr) {
          const T* wr = W.row(b, h, i);
          const T* gr = dW.row(b, h, i);
          for (int64_t j = 0; j < p.S; ++j) acc += wr[j * W.sc] * gr[j * dW.sc];
        }
        D[bh * p.L + i] = acc;
      }
    }
  });
  const BackwardData<T> d{&p, a.q, a.k, a.v, a.grad_out, a.grad_q, a.grad_k, a.grad_v,
                          MaskView<T>(a.mask), dW, a.lse.data_ptr<T>(), D,
                          a.grad_mask.defined() ? a.grad_mask.data_ptr<T>() : nullptr};
  const bool want_dmask = d.dmask != nullptr;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t q_tiles = (p.L + kBlockQBwd - 1) / kBlockQBwd;
  const int64_t k_tiles = (p.S + kBlockKBwd - 1) / kBlockKBwd;
  const bool dropout = p.dropout.p > 0.0f;

  // Both schemes visit the tiles of every gradient element in the same
  // order, so the choice (which follows the thread count) changes no bit.
  if (p.batch * p.heads_kv >= 2 * at::get_num_threads()) {
    // One task per (batch, kv head) computes every gradient of that head.
    const Wanted want{a.want_grad_kv, a.want_grad_q, want_dmask};
    at::parallel_for(0, p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
      const SequentialBlas sequential;
      Scratch<T> w(dropout);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / p.heads_kv, hk = task % p.heads_kv;
        for (int64_t kt = 0; kt < k_tiles; ++kt) {
          for (int64_t g = 0; g < group; ++g) {
            for (int64_t qt = first_q_tile(p, kt * kBlockKBwd); qt < q_tiles; ++qt) {
              backward_tile(d, w, b, hk * group + g, qt * kBlockQBwd, kt * kBlockKBwd, want);
            }
          }
        }
      }
    });
    return;
  }
  // Few heads: dK/dV over (batch, kv head, key tile), then dQ (and the
  // mask's gradient) over (batch * query head, query tile).
  if (a.want_grad_kv) {
    at::parallel_for(0, p.batch * p.heads_kv * k_tiles, 1, [&](int64_t begin, int64_t end) {
      const SequentialBlas sequential;
      Scratch<T> w(dropout);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bhk = task / k_tiles, kt = task % k_tiles;
        const int64_t b = bhk / p.heads_kv, hk = bhk % p.heads_kv;
        for (int64_t g = 0; g < group; ++g) {
          for (int64_t qt = first_q_tile(p, kt * kBlockKBwd); qt < q_tiles; ++qt) {
            backward_tile(d, w, b, hk * group + g, qt * kBlockQBwd, kt * kBlockKBwd,
                          Wanted{true, false, false});
          }
        }
      }
    });
  }
  if (!a.want_grad_q && !want_dmask) return;
  at::parallel_for(0, p.batch * p.heads_q * q_tiles, 1, [&](int64_t begin, int64_t end) {
    const SequentialBlas sequential;
    Scratch<T> w(dropout);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_tiles, qt = task % q_tiles;
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
      const int64_t k_stop = key_end(p, qt * kBlockQBwd);
      for (int64_t k0 = 0; k0 < k_stop; k0 += kBlockKBwd) {
        backward_tile(d, w, b, h, qt * kBlockQBwd, k0, Wanted{false, a.want_grad_q, want_dmask});
      }
    }
  });
}

bool reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

at::Tensor as_float(const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }

// The tile products hand rows of q, k, v, dO and O to BLAS with their row
// stride as the leading dimension; a stride BLAS rejects (smaller than a
// row: keys broadcast along the sequence have stride 0) or one its int
// cannot carry gets a dense copy.
at::Tensor blas_rows(const at::Tensor& t) {
  const int64_t sr = t.stride(2);
  if (t.size(2) > 1 && (sr < std::max<int64_t>(1, t.size(3)) || sr > INT_MAX)) {
    return t.contiguous();
  }
  return t;
}

void forward_kernel(ForwardArgs& a, Problem& p) {
  if (p.dropout.p > 0.0f) draw_dropout_state(p, a.rng_state);
  a.q = blas_rows(a.q);
  a.k = blas_rows(a.k);
  a.v = blas_rows(a.v);
  if (reduced(a.q)) {
    ForwardArgs f = a;
    f.q = as_float(a.q);
    f.k = as_float(a.k);
    f.v = as_float(a.v);
    f.mask = as_float(a.mask);
    f.out = at::empty(a.out.sizes(), a.out.options().dtype(at::kFloat));
    if (a.weights.defined()) f.weights = at::zeros(a.weights.sizes(), f.out.options());
    forward_typed<float>(f, p);
    a.out.copy_(f.out);
    if (a.weights.defined()) a.weights.copy_(f.weights);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(a.q.scalar_type(), "handgrad::scaled_dot_product_attention",
                             [&] { forward_typed<scalar_t>(a, p); });
}

void backward_kernel(BackwardArgs& a, const Problem& problem) {
  Problem p = problem;
  if (p.dropout.p > 0.0f) read_dropout_state(p, a.rng_state);
  for (at::Tensor* t : {&a.grad_out, &a.q, &a.k, &a.v, &a.out}) *t = blas_rows(*t);
  if (reduced(a.q)) {
    BackwardArgs f = a;
    for (at::Tensor* t : {&f.grad_out, &f.q, &f.k, &f.v, &f.out, &f.mask, &f.weights,
                          &f.grad_weights}) {
      *t = as_float(*t);
    }
    f.grad_q = at::zeros(a.grad_q.sizes(), a.grad_q.options().dtype(at::kFloat));
    f.grad_k = at::zeros(a.grad_k.sizes(), a.grad_k.options().dtype(at::kFloat));
    f.grad_v = at::zeros(a.grad_v.sizes(), a.grad_v.options().dtype(at::kFloat));
    backward_typed<float>(f, p);  // grad_mask is float32 already
    a.grad_q.copy_(f.grad_q);
    a.grad_k.copy_(f.grad_k);
    a.grad_v.copy_(f.grad_v);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(a.q.scalar_type(), "handgrad::scaled_dot_product_attention_backward",
                             [&] { backward_typed<scalar_t>(a, p); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpa_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    c10::optional<double> scale, bool enable_gqa, bool need_weights) {
  return forward(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, need_weights,
                 &forward_kernel);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpa_backward_cpu(
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

TORCH_LIBRARY_IMPL(handgrad, CPU, m) {
  m.impl("scaled_dot_product_attention", &handgrad::attention::sdpa_cpu);
  m.impl("scaled_dot_product_attention_backward", &handgrad::attention::sdpa_backward_cpu);
}
