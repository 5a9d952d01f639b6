// glu.cpp — the CPU op slmfast::glu_fwd / glu_bwd (SwiGLU, GeGLU; schemas in csrc/slmfast.cpp,
// contract in slmfast/ops/glu.py): checks the arguments and allocates the outputs
// (csrc/common/glu_args.h), then runs the vectorized kernel of the chosen capability
// (csrc/cpu/kernels/glu.cpp, through kernel_table.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/glu_args.h"
#include "alloc.h"
#include "kernel_table.h"

namespace slmfast::cpu {
namespace {

at::Tensor glu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation) {
  GluParams p{};
  at::Tensor out = glu_fwd_prepare("glu_fwd", gate, up, activation, p);
  advise_huge_pages(out);  // fresh output: see alloc.h
  if (p.n > 0) kernels().glu_fwd(p);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_bwd_cpu(const at::Tensor& dout, const at::Tensor& gate,
                                                           const at::Tensor& up, c10::string_view activation,
                                                           bool recompute) {
  GluParams p{};
  auto outputs = glu_bwd_prepare("glu_bwd", dout, gate, up, activation, recompute, p);  // p.out set iff recompute
  advise_huge_pages(std::get<0>(outputs));
  advise_huge_pages(std::get<1>(outputs));
  advise_huge_pages(std::get<2>(outputs));
  if (p.n > 0) kernels().glu_bwd(p);
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(slmfast, CPU, m) {
  m.impl("glu_fwd", &glu_fwd_cpu);
  m.impl("glu_bwd", &glu_bwd_cpu);
}

}  // namespace slmfast::cpu
