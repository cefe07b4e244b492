"""Channel rules of the elementwise ops: activations, pooling, dropout / identity (channels pass
through), the binary ops (residual add, gating mul, ...), and the ops the op table has no kind
for that also pass channels through (inserted per-tensor quantizers, stochastic depth, ``x ** p``).

Each space records whether its pruned elements are exactly zero in the masked model: pooling,
dropout and identity keep zeros, an activation keeps them when ``f(0) == 0``."""
from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING

import torch
import torch.fx

from fxcompress.optable import Kind, OpKind
from fxcompress.quantizers import is_quantizer

from .graph import data_input, tensor_shape
from .registry import channel_rule, channel_rule_where

if TYPE_CHECKING:
    from ..dependency import ChannelAnalysis

__all__ = ["passthrough", "maps_zero_to_zero", "activation", "pooling", "identity_like", "binary"]


def passthrough(analysis: ChannelAnalysis, node: torch.fx.Node, zero_preserving: bool, pooling: bool) -> set:
    """Channel ``c`` of the input is channel ``c`` of the output (same shape); pooling only on axis 1. Pins the
    input when the shape changes or a parameter is a tensor (threshold, min/max)."""
    x = data_input(node)
    if x not in analysis.space_of:
        return set()
    space = analysis.space_of[x]
    shape = tensor_shape(node)
    if shape is None or len(shape) != space.ndim or shape[space.axis] != space.size:
        return set()
    if pooling and space.axis != 1:
        return set()
    if any(isinstance(a, torch.fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
        return set()  # a tensor-valued parameter (threshold, min/max): not understood
    out = analysis.new_space(node, space.axis, space.size, zero=space.zero and zero_preserving)
    analysis.tie_identity(space, out, f"passes channels through {node.name}")
    return {x}


def maps_zero_to_zero(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """f(0) == 0 for an elementwise activation, evaluated on a zero tensor."""
    dtype = node.meta.get("dtype") if isinstance(node.meta.get("dtype"), torch.dtype) else torch.float32
    zero = torch.zeros(1, dtype=dtype)
    try:
        with torch.no_grad():
            if node.op == "call_module":
                out = gm.get_submodule(node.target)(zero)
            elif node.op == "call_function":
                out = node.target(zero, *node.args[1:], **node.kwargs)
            else:
                out = getattr(zero, node.target)(*node.args[1:], **node.kwargs)
    except Exception:  # noqa: BLE001 - unknown signature: assume it does not preserve zero
        return False
    return isinstance(out, torch.Tensor) and bool((out == 0).all())


def activation(analysis: ChannelAnalysis, node: torch.fx.Node, kind: OpKind | None) -> set:
    """An elementwise activation: channels pass through; zeros stay zero where ``f(0) == 0``. Registered
    (in ``channels/__init__``) for every kind the op table marks ``channel_passthrough`` that has no
    rule of its own: relu, hardtanh, gelu, sigmoid, ..."""
    return passthrough(analysis, node, zero_preserving=maps_zero_to_zero(node, analysis.gm), pooling=False)


@channel_rule(Kind.max_pool, Kind.avg_pool)
def pooling(analysis: ChannelAnalysis, node: torch.fx.Node, kind: OpKind) -> set:
    """Pooling over the spatial axes: channels (axis 1) pass through, a zero channel pools to zero."""
    return passthrough(analysis, node, zero_preserving=True, pooling=True)


@channel_rule(Kind.dropout, Kind.identity)
def identity_like(analysis: ChannelAnalysis, node: torch.fx.Node, kind: OpKind) -> set:
    """Dropout, identity, contiguous, clone: channels and zeros pass through."""
    return passthrough(analysis, node, zero_preserving=True, pooling=False)


@channel_rule(Kind.add, Kind.sub, Kind.mul, Kind.div)
def binary(analysis: ChannelAnalysis, node: torch.fx.Node, kind: OpKind) -> set:
    """Residual adds, gating products, layer scales: the operands' channels are tied element by element.
    Pins operands whose channels sit on different axes or broadcast, or that meet an untracked
    channel-wise tensor, and a divisor that pruning zeroes. A per-channel parameter operand is sliced too."""
    shape = tensor_shape(node)
    operands = list(node.args[:2])
    if shape is None or len(operands) != 2 or any(isinstance(v, torch.fx.Node) for v in node.kwargs.values()):
        return set()
    ndim = len(shape)
    tracked = [o for o in operands if isinstance(o, torch.fx.Node) and o in analysis.space_of]
    axes = {analysis.space_of[o].axis + ndim - analysis.space_of[o].ndim for o in tracked}
    claimed = set(tracked)
    if len(axes) != 1:
        for o in tracked:
            analysis.block(analysis.space_of[o], f"'{node.name}' combines channels on different axes")
        return claimed
    axis = axes.pop()
    ties, others_zero, untracked_channelwise = [], [], None
    for o in operands:
        if isinstance(o, torch.fx.Node) and o in analysis.space_of:
            space = analysis.space_of[o]
            if space.size == shape[axis]:
                ties.append(o)
            else:
                analysis.block(space, f"'{node.name}' broadcasts its {space.size} channel(s) across "
                                      f"{shape[axis]}")
        elif isinstance(o, torch.fx.Node):
            oshape = tensor_shape(o)
            if oshape is not None:
                k = axis - (ndim - len(oshape))
                if k >= 0 and oshape[k] > 1:
                    if analysis.owns_parameter(o) and oshape[k] == shape[axis] and \
                            math.prod(oshape) == oshape[k] and kind in (Kind.add, Kind.sub, Kind.mul):
                        # a per-channel parameter (ConvNeXt's layer scale): its channels are sliced too
                        param = analysis.new_space(o, k, oshape[k], zero=False)
                        analysis.channel_params.append((param, 1))
                        ties.append(o)
                        continue
                    untracked_channelwise = o
            others_zero.append(False)
        else:
            others_zero.append(isinstance(o, (int, float)) and o == 0)
    if untracked_channelwise is not None:
        for o in ties:
            analysis.block(analysis.space_of[o], f"'{node.name}' combines it with '{untracked_channelwise.name}', "
                                                 f"whose channels are not tracked")
        return claimed
    if kind is Kind.div and len(ties) and operands[1] in ties:
        analysis.block(analysis.space_of[operands[1]], f"'{node.name}' divides by channels that pruning zeroes")
        ties = [o for o in ties if o is not operands[1]]
    if not ties:
        return claimed
    zeros = [analysis.space_of[o].zero for o in ties]
    if kind in (Kind.add, Kind.sub):
        zero = all(zeros) and all(others_zero) and len(ties) + len(others_zero) == 2
    elif kind is Kind.mul:
        zero = any(zeros) or any(others_zero)
    else:  # div: numerator
        zero = operands[0] in ties and analysis.space_of[operands[0]].zero
    out = analysis.new_space(node, axis, shape[axis], zero=zero)
    for o in ties:
        analysis.tie_identity(analysis.space_of[o], out, f"'{node.name}' ({kind.name}) ties its operands' channels")
    return claimed


# -- ops with no kind in the op table ------------------------------------------------------------


def _is_per_tensor_quantizer(node: torch.fx.Node, gm: torch.nn.Module) -> bool:
    """Per-tensor activation quantizers inserted by an earlier pass pass channels through."""
    if node.op != "call_module" or not node.meta.get("inserted_by"):
        return False
    module = gm.get_submodule(node.target)
    return is_quantizer(module) and getattr(module, "axis", 0) is None


@channel_rule_where(_is_per_tensor_quantizer)
def per_tensor_quantizer(analysis: ChannelAnalysis, node: torch.fx.Node, kind: None) -> set:
    """A per-tensor fake quantizer inserted by an earlier pass: channels and zeros pass through."""
    return passthrough(analysis, node, zero_preserving=True, pooling=False)


def _is_stochastic_depth(node: torch.fx.Node, gm: torch.nn.Module) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "stochastic_depth" \
        and getattr(node.target, "__module__", "").startswith("torchvision")


@channel_rule_where(_is_stochastic_depth)
def stochastic_depth(analysis: ChannelAnalysis, node: torch.fx.Node, kind: None) -> set:
    """torchvision's stochastic depth drops whole samples (training) or nothing (eval): channels pass
    through, zero stays zero."""
    return passthrough(analysis, node, zero_preserving=True, pooling=False)


_POWER = (operator.pow, torch.pow)


def _is_scalar_power(node: torch.fx.Node, gm: torch.nn.Module) -> bool:
    """``x ** p`` / ``torch.pow(x, p)`` / ``x.pow(p)`` with a number ``p``: elementwise on channels."""
    is_pow = (node.op == "call_function" and node.target in _POWER) or \
        (node.op == "call_method" and node.target == "pow")
    return is_pow and len(node.args) == 2 and isinstance(node.args[1], (int, float)) and not node.kwargs


@channel_rule_where(_is_scalar_power)
def scalar_power(analysis: ChannelAnalysis, node: torch.fx.Node, kind: None) -> set:
    """``x ** 3`` in a decomposed GELU (GPT-2's NewGELU)."""
    return passthrough(analysis, node, zero_preserving=maps_zero_to_zero(node, analysis.gm), pooling=False)
