// conv2d CPU, the direct algorithm (small channel counts).
//
// Algorithm: one image at a time, the input positions the taps read are
// copied, zero where they fall in the padding, into a scratch buffer laid
// out by stride phase: along each axis, tap k of output o reads padded
// position o * stride + k * dilation, i.e. row o + (k * dilation) / stride
// of phase (k * dilation) % stride, so consecutive outputs read consecutive
// rows of one phase. Only the rows some tap reads are stored (AxisLayout:
// per phase, the union of its taps' row ranges), which bounds the buffer by
// kernel x output size whatever the stride, dilation or padding; for an
// ordinary layer it is the padded image split into stride phases. In that
// layout every tap (ci, kh, kw) of every output pixel (oh, ow) reads element
//   offset[tap] + oh * cols + ow
// of the buffer. Computing the outputs on "wide" rows of `cols` pixels (the
// extra ones are dropped) turns the convolution into correlations of long
// contiguous vectors:
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
// Special values: the forward pass multiplies the padding's zeros as native
// does. grad_input multiplies its inserted and padding zeros with the
// weights, and the weight gradient its dropped columns' zeros with input
// values no output reads: exact unless the other factor is inf or NaN, so
// the backend (cpu/conv2d.cpp) sends non-finite weights' grad_input, and
// weight gradients that come out with a NaN, to the exact im2col path.
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

#include "common/checked_math.h"
#include "common/cpu_gemm.h"
#include "common/scratch_memory.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
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

// One axis of the scratch layout. Tap k of output position o reads position
//   p = o * step + k * dilation
// (of the zero-padded input for forward and the weight gradient, step =
// stride; of the upsampled, padded dOut for grad_input, step = 1). Position
// p lives in stride phase p % step, row p / step, so tap k reads rows
// [q_k, q_k + outputs) of phase r_k (q_k = k * dilation / step, r_k = k *
// dilation % step): consecutive output positions read consecutive rows,
// which is what lets the kernels correlate contiguous vectors. Only those
// rows are stored: per phase, the union of its taps' row ranges as maximal
// runs ("segments"). Phases no tap reads (stride above the kernel's span),
// rows between taps further apart than the output (a dilation above it) and
// padding nobody reads are never allocated, so an axis stores at most
// kernel * outputs positions, whatever the stride, dilation or padding
// (a stride of 2^62 over a 9x9 input stores 3 rows, not 2^62 phases); for
// an ordinary layer (one segment per phase) this is the padded input split
// into stride phases.
struct AxisLayout {
  struct Segment {
    int64_t phase, first, length, base;  // rows [first, first + length) stored from base
  };
  int64_t step = 1;
  std::vector<Segment> segments;
  std::vector<int64_t> tap_segment, tap_row;  // per tap: its segment, and its first row in it
  int64_t extent = 0;                          // rows of all segments, end to end
  int64_t longest = 0;                         // rows of the longest segment

  // The segment and row holding position p, or false when no tap reads it.
  bool locate(int64_t p, int64_t& segment, int64_t& row) const {
    if (p < 0) return false;
    const int64_t phase = p % step, q = p / step;
    for (size_t s = 0; s < segments.size(); ++s) {
      const Segment& seg = segments[s];
      if (seg.phase == phase && q >= seg.first && q < seg.first + seg.length) {
        segment = static_cast<int64_t>(s);
        row = q - seg.first;
        return true;
      }
    }
    return false;
  }
};

AxisLayout axis_layout(int64_t step, int64_t kernel, int64_t dilation, int64_t outputs) {
  AxisLayout a;
  a.step = step;
  // Taps sorted by (phase, first row); a tap starting inside (or right after)
  // the current segment of its phase extends it.
  std::vector<int64_t> taps(kernel);
  for (int64_t k = 0; k < kernel; ++k) taps[k] = k;
  auto phase = [&](int64_t k) { return k * dilation % step; };
  auto first = [&](int64_t k) { return k * dilation / step; };
  std::sort(taps.begin(), taps.end(), [&](int64_t x, int64_t y) {
    return phase(x) != phase(y) ? phase(x) < phase(y) : first(x) < first(y);
  });
  a.tap_segment.resize(kernel);
  a.tap_row.resize(kernel);
  for (int64_t k : taps) {
    const int64_t ph = phase(k), q = first(k);
    if (a.segments.empty() || a.segments.back().phase != ph ||
        q > a.segments.back().first + a.segments.back().length) {
      a.segments.push_back({ph, q, 0, 0});
    }
    AxisLayout::Segment& seg = a.segments.back();
    seg.length = std::max(seg.length, q + outputs - seg.first);
    a.tap_segment[k] = static_cast<int64_t>(a.segments.size()) - 1;
    a.tap_row[k] = q - seg.first;
  }
  for (AxisLayout::Segment& seg : a.segments) {
    seg.base = a.extent;
    a.extent += seg.length;
    a.longest = std::max(a.longest, seg.length);
  }
  return a;
}

// The scratch planes of a stack of channels. Along h the segments are laid
// end to end (extent rows); along w each segment gets its own plane of
// `cols` columns, so a wide row is only as long as the longest w segment
// (the columns of the other phases are not computed as padding):
//   element (c, h row r, w segment s, column j) at
//   c * channel_size() + s * plane() + r * cols + j.
struct Planes {
  int64_t channels;
  AxisLayout h, w;

  int64_t cols() const { return w.longest; }
  int64_t plane() const { return h.extent * cols(); }
  int64_t channel_size() const { return static_cast<int64_t>(w.segments.size()) * plane(); }
  int64_t size() const { return channels * channel_size(); }
  // Where tap (c, kh, kw) starts reading (its output (0, 0)).
  int64_t offset(int64_t c, int64_t kh, int64_t kw) const {
    const AxisLayout::Segment& seg_h = h.segments[h.tap_segment[kh]];
    return c * channel_size() + w.tap_segment[kw] * plane() + (seg_h.base + h.tap_row[kh]) * cols() +
           w.tap_row[kw];
  }
};

// Checked product of scratch sizes: a geometry whose scratch would not fit
// in int64 gets an error, not a wrapped allocation.
int64_t scratch_size(std::initializer_list<int64_t> factors) {
  int64_t total = 1;
  for (int64_t f : factors) {
    TORCH_CHECK(checked_mul(total, f, total), "handgrad::conv2d: the scratch buffer for this "
                "geometry would exceed 2^63 elements");
  }
  return total;
}

// How the source planes (C, H, W) land in the scratch: source row h at
// position h * upsample_h + shift_h (shift < 0 crops), likewise for columns.
// row_at[h] / col_at[w] hold the offsets of its row (row * cols) and of its
// column (segment * plane + column) in a channel, or -1 where no tap reads
// it; columns [w0, w1) hold every placed one, and when they are one run of
// consecutive offsets (unit step along w) a row is copied with memcpy.
struct SourceMap {
  std::vector<int64_t> row_at, col_at;
  int64_t w0 = 0, w1 = 0;
  bool one_run = false;
};

SourceMap source_map(const Planes& p, int64_t src_h, int64_t src_w, int64_t upsample_h,
                     int64_t upsample_w, int64_t shift_h, int64_t shift_w) {
  SourceMap m;
  m.row_at.assign(src_h, -1);
  m.col_at.assign(src_w, -1);
  int64_t seg = 0, row = 0;
  for (int64_t h = 0; h < src_h; ++h) {
    if (p.h.locate(h * upsample_h + shift_h, seg, row)) {
      m.row_at[h] = (p.h.segments[seg].base + row) * p.cols();
    }
  }
  m.w0 = src_w;
  for (int64_t w = 0; w < src_w; ++w) {
    if (!p.w.locate(w * upsample_w + shift_w, seg, row)) continue;
    m.col_at[w] = seg * p.plane() + row;
    m.w0 = std::min(m.w0, w);
    m.w1 = w + 1;
  }
  m.one_run = m.w0 < m.w1;
  for (int64_t w = m.w0; w < m.w1 && m.one_run; ++w) m.one_run = m.col_at[w] == m.col_at[m.w0] + (w - m.w0);
  return m;
}

template <typename T>
void fill_planes(const View4<T>& src, int64_t n, const Planes& p, const SourceMap& m, T* buf,
                 int64_t buf_size) {
  std::fill(buf, buf + buf_size, T(0));
  const bool copy_rows = m.one_run && src.sw == 1;
  for (int64_t c = 0; c < p.channels; ++c) {
    const T* plane = src.plane(n, c);
    T* channel = buf + c * p.channel_size();
    for (int64_t h = 0; h < static_cast<int64_t>(m.row_at.size()); ++h) {
      if (m.row_at[h] < 0) continue;
      const T* row = plane + h * src.sh;
      T* dst = channel + m.row_at[h];
      if (copy_rows) {
        std::memcpy(dst + m.col_at[m.w0], row + m.w0, (m.w1 - m.w0) * sizeof(T));
        continue;
      }
      for (int64_t w = m.w0; w < m.w1; ++w) {
        if (m.col_at[w] >= 0) dst[m.col_at[w]] = row[w * src.sw];
      }
    }
  }
}

// The planes the forward pass and the weight gradient read: the input, zero
// padded, split into stride phases (only what the taps read), and where the
// input lands in them.
Planes input_planes(const Geometry& g) {
  return Planes{g.in_channels, axis_layout(g.h.stride, g.h.kernel, g.h.dilation, g.h.out_size),
                axis_layout(g.w.stride, g.w.kernel, g.w.dilation, g.w.out_size)};
}

SourceMap input_map(const Planes& p, const Geometry& g) {
  return source_map(p, g.h.in_size, g.w.in_size, 1, 1, g.h.pad_begin, g.w.pad_begin);
}

// offsets[group-local tap (ci, kh, kw)] within one group's planes
std::vector<int64_t> tap_offsets(const Planes& p, int64_t channels, int64_t kh_taps,
                                 int64_t kw_taps) {
  std::vector<int64_t> off;
  off.reserve(channels * kh_taps * kw_taps);
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t kh = 0; kh < kh_taps; ++kh) {
      for (int64_t kw = 0; kw < kw_taps; ++kw) off.push_back(p.offset(c, kh, kw));
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
  return round_up(rows * p.cols(), kernels<T>().lanes);
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
  const SourceMap place = input_map(p, g);
  const std::vector<int64_t> off = tap_offsets(p, g.in_per_group(), g.h.kernel, g.w.kernel);
  const int64_t length = wide_length<T>(g.h.out_size, p);
  const int64_t group_planes = g.in_per_group() * p.channel_size();
  const int64_t buf_size = scratch_size({p.channels, p.channel_size()}) + length;
  const int64_t K = g.patch(), cout = g.out_per_group();
  at::parallel_for(0, g.batch, images_per_task(g.out_channels * K * length),
                   [&](int64_t n0, int64_t n1) {
    memory::ScratchVector<T> buf(buf_size), wide(cout * length);
    for (int64_t n = n0; n < n1; ++n) {
      fill_planes(x, n, p, place, buf.data(), buf_size);
      for (int64_t group = 0; group < g.groups; ++group) {
        kern.correlate(buf.data() + group * group_planes, off.data(), K, w + group * cout * K, cout,
                  b ? b + group * cout : nullptr, wide.data(), length);
        store_wide(wide.data(), cout, length, p.cols(), y, n, group * cout, g.h.out_size,
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
  memory::ScratchVector<T> flipped(g.groups * cin * K);
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
  // correlation with the flipped kernel yields every input position: dOut
  // row oh sits at position oh * stride + dilation * (KH - 1) - pad_begin,
  // and input row ih reads positions ih + kh' * dilation.
  const Planes p{g.out_channels, axis_layout(1, KH, g.h.dilation, g.h.in_size),
                 axis_layout(1, KW, g.w.dilation, g.w.in_size)};
  const SourceMap place =
      source_map(p, g.h.out_size, g.w.out_size, g.h.stride, g.w.stride,
                 g.h.dilation * (KH - 1) - g.h.pad_begin, g.w.dilation * (KW - 1) - g.w.pad_begin);
  const std::vector<int64_t> off = tap_offsets(p, cout, KH, KW);
  const int64_t length = wide_length<T>(g.h.in_size, p);
  const int64_t buf_size = scratch_size({p.channels, p.channel_size()}) + length;
  at::parallel_for(0, g.batch, images_per_task(g.in_channels * K * length),
                   [&](int64_t n0, int64_t n1) {
    memory::ScratchVector<T> buf(buf_size), wide(cin * length);
    for (int64_t n = n0; n < n1; ++n) {
      fill_planes(go, n, p, place, buf.data(), buf_size);
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        kern.correlate(buf.data() + grp * cout * p.channel_size(), off.data(), K,
                       flipped.data() + grp * cin * K, cin, static_cast<const T*>(nullptr),
                       wide.data(), length);
        store_wide(wide.data(), cin, length, p.cols(), dx, n, grp * cin, g.h.in_size,
                   g.w.in_size);
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
  memory::ScratchVector<T> partial(chunks * weights, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    memory::ScratchVector<T> xt(rows * cols * cin, T(0)), gt(g.h.out_size * cols * cout);
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
  const SourceMap place = input_map(p, g);
  const std::vector<int64_t> off = tap_offsets(p, g.in_per_group(), g.h.kernel, g.w.kernel);
  const int64_t length = wide_length<T>(g.h.out_size, p);
  const int64_t group_planes = g.in_per_group() * p.channel_size();
  const int64_t buf_size = scratch_size({p.channels, p.channel_size()}) + length;
  const int64_t K = g.patch(), cout = g.out_per_group();
  const int64_t weights = g.out_channels * K;
  // Fixed chunks of images, each summed by one task into vector partial sums
  // (lanes per weight), then added lane by lane and chunk by chunk in order.
  const int64_t lanes = kern.lanes;
  const int64_t chunks = weight_chunks(g.batch, weights * length);
  memory::ScratchVector<T> partial(chunks * weights * lanes, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    memory::ScratchVector<T> buf(buf_size), wide(g.out_channels * length, T(0));
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      T* dwl = partial.data() + chunk * weights * lanes;
      for (int64_t n = chunk * g.batch / chunks; n < (chunk + 1) * g.batch / chunks; ++n) {
        fill_planes(x, n, p, place, buf.data(), buf_size);
        // dOut on wide rows; the dropped columns and the tail stay zero.
        for (int64_t c = 0; c < g.out_channels; ++c) {
          const T* plane = go.plane(n, c);
          T* dst = wide.data() + c * length;
          for (int64_t oh = 0; oh < g.h.out_size; ++oh) {
            const T* row = plane + oh * go.sh;
            if (go.sw == 1) {
              std::memcpy(dst + oh * p.cols(), row, g.w.out_size * sizeof(T));
              continue;
            }
            for (int64_t ow = 0; ow < g.w.out_size; ++ow) dst[oh * p.cols() + ow] = row[ow * go.sw];
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
  // Its scratch is the padded image (rows x cols x channels): a dilation far
  // above the output's size would make that mostly unread padding.
  auto compact = [](const Axis& a) { return (a.kernel - 1) * a.dilation <= 4 * a.out_size + 64; };
  return cpu_gemm::available() && g.groups == 1 && g.h.stride == 1 && g.w.stride == 1 &&
         g.in_channels % 16 == 0 && g.out_channels >= 8 && g.patch() < 1000 && compact(g.h) &&
         compact(g.w);
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
