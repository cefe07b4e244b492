"""Deciding which convolutions binarize (the graph surgery is in ``algo.py``).

A convolution is binarized unless

- a scope excludes it (``ignored_scopes`` / ``target_scopes``);
- it is a *first layer*: data reaches it from a model input without passing
  through another layer (conv, transposed conv, linear), or a *last layer*:
  its output reaches a model output without passing through another layer.
  Binary first and last layers cost much accuracy for little speed (the input
  has few channels; the classifier is small), so both stay in full precision
  unless ``binarize_first_last=True`` (NNCF users list them in
  ``ignored_scopes``, which gives the same result);
- its weight is not a floating-point parameter (computed in the graph).

Every skipped convolution is reported with its reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from fxcompress.optable import op_kind
from fxcompress.weights import WeightedOp

__all__ = ["Decision", "boundary_layers", "decide"]

REASON_SCOPE = "excluded by ignored_scopes/target_scopes"
REASON_FIRST = "first layer (reads the model input): kept in full precision (binarize_first_last=False)"
REASON_LAST = "last layer (produces the model output): kept in full precision (binarize_first_last=False)"
REASON_WEIGHT = "its weight is computed in the graph or not floating point, not a parameter to binarize"


@dataclass
class Decision:
    op: WeightedOp
    binarize: bool
    reason: str = ""


def _is_layer(node: torch.fx.Node, gm) -> bool:
    kind = op_kind(node, gm)
    return kind is not None and "weighted" in kind.tags


def _reach(gm: torch.fx.GraphModule, starts, forward: bool) -> set[torch.fx.Node]:
    """Layers reached from ``starts`` along (forward) or against (backward) the data flow, stopping at them."""
    found, seen = set(), set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        nexts = node.users if forward else node.all_input_nodes
        for nxt in nexts:
            if nxt in seen:
                continue
            seen.add(nxt)
            if _is_layer(nxt, gm):
                found.add(nxt)  # a layer ends the walk: what lies beyond it is not first/last
            elif nxt.op != "get_attr":
                stack.append(nxt)
    return found


def boundary_layers(gm: torch.fx.GraphModule) -> tuple[set[torch.fx.Node], set[torch.fx.Node]]:
    """``(first, last)``: the layer nodes adjacent to the model inputs and to the model outputs."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    return _reach(gm, inputs, forward=True), _reach(gm, outputs, forward=False)


def decide(gm: torch.fx.GraphModule, ops: list[WeightedOp], selects, binarize_first_last: bool) -> list[Decision]:
    """One decision per convolution, in graph order."""
    first, last = boundary_layers(gm)
    decisions = []
    for op in ops:
        if not selects(op.module_path):
            decisions.append(Decision(op, False, REASON_SCOPE))
        elif not binarize_first_last and op.node in first:
            decisions.append(Decision(op, False, REASON_FIRST))
        elif not binarize_first_last and op.node in last:
            decisions.append(Decision(op, False, REASON_LAST))
        else:
            weight = op.weight(gm)
            if weight is None or not weight.is_floating_point():
                decisions.append(Decision(op, False, REASON_WEIGHT))
            else:
                decisions.append(Decision(op, True))
    return decisions
