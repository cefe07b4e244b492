// Is the forward of fake_quantize bound by its division x / s? The kernel's
// per-element formula (csrc/kernels/math.h) in a plain loop over 64K floats (in
// L2), timed against the same loop with x / s replaced by cheaper forms, and a
// copy (benchmarks/RESULTS.md, issue 19). Build and run, for each instruction set:
//
//   F="-std=c++20 -O3 -ffp-contract=off -fno-trapping-math -fno-math-errno -fopenmp-simd -Icsrc/kernels"
//   g++ $F -mavx2 -mfma benchmarks/division_micro.cpp -o /tmp/micro_avx2 && /tmp/micro_avx2
//   g++ $F -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mprefer-vector-width=512 \
//       benchmarks/division_micro.cpp -o /tmp/micro_avx512 && /tmp/micro_avx512
//
// Variants: `div` is the kernel (x / s, correctly rounded, bitwise equal to the
// reference); `mul` is x * (1/s), which is NOT always equal to x / s (a lower
// bound for any division-free form); `newton1` adds one FMA correction to it (not
// provably correctly rounded either); `markstein2` two corrections, which by
// Markstein's theorem give the correctly rounded quotient barring underflow and
// overflow (not checked exhaustively here) - what an exact replacement costs.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "math.h"

using fxc::clamp_propagate_nan;
using fxc::round_half_even;

namespace {

using Kernel = void (*)(const float*, float*, int64_t, float, float, float, float);

__attribute__((noinline)) void div(const float* x, float* y, int64_t n, float s, float zp, float lo,
                                   float hi) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = fxc::fake_quantize_value(x[i], s, zp, lo, hi);
}

__attribute__((noinline)) void mul(const float* x, float* y, int64_t n, float s, float zp, float lo,
                                   float hi) {
  const float inv = 1.0f / s;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float q = clamp_propagate_nan(round_half_even(x[i] * inv) + zp, lo, hi);
    y[i] = (q - zp) * s;
  }
}

__attribute__((noinline)) void newton1(const float* x, float* y, int64_t n, float s, float zp,
                                       float lo, float hi) {
  const float inv = 1.0f / s;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float u = x[i] * inv;
    u = __builtin_fmaf(__builtin_fmaf(-u, s, x[i]), inv, u);
    const float q = clamp_propagate_nan(round_half_even(u) + zp, lo, hi);
    y[i] = (q - zp) * s;
  }
}

__attribute__((noinline)) void markstein2(const float* x, float* y, int64_t n, float s, float zp,
                                          float lo, float hi) {
  const float inv = 1.0f / s;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float u = x[i] * inv;
    u = __builtin_fmaf(__builtin_fmaf(-u, s, x[i]), inv, u);
    u = __builtin_fmaf(__builtin_fmaf(-u, s, x[i]), inv, u);
    const float q = clamp_propagate_nan(round_half_even(u) + zp, lo, hi);
    y[i] = (q - zp) * s;
  }
}

__attribute__((noinline)) void copy(const float* x, float* y, int64_t n, float, float, float,
                                    float) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = x[i];
}

// Fastest of 7 rounds of 200 calls, in microseconds per call.
double time_us(Kernel k, const float* x, float* y, int64_t n) {
  double best = 1e30;
  for (int round = 0; round < 7; ++round) {
    const auto start = std::chrono::steady_clock::now();
    for (int call = 0; call < 200; ++call) k(x, y, n, 0.02f, 3.0f, -128.0f, 127.0f);
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::min(best, t / 200 * 1e6);
  }
  return best;
}

}  // namespace

int main() {
  const int64_t n = 65536;
  std::vector<float> x(n), y(n);
  for (int64_t i = 0; i < n; ++i) x[i] = 3.0f * std::sin(0.37f * float(i));
  const struct {
    const char* name;
    Kernel kernel;
  } variants[] = {{"div", div},       {"mul", mul},   {"newton1", newton1},
                  {"markstein2", markstein2}, {"copy", copy}};
  for (const auto& v : variants) std::printf("%s %.2f us  ", v.name, time_us(v.kernel, x.data(), y.data(), n));
  std::printf("(%lld floats)\n", static_cast<long long>(n));
}
