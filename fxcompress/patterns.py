"""Matching op sequences in an fx graph, whatever form each op is written in.

A pattern is data: a chain of steps, each naming one or more op kinds from
``fxcompress.optable`` (so ``nn.ReLU``, ``F.relu``, ``torch.relu`` and
``x.relu()`` all match ``Kind.relu``; ``x + y`` and ``torch.add`` match ``Kind.add``)::

    CONV_BN_RELU = Chain(Kind.conv, Kind.batch_norm, Optional(Kind.relu, Kind.hardtanh))
    for match in CONV_BN_RELU.find(gm):
        conv, bn = match[Kind.conv], match[Kind.batch_norm]
        relu = match.get(Kind.relu)       # None where the optional step is absent

A kind may also be given by its name (``"conv"``); an unknown name raises when
the pattern is built, so a misspelt pattern fails at import, not by matching nothing.

Consecutive steps are linked through the first input of the later node, and an
intermediate node must have exactly one user (otherwise folding it away would
change another consumer). Matches do not overlap: a node belongs to the first,
longest match found in graph order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.fx

from .optable import Kind, OpKind, as_kinds, op_kind

__all__ = ["Step", "Optional", "Chain", "Match", "tensor_inputs", "is_kind", "find_nodes"]


@dataclass(frozen=True)
class Step:
    kinds: frozenset
    optional: bool = False

    def __init__(self, *kinds: OpKind | str, optional: bool = False):
        object.__setattr__(self, "kinds", as_kinds(kinds))
        object.__setattr__(self, "optional", optional)

    def matches(self, node: torch.fx.Node, gm) -> bool:
        return op_kind(node, gm) in self.kinds


def _kind(kind: OpKind | str) -> OpKind:
    return kind if isinstance(kind, OpKind) else Kind[kind]


def Optional(*kinds: OpKind | str) -> Step:  # noqa: N802 - reads like a pattern keyword
    return Step(*kinds, optional=True)


@dataclass
class Match:
    nodes: list[torch.fx.Node]
    by_kind: dict[OpKind, torch.fx.Node]

    def __getitem__(self, kind: OpKind | str) -> torch.fx.Node:
        return self.by_kind[_kind(kind)]

    def get(self, kind: OpKind | str, default=None):
        return self.by_kind.get(_kind(kind), default)

    @property
    def first(self) -> torch.fx.Node:
        return self.nodes[0]

    @property
    def last(self) -> torch.fx.Node:
        return self.nodes[-1]


class Chain:
    def __init__(self, *steps):
        self.steps = tuple(s if isinstance(s, Step) else Step(s) for s in steps)
        if not self.steps or self.steps[0].optional:
            raise ValueError("a Chain must start with a required step")

    def match_at(self, node: torch.fx.Node, gm) -> Match | None:
        """The longest match of this chain starting at ``node``, or None."""
        if not self.steps[0].matches(node, gm):
            return None
        nodes, by_kind = [node], {op_kind(node, gm): node}
        current = node
        for step in self.steps[1:]:
            nxt = _sole_user(current)
            if nxt is not None and step.matches(nxt, gm) and nxt.args and nxt.args[0] is current:
                nodes.append(nxt)
                by_kind[op_kind(nxt, gm)] = nxt
                current = nxt
            elif not step.optional:
                return None
        return Match(nodes, by_kind)

    def find(self, gm: torch.fx.GraphModule) -> Iterator[Match]:
        taken: set[torch.fx.Node] = set()
        for node in list(gm.graph.nodes):
            if node in taken:
                continue
            match = self.match_at(node, gm)
            if match is not None and not taken.intersection(match.nodes):
                taken.update(match.nodes)
                yield match


def _sole_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def is_kind(node: torch.fx.Node, gm, *kinds: OpKind | str) -> bool:
    return op_kind(node, gm) in as_kinds(kinds)


def find_nodes(gm: torch.fx.GraphModule, *kinds: OpKind | str) -> list[torch.fx.Node]:
    """All nodes of the given kinds, in graph order."""
    wanted = as_kinds(kinds)
    return [n for n in gm.graph.nodes if op_kind(n, gm) in wanted]


def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The node's inputs that are tensors (per shape metadata), in argument order, without repeats."""
    seen, out = set(), []
    for arg in node.all_input_nodes:
        if arg in seen:
            continue
        seen.add(arg)
        if isinstance(arg.meta.get("shape"), tuple) and isinstance(arg.meta.get("dtype"), torch.dtype):
            out.append(arg)
        elif "shape" not in arg.meta:
            out.append(arg)
    return out
