// Picks the CPU kernel table for the running machine, once.
//
// The library is built without -march=native so that one build runs on every
// x86-64 (or aarch64) machine; instead cpu_kernels_impl.cpp is compiled for each
// instruction set in FXC_CPU_ISAS (CMakeLists.txt) and the best supported one is
// chosen here at first use, as ATen does for its own kernels.
#include <cstdlib>
#include <cstring>

#include "cpu_kernels.h"

namespace fxc::cpu {

#if defined(FXC_HAVE_AVX2)
namespace avx2 {
const KernelTable& table();
}
#endif
namespace baseline {
const KernelTable& table();
}

namespace {

bool cpu_has_avx2() {
#if defined(FXC_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

const KernelTable& select() {
  const char* requested = std::getenv("FXCOMPRESS_CPU_ISA");
  const bool force_baseline = requested != nullptr && std::strcmp(requested, "baseline") == 0;
#if defined(FXC_HAVE_AVX2)
  if (!force_baseline && cpu_has_avx2()) return avx2::table();
#else
  (void)force_baseline;
  (void)cpu_has_avx2;
#endif
  return baseline::table();
}

}  // namespace

const KernelTable& kernels() {
  static const KernelTable& chosen = select();
  return chosen;
}

const char* compiled_isas() {
#if defined(FXC_HAVE_AVX2)
  return "avx2,baseline";
#else
  return "baseline";
#endif
}

}  // namespace fxc::cpu
