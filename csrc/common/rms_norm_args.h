// rms_norm_args.h — argument checks and tensors -> params for the rms_norm ops, shared by the
// CPU kernel (csrc/cpu/rms_norm.cpp) and the CUDA bindings (csrc/cuda/bindings.cpp), so that
// both refuse the same inputs with the same messages and allocate the same outputs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "dtypes.h"
#include "norm_args.h"
#include "params.h"

namespace slmfast {

// Checks the forward's inputs, allocates (y, h, rstd) and fills the params struct.
// h is an empty tensor when there is no residual (the input x is then what backward needs).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd_prepare(
    const char* op, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& residual, double eps, double offset, RmsNormFwdParams& p) {
  check_norm_input(op, x, weight);
  SLM_CHECK(op, eps >= 0.0, "eps must be >= 0, got ", eps);
  const bool has_residual = check_residual(op, residual, x);
  auto [y, h] = norm_fwd_outputs(x, weight, residual, has_residual, eps, p);
  at::Tensor rstd = norm_row_stat(x);
  p.rstd = rstd.data_ptr();
  p.offset = offset;
  return {y, h, rstd};
}

// Checks the backward's inputs, allocates (dx, dweight, workspace) and fills the params struct.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_bwd_prepare(
    const char* op, const at::Tensor& dy, const std::optional<at::Tensor>& dh,
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& rstd, double offset,
    int64_t num_row_blocks, RmsNormBwdParams& p) {
  const bool has_dh = check_norm_grads(op, dy, dh, h, weight);
  const int64_t cols = h.size(-1);
  check_norm_row_stat(op, "rstd", rstd, h, h.numel() / cols);
  auto [dx, dweight] = norm_bwd_outputs(dy, dh, has_dh, h, weight, rstd, num_row_blocks, p);
  at::Tensor workspace = at::empty({num_row_blocks, cols}, h.options().dtype(acc_dtype(h.scalar_type())));
  p.dweight_partial = workspace.data_ptr();
  p.offset = offset;
  return {dx, dweight, workspace};
}

}  // namespace slmfast
