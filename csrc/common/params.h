// params.h — the plain structs that cross from the bindings into the kernels.
//
// Only pointers, sizes, strides and scalars: no ATen, no CUDA types, so this header is included
// by the CPU ops, by the CUDA bindings (which fill the structs from tensors) and by the .cu files
// (which nvcc compiles without torch headers, DESIGN.md §5). This follows flash-attention's
// Flash_fwd_params: one struct per op is the whole interface between host code and a kernel.
#pragma once

#include <cstdint>

namespace slmfast {

// Element types the kernels are instantiated for; the one dispatch point per op turns this
// runtime value into a template argument.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// RMSNorm forward over `rows` rows of `cols` contiguous elements:
//   h = x + residual (when residual != nullptr), r = 1 / sqrt(mean(h^2) + eps),
//   y = h * r * (offset + weight).
struct RmsNormFwdParams {
  const void* x;         // (rows, cols), dtype x_dtype
  const void* residual;  // (rows, cols) or nullptr
  const void* weight;    // (cols,), dtype weight_dtype
  void* y;               // (rows, cols), dtype x_dtype
  void* h;               // (rows, cols) when residual != nullptr, else nullptr
  void* rstd;            // (rows,) accumulation dtype (float32; float64 for fp64 inputs): the only
                         // per-row value saved for backward
  int64_t rows;
  int64_t cols;
  double eps;
  double offset;
  DType x_dtype;
  DType weight_dtype;
};

// RMSNorm backward from the saved residual stream h and rstd; nothing else was stored.
//   g = dy * (offset + weight), dh_total = r * (g - xhat * mean(g * xhat)) + dh_in,
//   dweight = sum_rows(dy * xhat) where xhat = h * r.
struct RmsNormBwdParams {
  const void* dy;       // (rows, cols), dtype x_dtype
  const void* dh_in;    // (rows, cols) gradient flowing into the h output, or nullptr
  const void* h;        // (rows, cols)
  const void* weight;   // (cols,)
  const void* rstd;     // (rows,) accumulation dtype
  void* dx;             // (rows, cols), dtype x_dtype
  void* dweight_partial; // (num_row_blocks, cols) accumulation-dtype workspace, reduced in a
                         // fixed order so that dweight is bit-identical run to run
  void* dweight;        // (cols,), dtype weight_dtype
  int64_t rows;
  int64_t cols;
  int64_t num_row_blocks;
  double offset;
  DType x_dtype;
  DType weight_dtype;
};

// Attention (slmfast/ops/attention.py), FlashAttention-2 style, shared by the CPU kernel
// (csrc/cpu/attention.cpp) and the CUDA kernels (csrc/cuda/attention_fwd.cu, attention_bwd.cu).
// Two layouts, one struct:
//   dense   q (B, Hq, T, D), k/v (B, Hkv, S, D), out like q, lse (B, Hq, T); cu_seqlens_* null
//   packed  q (Nq, Hq, D), k/v (Nk, Hkv, D), out like q, lse (Nq, Hq); cu_seqlens_q/k int32
//           (batch + 1,) give each document's rows; batch = number of documents
// Strides are in elements; the last dimension (D) is contiguous. For the packed layout the
// batch strides are 0 and a row's offset comes from cu_seqlens. Masks (per document, with
// T = that document's query length and S its key length, offset = S - T, bottom-right aligned):
//   key j is visible to query i iff  (!causal || j <= i + offset)
//                                 && (window_left  < 0 || j >= i + offset - window_left)
//                                 && (window_right < 0 || j <= i + offset + window_right)
// A query row with no visible key gets out = 0 and lse = -inf.
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // float32 log-sum-exp of the scaled scores, natural log
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  int64_t lse_batch_stride, lse_head_stride, lse_row_stride;
  const int32_t* cu_seqlens_q;  // packed layout when non-null
  const int32_t* cu_seqlens_k;
  int64_t batch;       // B, or the number of documents
  int64_t heads_q;     // Hq, a multiple of heads_kv (GQA/MQA: query head h reads kv head h / (Hq / Hkv))
  int64_t heads_kv;
  int64_t head_dim;    // D
  int64_t seqlen_q;    // T (dense) or max_seqlen_q (packed)
  int64_t seqlen_k;    // S (dense) or max_seqlen_k (packed)
  float scale;         // softmax scale, usually 1 / sqrt(D)
  bool causal;
  int64_t window_left;   // -1: unlimited
  int64_t window_right;  // -1: unlimited
  DType dtype;           // q, k, v, out share it
};

// Backward: everything of the forward plus the gradients. dq/dk/dv have the layouts (and
// their own strides) of q/k/v; delta = rowsum(dout * out) is a float32 workspace shaped like lse.
struct AttentionBwdParams : AttentionParams {
  const void* dout;
  void* dq;
  void* dk;
  void* dv;
  float* delta;
  int64_t do_batch_stride, do_head_stride, do_row_stride;
  int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
  int64_t dk_batch_stride, dk_head_stride, dk_row_stride;
  int64_t dv_batch_stride, dv_head_stride, dv_row_stride;
  bool deterministic;  // no atomics: dQ in its own pass
};

// Launchers, implemented in csrc/cuda/*.cu. `stream` is a cudaStream_t passed as void* so that
// this header stays free of CUDA types.
void rms_norm_fwd_cuda(const RmsNormFwdParams& params, void* stream);
void rms_norm_bwd_cuda(const RmsNormBwdParams& params, void* stream);
int64_t rms_norm_bwd_num_row_blocks(int64_t rows, int64_t cols);
void attention_fwd_cuda(const AttentionParams& params, void* stream);
void attention_bwd_cuda(const AttentionBwdParams& params, void* stream);

}  // namespace slmfast
