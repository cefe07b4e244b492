"""Progressive pruning schedules (NNCF's ``schedule``: exponential, exponential_with_bias, baseline).

Built on the shared level schedulers of ``fxcompress.schedulers`` (``epoch_step()``
at the end of each epoch; epoch ``e`` trains at ``level_at(e)``):

- ``num_init_steps = w`` warmup epochs train at ``pruning_init``;
- ``exponential``: the density ``1 - level`` decays exponentially from
  ``1 - pruning_init`` to ``1 - target`` over ``pruning_steps`` epochs (the
  target is reached at epoch ``w + pruning_steps - 1``), reusing
  ``fxcompress.schedulers.ExponentialScheduler``;
- ``exponential_with_bias``: ``level(t) = a * exp(-k * t) + b`` with
  ``level(0) = pruning_init``, ``level(E) = target`` and
  ``level(E / 8) = 3/4 * target`` (``E = pruning_steps - 1``; Zhuang et al.
  2018, as NNCF), capped at the target;
- ``baseline``: the target right after warmup (``ConstantScheduler``).

Masks are recomputed from the current weights at every epoch boundary until
``freeze_epoch = w + pruning_steps`` (``w`` for baseline), and kept from then on.

**Within an epoch** (``update_per_optimizer_step``, as NNCF's sparsity key): the
level is evaluated after every optimizer step at the fractional epoch
``e + s / steps_per_epoch`` and masks follow it, so pruning proceeds in many small
steps while fine-tuning. ``pruning_steps`` is then the (possibly fractional)
number of epochs until the target is reached: ``0.5`` prunes progressively over
the first half of the first epoch and fine-tunes the final masks over the second
half. Masks freeze at ``w + ceil(pruning_steps)``.
"""
from __future__ import annotations

import math

from fxcompress.schedulers import ConstantScheduler, ExponentialScheduler, LevelScheduler, build_scheduler

__all__ = ["ExponentialWithBiasScheduler", "exponential_with_bias_coefficients", "build_pruning_scheduler",
           "PRUNING_SCHEDULES", "SCHEDULE_NAMES"]



def exponential_with_bias_coefficients(initial: float, target: float, target_epoch: float,
                                       factor: float = 0.125) -> tuple[float, float, float] | None:
    """``(a, b, k)`` of ``a * exp(-k t) + b`` through ``(0, initial)``, ``(E, target)``, ``(factor E, 3/4 target)``.

    With ``u = exp(-k E)`` the third condition is ``u**factor - c*u + c - 1 = 0``,
    ``c = (0.75 target - initial) / (target - initial)``; ``u = 1`` is a trivial
    root, the wanted one lies in ``(0, 1)`` and is found by bisection. None when
    it does not exist (initial level close to the target).
    """
    if target_epoch <= 0 or target <= initial:
        return None
    c = (0.75 * target - initial) / (target - initial)

    def g(u):
        return u ** factor - c * u + c - 1

    if c <= factor or g(1e-12) >= 0:  # no root in (0, 1): the curve cannot pass 3/4 target early
        return None
    lo, hi = 1e-12, 1.0 - 1e-9
    if g(hi) <= 0:
        return None
    for _ in range(200):
        mid = (lo + hi) / 2
        if g(mid) < 0:
            lo = mid
        else:
            hi = mid
    u = (lo + hi) / 2
    k = -math.log(u) / target_epoch
    a = (target - initial) / (u - 1)
    b = initial - a
    return a, b, k


class ExponentialWithBiasScheduler(LevelScheduler):
    """``min(a * exp(-k t) + b, target)``; falls back to the plain exponential when no curve fits."""
    name = "exponential_with_bias"

    def __init__(self, **kwargs):
        initial, target = kwargs.get("initial_level", 0.0), kwargs.get("target_level", 0.5)
        self.coefficients = exponential_with_bias_coefficients(initial, target, kwargs.get("target_epoch", 90))
        super().__init__(**kwargs)

    def level_at(self, t: float) -> float:
        if self.coefficients is None:
            return ExponentialScheduler.level_at(self, t)
        a, b, k = self.coefficients
        return float(min(max(a * math.exp(-k * t) + b, self.initial_level), self.target_level))

    def describe(self) -> dict:
        return {**super().describe(), "coefficients": self.coefficients}


PRUNING_SCHEDULES = {"exponential": ExponentialScheduler, "exponential_with_bias": ExponentialWithBiasScheduler,
                     "baseline": ConstantScheduler}
SCHEDULE_NAMES = tuple(PRUNING_SCHEDULES)


def build_pruning_scheduler(schedule: str, pruning_init: float, target: float, num_init_steps: int,
                            pruning_steps: float, update_per_optimizer_step: bool = False,
                            steps_per_epoch: int | None = None) -> LevelScheduler:
    """The scheduler of a FilterPruning config (levels are filter or FLOPs fractions)."""
    warmup = int(num_init_steps)
    if schedule == "baseline":
        target_epoch, freeze = 0, warmup
    elif update_per_optimizer_step:  # a continuous level: the target at the end of pruning_steps epochs
        target_epoch, freeze = float(pruning_steps), warmup + math.ceil(pruning_steps)
    else:  # epoch e trains at level_at(e): the target from the start of the last of pruning_steps epochs
        target_epoch, freeze = max(int(pruning_steps) - 1, 0), warmup + int(pruning_steps)
    return build_scheduler(schedule, PRUNING_SCHEDULES, initial_level=float(pruning_init), target_level=float(target),
                           warmup_epochs=warmup, target_epoch=target_epoch, freeze_epoch=freeze,
                           update_per_optimizer_step=update_per_optimizer_step, steps_per_epoch=steps_per_epoch)
