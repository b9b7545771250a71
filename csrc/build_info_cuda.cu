// The CUDA half of build_info: nvcc defines __CUDA_ARCH_LIST__ (the
// architectures this translation unit is compiled for) in every pass, so the
// list reported is the list actually compiled, not what was asked for.
#include "build_info.h"

#include <cuda_runtime_api.h>

namespace handgrad {

std::vector<int> compiled_cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
  return {__CUDA_ARCH_LIST__};
#else
  return {};
#endif
}

int cuda_toolkit_version() { return CUDART_VERSION; }

}  // namespace handgrad
