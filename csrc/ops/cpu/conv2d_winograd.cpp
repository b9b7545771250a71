// conv2d CPU, Winograd F(2x2, 3x3) (3x3 kernels, stride 1, no dilation, one
// group, large channel counts).
//
// Algorithm: the output is cut into 2x2 tiles; tile t reads a 4x4 patch d_t
// of the zero-padded input. With the transforms
//   V = B^T d B (input), U = G g G^T (weight), y = A^T M A (output),
// the tile is y_t = A^T [U (.) V_t] A, so per point xi of the 4x4 transform
// domain the convolution becomes one matrix product over channels:
//   M[xi][co][t] = sum_ci U[xi][co][ci] V[xi][ci][t]
// -- 16 products doing 2.25x fewer multiply-adds than im2col's one: for
// float32 on a CPU with AVX-512 the project's AVX-512 product
// (common/cpu_gemm.h: the BLAS behind at::mm runs AVX2 code on AMD, native
// conv2d oneDNN's AVX-512), one call per point; else at::bmm / baddbmm_
// (BLAS, the only BLAS calls here). The transforms use only 0, +-1, +-1/2,
// so float32 rounding stays close to the direct sum's -- normwise: an entry's
// error scales with the largest magnitudes in its tiles, not with its own
// terms (as for every fast convolution algorithm). Magnitudes that could
// overflow the transforms (or an inf / NaN, which the transforms would
// smear over a tile) are detected while transforming (transforms_safe) and
// the pass is then recomputed by the exact im2col path.
// Gradients: the map is linear, so backward runs its adjoint exactly:
//   dM = A dY_t A^T; dV = U^T dM  -> dx patches B dV B^T, added onto the
//   overlapping input positions; dU = sum_t dM V^T -> dW = G^T dU G.
// Batch chunks run in parallel (each product single-threaded: nested
// at::parallel_for runs inline); the weight
// gradient sums chunks in 2 fixed slots, then in order (deterministic). Nothing
// is saved for backward but the input and weight.
// float32 with AVX-512 (cpu_gemm::available()): the transforms run 16 tiles
// per vector, fetching tile values with masked gathers straight from the
// activations (no padded copies) and writing output tiles with masked
// scatters (offsets computed once per chunk); the weight transforms run 16
// entries per vector and build U^T for grad_input directly; grad_weight packs
// V^T with cpu_gemm::pack_b_transposed.
// Speed, AMD EPYC Zen 5, 1 thread, native/handgrad (a shared 2-core machine:
// ranges are separate runs of the same code):
//   python benchmarks/bench_conv2d.py --threads 1 --reps 10 --max-seconds 5
//     --modes fwdbwd --no-save --cases "(128, 256, 4, 4)"   (and "(128, 64, 16, 16)->128 k3 p1")
//   (128,256,4,4)->512 k3 p1 forward+backward 1.13x, 0.98x, 1.24x (was 0.92-0.96x)
//   (128,64,16,16)->128 k3 p1 forward+backward 1.10x, 1.42x, 1.23x (was
//     0.90-1.03x on the gemm path)
//   PYTHONPATH=python python benchmarks/conv2d_parts.py 1 0,1
//   256->512: forward 1.22-1.33x, grad_input 1.09-1.13x, grad_weight 1.60-1.69x
//     (was 0.96-1.02x, 0.74-0.81x, 1.34-1.55x)
//   64->128:  forward 1.18-1.31x, grad_input 1.15-1.17x, grad_weight 1.23-1.26x
//     (gemm path before: 0.93-1.07x, 0.89-0.91x, 0.75-0.77x)
// With at::bmm (MKL's AVX2 code) and one tile at a time through the
// transforms, 256->512 ran 0.49x. Peak memory 2.3x native's at 1 thread at
// 256->512 (a chunk's V and M, up to ~12 MB a thread); at 64->128 0.6x.
#include "ops/cpu/conv2d_cpu.h"

#include "common/cpu_gemm.h"
#include "common/cpu_gemm_policy.h"
#include "common/scratch_memory.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace handgrad {
namespace conv2d {
namespace cpu {
namespace winograd {
namespace {

constexpr int kPoints = 16;                       // 4x4 transform domain
// V and M of one chunk (~12 MB of float32): up to kMaxTiles tiles per product
// (its N; its K in the weight gradient, whose 16 accumulated dU blocks are
// read and written once per chunk). At (128,256,4,4)->512 going from 64 to
// 256 tiles cut the weight gradient by ~15%.
constexpr int64_t kMaxChunkFloats = 3 << 20;
constexpr int64_t kMaxTiles = 256;
constexpr int64_t kWeightSlots = 2;  // each holds 16 transformed weight gradients
// Below this many channels the transforms (memory-bound, proportional to the
// channels on one side) cost more than the 2.25x saved in the products. With
// the AVX-512 transforms (cpu_gemm::available()) Winograd measured faster
// than im2col at (128,64,16,16)->128 (forward+backward ~1.2x native vs
// ~0.92x; (128,64,32,32)->64 runs ~1.5x native per part, im2col not compared
// there); with the scalar transforms im2col had won at 64 channels, so
// without AVX-512 the bound stays 128.
constexpr int64_t kMinChannels = 64;
constexpr int64_t kMinChannelsScalar = 128;

// The transforms add and subtract up to 4 values per axis, so they can
// overflow where the direct sum does not (|x| ~ 1e38 in float32), and turn
// an inf into NaN (inf - inf) or spread it over a whole tile. Every pass
// therefore finds the largest magnitude of what it transforms (per chunk,
// one unsigned max on the bits of |v| per value: NaN's bits exceed inf's,
// which exceed every finite value's) and runs Winograd only when no
// intermediate can overflow; otherwise the whole pass is recomputed by the
// exact im2col path (cpu/conv2d_gemm.cpp), which follows native conv2d's
// NaN/inf rules.
template <typename T>
using MagnitudeBits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

template <typename T>
MagnitudeBits<T> magnitude_bits(T v) {
  MagnitudeBits<T> bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits & (~MagnitudeBits<T>(0) >> 1);
}

template <typename T>
T magnitude_of(MagnitudeBits<T> bits) {
  T v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// max |v| (as bits) over a contiguous tensor (the weights: small).
template <typename T>
MagnitudeBits<T> largest_magnitude(const at::Tensor& t) {
  const T* p = t.const_data_ptr<T>();
  MagnitudeBits<T> m = 0;
  for (int64_t i = 0; i < t.numel(); ++i) m = std::max(m, magnitude_bits(p[i]));
  return m;
}

// max |v| (as bits) over images [first, first + images) of an activation:
// a separate pass over the chunk, which the transform then reads again from
// cache (folded into the AVX-512 transforms, it cost them registers they
// have none to spare of: 10-25% slower).
template <typename T>
MagnitudeBits<T> chunk_magnitude(const View4<T>& t, int64_t first, int64_t images,
                                 int64_t channels, int64_t rows, int64_t cols) {
  MagnitudeBits<T> m = 0;
  if (t.sc == 1 && t.sw == channels && t.sh == cols * channels && t.sn == rows * t.sh) {
    // channels_last: the chunk is one contiguous run
    const T* run = t.plane(first, 0);
    for (int64_t k = 0; k < images * t.sn; ++k) m = std::max(m, magnitude_bits(run[k]));
    return m;
  }
  for (int64_t i = first; i < first + images; ++i) {
    for (int64_t c = 0; c < channels; ++c) {
      const T* plane = t.plane(i, c);
      for (int64_t h = 0; h < rows; ++h) {
        const T* row = plane + h * t.sh;
        if (t.sw == 1) {  // the backend's NCHW rows: a loop the compiler vectorizes
          for (int64_t w = 0; w < cols; ++w) m = std::max(m, magnitude_bits(row[w]));
        } else {
          for (int64_t w = 0; w < cols; ++w) m = std::max(m, magnitude_bits(row[w * t.sw]));
        }
      }
    }
  }
  return m;
}

// Whether the transforms of operands of magnitudes at most a and b cannot
// overflow when every intermediate is at most growth * a * b (the bounds
// below, from the transforms' coefficient sums: B^T d B <= 4 |d|, G g G^T <=
// 2.25 |g|, A dY A^T <= 4 |dY|, A^T m A <= 9 |m|, B v B^T <= 9 |v|, G^T u G
// <= 4 |u|, each product summing `channels` (or tiles) terms).
template <typename T>
bool transforms_safe(MagnitudeBits<T> a, MagnitudeBits<T> b, long double growth) {
  const T ma = magnitude_of<T>(a), mb = magnitude_of<T>(b);
  if (!std::isfinite(ma) || !std::isfinite(mb)) return false;
  return static_cast<long double>(ma) * mb * growth <= std::numeric_limits<T>::max();
}
// forward: |M| <= 9 C |x| |w|, output <= 81 C |x| |w| (+ bias, added as native does)
long double forward_growth(const Geometry& g) { return 128.0L * g.in_channels; }
// grad_input: |dV| <= 9 K |dy| |w|, B dV B^T <= 81 K |dy| |w|, up to 4 tiles add per input
long double grad_input_growth(const Geometry& g) { return 512.0L * g.out_channels; }
// grad_weight: |dU| <= 16 T |dy| |x| over T tiles, G^T dU G <= 64 T |dy| |x|
long double grad_weight_growth(int64_t tiles) { return 128.0L * tiles; }

// The 1-D transforms and their adjoints (applied to rows, then columns).
template <typename T>
void input_1d(const T* d, int64_t s, T* v, int64_t vs) {  // B^T d
  const T d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s];
  v[0] = d0 - d2;
  v[vs] = d1 + d2;
  v[2 * vs] = d2 - d1;
  v[3 * vs] = d1 - d3;
}
template <typename T>
void input_adjoint_1d(const T* v, int64_t vs, T* d, int64_t s) {  // B v
  const T v0 = v[0], v1 = v[vs], v2 = v[2 * vs], v3 = v[3 * vs];
  d[0] = v0;
  d[s] = v1 - v2 + v3;
  d[2 * s] = v1 + v2 - v0;
  d[3 * s] = -v3;
}
template <typename T>
void weight_1d(const T* g, int64_t s, T* u, int64_t us) {  // G g
  const T g0 = g[0], g1 = g[s], g2 = g[2 * s];
  u[0] = g0;
  u[us] = T(0.5) * (g0 + g1 + g2);
  u[2 * us] = T(0.5) * (g0 - g1 + g2);
  u[3 * us] = g2;
}
template <typename T>
void weight_adjoint_1d(const T* u, int64_t us, T* g, int64_t s) {  // G^T u
  const T u0 = u[0], u1 = u[us], u2 = u[2 * us], u3 = u[3 * us];
  g[0] = u0 + T(0.5) * (u1 + u2);
  g[s] = T(0.5) * (u1 - u2);
  g[2 * s] = T(0.5) * (u1 + u2) + u3;
}
template <typename T>
void output_1d(const T* m, int64_t ms, T* y, int64_t s) {  // A^T m
  const T m0 = m[0], m1 = m[ms], m2 = m[2 * ms], m3 = m[3 * ms];
  y[0] = m0 + m1 + m2;
  y[s] = m1 - m2 - m3;
}
template <typename T>
void output_adjoint_1d(const T* y, int64_t s, T* m, int64_t ms) {  // A y
  const T y0 = y[0], y1 = y[s];
  m[0] = y0;
  m[ms] = y0 + y1;
  m[2 * ms] = y0 - y1;
  m[3 * ms] = -y1;
}

struct Tiling {
  int64_t rows, cols;            // tiles per image
  int64_t padded_h, padded_w;    // zero-padded input covering every tile's patch
  int64_t per_image() const { return rows * cols; }
};

Tiling tiling_of(const Geometry& g) {
  const int64_t rows = (g.h.out_size + 1) / 2, cols = (g.w.out_size + 1) / 2;
  return Tiling{rows, cols, 2 * rows + 2, 2 * cols + 2};
}

int64_t images_per_chunk(const Geometry& g, const Tiling& t) {
  const int64_t by_bytes = kMaxChunkFloats / (kPoints * (g.in_channels + g.out_channels));
  const int64_t tiles = std::max<int64_t>(1, std::min(kMaxTiles, by_bytes));
  return std::max<int64_t>(1, std::min(g.batch, tiles / t.per_image()));
}

// Weight entries go through the transforms kWeightLanes at a time: gathered
// into lane arrays, transformed in loops over the lanes (which the compiler
// vectorizes), the 16 transformed rows written as contiguous runs.
constexpr int64_t kWeightLanes = 16;

// U[xi][co][ci] = (G W[co][ci] G^T)[xi], or with transposed = true
// U^T[xi][ci][co] (grad_input's operand, built directly instead of
// transposing U).
template <typename T>
at::Tensor transform_weight(const at::Tensor& weight, const Geometry& g, bool transposed = false) {
  constexpr int64_t L = kWeightLanes;
  const int64_t C = g.in_channels, K = g.out_channels;
  at::Tensor u = transposed ? at::empty({kPoints, C, K}, weight.options())
                            : at::empty({kPoints, K, C}, weight.options());
  const T* w = weight.const_data_ptr<T>();
  T* out = u.mutable_data_ptr<T>();
  // Entry p of a U row is (co, ci) = (p / C, p % C), or (p % K, p / K) transposed.
  at::parallel_for(0, (K * C + L - 1) / L, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t p0 = blk * L, n = std::min(L, K * C - p0);
      T gl[9][L], rows[4 * 3][L], full[kPoints][L];
      for (int64_t l = 0; l < L; ++l) {
        const int64_t p = p0 + std::min(l, n - 1);
        const T* src = transposed ? w + ((p % K) * C + p / K) * 9 : w + p * 9;
        for (int j = 0; j < 9; ++j) gl[j][l] = src[j];
      }
      for (int c = 0; c < 3; ++c) {  // columns of g
        for (int64_t l = 0; l < L; ++l) weight_1d(&gl[c][l], 3 * L, &rows[c][l], 3 * L);
      }
      for (int r = 0; r < 4; ++r) {
        for (int64_t l = 0; l < L; ++l) weight_1d(&rows[r * 3][l], L, &full[r * 4][l], L);
      }
      for (int xi = 0; xi < kPoints; ++xi) std::copy(full[xi], full[xi] + n, out + xi * K * C + p0);
    }
  });
  return u;
}

// Tiles go through the transforms kLanes at a time: the tile
// values are gathered into lane arrays, transformed in a loop over the lanes
// (which the compiler vectorizes) and the 16 rows of M / dM are read or
// written as contiguous runs.
constexpr int64_t kLanes = 16;

// (image, th, tw) of consecutive tiles, starting at tile t0.
struct TileCursor {
  int64_t i, th, tw;
  TileCursor(int64_t t0, const Tiling& t)
      : i(t0 / t.per_image()), th(t0 % t.per_image() / t.cols), tw(t0 % t.cols) {}
  void next(const Tiling& t) {
    if (++tw == t.cols) {
      tw = 0;
      if (++th == t.rows) {
        th = 0;
        ++i;
      }
    }
  }
};

// The zero-padded planes of channel c of the chunk's images:
// [image][padded_h][padded_w].
template <typename T>
void pad_planes(const View4<T>& x, int64_t first, int64_t images, int64_t c, const Geometry& g,
                const Tiling& t, T* pad) {
  const int64_t plane = t.padded_h * t.padded_w;
  std::fill(pad, pad + images * plane, T(0));
  const int64_t rows = std::min(g.h.in_size, t.padded_h - g.h.pad_begin);
  const int64_t cols = std::min(g.w.in_size, t.padded_w - g.w.pad_begin);
  for (int64_t i = 0; i < images; ++i) {
    const T* src = x.plane(first + i, c);
    T* dst = pad + i * plane + g.h.pad_begin * t.padded_w + g.w.pad_begin;
    for (int64_t h = 0; h < rows; ++h) {
      for (int64_t w = 0; w < cols; ++w) dst[h * t.padded_w + w] = src[h * x.sh + w * x.sw];
    }
  }
}

// The transform loops run channel by channel and, within a channel, over the
// chunk's tiles in order, so each of the 16 rows V[xi][c][:] (M, dM, dV
// alike) is written or read front to back.

// V[xi][c][tile] for the chunk's tiles (tile = image * per_image + th * cols
// + tw); pad holds one padded plane per image.
template <typename T>
void transform_input(const View4<T>& x, int64_t first, int64_t images, const Geometry& g,
                     const Tiling& t, T* pad, T* v, int64_t tiles) {
  const int64_t C = g.in_channels, plane = t.padded_h * t.padded_w;
  for (int64_t c = 0; c < C; ++c) {
    pad_planes(x, first, images, c, g, t, pad);
    for (int64_t t0 = 0; t0 < tiles; t0 += kLanes) {
      const int64_t n = std::min(kLanes, tiles - t0);
      T d[kPoints][kLanes], full[kPoints][kLanes];
      TileCursor at(t0, t);
      for (int64_t l = 0; l < n; ++l, at.next(t)) {
        const T* p = pad + at.i * plane + 2 * at.th * t.padded_w + 2 * at.tw;
        for (int r = 0; r < 4; ++r) {
          for (int col = 0; col < 4; ++col) d[r * 4 + col][l] = p[r * t.padded_w + col];
        }
      }
      for (int64_t l = 0; l < n; ++l) {
        T dl[kPoints], rows[kPoints], f[kPoints];
        for (int j = 0; j < kPoints; ++j) dl[j] = d[j][l];
        for (int col = 0; col < 4; ++col) input_1d(dl + col, 4, rows + col, 4);
        for (int r = 0; r < 4; ++r) input_1d(rows + r * 4, 1, f + r * 4, 1);
        for (int xi = 0; xi < kPoints; ++xi) full[xi][l] = f[xi];
      }
      for (int xi = 0; xi < kPoints; ++xi) {
        std::copy(full[xi], full[xi] + n, v + (xi * C + c) * tiles + t0);
      }
    }
  }
}

// dM[xi][co][tile] = (A dY_tile A^T)[xi]; dY is zero past the output's edge.
template <typename T>
void transform_grad_output(const View4<T>& go, int64_t first, int64_t images, const Geometry& g,
                           const Tiling& t, T* dm, int64_t tiles) {
  (void)images;
  const int64_t K = g.out_channels;
  for (int64_t co = 0; co < K; ++co) {
    for (int64_t t0 = 0; t0 < tiles; t0 += kLanes) {
      const int64_t n = std::min(kLanes, tiles - t0);
      T y[4][kLanes];
      TileCursor at(t0, t);
      for (int64_t l = 0; l < n; ++l, at.next(t)) {
        const T* plane = go.plane(first + at.i, co);
        for (int r = 0; r < 2; ++r) {
          for (int c = 0; c < 2; ++c) {
            const int64_t oh = 2 * at.th + r, ow = 2 * at.tw + c;
            y[r * 2 + c][l] = (oh < g.h.out_size && ow < g.w.out_size)
                                  ? plane[oh * go.sh + ow * go.sw] : T(0);
          }
        }
      }
      T full[kPoints][kLanes];
      for (int64_t l = 0; l < n; ++l) {
        T yl[4], rows[2 * 4], f[kPoints];
        for (int j = 0; j < 4; ++j) yl[j] = y[j][l];
        for (int c = 0; c < 2; ++c) output_adjoint_1d(yl + c, 2, rows + c, 2);  // 4 x 2
        for (int r = 0; r < 4; ++r) output_adjoint_1d(rows + r * 2, 1, f + r * 4, 1);
        for (int xi = 0; xi < kPoints; ++xi) full[xi][l] = f[xi];
      }
      for (int xi = 0; xi < kPoints; ++xi) {
        std::copy(full[xi], full[xi] + n, dm + (xi * K + co) * tiles + t0);
      }
    }
  }
}

// output tiles y = A^T M A (+ bias), clipped to the output.
template <typename T>
void store_output(const T* m, const T* bias, int64_t first, int64_t images, const Geometry& g,
                  const Tiling& t, int64_t tiles, const View4<T>& y) {
  (void)images;
  const int64_t K = g.out_channels;
  for (int64_t co = 0; co < K; ++co) {
    const T b = bias ? bias[co] : T(0);
    for (int64_t t0 = 0; t0 < tiles; t0 += kLanes) {
      const int64_t n = std::min(kLanes, tiles - t0);
      T full[kPoints][kLanes], out[4][kLanes];
      for (int xi = 0; xi < kPoints; ++xi) {
        std::copy(m + (xi * K + co) * tiles + t0, m + (xi * K + co) * tiles + t0 + n, full[xi]);
      }
      for (int64_t l = 0; l < n; ++l) {
        T f[kPoints], rows[2 * 4], o[4];
        for (int xi = 0; xi < kPoints; ++xi) f[xi] = full[xi][l];
        for (int c = 0; c < 4; ++c) output_1d(f + c, 4, rows + c, 4);  // 2 x 4
        for (int r = 0; r < 2; ++r) output_1d(rows + r * 4, 1, o + r * 2, 1);
        for (int j = 0; j < 4; ++j) out[j][l] = o[j] + b;
      }
      TileCursor at(t0, t);
      for (int64_t l = 0; l < n; ++l, at.next(t)) {
        T* plane = y.plane(first + at.i, co);
        for (int r = 0; r < 2; ++r) {
          for (int c = 0; c < 2; ++c) {
            const int64_t oh = 2 * at.th + r, ow = 2 * at.tw + c;
            if (oh < g.h.out_size && ow < g.w.out_size) plane[oh * y.sh + ow * y.sw] = out[r * 2 + c][l];
          }
        }
      }
    }
  }
}

// dx = sum over tiles of B dV B^T placed at the tile's patch, cropped to the
// input; pad holds one padded plane.
template <typename T>
void store_grad_input(const T* dv, int64_t first, int64_t images, const Geometry& g,
                      const Tiling& t, int64_t tiles, T* pad, const View4<T>& dx) {
  const int64_t C = g.in_channels;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < images; ++i) {
      std::fill(pad, pad + t.padded_h * t.padded_w, T(0));
      for (int64_t th = 0; th < t.rows; ++th) {
        for (int64_t tw = 0; tw < t.cols; ++tw) {
          const int64_t tile = i * t.per_image() + th * t.cols + tw;
          T full[kPoints], rows[kPoints], d[kPoints];
          for (int xi = 0; xi < kPoints; ++xi) full[xi] = dv[(xi * C + c) * tiles + tile];
          for (int col = 0; col < 4; ++col) input_adjoint_1d(full + col, 4, rows + col, 4);
          for (int r = 0; r < 4; ++r) input_adjoint_1d(rows + r * 4, 1, d + r * 4, 1);
          T* patch = pad + 2 * th * t.padded_w + 2 * tw;
          for (int r = 0; r < 4; ++r) {
            for (int col = 0; col < 4; ++col) patch[r * t.padded_w + col] += d[r * 4 + col];
          }
        }
      }
      T* out = dx.plane(first + i, c);
      const T* inner = pad + g.h.pad_begin * t.padded_w + g.w.pad_begin;
      for (int64_t h = 0; h < g.h.in_size; ++h) {
        for (int64_t w = 0; w < g.w.in_size; ++w) {
          // Input positions past the tiles' reach get no gradient (they are
          // read by no output either).
          const bool covered = h + g.h.pad_begin < t.padded_h && w + g.w.pad_begin < t.padded_w;
          out[h * dx.sh + w * dx.sw] = covered ? inner[h * t.padded_w + w] : T(0);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// float32 transforms with AVX-512 (used when cpu_gemm::available()): 16
// consecutive tiles per vector. The tile values are fetched with masked
// gathers straight from the activations (the mask zeroes the padding and the
// positions past the output's edge), the transforms run in registers, and
// the 16 rows of V / dM are written with (masked) vector stores; output
// tiles are written with masked scatters. The gather offsets depend only on
// the chunk's geometry, so they are computed once per chunk (LaneTables) and
// reused for every channel. Same arithmetic, in the same order, as the
// generic transforms above.

// Gather offsets of one chunk's tiles in a tensor with strides (sn, sh, sw),
// relative to channel c of its first image: for each block of 16 tiles, and
// each of the positions (r, col) of a tile's window (4x4 input patch
// starting at (2 th - pad, 2 tw - pad), or 2x2 output block at (2 th, 2 tw)),
// an int32 offset per lane and a mask of the lanes inside the tensor.
struct LaneTables {
  int64_t blocks = 0, window = 0;  // window: positions per tile (16 or 4)
  std::vector<int32_t> index;      // [block][position][16]
  std::vector<uint16_t> mask;      // [block][position]
  std::vector<uint16_t> lanes;     // [block]: lanes holding a tile
  // Returns false when an offset does not fit in int32.
  bool build(const Geometry& g, const Tiling& t, int64_t tiles, int64_t sn, int64_t sh,
             int64_t sw, bool input_patch) {
    window = input_patch ? 16 : 4;
    const int64_t side = input_patch ? 4 : 2;
    const int64_t off_h = input_patch ? g.h.pad_begin : 0, off_w = input_patch ? g.w.pad_begin : 0;
    const int64_t H = input_patch ? g.h.in_size : g.h.out_size;
    const int64_t W = input_patch ? g.w.in_size : g.w.out_size;
    blocks = (tiles + 15) / 16;
    index.assign(blocks * window * 16, 0);
    mask.assign(blocks * window, 0);
    lanes.assign(blocks, 0);
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t b = tile / 16, l = tile % 16;
      const int64_t i = tile / t.per_image(), th = tile % t.per_image() / t.cols, tw = tile % t.cols;
      lanes[b] |= static_cast<uint16_t>(1u << l);
      for (int64_t r = 0; r < side; ++r) {
        for (int64_t c = 0; c < side; ++c) {
          const int64_t h = 2 * th + r - off_h, w = 2 * tw + c - off_w;
          if (h < 0 || h >= H || w < 0 || w >= W) continue;
          const int64_t off = i * sn + h * sh + w * sw;
          if (off < 0 || off > INT32_MAX) return false;
          const int64_t pos = r * side + c;
          index[(b * window + pos) * 16 + l] = static_cast<int32_t>(off);
          mask[b * window + pos] |= static_cast<uint16_t>(1u << l);
        }
      }
    }
    return true;
  }
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HG_WINO_AVX512 1
#define HG_WINO_TARGET __attribute__((target("avx512f,avx512vl,fma")))

// V[xi][c][tile] = (B^T d_tile B)[xi] for the chunk's tiles.
HG_WINO_TARGET void transform_input_avx512(const View4<float>& x, int64_t first, int64_t C,
                                           const LaneTables& lt, float* v, int64_t tiles) {
  for (int64_t c = 0; c < C; ++c) {
    const float* base = x.plane(first, c);
    for (int64_t b = 0; b < lt.blocks; ++b) {
      __m512 d[16], rows[16];
      for (int pos = 0; pos < 16; ++pos) {
        const __m512i idx =
            _mm512_loadu_si512(reinterpret_cast<const void*>(&lt.index[(b * 16 + pos) * 16]));
        d[pos] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lt.mask[b * 16 + pos], idx, base, 4);
      }
      for (int col = 0; col < 4; ++col) {  // B^T along the rows of the patch
        const __m512 d0 = d[col], d1 = d[4 + col], d2 = d[8 + col], d3 = d[12 + col];
        rows[col] = _mm512_sub_ps(d0, d2);
        rows[4 + col] = _mm512_add_ps(d1, d2);
        rows[8 + col] = _mm512_sub_ps(d2, d1);
        rows[12 + col] = _mm512_sub_ps(d1, d3);
      }
      const __mmask16 lanes = lt.lanes[b];
      float* out = v + c * tiles + b * 16;
      for (int r = 0; r < 4; ++r) {  // then along its columns
        const __m512 d0 = rows[r * 4], d1 = rows[r * 4 + 1], d2 = rows[r * 4 + 2],
                     d3 = rows[r * 4 + 3];
        _mm512_mask_storeu_ps(out + (r * 4 + 0) * C * tiles, lanes, _mm512_sub_ps(d0, d2));
        _mm512_mask_storeu_ps(out + (r * 4 + 1) * C * tiles, lanes, _mm512_add_ps(d1, d2));
        _mm512_mask_storeu_ps(out + (r * 4 + 2) * C * tiles, lanes, _mm512_sub_ps(d2, d1));
        _mm512_mask_storeu_ps(out + (r * 4 + 3) * C * tiles, lanes, _mm512_sub_ps(d1, d3));
      }
    }
  }
}

// dM[xi][co][tile] = (A dY_tile A^T)[xi].
HG_WINO_TARGET void transform_grad_output_avx512(const View4<float>& go, int64_t first, int64_t K,
                                                 const LaneTables& lt, float* dm, int64_t tiles) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t co = 0; co < K; ++co) {
    const float* base = go.plane(first, co);
    for (int64_t b = 0; b < lt.blocks; ++b) {
      __m512 y[4], rows[8];
      for (int pos = 0; pos < 4; ++pos) {
        const __m512i idx =
            _mm512_loadu_si512(reinterpret_cast<const void*>(&lt.index[(b * 4 + pos) * 16]));
        y[pos] = _mm512_mask_i32gather_ps(zero, lt.mask[b * 4 + pos], idx, base, 4);
      }
      for (int c = 0; c < 2; ++c) {  // A along the rows: 4 x 2
        const __m512 y0 = y[c], y1 = y[2 + c];
        rows[c] = y0;
        rows[2 + c] = _mm512_add_ps(y0, y1);
        rows[4 + c] = _mm512_sub_ps(y0, y1);
        rows[6 + c] = _mm512_sub_ps(zero, y1);
      }
      const __mmask16 lanes = lt.lanes[b];
      float* out = dm + co * tiles + b * 16;
      for (int r = 0; r < 4; ++r) {
        const __m512 y0 = rows[r * 2], y1 = rows[r * 2 + 1];
        _mm512_mask_storeu_ps(out + (r * 4 + 0) * K * tiles, lanes, y0);
        _mm512_mask_storeu_ps(out + (r * 4 + 1) * K * tiles, lanes, _mm512_add_ps(y0, y1));
        _mm512_mask_storeu_ps(out + (r * 4 + 2) * K * tiles, lanes, _mm512_sub_ps(y0, y1));
        _mm512_mask_storeu_ps(out + (r * 4 + 3) * K * tiles, lanes, _mm512_sub_ps(zero, y1));
      }
    }
  }
}

// y tiles = A^T M A (+ bias), scattered into the output (clipped by the masks).
HG_WINO_TARGET void store_output_avx512(const float* m, const float* bias, int64_t first,
                                        int64_t K, const LaneTables& lt, int64_t tiles,
                                        const View4<float>& y) {
  for (int64_t co = 0; co < K; ++co) {
    const __m512 bv = _mm512_set1_ps(bias ? bias[co] : 0.0f);
    float* base = y.plane(first, co);
    for (int64_t b = 0; b < lt.blocks; ++b) {
      const __mmask16 lanes = lt.lanes[b];
      const float* src = m + co * tiles + b * 16;
      __m512 f[16], rows[8];
      for (int xi = 0; xi < 16; ++xi) f[xi] = _mm512_maskz_loadu_ps(lanes, src + xi * K * tiles);
      for (int c = 0; c < 4; ++c) {  // A^T along the rows: 2 x 4
        const __m512 m0 = f[c], m1 = f[4 + c], m2 = f[8 + c], m3 = f[12 + c];
        rows[c] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
        rows[4 + c] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
      }
      for (int r = 0; r < 2; ++r) {
        const __m512 m0 = rows[r * 4], m1 = rows[r * 4 + 1], m2 = rows[r * 4 + 2],
                     m3 = rows[r * 4 + 3];
        const __m512 o[2] = {_mm512_add_ps(_mm512_add_ps(m0, m1), m2),
                             _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3)};
        for (int c = 0; c < 2; ++c) {
          const int pos = r * 2 + c;
          const __m512i idx =
              _mm512_loadu_si512(reinterpret_cast<const void*>(&lt.index[(b * 4 + pos) * 16]));
          _mm512_mask_i32scatter_ps(base, lt.mask[b * 4 + pos], idx, _mm512_add_ps(o[c], bv), 4);
        }
      }
    }
  }
}

// dx = sum over tiles of B dV B^T placed at the tile's patch (cropped):
// the 16 patch values of 16 tiles are computed in vectors, then added onto
// padded planes (the patches overlap) and the planes' inside stored.
HG_WINO_TARGET void store_grad_input_avx512(const float* dv, int64_t first, int64_t images,
                                            const Geometry& g, const Tiling& t, int64_t tiles,
                                            float* pad, const View4<float>& dx) {
  const int64_t C = g.in_channels, plane = t.padded_h * t.padded_w;
  const int64_t blocks = (tiles + 15) / 16;
  memory::ScratchVector<int64_t> at_pad(blocks * 16, 0);
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t i = tile / t.per_image(), th = tile % t.per_image() / t.cols, tw = tile % t.cols;
    at_pad[tile] = i * plane + 2 * th * t.padded_w + 2 * tw;
  }
  alignas(64) float d[16][16];
  for (int64_t c = 0; c < C; ++c) {
    std::fill(pad, pad + images * plane, 0.0f);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n = std::min<int64_t>(16, tiles - b * 16);
      const __mmask16 lanes = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1);
      const float* src = dv + c * tiles + b * 16;
      __m512 f[16], rows[16];
      for (int xi = 0; xi < 16; ++xi) f[xi] = _mm512_maskz_loadu_ps(lanes, src + xi * C * tiles);
      for (int col = 0; col < 4; ++col) {  // B along the rows
        const __m512 v0 = f[col], v1 = f[4 + col], v2 = f[8 + col], v3 = f[12 + col];
        rows[col] = v0;
        rows[4 + col] = _mm512_add_ps(_mm512_sub_ps(v1, v2), v3);
        rows[8 + col] = _mm512_sub_ps(_mm512_add_ps(v1, v2), v0);
        rows[12 + col] = _mm512_sub_ps(_mm512_setzero_ps(), v3);
      }
      for (int r = 0; r < 4; ++r) {
        const __m512 v0 = rows[r * 4], v1 = rows[r * 4 + 1], v2 = rows[r * 4 + 2],
                     v3 = rows[r * 4 + 3];
        _mm512_store_ps(d[r * 4 + 0], v0);
        _mm512_store_ps(d[r * 4 + 1], _mm512_add_ps(_mm512_sub_ps(v1, v2), v3));
        _mm512_store_ps(d[r * 4 + 2], _mm512_sub_ps(_mm512_add_ps(v1, v2), v0));
        _mm512_store_ps(d[r * 4 + 3], _mm512_sub_ps(_mm512_setzero_ps(), v3));
      }
      for (int64_t l = 0; l < n; ++l) {  // tiles in order, as the generic version
        float* patch = pad + at_pad[b * 16 + l];
        for (int r = 0; r < 4; ++r) {
          for (int col = 0; col < 4; ++col) patch[r * t.padded_w + col] += d[r * 4 + col][l];
        }
      }
    }
    for (int64_t i = 0; i < images; ++i) {
      float* out = dx.plane(first + i, c);
      const float* inner = pad + i * plane + g.h.pad_begin * t.padded_w + g.w.pad_begin;
      for (int64_t h = 0; h < g.h.in_size; ++h) {
        for (int64_t w = 0; w < g.w.in_size; ++w) {
          const bool covered = h + g.h.pad_begin < t.padded_h && w + g.w.pad_begin < t.padded_w;
          out[h * dx.sh + w * dx.sw] = covered ? inner[h * t.padded_w + w] : 0.0f;
        }
      }
    }
  }
}
#else
#define HG_WINO_AVX512 0
#endif

// The AVX-512 transforms apply: float32, and the CPU has AVX-512 (and it is
// not turned off).
template <typename T>
bool fast_transforms() {
  return HG_WINO_AVX512 && std::is_same<T, float>::value && cpu_gemm::available();
}

// out[xi] = a[xi] b[xi], or out[xi] += a[xi] b[xi] (accumulate), for the 16
// points: the AVX-512 product for float32 when the CPU has it, else BLAS.
void products(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  // The 16 products share one class: choose once.
  if (out.scalar_type() != at::kFloat || !cpu_gemm::available() ||
      cpu_gemm::choose(cpu_gemm::problem_of(out[0], a[0], b[0], cpu_gemm::Site::tensor,
                                            at::in_parallel_region())) != cpu_gemm::Kernel::own) {
    if (accumulate) {
      out.baddbmm_(a, b);
    } else {
      at::bmm_out(out, a, b);
    }
    return;
  }
  for (int xi = 0; xi < kPoints; ++xi) {
    at::Tensor o = out[xi];
    if (cpu_gemm::mm(o, a[xi], b[xi], accumulate)) continue;
    if (accumulate) {
      o.addmm_(a[xi], b[xi]);
    } else {
      at::mm_out(o, a[xi], b[xi]);
    }
  }
}

template <typename F>
void parallel_chunks(const Geometry& g, int64_t per_chunk, F&& body) {
  const int64_t chunks = (g.batch + per_chunk - 1) / per_chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // per thread
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t first = c * per_chunk;
      body(first, std::min(per_chunk, g.batch - first));
    }
  });
}

// Each pass returns false, having written nothing reliable, when some
// chunk's magnitudes could overflow the transforms (see transforms_safe);
// the backend then recomputes the whole pass exactly.
template <typename T>
bool forward_impl(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                  at::Tensor& output, const Geometry& g) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const MagnitudeBits<T> weight_magnitude = largest_magnitude<T>(weight);
  if (!transforms_safe<T>(weight_magnitude, 0, 0)) return false;  // a weight is inf or NaN
  const long double growth = forward_growth(g);
  const Tiling t = tiling_of(g);
  const int64_t per_chunk = images_per_chunk(g, t);
  const at::Tensor u = transform_weight<T>(weight, g);
  const View4<T> x = view_of<T>(input), y = view_of<T>(output);
  const T* b = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  std::atomic<bool> unsafe{false};
  parallel_chunks(g, per_chunk, [&](int64_t first, int64_t images) {
    if (unsafe.load(std::memory_order_relaxed)) return;
    const int64_t tiles = images * t.per_image();
    memory::ScratchVector<T> pad(per_chunk * t.padded_h * t.padded_w);
    at::Tensor v = at::empty({kPoints, g.in_channels, tiles}, input.options());
    at::Tensor m = at::empty({kPoints, g.out_channels, tiles}, input.options());
    const MagnitudeBits<T> magnitude =
        chunk_magnitude(x, first, images, g.in_channels, g.h.in_size, g.w.in_size);
    if (!transforms_safe<T>(magnitude, weight_magnitude, growth)) {
      unsafe.store(true);
      return;
    }
    LaneTables in, out;
    if (fast_transforms<T>() && in.build(g, t, tiles, x.sn, x.sh, x.sw, true) &&
        out.build(g, t, tiles, y.sn, y.sh, y.sw, false)) {
#if HG_WINO_AVX512
      if constexpr (std::is_same<T, float>::value) {
        transform_input_avx512(x, first, g.in_channels, in, v.mutable_data_ptr<T>(), tiles);
        products(m, u, v, false);
        store_output_avx512(m.const_data_ptr<T>(), b, first, g.out_channels, out, tiles, y);
        return;
      }
#endif
    }
    transform_input(x, first, images, g, t, pad.data(), v.mutable_data_ptr<T>(), tiles);
    products(m, u, v, false);
    store_output(m.const_data_ptr<T>(), b, first, images, g, t, tiles, y);
  });
  return !unsafe.load();
}

template <typename T>
bool grad_input_impl(const at::Tensor& grad_output, const at::Tensor& weight,
                     at::Tensor& grad_input, const Geometry& g) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const MagnitudeBits<T> weight_magnitude = largest_magnitude<T>(weight);
  if (!transforms_safe<T>(weight_magnitude, 0, 0)) return false;
  const long double growth = grad_input_growth(g);
  const Tiling t = tiling_of(g);
  const int64_t per_chunk = images_per_chunk(g, t);
  const at::Tensor ut = transform_weight<T>(weight, g, /*transposed=*/true);
  const View4<T> go = view_of<T>(grad_output), dx = view_of<T>(grad_input);
  std::atomic<bool> unsafe{false};
  parallel_chunks(g, per_chunk, [&](int64_t first, int64_t images) {
    if (unsafe.load(std::memory_order_relaxed)) return;
    const int64_t tiles = images * t.per_image();
    memory::ScratchVector<T> pad(per_chunk * t.padded_h * t.padded_w);
    at::Tensor dm = at::empty({kPoints, g.out_channels, tiles}, grad_output.options());
    at::Tensor dv = at::empty({kPoints, g.in_channels, tiles}, grad_output.options());
    const MagnitudeBits<T> magnitude =
        chunk_magnitude(go, first, images, g.out_channels, g.h.out_size, g.w.out_size);
    if (!transforms_safe<T>(magnitude, weight_magnitude, growth)) {
      unsafe.store(true);
      return;
    }
    LaneTables out;
    if (fast_transforms<T>() && out.build(g, t, tiles, go.sn, go.sh, go.sw, false)) {
#if HG_WINO_AVX512
      if constexpr (std::is_same<T, float>::value) {
        transform_grad_output_avx512(go, first, g.out_channels, out, dm.mutable_data_ptr<T>(),
                                     tiles);
        products(dv, ut, dm, false);
        store_grad_input_avx512(dv.const_data_ptr<T>(), first, images, g, t, tiles, pad.data(),
                                dx);
        return;
      }
#endif
    }
    transform_grad_output(go, first, images, g, t, dm.mutable_data_ptr<T>(), tiles);
    products(dv, ut, dm, false);
    store_grad_input(dv.const_data_ptr<T>(), first, images, g, t, tiles, pad.data(), dx);
  });
  return !unsafe.load();
}

template <typename T>
bool grad_weight_impl(const at::Tensor& grad_output, const at::Tensor& input,
                      at::Tensor& grad_weight, const Geometry& g) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tiling t = tiling_of(g);
  const int64_t per_chunk = images_per_chunk(g, t);
  const int64_t chunks = (g.batch + per_chunk - 1) / per_chunk;
  const int64_t slots = std::min(kWeightSlots, chunks);
  const int64_t K = g.out_channels, C = g.in_channels;
  // Every chunk is checked against the bound for all tiles together, so the
  // sum over chunks stays within it too.
  const long double growth = grad_weight_growth(g.batch * t.per_image());
  const View4<T> go = view_of<T>(grad_output), x = view_of<T>(input);
  // dU[slot][xi][co][ci]: slot s sums chunks s, s + slots, ... in order.
  at::Tensor du = at::zeros({slots, kPoints, K, C}, input.options());
  // The products below (dU[xi] += dM[xi] V[xi]^T) as the measured policy sees
  // them: on one thread each when the slots spread over the pool.
  cpu_gemm::Problem product;
  product.m = K;
  product.n = C;
  product.k = per_chunk * t.per_image();
  product.b_transposed = true;
  product.calling_thread = slots > 1;  // not the thread count: one class at any count
  const bool own_products =
      fast_transforms<T>() && cpu_gemm::choose(product) == cpu_gemm::Kernel::own;
  std::atomic<bool> unsafe{false};
  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    const at::AutoDispatchBelowADInplaceOrView below;  // per thread
    memory::ScratchVector<T> pad(per_chunk * t.padded_h * t.padded_w);
    cpu_gemm::PackedB packed;  // reused by the chunks
    for (int64_t s = s0; s < s1; ++s) {
      at::Tensor acc = du[s];
      for (int64_t c = s; c < chunks; c += slots) {
        if (unsafe.load(std::memory_order_relaxed)) return;
        const int64_t first = c * per_chunk, images = std::min(per_chunk, g.batch - first);
        const int64_t tiles = images * t.per_image();
        at::Tensor v = at::empty({kPoints, C, tiles}, input.options());
        at::Tensor dm = at::empty({kPoints, K, tiles}, input.options());
        const MagnitudeBits<T> x_magnitude =
            chunk_magnitude(x, first, images, C, g.h.in_size, g.w.in_size);
        const MagnitudeBits<T> go_magnitude =
            chunk_magnitude(go, first, images, K, g.h.out_size, g.w.out_size);
        if (!transforms_safe<T>(x_magnitude, go_magnitude, growth)) {
          unsafe.store(true);
          return;
        }
        LaneTables in, out;
        bool done = false;
        if (fast_transforms<T>() && in.build(g, t, tiles, x.sn, x.sh, x.sw, true) &&
            out.build(g, t, tiles, go.sn, go.sh, go.sw, false)) {
#if HG_WINO_AVX512
          if constexpr (std::is_same<T, float>::value) {
            transform_input_avx512(x, first, C, in, v.mutable_data_ptr<T>(), tiles);
            transform_grad_output_avx512(go, first, K, out, dm.mutable_data_ptr<T>(), tiles);
            done = true;
          }
#endif
        }
        if (!done) {
          transform_input(x, first, images, g, t, pad.data(), v.mutable_data_ptr<T>(), tiles);
          transform_grad_output(go, first, images, g, t, dm.mutable_data_ptr<T>(), tiles);
        }
        if (own_products) {
          // B = V[xi]^T: V's rows packed by register transposes.
          for (int xi = 0; xi < kPoints; ++xi) {
            cpu_gemm::pack_b_transposed(v[xi].template const_data_ptr<float>(), tiles, tiles, C,
                                        packed);
            cpu_gemm::matmul(K, dm[xi].template const_data_ptr<float>(), tiles, 1, packed,
                             acc[xi].template mutable_data_ptr<float>(), C, true);
          }
        } else {
          products(acc, dm, v.transpose(1, 2), true);
        }
      }
    }
  });
  if (unsafe.load()) return false;
  const at::Tensor total = du.sum(0);  // slots added in order
  const T* src = total.const_data_ptr<T>();
  T* dw = grad_weight.mutable_data_ptr<T>();
  constexpr int64_t L = kWeightLanes;
  at::parallel_for(0, (K * C + L - 1) / L, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t p0 = blk * L, n = std::min(L, K * C - p0);
      T full[kPoints][L], rows[4 * 3][L], gl[9][L];
      for (int xi = 0; xi < kPoints; ++xi) {
        std::fill(full[xi], full[xi] + L, T(0));
        std::copy(src + xi * K * C + p0, src + xi * K * C + p0 + n, full[xi]);
      }
      for (int r = 0; r < 4; ++r) {  // 4 x 3
        for (int64_t l = 0; l < L; ++l) weight_adjoint_1d(&full[r * 4][l], L, &rows[r * 3][l], L);
      }
      for (int c = 0; c < 3; ++c) {
        for (int64_t l = 0; l < L; ++l) weight_adjoint_1d(&rows[c][l], 3 * L, &gl[c][l], 3 * L);
      }
      for (int64_t l = 0; l < n; ++l) {
        for (int j = 0; j < 9; ++j) dw[(p0 + l) * 9 + j] = gl[j][l];
      }
    }
  });
  return true;
}

}  // namespace

bool applies(const Geometry& g) {
  const int64_t min_channels = cpu_gemm::available() ? kMinChannels : kMinChannelsScalar;
  return g.groups == 1 && g.h.kernel == 3 && g.w.kernel == 3 && g.h.stride == 1 &&
         g.w.stride == 1 && g.h.dilation == 1 && g.w.dilation == 1 &&
         g.in_channels >= min_channels && g.out_channels >= min_channels;
}

bool forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
             at::Tensor& output, const Geometry& g) {
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "handgrad::conv2d (winograd)", [&] {
    done = forward_impl<scalar_t>(input, weight, bias, output, g);
  });
  return done;
}

bool grad_input(const at::Tensor& grad_output, const at::Tensor& weight, at::Tensor& grad_input,
                const Geometry& g) {
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "handgrad::conv2d_grad_input (winograd)",
                             [&] { done = grad_input_impl<scalar_t>(grad_output, weight, grad_input, g); });
  return done;
}

bool grad_weight(const at::Tensor& grad_output, const at::Tensor& input, at::Tensor& grad_weight,
                 const Geometry& g) {
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "handgrad::conv2d_grad_weight (winograd)", [&] {
    done = grad_weight_impl<scalar_t>(grad_output, input, grad_weight, g);
  });
  return done;
}

}  // namespace winograd
}  // namespace cpu
}  // namespace conv2d
}  // namespace handgrad
