// max_pool2d, CUDA kernels.
//
// Algorithm: one thread per output element computes the window maximum and
// its flat index h*W + w in the input plane (NCHW or channels_last; in
// channels_last neighbouring threads read neighbouring channels, so loads
// coalesce). Gradient: dL/dx[i] = sum of dL/dy over the outputs whose argmax
// is i. Instead of scattering with atomics (non-deterministic when windows
// overlap), one thread per input element gathers from the few outputs whose
// windows can cover it and adds the ones whose saved index points at it, in
// a fixed order, so results are deterministic. Saved for backward: indices.
// Half and bfloat16 accumulate gradients in float. Indices outside the input
// plane match no input element and are ignored (the CPU kernel rejects them).
// A window that covers only padding yields -inf and native's index for it,
// and its gradient reaches no input element (as on the CPU).
#include "ops/max_pool2d.h"

#include "common/cuda_launch.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace handgrad {
namespace max_pool2d {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

// Decomposes a linear element number into (n, c, h, w) for either layout.
struct Layout {
  int64_t C, H, W;
  bool channels_last;

  __device__ void split(int64_t linear, int64_t& n, int64_t& c, int64_t& h, int64_t& w) const {
    if (channels_last) {
      c = linear % C;
      w = (linear / C) % W;
      h = (linear / (C * W)) % H;
      n = linear / (C * W * H);
    } else {
      w = linear % W;
      h = (linear / W) % H;
      c = (linear / (W * H)) % C;
      n = linear / (W * H * C);
    }
  }
  __device__ int64_t offset(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return channels_last ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
  }
};

template <typename T>
__global__ void forward_kernel_impl(const T* __restrict__ in, T* __restrict__ out,
                                    int64_t* __restrict__ idx, Geometry g, int64_t total) {
  using acc_t = at::opmath_type<T>;
  const Layout src{g.channels, g.h.in_size, g.w.in_size, g.channels_last};
  const Layout dst{g.channels, g.h.out_size, g.w.out_size, g.channels_last};
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, oh, ow;
    dst.split(e, n, c, oh, ow);
    int64_t h0, h1, w0, w1;
    window_taps(g.h, oh, h0, h1);
    window_taps(g.w, ow, w0, w1);
    acc_t best = -INFINITY;
    int64_t best_at = empty_window_index(h0, w0, g.w.in_size);
    for (int64_t h = h0; h < h1; h += g.h.dilation) {
      for (int64_t w = w0; w < w1; w += g.w.dilation) {
        const acc_t v = static_cast<acc_t>(in[src.offset(n, c, h, w)]);
        if (replaces_max(v, best)) {
          best = v;
          best_at = h * g.w.in_size + w;
        }
      }
    }
    out[e] = static_cast<T>(best);
    idx[e] = best_at;
  }
}

template <typename T>
__global__ void backward_kernel_impl(const T* __restrict__ grad_out,
                                     const int64_t* __restrict__ idx, T* __restrict__ grad_in,
                                     Geometry g, int64_t total) {
  using acc_t = at::opmath_type<T>;
  const Layout src{g.channels, g.h.in_size, g.w.in_size, g.channels_last};
  const Layout dst{g.channels, g.h.out_size, g.w.out_size, g.channels_last};
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, h, w;
    src.split(e, n, c, h, w);
    int64_t oh0, oh1, ow0, ow1;
    windows_covering(g.h, h, oh0, oh1);
    windows_covering(g.w, w, ow0, ow1);
    const int64_t me = h * g.w.in_size + w;
    acc_t sum = 0;
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      for (int64_t ow = ow0; ow < ow1; ++ow) {
        const int64_t o = dst.offset(n, c, oh, ow);
        // A window of only padding reports an index that may name this
        // element without having read it: it sends no gradient.
        if (idx[o] == me && window_reads_input(g.h, oh) && window_reads_input(g.w, ow)) {
          sum += static_cast<acc_t>(grad_out[o]);
        }
      }
    }
    grad_in[e] = static_cast<T>(sum);
  }
}

void forward_kernel(const at::Tensor& input, at::Tensor& output, at::Tensor& indices,
                    const Geometry& g) {
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = output.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "handgrad::max_pool2d", [&] {
    cuda::launch<forward_kernel_impl<scalar_t>>(
        blocks_for(total), kThreads, 0, stream, input.const_data_ptr<scalar_t>(),
        output.mutable_data_ptr<scalar_t>(), indices.mutable_data_ptr<int64_t>(), g, total);
  });
}

void backward_kernel(const at::Tensor& grad_output, const at::Tensor& indices,
                     at::Tensor& grad_input, const Geometry& g) {
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = grad_input.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "handgrad::max_pool2d_backward", [&] {
    cuda::launch<backward_kernel_impl<scalar_t>>(
        blocks_for(total), kThreads, 0, stream, grad_output.const_data_ptr<scalar_t>(),
        indices.const_data_ptr<int64_t>(), grad_input.mutable_data_ptr<scalar_t>(), g, total);
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cuda(const at::Tensor& input,
                                                   at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride,
                                                   at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, bool ceil_mode) {
  return forward(input, kernel_size, stride, padding, dilation, ceil_mode, &forward_kernel);
}

at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& indices,
                                    at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation) {
  return backward(grad_output, indices, input_size, kernel_size, stride, padding, dilation,
                  &backward_kernel);
}

}  // namespace
}  // namespace max_pool2d
}  // namespace handgrad

TORCH_LIBRARY_IMPL(handgrad, CUDA, m) {
  m.impl("max_pool2d", &handgrad::max_pool2d::max_pool2d_cuda);
  m.impl("max_pool2d_backward", &handgrad::max_pool2d::max_pool2d_backward_cuda);
}
