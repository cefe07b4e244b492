"""Which values a model computes only from its integer inputs: masks, position and token-type ids.

An attention mask arrives as 0/1 integers; the model turns it into an additive float
mask (``where(mask, 0, finfo.min)`` or ``(1 - mask) * finfo.min``) that it adds to the
attention scores. Such a value is float, depends on the inputs, and looks like an
activation, but it is not one: its values are a handful of constants (0 and -3.4e38),
it holds no information a quantizer could keep on an 8-bit grid, and a range
observed on it is infinite. ``mark_integer_derived`` finds these values by dataflow
over the graph and records them in ``node.meta[INTEGER_DERIVED]``; quantization never
places a quantizer on them, and an op that combines one with a real activation (the
scores + mask add) runs in float.

A node is integer-derived when it depends on the model inputs, and every input
value it reads is an integer model input, another integer-derived value, or a
constant of the model (a parameter, a buffer, a size). Embedding lookups are not:
their output is learned values indexed by the ids, a real activation.
"""
from __future__ import annotations

import torch
import torch.fx

from .optable import Kind, op_kind

__all__ = ["INTEGER_DERIVED", "mark_integer_derived", "is_integer_derived"]

INTEGER_DERIVED = "integer_derived"

# Lookups of learned values: their outputs are activations even though their inputs are ids.
_LOOKUP_KINDS = frozenset({Kind.embedding})


def _carries_values(node: torch.fx.Node) -> bool:
    """A tensor (or container of tensors), not a size computed from one."""
    return node.meta.get("dtype", torch.float32) is not None


def _is_integer_input(node: torch.fx.Node) -> bool:
    dtype = node.meta.get("dtype")
    return isinstance(dtype, torch.dtype) and not dtype.is_floating_point and not dtype.is_complex


def mark_integer_derived(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Set ``node.meta[INTEGER_DERIVED]`` on every node (True/False); returns the True ones."""
    dynamic: set[torch.fx.Node] = set()   # depends on the model inputs' values
    derived: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            dynamic.add(node)
            if _is_integer_input(node):
                derived.add(node)
        elif node.op not in ("get_attr", "output"):
            value_inputs = [a for a in node.all_input_nodes if a in dynamic and _carries_values(a)]
            if value_inputs:
                dynamic.add(node)
                if all(a in derived for a in value_inputs) and op_kind(node, gm) not in _LOOKUP_KINDS:
                    derived.add(node)
        node.meta[INTEGER_DERIVED] = node in derived
    return derived


def is_integer_derived(node: torch.fx.Node) -> bool:
    return bool(node.meta.get(INTEGER_DERIVED))
