"""SmoothQuant-style activation smoothing (``Quantize(smooth_quant_alpha=0.65)``; NNCF's ``SmoothQuant``).

Transformer activations have a few channels with far larger values than the rest, and a
per-tensor activation quantizer spends its range on them. Smoothing divides each channel of
the activation by ``s_j`` and multiplies the same input channel of the weights of every linear
layer that reads it by ``s_j``: the float model computes the same function, and the outliers
move from the activation (per-tensor quantized) into the weights (per-output-channel
quantized, where a scaled input column costs less). As SmoothQuant (Xiao et al., 2023):

    s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha)

with ``max|X_j|`` over the calibration data (float model) and ``max|W_:,j|`` over all linear
layers reading ``X``, then clipped as NNCF's ``SmoothQuant`` clips them: up to the 10th percentile
of the layer's scales (the flattest channels are not made larger) and down to 100 (no weight
column grows more than 100x). The transformer default alpha is 0.65 (``TRANSFORMER_DEFAULTS``,
docs/transformers.md has the measurements; NNCF's default for linear layers is 0.95).

Where: an activation quantizer whose every consumer is a linear layer with quantized weights
(the q/k/v projections after a LayerNorm, the feed-forward layers); the compile step inserts an
``ActivationSmoothing`` module (``x / scale``, scale 1 until initialized) right before that
quantizer, so other consumers of the same tensor (a residual add) see it unscaled. Conv layers
are never smoothed (off for CNNs, as NNCF). ``initialize()`` measures ``max|X_j|`` in one pass
over the float model, sets ``scale`` and replaces each weight by ``W * s`` (a new parameter:
the user's model keeps its own), before the ranges are initialized on the smoothed values.
A later ``initialize()`` first takes the previous ``s`` out of the weights again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

from fxcompress.graph import add_module, copy_meta, get_attr_value
from fxcompress.quantizers import FakeQuantizer
from fxcompress.weights import weighted_ops

from .bias_correction import set_parameter

__all__ = ["ActivationSmoothing", "SmoothingGroup", "insert_smoothing", "smooth"]

_STATISTIC_FLOOR = 1e-5   # NNCF clips max|X| and max|W| to this before the power
_SCALE_FLOOR_QUANTILE = 0.1  # NNCF: scales below the layer's 10th percentile are raised to it
_SCALE_CEILING = 100.0    # NNCF: no channel is divided by more than 100


class ActivationSmoothing(nn.Module):
    """Divides the last axis of its input by a per-channel ``scale`` (the consumers' weights hold it)."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}"


@dataclass
class SmoothingGroup:
    """One smoothed activation and the weights (parameter paths) of the linear layers reading it."""
    module: str
    weights: tuple[str, ...]


def insert_smoothing(gm: torch.fx.GraphModule, quantizer_names: list[str], inserted_by: str
                     ) -> list[SmoothingGroup]:
    """An ``ActivationSmoothing`` before every listed activation quantizer that feeds only linear layers
    with quantized parameter weights (each weight read by one layer only); returns the groups."""
    linears = {op.node: op for op in weighted_ops(gm, ("linear",))}
    # Every read of each parameter, not only by linear layers: a weight tied to another module's
    # parameter (a masked-LM decoder sharing the embedding table) must not be scaled, which would change
    # the table or untie it. So: reads by get_attr nodes, plus one per extra name the tensor has.
    names: dict[int, int] = {}
    for _, parameter in gm.named_parameters(remove_duplicate=False):
        names[id(parameter)] = names.get(id(parameter), 0) + 1
    reads: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            key = id(get_attr_value(gm, node.target))
            reads[key] = reads.get(key, 0) + len(node.users)
    weight_uses = {}
    for op in linears.values():
        if op.weight_source is not None:
            key = id(get_attr_value(gm, op.weight_source.target))
            weight_uses[op.weight_source.target] = reads.get(key, 0) + names.get(key, 1) - 1
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    groups = []
    for name in quantizer_names:
        node = nodes.get(name)
        if node is None or not node.users:
            continue
        ops = [linears.get(user) for user in node.users]
        if not all(op is not None and op.node.args[0] is node and op.weight_source is not None
                   and weight_uses[op.weight_source.target] == 1 and _weight_quantized(gm, op) for op in ops):
            continue
        channels = get_attr_value(gm, ops[0].weight_source.target).shape[1]
        module_name = add_module(gm, f"{name.removesuffix('_quantizer')}_smoothing", ActivationSmoothing(channels))
        source = node.args[0]
        with gm.graph.inserting_before(node):
            smoothing = gm.graph.call_module(module_name, (source,))
        copy_meta(source, smoothing, inserted_by)
        node.replace_input_with(source, smoothing)
        groups.append(SmoothingGroup(module_name, tuple(op.weight_source.target for op in ops)))
    if groups:
        gm.graph.lint()
        gm.recompile()
    return groups


def _weight_quantized(gm: torch.fx.GraphModule, op) -> bool:
    current = op.weight_input
    while isinstance(current, torch.fx.Node) and current.op == "call_module":
        if isinstance(gm.get_submodule(current.target), FakeQuantizer):
            return True
        current = current.args[0] if current.args else None
    return False


@torch.no_grad()
def unsmooth(gm: torch.fx.GraphModule, groups: list[SmoothingGroup]):
    """Take the scales out of the weights again and reset them to 1 (the float model as compiled)."""
    for group in groups:
        module = gm.get_submodule(group.module)
        if torch.equal(module.scale, torch.ones_like(module.scale)):
            continue
        for path in group.weights:
            set_parameter(gm, path, get_attr_value(gm, path) / module.scale)
        module.scale.fill_(1.0)


class AbsMax:
    """Per-channel (last axis) maximum of |x| over everything observed (a forward pre-hook)."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def __call__(self, module, args):
        x = args[0].detach()
        amax = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        self.value = amax if self.value is None else torch.maximum(self.value, amax)


def smoothing_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-channel ``max|X| ** alpha / max|W| ** (1 - alpha)``, clipped as NNCF clips them; 1 for a channel
    that is zero in the data or in every weight (nothing to move)."""
    scale = x_max.clamp_min(_STATISTIC_FLOOR).pow(alpha) / w_max.clamp_min(_STATISTIC_FLOOR).pow(1 - alpha)
    floor = torch.quantile(scale, _SCALE_FLOOR_QUANTILE)
    scale = scale.clamp(min=float(floor), max=_SCALE_CEILING)
    return torch.where((x_max > 0) & (w_max > 0), scale, torch.ones_like(scale))


@torch.no_grad()
def smooth(gm: torch.fx.GraphModule, groups: list[SmoothingGroup], alpha: float, run_float_pass) -> int:
    """Measure, then set every group's scales and weights; returns how many groups were smoothed.

    ``run_float_pass()`` runs the calibration data through ``gm`` with every quantizer off.
    """
    unsmooth(gm, groups)
    observers = {g.module: AbsMax() for g in groups}
    hooks = [gm.get_submodule(g.module).register_forward_pre_hook(observers[g.module]) for g in groups]
    try:
        run_float_pass()
    finally:
        for h in hooks:
            h.remove()
    smoothed = 0
    for group in groups:
        x_max = observers[group.module].value
        if x_max is None:
            continue
        weights = [get_attr_value(gm, path) for path in group.weights]
        w_max = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0).float()
        scale = smoothing_scales(x_max, w_max, alpha)
        module = gm.get_submodule(group.module)
        module.scale.copy_(scale.to(module.scale))
        for path, weight in zip(group.weights, weights):
            set_parameter(gm, path, weight * scale.to(weight))
        smoothed += 1
    return smoothed
