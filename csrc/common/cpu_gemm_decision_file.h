// The decision file of the CPU GEMM policy (common/cpu_gemm_policy.h): the
// measured kernel of each problem class, kept on disk so that every later
// process on the same machine makes the same choices.
//
// Why: under the measuring policy a class's kernel is a timing, so two runs
// of the same script could choose differently and round differently (the
// own kernel and BLAS agree only to rounding). Native PyTorch on a CPU
// repeats a seeded run bit for bit; with the decisions stored, handgrad does
// too -- and the tuning cost is paid once per machine, not once per process.
//
// Where: HANDGRAD_CPU_GEMM_CACHE names the file; unset, it is
// $XDG_CACHE_HOME/handgrad/cpu_gemm_decisions.txt (~/.cache without
// XDG_CACHE_HOME); empty, "0" or "off" keeps decisions in memory only.
//
// Format, one decision per line, appended under an exclusive flock so that
// concurrent processes (DDP ranks, parallel test runs) agree -- the first to
// measure a class writes it, the others read it:
//   v1 <machine> <class> <threads> <own|blas> <own us> <blas us> m n k ...
// <machine> is a hash of what makes a timing transferable: the CPU's model
// (/proc/cpuinfo), whether the own kernel can run, the BLAS library, the torch
// version and this format's class key. Lines of another machine or format
// are ignored, so one file can be shared (a home directory on several hosts).
// A malformed line is skipped. Deleting the file re-measures everything.
#pragma once

#include "common/cpu_gemm_policy.h"

#include <cstdint>
#include <functional>
#include <string>

namespace handgrad {
namespace cpu_gemm {
namespace decision_file {

// The file in use ("" = none).
std::string path();
// Uses this file from now on ("" = none).
void set_path(const std::string& path);

// The decision stored for (this machine, class, threads) if there is one
// (its `stored` set); else measure()'s, appended to the file. Without a file,
// or when it cannot be opened, measure()'s (a warning once).
Decision find_or_measure(uint64_t class_key, int threads,
                         const std::function<Decision()>& measure);

}  // namespace decision_file
}  // namespace cpu_gemm
}  // namespace handgrad
