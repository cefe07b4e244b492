// CUDA kernels of the fxcompress ops (see cuda_kernels.h). Plain CUDA C++:
// no torch headers, so it compiles with nvcc on any machine, GPU or not.
// Built with --fmad=false (CMakeLists.txt) so that a * b + c is never fused
// and the forward results equal the CPU kernels and the reference bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "../kernels/math.h"
#include "cuda_kernels.h"

namespace fxc::cuda {
namespace {

constexpr int kThreads = 256;                  // multiple of the warp size
constexpr int64_t kElementsPerThread = 16;     // reduction work per thread
constexpr int64_t kMaxReductionBlocks = 1024;  // partial sums per channel, at most
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxElementwiseBlocks = 1 << 16;

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  __device__ static float load(const float* p) { return *p; }
  __device__ static void store(float* p, float v) { *p = v; }
};
template <>
struct Cvt<__half> {
  __device__ static float load(const __half* p) { return __half2float(*p); }
  __device__ static void store(__half* p, float v) { *p = __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  __device__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};
template <>
struct Cvt<bool> {
  __device__ static float load(const bool* p) { return *p ? 1.0f : 0.0f; }
};

template <typename T>
__device__ float ld(const T* p, int64_t i) {
  return Cvt<T>::load(p + i);
}
template <typename T>
__device__ void st(T* p, int64_t i, float v) {
  Cvt<T>::store(p + i, v);
}

__device__ int64_t global_thread() { return blockIdx.x * int64_t(blockDim.x) + threadIdx.x; }
__device__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

int elementwise_blocks(int64_t n) {
  return int(std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, kMaxElementwiseBlocks)));
}

dim3 reduction_grid(const Layout& l) {
  return dim3(unsigned(reduction_blocks(l)), unsigned(std::min(l.channels, kMaxGridY)));
}

// Sums K doubles over the block; the result is valid in thread 0. Ends with a
// barrier so that the shared buffer can be reused right away.
template <int K>
__device__ void block_sum(double (&v)[K]) {
  __shared__ double warp_sums[K][kThreads / 32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int k = 0; k < K; ++k) {
    for (int offset = 16; offset > 0; offset >>= 1) {
      v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
    }
  }
  if (lane == 0) {
    for (int k = 0; k < K; ++k) warp_sums[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
    for (int k = 0; k < K; ++k) {
      v[k] = lane < kThreads / 32 ? warp_sums[k][lane] : 0.0;
      for (int offset = 16; offset > 0; offset >>= 1) {
        v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
      }
    }
  }
  __syncthreads();
}

// Index of the j-th element of channel c.
__device__ int64_t channel_element(const Layout& l, int64_t c, int64_t j) {
  const int64_t o = j / l.inner;
  const int64_t i = j - o * l.inner;
  return (o * l.channels + c) * l.inner + i;
}

// ---------------------------------------------------------------------------
// fake_quantize

template <typename T>
__global__ void fq_forward_kernel(const T* x, T* y, Layout l, const float* scale,
                                  const float* zero_point, float qmin, float qmax) {
  const int64_t n = l.outer * l.channels * l.inner;
  for (int64_t i = global_thread(); i < n; i += grid_stride()) {
    const int64_t c = (i / l.inner) % l.channels;
    const float zp = prepare_zero_point(zero_point[c], qmin, qmax);
    st(y, i, fake_quantize_value(ld(x, i), scale[c], zp, qmin, qmax));
  }
}

template <typename T>
__global__ void fq_backward_kernel(const T* g, const T* x, T* gx, Layout l, const float* scale,
                                   const float* zero_point, float qmin, float qmax,
                                   double* partial, int64_t nb) {
  const int64_t per_channel = l.outer * l.inner;
  const int64_t channels = l.channels;
  for (int64_t c = blockIdx.y; c < channels; c += gridDim.y) {
    const float s = scale[c];
    const float zp = prepare_zero_point(zero_point[c], qmin, qmax);
    float inside = 0.0f, below = 0.0f, above = 0.0f;
    for (int64_t j = global_thread(); j < per_channel; j += grid_stride()) {
      const int64_t idx = channel_element(l, c, j);
      const FakeQuantizeGrad r = fake_quantize_grad(ld(g, idx), ld(x, idx), s, zp, qmin, qmax);
      st(gx, idx, r.grad_x);
      inside += r.inside;
      below += r.below;
      above += r.above;
    }
    double v[3] = {inside, below, above};
    block_sum(v);
    if (threadIdx.x == 0) {
      for (int k = 0; k < 3; ++k) partial[(k * channels + c) * nb + blockIdx.x] = v[k];
    }
  }
}

__global__ void fq_finish_kernel(const double* partial, int64_t channels, int64_t nb,
                                 const float* scale, const float* zero_point, float qmin,
                                 float qmax, float* grad_scale, float* grad_zero_point) {
  for (int64_t c = global_thread(); c < channels; c += grid_stride()) {
    double sums[3] = {0.0, 0.0, 0.0};
    for (int k = 0; k < 3; ++k) {
      for (int64_t b = 0; b < nb; ++b) sums[k] += partial[(k * channels + c) * nb + b];
    }
    double gs, gz;
    finish_fake_quantize_grads(sums[0], sums[1], sums[2], scale[c],
                               prepare_zero_point(zero_point[c], qmin, qmax), qmin, qmax, &gs,
                               &gz);
    grad_scale[c] = float(gs);
    grad_zero_point[c] = float(gz);
  }
}

// ---------------------------------------------------------------------------
// Weight binarization

template <typename T>
__global__ void abs_sum_kernel(const T* w, Layout l, double* partial, int64_t nb) {
  const int64_t per_channel = l.outer * l.inner;
  for (int64_t c = blockIdx.y; c < l.channels; c += gridDim.y) {
    double sum = 0.0;
    for (int64_t j = global_thread(); j < per_channel; j += grid_stride()) {
      sum += double(fabsf(ld(w, channel_element(l, c, j))));
    }
    double v[1] = {sum};
    block_sum(v);
    if (threadIdx.x == 0) partial[c * nb + blockIdx.x] = v[0];
  }
}

__global__ void mean_finish_kernel(const double* partial, int64_t channels, int64_t nb,
                                   double count, float* mean_abs) {
  for (int64_t c = global_thread(); c < channels; c += grid_stride()) {
    double sum = 0.0;
    for (int64_t b = 0; b < nb; ++b) sum += partial[c * nb + b];
    mean_abs[c] = float(sum / count);
  }
}

template <typename T>
__global__ void binarize_kernel(const T* w, T* out, Layout l, const float* mean_abs) {
  const int64_t n = l.outer * l.channels * l.inner;
  for (int64_t i = global_thread(); i < n; i += grid_stride()) {
    const int64_t c = (i / l.inner) % l.channels;
    st(out, i, binarize_value(ld(w, i), mean_abs[c]));
  }
}

// ---------------------------------------------------------------------------
// Activation binarization

__device__ float threshold_times_scale(const float* threshold, int64_t count, int64_t c, float s) {
  return threshold[count == 1 ? 0 : c] * s;
}

template <typename T>
__global__ void act_forward_kernel(const T* x, T* out, Layout l, const float* scale,
                                   const float* threshold, int64_t threshold_count) {
  const int64_t n = l.outer * l.channels * l.inner;
  const float s = scale[0];
  for (int64_t i = global_thread(); i < n; i += grid_stride()) {
    const int64_t c = (i / l.inner) % l.channels;
    const float t = threshold_times_scale(threshold, threshold_count, c, s);
    st(out, i, activation_binarize_value(ld(x, i), t, s));
  }
}

template <typename T>
__global__ void act_backward_kernel(const T* g, const T* x, T* gx, Layout l, const float* scale,
                                    const float* threshold, int64_t threshold_count,
                                    double* partial, int64_t nb) {
  const int64_t per_channel = l.outer * l.inner;
  const int64_t channels = l.channels;
  const float s = scale[0];
  for (int64_t c = blockIdx.y; c < channels; c += gridDim.y) {
    const float t = threshold_times_scale(threshold, threshold_count, c, s);
    float d_scale = 0.0f, d_thr = 0.0f;
    for (int64_t j = global_thread(); j < per_channel; j += grid_stride()) {
      const int64_t idx = channel_element(l, c, j);
      const ActivationBinarizeGrad r = activation_binarize_grad(ld(g, idx), ld(x, idx), t, s);
      st(gx, idx, r.grad_x);
      d_scale += r.scale;
      d_thr += r.threshold;
    }
    double v[2] = {d_scale, d_thr};
    block_sum(v);
    if (threadIdx.x == 0) {
      partial[c * nb + blockIdx.x] = v[0];
      partial[(channels + c) * nb + blockIdx.x] = v[1];
    }
  }
}

// Per channel: fold the nb partials into slot 0 (each thread owns its channel's slots).
__global__ void act_fold_kernel(double* partial, int64_t channels, int64_t nb) {
  for (int64_t c = global_thread(); c < channels; c += grid_stride()) {
    for (int k = 0; k < 2; ++k) {
      double sum = 0.0;
      for (int64_t b = 0; b < nb; ++b) sum += partial[(k * channels + c) * nb + b];
      partial[(k * channels + c) * nb] = sum;
    }
  }
}

// One thread: the scale gradient sums over channels, in channel order.
__global__ void act_finish_kernel(const double* partial, int64_t channels, int64_t nb,
                                  int64_t threshold_count, float* grad_scale,
                                  float* grad_threshold) {
  double scale_sum = 0.0, thr_sum = 0.0;
  for (int64_t c = 0; c < channels; ++c) {
    scale_sum += partial[c * nb];
    const double thr = partial[(channels + c) * nb];
    thr_sum += thr;
    if (threshold_count != 1) grad_threshold[c] = float(thr);
  }
  grad_scale[0] = float(scale_sum);
  if (threshold_count == 1) grad_threshold[0] = float(thr_sum);
}

// ---------------------------------------------------------------------------
// Masks

template <typename W, typename M>
__global__ void mask_kernel(const W* w, const M* m, W* out, int64_t n) {
  for (int64_t i = global_thread(); i < n; i += grid_stride()) st(out, i, ld(w, i) * ld(m, i));
}

}  // namespace

#define FXC_CUDA_DISPATCH(dtype, T, ...)  \
  switch (dtype) {                        \
    case DType::kFloat32: {               \
      using T = float;                    \
      __VA_ARGS__;                        \
    } break;                              \
    case DType::kFloat16: {               \
      using T = __half;                   \
      __VA_ARGS__;                        \
    } break;                              \
    case DType::kBFloat16: {              \
      using T = __nv_bfloat16;            \
      __VA_ARGS__;                        \
    } break;                              \
    default:                              \
      return cudaErrorInvalidValue;       \
  }

int64_t reduction_blocks(const Layout& l) {
  const int64_t per_channel = l.outer * l.inner;
  const int64_t blocks = (per_channel + kThreads * kElementsPerThread - 1) /
                         (kThreads * kElementsPerThread);
  return std::max<int64_t>(1, std::min(blocks, kMaxReductionBlocks));
}

cudaError_t fake_quantize_forward(DType dtype, const void* x, void* y, const Layout& l,
                                  const float* scale, const float* zero_point, float qmin,
                                  float qmax, cudaStream_t stream) {
  if (l.numel() == 0) return cudaSuccess;
  FXC_CUDA_DISPATCH(dtype, T,
                    fq_forward_kernel<T><<<elementwise_blocks(l.numel()), kThreads, 0, stream>>>(
                        static_cast<const T*>(x), static_cast<T*>(y), l, scale, zero_point, qmin,
                        qmax))
  return cudaGetLastError();
}

cudaError_t fake_quantize_backward(DType dtype, const void* g, const void* x, void* gx,
                                   const Layout& l, const float* scale, const float* zero_point,
                                   float qmin, float qmax, double* partial, float* grad_scale,
                                   float* grad_zero_point, cudaStream_t stream) {
  if (l.channels == 0) return cudaSuccess;
  const int64_t nb = reduction_blocks(l);
  FXC_CUDA_DISPATCH(dtype, T,
                    fq_backward_kernel<T><<<reduction_grid(l), kThreads, 0, stream>>>(
                        static_cast<const T*>(g), static_cast<const T*>(x), static_cast<T*>(gx),
                        l, scale, zero_point, qmin, qmax, partial, nb))
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  fq_finish_kernel<<<elementwise_blocks(l.channels), kThreads, 0, stream>>>(
      partial, l.channels, nb, scale, zero_point, qmin, qmax, grad_scale, grad_zero_point);
  return cudaGetLastError();
}

cudaError_t weight_binarize(DType dtype, const void* w, void* out, const Layout& l,
                            double* partial, float* mean_abs, cudaStream_t stream) {
  if (l.numel() == 0) return cudaSuccess;
  const int64_t nb = reduction_blocks(l);
  FXC_CUDA_DISPATCH(dtype, T,
                    abs_sum_kernel<T><<<reduction_grid(l), kThreads, 0, stream>>>(
                        static_cast<const T*>(w), l, partial, nb))
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  mean_finish_kernel<<<elementwise_blocks(l.channels), kThreads, 0, stream>>>(
      partial, l.channels, nb, double(l.outer * l.inner), mean_abs);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  FXC_CUDA_DISPATCH(dtype, T,
                    binarize_kernel<T><<<elementwise_blocks(l.numel()), kThreads, 0, stream>>>(
                        static_cast<const T*>(w), static_cast<T*>(out), l, mean_abs))
  return cudaGetLastError();
}

cudaError_t activation_binarize_forward(DType dtype, const void* x, void* out, const Layout& l,
                                        const float* scale, const float* threshold,
                                        int64_t threshold_count, cudaStream_t stream) {
  if (l.numel() == 0) return cudaSuccess;
  FXC_CUDA_DISPATCH(dtype, T,
                    act_forward_kernel<T><<<elementwise_blocks(l.numel()), kThreads, 0, stream>>>(
                        static_cast<const T*>(x), static_cast<T*>(out), l, scale, threshold,
                        threshold_count))
  return cudaGetLastError();
}

cudaError_t activation_binarize_backward(DType dtype, const void* g, const void* x, void* gx,
                                         const Layout& l, const float* scale,
                                         const float* threshold, int64_t threshold_count,
                                         double* partial, float* grad_scale,
                                         float* grad_threshold, cudaStream_t stream) {
  if (l.channels == 0) return cudaSuccess;
  const int64_t nb = reduction_blocks(l);
  FXC_CUDA_DISPATCH(dtype, T,
                    act_backward_kernel<T><<<reduction_grid(l), kThreads, 0, stream>>>(
                        static_cast<const T*>(g), static_cast<const T*>(x), static_cast<T*>(gx),
                        l, scale, threshold, threshold_count, partial, nb))
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  act_fold_kernel<<<elementwise_blocks(l.channels), kThreads, 0, stream>>>(partial, l.channels,
                                                                           nb);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  act_finish_kernel<<<1, 1, 0, stream>>>(partial, l.channels, nb, threshold_count, grad_scale,
                                         grad_threshold);
  return cudaGetLastError();
}

template <typename W>
static cudaError_t apply_mask_for(DType mask_dtype, const W* w, const void* m, W* out, int64_t n,
                                  cudaStream_t stream) {
  const int blocks = elementwise_blocks(n);
  switch (mask_dtype) {
    case DType::kFloat32:
      mask_kernel<<<blocks, kThreads, 0, stream>>>(w, static_cast<const float*>(m), out, n);
      break;
    case DType::kFloat16:
      mask_kernel<<<blocks, kThreads, 0, stream>>>(w, static_cast<const __half*>(m), out, n);
      break;
    case DType::kBFloat16:
      mask_kernel<<<blocks, kThreads, 0, stream>>>(w, static_cast<const __nv_bfloat16*>(m), out,
                                                    n);
      break;
    case DType::kBool:
      mask_kernel<<<blocks, kThreads, 0, stream>>>(w, static_cast<const bool*>(m), out, n);
      break;
  }
  return cudaGetLastError();
}

cudaError_t apply_mask(DType w_dtype, DType mask_dtype, const void* w, const void* m, void* out,
                       int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  FXC_CUDA_DISPATCH(w_dtype, T,
                    return apply_mask_for<T>(mask_dtype, static_cast<const T*>(w), m,
                                             static_cast<T*>(out), n, stream))
  return cudaSuccess;
}

#undef FXC_CUDA_DISPATCH

}  // namespace fxc::cuda
