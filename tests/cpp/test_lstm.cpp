// Calls handgrad::lstm_cell and handgrad::lstm_layer through the dispatcher,
// as a LibTorch user would, and compares them with ATen's lstm_cell / lstm.
#include "check.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>
#include <tuple>

using handgrad_test::expect;

namespace {

bool close(const at::Tensor& a, const at::Tensor& b) { return a.allclose(b, 1e-4, 1e-5); }

}  // namespace

int main() {
  handgrad_test::print_build();

  using Opt = c10::optional<at::Tensor>;
  auto cell = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("handgrad::lstm_cell", "")
                  .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const Opt&, const Opt&)>();
  auto layer = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("handgrad::lstm_layer", "")
                   .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const Opt&, const Opt&, bool, const Opt&,
                       c10::OptionalIntArrayRef)>();

  at::manual_seed(0);
  const int64_t T = 5, B = 3, I = 4, H = 6;
  const at::Tensor x = at::randn({B, I}), h = at::randn({B, H}), c = at::randn({B, H});
  const at::Tensor w_ih = at::randn({4 * H, I}), w_hh = at::randn({4 * H, H});
  const at::Tensor b_ih = at::randn({4 * H}), b_hh = at::randn({4 * H});

  auto [hy, cy, gates] = cell.call(x, h, c, w_ih, w_hh, b_ih, b_hh);
  auto [hy_ref, cy_ref] = at::lstm_cell(x, {h, c}, w_ih, w_hh, b_ih, b_hh);
  expect(close(hy, hy_ref) && close(cy, cy_ref), "lstm_cell equals ATen's lstm_cell");
  expect(gates.sizes() == at::IntArrayRef({B, 4 * H}), "lstm_cell saves (B, 4H) gates");

  const at::Tensor seq = at::randn({T, B, I});
  for (bool reverse : {false, true}) {
    auto [out, hT, cT, g, cells] =
        layer.call(seq, h, c, w_ih, w_hh, b_ih, b_hh, reverse, Opt(), c10::nullopt);
    // ATen's one-layer bidirectional LSTM computes the reverse direction too;
    // with the same weights for both directions its halves are the references.
    auto [out_ref, hn_ref, cn_ref] =
        at::lstm(seq, {h.expand({2, B, H}).contiguous(), c.expand({2, B, H}).contiguous()},
                 {w_ih, w_hh, b_ih, b_hh, w_ih, w_hh, b_ih, b_hh}, /*has_biases=*/true,
                 /*num_layers=*/1, /*dropout=*/0.0, /*train=*/false, /*bidirectional=*/true,
                 /*batch_first=*/false);
    const int64_t d = reverse ? 1 : 0;
    expect(close(out, out_ref.narrow(2, d * H, H)) && close(hT, hn_ref[d]) && close(cT, cn_ref[d]),
           reverse ? "lstm_layer (reverse) equals ATen's lstm" : "lstm_layer equals ATen's lstm");
  }

  bool threw = false;
  try {
    cell.call(at::randn({B, I + 1}), h, c, w_ih, w_hh, b_ih, b_hh);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("inconsistent input_size") != std::string::npos;
  }
  expect(threw, "a wrong input size raises a clear error");

  return handgrad_test::finish();
}
