// A float32 matrix product for the LSTM's CPU kernels: C (+)= A B.
//
// Why not at::mm: on this project's benchmark machine (AMD EPYC, Zen 5) the
// BLAS behind at::mm runs its AVX2 code path, while native nn.LSTM (oneDNN)
// uses AVX-512, i.e. twice the arithmetic per instruction. This product is
// compiled for AVX-512 with a target attribute and used only when the CPU
// reports AVX-512F at run time; elsewhere callers fall back to at::mm.
//
// A and B are strided (any transposed view works: element (i, k) of A is at
// A[i * rsa + k * csa]); C is row-major with leading dimension ldc. B can be
// packed once and reused over many products (the recurrent weight of every
// time step).
#pragma once

#include <cstdint>
#include <vector>

namespace handgrad {
namespace lstm {
namespace gemm {

bool available();  // AVX-512F present at run time (and compiled in)

// B (K x N) rearranged into the layout the micro-kernel reads.
struct PackedB {
  int64_t K = 0, N = 0;
  std::vector<float> data;
};

void pack_b(const float* B, int64_t rsb, int64_t csb, int64_t K, int64_t N, PackedB& out);

// C = A B (accumulate = false) or C += A B; A is M x K, B given packed.
void matmul(int64_t M, const float* A, int64_t rsa, int64_t csa, const PackedB& B, float* C,
            int64_t ldc, bool accumulate);

// The same on the calling thread only, for A with rows contiguous in k
// (K > 0 assumed); used inside a parallel region that splits the rows.
void matmul_serial(int64_t M, const float* A, int64_t rsa, const PackedB& B, float* C,
                   int64_t ldc, bool accumulate);

// The same with B strided (packed internally, block by block).
void matmul(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsa, int64_t csa,
            const float* B, int64_t rsb, int64_t csb, float* C, int64_t ldc, bool accumulate);

}  // namespace gemm
}  // namespace lstm
}  // namespace handgrad
