"""``fake_quantize`` in ATen ops, for torch.compile: what Inductor can fuse.

A custom op is opaque to Inductor: each ``fxcompress::fake_quantize`` stays one extern kernel call
forward and one backward, an extra read and write of every quantized activation, while the fp32
model's BatchNorm / ReLU / add chains fuse into single loops. Under torch.compile (not export),
:func:`fxcompress.ops.fake_quantize` therefore computes the same function from the reference
implementation's ATen ops (:mod:`fxcompress.ops.reference`), with the op's backward formula as an
autograd.Function, so Inductor fuses both with their neighbours. Eager calls, torch.fx tracing and
torch.export keep the op (export lowers it to QuantizeLinear / DequantizeLinear).

Same numbers as the op: the reference is the op's definition (the compiled kernels equal it bit
for bit in the forward, within float rounding in the backward; tests/test_ops.py), computed here
without the checks that read values (scale > 0, finite zero point), which would end the graph;
shapes, dtypes and ranges are still checked while tracing. A quantizer's scale is positive by
construction (``FakeQuantizer.effective_scale``).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference

__all__ = ["fake_quantize", "use_decomposition"]

Tensor = torch.Tensor


def use_decomposition() -> bool:
    """True while torch.compile traces (and not torch.export: exported graphs keep the op)."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.params = (quant_min, quant_max, axis)
        return reference._fake_quantize(x, scale, zero_point, quant_min, quant_max, axis, check_values=False)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        grad_x, grad_scale, grad_zero_point = reference._fake_quantize_backward(
            grad, x, scale, zero_point, *ctx.params, check_values=False)
        needs = ctx.needs_input_grad
        return (grad_x if needs[0] else None, grad_scale if needs[1] else None,
                grad_zero_point if needs[2] else None, None, None, None)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                  axis: Optional[int] = None) -> Tensor:
    """:func:`fxcompress.ops.fake_quantize` in ATen ops, with the op's gradients for x, scale and
    zero_point; no value checks."""
    return _FakeQuantize.apply(x, scale, zero_point, quant_min, quant_max, axis)
