"""FLOPs and parameter counts: of any graph (``model_cost``) and of a pruning plan (``CostModel``).

FLOPs are ``2 x`` the multiply-accumulates of convolutions, transposed
convolutions and linear layers per sample (the batch dimension is not counted);
other ops are not counted, as in NNCF's pruning statistics. Parameters are all
parameters of the model except those of modules compression passes inserted
(masks hold buffers only; quantizer scales are left out).

``CostModel`` predicts both numbers for any set of pruned channel classes from
the analysis alone, with the same per-layer formula ``model_cost`` applies to
the real tensors of the folded model, so the tests can check prediction against
the folded graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx

from fxcompress.flops import model_macs, weighted_macs
from fxcompress.optable import Kind

from .dependency import ChannelAnalysis, Layer

__all__ = ["Cost", "layer_macs", "model_cost", "compression_params", "CostModel"]


@dataclass(frozen=True)
class Cost:
    flops: int
    params: int


def layer_macs(kind: str, weight_shape, spatial: int) -> int:
    """Multiply-accumulates per sample of one layer with this weight shape.

    conv ``[out, in/groups, *k]`` and transposed conv ``[in, out/groups, *k]``: the
    product of the weight shape per position (``spatial`` = output positions for
    a conv, input positions for a transposed conv); linear ``[out, in]``: per
    leading position (``fxcompress.flops``, the one counter).
    """
    return weighted_macs(weight_shape, spatial)


def _inserted_prefixes(gm: torch.fx.GraphModule) -> tuple[str, ...]:
    return tuple(f"{n.target}." for n in gm.graph.nodes
                 if n.op == "call_module" and n.meta.get("inserted_by"))


def compression_params(gm: torch.fx.GraphModule) -> int:
    """Parameters of the model, without those of modules compression passes inserted."""
    prefixes = _inserted_prefixes(gm)
    return sum(p.numel() for name, p in gm.named_parameters() if not name.startswith(prefixes))


def model_cost(gm: torch.fx.GraphModule) -> Cost:
    """FLOPs and parameters of a graph as it is (module or functional convs and linears)."""
    macs = model_macs(gm, kinds=(Kind.conv, Kind.conv_transpose, Kind.linear, Kind.addmm))
    return Cost(2 * macs, compression_params(gm))


class CostModel:
    """Predicted FLOPs/parameters after removing the elements of the pruned classes."""

    def __init__(self, analysis: ChannelAnalysis, gm: torch.fx.GraphModule):
        self.analysis = analysis
        self.sizes = np.array([s.size for s in analysis.spaces], dtype=np.int64)
        self.layers = [l for l in analysis.layers.values() if l.weight_shape]
        self.full_params = compression_params(gm)
        self._norm_affine = {id(n): _affine(gm, n.module_path) for n in analysis.norms}
        full = self.evaluate_kept(self.sizes)
        self.full = Cost(full[0], self.full_params)
        self._full_layer_params = full[1]

    def removed_per_space(self, pruned: np.ndarray) -> np.ndarray:
        a = self.analysis
        return np.bincount(a.element_space[pruned[a.class_of]], minlength=len(self.sizes))

    def new_weight_shape(self, layer: Layer, kept: np.ndarray) -> tuple[tuple, int]:
        """The layer's weight shape and groups with ``kept`` elements per space."""
        ws = list(layer.weight_shape)
        out_k = int(kept[layer.out_space.index]) if layer.out_space is not None else None
        in_k = int(kept[layer.in_space.index]) if layer.in_space is not None else None
        groups = layer.groups
        if layer.kind is Kind.conv:
            if out_k is not None:
                ws[0] = out_k
            if layer.grouped:  # whole groups go: each keeps its width, the count falls
                groups = in_k // ws[1] if in_k is not None else groups
            elif in_k is not None:
                ws[1] = in_k
        elif layer.kind is Kind.conv_transpose:
            if in_k is not None:
                ws[0] = in_k
            if out_k is not None:
                ws[1] = out_k // max(1, groups)
        else:  # linear [out, in], addmm [in, out]
            if in_k is not None:
                ws[layer.in_axis] = in_k
            if out_k is not None:
                ws[layer.out_axis] = out_k
        return tuple(ws), groups

    def evaluate_kept(self, kept: np.ndarray) -> tuple[int, int]:
        """(FLOPs, parameters of the costed layers and norms) with ``kept`` elements per space."""
        macs, params = 0, 0
        for layer in self.layers:
            ws, _ = self.new_weight_shape(layer, kept)
            macs += layer_macs(layer.kind, ws, layer.spatial)
            params += math.prod(ws)
            if layer.bias_target is not None:
                params += ws[layer.out_axis]
        for norm in self.analysis.norms:
            if self._norm_affine[id(norm)]:
                params += 2 * int(kept[norm.space.index])
        for space, per_channel in self.analysis.channel_params:  # LayerNorm affine, layer scales
            params += per_channel * int(kept[space.index])
        return 2 * macs, params

    def evaluate(self, pruned: np.ndarray) -> Cost:
        """FLOPs and parameters after pruning the classes flagged in ``pruned``."""
        kept = self.sizes - self.removed_per_space(pruned)
        flops, layer_params = self.evaluate_kept(kept)
        return Cost(flops, self.full_params - (self._full_layer_params - layer_params))

    def flops_per_class(self, classes: np.ndarray) -> np.ndarray:
        """FLOPs saved by pruning each of ``classes`` alone (for FLOPs-weighted ranking)."""
        out = np.zeros(len(classes), dtype=np.float64)
        for i, c in enumerate(classes.tolist()):
            spaces, counts = self.analysis.class_spaces[c]
            kept = self.sizes.copy()
            kept[spaces] -= counts
            touched = set(spaces.tolist())
            saved = 0
            for layer in self.layers:
                ins = layer.in_space.index if layer.in_space is not None else -1
                outs = layer.out_space.index if layer.out_space is not None else -1
                if ins in touched or outs in touched:
                    full_ws, _ = self.new_weight_shape(layer, self.sizes)
                    new_ws, _ = self.new_weight_shape(layer, kept)
                    saved += layer_macs(layer.kind, full_ws, layer.spatial) - \
                        layer_macs(layer.kind, new_ws, layer.spatial)
            out[i] = 2 * saved
        return out


def _affine(gm, path: str) -> bool:
    module = gm.get_submodule(path)
    return getattr(module, "weight", None) is not None
