"""The registry of channel rules: for each op kind, how channels flow through it and what it pins.

A *rule* is ``rule(analysis, node, kind) -> claimed``: it reads the spaces of ``node``'s inputs
(``analysis.space_of``), creates the output space, ties elements with index maps and blocks what
it cannot follow (``analysis.new_space`` / ``tie`` / ``tie_identity`` / ``block``), and returns
the tracked inputs it understood. The sweep blocks every tracked input a rule does not claim, so
an op without a rule (GroupNorm, softmax, matmul, an unknown module) pins the channels that reach
it: the analysis can only give up, never produce a wrong model.

Rules are registered by op kind object (``@channel_rule(Kind.cat)``), as Torch-Pruning registers
one pruner per layer type; a kind name is refused. The few ops the op table has no kind for
(shape queries, inserted quantizers, torchvision's stochastic depth, ``x ** p``) are registered
with a node predicate (``@channel_rule_where(...)``) and tried, in order, only for nodes whose
kind has no rule.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.fx

from fxcompress.optable import OpKind, op_kind

if TYPE_CHECKING:
    from ..dependency import ChannelAnalysis

__all__ = ["Rule", "channel_rule", "channel_rule_where", "rule_for", "rule_kinds"]

Rule = Callable[["ChannelAnalysis", torch.fx.Node, "OpKind | None"], set]
NodeMatch = Callable[[torch.fx.Node, torch.nn.Module], bool]

_BY_KIND: dict[OpKind, Rule] = {}
_BY_MATCH: list[tuple[NodeMatch, Rule]] = []


def channel_rule(*kinds: OpKind) -> Callable[[Rule], Rule]:
    """Register the decorated function as the channel rule of ``kinds`` (kind objects, one rule each)."""
    for kind in kinds:
        if not isinstance(kind, OpKind):
            raise TypeError(f"channel rules are registered by op kind object (Kind.{kind}), not by {kind!r}")
        if kind in _BY_KIND:
            raise ValueError(f"{kind!r} already has the channel rule {_BY_KIND[kind].__name__}")

    def register(rule: Rule) -> Rule:
        for kind in kinds:
            _BY_KIND[kind] = rule
        return rule

    return register


def channel_rule_where(match: NodeMatch) -> Callable[[Rule], Rule]:
    """Register the decorated function for the nodes ``match(node, gm)`` accepts (ops with no kind)."""

    def register(rule: Rule) -> Rule:
        _BY_MATCH.append((match, rule))
        return rule

    return register


def rule_for(node: torch.fx.Node, gm: torch.nn.Module) -> tuple[Rule, OpKind | None] | None:
    """The rule for ``node`` and its kind, or None when nothing is registered for it."""
    kind = op_kind(node, gm)
    if kind in _BY_KIND:
        return _BY_KIND[kind], kind
    for match, rule in _BY_MATCH:
        if match(node, gm):
            return rule, kind
    return None


def rule_kinds() -> frozenset[OpKind]:
    """The kinds that have a channel rule."""
    return frozenset(_BY_KIND)
