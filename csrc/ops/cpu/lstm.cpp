// lstm, CPU kernels.
//
// Algorithm: a step's gate matrix, gates = x W_ih^T + h W_hh^T + biases (the
// driver in ops/lstm.cpp runs the products: the AVX-512 kernel of
// common/cpu_gemm.cpp for float32 when the CPU has AVX-512, at::mm
// otherwise; in the layer, one product per step over [h | x | 1] with the
// biases as the last weight row), goes through ONE fused pointwise pass per
// row: add the biases (when not already in the product), sigmoid / sigmoid /
// tanh / sigmoid on the [i | f | g | o] blocks, c' = f c + i g,
// h' = o tanh(c'); the activated gates overwrite the pre-activations and are
// saved for backward (with c and c'; tanh(c') is recomputed).
// Gradient (one fused pass): do = dh tanh(c'), dc' = dh o (1 - tanh^2 c') + dc,
// di = dc' g, df = dc' c, dg = dc' i, dc_prev = dc' f, each then multiplied by
// the activation's derivative (s(1 - s) or 1 - g^2) to give the gradient of
// the pre-activations; that matrix feeds every weight, input and hidden
// gradient through matrix products; the bias gradient is its column sum (the
// cell) or the ones-column row of the weight-gradient product (the layer).
//
// Projection (proj_size): the pointwise pass writes m = o tanh(c') and the
// driver's product h = m W_hr^T follows; backward, dm = dh W_hr feeds the
// same pointwise backward and grad_W_hr = sum_t dh_t^T m_t (derivation in
// ops/lstm.cpp). Packed sequences: each step runs on its own rows only (the
// fused step copies h_t into the next step's operand rows for the sequences
// that continue).
//
// float32 rows run vectorized (lstm_rows.inc: AVX2, or AVX-512 when the CPU
// has it; tanh and sigmoid through e^x); float64 and
// the vector tails use the scalar unit helpers of ops/lstm.h.
// float16 and bfloat16 run in float32 through these same float32 kernels,
// the gates and cell states saved in float32 and each returned value rounded
// once (ops/lstm_float_compute.h). Inside the
// layer's time loop each step is one parallel region: every thread computes
// the product and the pointwise pass of its own batch rows
// (step_forward_cpu / step_backward_cpu); the weight-gradient product of a
// step splits its tiles. Results do not depend on the thread count (each
// element is computed by the same code, in the same order, whatever thread
// runs it; column sums run in a fixed order).
//
// Speed against native (float32, forward+backward; native nn.LSTM is oneDNN's
// fused AVX-512 RNN, torch.lstm_cell an autograd graph of BLAS products and
// pointwise ops), on a shared 2-core AMD EPYC (Zen 5) VM whose other
// processes used 1-2 cores during the measurements, one thread, medians of
// per-run thread CPU time over 60 interleaved runs,
// `PYTHONPATH=python python benchmarks/lstm_thread_time.py` (the layer cases
// of bench_lstm.py; wall clock on the loaded machine swung by 2x between
// runs): layer T28 B128 I28 H128, 1 layer 1.21-1.22x (before this revision
// 1.06-1.09x), 2 layers 1.12-1.13x (before 1.04-1.07x); forward alone ~1.0x
// (1.00-1.03x, one run 0.87x; before 0.87-0.93x), the rest is backward.
// Cells (same method): (64, 28, 128) ~1.7x, (128, 256, 512) ~1.65x. The
// harness, `PYTHONPATH=python python benchmarks/bench_lstm.py --threads 1`
// (wall clock), gave the layer 1.13-1.37x / 1.09-1.17x in its quieter runs
// and single runs as far off as 0.79x / 1.9x when the other load shifted.
// Peak memory of the layer: 36% (1 layer) to 40% (2 layers) of native's.
// Packed (bench_lstm.py --cases packed --threads 1, B64, lengths 5..100, 2
// bidirectional layers, I28 H128; native's packed path is not oneDNN's):
// forward+backward 4.0x / 4.8x native in two runs, forward alone 1.35x /
// 1.38x, backward alone 6.6x (AMD EPYC, 1 thread, load average ~13 on 2
// cores, medians of 15-21 interleaved runs, wall clock).
// On the quiet machine, 2 threads, wall clock (`python benchmarks/run.py
// --threads 2 --reps 15 --max-seconds 6 --modes fwdbwd`): cells 1.63x / 1.87x,
// layer 1.20x (1 layer), 1.13x (2 layers), 1.57x (2 bidirectional layers).
// On an AMD EPYC Zen 4 (AVX-512 on 256-bit units: the own product no faster
// than MKL's AVX2 code; `python benchmarks/compare_cpu_gemm.py --threads 2`):
// cells 1.31x / 1.07x, layer 1.13x / 1.02x -- the cells are their products.
#include "ops/lstm.h"

#include "common/cpu_gemm.h"
#include "common/cpu_gemm_policy.h"
#include "ops/cpu/lstm_rows.h"
#include "ops/lstm_float_compute.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace handgrad {
namespace lstm {
namespace {

// Rows per parallel task: enough elements to amortize the thread handoff.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 4 * H)); }

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Rows [b0, b1): float32 through the vector row kernels (AVX-512 when the
// CPU has it, else the baseline AVX2 build), float64 unit by unit.
// h_copy (row stride ldh): a second destination of h_new, or nullptr.
void forward_rows(const float* bih, const float* bhh, float* g, const float* c, float* cn,
                  float* hn, int64_t b0, int64_t b1, int64_t H, float* h_copy = nullptr,
                  int64_t ldh = 0) {
  (avx512_available() ? avx512::forward_rows : baseline::forward_rows)(g, bih, bhh, c, cn, hn,
                                                                        b0, b1, H, h_copy, ldh);
}

void forward_rows(const double* bih, const double* bhh, double* g, const double* c, double* cn,
                  double* hn, int64_t b0, int64_t b1, int64_t H) {
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t j = 0; j < H; ++j) {
      forward_unit<double, double>(g + b * 4 * H, bih, bhh, c + b * H, cn + b * H, hn + b * H,
                                   H, j);
    }
  }
}

// ldg: the row stride of dg (4H, or more: a padded buffer).
void backward_rows(const float* pa, const float* pb, const float* pc, const float* g,
                   const float* c, const float* cn, float* dg, float* dcp, int64_t b0,
                   int64_t b1, int64_t H, int64_t ldg) {
  (avx512_available() ? avx512::backward_rows : baseline::backward_rows)(
      pa, pb, pc, g, c, cn, dg, dcp, b0, b1, H, ldg);
}

void backward_rows(const double* pa, const double* pb, const double* pc, const double* g,
                   const double* c, const double* cn, double* dg, double* dcp, int64_t b0,
                   int64_t b1, int64_t H, int64_t ldg) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t r = b * H;
    for (int64_t j = 0; j < H; ++j) {
      backward_unit<double, double>(pa ? pa + r : nullptr, pb ? pb + r : nullptr,
                                    pc ? pc + r : nullptr, g + 4 * r, c + r, cn + r, dg + b * ldg,
                                    dcp + r, H, j);
    }
  }
}

void forward_cpu_kernel(at::Tensor& gates, const at::Tensor& b_ih, const at::Tensor& b_hh,
                        const at::Tensor& c_prev, at::Tensor& c_new, at::Tensor& h_new) {
  const int64_t B = gates.size(0), H = gates.size(1) / 4;
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "handgrad::lstm forward (CPU)", [&] {
    scalar_t* g = gates.data_ptr<scalar_t>();
    const scalar_t* bih = ptr_or_null<scalar_t>(b_ih);
    const scalar_t* bhh = ptr_or_null<scalar_t>(b_hh);
    const scalar_t* c = c_prev.data_ptr<scalar_t>();
    scalar_t* cn = c_new.data_ptr<scalar_t>();
    scalar_t* hn = h_new.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      forward_rows(bih, bhh, g, c, cn, hn, b0, b1, H);
    });
  });
}

void backward_cpu_kernel(const at::Tensor& dh_a, const at::Tensor& dh_b, const at::Tensor& dc,
                         const at::Tensor& gates, const at::Tensor& c_prev,
                         const at::Tensor& c_new, at::Tensor& dgates, at::Tensor& dc_prev) {
  const int64_t B = gates.size(0), H = gates.size(1) / 4;
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "handgrad::lstm backward (CPU)", [&] {
    const scalar_t* pa = ptr_or_null<scalar_t>(dh_a);
    const scalar_t* pb = ptr_or_null<scalar_t>(dh_b);
    const scalar_t* pc = ptr_or_null<scalar_t>(dc);
    const scalar_t* g = gates.data_ptr<scalar_t>();
    const scalar_t* c = c_prev.data_ptr<scalar_t>();
    const scalar_t* cn = c_new.data_ptr<scalar_t>();
    scalar_t* dg = dgates.data_ptr<scalar_t>();
    scalar_t* dcp = dc_prev.data_ptr<scalar_t>();
    const int64_t ldg = dgates.stride(0);
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      backward_rows(pa, pb, pc, g, c, cn, dg, dcp, b0, b1, H, ldg);
    });
  });
}

// Column sums in double (float inputs) or double: a fixed summation order,
// independent of the thread count, and little rounding error over long
// sequences.
void column_sum_cpu_kernel(const at::Tensor& m, at::Tensor& out) {
  const int64_t R = m.size(0), C = m.size(1);
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "handgrad::lstm column_sum (CPU)", [&] {
    const scalar_t* p = m.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(64, 65536 / std::max<int64_t>(1, R));
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      std::vector<double> acc(c1 - c0, 0.0);
      for (int64_t r = 0; r < R; ++r) {
        const scalar_t* row = p + r * C + c0;
        for (int64_t j = 0; j < c1 - c0; ++j) acc[j] += static_cast<double>(row[j]);
      }
      for (int64_t j = 0; j < c1 - c0; ++j) o[c0 + j] = static_cast<scalar_t>(acc[j]);
    });
  });
}

// Whether the own kernel runs c (+)= a w for a weight w packed once
// (common/cpu_gemm_policy.h measures it against BLAS per class).
bool own_packed(int64_t rows, const cpu_gemm::PackedB& w) {
  cpu_gemm::Problem p;
  p.m = rows;
  p.n = w.N;
  p.k = w.K;
  p.site = cpu_gemm::Site::packed_b;
  return cpu_gemm::choose(p) == cpu_gemm::Kernel::own;
}

// float32 products go to the AVX-512 kernel of common/cpu_gemm.cpp when the
// CPU has AVX-512 and the measured policy chose it; everything else falls
// back to at::mm in the driver.
bool matmul_cpu(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                const void* packed) {
  if (packed == nullptr) {
    if (c.scalar_type() != at::kFloat || !cpu_gemm::available() || a.dim() != 2 ||
        b.dim() != 2 ||
        cpu_gemm::choose(cpu_gemm::problem_of(c, a, b, cpu_gemm::Site::tensor, false)) !=
            cpu_gemm::Kernel::own) {
      return false;
    }
    // B used once and already row-major (the per-step gate gradient of the
    // layer's weight-gradient products, whose rows the driver pads): read in
    // place instead of packed, unless its rows are a multiple of 512 bytes
    // apart (they would share a few cache sets).
    if (c.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
        b.scalar_type() == at::kFloat && cpu_gemm::available() && c.dim() == 2 &&
        a.dim() == 2 && b.dim() == 2 && c.stride(1) == 1 && b.stride(1) == 1 &&
        b.stride(0) >= b.size(1) && b.stride(0) % 128 != 0) {
      cpu_gemm::matmul_direct_b(a.size(0), b.size(1), a.size(1), a.const_data_ptr<float>(),
                                a.stride(0), a.stride(1), b.const_data_ptr<float>(), b.stride(0),
                                c.mutable_data_ptr<float>(), c.stride(0), accumulate);
      return true;
    }
    return cpu_gemm::mm(c, a, b, accumulate);
  }
  if (c.scalar_type() != at::kFloat || !cpu_gemm::available() || c.dim() != 2 ||
      (c.stride(1) != 1 && c.size(1) > 1) ||
      !own_packed(a.size(0), *static_cast<const cpu_gemm::PackedB*>(packed))) {
    return false;
  }
  cpu_gemm::matmul(a.size(0), a.data_ptr<float>(), a.stride(0), a.stride(1),
                   *static_cast<const cpu_gemm::PackedB*>(packed), c.data_ptr<float>(),
                   c.stride(0), accumulate);
  return true;
}

std::shared_ptr<const void> pack_cpu(const at::Tensor& b) {
  if (b.scalar_type() != at::kFloat || !cpu_gemm::available()) return nullptr;
  auto packed = std::make_shared<cpu_gemm::PackedB>();
  cpu_gemm::pack_b(b.data_ptr<float>(), b.stride(0), b.stride(1), b.size(0), b.size(1), *packed);
  return packed;
}

// One parallel region per time step: each thread runs the product and the
// pointwise pass on its own rows (row b of the gates needs only row b of h),
// so no barrier separates them and the rows are still in cache.
bool step_forward_cpu(at::Tensor& gates, const at::Tensor& a, const void* w_packed,
                      bool accumulate, const at::Tensor& b_ih, const at::Tensor& b_hh,
                      const at::Tensor& c_prev, at::Tensor& c_new, at::Tensor& h_new,
                      at::Tensor& h_copy) {
  if (gates.scalar_type() != at::kFloat || w_packed == nullptr || a.stride(1) != 1) return false;
  const auto& w = *static_cast<const cpu_gemm::PackedB*>(w_packed);
  const int64_t B = gates.size(0), H = gates.size(1) / 4;
  if (!own_packed(B, w)) return false;
  float* g = gates.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const int64_t lda = a.stride(0);
  float* hc = h_copy.defined() ? h_copy.data_ptr<float>() : nullptr;
  const int64_t ldh = h_copy.defined() ? h_copy.stride(0) : 0;
  const float* bih = ptr_or_null<float>(b_ih);
  const float* bhh = ptr_or_null<float>(b_hh);
  const float* c = c_prev.data_ptr<float>();
  float* cn = c_new.data_ptr<float>();
  float* hn = h_new.data_ptr<float>();
  // h_copy may have fewer rows than the step (in a packed batch the next
  // step continues only the first sequences): rows past it are not copied.
  const int64_t copied = h_copy.defined() ? h_copy.size(0) : 0;
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    cpu_gemm::matmul_serial(b1 - b0, ap + b0 * lda, lda, w, g + b0 * 4 * H, 4 * H, accumulate);
    const int64_t split = std::clamp(copied, b0, b1);
    if (split > b0) forward_rows(bih, bhh, g, c, cn, hn, b0, split, H, hc, ldh);
    if (b1 > split) forward_rows(bih, bhh, g, c, cn, hn, split, b1, H);
  });
  return true;
}

// The backward step in one parallel region: pointwise backward of a thread's
// rows, then their rows of dh_prev = dgates W_hh and grad_x = dgates W_ih.
bool step_backward_cpu(const at::Tensor& dh_a, const at::Tensor& dh_b, const at::Tensor& dc,
                       const at::Tensor& gates, const at::Tensor& c_prev,
                       const at::Tensor& c_new, at::Tensor& dgates, at::Tensor& dc_prev,
                       const void* w_hh_packed, at::Tensor& dh_prev, const void* w_ih_packed,
                       at::Tensor& grad_x) {
  if (gates.scalar_type() != at::kFloat || w_hh_packed == nullptr ||
      (grad_x.defined() && w_ih_packed == nullptr)) {
    return false;
  }
  const auto& w_hh = *static_cast<const cpu_gemm::PackedB*>(w_hh_packed);
  const auto* w_ih = static_cast<const cpu_gemm::PackedB*>(w_ih_packed);
  const int64_t B = gates.size(0), H = gates.size(1) / 4;
  if (!own_packed(B, w_hh) || (w_ih != nullptr && !own_packed(B, *w_ih))) return false;
  const float* pa = ptr_or_null<float>(dh_a);
  const float* pb = ptr_or_null<float>(dh_b);
  const float* pc = ptr_or_null<float>(dc);
  const float* g = gates.data_ptr<float>();
  const float* c = c_prev.data_ptr<float>();
  const float* cn = c_new.data_ptr<float>();
  float* dg = dgates.data_ptr<float>();
  float* dcp = dc_prev.data_ptr<float>();
  float* dh = dh_prev.data_ptr<float>();
  float* gx = grad_x.defined() ? grad_x.data_ptr<float>() : nullptr;
  const int64_t ldg = dgates.stride(0);
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    // Reads rows b0..b1 of dh_b before the product below overwrites them.
    backward_rows(pa, pb, pc, g, c, cn, dg, dcp, b0, b1, H, ldg);
    // dh_prev has w_hh's width: H, or the projection size.
    cpu_gemm::matmul_serial(b1 - b0, dg + b0 * ldg, ldg, w_hh, dh + b0 * w_hh.N, w_hh.N, false);
    if (gx) {
      cpu_gemm::matmul_serial(b1 - b0, dg + b0 * ldg, ldg, *w_ih, gx + b0 * w_ih->N, w_ih->N,
                              false);
    }
  });
  return true;
}

const Kernels kCpuKernels{&forward_cpu_kernel, &backward_cpu_kernel, &column_sum_cpu_kernel,
                          &matmul_cpu,         &pack_cpu,            &step_forward_cpu,
                          &step_backward_cpu};

// float16 / bfloat16 run through the float32 kernels (ops/lstm_float_compute.h);
// other floating types are named here, non-floating ones by the driver.
void check_cpu(const at::Tensor& t, const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                       float_compute::applies(t) || !at::isFloatingType(t.scalar_type()),
                   op, ": the CPU kernels support float32, float64, float16 and bfloat16, but got ",
                   t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_cpu(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh) {
  check_cpu(input, "handgrad::lstm_cell");
  if (float_compute::applies(input)) {
    return float_compute::cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, kCpuKernels);
  }
  return cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward_cpu(const c10::optional<at::Tensor>& grad_hy,
                       const c10::optional<at::Tensor>& grad_cy, const at::Tensor& gates,
                       const at::Tensor& cx, const at::Tensor& cy, const at::Tensor& input,
                       const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh) {
  check_cpu(input, "handgrad::lstm_cell_backward");
  if (float_compute::applies(input)) {
    return float_compute::cell_backward(grad_hy, grad_cy, gates, cx, cy, input, hx, w_ih, w_hh,
                                        kCpuKernels);
  }
  return cell_backward(grad_hy, grad_cy, gates, cx, cy, input, hx, w_ih, w_hh, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse, const c10::optional<at::Tensor>& w_hr,
    c10::OptionalIntArrayRef batch_sizes) {
  check_cpu(input, "handgrad::lstm_layer");
  if (float_compute::applies(input)) {
    return float_compute::layer_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, w_hr,
                                        batch_sizes, kCpuKernels);
  }
  return layer_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, w_hr, batch_sizes,
                       kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cpu(const c10::optional<at::Tensor>& grad_output,
                        const c10::optional<at::Tensor>& grad_hT,
                        const c10::optional<at::Tensor>& grad_cT, const at::Tensor& input,
                        const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                        const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& gates,
                        const at::Tensor& cells, bool reverse, bool input_grad,
    const c10::optional<at::Tensor>& w_hr, c10::OptionalIntArrayRef batch_sizes) {
  check_cpu(input, "handgrad::lstm_layer_backward");
  if (float_compute::applies(input)) {
    return float_compute::layer_backward(grad_output, grad_hT, grad_cT, input, h0, c0, w_ih,
                                         w_hh, output, gates, cells, reverse, input_grad, w_hr,
                                         batch_sizes, kCpuKernels);
  }
  return layer_backward(grad_output, grad_hT, grad_cT, input, h0, c0, w_ih, w_hh, output, gates,
                        cells, reverse, input_grad, w_hr, batch_sizes, kCpuKernels);
}

}  // namespace
}  // namespace lstm
}  // namespace handgrad

TORCH_LIBRARY_IMPL(handgrad, CPU, m) {
  m.impl("lstm_cell", &handgrad::lstm::lstm_cell_cpu);
  m.impl("lstm_cell_backward", &handgrad::lstm::lstm_cell_backward_cpu);
  m.impl("lstm_layer", &handgrad::lstm::lstm_layer_cpu);
  m.impl("lstm_layer_backward", &handgrad::lstm::lstm_layer_backward_cpu);
}
