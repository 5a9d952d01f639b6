// kernel_table.h — the entry points of the vectorized CPU kernels, one table per capability.
//
// The kernels in csrc/cpu/kernels/ are compiled once per capability (capability.h), each copy in
// namespace slmfast::cpu::<CAPABILITY>; each copy fills its capability's table at load time with
// SLMFAST_REGISTER_CPU_KERNEL. The op files (csrc/cpu/<op>.cpp, baseline ISA) check arguments,
// allocate outputs, fill a params struct (csrc/common/params.h) and call
// `kernels().<entry>(params)`, which runs the copy of the chosen capability. Only plain structs
// and pointers cross this boundary, so nothing compiled for a wider ISA is ever called from a path
// that has not checked the CPU first.
#pragma once

#include <c10/util/Exception.h>

#include "../common/params.h"
#include "capability.h"

namespace slmfast::cpu {

struct KernelTable {
  void (*rms_norm_fwd)(const RmsNormFwdParams&) = nullptr;
  void (*rms_norm_bwd)(const RmsNormBwdParams&) = nullptr;
  void (*layer_norm_fwd)(const LayerNormFwdParams&) = nullptr;
  void (*layer_norm_bwd)(const LayerNormBwdParams&) = nullptr;
  void (*glu_fwd)(const GluParams&) = nullptr;
  void (*glu_bwd)(const GluParams&) = nullptr;  // recomputes out when params.out != nullptr
  void (*rotary)(const RotaryParams&) = nullptr;
  void (*cross_entropy)(const CrossEntropyParams&) = nullptr;
  void (*distill)(const DistillParams&) = nullptr;
  // Attention: the softmax scale in double (params.scale is float; fp64 keeps every digit), block
  // sizes (query rows, key rows) chosen by the op file; fp32, fp64 and bf16 (bf16 only where
  // cpublas::could_pack(bf16): the op converts otherwise).
  void (*attention_fwd)(const AttentionParams&, double scale, int64_t block_q, int64_t block_k) = nullptr;
  void (*attention_bwd)(const AttentionBwdParams&, double scale, int64_t block_q, int64_t block_k) = nullptr;

  // Every entry registered: the capability was compiled (all kernel files are built per
  // capability, so a table is either complete or empty).
  bool complete() const {
    return rms_norm_fwd && rms_norm_bwd && layer_norm_fwd && layer_norm_bwd && glu_fwd && glu_bwd && rotary &&
           cross_entropy && distill && attention_fwd && attention_bwd;
  }
};

// The table of capability c (zero-initialized before any static constructor runs, so
// registration order between files does not matter).
KernelTable& kernel_table(Capability c);

// The table of the chosen capability.
inline const KernelTable& kernels() {
  const KernelTable& table = kernel_table(chosen_capability());
  TORCH_CHECK(table.complete(), "slmfast: the CPU kernels of capability ", capability_name(chosen_capability()),
              " are incomplete (a build problem)");
  return table;
}

}  // namespace slmfast::cpu

// In a kernel file: SLMFAST_REGISTER_CPU_KERNEL(rms_norm_fwd, rms_norm_fwd_impl); fills the entry
// of the capability this copy is compiled for (setup.py defines CPU_CAPABILITY per copy).
#define SLMFAST_CPU_KERNEL_CONCAT_(a, b) a##b
#define SLMFAST_CPU_KERNEL_CONCAT(a, b) SLMFAST_CPU_KERNEL_CONCAT_(a, b)
#define SLMFAST_REGISTER_CPU_KERNEL(entry, fn)                                                     \
  static const bool SLMFAST_CPU_KERNEL_CONCAT(registered_##entry##_, __LINE__) = [] {              \
    ::slmfast::cpu::kernel_table(::slmfast::cpu::Capability::CPU_CAPABILITY).entry = &(fn);        \
    return true;                                                                                   \
  }()
