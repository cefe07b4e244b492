"""The weight edge of convolutions and linear layers, where masks and weight quantizers go.

``nn.Conv2d`` called as a module hides its weight. ``functionalize_weighted(gm)``
(an explicit rewrite step, run by each pass that inserts on weights) rewrites
such calls into their functional form with the weight read by a ``get_attr``::

    conv1 = self.conv1(x)
becomes
    conv1_weight = self.conv1.weight
    conv1 = torch.conv2d(x, conv1_weight, self.conv1.bias, (1, 1), (1, 1), (1, 1), 1)

so every compression pass inserts on the same edge (``weight_input``) and they
stack in pass order: ``conv1_weight -> conv1_weight_mask -> conv1_weight_quantizer
-> conv2d``. Parameter names (``conv1.weight``) are unchanged, so state dicts keep
their keys. The rewrite is exact and idempotent. ``weighted_ops(gm)`` is then a
pure query: the ops in functional form, each with its weight edge.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .graph import get_attr_value
from .optable import Kind, KindSet, OpKind, as_kinds, op_kind

__all__ = ["WeightedOp", "weighted_ops", "functionalize", "functionalize_weighted", "WEIGHTED_KINDS",
           "walk_to_parameter", "parameter_of", "edge_value"]

WEIGHTED_KINDS = KindSet({Kind.conv, Kind.conv_transpose, Kind.linear, Kind.addmm})  # addmm: transformers' Conv1D

_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_CONV_T_FN = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
              nn.ConvTranspose3d: F.conv_transpose3d}


@dataclass
class WeightedOp:
    """A functional conv/linear node and where its weight comes from."""
    node: torch.fx.Node
    kind: OpKind
    module_path: str
    weight_source: torch.fx.Node | None  # the get_attr of the parameter (None: computed weight)

    @property
    def weight_input(self) -> torch.fx.Node:
        """The node currently feeding the weight argument (the source, or the last inserted transform)."""
        return self.node.args[self.kind.weight_arg]

    def weight(self, gm: torch.nn.Module) -> torch.Tensor | None:
        if self.weight_source is None or self.weight_source.op != "get_attr":
            return None
        return get_attr_value(gm, self.weight_source.target)

    @property
    def out_axis(self) -> int:
        return self.kind.weight_out_axis


def _module_forward_args(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input of a module call with exactly one tensor argument, else None."""
    if len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    return None


def functionalize(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """Rewrite a conv/linear ``call_module`` into its functional form; returns the new node.

    Returns None (and leaves the node alone) for forms that have no exact
    functional equivalent here: a transposed conv called with ``output_size``,
    or a module subclass with its own forward.
    """
    module = gm.get_submodule(node.target)
    x = _module_forward_args(node)
    if x is None:
        return None
    cls = type(module)
    if cls not in _CONV_FN and cls not in _CONV_T_FN and cls is not nn.Linear:
        return None  # a subclass may override forward: do not guess its semantics
    graph = gm.graph
    with graph.inserting_before(node):
        weight = graph.get_attr(f"{node.target}.weight")
        bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
        if cls is nn.Linear:
            new = graph.call_function(F.linear, (x, weight, bias))
        elif cls in _CONV_FN:
            if module.padding_mode != "zeros":
                x = graph.call_function(F.pad, (x, module._reversed_padding_repeated_twice),
                                        {"mode": module.padding_mode})
                padding = 0
            else:
                padding = module.padding
            new = graph.call_function(_CONV_FN[cls], (x, weight, bias, module.stride, padding,
                                                      module.dilation, module.groups))
        else:
            if module.padding_mode != "zeros":
                return None
            new = graph.call_function(_CONV_T_FN[cls], (x, weight, bias, module.stride, module.padding,
                                                        module.output_padding, module.groups,
                                                        module.dilation))
    for helper in (weight, bias):
        if helper is not None:
            helper.meta["module_path"] = node.target
    if x is not node.args[0]:
        x.meta.update({k: node.args[0].meta[k] for k in ("shape", "dtype") if k in node.args[0].meta})
        x.meta["module_path"] = node.target
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    new.name = node.name  # keep the readable name (conv1) for the user and later passes
    return new


def walk_to_parameter(edge) -> tuple[torch.fx.Node | None, list[torch.fx.Node]]:
    """Walk back from a weight (or bias) edge through the transforms passes inserted on it.

    Returns the parameter's ``get_attr`` (None when the tensor is computed in the graph) and the
    inserted transforms met on the way, parameter side first (``[mask, quantizer]``). The one walker
    every pass uses, so all agree on what stands between a parameter and its op.
    """
    chain, current = [], edge
    while isinstance(current, torch.fx.Node) and current.meta.get("inserted_by") and current.args:
        chain.append(current)
        current = current.args[0]
    source = current if isinstance(current, torch.fx.Node) and current.op == "get_attr" else None
    return source, chain[::-1]


def parameter_of(edge) -> torch.fx.Node | None:
    """The ``get_attr`` of the parameter behind a weight or bias edge, or None when it is computed."""
    return walk_to_parameter(edge)[0]


@torch.no_grad()
def edge_value(gm: torch.fx.GraphModule, edge) -> torch.Tensor | None:
    """The tensor on a weight edge: the parameter through the inserted module transforms (masks) on it.

    None when the tensor is computed in the graph or a transform on the way is not a module call.
    """
    source, chain = walk_to_parameter(edge)
    if source is None or any(t.op != "call_module" for t in chain):
        return None
    value = get_attr_value(gm, source.target)
    if not isinstance(value, torch.Tensor):
        return None
    value = value.detach()
    for transform in chain:
        value = gm.get_submodule(transform.target)(value)
    return value


def _weight_source(node: torch.fx.Node, kind: OpKind) -> torch.fx.Node | None:
    """The parameter behind the op's weight argument."""
    return parameter_of(node.args[kind.weight_arg] if len(node.args) > kind.weight_arg else node.kwargs.get("weight"))


def functionalize_weighted(gm: torch.fx.GraphModule, kinds=WEIGHTED_KINDS) -> int:
    """Rewrite every conv/linear module call of ``kinds`` into functional form; returns how many.

    Module calls with no exact functional form (``functionalize`` returns None) stay modules.
    """
    kinds = as_kinds(kinds)
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and op_kind(node, gm) in kinds and functionalize(gm, node) is not None:
            rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten


def weighted_ops(gm: torch.fx.GraphModule, kinds=WEIGHTED_KINDS) -> list[WeightedOp]:
    """The conv/linear ops of the graph in functional form (a query: it changes nothing).

    Module calls are not listed: run ``functionalize_weighted(gm)`` first to bring them to this form.
    """
    kinds = as_kinds(kinds)
    ops = []
    for node in gm.graph.nodes:
        kind = op_kind(node, gm)
        if kind not in kinds or node.op != "call_function" or len(node.args) <= kind.weight_arg:
            continue
        path = node.meta.get("module_path", "")
        ops.append(WeightedOp(node, kind, path, _weight_source(node, kind)))
    return ops
