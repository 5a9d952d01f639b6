// kernels/attention.cpp — the CPU attention kernels (FlashAttention-2 on brgemm block products,
// kernels/attention_fwd.h and attention_bwd.h) compiled once per capability (csrc/cpu/capability.h)
// and registered in its kernel table; the ops, which pick the compute dtype and the block sizes,
// are csrc/cpu/attention.cpp.
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include "../../common/params.h"
#include "../kernel_table.h"
#include "attention_bwd.h"

namespace slmfast::cpu::CPU_CAPABILITY {
namespace {

// The dtypes the kernels are instantiated for: the op runs fp16 (and bf16 without AMX) on
// converted float32 copies.
template <typename F>
void visit_attention_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); return;
    case DType::kFloat64: f(double{}); return;
    case DType::kBFloat16: f(c10::BFloat16{}); return;
    default: TORCH_CHECK(false, "slmfast: the CPU attention kernels take float32, float64 or bfloat16");
  }
}

void attention_fwd(const AttentionParams& p, double scale, int64_t block_q, int64_t block_k) {
  visit_attention_dtype(p.dtype, [&](auto t) { attn::attention_fwd_kernel<decltype(t)>(p, scale, block_q, block_k); });
}

void attention_bwd(const AttentionBwdParams& p, double scale, int64_t block_q, int64_t block_k) {
  visit_attention_dtype(p.dtype, [&](auto t) { attn::attention_bwd_kernel<decltype(t)>(p, scale, block_q, block_k); });
}

}  // namespace

SLMFAST_REGISTER_CPU_KERNEL(attention_fwd, attention_fwd);
SLMFAST_REGISTER_CPU_KERNEL(attention_bwd, attention_bwd);

}  // namespace slmfast::cpu::CPU_CAPABILITY
