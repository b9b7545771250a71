// Calls handgrad::cross_entropy and its backward through the dispatcher, as a
// LibTorch user would, and compares them with ATen's cross_entropy_loss.
#include "check.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>
#include <optional>
#include <string>
#include <tuple>

using handgrad_test::expect;

int main() {
  handgrad_test::print_build();

  auto forward = c10::Dispatcher::singleton()
                     .findSchemaOrThrow("handgrad::cross_entropy", "")
                     .typed<std::tuple<at::Tensor, at::Tensor>(
                         const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         int64_t, c10::string_view, double)>();
  auto backward = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("handgrad::cross_entropy_backward", "")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&, int64_t,
                                        c10::string_view, double, const at::Tensor&)>();

  at::manual_seed(0);
  const at::Tensor x = at::randn({6, 5, 3});
  at::Tensor t = at::randint(0, 5, {6, 3}, at::kLong);
  t.index_put_({0, 1}, -100);
  const at::Tensor w = at::rand({5});

  auto [loss, lse] = forward.call(x, t, w, -100, "mean", 0.1);
  const at::Tensor ref = at::cross_entropy_loss(x, t, w, at::Reduction::Mean, -100, 0.1);
  expect(loss.allclose(ref, 1e-5, 1e-6), "forward equals ATen (K-dim, weight, smoothing)");

  auto [rows, lse_rows] = forward.call(x, t, std::nullopt, -100, "none", 0.0);
  expect(rows.allclose(at::cross_entropy_loss(x, t, {}, at::Reduction::None, -100, 0.0), 1e-5, 1e-6),
         "forward equals ATen (reduction none)");

  const at::Tensor xg = x.detach().clone().set_requires_grad(true);
  at::cross_entropy_loss(xg, t, w, at::Reduction::Mean, -100, 0.1).backward();
  const at::Tensor gx = backward.call(at::ones({}), x, t, w, -100, "mean", 0.1, lse);
  expect(gx.allclose(xg.grad(), 1e-5, 1e-6), "backward equals ATen's gradient");

  bool threw = false;
  try {
    forward.call(at::randn({4, 5}), at::tensor({0, 1, 12, 2}, at::kLong), std::nullopt, -100,
                 "mean", 0.0);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("Target 12 is out of bounds") != std::string::npos;
  }
  expect(threw, "a target out of range raises a clear error");

  return handgrad_test::finish();
}
