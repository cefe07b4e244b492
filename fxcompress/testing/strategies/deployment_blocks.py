"""Blocks of deployed architectures: MobileNetV2/V3 inverted residuals (with squeeze-excite),
ShuffleNetV2 units (channel split, concat, channel shuffle) and ConvNeXt blocks (depthwise conv,
permutes, LayerNorm, linears), and how they are drawn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from hypothesis import strategies as st

from .base import MAX_CHANNELS
from .conv_blocks import ConvBNAct, ConvSpec, SEBlock, SESpec, _divisors

MOBILE_ACTIVATIONS: tuple[str, ...] = ("nn.ReLU6", "F.relu6", "F.hardtanh(0,6)", "nn.Hardswish", "F.hardswish",
                                       "nn.SiLU", "F.silu")


@dataclass(frozen=True)
class InvertedResidualSpec:
    """MobileNetV2/V3 block: [1x1 expand+BN+act] -> kxk depthwise+BN+act -> [squeeze-excite]
    -> 1x1 project+BN, plus the input when the shape allows (stride 1, same channels)."""

    in_ch: int
    hidden: int        # == in_ch: no expansion conv
    out_ch: int
    kernel: int
    stride: int
    act: str           # a MOBILE_ACTIVATIONS entry
    se: SESpec | None

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_ch == self.out_ch

    def build(self) -> nn.Module:
        return InvertedResidual(self)

    def __str__(self) -> str:
        se = f", {self.se}" if self.se is not None else ""
        return (f"inverted_residual({self.in_ch}->{self.hidden}->{self.out_ch}, dw{self.kernel}x{self.kernel}"
                f" s{self.stride}, act={self.act}{se}{', +x' if self.residual else ''})")


class InvertedResidual(nn.Module):
    def __init__(self, spec: InvertedResidualSpec):
        super().__init__()
        k = spec.kernel
        self.expand = (ConvBNAct(ConvSpec(spec.in_ch, spec.hidden, 1, 1, 0, 1, False, True, spec.act))
                       if spec.hidden != spec.in_ch else None)
        self.depthwise = ConvBNAct(ConvSpec(spec.hidden, spec.hidden, k, spec.stride, k // 2, spec.hidden, False,
                                            True, spec.act))
        self.se = SEBlock(spec.se) if spec.se is not None else None
        self.project = ConvBNAct(ConvSpec(spec.hidden, spec.out_ch, 1, 1, 0, 1, False, True, "none"))
        self.residual = spec.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.depthwise(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y


SHUFFLE_FORMS: tuple[str, ...] = ("view+transpose+view", "reshape+permute+flatten")


def channel_shuffle(x: torch.Tensor, groups: int, form: str) -> torch.Tensor:
    """ShuffleNet's channel shuffle written as ``form``."""
    n, c, h, w = x.shape
    if form == "view+transpose+view":
        return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
    if form == "reshape+permute+flatten":
        return x.reshape(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).flatten(1, 2)
    raise ValueError(f"unknown shuffle form {form!r}")


@dataclass(frozen=True)
class ShuffleSpec:
    """ShuffleNetV2 unit (stride 1): split channels in two halves, one through
    1x1(+grouped)+BN+ReLU -> 3x3 depthwise+BN -> 1x1+BN+ReLU, concat, channel shuffle."""

    channels: int       # even
    branch_groups: int  # groups of the branch's first 1x1 conv (ShuffleNetV1-style grouped 1x1 when > 1)
    split: str          # "chunk" or "slice"
    shuffle: str        # a SHUFFLE_FORMS entry

    def build(self) -> nn.Module:
        return ShuffleUnit(self)

    def __str__(self) -> str:
        g = f"g{self.branch_groups}," if self.branch_groups > 1 else ""
        return f"shuffle_unit({self.channels}, {g}split={self.split}, shuffle='{self.shuffle}')"


class ShuffleUnit(nn.Module):
    def __init__(self, spec: ShuffleSpec):
        super().__init__()
        half = spec.channels // 2
        self.branch = nn.Sequential(
            ConvBNAct(ConvSpec(half, half, 1, 1, 0, spec.branch_groups, False, True, "nn.ReLU")),
            ConvBNAct(ConvSpec(half, half, 3, 1, 1, half, False, True, "none")),
            ConvBNAct(ConvSpec(half, half, 1, 1, 0, 1, False, True, "nn.ReLU")))
        self.split, self.shuffle = spec.split, spec.shuffle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split == "chunk":
            a, b = x.chunk(2, dim=1)
        else:
            half = x.shape[1] // 2
            a, b = x[:, :half], x[:, half:]
        return channel_shuffle(torch.cat([a, self.branch(b)], 1), 2, self.shuffle)


@dataclass(frozen=True)
class ConvNeXtSpec:
    """ConvNeXt block: kxk depthwise -> permute to NHWC -> LayerNorm -> Linear(c, e*c) -> GELU
    -> Linear(e*c, c) -> [layer scale] -> permute back -> + x."""

    channels: int
    kernel: int
    expansion: int
    layer_scale: bool
    permute: str        # "permute" or "x.permute"

    def build(self) -> nn.Module:
        return ConvNeXtBlock(self)

    def __str__(self) -> str:
        return (f"convnext({self.channels}, dw{self.kernel}x{self.kernel}, LN, x{self.expansion} mlp"
                f"{', layer scale' if self.layer_scale else ''}, {self.permute})")


class ConvNeXtBlock(nn.Module):
    def __init__(self, spec: ConvNeXtSpec):
        super().__init__()
        c = spec.channels
        self.dwconv = nn.Conv2d(c, c, spec.kernel, padding=spec.kernel // 2, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1 = nn.Linear(c, spec.expansion * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(spec.expansion * c, c)
        self.gamma = nn.Parameter(0.5 + torch.rand(c)) if spec.layer_scale else None
        self.permute_form = spec.permute

    def _permute(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return torch.permute(x, dims) if self.permute_form == "permute" else x.permute(*dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._permute(self.dwconv(x), (0, 2, 3, 1))
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self._permute(y, (0, 3, 1, 2))


def _draw_inverted_residual(draw: Any, c: int, h: int, w: int):
    hidden = c * draw(st.sampled_from([m for m in (1, 2, 4) if c * m <= MAX_CHANNELS] or [1]))
    stride = draw(st.sampled_from([1, 2])) if min(h, w) >= 4 else 1
    out = draw(st.one_of(st.just(c), st.integers(1, MAX_CHANNELS)))
    se = None
    if draw(st.booleans()):
        se = SESpec(hidden, max(1, hidden // 4), "F.adaptive_avg_pool2d", "nn.ReLU",
                    draw(st.sampled_from(["F.hardsigmoid", "nn.Sigmoid"])), draw(st.sampled_from(["*", "torch.mul"])))
    spec = InvertedResidualSpec(c, hidden, out, draw(st.sampled_from([3, 5])), stride,
                                draw(st.sampled_from(MOBILE_ACTIVATIONS)), se)
    return spec, (out, (h - 1) // stride + 1, (w - 1) // stride + 1)


def _draw_shuffle(draw: Any, c: int, h: int, w: int):
    half = c // 2
    groups = draw(st.sampled_from([g for g in _divisors(half) if g <= 4]))
    return ShuffleSpec(c, groups, draw(st.sampled_from(["chunk", "slice"])),
                       draw(st.sampled_from(SHUFFLE_FORMS))), (c, h, w)


def _draw_convnext(draw: Any, c: int, h: int, w: int):
    spec = ConvNeXtSpec(c, draw(st.sampled_from([3, 7])), draw(st.sampled_from([2, 4])), draw(st.booleans()),
                        draw(st.sampled_from(["permute", "x.permute"])))
    return spec, (c, h, w)
