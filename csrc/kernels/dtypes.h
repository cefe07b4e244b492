// Storage types of the CPU kernel core and their float32 conversions.
// Plain C++ (no torch headers): float16 and bfloat16 are 16-bit patterns with
// the conversions PyTorch uses (c10/util/Half.h, c10/util/BFloat16.h: IEEE
// round-to-nearest-even), so results are bit-identical to `tensor.to(dtype)`.
// Every function is branch-free enough for `#pragma omp simd` to vectorize.
#pragma once

#include <cstdint>
#include <cstring>

namespace fxc {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kBool = 3 };

struct f16_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};
static_assert(sizeof(f16_t) == 2 && sizeof(bf16_t) == 2, "16-bit storage types");

inline float f32_from_bits(uint32_t w) {
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}
inline uint32_t bits_from_f32(float f) {
  uint32_t w;
  std::memcpy(&w, &f, sizeof w);
  return w;
}

// IEEE half -> float, exact (normal, subnormal, inf, NaN).
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal numbers: shift the exponent/mantissa into place, rebias by 2^-112.
  const uint32_t exp_offset = 0xE0u << 23;
  const float normalized = f32_from_bits((two_w >> 4) + exp_offset) * 0x1.0p-112f;
  // Subnormals: build 0.5 + m * 2^-24 as a float and subtract 0.5.
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < cutoff ? bits_from_f32(denormalized) : bits_from_f32(normalized));
  return f32_from_bits(result);
}

// float -> IEEE half, round to nearest even, overflow to inf, NaN stays NaN.
// (Needs -ffp-contract=off: an FMA would change the rounding trick.)
inline uint16_t f32_to_f16(float f) {
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_from_f32(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_from_f32(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

// float -> bfloat16, round to nearest even; NaN becomes the canonical 0x7FC0.
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = bits_from_f32(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7FC0u) : uint16_t(rounded);
}

template <typename T>
struct Storage;

template <>
struct Storage<float> {
  static float load(const float* p) { return *p; }
  static void store(float* p, float v) { *p = v; }
};
template <>
struct Storage<f16_t> {
  static float load(const f16_t* p) { return f16_to_f32(p->bits); }
  static void store(f16_t* p, float v) { p->bits = f32_to_f16(v); }
};
template <>
struct Storage<bf16_t> {
  static float load(const bf16_t* p) { return bf16_to_f32(p->bits); }
  static void store(bf16_t* p, float v) { p->bits = f32_to_bf16(v); }
};
template <>
struct Storage<bool> {
  static float load(const bool* p) { return *p ? 1.0f : 0.0f; }
};

template <typename T>
inline float load(const T* p, int64_t i) {
  return Storage<T>::load(p + i);
}
template <typename T>
inline void store(T* p, int64_t i, float v) {
  Storage<T>::store(p + i, v);
}

}  // namespace fxc
