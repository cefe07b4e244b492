// Shared by the CPU and CUDA bindings: argument checks and output buffers.
// The messages match fxcompress/ops/_checks.py word for word (up to number
// formatting), so both implementations reject bad input with the same
// ValueError (TORCH_CHECK_VALUE raises ValueError in Python).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <string>

#include "../kernels/dtypes.h"
#include "../kernels/layout.h"

namespace fxc::binding {

constexpr const char* kFakeQuantize = "fxcompress.fake_quantize";
constexpr const char* kFakeQuantizeBackward = "fxcompress.fake_quantize_backward";
constexpr const char* kFakeQuantizeLearnable = "fxcompress.fake_quantize_learnable";
constexpr const char* kFakeQuantizeLearnableBackward = "fxcompress.fake_quantize_learnable_backward";
constexpr const char* kXnorBinarize = "fxcompress.xnor_binarize";
constexpr const char* kDorefaBinarize = "fxcompress.dorefa_binarize";
constexpr const char* kActivationBinarize = "fxcompress.activation_binarize";
constexpr const char* kActivationBinarizeBackward = "fxcompress.activation_binarize_backward";
constexpr const char* kApplyMask = "fxcompress.apply_mask";

// Python's spelling of a dtype, so messages read the same from both backends.
inline std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float:
      return "torch.float32";
    case c10::ScalarType::Half:
      return "torch.float16";
    case c10::ScalarType::BFloat16:
      return "torch.bfloat16";
    case c10::ScalarType::Double:
      return "torch.float64";
    case c10::ScalarType::Bool:
      return "torch.bool";
    case c10::ScalarType::Int:
      return "torch.int32";
    case c10::ScalarType::Long:
      return "torch.int64";
    default:
      return std::string("torch.") + c10::toString(t);
  }
}

inline DType kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Half:
      return DType::kFloat16;
    case c10::ScalarType::BFloat16:
      return DType::kBFloat16;
    case c10::ScalarType::Bool:
      return DType::kBool;
    default:
      return DType::kFloat32;
  }
}

inline bool is_kernel_float(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::Half ||
         t == c10::ScalarType::BFloat16;
}

inline void check_input_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(is_kernel_float(t.scalar_type()), op, ": ", name,
                    " must be float32, float16 or bfloat16, got ", dtype_name(t.scalar_type()));
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                    " must be a floating-point tensor, got ", dtype_name(t.scalar_type()));
}

inline void check_same_device(const char* op, const at::Tensor& a, const at::Tensor& b,
                              const at::Tensor& c, const char* names) {
  TORCH_CHECK_VALUE(a.device() == b.device() && a.device() == c.device(), op, ": ", names,
                    " must be on the same device, got ", a.device(), ", ", b.device(), " and ",
                    c.device());
}

inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), op,
                    ": grad must have the shape and dtype of x, got ", grad.sizes(), " ",
                    dtype_name(grad.scalar_type()), " for x ", x.sizes(), " ",
                    dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(grad.device() == x.device(), op, ": grad must be on the device of x, got ",
                    grad.device(), " and ", x.device());
}

// Validates fake_quantize's arguments (everything but values) and returns the
// [outer, channels, inner] view of x.
inline Layout check_fake_quantize(const char* op, const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& zero_point, int64_t quant_min,
                                  int64_t quant_max, std::optional<int64_t> axis) {
  check_input_dtype(op, "x", x);
  check_floating(op, "scale", scale);
  check_floating(op, "zero_point", zero_point);
  check_same_device(op, x, scale, zero_point, "x, scale and zero_point");
  TORCH_CHECK_VALUE(quant_min < quant_max, op, ": quant_min (", quant_min,
                    ") must be less than quant_max (", quant_max, ")");
  Layout layout;
  if (!axis.has_value()) {
    TORCH_CHECK_VALUE(scale.numel() == 1, op,
                      ": per-tensor quantization (axis=None) needs a scale with 1 element, got ",
                      scale.numel());
    TORCH_CHECK_VALUE(
        zero_point.numel() == 1, op,
        ": per-tensor quantization (axis=None) needs a zero_point with 1 element, got ",
        zero_point.numel());
    layout.inner = x.numel();
    return layout;
  }
  const int64_t dim = x.dim();
  const int64_t a = *axis;
  TORCH_CHECK_VALUE(-dim <= a && a < dim, op, ": axis ", a, " is out of range for x with ", dim,
                    " dimensions (expected ", -dim, " <= axis < ", dim, ")");
  const int64_t ax = a < 0 ? a + dim : a;
  const int64_t channels = x.size(ax);
  TORCH_CHECK_VALUE(scale.numel() == channels, op, ": per-channel quantization along axis ", a,
                    " needs ", channels, " scale values (x.shape[", ax, "]), got ", scale.numel());
  TORCH_CHECK_VALUE(zero_point.numel() == channels, op, ": per-channel quantization along axis ",
                    a, " needs ", channels, " zero_point values (x.shape[", ax, "]), got ",
                    zero_point.numel());
  layout.channels = channels;
  for (int64_t d = 0; d < ax; ++d) layout.outer *= x.size(d);
  for (int64_t d = ax + 1; d < dim; ++d) layout.inner *= x.size(d);
  return layout;
}

// fake_quantize_learnable's floor of |scale|.
inline void check_min_scale(const char* op, double min_scale) {
  TORCH_CHECK_VALUE(min_scale > 0.0 && std::isfinite(min_scale), op,
                    ": min_scale must be a positive finite number, got ", min_scale);
}

inline Layout check_weight_binarize(const char* op, const at::Tensor& w, bool per_channel) {
  check_input_dtype(op, "w", w);
  Layout layout;
  if (!per_channel) {
    layout.inner = w.numel();
    return layout;
  }
  TORCH_CHECK_VALUE(w.dim() >= 1, op,
                    ": w must have at least 1 dimension (output channels along dim 0), got a "
                    "0-dimensional tensor");
  layout.channels = w.size(0);
  for (int64_t d = 1; d < w.dim(); ++d) layout.inner *= w.size(d);
  return layout;
}

inline Layout check_activation_binarize(const char* op, const at::Tensor& x,
                                        const at::Tensor& scale, const at::Tensor& threshold) {
  check_input_dtype(op, "x", x);
  check_floating(op, "scale", scale);
  check_floating(op, "threshold", threshold);
  check_same_device(op, x, scale, threshold, "x, scale and threshold");
  TORCH_CHECK_VALUE(x.dim() >= 2, op,
                    ": x must have at least 2 dimensions (channels along dim 1), got ", x.dim());
  TORCH_CHECK_VALUE(scale.numel() == 1, op, ": scale must have 1 element, got ", scale.numel());
  const int64_t channels = x.size(1);
  TORCH_CHECK_VALUE(threshold.numel() == 1 || threshold.numel() == channels, op,
                    ": threshold must have 1 or x.shape[1] = ", channels, " elements, got ",
                    threshold.numel());
  Layout layout;
  layout.outer = x.size(0);
  layout.channels = channels;
  for (int64_t d = 2; d < x.dim(); ++d) layout.inner *= x.size(d);
  return layout;
}

inline void check_apply_mask(const at::Tensor& w, const at::Tensor& mask) {
  const char* op = kApplyMask;
  check_input_dtype(op, "w", w);
  TORCH_CHECK_VALUE(at::isFloatingType(mask.scalar_type()) || mask.scalar_type() == at::kBool, op,
                    ": mask must be a floating-point or bool tensor, got ",
                    dtype_name(mask.scalar_type()));
  TORCH_CHECK_VALUE(w.device() == mask.device(), op, ": w and mask must be on the same device, got ",
                    w.device(), " and ", mask.device());
  bool broadcasts = mask.dim() <= w.dim();
  for (int64_t d = 1; broadcasts && d <= mask.dim(); ++d) {
    const int64_t m = mask.size(-d);
    broadcasts = m == 1 || m == w.size(-d);
  }
  TORCH_CHECK_VALUE(broadcasts, op, ": mask of shape ", mask.sizes(),
                    " does not broadcast to w of shape ", w.sizes());
}

// An output laid out like `like` (at::empty_like) and a contiguous buffer the
// kernels write into: the output itself when it is contiguous, otherwise a
// temporary copied over by finish_output.
struct Output {
  at::Tensor out;
  at::Tensor buffer;
  explicit Output(const at::Tensor& like)
      : out(at::empty_like(like)),
        buffer(out.is_contiguous() ? out : at::empty(like.sizes(), like.options())) {}
  at::Tensor finish() {
    if (!buffer.is_same(out)) out.copy_(buffer);
    return out;
  }
};

}  // namespace fxc::binding
