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
// Special values follow native's reference (im2col) rules on every path:
// forward and dW multiply the padding's zeros, dx sums only the (output,
// tap) pairs that read an input; where a path's shortcuts would make
// 0 * inf = NaN (direct dx with a non-finite weight, direct dW with an inf
// input no output reads, Winograd with magnitudes that overflow its
// transforms) the pass is recomputed by the im2col path (below).
// float16 / bfloat16 run these float32 kernels on widened copies and round
// each result once (forward, grad_input, grad_weight; grad_bias sums in
// double).
//
// Measured against native (forward+backward, float32, native / handgrad,
// interleaved medians, quiet 2-core AMD EPYC Zen 5, 2 threads,
// `python benchmarks/run.py --threads 2 --reps 15 --max-seconds 6 --modes
// fwdbwd`; "first" = the images need no gradient, as in a network):
//   (4,3,32,32)->6 k5 first 1.42x     (128,3,32,32)->6 k5 first 1.74x
//   (128,6,14,14)->16 k5 1.25x        (128,3,32,32)->64 k3p1 first 2.28x
//   (128,64,16,16)->128 k3p1 1.38x    (128,256,4,4)->512 k3p1 1.06x
//   (128,1,28,28)->40 k5 first 1.20x  (128,1,28,28)->4 k3p1 first 1.70x
//   (128,4,14,14)->8 k3p1 2.21x       (128,40,12,12)->80 k5 1.03x
//   (128,64,32,32)->64 k3p1 s2 1.39x  (128,64,16,16)->128 channels_last 0.72x
// Per part at 1 thread on the quiet machine (benchmarks/conv2d_parts.py): the
// 16..64-channel 3x3 layers of the VAE/GAN at 14x14 run forward and
// grad_input at 0.8-1.15x and their weight gradient, vectorized over input
// channels (direct::by_channels), at 0.77-0.92x (0.55-0.75x through im2col or
// the pixel-vectorized kernel); the 6->16 forward runs its vector unit at peak but
// computes 14 columns for every 10 outputs (the wide rows), 0.77x. Before the
// AVX-512 GEMM and direct kernels (MKL's AVX2 code, AVX2 direct kernels) the
// large-channel layers ran at 0.5-0.6x and LeNet's second layer at 0.74x.
// channels_last: Winograd layers run in place (their transforms gather and
// scatter through stride tables): 64->128 channels_last 1.10x on an AMD
// EPYC Zen 4 (family 25 model 17), 2 threads, where NCHW runs 1.36x,
// `bench_conv2d.py --threads 2 --reps 15 --cases "(128, 64, 16, 16)"`;
// the direct and im2col paths work on NCHW copies.
#include "ops/cpu/conv2d_cpu.h"

#include "common/cpu_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>

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

// The Winograd transforms gather and scatter through per-chunk offset tables
// built from the strides, so NCHW and channels_last (NHWC) activations run
// in place; other strided views get an NCHW copy.
bool winograd_dense(const at::Tensor& t) {
  return rows_dense(t) || t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor winograd_layout(const at::Tensor& t) { return winograd_dense(t) ? t : t.contiguous(); }

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

// Whether a tensor holds an inf or NaN (the weights, or a weight gradient:
// small, scanned in one pass).
template <typename T>
bool has_nonfinite(const T* p, int64_t n, bool nan_only) {
  bool found = false;
  for (int64_t i = 0; i < n; ++i) found |= nan_only ? p[i] != p[i] : !std::isfinite(p[i]);
  return found;
}

bool any_nonfinite(const at::Tensor& t, bool nan_only = false) {
  const at::Tensor dense = t.contiguous();
  bool found = false;
  AT_DISPATCH_FLOATING_TYPES(dense.scalar_type(), "handgrad::conv2d (special values)", [&] {
    found = has_nonfinite(dense.const_data_ptr<scalar_t>(), dense.numel(), nan_only);
  });
  return found;
}

// Special values follow native conv2d (cpu/conv2d_gemm.cpp states the
// rules). The direct kernels multiply zeros that native never multiplies --
// grad_input's inserted and padding zeros with every weight, the weight
// gradient's dropped wide columns with input values -- harmless unless the
// other factor is inf or NaN, when 0 * inf = NaN appears where native has a
// number. Such cases go to the exact im2col path: grad_input when a weight is
// not finite (checked up front, the weights being small), the pixel-
// vectorized weight gradient when its result holds a NaN (a spurious one can
// only be NaN, and a result without NaN is exact). Winograd checks its
// operands' magnitudes itself (cpu/conv2d_winograd.cpp) and reports whether
// it could run.

void forward_float(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                   at::Tensor& output, const Geometry& g) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (winograd::applies(g)) {
    if (!winograd::forward(winograd_layout(input), weight, bias, output, g)) {
      into(output, [&](at::Tensor& y) { gemm::forward(nchw(input), weight, bias, y, g); });
    }
  } else if (use_gemm_correlation(g.out_per_group(), g.patch(), g)) {
    into(output, [&](at::Tensor& y) { gemm::forward(nchw(input), weight, bias, y, g); });
  } else {
    direct::forward(input, weight, bias, output, g);
  }
}

void grad_input_float(const at::Tensor& grad_output, const at::Tensor& weight,
                      at::Tensor& grad_input, const Geometry& g) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (winograd::applies(g)) {
    if (!winograd::grad_input(winograd_layout(grad_output), weight, grad_input, g)) {
      into(grad_input, [&](at::Tensor& dx) { gemm::grad_input(nchw(grad_output), weight, dx, g); });
    }
  } else if (use_gemm_correlation(g.in_per_group(), g.out_per_group() * g.taps(), g) ||
             any_nonfinite(weight)) {
    into(grad_input, [&](at::Tensor& dx) { gemm::grad_input(nchw(grad_output), weight, dx, g); });
  } else {
    direct::grad_input(grad_output, weight, grad_input, g);
  }
}

void grad_weight_float(const at::Tensor& grad_output, const at::Tensor& input,
                       at::Tensor& grad_weight, const Geometry& g) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (winograd::applies(g)) {
    if (!winograd::grad_weight(winograd_layout(grad_output), winograd_layout(input), grad_weight,
                               g)) {
      gemm::grad_weight(nchw(grad_output), nchw(input), grad_weight, g);
    }
  } else if (!direct::by_channels(g) && use_gemm(g.out_per_group(), g.patch())) {
    gemm::grad_weight(nchw(grad_output), nchw(input), grad_weight, g);
  } else {
    direct::grad_weight(grad_output, input, grad_weight, g);
    if (!direct::by_channels(g) && any_nonfinite(grad_weight, /*nan_only=*/true)) {
      gemm::grad_weight(nchw(grad_output), nchw(input), grad_weight, g);
    }
  }
}

// float16 and bfloat16 run the float32 kernels on float32 copies of their
// operands and round each result once (the products sum in float32, as
// native's reduced-precision CPU convolution accumulates).
bool reduced_precision(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

at::Tensor widened(const at::Tensor& t) {
  return t.defined() ? t.to(at::kFloat) : t;
}

// A float32 tensor shaped and laid out like `like`, computed into by the
// float32 kernels, then rounded into `like`.
template <typename F>
void in_float(at::Tensor& result, F&& compute) {
  at::Tensor wide = at::empty_like(result, result.options().dtype(at::kFloat));
  compute(wide);
  result.copy_(wide);
}

void forward_kernel(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    at::Tensor& output, const Geometry& g) {
  if (!reduced_precision(input)) return forward_float(input, weight, bias, output, g);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  in_float(output, [&](at::Tensor& y) {
    forward_float(widened(input), widened(weight), widened(bias), y, g);
  });
}

void grad_input_kernel(const at::Tensor& grad_output, const at::Tensor& weight,
                       at::Tensor& grad_input, const Geometry& g) {
  if (!reduced_precision(grad_output)) return grad_input_float(grad_output, weight, grad_input, g);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  in_float(grad_input, [&](at::Tensor& dx) {
    grad_input_float(widened(grad_output), widened(weight), dx, g);
  });
}

void grad_weight_kernel(const at::Tensor& grad_output, const at::Tensor& input,
                        at::Tensor& grad_weight, const Geometry& g) {
  if (!reduced_precision(input)) return grad_weight_float(grad_output, input, grad_weight, g);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  in_float(grad_weight, [&](at::Tensor& dw) {
    grad_weight_float(widened(grad_output), widened(input), dw, g);
  });
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
  if (reduced_precision(grad_output)) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    in_float(grad_bias, [&](at::Tensor& db) { grad_bias_kernel(widened(grad_output), db); });
    return;
  }
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
