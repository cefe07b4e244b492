"""Whole image networks: :class:`ConvNetSpec`, the :func:`conv_nets` strategy that draws a
sequence of blocks (:mod:`.conv_blocks`, :mod:`.deployment_blocks`) and a head, and the fixed
:data:`EXAMPLE_BLOCK_NETS`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn
from hypothesis import strategies as st

from ..models import ModelCase, seeded
from .base import _SEEDS, GeneratedNet, _finish
from .conv_blocks import (ConvBlockSpec, ConvSpec, Head, HeadSpec, SESpec, _draw_conv_block,
                          _draw_head, _draw_merge, _draw_pool, _draw_rare, _draw_residual, _draw_se)
from .deployment_blocks import (ConvNeXtSpec, InvertedResidualSpec, ShuffleSpec, _draw_convnext,
                                _draw_inverted_residual, _draw_shuffle)

@dataclass(frozen=True)
class ConvNetSpec:
    seed: int
    input_shape: tuple[int, int, int, int]
    blocks: tuple[Any, ...]
    head: HeadSpec
    output_kind: str = "tensor"

    def build(self) -> ModelCase:
        with seeded(self.seed):
            net = GeneratedNet([b.build() for b in self.blocks], Head(self.head), self.output_kind)
        model, inputs = _finish(net, self.seed, [self.input_shape])
        return ModelCase(model, inputs, str(self), spec=self)

    def __str__(self) -> str:
        blocks = "; ".join(f"{i}: {b}" for i, b in enumerate(self.blocks))
        out = "" if self.output_kind == "tensor" else f", outputs={self.output_kind}"
        return (f"conv_net(input={list(self.input_shape)}, seed={self.seed}{out}, "
                f"blocks=[{blocks}], head=[{self.head}])")


_BLOCK_DRAWERS: dict[str, Callable[..., Any]] = {
    "conv": _draw_conv_block,
    "residual": _draw_residual,
    "pool": _draw_pool,
    "merge": _draw_merge,
    "squeeze_excite": _draw_se,
    "rare_conv": _draw_rare,
    "inverted_residual": _draw_inverted_residual,
    "shuffle_unit": _draw_shuffle,
    "convnext": _draw_convnext,
}
DEPLOYMENT_BLOCKS: tuple[str, ...] = ("inverted_residual", "shuffle_unit", "convnext")


@st.composite
def conv_nets(draw: Any, *, include_rare_ops: bool = False, min_blocks: int = 2,
              max_blocks: int = 4, batch_size: int = 2, multi_output: bool = False,
              deployment_blocks: bool = False) -> ModelCase:
    """Random valid CNNs over ``[batch_size, C, H, W]`` inputs (C in {1, 3, 4},
    H, W in 8..16), ``min_blocks..max_blocks`` blocks (the first a conv, residual
    or merge block; later ones also pooling, squeeze-excite and, with
    ``include_rare_ops=True``, Conv1d / Conv3d / ConvTranspose2d), then a head.
    ``deployment_blocks=True`` adds MobileNet inverted residuals (ReLU6/hardswish/SiLU,
    squeeze-excite), ShuffleNet units (channel split, concat, channel shuffle, grouped
    1x1) and ConvNeXt blocks (depthwise conv, permutes, LayerNorm, linears)."""
    seed = draw(_SEEDS)
    c0 = draw(st.sampled_from([3, 1, 4]))
    h0 = draw(st.integers(8, 16))
    w0 = draw(st.one_of(st.just(h0), st.integers(8, 16)))
    c, h, w = c0, h0, w0
    kinds = ["conv", "residual", "pool", "merge", "squeeze_excite"]
    if include_rare_ops:
        kinds.append("rare_conv")
    if deployment_blocks:
        # twice each: drawn once among the eight kinds, a ShuffleNet unit (which also needs an even channel
        # count) came up in 3 % of 300 deployment models, and not once in a 158-example slow export run
        kinds += DEPLOYMENT_BLOCKS * 2
    blocks = []
    if not 1 <= min_blocks <= max_blocks:
        raise ValueError(f"need 1 <= min_blocks <= max_blocks, got {min_blocks}, {max_blocks}")
    for i in range(draw(st.integers(min_blocks, max_blocks))):
        allowed = [k for k in kinds if not (k == "pool" and min(h, w) < 2)
                   and not (k == "shuffle_unit" and c % 2)]
        if i == 0:
            allowed = ["conv", "residual", "merge"]
        kind = draw(st.sampled_from(allowed))
        spec, (c, h, w) = _BLOCK_DRAWERS[kind](draw, c, h, w)
        assert c >= 1 and h >= 1 and w >= 1, (spec, c, h, w)
        blocks.append(spec)
    head = _draw_head(draw, c, h, w)
    output_kind = draw(st.sampled_from(["tensor", "tuple", "dict"])) if multi_output else "tensor"
    spec = ConvNetSpec(seed, (batch_size, c0, h0, w0), tuple(blocks), head, output_kind)
    return spec.build()


def _example_net(*blocks: Any, channels: int, seed: int = 0) -> nn.Module:
    stem = ConvSpec(3, blocks[0].in_ch if hasattr(blocks[0], "in_ch") else channels, 3, 2, 1, 1, False, True,
                    "nn.Hardswish")
    head = HeadSpec("nn.AdaptiveAvgPool2d(1)", "torch.flatten(x,1)", channels, 16, "nn.Hardswish", 0.0, 10)
    return ConvNetSpec(seed, (2, 3, 16, 16), (ConvBlockSpec(stem), *blocks), head).build().model


def _se(c: int) -> SESpec:
    return SESpec(c, max(1, c // 4), "F.adaptive_avg_pool2d", "nn.ReLU", "F.hardsigmoid", "*")


# Fixed nets of the deployment blocks on [2, 3, 16, 16] inputs (a stem conv, the blocks, a pooled
# linear head), for benchmarks and example-based tests.
EXAMPLE_BLOCK_NETS: dict[str, Callable[[], nn.Module]] = {
    "mobilenet_v3_blocks": lambda: _example_net(
        InvertedResidualSpec(8, 8, 8, 3, 1, "nn.ReLU6", _se(8)),
        InvertedResidualSpec(8, 32, 16, 5, 2, "nn.Hardswish", _se(32)),
        InvertedResidualSpec(16, 48, 16, 3, 1, "nn.Hardswish", None), channels=16),
    "shufflenet_blocks": lambda: _example_net(
        ShuffleSpec(16, 1, "chunk", "view+transpose+view"), ShuffleSpec(16, 2, "slice", "reshape+permute+flatten"),
        channels=16),
    "convnext_blocks": lambda: _example_net(
        ConvNeXtSpec(16, 7, 4, True, "permute"), ConvNeXtSpec(16, 3, 2, False, "x.permute"), channels=16),
}
