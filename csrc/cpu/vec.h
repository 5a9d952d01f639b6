// vec.h — small at::vec helpers shared by the CPU kernels: load any element type into the
// accumulation vector type (float for fp32/bf16/fp16, double for fp64), store back, and handle
// the ragged tail of a row without reading or writing past its end.
//
// The accumulation type is at::opmath_type<T> (float for bf16/fp16), as in ATen's own CPU
// kernels (aten/src/ATen/native/cpu/*). The width is whatever CPU_CAPABILITY setup.py compiled
// for (16 floats with AVX-512).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstring>
#include <type_traits>

namespace slmfast::cpu {

template <typename T>
using acc_t = at::opmath_type<T>;

template <typename T>
using AccVec = at::vec::Vectorized<acc_t<T>>;

// Load AccVec<T>::size() elements (or the first n, the rest zero) as the accumulation type.
template <typename T>
inline AccVec<T> load_acc(const T* src, int64_t n = AccVec<T>::size()) {
  using Vec = AccVec<T>;
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return n == Vec::size() ? Vec::loadu(src) : Vec::loadu(src, n);
  } else {
    Vec out;
    if (n == Vec::size()) {
      at::vec::load_to_float<T>(src, out);
    } else {
      T buf[Vec::size()];
      std::memset(buf, 0, sizeof(buf));
      std::memcpy(buf, src, n * sizeof(T));
      at::vec::load_to_float<T>(buf, out);
    }
    return out;
  }
}

// Store the first n lanes of an accumulation vector as T.
template <typename T>
inline void store_acc(T* dst, const AccVec<T>& v, int64_t n = AccVec<T>::size()) {
  using Vec = AccVec<T>;
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    if (n == Vec::size()) {
      v.store(dst);
    } else {
      v.store(dst, n);
    }
  } else {
    // convert_from_float packs two float vectors into one reduced vector; the second is unused.
    auto packed = at::vec::convert_from_float<T>(v, v);
    if (n == Vec::size()) {
      packed.store(dst, Vec::size());
    } else {
      packed.store(dst, n);
    }
  }
}

// Scalar conversions for the few places that are not vectorized.
template <typename T>
inline acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}

}  // namespace slmfast::cpu
