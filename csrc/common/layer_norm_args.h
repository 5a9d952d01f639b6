// layer_norm_args.h — argument checks and tensors -> params for the layer_norm ops (used by the
// CPU kernel, csrc/cpu/layer_norm.cpp; kept apart from it as for the other ops, so that a CUDA
// binding would refuse the same inputs with the same messages).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "dtypes.h"
#include "norm_args.h"
#include "params.h"

namespace slmfast {

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_prepare(
    const char* op, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, double eps, LayerNormFwdParams& p) {
  check_norm_input(op, x, weight);  // weight: (cols,), x's dtype or float32 for bf16/fp16 x
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_twin(op, *bias, "b", weight, "weight");
  SLM_CHECK(op, eps >= 0.0, "eps must be >= 0, got ", eps);
  const bool has_residual = check_residual(op, residual, x);
  p = LayerNormFwdParams{};
  auto [y, h] = norm_fwd_outputs(x, weight, residual, has_residual, eps, p);
  at::Tensor mean = norm_row_stat(x);
  at::Tensor rstd = norm_row_stat(x);
  p.bias = has_bias ? bias->data_ptr() : nullptr;
  p.mean = mean.data_ptr();
  p.rstd = rstd.data_ptr();
  return {y, h, mean, rstd};
}

// Allocates (dx, dweight, dbias, workspace) and fills the params.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_prepare(
    const char* op, const at::Tensor& dy, const std::optional<at::Tensor>& dh, const at::Tensor& h,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_row_blocks,
    LayerNormBwdParams& p) {
  const bool has_dh = check_norm_grads(op, dy, dh, h, weight);
  const int64_t cols = h.size(-1);
  check_norm_row_stat(op, "mean", mean, h, h.numel() / cols);
  check_norm_row_stat(op, "rstd", rstd, h, h.numel() / cols);
  p = LayerNormBwdParams{};
  auto [dx, dweight] = norm_bwd_outputs(dy, dh, has_dh, h, weight, rstd, num_row_blocks, p);
  at::Tensor dbias = at::empty_like(weight);
  at::Tensor workspace = at::empty({num_row_blocks, 2, cols}, h.options().dtype(acc_dtype(h.scalar_type())));
  p.mean = mean.data_ptr();
  p.partial = workspace.data_ptr();
  p.dbias = dbias.data_ptr();
  return {dx, dweight, dbias, workspace};
}

}  // namespace slmfast
