// bindings.cpp — CUDA implementations of the ops defined in csrc/slmfast.cpp.
//
// Tensors -> params -> launcher, nothing else: argument checks and output allocation are the
// same functions the CPU kernels use (csrc/common/*_args.h), the launchers live in the .cu files.
// Built only when torch has CUDA and nvcc is found (setup.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/rms_norm_args.h"

namespace slmfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd_cuda_op(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
    double eps, double offset) {
  const c10::cuda::CUDAGuard guard(x.device());
  RmsNormFwdParams p{};
  auto outputs = rms_norm_fwd_prepare("rms_norm_fwd", x, weight, residual, eps, offset, p);
  rms_norm_fwd_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  return outputs;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda_op(
    const at::Tensor& dy, const std::optional<at::Tensor>& dh, const at::Tensor& h,
    const at::Tensor& weight, const at::Tensor& rstd, double offset) {
  const c10::cuda::CUDAGuard guard(h.device());
  RmsNormBwdParams p{};
  const int64_t cols = h.dim() > 0 ? h.size(-1) : 0;
  const int64_t rows = cols > 0 ? h.numel() / cols : 0;
  auto [dx, dweight, workspace] = rms_norm_bwd_prepare(
      "rms_norm_bwd", dy, dh, h, weight, rstd, offset, rms_norm_bwd_num_row_blocks(rows, cols), p);
  if (rows == 0) {
    dweight.zero_();
  } else {
    rms_norm_bwd_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  }
  return {dx, dweight};
}

}  // namespace

TORCH_LIBRARY_IMPL(slmfast, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cuda_op);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cuda_op);
}

}  // namespace slmfast
