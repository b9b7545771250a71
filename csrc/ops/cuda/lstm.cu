// lstm, CUDA kernels.
//
// Algorithm: the driver (ops/lstm.cpp) computes each step's gate matrix with
// at::mm / at::addmm_ (plain matrix products, allowed by the project rules)
// and calls one fused pointwise kernel per step: one thread per (row, hidden
// unit) adds both biases, applies sigmoid / tanh / sigmoid / sigmoid to the
// [i | f | g | o] pre-activations, writes c' = f c + i g, h' = o tanh(c') and
// overwrites the pre-activations with the activated gates (saved for
// backward, with c and c'). Gradient (one fused kernel): do = dh tanh(c'),
// dc' = dh o (1 - tanh^2 c') + dc, di = dc' g, df = dc' c, dg = dc' i,
// dc_prev = dc' f, times the activation derivatives, giving the gate-gradient
// matrix; the bias gradient is its column sum (one thread per column, rows
// in a fixed order: deterministic). The scalar math is the HG_HOST_DEVICE
// code of ops/lstm.h, shared with the CPU kernels. float16 / bfloat16 compute
// in float32; float64 in float64.
//
// Projection (proj_size) and packed sequences run in the shared driver
// (ops/lstm.cpp, where the projection's gradient is derived): h = W_hr m with
// m = o tanh(c') written by the forward kernel, and dm = dh W_hr fed to the
// backward kernel; a packed step launches on its own rows only. Verified
// through the host CUDA emulation build (tests/test_lstm_packed.py).
//
// Speed: not measured: no GPU here.
#include "ops/lstm.h"

#include "common/cuda_launch.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace handgrad {
namespace lstm {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads,
                                                                 65535 * 8)));
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
__global__ void forward_kernel(T* __restrict__ gates, const T* __restrict__ b_ih,
                               const T* __restrict__ b_hh, const T* __restrict__ c_prev,
                               T* __restrict__ c_new, T* __restrict__ h_new, int64_t B,
                               int64_t H) {
  const int64_t total = B * H;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = k / H, j = k % H;
    forward_unit<T, at::opmath_type<T>>(gates + b * 4 * H, b_ih, b_hh, c_prev + b * H,
                                        c_new + b * H, h_new + b * H, H, j);
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ dh_a, const T* __restrict__ dh_b,
                                const T* dc, const T* __restrict__ gates,
                                const T* __restrict__ c_prev, const T* __restrict__ c_new,
                                T* __restrict__ dgates, T* dc_prev, int64_t B, int64_t H) {
  const int64_t total = B * H;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = k / H, j = k % H, r = b * H;
    // dc_prev may alias dc: backward_unit reads dc[j] before writing dc_prev[j].
    backward_unit<T, at::opmath_type<T>>(dh_a ? dh_a + r : nullptr, dh_b ? dh_b + r : nullptr,
                                         dc ? dc + r : nullptr, gates + 4 * r, c_prev + r,
                                         c_new + r, dgates + 4 * r, dc_prev + r, H, j);
  }
}

template <typename T>
__global__ void column_sum_kernel(const T* __restrict__ m, T* __restrict__ out, int64_t R,
                                  int64_t C) {
  using acc_t = at::opmath_type<T>;
  for (int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; col < C;
       col += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    acc_t acc = 0;
    for (int64_t r = 0; r < R; ++r) acc += static_cast<acc_t>(m[r * C + col]);
    out[col] = static_cast<T>(acc);
  }
}

void forward_cuda_kernel(at::Tensor& gates, const at::Tensor& b_ih, const at::Tensor& b_hh,
                         const at::Tensor& c_prev, at::Tensor& c_new, at::Tensor& h_new) {
  const int64_t B = gates.size(0), H = gates.size(1) / 4;
  const c10::cuda::CUDAGuard guard(gates.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(),
                                  "handgrad::lstm forward (CUDA)", [&] {
    cuda::launch<forward_kernel<scalar_t>>(
        blocks_for(B * H), kThreads, 0, stream, gates.data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(b_ih), ptr_or_null<scalar_t>(b_hh), c_prev.data_ptr<scalar_t>(),
        c_new.data_ptr<scalar_t>(), h_new.data_ptr<scalar_t>(), B, H);
  });
}

void backward_cuda_kernel(const at::Tensor& dh_a, const at::Tensor& dh_b, const at::Tensor& dc,
                          const at::Tensor& gates, const at::Tensor& c_prev,
                          const at::Tensor& c_new, at::Tensor& dgates, at::Tensor& dc_prev) {
  const int64_t B = gates.size(0), H = gates.size(1) / 4;
  const c10::cuda::CUDAGuard guard(gates.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(),
                                  "handgrad::lstm backward (CUDA)", [&] {
    cuda::launch<backward_kernel<scalar_t>>(
        blocks_for(B * H), kThreads, 0, stream, ptr_or_null<scalar_t>(dh_a),
        ptr_or_null<scalar_t>(dh_b), ptr_or_null<scalar_t>(dc), gates.data_ptr<scalar_t>(),
        c_prev.data_ptr<scalar_t>(), c_new.data_ptr<scalar_t>(), dgates.data_ptr<scalar_t>(),
        dc_prev.data_ptr<scalar_t>(), B, H);
  });
}

void column_sum_cuda_kernel(const at::Tensor& m, at::Tensor& out) {
  const int64_t R = m.size(0), C = m.size(1);
  const c10::cuda::CUDAGuard guard(m.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(),
                                  "handgrad::lstm column_sum (CUDA)", [&] {
    cuda::launch<column_sum_kernel<scalar_t>>(blocks_for(C), kThreads, 0, stream,
                                              m.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                              R, C);
  });
}

// Matrix products: at::mm / addmm_ in the driver (no hooks).
const Kernels kCudaKernels{&forward_cuda_kernel, &backward_cuda_kernel, &column_sum_cuda_kernel,
                           nullptr, nullptr, nullptr, nullptr};

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_cuda(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh) {
  const c10::cuda::CUDAGuard guard(input.device());
  return cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward_cuda(const c10::optional<at::Tensor>& grad_hy,
                        const c10::optional<at::Tensor>& grad_cy, const at::Tensor& gates,
                        const at::Tensor& cx, const at::Tensor& cy, const at::Tensor& input,
                        const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh) {
  const c10::cuda::CUDAGuard guard(input.device());
  return cell_backward(grad_hy, grad_cy, gates, cx, cy, input, hx, w_ih, w_hh, kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_cuda(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse, const c10::optional<at::Tensor>& w_hr,
    c10::OptionalIntArrayRef batch_sizes) {
  const c10::cuda::CUDAGuard guard(input.device());
  return layer_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, w_hr, batch_sizes,
                       kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cuda(const c10::optional<at::Tensor>& grad_output,
                         const c10::optional<at::Tensor>& grad_hT,
                         const c10::optional<at::Tensor>& grad_cT, const at::Tensor& input,
                         const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                         const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& gates,
                         const at::Tensor& cells, bool reverse, bool input_grad,
    const c10::optional<at::Tensor>& w_hr, c10::OptionalIntArrayRef batch_sizes) {
  const c10::cuda::CUDAGuard guard(input.device());
  return layer_backward(grad_output, grad_hT, grad_cT, input, h0, c0, w_ih, w_hh, output, gates,
                        cells, reverse, input_grad, w_hr, batch_sizes, kCudaKernels);
}

}  // namespace
}  // namespace lstm
}  // namespace handgrad

TORCH_LIBRARY_IMPL(handgrad, CUDA, m) {
  m.impl("lstm_cell", &handgrad::lstm::lstm_cell_cuda);
  m.impl("lstm_cell_backward", &handgrad::lstm::lstm_cell_backward_cuda);
  m.impl("lstm_layer", &handgrad::lstm::lstm_layer_cuda);
  m.impl("lstm_layer_backward", &handgrad::lstm::lstm_layer_backward_cuda);
}
