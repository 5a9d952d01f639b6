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

template <typename T, typename W>
void layer_norm_fwd_kernel(const LayerNormFwdParams& p) {
  using Acc = acc_t<T>;
  using Vec = AccVec<T>;
  const int64_t cols = p.cols;
  const auto wv = to_acc_vector<T, W>(static_cast<const W*>(p.weight), cols, Acc(1));
  const auto bv = to_acc_vector<T, W>(static_cast<const W*>(p.bias), cols, Acc(0));
  const Acc* w = wv.data();
  const Acc* bias = bv.data();
  T* y = static_cast<T*>(p.y);
  Acc* mean_out = static_cast<Acc*>(p.mean);
  Acc* rstd_out = static_cast<Acc*>(p.rstd);

  // Pass 1 over each row: h = x + residual and sum(h).
  for_norm_fwd_rows<T>(p, [](Vec& acc, const Vec& v) { acc = acc + v; }, [&](int64_t i, const T* h, const Vec& s) {
    const Acc mu = reduce_sum(s) / Acc(cols);
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
    map_row<T>(cols, h, y + i * cols, [&](const Vec& v, int64_t j, int64_t n) {
      return at::vec::fmadd((v - muv) * rv, Vec::loadu(w + j, n), Vec::loadu(bias + j, n));
    });
  });
}

template <typename T, typename W>
void layer_norm_bwd_kernel(const LayerNormBwdParams& p) {
  using Acc = acc_t<T>;
  using Vec = AccVec<T>;
  const int64_t cols = p.cols;
  const auto wv = to_acc_vector<T, W>(static_cast<const W*>(p.weight), cols, Acc(1));
  const Acc* w = wv.data();
  const T* dy = static_cast<const T*>(p.dy);
  const T* dh_in = static_cast<const T*>(p.dh_in);
  const T* h = static_cast<const T*>(p.h);
  const Acc* mean = static_cast<const Acc*>(p.mean);
  const Acc* rstd = static_cast<const Acc*>(p.rstd);
  T* dx = static_cast<T*>(p.dx);
  Acc* partial = static_cast<Acc*>(p.partial);  // (blocks, 2, cols): dweight, dbias

  for_row_blocks(p.rows, p.num_row_blocks, partial, 2 * cols, [&](int64_t i, Acc* pw) {
    Acc* pb = pw + cols;
    const T* dyr = dy + i * cols;
    const T* hr = h + i * cols;
    const Vec muv(mean[i]);
    const Vec rv(rstd[i]);
    // Pass 1: mean(g) and mean(g * xhat), g = dy * w. Lanes past the row end: dy is zero.
    Vec sg(Acc(0)), sgx(Acc(0));
    for_grad_row<T>(cols, dyr, hr, [&](const Vec& d, const Vec& hv, int64_t j, int64_t n, int /*half*/) {
      const Vec g = d * Vec::loadu(w + j, n);
      sg = sg + g;
      sgx = at::vec::fmadd(g, (hv - muv) * rv, sgx);
    });
    const Vec cg(reduce_sum(sg) / Acc(cols));
    const Vec cgx(reduce_sum(sgx) / Acc(cols));
    // Pass 2 (cached row): dx and the block's dweight/dbias partial sums.
    dx_row<T>(cols, dyr, hr, dh_in != nullptr ? dh_in + i * cols : nullptr, dx + i * cols,
              [&](const Vec& d, const Vec& hv, int64_t j, int64_t n) {
                const Vec wv = Vec::loadu(w + j, n);  // first, as in rms_norm.cpp (same FMA fusion)
                const Vec xhat = (hv - muv) * rv;
                at::vec::fmadd(d, xhat, Vec::loadu(pw + j, n)).store(pw + j, n);
                (Vec::loadu(pb + j, n) + d).store(pb + j, n);
                return rv * (d * wv - cg - xhat * cgx);
              });
  });

  // dweight[j], dbias[j] = sums over blocks in order (deterministic).
  reduce_row_blocks<Acc, W, 2>(partial, p.num_row_blocks, cols, {static_cast<W*>(p.dweight), static_cast<W*>(p.dbias)});
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
