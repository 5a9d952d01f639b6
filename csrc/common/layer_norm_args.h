// layer_norm_args.h — argument checks and tensors -> params for the layer_norm ops (used by the
// CPU kernel, csrc/cpu/layer_norm.cpp; kept apart from it as for the other ops, so that a CUDA
// binding would refuse the same inputs with the same messages).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "params.h"
#include "rms_norm_args.h"  // to_dtype, acc_dtype, check_rms_norm_weight, check_residual

namespace slmfast {

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_prepare(
    const char* op, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, double eps, LayerNormFwdParams& p) {
  SLM_CHECK_FLOATING(op, x);
  SLM_CHECK_CONTIGUOUS(op, x);
  SLM_CHECK(op, x.dim() >= 1 && x.size(-1) > 0,
            "x must have at least one dimension and a non-empty last dimension, got ", x.sizes());
  check_rms_norm_weight(op, x, weight);  // (cols,), x's dtype or float32 for bf16/fp16 x
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    const at::Tensor& b = *bias;
    SLM_CHECK_DEVICE(op, b, x.device());
    SLM_CHECK_SAME_SHAPE(op, b, weight);
    SLM_CHECK_DTYPE(op, b, weight.scalar_type());
    SLM_CHECK_CONTIGUOUS(op, b);
  }
  SLM_CHECK(op, eps >= 0.0, "eps must be >= 0, got ", eps);
  const bool has_residual = check_residual(op, residual, x);
  const int64_t cols = x.size(-1);
  const int64_t rows = x.numel() / cols;
  at::Tensor y = at::empty_like(x);
  at::Tensor h = has_residual ? at::empty_like(x) : at::empty({0}, x.options());
  auto row_shape = x.sizes().slice(0, x.dim() - 1);
  const auto stat_options = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor mean = at::empty(row_shape, stat_options);
  at::Tensor rstd = at::empty(row_shape, stat_options);

  p = LayerNormFwdParams{};
  p.x = x.data_ptr();
  p.residual = has_residual ? residual->data_ptr() : nullptr;
  p.weight = weight.data_ptr();
  p.bias = has_bias ? bias->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.h = has_residual ? h.data_ptr() : nullptr;
  p.mean = mean.data_ptr();
  p.rstd = rstd.data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.eps = eps;
  p.x_dtype = to_dtype(x.scalar_type());
  p.weight_dtype = to_dtype(weight.scalar_type());
  return {y, h, mean, rstd};
}

// Allocates (dx, dweight, dbias, workspace) and fills the params.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_prepare(
    const char* op, const at::Tensor& dy, const std::optional<at::Tensor>& dh, const at::Tensor& h,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_row_blocks,
    LayerNormBwdParams& p) {
  SLM_CHECK_FLOATING(op, h);
  SLM_CHECK_CONTIGUOUS(op, h);
  SLM_CHECK(op, h.dim() >= 1 && h.size(-1) > 0, "h must have a non-empty last dimension, got ", h.sizes());
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
  for (const at::Tensor* stat : {&mean, &rstd}) {
    const char* name = stat == &mean ? "mean" : "rstd";
    SLM_CHECK(op, stat->device() == h.device(), name, " must be on ", h.device(), ", got ", stat->device());
    SLM_CHECK(op, stat->scalar_type() == acc_dtype(h.scalar_type()), name, " must have dtype ",
              acc_dtype(h.scalar_type()), ", got ", stat->scalar_type());
    SLM_CHECK(op, stat->numel() == rows && stat->is_contiguous(), name, " must be a contiguous tensor of ",
              rows, " elements (one per row of h), got sizes ", stat->sizes());
  }
  at::Tensor dx = at::empty_like(h);
  at::Tensor dweight = at::empty_like(weight);
  at::Tensor dbias = at::empty_like(weight);
  at::Tensor workspace = at::empty({num_row_blocks, 2, cols}, h.options().dtype(acc_dtype(h.scalar_type())));
  p = LayerNormBwdParams{};
  p.dy = dy.data_ptr();
  p.dh_in = has_dh ? dh->data_ptr() : nullptr;
  p.h = h.data_ptr();
  p.weight = weight.data_ptr();
  p.mean = mean.data_ptr();
  p.rstd = rstd.data_ptr();
  p.dx = dx.data_ptr();
  p.partial = workspace.data_ptr();
  p.dweight = dweight.data_ptr();
  p.dbias = dbias.data_ptr();
  p.rows = rows;
  p.cols = cols;
  p.num_row_blocks = num_row_blocks;
  p.x_dtype = to_dtype(h.scalar_type());
  p.weight_dtype = to_dtype(weight.scalar_type());
  return {dx, dweight, dbias, workspace};
}

}  // namespace slmfast
