// cross_entropy_args.h — argument checks and tensors -> CrossEntropyParams for the row-wise
// cross-entropy ops (schemas in csrc/slmfast.cpp), shared by the CPU kernel
// (csrc/cpu/cross_entropy.cpp) and the CUDA bindings (csrc/cuda/bindings.cpp), so that both
// refuse the same inputs with the same messages and allocate the same outputs.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "checks.h"
#include "dtypes.h"
#include "params.h"

namespace slmfast {

// logits: (rows, cols) with a contiguous last dimension (any row stride >= cols, so that a
// column slice of a wider tensor is accepted); target: (rows,) int64 on the same device.
inline void check_ce_logits_target(const char* op, const at::Tensor& logits, const at::Tensor& target) {
  SLM_CHECK_FLOATING(op, logits);
  SLM_CHECK(op, logits.dim() == 2, "logits must be 2-D (rows, vocabulary), got shape ", logits.sizes());
  SLM_CHECK(op, logits.size(1) > 0, "logits must have a non-empty vocabulary dimension, got shape ",
            logits.sizes());
  SLM_CHECK(op, logits.stride(1) == 1 && logits.stride(0) >= logits.size(1),
            "logits must have a contiguous last dimension, got sizes ", logits.sizes(), " strides ",
            logits.strides());
  SLM_CHECK_DEVICE(op, target, logits.device());
  SLM_CHECK_DTYPE(op, target, at::kLong);
  SLM_CHECK_CONTIGUOUS(op, target);
  SLM_CHECK(op, target.dim() == 1 && target.size(0) == logits.size(0),
            "target must have shape (", logits.size(0), ",) (one class per row of logits), got ",
            target.sizes());
}

// On the CPU every target is checked: in [0, cols) or equal to ignore_index. (On a GPU this would
// need a synchronization; the Python wrapper checks there, and the CUDA kernel writes NaN.)
inline void check_ce_target_range(const char* op, const at::Tensor& target, int64_t cols, int64_t ignore_index) {
  if (!target.device().is_cpu()) return;
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < target.numel(); ++i) {
    SLM_CHECK(op, t[i] == ignore_index || (t[i] >= 0 && t[i] < cols), "target[", i, "] = ", t[i],
              " is out of range [0, ", cols, ") and is not ignore_index (", ignore_index, ")");
  }
}

inline void check_ce_options(const char* op, double label_smoothing, double z_loss, double softcap) {
  SLM_CHECK(op, label_smoothing >= 0.0 && label_smoothing <= 1.0,
            "label_smoothing must be in [0, 1], got ", label_smoothing);
  SLM_CHECK(op, z_loss >= 0.0, "z_loss must be >= 0, got ", z_loss);
  SLM_CHECK(op, softcap >= 0.0, "softcap must be >= 0 (0: none), got ", softcap);
}

// A per-row vector in the accumulation dtype (rows values), or one value when allow_one.
inline void check_ce_row_vector(const char* op, const char* name, const at::Tensor& v, const at::Tensor& logits,
                                bool allow_one) {
  SLM_CHECK(op, v.device() == logits.device(), name, " must be on ", logits.device(), ", got ", v.device());
  SLM_CHECK(op, v.scalar_type() == acc_dtype(logits.scalar_type()), name, " must have dtype ",
            acc_dtype(logits.scalar_type()), " (the accumulation dtype of logits), got ", v.scalar_type());
  SLM_CHECK(op, v.is_contiguous() && (v.numel() == logits.size(0) || (allow_one && v.numel() == 1)),
            name, " must be a contiguous tensor of ", logits.size(0), allow_one ? " elements or one" : " elements",
            ", got sizes ", v.sizes());
}

inline void fill_ce_common(CrossEntropyParams& p, const at::Tensor& logits, const at::Tensor& target,
                           int64_t ignore_index, double label_smoothing, double z_loss, double softcap) {
  p.logits = logits.data_ptr();
  p.target = target.data_ptr<int64_t>();
  p.rows = logits.size(0);
  p.cols = logits.size(1);
  p.logits_row_stride = logits.stride(0);
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.z_loss = z_loss;
  p.softcap = softcap;
  p.dtype = to_dtype(logits.scalar_type());
}

// Forward: allocates loss (rows,) and stats (rows, 2) = (max, log sum exp(z - max)) in the
// accumulation dtype.
inline std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_prepare(
    const char* op, const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, CrossEntropyParams& p) {
  check_ce_logits_target(op, logits, target);
  check_ce_options(op, label_smoothing, z_loss, softcap);
  check_ce_target_range(op, target, logits.size(1), ignore_index);
  const auto acc = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor loss = at::empty({logits.size(0)}, acc);
  at::Tensor stats = at::empty({logits.size(0), 2}, acc);
  fill_ce_common(p, logits, target, ignore_index, label_smoothing, z_loss, softcap);
  p.loss = loss.data_ptr();
  p.stats = stats.data_ptr();
  p.dlogits = nullptr;
  p.grad_scale = nullptr;
  p.grad_scale_stride = 0;
  p.dlogits_row_stride = 0;
  p.stats_is_input = false;
  return {loss, stats};
}

// Backward from the forward's stats: dlogits = grad_loss[i] * dloss_i/dlogits. `dlogits` is the
// output (a new contiguous tensor, or logits itself for the in-place op).
inline void cross_entropy_bwd_prepare(const char* op, const at::Tensor& grad_loss, const at::Tensor& logits,
                                      const at::Tensor& target, const at::Tensor& stats, const at::Tensor& dlogits,
                                      int64_t ignore_index, double label_smoothing, double z_loss,
                                      double softcap, CrossEntropyParams& p) {
  check_ce_logits_target(op, logits, target);
  check_ce_options(op, label_smoothing, z_loss, softcap);
  check_ce_target_range(op, target, logits.size(1), ignore_index);
  check_ce_row_vector(op, "grad_loss", grad_loss, logits, /*allow_one=*/true);
  SLM_CHECK(op, stats.device() == logits.device() && stats.scalar_type() == acc_dtype(logits.scalar_type()) &&
                stats.is_contiguous() && stats.sizes() == at::IntArrayRef({logits.size(0), 2}),
            "stats must be the contiguous (", logits.size(0), ", 2) ", acc_dtype(logits.scalar_type()),
            " tensor of the forward, got sizes ", stats.sizes(), " dtype ", stats.scalar_type());
  fill_ce_common(p, logits, target, ignore_index, label_smoothing, z_loss, softcap);
  p.loss = nullptr;
  p.stats = stats.data_ptr();
  p.stats_is_input = true;
  p.grad_scale = grad_loss.data_ptr();
  p.grad_scale_stride = grad_loss.numel() == 1 && logits.size(0) != 1 ? 0 : 1;
  p.dlogits = dlogits.data_ptr();
  p.dlogits_row_stride = dlogits.stride(0);
}

// Forward and gradient at once, the gradient written over logits (in place): the fused path of
// the chunked losses. Allocates (loss, stats).
inline std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_bwd_prepare(
    const char* op, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& grad_scale,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, CrossEntropyParams& p) {
  auto outputs = cross_entropy_fwd_prepare(op, logits, target, ignore_index, label_smoothing, z_loss, softcap, p);
  check_ce_row_vector(op, "grad_scale", grad_scale, logits, /*allow_one=*/true);
  p.grad_scale = grad_scale.data_ptr();
  p.grad_scale_stride = grad_scale.numel() == 1 && logits.size(0) != 1 ? 0 : 1;
  p.dlogits = logits.data_ptr();
  p.dlogits_row_stride = logits.stride(0);
  return outputs;
}

}  // namespace slmfast
