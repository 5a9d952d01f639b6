// rms_norm.cu — fused RMSNorm (+ residual add) forward and backward for NVIDIA GPUs.
//
// Same contract as csrc/cpu/rms_norm.cpp (Zhang & Sennrich 2019, pre-norm residual form):
//   h = x + residual,  r = rsqrt(mean(h^2) + eps),  y = h * r * (offset + w)
// saving h and r only. One thread block per row in the forward; 16-byte packs when the row
// length allows, fp32 accumulation. The backward runs a fixed number of row blocks, each
// keeping its dweight partial sums in shared memory (each thread owns fixed columns, so there
// are no atomics), then a second kernel sums the partials in block order: bit-identical runs.
//
// Bounds (H100: ~3.0 TB/s copy bandwidth): forward moves 2 x (rows x cols) elements (3 with a
// residual, 4 writing h), backward 3 (4 with dh); both are memory-bound, the floor is bytes / 3.0 TB/s.
// Registers and spills: `make cuda-check`; recorded figures in benchmarks/RESULTS.md.
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace slmfast::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, typename W, int N>
__global__ void __launch_bounds__(kThreads) rms_norm_fwd_kernel(const RmsNormFwdParams p) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t cols = p.cols;
  const T* x = static_cast<const T*>(p.x) + row * cols;
  const T* res = p.residual ? static_cast<const T*>(p.residual) + row * cols : nullptr;
  T* h_out = p.h ? static_cast<T*>(p.h) + row * cols : nullptr;
  const T* h = h_out ? h_out : x;
  const W* w = static_cast<const W*>(p.weight);
  T* y = static_cast<T*>(p.y) + row * cols;

  // Pass 1: h = x + residual (rounded to T, as stored) and the sum of squares.
  A sumsq = 0;
  for (int64_t j = int64_t(threadIdx.x) * N; j < cols; j += int64_t(blockDim.x) * N) {
    Pack<T, N> xv = load_pack<T, N>(x + j);
    if (res != nullptr) {
      const Pack<T, N> rv = load_pack<T, N>(res + j);
#pragma unroll
      for (int k = 0; k < N; ++k) xv.v[k] = from_acc<T>(to_acc(xv.v[k]) + to_acc(rv.v[k]));
      store_pack<T, N>(h_out + j, xv);
    }
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A v = to_acc(xv.v[k]);
      sumsq += v * v;
    }
  }
  sumsq = block_sum(sumsq, scratch);
  const A r = A(1) / sqrt(sumsq / A(cols) + A(p.eps));
  if (threadIdx.x == 0) static_cast<A*>(p.rstd)[row] = r;

  // Pass 2: y = h * r * (offset + w). Each thread re-reads the elements it wrote in pass 1.
  for (int64_t j = int64_t(threadIdx.x) * N; j < cols; j += int64_t(blockDim.x) * N) {
    const Pack<T, N> hv = load_pack<T, N>(h + j);
    const Pack<W, N> wv = load_pack<W, N>(w + j);
    Pack<T, N> out;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      out.v[k] = from_acc<T>(to_acc(hv.v[k]) * r * (A(p.offset) + A(to_acc(wv.v[k]))));
    }
    store_pack<T, N>(y + j, out);
  }
}

// Grid: p.num_row_blocks blocks; block b handles a contiguous run of rows and writes its
// dweight partial sums to dweight_partial[b, :]. Dynamic shared memory: cols accumulators.
template <typename T, typename W, int N>
__global__ void __launch_bounds__(kThreads) rms_norm_bwd_kernel(const RmsNormBwdParams p) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  extern __shared__ unsigned char smem_raw[];
  A* dw = reinterpret_cast<A*>(smem_raw);  // (cols,)
  const int64_t cols = p.cols;
  const int64_t rows_per_block = (p.rows + p.num_row_blocks - 1) / p.num_row_blocks;
  const int64_t row_begin = int64_t(blockIdx.x) * rows_per_block;
  const int64_t row_end = row_begin + rows_per_block < p.rows ? row_begin + rows_per_block : p.rows;
  const W* w = static_cast<const W*>(p.weight);
  const A offset = A(p.offset);

  for (int64_t j = int64_t(threadIdx.x) * N; j < cols; j += int64_t(blockDim.x) * N) {
#pragma unroll
    for (int k = 0; k < N; ++k) dw[j + k] = 0;
  }

  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* dy = static_cast<const T*>(p.dy) + row * cols;
    const T* h = static_cast<const T*>(p.h) + row * cols;
    const A r = static_cast<const A*>(p.rstd)[row];
    // c = mean(g * xhat), g = dy * (offset + w), xhat = h * r.
    A dot = 0;
    for (int64_t j = int64_t(threadIdx.x) * N; j < cols; j += int64_t(blockDim.x) * N) {
      const Pack<T, N> dv = load_pack<T, N>(dy + j);
      const Pack<T, N> hv = load_pack<T, N>(h + j);
      const Pack<W, N> wv = load_pack<W, N>(w + j);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        dot += to_acc(dv.v[k]) * (offset + A(to_acc(wv.v[k]))) * to_acc(hv.v[k]) * r;
      }
    }
    const A c = block_sum(dot, scratch) / A(cols);
    T* dx = static_cast<T*>(p.dx) + row * cols;
    const T* dh = p.dh_in ? static_cast<const T*>(p.dh_in) + row * cols : nullptr;
    for (int64_t j = int64_t(threadIdx.x) * N; j < cols; j += int64_t(blockDim.x) * N) {
      const Pack<T, N> dv = load_pack<T, N>(dy + j);
      const Pack<T, N> hv = load_pack<T, N>(h + j);
      const Pack<W, N> wv = load_pack<W, N>(w + j);
      Pack<T, N> dhv;
      if (dh != nullptr) dhv = load_pack<T, N>(dh + j);
      Pack<T, N> out;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A d = to_acc(dv.v[k]);
        const A xhat = to_acc(hv.v[k]) * r;
        A g = r * (d * (offset + A(to_acc(wv.v[k]))) - xhat * c);
        if (dh != nullptr) g += to_acc(dhv.v[k]);
        out.v[k] = from_acc<T>(g);
        dw[j + k] += d * xhat;
      }
      store_pack<T, N>(dx + j, out);
    }
  }
  A* partial = static_cast<A*>(p.dweight_partial) + int64_t(blockIdx.x) * cols;
  for (int64_t j = int64_t(threadIdx.x) * N; j < cols; j += int64_t(blockDim.x) * N) {
#pragma unroll
    for (int k = 0; k < N; ++k) partial[j + k] = dw[j + k];
  }
}

// dweight[j] = sum over row blocks, in block order.
template <typename A, typename W>
__global__ void rms_norm_dweight_kernel(const A* partial, W* dweight, int64_t blocks, int64_t cols) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  A s = 0;
  for (int64_t b = 0; b < blocks; ++b) s += partial[b * cols + j];
  dweight[j] = from_acc<W>(s);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("slmfast ") + what + ": " + cudaGetErrorString(err));
  }
}

bool aligned(const void* ptr, size_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// 16-byte packs of T (and the matching packs of W) when every row starts aligned, else one
// element at a time.
template <typename T, typename W>
bool use_packs(int64_t cols, std::initializer_list<const void*> rows_ptrs, const void* weight) {
  constexpr int n = 16 / sizeof(T);
  if (cols % n != 0 || !aligned(weight, n * sizeof(W))) return false;
  for (const void* ptr : rows_ptrs) {
    if (!aligned(ptr, 16)) return false;
  }
  return true;
}

template <typename T, typename W>
void launch_fwd(const RmsNormFwdParams& p, cudaStream_t stream) {
  constexpr int N = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>(p.rows));
  if (use_packs<T, W>(p.cols, {p.x, p.residual, p.y, p.h}, p.weight)) {
    rms_norm_fwd_kernel<T, W, N><<<grid, kThreads, 0, stream>>>(p);
  } else {
    rms_norm_fwd_kernel<T, W, 1><<<grid, kThreads, 0, stream>>>(p);
  }
  check_launch("rms_norm_fwd");
}

template <typename T, typename W>
void launch_bwd(const RmsNormBwdParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int N = 16 / sizeof(T);
  const size_t smem = size_t(p.cols) * sizeof(A);
  const dim3 grid(static_cast<unsigned>(p.num_row_blocks));
  auto kernel = use_packs<T, W>(p.cols, {p.dy, p.dh_in, p.h, p.dx}, p.weight)
                    ? rms_norm_bwd_kernel<T, W, N>
                    : rms_norm_bwd_kernel<T, W, 1>;
  if (smem > 48 * 1024) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) != cudaSuccess) {
      throw std::runtime_error("slmfast rms_norm_bwd: rows of " + std::to_string(p.cols) +
                               " elements need more shared memory than this GPU allows");
    }
  }
  kernel<<<grid, kThreads, smem, stream>>>(p);
  check_launch("rms_norm_bwd");
  const int threads = 256;
  const dim3 reduce_grid(static_cast<unsigned>((p.cols + threads - 1) / threads));
  rms_norm_dweight_kernel<A, W><<<reduce_grid, threads, 0, stream>>>(
      static_cast<const A*>(p.dweight_partial), static_cast<W*>(p.dweight), p.num_row_blocks, p.cols);
  check_launch("rms_norm_bwd (dweight)");
}

}  // namespace
}  // namespace slmfast::cuda

namespace slmfast {
using cuda::launch_bwd;
using cuda::launch_fwd;

int64_t rms_norm_bwd_num_row_blocks(int64_t rows, int64_t /*cols*/) {
  // A function of the row count only: 256 blocks fill an H100's 132 SMs twice.
  return rows < 256 ? (rows > 0 ? rows : 1) : 256;
}

void rms_norm_fwd_cuda(const RmsNormFwdParams& params, void* stream) {
  if (params.rows == 0) return;
  // The one dispatch point (params.h): (x dtype, weight dtype) -> template arguments.
  visit_norm_element_types<cuda::CudaElementTypes>(params.x_dtype, params.weight_dtype, [&](auto t, auto w) {
    launch_fwd<decltype(t), decltype(w)>(params, static_cast<cudaStream_t>(stream));
  });
}

void rms_norm_bwd_cuda(const RmsNormBwdParams& params, void* stream) {
  if (params.rows == 0) return;
  visit_norm_element_types<cuda::CudaElementTypes>(params.x_dtype, params.weight_dtype, [&](auto t, auto w) {
    launch_bwd<decltype(t), decltype(w)>(params, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace slmfast
