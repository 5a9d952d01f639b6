// attention_common.cuh — the pieces the attention kernels (attention_fwd.cuh, attention_bwd.cuh)
// share: tensor-core PTX wrappers, register-fragment helpers, async tile loads, the per-document
// sequence bounds of the packed layout and the mask of the contract (csrc/common/params.h).
//
// Based on FlashAttention-2 (Dao 2023, arXiv:2307.08691) and the PTX ISA's description of
// mma.sync.m16n8k16, ldmatrix and cp.async (sm_80+). CUDA headers only (docs/architecture.md §4.3).
//
// Fragment layouts of mma.sync.aligned.m16n8k16 (bf16/fp16 in, fp32 accumulate), for lane l,
// g = l / 4 and t = l % 4:
//   A (16x16, row major), 4 registers of 2 elements: a0 = A[g][2t..2t+1],   a1 = A[g+8][2t..],
//                                                     a2 = A[g][2t+8..],    a3 = A[g+8][2t+8..]
//   B (16x8, k x n),      2 registers:              b0 = B[2t..2t+1][g],  b1 = B[2t+8..][g]
//   C (16x8, fp32),       4 floats:                 c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..]
// So the accumulator of two adjacent 8-column tiles is, once rounded, exactly the A fragment
// of a 16-wide k-step (acc_to_a): P = softmax(S) never leaves the registers.
//
// Shared-memory tiles are row major with a row stride of D + 8 elements, D / 8 + 1 16-byte
// chunks, an odd number for every tile size (32, 64, 96, 128, 256): the 8 consecutive row
// addresses of one ldmatrix 8x8 matrix fall in 8 different 16-byte groups of the 128-byte bank
// window, so there are no bank conflicts, and no swizzle to get wrong.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../common/params.h"

namespace slmfast::cuda::attn {

constexpr int kPad = 8;  // elements of padding per shared-memory row (16 bytes)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Largest |offset| of the mask diagonals; sequence lengths are checked to be below it, so that
// every index sum below fits in int32.
constexpr int kBig = 1 << 29;

// ---------------------------------------------------------------------------------------------
// PTX wrappers.

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared, asynchronously; zero-fills the 16 bytes when !valid (src is then
// not read, but must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i of
// every lane receives its part of matrix i (row l/4, columns 2(l%4), 2(l%4)+1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// The same, transposed: lane l receives rows 2(l%4), 2(l%4)+1 of column l/4 of each matrix.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// d += a * b on the tensor cores: (16x16) x (16x8), fp32 accumulate.
template <typename Elem>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<Elem, __half>, "mma_16816: bf16 or fp16 only");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 2^x with the special-function unit (max relative error 2^-22; ex2(-inf) = 0), as
// flash-attention gets from exp2f under --use_fast_math; plain exp2f adds a denormal-safe path.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two floats rounded to Elem and packed (lo in the low half, as the fragments expect).
template <typename Elem>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

template <typename Elem>
__device__ __forceinline__ float to_float(Elem v) {
  if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return __half2float(v);
  }
}

// ---------------------------------------------------------------------------------------------
// Fragment loads from padded row-major shared tiles (row stride ld elements). All indices are
// tile-relative; every helper is called by all 32 lanes of a warp.

// A operand: rows row0..row0+15, columns col0..col0+15 of the tile.
template <typename Elem>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const Elem* tile, int ld, int row0, int col0, int lane) {
  ldmatrix_x4(a, tile + (row0 + (lane & 15)) * ld + col0 + (lane >> 4) * 8);
}

// B operand when the tile holds B transposed (tile rows are B's columns n, as K for S = Q K^T):
// B[k][n] = tile[n][k] for n in n0..n0+15, k in k0..k0+15. b[0], b[1] are the fragment of
// n-tile n0..n0+7, b[2], b[3] that of n0+8..n0+15.
template <typename Elem>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const Elem* tile, int ld, int n0, int k0, int lane) {
  ldmatrix_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * ld + k0 + ((lane >> 3) & 1) * 8);
}

// B operand when the tile holds B as is (tile rows are B's rows k, as V for O = P V):
// B[k][n] = tile[k][n], k in k0..k0+15, n in n0..n0+15; same register order as load_b_nk.
template <typename Elem>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const Elem* tile, int ld, int k0, int n0, int lane) {
  ldmatrix_x4_trans(b, tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
}

// The accumulators of n-tiles 2k and 2k+1 (16 rows x 16 columns) as the A fragment of k-step k.
template <typename Elem>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<Elem>(c0[0], c0[1]);
  a[1] = pack2<Elem>(c0[2], c0[3]);
  a[2] = pack2<Elem>(c1[0], c1[1]);
  a[3] = pack2<Elem>(c1[2], c1[3]);
}

// acc (16 x N) += A (16 x K) * B where A comes from a shared tile (rows a_row0.., columns
// 0..K-1) and B from a shared tile holding B transposed (rows = B's columns 0..N-1).
template <typename Elem, int K, int N>
__device__ __forceinline__ void gemm_ss_nk(float (&acc)[N / 8][4], const Elem* sa, int a_row0,
                                           const Elem* sb, int ld, int lane) {
  static_assert(K % 16 == 0 && N % 16 == 0, "gemm_ss_nk: K and N must be multiples of 16");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    load_a(a, sa, ld, a_row0, kk * 16, lane);
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      uint32_t b[4];
      load_b_nk(b, sb, ld, nn * 16, kk * 16, lane);
      mma_16816<Elem>(acc[2 * nn], a, b[0], b[1]);
      mma_16816<Elem>(acc[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x N) += A (16 x K) * B, A given as the fp32 accumulator p (16 x K, rounded to Elem
// here) and B a shared tile holding B as is (rows k = 0..K-1, columns 0..N-1).
template <typename Elem, int K, int N>
__device__ __forceinline__ void gemm_rs_kn(float (&acc)[N / 8][4], const float (&p)[K / 8][4],
                                           const Elem* sb, int ld, int lane) {
  static_assert(K % 16 == 0 && N % 16 == 0, "gemm_rs_kn: K and N must be multiples of 16");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    acc_to_a<Elem>(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      uint32_t b[4];
      load_b_kn(b, sb, ld, kk * 16, nn * 16, lane);
      mma_16816<Elem>(acc[2 * nn], a, b[0], b[1]);
      mma_16816<Elem>(acc[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
  }
}

// ---------------------------------------------------------------------------------------------
// Global <-> shared tiles.

// Starts the copy of rows 0..kRows-1, columns 0..kD-1 of a global tile (row stride ld
// elements, the row itself contiguous) into a shared tile of row stride kD + kPad. Rows at or
// past `rows` and columns at or past `cols` (the real head dim, kD rounds it up) are zero-filled.
// All kThreads threads of the block call it; part of the caller's current cp.async group.
template <int kRows, int kD, int kThreads, typename Elem>
__device__ __forceinline__ void load_tile_async(Elem* smem, const Elem* gmem, int64_t ld, int rows, int cols,
                                                int tid) {
  constexpr int kChunksPerRow = kD / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
  for (int c0 = 0; c0 < kChunks; c0 += kThreads) {
    const int c = c0 + tid;
    if (kChunks % kThreads == 0 || c < kChunks) {
      const int row = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      const bool valid = row < rows && col < cols;
      const Elem* src = valid ? gmem + row * ld + col : gmem;
      cp_async_16(smem + row * (kD + kPad) + col, src, valid);
    }
  }
}

// Copies rows 0..kRows-1 of a warp's shared staging tile to global (16-byte stores), skipping
// rows at or past `rows` and columns at or past `cols`. Called by the 32 lanes of one warp.
template <int kRows, int kD, typename Elem>
__device__ __forceinline__ void store_rows_warp(Elem* gmem, int64_t ld, const Elem* smem, int rows, int cols,
                                                int lane) {
  constexpr int kChunksPerRow = kD / 8;
#pragma unroll
  for (int c0 = 0; c0 < kRows * kChunksPerRow; c0 += 32) {
    const int c = c0 + lane;
    const int row = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    if ((kRows * kChunksPerRow % 32 == 0 || c < kRows * kChunksPerRow) && row < rows && col < cols) {
      *reinterpret_cast<uint4*>(gmem + row * ld + col) =
          *reinterpret_cast<const uint4*>(smem + row * (kD + kPad) + col);
    }
  }
}

// Writes a warp's fp32 accumulator (16 rows x kD, C layout) times `mul`, rounded to Elem, into
// rows row0..row0+15 of a padded shared tile.
template <typename Elem, int kD>
__device__ __forceinline__ void acc_to_smem(Elem* tile, int row0, const float (&acc)[kD / 8][4], float mul,
                                            int lane) {
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt) {
    const int col = dt * 8 + 2 * t;
    *reinterpret_cast<uint32_t*>(tile + (row0 + g) * (kD + kPad) + col) =
        pack2<Elem>(acc[dt][0] * mul, acc[dt][1] * mul);
    *reinterpret_cast<uint32_t*>(tile + (row0 + g + 8) * (kD + kPad) + col) =
        pack2<Elem>(acc[dt][2] * mul, acc[dt][3] * mul);
  }
}

// ---------------------------------------------------------------------------------------------
// Sequences and masks.

// One batch row (dense) or one document (packed): where its rows start and how many there are.
struct SeqInfo {
  int64_t q_start;  // first row of this sequence in the packed row index (0 when dense)
  int64_t k_start;
  int T;  // query rows
  int S;  // key rows
};

__device__ __forceinline__ SeqInfo seq_info(const AttentionParams& p, int b) {
  SeqInfo s;
  if (p.cu_seqlens_q != nullptr) {  // packed: flash-attention's varlen BlockInfo
    s.q_start = p.cu_seqlens_q[b];
    s.k_start = p.cu_seqlens_k[b];
    s.T = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    s.S = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
  } else {
    s.q_start = 0;
    s.k_start = 0;
    s.T = static_cast<int>(p.seqlen_q);
    s.S = static_cast<int>(p.seqlen_k);
  }
  return s;
}

// The contract's mask (slmfast/ops/attention.py) as a band of diagonals: key j is visible to
// query i iff
//   dmin <= j - i <= dmax  and  0 <= j < S,   with offset = S - T (bottom-right aligned),
//   dmin = offset - window_left            (window_left >= 0, else -inf)
//   dmax = min(offset [causal], offset + window_right [window_right >= 0])   (else +inf)
// Clamped to [-kBig, kBig] (infinite is kBig), lengths are below kBig, so sums fit in int32.
struct Mask {
  int dmin;
  int dmax;
  int T;
  int S;

  __device__ __forceinline__ bool visible(int i, int j) const {
    const int d = j - i;
    return d >= dmin && d <= dmax && j < S && i < T;
  }
  // First and last key visible to some query of rows [i0, i1] (first > last when none).
  __device__ __forceinline__ int first_key(int i0) const { return max(0, i0 + dmin); }
  __device__ __forceinline__ int last_key(int i1) const { return min(S - 1, i1 + dmax); }
  // First and last query that sees some key of [j0, j1] (j1 < S).
  __device__ __forceinline__ int first_query(int j0) const { return max(0, j0 - dmax); }
  __device__ __forceinline__ int last_query(int j1) const { return min(T - 1, j1 - dmin); }
  // Whether block rows [i0, i0 + rows) x keys [j0, j0 + cols) holds any invisible pair
  // (rows past T count as invisible only when check_rows is set).
  __device__ __forceinline__ bool partial(int i0, int rows, int j0, int cols, bool check_rows) const {
    const int i1 = (check_rows ? i0 + rows : min(i0 + rows, T)) - 1;
    return j0 + cols > S || j0 - i1 < dmin || j0 + cols - 1 - i0 > dmax || (check_rows && i0 + rows > T);
  }
};

template <bool kMasked>
__device__ __forceinline__ Mask make_mask(const AttentionParams& p, const SeqInfo& s) {
  Mask m;
  m.T = s.T;
  m.S = s.S;
  m.dmin = -kBig;
  m.dmax = kBig;
  if constexpr (kMasked) {
    const int64_t offset = int64_t(s.S) - int64_t(s.T);
    int64_t dmin = -kBig;
    int64_t dmax = kBig;
    if (p.window_left >= 0) dmin = offset - p.window_left;
    if (p.causal) dmax = offset;
    if (p.window_right >= 0) dmax = dmax < offset + p.window_right ? dmax : offset + p.window_right;
    m.dmin = static_cast<int>(dmin < -kBig ? -kBig : (dmin > kBig ? kBig : dmin));
    m.dmax = static_cast<int>(dmax < -kBig ? -kBig : (dmax > kBig ? kBig : dmax));
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// The dispatch point: runtime (dtype, head dim, masked) -> template arguments, f(Elem{},
// HeadDim<kD>{}, bool_constant<kMasked>{}). kD is the head dim rounded up to the next
// instantiated size (32, 64, 96, 128, 256 up to kMaxD); the kernels zero-fill the columns past
// the real head dim and never store them. Returns false (calling nothing) for a dtype or head
// dim without an instantiation: fp32 and fp64 inputs, head dims not a multiple of 8 or > kMaxD.
template <int kD>
using HeadDim = std::integral_constant<int, kD>;

template <int kMaxD, typename F>
bool dispatch_attention(DType dtype, int64_t head_dim, bool masked, F&& f) {
  auto with_masked = [&](auto elem, auto d) {
    if (masked) {
      f(elem, d, std::true_type{});
    } else {
      f(elem, d, std::false_type{});
    }
    return true;
  };
  auto with_dim = [&](auto elem) {
    if (head_dim <= 0 || head_dim % 8 != 0 || head_dim > kMaxD) return false;
    if (head_dim <= 32) return with_masked(elem, HeadDim<32>{});
    if (head_dim <= 64) return with_masked(elem, HeadDim<64>{});
    if (head_dim <= 96) return with_masked(elem, HeadDim<96>{});
    if constexpr (kMaxD <= 128) {
      return with_masked(elem, HeadDim<128>{});
    } else {
      if (head_dim <= 128) return with_masked(elem, HeadDim<128>{});
      return with_masked(elem, HeadDim<256>{});
    }
  };
  switch (dtype) {
    case DType::kBFloat16: return with_dim(__nv_bfloat16{});
    case DType::kFloat16: return with_dim(__half{});
    default: return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side, shared by the launchers in attention_fwd.cu and attention_bwd.cu.

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// 16-byte tile rows need 16-byte aligned rows: the base and every stride in multiples of 8
// elements (2-byte dtypes).
inline bool rows_aligned(const void* ptr, int64_t batch_stride, int64_t head_stride, int64_t row_stride) {
  return aligned16(ptr) && batch_stride % 8 == 0 && head_stride % 8 == 0 && row_stride % 8 == 0;
}

// Why the kernels cannot take these params, or nullptr: what every attention kernel needs.
inline const char* common_unsupported(const AttentionParams& p) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) {
    return "dtype must be bfloat16 or float16 (float32 and float64 run on the other backends)";
  }
  if (p.head_dim <= 0 || p.head_dim % 8 != 0) return "head_dim must be a positive multiple of 8";
  if (p.seqlen_q >= kBig || p.seqlen_k >= kBig) return "sequence lengths must be below 2^29";
  if (p.batch > 65535 || p.heads_q > 65535) return "batch (or number of documents) and heads must be at most 65535";
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return "heads_q must be a multiple of heads_kv";
  if (!rows_aligned(p.q, p.q_batch_stride, p.q_head_stride, p.q_row_stride) ||
      !rows_aligned(p.out, p.o_batch_stride, p.o_head_stride, p.o_row_stride) ||
      (p.seqlen_k > 0 && (!rows_aligned(p.k, p.k_batch_stride, p.k_head_stride, p.k_row_stride) ||
                          !rows_aligned(p.v, p.v_batch_stride, p.v_head_stride, p.v_row_stride)))) {
    return "q, k, v and out must start on 16-byte boundaries, with strides that are multiples of 8 elements";
  }
  return nullptr;
}

// Whether `kernel` has an image for the current GPU and may use `smem_bytes` of dynamic shared
// memory there; nullptr when it may.
template <typename Kernel>
const char* kernel_unsupported(Kernel kernel, int smem_bytes) {
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so that it is not reported by a later launch
    return "no kernel image for this GPU (the CUDA part is built for sm_80 and sm_90a)";
  }
  int device = 0;
  int optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    return "could not query the GPU's shared memory per block";
  }
  if (smem_bytes + static_cast<int>(attr.sharedSizeBytes) > optin) {
    return "these tiles need more shared memory per block than this GPU has";
  }
  return nullptr;
}

// Raises the kernel's dynamic shared memory limit (above 48 KB it must be asked for).
template <typename Kernel>
void set_smem_limit(Kernel kernel, int smem_bytes, const char* what) {
  if (smem_bytes > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes) != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("slmfast ") + what + ": cannot get " + std::to_string(smem_bytes) +
                             " bytes of shared memory per block on this GPU");
  }
}

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("slmfast ") + what + ": " + cudaGetErrorString(err));
  }
}

}  // namespace slmfast::cuda::attn
