// Input validation shared by every op. Each check raises a c10::Error whose
// message names the op, the argument and the offending value; the Python
// binding turns it into a RuntimeError / TypeError / ValueError, so bad input
// never crashes the process or produces a silent wrong answer.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>

namespace handgrad {

// The dtype must be one the kernels are compiled for: float32, float64,
// float16 or bfloat16 (float8 and other floating types are named as
// unsupported here rather than failing inside a dispatch macro).
inline void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kDouble || type == at::kHalf ||
                       type == at::kBFloat16,
                   op, ": expected ", arg,
                   " to be float32, float64, float16 or bfloat16 (the dtypes handgrad's kernels "
                   "support), but got ", type);
}

inline void check_dim_in(const at::Tensor& t, std::initializer_list<int64_t> allowed,
                         const char* op, const char* arg) {
  bool ok = false;
  std::string names;
  for (int64_t d : allowed) {
    ok = ok || t.dim() == d;
    names += (names.empty() ? "" : " or ") + std::to_string(d);
  }
  TORCH_CHECK(ok, op, ": expected ", arg, " to be ", names, "-D, but got a ", t.dim(),
              "-D tensor of shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* arg_a, const char* arg_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": expected ", arg_a, " and ", arg_b,
              " to be on the same device, but ", arg_a, " is on ", a.device(), " and ", arg_b,
              " is on ", b.device());
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* arg_a, const char* arg_b) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": expected ", arg_a, " and ", arg_b,
                   " to have the same dtype, but ", arg_a, " is ", a.scalar_type(), " and ", arg_b,
                   " is ", b.scalar_type());
}

// Every argument of an int[2] schema slot must hold exactly two values.
inline void check_pair(at::IntArrayRef values, const char* op, const char* arg) {
  TORCH_CHECK(values.size() == 2, op, ": expected ", arg, " to have 2 values, but got ",
              values.size(), " (", values, ")");
}

}  // namespace handgrad
