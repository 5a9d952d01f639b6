// norm_rows.h — the row passes the two CPU norm kernels share (kernels/rms_norm.cpp,
// kernels/layer_norm.cpp), on top of rowwise.h: the forward's walk over its rows, its first pass
// (h = x + residual, stored, folded into the row's statistics) and its normalize-and-scale pass,
// and the backward's
// walk over fixed row blocks, its passes over (dy, h) rows, the dx pass with the block's
// weight-gradient partial sums, and the in-order reduction of those partial sums.
//
// Each helper runs the loop; the op passes the arithmetic as a lambda, which the compiler
// inlines, so every value is computed by the same operations in the same order as when the two
// kernels wrote the loops out themselves (results bit-identical). Compiled once per capability
// like every file under csrc/cpu/kernels/.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <vector>

#include "rowwise.h"
#include "vec.h"

namespace slmfast::cpu::CPU_CAPABILITY {

// A (cols,) parameter (weight, bias) in the accumulation type, converted once per call; `fill`
// everywhere when values is nullptr (an absent bias).
template <typename T, typename W>
std::vector<acc_t<T>> to_acc_vector(const W* values, int64_t cols, acc_t<T> fill) {
  std::vector<acc_t<T>> out(cols, fill);
  if (values != nullptr) {
    for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<acc_t<T>>(values[j]);
  }
  return out;
}

// The forward's first pass over one row: h = x + residual when rr != nullptr, stored rounded to
// T at hr (the stored h is what backward reads, so the statistics use the rounded values too),
// and fold(s, v) for each vector v of h: a full step's two halves into two accumulators, the
// ragged tail (zero beyond the row's end) into the first. Returns the sum of the two. The same
// additions in the same order with or without a residual, so that the norm of h reproduces
// the statistics of the norm of (x, residual) bit for bit (norm_linear's recompute).
template <typename T, typename Fold>
inline AccVec<T> fold_residual_row(int64_t cols, const T* xr, const T* rr, T* hr, Fold&& fold) {
  using Vec = AccVec<T>;
  Vec s0(acc_t<T>(0)), s1(acc_t<T>(0));
  for_row<T>(cols, [&](int64_t j) {
    Vec a, b;
    load2<T>(xr + j, a, b);
    if (rr != nullptr) {
      add_loaded2<T>(rr + j, a, b);
      store2_rounded<T>(hr + j, a, b);
    }
    fold(s0, a);
    fold(s1, b);
  }, [&](int64_t j, int64_t n) {
    Vec v = load_acc<T>(xr + j, n);  // zero beyond n
    if (rr != nullptr) v = store_rounded<T>(hr + j, v + load_acc<T>(rr + j, n), n);
    fold(s0, v);
  });
  return s0 + s1;
}

// The forward's walk over its rows, in parallel, whole rows per thread: the first pass over row
// i (fold_residual_row with `fold`), then rest(i, h, s) with the row of h to normalize (x's own
// row without a residual) and the folded statistic s.
template <typename T, typename Params, typename Fold, typename Rest>
inline void for_norm_fwd_rows(const Params& p, Fold&& fold, Rest&& rest) {
  const int64_t cols = p.cols;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* h_out = static_cast<T*>(p.h);
  at::parallel_for(0, p.rows, row_grain(cols, sizeof(T)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + i * cols;
      const T* rr = res != nullptr ? res + i * cols : nullptr;
      T* hr = res != nullptr ? h_out + i * cols : nullptr;
      const AccVec<T> s = fold_residual_row<T>(cols, xr, rr, hr, fold);
      rest(i, res != nullptr ? static_cast<const T*>(hr) : xr, s);
    }
  });
}

// The normalize-and-scale pass over one cached row: y = f(h, j, n) for each vector of n
// elements starting at column j (f loads its per-column parameters from j, n lanes).
template <typename T, typename F>
inline void map_row(int64_t cols, const T* hr, T* yr, F&& f) {
  using Vec = AccVec<T>;
  constexpr int64_t kW = Vec::size();
  for_row<T>(cols, [&](int64_t j) {
    Vec a, b;
    load2<T>(hr + j, a, b);
    store2<T>(yr + j, f(a, j, kW), f(b, j + kW, kW));
  }, [&](int64_t j, int64_t n) {
    store_acc<T>(yr + j, f(load_acc<T>(hr + j, n), j, n), n);
  });
}

// The backward's walk over its rows: `blocks` fixed runs of consecutive rows, in parallel; block
// b zeroes its `width` accumulators at partial + b * width, then calls row(i, acc) for each of
// its rows in order. The blocks depend on the row count only (csrc/cpu/row_blocks.h), so the
// weight gradients reduced from them are bit-identical whatever the thread count.
template <typename Acc, typename Row>
inline void for_row_blocks(int64_t rows, int64_t blocks, Acc* partial, int64_t width, Row&& row) {
  const int64_t rows_per_block = (rows + blocks - 1) / std::max<int64_t>(blocks, 1);
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t blk = b_begin; blk < b_end; ++blk) {
      Acc* acc = partial + blk * width;
      std::fill(acc, acc + width, Acc(0));
      const int64_t r_end = std::min(rows, (blk + 1) * rows_per_block);
      for (int64_t i = blk * rows_per_block; i < r_end; ++i) row(i, acc);
    }
  });
}

// A pass over one row of dy and h: f(d, hv, j, n, half) for each pair of vectors of n elements
// starting at column j, half = 0 or 1 for the two halves of a full step (the ragged tail, zero
// beyond the row's end, comes as half 0).
template <typename T, typename F>
inline void for_grad_row(int64_t cols, const T* dyr, const T* hr, F&& f) {
  using Vec = AccVec<T>;
  constexpr int64_t kW = Vec::size();
  for_row2<T>(cols, dyr, hr, [&](int64_t j, const Vec& d0, const Vec& d1, const Vec& h0, const Vec& h1) {
    f(d0, h0, j, kW, 0);
    f(d1, h1, j + kW, kW, 1);
  }, [&](int64_t j, int64_t n, const Vec& d, const Vec& hv) { f(d, hv, j, n, 0); });
}

// The dx pass over one cached row: dx = grad(d, hv, j, n) + dh (dh when dhr != nullptr) for each
// pair of dy, h vectors of n elements starting at column j; grad also adds the row's terms to
// its block's weight-gradient partial sums.
template <typename T, typename Grad>
inline void dx_row(int64_t cols, const T* dyr, const T* hr, const T* dhr, T* dxr, Grad&& grad) {
  using Vec = AccVec<T>;
  constexpr int64_t kW = Vec::size();
  for_row2<T>(cols, dyr, hr, [&](int64_t j, const Vec& d0, const Vec& d1, const Vec& h0, const Vec& h1) {
    Vec o0 = grad(d0, h0, j, kW);
    Vec o1 = grad(d1, h1, j + kW, kW);
    if (dhr != nullptr) add_loaded2<T>(dhr + j, o0, o1);
    store2<T>(dxr + j, o0, o1);
  }, [&](int64_t j, int64_t n, const Vec& d, const Vec& hv) {
    Vec o = grad(d, hv, j, n);
    if (dhr != nullptr) o = o + load_acc<T>(dhr + j, n);
    store_acc<T>(dxr + j, o, n);
  });
}

// The weight gradients from the blocks' partial sums, laid out (blocks, K, cols): out[k][j] =
// the sum over blocks, in block order (deterministic), of partial[(b * K + k) * cols + j].
template <typename Acc, typename W, size_t K>
inline void reduce_row_blocks(const Acc* partial, int64_t blocks, int64_t cols, const std::array<W*, K>& out) {
  const int64_t k_sums = static_cast<int64_t>(K);
  at::parallel_for(0, cols, 256, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t j = c_begin; j < c_end; ++j) {
      std::array<Acc, K> s{};  // zeros
      for (int64_t blk = 0; blk < blocks; ++blk) {
        for (int64_t k = 0; k < k_sums; ++k) s[k] += partial[(blk * k_sums + k) * cols + j];
      }
      for (int64_t k = 0; k < k_sums; ++k) out[k][j] = static_cast<W>(s[k]);
    }
  });
}

}  // namespace slmfast::cpu::CPU_CAPABILITY
