// What every C++ test shares: a named check that counts failures, a banner
// naming the build under test, and the exit status ctest reads.
#pragma once

#include "build_info.h"

#include <iostream>

namespace handgrad_test {

inline int failures = 0;

inline void expect(bool ok, const char* what) {
  std::cout << (ok ? "ok    " : "FAILED") << "  " << what << "\n";
  if (!ok) ++failures;
}

inline void print_build() {
  const handgrad::BuildInfo info = handgrad::build_info();
  std::cout << "handgrad " << info.version << " (CUDA kernels: " << info.cuda_compiled << ")\n";
}

// main's return value: 0 when every check passed.
inline int finish() {
  std::cout << (failures ? "FAILED\n" : "all passed\n");
  return failures ? 1 : 0;
}

}  // namespace handgrad_test
