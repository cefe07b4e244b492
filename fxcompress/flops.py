"""Multiply-accumulates (MACs) of conv, linear and matmul ops, read from traced shapes.

The one counter of the project: pruning's cost model, mixed precision's layer
FLOPs and binarization's MAC share all count here. Counts are per sample (the
op's first output dimension is the batch); FLOPs are 2 x MACs, as NNCF and
``torch.utils.flop_counter`` count a multiply-add.

A conv or linear weight is applied once per *position*: each output pixel of a
conv, each input pixel of a transposed conv (it scatters the whole kernel), each
token of a linear layer; per position it costs one MAC per weight element
(``weight.numel()`` already divides by ``groups``).
"""
from __future__ import annotations

import math

import torch
import torch.fx

from .graph import get_attr_value
from .optable import Kind, OpKind, as_kinds, kinds_tagged, op_kind
from .weights import parameter_of

__all__ = ["weighted_macs", "positions", "op_macs", "model_macs"]

_WEIGHTED = kinds_tagged("weighted")


def weighted_macs(weight_shape, positions: int) -> int:
    """MACs of a conv/linear with this weight shape applied at ``positions`` places."""
    return int(math.prod(int(s) for s in weight_shape)) * int(positions)


def positions(kind: OpKind, in_shape, out_shape) -> int:
    """Places per sample a conv/linear weight is applied at (see the module docstring)."""
    if kind is Kind.conv:
        return math.prod(int(s) for s in out_shape[2:])
    if kind is Kind.conv_transpose:
        return math.prod(int(s) for s in in_shape[2:])
    return math.prod(int(s) for s in out_shape[1:-1])


def _shape(value) -> tuple | None:
    shape = value.meta.get("shape") if isinstance(value, torch.fx.Node) else None
    return tuple(shape) if isinstance(shape, (tuple, torch.Size)) else None


def _weight_shape(node: torch.fx.Node, kind: OpKind, gm: torch.nn.Module) -> tuple | None:
    if node.op == "call_module":
        weight = getattr(gm.get_submodule(node.target), "weight", None)
        return tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
    edge = node.args[kind.weight_arg] if len(node.args) > kind.weight_arg else node.kwargs.get("weight")
    shape = _shape(edge)
    source = parameter_of(edge) if shape is None else None  # through the transforms passes inserted
    if source is not None:
        value = get_attr_value(gm, source.target)
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
    return shape


def op_macs(node: torch.fx.Node, gm: torch.nn.Module) -> int | None:
    """MACs per sample of a conv/linear (module or functional form) or matmul node; None for other
    ops or where the shapes are unknown."""
    kind = op_kind(node, gm)
    out_shape = _shape(node)
    if kind is None or out_shape is None:
        return None
    if kind in _WEIGHTED:
        weight_shape = _weight_shape(node, kind, gm)
        data = node.args[1 if kind is Kind.addmm else 0] if node.args else node.kwargs.get("input")
        in_shape = _shape(data)
        if weight_shape is None or (kind is Kind.conv_transpose and in_shape is None):
            return None
        return weighted_macs(weight_shape, positions(kind, in_shape, out_shape))
    if kind is Kind.matmul and len(node.args) >= 2:
        a_shape = _shape(node.args[0])
        if a_shape is None or len(a_shape) < 2 or len(out_shape) < 2:
            return None
        return math.prod(int(s) for s in out_shape[1:]) * int(a_shape[-1])  # each output sums over K
    return None


def model_macs(gm: torch.fx.GraphModule, kinds=None) -> int:
    """MACs per sample of the graph's conv, linear and matmul ops (or only those of ``kinds``)."""
    wanted = as_kinds(kinds) if kinds is not None else None
    total = 0
    for node in gm.graph.nodes:
        if wanted is not None and op_kind(node, gm) not in wanted:
            continue
        total += op_macs(node, gm) or 0
    return total
