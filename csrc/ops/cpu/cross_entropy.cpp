// cross_entropy, CPU kernels.
//
// Algorithm: the input is (N, C, S) with S = d1*...*dK; a row is one (n, s)
// with its C logits S elements apart. Forward reads each row once: an online
// maximum and sum of exponentials (per AVX2 lane a running max m and sum s;
// when a block of 32 logits raises a lane's max, that lane's sum is rescaled
// by exp(m_old - m_new); rows of at most 64 logits, already in L1, take the
// max first instead), giving lse = m + log s, and the loss of the row
// (p - y formulas in ops/cross_entropy.h). Label smoothing and probability
// targets add a second sweep over the row, still in cache, for the linear
// terms sum_c w_c y'_c (m - x_c), taken relative to the final max so that
// logits of +-1e4 lose nothing to cancellation. Rows with S == 1 are
// vectorized along the classes; for S > 1 eight neighbouring positions s form
// the AVX2 lanes and the loop walks the classes (two sweeps: max, then exp).
// Non-finite logits follow native's rules on every path (scalar, short and
// long AVX2 rows, 8-lane positions): the max starts at the lowest finite
// float so that -inf logits add exp(-inf) = 0, and a row whose maximum is
// +inf, or whose sum is NaN (a NaN logit) or 0 (only -inf logits), gets
// lse = NaN (row_log_s in ops/cross_entropy.h), hence a NaN loss and
// gradient, as native's log_softmax gives.
// Saved for backward: lse only (one float/double per row). Ignored rows
// are not exponentiated; their lse is 0, or NaN when a scan of the row (NaN
// or +inf, or only -inf) says native's gradient of it is NaN.
// Gradient: dloss/dx_c = scale * (p_c a - (1-e) w_t [c==t] - e/C w_c) with
// p_c = exp(x_c - lse) recomputed from the logits, written straight into
// grad_input; probability targets: scale * (p_c sum_k w_k y'_k - w_c y'_c),
// and dloss/dy_c = scale (1-e) w_c (lse - x_c).
//
// Threads split fixed blocks of rows (at::parallel_for); reduced losses add
// per-block partial sums (double) in block order, so results do not depend
// on the thread count. The vector exp is common/cpu_simd.h's softmax
// exponential (exp_nonpositive: every argument here is shifted by the row
// maximum or the log-sum-exp; results below e^-87 are 0, no denormal is
// computed; NaN stays NaN). float64, and probability targets with S > 1, run
// scalar loops. float16 / bfloat16 run the float32 code: each task converts
// its rows (about 32K logits) into a per-thread float buffer and rounds each
// result to the storage type once (per-row losses and gradients from float;
// the reduced loss from its double sum: round_once in ops/cross_entropy.h).
//
// Speed against native (float32, forward+backward, native / handgrad,
// interleaved medians, quiet 2-core AMD EPYC Zen 5, 2 threads, `python
// benchmarks/run.py --threads 2 --reps 15 --max-seconds 6 --modes fwdbwd`):
// (4096, 32000) 2.97x with 1/3 of native's peak memory (500 MB vs 1500 MB:
// native keeps the N x C log_softmax and builds two more N x C tensors in
// backward); (128, 10) 1.31x (per-call overhead; the autograd node is C++,
// see ../cross_entropy_autograd.cpp); (8, 21, 128, 128) 1.29x (forward alone
// 0.56x before the vector log and the cheaper exponential, ~1.2-1.6x after,
// 1 thread); with ignore_index and label smoothing 1.72x; probability
// targets (512, 1000) 1.22x (0.72x before). float16 / bfloat16 against
// native in the same dtype (`benchmarks/run.py --only cross_entropy
// --threads 2 --reps 10 --cases 16`, same CPU loaded by other jobs,
// forward+backward): (8, 21, 128, 128) bfloat16 1.62x,
// (1024, 8000) float16 2.11x and bfloat16 2.41x, each with 1/3 of native's
// peak memory; float16 was 0.73x at (1024, 8000) with c10's scalar
// conversions before the 8-wide ones. The NaN/inf rules and the staging left
// float32 within the run-to-run spread (1 thread, min of 5 alternating runs
// of the old and new builds: forward (8, 21, 128, 128) 2.59 -> 2.66 ms,
// backward 2.88 -> 2.87 ms; (512, 1000) probabilities 0.58 -> 0.56 ms).
#include "ops/cross_entropy.h"

#include "common/cpu_simd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace handgrad {
namespace cross_entropy {
namespace {

constexpr int64_t kTaskElements = 32768;  // logits per parallel task (amortizes the handoff)

// The first row whose target was out of range (INT64_MAX: none).
struct BadTarget {
  std::atomic<int64_t> row{std::numeric_limits<int64_t>::max()};

  void report(int64_t r) {
    int64_t cur = row.load();
    while (r < cur && !row.compare_exchange_weak(cur, r)) {
    }
  }
  void raise_if_any(const int64_t* target) const {
    const int64_t r = row.load();
    TORCH_CHECK_INDEX(r == std::numeric_limits<int64_t>::max(), "Target ", target[r],
                      " is out of bounds.");
  }
};

// Work split into tasks: inner == 1 -> blocks of whole rows; inner > 1 ->
// (n, block of positions s), the block a multiple of 8 (the AVX2 lanes).
struct Split {
  int64_t block;
  int64_t per_outer;
  int64_t count;

  explicit Split(const Params& p) {
    const int64_t want = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(1, p.classes));
    if (p.inner == 1) {
      block = want;
      per_outer = 1;
      count = (p.outer + block - 1) / block;
    } else {
      block = std::max<int64_t>(8, (want + 7) / 8 * 8);
      per_outer = (p.inner + block - 1) / block;
      count = p.outer * per_outer;
    }
  }
  // Rows [r0, r1) of a task in the contiguous case, or n and [s0, s1).
  void rows(const Params& p, int64_t task, int64_t& n, int64_t& s0, int64_t& s1) const {
    if (p.inner == 1) {
      n = 0;
      s0 = task * block;
      s1 = std::min(p.outer, s0 + block);
    } else {
      n = task / per_outer;
      s0 = (task % per_outer) * block;
      s1 = std::min(p.inner, s0 + block);
    }
  }
};

// The compute type: float for float16 / bfloat16 storage (converted on the
// way in, results rounded once on the way out), else the storage type.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename A>
double weight_sum(const A* w, int64_t classes) {
  double total = 0;
  for (int64_t c = 0; c < classes; ++c) total += w[c];
  return total;
}

// The class weights as compute-type values (nullptr without weight).
template <typename T>
const acc_t<T>* compute_weights(const at::Tensor& weight, const Params& p,
                                std::vector<acc_t<T>>& store) {
  if (!p.has_weight) return nullptr;
  const T* w = weight.const_data_ptr<T>();
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return w;
  } else {
    store.assign(w, w + p.classes);
    return store.data();
  }
}

// n values converted to float, or rounded from float to nearest even, 8 at
// a time: float16 through the F16C instructions, bfloat16 as the upper half
// of a float's bits with c10::BFloat16's rounding (a NaN becomes 0x7FC0).
// c10's scalar conversions made float16 0.73x native at (1024, 8000).
template <typename T>
void widen(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
#if HG_HAVE_AVX2 && defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    if constexpr (std::is_same_v<T, c10::Half>) {
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    } else {
      const __m256i bits = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(bits));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void narrow(const float* src, T* dst, int64_t n) {
  int64_t i = 0;
#if HG_HAVE_AVX2 && defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    __m128i h;
    if constexpr (std::is_same_v<T, c10::Half>) {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    } else {
      const __m256i u = _mm256_castps_si256(v);
      const __m256i bias = _mm256_add_epi32(
          _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
          _mm256_set1_epi32(0x7FFF));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0),
                             _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      // 32 -> 16 bits: packus works within 128-bit halves; gather the halves.
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
      h = _mm256_castsi256_si128(packed);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// The rows of one task as compute-type values: the tensor itself when T is
// the compute type, else a per-thread buffer of the same layout (float16 /
// bfloat16). Row s of the task starts at (s - s0) * row_step(p); its classes
// are class_stride apart (S in the tensor, the task's width in a buffer).
int64_t row_step(const Params& p) { return p.inner == 1 ? p.classes : 1; }

template <typename T>
struct TaskRows {
  using A = acc_t<T>;
  std::vector<A> buf;

  static int64_t offset(const Params& p, int64_t n, int64_t s0) {
    return n * p.classes * p.inner + (p.inner == 1 ? s0 * p.classes : s0);
  }

  const A* load(const T* src, const Params& p, int64_t n, int64_t s0, int64_t s1,
                int64_t& class_stride) {
    const T* first = src + offset(p, n, s0);
    if constexpr (std::is_same_v<T, A>) {
      class_stride = p.inner;
      return first;
    } else {
      const int64_t width = s1 - s0, C = p.classes, S = p.inner;
      buf.resize(width * C);
      if (S == 1) {
        widen(first, buf.data(), width * C);
        class_stride = 1;
      } else {
        for (int64_t c = 0; c < C; ++c) widen(first + c * S, buf.data() + c * width, width);
        class_stride = width;
      }
      return buf.data();
    }
  }

  // Where the task's gradient is computed (same layout as load()).
  A* output(T* dst, const Params& p, int64_t n, int64_t s0, int64_t s1) {
    if constexpr (std::is_same_v<T, A>) {
      return dst + offset(p, n, s0);
    } else {
      buf.resize((s1 - s0) * p.classes);
      return buf.data();
    }
  }

  // Rounds a gradient computed into the buffer to T, once per element.
  void store(T* dst, const Params& p, int64_t n, int64_t s0, int64_t s1) const {
    if constexpr (!std::is_same_v<T, A>) {
      T* first = dst + offset(p, n, s0);
      const int64_t width = s1 - s0, C = p.classes, S = p.inner;
      if (S == 1) {
        narrow(buf.data(), first, width * C);
      } else {
        for (int64_t c = 0; c < C; ++c) narrow(buf.data() + c * width, first + c * S, width);
      }
    }
  }
};

// ---------------------------------------------------------------------------
// Scalar row kernels (any stride; float64, and float32 where AVX2 is absent or
// the target holds probabilities).

// The maximum m (from the lowest finite value up) and sum_c exp(x_c - m); a
// NaN logit reaches s (row_is_nan).
template <typename T>
void row_max_sumexp(const T* x, int64_t stride, int64_t classes, T& m, T& s) {
  m = std::numeric_limits<T>::lowest();
  for (int64_t c = 0; c < classes; ++c) m = std::max(m, x[c * stride]);
  s = 0;
  for (int64_t c = 0; c < classes; ++c) s += std::exp(x[c * stride] - m);
}

#if HG_HAVE_AVX2
#define HG_FLATTEN __attribute__((flatten))  // inlines simd::exp into the row loops

// Lanes at or past n read as -inf (they add exp(-inf) = 0).
inline __m256 load_tail(const float* x, int64_t n) {
  const __m256i mask = simd::tail_mask(n);
  return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_maskload_ps(x, mask),
                          _mm256_castsi256_ps(mask));
}

// The first n lanes of v (masked stores are slow on the AMD cores here).
inline void store_tail(float* out, __m256 v, int64_t n) {
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  std::memcpy(out, tmp, sizeof(float) * n);
}

// One pass: online max and sum of exponentials of a contiguous row.
inline __attribute__((always_inline)) void online_step(__m256 block_max, __m256& M, __m256& S) {
  const __m256 nm = _mm256_max_ps(M, block_max);
  if (_mm256_movemask_ps(_mm256_cmp_ps(nm, M, _CMP_GT_OQ))) {
    S = _mm256_mul_ps(S, simd::exp_nonpositive(_mm256_sub_ps(M, nm)));
    M = nm;
  }
}

// Rows of at most kShortRow logits (in L1): the max first, then one exp per
// logit, which saves the online rescaling exps that dominate short rows.
constexpr int64_t kShortRow = 64;

HG_FLATTEN void short_row_max_sumexp_avx2(const float* x, int64_t classes, float& m, float& s) {
  __m256 M = _mm256_set1_ps(std::numeric_limits<float>::lowest());
  for (int64_t i = 0; i < classes; i += 8) {
    M = _mm256_max_ps(M, i + 8 <= classes ? _mm256_loadu_ps(x + i) : load_tail(x + i, classes - i));
  }
  m = simd::reduce_max(M);
  const __m256 Mv = _mm256_set1_ps(m);
  __m256 S = _mm256_setzero_ps();
  for (int64_t i = 0; i < classes; i += 8) {
    const __m256 v = i + 8 <= classes ? _mm256_loadu_ps(x + i) : load_tail(x + i, classes - i);
    S = _mm256_add_ps(S, simd::exp_nonpositive(_mm256_sub_ps(v, Mv)));
  }
  s = simd::reduce_add(S);
}

HG_FLATTEN void row_max_sumexp_avx2(const float* x, int64_t classes, float& m, float& s) {
  if (classes <= kShortRow) return short_row_max_sumexp_avx2(x, classes, m, s);
  __m256 M = _mm256_set1_ps(std::numeric_limits<float>::lowest());
  __m256 S = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= classes; i += 32) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    const __m256 c = _mm256_loadu_ps(x + i + 16), d = _mm256_loadu_ps(x + i + 24);
    online_step(_mm256_max_ps(_mm256_max_ps(a, b), _mm256_max_ps(c, d)), M, S);
    const __m256 ea = simd::exp_nonpositive(_mm256_sub_ps(a, M)), eb = simd::exp_nonpositive(_mm256_sub_ps(b, M));
    const __m256 ec = simd::exp_nonpositive(_mm256_sub_ps(c, M)), ed = simd::exp_nonpositive(_mm256_sub_ps(d, M));
    S = _mm256_add_ps(S, _mm256_add_ps(_mm256_add_ps(ea, eb), _mm256_add_ps(ec, ed)));
  }
  for (; i < classes; i += 8) {
    const __m256 a = i + 8 <= classes ? _mm256_loadu_ps(x + i) : load_tail(x + i, classes - i);
    online_step(a, M, S);
    S = _mm256_add_ps(S, simd::exp_nonpositive(_mm256_sub_ps(a, M)));
  }
  m = simd::reduce_max(M);
  s = simd::reduce_add(_mm256_mul_ps(S, simd::exp_nonpositive(_mm256_sub_ps(M, _mm256_set1_ps(m)))));
}

// out_c = exp(x_c - lse) * k - c2 * w_c (w null: c2).
HG_FLATTEN void grad_row_avx2(const float* x, float* out, int64_t classes, float lse, float k,
                   const float* w, float c2) {
  const __m256 L = _mm256_set1_ps(lse), K = _mm256_set1_ps(k), C2 = _mm256_set1_ps(c2);
  for (int64_t i = 0; i < classes; i += 8) {
    const int64_t n = std::min<int64_t>(8, classes - i);
    const __m256i mask = simd::tail_mask(n);
    const bool full = n == 8;
    const __m256 v = full ? _mm256_loadu_ps(x + i) : _mm256_maskload_ps(x + i, mask);
    __m256 g = _mm256_mul_ps(simd::exp_nonpositive(_mm256_sub_ps(v, L)), K);
    if (w != nullptr) {
      const __m256 wv = full ? _mm256_loadu_ps(w + i) : _mm256_maskload_ps(w + i, mask);
      g = _mm256_fnmadd_ps(C2, wv, g);
    } else if (c2 != 0.0f) {
      g = _mm256_sub_ps(g, C2);
    }
    if (full) {
      _mm256_storeu_ps(out + i, g);
    } else {
      store_tail(out + i, g, n);
    }
  }
}

// Contiguous row, float32: sum_c w_c (m - x_c), and with a probability
// target y: sum_c w_c y'_c (m - x_c) and sum_c w_c y'_c, y' = (1-e) y + e/C
// (y, w may be null).
HG_FLATTEN void row_linear_avx2(const float* x, const float* y, const float* w, int64_t classes,
                                float m, float e, float& lin_w, float& lin_y, float& mass_y) {
  const __m256 M = _mm256_set1_ps(m), one = _mm256_set1_ps(1.0f);
  const __m256 keep = _mm256_set1_ps(1.0f - e);
  const __m256 spread = _mm256_set1_ps(e / static_cast<float>(classes));
  __m256 LW = _mm256_setzero_ps(), LY = _mm256_setzero_ps(), MY = _mm256_setzero_ps();
  for (int64_t i = 0; i < classes; i += 8) {
    const int64_t n = std::min<int64_t>(8, classes - i);
    const __m256i mask = simd::tail_mask(n);
    const bool full = n == 8;
    auto load = [&](const float* at) {
      return full ? _mm256_loadu_ps(at) : _mm256_maskload_ps(at, mask);
    };
    const __m256 gap = _mm256_sub_ps(M, load(x + i));
    // Tail lanes weigh 0, so they add nothing.
    const __m256 wv =
        w ? load(w + i) : (full ? one : _mm256_and_ps(one, _mm256_castsi256_ps(mask)));
    LW = _mm256_fmadd_ps(wv, gap, LW);
    if (y) {
      const __m256 wy = _mm256_mul_ps(wv, _mm256_fmadd_ps(keep, load(y + i), spread));
      LY = _mm256_fmadd_ps(wy, gap, LY);
      MY = _mm256_add_ps(MY, wy);
    }
  }
  lin_w = simd::reduce_add(LW);
  lin_y = simd::reduce_add(LY);
  mass_y = simd::reduce_add(MY);
}

// Whether native's log_softmax of a contiguous float32 row is NaN (a NaN or
// +inf logit, or only -inf ones), without exponentials: for ignored rows.
HG_FLATTEN bool row_softmax_is_nan_avx2(const float* x, int64_t classes) {
  const __m256 inf = _mm256_set1_ps(INFINITY), neg_inf = _mm256_set1_ps(-INFINITY);
  __m256 special = _mm256_setzero_ps(), above = _mm256_setzero_ps();
  for (int64_t i = 0; i < classes; i += 8) {
    const __m256 v = i + 8 <= classes ? _mm256_loadu_ps(x + i) : load_tail(x + i, classes - i);
    special = _mm256_or_ps(special, _mm256_cmp_ps(v, inf, _CMP_EQ_UQ));  // NaN or +inf
    above = _mm256_or_ps(above, _mm256_cmp_ps(v, neg_inf, _CMP_GT_OQ));
  }
  return _mm256_movemask_ps(special) != 0 || (classes > 0 && _mm256_movemask_ps(above) == 0);
}

// Contiguous row, float32, probability target:
// out_c = exp(x_c - lse) k - scale w_c ((1-e) y_c + e/C).
HG_FLATTEN void prob_grad_row_avx2(const float* x, const float* y, const float* w, float* out,
                                   int64_t classes, float lse, float k, float scale, float e) {
  const __m256 L = _mm256_set1_ps(lse), K = _mm256_set1_ps(k), SC = _mm256_set1_ps(scale);
  const __m256 keep = _mm256_set1_ps(1.0f - e);
  const __m256 spread = _mm256_set1_ps(e / static_cast<float>(classes));
  for (int64_t i = 0; i < classes; i += 8) {
    const int64_t n = std::min<int64_t>(8, classes - i);
    const __m256i mask = simd::tail_mask(n);
    const bool full = n == 8;
    auto load = [&](const float* at) {
      return full ? _mm256_loadu_ps(at) : _mm256_maskload_ps(at, mask);
    };
    const __m256 yc = _mm256_fmadd_ps(keep, load(y + i), spread);
    const __m256 wy = w ? _mm256_mul_ps(load(w + i), yc) : yc;
    const __m256 p = simd::exp_nonpositive(_mm256_sub_ps(load(x + i), L));
    const __m256 g = _mm256_fnmadd_ps(SC, wy, _mm256_mul_ps(p, K));
    if (full) {
      _mm256_storeu_ps(out + i, g);
    } else {
      store_tail(out + i, g, n);
    }
  }
}
#endif  // HG_HAVE_AVX2

template <typename T>
void max_sumexp(const T* x, int64_t stride, int64_t classes, T& m, T& s) {
#if HG_HAVE_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) return row_max_sumexp_avx2(x, classes, m, s);
  }
#endif
  row_max_sumexp(x, stride, classes, m, s);
}

// See row_softmax_is_nan_avx2.
template <typename T>
bool row_softmax_is_nan(const T* x, int64_t stride, int64_t classes) {
#if HG_HAVE_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) return row_softmax_is_nan_avx2(x, classes);
  }
#endif
  bool above = false;
  for (int64_t c = 0; c < classes; ++c) {
    const T v = x[c * stride];
    if (std::isnan(v) || v == std::numeric_limits<T>::infinity()) return true;
    above = above || v > -std::numeric_limits<T>::infinity();
  }
  return classes > 0 && !above;
}

// sum_c w_c (m - x_c), and with y: sum_c w_c y'_c (m - x_c) and
// sum_c w_c y'_c, y' = (1-e) y + e/C (y, w may be null).
template <typename T>
void row_linear(const T* x, const T* y, const T* w, int64_t stride, int64_t classes, T m, T e,
                T& lin_w, T& lin_y, T& mass_y) {
#if HG_HAVE_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) return row_linear_avx2(x, y, w, classes, m, e, lin_w, lin_y, mass_y);
  }
#endif
  lin_w = lin_y = mass_y = 0;
  const T C = static_cast<T>(classes);
  for (int64_t c = 0; c < classes; ++c) {
    const T wc = w ? w[c] : T(1);
    const T gap = m - x[c * stride];
    lin_w += wc * gap;
    if (y) {
      const T wy = wc * smoothed(y[c * stride], e, C);
      lin_y += wy * gap;
      mass_y += wy;
    }
  }
}

// Forward of one row: returns its loss (0 if ignored), writes lse, adds the
// weight of its target to w_acc (index targets).
template <typename T>
T forward_row(const T* x, const T* y, int64_t t, const T* w, int64_t stride, const Params& p,
              T& lse, double& w_acc, bool& bad) {
  const T e = static_cast<T>(p.smoothing), C = static_cast<T>(p.classes);
  const T w_total = static_cast<T>(p.weight_total);
  if (!p.prob_target) {
    if (is_ignored(t, p.ignore_index)) {
      lse = ignored_row_lse<T>(row_softmax_is_nan(x, stride, p.classes));
      return 0;
    }
    if (!in_range(t, p.classes)) {
      bad = true;
      lse = 0;
      return 0;
    }
  }
  T m, s;
  max_sumexp(x, stride, p.classes, m, s);
  const T log_s = row_log_s(m, s, std::log(s));
  lse = m + log_s;
  T lin_w = 0, lin_y = 0, mass_y = 0;
  if (p.prob_target || p.smoothing > 0) {
    row_linear(x, p.prob_target ? y : static_cast<const T*>(nullptr), w, stride, p.classes, m, e,
               lin_w, lin_y, mass_y);
  }
  if (p.prob_target) return prob_row_loss(log_s, lin_y, mass_y);
  const T w_t = w ? w[t] : T(1);
  w_acc += w_t;
  return index_row_loss(log_s, m - x[t * stride], w_t, lin_w, e, C, w_total);
}

#if HG_HAVE_AVX2
// Forward of eight rows (n, s..s+lanes) that share n: lanes over s, loop over
// classes (S > 1, float32, index targets).
HG_FLATTEN void forward_lanes_avx2(const float* x, int64_t S, const int64_t* tg, int lanes,
                                   const float* w,
                        const Params& p, float* loss, float* lse, double& loss_acc,
                        double& w_acc, int64_t row0, BadTarget& bad_target) {
  const int64_t C = p.classes;
  alignas(32) int32_t tl[8];
  int valid = 0;
  for (int l = 0; l < 8; ++l) {
    tl[l] = -1;
    if (l >= lanes) continue;
    const int64_t t = tg[l];
    if (is_ignored(t, p.ignore_index)) continue;
    if (!in_range(t, C)) {
      bad_target.report(row0 + l);
      continue;
    }
    tl[l] = static_cast<int32_t>(t);
    valid |= 1 << l;
  }
  const __m256i mask = simd::tail_mask(lanes);
  const __m256i Tv = _mm256_load_si256(reinterpret_cast<const __m256i*>(tl));
  const bool full = lanes == 8;
  auto load = [&](const float* at) {
    return full ? _mm256_loadu_ps(at) : _mm256_maskload_ps(at, mask);
  };
  __m256 M = _mm256_set1_ps(std::numeric_limits<float>::lowest());
  for (int64_t c = 0; c < C; ++c) M = _mm256_max_ps(load(x + c * S), M);
  __m256 Ssum = _mm256_setzero_ps(), XT = _mm256_setzero_ps(), LW = _mm256_setzero_ps();
  const bool smooth = p.smoothing > 0;
  for (int64_t c = 0; c < C; ++c) {
    const __m256 v = load(x + c * S);
    Ssum = _mm256_add_ps(Ssum, simd::exp_nonpositive(_mm256_sub_ps(v, M)));
    const __m256 hit = _mm256_castsi256_ps(
        _mm256_cmpeq_epi32(Tv, _mm256_set1_epi32(static_cast<int32_t>(c))));
    XT = _mm256_blendv_ps(XT, v, hit);
    if (smooth) LW = _mm256_fmadd_ps(_mm256_set1_ps(w ? w[c] : 1.0f), _mm256_sub_ps(M, v), LW);
  }
  // Rows whose log_softmax native makes NaN (row_is_nan): s is NaN or 0, or m is +inf.
  const __m256 nan_lanes =
      _mm256_or_ps(_mm256_cmp_ps(Ssum, _mm256_setzero_ps(), _CMP_NGT_UQ),
                   _mm256_cmp_ps(M, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
  if (!smooth && !w) {
    // The common case in vector lanes: lse = m + log s, loss = lse - x_t
    // (index_row_loss with e = 0, w_t = 1); ignored rows give loss 0 and
    // lse 0, or NaN (ignored_row_lse).
    const __m256 valid_lanes = _mm256_castsi256_ps(_mm256_cmpgt_epi32(Tv, _mm256_set1_epi32(-1)));
    const __m256 log_s =
        _mm256_blendv_ps(simd::log_positive(Ssum), _mm256_set1_ps(NAN), nan_lanes);
    const __m256 lse_v =
        _mm256_and_ps(_mm256_add_ps(M, log_s), _mm256_or_ps(valid_lanes, nan_lanes));
    const __m256 loss_v = _mm256_and_ps(_mm256_add_ps(_mm256_sub_ps(M, XT), log_s), valid_lanes);
    alignas(32) float losses[8];
    _mm256_store_ps(losses, loss_v);
    if (full) {
      _mm256_storeu_ps(lse, lse_v);
      if (loss) _mm256_storeu_ps(loss, loss_v);
    } else {
      _mm256_maskstore_ps(lse, mask, lse_v);
      if (loss) _mm256_maskstore_ps(loss, mask, loss_v);
    }
    for (int l = 0; l < lanes; ++l) loss_acc += losses[l];
    w_acc += __builtin_popcount(static_cast<unsigned>(valid));
    return;
  }
  alignas(32) float m[8], s[8], xt[8], lw[8];
  _mm256_store_ps(m, M);
  _mm256_store_ps(s, Ssum);
  _mm256_store_ps(xt, XT);
  _mm256_store_ps(lw, LW);
  const float e = static_cast<float>(p.smoothing), Cf = static_cast<float>(C);
  const float w_total = static_cast<float>(p.weight_total);
  for (int l = 0; l < lanes; ++l) {
    float row_loss = 0;
    lse[l] = 0;
    if (valid >> l & 1) {
      const float log_s = row_log_s(m[l], s[l], std::log(s[l]));
      lse[l] = m[l] + log_s;
      const float w_t = w ? w[tl[l]] : 1.0f;
      w_acc += w_t;
      row_loss = index_row_loss(log_s, m[l] - xt[l], w_t, lw[l], e, Cf, w_total);
    } else if (is_ignored(tg[l], p.ignore_index)) {
      lse[l] = ignored_row_lse<float>(row_is_nan(m[l], s[l]));
    }
    if (loss) loss[l] = row_loss;
    loss_acc += row_loss;
  }
}
#endif

template <typename T>
void forward_typed(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                   Params p, at::Tensor& loss, at::Tensor& lse_t) {
  using A = acc_t<T>;
  const T* x = input.const_data_ptr<T>();
  std::vector<A> w_store;
  const A* w = compute_weights<T>(weight, p, w_store);
  if (w) p.weight_total = weight_sum(w, p.classes);
  const T* y = p.prob_target ? target.const_data_ptr<T>() : nullptr;
  const int64_t* tg = p.prob_target ? nullptr : target.const_data_ptr<int64_t>();
  A* lse = lse_t.mutable_data_ptr<A>();
  T* rows_out = p.reduction == kNone ? loss.mutable_data_ptr<T>() : nullptr;
  const int64_t S = p.inner, step = row_step(p);
  const Split split(p);
  std::vector<double> loss_part(split.count, 0.0), w_part(split.count, 0.0);
  BadTarget bad_target;

  at::parallel_for(0, split.count, 1, [&](int64_t begin, int64_t end) {
    TaskRows<T> x_rows, y_rows;
    for (int64_t task = begin; task < end; ++task) {
      int64_t n, s0, s1, stride;
      split.rows(p, task, n, s0, s1);
      const A* xt = x_rows.load(x, p, n, s0, s1, stride);
      const A* yt = y ? y_rows.load(y, p, n, s0, s1, stride) : nullptr;
      double loss_acc = 0, w_acc = 0;
      int64_t s = s0;
#if HG_HAVE_AVX2
      if constexpr (std::is_same_v<A, float>) {
        if (S > 1 && !p.prob_target) {
          for (; s < s1; s += 8) {
            const int lanes = static_cast<int>(std::min<int64_t>(8, s1 - s));
            const int64_t r = n * S + s;
            alignas(32) float lane_loss[8];
            float* loss_out = nullptr;
            if constexpr (std::is_same_v<T, float>) {
              loss_out = rows_out ? rows_out + r : nullptr;
            } else {
              loss_out = rows_out ? lane_loss : nullptr;
            }
            forward_lanes_avx2(xt + (s - s0), stride, tg + r, lanes, w, p, loss_out, lse + r,
                               loss_acc, w_acc, r, bad_target);
            if constexpr (!std::is_same_v<T, float>) {
              for (int l = 0; rows_out && l < lanes; ++l) rows_out[r + l] = T(lane_loss[l]);
            }
          }
        }
      }
#endif
      for (; s < s1; ++s) {
        const int64_t r = n * S + s;
        const int64_t at = (s - s0) * step;
        bool bad = false;
        const A row_loss =
            forward_row(xt + at, yt ? yt + at : nullptr, tg ? tg[r] : 0, w, stride, p, lse[r],
                        w_acc, bad);
        if (bad) bad_target.report(r);
        if (rows_out) rows_out[r] = static_cast<T>(row_loss);
        loss_acc += row_loss;
      }
      loss_part[task] = loss_acc;
      w_part[task] = w_acc;
    }
  });
  if (tg) bad_target.raise_if_any(tg);
  if (p.reduction == kNone) return;
  double total = 0, weight_total = 0;
  for (int64_t task = 0; task < split.count; ++task) {
    total += loss_part[task];
    weight_total += w_part[task];
  }
  if (p.reduction == kMean) {
    const double rows = static_cast<double>(p.outer * p.inner);
    total /= p.prob_target ? rows : weight_total;
  }
  *loss.mutable_data_ptr<T>() = round_once<T>(total);
}

void forward_kernel(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                    const Params& p, at::Tensor& loss, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "handgrad::cross_entropy", [&] {
    forward_typed<scalar_t>(input, target, weight, p, loss, lse);
  });
}

// ---------------------------------------------------------------------------
// Backward.

// The 'mean' divisor: the weight of the non-ignored targets (index targets)
// or the number of rows (probabilities). Fixed blocks keep it deterministic.
template <typename T>
double mean_divisor(const int64_t* tg, const T* w, const Params& p, BadTarget& bad_target) {
  const int64_t rows = p.outer * p.inner;
  if (p.prob_target) return static_cast<double>(rows);
  constexpr int64_t kBlock = 16384;
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
  std::vector<double> part(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double acc = 0;
      for (int64_t r = b * kBlock; r < std::min(rows, (b + 1) * kBlock); ++r) {
        const int64_t t = tg[r];
        if (is_ignored(t, p.ignore_index)) continue;
        if (!in_range(t, p.classes)) {
          bad_target.report(r);
          continue;
        }
        acc += w ? static_cast<double>(w[t]) : 1.0;
      }
      part[b] = acc;
    }
  });
  double total = 0;
  for (double v : part) total += v;
  return total;
}

// The upstream gradient's share of every row: g_row or g * factor.
template <typename A>
struct RowScale {
  const A* per_row;  // reduction 'none'
  A common;

  A operator()(int64_t r) const { return per_row ? per_row[r] : common; }
};

// grad_loss as compute-type values (per_row converted into store for float16 / bfloat16).
template <typename T>
RowScale<acc_t<T>> row_scale(const at::Tensor& grad_loss, const Params& p, const int64_t* tg,
                             const acc_t<T>* w, BadTarget& bad_target,
                             std::vector<acc_t<T>>& store) {
  using A = acc_t<T>;
  const T* g = grad_loss.const_data_ptr<T>();
  if (p.reduction == kNone) {
    if constexpr (std::is_same_v<T, A>) {
      return {g, A(0)};
    } else {
      store.assign(g, g + grad_loss.numel());
      return {store.data(), A(0)};
    }
  }
  const A g0 = static_cast<A>(g[0]);
  if (p.reduction == kSum) return {nullptr, g0};
  return {nullptr, static_cast<A>(static_cast<double>(g0) / mean_divisor(tg, w, p, bad_target))};
}

// Gradient of one row (any stride).
template <typename T>
void backward_row(const T* x, const T* y, int64_t t, const T* w, int64_t stride, T lse,
                  T scale, const Params& p, T* out, bool& bad) {
  const int64_t C = p.classes;
  const T e = static_cast<T>(p.smoothing), Cf = static_cast<T>(C);
  const T w_total = static_cast<T>(p.weight_total);
  if (!p.prob_target && (is_ignored(t, p.ignore_index) || !in_range(t, C))) {
    bad = !is_ignored(t, p.ignore_index);
    const T fill = std::isnan(lse) ? lse : T(0);  // ignored_row_lse
    for (int64_t c = 0; c < C; ++c) out[c * stride] = fill;
    return;
  }
  if (p.prob_target) {
    T mass_y = 0, unused_w, unused_y;
    row_linear(x, y, w, stride, C, T(0), e, unused_w, unused_y, mass_y);
    const T k = scale * mass_y;
#if HG_HAVE_AVX2
    if constexpr (std::is_same_v<T, float>) {
      if (stride == 1) return prob_grad_row_avx2(x, y, w, out, C, lse, k, scale, e);
    }
#endif
    for (int64_t c = 0; c < C; ++c) {
      const T yc = smoothed(y[c * stride], e, Cf);
      out[c * stride] = std::exp(x[c * stride] - lse) * k - scale * (w ? w[c] : T(1)) * yc;
    }
    return;
  }
  const T w_t = w ? w[t] : T(1);
  const T k = scale * index_row_p_factor(w_t, e, Cf, w_total);
  const T c2 = scale * e / Cf;
#if HG_HAVE_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) {
      grad_row_avx2(x, out, C, lse, k, w, c2);
      out[t] -= scale * (T(1) - e) * w_t;
      return;
    }
  }
#endif
  for (int64_t c = 0; c < C; ++c) {
    out[c * stride] = std::exp(x[c * stride] - lse) * k - c2 * (w ? w[c] : T(1));
  }
  out[t * stride] -= scale * (T(1) - e) * w_t;
}

#if HG_HAVE_AVX2
// Gradient of eight rows (n, s..s+lanes) sharing n (S > 1, float32, index targets).
HG_FLATTEN void backward_lanes_avx2(const float* x, float* out, int64_t S, const int64_t* tg,
                                    int lanes,
                         const float* w, const float* lse, const RowScale<float>& scale,
                         const Params& p, int64_t row0, BadTarget& bad_target) {
  const int64_t C = p.classes;
  const float e = static_cast<float>(p.smoothing), Cf = static_cast<float>(C);
  const float w_total = static_cast<float>(p.weight_total);
  alignas(32) int32_t tl[8];
  alignas(32) float L[8], K[8], C2[8], TK[8];
  alignas(32) int32_t keep[8];
  for (int l = 0; l < 8; ++l) {
    tl[l] = -1;
    L[l] = K[l] = C2[l] = TK[l] = 0;
    keep[l] = 0;
    if (l >= lanes) continue;
    const int64_t t = tg[l];
    if (is_ignored(t, p.ignore_index)) {
      // Gradient 0, or NaN where the forward recorded lse = NaN (ignored_row_lse).
      L[l] = lse[l];
      keep[l] = std::isnan(lse[l]) ? -1 : 0;
      continue;
    }
    if (!in_range(t, C)) {
      bad_target.report(row0 + l);
      continue;
    }
    const float sc = scale(row0 + l);
    const float w_t = w ? w[t] : 1.0f;
    tl[l] = static_cast<int32_t>(t);
    L[l] = lse[l];
    K[l] = sc * index_row_p_factor(w_t, e, Cf, w_total);
    C2[l] = sc * e / Cf;
    TK[l] = sc * (1.0f - e) * w_t;
    keep[l] = -1;
  }
  const __m256i mask = simd::tail_mask(lanes);
  const __m256i Tv = _mm256_load_si256(reinterpret_cast<const __m256i*>(tl));
  const __m256 keepv =
      _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(keep)));
  const __m256 Lv = _mm256_load_ps(L), Kv = _mm256_load_ps(K), C2v = _mm256_load_ps(C2);
  const __m256 TKv = _mm256_load_ps(TK);
  const bool smooth = p.smoothing > 0;
  const bool full = lanes == 8;
  for (int64_t c = 0; c < C; ++c) {
    const __m256 v = full ? _mm256_loadu_ps(x + c * S) : _mm256_maskload_ps(x + c * S, mask);
    __m256 g = _mm256_mul_ps(simd::exp_nonpositive(_mm256_sub_ps(v, Lv)), Kv);
    if (smooth) g = _mm256_fnmadd_ps(C2v, _mm256_set1_ps(w ? w[c] : 1.0f), g);
    const __m256 hit = _mm256_castsi256_ps(
        _mm256_cmpeq_epi32(Tv, _mm256_set1_epi32(static_cast<int32_t>(c))));
    g = _mm256_sub_ps(g, _mm256_and_ps(hit, TKv));
    g = _mm256_and_ps(g, keepv);
    if (full) {
      _mm256_storeu_ps(out + c * S, g);
    } else {
      store_tail(out + c * S, g, lanes);
    }
  }
}
#endif

template <typename T>
void backward_typed(const at::Tensor& grad_loss, const at::Tensor& input,
                    const at::Tensor& target, const at::Tensor& weight, const at::Tensor& lse_t,
                    Params p, at::Tensor& grad_input) {
  using A = acc_t<T>;
  const T* x = input.const_data_ptr<T>();
  std::vector<A> w_store, g_store;
  const A* w = compute_weights<T>(weight, p, w_store);
  if (w) p.weight_total = weight_sum(w, p.classes);
  const T* y = p.prob_target ? target.const_data_ptr<T>() : nullptr;
  const int64_t* tg = p.prob_target ? nullptr : target.const_data_ptr<int64_t>();
  const A* lse = lse_t.const_data_ptr<A>();
  T* gx = grad_input.mutable_data_ptr<T>();
  BadTarget bad_target;
  const RowScale<A> scale = row_scale<T>(grad_loss, p, tg, w, bad_target, g_store);
  if (tg) bad_target.raise_if_any(tg);
  const int64_t S = p.inner, step = row_step(p);
  const Split split(p);

  at::parallel_for(0, split.count, 1, [&](int64_t begin, int64_t end) {
    TaskRows<T> x_rows, y_rows, g_rows;
    for (int64_t task = begin; task < end; ++task) {
      int64_t n, s0, s1, stride;
      split.rows(p, task, n, s0, s1);
      const A* xt = x_rows.load(x, p, n, s0, s1, stride);
      const A* yt = y ? y_rows.load(y, p, n, s0, s1, stride) : nullptr;
      A* gt = g_rows.output(gx, p, n, s0, s1);
      int64_t s = s0;
#if HG_HAVE_AVX2
      if constexpr (std::is_same_v<A, float>) {
        if (S > 1 && !p.prob_target) {
          for (; s < s1; s += 8) {
            const int lanes = static_cast<int>(std::min<int64_t>(8, s1 - s));
            const int64_t r = n * S + s;
            backward_lanes_avx2(xt + (s - s0), gt + (s - s0), stride, tg + r, lanes, w, lse + r,
                                scale, p, r, bad_target);
          }
        }
      }
#endif
      for (; s < s1; ++s) {
        const int64_t r = n * S + s;
        const int64_t at = (s - s0) * step;
        bool bad = false;
        backward_row(xt + at, yt ? yt + at : nullptr, tg ? tg[r] : 0, w, stride, lse[r],
                     scale(r), p, gt + at, bad);
        if (bad) bad_target.report(r);
      }
      g_rows.store(gx, p, n, s0, s1);
    }
  });
  if (tg) bad_target.raise_if_any(tg);
}

void backward_kernel(const at::Tensor& grad_loss, const at::Tensor& input,
                     const at::Tensor& target, const at::Tensor& weight, const at::Tensor& lse,
                     const Params& p, at::Tensor& grad_input) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "handgrad::cross_entropy_backward", [&] {
    backward_typed<scalar_t>(grad_loss, input, target, weight, lse, p, grad_input);
  });
}

// dloss/dy_c = scale (1-e) w_c (lse - x_c), probability targets.
template <typename T>
void target_backward_typed(const at::Tensor& grad_loss, const at::Tensor& input,
                           const at::Tensor& weight, const at::Tensor& lse_t, const Params& p,
                           at::Tensor& grad_target) {
  using A = acc_t<T>;
  const T* x = input.const_data_ptr<T>();
  std::vector<A> w_store, g_store;
  const A* w = compute_weights<T>(weight, p, w_store);
  const A* lse = lse_t.const_data_ptr<A>();
  T* gy = grad_target.mutable_data_ptr<T>();
  BadTarget unused;
  const RowScale<A> scale = row_scale<T>(grad_loss, p, nullptr, w, unused, g_store);
  const int64_t C = p.classes, S = p.inner;
  const A keep = A(1) - static_cast<A>(p.smoothing);
  const Split split(p);
  at::parallel_for(0, split.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      int64_t n, s0, s1;
      split.rows(p, task, n, s0, s1);
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t r = n * S + s;
        const int64_t off = n * C * S + (S == 1 ? s * C : s);
        const A k = scale(r) * keep;
        for (int64_t c = 0; c < C; ++c) {
          const A xc = static_cast<A>(x[off + c * S]);
          gy[off + c * S] = static_cast<T>(k * (w ? w[c] : A(1)) * (lse[r] - xc));
        }
      }
    }
  });
}

void target_backward_kernel(const at::Tensor& grad_loss, const at::Tensor& input,
                            const at::Tensor& weight, const at::Tensor& lse, const Params& p,
                            at::Tensor& grad_target) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "handgrad::cross_entropy_target_backward", [&] {
    target_backward_typed<scalar_t>(grad_loss, input, weight, lse, p, grad_target);
  });
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(const at::Tensor& input,
                                                     const at::Tensor& target,
                                                     const std::optional<at::Tensor>& weight,
                                                     int64_t ignore_index,
                                                     c10::string_view reduction,
                                                     double label_smoothing) {
  return forward(input, target, weight, ignore_index, reduction, label_smoothing,
                 &forward_kernel);
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                                      const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight,
                                      int64_t ignore_index, c10::string_view reduction,
                                      double label_smoothing, const at::Tensor& lse) {
  return backward(grad_loss, input, target, weight, ignore_index, reduction, label_smoothing, lse,
                  &backward_kernel);
}

at::Tensor cross_entropy_target_backward_cpu(const at::Tensor& grad_loss,
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

TORCH_LIBRARY_IMPL(handgrad, CPU, m) {
  m.impl("cross_entropy", &handgrad::cross_entropy::cross_entropy_cpu);
  m.impl("cross_entropy_backward", &handgrad::cross_entropy::cross_entropy_backward_cpu);
  m.impl("cross_entropy_target_backward",
         &handgrad::cross_entropy::cross_entropy_target_backward_cpu);
}
