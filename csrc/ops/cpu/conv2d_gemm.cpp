// conv2d CPU, the matrix-product algorithm (large channel counts).
//
// Algorithm: im2col / col2im in chunks of images, with one matrix product
// each for forward, grad_input and grad_weight: float32 on a CPU with
// AVX-512 runs the project's AVX-512 product (common/cpu_gemm.h: the BLAS
// behind at::mm runs AVX2 code on AMD, native conv2d oneDNN's AVX-512), every
// other case at::mm / at::addmm (BLAS; here and at::bmm in
// cpu/conv2d_winograd.cpp are the only BLAS calls of conv2d). For a
// chunk of images and a group, the column matrix col[(ci, kh, kw)][(image,
// oh, ow)] holds the input value every tap of every output pixel reads (zero
// in the padding); it is rebuilt per chunk (a few MB, cache-resident) instead
// of being kept for backward, so nothing but the input and weight is saved.
//   forward      out[co][pixel] = W[co][(ci,kh,kw)] . col                (+ bias)
//   grad_weight  dW[co][(ci,kh,kw)] += dOut[co][pixel] . col^T
//   grad_input   dcol = W^T . dOut, then col2im adds every dcol entry read
//                inside the input back onto the position it was read from
// Gradients: out = W col is linear in W and col, so dW = dOut col^T and
// dcol = W^T dOut; col2im is the adjoint of the gather im2col did.
// im2col reads the activations directly (each tap's rows and columns inside
// the input, zero elsewhere) and col2im adds straight into dx: no padded
// copy of the images exists, so scratch memory is the column matrix however
// large the padding or stride. Special values follow native conv2d exactly:
// forward and grad_weight multiply the padding's zeros like native (a NaN
// weight makes its whole output channel NaN), and grad_input sums only the
// (output, tap) pairs that read an input position, so a non-finite weight
// reaches only the inputs it touches (the CPU backend routes such weights
// here; see cpu/conv2d.cpp).
// float32 with the AVX-512 product (cpu_gemm::available()):
//  * grad_weight packs its B operand (col^T, or dOut^T) with
//    cpu_gemm::pack_b_transposed (16x16 register transposes) instead of the
//    product's strided scalar walk; when the output channels fill the
//    product's 32-column panels (within 1/16) it builds dW^T = col . dOut^T
//    instead, so col is read in place and only dOut is packed.
//  * col2im, when a padded row fits one 16-float vector (unit w stride and
//    dilation), sums each input row in a register (masked loads of the dcol
//    runs shifted by kw) and stores it straight into dx; otherwise it adds
//    runs into dx's zeroed planes with kw outermost (consecutive runs
//    overlapping at an offset made the stores fail to forward, ~3x slower).
// Threads split the chunks (each product runs single-threaded inside the
// parallel region: nested at::parallel_for runs inline). Deterministic: the weight gradient sums chunks in 4 fixed
// slots, each in order, then adds the slots in order; col2im gives each input
// plane to one chunk.
// The backend (cpu/conv2d.cpp) hands this path activations whose rows are
// dense (NCHW copies of other layouts); through their strides otherwise.
//
// Speed, AMD EPYC Zen 5, 1 thread, native/handgrad (a shared 2-core machine:
// ranges are separate runs of the same code):
//   python benchmarks/bench_conv2d.py --threads 1 --reps 10 --max-seconds 5
//     --modes fwdbwd --no-save --cases "(128, 40, 12"
//   (128,40,12,12)->80 k5 forward+backward 0.96x, 1.04x, 0.99x (was 0.90x)
//   PYTHONPATH=python python benchmarks/conv2d_parts.py 1 2
//   forward 0.98-0.99x, grad_input 1.05-1.08x (was 0.98x; col2im by rows),
//   grad_weight 1.04-1.05x (was 0.83-0.88x; pack_b_transposed).
// (128,64,16,16)->128 k3 p1 now takes the Winograd path (see
// cpu/conv2d_winograd.cpp); on this path it had measured forward 0.99x,
// grad_input 0.89x, grad_weight 0.93x with the transposed weight gradient
// (0.75x before it). With at::mm (MKL's AVX2 code) these layers ran ~0.56x.
#include "ops/cpu/conv2d_cpu.h"

#include "common/cpu_gemm.h"
#include "common/cpu_gemm_policy.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/addmm.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <cstring>
#include <vector>

namespace handgrad {
namespace conv2d {
namespace cpu {
namespace gemm {
namespace {

// Columns of one chunk: enough for the matrix product to run at speed, and a
// column matrix small enough to stay in the last-level cache.
constexpr int64_t kTargetColumns = 256;
constexpr int64_t kMaxColumnBytes = 4 << 20;
// The weight gradient is summed in this many fixed slots (then added in
// order), so it does not depend on the number of threads.
constexpr int64_t kWeightSlots = 4;

int64_t chunk_images(const Geometry& g, int64_t element_bytes) {
  const int64_t pixels = std::max<int64_t>(1, g.h.out_size * g.w.out_size);
  const int64_t by_columns = std::max<int64_t>(1, kTargetColumns / pixels);
  const int64_t by_bytes =
      std::max<int64_t>(1, kMaxColumnBytes / std::max<int64_t>(1, g.patch() * pixels * element_bytes));
  return std::max<int64_t>(1, std::min({g.batch, by_columns, by_bytes}));
}

struct Chunk {
  int64_t first_image;
  int64_t images;
  int64_t pixels;  // per image
  int64_t columns() const { return images * pixels; }
};

template <typename T>
void copy_run(T* dst, const T* src, int64_t n) {
  using S = Simd<T>;
  int64_t i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) S::store(dst + i, S::load(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

template <typename T>
void add_run(T* dst, const T* src, int64_t n) {
  using S = Simd<T>;
  int64_t i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) {
    S::store(dst + i, S::add(S::load(dst + i), S::load(src + i)));
  }
  for (; i < n; ++i) dst[i] += src[i];
}

// For tap kh (rows) and kw (columns): the output rows [h_begin, h_end) and
// columns [w_begin, w_end) whose reads fall inside the input, and the input
// row / column the first of them reads. Outside those ranges the tap reads
// padding, which im2col stores as zero and col2im drops: no padded copy of
// the images is made, so the scratch is bounded by the column matrix
// whatever the padding.
struct TapWindow {
  int64_t h_begin, h_end, w_begin, w_end;
  int64_t first_ih, first_iw;
};

TapWindow tap_window(const Geometry& g, int64_t kh, int64_t kw) {
  TapWindow t;
  positions_inside(g.h, kh, t.h_begin, t.h_end);
  positions_inside(g.w, kw, t.w_begin, t.w_end);
  t.first_ih = input_pos(g.h, t.h_begin, kh);
  t.first_iw = input_pos(g.w, t.w_begin, kw);
  return t;
}

// col[r][i * pixels + oh * OW + ow] for patch row r = (ci, kh, kw): the input
// value at (oh * stride + kh * dilation - pad, ...), zero in the padding.
template <typename T>
void im2col(const View4<T>& x, const Chunk& chunk, int64_t group, const Geometry& g, T* col) {
  const int64_t OW = g.w.out_size, OH = g.h.out_size;
  const int64_t KH = g.h.kernel, KW = g.w.kernel;
  const int64_t cols = chunk.columns(), sh = g.h.stride, sw = g.w.stride;
  for (int64_t r = 0; r < g.patch(); ++r) {
    const int64_t ci = r / (KH * KW), kh = (r / KW) % KH, kw = r % KW;
    const TapWindow t = tap_window(g, kh, kw);
    const int64_t inside = t.w_end - t.w_begin;
    for (int64_t i = 0; i < chunk.images; ++i) {
      const T* plane = x.plane(chunk.first_image + i, group * g.in_per_group() + ci);
      T* dst = col + r * cols + i * chunk.pixels;
      std::fill(dst, dst + t.h_begin * OW, T(0));
      for (int64_t oh = t.h_begin; oh < t.h_end; ++oh) {
        T* out = dst + oh * OW;
        const T* row = plane + (t.first_ih + (oh - t.h_begin) * sh) * x.sh + t.first_iw * x.sw;
        std::fill(out, out + t.w_begin, T(0));
        if (sw == 1 && x.sw == 1) {
          copy_run(out + t.w_begin, row, inside);
        } else {
          for (int64_t j = 0; j < inside; ++j) out[t.w_begin + j] = row[j * sw * x.sw];
        }
        std::fill(out + t.w_end, out + OW, T(0));
      }
      std::fill(dst + t.h_end * OW, dst + OH * OW, T(0));
    }
  }
}

// The adjoint of im2col: adds every dcol entry read inside the input onto
// the input position it was read from (the ones read from the padding are
// dropped) -- into dx itself, whose planes are dense (the caller makes them
// so), zeroed first.
template <typename T>
void col2im(const T* dcol, const Chunk& chunk, int64_t group, const Geometry& g,
            const View4<T>& dx) {
  const int64_t OW = g.w.out_size;
  const int64_t KH = g.h.kernel, KW = g.w.kernel;
  const int64_t cols = chunk.columns(), sh = g.h.stride, sw = g.w.stride;
  const int64_t plane_size = g.h.in_size * g.w.in_size;
  for (int64_t i = 0; i < chunk.images; ++i) {
    for (int64_t ci = 0; ci < g.in_per_group(); ++ci) {
      T* plane = dx.plane(chunk.first_image + i, group * g.in_per_group() + ci);
      std::fill(plane, plane + plane_size, T(0));
      // kw outermost: consecutive runs then add onto other rows or the same
      // position, never onto a run that overlaps the one just stored at an
      // offset (a failed store-to-load forward, which made col2im ~3x slower).
      for (int64_t kw = 0; kw < KW; ++kw) {
        for (int64_t kh = 0; kh < KH; ++kh) {
          const TapWindow t = tap_window(g, kh, kw);
          const int64_t inside = t.w_end - t.w_begin;
          const T* src = dcol + ((ci * KH + kh) * KW + kw) * cols + i * chunk.pixels + t.w_begin;
          for (int64_t oh = t.h_begin; oh < t.h_end; ++oh) {
            T* row = plane + (t.first_ih + (oh - t.h_begin) * sh) * dx.sh + t.first_iw;
            if (sw == 1) {
              add_run(row, src + oh * OW, inside);
            } else {
              for (int64_t j = 0; j < inside; ++j) row[j * sw] += src[oh * OW + j];
            }
          }
        }
      }
    }
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HG_COL2IM_AVX512 1
// col2im for float32 when a padded row fits one AVX-512 vector (padded width
// <= 16, unit stride and dilation along w, dx rows contiguous): each input
// row is summed in a register -- over kh, then kw, the dcol run of kw
// loaded shifted by kw lanes (masked) -- and stored straight into dx. No
// padded planes, and no read-modify-write of overlapping runs.
bool col2im_fits(const Geometry& g, const View4<float>& dx) {
  return g.w.stride == 1 && g.w.dilation == 1 && dx.sw == 1 &&
         g.w.in_size + g.w.pad_begin + g.w.pad_end <= 16 && cpu_gemm::available();
}

__attribute__((target("avx512f,avx512vl"))) void col2im_rows(const float* dcol,
                                                             const Chunk& chunk, int64_t group,
                                                             const Geometry& g,
                                                             const View4<float>& dx) {
  const int64_t OW = g.w.out_size, OH = g.h.out_size;
  const int64_t KH = g.h.kernel, KW = g.w.kernel;
  const int64_t cols = chunk.columns();
  const __mmask16 run = static_cast<__mmask16>((1u << OW) - 1);
  const __mmask16 inner =
      static_cast<__mmask16>(((1u << g.w.in_size) - 1) << g.w.pad_begin);
  for (int64_t i = 0; i < chunk.images; ++i) {
    for (int64_t ci = 0; ci < g.in_per_group(); ++ci) {
      float* out = dx.plane(chunk.first_image + i, group * g.in_per_group() + ci);
      for (int64_t h = 0; h < g.h.in_size; ++h) {
        const int64_t hp = h + g.h.pad_begin;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t kh = 0; kh < KH; ++kh) {
          const int64_t t = hp - kh * g.h.dilation;
          if (t < 0 || t % g.h.stride != 0 || t / g.h.stride >= OH) continue;
          const float* src = dcol + (ci * KH + kh) * KW * cols + i * chunk.pixels + t / g.h.stride * OW;
          for (int64_t kw = 0; kw < KW; ++kw) {
            acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(static_cast<__mmask16>(run << kw),
                                                           src + kw * cols - kw));
          }
        }
        _mm512_mask_storeu_ps(out + h * dx.sh - g.w.pad_begin, inner, acc);
      }
    }
  }
}
#endif

// col2im_rows when it applies (returns false otherwise).
template <typename T>
bool col2im_fast(const T*, const Chunk&, int64_t, const Geometry&, const View4<T>&) {
  return false;
}
inline bool col2im_fast(const float* dcol, const Chunk& chunk, int64_t group, const Geometry& g,
                        const View4<float>& dx) {
#if HG_COL2IM_AVX512
  if (col2im_fits(g, dx)) {
    col2im_rows(dcol, chunk, group, g, dx);
    return true;
  }
#endif
  (void)dcol, (void)chunk, (void)group, (void)g, (void)dx;
  return false;
}

// dst[co][i * pixels + p] = grad_output(image, group channel co, p)
template <typename T>
void gather_channels(const View4<T>& src, const Chunk& chunk, int64_t first_channel,
                     int64_t channels, const Geometry& g, T* dst) {
  const int64_t OW = g.w.out_size, OH = g.h.out_size;
  const int64_t cols = chunk.columns();
  {
    for (int64_t t = 0; t < channels * chunk.images; ++t) {
      const int64_t co = t / chunk.images, i = t % chunk.images;
      const T* plane = src.plane(chunk.first_image + i, first_channel + co);
      T* d = dst + co * cols + i * chunk.pixels;
      if (src.sw == 1 && src.sh == OW) {
        std::memcpy(d, plane, chunk.pixels * sizeof(T));
      } else {
        for (int64_t oh = 0; oh < OH; ++oh) {
          for (int64_t ow = 0; ow < OW; ++ow) d[oh * OW + ow] = plane[oh * src.sh + ow * src.sw];
        }
      }
    }
  }
}

// output(image, first_channel + co, p) = tmp[co][i * pixels + p] + bias
template <typename T>
void scatter_channels(const T* tmp, const T* bias, const Chunk& chunk, int64_t first_channel,
                      int64_t channels, const Geometry& g, const View4<T>& dst) {
  const int64_t OW = g.w.out_size, OH = g.h.out_size;
  const int64_t cols = chunk.columns();
  {
    for (int64_t t = 0; t < channels * chunk.images; ++t) {
      const int64_t co = t / chunk.images, i = t % chunk.images;
      T* plane = dst.plane(chunk.first_image + i, first_channel + co);
      const T* s = tmp + co * cols + i * chunk.pixels;
      const T b = bias ? bias[first_channel + co] : T(0);
      if (dst.sw == 1 && dst.sh == OW) {
        for (int64_t p = 0; p < chunk.pixels; ++p) plane[p] = s[p] + b;
      } else {
        for (int64_t oh = 0; oh < OH; ++oh) {
          for (int64_t ow = 0; ow < OW; ++ow) plane[oh * dst.sh + ow * dst.sw] = s[oh * OW + ow] + b;
        }
      }
    }
  }
}

int64_t chunk_count(const Geometry& g, int64_t per_chunk) {
  return (g.batch + per_chunk - 1) / per_chunk;
}

Chunk chunk_at(const Geometry& g, int64_t per_chunk, int64_t index) {
  const int64_t first = index * per_chunk;
  return Chunk{first, std::min(per_chunk, g.batch - first), g.h.out_size * g.w.out_size};
}

// Scratch matrices of one task, reused by its chunks (sized for the largest).
struct Scratch {
  at::Tensor storage;
  int64_t rows;
  Scratch(int64_t rows, int64_t max_columns, const at::TensorOptions& options)
      : storage(at::empty({rows * max_columns}, options)), rows(rows) {}
  at::Tensor matrix(const Chunk& chunk) const {
    return storage.narrow(0, 0, rows * chunk.columns()).view({rows, chunk.columns()});
  }
};

// The rows of group `group` of a (out_channels, patch) weight matrix.
at::Tensor group_rows(const at::Tensor& weight, const Geometry& g, int64_t group) {
  return weight.view({g.out_channels, g.patch()})
      .narrow(0, group * g.out_per_group(), g.out_per_group());
}

// Threads split the chunks; each runs its matrix products on its own (BLAS
// does not start threads inside a parallel region), which keeps the cores
// busy through the im2col/col2im steps too and synchronizes once per call.
template <typename F>
void parallel_chunks(const Geometry& g, int64_t per_chunk, F&& body) {
  at::parallel_for(0, chunk_count(g, per_chunk), 1, [&](int64_t c0, int64_t c1) {
    // The products are plain tensor math inside this op's kernel: keep
    // autograd out of them (the guard is per thread) even when the op's
    // arguments require grad.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    body(c0, c1);
  });
}

// The (channels, pixels) matrix of one image's channels [first, first +
// channels) as a view of t, when its planes are dense and adjacent (NCHW);
// otherwise undefined, and the caller copies through a scratch matrix.
at::Tensor channel_matrix(const at::Tensor& t, const Chunk& chunk, int64_t first,
                          int64_t channels) {
  const int64_t pixels = t.size(2) * t.size(3);
  const bool dense = t.stride(3) == 1 && t.stride(2) == t.size(3) && t.stride(1) == pixels;
  if (chunk.images != 1 || !dense) return at::Tensor();
  return t.select(0, chunk.first_image).narrow(0, first, channels).view({channels, pixels});
}

// out = a b, or out += a b (accumulate): the own AVX-512 product or BLAS,
// whichever common/cpu_gemm_policy.h measured faster for this class.
void product(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  cpu_gemm::gemm(out, a, b, accumulate);
}

// out[co][p] = bias[co] + (a b)[co][p]
void product_with_bias(at::Tensor out, const at::Tensor& bias, const at::Tensor& a,
                       const at::Tensor& b) {
  if (out.scalar_type() == at::kFloat && cpu_gemm::available()) {
    out.copy_(bias.view({-1, 1}).expand_as(out));
    product(out, a, b, true);
  } else {
    at::addmm_out(out, bias.view({-1, 1}), a, b);
  }
}

}  // namespace

void forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
             at::Tensor& output, const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "handgrad::conv2d (gemm)", [&] {
    const View4<scalar_t> x = view_of<scalar_t>(input);
    const View4<scalar_t> y = view_of<scalar_t>(output);
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const int64_t per_chunk = chunk_images(g, sizeof(scalar_t));
    const int64_t max_cols = per_chunk * g.h.out_size * g.w.out_size;
    parallel_chunks(g, per_chunk, [&](int64_t c0, int64_t c1) {
      const Scratch col(g.patch(), max_cols, input.options());
      const Scratch prod(g.out_per_group(), max_cols, input.options());
      for (int64_t index = c0; index < c1; ++index) {
        const Chunk chunk = chunk_at(g, per_chunk, index);
        at::Tensor c = col.matrix(chunk), p = prod.matrix(chunk);
        for (int64_t group = 0; group < g.groups; ++group) {
          im2col(x, chunk, group, g, c.mutable_data_ptr<scalar_t>());
          const int64_t first = group * g.out_per_group();
          at::Tensor out = channel_matrix(output, chunk, first, g.out_per_group());
          if (!out.defined()) {
            product(p, group_rows(weight, g, group), c, false);
            scatter_channels(p.const_data_ptr<scalar_t>(), b, chunk, first, g.out_per_group(), g,
                             y);
          } else if (bias.defined()) {
            product_with_bias(out, bias.narrow(0, first, g.out_per_group()),
                              group_rows(weight, g, group), c);
          } else {
            product(out, group_rows(weight, g, group), c, false);
          }
        }
      }
    });
  });
}

void grad_input(const at::Tensor& grad_output, const at::Tensor& weight, at::Tensor& grad_input,
                const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "handgrad::conv2d_grad_input (gemm)", [&] {
    const View4<scalar_t> go = view_of<scalar_t>(grad_output);
    const View4<scalar_t> dx = view_of<scalar_t>(grad_input);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    // W^T per group, (patch, out_per_group): BLAS runs the product faster
    // untransposed, and the AVX-512 product reads its rows in place.
    const at::Tensor weight_t =
        weight.view({g.groups, g.out_per_group(), g.patch()}).transpose(1, 2).contiguous();
    const int64_t per_chunk = chunk_images(g, sizeof(scalar_t));
    const int64_t max_cols = per_chunk * g.h.out_size * g.w.out_size;
    parallel_chunks(g, per_chunk, [&](int64_t c0, int64_t c1) {
      const Scratch goc(g.out_per_group(), max_cols, grad_output.options());
      const Scratch dcol(g.patch(), max_cols, grad_output.options());
      for (int64_t index = c0; index < c1; ++index) {
        const Chunk chunk = chunk_at(g, per_chunk, index);
        at::Tensor o = goc.matrix(chunk), d = dcol.matrix(chunk);
        for (int64_t group = 0; group < g.groups; ++group) {
          const int64_t first = group * g.out_per_group();
          at::Tensor go_m = channel_matrix(grad_output, chunk, first, g.out_per_group());
          if (!go_m.defined()) {
            gather_channels(go, chunk, first, g.out_per_group(), g, o.mutable_data_ptr<scalar_t>());
            go_m = o;
          }
          product(d, weight_t[group], go_m, false);
          if (col2im_fast(d.const_data_ptr<scalar_t>(), chunk, group, g, dx)) continue;
          col2im(d.const_data_ptr<scalar_t>(), chunk, group, g, dx);
        }
      }
    });
  });
}

// float32 with the AVX-512 product, when the output channels fill the
// product's 32-column panels: the weight gradient is built transposed,
// dW^T[(ci,kh,kw)][co] += col . dOut^T, so the column matrix (the larger
// operand) is read in place by the micro-kernel and only dOut is packed;
// computing dW = dOut . col^T instead packs col^T every chunk (a strided
// transpose of patch x columns floats, ~20% of the time at
// (128,64,16,16)->128).
bool transposed_weight_gradient(const at::Tensor& input, const Geometry& g) {
  const int64_t n = g.out_per_group(), padded = (n + 31) / 32 * 32;
  return input.scalar_type() == at::kFloat && cpu_gemm::available() && padded * 16 <= n * 17;
}

// Whether the weight gradient's products run the own kernel (float32, and
// common/cpu_gemm_policy.h chose it for this class: B is a transposed
// matrix, the products run on one thread each when chunks are spread over
// the pool's threads).
bool own_weight_gradient(const at::Tensor& input, const Geometry& g, bool transposed,
                         int64_t max_cols, int64_t slots) {
  if (input.scalar_type() != at::kFloat || !cpu_gemm::available()) return false;
  cpu_gemm::Problem p;
  p.m = transposed ? g.patch() : g.out_per_group();
  p.n = transposed ? g.out_per_group() : g.patch();
  p.k = max_cols;
  p.b_transposed = true;
  p.calling_thread = slots > 1;  // not the thread count: one class at any count
  return cpu_gemm::choose(p) == cpu_gemm::Kernel::own;
}

void grad_weight(const at::Tensor& grad_output, const at::Tensor& input, at::Tensor& grad_weight,
                 const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "handgrad::conv2d_grad_weight (gemm)", [&] {
    const View4<scalar_t> go = view_of<scalar_t>(grad_output);
    const View4<scalar_t> x = view_of<scalar_t>(input);
    const int64_t per_chunk = chunk_images(g, sizeof(scalar_t));
    const int64_t max_cols = per_chunk * g.h.out_size * g.w.out_size;
    const int64_t chunks = chunk_count(g, per_chunk);
    const int64_t slots = std::min(kWeightSlots, chunks);
    const bool fast = own_weight_gradient(input, g, transposed_weight_gradient(input, g),
                                          max_cols, slots);
    const bool transposed = fast && transposed_weight_gradient(input, g);
    // Slot s sums chunks s, s + slots, ... in order (its first chunk
    // overwrites it); slot 0 is grad_weight itself unless transposed.
    // Transposed, slot s is (groups, patch, out_per_group).
    std::vector<at::Tensor> partial(slots);
    for (int64_t s = 0; s < slots; ++s) {
      partial[s] = transposed ? at::empty({g.groups, g.patch(), g.out_per_group()}, input.options())
                   : s == 0   ? grad_weight
                              : at::empty_like(grad_weight);
    }
    at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      const Scratch col(g.patch(), max_cols, input.options());
      const Scratch goc(g.out_per_group(), max_cols, input.options());
      cpu_gemm::PackedB packed;  // reused by the chunks
      for (int64_t s = s0; s < s1; ++s) {
        for (int64_t index = s; index < chunks; index += slots) {
          const Chunk chunk = chunk_at(g, per_chunk, index);
          at::Tensor c = col.matrix(chunk), o = goc.matrix(chunk);
          for (int64_t group = 0; group < g.groups; ++group) {
            im2col(x, chunk, group, g, c.mutable_data_ptr<scalar_t>());
            const int64_t first = group * g.out_per_group();
            at::Tensor go_m = channel_matrix(grad_output, chunk, first, g.out_per_group());
            if (!go_m.defined()) {
              gather_channels(go, chunk, first, g.out_per_group(), g,
                              o.mutable_data_ptr<scalar_t>());
              go_m = o;
            }
            if (transposed) {
              // B = dOut^T: rows of dOut packed by 16 x 16 transposes.
              cpu_gemm::pack_b_transposed(go_m.const_data_ptr<float>(), go_m.stride(0),
                                          chunk.columns(), g.out_per_group(), packed);
              cpu_gemm::matmul(g.patch(), c.const_data_ptr<float>(), c.stride(0), 1, packed,
                               partial[s][group].mutable_data_ptr<float>(), g.out_per_group(),
                               index != s);
            } else if (fast) {
              // B = col^T, packed the same way.
              cpu_gemm::pack_b_transposed(c.const_data_ptr<float>(), c.stride(0),
                                          chunk.columns(), g.patch(), packed);
              at::Tensor rows = group_rows(partial[s], g, group);
              cpu_gemm::matmul(g.out_per_group(), go_m.const_data_ptr<float>(), go_m.stride(0),
                               go_m.stride(1), packed, rows.mutable_data_ptr<float>(),
                               rows.stride(0), index != s);
            } else {
              product(group_rows(partial[s], g, group), go_m, c.t(), index != s);
            }
          }
        }
      }
    });
    if (transposed) {
      for (int64_t s = 1; s < slots; ++s) partial[0].add_(partial[s]);
      grad_weight.view({g.groups, g.out_per_group(), g.patch()}).copy_(partial[0].transpose(1, 2));
    } else {
      for (int64_t s = 1; s < slots; ++s) grad_weight.add_(partial[s]);
    }
  });
}

}  // namespace gemm
}  // namespace cpu
}  // namespace conv2d
}  // namespace handgrad
