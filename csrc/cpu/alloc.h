// alloc.h — output buffers for the CPU kernels: ask Linux for transparent huge pages before the
// kernel first writes a large fresh output.
//
// Why: a fresh multi-megabyte tensor comes from mmap, and its first write page-faults once per
// 4 KiB page. Measured on the 2-core development machines (torch 2.13): allocating and filling
// a 32 MiB tensor took ~13 ms, against ~2.8 ms for filling an existing one, so a memory-bound
// kernel that writes two such outputs spends most of its time in the page-fault handler.
// madvise(MADV_HUGEPAGE) on the buffer before the first touch (what torch itself does for every
// allocation when THP_MEM_ALLOC_ENABLE=1 is set) makes those faults 2 MiB each: ~5.5 ms for the
// same 32 MiB. The advice is only a hint: with THP disabled system-wide it does nothing, and it
// never changes results. SLMFAST_HUGEPAGES=0 turns it off.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace slmfast::cpu {

inline bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("SLMFAST_HUGEPAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return enabled;
}

// Advise huge pages for the 2 MiB-aligned interior of t's storage. Call it on an output that
// no one has written yet, before the kernel runs; tensors under 4 MiB are left alone.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (!huge_pages_enabled() || !t.defined() || t.device().type() != at::kCPU) return;
  const size_t nbytes = t.storage().nbytes();
  if (nbytes < 2 * kHuge) return;
  const auto base = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t begin = (base + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (base + nbytes) & ~(kHuge - 1);
  if (end > begin) {
    // Failure (e.g. THP compiled out) is harmless: the memory is ordinary pages then.
    (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#else
  (void)t;
#endif
}

// at::empty(...) whose large buffers are advised as above.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

inline at::Tensor empty_output_like(const at::Tensor& like) {
  at::Tensor t = at::empty_like(like);
  advise_huge_pages(t);
  return t;
}

}  // namespace slmfast::cpu
