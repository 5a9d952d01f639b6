// dtypes.h — the tensor-side dtype helpers every <op>_args.h shares: the at::ScalarType -> DType
// map that fills the params structs, the accumulation dtype of per-row statistics and
// workspaces, and the check of a tensor that must be another's twin (same device, shape and
// dtype, contiguous), which several ops ask of their residual, bias, gradient and paired inputs.
//
// ATen side only, so included by .cpp files; the .cu files see the plain DType enum and its
// dispatch to element types in params.h (docs/architecture.md §4.3).
#pragma once

#include <ATen/ATen.h>

#include "checks.h"
#include "params.h"

namespace slmfast {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "slmfast: unsupported dtype ", t);
  }
}

// The dtype of per-row statistics and of weight-gradient workspaces: float32, float64 for fp64.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// `t` (called `name` in the messages) must be the twin of `ref` (called `ref_name`): on its
// device, of its shape and dtype, and contiguous. Checked in that order, with the words of
// checks.h's SLM_CHECK_DEVICE / _SAME_SHAPE / _DTYPE / _CONTIGUOUS.
inline void check_twin(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  SLM_CHECK(op, t.device() == ref.device(), name, " must be on ", ref.device(), " like the other inputs, got ",
            t.device());
  SLM_CHECK(op, t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", ref.sizes(), ", got ",
            t.sizes());
  SLM_CHECK(op, t.scalar_type() == ref.scalar_type(), name, " must have dtype ", ref.scalar_type(), ", got ",
            t.scalar_type());
  SLM_CHECK(op, t.is_contiguous(), name, " must be contiguous, got sizes ", t.sizes(), " strides ", t.strides());
}

}  // namespace slmfast
