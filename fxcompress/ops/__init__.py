"""fxcompress's op library: ``torch.ops.fxcompress.*``, forward and backward.

Compression passes insert these ops into graphs; they train (autograd), trace
(torch.fx, torch.compile, torch.export) and export (torch.onnx.export with
dynamo=True) under the same names. The kernels come from the compiled library
(csrc/, vectorized and parallel CPU kernels, CUDA kernels where PyTorch has
CUDA) or, where it is absent, from the pure-PyTorch reference
(:mod:`fxcompress.ops.reference`), which computes the same results.

Public API::

    fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=None) -> Tensor
    fake_quantize_unchecked(...)   # the same without the Python-side checks
    fake_quantize_learnable_unchecked(x, scale, zero_point, quant_min, quant_max, axis, min_scale)
                                   # at scale max(|scale|, min_scale), unchecked (FakeQuantizer)
    xnor_binarize(w) -> Tensor
    dorefa_binarize(w) -> Tensor
    activation_binarize(x, scale, threshold) -> Tensor
    apply_mask(w, mask) -> Tensor
    backend() -> str          # "compiled (cpu)", "compiled (cpu, cuda)" or "reference"

The wrappers check their arguments and raise ValueError with a message naming
the problem; the kernels check the same (and the values: scale > 0, finite zero
point) so that calling ``torch.ops.fxcompress.*`` directly is just as safe.
Inputs x / w are float32, float16 or bfloat16; all math is done in float32 and
results come back in the input's dtype. The module knows nothing of graphs or
algorithms.

Environment: ``FXCOMPRESS_OPS_BACKEND=reference`` forces the reference kernels,
``=compiled`` makes a missing library (or one built against another torch) an ImportError;
``FXCOMPRESS_CPU_ISA=avx512``, ``avx2`` or ``baseline`` makes the compiled library use those CPU
kernels instead of the best ones the CPU supports (one it cannot run, or an unknown name, makes
the CPU ops raise a RuntimeError that lists the ones it can; README.md, "The op library").
"""
from __future__ import annotations

import operator
from typing import Optional

import torch

from . import _checks, decomposed, reference
from ._library import OpsFallbackWarning, load as _load

__all__ = ["fake_quantize", "fake_quantize_unchecked", "fake_quantize_learnable_unchecked", "xnor_binarize",
           "dorefa_binarize", "activation_binarize", "apply_mask",
           "backend", "backend_info", "reference", "OpsFallbackWarning"]

Tensor = torch.Tensor

_state = _load()


def backend() -> str:
    """Which kernels run: ``"compiled (cpu)"``, ``"compiled (cpu, cuda)"`` or ``"reference"``.

    Device types the compiled library has no kernels for (CUDA in a CPU-only
    build) use the reference kernels.
    """
    if _state.backend == "reference":
        return "reference"
    return f"compiled ({', '.join(_state.compiled_devices)})"


def backend_info() -> dict:
    """Details for diagnostics: backend, why the reference is used, the library
    path, the CPU instruction set in use and how the library was built (its
    build record: torch and CUDA versions, CUDA kernels, and ``fallback_reason``
    when setup.py built the CPU kernels only because the CUDA build failed)."""
    info = {"backend": backend(), "reason": _state.reason, "library_path": _state.library_path}
    if _state.backend == "compiled":
        info["cpu_isa"] = torch.ops.fxcompress._cpu_isa()
        info["build"] = dict(_state.build)
    return info


def _traced(*tensors) -> bool:
    # Under torch.fx symbolic tracing the arguments are Proxies: skip the checks
    # (they need real shapes) and let the op call record a graph node.
    return any(isinstance(t, torch.fx.Proxy) for t in tensors)


def _require_tensor(op: str, name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__} "
                        f"(wrap numbers with torch.tensor(...))")


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                  axis: Optional[int] = None) -> Tensor:
    """Fake-quantizes x: quantize to integers in [quant_min, quant_max], dequantize.

    ::

        zp = clamp(round_half_even(zero_point), quant_min, quant_max)
        y  = (clamp(round_half_even(x / scale) + zp, quant_min, quant_max) - zp) * scale

    Per tensor when ``axis`` is None (scale and zero_point with one element),
    per channel along ``axis`` otherwise (negative axes count from the end;
    scale and zero_point with x.shape[axis] elements, any shape). zero_point is
    a float tensor so that it can be learned. Rounding is half to even, as in
    ONNX QuantizeLinear, so training and the exported model agree.

    Gradients (straight-through): x inside the range gets the incoming
    gradient, outside 0; scale gets round(x/s) - x/s inside, quant_min - zp
    below, quant_max - zp above; zero_point gets 0 inside, -scale outside (the
    learnable fake quantize of PyTorch with grad_factor 1).

    Under torch.compile (not torch.export) it is computed in ATen ops that Inductor fuses with
    the neighbouring ops, same numbers and gradients (:mod:`fxcompress.ops.decomposed`).
    """
    op = _checks.FAKE_QUANTIZE
    if not _traced(x, scale, zero_point):
        for name, value in (("x", x), ("scale", scale), ("zero_point", zero_point)):
            _require_tensor(op, name, value)
        quant_min, quant_max = operator.index(quant_min), operator.index(quant_max)
        axis = None if axis is None else operator.index(axis)
        _checks.check_fake_quantize(op, x, scale, zero_point, quant_min, quant_max, axis)
    return fake_quantize_unchecked(x, scale, zero_point, quant_min, quant_max, axis)


def fake_quantize_unchecked(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                            axis: Optional[int] = None) -> Tensor:
    """:func:`fake_quantize` without its Python-side argument checks, for callers whose arguments
    are right by construction (``FakeQuantizer``, once per quantizer per training step, where the
    checks cost more than the kernel on small activations). The kernels still check shapes and
    values (ValueError), so a wrong call is still an error, with the kernel's message."""
    if decomposed.use_decomposition():
        return decomposed.fake_quantize(x, scale, zero_point, quant_min, quant_max, axis)
    return torch.ops.fxcompress.fake_quantize(x, scale, zero_point, quant_min, quant_max, axis)


def fake_quantize_learnable_unchecked(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                                      axis: Optional[int], min_scale: float) -> Tensor:
    """:func:`fake_quantize` at the scale ``max(|scale|, min_scale)`` (``FakeQuantizer``'s learnable
    scale, which an optimizer step may push through zero), with the gradient of ``scale`` through
    ``abs`` and ``clamp_min`` as autograd gives it; unchecked like :func:`fake_quantize_unchecked`.

    Eager, one op (``fxcompress::fake_quantize_learnable``) whose kernels take ``|scale|`` and the
    floor themselves: no ``abs`` / ``clamp_min`` ops and autograd nodes per call (about 0.06x of a
    small CNN's eager QAT step: benchmarks/RESULTS.md, "QAT step"). Under torch.compile,
    torch.export and torch.fx tracing it is ``fake_quantize(scale.abs().clamp_min(min_scale))`` in
    the graph, as before: Inductor fuses the ATen form, and traced and exported graphs keep the
    ``fake_quantize`` op that export lowers."""
    if torch.compiler.is_compiling() or _traced(x, scale, zero_point):
        return fake_quantize_unchecked(x, scale.abs().clamp_min(min_scale), zero_point, quant_min, quant_max, axis)
    return _fake_quantize_learnable_op(x, scale, zero_point, quant_min, quant_max, axis, min_scale)


_fake_quantize_learnable_op = torch.ops.fxcompress.fake_quantize_learnable.default


def xnor_binarize(w: Tensor) -> Tensor:
    """XNOR-Net weight binarization: ``sign(w) * mean(|w|)`` per output channel
    (mean over all dims but 0), with sign(0) = +1. Straight-through backward."""
    op = _checks.XNOR_BINARIZE
    if not _traced(w):
        _require_tensor(op, "w", w)
        _checks.check_weight_binarize(op, w, per_channel=True)
    return torch.ops.fxcompress.xnor_binarize(w)


def dorefa_binarize(w: Tensor) -> Tensor:
    """DoReFa weight binarization: ``sign(w) * mean(|w|)`` over the whole tensor,
    with sign(0) = +1. Straight-through backward."""
    op = _checks.DOREFA_BINARIZE
    if not _traced(w):
        _require_tensor(op, "w", w)
        _checks.check_weight_binarize(op, w, per_channel=False)
    return torch.ops.fxcompress.dorefa_binarize(w)


def activation_binarize(x: Tensor, scale: Tensor, threshold: Tensor) -> Tensor:
    """Activation binarization (NNCF's ActivationBinarizationScaleThreshold)::

        out = scale if x > threshold * scale else 0

    ``scale`` has one element (positive); ``threshold`` is relative to the
    scale, one value per channel of dim 1 (x.shape[1] elements in any shape,
    e.g. [1, C, 1, 1]) or one for all channels. Gradients follow NNCF: see
    :func:`fxcompress.ops.reference.activation_binarize_backward`.
    """
    op = _checks.ACTIVATION_BINARIZE
    if not _traced(x, scale, threshold):
        for name, value in (("x", x), ("scale", scale), ("threshold", threshold)):
            _require_tensor(op, name, value)
        _checks.check_activation_binarize(op, x, scale, threshold)
    return torch.ops.fxcompress.activation_binarize(x, scale, threshold)


def apply_mask(w: Tensor, mask: Tensor) -> Tensor:
    """``w * mask`` (in float32, returned in w's dtype). ``mask`` is floating-point
    or bool, of w's shape or broadcasting to it. Gradients: grad * mask for w,
    grad * w for a floating mask (summed over broadcast dims)."""
    op = _checks.APPLY_MASK
    if not _traced(w, mask):
        _require_tensor(op, "w", w)
        _require_tensor(op, "mask", mask)
        _checks.check_apply_mask(w, mask)
    return torch.ops.fxcompress.apply_mask(w, mask)
