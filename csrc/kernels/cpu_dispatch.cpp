// Picks the CPU kernel table for the running machine.
//
// The library is built without -march=native so that one build runs on every
// x86-64 (or aarch64) machine; instead cpu_kernels_impl.cpp is compiled for each
// instruction set in FXC_CPU_ISAS (CMakeLists.txt) and the best one that the CPU
// and the OS support is chosen here at first use, as ATen does for its own
// kernels. FXCOMPRESS_CPU_ISA names one instead (tests, measurements).
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cpu_kernels.h"

#if defined(FXC_HAVE_AVX2)
#include <cpuid.h>
#endif

namespace fxc::cpu {

#if defined(FXC_HAVE_AVX512)
namespace avx512 {
const KernelTable& table();
}
#endif
#if defined(FXC_HAVE_AVX2)
namespace avx2 {
const KernelTable& table();
}
#endif
namespace baseline {
const KernelTable& table();
}

namespace {

#if defined(FXC_HAVE_AVX2)  // x86-64 only (CMakeLists.txt)
// XCR0, the register state the OS saves on a context switch: a CPU can have
// AVX or AVX-512 while the OS (or hypervisor) leaves it disabled, and then its
// instructions fault. Bits 1-2: SSE and YMM upper halves; 5-7: opmask, upper
// halves of ZMM0-15, ZMM16-31.
uint64_t os_saved_state() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return 0;
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}
constexpr uint64_t kYmmState = 0x6, kZmmState = 0xE6;

bool avx2_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && (os_saved_state() & kYmmState) == kYmmState;
}
#endif

#if defined(FXC_HAVE_AVX512)
bool avx512_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         (os_saved_state() & kZmmState) == kZmmState;
}
#endif

bool always_supported() { return true; }

struct Isa {
  const char* name;
  const KernelTable& (*table)();
  bool (*supported)();
  const char* needs;  // for the error when it is forced on a machine without it
};

// Best first.
const Isa kIsas[] = {
#if defined(FXC_HAVE_AVX512)
    {"avx512", avx512::table, avx512_supported,
     "AVX-512 F, BW, VL and DQ, with the ZMM state enabled by the OS (XCR0)"},
#endif
#if defined(FXC_HAVE_AVX2)
    {"avx2", avx2::table, avx2_supported, "AVX2, with the YMM state enabled by the OS (XCR0)"},
#endif
    {"baseline", baseline::table, always_supported, ""},
};

// The names, best first, comma-separated: all compiled ones or the supported ones.
std::string join(bool supported_only) {
  std::string out;
  for (const Isa& isa : kIsas) {
    if (supported_only && !isa.supported()) continue;
    if (!out.empty()) out += ',';
    out += isa.name;
  }
  return out;
}
std::string join_supported() { return join(true); }

// The table named `name` ("" or null: the best supported one). A name that is
// not compiled in, or that this CPU cannot run, is an error rather than a silent
// fallback: whoever forces an instruction set is measuring or testing that one.
const KernelTable& find(const char* name, const char* origin) {
  const bool best = name == nullptr || *name == '\0';
  for (const Isa& isa : kIsas) {
    if (best ? isa.supported() : std::string(isa.name) == name) {
      if (!isa.supported()) {
        throw std::runtime_error(std::string(origin) + ": this CPU cannot run the '" + name +
                                 "' kernels (they need " + isa.needs +
                                 "); the ones it can run: " + join_supported());
      }
      return isa.table();
    }
  }
  throw std::runtime_error(std::string(origin) + ": unknown CPU instruction set '" + name +
                           "'; this library has " + compiled_isas() +
                           " and this CPU can run " + join_supported());
}

std::atomic<const KernelTable*> current{nullptr};

}  // namespace

const KernelTable& kernels() {
  const KernelTable* t = current.load(std::memory_order_acquire);
  if (t == nullptr) {
    // Two threads may both get here first: they pick the same table.
    const char* requested = std::getenv("FXCOMPRESS_CPU_ISA");
    const std::string origin = std::string("FXCOMPRESS_CPU_ISA=") + (requested ? requested : "");
    t = &find(requested, origin.c_str());
    current.store(t, std::memory_order_release);
  }
  return *t;
}

std::string use_isa(const std::string& name) {
  const KernelTable* next =
      name.empty() ? nullptr : &find(name.c_str(), ("_set_cpu_isa('" + name + "')").c_str());
  const KernelTable* previous = current.exchange(next, std::memory_order_acq_rel);
  return previous ? previous->isa : "";
}

std::string supported_isas() { return join_supported(); }

const char* compiled_isas() {
  // Best first, as FXC_CPU_ISAS in CMakeLists.txt.
  static const std::string names = join(false);
  return names.c_str();
}

}  // namespace fxc::cpu
