// The LSTM's float32 pointwise row kernels (lstm_rows.inc), instantiated for
// the build's baseline ISA (namespace baseline: AVX2, or scalar when the build
// targets generic x86-64) and for AVX-512 (namespace avx512, used only when
// avx512_available()). Rows [b0, b1) of a batch; see cpu/lstm.cpp for the
// math and ops/lstm.h for the tensor layout.
#pragma once

#include <cstdint>

namespace handgrad {
namespace lstm {

bool avx512_available();

#define HG_LSTM_ROWS_DECLARE(ns)                                                               \
  namespace ns {                                                                               \
  void forward_rows(float* gates, const float* bih, const float* bhh, const float* c_prev,      \
                    float* c_new, float* h_new, int64_t b0, int64_t b1, int64_t H,             \
                    float* h_copy, int64_t ldh);                                                \
  void backward_rows(const float* dh_a, const float* dh_b, const float* dc, const float* gates, \
                     const float* c_prev, const float* c_new, float* dgates, float* dc_prev,   \
                     int64_t b0, int64_t b1, int64_t H, int64_t ldg);                          \
  }

HG_LSTM_ROWS_DECLARE(baseline)
HG_LSTM_ROWS_DECLARE(avx512)

#undef HG_LSTM_ROWS_DECLARE

}  // namespace lstm
}  // namespace handgrad
