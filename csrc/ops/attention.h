// scaled_dot_product_attention: what the CPU and CUDA kernels share.
//
//  * HG_HOST_DEVICE scalar helpers: the causal rule, the Philox-4x32-10
//    counter-based generator behind dropout (so backward regenerates the
//    forward's keep pattern from (seed, offset, head, row, column) instead of
//    storing an L x S mask) and the online-softmax bookkeeping.
//  * The problem description and the host-side driver (attention.cpp) that
//    validates arguments, flattens batch dimensions, broadcasts the mask as a
//    strided view and hands 4-D (B, H, rows, features) tensors to a kernel.
#pragma once

#include "common/macros.h"

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

// Random state of one attention call: drawn from torch's generator in forward,
// stored in the op's small int64 rng_state output and handed back to backward.
struct DropoutState {
  float p;           // drop probability; 0 disables dropout
  uint64_t seed;     // Philox key
  uint64_t offset;   // mixed into the counter, so calls with one seed differ
};

// The keep decisions of the four key columns 4*col4 .. 4*col4+3 of query row
// `row` of flattened head `bh`: bit c of the result is set when column
// 4*col4 + c is kept (probability 1 - p).
HG_HOST_DEVICE unsigned keep_bits4(const DropoutState& d, int64_t bh, int64_t row, int64_t col4) {
  Philox4 ctr;
  ctr.x[0] = static_cast<uint32_t>(col4);
  ctr.x[1] = static_cast<uint32_t>(row);
  ctr.x[2] = static_cast<uint32_t>(bh) ^ static_cast<uint32_t>(d.offset >> 32);
  ctr.x[3] = static_cast<uint32_t>(d.offset) ^ static_cast<uint32_t>(bh >> 32);
  const Philox4 r = philox4x32_10(ctr, static_cast<uint32_t>(d.seed),
                                  static_cast<uint32_t>(d.seed >> 32));
  unsigned bits = 0;
  for (int c = 0; c < 4; ++c) {
    // 24 random bits as a uniform number in [0, 1); kept when >= p.
    const float u = static_cast<float>(r.x[c] >> 8) * (1.0f / 16777216.0f);
    bits |= (u >= d.p ? 1u : 0u) << c;
  }
  return bits;
}

HG_HOST_DEVICE bool keep(const DropoutState& d, int64_t bh, int64_t row, int64_t col) {
  return (keep_bits4(d, bh, row, col >> 2) >> (col & 3)) & 1u;
}

// Factor applied to kept probabilities (1 / (1 - p)); p = 1 drops everything.
HG_HOST_DEVICE float keep_scale(float p) { return p < 1.0f ? 1.0f / (1.0f - p) : 0.0f; }

// is_causal follows torch's top-left alignment: query i sees keys j <= i
// (the lower triangle of an L x S matrix of ones).
HG_HOST_DEVICE bool causal_hidden(int64_t row, int64_t col) { return col > row; }

}  // namespace attention
}  // namespace handgrad

#include <ATen/core/Tensor.h>

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

// Kernels receive 4-D (batch, heads, rows, features) tensors whose last
// dimension is dense (stride 1; the mask may have any strides, including the
// stride-0 dimensions of broadcasting). lse is (batch, heads_q, L), float32
// for reduced-precision inputs.
using ForwardKernel = void (*)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& mask, at::Tensor& out, at::Tensor& lse,
                               const Problem& p);
using BackwardKernel = void (*)(const at::Tensor& grad_out, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                const at::Tensor& lse, const at::Tensor& mask,
                                at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v,
                                const Problem& p);

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
    c10::optional<double> scale, bool enable_gqa, ForwardKernel kernel);

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& attn_mask,
    double dropout_p, bool is_causal, c10::optional<double> scale, bool enable_gqa,
    const at::Tensor& rng_state, BackwardKernel kernel);

}  // namespace attention
}  // namespace handgrad
