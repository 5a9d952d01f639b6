// vec.h — small at::vec helpers shared by the CPU kernels: load any element type into the
// accumulation vector type (float for fp32/bf16/fp16, double for fp64), store back, handle the
// ragged tail of a row without reading or writing past its end, and turn a params struct's
// DType into a template argument (the one dispatch point of each kernel file).
//
// The accumulation type is at::opmath_type<T> (float for bf16/fp16), as in ATen's own CPU
// kernels (aten/src/ATen/native/cpu/*). This header and everything in csrc/cpu/kernels/ is
// compiled once per capability (csrc/cpu/capability.h): setup.py defines CPU_CAPABILITY (DEFAULT,
// AVX2 or AVX512) and the matching compiler flags per copy, at::vec picks its vector width from
// it (8 floats with AVX2, 16 with AVX512; DEFAULT is at::vec's portable implementation), and the
// code lives in namespace slmfast::cpu::<CAPABILITY> so that the copies never share a symbol.
#pragma once

#ifndef CPU_CAPABILITY
#error "csrc/cpu/kernels/ is compiled once per CPU capability: setup.py defines CPU_CAPABILITY"
#endif

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

#include "../../common/params.h"

namespace slmfast::cpu::CPU_CAPABILITY {

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

// The CPU kernels' element types of the 16-bit DTypes (params.h).
using CpuElementTypes = ElementTypes<c10::Half, c10::BFloat16>;

// f(T{}) with T the element type of `dtype`: the runtime dtype of a params struct becomes a
// template argument here, once per kernel entry point (params.h's visit_element_type).
template <typename F>
inline void visit_dtype(DType dtype, F&& f) {
  TORCH_CHECK(visit_element_type<CpuElementTypes>(dtype, f), "slmfast: unknown dtype code ",
              static_cast<int>(dtype));
}

// f(T{}, W{}) for a norm's input dtype T and weight dtype W (params.h's visit_norm_element_types).
template <typename F>
inline void visit_norm_dtypes(DType x_dtype, DType weight_dtype, F&& f) {
  TORCH_CHECK(visit_norm_element_types<CpuElementTypes>(x_dtype, weight_dtype, f), "slmfast: unknown dtype code ",
              static_cast<int>(x_dtype));
}

}  // namespace slmfast::cpu::CPU_CAPABILITY
