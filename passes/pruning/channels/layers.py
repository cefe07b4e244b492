"""Channel rules of the weighted layers -- conv (regular, grouped, depthwise), transposed conv,
linear and addmm (transformers' ``Conv1D``) -- and how their ``Layer`` records are built."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
import torch.fx

from fxcompress.flops import positions
from fxcompress.optable import Kind, OpKind, op_arg
from fxcompress.weights import WEIGHTED_KINDS, WeightedOp, parameter_of

from .graph import tensor_shape
from .model import Layer, Space, data_arg
from .registry import channel_rule

if TYPE_CHECKING:
    from ..dependency import ChannelAnalysis

__all__ = ["build_layer", "mark_shared_weights", "weighted_layer"]


def build_layer(gm: torch.fx.GraphModule, op: WeightedOp) -> Layer:
    """The ``Layer`` of a weighted op, with ``problem`` set when its channels cannot change."""
    node, kind = op.node, op.kind
    weight = op.weight(gm)
    weight_target = op.weight_source.target if op.weight_source is not None else None
    weight_arg = node.args[op.kind.weight_arg] if len(node.args) > op.kind.weight_arg else None
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else (tensor_shape(weight_arg) or ())
    bias_arg = node.args[kind.bias_arg] if len(node.args) > kind.bias_arg else node.kwargs.get("bias")
    bias_source = parameter_of(bias_arg)
    bias_target = bias_source.target if bias_source is not None else None
    groups, stride = 1, (1,)
    if kind in (Kind.conv, Kind.conv_transpose):
        groups = op_arg(node, kind, "groups", 1)
        stride = op_arg(node, kind, "stride", 1)
    stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride,)
    input_index = data_arg(kind)
    out_shape = tensor_shape(node)
    in_shape = tensor_shape(node.args[input_index]) if len(node.args) > input_index else None
    spatial = positions(kind, in_shape, out_shape) if out_shape and in_shape else 1
    layer = Layer(node, kind, op.module_path, weight_target, bias_target, shape,
                  int(groups) if isinstance(groups, int) else -1, spatial, stride)
    if weight_target is None or not isinstance(weight, torch.Tensor):
        layer.problem = f"{layer.name}: its weight is computed in the graph, not a parameter"
    elif not isinstance(groups, int) or any(not isinstance(s, int) for s in stride):
        layer.problem = f"{layer.name}: groups/stride are computed at run time"
    elif bias_arg is not None and bias_target is None:
        layer.problem = f"{layer.name}: its bias is computed in the graph, not a parameter"
    elif kind is Kind.conv_transpose and groups > 1:
        layer.problem = f"{layer.name}: grouped transposed convolution (groups={groups})"
    elif out_shape is None or in_shape is None:
        layer.problem = f"{layer.name}: no shape metadata"
    return layer


def mark_shared_weights(layers: Iterable[Layer], gm: torch.fx.GraphModule):
    """A weight read by several layers cannot lose filters in one of them only."""
    owners: dict[int, list[Layer]] = {}
    for layer in layers:
        if layer.weight_target is not None:
            tensor = _attr(gm, layer.weight_target)
            owners.setdefault(id(tensor), []).append(layer)
    for group in owners.values():
        if len(group) > 1:
            names = ", ".join(l.node.name for l in group)
            for layer in group:
                layer.problem = layer.problem or f"{layer.name}: its weight is shared by {names}"


def _attr(gm: torch.fx.GraphModule, target: str):
    value = gm
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


@channel_rule(*WEIGHTED_KINDS)
def weighted_layer(analysis: ChannelAnalysis, node: torch.fx.Node, kind: OpKind) -> set:
    """Conv (regular, grouped, depthwise), transposed conv, linear, addmm (Conv1D): the input is consumed on
    the channel axis (pinned when reaching it on another axis or when the layer has a problem) and the
    output channels start a new space (pinned for a layer with a problem; tied per group for grouped convs).
    A weighted op ``FilterPruning`` does not handle (not in ``analysis.layers``) pins its inputs."""
    layer = analysis.layers.get(node)
    if layer is None:
        return set()
    x = layer.data_input
    claimed = set()
    if isinstance(x, torch.fx.Node) and x in analysis.space_of:
        claimed.add(x)
        space = analysis.space_of[x]
        channel_axis = 1 if layer.kind in (Kind.conv, Kind.conv_transpose) else space.ndim - 1
        if space.axis != channel_axis:
            analysis.block(space, f"reaches {layer.name} on axis {space.axis}, not on its channel axis")
        elif layer.problem:
            analysis.block(space, layer.problem)
        else:
            layer.in_space = space
    shape = tensor_shape(node)
    if shape is None:
        return claimed
    # output channels: axis 1 of a conv's output, the last axis of a linear layer's
    axis = 1 if layer.kind in (Kind.conv, Kind.conv_transpose) else len(shape) - 1
    out = analysis.new_space(node, axis, shape[axis], zero=True)
    layer.out_space = out
    if layer.problem:
        analysis.block(out, layer.problem)
    elif layer.grouped:
        _tie_conv_groups(analysis, layer, out)
    return claimed


def _tie_conv_groups(analysis: ChannelAnalysis, layer: Layer, out: Space):
    """Group ``k`` of a grouped conv is pruned whole: its input and output channels form one class.

    Its filters read only group ``k``'s input channels, so removing the group (inputs, filters,
    and one from ``groups``) leaves the other groups' outputs exactly as they were. A depthwise
    conv is the case of one input channel per group: input ``c`` <-> outputs ``c*m .. c*m+m-1``.
    """
    if layer.in_space is None:
        analysis.block(out, f"{layer.name}: grouped convolution (groups={layer.groups}) whose input "
                            f"channels cannot be pruned")
        return
    groups, ins = layer.groups, layer.in_space
    a, b = ins.size // groups, out.size // groups
    inputs, outputs = np.arange(ins.size), np.arange(out.size)
    # connect every input channel to its group's first filter and every filter to its group's first input
    analysis.tie(ins, out, inputs, (inputs // a) * b, f"group of {layer.name}")
    analysis.tie(ins, out, (outputs // b) * a, outputs, f"group of {layer.name}")
