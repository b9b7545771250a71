// conv2d CPU, the direct algorithm (small channel counts).
//
// Algorithm: one image at a time, its planes are copied, zero padded, into a
// scratch buffer split into stride phases: phase (ph, pw) of a plane holds
// the padded positions (q * stride_h + ph, r * stride_w + pw). In that layout
// every tap (ci, kh, kw) of every output pixel (oh, ow) reads element
//   offset[tap] + oh * cols + ow
// of the buffer, for any stride, dilation or padding. Computing the outputs
// on "wide" rows of `cols` pixels (the extra ones are dropped) turns the
// convolution into correlations of long contiguous vectors:
//   forward      y[co][j] = b[co] + sum_tap W[co][tap] * buf[offset[tap] + j]
// computed by register-blocked vector kernels (cpu/conv2d_direct_kernels.inc:
// AVX-512 blocks of 8 output channels x 3 vectors of 16 pixels when the CPU
// has AVX-512, else AVX2 blocks of 4 x 3 vectors of 8). The gradients use the same machinery:
//   grad_input   dx is the full correlation of dOut with the flipped kernel:
//                dx[ci][ih][iw] = sum_(co,kh,kw) W[co][ci][kh][kw] *
//                dOut[co][(ih + pad - kh*dil) / stride][...] (where it divides),
//                i.e. the forward kernel run on dOut (zeros inserted between
//                rows/columns when strided, padded by dil*(k-1) - pad) with
//                weights W'[ci][(co, k-1-kh, k-1-kw)].
//   grad_weight  dW[co][tap] = sum_n sum_j dOut_wide[co][j] * buf[offset[tap] + j]
//                (dOut on wide rows, zero in the dropped columns): a register-
//                blocked reduction (4 channels x 6 taps (AVX-512) or 3 taps
//                (AVX2) of vector accumulators).
// With AVX-512, layers whose input channels fill whole vectors compute the
// weight gradient vectorized over input channels instead
// (grad_weight_by_channels): pixel-major copies of the image and of dOut,
// register blocks of 8 output channels x up to 3 vectors of input channels
// kept through all pixels of a chunk of images.
// Nothing is saved for backward but the input and weight. Parallel over
// images; grad_weight sums fixed chunks of images in order, so results do not
// depend on the thread count and are deterministic.
//
// Speed: see cpu/conv2d.cpp for the measured numbers of the whole op
// (benchmarks/bench_conv2d.py).
#include "ops/cpu/conv2d_cpu.h"
#include "ops/cpu/conv2d_direct_kernels.h"

#include "common/cpu_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace handgrad {
namespace conv2d {
namespace cpu {
namespace direct {
namespace {

// Multiply-adds a parallel task should at least hold: below that, handing
// work to another thread costs more than it saves (and on a busy machine a
// descheduled helper thread stalls the whole call).
constexpr int64_t kMinTaskMacs = 1 << 21;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

int64_t images_per_task(int64_t macs_per_image) {
  return std::max<int64_t>(1, kMinTaskMacs / std::max<int64_t>(1, macs_per_image));
}

// The weight gradients sum fixed chunks of images (chunk c: images
// [c * batch / chunks, (c + 1) * batch / chunks)), one task each, then add the
// chunks in order, so results do not depend on the thread count: at most 8
// chunks, each worth a task.
int64_t weight_chunks(int64_t batch, int64_t macs_per_image) {
  constexpr int64_t kChunks = 8;
  return std::min<int64_t>(
      {kChunks, batch, std::max<int64_t>(1, batch / images_per_task(macs_per_image))});
}

// Zero-padded planes split into stride phases, each phase `rows` x `cols`.
struct Planes {
  int64_t channels;
  int64_t phase_h, phase_w;
  int64_t rows, cols;

  int64_t plane() const { return rows * cols; }
  int64_t size() const { return channels * phase_h * phase_w * plane(); }
  // Where tap (c, kh, kw) with dilation (dh, dw) starts reading.
  int64_t offset(int64_t c, int64_t kh, int64_t kw, int64_t dh, int64_t dw) const {
    const int64_t sh = kh * dh, sw = kw * dw;
    return ((c * phase_h + sh % phase_h) * phase_w + sw % phase_w) * plane() +
           (sh / phase_h) * cols + sw / phase_w;
  }
};

// How a stack of source planes (C, H, W) is placed into Planes: source row h
// goes to padded row h * upsample_h + pad_h (a negative pad crops), and
// likewise for columns; everything else is zero.
struct Placement {
  int64_t upsample_h, upsample_w;
  int64_t pad_h, pad_w;
};

template <typename T>
void fill_planes(const View4<T>& src, int64_t n, int64_t src_h, int64_t src_w,
                 const Planes& p, const Placement& at, T* buf, int64_t buf_size) {
  std::fill(buf, buf + buf_size, T(0));
  const int64_t padded_rows = p.rows * p.phase_h, padded_cols = p.cols * p.phase_w;
  // Source columns [w0, w1) land inside the buffer.
  int64_t w0 = 0, w1 = src_w;
  while (w0 < w1 && w0 * at.upsample_w + at.pad_w < 0) ++w0;
  while (w1 > w0 && (w1 - 1) * at.upsample_w + at.pad_w >= padded_cols) --w1;
  const bool contiguous = at.upsample_w == 1 && p.phase_w == 1 && src.sw == 1;
  for (int64_t c = 0; c < p.channels; ++c) {
    const T* plane = src.plane(n, c);
    for (int64_t h = 0; h < src_h; ++h) {
      const int64_t r = h * at.upsample_h + at.pad_h;
      if (r < 0 || r >= padded_rows) continue;
      const T* row = plane + h * src.sh;
      T* dst = buf + (c * p.phase_h + r % p.phase_h) * p.phase_w * p.plane() +
               (r / p.phase_h) * p.cols;
      if (contiguous) {
        std::memcpy(dst + w0 + at.pad_w, row + w0, (w1 - w0) * sizeof(T));
        continue;
      }
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t t = w * at.upsample_w + at.pad_w;
        dst[(t % p.phase_w) * p.plane() + t / p.phase_w] = row[w * src.sw];
      }
    }
  }
}

// The planes the forward pass and the weight gradient read: the input, zero
// padded, split into stride phases.
Planes input_planes(const Geometry& g) {
  const int64_t padded_h = g.h.in_size + g.h.pad_begin + g.h.pad_end;
  const int64_t padded_w = g.w.in_size + g.w.pad_begin + g.w.pad_end;
  return Planes{g.in_channels, g.h.stride, g.w.stride, (padded_h + g.h.stride - 1) / g.h.stride,
                (padded_w + g.w.stride - 1) / g.w.stride};
}

// offsets[group-local tap (ci, kh, kw)] within one group's planes
std::vector<int64_t> tap_offsets(const Planes& p, int64_t channels, const Axis& h, const Axis& w,
                                 int64_t dh, int64_t dw) {
  std::vector<int64_t> off;
  off.reserve(channels * h.kernel * w.kernel);
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t kh = 0; kh < h.kernel; ++kh) {
      for (int64_t kw = 0; kw < w.kernel; ++kw) off.push_back(p.offset(c, kh, kw, dh, dw));
    }
  }
  return off;
}

// The vector kernels for this CPU: AVX-512 when it has it (and
// HANDGRAD_CPU_AVX512 is not 0), else the build's baseline (AVX2).
template <typename T>
const Kernels<T>& kernels() {
  const bool wide = cpu_gemm::available();
  if constexpr (std::is_same<T, float>::value) {
    return wide ? avx512::kFloat : baseline::kFloat;
  } else {
    return wide ? avx512::kDouble : baseline::kDouble;
  }
}

// Wide rows of `rows` x p.cols pixels, padded to whole vectors.
template <typename T>
int64_t wide_length(int64_t rows, const Planes& p) {
  return round_up(rows * p.cols, kernels<T>().lanes);
}

template <typename T>
void store_wide(const T* wide, int64_t channels, int64_t length, int64_t cols, const View4<T>& dst,
                int64_t n, int64_t first_channel, int64_t rows, int64_t width) {
  for (int64_t c = 0; c < channels; ++c) {
    T* plane = dst.plane(n, first_channel + c);
    const T* src = wide + c * length;
    for (int64_t h = 0; h < rows; ++h) {
      T* row = plane + h * dst.sh;
      const T* s = src + h * cols;
      if (dst.sw == 1) {
        std::memcpy(row, s, width * sizeof(T));
      } else {
        for (int64_t w = 0; w < width; ++w) row[w * dst.sw] = s[w];
      }
    }
  }
}

template <typename T>
void forward_impl(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                  at::Tensor& output, const Geometry& g) {
  const View4<T> x = view_of<T>(input), y = view_of<T>(output);
  const Kernels<T>& kern = kernels<T>();
  const T* w = weight.const_data_ptr<T>();
  const T* b = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  const Planes p = input_planes(g);
  const Placement place{1, 1, g.h.pad_begin, g.w.pad_begin};
  const std::vector<int64_t> off =
      tap_offsets(p, g.in_per_group(), g.h, g.w, g.h.dilation, g.w.dilation);
  const int64_t length = wide_length<T>(g.h.out_size, p);
  const int64_t group_planes = g.in_per_group() * p.phase_h * p.phase_w * p.plane();
  const int64_t buf_size = p.size() + length;
  const int64_t K = g.patch(), cout = g.out_per_group();
  at::parallel_for(0, g.batch, images_per_task(g.out_channels * K * length),
                   [&](int64_t n0, int64_t n1) {
    std::vector<T> buf(buf_size), wide(cout * length);
    for (int64_t n = n0; n < n1; ++n) {
      fill_planes(x, n, g.h.in_size, g.w.in_size, p, place, buf.data(), buf_size);
      for (int64_t group = 0; group < g.groups; ++group) {
        kern.correlate(buf.data() + group * group_planes, off.data(), K, w + group * cout * K, cout,
                  b ? b + group * cout : nullptr, wide.data(), length);
        store_wide(wide.data(), cout, length, p.cols, y, n, group * cout, g.h.out_size,
                   g.w.out_size);
      }
    }
  });
}

template <typename T>
void grad_input_impl(const at::Tensor& grad_output, const at::Tensor& weight,
                     at::Tensor& grad_input, const Geometry& g) {
  const View4<T> go = view_of<T>(grad_output), dx = view_of<T>(grad_input);
  const Kernels<T>& kern = kernels<T>();
  const int64_t KH = g.h.kernel, KW = g.w.kernel;
  const int64_t cin = g.in_per_group(), cout = g.out_per_group();
  const int64_t K = cout * KH * KW;
  // W'[group][ci][(co, kh', kw')] = W[group * cout + co][ci][KH-1-kh'][KW-1-kw']
  std::vector<T> flipped(g.groups * cin * K);
  const T* w = weight.const_data_ptr<T>();
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    for (int64_t ci = 0; ci < cin; ++ci) {
      for (int64_t co = 0; co < cout; ++co) {
        for (int64_t kh = 0; kh < KH; ++kh) {
          for (int64_t kw = 0; kw < KW; ++kw) {
            flipped[((grp * cin + ci) * cout + co) * KH * KW + kh * KW + kw] =
                w[(((grp * cout + co) * cin + ci) * KH + (KH - 1 - kh)) * KW + (KW - 1 - kw)];
          }
        }
      }
    }
  }
  // dOut with stride-1 zeros between entries, padded so that the stride-1
  // correlation with the flipped kernel yields every input position.
  const Planes p{g.out_channels, 1, 1, g.h.in_size + g.h.dilation * (KH - 1),
                 g.w.in_size + g.w.dilation * (KW - 1)};
  const Placement place{g.h.stride, g.w.stride, g.h.dilation * (KH - 1) - g.h.pad_begin,
                        g.w.dilation * (KW - 1) - g.w.pad_begin};
  const std::vector<int64_t> off = tap_offsets(p, cout, g.h, g.w, g.h.dilation, g.w.dilation);
  const int64_t length = wide_length<T>(g.h.in_size, p);
  const int64_t buf_size = p.size() + length;
  at::parallel_for(0, g.batch, images_per_task(g.in_channels * K * length),
                   [&](int64_t n0, int64_t n1) {
    std::vector<T> buf(buf_size), wide(cin * length);
    for (int64_t n = n0; n < n1; ++n) {
      fill_planes(go, n, g.h.out_size, g.w.out_size, p, place, buf.data(), buf_size);
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        kern.correlate(buf.data() + grp * cout * p.plane(), off.data(), K, flipped.data() + grp * cin * K,
                  cin, static_cast<const T*>(nullptr), wide.data(), length);
        store_wide(wide.data(), cin, length, p.cols, dx, n, grp * cin, g.h.in_size, g.w.in_size);
      }
    }
  });
}

// The weight gradient vectorized over input channels (by_channels() layers):
// per image the padded input and dOut are laid out pixel-major (channels
// innermost), so that for a tap every pixel reads one contiguous run of input
// channels, and each register block keeps 8 output channels x 3 vectors of
// input channels through all of a chunk's pixels. Chunks of images are summed
// by one task each, then added in order (deterministic).
template <typename T>
void grad_weight_by_channels(const View4<T>& go, const View4<T>& x, at::Tensor& grad_weight,
                             const Geometry& g, const Kernels<T>& kern) {
  const int64_t cin = g.in_channels, cout = g.out_channels;
  const int64_t KH = g.h.kernel, KW = g.w.kernel, taps = KH * KW;
  const int64_t rows = g.h.in_size + g.h.pad_begin + g.h.pad_end;
  const int64_t cols = g.w.in_size + g.w.pad_begin + g.w.pad_end;
  std::vector<int64_t> off(taps);
  for (int64_t kh = 0; kh < KH; ++kh) {
    for (int64_t kw = 0; kw < KW; ++kw) {
      off[kh * KW + kw] = kh * g.h.dilation * cols + kw * g.w.dilation;
    }
  }
  const int64_t weights = cout * cin * taps;
  const int64_t chunks = weight_chunks(g.batch, weights * g.h.out_size * g.w.out_size);
  std::vector<T> partial(chunks * weights, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> xt(rows * cols * cin, T(0)), gt(g.h.out_size * cols * cout);
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      T* dwt = partial.data() + chunk * weights;
      for (int64_t n = chunk * g.batch / chunks; n < (chunk + 1) * g.batch / chunks; ++n) {
        // The padding stays zero from the first fill; the interior is overwritten.
        for (int64_t c = 0; c < cin; ++c) {
          const T* plane = x.plane(n, c);
          for (int64_t h = 0; h < g.h.in_size; ++h) {
            T* dst = xt.data() + ((h + g.h.pad_begin) * cols + g.w.pad_begin) * cin + c;
            const T* row = plane + h * x.sh;
            for (int64_t w = 0; w < g.w.in_size; ++w) dst[w * cin] = row[w * x.sw];
          }
        }
        for (int64_t c = 0; c < cout; ++c) {
          const T* plane = go.plane(n, c);
          for (int64_t oh = 0; oh < g.h.out_size; ++oh) {
            T* dst = gt.data() + oh * cols * cout + c;
            const T* row = plane + oh * go.sh;
            for (int64_t ow = 0; ow < g.w.out_size; ++ow) dst[ow * cout] = row[ow * go.sw];
          }
        }
        kern.reduce_channels(gt.data(), cout, xt.data(), cin, off.data(), taps, g.h.out_size,
                             g.w.out_size, cols, dwt);
      }
    }
  });
  // dwt[(tap, co, ci)] -> grad_weight[co][ci][kh][kw], chunks added in order.
  T* out = grad_weight.mutable_data_ptr<T>();
  for (int64_t t = 0; t < taps; ++t) {
    for (int64_t co = 0; co < cout; ++co) {
      for (int64_t ci = 0; ci < cin; ++ci) {
        T total = 0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          total += partial[chunk * weights + (t * cout + co) * cin + ci];
        }
        out[(co * cin + ci) * taps + t] = total;
      }
    }
  }
}

template <typename T>
void grad_weight_impl(const at::Tensor& grad_output, const at::Tensor& input,
                      at::Tensor& grad_weight, const Geometry& g) {
  if (by_channels(g)) {
    grad_weight_by_channels(view_of<T>(grad_output), view_of<T>(input), grad_weight, g,
                            kernels<T>());
    return;
  }
  const View4<T> go = view_of<T>(grad_output), x = view_of<T>(input);
  const Kernels<T>& kern = kernels<T>();
  const Planes p = input_planes(g);
  const Placement place{1, 1, g.h.pad_begin, g.w.pad_begin};
  const std::vector<int64_t> off =
      tap_offsets(p, g.in_per_group(), g.h, g.w, g.h.dilation, g.w.dilation);
  const int64_t length = wide_length<T>(g.h.out_size, p);
  const int64_t group_planes = g.in_per_group() * p.phase_h * p.phase_w * p.plane();
  const int64_t buf_size = p.size() + length;
  const int64_t K = g.patch(), cout = g.out_per_group();
  const int64_t weights = g.out_channels * K;
  // Fixed chunks of images, each summed by one task into vector partial sums
  // (lanes per weight), then added lane by lane and chunk by chunk in order.
  const int64_t lanes = kern.lanes;
  const int64_t chunks = weight_chunks(g.batch, weights * length);
  std::vector<T> partial(chunks * weights * lanes, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> buf(buf_size), wide(g.out_channels * length, T(0));
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      T* dwl = partial.data() + chunk * weights * lanes;
      for (int64_t n = chunk * g.batch / chunks; n < (chunk + 1) * g.batch / chunks; ++n) {
        fill_planes(x, n, g.h.in_size, g.w.in_size, p, place, buf.data(), buf_size);
        // dOut on wide rows; the dropped columns and the tail stay zero.
        for (int64_t c = 0; c < g.out_channels; ++c) {
          const T* plane = go.plane(n, c);
          T* dst = wide.data() + c * length;
          for (int64_t oh = 0; oh < g.h.out_size; ++oh) {
            const T* row = plane + oh * go.sh;
            if (go.sw == 1) {
              std::memcpy(dst + oh * p.cols, row, g.w.out_size * sizeof(T));
              continue;
            }
            for (int64_t ow = 0; ow < g.w.out_size; ++ow) dst[oh * p.cols + ow] = row[ow * go.sw];
          }
        }
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          kern.reduce(wide.data() + grp * cout * length, cout, buf.data() + grp * group_planes,
                      off.data(), K, length, dwl + grp * cout * K * lanes);
        }
      }
    }
  });
  T* out = grad_weight.mutable_data_ptr<T>();
  for (int64_t i = 0; i < weights; ++i) {
    T total = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const T* v = partial.data() + (chunk * weights + i) * lanes;
      T s = 0;
      for (int64_t l = 0; l < lanes; ++l) s += v[l];
      total += s;
    }
    out[i] = total;
  }
}

}  // namespace

bool by_channels(const Geometry& g) {
  // 16: whole AVX-512 vectors of floats (and of doubles, 8 a vector). With
  // fewer than 8 output channels (a register block) the pixel-vectorized
  // kernel stays ahead (16->1 k3 at 28x28: 3.2x native against 1.2x).
  return cpu_gemm::available() && g.groups == 1 && g.h.stride == 1 && g.w.stride == 1 &&
         g.in_channels % 16 == 0 && g.out_channels >= 8 && g.patch() < 1000;
}

void forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
             at::Tensor& output, const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "handgrad::conv2d (direct)",
                             [&] { forward_impl<scalar_t>(input, weight, bias, output, g); });
}

void grad_input(const at::Tensor& grad_output, const at::Tensor& weight, at::Tensor& grad_input,
                const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "handgrad::conv2d_grad_input (direct)",
                             [&] { grad_input_impl<scalar_t>(grad_output, weight, grad_input, g); });
}

void grad_weight(const at::Tensor& grad_output, const at::Tensor& input, at::Tensor& grad_weight,
                 const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "handgrad::conv2d_grad_weight (direct)",
                             [&] { grad_weight_impl<scalar_t>(grad_output, input, grad_weight, g); });
}

}  // namespace direct
}  // namespace cpu
}  // namespace conv2d
}  // namespace handgrad
