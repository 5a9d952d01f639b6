// rotary.cpp — the CPU op slmfast::rotary / rotary_ (RoPE of q and k, out of place or in place;
// schemas in csrc/slmfast.cpp, contract in slmfast/ops/rotary.py): checks the arguments
// (csrc/common/rotary_args.h), then runs the vectorized kernel of the chosen capability
// (csrc/cpu/kernels/rotary.cpp, through kernel_table.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/rotary_args.h"
#include "alloc.h"
#include "kernel_table.h"

namespace slmfast::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> rotary_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                              const at::Tensor& sin, bool interleaved, bool conjugate) {
  RotaryParams p{};
  auto outputs = rotary_prepare("rotary", q, k, cos, sin, interleaved, conjugate, p);
  advise_huge_pages(std::get<0>(outputs));  // fresh outputs: see alloc.h
  advise_huge_pages(std::get<1>(outputs));
  kernels().rotary(p);
  return outputs;
}

void rotary_inplace_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                        bool interleaved, bool conjugate) {
  RotaryParams p{};
  rotary_inplace_prepare("rotary_", q, k, cos, sin, interleaved, conjugate, p);
  kernels().rotary(p);
}

}  // namespace

TORCH_LIBRARY_IMPL(slmfast, CPU, m) {
  m.impl("rotary", &rotary_cpu);
  m.impl("rotary_", &rotary_inplace_cpu);
}

}  // namespace slmfast::cpu
