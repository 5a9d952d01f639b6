// kernels/glu.cpp — the vectorized kernels of the CPU gated linear units (SwiGLU, GeGLU), forward
// and backward, compiled once per capability (csrc/cpu/capability.h); the op is csrc/cpu/glu.cpp.
//
// Shazeer 2020, "GLU Variants Improve Transformer": out = act(gate) * up, with act = silu
// (SwiGLU, Llama/Mistral/Qwen MLPs) or gelu (GeGLU, Gemma; erf or tanh approximation). The
// backward reads only gate and up (the saved tensors) and recomputes act and its derivative:
//   dgate = dout * up * act'(gate),  dup = dout * act(gate)  [and out = act(gate) * up again when
//   asked, so that the down projection's weight gradient need not have stored it]
//   silu:      s = 1 / (1 + e^-x), act = x s, act' = s (1 + x (1 - s))
//   gelu:      P = (1 + erf(x / sqrt 2)) / 2, act = x P, act' = P + x e^(-x^2/2) / sqrt(2 pi)
//   gelu_tanh: t = tanh(sqrt(2/pi) (x + 0.044715 x^3)), act = x (1 + t) / 2,
//              act' = (1 + t) / 2 + x (1 - t^2) sqrt(2/pi) (1 + 3 0.044715 x^2) / 2
// One pass over memory per direction, elementwise, vectorized with at::vec in the accumulation
// type (float for bf16/fp16, double for fp64), split into fixed blocks across threads.
#include <ATen/Parallel.h>

#include <cmath>

#include "../../common/params.h"
#include "../kernel_table.h"
#include "rowwise.h"
#include "vec.h"

namespace slmfast::cpu::CPU_CAPABILITY {
namespace {

// kFast: the result is rounded to bf16/fp16 (8 or 11 bits), so float32 intermediates need not be
// correctly rounded: e^x is ATen's exp_u20 (within 20 float32 ULP, about twice as fast as exp)
// of x clamped to <= 88 so that it stays finite (e^88 = 1.7e38; the callers only form 1 / (1 + e^x),
// which is 0 to float32 precision there), 1/v the hardware reciprocal estimate (14 bits on
// AVX-512, 12 on AVX2) refined by one Newton step (r (2 - v r): ~23 bits), which replaces a
// division that costs as much as the exp. float32/float64 outputs use the 1-ULP exp and division.
template <bool kFast, typename Vec>
inline Vec exp_for(const Vec& x) {
  if constexpr (kFast) {
    return at::vec::minimum(x, Vec(88)).exp_u20();
  } else {
    return x.exp();
  }
}

template <bool kFast, typename Vec>
inline Vec recip_for(const Vec& v) {
  if constexpr (kFast && std::is_same_v<Vec, at::vec::Vectorized<float>>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 r = _mm512_rcp14_ps(v);
    return Vec(_mm512_mul_ps(r, _mm512_fnmadd_ps(v, r, _mm512_set1_ps(2.f))));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256 r = _mm256_rcp_ps(v);
    return Vec(_mm256_mul_ps(r, _mm256_fnmadd_ps(v, r, _mm256_set1_ps(2.f))));
#endif
  }
  return Vec(1) / v;
}

// tanh(z) = 1 - 2 / (e^2z + 1), with the fast exp and reciprocal when kFast.
template <bool kFast, typename Vec>
inline Vec tanh_for(const Vec& z) {
  if constexpr (kFast) {
    return Vec(1) - Vec(2) * recip_for<kFast>(exp_for<kFast>(z + z) + Vec(1));
  } else {
    return z.tanh();
  }
}

template <typename Vec, GluActivation kAct, bool kFast>
struct Act;

template <typename Vec, bool kFast>
struct Act<Vec, GluActivation::kSilu, kFast> {
  static Vec value(const Vec& x) { return x * recip_for<kFast>(Vec(1) + exp_for<kFast>(x.neg())); }
  static void value_and_grad(const Vec& x, Vec& f, Vec& df) {
    const Vec s = recip_for<kFast>(Vec(1) + exp_for<kFast>(x.neg()));
    f = x * s;
    df = s * (Vec(1) + x * (Vec(1) - s));
  }
};

template <typename Vec, bool kFast>
struct Act<Vec, GluActivation::kGelu, kFast> {
  using A = typename Vec::value_type;
  static constexpr A kAlpha = A(M_SQRT1_2);                   // 1 / sqrt(2)
  static constexpr A kBeta = A(M_2_SQRTPI * M_SQRT1_2 * 0.5);  // 1 / sqrt(2 pi)
  static Vec value(const Vec& x) { return x * (Vec(A(0.5)) + Vec(A(0.5)) * (x * Vec(kAlpha)).erf()); }
  static void value_and_grad(const Vec& x, Vec& f, Vec& df) {
    const Vec cdf = Vec(A(0.5)) + Vec(A(0.5)) * (x * Vec(kAlpha)).erf();
    const Vec pdf = exp_for<kFast>(x * x * Vec(A(-0.5))) * Vec(kBeta);
    f = x * cdf;
    df = cdf + x * pdf;
  }
};

template <typename Vec, bool kFast>
struct Act<Vec, GluActivation::kGeluTanh, kFast> {
  using A = typename Vec::value_type;
  static constexpr A kBeta = A(M_SQRT2 * M_2_SQRTPI * 0.5);  // sqrt(2 / pi)
  static constexpr A kKappa = A(0.044715);
  static Vec value(const Vec& x) {
    const Vec t = tanh_for<kFast>(Vec(kBeta) * (x + Vec(kKappa) * x * x * x));
    return Vec(A(0.5)) * x * (Vec(1) + t);
  }
  static void value_and_grad(const Vec& x, Vec& f, Vec& df) {
    const Vec x2 = x * x;
    const Vec t = tanh_for<kFast>(Vec(kBeta) * (x + Vec(kKappa) * x2 * x));
    const Vec half_x = Vec(A(0.5)) * x;
    f = half_x * (Vec(1) + t);
    df = Vec(A(0.5)) * (Vec(1) + t) +
         half_x * (Vec(1) - t * t) * Vec(kBeta) * (Vec(1) + Vec(A(3) * kKappa) * x2);
  }
};

// Elements per work item: fixed, a multiple of every vector width, so that only the last item
// of the whole tensor has a ragged tail.
constexpr int64_t kBlock = 4096;

template <typename Body>
void for_each_block(int64_t n, Body&& body) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 4, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) body(b * kBlock, std::min(n, (b + 1) * kBlock));
  });
}

template <typename T, GluActivation kAct>
void glu_fwd_kernel(const GluParams& p) {
  using Vec = AccVec<T>;
  using F = Act<Vec, kAct, !std::is_same_v<T, acc_t<T>>>;
  constexpr int64_t kW = Vec::size();
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* out = static_cast<T*>(p.out);
  for_each_block(p.n, [&](int64_t begin, int64_t end) {
    int64_t j = begin;
    for (; j + kStep<T> <= end; j += kStep<T>) {
      Vec g0, g1, u0, u1;
      load2<T>(gate + j, g0, g1);
      load2<T>(up + j, u0, u1);
      store2<T>(out + j, F::value(g0) * u0, F::value(g1) * u1);
    }
    for (; j < end; j += kW) {  // the tail of the last block
      const int64_t n = std::min(kW, end - j);
      store_acc<T>(out + j, F::value(load_acc<T>(gate + j, n)) * load_acc<T>(up + j, n), n);
    }
  });
}

template <typename T, GluActivation kAct, bool kRecompute>
void glu_bwd_kernel(const GluParams& p) {
  using Vec = AccVec<T>;
  using F = Act<Vec, kAct, !std::is_same_v<T, acc_t<T>>>;
  constexpr int64_t kW = Vec::size();
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  const T* dout = static_cast<const T*>(p.dout);
  T* dgate = static_cast<T*>(p.dgate);
  T* dup = static_cast<T*>(p.dup);
  T* out = static_cast<T*>(p.out);
  for_each_block(p.n, [&](int64_t begin, int64_t end) {
    int64_t j = begin;
    for (; j + kStep<T> <= end; j += kStep<T>) {
      Vec g0, g1, u0, u1, d0, d1, f0, f1, df0, df1;
      load2<T>(gate + j, g0, g1);
      load2<T>(up + j, u0, u1);
      load2<T>(dout + j, d0, d1);
      F::value_and_grad(g0, f0, df0);
      F::value_and_grad(g1, f1, df1);
      store2<T>(dgate + j, d0 * u0 * df0, d1 * u1 * df1);
      store2<T>(dup + j, d0 * f0, d1 * f1);
      if constexpr (kRecompute) store2<T>(out + j, f0 * u0, f1 * u1);
    }
    for (; j < end; j += kW) {  // the tail of the last block
      const int64_t n = std::min(kW, end - j);
      const Vec g = load_acc<T>(gate + j, n);
      const Vec u = load_acc<T>(up + j, n);
      const Vec d = load_acc<T>(dout + j, n);
      Vec f, df;
      F::value_and_grad(g, f, df);
      store_acc<T>(dgate + j, d * u * df, n);
      store_acc<T>(dup + j, d * f, n);
      if constexpr (kRecompute) store_acc<T>(out + j, f * u, n);
    }
  });
}

// The one dispatch point: (dtype, activation) -> template arguments.
template <typename Launch>
void dispatch_glu(const GluParams& p, Launch&& launch) {
  using A = GluActivation;
  visit_dtype(p.dtype, [&](auto t) {
    switch (p.activation) {
      case A::kSilu: launch(t, std::integral_constant<A, A::kSilu>{}); break;
      case A::kGelu: launch(t, std::integral_constant<A, A::kGelu>{}); break;
      case A::kGeluTanh: launch(t, std::integral_constant<A, A::kGeluTanh>{}); break;
    }
  });
}

void glu_fwd(const GluParams& p) {
  dispatch_glu(p, [&](auto t, auto act) { glu_fwd_kernel<decltype(t), decltype(act)::value>(p); });
}

// Recomputes out as well when p.out is set.
void glu_bwd(const GluParams& p) {
  dispatch_glu(p, [&](auto t, auto act) {
    if (p.out != nullptr) {
      glu_bwd_kernel<decltype(t), decltype(act)::value, true>(p);
    } else {
      glu_bwd_kernel<decltype(t), decltype(act)::value, false>(p);
    }
  });
}

}  // namespace

SLMFAST_REGISTER_CPU_KERNEL(glu_fwd, glu_fwd);
SLMFAST_REGISTER_CPU_KERNEL(glu_bwd, glu_bwd);

}  // namespace slmfast::cpu::CPU_CAPABILITY
