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
