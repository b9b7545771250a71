// Calls handgrad::scaled_dot_product_attention (and its backward) through the
// dispatcher, as a LibTorch user would, and compares them with ATen's
// attention and with the gradient formulas written out with ATen matmuls.
#include "check.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <iostream>
#include <string>
#include <tuple>

using handgrad_test::expect;

int main() {
  handgrad_test::print_build();

  using Four = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  auto forward = c10::Dispatcher::singleton()
                     .findSchemaOrThrow("handgrad::scaled_dot_product_attention", "")
                     .typed<Four(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, double, bool,
                                 std::optional<double>, bool, bool)>();
  auto backward = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("handgrad::scaled_dot_product_attention_backward", "")
                      .typed<Four(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const std::optional<at::Tensor>&, double, bool,
                                  std::optional<double>, bool, const at::Tensor&,
                                  const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, std::array<bool, 4>)>();

  at::manual_seed(0);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor q = at::randn({2, 3, 70, 8}, f64);
  const at::Tensor k = at::randn({2, 3, 150, 8}, f64);
  const at::Tensor v = at::randn({2, 3, 150, 5}, f64);
  const at::Tensor mask = at::rand({70, 150}, f64) > 0.3;

  auto [out, lse, rng, weights] = forward.call(q, k, v, mask, 0.0, false, std::nullopt, false,
                                               true);
  const at::Tensor ref = at::scaled_dot_product_attention(q, k, v, mask);
  expect(out.allclose(ref, 1e-10, 1e-12), "forward equals ATen (bool mask)");

  // Gradients written out: S = scale QK^T + mask, P = softmax(S), O = PV.
  const double scale = 1.0 / std::sqrt(8.0);
  const at::Tensor additive = at::zeros({70, 150}, f64).masked_fill(mask.logical_not(), -INFINITY);
  const at::Tensor P = at::softmax(at::matmul(q, k.transpose(-1, -2)) * scale + additive, -1);
  const at::Tensor dO = at::randn_like(out);
  const at::Tensor dV = at::matmul(P.transpose(-1, -2), dO);
  const at::Tensor dP = at::matmul(dO, v.transpose(-1, -2));
  const at::Tensor dS = P * (dP - (dO * out).sum(-1, true));
  const at::Tensor dQ = at::matmul(dS, k) * scale;
  const at::Tensor dK = at::matmul(dS.transpose(-1, -2), q) * scale;
  expect(weights.allclose(P, 1e-10, 1e-12), "need_weights returns softmax(S)");
  auto [gq, gk, gv, gm] = backward.call(dO, q, k, v, out, lse, mask, 0.0, false, std::nullopt,
                                        false, rng, std::nullopt, std::nullopt,
                                        {true, true, true, false});
  expect(gq.allclose(dQ, 1e-9, 1e-11), "grad query equals the formula");
  expect(gk.allclose(dK, 1e-9, 1e-11), "grad key equals the formula");
  expect(gv.allclose(dV, 1e-9, 1e-11), "grad value equals the formula");
  expect(gm.numel() == 0, "no mask gradient unless asked for");

  // A float mask's gradient is dS, summed over the dimensions it is broadcast along.
  const at::Tensor bias = at::randn({70, 150}, f64);
  auto [ob, lb, rb, wb] = forward.call(q, k, v, bias, 0.0, false, std::nullopt, false, false);
  const at::Tensor Pb = at::softmax(at::matmul(q, k.transpose(-1, -2)) * scale + bias, -1);
  const at::Tensor dSb = Pb * (at::matmul(dO, v.transpose(-1, -2)) - (dO * ob).sum(-1, true));
  auto grads = backward.call(dO, q, k, v, ob, lb, bias, 0.0, false, std::nullopt, false, rb,
                             std::nullopt, std::nullopt, {false, false, false, true});
  expect(std::get<3>(grads).allclose(dSb.sum({0, 1}), 1e-9, 1e-11),
         "grad attn_mask equals dS summed over batch and heads");

  auto [oc, lc, rc, wc] = forward.call(q, k, v, std::nullopt, 0.0, true, 0.5, false, false);
  expect(oc.allclose(at::scaled_dot_product_attention(q, k, v, {}, 0.0, true, 0.5), 1e-10, 1e-12),
         "causal forward with a custom scale equals ATen");

  bool threw = false;
  try {
    forward.call(q, k, v, mask, 0.0, true, std::nullopt, false, false);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("cannot be used together") != std::string::npos;
  }
  expect(threw, "attn_mask with is_causal raises a clear error");

  return handgrad_test::finish();
}
