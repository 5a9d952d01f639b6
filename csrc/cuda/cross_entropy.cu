// cross_entropy.cu — row-wise softmax cross-entropy forward / backward / fused, for NVIDIA GPUs.
//
// Same contract as csrc/cpu/cross_entropy.cpp (the math is in CrossEntropyParams,
// csrc/common/params.h): one thread block per row. The forward keeps, per thread, an online
// (max, sum of exp) pair over its strided columns (Milakov & Gimelshein 2018, "Online normalizer
// calculation for softmax"), merged across the block; the gradient pass re-reads the row and
// writes softmax * (1 + 2 z_loss lse) - eps / V - (1 - eps) onehot, times the row's scale, over
// the logits when dlogits == logits. Probabilities are exp((z - max) - log-sum) from the per-row
// stats (max, log-sum), never exp(z - lse). 16-byte packs when the row length and pointers allow.
// A target outside [0, V) that is not ignore_index gives NaN (loss, stats and gradient): the
// Python wrapper rejects it before; checking here would need a synchronization.
//
// Bounds (H100, ~3.0 TB/s): forward reads the row once, the fused path reads it twice and writes
// it once: 3 x rows x V x sizeof(T) bytes, memory-bound.
// Registers and spills: `make cuda-check`; recorded figures in benchmarks/RESULTS.md.
#include <cmath>
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace slmfast::cuda {
namespace {

constexpr int kCeThreads = 256;

template <typename A>
__device__ __forceinline__ A exp_acc(A x) {
  if constexpr (std::is_same_v<A, double>) {
    return exp(x);
  } else {
    return expf(x);
  }
}

template <typename A>
__device__ __forceinline__ A softcap_acc(A a, A cap, bool capped) {
  if (!capped) return a;
  if constexpr (std::is_same_v<A, double>) {
    return cap * tanh(a / cap);
  } else {
    return cap * tanhf(a / cap);
  }
}

// Merge two online-softmax states (m, s): the sum of exp(x - m) over both sets.
template <typename A>
__device__ __forceinline__ void merge(A& m, A& s, A m2, A s2) {
  const A mx = m > m2 ? m : m2;
  if (mx == -INFINITY) return;  // both empty
  s = (m == -INFINITY ? A(0) : s * exp_acc(m - mx)) + (m2 == -INFINITY ? A(0) : s2 * exp_acc(m2 - mx));
  m = mx;
}

// Warp-wide merge of (m, s) and sum of z; every lane gets the result.
template <typename A>
__device__ __forceinline__ void warp_merge(A& m, A& s, A& sum_z) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const A s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    sum_z += __shfl_xor_sync(0xffffffffu, sum_z, offset);
    merge(m, s, m2, s2);
  }
}

// Block-wide merge of (m, s) and sum of z; every thread gets the result.
template <typename A>
__device__ __forceinline__ void block_merge(A& m, A& s, A& sum_z, A* scratch) {
  warp_merge(m, s, sum_z);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = m;
    scratch[32 + warp] = s;
    scratch[64 + warp] = sum_z;
  }
  __syncthreads();
  m = lane < warps ? scratch[lane] : A(-INFINITY);
  s = lane < warps ? scratch[32 + lane] : A(0);
  sum_z = lane < warps ? scratch[64 + lane] : A(0);
  warp_merge(m, s, sum_z);
}

template <typename T, int N>
__global__ void __launch_bounds__(kCeThreads) cross_entropy_kernel(const CrossEntropyParams p) {
  using A = acc_t<T>;
  __shared__ A scratch[96];
  const int64_t row = blockIdx.x;
  const int64_t cols = p.cols;
  const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  T* dx = p.dlogits != nullptr ? static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride : nullptr;
  A* loss = static_cast<A*>(p.loss);
  A* stats = static_cast<A*>(p.stats) + 2 * row;  // (m, r)
  const int64_t y = p.target[row];
  const bool ignored = y == p.ignore_index;
  const bool bad = !ignored && (y < 0 || y >= cols);
  const bool capped = p.softcap > 0;
  const A cap = capped ? A(p.softcap) : A(1);
  const A eps = A(p.label_smoothing);
  const A z_y = (ignored || bad) ? A(0) : softcap_acc(to_acc(x[y]), cap, capped);  // before any write

  A m, r;
  if (p.stats_is_input) {
    m = stats[0];
    r = stats[1];
  } else {
    A s = 0, sum_z = 0;
    m = -INFINITY;
    for (int64_t j = int64_t(threadIdx.x) * N; j < cols; j += int64_t(blockDim.x) * N) {
      const Pack<T, N> v = load_pack<T, N>(x + j);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A z = softcap_acc(to_acc(v.v[k]), cap, capped);
        if (z > m) {
          s = (m == -INFINITY ? A(0) : s * exp_acc(m - z)) + A(1);
          m = z;
        } else {
          s += exp_acc(z - m);
        }
        sum_z += z;
      }
    }
    block_merge(m, s, sum_z, scratch);
    r = log(s);
    if (threadIdx.x == 0) {
      const A lse = m + r;
      A value = (A(1) - eps) * (m - z_y) + eps * (m - sum_z / A(cols)) + r + A(p.z_loss) * lse * lse;
      if (ignored) value = 0;
      if (bad) value = NAN;
      if (loss != nullptr) loss[row] = value;
      stats[0] = ignored ? A(0) : (bad ? A(NAN) : m);
      stats[1] = ignored ? A(0) : (bad ? A(NAN) : r);
    }
  }
  if (dx == nullptr) return;
  __syncthreads();  // every thread has read x[y] and the row before it is overwritten
  const A scale = ignored ? A(0) : static_cast<const A*>(p.grad_scale)[row * p.grad_scale_stride];
  const A p_factor = scale * (A(1) + A(2) * A(p.z_loss) * (m + r));
  const A offset = scale * eps / A(cols);
  const A hot = scale * (A(1) - eps);
  const A inv_cap = A(1) / cap;
  for (int64_t j = int64_t(threadIdx.x) * N; j < cols; j += int64_t(blockDim.x) * N) {
    const Pack<T, N> v = load_pack<T, N>(x + j);
    Pack<T, N> out;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A z = softcap_acc(to_acc(v.v[k]), cap, capped);
      A d = exp_acc((z - m) - r) * p_factor - offset;
      if (j + k == y) d -= hot;
      if (capped) d *= A(1) - (z * inv_cap) * (z * inv_cap);
      out.v[k] = from_acc<T>(ignored ? A(0) : (bad ? A(NAN) : d));
    }
    store_pack<T, N>(dx + j, out);
  }
}

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
void launch(const CrossEntropyParams& p, cudaStream_t stream) {
  constexpr int N = 16 / sizeof(T);
  const bool packs = p.cols % N == 0 && p.logits_row_stride % N == 0 && aligned16(p.logits) &&
                     (p.dlogits == nullptr || (aligned16(p.dlogits) && p.dlogits_row_stride % N == 0));
  const dim3 grid(static_cast<unsigned>(p.rows));
  if (packs) {
    cross_entropy_kernel<T, N><<<grid, kCeThreads, 0, stream>>>(p);
  } else {
    cross_entropy_kernel<T, 1><<<grid, kCeThreads, 0, stream>>>(p);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("slmfast cross_entropy: ") + cudaGetErrorString(err));
}

}  // namespace
}  // namespace slmfast::cuda

namespace slmfast {

void cross_entropy_cuda(const CrossEntropyParams& params, void* stream) {
  if (params.rows == 0) return;
  visit_element_type<cuda::CudaElementTypes>(params.dtype, [&](auto t) {
    cuda::launch<decltype(t)>(params, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace slmfast
