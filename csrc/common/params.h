// params.h — the plain structs that cross from the bindings into the kernels.
//
// Only pointers, sizes, strides and scalars: no ATen, no CUDA types, so this header is included
// by the CPU ops, by the CUDA bindings (which fill the structs from tensors) and by the .cu files
// (which nvcc compiles without torch headers, docs/architecture.md §4.3). This follows
// flash-attention's Flash_fwd_params: one struct per op is the whole interface between host code
// and a kernel.
#pragma once

#include <cstdint>
#include <type_traits>

namespace slmfast {

// Element types the kernels are instantiated for; the one dispatch point per op turns this
// runtime value into a template argument (visit_element_type below).
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// The element types a backend gives the two 16-bit DTypes: c10::Half and c10::BFloat16 in the
// CPU kernels (cpu/kernels/vec.h), __half and __nv_bfloat16 in the .cu files (cuda/common.cuh);
// float32 and float64 are float and double in both.
template <typename Half, typename BFloat16>
struct ElementTypes {
  using Float16 = Half;
  using BFloat16Type = BFloat16;
};

// f(T{}) with T the element type of `dtype` in the backend `Types` (an ElementTypes). Returns
// false, calling nothing, for a code outside the enum; the caller reports it.
template <typename Types, typename F>
inline bool visit_element_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); return true;
    case DType::kFloat64: f(double{}); return true;
    case DType::kBFloat16: f(typename Types::BFloat16Type{}); return true;
    case DType::kFloat16: f(typename Types::Float16{}); return true;
  }
  return false;
}

// The norms' one (x dtype, weight dtype) dispatch, for the CPU kernels and the .cu files alike:
// f(T{}, W{}) with T the element type of x and W = T, or float for bf16/fp16 x with a float32
// weight (the mixed-precision case; the ops check that no other pair reaches a kernel).
template <typename Types, typename F>
inline bool visit_norm_element_types(DType x_dtype, DType weight_dtype, F&& f) {
  return visit_element_type<Types>(x_dtype, [&](auto x) {
    using T = decltype(x);
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      f(x, x);
    } else if (weight_dtype == x_dtype) {
      f(x, x);
    } else {
      f(x, float{});
    }
  });
}

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

// LayerNorm (slmfast/ops/layer_norm.py; CPU only, the GPU runs the Triton kernel):
//   h = x + residual, mu = mean(h), r = 1 / sqrt(mean((h - mu)^2) + eps),
//   y = (h - mu) * r * weight + bias.  Saved for backward: h (or x), mu and r per row.
struct LayerNormFwdParams {
  const void* x;         // (rows, cols), dtype x_dtype
  const void* residual;  // (rows, cols) or nullptr
  const void* weight;    // (cols,), dtype weight_dtype
  const void* bias;      // (cols,), dtype weight_dtype, or nullptr
  void* y;               // (rows, cols)
  void* h;               // (rows, cols) when residual != nullptr, else nullptr
  void* mean;            // (rows,) accumulation dtype
  void* rstd;            // (rows,) accumulation dtype
  int64_t rows;
  int64_t cols;
  double eps;
  DType x_dtype;
  DType weight_dtype;
};

// xhat = (h - mu) * r, g = dy * weight:
//   dh_total = r * (g - mean(g) - xhat * mean(g * xhat)) + dh_in,
//   dweight = sum_rows(dy * xhat), dbias = sum_rows(dy)  (per row block, then over blocks).
struct LayerNormBwdParams {
  const void* dy;        // (rows, cols)
  const void* dh_in;     // (rows, cols) or nullptr
  const void* h;         // (rows, cols)
  const void* weight;    // (cols,)
  const void* mean;      // (rows,) accumulation dtype
  const void* rstd;      // (rows,) accumulation dtype
  void* dx;              // (rows, cols)
  void* partial;         // (num_row_blocks, 2, cols) accumulation dtype: dweight, dbias partials
  void* dweight;         // (cols,), weight dtype
  void* dbias;           // (cols,), weight dtype
  int64_t rows;
  int64_t cols;
  int64_t num_row_blocks;
  DType x_dtype;
  DType weight_dtype;
};

// Gated linear units (slmfast/ops/glu.py): out = act(gate) * up, elementwise over n
// contiguous elements. act: silu (SwiGLU), gelu with erf or tanh (GeGLU). Saved for backward:
// gate and up; the backward recomputes act(gate) and act'(gate), and optionally out itself
// (for the weight gradient of the projection that consumed it, which then need not store it).
enum class GluActivation : int32_t { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

struct GluParams {
  const void* gate;   // (n,)
  const void* up;     // (n,)
  const void* dout;   // (n,) backward only, else nullptr
  void* out;          // forward: act(gate) * up; backward: the same recomputed, or nullptr
  void* dgate;        // (n,) backward only
  void* dup;          // (n,) backward only
  int64_t n;
  GluActivation activation;
  DType dtype;        // of every tensor; accumulation in float (double for fp64)
};

// Rotary position embedding (slmfast/ops/rotary.py) on q and k viewed as (B, H, T, D) with any
// strides but a contiguous last dimension, cos/sin as (B or 1, T, R), R <= D even, holding
// cos(theta_i) and sin(theta_i) in columns i and i + R/2 (the Hugging Face layout; only the
// first R/2 columns are read). Pairs (i, i + R/2) (half-split) or (2i, 2i + 1) (interleaved)
// rotate by theta_i; with conjugate, by -theta_i (the inverse, which is the backward). Features
// R..D are copied unchanged (untouched in place).
struct RotaryParams {
  const void* q;
  const void* k;
  void* q_out;              // may equal q (in place)
  void* k_out;              // may equal k
  const void* cos;
  const void* sin;
  int64_t batch;
  int64_t seqlen;
  int64_t q_heads;
  int64_t k_heads;
  int64_t head_dim;
  int64_t rotary_dim;
  int64_t q_stride[3];      // element strides of q over (batch, head, token)
  int64_t k_stride[3];
  int64_t q_out_stride[3];
  int64_t k_out_stride[3];
  int64_t cs_stride[2];     // element strides of cos and sin over (batch, token); batch 0 if shared
  bool interleaved;
  bool conjugate;
  DType dtype;              // of q, k and the outputs
  DType cs_dtype;           // of cos and sin: float32 or dtype
};

// Attention (slmfast/ops/attention.py), FlashAttention-2 style, shared by the CPU kernel
// (csrc/cpu/attention.cpp) and the CUDA kernels (csrc/cuda/attention_fwd.cu, attention_bwd.cu).
// Two layouts, one struct:
//   dense   q (B, Hq, T, D), k/v (B, Hkv, S, D), out like q, lse (B, Hq, T); cu_seqlens_* null
//   packed  q (Nq, Hq, D), k/v (Nk, Hkv, D), out like q, lse (Nq, Hq); cu_seqlens_q/k int32
//           (batch + 1,) give each document's rows; batch = number of documents
// Strides are in elements; the last dimension (D) is contiguous. For the packed layout the
// batch strides are 0 and a row's offset comes from cu_seqlens. causal, window_left and
// window_right are the mask of the op's contract (slmfast/ops/attention.py), applied per document;
// a query row with no visible key gets out = 0 and lse = -inf.
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

// Row-wise softmax cross-entropy (slmfast/ops/cross_entropy.py), one row of `cols` logits per
// token, shared by csrc/cpu/cross_entropy.cpp and csrc/cuda/cross_entropy.cu. With z = the logits
// (z = softcap * tanh(a / softcap) of the raw logits a when softcap > 0), eps = label_smoothing:
//   m = max_j z_j, r = log sum_j exp(z_j - m), lse = m + r
//   loss = (1 - eps)(m - z_y) + eps (m - mean_j z_j) + r + z_loss * lse^2
//   dloss/da_j = scale * (softmax(z)_j (1 + 2 z_loss lse) - eps / cols - (1 - eps) [j == y])
//                * (softcap > 0 ? 1 - (z_j / softcap)^2 : 1),   softmax(z)_j = exp((z_j - m) - r)
// The per-row stats are (m, r), not lse alone: exp(z - lse) with a float32 lse of a row of large
// logits (lse ~ 30) would lose ~4 bits of every probability, where (z - m) - r keeps them, as
// log_softmax does. Rows whose target is ignore_index get loss 0, stats 0 and a zero gradient.
// Modes: forward (loss, stats), backward (stats given, gradient), and both at once (the fused
// path of the chunked linear cross-entropy, usually with dlogits == logits: in place).
struct CrossEntropyParams {
  const void* logits;            // (rows, cols), last dim contiguous, row stride logits_row_stride
  void* dlogits;                 // (rows, cols) or nullptr (no gradient); may equal logits
  const int64_t* target;         // (rows,)
  const void* grad_scale;        // accumulation dtype, rows values (stride 1) or one (stride 0)
  void* loss;                    // (rows,) accumulation dtype, or nullptr (backward)
  void* stats;                   // (rows, 2) accumulation dtype (m, r): written, or read when stats_is_input
  int64_t rows;
  int64_t cols;
  int64_t logits_row_stride;
  int64_t dlogits_row_stride;
  int64_t grad_scale_stride;     // 0: one scale for every row
  int64_t ignore_index;
  double label_smoothing;
  double z_loss;
  double softcap;                // <= 0: none
  bool stats_is_input;           // backward: stats come from the forward
  DType dtype;                   // of logits and dlogits; accumulation in float (double for fp64)
};

// Distillation between student and teacher logits (slmfast/ops/distill_loss.py; CPU kernel in
// csrc/cpu/kernels/distill.cpp, math in its header comment). Per row, kDistillStats accumulation-
// dtype values: max s, max t, log sum exp((s - max s) / T), log sum exp((t - max t) / T),
// log sum exp(s - max s), c, c2 (the backward's row constants). Modes as for cross-entropy:
// forward (loss, stats), backward (stats given, dstudent) and both at once (dstudent == student).
enum class DistillKind : int32_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kTVD = 3 };
constexpr int64_t kDistillStats = 7;

struct DistillParams {
  const void* student;   // (rows, cols), last dim contiguous
  void* dstudent;        // (rows, cols) or nullptr; may equal student
  const void* teacher;   // (rows, cols), same dtype
  const int64_t* target; // (rows,) or nullptr (no hard loss)
  const void* grad_scale; // accumulation dtype, rows values (stride 1) or one (stride 0)
  void* loss;            // (rows,) accumulation dtype, or nullptr
  void* stats;           // (rows, kDistillStats): written, or read when stats_is_input
  int64_t rows, cols;
  int64_t student_row_stride, dstudent_row_stride, teacher_row_stride, grad_scale_stride;
  int64_t ignore_index;
  double beta, temperature, hard_weight;
  bool stats_is_input;
  DistillKind kind;
  DType dtype;           // of student, teacher and dstudent
};

// Launchers, implemented in csrc/cuda/*.cu. `stream` is a cudaStream_t passed as void* so that
// this header stays free of CUDA types.
void rms_norm_fwd_cuda(const RmsNormFwdParams& params, void* stream);
void rms_norm_bwd_cuda(const RmsNormBwdParams& params, void* stream);
int64_t rms_norm_bwd_num_row_blocks(int64_t rows, int64_t cols);
void glu_fwd_cuda(const GluParams& params, void* stream);
void glu_bwd_cuda(const GluParams& params, void* stream);
void rotary_cuda(const RotaryParams& params, void* stream);
void attention_fwd_cuda(const AttentionParams& params, void* stream);
void attention_bwd_cuda(const AttentionBwdParams& params, void* stream);
// Why the CUDA attention kernels cannot run these params (dtype other than bf16/fp16, head dim,
// alignment, GPU), or nullptr when they can. The launchers throw std::invalid_argument with the
// same reason; the bindings ask first and raise NotImplementedError, for the op to fall back.
const char* attention_fwd_cuda_unsupported(const AttentionParams& params);
const char* attention_bwd_cuda_unsupported(const AttentionBwdParams& params);
void cross_entropy_cuda(const CrossEntropyParams& params, void* stream);

}  // namespace slmfast
