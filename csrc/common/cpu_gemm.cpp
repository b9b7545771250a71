// The AVX-512 float32 matrix product shared by the CPU kernels (see
// cpu_gemm.h for why).
//
// Blocking: K in blocks of kKc (one block up to 1.25 kKc); B packed into
// panels of kNr = 32 columns (kc x 32 floats each, zero-padded past N), or
// read in place (matmul_direct_b); A into panels of kMr rows (zero-padded
// past M) or read in place. The micro-kernel keeps a kMr x 32 tile of C in
// 2 kMr zmm registers: per k it loads two vectors of B, broadcasts kMr
// values of A and issues 2 kMr FMAs. Edge tiles store only the valid rows,
// and the valid columns through masked loads/stores. Threads split the tiles; every
// element of C is summed in the same order whatever the thread count.
#include "common/cpu_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_ps(), which trips a
// false -Wmaybe-uninitialized where they are inlined (the 16x16 transposes).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HG_CPU_GEMM_AVX512 1
#define HG_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,fma")))
#else
#define HG_CPU_GEMM_AVX512 0
#endif

namespace handgrad {
namespace cpu_gemm {
namespace {

constexpr int64_t kMr = 8;
constexpr int64_t kNr = 32;
constexpr int64_t kKc = 256;

// The k-block size for depth K: kKc, or all of K when K is at most 1.25 kKc
// (so K = 257, a product with a column of ones appended, is one block rather
// than a second pass over C for a single k).
int64_t k_block(int64_t K) { return K <= kKc + kKc / 4 ? K : kKc; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Products with nothing to multiply: no element of C (M or N is 0), or a sum
// over nothing (K == 0: C = 0, or C unchanged when accumulating). True when
// the product was one of those and is done.
[[maybe_unused]] bool empty_product(int64_t M, int64_t N, int64_t K, float* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return true;
  if (K != 0) return false;
  if (!accumulate) {
    for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
  }
  return true;
}

// Panels per packing task: at least 64K floats.
int64_t pack_grain(int64_t panel_floats) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, panel_floats));
}

// Packed offset of k-block starting at k0 (all earlier blocks hold k0 rows of every panel).
int64_t block_offset(int64_t k0, int64_t N) { return k0 * ceil_div(N, kNr) * kNr; }

// Column panels [q0, q1) of B's k-block [k0, k0 + kc), on the calling thread.
void pack_b_panels(const float* B, int64_t rsb, int64_t csb, int64_t k0, int64_t kc, int64_t N,
                   float* out, int64_t q0, int64_t q1) {
  for (int64_t q = q0; q < q1; ++q) {
    float* dst = out + q * kc * kNr;
    const int64_t n0 = q * kNr, nr = std::min(kNr, N - n0);
    if (csb != 1 && rsb == 1) {
      // A transposed matrix (a weight W^T): walk each of its rows once.
      for (int64_t j = 0; j < kNr; ++j) {
        if (j >= nr) {
          for (int64_t k = 0; k < kc; ++k) dst[k * kNr + j] = 0.0f;
          continue;
        }
        const float* src = B + k0 + (n0 + j) * csb;
        for (int64_t k = 0; k < kc; ++k) dst[k * kNr + j] = src[k];
      }
      continue;
    }
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = B + (k0 + k) * rsb + n0 * csb;
      float* d = dst + k * kNr;
      if (csb == 1) {
        std::memcpy(d, src, nr * sizeof(float));
      } else {
        for (int64_t j = 0; j < nr; ++j) d[j] = src[j * csb];
      }
      for (int64_t j = nr; j < kNr; ++j) d[j] = 0.0f;
    }
  }
}

void pack_b_block(const float* B, int64_t rsb, int64_t csb, int64_t k0, int64_t kc, int64_t N,
                  float* out) {
  // Packing is cheap next to the product: small blocks (the per-step ones of
  // the time loop) are packed on one thread, sparing a parallel region.
  at::parallel_for(0, ceil_div(N, kNr), pack_grain(kc * kNr), [&](int64_t q0, int64_t q1) {
    pack_b_panels(B, rsb, csb, k0, kc, N, out, q0, q1);
  });
}

#if HG_CPU_GEMM_AVX512

// The first n (clamped to 0..16) lanes of a 16-float vector.
__mmask16 low_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1);
}

// C[0:mr, 0:32 masked] (+)= A[0:mr, 0:kc] Bp[0:kc, 0:32]; A(i, k) is
// rows[i][k * kStep] (kStep = 1: rows of A read in place; kStep = kMr: a
// packed panel; kStep = 0: the run-time step astep, A^T of a row-major
// matrix read in place, rows[i] = column i). Bp row k is at bp + k * ldb: packed (ldb = kNr, zero-padded
// past N) or, with kDirectB, B itself read in place (masked loads: no read
// past column N).
template <int64_t kStep, bool kDirectB = false>
HG_TARGET_AVX512 void micro_kernel(int64_t kc, const float* const* rows, const float* bp,
                                   int64_t ldb, float* C, int64_t ldc, int64_t mr,
                                   __mmask16 mask0, __mmask16 mask1, bool accumulate,
                                   int64_t astep = 0) {
  const int64_t step = kStep != 0 ? kStep : astep;
  __m512 c0[kMr], c1[kMr];
  const float* a[kMr];
#pragma GCC unroll 16
  for (int i = 0; i < kMr; ++i) {
    c0[i] = _mm512_setzero_ps();
    c1[i] = _mm512_setzero_ps();
    a[i] = rows[i];
  }
  if (accumulate) {  // C is read after the k loop: fetch it meanwhile
#pragma GCC unroll 16
    for (int i = 0; i < kMr; ++i) {
      if (i >= mr) break;
      _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc + 16), _MM_HINT_T0);
    }
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = kDirectB ? _mm512_maskz_loadu_ps(mask0, bp) : _mm512_loadu_ps(bp);
    const __m512 b1 = kDirectB ? _mm512_maskz_loadu_ps(mask1, bp + 16) : _mm512_loadu_ps(bp + 16);
    bp += ldb;
#pragma GCC unroll 16
    for (int i = 0; i < kMr; ++i) {
      const __m512 av = _mm512_set1_ps(a[i][k * step]);
      c0[i] = _mm512_fmadd_ps(av, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(av, b1, c1[i]);
    }
  }
  // Fully unrolled, so the accumulators stay in registers.
#pragma GCC unroll 16
  for (int i = 0; i < kMr; ++i) {
    if (i >= mr) break;
    float* c = C + i * ldc;
    __m512 v0 = c0[i], v1 = c1[i];
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(mask0, c));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(mask1, c + 16));
    }
    _mm512_mask_storeu_ps(c, mask0, v0);
    _mm512_mask_storeu_ps(c + 16, mask1, v1);
  }
}

// A's k-block [k0, k0 + kc) as row panels of kMr rows: panel p holds
// A[p*kMr + i, k0 + k] at p*kc*kMr + k*kMr + i (zero past the last row).
// Row panels [p0, p1), times alpha, on the calling thread.
void pack_a_panels(const float* A, int64_t rsa, int64_t csa, int64_t M, int64_t k0, int64_t kc,
                   float alpha, float* out, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    float* dst = out + p * kc * kMr;
    const int64_t m0 = p * kMr, mr = std::min(kMr, M - m0);
    if (rsa == 1 && mr == kMr) {  // A^T of a row-major matrix: kMr contiguous floats per k
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = A + m0 + (k0 + k) * csa;
        for (int64_t i = 0; i < kMr; ++i) dst[k * kMr + i] = alpha * src[i];
      }
      continue;
    }
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = A + m0 * rsa + (k0 + k) * csa;
      for (int64_t i = 0; i < kMr; ++i) dst[k * kMr + i] = i < mr ? alpha * src[i * rsa] : 0.0f;
    }
  }
}

void pack_a_block(const float* A, int64_t rsa, int64_t csa, int64_t M, int64_t k0, int64_t kc,
                  float* out) {
  at::parallel_for(0, ceil_div(M, kMr), pack_grain(kc * kMr), [&](int64_t p0, int64_t p1) {
    pack_a_panels(A, rsa, csa, M, k0, kc, 1.0f, out, p0, p1);
  });
}

// Tile t (column panel t / mp, row panel t % mp) of one k-block. A is either
// packed (ap != nullptr) or read in place (rows contiguous in k, the k-block
// starting at a_direct + m * rsa); the rows past M of an edge tile repeat the
// last row and are not stored.
// ldb = 0: bp is packed; else bp is the k-block's first row of B itself
// (row-major, leading dimension ldb), read in place. A read in place has its
// k-th element of row m at a_direct + m * rsa + k * a_kstep (a_kstep > 1:
// a transposed view, with B read in place only).
void tile(int64_t t, int64_t M, int64_t N, int64_t kc, const float* ap, const float* a_direct,
          int64_t rsa, const float* bp, float* C, int64_t ldc, bool accumulate,
          int64_t ldb = 0, int64_t a_kstep = 1) {
  const int64_t mp = ceil_div(M, kMr);
  const int64_t q = t / mp, p = t % mp;
  const int64_t m0 = p * kMr, mr = std::min(kMr, M - m0);
  const int64_t n0 = q * kNr, nr = std::min(kNr, N - n0);
  const float* rows[kMr];
  for (int64_t i = 0; i < kMr; ++i) {
    rows[i] = ap ? ap + p * kc * kMr + i : a_direct + (m0 + std::min(i, mr - 1)) * rsa;
  }
  float* c = C + m0 * ldc + n0;
  const __mmask16 mask0 = low_mask(nr), mask1 = low_mask(nr - 16);
  if (ldb != 0) {
    if (ap) {
      micro_kernel<kMr, true>(kc, rows, bp + n0, ldb, c, ldc, mr, mask0, mask1, accumulate);
    } else if (a_kstep != 1) {
      micro_kernel<0, true>(kc, rows, bp + n0, ldb, c, ldc, mr, mask0, mask1, accumulate,
                            a_kstep);
    } else {
      micro_kernel<1, true>(kc, rows, bp + n0, ldb, c, ldc, mr, mask0, mask1, accumulate);
    }
  } else if (ap) {
    micro_kernel<kMr>(kc, rows, bp + q * kc * kNr, kNr, c, ldc, mr, mask0, mask1, accumulate);
  } else {
    micro_kernel<1>(kc, rows, bp + q * kc * kNr, kNr, c, ldc, mr, mask0, mask1, accumulate);
  }
}

// Every tile of one k-block; threads split the tiles.
void tiles(int64_t M, int64_t N, int64_t kc, const float* ap, const float* a_direct, int64_t rsa,
           const float* bp, float* C, int64_t ldc, bool accumulate, int64_t ldb = 0,
           int64_t a_kstep = 1) {
  const int64_t count = ceil_div(M, kMr) * ceil_div(N, kNr);
  const int64_t grain = std::max<int64_t>(1, (1 << 19) / std::max<int64_t>(1, kMr * kNr * kc));
  at::parallel_for(0, count, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      tile(t, M, N, kc, ap, a_direct, rsa, bp, C, ldc, accumulate, ldb, a_kstep);
    }
  });
}

// Rows r[0..15] (16 floats each) transposed in place: r[k] = column k.
HG_TARGET_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[16];  // u[4 i + m], 128-bit lane L: column 4 L + m of rows 4 i .. 4 i + 3
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int m = 0; m < 4; ++m) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xEE);
    r[m] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[4 + m] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[8 + m] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + m] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

// The k-block [k0, k0 + kc) of B = Bt^T into panels (as pack_b_panels).
HG_TARGET_AVX512 void pack_b_transposed_block(const float* Bt, int64_t ldbt, int64_t k0,
                                              int64_t kc, int64_t N, float* out) {
  for (int64_t q = 0; q < ceil_div(N, kNr); ++q) {
    float* dst = out + q * kc * kNr;
    for (int64_t kk = 0; kk < kc; kk += 16) {
      const int64_t kn = std::min<int64_t>(16, kc - kk);
      const __mmask16 kmask = low_mask(kn);
      for (int64_t h = 0; h < kNr; h += 16) {
        __m512 r[16];
        for (int64_t j = 0; j < 16; ++j) {
          const int64_t n = q * kNr + h + j;
          r[j] = n < N ? _mm512_maskz_loadu_ps(kmask, Bt + n * ldbt + k0 + kk)
                       : _mm512_setzero_ps();
        }
        transpose16(r);
        for (int64_t k = 0; k < kn; ++k) _mm512_storeu_ps(dst + (kk + k) * kNr + h, r[k]);
      }
    }
  }
}

#endif  // HG_CPU_GEMM_AVX512

}  // namespace

bool available() {
#if HG_CPU_GEMM_AVX512
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                         !(std::getenv("HANDGRAD_CPU_AVX512") &&
                           std::string(std::getenv("HANDGRAD_CPU_AVX512")) == "0");
  return ok;
#else
  return false;
#endif
}

void pack_b(const float* B, int64_t rsb, int64_t csb, int64_t K, int64_t N, PackedB& out) {
  out.K = K;
  out.N = N;
  out.data.resize(static_cast<size_t>(block_offset(K, N)));
  const int64_t kb = k_block(K);
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    pack_b_block(B, rsb, csb, k0, std::min(kb, K - k0), N, out.data.data() + block_offset(k0, N));
  }
}

void pack_b_transposed(const float* Bt, int64_t ldbt, int64_t K, int64_t N, PackedB& out) {
#if HG_CPU_GEMM_AVX512
  out.K = K;
  out.N = N;
  out.data.resize(static_cast<size_t>(block_offset(K, N)));
  // The same k-blocks as pack_b: the products read the packed panels with k_block(K).
  const int64_t kb = k_block(K);
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    pack_b_transposed_block(Bt, ldbt, k0, std::min(kb, K - k0), N,
                            out.data.data() + block_offset(k0, N));
  }
#else
  pack_b(Bt, 1, ldbt, K, N, out);
#endif
}

void matmul(int64_t M, const float* A, int64_t rsa, int64_t csa, const PackedB& B, float* C,
            int64_t ldc, bool accumulate) {
#if HG_CPU_GEMM_AVX512
  const int64_t K = B.K, N = B.N;
  if (empty_product(M, N, K, C, ldc, accumulate)) return;
  // Rows of A contiguous in k are read in place; otherwise (a transposed
  // view) each k-block is packed first.
  memory::ScratchVector<float> packed_a;
  const int64_t kb = k_block(K);
  if (csa != 1) packed_a.resize(static_cast<size_t>(ceil_div(M, kMr) * kMr * std::min(K, kb)));
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    const int64_t kc = std::min(kb, K - k0);
    if (csa != 1) pack_a_block(A, rsa, csa, M, k0, kc, packed_a.data());
    tiles(M, N, kc, csa != 1 ? packed_a.data() : nullptr, A + k0, rsa,
          B.data.data() + block_offset(k0, N), C, ldc, accumulate || k0 > 0);
  }
#else
  (void)M, (void)A, (void)rsa, (void)csa, (void)B, (void)C, (void)ldc, (void)accumulate;
#endif
}

void matmul_serial(int64_t M, const float* A, int64_t rsa, const PackedB& B, float* C,
                   int64_t ldc, bool accumulate) {
#if HG_CPU_GEMM_AVX512
  const int64_t K = B.K, N = B.N;
  if (M == 0 || N == 0 || K == 0) return;
  const int64_t count = ceil_div(M, kMr) * ceil_div(N, kNr);
  const int64_t kb = k_block(K);
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    const float* bp = B.data.data() + block_offset(k0, N);
    for (int64_t t = 0; t < count; ++t) {
      tile(t, M, N, std::min(kb, K - k0), nullptr, A + k0, rsa, bp, C, ldc,
           accumulate || k0 > 0);
    }
  }
#else
  (void)M, (void)A, (void)rsa, (void)B, (void)C, (void)ldc, (void)accumulate;
#endif
}

void matmul_direct_b(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsa, int64_t csa,
                     const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
#if HG_CPU_GEMM_AVX512
  if (empty_product(M, N, K, C, ldc, accumulate)) return;
  const int64_t kb = k_block(K);
  if (rsa == 1 && csa != 1 && csa % 128 != 0) {
    // A^T of a row-major matrix (kMr consecutive floats per k): read in place
    // (unless its rows are a multiple of 512 bytes apart: then the rows one
    // tile reads share a few cache sets, and packing is faster).
    for (int64_t k0 = 0; k0 < K; k0 += kb) {
      tiles(M, N, std::min(kb, K - k0), nullptr, A + k0 * csa, 1, B + k0 * ldb, C, ldc,
            accumulate || k0 > 0, ldb, csa);
    }
    return;
  }
  memory::ScratchVector<float> packed_a;
  if (csa != 1) packed_a.resize(static_cast<size_t>(ceil_div(M, kMr) * kMr * std::min(K, kb)));
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    const int64_t kc = std::min(kb, K - k0);
    if (csa != 1) pack_a_block(A, rsa, csa, M, k0, kc, packed_a.data());
    tiles(M, N, kc, csa != 1 ? packed_a.data() : nullptr, A + k0, rsa, B + k0 * ldb, C, ldc,
          accumulate || k0 > 0, ldb);
  }
#else
  (void)M, (void)N, (void)K, (void)A, (void)rsa, (void)csa, (void)B, (void)ldb, (void)C,
      (void)ldc, (void)accumulate;
#endif
}

void matmul(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsa, int64_t csa,
            const float* B, int64_t rsb, int64_t csb, float* C, int64_t ldc, bool accumulate) {
  PackedB packed;
  pack_b(B, rsb, csb, K, N, packed);
  matmul(M, A, rsa, csa, packed, C, ldc, accumulate);
}

void matmul_tile(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t rsa,
                 int64_t csa, const float* B, int64_t rsb, int64_t csb, float* C, int64_t ldc,
                 bool accumulate) {
#if HG_CPU_GEMM_AVX512
  if (empty_product(M, N, K, C, ldc, accumulate)) return;
  const int64_t kb = k_block(K);
  const int64_t mp = ceil_div(M, kMr), np = ceil_div(N, kNr), kc_max = std::min(K, kb);
  // Grown to the largest tile a thread has seen, then reused: no allocation per call.
  thread_local std::vector<float> a_panels, b_panels;
  if (a_panels.size() < static_cast<size_t>(mp * kMr * kc_max)) a_panels.resize(mp * kMr * kc_max);
  if (b_panels.size() < static_cast<size_t>(np * kNr * kc_max)) b_panels.resize(np * kNr * kc_max);
  const memory::ScratchInUse in_use(
      static_cast<int64_t>((a_panels.capacity() + b_panels.capacity()) * sizeof(float)));
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    const int64_t kc = std::min(kb, K - k0);
    pack_a_panels(A, rsa, csa, M, k0, kc, alpha, a_panels.data(), 0, mp);
    pack_b_panels(B, rsb, csb, k0, kc, N, b_panels.data(), 0, np);
    for (int64_t t = 0; t < mp * np; ++t) {
      tile(t, M, N, kc, a_panels.data(), nullptr, 0, b_panels.data(), C, ldc,
           accumulate || k0 > 0);
    }
  }
#else
  (void)M, (void)N, (void)K, (void)alpha, (void)A, (void)rsa, (void)csa, (void)B, (void)rsb,
      (void)csb, (void)C, (void)ldc, (void)accumulate;
#endif
}

bool mm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (c.scalar_type() != at::kFloat || a.scalar_type() != at::kFloat ||
      b.scalar_type() != at::kFloat || !available() || c.dim() != 2 || a.dim() != 2 ||
      b.dim() != 2 || (c.stride(1) != 1 && c.size(1) > 1)) {
    return false;
  }
  matmul(a.size(0), b.size(1), a.size(1), a.const_data_ptr<float>(), a.stride(0), a.stride(1),
         b.const_data_ptr<float>(), b.stride(0), b.stride(1), c.mutable_data_ptr<float>(),
         c.stride(0), accumulate);
  return true;
}

}  // namespace cpu_gemm
}  // namespace handgrad
