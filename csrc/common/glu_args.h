// glu_args.h — argument checks and tensors -> params for the glu ops (SwiGLU / GeGLU), shared by
// the CPU kernel (csrc/cpu/glu.cpp) and the CUDA bindings (csrc/cuda/bindings.cpp), so that
// both refuse the same inputs with the same messages and allocate the same outputs.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

#include "checks.h"
#include "dtypes.h"
#include "params.h"

namespace slmfast {

inline GluActivation parse_glu_activation(const char* op, c10::string_view activation) {
  if (activation == "silu") return GluActivation::kSilu;
  if (activation == "gelu") return GluActivation::kGelu;
  if (activation == "gelu_tanh") return GluActivation::kGeluTanh;
  SLM_CHECK(op, false, "activation must be 'silu', 'gelu' or 'gelu_tanh', got '", std::string(activation), "'");
  return GluActivation::kSilu;  // unreachable
}

inline void check_glu_pair(const char* op, const at::Tensor& gate, const at::Tensor& up) {
  SLM_CHECK_FLOATING(op, gate);
  SLM_CHECK_CONTIGUOUS(op, gate);
  check_twin(op, up, "up", gate, "gate");
}

// Forward: allocates out (like gate) and fills the params.
inline at::Tensor glu_fwd_prepare(const char* op, const at::Tensor& gate, const at::Tensor& up,
                                  c10::string_view activation, GluParams& p) {
  check_glu_pair(op, gate, up);
  at::Tensor out = at::empty_like(gate);
  p = GluParams{};
  p.gate = gate.data_ptr();
  p.up = up.data_ptr();
  p.out = out.data_ptr();
  p.n = gate.numel();
  p.activation = parse_glu_activation(op, activation);
  p.dtype = to_dtype(gate.scalar_type());
  return out;
}

// Backward: allocates (dgate, dup, out) — out is empty unless recompute — and fills the params.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_bwd_prepare(
    const char* op, const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up,
    c10::string_view activation, bool recompute, GluParams& p) {
  check_glu_pair(op, gate, up);
  check_twin(op, dout, "dout", gate, "gate");
  at::Tensor dgate = at::empty_like(gate);
  at::Tensor dup = at::empty_like(up);
  at::Tensor out = recompute ? at::empty_like(gate) : at::empty({0}, gate.options());
  p = GluParams{};
  p.gate = gate.data_ptr();
  p.up = up.data_ptr();
  p.dout = dout.data_ptr();
  p.out = recompute ? out.data_ptr() : nullptr;
  p.dgate = dgate.data_ptr();
  p.dup = dup.data_ptr();
  p.n = gate.numel();
  p.activation = parse_glu_activation(op, activation);
  p.dtype = to_dtype(gate.scalar_type());
  return {dgate, dup, out};
}

}  // namespace slmfast
