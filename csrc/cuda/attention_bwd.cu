// attention_bwd.cu — launcher of the deterministic FlashAttention-2 backward (attention_bwd.cuh)
// for the slmfast::attention_bwd op (contract: csrc/common/params.h, AttentionBwdParams).
//
// Three launches on the caller's stream: delta = rowsum(dO o O), then dK/dV (one block per key
// block, looping over its GQA group's query heads and visible query blocks), then dQ (one block
// per query block). No atomics, so `deterministic` needs no separate path: both values give
// the same bit-identical result. The bindings allocate p.delta (float32, shaped like lse,
// lse's strides) and dq/dk/dv; this file allocates nothing.
//
// Supported: what the forward supports (attention_fwd.cu) with head dims up to 128; 256 is
// refused (its dK and dV accumulators alone would need 256 registers per thread with 16 keys
// per warp) and the op falls back to another backend.
//
// Bounds (B=4, Hq=16, T=S=4096, D=128, bf16, non-causal):
//   FLOPs, as benchmarks count them (2.5 x forward): 1374 GFLOP -> 1.74 ms at 790 TFLOP/s; done
//   here: 7 block products of 2 B Hq T S D each (4 in dK/dV, 3 in dQ) = 1924 GFLOP -> 2.44 ms
//   bytes q, k, v, out, dout read, dq, dk, dv written (8 x 67.1 MB) + lse, delta = 540 MB ->
//   0.18 ms at 3.0 TB/s: compute-bound.
// Measured (2026-11-26, NVIDIA H200, torch 2.11.0+cu130, B=4 H=16 T=S=4096 bf16, same harness
// as attention_fwd.cu): backward alone D=128 7.50 ms non-causal (= 256 TFLOP/s of the 7 products
// actually done), 4.17 ms causal; D=64 3.72 / 2.10 ms. Forward + backward against SDPA's flash
// backend: D=128 9.62 ms vs 6.60 (0.69 of its speed), causal 5.35 vs 3.81 (0.71); D=64 4.80 vs
// 3.62 (0.76), causal 2.73 vs 2.17 (0.80). The 0.9 target is not reached: 7 products instead of
// 5 cost 1.4x by themselves; a deterministic=False path with an atomic dQ (flash-attention's)
// would remove the 2 extra ones.
// Registers per tile (no tile spills): benchmarks/RESULTS.md, from `make cuda-check`.
#include <stdexcept>
#include <string>

#include "attention_bwd.cuh"

namespace slmfast {
namespace {

using cuda::attn::DeltaConfig;
using cuda::attn::DkDvConfig;
using cuda::attn::DqConfig;

constexpr int kBwdMaxHeadDim = 128;

// The tiles per head dim (the one table): dK/dV steps of 64 queries, 32 from D = 96 on (64
// spills there: dK and dV alone hold 2 x D / 2 fp32 registers per thread); dQ keeps the Q and
// dO fragments in registers up to D = 64 and reloads them from shared memory above.
template <int kD>
struct BwdTile {
  using DkDv = DkDvConfig<kD, 8, (kD <= 64 ? 64 : 32)>;
  using Dq = DqConfig<kD, 8, 64, (kD <= 64)>;
};

template <typename Elem, int kD, bool kMasked>
void launch_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  using DkDv = typename BwdTile<kD>::DkDv;
  using Dq = typename BwdTile<kD>::Dq;
  const unsigned heads_q = static_cast<unsigned>(p.heads_q);
  const unsigned batch = static_cast<unsigned>(p.batch);
  if (p.seqlen_q > 0) {
    constexpr int kRows = DeltaConfig<kD>::kRows;
    const dim3 grid(static_cast<unsigned>((p.seqlen_q + kRows - 1) / kRows), heads_q, batch);
    cuda::attn::attention_bwd_delta_kernel<Elem, kD><<<grid, 256, 0, stream>>>(p);
    cuda::attn::check_launch("attention_bwd (delta)");
  }
  if (p.seqlen_k > 0) {  // dK and dV are written even where no query sees a key (zeros)
    auto kernel = cuda::attn::attention_bwd_dkdv_kernel<Elem, DkDv, kMasked>;
    cuda::attn::set_smem_limit(kernel, DkDv::kSmemBytes, "attention_bwd (dk, dv)");
    const dim3 grid(static_cast<unsigned>((p.seqlen_k + DkDv::kBN - 1) / DkDv::kBN),
                    static_cast<unsigned>(p.heads_kv), batch);
    kernel<<<grid, DkDv::kThreads, DkDv::kSmemBytes, stream>>>(p);
    cuda::attn::check_launch("attention_bwd (dk, dv)");
  }
  if (p.seqlen_q > 0) {
    auto kernel = cuda::attn::attention_bwd_dq_kernel<Elem, Dq, kMasked>;
    cuda::attn::set_smem_limit(kernel, Dq::kSmemBytes, "attention_bwd (dq)");
    const dim3 grid(static_cast<unsigned>((p.seqlen_q + Dq::kBM - 1) / Dq::kBM), heads_q, batch);
    kernel<<<grid, Dq::kThreads, Dq::kSmemBytes, stream>>>(p);
    cuda::attn::check_launch("attention_bwd (dq)");
  }
}

// The one dispatch point of the backward: f is called with the kernels' template arguments.
template <typename F>
bool dispatch_bwd(const AttentionBwdParams& p, F&& f) {
  const bool masked = p.causal || p.window_left >= 0 || p.window_right >= 0;
  return cuda::attn::dispatch_attention<kBwdMaxHeadDim>(p.dtype, p.head_dim, masked, f);
}

}  // namespace

const char* attention_bwd_cuda_unsupported(const AttentionBwdParams& p) {
  using cuda::attn::rows_aligned;
  if (const char* why = cuda::attn::common_unsupported(p)) return why;
  if (!rows_aligned(p.dout, p.do_batch_stride, p.do_head_stride, p.do_row_stride) ||
      !rows_aligned(p.dq, p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride) ||
      (p.seqlen_k > 0 && (!rows_aligned(p.dk, p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride) ||
                          !rows_aligned(p.dv, p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride)))) {
    return "dout, dq, dk and dv must start on 16-byte boundaries, with strides that are multiples of 8 elements";
  }
  const char* why = "head_dim must be a multiple of 8 and at most 128 for the backward";
  dispatch_bwd(p, [&](auto elem, auto d, auto masked) {
    using Elem = decltype(elem);
    constexpr int kD = decltype(d)::value;
    constexpr bool kMasked = decltype(masked)::value;
    using DkDv = typename BwdTile<kD>::DkDv;
    using Dq = typename BwdTile<kD>::Dq;
    why = cuda::attn::kernel_unsupported(cuda::attn::attention_bwd_dkdv_kernel<Elem, DkDv, kMasked>, DkDv::kSmemBytes);
    if (why == nullptr) {
      why = cuda::attn::kernel_unsupported(cuda::attn::attention_bwd_dq_kernel<Elem, Dq, kMasked>, Dq::kSmemBytes);
    }
  });
  return why;
}

void attention_bwd_cuda(const AttentionBwdParams& p, void* stream) {
  if (const char* why = attention_bwd_cuda_unsupported(p)) {
    throw std::invalid_argument(std::string("slmfast attention_bwd (cuda): ") + why);
  }
  if (p.batch == 0 || p.heads_q == 0) return;
  if (p.delta == nullptr && p.seqlen_q > 0) {
    throw std::invalid_argument("slmfast attention_bwd (cuda): params.delta must point to a float32 workspace");
  }
  dispatch_bwd(p, [&](auto elem, auto d, auto masked) {
    launch_bwd<decltype(elem), decltype(d)::value, decltype(masked)::value>(p, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace slmfast
