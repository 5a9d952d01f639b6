// rotary_args.h — argument checks and tensors -> params for the rotary ops, shared by the CPU
// kernel (csrc/cpu/rotary.cpp) and the CUDA bindings (csrc/cuda/bindings.cpp).
//
// The ops see q (B, Hq, T, D) and k (B, Hkv, T, D) with any strides but a contiguous last
// dimension (the transposed view of a (B, T, H, D) projection output needs no copy), and cos/sin
// (B or 1, T, R) contiguous. The Python wrapper maps the packed layout (N, H, D) with (N, R)
// cos/sin onto this one: B = 1, T = N.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "checks.h"
#include "dtypes.h"
#include "params.h"

namespace slmfast {

inline void check_rotary_operand(const char* op, const at::Tensor& t, const char* name) {
  SLM_CHECK(op, t.dim() == 4, name, " must have 4 dimensions (B, H, T, D), got shape ", t.sizes());
  SLM_CHECK(op, t.size(3) <= 1 || t.stride(3) == 1, name,
            " must have a contiguous last dimension, got strides ", t.strides());
}

// Fills everything but the outputs.
inline void rotary_check(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                         const at::Tensor& sin, bool interleaved, bool conjugate, RotaryParams& p) {
  SLM_CHECK_FLOATING(op, q);
  check_rotary_operand(op, q, "q");
  check_rotary_operand(op, k, "k");
  SLM_CHECK_DEVICE(op, k, q.device());
  SLM_CHECK_DTYPE(op, k, q.scalar_type());
  SLM_CHECK(op, k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
            "k must have the batch, sequence and head sizes of q ", q.sizes(), ", got ", k.sizes());
  SLM_CHECK_DEVICE(op, cos, q.device());
  SLM_CHECK_DEVICE(op, sin, q.device());
  SLM_CHECK(op, cos.dim() == 3, "cos must have 3 dimensions (B or 1, T, R), got shape ", cos.sizes());
  SLM_CHECK_SAME_SHAPE(op, sin, cos);
  SLM_CHECK(op, cos.scalar_type() == at::kFloat || cos.scalar_type() == q.scalar_type(),
            "cos must be float32 or have the dtype of q (", q.scalar_type(), "), got ", cos.scalar_type());
  SLM_CHECK_DTYPE(op, sin, cos.scalar_type());
  SLM_CHECK_CONTIGUOUS(op, cos);
  SLM_CHECK_CONTIGUOUS(op, sin);
  const int64_t batch = q.size(0);
  const int64_t seqlen = q.size(2);
  const int64_t head_dim = q.size(3);
  const int64_t rotary_dim = cos.size(2);
  SLM_CHECK(op, cos.size(0) == 1 || cos.size(0) == batch, "cos must have batch size 1 or ", batch,
            " (that of q), got shape ", cos.sizes());
  SLM_CHECK(op, cos.size(1) == seqlen, "cos must have ", seqlen, " rows (the sequence length of q), got shape ",
            cos.sizes());
  SLM_CHECK(op, rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
            "cos must have an even number of columns, at most the head dim ", head_dim, ", got shape ",
            cos.sizes());

  p = RotaryParams{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.batch = batch;
  p.seqlen = seqlen;
  p.q_heads = q.size(1);
  p.k_heads = k.size(1);
  p.head_dim = head_dim;
  p.rotary_dim = rotary_dim;
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = q.stride(d);
    p.k_stride[d] = k.stride(d);
  }
  p.cs_stride[0] = cos.size(0) == 1 ? 0 : seqlen * rotary_dim;
  p.cs_stride[1] = rotary_dim;
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  p.dtype = to_dtype(q.scalar_type());
  p.cs_dtype = to_dtype(cos.scalar_type());
}

inline void rotary_set_outputs(RotaryParams& p, const at::Tensor& q_out, const at::Tensor& k_out) {
  p.q_out = q_out.data_ptr();
  p.k_out = k_out.data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.q_out_stride[d] = q_out.stride(d);
    p.k_out_stride[d] = k_out.stride(d);
  }
}

// Out of place: outputs laid out like q and k when those are dense (else contiguous).
inline std::tuple<at::Tensor, at::Tensor> rotary_prepare(const char* op, const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& cos, const at::Tensor& sin,
                                                         bool interleaved, bool conjugate, RotaryParams& p) {
  rotary_check(op, q, k, cos, sin, interleaved, conjugate, p);
  at::Tensor q_out = at::empty_like(q);
  at::Tensor k_out = at::empty_like(k);
  rotary_set_outputs(p, q_out, k_out);
  return {q_out, k_out};
}

// In place: the outputs are q and k themselves; they must not overlap each other.
inline void rotary_inplace_prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                   const at::Tensor& sin, bool interleaved, bool conjugate, RotaryParams& p) {
  rotary_check(op, q, k, cos, sin, interleaved, conjugate, p);
  SLM_CHECK(op, !q.is_same(k), "q and k must be different tensors to rotate in place");
  rotary_set_outputs(p, q, k);
}

}  // namespace slmfast
