// Calls handgrad::max_pool2d through the dispatcher, as a LibTorch user
// would, and compares it with ATen's max_pool2d_with_indices.
#include "check.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>
#include <tuple>

using handgrad_test::expect;

int main() {
  handgrad_test::print_build();

  auto forward = c10::Dispatcher::singleton()
                     .findSchemaOrThrow("handgrad::max_pool2d", "")
                     .typed<std::tuple<at::Tensor, at::Tensor>(
                         const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                         at::IntArrayRef, bool)>();
  auto backward = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("handgrad::max_pool2d_backward", "")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                                        at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                        at::IntArrayRef)>();

  at::manual_seed(0);
  const at::Tensor x = at::randn({2, 3, 9, 9});
  const std::vector<int64_t> k{3, 3}, s{2, 2}, p{1, 1}, d{1, 1};
  auto [y, idx] = forward.call(x, k, s, p, d, /*ceil_mode=*/true);
  auto [y_ref, idx_ref] = at::max_pool2d_with_indices(x, k, s, p, d, true);
  expect(y.equal(y_ref), "forward values equal ATen");
  expect(idx.equal(idx_ref), "forward indices equal ATen");

  const at::Tensor grad = at::randn_like(y);
  const at::Tensor gx = backward.call(grad, idx, c10::fromIntArrayRefSlow(x.sizes()), k, s, p, d);
  const at::Tensor gx_ref = at::max_pool2d_with_indices_backward(grad, x, k, s, p, d, true, idx_ref);
  expect(gx.allclose(gx_ref), "backward equals ATen");

  bool threw = false;
  try {
    forward.call(x, {0, 0}, s, p, d, false);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("kernel_size must be greater than zero") != std::string::npos;
  }
  expect(threw, "kernel_size 0 raises a clear error");

  return handgrad_test::finish();
}
