#include "build_info.h"
#include "version.h"

namespace handgrad {
namespace {

std::string cpu_isa() {
  std::string isa;
  auto add = [&isa](const char* name) { isa += (isa.empty() ? "" : " ") + std::string(name); };
#if defined(__AVX512F__)
  add("AVX512F");
#endif
#if defined(__AVX2__)
  add("AVX2");
#endif
#if defined(__FMA__)
  add("FMA");
#endif
#if defined(__F16C__)
  add("F16C");
#endif
#if defined(__AVX__) && !defined(__AVX2__)
  add("AVX");
#endif
#if defined(__SSE4_2__)
  add("SSE4.2");
#endif
#if defined(__ARM_NEON)
  add("NEON");
#endif
  return isa.empty() ? "baseline" : isa;
}

std::string compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#else
  return "unknown";
#endif
}

}  // namespace

BuildInfo build_info() {
  BuildInfo info;
  info.version = HANDGRAD_VERSION;
#ifdef HANDGRAD_WITH_CUDA
  info.cuda_compiled = true;
  info.cuda_archs = compiled_cuda_archs();
  info.cuda_toolkit_version = cuda_toolkit_version();
#else
  info.cuda_compiled = false;
  info.cuda_toolkit_version = 0;
#endif
  info.cpu_isa = cpu_isa();
#ifdef _OPENMP
  info.openmp = true;
#else
  info.openmp = false;
#endif
  info.compiler = compiler();
  return info;
}

}  // namespace handgrad
