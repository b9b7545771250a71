// CUDA emulation build: one stream, on which every launch runs synchronously.
#pragma once

#include <cuda_runtime_api.h>

namespace c10 {
namespace cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(signed char = -1) { return {}; }

}  // namespace cuda
}  // namespace c10
