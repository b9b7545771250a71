// Portability macros shared by the CPU (C++) and CUDA translation units.
//
// Scalar math that both backends need is written once, as HG_HOST_DEVICE
// inline functions in csrc/ops/<op>.h; nvcc compiles them for the device,
// the host compiler for the CPU kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HG_HOST_DEVICE __host__ __device__ __forceinline__
#define HG_DEVICE_COMPILE 1
#else
#define HG_HOST_DEVICE inline
#define HG_DEVICE_COMPILE 0
#endif

// Full unrolling of a loop over register arrays (fragments): nvcc keeps the
// arrays in registers only when every index is a constant. Empty in host
// compilations (the CUDA emulation), where GCC would warn about the pragma.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define HG_UNROLL _Pragma("unroll")
#else
#define HG_UNROLL
#endif
