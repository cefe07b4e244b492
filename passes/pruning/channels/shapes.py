"""Channel rules of the ops that move axes: flatten / view / reshape (index maps from ``..index_maps``),
permute / transpose, mean over other axes, and shape queries (``x.size()``, ``x.shape``), which
read no channel values. A channel shuffle is a view, a transpose and a view: the rules follow or
pin it piece by piece."""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx

from fxcompress.optable import Kind, OpKind

from ..index_maps import reshape_channel_map
from .graph import data_input, tensor_shape
from .model import Space
from .registry import channel_rule, channel_rule_where

if TYPE_CHECKING:
    from ..dependency import ChannelAnalysis

__all__ = ["shape_args", "reshape", "mean", "transpose", "shape_query"]


def shape_args(node: torch.fx.Node) -> tuple[list, object] | None:
    """The target shape of a view/reshape node as a list, and how to write it back, or None.

    Besides literal shapes, ``x.view(y.size()[:-1] + (n,))`` (transformers' ``Conv1D``) reads as
    ``[None, ..., n]`` (form ``"size_prefix"``): a prefix computed at run time and a literal tail.
    """
    if node.op == "call_method" and node.target in ("view", "reshape"):
        rest = list(node.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            return list(rest[0]), "tuple_arg"
        if len(rest) == 1 and _size_prefix_tail(rest[0]) is not None:
            tail = list(rest[0].args[1])
            out_shape = tensor_shape(node)
            if out_shape is None or len(out_shape) < len(tail):
                return None
            return [None] * (len(out_shape) - len(tail)) + tail, "size_prefix"
        return rest, "varargs"
    if node.op == "call_function" and node.target is torch.reshape:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
        if isinstance(shape, (tuple, list)):
            return list(shape), "function"
    return None


def _size_prefix_tail(shape) -> tuple | None:
    """The literal tail of ``<sizes of a tensor>[:k] + (n, ...)``, the shape node's only use, or None."""
    if not (isinstance(shape, torch.fx.Node) and shape.op == "call_function" and shape.target is operator.add
            and len(shape.args) == 2 and len(shape.users) == 1):
        return None
    prefix, tail = shape.args
    if not (isinstance(prefix, torch.fx.Node) and prefix.op == "call_function" and prefix.target is operator.getitem
            and isinstance(prefix.args[0], torch.fx.Node) and prefix.args[0].op == "call_method"
            and prefix.args[0].target == "size" and len(prefix.args[0].args) == 1):
        return None
    return tail if isinstance(tail, tuple) and all(isinstance(v, int) for v in tail) else None


_SIZE_QUERIES = frozenset({"size", "dim"})


def _is_shape_query(node: torch.fx.Node, gm: torch.nn.Module) -> bool:
    if node.op == "call_method" and node.target in _SIZE_QUERIES:
        return True
    return node.op == "call_function" and node.target is getattr and len(node.args) > 1 \
        and node.args[1] in ("shape", "ndim", "dtype", "device")


@channel_rule_where(_is_shape_query)
def shape_query(analysis: ChannelAnalysis, node: torch.fx.Node, kind: None) -> set:
    """``x.size()``, ``x.dim()``, ``x.shape``: recomputed on the smaller tensor at run time."""
    return {i for i in node.all_input_nodes if i in analysis.space_of}


@channel_rule(Kind.flatten, Kind.reshape)
def reshape(analysis: ChannelAnalysis, node: torch.fx.Node, kind: OpKind) -> set:
    """Flatten / view / reshape: the channel axis maps to one output axis by an index map (flatten -> linear:
    channel ``c`` <-> features ``[c*H*W, (c+1)*H*W)``; a channel shuffle's view splits it in two and is
    pinned). Pins the input when the channels spread over several axes or the target shape cannot be read;
    a literal target size is recorded in ``analysis.reshapes`` for the fold to rewrite."""
    x = data_input(node)
    if x not in analysis.space_of:
        return set()
    space = analysis.space_of[x]
    in_shape, out_shape = tensor_shape(x), tensor_shape(node)
    if in_shape is None or out_shape is None:
        return set()
    mapping = reshape_channel_map(in_shape, space.axis, out_shape)
    if mapping is None:
        analysis.block(space, f"'{node.name}' reshapes {list(in_shape)} to {list(out_shape)}, spreading the "
                              f"channels of axis {space.axis} over several axes")
        return {x}
    literal = False
    parsed = shape_args(node)
    if kind is Kind.reshape:
        if parsed is None or len(parsed[0]) != len(out_shape):
            analysis.block(space, f"'{node.name}': cannot read its target shape")
            return {x}
        entry = parsed[0][mapping.out_axis]
        if _size_of_channels(entry, x, space):
            entry = -1  # x.size(axis) of the channels themselves: follows them at run time
        if not isinstance(entry, int):
            analysis.block(space, f"'{node.name}': the size of axis {mapping.out_axis} is computed at run time")
            return {x}
        literal = entry != -1
    out = analysis.new_space(node, mapping.out_axis, out_shape[mapping.out_axis], zero=space.zero)
    analysis.tie(space, out, mapping.index, np.arange(out.size),
                 f"'{node.name}': channel -> {mapping.expression}")
    if literal:
        analysis.reshapes.append(node)
    return {x}


def _size_of_channels(entry, x: torch.fx.Node, space: Space) -> bool:
    """``entry`` is ``x.size(d)`` with ``d`` the channel axis of ``x``."""
    if not (isinstance(entry, torch.fx.Node) and entry.op == "call_method" and entry.target == "size"
            and len(entry.args) == 2 and entry.args[0] is x and isinstance(entry.args[1], int)):
        return False
    return entry.args[1] % space.ndim == space.axis


@channel_rule(Kind.mean)
def mean(analysis: ChannelAnalysis, node: torch.fx.Node, kind: OpKind) -> set:
    """A mean over other axes (global pooling written as ``x.mean((2, 3))``): channels pass through;
    a mean over the channel axis pins them."""
    x = data_input(node)
    space = analysis.space_of.get(x)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    shape = tensor_shape(node)
    if space is None or dims is None or not isinstance(keepdim, bool) or shape is None:
        return set()
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        return set()
    dims = [d % space.ndim for d in dims]
    if space.axis in dims:
        analysis.block(space, f"'{node.name}' averages over the channel axis")
        return {x}
    axis = space.axis if keepdim else space.axis - sum(d < space.axis for d in dims)
    out = analysis.new_space(node, axis, space.size, zero=space.zero)
    analysis.tie_identity(space, out, f"'{node.name}' averages other axes")
    return {x}


@channel_rule(Kind.transpose)
def transpose(analysis: ChannelAnalysis, node: torch.fx.Node, kind: OpKind) -> set:
    """transpose / permute / t: the channels move to another axis, unchanged."""
    x = data_input(node)
    space = analysis.space_of.get(x)
    shape = tensor_shape(node)
    if space is None or shape is None:
        return set()
    rest = list(node.args[1:])
    if node.target in ("permute", torch.permute):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        dims = dims or node.kwargs.get("dims")
        if not dims or not all(isinstance(d, int) for d in dims):
            return set()
        dims = [d % space.ndim for d in dims]
        axis = dims.index(space.axis)
    elif node.target == "t":
        axis = 1 - space.axis
    else:
        d0 = rest[0] if rest else node.kwargs.get("dim0")
        d1 = rest[1] if len(rest) > 1 else node.kwargs.get("dim1")
        if not isinstance(d0, int) or not isinstance(d1, int):
            return set()
        d0, d1 = d0 % space.ndim, d1 % space.ndim
        axis = d1 if space.axis == d0 else d0 if space.axis == d1 else space.axis
    out = analysis.new_space(node, axis, space.size, zero=space.zero)
    analysis.tie_identity(space, out, f"'{node.name}' moves the channel axis to {axis}")
    return {x}
