"""The channel analysis's data model: spaces (channel axes), edges (index maps tying their elements),
layers (conv / linear in functional form), norms, LayerNorm sites and groups (see ``..dependency``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx

from fxcompress.optable import Kind, OpKind

__all__ = ["Space", "Edge", "Layer", "Norm", "LayerNormSite", "Group", "data_arg"]


@dataclass(eq=False)
class Space:
    """The channel axis ``axis`` (of ``size`` elements) of ``node``'s output; elements ``start..start+size-1``."""
    index: int
    node: torch.fx.Node
    axis: int
    size: int
    start: int
    ndim: int
    zero: bool = True

    @property
    def ids(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.size)

    def __repr__(self):
        return f"Space({self.node.name}, axis={self.axis}, size={self.size})"


@dataclass(eq=False)
class Edge:
    """Element ``index_a[k]`` of ``a`` and element ``index_b[k]`` of ``b`` are pruned together."""
    a: Space
    b: Space
    index_a: np.ndarray
    index_b: np.ndarray
    why: str


def data_arg(kind: OpKind) -> int:
    """Position of the data input: addmm(bias, x, weight) is transformers' Conv1D; the others take it first."""
    return 1 if kind is Kind.addmm else 0


@dataclass(eq=False)
class Layer:
    """A conv / transposed conv / linear / addmm (Conv1D) in functional form (see ``fxcompress.weights``)."""
    node: torch.fx.Node
    kind: OpKind
    module_path: str
    weight_target: str | None
    bias_target: str | None
    weight_shape: tuple
    groups: int
    spatial: int          # positions per sample the weight is applied at
    stride: tuple
    problem: str | None = None   # why its channels cannot change (shared weight, grouped conv, ...)
    in_space: Space | None = None
    out_space: Space | None = None
    first: bool = False   # no conv/linear between the model input and this layer

    @property
    def out_axis(self) -> int:
        return self.kind.weight_out_axis

    @property
    def in_axis(self) -> int:
        return 1 - self.kind.weight_out_axis  # conv_transpose, addmm: [in, out]

    @property
    def input_arg(self) -> int:
        return data_arg(self.kind)

    @property
    def weight_arg(self) -> int:
        return self.kind.weight_arg

    @property
    def bias_arg(self) -> int:
        return self.kind.bias_arg

    @property
    def data_input(self):
        return self.node.args[self.input_arg] if len(self.node.args) > self.input_arg else None

    @property
    def in_channels(self) -> int:
        if len(self.weight_shape) < 2:
            return -1
        if self.kind is Kind.conv:
            return self.weight_shape[1] * self.groups
        return self.weight_shape[self.in_axis]

    @property
    def grouped(self) -> bool:
        """A grouped conv (depthwise included): group ``k``'s filters read only group ``k``'s inputs."""
        return self.kind is Kind.conv and self.groups > 1

    @property
    def depthwise(self) -> bool:
        return self.grouped and self.groups == self.in_channels

    @property
    def downsampling(self) -> bool:
        return self.kind is Kind.conv and any(int(s) > 1 for s in self.stride)

    @property
    def name(self) -> str:
        return self.module_path or self.node.name


@dataclass(eq=False)
class Norm:
    node: torch.fx.Node
    module_path: str
    space: Space


@dataclass(eq=False)
class LayerNormSite:
    """A LayerNorm over a tracked last axis; ``weight`` / ``bias``: parameter targets (or None)."""
    node: torch.fx.Node
    space: Space          # its output channels
    weight: str | None
    bias: str | None
    eps: float


@dataclass(eq=False)
class Group:
    """Classes pruned together at one ratio; ``reasons`` is empty when the group can be pruned."""
    id: int
    classes: np.ndarray
    producers: list[Layer]
    consumers: list[Layer]
    norms: list[Norm]
    reasons: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def prunable(self) -> bool:
        return not self.reasons

    def describe(self) -> str:
        return ", ".join(p.name for p in self.producers)
