// rowwise.h — helpers for the row-wise CPU kernels (rms_norm, layer_norm) and the elementwise
// ones (glu, rotary), on top of vec.h: a store that also returns the value as rounded to the
// stored type, a horizontal sum, and the grain size that gives each thread whole rows.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "vec.h"

namespace slmfast::cpu::CPU_CAPABILITY {

// Store the first n lanes of v as T and return v as it was stored (rounded to T, back in the
// accumulation type), so that statistics computed from it match what backward will re-read.
template <typename T>
inline AccVec<T> store_rounded(T* dst, const AccVec<T>& v, int64_t n = AccVec<T>::size()) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    store_acc<T>(dst, v, n);
    return v;
  } else {
    const auto packed = at::vec::convert_from_float<T>(v, v);
    packed.store(dst, n);
    return std::get<0>(at::vec::convert_to_float<T>(packed));
  }
}

// v rounded to T and back (identity for float and double).
template <typename T>
inline AccVec<T> round_through(const AccVec<T>& v) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return v;
  } else {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v)));
  }
}

// Full-width steps: kStep<T> elements are two accumulation vectors. For bf16/fp16 that is one
// native Vectorized<T> (32 elements), converted with one load and one store, instead of two
// half-width loads and two masked stores; for float and double it is two vectors, for ILP.
template <typename T>
constexpr int64_t kStep = 2 * AccVec<T>::size();

template <typename T>
inline void load2(const T* src, AccVec<T>& a, AccVec<T>& b) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    a = AccVec<T>::loadu(src);
    b = AccVec<T>::loadu(src + AccVec<T>::size());
  } else {
    static_assert(at::vec::Vectorized<T>::size() == kStep<T>);
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(src));
  }
}

template <typename T>
inline void store2(T* dst, const AccVec<T>& a, const AccVec<T>& b) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    a.store(dst);
    b.store(dst + AccVec<T>::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(dst);
  }
}

// a, b += the kStep<T> elements at src (a second input of a row pass: a residual, a gradient).
template <typename T>
inline void add_loaded2(const T* src, AccVec<T>& a, AccVec<T>& b) {
  AccVec<T> c, d;
  load2<T>(src, c, d);
  a = a + c;
  b = b + d;
}

// store2, and a, b replaced by the values as stored (rounded to T).
template <typename T>
inline void store2_rounded(T* dst, AccVec<T>& a, AccVec<T>& b) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    store2<T>(dst, a, b);
  } else {
    const auto packed = at::vec::convert_from_float<T>(a, b);
    packed.store(dst);
    std::tie(a, b) = at::vec::convert_to_float<T>(packed);
  }
}

// Walks a row of `cols` elements: full(j) for each full step of kStep<T> elements, then
// tail(j, n) for what is left, in pieces of at most one accumulation vector (n elements).
template <typename T, typename Full, typename Tail>
inline void for_row(int64_t cols, Full&& full, Tail&& tail) {
  int64_t j = 0;
  for (; j + kStep<T> <= cols; j += kStep<T>) full(j);
  for (; j < cols; j += AccVec<T>::size()) tail(j, std::min<int64_t>(AccVec<T>::size(), cols - j));
}

// Walks a row of two inputs a and b (e.g. dy and h) like for_row: full(j, a0, a1, b0, b1) with
// the two halves of each full step, then tail(j, n, av, bv), zero beyond n, for what is left.
template <typename T, typename Full, typename Tail>
inline void for_row2(int64_t cols, const T* a, const T* b, Full&& full, Tail&& tail) {
  for_row<T>(cols, [&](int64_t j) {
    AccVec<T> a0, a1, b0, b1;
    load2<T>(a + j, a0, a1);
    load2<T>(b + j, b0, b1);
    full(j, a0, a1, b0, b1);
  }, [&](int64_t j, int64_t n) {
    tail(j, n, load_acc<T>(a + j, n), load_acc<T>(b + j, n));
  });
}

template <typename A>
inline A reduce_sum(const at::vec::Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](const auto& a, const auto& b) { return a + b; }, v);
}

// Rows per at::parallel_for chunk: about 64 KiB of input per chunk, at least one row.
inline int64_t row_grain(int64_t cols, int64_t elem_size) {
  return std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, cols * elem_size));
}

}  // namespace slmfast::cpu::CPU_CAPABILITY
