// The CPU kernel core: plain C++ over raw pointers, no torch headers.
//
// Every kernel processes one Tile of a contiguous tensor (see layout.h); the
// caller (csrc/torch/cpu_ops.cpp) runs tiles in parallel with at::parallel_for
// and folds per-tile partial sums in a fixed order, so results do not depend
// on the number of threads.
//
// cpu_kernels_impl.cpp is compiled once per instruction set (AVX-512, AVX2 and
// the baseline of the target, see CMakeLists.txt); kernels() picks the best one
// the running CPU supports, once, like ATen's DispatchStub.
#pragma once

#include <cstdint>
#include <string>

#include "dtypes.h"
#include "layout.h"

namespace fxc::cpu {

struct KernelTable {
  const char* isa;

  // y = fake_quantize(x) on one tile; scale/zero_point hold one value per channel,
  // zero points already rounded and clamped (prepare_zero_point).
  void (*fake_quantize_forward)(DType dtype, const void* x, void* y, const Layout& layout,
                                const Tile& tile, const float* scale, const float* zero_point,
                                float quant_min, float quant_max);
  // grad_x on one tile, and per-channel partial sums (math.h: FakeQuantizeGrad)
  // accumulated into inside/below/above[tile.row * channels + c].
  void (*fake_quantize_backward)(DType dtype, const void* grad, const void* x, void* grad_x,
                                 const Layout& layout, const Tile& tile, const float* scale,
                                 const float* zero_point, float quant_min, float quant_max,
                                 double* inside, double* below, double* above);
  // sum |w| per channel into partial[tile.row * channels + c].
  void (*abs_sum)(DType dtype, const void* w, const Layout& layout, const Tile& tile,
                  double* partial);
  // out = w >= 0 ? m[c] : -m[c]
  void (*binarize)(DType dtype, const void* w, void* out, const Layout& layout, const Tile& tile,
                   const float* mean_abs);
  // out = x > t[c] ? s : 0   (t = threshold * s, one per channel)
  void (*activation_binarize_forward)(DType dtype, const void* x, void* out,
                                      const Layout& layout, const Tile& tile,
                                      const float* threshold_times_scale, float scale);
  // grad_x on one tile; per-channel partial sums of the scale and threshold
  // gradients (math.h: ActivationBinarizeGrad).
  void (*activation_binarize_backward)(DType dtype, const void* grad, const void* x,
                                       void* grad_x, const Layout& layout, const Tile& tile,
                                       const float* threshold_times_scale, float scale,
                                       double* grad_scale_partial, double* grad_threshold_partial);
  // out[i] = w[i] * mask[i] in float32, for i in [begin, end)
  void (*apply_mask)(DType w_dtype, DType mask_dtype, const void* w, const void* mask, void* out,
                     int64_t begin, int64_t end);
};

// The table in use: chosen at the first call, the best instruction set this
// CPU and OS support, or the one FXCOMPRESS_CPU_ISA names (avx512, avx2,
// baseline). A name that is unknown, not compiled in or not supported here
// throws std::runtime_error saying which ones are (from every op, until fixed).
const KernelTable& kernels();

// Switches the table for the whole process (tests and benchmarks compare the
// instruction sets in one process) and returns the previous one's name; "" goes
// back to the default choice above (and is what it returns when none was made
// yet). Same errors as kernels(). Ops already running keep the table they took.
std::string use_isa(const std::string& name);

// Instruction sets compiled into this library / supported by this CPU and OS
// among those, best first, comma-separated (for diagnostics and tests).
const char* compiled_isas();
std::string supported_isas();

}  // namespace fxc::cpu
