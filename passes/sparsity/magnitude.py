"""Magnitude sparsity: zero the weights of smallest importance, at a level given by a schedule.

Importance is ``|w|`` (``abs``) or ``|w| / ||w||_2`` per layer (``normed_abs``,
NNCF's default: layers compare fairly in global mode). At level ``L`` the
``k = round(L * n)`` least important weights get mask 0, where ``n`` counts the
weights of all sparsified layers (``global``) or of each layer (``local``);
ties are broken by position, so exactly ``k`` are masked. Masks are recomputed
from the current weights whenever the scheduled level changes (per epoch, or
per optimizer step with ``update_per_optimizer_step``) until
``sparsity_freeze_epoch``; the reported threshold is the importance of the
largest masked weight.
"""
from __future__ import annotations

import torch

from fxcompress.batchnorm import (BATCHNORM_ADAPTATION_SCHEMA, DEFAULT_NUM_BN_ADAPTATION_SAMPLES,
                                  adapt_batchnorm, average_batchnorm_statistics)
from fxcompress.registry import register_algorithm
from fxcompress.errors import ConfigError

from .base import (SCHEDULE_DEFAULTS, SCHEDULE_PARAMS, SparseLayer, SparsityController, SparsityPass,
                   check_schedule_params, scheduler_from_params)
from .masks import BinaryMask

__all__ = ["MagnitudeSparsity", "MagnitudeSparsityController", "WEIGHT_IMPORTANCE", "magnitude_masks"]


def _abs(w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs()


def _normed_abs(w: torch.Tensor) -> torch.Tensor:
    w = w.detach()
    return w.abs() / w.norm(2).clamp_min(torch.finfo(w.dtype).tiny)


WEIGHT_IMPORTANCE = {"abs": _abs, "normed_abs": _normed_abs}


def _lowest(importance: torch.Tensor, level: float) -> tuple[torch.Tensor, float | None]:
    """A flat 0/1 mask zeroing the ``round(level * n)`` smallest entries, and the threshold."""
    n = importance.numel()
    k = int(round(level * n))
    mask = torch.ones(n, dtype=importance.dtype, device=importance.device)
    if k == 0:
        return mask, None
    order = torch.argsort(importance, stable=True)
    mask[order[:k]] = 0
    return mask, float(importance[order[k - 1]])


def magnitude_masks(weights: list[torch.Tensor], level: float, importance: str = "normed_abs",
                    mode: str = "global") -> tuple[list[torch.Tensor], list[float | None]]:
    """Masks (shaped as the weights) and per-layer thresholds for sparsity ``level``."""
    if not 0.0 <= level < 1.0:
        raise ValueError(f"sparsity level must be in [0, 1), got {level}")
    scores = [WEIGHT_IMPORTANCE[importance](w).float().reshape(-1) for w in weights]
    if mode == "local":
        pairs = [_lowest(s, level) for s in scores]
        flat, thresholds = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        mask, threshold = _lowest(torch.cat(scores), level) if scores else (torch.ones(0), None)
        flat = list(torch.split(mask, [s.numel() for s in scores]))
        thresholds = [threshold] * len(scores)
    return [m.reshape(w.shape).to(w.dtype) for m, w in zip(flat, weights)], thresholds


class MagnitudeSparsityController(SparsityController):
    algorithm = "magnitude_sparsity"

    def __init__(self, gm, layers: list[SparseLayer], skipped: list[dict], params: dict):
        scheduler = scheduler_from_params(params)
        super().__init__(gm, layers, skipped, scheduler, target_level=scheduler.target_level)
        self.mode = params["sparsity_level_setting_mode"]
        self.importance = params["weight_importance"]
        bn = params.get("initializer", {}).get("batchnorm_adaptation")
        self.num_bn_adaptation_samples = (0 if bn is None
                                          else bn.get("num_bn_adaptation_samples", DEFAULT_NUM_BN_ADAPTATION_SAMPLES))
        self.bn_adapted = False
        self._adapted_bns: list = []
        self.applied_level: float | None = None
        self.thresholds: dict[str, float | None] = {}
        self.set_sparsity_level(scheduler.current_level)
        scheduler.on_update(self._follow_schedule)

    def needs_data(self) -> bool:
        return self.num_bn_adaptation_samples > 0

    def initialize(self, ctx):
        """BatchNorm adaptation to the sparsified weights, when ``initializer.batchnorm_adaptation`` asks."""
        if self.num_bn_adaptation_samples > 0 and ctx.data is not None and self.layers:
            self._adapted_bns = adapt_batchnorm(ctx.gm, ctx.data, self.num_bn_adaptation_samples,
                                                "magnitude sparsity: BatchNorm adaptation")
            self.bn_adapted = True

    def distributed(self):
        """Rank 0's masks, and the adapted BatchNorm statistics averaged over ranks."""
        super().distributed()
        average_batchnorm_statistics(self._adapted_bns)

    def _follow_schedule(self, scheduler):
        if self.frozen or self.pinned_level is not None:
            return
        if scheduler.current_level != self.applied_level:
            self.set_sparsity_level(scheduler.current_level)
        if scheduler.frozen:  # the level of the freeze epoch is applied, then masks stay
            self.freeze()

    def set_sparsity_level(self, level: float):
        """Recompute every mask from the current weights for sparsity ``level``."""
        if not 0.0 <= level < 1.0:
            raise ValueError(f"sparsity level must be in [0, 1), got {level}")
        weights = [layer.weight(self.gm) for layer in self.layers]
        masks, thresholds = magnitude_masks(weights, level, self.importance, self.mode)
        for layer, mask, threshold in zip(self.layers, masks, thresholds):
            layer.mask.set_mask(mask)
            self.thresholds[layer.mask_name] = threshold
        self.applied_level = float(level)

    def set_compression_rate(self, level: float):
        """Fix the sparsity level at ``level`` from now on (accuracy-aware training searches it).

        The schedule no longer changes the masks. They are recomputed from the current
        weights unless ``level`` is the level applied now (as after loading a checkpoint).
        """
        self._pin(level)
        if self.applied_level != self.pinned_level:
            self.set_sparsity_level(self.pinned_level)

    def layer_statistics(self, layer: SparseLayer) -> dict:
        return {"threshold": self.thresholds.get(layer.mask_name)}

    def summary_statistics(self) -> dict:
        summary = {"schedule": self.scheduler.name, "mode": self.mode, "weight_importance": self.importance,
                   "bn_adapted": self.bn_adapted}
        if self.mode == "global":
            summary["threshold"] = next(iter(self.thresholds.values()), None)
        return summary

    def state_dict(self) -> dict:
        return {**super().state_dict(), "applied_level": self.applied_level,
                "thresholds": dict(self.thresholds), "bn_adapted": bool(self.bn_adapted)}

    def load_state_dict(self, state: dict):
        # Masks come back with the graph's state dict (load_state); the controller must not
        # recompute them from weights that may not be loaded yet.
        self.applied_level = state.get("applied_level")
        self.thresholds = dict(state.get("thresholds", {}))
        self.bn_adapted = bool(state.get("bn_adapted", False))
        super().load_state_dict(state)


@register_algorithm
class MagnitudeSparsity(SparsityPass):
    """``MagnitudeSparsity(sparsity_target=0.5, schedule="polynomial", sparsity_target_epoch=10, ...)``."""
    algorithm = "magnitude_sparsity"
    schema = {"type": "object", "properties": {
        **SCHEDULE_PARAMS,
        "weight_importance": {"enum": ["abs", "normed_abs"]},
        # NNCF's GENERIC_INITIALIZER_SCHEMA: BatchNorm adaptation after the masks are set
        "initializer": {"type": "object", "additionalProperties": False, "properties": {
            "batchnorm_adaptation": BATCHNORM_ADAPTATION_SCHEMA}},
    }}
    defaults = {**SCHEDULE_DEFAULTS, "schedule": "polynomial", "weight_importance": "normed_abs"}

    @classmethod
    def check(cls, params: dict, prefix: str):
        if params["schedule"] == "adaptive":
            raise ConfigError(f"{prefix}.schedule: 'adaptive' follows the RB sparsity loss and exists only for "
                              f"rb_sparsity; use 'polynomial', 'exponential' or 'multistep'",
                              path=f"{prefix}.schedule")
        check_schedule_params(params, prefix)

    def make_mask(self, weight: torch.Tensor) -> BinaryMask:
        return BinaryMask(weight)

    def make_controller(self, gm, layers, skipped) -> MagnitudeSparsityController:
        return MagnitudeSparsityController(gm, layers, skipped, self.params)
