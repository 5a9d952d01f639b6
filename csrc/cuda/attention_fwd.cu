// attention_fwd.cu — launcher of the FlashAttention-2 forward kernel (attention_fwd.cuh) for
// the slmfast::attention_fwd op (contract: csrc/common/params.h, AttentionParams).
//
// Supported: bf16 and fp16 (fp32 accumulation), head dims that are multiples of 8 up to 256
// (tiles for 32, 64, 96, 128, 256; a head dim in between runs on the next tile size with the
// extra columns zero-filled), dense and packed layouts, causal, windows, GQA/MQA. Refused (the
// bindings raise NotImplementedError and the op falls back to another backend): fp32/fp64,
// other head dims, rows not 16-byte aligned, GPUs older than sm_80 or with too little shared
// memory for the tiles. fp32 has no tensor-core path here on purpose: its mma would be tf32,
// which is not the fp32 accuracy the contract promises; Triton handles fp32 inputs.
//
// The one dispatch point: dispatch_attention (attention_common.cuh) turns (dtype, head dim,
// causal || window) into template arguments; packed vs dense stays a runtime branch at the
// start of each block (seq_info), as in flash-attention's BlockInfo, because it only changes
// where a block's rows start; causal and window are one flag because they are one band of
// diagonals (Mask). The tile table is FwdTile in attention_fwd.cuh.
//
// Bounds (B=4, Hq=16, T=S=4096, D=128, bf16, non-causal):
//   FLOPs 4 B Hq T S D = 550 GFLOP (half when causal) -> 0.70 ms at 790 TFLOP/s (H100 bf16)
//   bytes q, k, v read once, out written once: 4 x 67.1 MB + lse 1 MB = 269 MB -> 0.09 ms at 3.0 TB/s
//   so compute-bound: floor 0.70 ms; the target (SDPA flash, ~350 TFLOP/s) is 1.57 ms.
// Measured (2026-11-26, NVIDIA H200, torch 2.11.0+cu130, B=4 H=16 T=S=4096 bf16, median of 20,
// through a ctypes harness of these launchers; SDPA = torch's flash backend in the same process):
//   D=128 non-causal 2.12 ms = 259 TFLOP/s (SDPA 1.56 ms, 352; ours/SDPA speed 0.74)
//   D=128 causal     1.18 ms = 233 TFLOP/s (SDPA 0.93 ms, 296; 0.79)
//   D=64  non-causal 1.07 ms = 256 TFLOP/s (SDPA 0.93 ms, 295; 0.87);  causal 0.63 ms (0.86)
// The target (>= SDPA) is not reached. The D=128 tile is shared-memory bound: with 16 rows per
// warp each ldmatrix of K or V feeds 2 mma; 32 rows per warp (kMT = 2) halves that and measured
// 291 TFLOP/s (1.89 ms) with 4 warps x 2 m-tiles x 32 keys, but ptxas spills 48-84 bytes there
// (128 fp32 accumulator registers of O per thread), so it is not the default; closing the gap
// needs that tile without spills, or wgmma (sm_90a) in place of mma.sync.
// Registers per tile (no tile spills): benchmarks/RESULTS.md, from `make cuda-check`.
#include <stdexcept>
#include <string>

#include "attention_fwd.cuh"

namespace slmfast {
namespace {

using cuda::attn::FwdTile;

constexpr int kFwdMaxHeadDim = 256;

template <typename Elem, typename Cfg, bool kMasked>
void launch_fwd(const AttentionParams& p, cudaStream_t stream) {
  auto kernel = cuda::attn::attention_fwd_kernel<Elem, Cfg, kMasked>;
  cuda::attn::set_smem_limit(kernel, Cfg::kSmemBytes, "attention_fwd");
  const dim3 grid(static_cast<unsigned>((p.seqlen_q + Cfg::kBM - 1) / Cfg::kBM), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, static_cast<cudaStream_t>(stream)>>>(p);
  cuda::attn::check_launch("attention_fwd");
}

// The one dispatch point of the forward: f is called with the kernel's template arguments.
template <typename F>
bool dispatch_fwd(const AttentionParams& p, F&& f) {
  const bool masked = p.causal || p.window_left >= 0 || p.window_right >= 0;
  return cuda::attn::dispatch_attention<kFwdMaxHeadDim>(p.dtype, p.head_dim, masked, [&](auto elem, auto d, auto m) {
    f(decltype(elem){}, FwdTile<decltype(d)::value>{}, m);
  });
}

}  // namespace

const char* attention_fwd_cuda_unsupported(const AttentionParams& p) {
  if (const char* why = cuda::attn::common_unsupported(p)) return why;
  const char* why = "head_dim must be a multiple of 8 and at most 256";
  dispatch_fwd(p, [&](auto elem, auto cfg, auto masked) {
    using Cfg = decltype(cfg);
    why = cuda::attn::kernel_unsupported(
        cuda::attn::attention_fwd_kernel<decltype(elem), Cfg, decltype(masked)::value>, Cfg::kSmemBytes);
  });
  return why;
}

void attention_fwd_cuda(const AttentionParams& p, void* stream) {
  if (const char* why = attention_fwd_cuda_unsupported(p)) {
    throw std::invalid_argument(std::string("slmfast attention_fwd (cuda): ") + why);
  }
  if (p.batch == 0 || p.heads_q == 0 || p.seqlen_q == 0) return;  // nothing to write
  dispatch_fwd(p, [&](auto elem, auto cfg, auto masked) {
    launch_fwd<decltype(elem), decltype(cfg), decltype(masked)::value>(p, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace slmfast
