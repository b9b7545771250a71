// Test kernels for the CUDA emulator itself (see self_test.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace handgrad {
namespace cuda_emulation {

// Runs the named test kernel with integer arguments (and input values);
// returns what it wrote, or raises the error the emulator reported.
std::vector<double> run_self_test(const std::string& name, const std::vector<int64_t>& args,
                                  const std::vector<double>& values = {});

}  // namespace cuda_emulation
}  // namespace handgrad
