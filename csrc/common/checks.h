// checks.h — argument checks shared by every C++ entry point (CPU ops and CUDA bindings).
//
// Each macro names the argument it checks and says what was expected and what it got, so that a
// bad call from Python reads like "rms_norm: weight must have shape (1000,), got (999,)".
// Modelled on flash-attention's CHECK_SHAPE / CHECK_DEVICE macros. Included by .cpp files only:
// .cu files must not see ATen (docs/architecture.md §4.3).
#pragma once

#include <ATen/ATen.h>

// The op name is the first argument of every macro so messages say which op refused the call.
#define SLM_CHECK(op, cond, ...) TORCH_CHECK((cond), op, ": ", __VA_ARGS__)

#define SLM_CHECK_DEFINED(op, x) SLM_CHECK(op, (x).defined(), #x " must be a tensor, got None")

#define SLM_CHECK_DEVICE(op, x, expected_device)                                   \
  SLM_CHECK(op, (x).device() == (expected_device), #x " must be on ", (expected_device), \
            " like the other inputs, got ", (x).device())

#define SLM_CHECK_CONTIGUOUS(op, x)                                                               \
  SLM_CHECK(op, (x).is_contiguous(), #x " must be contiguous, got sizes ", (x).sizes(), " strides ", \
            (x).strides())

#define SLM_CHECK_DTYPE(op, x, expected_dtype)                                                \
  SLM_CHECK(op, (x).scalar_type() == (expected_dtype), #x " must have dtype ", (expected_dtype), \
            ", got ", (x).scalar_type())

#define SLM_CHECK_FLOATING(op, x)                                                              \
  SLM_CHECK(op,                                                                                \
            (x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||          \
                (x).scalar_type() == at::kHalf || (x).scalar_type() == at::kDouble,           \
            #x " must be float32, bfloat16, float16 or float64, got ", (x).scalar_type())

#define SLM_CHECK_SAME_SHAPE(op, x, y)                                                             \
  SLM_CHECK(op, (x).sizes() == (y).sizes(), #x " must have the shape of " #y " ", (y).sizes(), \
            ", got ", (x).sizes())

#define SLM_CHECK_SHAPE(op, x, ...)                                                          \
  SLM_CHECK(op, (x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape ", \
            at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())
