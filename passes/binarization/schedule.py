"""The staged binarization schedule: NNCF's staged schedule (``fxcompress.schedulers.StagedScheduler``,
its start epochs and learning-rate / weight-decay policy) plus the binarization stage names.

Epoch ``e`` (counted from 0, ``epoch_step()`` at its end) trains with

- activations binarized iff ``e >= activations_quant_start_epoch``,
- weights binarized iff ``e >= weights_quant_start_epoch``.

(NNCF counts from -1 and steps at the start of an epoch: the same epochs
binarize.) The stage is a pure function of the counters, so loading a
checkpoint's counters restores it; listeners (the controller) are told after
every update and switch the binarizers.
"""
from __future__ import annotations

from fxcompress.schedulers import LR_POLY_POWER, StagedScheduler

__all__ = ["StagedBinarizationScheduler", "STAGES", "LR_POLY_POWER"]

STAGES = ("float", "activations_binarized", "weights_binarized", "fully_binarized")


class StagedBinarizationScheduler(StagedScheduler):
    STAGES = STAGES

    def __init__(self, activations_quant_start_epoch: float = 1, weights_quant_start_epoch: float = 2, **policy):
        super().__init__(activations_quant_start_epoch, weights_quant_start_epoch, **policy)
