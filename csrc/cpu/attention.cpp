// attention.cpp — the CPU implementation of slmfast::attention_fwd / attention_bwd (schemas in
// csrc/slmfast.cpp, contract in slmfast/ops/attention.py).
//
// The kernels (FlashAttention-2 on brgemm block products) are in kernels/attention_fwd.h and
// kernels/attention_bwd.h, compiled once per capability (kernels/attention.cpp); this file checks
// arguments (csrc/common/attention_args.h), picks the compute type and block sizes, runs the
// kernel of the chosen capability (kernel_table.h) and registers the ops:
//  * fp32 and bf16 run natively (bf16 on AMX through brgemm's VNNI products, when
//    cpublas::could_pack(bf16) says the machine has them);
//  * fp16 (no fp16 matrix unit here: cpublas::could_pack(fp16) is false) and bf16 without AMX
//    run the fp32 kernel on converted copies, which is more accurate and still fast;
//  * fp64 (for gradcheck) runs the same kernels with a plain loop product.
// bf16 with an odd head dimension is padded with a zero column (the VNNI layout pairs values).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <utility>

#include "../common/attention_args.h"
#include "alloc.h"
#include "kernel_table.h"

namespace slmfast::cpu {
namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Block sizes, measured on the development machines (2 cores, AMX; benchmarks/bench_attention.py):
// the forward is bound by the softmax and by brgemm's per-call cost, so it takes big blocks
// (256 x 256; blocks the mask cuts are multiplied in strips, attention_fwd.h); the backward,
// with five products per block pair, does best with 64 x 128 (bf16) and 64 x 64 (fp32, fp64).
// Blocks shrink to the sequence lengths, and the forward's query blocks halve (down to 64) while
// there would be fewer than 4 tasks per thread.
std::pair<int64_t, int64_t> fwd_blocks(const AttentionParams& p) {
  int64_t bq = std::min<int64_t>(256, round_up(std::max<int64_t>(p.seqlen_q, 1), 16));
  const int64_t bk = std::min<int64_t>(256, round_up(std::max<int64_t>(p.seqlen_k, 1), 32));
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  while (bq > 64 && p.batch * p.heads_q * ((p.seqlen_q + bq - 1) / bq) < want) bq /= 2;
  return {bq, bk};
}

std::pair<int64_t, int64_t> bwd_blocks(const AttentionParams& p, at::ScalarType t) {
  const int64_t bq = std::min<int64_t>(64, round_up(std::max<int64_t>(p.seqlen_q, 1), 16));
  const int64_t bk = std::min<int64_t>(t == at::kBFloat16 ? 128 : 64, round_up(std::max<int64_t>(p.seqlen_k, 1), 32));
  return {bq, bk};
}

// The dtype the kernels run in for inputs of dtype t.
at::ScalarType compute_type(at::ScalarType t) {
  if (t == at::kHalf) return at::kFloat;
  if (t == at::kBFloat16 && !at::native::cpublas::could_pack(at::kBFloat16)) return at::kFloat;
  return t;
}

// bf16 VNNI operands pair adjacent head-dim values (and pack K and V rows as 32-bit words),
// which needs an even head dimension and even strides.
bool needs_even_copy(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  if (q.scalar_type() != at::kBFloat16 || compute_type(at::kBFloat16) != at::kBFloat16) return false;
  if (q.size(-1) % 2 != 0) return true;
  for (const auto* t : {&k, &v}) {
    for (int64_t d = 0; d + 1 < t->dim(); ++d) {
      if (t->stride(d) % 2 != 0) return true;
    }
  }
  return false;
}

at::Tensor pad_even(const at::Tensor& t) {
  return t.size(-1) % 2 == 0 ? t.contiguous() : at::constant_pad_nd(t, {0, 1}, 0);
}

at::Tensor narrow_head_dim(const at::Tensor& t, int64_t D) {
  return t.size(-1) == D ? t : t.narrow(-1, 0, D).contiguous();
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale, bool causal, int64_t window_left,
                                                     int64_t window_right,
                                                     const std::optional<at::Tensor>& cu_seqlens_q,
                                                     const std::optional<at::Tensor>& cu_seqlens_k,
                                                     int64_t max_seqlen_q, int64_t max_seqlen_k) {
  AttentionParams p{};
  auto [out, lse] = attention_fwd_prepare("attention_fwd", q, k, v, scale, causal, window_left, window_right,
                                          cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, p);
  const at::ScalarType ct = compute_type(q.scalar_type());
  if (ct != q.scalar_type()) {
    auto [o32, lse32] = attention_fwd_cpu(q.to(ct), k.to(ct), v.to(ct), scale, causal, window_left, window_right,
                                          cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
    out.copy_(o32);
    return {out, lse32};
  }
  if (needs_even_copy(q, k, v)) {
    auto [o2, lse2] = attention_fwd_cpu(pad_even(q), pad_even(k), pad_even(v), scale, causal, window_left,
                                        window_right, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
    out.copy_(narrow_head_dim(o2, q.size(-1)));
    return {out, lse2};
  }
  if (q.numel() == 0) return {out, lse};
  advise_huge_pages(out);  // a fresh output: see alloc.h
  const auto [bq, bk] = fwd_blocks(p);
  kernels().attention_fwd(p, scale, bq, bk);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale, bool causal, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool deterministic) {
  AttentionBwdParams p{};
  auto [dq, dk, dv] = attention_bwd_prepare("attention_bwd", dout, q, k, v, out, lse, scale, causal, window_left,
                                            window_right, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            deterministic, p);
  const at::ScalarType ct = compute_type(q.scalar_type());
  const bool convert = ct != q.scalar_type();
  if (convert || needs_even_copy(q, k, v)) {
    auto prep = [&](const at::Tensor& t) { return convert ? t.to(ct) : pad_even(t); };
    auto [dq2, dk2, dv2] = attention_bwd_cpu(prep(dout), prep(q), prep(k), prep(v), prep(out), lse, scale, causal,
                                             window_left, window_right, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, deterministic);
    const int64_t D = q.size(-1);
    dq.copy_(narrow_head_dim(dq2, D));
    dk.copy_(narrow_head_dim(dk2, D));
    dv.copy_(narrow_head_dim(dv2, D));
    return {dq, dk, dv};
  }
  // The kernels write every block of dq, dk and dv (zeros where no query sees a key).
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv};
  }
  // The CPU backward never uses atomics: `deterministic` is always honoured.
  for (const auto* t : {&dq, &dk, &dv}) advise_huge_pages(*t);
  const auto [bq, bk] = bwd_blocks(p, ct);
  kernels().attention_bwd(p, scale, bq, bk);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(slmfast, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace slmfast::cpu
