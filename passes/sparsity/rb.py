"""Regularization-based sparsity (NNCF's ``rb_sparsity``): masks learned with a density loss.

Every weight has a trainable logit (``RBMask``, initialized to ``logit(0.99)``).
Until ``sparsity_freeze_epoch`` the weights train under a sampled binary mask
(keep probability ``sigmoid(logit)``) while ``ctrl.loss()``, NNCF's ``SparseLoss``,

    global: ((sum_l sum(m_l) / sum_l n_l - (1 - level)) / p) ** 2
    local:  ((sum_l |sum(m_l) / n_l - (1 - level)|) / p) ** 2

with ``m = [sigmoid(logit) > 0.5]`` (straight-through), ``p = 0.05`` and
``level`` the schedule's current sparsity level (default schedule:
exponential), pulls the deterministic mask's density to ``1 - level``; the
task loss decides which logits stay above 0. From ``sparsity_freeze_epoch``
on (NNCF's zero-based epoch index: the first epoch trained with frozen masks)
the loss is off, the masks are the deterministic ones and fixed (the logits
get no gradient), and the weights train under the final mask, which is what
recovers the accuracy lost to the sampled masks. Freezing warns when the masks
are more than ``p`` off the scheduled density (the logits had not got there).
"""
from __future__ import annotations

import warnings

import torch

from fxcompress.checkpoint import rng_state, set_rng_state
from fxcompress.registry import register_algorithm
from fxcompress.distributed import broadcast_from_rank0, is_distributed

from .base import (SCHEDULE_DEFAULTS, SCHEDULE_PARAMS, SparseLayer, SparsityController, SparsityPass,
                   check_schedule_params, scheduler_from_params)
from .masks import RBMask

__all__ = ["RBSparsity", "RBSparsityController", "SPARSE_LOSS_P"]

SPARSE_LOSS_P = 0.05  # NNCF SparseLoss's p


class RBSparsityController(SparsityController):
    algorithm = "rb_sparsity"

    def __init__(self, gm, layers: list[SparseLayer], skipped: list[dict], params: dict):
        scheduler = scheduler_from_params(params)
        super().__init__(gm, layers, skipped, scheduler, target_level=scheduler.target_level)
        self.mode = params["sparsity_level_setting_mode"]
        self.p = SPARSE_LOSS_P
        if hasattr(scheduler, "set_signal"):  # adaptive: raise the level once the masks keep up
            scheduler.set_signal(self.sparsity)
        scheduler.on_update(self._follow_schedule)

    def _follow_schedule(self, scheduler):
        if not self.frozen and scheduler.frozen and self.pinned_level is None:
            self.freeze()

    def set_compression_rate(self, level: float):
        """Drive the masks to sparsity ``level`` from now on (accuracy-aware training searches it).

        The loss targets ``level`` instead of the schedule's level, and the schedule's
        freeze no longer applies (frozen masks are trainable again).
        """
        self._pin(level)
        self.frozen = False
        for layer in self.layers:
            layer.mask.frozen = False

    def freeze(self):
        super().freeze()
        for layer in self.layers:
            layer.mask.frozen = True
        self._warn_if_off_target()

    def _warn_if_off_target(self):
        """The masks are final from here on: say so when the loss had not yet pulled them to the level
        the schedule asks for (the logits start at logit(0.99) and move at the optimizer's pace)."""
        if not self.layers:
            return
        density, target = 1.0 - self.sparsity(), 1.0 - self.scheduler.current_level
        if abs(density - target) > self.p:
            warnings.warn(
                f"rb_sparsity: the masks froze at epoch {self.scheduler.current_epoch} with density "
                f"{density:.3f}, but the schedule asks for {target:.3f}: the mask logits had not reached the "
                f"target yet; give them a larger learning rate (compression_lr_multiplier) or a later "
                f"sparsity_freeze_epoch", stacklevel=2)

    def loss(self):
        if self.frozen or not self.layers:
            return None
        target_density = 1.0 - self.current_level
        kept = [layer.mask.keep_probability_mask().sum() for layer in self.layers]
        sizes = [layer.mask.logits.numel() for layer in self.layers]
        if self.mode == "local":
            deviation = sum((k / n - target_density).abs() for k, n in zip(kept, sizes))
            return (deviation / self.p).pow(2)
        density = sum(kept) / sum(sizes)
        return ((density - target_density) / self.p).pow(2)

    def summary_statistics(self) -> dict:
        with torch.no_grad():
            probs = [torch.sigmoid(layer.mask.logits).sum() for layer in self.layers]
            n = sum(layer.mask.logits.numel() for layer in self.layers)
            mean_keep = float(sum(probs) / n) if n else 1.0
        level = self.current_level
        return {"schedule": self.scheduler.name, "mode": self.mode,
                "target_density": 1.0 - level, "mean_sparse_prob": 1.0 - mean_keep}

    def _device(self) -> torch.device:
        return self.layers[0].mask.logits.device if self.layers else torch.device("cpu")

    def state_dict(self) -> dict:
        # The stochastic masks draw from the global torch RNG: saving its state makes a resumed
        # run draw the masks the uninterrupted run would have (docs/sparsity.md, Checkpoints).
        return {**super().state_dict(), "rng_state": rng_state(self._device())}

    def load_state_dict(self, state: dict):
        super().load_state_dict(state)
        for layer in self.layers:
            layer.mask.frozen = self.frozen
        if "rng_state" in state:
            set_rng_state(state["rng_state"], self._device(), owner="rb_sparsity controller")

    def distributed(self):
        """NNCF's scheme: one RNG state for all ranks, so stochastic masks agree; logits from rank 0."""
        if not is_distributed():
            return
        state = torch.get_rng_state()
        broadcast_from_rank0([state])
        torch.set_rng_state(state)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda_state = torch.cuda.get_rng_state()
            broadcast_from_rank0([cuda_state])
            torch.cuda.set_rng_state(cuda_state)
        broadcast_from_rank0([layer.mask.logits for layer in self.layers])


@register_algorithm
class RBSparsity(SparsityPass):
    """``RBSparsity(sparsity_target=0.5, schedule="exponential", sparsity_target_epoch=..., ...)``."""
    algorithm = "rb_sparsity"
    schema = {"type": "object", "properties": {
        **SCHEDULE_PARAMS,
        "compression_lr_multiplier": {"type": "number", "exclusiveMinimum": 0},
    }}
    defaults = {**SCHEDULE_DEFAULTS, "schedule": "exponential"}

    @classmethod
    def check(cls, params: dict, prefix: str):
        check_schedule_params(params, prefix)

    def make_mask(self, weight: torch.Tensor) -> RBMask:
        return RBMask(weight, lr_multiplier=self.params.get("compression_lr_multiplier"))

    def make_controller(self, gm, layers, skipped) -> RBSparsityController:
        return RBSparsityController(gm, layers, skipped, self.params)
