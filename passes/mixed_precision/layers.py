"""Finding what mixed precision acts on: the weight quantizers of conv/linear layers and the
activation quantizers that feed them, read from the graph alone.

Mixed precision never imports the quantization pass (docs/design.md: passes talk
through the graph and ``node.meta``). A *quantized layer* is a conv, transposed
conv or linear op whose weight edge (``fxcompress.weights``) passes through a
``FakeQuantizer`` module; the quantizer's input is the weight as that quantizer
sees it (the parameter, after any masks of earlier passes). Its *activation
quantizer* is the ``FakeQuantizer`` reached from the op's data input through
quantization-agnostic ops (max pool, flatten, reshape, transpose, dropout,
identity), the same ops the quantization policy moves quantizers through. One
weight quantizer read by several ops (a shared parameter) is one layer.

``node.meta["quantization"]["overflow_fix"]`` (set by the quantization pass)
marks 8-bit weight quantizers that use 7 bits against the overflow issue of
CPUs without VNNI; mixed precision keeps that fix when it assigns 8 bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from fxcompress.flops import positions, weighted_macs
from fxcompress.optable import Kind, OpKind, as_kinds, kinds_tagged, op_kind
from fxcompress.quantizers import FakeQuantizer, quantizer_at
from fxcompress.weights import WEIGHTED_KINDS, edge_value, walk_to_parameter

__all__ = ["QuantizedLayer", "find_quantized_layers", "quantizer_of", "weight_value", "layer_flops",
           "nominal_bits", "effective_bits_for"]

AGNOSTIC_KINDS = kinds_tagged("quantization_agnostic")


@dataclass
class QuantizedLayer:
    """One weight quantizer and what the bit-width choice needs to know about it."""
    module_path: str                     # the conv/linear module (scopes match this)
    weight_quantizer: str                # its module name on the GraphModule
    weight_node: torch.fx.Node           # the call of the weight quantizer
    module: FakeQuantizer
    activation_quantizers: tuple[str, ...]   # names of the quantizers on the op's data input
    flops: int                           # per sample, NNCF's count (selection.py)
    params: int
    overflow_fix: bool = False

    @property
    def group(self) -> str | None:
        return self.activation_quantizers[0] if self.activation_quantizers else None


quantizer_of = quantizer_at  # the shared lookup (fxcompress.quantizers), under this module's name


def _weight_quantizer_node(gm: torch.fx.GraphModule, edge) -> torch.fx.Node | None:
    """The FakeQuantizer call on a weight edge nearest to the op (among the inserted transforms)."""
    _, transforms = walk_to_parameter(edge)
    return next((t for t in reversed(transforms) if quantizer_of(gm, t) is not None), None)


def _activation_quantizer_node(gm: torch.fx.GraphModule, data_input) -> torch.fx.Node | None:
    current = data_input
    while isinstance(current, torch.fx.Node):
        if quantizer_of(gm, current) is not None:
            return current
        if op_kind(current, gm) not in AGNOSTIC_KINDS or not current.args:
            return None
        current = current.args[0]
    return None


@torch.no_grad()
def weight_value(gm: torch.fx.GraphModule, quantizer_node: torch.fx.Node) -> torch.Tensor | None:
    """The tensor the weight quantizer sees: its parameter through the modules before it (masks)."""
    return edge_value(gm, quantizer_node.args[0])


def layer_flops(kind: OpKind | str, weight: torch.Tensor, node: torch.fx.Node) -> int:
    """FLOPs per sample (2 x multiply-accumulates, as NNCF's ``compute_FLOPs_hook``) of a conv/linear
    node with this weight, counted by ``fxcompress.flops`` (a transposed conv at its input positions,
    where NNCF takes the output positions); 1 position where the traced shapes are unknown."""
    kind = next(iter(as_kinds((kind,))))
    data = node.args[1 if kind is Kind.addmm else 0] if node.args else None
    in_shape = data.meta.get("shape") if isinstance(data, torch.fx.Node) else None
    out_shape = node.meta.get("shape")
    known = isinstance(in_shape if kind is Kind.conv_transpose else out_shape, tuple)
    return 2 * weighted_macs(weight.shape, positions(kind, in_shape, out_shape) if known else 1)


def find_quantized_layers(gm: torch.fx.GraphModule) -> tuple[list[QuantizedLayer], list[dict]]:
    """Quantized conv/linear layers in execution order, and the weighted ops skipped (with why)."""
    layers: dict[str, QuantizedLayer] = {}
    skipped = []
    for node in gm.graph.nodes:
        kind = op_kind(node, gm)
        if kind not in WEIGHTED_KINDS:
            continue
        path = node.target if node.op == "call_module" else node.meta.get("module_path", node.name)
        # Read only: Quantize put every layer it quantized into functional form (fxcompress.weights);
        # a conv/linear still called as a module has no weight quantizer.
        edge = node.args[kind.weight_arg] if node.op == "call_function" and len(node.args) > kind.weight_arg else None
        qnode = _weight_quantizer_node(gm, edge)
        if qnode is None:
            skipped.append({"scope": path, "reason": "its weight is not quantized (no weight quantizer: "
                                                     "put Quantize before MixedPrecision)"})
            continue
        weight = weight_value(gm, qnode)
        if weight is None:
            skipped.append({"scope": path, "reason": "its weight is computed in the graph, not a parameter"})
            continue
        act = _activation_quantizer_node(gm, node.args[0] if node.args else None)
        flops = layer_flops(kind, weight, node)
        if qnode.target in layers:  # a shared weight: one quantizer, several ops
            layer = layers[qnode.target]
            layer.flops += flops
            if act is not None and act.target not in layer.activation_quantizers:
                layer.activation_quantizers += (act.target,)
            continue
        info = qnode.meta.get("quantization", {})
        layers[qnode.target] = QuantizedLayer(
            module_path=path, weight_quantizer=qnode.target, weight_node=qnode,
            module=gm.get_submodule(qnode.target),
            activation_quantizers=(act.target,) if act is not None else (), flops=flops,
            params=weight.numel(), overflow_fix=bool(info.get("overflow_fix", False)))
    return list(layers.values()), skipped


def nominal_bits(layer_or_fix, module: FakeQuantizer) -> int:
    """The bit width a quantizer stands for (8 for an overflow-fixed 7-bit weight quantizer)."""
    fix = layer_or_fix.overflow_fix if isinstance(layer_or_fix, QuantizedLayer) else bool(layer_or_fix)
    bits = module.spec.bits
    return 8 if fix and bits == 7 else bits


def effective_bits_for(overflow_fix: bool, bits: int) -> int:
    """What to set on a weight quantizer for a nominal width: 8 stays 7 under the overflow fix."""
    return 7 if overflow_fix and bits == 8 else bits
