// cross_entropy under torch.autocast: native's policy for the loss.
//
// Native lists cross_entropy among the ops autocast runs in float32 (on the
// CPU and on CUDA): float16 / bfloat16 logits, probabilities and weights are
// cast to float32 first, so the loss comes out float32 and a float32 class
// weight meets float32 logits. Without this kernel, handgrad's op saw the
// bfloat16 logits of an autocast model together with the module's float32
// weight and refused the mix. float64 tensors, and tensors of another device
// type, are left alone, as native's cached_cast does. The casts are ordinary
// differentiable ops, so the gradient reaches the reduced-precision logits.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>

namespace handgrad {
namespace cross_entropy {
namespace {

template <c10::DeviceType device, c10::DispatchKey autocast_key>
std::tuple<at::Tensor, at::Tensor> cross_entropy_autocast(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, c10::string_view reduction, double label_smoothing) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("handgrad::cross_entropy", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           int64_t, c10::string_view, double)>();
  auto to_float = [](const at::Tensor& t) { return at::autocast::cached_cast(at::kFloat, t, device); };
  std::optional<at::Tensor> w;
  if (weight.has_value()) w = to_float(*weight);
  return op.call(to_float(input), target.is_floating_point() ? to_float(target) : target, w,
                 ignore_index, reduction, label_smoothing);
}

}  // namespace
}  // namespace cross_entropy
}  // namespace handgrad

TORCH_LIBRARY_IMPL(handgrad, AutocastCPU, m) {
  m.impl("cross_entropy",
         &handgrad::cross_entropy::cross_entropy_autocast<c10::DeviceType::CPU,
                                                          c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(handgrad, AutocastCUDA, m) {
  m.impl("cross_entropy",
         &handgrad::cross_entropy::cross_entropy_autocast<c10::DeviceType::CUDA,
                                                          c10::DispatchKey::AutocastCUDA>);
}
