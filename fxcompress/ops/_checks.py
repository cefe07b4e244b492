"""Argument checks of the fxcompress ops, shared by the public wrappers, the fake
(meta) kernels and the pure-PyTorch reference.

The messages match csrc/torch/binding.h word for word (up to number formatting),
so the compiled and the reference implementations reject bad input with the
same ValueError. Checks here look at dtypes, devices and shapes only (they also
run on fake tensors while tracing); value checks (scale > 0, finite zero point)
need the data and live in the kernels: reference.py and csrc/torch/cpu_ops.cpp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

FAKE_QUANTIZE = "fxcompress.fake_quantize"
FAKE_QUANTIZE_BACKWARD = "fxcompress.fake_quantize_backward"
FAKE_QUANTIZE_LEARNABLE = "fxcompress.fake_quantize_learnable"
FAKE_QUANTIZE_LEARNABLE_BACKWARD = "fxcompress.fake_quantize_learnable_backward"
XNOR_BINARIZE = "fxcompress.xnor_binarize"
DOREFA_BINARIZE = "fxcompress.dorefa_binarize"
ACTIVATION_BINARIZE = "fxcompress.activation_binarize"
ACTIVATION_BINARIZE_BACKWARD = "fxcompress.activation_binarize_backward"
APPLY_MASK = "fxcompress.apply_mask"


@dataclass(frozen=True)
class Layout:
    """A contiguous tensor seen as [outer, channels, inner] (csrc/kernels/layout.h).

    Per-channel ops along axis ``a`` use outer = prod(shape[:a]), channels =
    shape[a], inner = prod(shape[a+1:]); per-tensor ops use channels = 1.
    ``axis`` is the normalized channel axis, or None for per-tensor.
    """

    outer: int
    channels: int
    inner: int
    axis: Optional[int]

    def param_shape(self, ndim: int) -> list[int]:
        """Shape that broadcasts one value per channel against the tensor."""
        shape = [1] * ndim
        if self.axis is not None:
            shape[self.axis] = self.channels
        return shape


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _prod(values) -> int:
    out = 1
    for v in values:
        out = out * v
    return out


def _check_input_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_floating(op: str, name: str, t: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _check_same_device(op: str, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, names: str) -> None:
    if not (a.device == b.device == c.device):
        raise ValueError(f"{op}: {names} must be on the same device, got {a.device}, {b.device} and {c.device}")


def check_grad(op: str, grad: torch.Tensor, x: torch.Tensor) -> None:
    if grad.shape != x.shape or grad.dtype != x.dtype:
        raise ValueError(f"{op}: grad must have the shape and dtype of x, got {_shape(grad)} {grad.dtype} "
                         f"for x {_shape(x)} {x.dtype}")
    if grad.device != x.device:
        raise ValueError(f"{op}: grad must be on the device of x, got {grad.device} and {x.device}")


def check_fake_quantize(op: str, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        quant_min: int, quant_max: int, axis: Optional[int]) -> Layout:
    """Validates fake_quantize's arguments (all but values); returns x's layout."""
    _check_input_dtype(op, "x", x)
    _check_floating(op, "scale", scale)
    _check_floating(op, "zero_point", zero_point)
    _check_same_device(op, x, scale, zero_point, "x, scale and zero_point")
    if not quant_min < quant_max:
        raise ValueError(f"{op}: quant_min ({quant_min}) must be less than quant_max ({quant_max})")
    if axis is None:
        if scale.numel() != 1:
            raise ValueError(f"{op}: per-tensor quantization (axis=None) needs a scale with 1 element, "
                             f"got {scale.numel()}")
        if zero_point.numel() != 1:
            raise ValueError(f"{op}: per-tensor quantization (axis=None) needs a zero_point with 1 element, "
                             f"got {zero_point.numel()}")
        return Layout(1, 1, x.numel(), None)
    dim = x.dim()
    if not -dim <= axis < dim:
        raise ValueError(f"{op}: axis {axis} is out of range for x with {dim} dimensions "
                         f"(expected {-dim} <= axis < {dim})")
    ax = axis + dim if axis < 0 else axis
    channels = x.shape[ax]
    if scale.numel() != channels:
        raise ValueError(f"{op}: per-channel quantization along axis {axis} needs {channels} scale values "
                         f"(x.shape[{ax}]), got {scale.numel()}")
    if zero_point.numel() != channels:
        raise ValueError(f"{op}: per-channel quantization along axis {axis} needs {channels} zero_point values "
                         f"(x.shape[{ax}]), got {zero_point.numel()}")
    return Layout(_prod(x.shape[:ax]), channels, _prod(x.shape[ax + 1:]), ax)


def check_min_scale(op: str, min_scale: float) -> None:
    """fake_quantize_learnable's floor of |scale|: a positive finite number."""
    if not (min_scale > 0 and math.isfinite(min_scale)):
        raise ValueError(f"{op}: min_scale must be a positive finite number, got {min_scale}")


def check_weight_binarize(op: str, w: torch.Tensor, per_channel: bool) -> None:
    _check_input_dtype(op, "w", w)
    if per_channel and w.dim() < 1:
        raise ValueError(f"{op}: w must have at least 1 dimension (output channels along dim 0), "
                         f"got a 0-dimensional tensor")


def check_activation_binarize(op: str, x: torch.Tensor, scale: torch.Tensor, threshold: torch.Tensor) -> None:
    _check_input_dtype(op, "x", x)
    _check_floating(op, "scale", scale)
    _check_floating(op, "threshold", threshold)
    _check_same_device(op, x, scale, threshold, "x, scale and threshold")
    if x.dim() < 2:
        raise ValueError(f"{op}: x must have at least 2 dimensions (channels along dim 1), got {x.dim()}")
    if scale.numel() != 1:
        raise ValueError(f"{op}: scale must have 1 element, got {scale.numel()}")
    channels = x.shape[1]
    if threshold.numel() != 1 and threshold.numel() != channels:
        raise ValueError(f"{op}: threshold must have 1 or x.shape[1] = {channels} elements, "
                         f"got {threshold.numel()}")


def check_apply_mask(w: torch.Tensor, mask: torch.Tensor) -> None:
    op = APPLY_MASK
    _check_input_dtype(op, "w", w)
    if not (mask.dtype.is_floating_point or mask.dtype == torch.bool):
        raise ValueError(f"{op}: mask must be a floating-point or bool tensor, got {mask.dtype}")
    if w.device != mask.device:
        raise ValueError(f"{op}: w and mask must be on the same device, got {w.device} and {mask.device}")
    broadcasts = mask.dim() <= w.dim() and all(
        m == 1 or m == s for m, s in zip(reversed(mask.shape), reversed(w.shape)))
    if not broadcasts:
        raise ValueError(f"{op}: mask of shape {_shape(mask)} does not broadcast to w of shape {_shape(w)}")


def check_positive_scale(op: str, scale: torch.Tensor) -> None:
    """Value check (needs data): every scale > 0 (NaN fails too)."""
    bad = ~(scale.detach().float().reshape(-1) > 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{op}: scale must be positive, got {float(scale.reshape(-1)[i])} at index {i}")


def check_finite_zero_point(op: str, zero_point: torch.Tensor) -> None:
    """Value check (needs data): every zero point finite."""
    bad = ~torch.isfinite(zero_point.detach().float().reshape(-1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{op}: zero_point must be finite, got {float(zero_point.reshape(-1)[i])} at index {i}")
