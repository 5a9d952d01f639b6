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

#include <cmath>
#include <vector>

#include "../../common/params.h"
#include "../kernel_table.h"
#include "rowwise.h"
#include "vec.h"

namespace slmfast::cpu::CPU_CAPABILITY {
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
  const Acc* w = wp.data();
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  T* h_out = static_cast<T*>(p.h);
  Acc* rstd = static_cast<Acc*>(p.rstd);

  at::parallel_for(0, p.rows, row_grain(cols, sizeof(T)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + i * cols;
      const T* rr = res != nullptr ? res + i * cols : nullptr;
      T* hr = res != nullptr ? h_out + i * cols : nullptr;
      const T* h = res != nullptr ? hr : xr;
      // Pass 1 over the row: h = x + residual, stored rounded to T (the stored h is what
      // backward sees, so the statistics use the rounded values too), and the sum of squares.
      // The same additions in the same order with or without a residual, so that rms_norm(h)
      // reproduces the r of rms_norm(x, residual) bit for bit (norm_linear's recompute).
      Vec ss0(Acc(0)), ss1(Acc(0));
      for_row<T>(cols, [&](int64_t j) {
        Vec a, b;
        load2<T>(xr + j, a, b);
        if (rr != nullptr) {
          Vec c, d;
          load2<T>(rr + j, c, d);
          a = a + c;
          b = b + d;
          store2_rounded<T>(hr + j, a, b);
        }
        ss0 = at::vec::fmadd(a, a, ss0);
        ss1 = at::vec::fmadd(b, b, ss1);
      }, [&](int64_t j, int64_t n) {
        Vec v = load_acc<T>(xr + j, n);  // zero beyond n
        if (rr != nullptr) v = store_rounded<T>(hr + j, v + load_acc<T>(rr + j, n), n);
        ss0 = at::vec::fmadd(v, v, ss0);
      });
      const Acc r = Acc(1) / std::sqrt(reduce_sum(ss0 + ss1) / Acc(cols) + Acc(p.eps));
      rstd[i] = r;
      // Pass 2: y = h * r * (offset + w), re-reading h from L1/L2 (one row is at most a few
      // tens of KiB), so main memory sees each element once.
      const Vec rv(r);
      T* yr = y + i * cols;
      for_row<T>(cols, [&](int64_t j) {
        Vec a, b;
        load2<T>(h + j, a, b);
        store2<T>(yr + j, a * rv * Vec::loadu(w + j), b * rv * Vec::loadu(w + j + kW));
      }, [&](int64_t j, int64_t n) {
        store_acc<T>(yr + j, load_acc<T>(h + j, n) * rv * Vec::loadu(w + j, n), n);
      });
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
  const Acc* w = wp.data();
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
    for (int64_t blk = b_begin; blk < b_end; ++blk) {
      Acc* pw = partial + blk * cols;
      std::fill(pw, pw + cols, Acc(0));
      const int64_t r_end = std::min(rows, (blk + 1) * rows_per_block);
      for (int64_t i = blk * rows_per_block; i < r_end; ++i) {
        const T* dyr = dy + i * cols;
        const T* hr = h + i * cols;
        const Vec rv(rstd[i]);
        // c = mean(g * xhat) with g = dy * (offset + w), xhat = h * r.
        Vec dot0(Acc(0)), dot1(Acc(0));
        for_row<T>(cols, [&](int64_t j) {
          Vec d0, d1, h0, h1;
          load2<T>(dyr + j, d0, d1);
          load2<T>(hr + j, h0, h1);
          dot0 = at::vec::fmadd(d0 * Vec::loadu(w + j), h0 * rv, dot0);
          dot1 = at::vec::fmadd(d1 * Vec::loadu(w + j + kW), h1 * rv, dot1);
        }, [&](int64_t j, int64_t n) {
          dot0 = at::vec::fmadd(load_acc<T>(dyr + j, n) * Vec::loadu(w + j, n), load_acc<T>(hr + j, n) * rv, dot0);
        });
        const Vec cv(reduce_sum(dot0 + dot1) / Acc(cols));
        // Pass 2 (cached row): dx = r (g - xhat c) + dh, and dweight += dy * xhat.
        T* dxr = dx + i * cols;
        const T* dhr = dh_in != nullptr ? dh_in + i * cols : nullptr;
        auto grad = [&](const Vec& d, const Vec& hv, const Vec& wv, Acc* pwj, int64_t n) {
          const Vec xhat = hv * rv;
          at::vec::fmadd(d, xhat, Vec::loadu(pwj, n)).store(pwj, n);
          return rv * (d * wv - xhat * cv);
        };
        for_row<T>(cols, [&](int64_t j) {
          Vec d0, d1, h0, h1;
          load2<T>(dyr + j, d0, d1);
          load2<T>(hr + j, h0, h1);
          Vec o0 = grad(d0, h0, Vec::loadu(w + j), pw + j, kW);
          Vec o1 = grad(d1, h1, Vec::loadu(w + j + kW), pw + j + kW, kW);
          if (dhr != nullptr) {
            Vec e0, e1;
            load2<T>(dhr + j, e0, e1);
            o0 = o0 + e0;
            o1 = o1 + e1;
          }
          store2<T>(dxr + j, o0, o1);
        }, [&](int64_t j, int64_t n) {
          Vec o = grad(load_acc<T>(dyr + j, n), load_acc<T>(hr + j, n), Vec::loadu(w + j, n), pw + j, n);
          if (dhr != nullptr) o = o + load_acc<T>(dhr + j, n);
          store_acc<T>(dxr + j, o, n);
        });
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
