"""Filter importance and how it is compared across layers.

- ``filter_importance(weight, out_axis, criterion)``: one number per filter.
  ``L1`` / ``L2``: the filter's norm; ``geometric_median`` (He et al., FPGM):
  the sum of Euclidean distances to all other filters of the layer, so filters
  close to the layer's geometric median (replaceable by the others) rank low.
- A channel class's importance is the sum over its producers' filters (a
  residual group's channel ``c`` is produced by several convs; a depthwise
  conv with multiplier ``m`` contributes ``m`` filters).
- **Normalization across layers** (global ranking only, as NNCF): each layer's
  weight is divided by its L2 norm before the importance is taken, so layers
  with large weights do not dominate the ranking.
- **Interlayer ranking**: ``unweighted_ranking`` ranks classes by normalized
  importance; ``flops_weighted_ranking`` divides it by the FLOPs a class costs
  (relative to the mean), so at equal importance expensive channels go first.
"""
from __future__ import annotations

import numpy as np
import torch

from fxcompress.graph import get_attr_value

from .dependency import ChannelAnalysis

__all__ = ["CRITERIA", "filter_importance", "l2_normalized", "class_importance", "flops_weighted"]

CRITERIA = ("L2", "L1", "geometric_median")


def filter_importance(weight: torch.Tensor, out_axis: int, criterion: str) -> torch.Tensor:
    """Importance of each filter (slice along ``out_axis``) of ``weight``."""
    w = weight.detach().movedim(out_axis, 0).flatten(1).double()
    if criterion == "L1":
        return w.abs().sum(dim=1)
    if criterion == "L2":
        return w.norm(dim=1)
    if criterion == "geometric_median":
        return torch.cdist(w, w).sum(dim=1)
    raise ValueError(f"unknown filter importance {criterion!r}; known: {', '.join(CRITERIA)}")


def l2_normalized(weight: torch.Tensor) -> torch.Tensor:
    """``weight / ||weight||_2`` (NNCF's ``tensor_l2_normalizer``)."""
    return weight / weight.norm().clamp_min(1e-12)


def class_importance(analysis: ChannelAnalysis, gm, criterion: str, normalize: bool,
                     coefficients: dict[str, tuple[float, float]] | None = None) -> np.ndarray:
    """Importance per channel class: the sum of its producers' filter importances.

    ``coefficients`` (LeGR, ``legr.py``): a layer's filter importances become ``a * s + b``
    with its ``(a, b)``; layers without an entry keep theirs.
    """
    out = np.zeros(analysis.num_classes, dtype=np.float64)
    for layer in analysis.layers.values():
        if layer.out_space is None or layer.weight_target is None:
            continue
        weight = get_attr_value(gm, layer.weight_target)
        if normalize:
            weight = l2_normalized(weight.detach())
        scores = filter_importance(weight, layer.out_axis, criterion).cpu().numpy()
        if scores.shape[0] != layer.out_space.size:
            continue  # grouped transposed conv: blocked anyway
        if coefficients is not None and layer.name in coefficients:
            a, b = coefficients[layer.name]
            scores = a * scores + b
        np.add.at(out, analysis.classes_of(layer.out_space), scores)
    return out


def flops_weighted(importance: np.ndarray, class_flops: np.ndarray) -> np.ndarray:
    """Importance per FLOP, relative to the mean cost of a channel."""
    mean = class_flops[class_flops > 0].mean() if np.any(class_flops > 0) else 1.0
    relative = np.maximum(class_flops / mean, 1e-6)
    return importance / relative
