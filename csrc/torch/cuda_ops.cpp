// CUDA kernels of torch.ops.fxcompress.*: thin ATen wrappers around the plain
// CUDA launchers in csrc/cuda. Linked into the library when PyTorch has CUDA;
// on a CPU-only PyTorch this file is still compiled (into the
// fxcompress_cuda_check target) so that it cannot rot unnoticed.
//
// Unlike the CPU kernels, these do not check values (scale > 0, finite zero
// point): that would copy the parameters to the host and synchronize on every
// call. Shapes, dtypes and devices are checked as on the CPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ge.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sgn.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../cuda/cuda_kernels.h"
#include "binding.h"

namespace fxc::binding {
namespace {

using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor device_floats(const at::Tensor& t) { return t.detach().to(at::kFloat).contiguous(); }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A tensor shaped and typed like `like`, filled from the float32 tensor `values`.
at::Tensor like_from(const at::Tensor& values, const at::Tensor& like) {
  at::Tensor result = at::empty_like(like);
  result.copy_(values.view(like.sizes()));
  return result;
}

at::Tensor fake_quantize_cuda(const at::Tensor& x, const at::Tensor& scale,
                              const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                              std::optional<int64_t> axis) {
  const char* op = kFakeQuantize;
  const Layout layout = check_fake_quantize(op, x, scale, zero_point, quant_min, quant_max, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor s = device_floats(scale);
  const at::Tensor zp = device_floats(zero_point);
  const at::Tensor xc = x.contiguous();
  Output y(x);
  check_launch(op, cuda::fake_quantize_forward(
                       kernel_dtype(x.scalar_type()), xc.data_ptr(), y.buffer.data_ptr(), layout,
                       s.data_ptr<float>(), zp.data_ptr<float>(), static_cast<float>(quant_min),
                       static_cast<float>(quant_max), current_stream()));
  return y.finish();
}

TensorTriple fake_quantize_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                         const at::Tensor& scale, const at::Tensor& zero_point,
                                         int64_t quant_min, int64_t quant_max,
                                         std::optional<int64_t> axis) {
  const char* op = kFakeQuantizeBackward;
  const Layout layout = check_fake_quantize(op, x, scale, zero_point, quant_min, quant_max, axis);
  check_grad(op, grad, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor s = device_floats(scale);
  const at::Tensor zp = device_floats(zero_point);
  const at::Tensor gc = grad.contiguous();
  const at::Tensor xc = x.contiguous();
  Output grad_x(x);
  const auto options = x.options().dtype(at::kFloat);
  at::Tensor partial =
      at::empty({3 * layout.channels * cuda::reduction_blocks(layout)}, options.dtype(at::kDouble));
  at::Tensor grad_scale = at::zeros({layout.channels}, options);
  at::Tensor grad_zero_point = at::zeros({layout.channels}, options);
  check_launch(op, cuda::fake_quantize_backward(
                       kernel_dtype(x.scalar_type()), gc.data_ptr(), xc.data_ptr(),
                       grad_x.buffer.data_ptr(), layout, s.data_ptr<float>(), zp.data_ptr<float>(),
                       static_cast<float>(quant_min), static_cast<float>(quant_max),
                       partial.data_ptr<double>(), grad_scale.data_ptr<float>(),
                       grad_zero_point.data_ptr<float>(), current_stream()));
  return {grad_x.finish(), like_from(grad_scale, scale), like_from(grad_zero_point, zero_point)};
}

// fake_quantize_learnable on CUDA: the fake_quantize kernels at scale max(|scale|, min_scale), and
// the raw scale's gradient as autograd's clamp_min and abs backward formulas give it,
// where(|s| >= min_scale, g, 0) * sgn(s) (the CPU binding computes the same per channel).
at::Tensor fake_quantize_learnable_cuda(const at::Tensor& x, const at::Tensor& scale,
                                        const at::Tensor& zero_point, int64_t quant_min,
                                        int64_t quant_max, std::optional<int64_t> axis,
                                        double min_scale) {
  check_min_scale(kFakeQuantizeLearnable, min_scale);
  check_fake_quantize(kFakeQuantizeLearnable, x, scale, zero_point, quant_min, quant_max, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  return fake_quantize_cuda(x, at::clamp_min(at::abs(device_floats(scale)), min_scale), zero_point,
                            quant_min, quant_max, axis);
}

TensorTriple fake_quantize_learnable_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                   const at::Tensor& scale,
                                                   const at::Tensor& zero_point,
                                                   int64_t quant_min, int64_t quant_max,
                                                   std::optional<int64_t> axis, double min_scale) {
  check_min_scale(kFakeQuantizeLearnableBackward, min_scale);
  check_fake_quantize(kFakeQuantizeLearnableBackward, x, scale, zero_point, quant_min, quant_max,
                      axis);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor s = device_floats(scale);
  const at::Tensor magnitude = at::abs(s);
  auto [grad_x, grad_scale, grad_zero_point] = fake_quantize_backward_cuda(
      grad, x, at::clamp_min(magnitude, min_scale), zero_point, quant_min, quant_max, axis);
  const at::Tensor raw_grad = at::mul(at::where(at::ge(magnitude, min_scale),
                                                grad_scale.to(at::kFloat), at::zeros({}, s.options())),
                                      at::sgn(s));
  return {grad_x, like_from(raw_grad, scale), grad_zero_point};
}

at::Tensor weight_binarize_cuda(const char* op, const at::Tensor& w, bool per_channel) {
  const Layout layout = check_weight_binarize(op, w, per_channel);
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor wc = w.contiguous();
  Output out(w);
  at::Tensor partial = at::empty({layout.channels * cuda::reduction_blocks(layout)},
                                 w.options().dtype(at::kDouble));
  at::Tensor mean_abs = at::empty({layout.channels}, w.options().dtype(at::kFloat));
  check_launch(op, cuda::weight_binarize(kernel_dtype(w.scalar_type()), wc.data_ptr(),
                                         out.buffer.data_ptr(), layout, partial.data_ptr<double>(),
                                         mean_abs.data_ptr<float>(), current_stream()));
  return out.finish();
}

at::Tensor xnor_binarize_cuda(const at::Tensor& w) {
  return weight_binarize_cuda(kXnorBinarize, w, /*per_channel=*/true);
}

at::Tensor dorefa_binarize_cuda(const at::Tensor& w) {
  return weight_binarize_cuda(kDorefaBinarize, w, /*per_channel=*/false);
}

at::Tensor activation_binarize_cuda(const at::Tensor& x, const at::Tensor& scale,
                                    const at::Tensor& threshold) {
  const char* op = kActivationBinarize;
  const Layout layout = check_activation_binarize(op, x, scale, threshold);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor s = device_floats(scale);
  const at::Tensor t = device_floats(threshold);
  const at::Tensor xc = x.contiguous();
  Output out(x);
  check_launch(op, cuda::activation_binarize_forward(
                       kernel_dtype(x.scalar_type()), xc.data_ptr(), out.buffer.data_ptr(), layout,
                       s.data_ptr<float>(), t.data_ptr<float>(), t.numel(), current_stream()));
  return out.finish();
}

TensorTriple activation_binarize_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                               const at::Tensor& scale,
                                               const at::Tensor& threshold) {
  const char* op = kActivationBinarizeBackward;
  const Layout layout = check_activation_binarize(op, x, scale, threshold);
  check_grad(op, grad, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor s = device_floats(scale);
  const at::Tensor t = device_floats(threshold);
  const at::Tensor gc = grad.contiguous();
  const at::Tensor xc = x.contiguous();
  Output grad_x(x);
  const auto options = x.options().dtype(at::kFloat);
  at::Tensor partial = at::empty({2 * layout.channels * cuda::reduction_blocks(layout)},
                                 options.dtype(at::kDouble));
  at::Tensor grad_scale = at::zeros({1}, options);
  at::Tensor grad_threshold = at::zeros({t.numel()}, options);
  check_launch(op, cuda::activation_binarize_backward(
                       kernel_dtype(x.scalar_type()), gc.data_ptr(), xc.data_ptr(),
                       grad_x.buffer.data_ptr(), layout, s.data_ptr<float>(), t.data_ptr<float>(),
                       t.numel(), partial.data_ptr<double>(), grad_scale.data_ptr<float>(),
                       grad_threshold.data_ptr<float>(), current_stream()));
  return {grad_x.finish(), like_from(grad_scale, scale), like_from(grad_threshold, threshold)};
}

at::Tensor apply_mask_cuda(const at::Tensor& w, const at::Tensor& mask) {
  check_apply_mask(w, mask);
  const c10::cuda::CUDAGuard guard(w.device());
  Output out(w);
  if (mask.sizes() != w.sizes()) {
    out.buffer.copy_(at::mul(w.to(at::kFloat), mask.to(at::kFloat)));
    return out.finish();
  }
  const at::Tensor wc = w.contiguous();
  const at::Tensor mc =
      (mask.scalar_type() == at::kDouble ? mask.to(at::kFloat) : mask).contiguous();
  check_launch(kApplyMask, cuda::apply_mask(kernel_dtype(w.scalar_type()),
                                            kernel_dtype(mc.scalar_type()), wc.data_ptr(),
                                            mc.data_ptr(), out.buffer.data_ptr(), w.numel(),
                                            current_stream()));
  return out.finish();
}

}  // namespace
}  // namespace fxc::binding

TORCH_LIBRARY_IMPL(fxcompress, CUDA, m) {
  using namespace fxc::binding;
  m.impl("fake_quantize", &fake_quantize_cuda);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cuda);
  m.impl("fake_quantize_learnable", &fake_quantize_learnable_cuda);
  m.impl("fake_quantize_learnable_backward", &fake_quantize_learnable_backward_cuda);
  m.impl("xnor_binarize", &xnor_binarize_cuda);
  m.impl("dorefa_binarize", &dorefa_binarize_cuda);
  m.impl("activation_binarize", &activation_binarize_cuda);
  m.impl("activation_binarize_backward", &activation_binarize_backward_cuda);
  m.impl("apply_mask", &apply_mask_cuda);
}
