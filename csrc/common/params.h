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

// Launchers, implemented in csrc/cuda/*.cu. `stream` is a cudaStream_t passed as void* so that
// this header stays free of CUDA types.
void rms_norm_fwd_cuda(const RmsNormFwdParams& params, void* stream);
void rms_norm_bwd_cuda(const RmsNormBwdParams& params, void* stream);
int64_t rms_norm_bwd_num_row_blocks(int64_t rows, int64_t cols);

}  // namespace slmfast
