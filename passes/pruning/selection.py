"""Which channel classes to prune for a level: per group (uniform), globally, or for a FLOPs budget.

Limits that hold in every mode:

- at most ``floor(quota * n)`` of a group's ``n`` channels are pruned (NNCF's
  pruning quota, 0.9), so a group never disappears;
- no tensor loses all its channels (a class is skipped when pruning it would
  empty a space: e.g. one branch of a concat that a residual ties to a group);
- with ``round_to = r > 1`` a group keeps a multiple of ``r`` channels (its
  count rounded up; a group smaller than ``r`` is not pruned), so the smaller
  layers stay aligned to the runtime's SIMD blocks (Torch-Pruning's ``round_to``).

Modes:

- ``uniform(level)``: every prunable group prunes ``round(level * n)`` of its
  least important channels (``all_weights: false``);
- ``global_(level)``: the ``level`` fraction of all candidate channels with the
  lowest (normalized, optionally FLOPs-weighted) scores (``all_weights: true``);
- ``for_flops(fraction)``: the least pruning that removes ``fraction`` of the
  model's FLOPs: a bisection over the uniform level, or, for global ranking, a
  binary search over the global threshold (how many channels of the global
  order are taken). FLOPs only fall as more channels are pruned, so both
  searches are exact.
"""
from __future__ import annotations

import math

import numpy as np

from .cost import CostModel
from .dependency import ChannelAnalysis, Group

__all__ = ["Selector", "PRUNING_QUOTA"]

PRUNING_QUOTA = 0.9


class Selector:
    def __init__(self, analysis: ChannelAnalysis, groups: list[Group], cost: CostModel,
                 quota: float = PRUNING_QUOTA, round_to: int = 1):
        self.analysis = analysis
        self.groups = groups
        self.cost = cost
        self.round_to = max(1, int(round_to))
        self.limit = {g.id: int(math.floor(quota * g.size + 1e-9)) for g in groups}
        self.candidates = np.concatenate([g.classes for g in groups]) if groups else np.zeros(0, np.int64)

    # -- the constrained greedy every mode uses --------------------------------------------
    def _take(self, order: np.ndarray, per_group: dict[int, int], max_total: int | None = None) -> np.ndarray:
        a = self.analysis
        pruned = np.zeros(a.num_classes, dtype=bool)
        removed = np.zeros(len(self.cost.sizes), dtype=np.int64)
        taken = dict.fromkeys(per_group, 0)
        total = 0
        for c in order.tolist():
            if max_total is not None and total >= max_total:
                break
            g = int(a.group_of[c])
            if taken.get(g, 0) >= per_group.get(g, 0):
                continue
            spaces, counts = a.class_spaces[c]
            if np.any(removed[spaces] + counts >= self.cost.sizes[spaces]):
                continue
            removed[spaces] += counts
            taken[g] += 1
            total += 1
            pruned[c] = True
        return pruned

    def _group_order(self, scores: np.ndarray) -> np.ndarray:
        parts = [g.classes[np.argsort(scores[g.classes], kind="stable")] for g in self.groups]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _global_order(self, scores: np.ndarray) -> np.ndarray:
        return self.candidates[np.argsort(scores[self.candidates], kind="stable")]

    # -- modes ---------------------------------------------------------------------------------
    def _rounded(self, size: int, pruned: int) -> int:
        """How many of ``size`` channels to prune so that a multiple of ``round_to`` stays (at most ``pruned``)."""
        r = self.round_to
        if r == 1:
            return pruned
        return max(0, size - min(size, -(-(size - pruned) // r) * r))

    def _round_groups(self, pruned: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Give back the most important pruned channels of each group until it keeps a multiple of round_to."""
        if self.round_to == 1:
            return pruned
        pruned = pruned.copy()
        for g in self.groups:
            taken = g.classes[pruned[g.classes]]
            excess = len(taken) - self._rounded(g.size, len(taken))
            if excess > 0:
                pruned[taken[np.argsort(-scores[taken], kind="stable")[:excess]]] = False
        return pruned

    def uniform(self, level: float, scores: np.ndarray) -> np.ndarray:
        per_group = {g.id: self._rounded(g.size, min(int(round(level * g.size)), self.limit[g.id]))
                     for g in self.groups}
        return self._round_groups(self._take(self._group_order(scores), per_group), scores)

    def global_(self, level: float, scores: np.ndarray) -> np.ndarray:
        return self.global_count(int(round(level * len(self.candidates))), scores)

    def global_count(self, count: int, scores: np.ndarray) -> np.ndarray:
        pruned = self._take(self._global_order(scores), dict(self.limit), max_total=count)
        return self._round_groups(pruned, scores)

    def max_flops_fraction(self, scores: np.ndarray, global_ranking: bool) -> float:
        """The largest fraction of FLOPs the prunable groups can remove."""
        pruned = self.global_count(len(self.candidates), scores) if global_ranking else self.uniform(1.0, scores)
        return 1.0 - self.cost.evaluate(pruned).flops / max(1, self.cost.full.flops)

    def for_flops(self, fraction: float, scores: np.ndarray, global_ranking: bool) -> np.ndarray:
        if fraction <= 0:
            return np.zeros(self.analysis.num_classes, dtype=bool)
        budget = self.cost.full.flops * (1.0 - fraction)

        def fits(pruned):
            return self.cost.evaluate(pruned).flops <= budget + 1e-6

        if global_ranking:
            lo, hi = 0, len(self.candidates)
            best = self.global_count(hi, scores)
            while lo < hi:  # smallest count whose pruning fits the budget
                mid = (lo + hi) // 2
                pruned = self.global_count(mid, scores)
                if fits(pruned):
                    hi, best = mid, pruned
                else:
                    lo = mid + 1
            return best
        lo, hi = 0.0, 1.0
        best = self.uniform(1.0, scores)
        for _ in range(40):  # smallest uniform level whose pruning fits the budget
            mid = (lo + hi) / 2
            pruned = self.uniform(mid, scores)
            if fits(pruned):
                hi, best = mid, pruned
            else:
                lo = mid
        return best
