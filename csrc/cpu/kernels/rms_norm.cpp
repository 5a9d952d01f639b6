// kernels/rms_norm.cpp — the vectorized kernels of the CPU fused RMSNorm (+ residual add), forward
// and backward, compiled once per capability (csrc/cpu/capability.h); the op is csrc/cpu/rms_norm.cpp.
//
// Based on the RMSNorm of Zhang & Sennrich 2019 ("Root Mean Square Layer Normalization") in the
// pre-norm residual form every Llama-style block uses:
//   h = x + residual,  r = 1 / sqrt(mean(h^2) + eps),  y = h * r * (offset + w)
// The forward writes y, h and one r per row; backward recomputes xhat = h * r from h and r, so y
// is never saved (docs/architecture.md §3). Rows run in parallel with at::parallel_for. The forward
// reads each row from memory once: one pass forms h and its sum of squares together, the second
// (y) re-reads h from L1/L2; the backward likewise (a dot product, then dx). Full steps move
// 32 bf16/fp16 elements per load/store (rowwise.h), accumulating in at::opmath_type (fp32 for
// bf16/fp16, fp64 for fp64); fresh outputs are backed by huge pages (alloc.h), which on these
// machines costs less than half the page faults of 4 KiB pages. dweight is reduced over fixed
// row blocks, then over blocks in order, so it is bit-identical whatever the thread count.
#include <ATen/Parallel.h>

#include <array>
#include <cmath>
#include <vector>

#include "../../common/params.h"
#include "../kernel_table.h"
#include "norm_rows.h"
#include "rowwise.h"
#include "vec.h"

namespace slmfast::cpu::CPU_CAPABILITY {
namespace {

// (offset + weight) in the accumulation type, computed once per call.
template <typename T, typename W>
std::vector<acc_t<T>> shifted_weight(const W* weight, int64_t cols, double offset) {
  std::vector<acc_t<T>> out = to_acc_vector<T, W>(weight, cols, acc_t<T>(0));
  for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<acc_t<T>>(offset) + out[j];
  return out;
}

template <typename T, typename W>
void rms_norm_fwd_kernel(const RmsNormFwdParams& p) {
  using Acc = acc_t<T>;
  using Vec = AccVec<T>;
  const int64_t cols = p.cols;
  const auto wp = shifted_weight<T, W>(static_cast<const W*>(p.weight), cols, p.offset);
  const Acc* w = wp.data();
  T* y = static_cast<T*>(p.y);
  Acc* rstd = static_cast<Acc*>(p.rstd);

  // Pass 1 over each row: h = x + residual and the sum of squares.
  auto sum_squares = [](Vec& s, const Vec& v) { s = at::vec::fmadd(v, v, s); };
  for_norm_fwd_rows<T>(p, sum_squares, [&](int64_t i, const T* h, const Vec& ss) {
    const Acc r = Acc(1) / std::sqrt(reduce_sum(ss) / Acc(cols) + Acc(p.eps));
    rstd[i] = r;
    // Pass 2: y = h * r * (offset + w), re-reading h from L1/L2 (one row is at most a few
    // tens of KiB), so main memory sees each element once.
    const Vec rv(r);
    map_row<T>(cols, h, y + i * cols,
               [&](const Vec& v, int64_t j, int64_t n) { return v * rv * Vec::loadu(w + j, n); });
  });
}

template <typename T, typename W>
void rms_norm_bwd_kernel(const RmsNormBwdParams& p) {
  using Acc = acc_t<T>;
  using Vec = AccVec<T>;
  const int64_t cols = p.cols;
  const auto wp = shifted_weight<T, W>(static_cast<const W*>(p.weight), cols, p.offset);
  const Acc* w = wp.data();
  const T* dy = static_cast<const T*>(p.dy);
  const T* dh_in = static_cast<const T*>(p.dh_in);
  const T* h = static_cast<const T*>(p.h);
  const Acc* rstd = static_cast<const Acc*>(p.rstd);
  T* dx = static_cast<T*>(p.dx);
  Acc* partial = static_cast<Acc*>(p.dweight_partial);  // (num_row_blocks, cols)

  // Pass 1: per row block, dx rows and the block's partial dweight.
  for_row_blocks(p.rows, p.num_row_blocks, partial, cols, [&](int64_t i, Acc* pw) {
    const T* dyr = dy + i * cols;
    const T* hr = h + i * cols;
    const Vec rv(rstd[i]);
    // c = mean(g * xhat) with g = dy * (offset + w), xhat = h * r.
    Vec dot[2] = {Vec(Acc(0)), Vec(Acc(0))};
    for_grad_row<T>(cols, dyr, hr, [&](const Vec& d, const Vec& hv, int64_t j, int64_t n, int half) {
      dot[half] = at::vec::fmadd(d * Vec::loadu(w + j, n), hv * rv, dot[half]);
    });
    const Vec cv(reduce_sum(dot[0] + dot[1]) / Acc(cols));
    // Pass 2 (cached row): dx = r (g - xhat c) + dh, and dweight += dy * xhat.
    dx_row<T>(cols, dyr, hr, dh_in != nullptr ? dh_in + i * cols : nullptr, dx + i * cols,
              [&](const Vec& d, const Vec& hv, int64_t j, int64_t n) {
                // wv first: loaded inside the expression below, it would reorder the products
                // and let the compiler fuse a different one into an FMA (results not bit-identical).
                const Vec wv = Vec::loadu(w + j, n);
                const Vec xhat = hv * rv;
                at::vec::fmadd(d, xhat, Vec::loadu(pw + j, n)).store(pw + j, n);
                return rv * (d * wv - xhat * cv);
              });
  });

  // Pass 2: dweight[j] = sum over blocks in order (deterministic).
  reduce_row_blocks<Acc, W, 1>(partial, p.num_row_blocks, cols, {static_cast<W*>(p.dweight)});
}

void rms_norm_fwd(const RmsNormFwdParams& p) {
  visit_norm_dtypes(p.x_dtype, p.weight_dtype, [&](auto t, auto w) { rms_norm_fwd_kernel<decltype(t), decltype(w)>(p); });
}

void rms_norm_bwd(const RmsNormBwdParams& p) {
  visit_norm_dtypes(p.x_dtype, p.weight_dtype, [&](auto t, auto w) { rms_norm_bwd_kernel<decltype(t), decltype(w)>(p); });
}

}  // namespace

SLMFAST_REGISTER_CPU_KERNEL(rms_norm_fwd, rms_norm_fwd);
SLMFAST_REGISTER_CPU_KERNEL(rms_norm_bwd, rms_norm_bwd);

}  // namespace slmfast::cpu::CPU_CAPABILITY
