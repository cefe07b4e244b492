"""Pure-PyTorch reference of every fxcompress op, forward and backward.

These functions define what the ops compute: the compiled kernels
(csrc/kernels/math.h) must match them, bit for bit in the forward and within
float tolerance in the backward (tests/test_ops.py). They are also the kernels
registered for ``torch.ops.fxcompress.*`` when the compiled library is absent.

Everything is computed in float32 whatever the input dtype (float32, float16,
bfloat16), and returned in the input's dtype; parameter gradients come back in
the dtype and shape of the parameter. They are plain functions on tensors and
can be called directly; autograd wiring lives in ``_library.py``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks

Tensor = torch.Tensor


def _like(y: Tensor, like: Tensor) -> Tensor:
    """``y`` laid out as ``torch.empty_like(like)`` (what the fake kernels promise)."""
    out = torch.empty_like(like, dtype=y.dtype)
    if out.stride() == y.stride():
        return y
    out.copy_(y)
    return out


def _reduce_dims(ndim: int, keep: Optional[int]) -> list[int]:
    return [d for d in range(ndim) if d != keep]


def _fake_quantize_params(op, x, scale, zero_point, quant_min, quant_max, layout, check_values=True):
    """Per-channel float32 scale and rounded, clamped zero point, shaped to broadcast against x.

    ``check_values=False`` skips the checks that read the values (scale > 0, finite zero point):
    under torch.compile they would end the graph (see :mod:`fxcompress.ops.decomposed`)."""
    if check_values:
        _checks.check_positive_scale(op, scale)
        _checks.check_finite_zero_point(op, zero_point)
    shape = layout.param_shape(x.dim())
    s = scale.float().reshape(shape)
    zp = torch.round(zero_point.float()).clamp(quant_min, quant_max).reshape(shape)
    return s, zp


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                  axis: Optional[int] = None) -> Tensor:
    """Fake quantization, per tensor (axis None) or per channel along ``axis``::

        zp = clamp(round_half_even(zero_point), quant_min, quant_max)
        q  = clamp(round_half_even(x / scale) + zp, quant_min, quant_max)
        y  = (q - zp) * scale

    Rounding is half to even (torch.round), as in ONNX QuantizeLinear.
    """
    return _fake_quantize(x, scale, zero_point, quant_min, quant_max, axis)


def _fake_quantize(x, scale, zero_point, quant_min, quant_max, axis, check_values=True, op=_checks.FAKE_QUANTIZE):
    layout = _checks.check_fake_quantize(op, x, scale, zero_point, quant_min, quant_max, axis)
    s, zp = _fake_quantize_params(op, x, scale, zero_point, quant_min, quant_max, layout, check_values)
    q = (torch.round(x.float() / s) + zp).clamp(quant_min, quant_max)
    return _like(((q - zp) * s).to(x.dtype), x)


def fake_quantize_backward(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int,
                           quant_max: int, axis: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`fake_quantize` for x, scale and zero_point.

    With u = x / s, r = round_half_even(u), q = r + zp (before clamping), the
    straight-through estimator (d round(u)/du = 1, rounding of zp passed
    through) gives, per element::

        below (q < qmin):  dy/dx = 0   dy/ds = qmin - zp   dy/dzp = -s
        above (q > qmax):  dy/dx = 0   dy/ds = qmax - zp   dy/dzp = -s
        inside:            dy/dx = 1   dy/ds = r - u       dy/dzp = 0

    (outside, y = (qmin - zp) * s; inside, y = r * s and dy/ds = r + s * du/ds
    = r - x/s.) Each is multiplied by grad and summed per channel (or over the
    whole tensor). These are the conventions of
    torch._fake_quantize_learnable_per_tensor_affine with grad_factor = 1.
    """
    return _fake_quantize_backward(grad, x, scale, zero_point, quant_min, quant_max, axis)


def _fake_quantize_backward(grad, x, scale, zero_point, quant_min, quant_max, axis, check_values=True,
                            op=_checks.FAKE_QUANTIZE_BACKWARD):
    layout = _checks.check_fake_quantize(op, x, scale, zero_point, quant_min, quant_max, axis)
    _checks.check_grad(op, grad, x)
    s, zp = _fake_quantize_params(op, x, scale, zero_point, quant_min, quant_max, layout, check_values)
    g = grad.float()
    u = x.float() / s
    r = torch.round(u)
    q = r + zp
    below = q < quant_min
    above = q > quant_max
    inside = ~(below | above)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x = torch.where(inside, g, zero).to(x.dtype)
    d_scale = torch.where(below, quant_min - zp, torch.where(above, quant_max - zp, r - u))
    d_zero_point = torch.where(inside, zero, -s)
    dims = _reduce_dims(x.dim(), layout.axis)
    if dims:
        grad_scale, grad_zero_point = (g * d_scale).sum(dims), (g * d_zero_point).sum(dims)
    else:  # nothing to reduce (a 1-d x quantized along its only axis, or a 0-d x)
        grad_scale, grad_zero_point = g * d_scale, g * d_zero_point
    return (_like(grad_x, x),
            _like(grad_scale.reshape(scale.shape).to(scale.dtype), scale),
            _like(grad_zero_point.reshape(zero_point.shape).to(zero_point.dtype), zero_point))


def learnable_scale(scale: Tensor, min_scale: float) -> Tensor:
    """``max(|scale|, min_scale)``: the scale :func:`fake_quantize_learnable` quantizes with."""
    return scale.abs().clamp_min(min_scale)


def fake_quantize_learnable(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                            axis: Optional[int], min_scale: float) -> Tensor:
    """:func:`fake_quantize` with the scale ``max(|scale|, min_scale)``: a learnable scale, which an
    optimizer step may push through zero (``FakeQuantizer``)."""
    op = _checks.FAKE_QUANTIZE_LEARNABLE
    _checks.check_min_scale(op, min_scale)
    return _fake_quantize(x, learnable_scale(scale, min_scale), zero_point, quant_min, quant_max, axis, op=op)


def fake_quantize_learnable_backward(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int,
                                     quant_max: int, axis: Optional[int], min_scale: float
                                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`fake_quantize_learnable` for x, scale and zero_point: those of
    :func:`fake_quantize_backward` at ``s = max(|scale|, min_scale)``, the scale's then through
    ``s`` as autograd's ``clamp_min`` and ``abs`` formulas give it:
    ``where(|scale| >= min_scale, grad_s, 0) * sgn(scale)``."""
    op = _checks.FAKE_QUANTIZE_LEARNABLE_BACKWARD
    _checks.check_min_scale(op, min_scale)
    grad_x, grad_s, grad_zero_point = _fake_quantize_backward(
        grad, x, learnable_scale(scale, min_scale), zero_point, quant_min, quant_max, axis, op=op)
    zero = torch.zeros((), dtype=grad_s.dtype, device=grad_s.device)
    grad_scale = torch.where(scale.abs() >= min_scale, grad_s, zero) * scale.sgn()
    return grad_x, _like(grad_scale, scale), grad_zero_point


def _binarize(w: Tensor, mean_abs: Tensor) -> Tensor:
    # sign(0) = +1: binary weights are always +-mean_abs.
    return _like(torch.where(w.float() >= 0, mean_abs, -mean_abs).to(w.dtype), w)


def xnor_binarize(w: Tensor) -> Tensor:
    """XNOR-Net weight binarization: sign(w) * mean(|w|) per output channel (dim 0).

    The mean is accumulated in float64 and rounded to float32 once; sign(0) = +1.
    The backward is straight-through: the gradient passes unchanged.
    """
    _checks.check_weight_binarize(_checks.XNOR_BINARIZE, w, per_channel=True)
    channels = w.shape[0]
    inner = w.numel() // channels if channels else 0
    mean_abs = (w.double().abs().reshape(channels, inner).sum(1) / inner).float()
    return _binarize(w, mean_abs.reshape([channels] + [1] * (w.dim() - 1)))


def dorefa_binarize(w: Tensor) -> Tensor:
    """DoReFa weight binarization: sign(w) * mean(|w|) over the whole tensor.

    The mean is accumulated in float64 and rounded to float32 once; sign(0) = +1.
    The backward is straight-through: the gradient passes unchanged.
    """
    _checks.check_weight_binarize(_checks.DOREFA_BINARIZE, w, per_channel=False)
    mean_abs = (w.double().abs().sum() / w.numel()).float()
    return _binarize(w, mean_abs)


def _activation_params(op, x, scale, threshold):
    _checks.check_positive_scale(op, scale)
    s = scale.float().reshape(())
    shape = [1] * x.dim()
    shape[1] = threshold.numel()
    t = (threshold.float().reshape(-1) * s).reshape(shape)  # threshold is relative to the scale
    return s, t


def activation_binarize(x: Tensor, scale: Tensor, threshold: Tensor) -> Tensor:
    """NNCF's ActivationBinarizationScaleThreshold::

        out = scale if x > threshold * scale else 0

    ``scale`` has one element; ``threshold`` one per channel of dim 1 (any shape
    with x.shape[1] elements, e.g. [1, C, 1, 1]) or one for all channels. The
    threshold is relative to the scale, as in NNCF (which trains
    scale = exp(s) and threshold = sigmoid(t)).
    """
    op = _checks.ACTIVATION_BINARIZE
    _checks.check_activation_binarize(op, x, scale, threshold)
    s, t = _activation_params(op, x, scale, threshold)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    return _like(torch.where(x.float() > t, s, zero).to(x.dtype), x)


def activation_binarize_backward(grad: Tensor, x: Tensor, scale: Tensor,
                                 threshold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`activation_binarize`, NNCF's formulas exactly
    (nncf/torch/binarization/binarize_functions.py, checked by NNCF's reference.py)::

        grad_x         = grad                      where 0 <= x <= s, else 0
        grad_scale     = sum(grad * (out - x) / s  where x <= s,      else grad)
        grad_threshold = sum over all dims but 1 of (-grad where 0 < x < s, else 0)

    grad_scale is the clipping error (x > s) plus the binarization error
    ((out - x) / s) below it; the threshold gradient counts the elements in the
    band it can move. They are heuristics, not derivatives of the forward.
    """
    op = _checks.ACTIVATION_BINARIZE_BACKWARD
    _checks.check_activation_binarize(op, x, scale, threshold)
    _checks.check_grad(op, grad, x)
    s, t = _activation_params(op, x, scale, threshold)
    g, xf = grad.float(), x.float()
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    out = torch.where(xf > t, s, zero)
    below_scale = xf <= s
    grad_x = torch.where((xf >= 0) & below_scale, g, zero).to(x.dtype)
    grad_scale = torch.where(below_scale, g * ((out - xf) / s), g).sum()
    grad_threshold = torch.where((xf > 0) & (xf < s), -g, zero).sum(_reduce_dims(x.dim(), 1))
    if threshold.numel() == 1:
        grad_threshold = grad_threshold.sum()
    return (_like(grad_x, x),
            _like(grad_scale.reshape(scale.shape).to(scale.dtype), scale),
            _like(grad_threshold.reshape(threshold.shape).to(threshold.dtype), threshold))


def apply_mask(w: Tensor, mask: Tensor) -> Tensor:
    """``w * mask`` computed in float32, in w's dtype and shape.

    ``mask`` is floating-point or bool, of w's shape or broadcasting to it
    (a pruning mask of shape [C, 1, 1, 1], say).
    """
    _checks.check_apply_mask(w, mask)
    return _like((w.float() * mask.float()).to(w.dtype), w)


def apply_mask_backward(grad: Tensor, w: Tensor, mask: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Gradients of :func:`apply_mask`: grad_w = grad * mask, grad_mask = grad * w
    (summed over broadcast dimensions; None for a bool mask)."""
    grad_w = apply_mask(grad, mask)
    if mask.dtype == torch.bool:
        return grad_w, None
    grad_mask = (grad.float() * w.float()).sum_to_size(mask.shape).to(mask.dtype)
    return grad_w, grad_mask
