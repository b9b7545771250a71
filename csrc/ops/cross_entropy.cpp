// cross_entropy: the operator schemas and the backend-independent driver.
//
// The driver validates every argument with native's error types and texts
// (so CPU, CUDA and LibTorch callers get the same Python-visible errors),
// views the input as (N, C, d1*...*dK), makes the tensors the kernels read
// contiguous and allocates the outputs. Whether the target holds class
// indices or class probabilities is decided as in native: probabilities
// when it has the input's shape. Every tensor argument's device is checked
// first, before anything is read or allocated.
#include "ops/cross_entropy.h"

#include "common/checks.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <cmath>
#include <initializer_list>
#include <utility>
#include <vector>

namespace handgrad {
namespace cross_entropy {
namespace {

int parse_reduction(c10::string_view reduction) {
  if (reduction == "mean") return kMean;
  if (reduction == "sum") return kSum;
  if (reduction == "none") return kNone;
  TORCH_CHECK_VALUE(false, reduction, " is not a valid value for reduction");
}

// The shape of the per-row results: the input's shape without the class dim.
std::vector<int64_t> row_shape(const at::Tensor& input) {
  std::vector<int64_t> shape = input.sizes().vec();
  shape.erase(shape.begin() + (input.dim() == 1 ? 0 : 1));
  return shape;
}

at::ScalarType lse_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Every tensor argument must be on the input's device (native's wording,
// which names the device it found and the one it expected).
void check_devices(const char* op, const at::Tensor& input,
                   std::initializer_list<std::pair<const char*, const at::Tensor*>> others) {
  for (const auto& [name, t] : others) {
    if (t == nullptr || !t->defined()) continue;
    TORCH_CHECK(t->device() == input.device(), op, ": Tensor on device ", t->device(),
                " is not on the expected device ", input.device(), "! (argument '", name,
                "' must be on the input's device)");
  }
}

const at::Tensor* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

// An unbatched (C) input takes a 0-D target, or (as in native) a 1-D one of size 1.
bool unbatched_one_row_target(const at::Tensor& input, const at::Tensor& target) {
  return input.dim() == 1 && target.dim() == 1 && target.size(0) == 1 &&
         !at::isFloatingType(target.scalar_type());
}

Params make_params(const at::Tensor& input, const at::Tensor& target,
                   const std::optional<at::Tensor>& weight, int64_t ignore_index,
                   c10::string_view reduction, double label_smoothing, const char* op) {
  check_floating(input, op, "input");
  TORCH_CHECK(input.dim() >= 1, op,
              ": expected input with at least 1 dimension, (C) or (N, C, ...), but got a 0-D "
              "tensor");
  const int reduction_enum = parse_reduction(reduction);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);

  Params p;
  p.classes = input.size(input.dim() == 1 ? 0 : 1);
  p.outer = input.dim() == 1 ? 1 : input.size(0);
  p.inner = 1;
  for (int64_t d = 2; d < input.dim(); ++d) p.inner *= input.size(d);
  p.prob_target = target.sizes() == input.sizes();
  p.reduction = reduction_enum;
  p.ignore_index = ignore_index;
  p.smoothing = label_smoothing;
  p.has_weight = weight.has_value() && weight->defined();
  p.weight_total = static_cast<double>(p.classes);  // the kernels add up a given weight

  if (p.prob_target) {
    TORCH_CHECK(at::isFloatingType(target.scalar_type()),
                "Expected floating point type for target with class probabilities, got ",
                target.scalar_type());
    TORCH_CHECK(ignore_index < 0, "ignore_index is not supported for floating point target");
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte,
                "expected target dtype to be Long or Byte, but got ", target.scalar_type());
    if (input.dim() >= 2 && target.dim() >= 1) {
      TORCH_CHECK_VALUE(target.size(0) == input.size(0), "Expected input batch_size (",
                        input.size(0), ") to match target batch_size (", target.size(0), ").");
    }
    TORCH_CHECK_VALUE(!(input.dim() == 1 && target.dim() == 1 && target.size(0) != 1),
                      "For 1D input, 1D target must have size 1, but got target size: ",
                      target.size(0));
    const std::vector<int64_t> expected = row_shape(input);
    TORCH_CHECK(target.sizes() == at::IntArrayRef(expected) ||
                    unbatched_one_row_target(input, target),
                "Expected target size ", at::IntArrayRef(expected), ", got ", target.sizes());
  }
  if (p.has_weight) {
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == p.classes,
                "weight tensor should be defined either for all ", p.classes,
                " classes or no classes but got weight tensor of shape: ", weight->sizes());
    TORCH_CHECK(weight->scalar_type() == input.scalar_type(), op,
                ": expected weight to have the input's dtype ", input.scalar_type(),
                ", but got ", weight->scalar_type());
  }
  return p;
}

// The target as the kernels read it: contiguous int64 indices, or
// probabilities in the input's dtype.
at::Tensor kernel_target(const at::Tensor& target, const at::Tensor& input, const Params& p) {
  if (p.prob_target) return target.to(input.scalar_type()).contiguous();
  return target.to(at::kLong).contiguous();
}

at::Tensor kernel_weight(const std::optional<at::Tensor>& weight, const Params& p) {
  return p.has_weight ? weight->contiguous() : at::Tensor();
}

void check_lse(const at::Tensor& lse, const at::Tensor& input, const char* op) {
  TORCH_CHECK_TYPE(lse.scalar_type() == lse_dtype(input), op, ": expected lse to be ",
                   lse_dtype(input), ", but got ", lse.scalar_type());
  const std::vector<int64_t> rows = row_shape(input);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(rows), op, ": expected lse of shape ",
              at::IntArrayRef(rows), ", but got ", lse.sizes());
}

void check_grad_loss(const at::Tensor& grad_loss, const at::Tensor& input, const Params& p,
                     const char* op) {
  check_same_dtype(input, grad_loss, op, "input", "grad_loss");
  if (p.reduction == kNone) {
    const std::vector<int64_t> rows = row_shape(input);
    TORCH_CHECK(grad_loss.sizes() == at::IntArrayRef(rows), op,
                ": expected grad_loss of shape ", at::IntArrayRef(rows),
                " (reduction='none'), but got ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.dim() == 0, op,
                ": expected a 0-D grad_loss for a reduced loss, but got shape ",
                grad_loss.sizes());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight,
                                           int64_t ignore_index, c10::string_view reduction,
                                           double label_smoothing, ForwardKernel kernel) {
  constexpr const char* op = "handgrad::cross_entropy";
  check_devices(op, input, {{"target", &target}, {"weight", optional_ptr(weight)}});
  const Params p = make_params(input, target, weight, ignore_index, reduction, label_smoothing,
                               op);
  const std::vector<int64_t> rows = row_shape(input);
  if (p.classes == 0 && p.prob_target) {
    // Rows of no classes, as native: loss -sum over nothing = 0, lse = log 0;
    // the mean over the rows divides by numel / C = 0 / 0.
    const double total = p.reduction == kMean ? std::nan("") : 0.0;
    return {p.reduction == kNone ? at::full(rows, 0.0, input.options())
                                 : at::full({}, total, input.options()),
            at::full(rows, -INFINITY, input.options().dtype(lse_dtype(input)))};
  }
  at::Tensor lse = at::empty(rows, input.options().dtype(lse_dtype(input)));
  at::Tensor loss = p.reduction == kNone ? at::empty(rows, input.options())
                                         : at::empty({}, input.options());
  kernel(input.contiguous(), kernel_target(target, input, p), kernel_weight(weight, p), p, loss,
         lse);
  return {loss, lse};
}

at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& input,
                    const at::Tensor& target, const std::optional<at::Tensor>& weight,
                    int64_t ignore_index, c10::string_view reduction, double label_smoothing,
                    const at::Tensor& lse, BackwardKernel kernel) {
  constexpr const char* op = "handgrad::cross_entropy_backward";
  check_devices(op, input,
                {{"grad_loss", &grad_loss}, {"target", &target},
                 {"weight", optional_ptr(weight)}, {"lse", &lse}});
  const Params p =
      make_params(input, target, weight, ignore_index, reduction, label_smoothing, op);
  check_grad_loss(grad_loss, input, p, op);
  check_lse(lse, input, op);
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  if (grad_input.numel() == 0) return grad_input;
  kernel(grad_loss.contiguous(), input.contiguous(), kernel_target(target, input, p),
         kernel_weight(weight, p), lse.contiguous(), p, grad_input);
  return grad_input;
}

at::Tensor target_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                           const at::Tensor& target, const std::optional<at::Tensor>& weight,
                           c10::string_view reduction, double label_smoothing,
                           const at::Tensor& lse, TargetBackwardKernel kernel) {
  constexpr const char* op = "handgrad::cross_entropy_target_backward";
  check_devices(op, input,
                {{"grad_loss", &grad_loss}, {"target", &target},
                 {"weight", optional_ptr(weight)}, {"lse", &lse}});
  const Params p = make_params(input, target, weight, -100, reduction, label_smoothing, op);
  TORCH_CHECK(p.prob_target, op, ": only probability targets (the input's shape ",
              input.sizes(), ") have a gradient, but got a target of shape ", target.sizes());
  check_grad_loss(grad_loss, input, p, op);
  check_lse(lse, input, op);
  at::Tensor grad_target = at::empty(input.sizes(), input.options());
  if (grad_target.numel() != 0) {
    kernel(grad_loss.contiguous(), input.contiguous(), kernel_weight(weight, p),
           lse.contiguous(), p, grad_target);
  }
  return grad_target.to(target.scalar_type());
}

}  // namespace cross_entropy
}  // namespace handgrad

TORCH_LIBRARY_FRAGMENT(handgrad, m) {
  m.def(
      "cross_entropy(Tensor input, Tensor target, Tensor? weight=None, int ignore_index=-100, "
      "str reduction=\"mean\", float label_smoothing=0.0) -> (Tensor loss, Tensor lse)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "int ignore_index, str reduction, float label_smoothing, Tensor lse) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "cross_entropy_target_backward(Tensor grad_loss, Tensor input, Tensor target, "
      "Tensor? weight, str reduction, float label_smoothing, Tensor lse) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}
