"""The placement's decision as data: ``QuantizationPoint`` (one quantizer: where, for whom, which
spec), ``QuantizationPlan``, the node annotations ``policy.plan_quantization`` writes
(``ANNOTATION_KEY``) and the readable names quantizer modules are given."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from fxcompress.optable import kind_of
from fxcompress.quantizers import QuantSpec

__all__ = ["ANNOTATION_KEY", "QuantizationPoint", "QuantizationPlan", "annotations", "readable_name", "node_label"]

ANNOTATION_KEY = "quantization_annotation"


@dataclass
class QuantizationPoint:
    """One quantizer to insert on ``producer``'s output, feeding ``consumers``."""
    group: str                       # "weights" | "activations"
    producer: torch.fx.Node
    consumers: list[torch.fx.Node]   # direct users of producer that get the quantized value
    spec: QuantSpec
    num_channels: int
    name: str                        # base module name, e.g. "conv1_weight_quantizer"
    scopes: tuple[str, ...]          # module paths it serves (consumers first, then the producer)
    serves: list[torch.fx.Node]      # the ops that asked for it (ends of look-through paths)
    reasons: list[str]
    overflow_fix: bool = False
    signed_fixed: bool = False       # signedness forced by the config
    override: dict = field(default_factory=dict)

    def describe(self) -> str:
        return (f"{self.name}: {self.group} {self.spec.bits}-bit {self.spec.mode} "
                f"{'per-channel' if self.spec.per_channel else 'per-tensor'} for "
                f"{', '.join(node_label(n) for n in self.serves)}")


@dataclass
class QuantizationPlan:
    points: list[QuantizationPoint]
    skipped: list[dict]

    def count(self, group: str) -> int:
        return sum(p.group == group for p in self.points)


def annotations(gm: torch.fx.GraphModule) -> list[QuantizationPoint]:
    """All points annotated on the graph, in graph order."""
    return [p for n in gm.graph.nodes for p in n.meta.get(ANNOTATION_KEY, ())]


def readable_name(node: torch.fx.Node, gm: torch.nn.Module | None = None) -> str:
    """The base of quantizer module names: ``conv1``, ``layer1_0_relu_1`` (module calls by
    their node name), ``layer1_0_add`` (functions by enclosing module path + op kind)."""
    if node.op in ("call_module", "placeholder", "get_attr", "output"):
        return node.name
    path = node.meta.get("module_path", "")
    if path and node.name.startswith(path.replace(".", "_")):
        return node.name  # a functionalized module call keeps the module's name (conv1)
    kind = (kind_of(node, gm) if gm is not None else None) or node.name
    return "_".join(p for p in (path.replace(".", "_"), kind) if p)


def node_label(node: torch.fx.Node) -> str:
    """An unambiguous readable label of an op: ``conv1``, ``layer1_0_add_1`` (path + node name)."""
    if node.op in ("call_module", "placeholder", "get_attr", "output"):
        return node.name
    path = node.meta.get("module_path", "").replace(".", "_")
    if not path or node.name.startswith(path):
        return node.name
    return f"{path}_{node.name}"
