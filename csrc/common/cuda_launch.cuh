// Kernel launches of every .cu file go through cuda::launch<kernel>(...):
//  * grid and block sizes arrive as int64 and are checked against the
//    device limits before they are narrowed to dim3, so an oversized problem
//    raises an error naming the kernel instead of launching a wrapped grid;
//  * dynamic shared memory above the default 48 KiB is opted into here,
//    after checking the device's opt-in limit (callers never forget it);
//  * the same call runs the kernel with <<<...>>> on a GPU or, in the CUDA
//    emulation build (csrc/emulation), on the host emulator (a <<<...>>>
//    launch cannot be produced by a macro, so it lives in this one place).
// HG_DYNAMIC_SHARED declares a kernel's dynamic shared memory for both.
#pragma once

#ifdef HANDGRAD_CUDA_EMULATION
#include "emulation/cuda_emulation.h"
#else
#include <cuda_runtime.h>
#endif
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#ifdef HANDGRAD_CUDA_EMULATION
#define HG_DYNAMIC_SHARED(type, name) \
  type* const name = static_cast<type*>(::handgrad::cuda_emulation::dynamic_shared_memory())
#else
#define HG_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace handgrad {
namespace cuda {

// Grid or block extents before they are narrowed to dim3.
struct Dims {
  int64_t x, y, z;
  Dims(int64_t vx, int64_t vy = 1, int64_t vz = 1) : x(vx), y(vy), z(vz) {}
};

// Limits of every architecture handgrad is built for (sm_75 .. sm_90).
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxThreadsPerBlock = 1024;
constexpr int64_t kMaxBlockZ = 64;
constexpr size_t kDefaultSharedBytes = 48 * 1024;

// The kernel's name as the compiler spells the template argument.
template <auto Kernel>
std::string kernel_name() {
  const std::string f = __PRETTY_FUNCTION__;
  const size_t at = f.find("Kernel = ");
  if (at == std::string::npos) return f;
  const size_t begin = at + 9;
  return f.substr(begin, f.find_first_of(";]", begin) - begin);
}

inline void check_dims(const std::string& kernel, Dims grid, Dims block) {
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= kMaxGridX &&
                  grid.y <= kMaxGridYZ && grid.z <= kMaxGridYZ,
              "handgrad: the problem is too large for one CUDA launch of ", kernel, ": grid (",
              grid.x, ", ", grid.y, ", ", grid.z, ") exceeds the limits (", kMaxGridX, ", ",
              kMaxGridYZ, ", ", kMaxGridYZ, ")");
  TORCH_CHECK(block.x >= 1 && block.y >= 1 && block.z >= 1 && block.z <= kMaxBlockZ &&
                  block.x * block.y * block.z <= kMaxThreadsPerBlock,
              "handgrad: invalid block (", block.x, ", ", block.y, ", ", block.z, ") for ",
              kernel, " (at most ", kMaxThreadsPerBlock, " threads)");
}

// Dynamic shared memory above 48 KiB needs the kernel's opt-in, up to the
// device's limit (227 KiB on sm_90).
inline void opt_in_shared_memory(const void* kernel, size_t bytes, const std::string& name) {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "handgrad: ", name, " needs ", bytes,
              " bytes of shared memory per block; this device allows ", limit);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

template <typename F>
struct KernelParams;
template <typename... P>
struct KernelParams<void (*)(P...)> {
  using Tuple = std::tuple<std::decay_t<P>...>;
};

template <auto Kernel, typename... Args>
void launch(Dims grid, Dims block, size_t shared_bytes, cudaStream_t stream, Args&&... args) {
  check_dims(kernel_name<Kernel>(), grid, block);
  if (shared_bytes > kDefaultSharedBytes) {
    opt_in_shared_memory(reinterpret_cast<const void*>(Kernel), shared_bytes,
                         kernel_name<Kernel>());
  }
  const dim3 g(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y),
               static_cast<unsigned>(grid.z));
  const dim3 b(static_cast<unsigned>(block.x), static_cast<unsigned>(block.y),
               static_cast<unsigned>(block.z));
#ifdef HANDGRAD_CUDA_EMULATION
  (void)stream;
  // Arguments are converted to the kernel's parameter types once, as a
  // launch does; every emulated thread gets its own copy of them.
  const typename KernelParams<decltype(Kernel)>::Tuple params(std::forward<Args>(args)...);
  const std::string name = kernel_name<Kernel>();
  cuda_emulation::launch({name.c_str(), g, b, shared_bytes, reinterpret_cast<const void*>(Kernel),
                          [&params] { std::apply(Kernel, params); }});
#else
  Kernel<<<g, b, shared_bytes, stream>>>(std::forward<Args>(args)...);
#endif
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace handgrad
