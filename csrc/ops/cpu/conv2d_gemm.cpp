// conv2d CPU, the matrix-product algorithm (large channel counts).
//
// Algorithm: im2col / col2im in chunks of images, with at::mm (BLAS) for the
// three matrix products -- the only place at::mm is used in conv2d. For a
// chunk of images and a group, the column matrix col[(ci, kh, kw)][(image,
// oh, ow)] holds the input value every tap of every output pixel reads (zero
// in the padding); it is rebuilt per chunk (a few MB, cache-resident) instead
// of being kept for backward, so nothing but the input and weight is saved.
//   forward      out[co][pixel] = W[co][(ci,kh,kw)] . col                (+ bias)
//   grad_weight  dW[co][(ci,kh,kw)] += dOut[co][pixel] . col^T           (chunks in order)
//   grad_input   dcol = W^T . dOut, then col2im adds every dcol entry back
//                onto the input position it was read from
// Gradients: out = W col is linear in W and col, so dW = dOut col^T and
// dcol = W^T dOut; col2im is the adjoint of the gather im2col did.
// Deterministic: chunks are visited in order, col2im gives each input plane
// to one task, and the BLAS products are deterministic for a fixed thread count.
// Activations are read and written through their strides (NCHW, channels_last
// or any view) without copies.
//
// Speed: see cpu/conv2d.cpp for the measured numbers of the whole op.
#include "ops/cpu/conv2d_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/addmm.h>

#include <algorithm>
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

// col[r][i * pixels + oh * OW + ow] for patch row r = (ci, kh, kw) of group `group`.
template <typename T>
void im2col(const View4<T>& x, const Chunk& chunk, int64_t group, const Geometry& g, T* col) {
  const int64_t OW = g.w.out_size, OH = g.h.out_size;
  const int64_t KH = g.h.kernel, KW = g.w.kernel;
  const int64_t cols = chunk.columns();
  {
    for (int64_t r = 0; r < g.patch(); ++r) {
      const int64_t c = group * g.in_per_group() + r / (KH * KW);
      const int64_t kh = (r / KW) % KH, kw = r % KW;
      int64_t ow0, ow1;
      positions_inside(g.w, kw, ow0, ow1);
      const int64_t iw0 = input_pos(g.w, ow0, kw);
      for (int64_t i = 0; i < chunk.images; ++i) {
        const T* src = x.plane(chunk.first_image + i, c);
        T* dst = col + r * cols + i * chunk.pixels;
        for (int64_t oh = 0; oh < OH; ++oh, dst += OW) {
          const int64_t ih = input_pos(g.h, oh, kh);
          if (!inside(ih, g.h.in_size) || ow0 >= ow1) {
            std::fill(dst, dst + OW, T(0));
            continue;
          }
          std::fill(dst, dst + ow0, T(0));
          const T* row = src + ih * x.sh + iw0 * x.sw;
          if (g.w.stride == 1 && x.sw == 1) {
            for (int64_t ow = ow0; ow < ow1; ++ow) dst[ow] = row[ow - ow0];
          } else {
            const int64_t step = g.w.stride * x.sw;
            for (int64_t ow = ow0; ow < ow1; ++ow) dst[ow] = row[(ow - ow0) * step];
          }
          std::fill(dst + ow1, dst + OW, T(0));
        }
      }
    }
  }
}

// The adjoint of im2col: adds dcol back onto the input positions it was read
// from. One task per (image, channel) plane, which it zeroes first.
template <typename T>
void col2im(const T* dcol, const Chunk& chunk, int64_t group, const Geometry& g,
            const View4<T>& dx) {
  const int64_t OW = g.w.out_size, OH = g.h.out_size;
  const int64_t KH = g.h.kernel, KW = g.w.kernel;
  const int64_t cin = g.in_per_group();
  const int64_t cols = chunk.columns();
  {
    for (int64_t t = 0; t < chunk.images * cin; ++t) {
      const int64_t i = t / cin, ci = t % cin;
      T* plane = dx.plane(chunk.first_image + i, group * cin + ci);
      for (int64_t h = 0; h < g.h.in_size; ++h) {
        for (int64_t w = 0; w < g.w.in_size; ++w) plane[h * dx.sh + w * dx.sw] = T(0);
      }
      for (int64_t kh = 0; kh < KH; ++kh) {
        for (int64_t kw = 0; kw < KW; ++kw) {
          const T* src = dcol + ((ci * KH + kh) * KW + kw) * cols + i * chunk.pixels;
          int64_t ow0, ow1;
          positions_inside(g.w, kw, ow0, ow1);
          if (ow0 >= ow1) continue;
          const int64_t iw0 = input_pos(g.w, ow0, kw);
          const int64_t step = g.w.stride * dx.sw;
          for (int64_t oh = 0; oh < OH; ++oh) {
            const int64_t ih = input_pos(g.h, oh, kh);
            if (!inside(ih, g.h.in_size)) continue;
            T* row = plane + ih * dx.sh + iw0 * dx.sw;
            const T* s = src + oh * OW;
            if (step == 1) {
              for (int64_t ow = ow0; ow < ow1; ++ow) row[ow - ow0] += s[ow];
            } else {
              for (int64_t ow = ow0; ow < ow1; ++ow) row[(ow - ow0) * step] += s[ow];
            }
          }
        }
      }
    }
  }
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
          at::mm_out(p, group_rows(weight, g, group), c);
          scatter_channels(p.const_data_ptr<scalar_t>(), b, chunk, group * g.out_per_group(),
                           g.out_per_group(), g, y);
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
    const int64_t per_chunk = chunk_images(g, sizeof(scalar_t));
    const int64_t max_cols = per_chunk * g.h.out_size * g.w.out_size;
    parallel_chunks(g, per_chunk, [&](int64_t c0, int64_t c1) {
      const Scratch goc(g.out_per_group(), max_cols, grad_output.options());
      const Scratch dcol(g.patch(), max_cols, grad_output.options());
      for (int64_t index = c0; index < c1; ++index) {
        const Chunk chunk = chunk_at(g, per_chunk, index);
        at::Tensor o = goc.matrix(chunk), d = dcol.matrix(chunk);
        for (int64_t group = 0; group < g.groups; ++group) {
          gather_channels(go, chunk, group * g.out_per_group(), g.out_per_group(), g,
                          o.mutable_data_ptr<scalar_t>());
          at::mm_out(d, group_rows(weight, g, group).t(), o);
          col2im(d.const_data_ptr<scalar_t>(), chunk, group, g, dx);
        }
      }
    });
  });
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
    // Slot s sums chunks s, s + slots, ... in order; slot 0 is grad_weight itself.
    std::vector<at::Tensor> partial(slots);
    partial[0] = grad_weight;
    for (int64_t s = 1; s < slots; ++s) partial[s] = at::empty_like(grad_weight);
    at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      const Scratch col(g.patch(), max_cols, input.options());
      const Scratch goc(g.out_per_group(), max_cols, input.options());
      for (int64_t s = s0; s < s1; ++s) {
        partial[s].zero_();
        for (int64_t index = s; index < chunks; index += slots) {
          const Chunk chunk = chunk_at(g, per_chunk, index);
          at::Tensor c = col.matrix(chunk), o = goc.matrix(chunk);
          for (int64_t group = 0; group < g.groups; ++group) {
            im2col(x, chunk, group, g, c.mutable_data_ptr<scalar_t>());
            gather_channels(go, chunk, group * g.out_per_group(), g.out_per_group(), g,
                            o.mutable_data_ptr<scalar_t>());
            group_rows(partial[s], g, group).addmm_(o, c.t());
          }
        }
      }
    });
    for (int64_t s = 1; s < slots; ++s) grad_weight.add_(partial[s]);
  });
}

}  // namespace gemm
}  // namespace cpu
}  // namespace conv2d
}  // namespace handgrad
