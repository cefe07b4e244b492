// Autograd kernels of fxcompress::fake_quantize and fxcompress::fake_quantize_learnable, in C++
// for every device.
//
// Quantization-aware training calls fake_quantize once per quantizer forward
// and its backward once per backward: a Python autograd formula
// (torch.library.register_autograd) cost several times the kernels themselves
// on the small activations of a QAT step (benchmarks/RESULTS.md, "QAT step").
// This one saves (x, scale, zero_point) and calls fxcompress::fake_quantize_backward,
// as the Python formula in fxcompress/ops/_library.py does (that one remains for
// the pure-PyTorch fallback; the other ops keep their Python formulas). No double
// backward.
//
// fake_quantize_learnable is FakeQuantizer's forward: the scale max(|scale|, min_scale) folded
// into the op, so a learnable scale costs no abs / clamp_min ops and autograd nodes of its own
// (they were a fifth of the digits CNN's eager QAT step; benchmarks/RESULTS.md, "QAT step").
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fxc::binding {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor fake_quantize_call(const at::Tensor& x, const at::Tensor& scale,
                              const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                              std::optional<int64_t> axis) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fxcompress::fake_quantize", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         int64_t, int64_t, std::optional<int64_t>)>();
  return op.call(x, scale, zero_point, quant_min, quant_max, axis);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_backward_call(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    std::optional<int64_t> axis) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fxcompress::fake_quantize_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, int64_t, int64_t, std::optional<int64_t>)>();
  return op.call(grad, x, scale, zero_point, quant_min, quant_max, axis);
}

at::Tensor fake_quantize_learnable_call(const at::Tensor& x, const at::Tensor& scale,
                                        const at::Tensor& zero_point, int64_t quant_min,
                                        int64_t quant_max, std::optional<int64_t> axis,
                                        double min_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fxcompress::fake_quantize_learnable", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         int64_t, int64_t, std::optional<int64_t>, double)>();
  return op.call(x, scale, zero_point, quant_min, quant_max, axis, min_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_learnable_backward_call(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    std::optional<int64_t> axis, double min_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fxcompress::fake_quantize_learnable_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, int64_t, int64_t, std::optional<int64_t>, double)>();
  return op.call(grad, x, scale, zero_point, quant_min, quant_max, axis, min_scale);
}

void save_params(AutogradContext* ctx, int64_t quant_min, int64_t quant_max,
                 std::optional<int64_t> axis) {
  ctx->saved_data["quant_min"] = quant_min;
  ctx->saved_data["quant_max"] = quant_max;
  ctx->saved_data["axis"] = axis.has_value() ? c10::IValue(*axis) : c10::IValue();
}

std::optional<int64_t> saved_axis(AutogradContext* ctx) {
  const c10::IValue& axis_value = ctx->saved_data["axis"];
  return axis_value.isNone() ? std::nullopt : std::optional<int64_t>(axis_value.toInt());
}

// The gradients autograd asked for; None for the rest and for the num_other_args int / float
// arguments after (x, scale, zero_point).
variable_list needed_grads(AutogradContext* ctx, const at::Tensor& grad_x,
                           const at::Tensor& grad_scale, const at::Tensor& grad_zero_point,
                           size_t num_other_args) {
  const at::Tensor none;
  variable_list out = {ctx->needs_input_grad(0) ? grad_x : none,
                       ctx->needs_input_grad(1) ? grad_scale : none,
                       ctx->needs_input_grad(2) ? grad_zero_point : none};
  out.resize(3 + num_other_args);
  return out;
}

class FakeQuantizeFunction : public torch::autograd::Function<FakeQuantizeFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& scale, const at::Tensor& zero_point,
                            int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis) {
    ctx->save_for_backward({x, scale, zero_point});
    save_params(ctx, quant_min, quant_max, axis);
    at::AutoDispatchBelowADInplaceOrView guard;
    return fake_quantize_call(x, scale, zero_point, quant_min, quant_max, axis);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_x, grad_scale, grad_zero_point] = fake_quantize_backward_call(
        grads[0], saved[0], saved[1], saved[2], ctx->saved_data["quant_min"].toInt(),
        ctx->saved_data["quant_max"].toInt(), saved_axis(ctx));
    return needed_grads(ctx, grad_x, grad_scale, grad_zero_point, 3);
  }
};

class FakeQuantizeLearnableFunction
    : public torch::autograd::Function<FakeQuantizeLearnableFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& scale, const at::Tensor& zero_point,
                            int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
                            double min_scale) {
    ctx->save_for_backward({x, scale, zero_point});
    save_params(ctx, quant_min, quant_max, axis);
    ctx->saved_data["min_scale"] = min_scale;
    at::AutoDispatchBelowADInplaceOrView guard;
    return fake_quantize_learnable_call(x, scale, zero_point, quant_min, quant_max, axis,
                                        min_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_x, grad_scale, grad_zero_point] = fake_quantize_learnable_backward_call(
        grads[0], saved[0], saved[1], saved[2], ctx->saved_data["quant_min"].toInt(),
        ctx->saved_data["quant_max"].toInt(), saved_axis(ctx),
        ctx->saved_data["min_scale"].toDouble());
    return needed_grads(ctx, grad_x, grad_scale, grad_zero_point, 4);
  }
};

at::Tensor fake_quantize_autograd(const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& zero_point, int64_t quant_min,
                                  int64_t quant_max, std::optional<int64_t> axis) {
  return FakeQuantizeFunction::apply(x, scale, zero_point, quant_min, quant_max, axis);
}

at::Tensor fake_quantize_learnable_autograd(const at::Tensor& x, const at::Tensor& scale,
                                            const at::Tensor& zero_point, int64_t quant_min,
                                            int64_t quant_max, std::optional<int64_t> axis,
                                            double min_scale) {
  return FakeQuantizeLearnableFunction::apply(x, scale, zero_point, quant_min, quant_max, axis,
                                              min_scale);
}

}  // namespace
}  // namespace fxc::binding

TORCH_LIBRARY_IMPL(fxcompress, Autograd, m) {
  m.impl("fake_quantize", &fxc::binding::fake_quantize_autograd);
  m.impl("fake_quantize_learnable", &fxc::binding::fake_quantize_learnable_autograd);
}
