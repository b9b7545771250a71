// lstm, CPU kernels.
//
// Algorithm: the gate matrix of a step, gates = x W_ih^T + h W_hh^T (computed
// by the driver in ops/lstm.cpp with at::mm / at::addmm_, i.e. BLAS), goes
// through ONE fused pointwise pass per row: add both biases, sigmoid / tanh /
// sigmoid / sigmoid on the [i | f | g | o] blocks, c' = f c + i g,
// h' = o tanh(c'); the activated gates overwrite the pre-activations and are
// saved for backward (with c and c'; tanh(c') is recomputed).
// Gradient (one fused pass): do = dh tanh(c'), dc' = dh o (1 - tanh^2 c') + dc,
// di = dc' g, df = dc' c, dg = dc' i, dc_prev = dc' f, each then multiplied by
// the activation's derivative (s(1 - s) or 1 - g^2) to give the gradient of
// the pre-activations; that matrix feeds every weight, input and hidden
// gradient through matrix products, and its column sum is the bias gradient.
//
// float32 uses AVX2: sigmoid(x) = 1 / (1 + e^-x) and tanh(x) = 2 sigmoid(2x) - 1
// with the shared vector exp (common/cpu_simd.h); tanh of small |x| uses its
// Taylor series to keep the relative error small. float64 (and the vector
// tails) use the scalar helpers of ops/lstm.h. Threads split the batch rows;
// results do not depend on the thread count (each element is computed by the
// same code whatever thread runs it, and column sums run in a fixed order).
//
// Speed against native (benchmarks/bench_lstm.py, 2 threads, float32,
// forward+backward): see the end of this comment block after benchmarking.
#include "ops/lstm.h"

#include "common/cpu_simd.h"
#include "ops/cpu/lstm_gemm.h"

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

#if HG_HAVE_AVX2
// 1 / d for d >= 1: the 12-bit estimate and one Newton step (relative error
// ~1e-7, like a division, at a fraction of its cost). d is capped at 1e30 so
// that +inf gives 1e-30 rather than inf * 0 = NaN in the Newton step (NaN
// stays NaN: min returns its second operand when one is NaN).
inline __m256 vrecip(__m256 d) {
  d = _mm256_min_ps(_mm256_set1_ps(1e30f), d);
  const __m256 r = _mm256_rcp_ps(d);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
}

inline __m256 vsigmoid(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return vrecip(_mm256_add_ps(one, simd::exp(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

inline __m256 vtanh(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 two = _mm256_set1_ps(2.0f);
  // 2 / (1 + e^(-2x)) - 1, exact at the saturated ends (rcp(inf) = 0).
  const __m256 e = simd::exp(_mm256_mul_ps(_mm256_set1_ps(-2.0f), x));
  const __m256 big = _mm256_fmsub_ps(two, vrecip(_mm256_add_ps(one, e)), one);
  // x (1 - x^2/3 + 2x^4/15 - 17x^6/315) for |x| < 1/16 (error below 1e-11 relative).
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-17.0f / 315.0f);
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.0f / 15.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.0f / 3.0f));
  p = _mm256_fmadd_ps(p, x2, one);
  const __m256 small = _mm256_mul_ps(p, x);
  const __m256 abs_x = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  return _mm256_blendv_ps(big, small, _mm256_cmp_ps(abs_x, _mm256_set1_ps(0.0625f), _CMP_LT_OQ));
}

inline __m256 load_or_zero(const float* p, int64_t j) {
  return p ? _mm256_loadu_ps(p + j) : _mm256_setzero_ps();
}
#endif

template <typename T>
void forward_row(T* g, const T* bih, const T* bhh, const T* c, T* c_new, T* h_new, int64_t H) {
  int64_t j = 0;
#if HG_HAVE_AVX2
  if constexpr (std::is_same<T, float>::value) {
    for (; j + simd::kFloatLanes <= H; j += simd::kFloatLanes) {
      __m256 pre[4];
      for (int q = 0; q < 4; ++q) {
        pre[q] = _mm256_loadu_ps(g + q * H + j);
        if (bih) pre[q] = _mm256_add_ps(pre[q], _mm256_loadu_ps(bih + q * H + j));
        if (bhh) pre[q] = _mm256_add_ps(pre[q], _mm256_loadu_ps(bhh + q * H + j));
      }
      const __m256 i = vsigmoid(pre[0]), f = vsigmoid(pre[1]), gg = vtanh(pre[2]),
                   o = vsigmoid(pre[3]);
      const __m256 cn = _mm256_fmadd_ps(f, _mm256_loadu_ps(c + j), _mm256_mul_ps(i, gg));
      _mm256_storeu_ps(c_new + j, cn);
      _mm256_storeu_ps(h_new + j, _mm256_mul_ps(o, vtanh(cn)));
      _mm256_storeu_ps(g + j, i);
      _mm256_storeu_ps(g + H + j, f);
      _mm256_storeu_ps(g + 2 * H + j, gg);
      _mm256_storeu_ps(g + 3 * H + j, o);
    }
  }
#endif
  for (; j < H; ++j) {
    T pre[4];
    for (int q = 0; q < 4; ++q) {
      pre[q] = g[q * H + j] + (bih ? bih[q * H + j] : T(0)) + (bhh ? bhh[q * H + j] : T(0));
    }
    cell_forward(pre[0], pre[1], pre[2], pre[3], c[j], c_new[j], h_new[j]);
    for (int q = 0; q < 4; ++q) g[q * H + j] = pre[q];
  }
}

template <typename T>
void backward_row(const T* dh_a, const T* dh_b, const T* dc, const T* g, const T* c,
                  const T* c_new, T* dg, T* dc_prev, int64_t H) {
  int64_t j = 0;
#if HG_HAVE_AVX2
  if constexpr (std::is_same<T, float>::value) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; j + simd::kFloatLanes <= H; j += simd::kFloatLanes) {
      const __m256 dh = _mm256_add_ps(load_or_zero(dh_a, j), load_or_zero(dh_b, j));
      const __m256 i = _mm256_loadu_ps(g + j), f = _mm256_loadu_ps(g + H + j),
                   gg = _mm256_loadu_ps(g + 2 * H + j), o = _mm256_loadu_ps(g + 3 * H + j);
      const __m256 tc = vtanh(_mm256_loadu_ps(c_new + j));
      const __m256 dho = _mm256_mul_ps(dh, o);
      // dc' = dh o (1 - tc^2) + dc
      const __m256 dct = _mm256_fmadd_ps(dho, _mm256_fnmadd_ps(tc, tc, one), load_or_zero(dc, j));
      const __m256 di = _mm256_mul_ps(_mm256_mul_ps(dct, gg), _mm256_mul_ps(i, _mm256_sub_ps(one, i)));
      const __m256 df = _mm256_mul_ps(_mm256_mul_ps(dct, _mm256_loadu_ps(c + j)),
                                      _mm256_mul_ps(f, _mm256_sub_ps(one, f)));
      const __m256 dgg = _mm256_mul_ps(_mm256_mul_ps(dct, i), _mm256_fnmadd_ps(gg, gg, one));
      const __m256 dout = _mm256_mul_ps(_mm256_mul_ps(dh, tc), _mm256_mul_ps(o, _mm256_sub_ps(one, o)));
      _mm256_storeu_ps(dc_prev + j, _mm256_mul_ps(dct, f));
      _mm256_storeu_ps(dg + j, di);
      _mm256_storeu_ps(dg + H + j, df);
      _mm256_storeu_ps(dg + 2 * H + j, dgg);
      _mm256_storeu_ps(dg + 3 * H + j, dout);
    }
  }
#endif
  for (; j < H; ++j) {
    const T dh = (dh_a ? dh_a[j] : T(0)) + (dh_b ? dh_b[j] : T(0));
    const T dcj = dc ? dc[j] : T(0);
    dc_prev[j] = cell_backward(dh, dcj, g[j], g[H + j], g[2 * H + j], g[3 * H + j], c[j],
                               tanh_(c_new[j]), dg[j], dg[H + j], dg[2 * H + j], dg[3 * H + j]);
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
      for (int64_t b = b0; b < b1; ++b) {
        forward_row(g + b * 4 * H, bih, bhh, c + b * H, cn + b * H, hn + b * H, H);
      }
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
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r = b * H;
        backward_row(pa ? pa + r : nullptr, pb ? pb + r : nullptr, pc ? pc + r : nullptr,
                     g + 4 * r, c + r, cn + r, dg + 4 * r, dcp + r, H);
      }
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

// float32 products go to the AVX-512 kernel of lstm_gemm.cpp when the CPU
// has AVX-512; everything else falls back to at::mm in the driver.
bool matmul_cpu(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                const void* packed) {
  if (c.scalar_type() != at::kFloat || !gemm::available() || c.dim() != 2 ||
      (c.stride(1) != 1 && c.size(1) > 1)) {
    return false;
  }
  float* out = c.data_ptr<float>();
  const float* pa = a.data_ptr<float>();
  if (packed != nullptr) {
    gemm::matmul(a.size(0), pa, a.stride(0), a.stride(1),
                 *static_cast<const gemm::PackedB*>(packed), out, c.stride(0), accumulate);
  } else {
    gemm::matmul(a.size(0), b.size(1), a.size(1), pa, a.stride(0), a.stride(1),
                 b.data_ptr<float>(), b.stride(0), b.stride(1), out, c.stride(0), accumulate);
  }
  return true;
}

std::shared_ptr<const void> pack_cpu(const at::Tensor& b) {
  if (b.scalar_type() != at::kFloat || !gemm::available()) return nullptr;
  auto packed = std::make_shared<gemm::PackedB>();
  gemm::pack_b(b.data_ptr<float>(), b.stride(0), b.stride(1), b.size(0), b.size(1), *packed);
  return packed;
}

const Kernels kCpuKernels{&forward_cpu_kernel, &backward_cpu_kernel, &column_sum_cpu_kernel,
                          &matmul_cpu, &pack_cpu};

void check_cpu(const at::Tensor& t, const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                       !at::isFloatingType(t.scalar_type()),
              op, ": the CPU kernels support float32 and float64, but got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_cpu(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh) {
  check_cpu(input, "handgrad::lstm_cell");
  return cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward_cpu(const c10::optional<at::Tensor>& grad_hy,
                       const c10::optional<at::Tensor>& grad_cy, const at::Tensor& gates,
                       const at::Tensor& cx, const at::Tensor& cy, const at::Tensor& input,
                       const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh) {
  check_cpu(input, "handgrad::lstm_cell_backward");
  return cell_backward(grad_hy, grad_cy, gates, cx, cy, input, hx, w_ih, w_hh, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse) {
  check_cpu(input, "handgrad::lstm_layer");
  return layer_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cpu(const c10::optional<at::Tensor>& grad_output,
                        const c10::optional<at::Tensor>& grad_hT,
                        const c10::optional<at::Tensor>& grad_cT, const at::Tensor& input,
                        const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                        const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& gates,
                        const at::Tensor& cells, bool reverse, bool input_grad) {
  check_cpu(input, "handgrad::lstm_layer_backward");
  return layer_backward(grad_output, grad_hT, grad_cT, input, h0, c0, w_ih, w_hh, output, gates,
                        cells, reverse, input_grad, kCpuKernels);
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
