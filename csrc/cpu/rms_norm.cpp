// rms_norm.cpp — the CPU op slmfast::rms_norm_fwd / rms_norm_bwd (schemas in csrc/slmfast.cpp,
// contract in slmfast/ops/rms_norm.py): checks the arguments and allocates the outputs
// (csrc/common/rms_norm_args.h, shared with the CUDA bindings), then runs the vectorized kernel
// of the chosen capability (csrc/cpu/kernels/rms_norm.cpp, through kernel_table.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/rms_norm_args.h"
#include "alloc.h"
#include "kernel_table.h"
#include "row_blocks.h"

namespace slmfast::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
    double eps, double offset) {
  RmsNormFwdParams p{};
  auto outputs = rms_norm_fwd_prepare("rms_norm_fwd", x, weight, residual, eps, offset, p);
  advise_huge_pages(std::get<0>(outputs));  // y and h are fresh: see alloc.h
  advise_huge_pages(std::get<1>(outputs));
  if (p.rows > 0) kernels().rms_norm_fwd(p);
  return outputs;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(
    const at::Tensor& dy, const std::optional<at::Tensor>& dh, const at::Tensor& h,
    const at::Tensor& weight, const at::Tensor& rstd, double offset) {
  RmsNormBwdParams p{};
  const int64_t rows = h.size(-1) > 0 ? h.numel() / h.size(-1) : 0;
  auto [dx, dweight, workspace] =
      rms_norm_bwd_prepare("rms_norm_bwd", dy, dh, h, weight, rstd, offset, weight_grad_row_blocks(rows), p);
  advise_huge_pages(dx);
  if (p.rows > 0) {
    kernels().rms_norm_bwd(p);
  } else {
    dweight.zero_();
  }
  return {dx, dweight};
}

}  // namespace

TORCH_LIBRARY_IMPL(slmfast, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
}

}  // namespace slmfast::cpu
