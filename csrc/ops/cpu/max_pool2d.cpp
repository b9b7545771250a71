// max_pool2d, CPU kernels.
//
// Algorithm: every output takes the maximum over its (dilated, padded)
// window; the flat position h*W + w of the winner inside its input plane is
// stored as the index (int64, the convention of torch's max_pool2d). A
// window that covers only padding (dilation or ceil mode can make one) gives
// -inf and native's index for it (empty_window_index: it names no element of
// the window).
// Gradient: y = x[argmax], so dL/dx[i] = sum of dL/dy over the outputs whose
// argmax is i, and zero elsewhere; outputs of windows that read no input
// send their gradient nowhere. Saved for backward: the indices only.
//
// NCHW: threads split the N*C planes. A plane is pooled with a generic
// window loop, or, for the ubiquitous 2x2 / stride-2 window, with a
// branch-free loop the compiler vectorizes. Backward zeroes one plane and
// scatters into it while it is still in cache (one pass over grad_input).
// channels_last: threads split output pixels; the inner loop runs over the
// contiguous channels, so it vectorizes. Results are deterministic: each
// plane (or image) is owned by one thread and visited in a fixed order.
//
// Speed against native (benchmarks/bench_max_pool2d.py, 2 threads, float32,
// forward+backward): see the table in the README's benchmark section.
#include "ops/max_pool2d.h"

#include "common/checked_math.h"
#include "common/scratch_memory.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace handgrad {
namespace max_pool2d {
namespace {

// Work per parallel task should be large enough to amortize the thread handoff.
int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

template <typename T>
void pool_plane_generic(const T* in, T* out, int64_t* idx, const Geometry& g,
                        const std::vector<int64_t>& w_begin, const std::vector<int64_t>& w_end) {
  const int64_t W = g.w.in_size, OW = g.w.out_size;
  const int64_t dh = g.h.dilation, dw = g.w.dilation;
  for (int64_t oh = 0; oh < g.h.out_size; ++oh) {
    int64_t h0, h1;
    window_taps(g.h, oh, h0, h1);
    for (int64_t ow = 0; ow < OW; ++ow) {
      const int64_t w0 = w_begin[ow], w1 = w_end[ow];
      T best = -std::numeric_limits<T>::infinity();
      int64_t best_at = empty_window_index(h0, w0, W);
      for (int64_t h = h0; h < h1; h += dh) {
        for (int64_t w = w0; w < w1; w += dw) {
          const T v = in[h * W + w];
          if (replaces_max(v, best)) {
            best = v;
            best_at = h * W + w;
          }
        }
      }
      out[oh * OW + ow] = best;
      idx[oh * OW + ow] = best_at;
    }
  }
}

// 2x2 window, stride 2, no padding or dilation, every window complete.
template <typename T>
void pool_plane_2x2(const T* in, T* out, int64_t* idx, const Geometry& g) {
  const int64_t W = g.w.in_size, OW = g.w.out_size;
  for (int64_t oh = 0; oh < g.h.out_size; ++oh) {
    const T* top = in + 2 * oh * W;
    const T* bottom = top + W;
    T* o = out + oh * OW;
    int64_t* oi = idx + oh * OW;
    const int64_t row = 2 * oh * W;
    for (int64_t ow = 0; ow < OW; ++ow) {
      const T a = top[2 * ow], b = top[2 * ow + 1], c = bottom[2 * ow], d = bottom[2 * ow + 1];
      // Same scan order as the generic loop: a, b, c, d.
      T best = a;
      int64_t at = 0;
      const bool take_b = replaces_max(b, best);
      best = take_b ? b : best;
      at = take_b ? 1 : at;
      const bool take_c = replaces_max(c, best);
      best = take_c ? c : best;
      at = take_c ? W : at;
      const bool take_d = replaces_max(d, best);
      best = take_d ? d : best;
      at = take_d ? W + 1 : at;
      o[ow] = best;
      oi[ow] = row + 2 * ow + at;
    }
  }
}

bool is_plain_2x2(const Geometry& g) {
  auto plain = [](const Axis& a) {
    return a.kernel == 2 && a.stride == 2 && a.pad == 0 && a.dilation == 1 &&
           2 * a.out_size <= a.in_size;
  };
  return plain(g.h) && plain(g.w);
}

template <typename T>
void forward_nchw(const T* in, T* out, int64_t* idx, const Geometry& g) {
  const int64_t in_plane = g.h.in_size * g.w.in_size;
  const int64_t out_plane = g.h.out_size * g.w.out_size;
  std::vector<int64_t> w_begin(g.w.out_size), w_end(g.w.out_size);
  for (int64_t ow = 0; ow < g.w.out_size; ++ow) window_taps(g.w, ow, w_begin[ow], w_end[ow]);
  const bool fast = is_plain_2x2(g);
  const int64_t work = saturating_mul(out_plane, saturating_mul(g.h.kernel, g.w.kernel));
  at::parallel_for(0, g.batch * g.channels, grain_for(work), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      if (fast) {
        pool_plane_2x2(in + p * in_plane, out + p * out_plane, idx + p * out_plane, g);
      } else {
        pool_plane_generic(in + p * in_plane, out + p * out_plane, idx + p * out_plane, g,
                           w_begin, w_end);
      }
    }
  });
}

// The running maximum of a block of channels. The winner's position is kept
// as a 32-bit integer next to 32-bit floats so that compare and select have
// the same vector width (mixing float masks with int64 selects defeats the
// vectorizer); it is widened to int64 when the pixel is done.
template <typename T, typename Pos>
void pool_pixel_nhwc(const T* image, T* out, int64_t* idx, Pos* at, int64_t C, int64_t W,
                     int64_t h0, int64_t h1, int64_t dh, int64_t w0, int64_t w1, int64_t dw) {
  if (h0 >= h1 || w0 >= w1) {
    // The window covers only padding: -inf and native's index, as in NCHW.
    std::fill(out, out + C, -std::numeric_limits<T>::infinity());
    std::fill(idx, idx + C, empty_window_index(h0, w0, W));
    return;
  }
  bool first = true;
  for (int64_t h = h0; h < h1; h += dh) {
    for (int64_t w = w0; w < w1; w += dw) {
      const T* v = image + (h * W + w) * C;
      const Pos here = static_cast<Pos>(h * W + w);
      if (first) {
        // Starting from the first tap equals starting from -inf with its index.
        for (int64_t c = 0; c < C; ++c) {
          out[c] = v[c];
          at[c] = here;
        }
        first = false;
        continue;
      }
      for (int64_t c = 0; c < C; ++c) {
        const bool take = replaces_max(v[c], out[c]);
        out[c] = take ? v[c] : out[c];
        at[c] = take ? here : at[c];
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) idx[c] = at[c];
}

template <typename T, typename Pos>
void forward_nhwc(const T* in, T* out, int64_t* idx, const Geometry& g) {
  const int64_t C = g.channels, H = g.h.in_size, W = g.w.in_size;
  const int64_t OH = g.h.out_size, OW = g.w.out_size;
  const int64_t work = saturating_mul(C, saturating_mul(g.h.kernel, g.w.kernel));
  at::parallel_for(0, g.batch * OH * OW, grain_for(work), [&](int64_t begin, int64_t end) {
    std::vector<Pos> at(C);
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t n = pix / (OH * OW);
      const int64_t oh = (pix / OW) % OH, ow = pix % OW;
      int64_t h0, h1, w0, w1;
      window_taps(g.h, oh, h0, h1);
      window_taps(g.w, ow, w0, w1);
      pool_pixel_nhwc(in + n * H * W * C, out + pix * C, idx + pix * C, at.data(), C, W, h0, h1,
                      g.h.dilation, w0, w1, g.w.dilation);
    }
  });
}

void forward_kernel(const at::Tensor& input, at::Tensor& output, at::Tensor& indices,
                    const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "handgrad::max_pool2d", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    int64_t* idx = indices.mutable_data_ptr<int64_t>();
    if (g.channels_last) {
      if (g.h.in_size * g.w.in_size <= std::numeric_limits<int32_t>::max()) {
        forward_nhwc<scalar_t, int32_t>(in, out, idx, g);
      } else {
        forward_nhwc<scalar_t, int64_t>(in, out, idx, g);
      }
    } else {
      forward_nchw(in, out, idx, g);
    }
  });
}

[[noreturn]] void index_out_of_range(int64_t index, int64_t plane) {
  TORCH_CHECK(false, "handgrad::max_pool2d_backward: index ", index,
              " is out of range for an input plane of ", plane, " elements");
}

// Gradients are added in at::opmath_type<T> (float for float16 / bfloat16)
// and rounded once, as the CUDA kernel does; float and double add in place.
template <typename T>
class Accumulator {
 public:
  using Acc = at::opmath_type<T>;
  // The `count` elements at dst, zeroed; accumulated into by at(i).
  void begin(T* dst, int64_t count) {
    dst_ = dst;
    count_ = count;
    if constexpr (std::is_same_v<T, Acc>) {
      std::fill(dst, dst + count, T(0));
    } else {
      scratch_.assign(static_cast<size_t>(count), Acc(0));
    }
  }
  Acc& at(int64_t i) {
    if constexpr (std::is_same_v<T, Acc>) {
      return dst_[i];
    } else {
      return scratch_[static_cast<size_t>(i)];
    }
  }
  void finish() {
    if constexpr (!std::is_same_v<T, Acc>) {
      for (int64_t i = 0; i < count_; ++i) dst_[i] = static_cast<T>(scratch_[static_cast<size_t>(i)]);
    }
  }

 private:
  T* dst_ = nullptr;
  int64_t count_ = 0;
  memory::ScratchVector<Acc> scratch_;
};

// The outputs whose window reads no input (only padding): they have no
// argmax, and their gradient goes nowhere. Empty when every window reads
// input, which is the common case (no dilation, no ceil-mode overhang).
std::vector<char> empty_windows(const Geometry& g) {
  std::vector<char> empty_h(g.h.out_size), empty_w(g.w.out_size);
  bool any = false;
  for (int64_t oh = 0; oh < g.h.out_size; ++oh) {
    empty_h[oh] = !window_reads_input(g.h, oh);
    any = any || empty_h[oh];
  }
  for (int64_t ow = 0; ow < g.w.out_size; ++ow) {
    empty_w[ow] = !window_reads_input(g.w, ow);
    any = any || empty_w[ow];
  }
  if (!any) return {};
  std::vector<char> empty(g.h.out_size * g.w.out_size);
  for (int64_t oh = 0; oh < g.h.out_size; ++oh) {
    for (int64_t ow = 0; ow < g.w.out_size; ++ow) {
      empty[oh * g.w.out_size + ow] = empty_h[oh] || empty_w[ow];
    }
  }
  return empty;
}

template <typename T>
void backward_nchw(const T* grad_out, const int64_t* idx, T* grad_in, const Geometry& g) {
  const int64_t in_plane = g.h.in_size * g.w.in_size;
  const int64_t out_plane = g.h.out_size * g.w.out_size;
  const std::vector<char> empty = empty_windows(g);
  const char* skip = empty.empty() ? nullptr : empty.data();
  std::atomic<int64_t> bad_index{-1};
  at::parallel_for(0, g.batch * g.channels, grain_for(in_plane), [&](int64_t begin, int64_t end) {
    Accumulator<T> gi;
    for (int64_t p = begin; p < end; ++p) {
      const T* go = grad_out + p * out_plane;
      const int64_t* ix = idx + p * out_plane;
      gi.begin(grad_in + p * in_plane, in_plane);
      for (int64_t o = 0; o < out_plane; ++o) {
        if (skip != nullptr && skip[o]) continue;
        const int64_t i = ix[o];
        if (i < 0 || i >= in_plane) {
          bad_index.store(i);
          return;
        }
        gi.at(i) += go[o];
      }
      gi.finish();
    }
  });
  if (bad_index.load() != -1) index_out_of_range(bad_index.load(), in_plane);
}

// channels_last: a task owns one image and a block of channels, so no two
// tasks ever add into the same grad_input element. Reduced precision
// accumulates the task's (positions x channels) block in a float scratch.
template <typename T>
void backward_nhwc(const T* grad_out, const int64_t* idx, T* grad_in, const Geometry& g) {
  using Acc = at::opmath_type<T>;
  const int64_t C = g.channels;
  const int64_t in_plane = g.h.in_size * g.w.in_size;
  const int64_t out_plane = g.h.out_size * g.w.out_size;
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  const std::vector<char> empty = empty_windows(g);
  const char* skip = empty.empty() ? nullptr : empty.data();
  std::atomic<int64_t> bad_index{-1};
  at::parallel_for(0, g.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    memory::ScratchVector<Acc> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks;
      const int64_t c0 = (task % blocks) * kBlock, c1 = std::min(C, c0 + kBlock), width = c1 - c0;
      T* gi = grad_in + n * in_plane * C;
      const T* go = grad_out + n * out_plane * C;
      const int64_t* ix = idx + n * out_plane * C;
      scratch.assign(static_cast<size_t>(in_plane * width), Acc(0));
      for (int64_t o = 0; o < out_plane; ++o) {
        if (skip != nullptr && skip[o]) continue;
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t i = ix[o * C + c];
          if (i < 0 || i >= in_plane) {
            bad_index.store(i);
            return;
          }
          scratch[static_cast<size_t>(i * width + c - c0)] += static_cast<Acc>(go[o * C + c]);
        }
      }
      for (int64_t pos = 0; pos < in_plane; ++pos) {
        for (int64_t c = c0; c < c1; ++c) {
          gi[pos * C + c] = static_cast<T>(scratch[static_cast<size_t>(pos * width + c - c0)]);
        }
      }
    }
  });
  if (bad_index.load() != -1) index_out_of_range(bad_index.load(), in_plane);
}

void backward_kernel(const at::Tensor& grad_output, const at::Tensor& indices,
                     at::Tensor& grad_input, const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "handgrad::max_pool2d_backward", [&] {
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const int64_t* idx = indices.const_data_ptr<int64_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    if (g.channels_last) {
      backward_nhwc(go, idx, gi, g);
    } else {
      backward_nchw(go, idx, gi, g);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cpu(const at::Tensor& input,
                                                  at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, bool ceil_mode) {
  return forward(input, kernel_size, stride, padding, dilation, ceil_mode, &forward_kernel);
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& indices,
                                   at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation) {
  return backward(grad_output, indices, input_size, kernel_size, stride, padding, dilation,
                  &backward_kernel);
}

}  // namespace
}  // namespace max_pool2d
}  // namespace handgrad

TORCH_LIBRARY_IMPL(handgrad, CPU, m) {
  m.impl("max_pool2d", &handgrad::max_pool2d::max_pool2d_cpu);
  m.impl("max_pool2d_backward", &handgrad::max_pool2d::max_pool2d_backward_cpu);
}
