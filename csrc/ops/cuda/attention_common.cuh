// scaled_dot_product_attention: the device-side pieces every CUDA attention
// kernel shares -- the one-row-per-thread kernels of attention.cu and the
// tensor-core kernels of attention_tensor_core.cuh: strided row and mask
// views, the score rule (scale, additive mask, causal), the call's dropout
// state read back from rng_state on the device, and the backward's inputs.
#pragma once

#include "common/cuda_launch.cuh"
#include "ops/attention.h"

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace handgrad {
namespace attention {
namespace {

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
  return keep(d, bh, i, j) ? static_cast<acc_t>(d.keep_scale) : acc_t(0);
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

}  // namespace
}  // namespace attention
}  // namespace handgrad
