// Overflow-checked int64 arithmetic for the drivers' size computations.
//
// Window geometry arrives from the user (strides, paddings, dilations up to
// 2^63 - 1); a product such as dilation * (kernel - 1) or a sum such as
// input + padding can wrap, and a wrapped size sizes a buffer or a loop. The
// drivers compute every such quantity through these helpers and raise a
// clear error when one does not fit, so that the kernels only ever see
// sizes whose sums and differences stay below kMaxExtent.
#pragma once

#include <cstdint>

namespace handgrad {

// The largest padded extent or window span the drivers accept along one
// axis (native conv2d refuses paddings above 2^62 - 1 too): two such values
// and a stride-bounded offset still add up without wrapping.
constexpr int64_t kMaxExtent = int64_t(1) << 62;

// a + b, or false when the exact sum is outside int64.
inline bool checked_add(int64_t a, int64_t b, int64_t& out) {
  return !__builtin_add_overflow(a, b, &out);
}

// a * b, or false when the exact product is outside int64.
inline bool checked_mul(int64_t a, int64_t b, int64_t& out) {
  return !__builtin_mul_overflow(a, b, &out);
}

// a * b for non-negative a and b, or INT64_MAX when it does not fit: for
// work estimates (task sizes), where "too much" is all that matters.
inline int64_t saturating_mul(int64_t a, int64_t b) {
  int64_t out = 0;
  return checked_mul(a, b, out) ? out : INT64_MAX;
}

// dilation * (kernel - 1) + 1 (the span of a dilated window), or false when
// it exceeds kMaxExtent. kernel and dilation are positive.
inline bool window_span(int64_t kernel, int64_t dilation, int64_t& out) {
  int64_t reach = 0;
  return checked_mul(dilation, kernel - 1, reach) && reach < kMaxExtent && (out = reach + 1, true);
}

// in + before + after (a padded extent), or false when it exceeds
// kMaxExtent. All three are non-negative.
inline bool padded_extent(int64_t in, int64_t before, int64_t after, int64_t& out) {
  int64_t sum = 0;
  return checked_add(in, before, sum) && checked_add(sum, after, out) && out <= kMaxExtent;
}

}  // namespace handgrad
