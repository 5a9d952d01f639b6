// attention_args.h — argument checks and tensors -> AttentionParams / AttentionBwdParams for the
// attention ops (schemas in csrc/slmfast.cpp, contract in slmfast/ops/attention.py), shared by
// the CPU kernel (csrc/cpu/attention.cpp) and the CUDA bindings (csrc/cuda/bindings.cpp), so
// that every C++ backend refuses the same inputs with the same messages and allocates the same
// outputs. Modelled on flash-attention's mha_fwd/mha_varlen_fwd argument checks.
//
// Layouts (AttentionParams in params.h):
//   dense   q (B, Hq, T, D), k/v (B, Hkv, S, D); out like q; lse float32 (B, Hq, T)
//   packed  q (Nq, Hq, D), k/v (Nk, Hkv, D), cu_seqlens_q/k int32 (docs + 1,); out like q;
//           lse float32 (Nq, Hq)
// Inputs may have any strides as long as the last dimension (D) is contiguous; outputs are
// allocated contiguous. cu_seqlens values (first 0, non-decreasing, last = Nq / Nk, no document
// longer than max_seqlen) are checked when they live on the CPU; on a GPU that would need a
// device synchronization per call, so there they are trusted, as flash-attention does.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "dtypes.h"
#include "params.h"

namespace slmfast {

inline void check_attention_dtype(const char* op, const at::Tensor& q) {
  SLM_CHECK_FLOATING(op, q);
}

// The checks every attention entry point shares; returns whether the layout is packed.
inline bool check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, int64_t window_left, int64_t window_right,
                                   const std::optional<at::Tensor>& cu_seqlens_q,
                                   const std::optional<at::Tensor>& cu_seqlens_k,
                                   int64_t max_seqlen_q, int64_t max_seqlen_k) {
  SLM_CHECK_DEFINED(op, q);
  SLM_CHECK_DEFINED(op, k);
  SLM_CHECK_DEFINED(op, v);
  SLM_CHECK_FLOATING(op, q);
  SLM_CHECK_DTYPE(op, k, q.scalar_type());
  SLM_CHECK_DTYPE(op, v, q.scalar_type());
  SLM_CHECK_DEVICE(op, k, q.device());
  SLM_CHECK_DEVICE(op, v, q.device());
  const bool has_cu_q = cu_seqlens_q.has_value() && cu_seqlens_q->defined();
  const bool has_cu_k = cu_seqlens_k.has_value() && cu_seqlens_k->defined();
  SLM_CHECK(op, has_cu_q == has_cu_k,
            "cu_seqlens_q and cu_seqlens_k must both be given (packed layout) or both be None "
            "(dense layout)");
  const bool packed = has_cu_q;
  const int64_t dims = packed ? 3 : 4;
  const char* layout = packed ? "(N, H, D) in the packed layout" : "(B, H, T, D) in the dense layout";
  SLM_CHECK(op, q.dim() == dims, "q must have shape ", layout, ", got ", q.sizes());
  SLM_CHECK(op, k.dim() == dims, "k must have shape ", layout, ", got ", k.sizes());
  SLM_CHECK(op, v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  const int64_t head_dim = q.size(-1);
  SLM_CHECK(op, head_dim > 0, "q must have a non-empty head dimension, got ", q.sizes());
  SLM_CHECK(op, k.size(-1) == head_dim, "k must have the head dimension of q (", head_dim, "), got ",
            k.sizes());
  const int64_t heads_q = q.size(-2 - (packed ? 0 : 1));
  const int64_t heads_kv = k.size(-2 - (packed ? 0 : 1));
  SLM_CHECK(op, heads_kv > 0 && heads_q % heads_kv == 0,
            "the number of query heads (", heads_q, ") must be a multiple of the number of key/value "
            "heads (", heads_kv, ")");
  if (!packed) {
    SLM_CHECK(op, k.size(0) == q.size(0), "k must have the batch size of q (", q.size(0), "), got ",
              k.sizes());
  }
  SLM_CHECK(op, q.stride(-1) == 1 || q.size(-1) == 1, "q must be contiguous in its last dimension, got strides ",
            q.strides());
  SLM_CHECK(op, k.stride(-1) == 1 || k.size(-1) == 1, "k must be contiguous in its last dimension, got strides ",
            k.strides());
  SLM_CHECK(op, v.stride(-1) == 1 || v.size(-1) == 1, "v must be contiguous in its last dimension, got strides ",
            v.strides());
  SLM_CHECK(op, window_left >= -1, "window_left must be >= -1 (-1: unlimited), got ", window_left);
  SLM_CHECK(op, window_right >= -1, "window_right must be >= -1 (-1: unlimited), got ", window_right);
  if (packed) {
    const at::Tensor& cq = *cu_seqlens_q;
    const at::Tensor& ck = *cu_seqlens_k;
    for (const auto* t : {&cq, &ck}) {
      const char* name = t == &cq ? "cu_seqlens_q" : "cu_seqlens_k";
      SLM_CHECK(op, t->device() == q.device(), name, " must be on ", q.device(), " like q, got ", t->device());
      SLM_CHECK(op, t->scalar_type() == at::kInt, name, " must have dtype int32, got ", t->scalar_type());
    }
    SLM_CHECK(op, cq.dim() == 1 && cq.numel() >= 1 && cq.is_contiguous(),
              "cu_seqlens_q must be a contiguous 1-D tensor of (documents + 1) offsets, got sizes ",
              cq.sizes());
    SLM_CHECK(op, ck.sizes() == cq.sizes() && ck.is_contiguous(),
              "cu_seqlens_k must be contiguous and have the shape of cu_seqlens_q ", cq.sizes(), ", got ",
              ck.sizes());
    SLM_CHECK(op, max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen_q and max_seqlen_k must be >= 0, got ",
              max_seqlen_q, " and ", max_seqlen_k);
    if (q.device().is_cpu()) {
      const struct {
        const char* name;
        const at::Tensor& cu;
        int64_t rows;
        int64_t max_len;
      } sides[2] = {{"cu_seqlens_q", cq, q.size(0), max_seqlen_q}, {"cu_seqlens_k", ck, k.size(0), max_seqlen_k}};
      for (const auto& s : sides) {
        const int32_t* c = s.cu.data_ptr<int32_t>();
        const int64_t n = s.cu.numel();
        SLM_CHECK(op, c[0] == 0, s.name, " must start at 0, got ", c[0]);
        for (int64_t i = 1; i < n; ++i) {
          SLM_CHECK(op, c[i] >= c[i - 1], s.name, " must be non-decreasing, got ", c[i - 1], " then ", c[i],
                    " at index ", i);
          SLM_CHECK(op, c[i] - c[i - 1] <= s.max_len, s.name, ": document ", i - 1, " has ", c[i] - c[i - 1],
                    " rows, more than max_seqlen ", s.max_len);
        }
        SLM_CHECK(op, c[n - 1] == s.rows, s.name, " must end at the number of rows (", s.rows, "), got ",
                  c[n - 1]);
      }
    }
  }
  return packed;
}

// Fills the parts of AttentionParams that q, k, v, out, lse and cu_seqlens determine.
inline void fill_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& out, const at::Tensor& lse, bool packed, double scale,
                                  bool causal, int64_t window_left, int64_t window_right,
                                  const std::optional<at::Tensor>& cu_seqlens_q,
                                  const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                  int64_t max_seqlen_k, AttentionParams& p) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (packed) {
    // (N, H, D): no batch stride; a document's first row comes from cu_seqlens.
    p.q_batch_stride = 0, p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(0);
    p.k_batch_stride = 0, p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(0);
    p.v_batch_stride = 0, p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(0);
    p.o_batch_stride = 0, p.o_head_stride = out.stride(1), p.o_row_stride = out.stride(0);
    p.lse_batch_stride = 0, p.lse_head_stride = lse.stride(1), p.lse_row_stride = lse.stride(0);
    p.cu_seqlens_q = cu_seqlens_q->data_ptr<int32_t>();
    p.cu_seqlens_k = cu_seqlens_k->data_ptr<int32_t>();
    p.batch = cu_seqlens_q->numel() - 1;
    p.heads_q = q.size(1);
    p.heads_kv = k.size(1);
    p.seqlen_q = max_seqlen_q;
    p.seqlen_k = max_seqlen_k;
  } else {
    p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
    p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
    p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
    p.o_batch_stride = out.stride(0), p.o_head_stride = out.stride(1), p.o_row_stride = out.stride(2);
    p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1), p.lse_row_stride = lse.stride(2);
    p.cu_seqlens_q = nullptr;
    p.cu_seqlens_k = nullptr;
    p.batch = q.size(0);
    p.heads_q = q.size(1);
    p.heads_kv = k.size(1);
    p.seqlen_q = q.size(2);
    p.seqlen_k = k.size(2);
  }
  p.head_dim = q.size(-1);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.window_left = window_left;
  p.window_right = window_right;
  p.dtype = to_dtype(q.scalar_type());
}

// Checks the forward's inputs, allocates (out, lse) and fills the params struct.
inline std::tuple<at::Tensor, at::Tensor> attention_fwd_prepare(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal,
    int64_t window_left, int64_t window_right, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    AttentionParams& p) {
  const bool packed = check_attention_inputs(op, q, k, v, window_left, window_right, cu_seqlens_q,
                                             cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  // out (and dq/dk/dv in the backward) keep q's (k's, v's) memory layout when it is dense: with q
  // a transposed view of a (B, T, H, D) projection, out.transpose(1, 2) is then contiguous and
  // the output projection reads it without a copy (which would be stored for backward twice).
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty(q.sizes().slice(0, q.dim() - 1), q.options().dtype(at::kFloat));
  fill_attention_params(q, k, v, out, lse, packed, scale, causal, window_left, window_right, cu_seqlens_q,
                        cu_seqlens_k, max_seqlen_q, max_seqlen_k, p);
  return {out, lse};
}

// Checks the backward's inputs, allocates (dq, dk, dv) and fills the params struct; p.delta
// (float32, shaped like lse) is left for the backend to allocate and set.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_prepare(
    const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool causal, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    bool deterministic, AttentionBwdParams& p) {
  const bool packed = check_attention_inputs(op, q, k, v, window_left, window_right, cu_seqlens_q,
                                             cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  for (const auto* t : {&dout, &out}) {
    const char* name = t == &dout ? "dout" : "out";
    SLM_CHECK(op, t->defined(), name, " must be a tensor, got None");
    SLM_CHECK(op, t->device() == q.device(), name, " must be on ", q.device(), " like q, got ", t->device());
    SLM_CHECK(op, t->sizes() == q.sizes(), name, " must have the shape of q ", q.sizes(), ", got ", t->sizes());
    SLM_CHECK(op, t->scalar_type() == q.scalar_type(), name, " must have the dtype of q (", q.scalar_type(),
              "), got ", t->scalar_type());
    SLM_CHECK(op, t->stride(-1) == 1 || t->size(-1) == 1, name,
              " must be contiguous in its last dimension, got strides ", t->strides());
  }
  SLM_CHECK_DEVICE(op, lse, q.device());
  SLM_CHECK_DTYPE(op, lse, at::kFloat);
  SLM_CHECK(op, lse.sizes() == q.sizes().slice(0, q.dim() - 1), "lse must have shape ",
            q.sizes().slice(0, q.dim() - 1), " (q without its last dimension), got ", lse.sizes());

  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  fill_attention_params(q, k, v, out, lse, packed, scale, causal, window_left, window_right, cu_seqlens_q,
                        cu_seqlens_k, max_seqlen_q, max_seqlen_k, p);
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.delta = nullptr;
  if (packed) {
    p.do_batch_stride = 0, p.do_head_stride = dout.stride(1), p.do_row_stride = dout.stride(0);
    p.dq_batch_stride = 0, p.dq_head_stride = dq.stride(1), p.dq_row_stride = dq.stride(0);
    p.dk_batch_stride = 0, p.dk_head_stride = dk.stride(1), p.dk_row_stride = dk.stride(0);
    p.dv_batch_stride = 0, p.dv_head_stride = dv.stride(1), p.dv_row_stride = dv.stride(0);
  } else {
    p.do_batch_stride = dout.stride(0), p.do_head_stride = dout.stride(1), p.do_row_stride = dout.stride(2);
    p.dq_batch_stride = dq.stride(0), p.dq_head_stride = dq.stride(1), p.dq_row_stride = dq.stride(2);
    p.dk_batch_stride = dk.stride(0), p.dk_head_stride = dk.stride(1), p.dk_row_stride = dk.stride(2);
    p.dv_batch_stride = dv.stride(0), p.dv_head_stride = dv.stride(1), p.dv_row_stride = dv.stride(2);
  }
  p.deterministic = deterministic;
  return {dq, dk, dv};
}

}  // namespace slmfast
