// glu.cu — gated linear units (SwiGLU, GeGLU) forward and backward for NVIDIA GPUs.
//
// Same contract as csrc/cpu/glu.cpp (Shazeer 2020, "GLU Variants Improve Transformer"):
//   out = act(gate) * up;  backward: dgate = dout * up * act'(gate), dup = dout * act(gate),
//   and out again when asked (recompute), reading only gate, up and dout.
// Elementwise, grid-stride over 16-byte packs when every pointer is 16-byte aligned (else one
// element at a time), fp32 arithmetic (fp64 for fp64) with the accurate expf/erff/tanhf.
//
// Bounds (H100: ~3.0 TB/s copy bandwidth): forward moves 3 elements per output (bf16: 6 bytes),
// backward 5 (6 with recompute); both memory-bound, the floor is bytes / 3.0 TB/s, e.g. 8192 x
// 4096 bf16: forward 201 MB -> 67 us, backward 336 MB -> 112 us.
// Registers and spills: `make cuda-check`; recorded figures in benchmarks/RESULTS.md.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace slmfast::cuda {
namespace {

constexpr int kThreads = 256;

template <typename A, GluActivation kAct>
struct Act;

template <typename A>
struct Act<A, GluActivation::kSilu> {
  __device__ __forceinline__ static void eval(A x, A& f, A& df) {
    const A s = A(1) / (A(1) + exp(-x));
    f = x * s;
    df = s * (A(1) + x * (A(1) - s));
  }
};

template <typename A>
struct Act<A, GluActivation::kGelu> {
  __device__ __forceinline__ static void eval(A x, A& f, A& df) {
    const A cdf = A(0.5) + A(0.5) * erf(x * A(0.70710678118654752440));       // x / sqrt(2)
    f = x * cdf;
    df = cdf + x * exp(A(-0.5) * x * x) * A(0.39894228040143267794);         // 1 / sqrt(2 pi)
  }
};

template <typename A>
struct Act<A, GluActivation::kGeluTanh> {
  __device__ __forceinline__ static void eval(A x, A& f, A& df) {
    constexpr A kBeta = A(0.79788456080286535588);  // sqrt(2 / pi)
    constexpr A kKappa = A(0.044715);
    const A x2 = x * x;
    const A t = tanh(kBeta * (x + kKappa * x2 * x));
    f = A(0.5) * x * (A(1) + t);
    df = A(0.5) * (A(1) + t) + A(0.5) * x * (A(1) - t * t) * kBeta * (A(1) + A(3) * kKappa * x2);
  }
};

// One element (or pack lane): forward or backward.
template <typename T, GluActivation kAct, bool kBackward, bool kRecompute>
__device__ __forceinline__ void glu_element(const GluParams& p, const T g_in, const T u_in, const T d_in, T& out,
                                            T& dgate, T& dup) {
  using A = acc_t<T>;
  A f, df;
  Act<A, kAct>::eval(to_acc(g_in), f, df);
  const A u = to_acc(u_in);
  if constexpr (kBackward) {
    const A d = to_acc(d_in);
    dgate = from_acc<T>(d * u * df);
    dup = from_acc<T>(d * f);
    if constexpr (kRecompute) out = from_acc<T>(f * u);
  } else {
    out = from_acc<T>(f * u);
  }
}

template <typename T, GluActivation kAct, bool kBackward, bool kRecompute, int N>
__global__ void __launch_bounds__(kThreads) glu_kernel(const GluParams p) {
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  const T* dout = static_cast<const T*>(p.dout);
  T* out = static_cast<T*>(p.out);
  T* dgate = static_cast<T*>(p.dgate);
  T* dup = static_cast<T*>(p.dup);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = p.n / N;
  for (int64_t i = first; i < packs; i += stride) {
    const Pack<T, N> g = load_pack<T, N>(gate + i * N);
    const Pack<T, N> u = load_pack<T, N>(up + i * N);
    Pack<T, N> d, o, dg, du;
    if constexpr (kBackward) d = load_pack<T, N>(dout + i * N);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      glu_element<T, kAct, kBackward, kRecompute>(p, g.v[k], u.v[k], kBackward ? d.v[k] : g.v[k], o.v[k], dg.v[k],
                                                   du.v[k]);
    }
    if constexpr (kBackward) {
      store_pack<T, N>(dgate + i * N, dg);
      store_pack<T, N>(dup + i * N, du);
    }
    if constexpr (!kBackward || kRecompute) store_pack<T, N>(out + i * N, o);
  }
  // The ragged tail (fewer than N elements), one element per thread.
  for (int64_t j = packs * N + first; j < p.n; j += stride) {
    T o, dg, du;
    glu_element<T, kAct, kBackward, kRecompute>(p, gate[j], up[j], kBackward ? dout[j] : gate[j], o, dg, du);
    if constexpr (kBackward) {
      dgate[j] = dg;
      dup[j] = du;
    }
    if constexpr (!kBackward || kRecompute) out[j] = o;
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("slmfast ") + what + ": " + cudaGetErrorString(err));
  }
}

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, GluActivation kAct, bool kBackward, bool kRecompute>
void launch(const GluParams& p, cudaStream_t stream) {
  constexpr int N = 16 / sizeof(T);
  const bool packs = aligned16(p.gate) && aligned16(p.up) && aligned16(p.dout) && aligned16(p.out) &&
                     aligned16(p.dgate) && aligned16(p.dup);
  const int64_t work = packs ? (p.n + N - 1) / N : p.n;
  // Enough blocks to fill the GPU several times over; the grid-stride loop covers the rest.
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((work + kThreads - 1) / kThreads, 8192));
  if (packs) {
    glu_kernel<T, kAct, kBackward, kRecompute, N><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    glu_kernel<T, kAct, kBackward, kRecompute, 1><<<blocks, kThreads, 0, stream>>>(p);
  }
  check_launch(kBackward ? "glu_bwd" : "glu_fwd");
}

template <typename T, GluActivation kAct, bool kBackward>
void launch_direction(const GluParams& p, cudaStream_t stream) {
  if constexpr (kBackward) {
    if (p.out != nullptr) {
      launch<T, kAct, true, true>(p, stream);
    } else {
      launch<T, kAct, true, false>(p, stream);
    }
  } else {
    launch<T, kAct, false, false>(p, stream);
  }
}

// The one dispatch point: (dtype, activation, direction, recompute) -> template arguments.
template <bool kBackward>
void dispatch(const GluParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  visit_element_type<CudaElementTypes>(p.dtype, [&](auto t) {
    using T = decltype(t);
    switch (p.activation) {
      case GluActivation::kSilu: launch_direction<T, GluActivation::kSilu, kBackward>(p, stream); break;
      case GluActivation::kGelu: launch_direction<T, GluActivation::kGelu, kBackward>(p, stream); break;
      case GluActivation::kGeluTanh: launch_direction<T, GluActivation::kGeluTanh, kBackward>(p, stream); break;
    }
  });
}

}  // namespace
}  // namespace slmfast::cuda

namespace slmfast {

void glu_fwd_cuda(const GluParams& params, void* stream) {
  cuda::dispatch<false>(params, static_cast<cudaStream_t>(stream));
}

void glu_bwd_cuda(const GluParams& params, void* stream) {
  cuda::dispatch<true>(params, static_cast<cudaStream_t>(stream));
}

}  // namespace slmfast
