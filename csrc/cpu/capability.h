// capability.h — which vector ISA the CPU kernels run with, chosen at run time.
//
// Every kernel in csrc/cpu/kernels/ is compiled once per capability (setup.py: DEFAULT = baseline
// x86-64 or the target's baseline elsewhere, AVX2 (+FMA, F16C), AVX512 (F, BW, VL, DQ)), each copy
// in its own namespace slmfast::cpu::<CAPABILITY>, and registers its entry points in the table of
// its capability (kernel_table.h). Everything else in the extension is compiled for the baseline
// only. At the first kernel call the best capability that is compiled and that this CPU supports
// (cpuid, through the compiler's __builtin_cpu_supports) is chosen, capped by the environment
// variable SLMFAST_CPU_CAPABILITY=default|avx2|avx512; set_cpu_capability() changes the choice
// later (tests run every kernel under every capability that way). This is the scheme of ATen's
// DispatchStub (aten/src/ATen/native/DispatchStub.h), reduced to what slmfast needs.
#pragma once

#include <string>
#include <vector>

namespace slmfast::cpu {

enum class Capability : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };
constexpr int kNumCapabilities = 3;

const char* capability_name(Capability c);  // "default", "avx2", "avx512"

// Capabilities with registered kernels, lowest first.
std::vector<Capability> compiled_capabilities();
// Capabilities this CPU (and its OS) can run, lowest first; always includes DEFAULT.
std::vector<Capability> supported_capabilities();
// The capability the kernels run with now (resolved on first use; throws a c10::Error naming
// the environment variable when SLMFAST_CPU_CAPABILITY asks for one the CPU lacks).
Capability chosen_capability();
// Choose `name` from now on; throws when it is unknown, not compiled or unsupported. Returns the
// previous choice's name.
std::string set_cpu_capability(const std::string& name);

}  // namespace slmfast::cpu
