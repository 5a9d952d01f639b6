// layer_norm.cpp — the CPU op slmfast::layer_norm_fwd / layer_norm_bwd (schemas in
// csrc/slmfast.cpp, contract in slmfast/ops/layer_norm.py): checks the arguments and allocates the
// outputs (csrc/common/layer_norm_args.h), then runs the vectorized kernel of the chosen
// capability (csrc/cpu/kernels/layer_norm.cpp, through kernel_table.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/layer_norm_args.h"
#include "alloc.h"
#include "kernel_table.h"
#include "row_blocks.h"

namespace slmfast::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, double eps) {
  LayerNormFwdParams p{};
  auto outputs = layer_norm_fwd_prepare("layer_norm_fwd", x, weight, bias, residual, eps, p);
  advise_huge_pages(std::get<0>(outputs));  // y and h are fresh: see alloc.h
  advise_huge_pages(std::get<1>(outputs));
  if (p.rows > 0) kernels().layer_norm_fwd(p);
  return outputs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy, const std::optional<at::Tensor>& dh, const at::Tensor& h, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd) {
  LayerNormBwdParams p{};
  const int64_t rows = h.dim() >= 1 && h.size(-1) > 0 ? h.numel() / h.size(-1) : 0;
  auto [dx, dweight, dbias, workspace] = layer_norm_bwd_prepare(
      "layer_norm_bwd", dy, dh, h, weight, mean, rstd, weight_grad_row_blocks(rows), p);
  advise_huge_pages(dx);
  if (p.rows > 0) {
    kernels().layer_norm_bwd(p);
  } else {
    dweight.zero_();
    dbias.zero_();
  }
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(slmfast, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace slmfast::cpu
