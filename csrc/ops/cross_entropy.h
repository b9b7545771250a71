// cross_entropy: what the CPU and CUDA kernels share.
//
// The input is viewed as (outer, C, inner): outer = N (1 for an unbatched (C)
// input), inner = d1*...*dK (1 for (N, C)). A "row" is one (n, s) pair; its C
// logits sit `inner` elements apart. With lse = log sum_c exp(x_c) per row
// (computed as m + log s, m the row maximum and s = sum_c exp(x_c - m)):
//
//  index target t, smoothing e, class weights w (all 1 without weight):
//    loss = (1-e) w_t (lse - x_t) + e/C sum_c w_c (lse - x_c)
//    dloss/dx_c = p_c a - (1-e) w_t [c == t] - e/C w_c,  a = (1-e) w_t + e/C sum_c w_c
//  probability target y, y' = (1-e) y + e/C:
//    loss = sum_c w_c y'_c (lse - x_c)
//    dloss/dx_c = p_c sum_k w_k y'_k - w_c y'_c,   dloss/dy_c = (1-e) w_c (lse - x_c)
//
// with p_c = exp(x_c - lse). Every row gradient is multiplied by the row's
// share of the upstream gradient: g_row ('none'), g ('sum'), g / D ('mean'),
// where D is the sum of w_t over the non-ignored rows (index targets, native's
// weighted mean; 0/0 = nan when every row is ignored) or the number of rows
// (probability targets). The linear terms are accumulated relative to the row
// maximum (m - x_c >= 0), so the loss of huge logits (+-1e4) loses nothing to
// cancellation.
//
// Non-finite logits follow native (log_softmax, then nll_loss or the product
// with the target), because every product above is formed as native forms
// it: w_c y'_c (m - x_c) is NaN exactly where native's log p_c * y'_c * w_c
// is (a -inf logit times a zero weight or probability), and a row whose
// log_softmax native makes NaN throughout -- a NaN logit, a +inf logit
// (inf - inf), or only -inf logits (-inf - -inf) -- gets lse = NaN here
// (row_log_s), so its loss and every gradient element are NaN. Ignored rows
// have loss 0 and gradient 0 as in native, except that native's
// log_softmax backward still multiplies exp(NaN) by 0 there: an ignored row
// whose log_softmax is NaN gets a NaN gradient. The forward records that in
// lse (NaN for such ignored rows, 0 for the others).
#pragma once

#include "common/macros.h"

#include <math.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace handgrad {
namespace cross_entropy {

enum Reduction : int { kNone = 0, kMean = 1, kSum = 2 };

struct Params {
  int64_t outer;    // N
  int64_t classes;  // C
  int64_t inner;    // d1 * ... * dK
  bool prob_target;
  bool has_weight;
  int reduction;
  int64_t ignore_index;
  double smoothing;
  double weight_total;  // sum of all class weights (C without weight)
};

HG_HOST_DEVICE bool is_ignored(int64_t t, int64_t ignore_index) { return t == ignore_index; }

HG_HOST_DEVICE bool in_range(int64_t t, int64_t classes) { return t >= 0 && t < classes; }

template <typename A>
HG_HOST_DEVICE A quiet_nan() {
  return static_cast<A>(NAN);
}

// Whether native's log_softmax of a row is NaN throughout, from the row's
// maximum m (taken from the lowest finite value up, so -inf logits never
// raise it) and s = sum_c exp(x_c - m): a NaN logit makes s NaN, a +inf one
// makes m infinite (its exp(inf - inf) is NaN), and a row of only -inf
// logits leaves s = 0. Every other row has s >= 1 (the maximum adds e^0).
template <typename A>
HG_HOST_DEVICE bool row_is_nan(A m, A s) {
  return !(s > A(0)) || !(m - m == A(0));
}

// log s of a row, or NaN where native's log_softmax of the row is NaN.
template <typename A>
HG_HOST_DEVICE A row_log_s(A m, A s, A log_of_s) {
  return row_is_nan(m, s) ? quiet_nan<A>() : log_of_s;
}

// The lse recorded for an ignored row: NaN where native's gradient of the row
// is NaN (see the top of this file), else 0.
template <typename A>
HG_HOST_DEVICE A ignored_row_lse(bool softmax_is_nan) {
  return softmax_is_nan ? quiet_nan<A>() : A(0);
}

// x rounded to the nearest T (ties to even) in a single rounding, also for
// float16 / bfloat16, whose conversions start from float: the double goes to
// float with round-to-odd first (truncated, the last bit set when inexact),
// and float's 13 or more extra bits keep the second rounding exact.
template <typename T>
HG_HOST_DEVICE T round_once(double x) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return static_cast<T>(x);
  } else {
    float f = static_cast<float>(x);  // nearest
    if (x - x == 0.0 && static_cast<double>(f) != x) {
      uint32_t bits;
      memcpy(&bits, &f, sizeof bits);
      const double abs_f = f < 0 ? -static_cast<double>(f) : static_cast<double>(f);
      if (abs_f > (x < 0 ? -x : x)) bits -= 1;  // one step toward zero (sign-magnitude)
      bits |= 1u;
      memcpy(&f, &bits, sizeof bits);
    }
    return static_cast<T>(f);
  }
}

// Loss of a row with an index target.
//   log_s = log sum_c exp(x_c - m),  gap_t = m - x_t,
//   lin_w = sum_c w_c (m - x_c) (only read when e > 0).
template <typename A>
HG_HOST_DEVICE A index_row_loss(A log_s, A gap_t, A w_t, A lin_w, A e, A classes, A w_total) {
  A loss = (A(1) - e) * w_t * (gap_t + log_s);
  if (e > A(0)) loss += e / classes * (lin_w + w_total * log_s);
  return loss;
}

// The smoothed probability y'_c = (1-e) y_c + e/C.
template <typename A>
HG_HOST_DEVICE A smoothed(A y, A e, A classes) {
  return (A(1) - e) * y + e / classes;
}

// Loss of a row with a probability target, from
//   lin_y = sum_c w_c y'_c (m - x_c) and mass_y = sum_c w_c y'_c
// (y' smoothed); mass_y is also the factor of p_c in the row's gradient.
template <typename A>
HG_HOST_DEVICE A prob_row_loss(A log_s, A lin_y, A mass_y) {
  return lin_y + mass_y * log_s;
}

// The factor of p_c in a row's gradient, index target.
template <typename A>
HG_HOST_DEVICE A index_row_p_factor(A w_t, A e, A classes, A w_total) {
  return (A(1) - e) * w_t + e / classes * w_total;
}

}  // namespace cross_entropy
}  // namespace handgrad

#include <ATen/core/Tensor.h>

#include <optional>

namespace handgrad {
namespace cross_entropy {

// Backend kernels. input: (outer, C, inner) contiguous, C >= 1; target:
// int64 with outer*inner elements, or the input's shape and dtype
// (probabilities); weight: undefined or C contiguous elements of the input's
// dtype. Forward writes lse (outer*inner, float or double; ignored rows: see
// ignored_row_lse) and loss: one value per row ('none', input dtype) or a
// 0-dim tensor. It raises on an index target out of range.
using ForwardKernel = void (*)(const at::Tensor& input, const at::Tensor& target,
                               const at::Tensor& weight, const Params& p, at::Tensor& loss,
                               at::Tensor& lse);
// grad_loss: per row ('none') or 0-dim. Writes grad_input (outer, C, inner).
using BackwardKernel = void (*)(const at::Tensor& grad_loss, const at::Tensor& input,
                                const at::Tensor& target, const at::Tensor& weight,
                                const at::Tensor& lse, const Params& p, at::Tensor& grad_input);
// Probability targets only: writes grad_target (outer, C, inner).
using TargetBackwardKernel = void (*)(const at::Tensor& grad_loss, const at::Tensor& input,
                                      const at::Tensor& weight, const at::Tensor& lse,
                                      const Params& p, at::Tensor& grad_target);

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight,
                                           int64_t ignore_index, c10::string_view reduction,
                                           double label_smoothing, ForwardKernel kernel);

at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& input,
                    const at::Tensor& target, const std::optional<at::Tensor>& weight,
                    int64_t ignore_index, c10::string_view reduction, double label_smoothing,
                    const at::Tensor& lse, BackwardKernel kernel);

at::Tensor target_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                           const at::Tensor& target, const std::optional<at::Tensor>& weight,
                           c10::string_view reduction, double label_smoothing,
                           const at::Tensor& lse, TargetBackwardKernel kernel);

}  // namespace cross_entropy
}  // namespace handgrad
