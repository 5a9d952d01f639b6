// capability.cpp — detects the CPU's vector ISAs and holds the run-time choice of capability for
// the kernels in csrc/cpu/kernels/ (see capability.h). Compiled for the baseline ISA only.
#include "capability.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <mutex>
#include <string>

#include "kernel_table.h"

namespace slmfast::cpu {
namespace {

constexpr const char* kEnvVar = "SLMFAST_CPU_CAPABILITY";

bool cpu_supports(Capability c) {
  if (c == Capability::DEFAULT) return true;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  // __builtin_cpu_supports reads cpuid and, for AVX and AVX-512, also checks that the OS saves
  // the wider registers (XCR0). The AVX2 kernels are compiled with -mavx2 -mfma -mf16c, the
  // AVX512 ones with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c (setup.py).
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (c == Capability::AVX2) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool compiled(Capability c) { return kernel_table(c).complete(); }

std::string lower(std::string s) {
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

std::string names(const std::vector<Capability>& caps) {
  std::string out;
  for (const auto c : caps) out += (out.empty() ? "" : ", ") + std::string(capability_name(c));
  return out;
}

// The best capability that is compiled and supported, at most `cap`.
Capability best_up_to(Capability cap) {
  for (int i = static_cast<int>(cap); i > 0; --i) {
    const auto c = static_cast<Capability>(i);
    if (compiled(c) && cpu_supports(c)) return c;
  }
  return Capability::DEFAULT;
}

// Parses a capability name; with `strict`, it must be compiled and supported here.
Capability parse(const std::string& raw, const char* source) {
  const std::string name = lower(raw);
  for (int i = 0; i < kNumCapabilities; ++i) {
    const auto c = static_cast<Capability>(i);
    if (name != capability_name(c)) continue;
    TORCH_CHECK(cpu_supports(c), source, " asks for the ", name, " kernels, but this CPU supports only ",
                names(supported_capabilities()));
    TORCH_CHECK(compiled(c), source, " asks for the ", name, " kernels, but slmfast._C was built with ",
                names(compiled_capabilities()), " only");
    return c;
  }
  TORCH_CHECK(false, source, " must be one of default, avx2, avx512, got '", raw, "'");
}

KernelTable g_tables[kNumCapabilities];  // constant-initialized: filled by the kernel files' static initializers
std::atomic<int> g_chosen{-1};  // -1: not resolved yet
std::mutex g_resolve_mutex;

}  // namespace

KernelTable& kernel_table(Capability c) { return g_tables[static_cast<int>(c)]; }

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::AVX2: return "avx2";
    case Capability::AVX512: return "avx512";
    default: return "default";
  }
}

std::vector<Capability> compiled_capabilities() {
  std::vector<Capability> out;
  for (int i = 0; i < kNumCapabilities; ++i) {
    if (compiled(static_cast<Capability>(i))) out.push_back(static_cast<Capability>(i));
  }
  return out;
}

std::vector<Capability> supported_capabilities() {
  std::vector<Capability> out;
  for (int i = 0; i < kNumCapabilities; ++i) {
    if (cpu_supports(static_cast<Capability>(i))) out.push_back(static_cast<Capability>(i));
  }
  return out;
}

Capability chosen_capability() {
  int c = g_chosen.load(std::memory_order_acquire);
  if (c >= 0) return static_cast<Capability>(c);
  std::lock_guard<std::mutex> lock(g_resolve_mutex);
  c = g_chosen.load(std::memory_order_relaxed);
  if (c < 0) {
    const char* env = std::getenv(kEnvVar);
    const Capability cap = (env != nullptr && *env != '\0' && lower(env) != "auto")
                               ? parse(env, "SLMFAST_CPU_CAPABILITY")
                               : Capability::AVX512;
    c = static_cast<int>(best_up_to(cap));
    g_chosen.store(c, std::memory_order_release);
  }
  return static_cast<Capability>(c);
}

std::string set_cpu_capability(const std::string& name) {
  const Capability next = parse(name, "set_cpu_capability");
  const Capability previous = chosen_capability();
  g_chosen.store(static_cast<int>(next), std::memory_order_release);
  return capability_name(previous);
}

}  // namespace slmfast::cpu
