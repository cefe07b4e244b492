"""NNCF 2.x quantizer ids of the quantizers in a graph (``meta["quantization"]`` nodes).

NNCF names a quantizer by the operation it sits at (nncf/common/quantization/structs.py,
``WeightQuantizerId`` / ``NonWeightQuantizerId``):

- ``<operation>|WEIGHT``: the weight quantizer of a weighted operation
  (``ResNet/NNCFConv2d[conv1]/conv2d_0|WEIGHT``);
- ``<operation>|OUTPUT``: an activation quantizer on the output of an operation
  (``ResNet/Sequential[layer1]/BasicBlock[0]/ReLU[relu]/relu__0|OUTPUT``); the model's
  inputs are the operations ``/nncf_model_input_<i>``;
- ``<operation>|INPUT<port>``: an activation quantizer on input ``port`` of an operation.

Where fxcompress places one quantizer for several of NNCF's (the output of a ``cat``, whose
inputs NNCF quantizes with one unified scale), that quantizer has the ids of all of them.

Operation names are those of ``fxcompress.scopes.ScopeIndex`` (docs/nncf_configs.md).
``bitwidth_per_scope`` of NNCF's manual mixed-precision configs addresses quantizers this way.
"""
from __future__ import annotations

import torch
import torch.fx

from fxcompress.optable import Kind, op_kind
from fxcompress.scopes import ScopeIndex

__all__ = ["nncf_quantizer_ids"]


def _operation_names(index: ScopeIndex, node: torch.fx.Node) -> tuple[str, ...]:
    names = index.node_ops.get(node.name)
    if names:
        return names
    # A node a pass re-created (a module call made functional) keeps its module path.
    path = node.target if node.op == "call_module" else node.meta.get("module_path", "")
    return index.module_ops.get(path, ())


def _model_producer(node: torch.fx.Node) -> torch.fx.Node:
    """The model operation behind ``node``, skipping nodes passes inserted (masks, other quantizers)."""
    while node.meta.get("inserted_by") and node.args and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def _model_consumer(node: torch.fx.Node) -> torch.fx.Node:
    """The model operation a weight reaches, skipping nodes passes inserted on the weight edge."""
    while node.meta.get("inserted_by") and len(node.users) == 1:
        node = next(iter(node.users))
    return node


def _concatenated(gm: torch.fx.GraphModule, producer: torch.fx.Node) -> list[torch.fx.Node]:
    """``producer`` and, for a concatenation, what it concatenates (recursively).

    NNCF quantizes the inputs of a ``cat`` with one shared (unified) scale; fxcompress places
    that one quantizer on the ``cat``'s output, so it answers to the inputs' ids too.
    """
    out = [producer]
    if op_kind(producer, gm) is Kind.cat and producer.args and isinstance(producer.args[0], (list, tuple)):
        for part in producer.args[0]:
            if isinstance(part, torch.fx.Node):
                out += _concatenated(gm, _model_producer(part))
    return out


def _input_ports(consumer: torch.fx.Node, value: torch.fx.Node) -> list[int]:
    return [i for i, arg in enumerate(consumer.args) if arg is value]


def nncf_quantizer_ids(gm: torch.fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """Quantizer module name -> every NNCF id that names it (a quantizer may have several:
    both spellings of a module, its output and each consumer's input port)."""
    index = ScopeIndex.of(gm)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out: dict[str, tuple[str, ...]] = {}
    for node in gm.graph.nodes:
        info = node.meta.get("quantization")
        if node.op != "call_module" or not info:
            continue
        ids: list[str] = []
        if info.get("group") == "weights":
            ids += [f"{op}|WEIGHT" for user in node.users for op in _operation_names(index, _model_consumer(user))]
        else:
            for producer in _concatenated(gm, _model_producer(node.args[0])):
                if producer.op == "placeholder":
                    ids.append(f"/nncf_model_input_{inputs.index(producer)}|OUTPUT")
                else:
                    ids += [f"{op}|OUTPUT" for op in _operation_names(index, producer)]
            for consumer in node.users:
                for port in _input_ports(consumer, node):
                    ids += [f"{op}|INPUT{port}" for op in _operation_names(index, consumer)]
        out[str(node.target)] = tuple(dict.fromkeys(ids))
    return out
