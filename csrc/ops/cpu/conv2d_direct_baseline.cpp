// The direct conv2d kernels for the build's baseline ISA: AVX2 (8 floats /
// 4 doubles a vector, 16 registers: blocks of 4 rows x 3 vectors), or scalar
// loops when the build targets generic x86-64.
#include "ops/cpu/conv2d_cpu.h"  // Simd<T>

#define CONV_DIRECT_NS baseline
#define CONV_DIRECT_SIMD Simd
#define CONV_DIRECT_TARGET
#define CONV_DIRECT_ROWS 4
#define CONV_DIRECT_TAPS 3
#define CONV_DIRECT_CH_ROWS 4
#define CONV_DIRECT_CH_VECS 2
#include "ops/cpu/conv2d_direct_kernels.inc"
