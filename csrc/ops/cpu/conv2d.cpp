// conv2d, CPU backend: picks an algorithm per shape, and the bias gradient.
//
// Algorithms (forward, grad_input, grad_weight each choose on their own):
//  * direct (cpu/conv2d_direct.cpp): register-blocked correlations over
//    zero-padded, stride-phase-split image planes (AVX-512 kernels when the
//    CPU has it, else AVX2; HANDGRAD_CPU_AVX512=0 forces AVX2); for small
//    channel counts (LeNet/MNIST-style layers), where a matrix product is too
//    thin for BLAS.
//  * winograd (cpu/conv2d_winograd.cpp): F(2x2, 3x3), 16 matrix products;
//    for 3x3, stride-1 layers with >= 64 channels in and out (>= 128
//    without AVX-512).
//  * gemm (cpu/conv2d_gemm.cpp): im2col / col2im in batch chunks + one
//    matrix product each; other large-channel layers.
//  The matrix products of both run the AVX-512 float32 GEMM of
//  common/cpu_gemm.h when the CPU has AVX-512 (at::mm's BLAS runs AVX2 code
//  on AMD), else at::mm / at::bmm; HANDGRAD_CPU_AVX512=0 forces the latter.
// Gradients: forward y = W * x + b (correlation); dx = full correlation of dy
// with the flipped kernel; dW = correlation of x with dy; db = sum of dy over
// batch and pixels (below). Saved for backward: input and weight only.
//
// Measured against native, forward+backward, float32, 2 threads, ratio of
// medians native/handgrad, interleaved in one process on a heavily shared
// 2-core machine (python benchmarks/bench_conv2d.py --threads 2 --reps 20
// --max-seconds 12; "first" = the images need no gradient, as in a network):
//   (4,3,32,32)->6 k5 first 170x   (128,3,32,32)->6 k5 first 1.70x
//   (128,6,14,14)->16 k5 2.63x     (128,3,32,32)->64 k3p1 first 1.95x
//   (128,1,28,28)->40 k5 first 2.30x (128,1,28,28)->4 k3p1 first 2.52x
//   (128,4,14,14)->8 k3p1 2.51x
// (The tiny first case is mostly native's per-call threading cost on a busy
// machine; handgrad keeps work below ~2M multiply-adds on one thread.)
// With the AVX-512 direct kernels (AMD EPYC Zen 5, 1 thread, the other core
// busy; native / handgrad per part, each op timed alone, median of 15):
//   (128,3,32,32)->6 k5    forward 2.4x, grad_weight 1.7x
//   (128,6,14,14)->16 k5   forward 0.77x, grad_input 1.15x, grad_weight 1.43x
//   (128,1,28,28)->40 k5   forward 1.35x, grad_weight 1.86x
// (before them: 6->16 forward 0.45x, grad_input 0.44x; 1->40 grad_weight 0.94x).
// The 6->16 forward runs its vector unit at its peak but computes 14 columns
// for every 10 outputs (the wide rows); native vectorizes over channels.
// Those numbers came from a busier moment; on a quieter machine (AMD EPYC Zen
// 5, --reps 10 --max-seconds 5 --modes fwdbwd) the small-channel cases
// measured 0.6-2x at 1 and 2 threads. The large-channel layers, 1 | 2
// threads, before -> after the switch from at::mm/at::bmm (MKL, AVX2 code on
// AMD) to the AVX-512 GEMM (and, for Winograd, lane-vectorized transforms);
// ranges are two runs of the same code:
//   (128,64,16,16)->128 k3p1 (gemm)    0.56x -> 0.90-0.98x | 0.59x -> 0.84-1.05x
//   (128,256,4,4)->512 k3p1 (winograd) 0.49x -> 0.92x      | 0.48x -> 0.97x
//   (128,40,12,12)->80 k5 (gemm)       0.56x -> 0.91-0.92x | 0.49x -> 0.91-0.93x
// then (1 thread, three runs; AVX-512 Winograd transforms, Winograd from 64
// channels, pack_b_transposed in grad_weight, col2im by rows):
//   (128,64,16,16)->128 k3p1 (now winograd) 1.10x, 1.42x, 1.23x
//   (128,256,4,4)->512 k3p1 (winograd)      1.13x, 0.98x, 1.24x
//   (128,40,12,12)->80 k5 (gemm)            0.96x, 1.04x, 0.99x
// native runs oneDNN's AVX-512 convolutions near the core's peak; the rest of
// the gap is im2col / packing / the Winograd transforms (memory-bound).
// channels_last at (128,64,16,16)->128 runs at 0.72-0.77x (was 0.61x): native
// computes NHWC directly, these paths transpose to NCHW.
#include "ops/cpu/conv2d_cpu.h"

#include "common/cpu_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace handgrad {
namespace conv2d {
namespace cpu {
namespace {

// The matrix product wins once both of its small dimensions are wide enough
// to fill BLAS's register tiles; below that the direct kernels do.
bool use_gemm(int64_t rows, int64_t depth) { return rows >= 32 && depth >= 64; }

// Forward and grad_input of stride-1 layers with the AVX-512 direct kernels:
// those stay ahead of im2col + product up to a much deeper reduction
// (measured, 1 thread, per part against native on 3x3 layers at 14x14 with
// 16..64 channels: direct 0.8-1.9x, im2col 0.43-0.85x; at 40->80 k5, depth
// 1000-2000, the two tie in forward and im2col wins grad_input 1.06x to
// 0.49x). Strided layers keep use_gemm (64->64 k3 s2 at 32x32: im2col 1.66x,
// direct 1.19x: the stride phases and the zeros grad_input inserts cost the
// direct kernels), and so does the weight gradient (the two measured alike).
bool use_gemm_correlation(int64_t rows, int64_t depth, const Geometry& g) {
  const bool unit_stride = g.h.stride == 1 && g.w.stride == 1;
  return cpu_gemm::available() && unit_stride ? rows >= 32 && depth >= 1000
                                              : use_gemm(rows, depth);
}

// The matrix-product paths copy rows of pixels; for other layouts
// (channels_last, strided views) they run on NCHW copies, which costs one
// transpose each way instead of strided gathers inside the hot loops.
bool rows_dense(const at::Tensor& t) { return t.stride(3) == 1 && t.stride(2) == t.size(3); }

at::Tensor nchw(const at::Tensor& t) { return rows_dense(t) ? t : t.contiguous(); }

template <typename F>
void into(at::Tensor& result, F&& compute) {
  if (rows_dense(result)) {
    compute(result);
    return;
  }
  at::Tensor dense = at::empty(result.sizes(), result.options());
  compute(dense);
  result.copy_(dense);
}

void forward_kernel(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    at::Tensor& output, const Geometry& g) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (winograd::applies(g)) {
    into(output, [&](at::Tensor& y) { winograd::forward(nchw(input), weight, bias, y, g); });
  } else if (use_gemm_correlation(g.out_per_group(), g.patch(), g)) {
    into(output, [&](at::Tensor& y) { gemm::forward(nchw(input), weight, bias, y, g); });
  } else {
    direct::forward(input, weight, bias, output, g);
  }
}

void grad_input_kernel(const at::Tensor& grad_output, const at::Tensor& weight,
                       at::Tensor& grad_input, const Geometry& g) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (winograd::applies(g)) {
    into(grad_input,
         [&](at::Tensor& dx) { winograd::grad_input(nchw(grad_output), weight, dx, g); });
  } else if (use_gemm_correlation(g.in_per_group(), g.out_per_group() * g.taps(), g)) {
    into(grad_input, [&](at::Tensor& dx) { gemm::grad_input(nchw(grad_output), weight, dx, g); });
  } else {
    direct::grad_input(grad_output, weight, grad_input, g);
  }
}

void grad_weight_kernel(const at::Tensor& grad_output, const at::Tensor& input,
                        at::Tensor& grad_weight, const Geometry& g) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (winograd::applies(g)) {
    winograd::grad_weight(nchw(grad_output), nchw(input), grad_weight, g);
  } else if (use_gemm(g.out_per_group(), g.patch())) {
    gemm::grad_weight(nchw(grad_output), nchw(input), grad_weight, g);
  } else {
    direct::grad_weight(grad_output, input, grad_weight, g);
  }
}

// Sum of one contiguous run, vectorized, with four independent accumulators.
template <typename T>
double sum_run(const T* p, int64_t n) {
  using S = Simd<T>;
  constexpr int64_t L = S::kLanes;
  typename S::V a0 = S::zero(), a1 = S::zero(), a2 = S::zero(), a3 = S::zero();
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    a0 = S::add(a0, S::load(p + i));
    a1 = S::add(a1, S::load(p + i + L));
    a2 = S::add(a2, S::load(p + i + 2 * L));
    a3 = S::add(a3, S::load(p + i + 3 * L));
  }
  double total = S::sum(S::add(S::add(a0, a1), S::add(a2, a3)));
  for (; i < n; ++i) total += p[i];
  return total;
}

// Each channel's sum is accumulated by one task in a fixed order (rows in
// the vector unit, then in double), so the result is deterministic.
void grad_bias_kernel(const at::Tensor& grad_output, at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "handgrad::conv2d_grad_bias", [&] {
    const View4<scalar_t> go = view_of<scalar_t>(grad_output);
    const int64_t N = grad_output.size(0), H = grad_output.size(2), W = grad_output.size(3);
    scalar_t* out = grad_bias.mutable_data_ptr<scalar_t>();
    const bool planes_dense = go.sw == 1 && go.sh == W;
    at::parallel_for(0, grad_output.size(1), grain_for(N * H * W), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double total = 0;
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* plane = go.plane(n, c);
          if (planes_dense) {
            total += sum_run(plane, H * W);
            continue;
          }
          for (int64_t h = 0; h < H; ++h) {
            const scalar_t* row = plane + h * go.sh;
            if (go.sw == 1) {
              total += sum_run(row, W);
            } else {
              for (int64_t w = 0; w < W; ++w) total += row[w * go.sw];
            }
          }
        }
        out[c] = static_cast<scalar_t>(total);
      }
    });
  });
}

const Backend kBackend{&forward_kernel, &grad_input_kernel, &grad_weight_kernel, &grad_bias_kernel};

at::Tensor conv2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return forward(input, weight, bias, stride, padding, dilation, groups, kBackend);
}

at::Tensor conv2d_grad_input_cpu(const at::Tensor& grad_output, const at::Tensor& weight,
                                 at::IntArrayRef input_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  return grad_input(grad_output, weight, input_size, stride, padding, dilation, groups, kBackend);
}

at::Tensor conv2d_grad_weight_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                  at::IntArrayRef weight_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  return grad_weight(grad_output, input, weight_size, stride, padding, dilation, groups, kBackend);
}

at::Tensor conv2d_grad_bias_cpu(const at::Tensor& grad_output) {
  return grad_bias(grad_output, kBackend);
}

}  // namespace
}  // namespace cpu
}  // namespace conv2d
}  // namespace handgrad

TORCH_LIBRARY_IMPL(handgrad, CPU, m) {
  m.impl("conv2d", &handgrad::conv2d::cpu::conv2d_cpu);
  m.impl("conv2d_grad_input", &handgrad::conv2d::cpu::conv2d_grad_input_cpu);
  m.impl("conv2d_grad_weight", &handgrad::conv2d::cpu::conv2d_grad_weight_cpu);
  m.impl("conv2d_grad_bias", &handgrad::conv2d::cpu::conv2d_grad_bias_cpu);
}
