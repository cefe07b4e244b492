// CUDA kernels of the fxcompress ops: plain CUDA C++ launchers (no torch
// headers), called by the thin ATen wrappers in csrc/torch/cuda_ops.cpp.
//
// Tensors are contiguous and seen as [outer, channels, inner] (layout.h).
// Per-element math comes from csrc/kernels/math.h, shared with the CPU core.
// All launchers are asynchronous on `stream` and return the launch status.
//
// Reductions are deterministic: each (channel, block) pair writes one partial
// sum (double) and a second kernel folds them per channel in a fixed order.
// Blocks of a reduction walk one channel's elements, so access is coalesced
// along `inner`; per-channel layouts with inner == 1 (the last axis) read with
// a stride of `channels` -- correct, slower, and rare (weights use axis 0).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../kernels/dtypes.h"
#include "../kernels/layout.h"

namespace fxc::cuda {

// Number of partial sums per channel that the reduction launchers write; the
// caller allocates `partial` buffers of channels * reduction_blocks(layout)
// doubles (several of them where a launcher says so).
int64_t reduction_blocks(const Layout& layout);

// scale and zero_point: float32 device arrays with one value per channel
// (zero points raw: the kernels round and clamp them).
cudaError_t fake_quantize_forward(DType dtype, const void* x, void* y, const Layout& layout,
                                  const float* scale, const float* zero_point, float quant_min,
                                  float quant_max, cudaStream_t stream);

// Writes grad_x and the float32 grad_scale / grad_zero_point (one per channel);
// `partial` holds 3 * channels * reduction_blocks(layout) doubles of scratch.
cudaError_t fake_quantize_backward(DType dtype, const void* grad, const void* x, void* grad_x,
                                   const Layout& layout, const float* scale,
                                   const float* zero_point, float quant_min, float quant_max,
                                   double* partial, float* grad_scale, float* grad_zero_point,
                                   cudaStream_t stream);

// out = sign(w) * mean|w| per channel (layout.channels = 1 for the whole
// tensor); `partial` holds channels * reduction_blocks(layout) doubles, and
// `mean_abs` channels floats of scratch.
cudaError_t weight_binarize(DType dtype, const void* w, void* out, const Layout& layout,
                            double* partial, float* mean_abs, cudaStream_t stream);

// threshold: one float32 per channel (or one for all, threshold_count == 1);
// scale: one float32. Both device arrays.
cudaError_t activation_binarize_forward(DType dtype, const void* x, void* out,
                                        const Layout& layout, const float* scale,
                                        const float* threshold, int64_t threshold_count,
                                        cudaStream_t stream);

// Writes grad_x, grad_scale (1 float) and grad_threshold (threshold_count
// floats); `partial` holds 2 * channels * reduction_blocks(layout) doubles.
cudaError_t activation_binarize_backward(DType dtype, const void* grad, const void* x,
                                         void* grad_x, const Layout& layout, const float* scale,
                                         const float* threshold, int64_t threshold_count,
                                         double* partial, float* grad_scale,
                                         float* grad_threshold, cudaStream_t stream);

// out = w * mask elementwise (same shape), in float32.
cudaError_t apply_mask(DType w_dtype, DType mask_dtype, const void* w, const void* mask,
                       void* out, int64_t numel, cudaStream_t stream);

}  // namespace fxc::cuda
