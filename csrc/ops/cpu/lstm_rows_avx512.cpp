// The LSTM's pointwise row kernels for AVX-512 (16 lanes), compiled per
// function with a target attribute (the rest of the build stays at its
// baseline ISA) and called only when avx512_available().
#include "ops/cpu/lstm_rows.h"

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_ps(), which trips a
// false -Wmaybe-uninitialized in every function that inlines them.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define LSTM_ROWS_NS avx512
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LSTM_ROWS_WIDTH 16
#define LSTM_ROWS_TARGET __attribute__((target("avx512f,avx512vl,avx512dq,fma")))
#else
#define LSTM_ROWS_WIDTH 0
#define LSTM_ROWS_TARGET
#endif
#include "ops/cpu/lstm_rows.inc"

#include "common/cpu_gemm.h"

namespace handgrad {
namespace lstm {

bool avx512_available() {
#if LSTM_ROWS_WIDTH == 16
  // cpu_gemm::available() checks AVX-512F/VL and HANDGRAD_CPU_AVX512=0 (which
  // forces the baseline kernels, to test them here).
  static const bool ok = cpu_gemm::available() && __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

}  // namespace lstm
}  // namespace handgrad
