// scaled_dot_product_attention: what the CPU and CUDA kernels share.
//
//  * HG_HOST_DEVICE scalar helpers: the causal rule, the Philox-4x32-10
//    counter-based generator behind dropout (so backward regenerates the
//    forward's keep pattern from (seed, offset, head, row, column) instead of
//    storing an L x S mask), the online-softmax bookkeeping and its rules for
//    NaN and infinite scores.
//  * The problem description and the host-side driver (attention.cpp) that
//    validates arguments, broadcasts the batch dimensions of query, key and
//    value against each other (as torch's matmul does), flattens them, views
//    the mask as a broadcast (B, Hq, L, S) tensor and hands 4-D (B, H, rows,
//    features) tensors to a kernel.
#pragma once

#include "common/macros.h"

#include <cmath>
#include <cstdint>

namespace handgrad {
namespace attention {

// ---- dropout: Philox-4x32-10 (Salmon et al., "Parallel random numbers: as
// easy as 1, 2, 3", SC'11), written out from the published round function.
struct Philox4 {
  uint32_t x[4];
};

HG_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

HG_HOST_DEVICE Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  const uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(M0, ctr.x[0], hi0, lo0);
    mulhilo32(M1, ctr.x[2], hi1, lo1);
    Philox4 next;
    next.x[0] = hi1 ^ ctr.x[1] ^ k0;
    next.x[1] = lo1;
    next.x[2] = hi0 ^ ctr.x[3] ^ k1;
    next.x[3] = lo0;
    ctr = next;
    k0 += W0;
    k1 += W1;
  }
  return ctr;
}

// Random state of one attention call. Forward draws it from the generator
// of the inputs' device (torch's default CPU generator for CPU tensors, the
// CUDA generator's Philox seed and offset for CUDA tensors) and stores it in
// the op's 2-element int64 rng_state output on that device; backward reads it
// back from there (on CUDA inside the kernels, so nothing is read on the
// host and CUDA-graph capture stays valid).
struct DropoutState {
  float p;           // drop probability; 0 disables dropout, 1 drops everything
  double keep_scale; // 1 / (1 - p) from the caller's double p (see keep_scale below)
  uint64_t seed;     // Philox key
  uint64_t offset;   // mixed into the counter, so calls with one seed differ
};

// The Philox counter of the four key columns 4*col4 .. 4*col4+3 of query
// row `row` of flattened head `bh`: curand's layout for draw number
// offset/4 + col4 of subsequence (row, bh) -- words 0-1 the 64-bit draw
// number, words 2-3 the subsequence (32 bits each of row and head) -- so one
// call uses the counters offset/4 .. offset/4 + ceil(S/4) - 1 of its
// subsequences, and on CUDA reserves exactly that many offsets of the
// generator (4 ceil(S/4)), as native's dropout reserves its own.
HG_HOST_DEVICE Philox4 dropout_counter(const DropoutState& d, int64_t bh, int64_t row,
                                       int64_t col4) {
  const uint64_t draw = (d.offset >> 2) + static_cast<uint64_t>(col4);
  Philox4 ctr;
  ctr.x[0] = static_cast<uint32_t>(draw);
  ctr.x[1] = static_cast<uint32_t>(draw >> 32);
  ctr.x[2] = static_cast<uint32_t>(row);
  ctr.x[3] = static_cast<uint32_t>(bh);
  return ctr;
}

// Word w of a Philox output as a uniform number in [0, 1) (24 bits); the
// column is kept when it is >= p (probability 1 - p).
HG_HOST_DEVICE bool kept(uint32_t word, float p) {
  return static_cast<float>(word >> 8) * (1.0f / 16777216.0f) >= p;
}

// The keep decisions of the four key columns 4*col4 .. 4*col4+3 of query
// row `row` of flattened head `bh`: bit c of the result is set when column
// 4*col4 + c is kept.
HG_HOST_DEVICE unsigned keep_bits4(const DropoutState& d, int64_t bh, int64_t row, int64_t col4) {
  const Philox4 r = philox4x32_10(dropout_counter(d, bh, row, col4), static_cast<uint32_t>(d.seed),
                                  static_cast<uint32_t>(d.seed >> 32));
  unsigned bits = 0;
  for (int c = 0; c < 4; ++c) bits |= (kept(r.x[c], d.p) ? 1u : 0u) << c;
  return bits;
}

HG_HOST_DEVICE bool keep(const DropoutState& d, int64_t bh, int64_t row, int64_t col) {
  return (keep_bits4(d, bh, row, col >> 2) >> (col & 3)) & 1u;
}

// Factor applied to kept probabilities (1 / (1 - p)); p = 1 drops everything.
// Computed once, in double, from the caller's p and rounded to the kernel's
// accumulation type where it is used: a factor formed in float put a relative
// error of 2.4e-8 (p = 0.3) into every float64 result with dropout.
inline double keep_scale(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }

// ---- online softmax. A row's scores are folded in tile by tile with a
// running maximum m and sum l = sum_j e^(s_j - m). torch's rules for special
// scores hold: a NaN score, or a +inf one (e^(inf - inf)), makes the whole
// row of probabilities NaN (its output, its lse and, through them, every
// gradient it reaches); a row whose scores are all -inf sees no key (l = 0,
// lse = +inf, output 0).

// The running maximum: unlike fmax/std::max, a NaN on either side wins, so
// it survives every later tile.
template <typename T>
HG_HOST_DEVICE T max_keep_nan(T a, T b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

// lse = m + log l; +inf when no key is visible (l = 0); NaN stays NaN.
template <typename T>
HG_HOST_DEVICE T log_sum_exp(T m, T l) {
#if !HG_DEVICE_COMPILE
  using std::log;
#endif
  return l == T(0) ? static_cast<T>(INFINITY) : m + log(l);
}

// 1 / l for the output, 0 for a row that sees no key (and NaN for NaN).
template <typename T>
HG_HOST_DEVICE T inverse_sum(T l) {
  return l == T(0) ? T(0) : T(1) / l;
}

// is_causal follows torch's top-left alignment: query i sees keys j <= i
// (the lower triangle of an L x S matrix of ones).
HG_HOST_DEVICE bool causal_hidden(int64_t row, int64_t col) { return col > row; }

}  // namespace attention
}  // namespace handgrad

#include <ATen/core/Tensor.h>

#include <array>
#include <tuple>

namespace handgrad {
namespace attention {

// Sizes of one call after the batch dimensions are flattened into `batch`.
struct Problem {
  int64_t batch;
  int64_t heads_q;
  int64_t heads_kv;  // heads_q / heads_kv query heads share one key/value head
  int64_t L;         // query rows
  int64_t S;         // key rows
  int64_t E;         // query/key features
  int64_t Ev;        // value features
  double scale;
  bool causal;
  bool has_mask;
  DropoutState dropout;
};

// What a forward kernel reads and writes. Tensors are 4-D (batch, heads,
// rows, features) with a dense last dimension (the mask, weights and
// grad_weights may have any strides, including the stride-0 dimensions of
// broadcasting). lse is (B, Hq, L) contiguous, float32 for reduced-precision
// inputs (float64 for float64).
struct ForwardArgs {
  at::Tensor q, k, v;   // (B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)
  at::Tensor mask;      // additive (B, Hq, L, S) view, or undefined
  at::Tensor out;       // (B, Hq, L, Ev)
  at::Tensor lse;       // (B, Hq, L)
  at::Tensor rng_state; // 2 int64 on the inputs' device; the kernel stores the
                        // dropout seed and offset it used there (dropout only)
  at::Tensor weights;   // (B, Hq, L, S) contiguous, or undefined: the attention
                        // weights softmax(S) o Z (after dropout), when asked for
};

// What a backward kernel reads and writes. The gradient buffers are dense and
// zero-filled; the kernel may leave those it is not asked for untouched.
struct BackwardArgs {
  at::Tensor grad_out, q, k, v, out, lse, mask, rng_state;
  at::Tensor weights, grad_weights;  // (B, Hq, L, S), both or neither: the
                                     // weights output and its incoming gradient
  at::Tensor grad_q, grad_k, grad_v; // shaped as q, k, v
  at::Tensor grad_mask;              // (B, Hq, L, S) in lse's dtype: dS itself,
                                     // or undefined when the mask needs no grad
  bool want_grad_q = true;
  bool want_grad_kv = true;          // grad_k and grad_v (computed together)
};

using ForwardKernel = void (*)(ForwardArgs& a, Problem& p);
using BackwardKernel = void (*)(BackwardArgs& a, const Problem& p);

// (out, lse, rng_state, weights); weights is an empty (0,) tensor unless
// need_weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    c10::optional<double> scale, bool enable_gqa, bool need_weights, ForwardKernel kernel);

// (grad_q, grad_k, grad_v, grad_attn_mask), each an empty (0,) tensor where
// output_mask says it is not wanted.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& attn_mask,
    double dropout_p, bool is_causal, c10::optional<double> scale, bool enable_gqa,
    const at::Tensor& rng_state, const c10::optional<at::Tensor>& weights,
    const c10::optional<at::Tensor>& grad_weights, std::array<bool, 4> output_mask,
    BackwardKernel kernel);

}  // namespace attention
}  // namespace handgrad
