// slmfast.cpp — the extension module slmfast._C.
//
// Two things live here and nowhere else:
//  * TORCH_LIBRARY(slmfast, m): the schema of every C++ op, defined once. Kernels register
//    against these names from csrc/cpu/<op>.cpp (CPU) and csrc/cuda/bindings.cpp (CUDA); the
//    fake (meta) functions and autograd formulas are registered from Python in
//    slmfast/ops/<op>.py, as in PyTorch's "custom C++ and CUDA operators" tutorial.
//  * PYBIND11_MODULE(_C, m): build_info(), what this binary was compiled with. This is the only
//    file that includes <torch/extension.h> (pybind11), because that header alone takes ~30 s
//    to compile (docs/architecture.md §1).
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "cpu/capability.h"

// setup.py passes these as bare tokens (quotes do not survive the ninja command line).
#define SLMFAST_STR(...) #__VA_ARGS__
#define SLMFAST_XSTR(...) SLMFAST_STR(__VA_ARGS__)
#ifndef SLMFAST_VERSION
#define SLMFAST_VERSION unknown
#endif
#ifndef SLMFAST_CUDA_ARCHS
#define SLMFAST_CUDA_ARCHS
#endif

TORCH_LIBRARY(slmfast, m) {
  // rms_norm (slmfast/ops/rms_norm.py): h = x + residual, y = h * rstd * (offset + weight).
  // h is an empty tensor when residual is None; rstd has x's leading shape.
  m.def("rms_norm_fwd(Tensor x, Tensor weight, Tensor? residual, float eps, float offset)"
        " -> (Tensor y, Tensor h, Tensor rstd)");
  // Gradients from the saved residual stream h (or x) and rstd; dh is the gradient of the h output.
  m.def("rms_norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor weight, Tensor rstd, float offset)"
        " -> (Tensor dx, Tensor dweight)");
  // layer_norm (slmfast/ops/layer_norm.py): h = x + residual, y = (h - mean) * rstd * weight + bias;
  // h is empty without a residual; mean and rstd have x's leading shape. dbias is always returned.
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, float eps)"
        " -> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  m.def("layer_norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor weight, Tensor mean, Tensor rstd)"
        " -> (Tensor dx, Tensor dweight, Tensor dbias)");
  // glu (slmfast/ops/glu.py): out = act(gate) * up, act in {"silu", "gelu", "gelu_tanh"}.
  // The backward recomputes act(gate); with recompute=True it also returns out (else empty).
  m.def("glu_fwd(Tensor gate, Tensor up, str activation) -> Tensor");
  m.def("glu_bwd(Tensor dout, Tensor gate, Tensor up, str activation, bool recompute)"
        " -> (Tensor dgate, Tensor dup, Tensor out)");
  // rotary (slmfast/ops/rotary.py): q (B, Hq, T, D), k (B, Hkv, T, D) with a contiguous last dim,
  // cos/sin (B or 1, T, R); conjugate rotates backwards (the gradient). rotary_ works in place.
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved, bool conjugate)"
        " -> (Tensor q_out, Tensor k_out)");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, bool interleaved, bool conjugate) -> ()");
  // cross_entropy (slmfast/ops/cross_entropy.py): row-wise softmax cross-entropy of (rows, V)
  // logits; loss (rows,) and stats (rows, 2) = (max, log sum exp(z - max)) in float32 (float64 for
  // fp64). softcap 0: none.
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, float label_smoothing,"
        " float z_loss, float softcap) -> (Tensor loss, Tensor stats)");
  m.def("cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor stats, int ignore_index,"
        " float label_smoothing, float z_loss, float softcap) -> Tensor");
  // The same, the gradient written over logits (flash-attention's inplace_backward).
  m.def("cross_entropy_bwd_(Tensor grad_loss, Tensor(a!) logits, Tensor target, Tensor stats, int ignore_index,"
        " float label_smoothing, float z_loss, float softcap) -> ()");
  // Loss and gradient (times grad_scale, per row or one value) at once, the gradient over logits:
  // the fused step of the chunked linear cross-entropy (slmfast/ops/linear_cross_entropy.py).
  m.def("cross_entropy_fwd_bwd_(Tensor(a!) logits, Tensor target, Tensor grad_scale, int ignore_index,"
        " float label_smoothing, float z_loss, float softcap) -> (Tensor loss, Tensor stats)");
  // distillation (slmfast/ops/distill_loss.py) between (rows, V) student and teacher logits;
  // kind 0 forward_kl, 1 reverse_kl, 2 jsd, 3 tvd; stats (rows, 7) feed the backward (CPU only).
  m.def("distill_fwd(Tensor student, Tensor teacher, Tensor? target, int kind, float beta, float temperature,"
        " float hard_weight, int ignore_index) -> (Tensor loss, Tensor stats)");
  m.def("distill_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? target, Tensor stats, int kind,"
        " float beta, float temperature, float hard_weight, int ignore_index) -> Tensor");
  m.def("distill_fwd_bwd_(Tensor(a!) student, Tensor teacher, Tensor? target, Tensor grad_scale, int kind,"
        " float beta, float temperature, float hard_weight, int ignore_index) -> Tensor loss");
  // acc_t (H, V) += hidden (K, H)^T @ dlogits (K, V), a float32 acc_t for bf16/fp16 operands (CPU
  // only): the transposed LM-head gradient of one chunk of the chunked losses (csrc/cpu/loss_gemm.cpp).
  m.def("loss_grad_weight_acc_(Tensor(a!) acc_t, Tensor dlogits, Tensor hidden) -> ()");
  // attention (slmfast/ops/attention.py): softmax(scale * q k^T, masked) v, FlashAttention-2
  // style; dense q (B, Hq, T, D), k/v (B, Hkv, S, D), or packed q (Nq, Hq, D), k/v (Nk, Hkv, D)
  // with cu_seqlens; lse float32 has q's shape without D. Masks bottom-right aligned; window
  // bounds -1 = unlimited. Backward from q, k, v, out and lse only.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale, bool causal, int window_left,"
        " int window_right, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q,"
        " int max_seqlen_k) -> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale,"
        " bool causal, int window_left, int window_right, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k,"
        " int max_seqlen_q, int max_seqlen_k, bool deterministic) -> (Tensor dq, Tensor dk, Tensor dv)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = SLMFAST_XSTR(SLMFAST_VERSION);
#if defined(SLMFAST_WITH_CUDA)
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(SLMFAST_XSTR(SLMFAST_CUDA_ARCHS));
#if defined(_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  info["compiler"] = std::string("msvc ") + std::to_string(_MSC_VER);
#else
  info["compiler"] = "unknown";
#endif
  info["torch"] = TORCH_VERSION;  // from torch/version.h
  return info;
}

pybind11::list capability_names(const std::vector<slmfast::cpu::Capability>& caps) {
  pybind11::list out;
  for (const auto c : caps) out.append(slmfast::cpu::capability_name(c));
  return out;
}

// {"compiled": [...], "supported": [...], "chosen": name}: see csrc/cpu/capability.h.
pybind11::dict cpu_capability_info() {
  pybind11::dict info;
  info["compiled"] = capability_names(slmfast::cpu::compiled_capabilities());
  info["supported"] = capability_names(slmfast::cpu::supported_capabilities());
  info["chosen"] = slmfast::cpu::capability_name(slmfast::cpu::chosen_capability());
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "slmfast C++/CUDA kernels; ops are registered under torch.ops.slmfast";
  m.def("build_info", &build_info,
        "What this extension was compiled with: version, CUDA archs, OpenMP, compiler, torch.");
  m.def("cpu_capability_info", &cpu_capability_info,
        "The CPU kernels' vector ISAs: compiled, supported by this CPU, and chosen (lowest first).");
  m.def("set_cpu_capability", &slmfast::cpu::set_cpu_capability, pybind11::arg("name"),
        "Run the CPU kernels with capability `name` (default, avx2, avx512) from now on; returns the "
        "previous choice. Raises when this build or this CPU lacks it.");
}
