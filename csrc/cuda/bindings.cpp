// bindings.cpp — CUDA implementations of the ops defined in csrc/slmfast.cpp.
//
// Tensors -> params -> launcher, nothing else: argument checks and output allocation are the
// same functions the CPU kernels use (csrc/common/*_args.h), the launchers live in the .cu files.
// Built only when torch has CUDA and nvcc is found (setup.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/attention_args.h"
#include "../common/cross_entropy_args.h"
#include "../common/glu_args.h"
#include "../common/rms_norm_args.h"
#include "../common/rotary_args.h"

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

// ---- glu: SwiGLU / GeGLU (csrc/cuda/glu.cu) ----
at::Tensor glu_fwd_cuda_op(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation) {
  const c10::cuda::CUDAGuard guard(gate.device());
  GluParams p{};
  at::Tensor out = glu_fwd_prepare("glu_fwd", gate, up, activation, p);
  glu_fwd_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_bwd_cuda_op(const at::Tensor& dout, const at::Tensor& gate,
                                                               const at::Tensor& up, c10::string_view activation,
                                                               bool recompute) {
  const c10::cuda::CUDAGuard guard(gate.device());
  GluParams p{};
  auto outputs = glu_bwd_prepare("glu_bwd", dout, gate, up, activation, recompute, p);
  glu_bwd_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  return outputs;
}

// ---- rotary (csrc/cuda/rotary.cu) ----
std::tuple<at::Tensor, at::Tensor> rotary_cuda_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                  const at::Tensor& sin, bool interleaved, bool conjugate) {
  const c10::cuda::CUDAGuard guard(q.device());
  RotaryParams p{};
  auto outputs = rotary_prepare("rotary", q, k, cos, sin, interleaved, conjugate, p);
  rotary_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  return outputs;
}

void rotary_inplace_cuda_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                            bool interleaved, bool conjugate) {
  const c10::cuda::CUDAGuard guard(q.device());
  RotaryParams p{};
  rotary_inplace_prepare("rotary_", q, k, cos, sin, interleaved, conjugate, p);
  rotary_cuda(p, at::cuda::getCurrentCUDAStream().stream());
}

// ---- cross_entropy (csrc/cuda/cross_entropy.cu) ----
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cuda_op(const at::Tensor& logits, const at::Tensor& target,
                                                             int64_t ignore_index, double label_smoothing,
                                                             double z_loss, double softcap) {
  const c10::cuda::CUDAGuard guard(logits.device());
  CrossEntropyParams p{};
  auto out = cross_entropy_fwd_prepare("cross_entropy_fwd", logits, target, ignore_index, label_smoothing,
                                       z_loss, softcap, p);
  cross_entropy_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  return out;
}

at::Tensor cross_entropy_bwd_cuda_op(const at::Tensor& grad_loss, const at::Tensor& logits,
                                     const at::Tensor& target, const at::Tensor& lse, int64_t ignore_index,
                                     double label_smoothing, double z_loss, double softcap) {
  const c10::cuda::CUDAGuard guard(logits.device());
  CrossEntropyParams p{};
  at::Tensor dlogits = at::empty(logits.sizes(), logits.options());
  cross_entropy_bwd_prepare("cross_entropy_bwd", grad_loss, logits, target, lse, dlogits, ignore_index,
                            label_smoothing, z_loss, softcap, p);
  cross_entropy_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  return dlogits;
}

void cross_entropy_bwd_inplace_cuda_op(const at::Tensor& grad_loss, const at::Tensor& logits,
                                       const at::Tensor& target, const at::Tensor& lse, int64_t ignore_index,
                                       double label_smoothing, double z_loss, double softcap) {
  const c10::cuda::CUDAGuard guard(logits.device());
  CrossEntropyParams p{};
  cross_entropy_bwd_prepare("cross_entropy_bwd_", grad_loss, logits, target, lse, logits, ignore_index,
                            label_smoothing, z_loss, softcap, p);
  cross_entropy_cuda(p, at::cuda::getCurrentCUDAStream().stream());
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_bwd_cuda_op(const at::Tensor& logits, const at::Tensor& target,
                                                                 const at::Tensor& grad_scale, int64_t ignore_index,
                                                                 double label_smoothing, double z_loss,
                                                                 double softcap) {
  const c10::cuda::CUDAGuard guard(logits.device());
  CrossEntropyParams p{};
  auto out = cross_entropy_fwd_bwd_prepare("cross_entropy_fwd_bwd_", logits, target, grad_scale, ignore_index,
                                           label_smoothing, z_loss, softcap, p);
  cross_entropy_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  return out;
}

// ---- attention (csrc/cuda/attention_fwd.cu, attention_bwd.cu) ----
// What the kernels cannot run (fp32/fp64, head dims, unaligned rows, old GPUs) raises
// NotImplementedError, which slmfast/ops/attention.py catches to fall back to another backend.

// Whether a (.., rows, D) tensor's rows are 16-byte aligned for the kernels' 16-byte tile copies.
bool attention_rows_aligned(const at::Tensor& t) {
  if (t.stride(-1) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.stride(d) % 8 != 0) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionParams p{};
  auto outputs = attention_fwd_prepare("attention_fwd", q, k, v, scale, causal, window_left, window_right,
                                       cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, p);
  const char* why = attention_fwd_cuda_unsupported(p);
  TORCH_CHECK_NOT_IMPLEMENTED(why == nullptr, "attention_fwd (cuda): ", why ? why : "", " (got dtype ",
                              q.scalar_type(), ", head_dim ", q.size(-1), ")");
  attention_fwd_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  return outputs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda_op(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale, bool causal, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool deterministic) {
  const c10::cuda::CUDAGuard guard(q.device());
  // delta is indexed with lse's strides: make lse contiguous and allocate delta like it.
  const at::Tensor lse_c = lse.is_contiguous() ? lse : lse.contiguous();
  // A gradient that arrives as an unaligned view (a transpose of an odd layout, say) is copied.
  const at::Tensor dout_c = dout.dim() > 0 && !attention_rows_aligned(dout) ? dout.contiguous() : dout;
  AttentionBwdParams p{};
  auto grads = attention_bwd_prepare("attention_bwd", dout_c, q, k, v, out, lse_c, scale, causal, window_left,
                                     window_right, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     deterministic, p);
  const char* why = attention_bwd_cuda_unsupported(p);
  TORCH_CHECK_NOT_IMPLEMENTED(why == nullptr, "attention_bwd (cuda): ", why ? why : "", " (got dtype ",
                              q.scalar_type(), ", head_dim ", q.size(-1), ")");
  const at::Tensor delta = at::empty_like(lse_c);  // float32 rowsum(dout * out)
  p.delta = delta.data_ptr<float>();
  attention_bwd_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(slmfast, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cuda_op);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cuda_op);
  m.impl("glu_fwd", &glu_fwd_cuda_op);
  m.impl("glu_bwd", &glu_bwd_cuda_op);
  m.impl("rotary", &rotary_cuda_op);
  m.impl("rotary_", &rotary_inplace_cuda_op);
  m.impl("attention_fwd", &attention_fwd_cuda_op);
  m.impl("attention_bwd", &attention_bwd_cuda_op);
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda_op);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cuda_op);
  m.impl("cross_entropy_bwd_", &cross_entropy_bwd_inplace_cuda_op);
  m.impl("cross_entropy_fwd_bwd_", &cross_entropy_fwd_bwd_cuda_op);
}

}  // namespace slmfast
