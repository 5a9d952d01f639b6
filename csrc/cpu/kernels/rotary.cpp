// kernels/rotary.cpp — the vectorized kernel of the CPU rotary position embedding (RoPE) of q and k,
// out of place or in place, compiled once per capability (csrc/cpu/capability.h); the op is
// csrc/cpu/rotary.cpp.
//
// Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding". Feature pairs
// (x1, x2) of each head rotate by the angle theta_i of their position:
//   x1' = x1 cos - x2 sin,  x2' = x2 cos + x1 sin
// Pairs are (i, i + R/2) in the half-split layout of Hugging Face / GPT-NeoX models and (2i, 2i+1)
// in the interleaved layout of GPT-J / the original RoFormer; cos/sin hold cos(theta_i) and
// sin(theta_i) in column i (and again in column i + R/2, the HF layout, which is not read). Only
// the first R (rotary_dim) features rotate; the rest are copied (partial rotary, GPT-NeoX/Phi).
// The rotation is orthogonal, so the backward is the rotation by -theta (conjugate=true):
// nothing is saved but cos and sin.
// Work is split over (batch, token) rows: each row loads its R/2 cos/sin values once, in the
// accumulation type, and rotates every head of q and k at that position.
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../../common/params.h"
#include "../kernel_table.h"
#include "rowwise.h"
#include "vec.h"

namespace slmfast::cpu::CPU_CAPABILITY {
namespace {

// Rotate one head row of D features from `x` into `out` (which may be x itself).
template <typename T>
inline void rotate_row(const T* x, T* out, const acc_t<T>* c, const acc_t<T>* s, int64_t half,
                       int64_t head_dim, bool interleaved) {
  using Acc = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t kW = Vec::size();
  if (!interleaved) {
    for (int64_t i = 0; i < half; i += kW) {
      const int64_t n = std::min(kW, half - i);
      const Vec lo = load_acc<T>(x + i, n);
      const Vec hi = load_acc<T>(x + half + i, n);
      const Vec cv = Vec::loadu(c + i, n);
      const Vec sv = Vec::loadu(s + i, n);
      store_acc<T>(out + i, lo * cv - hi * sv, n);
      store_acc<T>(out + half + i, hi * cv + lo * sv, n);
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const Acc x1 = static_cast<Acc>(x[2 * i]);
      const Acc x2 = static_cast<Acc>(x[2 * i + 1]);
      out[2 * i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
      out[2 * i + 1] = static_cast<T>(x2 * c[i] + x1 * s[i]);
    }
  }
  if (out != x && head_dim > 2 * half) {
    std::memcpy(out + 2 * half, x + 2 * half, (head_dim - 2 * half) * sizeof(T));
  }
}

template <typename T, typename C>
void rotary_kernel(const RotaryParams& p) {
  using Acc = acc_t<T>;
  const int64_t half = p.rotary_dim / 2;
  const int64_t rows = p.batch * p.seqlen;
  const int64_t heads = p.q_heads + p.k_heads;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, heads * p.head_dim));
  const C* cos = static_cast<const C*>(p.cos);
  const C* sin = static_cast<const C*>(p.sin);
  const Acc sign = p.conjugate ? Acc(-1) : Acc(1);

  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> cbuf(half), sbuf(half);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.seqlen;
      const int64_t t = row % p.seqlen;
      const C* cr = cos + b * p.cs_stride[0] + t * p.cs_stride[1];
      const C* sr = sin + b * p.cs_stride[0] + t * p.cs_stride[1];
      for (int64_t i = 0; i < half; ++i) {
        cbuf[i] = static_cast<Acc>(cr[i]);
        sbuf[i] = sign * static_cast<Acc>(sr[i]);
      }
      for (int64_t hd = 0; hd < heads; ++hd) {
        const bool is_q = hd < p.q_heads;
        const int64_t h = is_q ? hd : hd - p.q_heads;
        const int64_t* in_stride = is_q ? p.q_stride : p.k_stride;
        const int64_t* out_stride = is_q ? p.q_out_stride : p.k_out_stride;
        const T* x = static_cast<const T*>(is_q ? p.q : p.k) + b * in_stride[0] + h * in_stride[1] + t * in_stride[2];
        T* out = static_cast<T*>(is_q ? p.q_out : p.k_out) + b * out_stride[0] + h * out_stride[1] +
                 t * out_stride[2];
        rotate_row<T>(x, out, cbuf.data(), sbuf.data(), half, p.head_dim, p.interleaved);
      }
    }
  });
}

// The one dispatch point: (q dtype, cos dtype) -> template arguments; cos/sin are float32 or
// q's dtype (checked by the op, csrc/common/rotary_args.h).
void rotary(const RotaryParams& p) {
  if (p.batch * p.seqlen == 0 || p.q_heads + p.k_heads == 0 || p.head_dim == 0) return;
  visit_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    if (p.cs_dtype == p.dtype) {
      rotary_kernel<T, T>(p);
    } else {
      rotary_kernel<T, float>(p);
    }
  });
}

}  // namespace

SLMFAST_REGISTER_CPU_KERNEL(rotary, rotary);

}  // namespace slmfast::cpu::CPU_CAPABILITY
