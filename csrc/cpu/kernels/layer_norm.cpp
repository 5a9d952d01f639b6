// kernels/layer_norm.cpp — the vectorized kernels of the CPU fused LayerNorm (+ residual add),
// forward and backward, compiled once per capability (csrc/cpu/capability.h); the op is
// csrc/cpu/layer_norm.cpp.
//
// LayerNorm of Ba, Kiros & Hinton 2016 ("Layer Normalization"), in the pre-norm residual form:
//   h = x + residual,  mu = mean(h),  r = 1 / sqrt(mean((h - mu)^2) + eps),
//   y = (h - mu) * r * w + b
// The forward writes y, h and (mu, r) per row; the backward recomputes xhat = (h - mu) * r from
// them, so y and xhat are never saved (docs/architecture.md §3):
//   g = dy * w,  dh = r * (g - mean(g) - xhat * mean(g * xhat)) + dh_out,
//   dw = sum_rows(dy * xhat),  db = sum_rows(dy)
// Same structure as rms_norm.cpp: rows in parallel, each row read once from memory and its other
// passes served from L1/L2 (the variance is a second pass over the cached row, not E[h^2] - mu^2,
// which cancels badly when |mu| >> std); dweight/dbias reduced over fixed row blocks in order, so
// they are bit-identical whatever the thread count.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../../common/params.h"
#include "../kernel_table.h"
#include "rowwise.h"
#include "vec.h"

namespace slmfast::cpu::CPU_CAPABILITY {
namespace {

template <typename T, typename W>
std::vector<acc_t<T>> to_acc_vector(const W* values, int64_t cols, acc_t<T> fill) {
  std::vector<acc_t<T>> out(cols, fill);
  if (values != nullptr) {
    for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<acc_t<T>>(values[j]);
  }
  return out;
}

template <typename T, typename W>
void layer_norm_fwd_kernel(const LayerNormFwdParams& p) {
  using Acc = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t kW = Vec::size();
  const int64_t cols = p.cols;
  const auto wv = to_acc_vector<T, W>(static_cast<const W*>(p.weight), cols, Acc(1));
  const auto bv = to_acc_vector<T, W>(static_cast<const W*>(p.bias), cols, Acc(0));
  const Acc* w = wv.data();
  const Acc* bias = bv.data();
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  T* h_out = static_cast<T*>(p.h);
  Acc* mean_out = static_cast<Acc*>(p.mean);
  Acc* rstd_out = static_cast<Acc*>(p.rstd);

  at::parallel_for(0, p.rows, row_grain(cols, sizeof(T)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + i * cols;
      const T* rr = res != nullptr ? res + i * cols : nullptr;
      T* hr = res != nullptr ? h_out + i * cols : nullptr;
      const T* h = res != nullptr ? hr : xr;
      // Pass 1: h = x + residual (stored rounded to T, as backward will read it) and sum(h).
      Vec s0(Acc(0)), s1(Acc(0));
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
        s0 = s0 + a;
        s1 = s1 + b;
      }, [&](int64_t j, int64_t n) {
        Vec v = load_acc<T>(xr + j, n);  // zero beyond n
        if (rr != nullptr) v = store_rounded<T>(hr + j, v + load_acc<T>(rr + j, n), n);
        s0 = s0 + v;
      });
      const Acc mu = reduce_sum(s0 + s1) / Acc(cols);
      // Pass 2 (cached row): the centred sum of squares; lanes past the row end are masked out.
      const Vec muv(mu);
      Vec q0(Acc(0)), q1(Acc(0));
      for_row<T>(cols, [&](int64_t j) {
        Vec a, b;
        load2<T>(h + j, a, b);
        a = a - muv;
        b = b - muv;
        q0 = at::vec::fmadd(a, a, q0);
        q1 = at::vec::fmadd(b, b, q1);
      }, [&](int64_t j, int64_t n) {
        const Vec d = Vec::set(Vec(Acc(0)), load_acc<T>(h + j, n) - muv, n);
        q0 = at::vec::fmadd(d, d, q0);
      });
      const Acc r = Acc(1) / std::sqrt(reduce_sum(q0 + q1) / Acc(cols) + Acc(p.eps));
      mean_out[i] = mu;
      rstd_out[i] = r;
      // Pass 3 (cached row): y = (h - mu) * r * w + b.
      const Vec rv(r);
      T* yr = y + i * cols;
      for_row<T>(cols, [&](int64_t j) {
        Vec a, b;
        load2<T>(h + j, a, b);
        store2<T>(yr + j, at::vec::fmadd((a - muv) * rv, Vec::loadu(w + j), Vec::loadu(bias + j)),
                  at::vec::fmadd((b - muv) * rv, Vec::loadu(w + j + kW), Vec::loadu(bias + j + kW)));
      }, [&](int64_t j, int64_t n) {
        const Vec xhat = (load_acc<T>(h + j, n) - muv) * rv;
        store_acc<T>(yr + j, at::vec::fmadd(xhat, Vec::loadu(w + j, n), Vec::loadu(bias + j, n)), n);
      });
    }
  });
}

template <typename T, typename W>
void layer_norm_bwd_kernel(const LayerNormBwdParams& p) {
  using Acc = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t kW = Vec::size();
  const int64_t cols = p.cols;
  const int64_t rows = p.rows;
  const auto wv = to_acc_vector<T, W>(static_cast<const W*>(p.weight), cols, Acc(1));
  const Acc* w = wv.data();
  const T* dy = static_cast<const T*>(p.dy);
  const T* dh_in = static_cast<const T*>(p.dh_in);
  const T* h = static_cast<const T*>(p.h);
  const Acc* mean = static_cast<const Acc*>(p.mean);
  const Acc* rstd = static_cast<const Acc*>(p.rstd);
  T* dx = static_cast<T*>(p.dx);
  Acc* partial = static_cast<Acc*>(p.partial);  // (blocks, 2, cols): dweight, dbias
  const int64_t blocks = p.num_row_blocks;
  const int64_t rows_per_block = (rows + blocks - 1) / std::max<int64_t>(blocks, 1);

  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t blk = b_begin; blk < b_end; ++blk) {
      Acc* pw = partial + blk * 2 * cols;
      Acc* pb = pw + cols;
      std::fill(pw, pw + 2 * cols, Acc(0));
      const int64_t r_end = std::min(rows, (blk + 1) * rows_per_block);
      for (int64_t i = blk * rows_per_block; i < r_end; ++i) {
        const T* dyr = dy + i * cols;
        const T* hr = h + i * cols;
        const Vec muv(mean[i]);
        const Vec rv(rstd[i]);
        // Pass 1: mean(g) and mean(g * xhat), g = dy * w. Lanes past the row end: dy is zero.
        Vec sg(Acc(0)), sgx(Acc(0));
        auto sums = [&](const Vec& d, const Vec& hv, const Vec& wj) {
          const Vec g = d * wj;
          sg = sg + g;
          sgx = at::vec::fmadd(g, (hv - muv) * rv, sgx);
        };
        for_row<T>(cols, [&](int64_t j) {
          Vec d0, d1, h0, h1;
          load2<T>(dyr + j, d0, d1);
          load2<T>(hr + j, h0, h1);
          sums(d0, h0, Vec::loadu(w + j));
          sums(d1, h1, Vec::loadu(w + j + kW));
        }, [&](int64_t j, int64_t n) {
          sums(load_acc<T>(dyr + j, n), load_acc<T>(hr + j, n), Vec::loadu(w + j, n));
        });
        const Vec cg(reduce_sum(sg) / Acc(cols));
        const Vec cgx(reduce_sum(sgx) / Acc(cols));
        // Pass 2 (cached row): dx and the block's dweight/dbias partial sums.
        T* dxr = dx + i * cols;
        const T* dhr = dh_in != nullptr ? dh_in + i * cols : nullptr;
        auto grad = [&](const Vec& d, const Vec& hv, const Vec& wj, int64_t j, int64_t n) {
          const Vec xhat = (hv - muv) * rv;
          at::vec::fmadd(d, xhat, Vec::loadu(pw + j, n)).store(pw + j, n);
          (Vec::loadu(pb + j, n) + d).store(pb + j, n);
          return rv * (d * wj - cg - xhat * cgx);
        };
        for_row<T>(cols, [&](int64_t j) {
          Vec d0, d1, h0, h1;
          load2<T>(dyr + j, d0, d1);
          load2<T>(hr + j, h0, h1);
          Vec o0 = grad(d0, h0, Vec::loadu(w + j), j, kW);
          Vec o1 = grad(d1, h1, Vec::loadu(w + j + kW), j + kW, kW);
          if (dhr != nullptr) {
            Vec e0, e1;
            load2<T>(dhr + j, e0, e1);
            o0 = o0 + e0;
            o1 = o1 + e1;
          }
          store2<T>(dxr + j, o0, o1);
        }, [&](int64_t j, int64_t n) {
          Vec o = grad(load_acc<T>(dyr + j, n), load_acc<T>(hr + j, n), Vec::loadu(w + j, n), j, n);
          if (dhr != nullptr) o = o + load_acc<T>(dhr + j, n);
          store_acc<T>(dxr + j, o, n);
        });
      }
    }
  });

  // dweight[j], dbias[j] = sums over blocks in order (deterministic).
  W* dweight = static_cast<W*>(p.dweight);
  W* dbias = static_cast<W*>(p.dbias);
  at::parallel_for(0, cols, 256, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t j = c_begin; j < c_end; ++j) {
      Acc sw = 0, sb = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        sw += partial[blk * 2 * cols + j];
        sb += partial[blk * 2 * cols + cols + j];
      }
      dweight[j] = static_cast<W>(sw);
      dbias[j] = static_cast<W>(sb);
    }
  });
}

void layer_norm_fwd(const LayerNormFwdParams& p) {
  visit_norm_dtypes(p.x_dtype, p.weight_dtype, [&](auto t, auto w) {
    layer_norm_fwd_kernel<decltype(t), decltype(w)>(p);
  });
}

void layer_norm_bwd(const LayerNormBwdParams& p) {
  visit_norm_dtypes(p.x_dtype, p.weight_dtype, [&](auto t, auto w) {
    layer_norm_bwd_kernel<decltype(t), decltype(w)>(p);
  });
}

}  // namespace

SLMFAST_REGISTER_CPU_KERNEL(layer_norm_fwd, layer_norm_fwd);
SLMFAST_REGISTER_CPU_KERNEL(layer_norm_bwd, layer_norm_bwd);

}  // namespace slmfast::cpu::CPU_CAPABILITY
