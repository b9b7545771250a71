// Switching the emulated CUDA kernels in and out (see registry.cpp), and
// what the emulator has run.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace torch {
class Library;
}

namespace handgrad {
namespace cuda_emulation {

using RegisterKernels = void (*)(torch::Library&);

// Adds an emulated .cu file's registration function to the registry (at
// load time; see kernel_unit.h).
struct Registrar {
  Registrar(const char* ns, const char* key, RegisterKernels fn, const char* file);
};

void set_enabled(bool on);
bool enabled();
std::vector<std::string> emulated_files();

// kernel name -> {launches, blocks, threads} since the last reset
std::map<std::string, std::array<int64_t, 3>> launch_statistics();
void reset_launch_statistics();

}  // namespace cuda_emulation
}  // namespace handgrad
