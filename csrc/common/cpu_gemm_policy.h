// Which kernel runs each float32 matrix product of the CPU kernels:
// handgrad's own AVX-512 micro-kernel (common/cpu_gemm.h) or the BLAS behind
// at::mm / at::addmm (MKL or OpenBLAS, whatever torch ships).
//
// Why measure: neither wins everywhere. On an AMD EPYC Zen 5 MKL runs its
// AVX2 code and the own kernel is ~2x faster; on an AMD EPYC Zen 4 (family
// 25 model 17: AVX-512 on 256-bit units, so no faster than AVX2) they tie --
// the LSTM cell's (128 x 2048 x 256 / 512) products at 1 thread: own 1420 /
// 3101 us, MKL 1360 / 2801 us; on an Intel Xeon with AVX-512 MKL runs its
// AVX-512 code and wins most shapes (issue 15: the own kernel missed 10 of
// 23 op targets there). The right choice depends on the CPU, the
// shape and the thread count, so it is measured the first time a problem
// class is seen (like cuDNN's benchmark mode), kept for the process and
// stored for later processes on the same machine (the decision file).
//
// Problem class: log2 buckets of m, n, k; whether A and B are read
// transposed; the call site's variant (see Site); whether it runs on the
// calling thread. The thread count is not part of it: a class is measured at
// the thread count of its first use and keeps that kernel, so results in a
// process do not depend on torch.set_num_threads (the decision file keys
// its lines by the thread count a class was measured at). dtype is float32
// (other dtypes have no own kernel and always use BLAS). The first problem of
// a class is timed on synthetic operands of its exact shape: one warm-up and
// up to 5 interleaved samples of each kernel (a sample repeats a small
// product to last ~20 us), the faster minimum wins.
//
// HANDGRAD_CPU_GEMM=own|blas|auto (default auto) forces a choice;
// set_policy() does the same at run time. HANDGRAD_CPU_GEMM_VERBOSE=1 prints
// each decision as it is made. Without the own kernel (no AVX-512F/VL, or
// HANDGRAD_CPU_AVX512=0) every product uses BLAS.
//
// Determinism: each kernel gives results independent of the thread count
// (the own kernel sums every element of C in one order; BLAS is called so
// that it does not split k). Which kernel a class gets is a timing, so it is
// stored in a decision file (common/cpu_gemm_decision_file.h, per machine and
// thread count) that every later process reads: runs repeat bit for bit, as
// with a forced policy. With the file off (HANDGRAD_CPU_GEMM_CACHE=off), two
// processes can choose differently and differ by rounding.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace handgrad {
namespace cpu_gemm {

enum class Kernel : uint8_t { own, blas };
enum class Policy : uint8_t { own, blas, automatic };

// How the call site runs each kernel (what is timed).
enum class Site : uint8_t {
  // own: matmul with B packed per call; blas: at::mm_out / addmm_.
  tensor,
  // own: matmul with B packed once beforehand (a weight reused over many
  // products: not timed); blas: at::mm_out / addmm_.
  packed_b,
  // Small products on the calling thread inside a parallel region (the
  // flash-attention tiles). own: matmul_tile; blas: sgemm_ on raw pointers.
  tile,
};

// "tensor", "packed_b", "tile".
const char* site_name(Site s);

// C (m x n) (+)= A (m x k) B (k x n), row-major reading. a_transposed: A is
// stored as its transpose (element (i, l) at a[l * ld + i]); likewise B.
// calling_thread: the product runs on one thread (inside a parallel region,
// or a region that splits the problem some other way).
struct Problem {
  int64_t m = 0, n = 0, k = 0;
  bool a_transposed = false, b_transposed = false;
  Site site = Site::tensor;
  bool calling_thread = false;
};

Policy policy();
void set_policy(Policy p);
const char* policy_name(Policy p);

// The kernel for a float32 product of this class: forced by the policy, else
// measured on first sight. Always blas when the own kernel is unavailable.
// Thread-safe; a seen class costs a thread-local hash lookup.
Kernel choose(const Problem& p);

// The problem of c (+)= a b for 2-D tensors.
Problem problem_of(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, Site site,
                   bool calling_thread);

// c (+)= a b for 2-D tensors of any floating dtype (c with unit column
// stride): the chosen kernel for float32, at::mm_out / addmm_ otherwise.
void gemm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// One measured decision.
struct Decision {
  Problem problem;         // the first problem seen of the class (timed)
  int threads = 1;         // threads it ran on
  double own_seconds = 0;  // fastest repetition of each kernel
  double blas_seconds = 0;
  Kernel kernel = Kernel::own;
  bool stored = false;     // read from the decision file, not measured here
};

std::vector<Decision> decisions();
// Seconds spent measuring so far (all threads).
double tuning_seconds();
// Forgets this process's decisions: a class seen again is looked up in the
// decision file, else measured.
void clear_decisions();
// The BLAS library torch calls ("mkl", "openblas", ...) as far as it is known.
std::string blas_name();

}  // namespace cpu_gemm
}  // namespace handgrad
