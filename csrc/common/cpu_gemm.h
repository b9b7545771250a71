// A float32 matrix product for the CPU kernels (lstm, conv2d's gemm and
// winograd paths, attention's tiles): C (+)= A B.
//
// Why not at::mm: on this project's benchmark machine (AMD EPYC, Zen 5) the
// BLAS behind at::mm (MKL) runs its AVX2 code path on AMD, ~85 GFLOP/s per
// core, while the native ops it is compared with (nn.LSTM, conv2d) run
// oneDNN's AVX-512 kernels, i.e. twice the arithmetic per instruction. This
// product is compiled for AVX-512 with a target attribute and used only when
// the CPU reports AVX-512F/VL at run time; elsewhere (and for float64)
// callers fall back to at::mm. HANDGRAD_CPU_AVX512=0 in the environment
// turns it off (and the LSTM's AVX-512 pointwise kernels), so the fallback
// paths can be tested on an AVX-512 machine.
//
// Whether a given product runs this kernel or BLAS is decided per problem
// class by common/cpu_gemm_policy.h (measured once per process, or forced
// with HANDGRAD_CPU_GEMM=own|blas): on CPUs where MKL runs AVX-512 code
// (Intel Xeon) BLAS wins many shapes.
//
// A and B are strided (any transposed view works: element (i, k) of A is at
// A[i * rsa + k * csa]); C is row-major with leading dimension ldc. B can be
// packed once and reused over many products (the recurrent weight of every
// time step).
#pragma once

#include "common/scratch_memory.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace handgrad {
namespace cpu_gemm {

// AVX-512F and VL present at run time, compiled in, and not turned off by
// HANDGRAD_CPU_AVX512=0 (read once).
bool available();

// B (K x N) rearranged into the layout the micro-kernel reads.
struct PackedB {
  int64_t K = 0, N = 0;
  memory::ScratchVector<float> data;  // counted as handgrad scratch
};

void pack_b(const float* B, int64_t rsb, int64_t csb, int64_t K, int64_t N, PackedB& out);

// pack_b for B given as its transpose: B(k, n) = Bt[n * ldbt + k] (Bt is N
// rows of K contiguous floats), on the calling thread; 16 x 16 blocks are
// transposed in registers (AVX-512), much faster than pack_b's strided walk
// for this layout (conv2d's weight gradient packs a column matrix^T per
// chunk). Same packed result as pack_b(Bt, 1, ldbt, K, N, out). Only when
// available().
void pack_b_transposed(const float* Bt, int64_t ldbt, int64_t K, int64_t N, PackedB& out);

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

// C = alpha A B or C += alpha A B for small operands on the calling thread
// only (the tiles of a flash-attention loop, inside a parallel region): A
// (M x K) and B (K x N) any strides, both packed into per-thread scratch that
// is reused from call to call; alpha is applied while packing A.
void matmul_tile(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t rsa,
                 int64_t csa, const float* B, int64_t rsb, int64_t csb, float* C, int64_t ldc,
                 bool accumulate);

// The same with B row-major (leading dimension ldb >= N), read in place
// without packing: cheaper than packing when B is used once (a per-step
// gradient product) and ldb is not a multiple of 128 floats (rows 512 bytes
// apart or a multiple of that map onto a few cache sets; the caller decides).
// A^T of a row-major matrix (rsa = 1) is read in place too when csa is not a
// multiple of 128; other A are packed per k-block.
void matmul_direct_b(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsa, int64_t csa,
                     const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate);

// Tensor form: c (+)= a b for 2-D float32 tensors (any strides for a and b,
// c with unit column stride). Returns false without touching c when this
// product does not apply (not float32, not available(), other layouts): the
// caller then runs at::mm_out / at::addmm_out.
bool mm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate);

}  // namespace cpu_gemm
}  // namespace handgrad
