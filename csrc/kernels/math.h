// Per-element formulas of the fxcompress ops, shared by the CPU kernel core and
// the CUDA kernels so both compute exactly the same thing. Plain C++ (no torch
// headers); every function works on float32, whatever the storage dtype.
//
// These formulas are the C++ twin of fxcompress/ops/reference.py; a change here
// needs the same change there (tests/test_ops.py compares them bit for bit).
#pragma once

#if defined(__CUDACC__)
#define FXC_HD __host__ __device__ __forceinline__
#else
#define FXC_HD inline
#endif

namespace fxc {

// Round half to even: the rounding of ONNX QuantizeLinear and of torch.round,
// so a model trained with fake_quantize exports to the same integers.
FXC_HD float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);  // round-to-nearest-even is CUDA's rint
#elif defined(__SSE4_1__) || defined(__aarch64__) || defined(__ARM_NEON)
  return __builtin_nearbyintf(v);  // one vroundps / frinti per vector
#else
  // Baseline x86-64 (SSE2) has no vector rounding instruction, and a call to
  // nearbyintf per element would stop vectorization. Adding and subtracting
  // 2^23 rounds |v| < 2^23 to an integer in the current (nearest-even) mode;
  // floats at or above 2^23 are integers already, and NaN/inf fail `a < 2^23`.
  const float two23 = 8388608.0f;
  const float a = __builtin_fabsf(v);
  const float r = __builtin_copysignf((a + two23) - two23, v);
  return a < two23 ? r : v;
#endif
}

// Clamp written as two selects: NaN propagates (as torch.clamp does) and GCC
// if-converts it into vector min/max-like blends.
FXC_HD float clamp_propagate_nan(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  v = v > hi ? hi : v;
  return v;
}

// ---------------------------------------------------------------------------
// fake_quantize
//   zp  = clamp(round_half_even(zero_point), quant_min, quant_max)  (prepared once per channel)
//   q   = clamp(round_half_even(x / s) + zp, quant_min, quant_max)
//   y   = (q - zp) * s
// x / s is a true division (not x * (1/s)) so that it equals the reference.
FXC_HD float prepare_zero_point(float zero_point, float qmin, float qmax) {
  return clamp_propagate_nan(round_half_even(zero_point), qmin, qmax);
}

FXC_HD float fake_quantize_value(float x, float s, float zp, float qmin, float qmax) {
  const float q = clamp_propagate_nan(round_half_even(x / s) + zp, qmin, qmax);
  return (q - zp) * s;
}

// Backward of fake_quantize (the learnable / LSQ gradients with grad_factor 1,
// the conventions of torch._fake_quantize_learnable_per_tensor_affine):
// with u = x / s, r = round_half_even(u), q = r + zp (before clamping),
//   below (q < qmin):  y = (qmin - zp) * s   dy/dx = 0  dy/ds = qmin - zp   dy/dzp = -s
//   above (q > qmax):  y = (qmax - zp) * s   dy/dx = 0  dy/ds = qmax - zp   dy/dzp = -s
//   inside:            y = r * s             dy/dx = 1  dy/ds = r - u       dy/dzp = 0
// (inside, the straight-through estimator takes d round(u)/du = 1, so
//  dy/ds = r + s * du/ds = r - x/s; the zero point's rounding is also passed
//  straight through.) Kernels accumulate g * (r - u) over inside elements and
// g over below / above elements; finish_fake_quantize_grads turns those sums
// into grad_scale and grad_zero_point.
struct FakeQuantizeGrad {
  float grad_x;   // g inside, 0 outside
  float inside;   // g * (r - u) inside, 0 outside
  float below;    // g where q < qmin, else 0
  float above;    // g where q > qmax, else 0
};

FXC_HD FakeQuantizeGrad fake_quantize_grad(float g, float x, float s, float zp, float qmin,
                                           float qmax) {
  const float u = x / s;
  const float r = round_half_even(u);
  const float q = r + zp;
  const bool is_below = q < qmin;
  const bool is_above = q > qmax;
  const bool is_inside = !(is_below || is_above);
  FakeQuantizeGrad out;
  out.grad_x = is_inside ? g : 0.0f;
  out.inside = is_inside ? g * (r - u) : 0.0f;
  out.below = is_below ? g : 0.0f;
  out.above = is_above ? g : 0.0f;
  return out;
}

// grad_scale = sum_inside g*(r-u) + (qmin - zp) * sum_below g + (qmax - zp) * sum_above g
// grad_zero_point = -s * (sum_below g + sum_above g)
FXC_HD void finish_fake_quantize_grads(double inside, double below, double above, float s,
                                       float zp, float qmin, float qmax, double* grad_scale,
                                       double* grad_zero_point) {
  *grad_scale = inside + (double(qmin) - double(zp)) * below + (double(qmax) - double(zp)) * above;
  *grad_zero_point = -double(s) * (below + above);
}

// ---------------------------------------------------------------------------
// Weight binarization (XNOR-Net / DoReFa): w_b = sign(w) * m with sign(0) = +1
// (binary weights are always +-m) and m = mean(|w|) per output channel (XNOR)
// or over the whole tensor (DoReFa), accumulated in double and rounded to
// float32 once. Backward is straight-through (grad passes unchanged).
FXC_HD float binarize_value(float w, float m) { return w >= 0.0f ? m : -m; }

// ---------------------------------------------------------------------------
// Activation binarization, NNCF's ActivationBinarizationScaleThreshold:
//   out = s if x > t_c else 0,   t_c = threshold_c * s   (threshold is relative to s)
FXC_HD float activation_binarize_value(float x, float t, float s) { return x > t ? s : 0.0f; }

// Its backward, NNCF's formulas (nncf/torch/binarization/binarize_functions.py,
// the Python path that nncf/torch/binarization/reference.py checks):
//   grad_x         = g                  if 0 <= x <= s, else 0
//   grad_scale     = sum( g * (out - x) / s  if x <= s,  else g )
//   grad_threshold = sum over all dims but 1 of ( -g if 0 < x < s, else 0 )
// (NNCF's CUDA kernel uses strict inequalities for the first two; the sets
//  differ only at x == 0 and x == s.)
struct ActivationBinarizeGrad {
  float grad_x;
  float scale;
  float threshold;
};

FXC_HD ActivationBinarizeGrad activation_binarize_grad(float g, float x, float t, float s) {
  const float out = activation_binarize_value(x, t, s);
  const bool below_scale = x <= s;
  ActivationBinarizeGrad r;
  r.grad_x = (x >= 0.0f && below_scale) ? g : 0.0f;
  r.scale = below_scale ? g * ((out - x) / s) : g;
  r.threshold = (x > 0.0f && x < s) ? -g : 0.0f;
  return r;
}

}  // namespace fxc
