// Tensor-core primitives, written once for every kernel that uses them:
// mma.sync m16n8k16 (float16 / bfloat16 in, float32 accumulate) and m16n8k8
// (tf32), ldmatrix, cp.async with commit / wait groups, and the tf32 rounding.
//
// On the GPU each is one PTX instruction (sm_80 and newer; the host side
// only launches kernels built on them on such devices). In the CUDA
// emulation build each is emulated exactly as the PTX ISA documents it: a
// warp's lanes exchange their fragments (csrc/emulation), the full
// matrices are rebuilt from the documented fragment layouts and every lane
// computes its own part of the result; cp.async copies complete only when a
// wait_group lets them, so a read before the wait sees the poison. The
// element-by-element tests in tests/test_tensor_core.py hold both to a
// plain matrix product.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 / m16n8k8"),
// with g = lane / 4 and q = lane % 4:
//   m16n8k16 A (16x16, row-major), 8 halves a0..a7 in 4 registers:
//     row = g + 8 * (i in {2,3,6,7}),   col = 2q + (i & 1) + 8 * (i >= 4)
//   m16n8k16 B (16x8, column-major), 4 halves b0..b3 in 2 registers:
//     k = 2q + (i & 1) + 8 * (i >= 2),  n = g
//   m16n8k8 tf32 A (16x8), a0..a3:  row = g + 8 * (i odd),  col = q + 4 * (i >= 2)
//   m16n8k8 tf32 B (8x8),  b0..b1:  k = q + 4 * i,           n = g
//   C and D (16x8 float32), c0..c3:  row = g + 8 * (i >= 2),  col = 2q + (i & 1)
// Two 16-bit elements share a register, the lower-indexed one in the low half.
#pragma once

#include "common/cuda_launch.cuh"

#include <cstdint>

#ifdef HANDGRAD_CUDA_EMULATION
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#endif

namespace handgrad {
namespace cuda {
namespace tc {

struct FragA {
  uint32_t x[4];
};
struct FragB {
  uint32_t x[2];
};
struct FragC {
  float x[4];
};

enum class Input { kHalf, kBFloat16 };

#ifndef HANDGRAD_CUDA_EMULATION
// ------------------------------------------------------------------ GPU

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define HG_TC_UNSUPPORTED() __trap()
#else
#define HG_TC_UNSUPPORTED()
#endif

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <Input In>
__device__ __forceinline__ void mma_16816(FragC& d, const FragA& a, const FragB& b,
                                          const FragC& c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (In == Input::kHalf) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d.x[0]), "=f"(d.x[1]), "=f"(d.x[2]), "=f"(d.x[3])
        : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]),
          "f"(c.x[0]), "f"(c.x[1]), "f"(c.x[2]), "f"(c.x[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d.x[0]), "=f"(d.x[1]), "=f"(d.x[2]), "=f"(d.x[3])
        : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]),
          "f"(c.x[0]), "f"(c.x[1]), "f"(c.x[2]), "f"(c.x[3]));
  }
#else
  HG_TC_UNSUPPORTED();
#endif
}

__device__ __forceinline__ void mma_1688_tf32(FragC& d, const FragA& a, const FragB& b,
                                              const FragC& c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d.x[0]), "=f"(d.x[1]), "=f"(d.x[2]), "=f"(d.x[3])
      : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]),
        "f"(c.x[0]), "f"(c.x[1]), "f"(c.x[2]), "f"(c.x[3]));
#else
  HG_TC_UNSUPPORTED();
#endif
}

// float32 -> tf32 (round to nearest, ties away from zero), in a float's bits.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
#else
  HG_TC_UNSUPPORTED();
#endif
  return r;
}

// N (1, 2 or 4) 8x8 matrices of 16-bit elements; lanes 8m .. 8m+7 give the
// shared-memory addresses of matrix m's rows (16-byte aligned).
template <int N, bool Transpose = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t a = shared_address(row);
  if constexpr (N == 1 && !Transpose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  } else if constexpr (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(a));
  } else if constexpr (N == 2 && !Transpose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  } else if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  } else if constexpr (!Transpose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  }
#else
  HG_TC_UNSUPPORTED();
#endif
}

// 16 bytes global -> shared, asynchronously; bytes past src_bytes are zero.
__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src,
                                            int src_bytes = 16) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared_dst)),
               "l"(global_src), "r"(src_bytes));
#else
  HG_TC_UNSUPPORTED();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `Pending` of this thread's committed groups are in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
#endif
}

#else
// ------------------------------------------------------------ emulation

namespace detail {

inline float element(uint32_t reg, int half, Input in) {
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  if (in == Input::kHalf) return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
}

inline float tf32_operand(uint32_t bits) {
  // The tensor cores read the sign, exponent and top 10 mantissa bits.
  const uint32_t kept = bits & 0xffffe000u;
  float v;
  std::memcpy(&v, &kept, sizeof(v));
  return v;
}

struct Fragments {
  FragA a;
  FragB b;
  FragC c;
};

}  // namespace detail

template <Input In>
inline void mma_16816(FragC& d, const FragA& a, const FragB& b, const FragC& c,
                      const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::Fragments mine{a, b, c}, all[32];
  cuda_emulation::warp_all_gather(&mine, sizeof(mine), all, file, line);
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, q = l % 4;
    for (int i = 0; i < 8; ++i) {
      const int row = g + 8 * ((i / 2) % 2), col = 2 * q + (i & 1) + 8 * (i >= 4);
      A[row][col] = detail::element(all[l].a.x[i / 2], i & 1, In);
    }
    for (int i = 0; i < 4; ++i) {
      B[2 * q + (i & 1) + 8 * (i >= 2)][g] = detail::element(all[l].b.x[i / 2], i & 1, In);
      C[g + 8 * (i >= 2)][2 * q + (i & 1)] = all[l].c.x[i];
    }
  }
  const int lane = cuda_emulation::lane_id(), g = lane / 4, q = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >= 2), col = 2 * q + (i & 1);
    float acc = C[row][col];
    for (int k = 0; k < 16; ++k) acc = fmaf(A[row][k], B[k][col], acc);
    d.x[i] = acc;
  }
}

inline void mma_1688_tf32(FragC& d, const FragA& a, const FragB& b, const FragC& c,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::Fragments mine{a, b, c}, all[32];
  cuda_emulation::warp_all_gather(&mine, sizeof(mine), all, file, line);
  float A[16][8], B[8][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, q = l % 4;
    for (int i = 0; i < 4; ++i) {
      A[g + 8 * (i & 1)][q + 4 * (i >= 2)] = detail::tf32_operand(all[l].a.x[i]);
      C[g + 8 * (i >= 2)][2 * q + (i & 1)] = all[l].c.x[i];
    }
    for (int i = 0; i < 2; ++i) B[q + 4 * i][g] = detail::tf32_operand(all[l].b.x[i]);
  }
  const int lane = cuda_emulation::lane_id(), g = lane / 4, q = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >= 2), col = 2 * q + (i & 1);
    float acc = C[row][col];
    for (int k = 0; k < 8; ++k) acc = fmaf(A[row][k], B[k][col], acc);
    d.x[i] = acc;
  }
}

inline uint32_t to_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7f800000u) == 0x7f800000u) return bits;  // inf and NaN stay as they are
  bits += 0x1000u;  // half of the dropped 13 bits: round to nearest, ties away from zero
  return bits & 0xffffe000u;
}

template <int N, bool Transpose = false>
inline void ldmatrix(uint32_t (&r)[N], const void* row, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
    cuda_emulation::device_error("ldmatrix row address not 16-byte aligned", file, line);
  }
  const void* rows[32];
  cuda_emulation::warp_all_gather(&row, sizeof(row), rows, file, line);
  const int lane = cuda_emulation::lane_id();
  auto at = [&](int m, int rr, int cc) {  // element (rr, cc) of matrix m
    uint16_t v;
    std::memcpy(&v, static_cast<const unsigned char*>(rows[8 * m + rr]) + 2 * cc, 2);
    return static_cast<uint32_t>(v);
  };
  for (int m = 0; m < N; ++m) {
    const int i = lane / 4, j = 2 * (lane % 4);
    r[m] = Transpose ? (at(m, j, i) | at(m, j + 1, i) << 16) : (at(m, i, j) | at(m, i, j + 1) << 16);
  }
}

inline void cp_async_16(void* shared_dst, const void* global_src, int src_bytes = 16,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  cuda_emulation::cp_async(shared_dst, global_src, 16, static_cast<size_t>(src_bytes), file, line);
}

inline void cp_async_commit() { cuda_emulation::cp_async_commit(); }

template <int Pending>
inline void cp_async_wait() {
  cuda_emulation::cp_async_wait(Pending);
}

#endif

}  // namespace tc
}  // namespace cuda
}  // namespace handgrad
