// rotary.cu — rotary position embedding of q and k for NVIDIA GPUs, out of place or in place.
//
// Same contract as csrc/cpu/rotary.cpp (Su et al. 2021, "RoFormer"): pairs (i, i + R/2)
// (half-split, HF/NeoX) or (2i, 2i + 1) (interleaved, GPT-J) rotate by theta_i of their position,
//   x1' = x1 cos - x2 sin,  x2' = x2 cos + x1 sin   (sin negated for conjugate: the backward)
// with cos/sin read from the first R/2 columns of (B or 1, T, R); features R..D are copied when
// out of place. One thread block per (batch, token) position: its threads walk the (head, pair)
// elements of q, then of k, so each position's cos/sin values are read from global memory once
// and from L1 after that. fp32 arithmetic (fp64 for fp64). Strided q/k (contiguous last dim).
//
// Bounds (H100, ~3.0 TB/s): reads and writes q and k once (2 x (Hq + Hkv) x D elements per
// token); memory-bound, floor = bytes / 3.0 TB/s.
// ptxas (sm_90a, -O3, `make cuda-check`, 2026-11-26): 40 registers (44 for fp64), no spills on
// sm_90a; the fp64/fp64 instantiation spills 24 bytes on sm_80.
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace slmfast::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, typename C>
__device__ __forceinline__ void rotate_heads(const RotaryParams& p, const T* x, T* out, const int64_t* xs,
                                             const int64_t* os, int64_t heads, int64_t b, int64_t t, const C* cos,
                                             const C* sin) {
  using A = acc_t<T>;
  const int64_t half = p.rotary_dim / 2;
  const A sign = p.conjugate ? A(-1) : A(1);
  const T* x_pos = x + b * xs[0] + t * xs[2];
  T* o_pos = out + b * os[0] + t * os[2];
  for (int64_t idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
    const int64_t h = idx / half;
    const int64_t i = idx - h * half;
    const int64_t i1 = p.interleaved ? 2 * i : i;
    const int64_t i2 = p.interleaved ? 2 * i + 1 : i + half;
    const A c = A(to_acc(cos[i]));
    const A s = sign * A(to_acc(sin[i]));
    const T* xr = x_pos + h * xs[1];
    T* orow = o_pos + h * os[1];
    const A x1 = to_acc(xr[i1]);
    const A x2 = to_acc(xr[i2]);
    orow[i1] = from_acc<T>(x1 * c - x2 * s);
    orow[i2] = from_acc<T>(x2 * c + x1 * s);
  }
  const int64_t rest = p.head_dim - p.rotary_dim;
  if (out != x && rest > 0) {  // partial rotary: copy the features that do not rotate
    for (int64_t idx = threadIdx.x; idx < heads * rest; idx += blockDim.x) {
      const int64_t h = idx / rest;
      const int64_t j = p.rotary_dim + (idx - h * rest);
      o_pos[h * os[1] + j] = x_pos[h * xs[1] + j];
    }
  }
}

template <typename T, typename C>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams p) {
  const int64_t pos = blockIdx.x;  // (batch, token)
  const int64_t b = pos / p.seqlen;
  const int64_t t = pos - b * p.seqlen;
  const C* cos = static_cast<const C*>(p.cos) + b * p.cs_stride[0] + t * p.cs_stride[1];
  const C* sin = static_cast<const C*>(p.sin) + b * p.cs_stride[0] + t * p.cs_stride[1];
  rotate_heads<T, C>(p, static_cast<const T*>(p.q), static_cast<T*>(p.q_out), p.q_stride, p.q_out_stride,
                     p.q_heads, b, t, cos, sin);
  rotate_heads<T, C>(p, static_cast<const T*>(p.k), static_cast<T*>(p.k_out), p.k_stride, p.k_out_stride,
                     p.k_heads, b, t, cos, sin);
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("slmfast rotary: ") + cudaGetErrorString(err));
}

}  // namespace
}  // namespace slmfast::cuda

namespace slmfast {

// The one dispatch point: (q dtype, cos dtype) -> template arguments; cos/sin are float32 or q's
// dtype (checked by the bindings).
void rotary_cuda(const RotaryParams& p, void* stream) {
  const int64_t positions = p.batch * p.seqlen;
  if (positions == 0 || p.q_heads + p.k_heads == 0 || p.head_dim == 0) return;
  if (positions > 0x7fffffff) throw std::runtime_error("slmfast rotary: more than 2^31 - 1 positions");
  const dim3 grid(static_cast<unsigned>(positions));
  auto s = static_cast<cudaStream_t>(stream);
  visit_element_type<cuda::CudaElementTypes>(p.dtype, [&](auto t) {
    using T = decltype(t);
    if (p.cs_dtype == p.dtype) {
      cuda::rotary_kernel<T, T><<<grid, cuda::kThreads, 0, s>>>(p);
    } else {
      cuda::rotary_kernel<T, float><<<grid, cuda::kThreads, 0, s>>>(p);
    }
  });
  cuda::check_launch();
}

}  // namespace slmfast
