"""Compression-level schedules shared by sparsity and filter pruning.

A *level* is the fraction of weights removed (sparsity level, pruning rate),
always in ``[0, 1)``. Each schedule is a pure closed-form function of the
(possibly fractional) epoch, plus a ``Scheduler`` subclass that evaluates it
from the training counters and tells its listeners after every update.

Counters follow ``fxcompress.controller.Scheduler``: ``current_epoch`` starts at
0 and ``epoch_step()`` is called at the *end* of an epoch, so epoch ``e`` trains
at ``level_at(e)``. With ``update_per_optimizer_step`` the level is evaluated at
the fractional epoch ``t = e + min(s / steps_per_epoch, 1)`` after ``s``
optimizer steps of epoch ``e`` (``t`` reaches ``e + 1`` exactly when the next
epoch starts). With ``warmup_epochs = w`` the schedule is shifted: the level
is ``initial_level`` while ``e < w``, then ``level_at(t - w)``.

Closed forms (``i`` initial level, ``T`` target level, ``E`` target epoch,
``x = clamp(t / E, 0, 1)``; every schedule returns ``T`` when ``E == 0``):

- polynomial (NNCF's ``PolynomialDecaySchedule``), power ``p``:
  concave: ``T - (T - i) * (1 - x) ** p``; convex: ``i + (T - i) * x ** p``.
- exponential on the density ``d = 1 - level`` (NNCF's ``ExponentialDecaySchedule``):
  ``d(t) = max((1 - i) * ((1 - T) / (1 - i)) ** (t / E), 1 - T)``,
  level ``min(1 - d(t), T)``.
- multistep, boundaries ``b_1 < ... < b_n`` and levels ``l_0 .. l_n``:
  ``l_k`` with ``k = #{j : b_j <= t}`` (``bisect_right``).
- adaptive (a recurrence, not a closed form; driven by a signal such as the
  RB sparsity loss's achieved level ``a``): level starts at ``i``; at each
  ``epoch_step``: if ``a >= level - eps`` then ``bad += 1``; if
  ``bad >= patience``: ``bad = 0``, ``level = min(level + step, T)``.

All state needed to resume (counters, measured ``steps_per_epoch``, the
adaptive level and bad-epoch count) is in ``state_dict()``: plain Python
numbers, loadable with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import inspect
import math
import warnings
from bisect import bisect_right
from typing import Callable, Sequence

from .checkpoint import require_state_keys
from .controller import Scheduler
from .errors import CheckpointError, ConfigError

__all__ = [
    "polynomial_schedule", "exponential_schedule", "multistep_schedule",
    "LevelScheduler", "ConstantScheduler", "PolynomialScheduler", "ExponentialScheduler",
    "MultiStepScheduler", "AdaptiveScheduler", "SCHEDULES", "build_scheduler", "check_multistep",
    "StagedScheduler", "STAGED_PARAMS", "STAGED_DEFAULTS", "LR_POLY_POWER",
]


# -- closed forms ------------------------------------------------------------------------------

def polynomial_schedule(t: float, initial: float, target: float, target_epoch: float,
                        power: float = 0.9, concave: bool = True) -> float:
    """NNCF's polynomial decay: ``initial`` at ``t = 0`` to ``target`` at ``t >= target_epoch``."""
    if target_epoch == 0:
        return float(target)
    x = min(1.0, max(0.0, t / target_epoch))
    if concave:
        return float(target - (target - initial) * (1.0 - x) ** power)
    return float(initial + (target - initial) * x ** power)


def exponential_schedule(t: float, initial: float, target: float, target_epoch: float) -> float:
    """Exponential decay of the density ``1 - level`` from ``1 - initial`` to ``1 - target``."""
    if target_epoch == 0:
        return float(target)
    d0, d1 = 1.0 - initial, 1.0 - target
    density = max(d0 * (d1 / d0) ** (t / target_epoch), d1)
    return float(min(1.0 - density, target))


def multistep_schedule(t: float, steps: Sequence[float], levels: Sequence[float]) -> float:
    """Piecewise constant: ``levels[k]`` where ``k`` is the number of boundaries ``<= t``."""
    return float(levels[bisect_right(list(steps), t)])


# -- validation helpers -------------------------------------------------------------------------

def _check_level(name: str, value: float):
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ConfigError(f"{name}: must be in [0, 1), got {value!r}", path=name)


def _check_nonneg(name: str, value):
    if value is not None and not (isinstance(value, (int, float)) and value >= 0):
        raise ConfigError(f"{name}: must be a number >= 0, got {value!r}", path=name)


# -- schedulers -----------------------------------------------------------------------------------

class LevelScheduler(Scheduler):
    """A compression level driven by the training counters; subclasses give ``level_at(t)``.

    Listeners registered with ``on_update(fn)`` are called as ``fn(scheduler)``
    after every ``step()``, ``epoch_step()`` and ``load_state_dict()``; they read
    ``current_level`` and ``frozen`` and decide themselves whether anything changed.
    ``frozen`` is true from ``freeze_epoch`` on (never when it is None).
    """
    name = "level"

    def __init__(self, *, initial_level: float = 0.0, target_level: float = 0.5, target_epoch: float = 90,
                 freeze_epoch: float | None = None, warmup_epochs: int = 0,
                 update_per_optimizer_step: bool = False, steps_per_epoch: int | None = None):
        super().__init__()
        _check_level("initial_level", initial_level)
        _check_level("target_level", target_level)
        _check_nonneg("target_epoch", target_epoch)
        _check_nonneg("freeze_epoch", freeze_epoch)
        _check_nonneg("warmup_epochs", warmup_epochs)
        if steps_per_epoch is not None and not (isinstance(steps_per_epoch, (int, float))
                                                and steps_per_epoch >= 1):
            raise ConfigError(f"steps_per_epoch: must be >= 1, got {steps_per_epoch!r}", path="steps_per_epoch")
        self.initial_level = float(initial_level)
        self.target_level = float(target_level)
        self.target_epoch = target_epoch
        self.freeze_epoch = freeze_epoch
        self.warmup_epochs = int(warmup_epochs)
        self.update_per_optimizer_step = bool(update_per_optimizer_step)
        self.steps_per_epoch = int(steps_per_epoch) if steps_per_epoch is not None else None
        self._listeners: list[Callable[["LevelScheduler"], None]] = []
        self.current_level = self._compute_level()

    # the closed form, overridden by subclasses
    def level_at(self, t: float) -> float:
        """The level at (fractional) epoch ``t`` counted from the end of warmup."""
        raise NotImplementedError

    def on_update(self, fn: Callable[["LevelScheduler"], None]):
        """Call ``fn(self)`` after every counter change (the algorithm re-applies the level)."""
        self._listeners.append(fn)
        return fn

    @property
    def progress(self) -> float:
        """The fractional epoch the level is evaluated at (before the warmup shift)."""
        t = float(self.current_epoch)
        if self.update_per_optimizer_step and self.steps_per_epoch:
            t += min(self.current_step / self.steps_per_epoch, 1.0)
        return t

    @property
    def frozen(self) -> bool:
        return self.freeze_epoch is not None and self.current_epoch >= self.freeze_epoch

    def _compute_level(self) -> float:
        if self.current_epoch < self.warmup_epochs:
            return self.initial_level
        return self.level_at(self.progress - self.warmup_epochs)

    def epoch_step(self):
        if self.update_per_optimizer_step and self.current_step > 0:
            if self.steps_per_epoch is None:
                self.steps_per_epoch = self.current_step  # measured in the first epoch (NNCF does the same)
            elif self.current_step != self.steps_per_epoch:
                warnings.warn(f"scheduler: the epoch had {self.current_step} optimizer steps but "
                              f"steps_per_epoch is {self.steps_per_epoch}; per-step levels follow "
                              f"steps_per_epoch", stacklevel=2)
        super().epoch_step()

    def update(self):
        self.current_level = self._compute_level()
        for fn in self._listeners:
            fn(self)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["steps_per_epoch"] = self.steps_per_epoch
        state["current_level"] = float(self.current_level)
        return state

    def load_state_dict(self, state: dict):
        if "steps_per_epoch" not in state:
            raise CheckpointError("scheduler state lacks 'steps_per_epoch'")
        spe = state["steps_per_epoch"]
        self.steps_per_epoch = int(spe) if spe is not None else None
        super().load_state_dict(state)

    def describe(self) -> dict:
        """The schedule's parameters, for statistics and reprs."""
        return {"schedule": self.name, "initial_level": self.initial_level, "target_level": self.target_level,
                "target_epoch": self.target_epoch, "freeze_epoch": self.freeze_epoch}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "schedule")
        return f"{type(self).__name__}({args})"


class ConstantScheduler(LevelScheduler):
    """The target level from the first epoch after warmup (NNCF pruning's "baseline")."""
    name = "constant"

    def level_at(self, t: float) -> float:
        return self.target_level


class PolynomialScheduler(LevelScheduler):
    """``polynomial_schedule`` with ``power`` and ``concave`` (NNCF defaults 0.9, True)."""
    name = "polynomial"

    def __init__(self, *, power: float = 0.9, concave: bool = True, **kwargs):
        if not (isinstance(power, (int, float)) and power > 0 and math.isfinite(power)):
            raise ConfigError(f"power: must be a finite number > 0, got {power!r}", path="power")
        self.power = float(power)
        self.concave = bool(concave)
        super().__init__(**kwargs)

    def level_at(self, t: float) -> float:
        return polynomial_schedule(t, self.initial_level, self.target_level, self.target_epoch,
                                   self.power, self.concave)

    def describe(self) -> dict:
        return {**super().describe(), "power": self.power, "concave": self.concave}


class ExponentialScheduler(LevelScheduler):
    """``exponential_schedule``: the density decays exponentially to ``1 - target_level``."""
    name = "exponential"

    def level_at(self, t: float) -> float:
        return exponential_schedule(t, self.initial_level, self.target_level, self.target_epoch)


def check_multistep(steps: Sequence[float], levels: Sequence[float], prefix: str = ""):
    """A multistep schedule's lists: one more level than boundaries, increasing epochs >= 0, levels in
    ``[0, 1)``. The error names the config field (``prefix.multistep_steps``)."""
    where = f"{prefix}." if prefix else ""
    if len(levels) != len(steps) + 1:
        raise ConfigError(f"{where}multistep_sparsity_levels: needs one more entry than multistep_steps "
                          f"({len(steps)} steps, {len(levels)} levels)", path=f"{where}multistep_sparsity_levels")
    if any(b <= a for a, b in zip(steps, steps[1:])) or any(s < 0 for s in steps):
        raise ConfigError(f"{where}multistep_steps: must be increasing epochs >= 0, got {list(steps)}",
                          path=f"{where}multistep_steps")
    for i, level in enumerate(levels):
        _check_level(f"{where}multistep_sparsity_levels[{i}]", level)


class MultiStepScheduler(LevelScheduler):
    """``multistep_schedule``: ``levels[k]`` after ``k`` boundaries; the last level is the target.

    ``initial_level``/``target_level``/``target_epoch`` are taken from the lists
    (``levels[0]``, ``levels[-1]``, ``steps[-1]``).
    """
    name = "multistep"

    def __init__(self, *, steps: Sequence[float] = (90,), levels: Sequence[float] = (0.1, 0.5), **kwargs):
        steps, levels = list(steps), list(levels)
        check_multistep(steps, levels)
        self.steps = [s for s in steps]
        self.levels = [float(v) for v in levels]
        kwargs.pop("initial_level", None)
        kwargs.pop("target_level", None)
        kwargs.pop("target_epoch", None)
        super().__init__(initial_level=self.levels[0], target_level=self.levels[-1],
                         target_epoch=self.steps[-1] if self.steps else 0, **kwargs)

    def level_at(self, t: float) -> float:
        return multistep_schedule(t, self.steps, self.levels)

    def describe(self) -> dict:
        return {**super().describe(), "steps": list(self.steps), "levels": list(self.levels)}


class AdaptiveScheduler(LevelScheduler):
    """Raises the level by ``step`` once the achieved level has kept up for ``patience`` epochs.

    ``signal()`` returns the achieved level (for RB sparsity: the loss's current
    sparsity); set it at construction or later with ``set_signal``. Without a
    signal the achieved level is taken to be the current level (always kept up).
    """
    name = "adaptive"

    def __init__(self, *, patience: int = 1, step: float = 0.05, eps: float = 0.03,
                 signal: Callable[[], float] | None = None, **kwargs):
        if not (isinstance(patience, (int, float)) and patience >= 1):
            raise ConfigError(f"patience: must be >= 1, got {patience!r}", path="patience")
        if not (isinstance(step, (int, float)) and 0 < step < 1):
            raise ConfigError(f"step: must be in (0, 1), got {step!r}", path="step")
        _check_nonneg("eps", eps)
        self.patience = patience
        self.step_size = float(step)
        self.eps = float(eps)
        self.signal = signal
        self.num_bad_epochs = 0
        self._level = float(kwargs.get("initial_level", 0.0))
        super().__init__(**kwargs)

    def set_signal(self, signal: Callable[[], float]):
        self.signal = signal

    def level_at(self, t: float) -> float:
        return min(self._level, self.target_level)

    def _compute_level(self) -> float:
        return min(self._level, self.target_level)

    def epoch_step(self):
        achieved = float(self.signal()) if self.signal is not None else self._level
        if achieved >= self._level - self.eps:
            self.num_bad_epochs += 1
        if self.num_bad_epochs >= self.patience:
            self.num_bad_epochs = 0
            self._level = min(self._level + self.step_size, self.target_level)
        super().epoch_step()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "num_bad_epochs": self.num_bad_epochs, "adaptive_level": self._level}

    def load_state_dict(self, state: dict):
        require_state_keys(state, ("num_bad_epochs", "adaptive_level"), "adaptive scheduler")
        self.num_bad_epochs = int(state["num_bad_epochs"])
        self._level = float(state["adaptive_level"])
        super().load_state_dict(state)

    def describe(self) -> dict:
        return {**super().describe(), "patience": self.patience, "step": self.step_size, "eps": self.eps}


SCHEDULES: dict[str, type[LevelScheduler]] = {
    "polynomial": PolynomialScheduler,
    "exponential": ExponentialScheduler,
    "multistep": MultiStepScheduler,
    "adaptive": AdaptiveScheduler,
    "constant": ConstantScheduler,
}


def build_scheduler(schedule: str, schedules: dict[str, type[LevelScheduler]] | None = None,
                    **kwargs) -> LevelScheduler:
    """A scheduler by name, from ``schedules`` (default ``SCHEDULES``: ``polynomial``, ``exponential``,
    ``multistep``, ``adaptive``, ``constant``; an algorithm passes its own table, e.g. pruning's).

    Keyword arguments are those of the scheduler's constructor; arguments a
    schedule does not use (``power`` for exponential) are ignored, so one
    config dict can build any schedule.
    """
    schedules = SCHEDULES if schedules is None else schedules
    if schedule not in schedules:
        raise ConfigError(f"schedule: unknown schedule {schedule!r}; known: {', '.join(schedules)}",
                          path="schedule")
    cls = schedules[schedule]
    accepted = set()
    for klass in cls.__mro__:
        if "__init__" in klass.__dict__:
            accepted |= set(inspect.signature(klass.__init__).parameters) - {"self", "kwargs"}
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


# -- NNCF's staged schedule (quantization and binarization) ---------------------------------------

_EPOCH = {"type": "number", "minimum": 0}
#: NNCF's STAGED_QUANTIZATION_PARAMS (nncf/config/schemata/algo/quantization.py): the keys of the
#: ``params`` block of a quantization or binarization entry (merged into the pass's arguments).
STAGED_PARAMS = {
    "batch_multiplier": {"type": "integer", "minimum": 1},
    "activations_quant_start_epoch": _EPOCH,
    "weights_quant_start_epoch": _EPOCH,
    "lr_poly_drop_start_epoch": _EPOCH,
    "lr_poly_drop_duration_epochs": {"type": "number", "exclusiveMinimum": 0},
    "disable_wd_start_epoch": _EPOCH,
    "base_lr": {"type": "number", "minimum": 0},
    "base_wd": {"type": "number", "minimum": 0},
}
#: NNCF's defaults (nncf/config/schemata/defaults.py) of the keys above.
STAGED_DEFAULTS = {"batch_multiplier": 1, "activations_quant_start_epoch": 1, "weights_quant_start_epoch": 1,
                   "lr_poly_drop_start_epoch": None, "lr_poly_drop_duration_epochs": 30,
                   "disable_wd_start_epoch": None, "base_lr": 1e-3, "base_wd": 1e-5}
LR_POLY_POWER = 2.1  # NNCF's PolyLRDropScheduler


class StagedScheduler(Scheduler):
    """NNCF's staged schedule: activations and weights switched on at their start epochs, and the
    learning-rate / weight-decay policy of NNCF's staged-quantization sample (``PolyLRDropScheduler``).

    Epoch ``e`` (counted from 0, ``epoch_step()`` at its end) runs with activations on iff
    ``e >= activations_quant_start_epoch`` and weights on iff ``e >= weights_quant_start_epoch``
    (NNCF counts from -1 and steps at the start of an epoch: the same epochs). A start epoch of
    ``None`` means that group is not staged. Listeners (``on_update``) are told after every update;
    ``on_stage_start`` callbacks run when ``epoch_step()`` reaches a start epoch (NNCF re-initializes
    the quantizer ranges there), not when a checkpoint is loaded.

    Optimizer policy at the fractional epoch ``t = e + s / n`` (``s`` optimizer steps into epoch
    ``e``, ``n`` the steps of the previous epoch; ``t = e`` during the first):

    - ``lr_hint() = base_lr`` before ``lr_poly_drop_start_epoch`` (always when it is None), then
      ``base_lr * ((start + duration - t) / duration) ** 2.1``, 0 from ``start + duration`` on;
    - ``wd_hint() = base_wd``, 0 once ``t > disable_wd_start_epoch``;
    - ``attach_optimizer(optimizer)`` writes both into every parameter group now and after every
      ``step()`` / ``epoch_step()``; ``apply_to(optimizer)`` does it once;
    - ``should_step_optimizer()``: gradient accumulation over ``batch_multiplier`` batches (True on
      every ``batch_multiplier``-th batch of an epoch; ask after ``backward()``, before ``step()``).
    """
    name = "staged"
    drives_optimizer = True  # CompositeScheduler.attach_optimizer hands it the user's optimizer

    def __init__(self, activations_quant_start_epoch: float | None = 1,
                 weights_quant_start_epoch: float | None = 1, *, lr_poly_drop_start_epoch: float | None = None,
                 lr_poly_drop_duration_epochs: float = 30, disable_wd_start_epoch: float | None = None,
                 base_lr: float = 1e-3, base_wd: float = 1e-5, batch_multiplier: int = 1):
        super().__init__()
        if lr_poly_drop_duration_epochs <= 0:
            raise ValueError(f"lr_poly_drop_duration_epochs must be > 0, got {lr_poly_drop_duration_epochs}")
        if int(batch_multiplier) < 1:
            raise ValueError(f"batch_multiplier must be >= 1, got {batch_multiplier}")
        self.activations_quant_start_epoch = activations_quant_start_epoch
        self.weights_quant_start_epoch = weights_quant_start_epoch
        self.lr_poly_drop_start_epoch = lr_poly_drop_start_epoch
        self.lr_poly_drop_duration_epochs = lr_poly_drop_duration_epochs
        self.disable_wd_start_epoch = disable_wd_start_epoch
        self.base_lr = base_lr
        self.base_wd = base_wd
        self.batch_multiplier = int(batch_multiplier)
        self.steps_per_epoch: int | None = None  # learned at the first epoch_step
        self.optimizers: list = []
        self._listeners: list[Callable[["StagedScheduler"], None]] = []
        self._stage_start: list[Callable[["StagedScheduler"], None]] = []

    # -- stage ---------------------------------------------------------------------------------
    #: names of the four stages (neither group on, activations only, weights only, both); subclasses
    #: name them after what they switch (``fully_quantized``, ``fully_binarized``)
    STAGES = ("float", "activations_on", "weights_on", "fully_on")

    def start_epoch(self, group: str) -> float | None:
        """The start epoch of ``"activations"`` or ``"weights"`` (None: that group is not staged)."""
        return {"activations": self.activations_quant_start_epoch, "weights": self.weights_quant_start_epoch}.get(group)

    def enabled(self, group: str) -> bool:
        """Whether ``group`` is on in the current epoch (always, when it is not staged)."""
        start = self.start_epoch(group)
        return start is None or self.current_epoch >= start

    @property
    def activations_enabled(self) -> bool:
        return self.enabled("activations")

    @property
    def weights_enabled(self) -> bool:
        return self.enabled("weights")

    @property
    def stage(self) -> str:
        """One of ``STAGES``: which of the groups are on now."""
        return self.STAGES[int(self.activations_enabled) + 2 * int(self.weights_enabled)]

    def on_update(self, listener: Callable[["StagedScheduler"], None]):
        self._listeners.append(listener)
        listener(self)

    def on_stage_start(self, callback: Callable[["StagedScheduler"], None]):
        self._stage_start.append(callback)

    def update(self):
        for listener in self._listeners:
            listener(self)
        for optimizer in self.optimizers:
            self.apply_to(optimizer)

    def epoch_step(self):
        if self.current_step:
            self.steps_per_epoch = self.current_step
        super().epoch_step()
        if self.current_epoch in (self.activations_quant_start_epoch, self.weights_quant_start_epoch):
            for callback in self._stage_start:
                callback(self)

    # -- optimizer policy ------------------------------------------------------------------------
    @property
    def epoch_float(self) -> float:
        """The fractional epoch ``e + s / n`` (``e`` until the steps per epoch are known)."""
        if not self.steps_per_epoch:
            return float(self.current_epoch)
        return self.current_epoch + min(self.current_step / self.steps_per_epoch, 1.0)

    def lr_factor(self, epoch: float | None = None) -> float:
        """The learning-rate multiplier at ``epoch`` (default: now): 1, then the polynomial drop to 0."""
        t = self.epoch_float if epoch is None else float(epoch)
        start = self.lr_poly_drop_start_epoch
        if start is None or t < start:
            return 1.0
        finish = start + self.lr_poly_drop_duration_epochs
        if t >= finish:
            return 0.0
        return ((finish - t) / self.lr_poly_drop_duration_epochs) ** LR_POLY_POWER

    def lr_hint(self, base_lr: float | None = None, epoch: float | None = None) -> float:
        """The learning rate to use now: ``base_lr`` (default: the config's) times ``lr_factor``."""
        return (self.base_lr if base_lr is None else base_lr) * self.lr_factor(epoch)

    def wd_hint(self, base_wd: float | None = None, epoch: float | None = None) -> float:
        """The weight decay to use now: ``base_wd`` (default: the config's), 0 after ``disable_wd_start_epoch``."""
        t = self.epoch_float if epoch is None else float(epoch)
        if self.disable_wd_start_epoch is not None and t > self.disable_wd_start_epoch:
            return 0.0
        return self.base_wd if base_wd is None else base_wd

    def apply_to(self, optimizer, base_lr: float | None = None, base_wd: float | None = None):
        """Set ``lr`` and ``weight_decay`` of every parameter group to the hints."""
        lr, wd = self.lr_hint(base_lr), self.wd_hint(base_wd)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if "weight_decay" in group:
                group["weight_decay"] = wd

    def attach_optimizer(self, optimizer):
        """Drive ``optimizer``'s learning rate and weight decay from now on (as NNCF's staged sample)."""
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"attach_optimizer expects a torch optimizer, got {type(optimizer).__name__}")
        if all(o is not optimizer for o in self.optimizers):
            self.optimizers.append(optimizer)
        self.apply_to(optimizer)

    def should_step_optimizer(self) -> bool:
        """Whether this batch ends a gradient accumulation of ``batch_multiplier`` batches."""
        return (self.current_step + 1) % self.batch_multiplier == 0

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict):
        if "steps_per_epoch" not in state:
            raise CheckpointError(f"{type(self).__name__} state lacks 'steps_per_epoch'")
        spe = state["steps_per_epoch"]
        self.steps_per_epoch = None if spe is None else int(spe)
        super().load_state_dict(state)  # restores the counters, then update() sets the stage

    def describe(self) -> dict:
        return {key: getattr(self, key) for key in STAGED_DEFAULTS}
