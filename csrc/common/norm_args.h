// norm_args.h — what the two norms' argument steps share (rms_norm_args.h, layer_norm_args.h):
// the checks of x and its weight, of the optional residual of the fused "add then normalize", of
// the backward's h with its incoming gradients and of the per-row statistics the forward saved,
// and the outputs and params fields both allocate and fill. Kept apart from either op's header
// so that neither includes the other's.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "dtypes.h"

namespace slmfast {

// weight: (cols,) on x's device, contiguous, in x's dtype or float32 for bf16/fp16 x.
inline void check_norm_weight(const char* op, const at::Tensor& x, const at::Tensor& weight) {
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

// The forward's x (floating, contiguous, a non-empty last dimension) and its weight.
inline void check_norm_input(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  SLM_CHECK_FLOATING(op, x);
  SLM_CHECK_CONTIGUOUS(op, x);
  SLM_CHECK(op, x.dim() >= 1 && x.size(-1) > 0,
            "x must have at least one dimension and a non-empty last dimension, got ", x.sizes());
  check_norm_weight(op, x, weight);
}

// The residual of a fused "add then normalize": absent, or x's twin. Returns whether it is given.
inline bool check_residual(const char* op, const std::optional<at::Tensor>& residual, const at::Tensor& x) {
  if (!residual.has_value() || !residual->defined()) return false;
  check_twin(op, *residual, "r", x, "x");
  return true;
}

// The backward's h (the saved residual stream) and its weight, the gradient dy of y (h's twin)
// and the optional gradient dh of the h output (absent, or h's twin). Returns whether dh is given.
inline bool check_norm_grads(const char* op, const at::Tensor& dy, const std::optional<at::Tensor>& dh,
                             const at::Tensor& h, const at::Tensor& weight) {
  SLM_CHECK_FLOATING(op, h);
  SLM_CHECK_CONTIGUOUS(op, h);
  SLM_CHECK(op, h.dim() >= 1 && h.size(-1) > 0, "h must have a non-empty last dimension, got ", h.sizes());
  check_norm_weight(op, h, weight);
  check_twin(op, dy, "dy", h, "h");
  const bool has_dh = dh.has_value() && dh->defined();
  if (has_dh) check_twin(op, *dh, "dh", h, "h");
  return has_dh;
}

// A per-row statistic the forward saved (rstd, mean), called `name`: on h's device, in the
// accumulation dtype of h, contiguous, one value per row.
inline void check_norm_row_stat(const char* op, const char* name, const at::Tensor& stat, const at::Tensor& h,
                                int64_t rows) {
  SLM_CHECK(op, stat.device() == h.device(), name, " must be on ", h.device(), " like the other inputs, got ",
            stat.device());
  SLM_CHECK(op, stat.scalar_type() == acc_dtype(h.scalar_type()), name, " must have dtype ",
            acc_dtype(h.scalar_type()), ", got ", stat.scalar_type());
  SLM_CHECK(op, stat.numel() == rows && stat.is_contiguous(), name, " must be a contiguous tensor of ", rows,
            " elements (one per row of h), got sizes ", stat.sizes());
}

// A per-row statistic for the forward to fill (x's leading dimensions, accumulation dtype).
inline at::Tensor norm_row_stat(const at::Tensor& x) {
  return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_dtype(x.scalar_type())));
}

// The sizes and dtypes every norm's params have: rows and cols of x (h in the backward), the
// dtypes of x and of the weight.
template <typename Params>
inline void fill_norm_sizes(Params& p, const at::Tensor& x, const at::Tensor& weight) {
  p.cols = x.size(-1);
  p.rows = x.numel() / p.cols;
  p.x_dtype = to_dtype(x.scalar_type());
  p.weight_dtype = to_dtype(weight.scalar_type());
}

// The forward's outputs y and h (h empty without a residual: x is then what backward needs), and
// the fields every norm's forward params have (RmsNormFwdParams, LayerNormFwdParams) but the
// statistics. Called after the checks.
template <typename Params>
inline std::tuple<at::Tensor, at::Tensor> norm_fwd_outputs(const at::Tensor& x, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& residual,
                                                           bool has_residual, double eps, Params& p) {
  at::Tensor y = at::empty_like(x);
  at::Tensor h = has_residual ? at::empty_like(x) : at::empty({0}, x.options());
  p.x = x.data_ptr();
  p.residual = has_residual ? residual->data_ptr() : nullptr;
  p.weight = weight.data_ptr();
  p.y = y.data_ptr();
  p.h = has_residual ? h.data_ptr() : nullptr;
  p.eps = eps;
  fill_norm_sizes(p, x, weight);
  return {y, h};
}

// The backward's dx and dweight, and the fields every norm's backward params have
// (RmsNormBwdParams, LayerNormBwdParams) but the workspace and the op's own statistics and
// outputs. Called after the checks; dh is used when has_dh.
template <typename Params>
inline std::tuple<at::Tensor, at::Tensor> norm_bwd_outputs(const at::Tensor& dy, const std::optional<at::Tensor>& dh,
                                                           bool has_dh, const at::Tensor& h, const at::Tensor& weight,
                                                           const at::Tensor& rstd, int64_t num_row_blocks, Params& p) {
  at::Tensor dx = at::empty_like(h);
  at::Tensor dweight = at::empty_like(weight);
  p.dy = dy.data_ptr();
  p.dh_in = has_dh ? dh->data_ptr() : nullptr;
  p.h = h.data_ptr();
  p.weight = weight.data_ptr();
  p.rstd = rstd.data_ptr();
  p.dx = dx.data_ptr();
  p.dweight = dweight.data_ptr();
  p.num_row_blocks = num_row_blocks;
  fill_norm_sizes(p, h, weight);
  return {dx, dweight};
}

}  // namespace slmfast
