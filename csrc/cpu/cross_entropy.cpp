// cross_entropy.cpp — the CPU ops slmfast::cross_entropy_fwd / _bwd / _bwd_ / _fwd_bwd_ (schemas in
// csrc/slmfast.cpp, contract in slmfast/ops/cross_entropy.py; the math is in csrc/common/params.h,
// CrossEntropyParams): check the arguments and allocate the outputs (csrc/common/cross_entropy_args.h,
// shared with the CUDA bindings), then run the vectorized kernel of the chosen capability
// (csrc/cpu/kernels/cross_entropy.cpp, through kernel_table.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/cross_entropy_args.h"
#include "kernel_table.h"

namespace slmfast::cpu {
namespace {

void run_ce(const CrossEntropyParams& p) {
  if (p.rows > 0) kernels().cross_entropy(p);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                         int64_t ignore_index, double label_smoothing,
                                                         double z_loss, double softcap) {
  CrossEntropyParams p{};
  auto out = cross_entropy_fwd_prepare("cross_entropy_fwd", logits, target, ignore_index, label_smoothing,
                                       z_loss, softcap, p);
  run_ce(p);
  return out;
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                 const at::Tensor& stats, int64_t ignore_index, double label_smoothing,
                                 double z_loss, double softcap) {
  CrossEntropyParams p{};
  at::Tensor dlogits = at::empty(logits.sizes(), logits.options());
  cross_entropy_bwd_prepare("cross_entropy_bwd", grad_loss, logits, target, stats, dlogits, ignore_index,
                            label_smoothing, z_loss, softcap, p);
  run_ce(p);
  return dlogits;
}

void cross_entropy_bwd_inplace_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                   const at::Tensor& stats, int64_t ignore_index, double label_smoothing,
                                   double z_loss, double softcap) {
  CrossEntropyParams p{};
  cross_entropy_bwd_prepare("cross_entropy_bwd_", grad_loss, logits, target, stats, logits, ignore_index,
                            label_smoothing, z_loss, softcap, p);
  run_ce(p);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_bwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                             const at::Tensor& grad_scale, int64_t ignore_index,
                                                             double label_smoothing, double z_loss,
                                                             double softcap) {
  CrossEntropyParams p{};
  auto out = cross_entropy_fwd_bwd_prepare("cross_entropy_fwd_bwd_", logits, target, grad_scale, ignore_index,
                                           label_smoothing, z_loss, softcap, p);
  run_ce(p);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slmfast, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
  m.impl("cross_entropy_bwd_", &cross_entropy_bwd_inplace_cpu);
  m.impl("cross_entropy_fwd_bwd_", &cross_entropy_fwd_bwd_cpu);
}

}  // namespace slmfast::cpu
