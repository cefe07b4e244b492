"""The staged binarization schedule (NNCF's ``StagedQuantizationScheduler``) and its optimizer hints.

Counters follow ``fxcompress.controller.Scheduler``: ``current_epoch`` starts
at 0 and ``epoch_step()`` is called at the *end* of an epoch, so epoch ``e``
trains with

- activations binarized iff ``e >= activations_quant_start_epoch``,
- weights binarized iff ``e >= weights_quant_start_epoch``.

(NNCF counts from -1 and steps at the start of an epoch: the same epochs
binarize.) The stage is a pure function of the counters, so loading a
checkpoint's counters restores it; listeners (the controller) are told after
every update and switch the binarizers.

Learning-rate and weight-decay hints (NNCF's ``PolyLRDropScheduler`` in its
staged-quantization sample), at the fractional epoch ``t = e + s / n`` after
``s`` optimizer steps of epoch ``e`` (``n``: steps of the previous epoch, known
after the first ``epoch_step``; ``t = e`` before):

- ``lr_hint(base_lr) = base_lr`` for ``t < lr_poly_drop_start_epoch`` (or
  when it is None), ``base_lr * ((finish - t) / duration) ** 2.1`` for
  ``start <= t < finish = start + lr_poly_drop_duration_epochs``, 0 after;
- ``wd_hint(base_wd) = 0`` for ``t > disable_wd_start_epoch``, else ``base_wd``.

``apply_to(optimizer)`` writes both into every parameter group (as NNCF's
sample does); ``batch_multiplier`` is the gradient-accumulation hint.
"""
from __future__ import annotations

from typing import Callable

from fxcompress.controller import Scheduler
from fxcompress.errors import CheckpointError

__all__ = ["StagedBinarizationScheduler", "STAGES", "LR_POLY_POWER"]

LR_POLY_POWER = 2.1  # NNCF's PolyLRDropScheduler
STAGES = ("float", "activations_binarized", "weights_binarized", "fully_binarized")


class StagedBinarizationScheduler(Scheduler):
    name = "staged"

    def __init__(self, activations_quant_start_epoch: float = 1, weights_quant_start_epoch: float = 2, *,
                 lr_poly_drop_start_epoch: float | None = None, lr_poly_drop_duration_epochs: float = 30,
                 disable_wd_start_epoch: float | None = None, base_lr: float = 1e-3, base_wd: float = 1e-5,
                 batch_multiplier: float = 1):
        super().__init__()
        if lr_poly_drop_duration_epochs <= 0:
            raise ValueError(f"lr_poly_drop_duration_epochs must be > 0, got {lr_poly_drop_duration_epochs}")
        self.activations_quant_start_epoch = activations_quant_start_epoch
        self.weights_quant_start_epoch = weights_quant_start_epoch
        self.lr_poly_drop_start_epoch = lr_poly_drop_start_epoch
        self.lr_poly_drop_duration_epochs = lr_poly_drop_duration_epochs
        self.disable_wd_start_epoch = disable_wd_start_epoch
        self.base_lr = base_lr
        self.base_wd = base_wd
        self.batch_multiplier = batch_multiplier
        self.steps_per_epoch: int | None = None  # learned at the first epoch_step
        self._listeners: list[Callable[["StagedBinarizationScheduler"], None]] = []

    # -- stage ---------------------------------------------------------------------------------
    @property
    def activations_enabled(self) -> bool:
        return self.current_epoch >= self.activations_quant_start_epoch

    @property
    def weights_enabled(self) -> bool:
        return self.current_epoch >= self.weights_quant_start_epoch

    @property
    def stage(self) -> str:
        """``float``, ``activations_binarized``, ``weights_binarized`` or ``fully_binarized``."""
        return STAGES[int(self.activations_enabled) + 2 * int(self.weights_enabled)]

    def on_update(self, listener: Callable[["StagedBinarizationScheduler"], None]):
        self._listeners.append(listener)
        listener(self)

    def update(self):
        for listener in self._listeners:
            listener(self)

    def epoch_step(self):
        if self.current_step:
            self.steps_per_epoch = self.current_step
        super().epoch_step()

    # -- optimizer hints -------------------------------------------------------------------------
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
        """Set ``lr`` and ``weight_decay`` of every parameter group to the hints (call after each step)."""
        lr, wd = self.lr_hint(base_lr), self.wd_hint(base_wd)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if "weight_decay" in group:
                group["weight_decay"] = wd

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict):
        if "steps_per_epoch" not in state:
            raise CheckpointError("staged binarization scheduler state lacks 'steps_per_epoch'")
        spe = state["steps_per_epoch"]
        self.steps_per_epoch = None if spe is None else int(spe)
        super().load_state_dict(state)  # restores the counters, then update() sets the stage
