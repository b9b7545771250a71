// Shared by the ops whose first-order Autograd kernel is written in C++ for
// speed (cross_entropy, lstm_cell; see the comment at the top of their
// csrc/ops/<op>_autograd.cpp): such a kernel has no forward-mode formula and
// cannot run under a torch.func transform, so a raw torch.ops call meeting
// either raises here; the public handgrad.ops functions route those cases to
// the Python formulas (handgrad.ops._autograd.call) and never reach it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>

namespace handgrad {
namespace autograd_kernel {

// Forward-mode AD has one level in PyTorch (level 0).
inline bool has_forward_grad(const at::Tensor& t) {
  return t.defined() && t._fw_grad(0).defined();
}

inline bool has_forward_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && has_forward_grad(*t);
}

// What torch._C._are_functorch_transforms_active() reads.
inline bool functorch_transforms_active() {
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

inline std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// `op` ("handgrad::lstm_cell"), `entry` (its public function, "handgrad.ops.lstm_cell"),
// `formulas` (its name under handgrad.ops._autograd.OPS, "lstm_cell").
inline void refuse_transforms_and_duals(const char* op, const char* entry, const char* formulas,
                                        std::initializer_list<bool> dual_inputs) {
  TORCH_CHECK(!functorch_transforms_active(), op,
              " was called through torch.ops under a torch.func transform; handgrad's formulas "
              "reach the transforms through ", entry, " (or handgrad.ops._autograd.OPS.", formulas,
              "), not the raw operator");
  bool any_dual = false;
  for (bool dual : dual_inputs) any_dual = any_dual || dual;
  TORCH_CHECK(!any_dual, op,
              " was called through torch.ops with a forward-mode AD (dual) tensor; its "
              "forward-mode formulas are applied by ", entry, " (or handgrad.ops._autograd.OPS.",
              formulas, "), not by the raw operator");
}

}  // namespace autograd_kernel
}  // namespace handgrad
