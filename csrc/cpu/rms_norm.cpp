// rms_norm.cpp — fused RMSNorm (+ residual add) forward and backward for the CPU.
//
// Based on the RMSNorm of Zhang & Sennrich 2019 ("Root Mean Square Layer Normalization") in the
// pre-norm residual form every Llama-style block uses:
//   h = x + residual,  r = 1 / sqrt(mean(h^2) + eps),  y = h * r * (offset + w)
// The forward writes y, h and one r per row; backward recomputes xhat = h * r from h and r, so y
// is never saved (DESIGN.md §2). Rows run in parallel with at::parallel_for; each row is a few
// vectorized passes over cache-resident data, accumulating in at::opmath_type (fp32 for
// bf16/fp16, fp64 for fp64). dweight is reduced over fixed row blocks, then over blocks in
// order, so it is bit-identical whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common/rms_norm_args.h"
#include "vec.h"

namespace slmfast::cpu {
namespace {

// (offset + weight) in the accumulation type, computed once per call.
template <typename T, typename W>
std::vector<acc_t<T>> shifted_weight(const W* weight, int64_t cols, double offset) {
  std::vector<acc_t<T>> out(cols);
  for (int64_t j = 0; j < cols; ++j) {
    out[j] = static_cast<acc_t<T>>(offset) + static_cast<acc_t<T>>(weight[j]);
  }
  return out;
}

template <typename T, typename W>
void rms_norm_fwd_kernel(const RmsNormFwdParams& p) {
  using Acc = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t kW = Vec::size();
  const int64_t cols = p.cols;
  const auto wp = shifted_weight<T, W>(static_cast<const W*>(p.weight), cols, p.offset);
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  T* h_out = static_cast<T*>(p.h);
  Acc* rstd = static_cast<Acc*>(p.rstd);
  const int64_t grain = std::max<int64_t>(1, 16384 / cols);

  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + i * cols;
      const T* h = xr;
      if (res != nullptr) {
        // h = x + residual, rounded to T: the stored h is what backward sees, so the
        // statistics below are taken from the rounded values too.
        const T* rr = res + i * cols;
        T* hr = h_out + i * cols;
        for (int64_t j = 0; j < cols; j += kW) {
          const int64_t n = std::min(kW, cols - j);
          store_acc<T>(hr + j, load_acc<T>(xr + j, n) + load_acc<T>(rr + j, n), n);
        }
        h = hr;
      }
      Vec sumsq(Acc(0));
      for (int64_t j = 0; j < cols; j += kW) {
        const int64_t n = std::min(kW, cols - j);
        const Vec v = load_acc<T>(h + j, n);  // zero beyond n
        sumsq = at::vec::fmadd(v, v, sumsq);
      }
      const Acc ss = at::vec::vec_reduce_all<Acc>([](const Vec& a, const Vec& b) { return a + b; }, sumsq);
      const Acc r = Acc(1) / std::sqrt(ss / Acc(cols) + Acc(p.eps));
      rstd[i] = r;
      const Vec rv(r);
      T* yr = y + i * cols;
      for (int64_t j = 0; j < cols; j += kW) {
        const int64_t n = std::min(kW, cols - j);
        const Vec w = Vec::loadu(wp.data() + j, n);
        store_acc<T>(yr + j, load_acc<T>(h + j, n) * rv * w, n);
      }
    }
  });
}

template <typename T, typename W>
void rms_norm_bwd_kernel(const RmsNormBwdParams& p) {
  using Acc = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t kW = Vec::size();
  const int64_t cols = p.cols;
  const int64_t rows = p.rows;
  const auto wp = shifted_weight<T, W>(static_cast<const W*>(p.weight), cols, p.offset);
  const T* dy = static_cast<const T*>(p.dy);
  const T* dh_in = static_cast<const T*>(p.dh_in);
  const T* h = static_cast<const T*>(p.h);
  const Acc* rstd = static_cast<const Acc*>(p.rstd);
  T* dx = static_cast<T*>(p.dx);
  Acc* partial = static_cast<Acc*>(p.dweight_partial);  // (num_row_blocks, cols)
  const int64_t blocks = p.num_row_blocks;
  const int64_t rows_per_block = (rows + blocks - 1) / std::max<int64_t>(blocks, 1);

  // Pass 1: per row block, dx rows and the block's partial dweight.
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      Acc* pw = partial + b * cols;
      std::fill(pw, pw + cols, Acc(0));
      const int64_t r_end = std::min(rows, (b + 1) * rows_per_block);
      for (int64_t i = b * rows_per_block; i < r_end; ++i) {
        const T* dyr = dy + i * cols;
        const T* hr = h + i * cols;
        const Vec rv(rstd[i]);
        // c = mean(g * xhat) with g = dy * (offset + w), xhat = h * r.
        Vec dot(Acc(0));
        for (int64_t j = 0; j < cols; j += kW) {
          const int64_t n = std::min(kW, cols - j);
          const Vec g = load_acc<T>(dyr + j, n) * Vec::loadu(wp.data() + j, n);
          dot = at::vec::fmadd(g, load_acc<T>(hr + j, n) * rv, dot);
        }
        const Acc c = at::vec::vec_reduce_all<Acc>([](const Vec& a, const Vec& b) { return a + b; }, dot) /
                      Acc(cols);
        const Vec cv(c);
        T* dxr = dx + i * cols;
        const T* dhr = dh_in != nullptr ? dh_in + i * cols : nullptr;
        for (int64_t j = 0; j < cols; j += kW) {
          const int64_t n = std::min(kW, cols - j);
          const Vec d = load_acc<T>(dyr + j, n);
          const Vec xhat = load_acc<T>(hr + j, n) * rv;
          const Vec g = d * Vec::loadu(wp.data() + j, n);
          Vec out = rv * (g - xhat * cv);
          if (dhr != nullptr) out = out + load_acc<T>(dhr + j, n);
          store_acc<T>(dxr + j, out, n);
          const Vec acc = at::vec::fmadd(d, xhat, Vec::loadu(pw + j, n));
          acc.store(pw + j, n);
        }
      }
    }
  });

  // Pass 2: dweight[j] = sum over blocks in order (deterministic).
  W* dweight = static_cast<W*>(p.dweight);
  at::parallel_for(0, cols, 256, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t j = c_begin; j < c_end; ++j) {
      Acc s = 0;
      for (int64_t b = 0; b < blocks; ++b) s += partial[b * cols + j];
      dweight[j] = static_cast<W>(s);
    }
  });
}

// Row blocks for the dweight reduction: a function of the row count only, so that results do
// not depend on the number of threads. At most 64 blocks of at least 128 rows.
int64_t num_row_blocks(int64_t rows) {
  const int64_t per_block = std::max<int64_t>(128, (rows + 63) / 64);
  return std::max<int64_t>(1, (rows + per_block - 1) / per_block);
}

template <typename T, typename W>
struct FwdKernel {
  static void run(const RmsNormFwdParams& p) { rms_norm_fwd_kernel<T, W>(p); }
};
template <typename T, typename W>
struct BwdKernel {
  static void run(const RmsNormBwdParams& p) { rms_norm_bwd_kernel<T, W>(p); }
};

// The one dispatch point: runtime dtypes become template arguments here. The weight is either
// in x's dtype or, for bf16/fp16 x, float32 (checked in rms_norm_args.h).
template <template <typename, typename> class Kernel, typename Params>
void dispatch_rms_norm(at::ScalarType x_type, at::ScalarType w_type, const Params& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_type, "slmfast_rms_norm", [&] {
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      Kernel<scalar_t, scalar_t>::run(p);
    } else if (w_type == x_type) {
      Kernel<scalar_t, scalar_t>::run(p);
    } else {
      Kernel<scalar_t, float>::run(p);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
    double eps, double offset) {
  RmsNormFwdParams p{};
  auto outputs = rms_norm_fwd_prepare("rms_norm_fwd", x, weight, residual, eps, offset, p);
  if (p.rows > 0) {
    dispatch_rms_norm<FwdKernel>(x.scalar_type(), weight.scalar_type(), p);
  }
  return outputs;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(
    const at::Tensor& dy, const std::optional<at::Tensor>& dh, const at::Tensor& h,
    const at::Tensor& weight, const at::Tensor& rstd, double offset) {
  RmsNormBwdParams p{};
  const int64_t rows = h.size(-1) > 0 ? h.numel() / h.size(-1) : 0;
  auto [dx, dweight, workspace] =
      rms_norm_bwd_prepare("rms_norm_bwd", dy, dh, h, weight, rstd, offset, num_row_blocks(rows), p);
  if (p.rows > 0) {
    dispatch_rms_norm<BwdKernel>(h.scalar_type(), weight.scalar_type(), p);
  } else {
    dweight.zero_();
  }
  return {dx, dweight};
}

}  // namespace

TORCH_LIBRARY_IMPL(slmfast, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
}

}  // namespace slmfast::cpu
