"""Fake-quantizer modules: what quantization-aware passes insert into the graph.

A ``FakeQuantizer`` rounds its input to the integer grid given by ``QuantSpec``
(bits, symmetric/asymmetric, signed, per-channel axis, narrow range) and a
learnable ``scale`` (and ``zero_point`` for asymmetric ranges), through the op
library's ``fake_quantize`` so training, ``strip()`` and ONNX export compute the
same thing (round half to even, as ONNX QuantizeLinear).

It lives in the infrastructure because several algorithms and the lowering
share it: quantization inserts it, mixed precision changes its bits, export
lowers it to QuantizeLinear/DequantizeLinear.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

import torch
import torch.fx
import torch.nn as nn

from . import ops
from .distributed import average_across_ranks
from .errors import ConfigError
from .gradients import scaled_gradient

__all__ = ["QuantSpec", "FakeQuantizer", "is_quantizer", "quantizer_at", "range_to_qparams",
           "average_ranges_across_ranks"]

_MIN_SCALE = 1e-8
# The scale of an empty range (all observed values zero): ONNX Runtime's quantization tool's choice
# (quant_utils.compute_scale_zp: scale 1.0, zero point 0). The grid is irrelevant to the values seen
# (zeros are exact on any grid), but a 1e-8 floor there made a bias after the quantizer overflow the
# int32 bias (scale s_in * s_w) of ORT's fused integer Conv/Gemm (docs/export.md), and gave QAT a
# quantizer that clips everything to zero.
_EMPTY_RANGE_SCALE = 1.0


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    mode: str = "symmetric"        # "symmetric" | "asymmetric"
    signed: bool = True            # symmetric ranges only; asymmetric ranges are unsigned
    per_channel: bool = False
    axis: int | None = None        # channel axis when per_channel
    narrow_range: bool = False     # [-(2^(b-1)-1), 2^(b-1)-1]: weights, so -scale*qmin == scale*qmax

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"bits must be an integer from 2 to 8, got {self.bits!r}", path="bits")
        if self.mode not in ("symmetric", "asymmetric"):
            raise ConfigError(f"mode must be 'symmetric' or 'asymmetric', got {self.mode!r}", path="mode")
        if self.per_channel and self.axis is None:
            raise ConfigError("a per-channel quantizer needs its channel axis", path="per_channel")

    @property
    def quant_range(self) -> tuple[int, int]:
        if self.mode == "asymmetric" or not self.signed:
            return 0, 2 ** self.bits - 1
        low, high = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return (low + 1, high) if self.narrow_range else (low, high)

    def with_bits(self, bits: int) -> "QuantSpec":
        return replace(self, bits=bits)


class FakeQuantizer(nn.Module):
    """``y = (clamp(round(x / s) + zp, qmin, qmax) - zp) * s`` with learnable ``s`` (and ``zp``).

    ``lr_multiplier`` (NNCF's ``compression_lr_multiplier``) multiplies the gradients of ``s``
    and ``zp``, so they train at that multiple of the optimizer's learning rate.
    """

    def __init__(self, spec: QuantSpec, num_channels: int = 1, learnable: bool = True,
                 lr_multiplier: float | None = None):
        super().__init__()
        self.spec = spec
        self.lr_multiplier = lr_multiplier
        self.scale = nn.Parameter(torch.ones(num_channels), requires_grad=learnable)
        if spec.mode == "asymmetric":
            self.zero_point = nn.Parameter(torch.zeros(num_channels), requires_grad=learnable)
        else:
            self.register_buffer("zero_point", torch.zeros(num_channels))
        # A buffer, so checkpoints carry it: whether a range was set (by init or a checkpoint).
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # A plain attribute, not a buffer: forward branches on it, and tracers and
        # torch.compile treat a Python bool as a constant. Controllers save it.
        self.enabled = True

    @property
    def quant_min(self) -> int:
        return self.spec.quant_range[0]

    @property
    def quant_max(self) -> int:
        return self.spec.quant_range[1]

    @property
    def axis(self) -> int | None:
        return self.spec.axis if self.spec.per_channel else None

    def set_bits(self, bits: int):
        """Change the bit width, keeping the real-valued range the quantizer covers."""
        old_low, old_high = self.spec.quant_range
        self.spec = self.spec.with_bits(bits)
        if bool(self.initialized):
            low = (old_low - self.zero_point.detach().round()) * self.scale.detach().abs()
            high = (old_high - self.zero_point.detach().round()) * self.scale.detach().abs()
            self.set_range(low, high)

    @torch.no_grad()
    def set_range(self, low: torch.Tensor, high: torch.Tensor):
        """Set scale (and zero point) so that ``[low, high]`` (per channel or scalar) is covered.

        The formula is ``range_to_qparams`` (below).
        """
        low = torch.as_tensor(low, dtype=torch.float32).reshape(-1).to(self.scale.device)
        high = torch.as_tensor(high, dtype=torch.float32).reshape(-1).to(self.scale.device)
        scale, zero_point = range_to_qparams(self.spec, low, high)
        self.scale.data = scale.expand_as(self.scale.data).clone() if scale.numel() == 1 else scale.clone()
        self.zero_point.data = (zero_point.expand_as(self.zero_point.data).clone()
                                if zero_point.numel() == 1 else zero_point.clone())
        self.initialized.fill_(True)

    def effective_scale(self) -> torch.Tensor:
        # |scale| keeps the grid valid if an optimizer step pushes a learnable scale through zero.
        # forward() computes the same inside fake_quantize_learnable.
        return scaled_gradient(self.scale, self.lr_multiplier).abs().clamp_min(_MIN_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        quant_min, quant_max = self.spec.quant_range
        # fake_quantize at effective_scale(), with |scale| and its floor inside the op (eager: no ops and
        # autograd nodes of their own; same values and gradients). Unchecked: the arguments are right
        # by construction, and the Python-side checks cost more than the kernel on a small activation
        # (the kernel checks them anyway).
        return ops.fake_quantize_learnable_unchecked(x, scaled_gradient(self.scale, self.lr_multiplier),
                                                     scaled_gradient(self.zero_point, self.lr_multiplier),
                                                     quant_min, quant_max, self.axis, _MIN_SCALE)

    def extra_repr(self) -> str:
        s = self.spec
        kind = f"per-channel(axis={s.axis})" if s.per_channel else "per-tensor"
        sign = "signed" if s.mode == "symmetric" and s.signed else "unsigned"
        return f"bits={s.bits}, {s.mode}, {sign}, {kind}, range=[{self.quant_min}, {self.quant_max}]"


def range_to_qparams(spec: QuantSpec, low: torch.Tensor, high: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` covering ``[low, high]`` (tensors of any matching shape).

    Symmetric: ``scale = max(|low|, |high|) / qmax`` (unsigned: ``high / qmax``).
    Asymmetric: the range is widened to include 0 (so zero is exact), then
    ``scale = (high - low) / (qmax - qmin)`` and ``zp = qmin - round(low / scale)``.
    An empty range (``low == high == 0``, per channel) gets scale 1.0 (ONNX Runtime's quantization
    tool does the same); other scales are floored at 1e-8.
    """
    qmin, qmax = spec.quant_range
    if spec.mode == "symmetric":
        high = torch.maximum(low.abs(), high.abs()) if spec.signed else high.clamp_min(0)
        scale = high / qmax
    else:
        low, high = low.clamp_max(0), high.clamp_min(0)
        scale = (high - low) / (qmax - qmin)
    scale = torch.where(scale == 0, _EMPTY_RANGE_SCALE, scale).clamp_min(_MIN_SCALE)
    if spec.mode == "symmetric":
        return scale, torch.zeros_like(scale)
    return scale, (qmin - torch.round(low / scale)).clamp(qmin, qmax)


def is_quantizer(module: nn.Module) -> bool:
    return isinstance(module, FakeQuantizer)


def quantizer_at(gm: nn.Module, node) -> FakeQuantizer | None:
    """The ``FakeQuantizer`` a graph node calls, or None: the one quantizer lookup of every pass."""
    if isinstance(node, torch.fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, FakeQuantizer):
            return module
    return None


def average_ranges_across_ranks(quantizers: Iterable[FakeQuantizer]):
    """Every torch.distributed rank gets the mean of the quantizers' scales (and of the asymmetric
    zero points, rounded), so ranks that set ranges from their own data quantize alike."""
    quantizers = list(quantizers)
    average_across_ranks([q.scale for q in quantizers])
    asymmetric = [q.zero_point for q in quantizers if q.spec.mode == "asymmetric"]
    average_across_ranks(asymmetric)
    for zero_point in asymmetric:
        zero_point.data.round_()
