// CUDA emulation build: C10_CUDA_CHECK as in c10, over the emulated runtime.
// A failed launch raises a c10::Error naming the kernel and what went wrong
// (with the emulator's details: the device-side assert, the barrier or lane
// at fault).
#pragma once

#include <c10/util/Exception.h>

#include <cuda_runtime_api.h>

namespace handgrad {
namespace cuda_emulation {
// What the last failed launch reported (empty when none).
const char* last_error_details();
}  // namespace cuda_emulation
}  // namespace handgrad

#define C10_CUDA_CHECK(EXPR)                                                            \
  do {                                                                                  \
    const cudaError_t hg_emu_error = (EXPR);                                            \
    TORCH_CHECK(hg_emu_error == cudaSuccess, "CUDA error (emulated): ",                 \
                cudaGetErrorString(hg_emu_error), ": ",                                 \
                ::handgrad::cuda_emulation::last_error_details());                      \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
