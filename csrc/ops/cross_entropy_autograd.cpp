// cross_entropy: autograd, registered in C++ (Autograd dispatch key).
//
// Why not torch.library.register_autograd (the pattern of the other ops):
// at (128, 10) the loss is all per-call overhead, and the Python autograd
// kernel that register_autograd installs costs more than native's whole
// forward + backward. Measured on this 2-core machine (1 thread, loaded,
// microseconds per call): the forward op called through register_autograd
// took 33 us even when no input required grad, against 11 us for the same
// kind of call without a Python autograd kernel (the backward op); cProfile
// showed torch._library's fill_defaults alone at 11 us and redispatch at
// 16 us per call. Forward + backward was 70 us against native's 62 us
// (ratio 0.89 < 1.0). A torch::autograd::Function here, the way
// torchvision's csrc/ops/autograd/*.cpp do it, avoids the Python layer; it
// calls the op's own backward kernels (handgrad::cross_entropy_backward and,
// for probability targets that require grad, cross_entropy_target_backward)
// and works with opcheck and torch.compile (AOTAutograd runs this node on
// fake tensors through the backward ops' fake kernels).
//
// Saved for backward: input, target, weight and lse.
//
// This kernel serves first-order reverse mode only. Everything else takes
// the Python formulas (python/handgrad/ops/_cross_entropy_autograd.py):
//  * forward-mode AD and the torch.func transforms: handgrad.ops.cross_entropy
//    applies them itself (handgrad.ops._autograd.call); this kernel raises
//    when it meets a dual input or an active transform (a raw torch.ops
//    call), so no tangent is ever silently dropped;
//  * double backward: the backward ops' Autograd kernels are the Python
//    formulas. The backward below calls the backward ops through the
//    dispatcher (so they record their graph) only when that can be needed --
//    grad mode on (create_graph=True) or a dual grad_loss -- and straight to
//    the CPU/CUDA kernel otherwise, the per-call cost of plain training.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "../common/autograd_kernel.h"

namespace handgrad {
namespace cross_entropy {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using autograd_kernel::has_forward_grad;
using autograd_kernel::optional_of;

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& input, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight,
                                                int64_t ignore_index, c10::string_view reduction,
                                                double label_smoothing) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("handgrad::cross_entropy", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           int64_t, c10::string_view, double)>();
  return op.call(input, target, weight, ignore_index, reduction, label_smoothing);
}

at::Tensor call_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                         const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         int64_t ignore_index, c10::string_view reduction, double label_smoothing,
                         const at::Tensor& lse) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("handgrad::cross_entropy_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, int64_t,
                                         c10::string_view, double, const at::Tensor&)>();
  return op.call(grad_loss, input, target, weight, ignore_index, reduction, label_smoothing, lse);
}

at::Tensor call_target_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                                const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                c10::string_view reduction, double label_smoothing,
                                const at::Tensor& lse) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("handgrad::cross_entropy_target_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, c10::string_view,
                                         double, const at::Tensor&)>();
  return op.call(grad_loss, input, target, weight, reduction, label_smoothing, lse);
}

class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& target, const std::optional<at::Tensor>& weight,
                               int64_t ignore_index, c10::string_view reduction,
                               double label_smoothing) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lse] =
        call_forward(input, target, weight, ignore_index, reduction, label_smoothing);
    ctx->save_for_backward({input, target, weight.value_or(at::Tensor()), lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const at::Tensor& grad_loss = grads[0];
    at::Tensor grad_input, grad_target;
    if (grad_loss.defined()) {
      const variable_list saved = ctx->get_saved_variables();
      const std::optional<at::Tensor> weight = optional_of(saved[2]);
      const std::string reduction = ctx->saved_data["reduction"].toStringRef();
      const double smoothing = ctx->saved_data["label_smoothing"].toDouble();
      // Straight to the kernels unless these gradients may be differentiated again.
      std::optional<at::AutoDispatchBelowADInplaceOrView> plain;
      if (!at::GradMode::is_enabled() && !has_forward_grad(grad_loss)) plain.emplace();
      if (ctx->needs_input_grad(0)) {
        grad_input = call_backward(grad_loss, saved[0], saved[1], weight,
                                   ctx->saved_data["ignore_index"].toInt(), reduction, smoothing,
                                   saved[3]);
      }
      if (ctx->needs_input_grad(1)) {
        grad_target =
            call_target_backward(grad_loss, saved[0], saved[1], weight, reduction, smoothing,
                                 saved[3]);
      }
    }
    return {grad_input, grad_target, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> cross_entropy_autograd(const at::Tensor& input,
                                                          const at::Tensor& target,
                                                          const std::optional<at::Tensor>& weight,
                                                          int64_t ignore_index,
                                                          c10::string_view reduction,
                                                          double label_smoothing) {
  autograd_kernel::refuse_transforms_and_duals(
      "handgrad::cross_entropy", "handgrad.ops.cross_entropy", "cross_entropy",
      {has_forward_grad(input), has_forward_grad(target), has_forward_grad(weight)});
  TORCH_CHECK(!(weight.has_value() && weight->requires_grad() && at::GradMode::is_enabled()),
              "handgrad::cross_entropy is not differentiable with respect to argument 'weight'. "
              "This input cannot have requires_grad True.");
  const variable_list out = CrossEntropyFunction::apply(input, target, weight, ignore_index,
                                                        reduction, label_smoothing);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace cross_entropy
}  // namespace handgrad

// The backward ops' Autograd kernels (double backward) are registered from
// Python, with the formulas.
TORCH_LIBRARY_IMPL(handgrad, Autograd, m) {
  m.impl("cross_entropy", &handgrad::cross_entropy::cross_entropy_autograd);
}
