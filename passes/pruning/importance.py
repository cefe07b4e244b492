"""Filter importance and how it is compared across layers.

- ``filter_importance(weight, out_axis, criterion)``: one number per filter.
  ``L1`` / ``L2``: the filter's norm; ``geometric_median`` (He et al., FPGM):
  the sum of Euclidean distances to all other filters of the layer, so filters
  close to the layer's geometric median (replaceable by the others) rank low.
- ``taylor`` (first order, Molchanov et al. 2017/2019, Torch-Pruning's
  ``TaylorImportance``): ``sum |w * dL/dw|`` over the filter's weights, summed
  over the backward passes since the masks were last set (``TaylorScores``:
  gradient hooks on the producers' weights). It estimates how much the loss
  changes when the filter is removed, so it needs gradients of the task loss.
- ``bn_scale`` (network slimming, Liu et al. 2017): ``|gamma|`` of the
  BatchNorm channel after the filter; a channel with no BatchNorm scores 0
  (a group without any BatchNorm cannot be ranked this way: ConfigError).
- ``group_l2`` (group-wide magnitude, Torch-Pruning's ``GroupMagnitudeImportance(p=2)``):
  every weight a channel touches counts: its producers' filters, the scale of each
  BatchNorm / LayerNorm on it, and its consumers' input slices. Per channel, the
  mean over these members of their ``sum w**2`` (``group_importance``); it ranks as
  Torch-Pruning's does (same channels pruned in benchmarks/RESULTS.md).
- A channel class's importance is the sum over all coupled layers (a
  residual group's channel ``c`` is produced by several convs and normalized by
  several BatchNorms; a depthwise conv with multiplier ``m`` contributes ``m``
  filters).
- **Normalization across layers** (global ranking only, as NNCF): each layer's
  weight is divided by its L2 norm before the importance is taken, so layers
  with large weights do not dominate the ranking.
- **Interlayer ranking**: ``unweighted_ranking`` ranks classes by normalized
  importance; ``flops_weighted_ranking`` divides it by the FLOPs a class costs
  (relative to the mean), so at equal importance expensive channels go first.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from fxcompress.graph import get_attr_value

from .dependency import ChannelAnalysis

__all__ = ["CRITERIA", "WEIGHT_CRITERIA", "filter_importance", "l2_normalized", "class_importance",
           "group_importance", "flops_weighted", "TaylorScores"]

WEIGHT_CRITERIA = ("L2", "L1", "geometric_median")  # per filter, from the producers' weights alone
CRITERIA = WEIGHT_CRITERIA + ("group_l2", "taylor", "bn_scale")


def filter_importance(weight: torch.Tensor, out_axis: int, criterion: str) -> torch.Tensor:
    """Importance of each filter (slice along ``out_axis``) of ``weight``."""
    w = weight.detach().movedim(out_axis, 0).flatten(1).double()
    if criterion == "L1":
        return w.abs().sum(dim=1)
    if criterion == "L2":
        return w.norm(dim=1)
    if criterion == "geometric_median":
        return torch.cdist(w, w).sum(dim=1)
    raise ValueError(f"unknown weight importance {criterion!r}; known: {', '.join(WEIGHT_CRITERIA)}")


def taylor_filter_scores(weight: torch.Tensor, grad: torch.Tensor, out_axis: int) -> torch.Tensor:
    """``sum |w * g|`` per filter (slice along ``out_axis``)."""
    return (weight.detach() * grad.detach()).abs().movedim(out_axis, 0).flatten(1).sum(dim=1).double()


class TaylorScores:
    """First-order Taylor importance of the producers' filters, accumulated from the backward passes.

    ``attach()`` puts a gradient hook on each producer's weight parameter: every
    backward pass adds ``|w * dL/dw|`` per filter. A pruned filter gets no gradient
    through its mask, so it scores 0 and stays pruned. ``reset()`` starts a new sum
    (after the masks were set from it); ``detach()`` removes the hooks (once the
    masks are frozen: no cost from then on). The hooks live on the parameters, not in
    the graph, so the GraphModule still pickles and deep-copies.
    """

    def __init__(self, gm, layers):
        self.layers = [layer for layer in layers if layer.weight_target is not None]
        self.gm = gm
        self.sums: dict[str, torch.Tensor] = {}
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self):
        if self._handles:
            return
        for layer in self.layers:
            param = get_attr_value(self.gm, layer.weight_target)
            if isinstance(param, torch.Tensor) and param.requires_grad:
                self._handles.append(param.register_hook(functools.partial(self._accumulate, layer, param)))

    def _accumulate(self, layer, param, grad):
        scores = taylor_filter_scores(param, grad, layer.out_axis)
        previous = self.sums.get(layer.name)
        self.sums[layer.name] = scores if previous is None else previous + scores.to(previous.device)
        return None  # the gradient itself is left alone

    def detach(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self):
        self.sums = {}

    @property
    def ready(self) -> bool:
        """True once a backward pass reached the producers' weights since the last reset."""
        return bool(self.sums)

    def filter_scores(self, layer) -> torch.Tensor | None:
        return self.sums.get(layer.name)


def l2_normalized(weight: torch.Tensor) -> torch.Tensor:
    """``weight / ||weight||_2`` (NNCF's ``tensor_l2_normalizer``)."""
    return weight / weight.norm().clamp_min(1e-12)


def _normalized_scores(scores: torch.Tensor) -> torch.Tensor:
    """A layer's scores divided by their L2 norm: the normalization of gradient/BN criteria in global ranking."""
    return scores / scores.norm().clamp_min(1e-30)


def bn_scale_importance(analysis: ChannelAnalysis, gm, normalize: bool) -> np.ndarray:
    """``|gamma|`` per channel class, summed over the BatchNorms on its channels."""
    out = np.zeros(analysis.num_classes, dtype=np.float64)
    for norm in analysis.norms:
        gamma = getattr(gm.get_submodule(norm.module_path), "weight", None)
        if gamma is None:  # affine=False: no scale to rank by
            continue
        scores = gamma.detach().abs().double()
        if normalize:
            scores = _normalized_scores(scores)
        np.add.at(out, analysis.classes_of(norm.space), scores.cpu().numpy())
    return out


def _squares_per_slice(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """``sum t**2`` over each slice of ``tensor`` along ``axis``."""
    t = tensor.detach().double().movedim(axis, 0)
    return t.reshape(t.shape[0], -1).pow(2).sum(dim=1)


def group_importance(analysis: ChannelAnalysis, gm, normalize: bool) -> np.ndarray:
    """``group_l2`` per channel class: the mean over the members that touch it of their ``sum w**2`` for
    the channel (see the module docstring); ``normalize`` (global ranking) divides each group's
    scores by their mean, as Torch-Pruning's ``normalizer="mean"``.

    Members: each producer (its filter), each BatchNorm and channel LayerNorm (its scale), each
    consumer (its weight's input slice; not a grouped conv's, whose inputs are its own filters'
    groups, already counted as a producer). Biases and shifts are left out as Torch-Pruning's
    default does (``bias=False``): counting them cost 1.2 points with distillation in
    benchmarks/RESULTS.md. A per-member normalization (each member's scores over their mean)
    cost 0.6-1.0 point there too: it gives a layer with a few large weights as much say as one
    with many, where the raw sums follow the output energy each member carries."""
    total = np.zeros(analysis.num_classes, dtype=np.float64)
    members = np.zeros(analysis.num_classes, dtype=np.int64)

    def add(space, per_element: torch.Tensor):
        classes = analysis.classes_of(space)
        np.add.at(total, classes, per_element.cpu().numpy())  # flatten -> linear: a channel's features add up
        members[np.unique(classes)] += 1

    for layer in analysis.layers.values():
        if layer.weight_target is None:
            continue
        weight = get_attr_value(gm, layer.weight_target)
        if layer.out_space is not None and weight.shape[layer.out_axis] == layer.out_space.size:
            add(layer.out_space, _squares_per_slice(weight, layer.out_axis))
        if layer.in_space is not None and not layer.grouped and weight.shape[layer.in_axis] == layer.in_space.size:
            add(layer.in_space, _squares_per_slice(weight, layer.in_axis))
    scales = [getattr(gm.get_submodule(norm.module_path), "weight", None) for norm in analysis.norms]
    scales += [get_attr_value(gm, site.weight) if site.weight else None for site in analysis.layer_norms]
    for space, scale in zip([n.space for n in analysis.norms] + [s.space for s in analysis.layer_norms], scales):
        if scale is not None:
            add(space, _squares_per_slice(scale, 0))
    scores = total / np.maximum(members, 1)
    if normalize:
        for group in analysis.groups:
            mean = scores[group.classes].mean()
            if mean > 0:
                scores[group.classes] /= mean
    return scores


def class_importance(analysis: ChannelAnalysis, gm, criterion: str, normalize: bool,
                     coefficients: dict[str, tuple[float, float]] | None = None,
                     taylor: TaylorScores | None = None) -> np.ndarray:
    """Importance per channel class: the sum over its coupled layers (``bn_scale``: its BatchNorms;
    otherwise its producers' filters; ``taylor`` reads the gradients ``taylor`` accumulated).

    ``coefficients`` (LeGR, ``legr.py``): a layer's filter importances become ``a * s + b``
    with its ``(a, b)``; layers without an entry keep theirs.
    """
    if criterion == "bn_scale":
        return bn_scale_importance(analysis, gm, normalize)
    if criterion == "group_l2":
        return group_importance(analysis, gm, normalize)
    if criterion == "taylor" and (taylor is None or not taylor.ready):
        raise RuntimeError("filter_importance 'taylor' needs the gradients of a backward pass before "
                           "channels can be ranked")
    out = np.zeros(analysis.num_classes, dtype=np.float64)
    for layer in analysis.layers.values():
        if layer.out_space is None or layer.weight_target is None:
            continue
        if criterion == "taylor":
            scores = taylor.filter_scores(layer)
            if scores is None:  # no gradient reached it (frozen, or outside the prunable groups)
                continue
            scores = (_normalized_scores(scores) if normalize else scores).cpu().numpy()
        else:
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
