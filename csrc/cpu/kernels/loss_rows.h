// kernels/loss_rows.h — row helpers shared by the loss kernels (cross_entropy.cpp, distill.cpp in
// this folder): masked tails, horizontal sums and maxima, a one-hot subtraction, a zeroed row.
// Per-capability code (see vec.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "vec.h"

namespace slmfast::cpu::CPU_CAPABILITY {

// n < width: the first n lanes of v, the rest `fill` (the tail of a row never counts).
template <typename Vec>
inline Vec keep_first(const Vec& v, int64_t n, typename Vec::value_type fill) {
  return n == Vec::size() ? v : Vec::set(Vec(fill), v, n);
}

template <typename Acc>
inline Acc vsum(const at::vec::Vectorized<Acc>& v) {
  return at::vec::vec_reduce_all<Acc>([](const auto& a, const auto& b) { return a + b; }, v);
}

template <typename Acc>
inline Acc vmax(const at::vec::Vectorized<Acc>& v) {
  return at::vec::vec_reduce_all<Acc>([](const auto& a, const auto& b) { return at::vec::maximum(a, b); }, v);
}

// Subtract `hot` from lane (y - j) of v when y falls in the block [j, j + width).
template <typename Vec>
inline Vec sub_at(const Vec& v, int64_t j, int64_t y, typename Vec::value_type hot) {
  if (y < j || y >= j + Vec::size()) return v;
  typename Vec::value_type buf[Vec::size()];
  v.store(buf);
  buf[y - j] -= hot;
  return Vec::loadu(buf);
}

template <typename T>
void zero_row(T* dst, int64_t cols) {
  using Vec = AccVec<T>;
  for (int64_t j = 0; j < cols; j += Vec::size()) store_acc<T>(dst + j, Vec(0), std::min<int64_t>(Vec::size(), cols - j));
}

}  // namespace slmfast::cpu::CPU_CAPABILITY
