// What this build of handgrad contains: reported by handgrad.info() and
// available to LibTorch users of the C++ library.
#pragma once

#include <string>
#include <vector>

namespace handgrad {

struct BuildInfo {
  std::string version;
  bool cuda_compiled;             // the CUDA kernels are in this binary
  std::vector<int> cuda_archs;    // compute capabilities compiled for, e.g. 90 for sm_90
  int cuda_toolkit_version;       // CUDART_VERSION at compile time (0 without CUDA)
  std::string cpu_isa;            // instruction-set extensions the CPU kernels were built for
  bool openmp;                    // at::parallel_for runs on OpenMP threads
  std::string compiler;
};

BuildInfo build_info();

#ifdef HANDGRAD_WITH_CUDA
// Defined in build_info_cuda.cu, where nvcc knows the architecture list.
std::vector<int> compiled_cuda_archs();
int cuda_toolkit_version();
#endif

}  // namespace handgrad
