"""NNCF's ``activations.unified_scale_ops``: operations whose input quantizers share one quantizer.

``"unified_scale_ops": [["Model/__add___0", "Model/__add___1"], ...]``: each inner list names
operations (NNCF scope names, ``{re}`` allowed, or module paths); every activation quantizer
on an input of any of them (up through quantization-agnostic ops such as max pooling, where
the placement put it) becomes one quantizer module (one scale and zero point, one range
initialized from all of its inputs), the first one's (NNCF: "the final quantizer for each
sub-array will be associated with the first element"). Placement already gives a
concatenation's inputs one quantizer; this is for the ops a runtime wants on one grid that the
placement does not tie. The groups must not overlap.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx

from fxcompress.errors import ConfigError
from fxcompress.optable import op_kind
from fxcompress.scopes import ScopeSet

from .controller import QuantizerInfo

__all__ = ["UNIFIED_SCALE_OPS_SCHEMA", "unify_scales", "unified_scale_scopes"]

UNIFIED_SCALE_OPS_SCHEMA = {"type": "array", "items": {"type": "array", "minItems": 1,
                                                      "items": {"type": "string", "minLength": 1}}}


def unified_scale_scopes(groups: list[list[str]] | None) -> list[list[ScopeSet]]:
    return [[ScopeSet([entry], f"activations.unified_scale_ops[{i}]") for entry in group]
            for i, group in enumerate(groups or [])]


def _model_ops(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")
            and not n.meta.get("inserted_by")]


def _input_quantizers(gm, node: torch.fx.Node, by_name: dict[str, QuantizerInfo], agnostic) -> list[torch.fx.Node]:
    """The activation quantizers whose grid ``node``'s inputs are on (up through agnostic ops, as placed)."""
    out = []
    for a in node.all_input_nodes:
        while str(a.target) not in by_name and op_kind(a, gm) in agnostic and a.all_input_nodes:
            a = a.all_input_nodes[0]
        if a.op == "call_module" and str(a.target) in by_name and by_name[str(a.target)].group == "activations":
            out.append(a)
    return out


def unify_scales(gm: torch.fx.GraphModule, infos: list[QuantizerInfo], groups: list[list[ScopeSet]],
                 agnostic: frozenset = frozenset()) -> list[QuantizerInfo]:
    """Make each group's input quantizers one module; returns the remaining quantizers' infos.

    Call on the graph right after ``insert_quantizers`` (the scopes are validated already).
    """
    by_name = {info.name: info for info in infos}
    ops = _model_ops(gm)
    removed: set[str] = set()
    claimed: dict[str, int] = {}
    for i, group in enumerate(groups):
        quantizers: list[torch.fx.Node] = []
        for scopes in group:
            for op in (n for n in ops if scopes.matches(n)):
                quantizers += [q for q in _input_quantizers(gm, op, by_name, agnostic) if q not in quantizers]
        names = list(dict.fromkeys(str(q.target) for q in quantizers))
        overlap = [n for n in names if n in claimed]
        if overlap:
            raise ConfigError(f"activations.unified_scale_ops[{i}]: shares the quantizer {overlap[0]} with group "
                              f"{claimed[overlap[0]]}; the groups must not overlap", path="activations.unified_scale_ops")
        claimed.update(dict.fromkeys(names, i))
        if len(names) < 2:
            continue  # one quantizer (or none) on these inputs: already unified
        keep = by_name[names[0]]
        others = [by_name[n] for n in names[1:]]
        if any(o.module.scale.shape != keep.module.scale.shape or o.module.spec.mode != keep.module.spec.mode
               for o in others):
            raise ConfigError(f"activations.unified_scale_ops[{i}]: the quantizers {names} differ in mode or "
                              f"channels and cannot share one scale", path="activations.unified_scale_ops")
        if any(o.module.spec.signed for o in others) and not keep.module.spec.signed:
            keep.module.spec = dataclasses.replace(keep.module.spec, signed=True)  # one grid for every input
        for q in quantizers:
            q.target = keep.name
        for other in others:
            removed.add(other.name)
            gm.delete_submodule(other.name)
        by_name[keep.name] = dataclasses.replace(
            keep, scopes=tuple(dict.fromkeys(s for info in [keep, *others] for s in info.scopes)),
            serves=tuple(dict.fromkeys(s for info in [keep, *others] for s in info.serves)),
            reasons=tuple(dict.fromkeys(r for info in [keep, *others] for r in info.reasons)) + ("unified scale",))
    gm.recompile()
    return [by_name[info.name] for info in infos if info.name not in removed]
