// The CUDA emulation build compiles each csrc/ops/cuda/<op>.cu, and the
// op's driver csrc/ops/<op>.cpp, as host C++ with this header in front
// (the build generates one two-line unit per file). It
//  * brings in the emulated CUDA runtime (cuda_emulation.h) and the stub
//    CUDA headers of csrc/emulation/include;
//  * turns the .cu file's TORCH_LIBRARY_IMPL(handgrad, CUDA, m) block into a
//    registration function kept in the emulation registry (registry.cpp),
//    which installs the kernels as the CPU kernels of the handgrad ops while
//    emulation is switched on;
//  * leaves out the drivers' TORCH_LIBRARY_FRAGMENT schema blocks (the
//    schemas belong to handgrad._C, which defines them once);
//  * makes CUDA_KERNEL_ASSERT a device-side assert of the emulator.
#pragma once

#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "emulation/cuda_emulation.h"
#include "emulation/registry.h"

#define HG_EMU_CONCAT_(a, b) a##b
#define HG_EMU_CONCAT(a, b) HG_EMU_CONCAT_(a, b)

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m)                                                         \
  static void HG_EMU_CONCAT(hg_emu_register_, __LINE__)(torch::Library&);                   \
  static const ::handgrad::cuda_emulation::Registrar HG_EMU_CONCAT(hg_emu_registrar_,       \
                                                                   __LINE__)(               \
      #ns, #k, &HG_EMU_CONCAT(hg_emu_register_, __LINE__), __FILE__);                        \
  static void HG_EMU_CONCAT(hg_emu_register_, __LINE__)(torch::Library & m)

#undef TORCH_LIBRARY_FRAGMENT
#define TORCH_LIBRARY_FRAGMENT(ns, m) \
  [[maybe_unused]] static void HG_EMU_CONCAT(hg_emu_unused_schemas_, __LINE__)(torch::Library & m)

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                                         \
  do {                                                                                   \
    if (!(cond)) ::handgrad::cuda_emulation::device_assert_failed(#cond, __FILE__, __LINE__); \
  } while (0)
