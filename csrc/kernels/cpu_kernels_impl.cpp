// CPU kernels, compiled once per instruction set with -DFXC_ISA=<namespace>
// (see CMakeLists.txt). The loops are written for `#pragma omp simd`
// (-fopenmp-simd: vectorization only, no OpenMP runtime here) and the
// per-element math lives in math.h, shared with the CUDA kernels.
//
// Sums: runs of one channel accumulate in float32 over sub-blocks of
// kSubBlock elements (short enough to keep float error near 1e-7 relative) and
// in double across sub-blocks and tiles. The mean |w| of the binarization ops
// is summed in double throughout, so that rounding it to float32 gives the
// same value as the reference's double sum.
#include <algorithm>

#include "cpu_kernels.h"
#include "math.h"

#ifndef FXC_ISA
#error "compile cpu_kernels_impl.cpp with -DFXC_ISA=<instruction set namespace>"
#endif
#define FXC_STRINGIFY2(x) #x
#define FXC_STRINGIFY(x) FXC_STRINGIFY2(x)

namespace fxc::cpu::FXC_ISA {
namespace {

constexpr int64_t kSubBlock = 1024;

// ---------------------------------------------------------------------------
// fake_quantize

template <typename T>
void fq_forward_run(const T* x, T* y, int64_t n, float s, float zp, float qmin, float qmax) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    store(y, i, fake_quantize_value(load(x, i), s, zp, qmin, qmax));
  }
}

// Channel varies along the run (inner == 1): element j uses s[j], zp[j].
template <typename T>
void fq_forward_row(const T* x, T* y, int64_t n, const float* s, const float* zp, float qmin,
                    float qmax) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    store(y, j, fake_quantize_value(load(x, j), s[j], zp[j], qmin, qmax));
  }
}

template <typename T>
void fq_forward_tile(const void* xv, void* yv, const Layout& l, const Tile& t, const float* s,
                     const float* zp, float qmin, float qmax) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  if (l.inner == 1) {
    for (int64_t o = t.o0; o < t.o1; ++o) {
      const int64_t off = o * l.channels + t.c0;
      fq_forward_row(x + off, y + off, t.c1 - t.c0, s + t.c0, zp + t.c0, qmin, qmax);
    }
    return;
  }
  for (int64_t o = t.o0; o < t.o1; ++o) {
    for (int64_t c = t.c0; c < t.c1; ++c) {
      const int64_t off = (o * l.channels + c) * l.inner + t.i0;
      fq_forward_run(x + off, y + off, t.i1 - t.i0, s[c], zp[c], qmin, qmax);
    }
  }
}

template <typename T>
void fq_backward_run(const T* g, const T* x, T* gx, int64_t n, float s, float zp, float qmin,
                     float qmax, double* inside, double* below, double* above) {
  double d_in = 0.0, d_below = 0.0, d_above = 0.0;
  for (int64_t b = 0; b < n; b += kSubBlock) {
    const int64_t e = std::min(n, b + kSubBlock);
    float f_in = 0.0f, f_below = 0.0f, f_above = 0.0f;
#pragma omp simd reduction(+ : f_in, f_below, f_above)
    for (int64_t i = b; i < e; ++i) {
      const FakeQuantizeGrad r = fake_quantize_grad(load(g, i), load(x, i), s, zp, qmin, qmax);
      store(gx, i, r.grad_x);
      f_in += r.inside;
      f_below += r.below;
      f_above += r.above;
    }
    d_in += f_in;
    d_below += f_below;
    d_above += f_above;
  }
  *inside += d_in;
  *below += d_below;
  *above += d_above;
}

template <typename T>
void fq_backward_row(const T* g, const T* x, T* gx, int64_t n, const float* s, const float* zp,
                     float qmin, float qmax, double* inside, double* below, double* above) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const FakeQuantizeGrad r = fake_quantize_grad(load(g, j), load(x, j), s[j], zp[j], qmin, qmax);
    store(gx, j, r.grad_x);
    inside[j] += r.inside;
    below[j] += r.below;
    above[j] += r.above;
  }
}

template <typename T>
void fq_backward_tile(const void* gv, const void* xv, void* gxv, const Layout& l, const Tile& t,
                      const float* s, const float* zp, float qmin, float qmax, double* inside,
                      double* below, double* above) {
  const T* g = static_cast<const T*>(gv);
  const T* x = static_cast<const T*>(xv);
  T* gx = static_cast<T*>(gxv);
  const int64_t part = t.row * l.channels;
  if (l.inner == 1) {
    const int64_t n = t.c1 - t.c0;
    for (int64_t o = t.o0; o < t.o1; ++o) {
      const int64_t off = o * l.channels + t.c0;
      fq_backward_row(g + off, x + off, gx + off, n, s + t.c0, zp + t.c0, qmin, qmax,
                      inside + part + t.c0, below + part + t.c0, above + part + t.c0);
    }
    return;
  }
  for (int64_t o = t.o0; o < t.o1; ++o) {
    for (int64_t c = t.c0; c < t.c1; ++c) {
      const int64_t off = (o * l.channels + c) * l.inner + t.i0;
      fq_backward_run(g + off, x + off, gx + off, t.i1 - t.i0, s[c], zp[c], qmin, qmax,
                      inside + part + c, below + part + c, above + part + c);
    }
  }
}

// ---------------------------------------------------------------------------
// Weight binarization

template <typename T>
void abs_sum_tile(const void* wv, const Layout& l, const Tile& t, double* partial) {
  const T* w = static_cast<const T*>(wv);
  double* acc = partial + t.row * l.channels;
  if (l.inner == 1) {
    const int64_t n = t.c1 - t.c0;
    for (int64_t o = t.o0; o < t.o1; ++o) {
      const T* p = w + o * l.channels + t.c0;
      double* a = acc + t.c0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) a[j] += double(__builtin_fabsf(load(p, j)));
    }
    return;
  }
  for (int64_t o = t.o0; o < t.o1; ++o) {
    for (int64_t c = t.c0; c < t.c1; ++c) {
      const T* p = w + (o * l.channels + c) * l.inner + t.i0;
      const int64_t n = t.i1 - t.i0;
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < n; ++i) sum += double(__builtin_fabsf(load(p, i)));
      acc[c] += sum;
    }
  }
}

template <typename T>
void binarize_tile(const void* wv, void* outv, const Layout& l, const Tile& t, const float* m) {
  const T* w = static_cast<const T*>(wv);
  T* out = static_cast<T*>(outv);
  if (l.inner == 1) {
    const int64_t n = t.c1 - t.c0;
    for (int64_t o = t.o0; o < t.o1; ++o) {
      const int64_t off = o * l.channels + t.c0;
      const float* mc = m + t.c0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) store(out + off, j, binarize_value(load(w + off, j), mc[j]));
    }
    return;
  }
  for (int64_t o = t.o0; o < t.o1; ++o) {
    for (int64_t c = t.c0; c < t.c1; ++c) {
      const int64_t off = (o * l.channels + c) * l.inner + t.i0;
      const int64_t n = t.i1 - t.i0;
      const float mc = m[c];
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(out + off, i, binarize_value(load(w + off, i), mc));
    }
  }
}

// ---------------------------------------------------------------------------
// Activation binarization

template <typename T>
void act_forward_tile(const void* xv, void* outv, const Layout& l, const Tile& t,
                      const float* thr, float s) {
  const T* x = static_cast<const T*>(xv);
  T* out = static_cast<T*>(outv);
  if (l.inner == 1) {
    const int64_t n = t.c1 - t.c0;
    for (int64_t o = t.o0; o < t.o1; ++o) {
      const int64_t off = o * l.channels + t.c0;
      const float* tc = thr + t.c0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        store(out + off, j, activation_binarize_value(load(x + off, j), tc[j], s));
      }
    }
    return;
  }
  for (int64_t o = t.o0; o < t.o1; ++o) {
    for (int64_t c = t.c0; c < t.c1; ++c) {
      const int64_t off = (o * l.channels + c) * l.inner + t.i0;
      const int64_t n = t.i1 - t.i0;
      const float tc = thr[c];
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        store(out + off, i, activation_binarize_value(load(x + off, i), tc, s));
      }
    }
  }
}

template <typename T>
void act_backward_tile(const void* gv, const void* xv, void* gxv, const Layout& l,
                       const Tile& t, const float* thr, float s, double* scale_partial,
                       double* thr_partial) {
  const T* g = static_cast<const T*>(gv);
  const T* x = static_cast<const T*>(xv);
  T* gx = static_cast<T*>(gxv);
  const int64_t part = t.row * l.channels;
  if (l.inner == 1) {
    const int64_t n = t.c1 - t.c0;
    double* ds = scale_partial + part + t.c0;
    double* dt = thr_partial + part + t.c0;
    const float* tc = thr + t.c0;
    for (int64_t o = t.o0; o < t.o1; ++o) {
      const int64_t off = o * l.channels + t.c0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const ActivationBinarizeGrad r =
            activation_binarize_grad(load(g + off, j), load(x + off, j), tc[j], s);
        store(gx + off, j, r.grad_x);
        ds[j] += r.scale;
        dt[j] += r.threshold;
      }
    }
    return;
  }
  for (int64_t o = t.o0; o < t.o1; ++o) {
    for (int64_t c = t.c0; c < t.c1; ++c) {
      const int64_t off = (o * l.channels + c) * l.inner + t.i0;
      const int64_t n = t.i1 - t.i0;
      const float tc = thr[c];
      double d_scale = 0.0, d_thr = 0.0;
      for (int64_t b = 0; b < n; b += kSubBlock) {
        const int64_t e = std::min(n, b + kSubBlock);
        float f_scale = 0.0f, f_thr = 0.0f;
#pragma omp simd reduction(+ : f_scale, f_thr)
        for (int64_t i = b; i < e; ++i) {
          const ActivationBinarizeGrad r =
              activation_binarize_grad(load(g + off, i), load(x + off, i), tc, s);
          store(gx + off, i, r.grad_x);
          f_scale += r.scale;
          f_thr += r.threshold;
        }
        d_scale += f_scale;
        d_thr += f_thr;
      }
      scale_partial[part + c] += d_scale;
      thr_partial[part + c] += d_thr;
    }
  }
}

// ---------------------------------------------------------------------------
// Masks

template <typename W, typename M>
void mask_range(const void* wv, const void* mv, void* outv, int64_t begin, int64_t end) {
  const W* w = static_cast<const W*>(wv) + begin;
  const M* m = static_cast<const M*>(mv) + begin;
  W* out = static_cast<W*>(outv) + begin;
  const int64_t n = end - begin;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store(out, i, load(w, i) * load(m, i));
}

// ---------------------------------------------------------------------------
// dtype dispatch: one entry point per table slot.

#define FXC_DISPATCH_FLOAT(dtype, FN, ...)           \
  switch (dtype) {                                   \
    case DType::kFloat32:                            \
      return FN<float>(__VA_ARGS__);                 \
    case DType::kFloat16:                            \
      return FN<f16_t>(__VA_ARGS__);                 \
    case DType::kBFloat16:                           \
      return FN<bf16_t>(__VA_ARGS__);                \
    default:                                         \
      return; /* the bindings only pass the above */ \
  }

void fake_quantize_forward(DType dtype, const void* x, void* y, const Layout& l, const Tile& t,
                           const float* s, const float* zp, float qmin, float qmax) {
  FXC_DISPATCH_FLOAT(dtype, fq_forward_tile, x, y, l, t, s, zp, qmin, qmax)
}

void fake_quantize_backward(DType dtype, const void* g, const void* x, void* gx, const Layout& l,
                            const Tile& t, const float* s, const float* zp, float qmin,
                            float qmax, double* inside, double* below, double* above) {
  FXC_DISPATCH_FLOAT(dtype, fq_backward_tile, g, x, gx, l, t, s, zp, qmin, qmax, inside, below,
                     above)
}

void abs_sum(DType dtype, const void* w, const Layout& l, const Tile& t, double* partial) {
  FXC_DISPATCH_FLOAT(dtype, abs_sum_tile, w, l, t, partial)
}

void binarize(DType dtype, const void* w, void* out, const Layout& l, const Tile& t,
              const float* m) {
  FXC_DISPATCH_FLOAT(dtype, binarize_tile, w, out, l, t, m)
}

void activation_binarize_forward(DType dtype, const void* x, void* out, const Layout& l,
                                 const Tile& t, const float* thr, float s) {
  FXC_DISPATCH_FLOAT(dtype, act_forward_tile, x, out, l, t, thr, s)
}

void activation_binarize_backward(DType dtype, const void* g, const void* x, void* gx,
                                  const Layout& l, const Tile& t, const float* thr, float s,
                                  double* scale_partial, double* thr_partial) {
  FXC_DISPATCH_FLOAT(dtype, act_backward_tile, g, x, gx, l, t, thr, s, scale_partial, thr_partial)
}

template <typename W>
void apply_mask_for(DType mask_dtype, const void* w, const void* m, void* out, int64_t begin,
                    int64_t end) {
  switch (mask_dtype) {
    case DType::kFloat32:
      return mask_range<W, float>(w, m, out, begin, end);
    case DType::kFloat16:
      return mask_range<W, f16_t>(w, m, out, begin, end);
    case DType::kBFloat16:
      return mask_range<W, bf16_t>(w, m, out, begin, end);
    case DType::kBool:
      return mask_range<W, bool>(w, m, out, begin, end);
  }
}

void apply_mask(DType w_dtype, DType mask_dtype, const void* w, const void* m, void* out,
                int64_t begin, int64_t end) {
  FXC_DISPATCH_FLOAT(w_dtype, apply_mask_for, mask_dtype, w, m, out, begin, end)
}

#undef FXC_DISPATCH_FLOAT

}  // namespace

const KernelTable& table() {
  static const KernelTable t = {
      FXC_STRINGIFY(FXC_ISA),     fake_quantize_forward,        fake_quantize_backward,
      abs_sum,                    binarize,                     activation_binarize_forward,
      activation_binarize_backward, apply_mask,
  };
  return t;
}

}  // namespace fxc::cpu::FXC_ISA
