// rms_norm_args.h — argument checks and tensors -> params for the rms_norm ops, shared by the
// CPU kernel (csrc/cpu/rms_norm.cpp) and the CUDA bindings (csrc/cuda/bindings.cpp), so that
// both refuse the same inputs with the same messages and allocate the same outputs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

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

// The dtype of per-row statistics and of the dweight workspace: float32, float64 for fp64 x.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_rms_norm_weight(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  SLM_CHECK_DEVICE(op, weight, x.device());
  SLM_CHECK_CONTIGUOUS(op, weight);
  SLM_CHECK(op, weight.dim() == 1 && weight.size(0) == x.size(-1),
            "weight must have shape (", x.size(-1), ",) to match the last dimension of x ",
            x.sizes(), ", got ", weight.sizes());
  const bool reduced = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  SLM_CHECK(op, weight.scalar_type() == x.scalar_type() || (reduced && weight.scalar_type() == at::kFloat),
            "weight must have the dtype of x (", x.scalar_type(), ")",
            reduced ? " or float32" : "", ", got ", weight.scalar_type());
}

// The residual of a fused "add then normalize" (rms_norm, layer_norm): absent, or x's twin
// (device, shape, dtype, contiguous). Returns whether it is given.
inline bool check_residual(const char* op, const std::optional<at::Tensor>& residual, const at::Tensor& x) {
  if (!residual.has_value() || !residual->defined()) return false;
  const at::Tensor& r = *residual;
  SLM_CHECK_DEVICE(op, r, x.device());
  SLM_CHECK_SAME_SHAPE(op, r, x);
  SLM_CHECK_DTYPE(op, r, x.scalar_type());
  SLM_CHECK_CONTIGUOUS(op, r);
  return true;
}

// Checks the forward's inputs, allocates (y, h, rstd) and fills the params struct.
// h is an empty tensor when there is no residual (the input x is then what backward needs).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd_prepare(
    const char* op, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& residual, double eps, double offset, RmsNormFwdParams& p) {
  SLM_CHECK_FLOATING(op, x);
  SLM_CHECK_CONTIGUOUS(op, x);
  SLM_CHECK(op, x.dim() >= 1 && x.size(-1) > 0,
            "x must have at least one dimension and a non-empty last dimension, got ", x.sizes());
  check_rms_norm_weight(op, x, weight);
  SLM_CHECK(op, eps >= 0.0, "eps must be >= 0, got ", eps);
  const bool has_residual = check_residual(op, residual, x);
  const int64_t cols = x.size(-1);
  const int64_t rows = x.numel() / cols;
  at::Tensor y = at::empty_like(x);
  at::Tensor h = has_residual ? at::empty_like(x) : at::empty({0}, x.options());
  auto row_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor rstd = at::empty(row_shape, x.options().dtype(acc_dtype(x.scalar_type())));

  p.x = x.data_ptr();
  p.residual = has_residual ? residual->data_ptr() : nullptr;
  p.weight = weight.data_ptr();
  p.y = y.data_ptr();
  p.h = has_residual ? h.data_ptr() : nullptr;
  p.rstd = rstd.data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.eps = eps;
  p.offset = offset;
  p.x_dtype = to_dtype(x.scalar_type());
  p.weight_dtype = to_dtype(weight.scalar_type());
  return {y, h, rstd};
}

// Checks the backward's inputs, allocates (dx, dweight, workspace) and fills the params struct.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_bwd_prepare(
    const char* op, const at::Tensor& dy, const std::optional<at::Tensor>& dh,
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& rstd, double offset,
    int64_t num_row_blocks, RmsNormBwdParams& p) {
  SLM_CHECK_FLOATING(op, h);
  SLM_CHECK_CONTIGUOUS(op, h);
  SLM_CHECK(op, h.dim() >= 1 && h.size(-1) > 0, "h must have a non-empty last dimension, got ",
            h.sizes());
  check_rms_norm_weight(op, h, weight);
  SLM_CHECK_DEVICE(op, dy, h.device());
  SLM_CHECK_SAME_SHAPE(op, dy, h);
  SLM_CHECK_DTYPE(op, dy, h.scalar_type());
  SLM_CHECK_CONTIGUOUS(op, dy);
  const bool has_dh = dh.has_value() && dh->defined();
  if (has_dh) {
    SLM_CHECK_DEVICE(op, (*dh), h.device());
    SLM_CHECK_SAME_SHAPE(op, (*dh), h);
    SLM_CHECK_DTYPE(op, (*dh), h.scalar_type());
    SLM_CHECK_CONTIGUOUS(op, (*dh));
  }
  const int64_t cols = h.size(-1);
  const int64_t rows = h.numel() / cols;
  SLM_CHECK_DEVICE(op, rstd, h.device());
  SLM_CHECK_DTYPE(op, rstd, acc_dtype(h.scalar_type()));
  SLM_CHECK(op, rstd.numel() == rows && rstd.is_contiguous(),
            "rstd must be a contiguous tensor of ", rows, " elements (one per row of h), got sizes ",
            rstd.sizes());

  at::Tensor dx = at::empty_like(h);
  at::Tensor dweight = at::empty_like(weight);
  at::Tensor workspace =
      at::empty({num_row_blocks, cols}, h.options().dtype(acc_dtype(h.scalar_type())));
  p.dy = dy.data_ptr();
  p.dh_in = has_dh ? dh->data_ptr() : nullptr;
  p.h = h.data_ptr();
  p.weight = weight.data_ptr();
  p.rstd = rstd.data_ptr();
  p.dx = dx.data_ptr();
  p.dweight_partial = workspace.data_ptr();
  p.dweight = dweight.data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.num_row_blocks = num_row_blocks;
  p.offset = offset;
  p.x_dtype = to_dtype(h.scalar_type());
  p.weight_dtype = to_dtype(weight.scalar_type());
  return {dx, dweight, workspace};
}

}  // namespace slmfast
