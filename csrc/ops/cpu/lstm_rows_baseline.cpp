// The LSTM's pointwise row kernels for the build's baseline ISA: 8-lane AVX2
// (the default build), or scalar loops (HANDGRAD_CPU_ARCH=generic).
#include "common/cpu_simd.h"  // HG_HAVE_AVX2

#define LSTM_ROWS_NS baseline
#if HG_HAVE_AVX2
#define LSTM_ROWS_WIDTH 8
#else
#define LSTM_ROWS_WIDTH 0
#endif
#define LSTM_ROWS_TARGET
#include "ops/cpu/lstm_rows.inc"
