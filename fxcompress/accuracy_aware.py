"""Accuracy-aware training (NNCF's ``accuracy_aware_training`` block): compress until the accuracy budget is spent.

Two loops, both driven by the user's functions (NNCF's signatures)::

    train_epoch_fn(ctrl, model, epoch=..., optimizer=..., lr_scheduler=...)   # one epoch; per-step
                                  # ctrl.scheduler.step() is the user's, epoch_step() the loop's
    validate_fn(model, epoch=...) -> float                                  # higher is better
    configure_optimizers_fn() -> (optimizer, lr_scheduler)                  # lr_scheduler may be None
    dump_checkpoint_fn(model, ctrl, loop, log_dir)                          # optional, every epoch

The budget: ``minimal tolerable accuracy = A - maximal_absolute_accuracy_degradation``,
or ``A * (1 - maximal_relative_accuracy_degradation / 100)``, where ``A`` is the
uncompressed model's accuracy (given, or measured once with ``validate_fn``).

- ``early_exit``: validate, then fine-tune one epoch at a time until the accuracy
  is within the budget and the compression schedules have reached their targets;
  stop there. After ``maximal_total_epochs`` without success the most accurate
  fully compressed epoch is restored.
- ``adaptive_compression_level`` (NNCF's search): an initial phase as ``early_exit``
  for ``initial_training_phase_epochs``; then the level of the first algorithm
  with a continuous level (magnitude or RB sparsity, filter pruning) is fixed
  by the loop (``set_compression_rate``: its schedule no longer applies) and
  moved by ``step`` (``initial_compression_rate_step``): up as soon as an epoch
  at the current level is within budget, down after ``patience_epochs`` epochs
  without; whenever the direction flips, ``step`` is multiplied by
  ``compression_rate_step_reduction_factor`` (and the learning rate by
  ``lr_reduction_factor``). Each move starts from the best model so far (the
  highest level within budget) with freshly configured optimizers. The search
  ends when ``step < minimal_compression_rate_step``, after
  ``maximal_total_epochs`` epochs in all, or at the maximal level (0.95, or
  what the algorithm can reach); the best model is restored.

Every validation is one record (epoch, phase, compression rate, accuracy, budget,
step): reported through ``report`` (default ``print``), kept in ``loop.history``,
and, with a ``log_dir``, written to ``accuracy_aware_history.csv`` there, with
``accuracy_vs_compression_rate.png`` at the end. The best model is kept in memory
(a CPU copy of ``model.state_dict()`` and ``ctrl.state_dict()``).
"""
from __future__ import annotations

import copy
import csv
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from .algorithm import validate_schema
from .errors import ConfigError

__all__ = ["create_accuracy_aware_training_loop", "validate_accuracy_aware_config", "EarlyExitCompressionTrainingLoop",
           "AdaptiveCompressionTrainingLoop", "EpochRecord", "TrainingLoopStatistics", "AA_DEFAULTS"]

EARLY_EXIT, ADAPTIVE = "early_exit", "adaptive_compression_level"

# nncf/config/schemata/defaults.py
AA_DEFAULTS = {
    "maximal_total_epochs": 10000,
    "initial_training_phase_epochs": 5,
    "patience_epochs": 3,
    "initial_compression_rate_step": 0.1,
    "compression_rate_step_reduction_factor": 0.5,
    "lr_reduction_factor": 0.5,
    "minimal_compression_rate_step": 0.025,
}
MAXIMAL_COMPRESSION_RATE = 0.95  # NNCF's AdaptiveCompressionTrainingLoop default
_FRACTION = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}
_BUDGET = {"maximal_relative_accuracy_degradation": {"type": "number", "minimum": 0},
           "maximal_absolute_accuracy_degradation": {"type": "number", "minimum": 0}}
_EPOCHS = {"type": "integer", "minimum": 1}
_PARAMS = {
    EARLY_EXIT: {**_BUDGET, "maximal_total_epochs": _EPOCHS},
    ADAPTIVE: {**_BUDGET, "maximal_total_epochs": _EPOCHS,
               "initial_training_phase_epochs": {"type": "integer", "minimum": 0},
               "patience_epochs": _EPOCHS,
               "initial_compression_rate_step": _FRACTION,
               "minimal_compression_rate_step": _FRACTION,
               "compression_rate_step_reduction_factor": _FRACTION,
               "lr_reduction_factor": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
}
_BLOCK = {"type": "object", "required": ["mode", "params"], "additionalProperties": False,
          "properties": {"mode": {"enum": [EARLY_EXIT, ADAPTIVE]}, "params": {"type": "object"}}}


def validate_accuracy_aware_config(block: Any, prefix: str = "accuracy_aware_training") -> dict:
    """Check an ``accuracy_aware_training`` block; return ``{"mode": ..., **params with defaults}``.

    Errors are ``ConfigError``s naming the field by its JSON path.
    """
    validate_schema(block, _BLOCK, prefix)
    mode, params = block["mode"], block["params"]
    where = f"{prefix}.params"
    validate_schema(params, {"type": "object", "properties": _PARAMS[mode], "additionalProperties": False}, where)
    kinds = [k for k in _BUDGET if k in params]
    if len(kinds) == 2:
        raise ConfigError(f"{where}.maximal_absolute_accuracy_degradation: give either "
                          f"maximal_relative_accuracy_degradation (percent of the uncompressed accuracy) or "
                          f"maximal_absolute_accuracy_degradation (metric units), not both",
                          path=f"{where}.maximal_absolute_accuracy_degradation")
    if not kinds:
        raise ConfigError(f"{where}.maximal_relative_accuracy_degradation: the accuracy budget is missing; give "
                          f"maximal_relative_accuracy_degradation (percent) or maximal_absolute_accuracy_degradation",
                          path=f"{where}.maximal_relative_accuracy_degradation")
    resolved = {"mode": mode, **{k: v for k, v in AA_DEFAULTS.items() if k in _PARAMS[mode]}, **params}
    if mode == ADAPTIVE and resolved["minimal_compression_rate_step"] > resolved["initial_compression_rate_step"]:
        raise ConfigError(f"{where}.minimal_compression_rate_step: {resolved['minimal_compression_rate_step']} is "
                          f"above initial_compression_rate_step ({resolved['initial_compression_rate_step']}): "
                          f"the search would end before it starts", path=f"{where}.minimal_compression_rate_step")
    return resolved


@dataclass
class EpochRecord:
    """One validation: ``epoch`` counts the training epochs run so far (0: before any)."""
    epoch: int
    phase: str                      # "initial", "early_exit", "search" or "final"
    compression_rate: float | None  # the searched (or first) algorithm's level; None without one
    accuracy: float
    accuracy_budget: float          # accuracy - minimal tolerable accuracy (>= 0: within budget)
    compression_rate_step: float | None = None


@dataclass
class TrainingLoopStatistics:
    """NNCF's ``TrainingLoopStatistics``: where the returned model stands."""
    uncompressed_accuracy: float
    compression_rate: float | None
    compressed_accuracy: float
    accuracy_drop: float
    relative_accuracy_drop: float   # percent
    accuracy_budget: float

    def to_str(self) -> str:
        rate = "-" if self.compression_rate is None else f"{self.compression_rate:.4f}"
        return (f"uncompressed accuracy {self.uncompressed_accuracy:.4f}, compressed accuracy "
                f"{self.compressed_accuracy:.4f} at compression rate {rate}: drop {self.accuracy_drop:.4f} "
                f"({self.relative_accuracy_drop:.2f}%), budget {self.accuracy_budget:+.4f}")

    __str__ = to_str


@dataclass
class _Checkpoint:
    compression_rate: float | None
    accuracy: float
    model_state: dict
    ctrl_state: dict


class _BaseLoop:
    mode = ""

    def __init__(self, params: dict, ctrl, uncompressed_model_accuracy: float | None = None, *,
                 uncompressed_model=None, log_dir=None, report: Callable[[str], None] | None = print,
                 lr_updates_needed: bool = True):
        if (uncompressed_model_accuracy is None) == (uncompressed_model is None):
            raise TypeError("accuracy-aware training needs the uncompressed model's accuracy: give "
                            "uncompressed_model_accuracy=<float> (measured before compressing) or "
                            "uncompressed_model=<the uncompressed model> (measured once with validate_fn)")
        self.params = dict(params)
        self.ctrl = ctrl
        self.uncompressed_accuracy = None if uncompressed_model_accuracy is None else float(uncompressed_model_accuracy)
        self.uncompressed_model = uncompressed_model
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.report = report
        self.lr_updates_needed = lr_updates_needed
        self.history: list[EpochRecord] = []
        self.cumulative_epochs = 0
        self.best: _Checkpoint | None = None
        self.optimizer = self.lr_scheduler = None
        self.lr_factor = 1.0
        self._level_part = next((p for p in ctrl.parts if callable(getattr(p, "set_compression_rate", None))), None)

    # -- the budget ------------------------------------------------------------------------
    @property
    def minimal_tolerable_accuracy(self) -> float:
        absolute = self.params.get("maximal_absolute_accuracy_degradation")
        if absolute is not None:
            return self.uncompressed_accuracy - absolute
        return self.uncompressed_accuracy * (1 - 0.01 * self.params["maximal_relative_accuracy_degradation"])

    def within_budget(self, accuracy: float) -> bool:
        return accuracy - self.minimal_tolerable_accuracy >= 0

    @property
    def compression_rate(self) -> float | None:
        if self._level_part is None:
            return None
        rate = self._level_part.compression_rate
        return None if rate is None else float(rate)

    # -- the user's functions ---------------------------------------------------------------
    def _start(self, model, train_epoch_fn, validate_fn, configure_optimizers_fn, dump_checkpoint_fn):
        self._train_epoch_fn, self._validate_fn = train_epoch_fn, validate_fn
        self._configure_optimizers_fn, self._dump_checkpoint_fn = configure_optimizers_fn, dump_checkpoint_fn
        if self.uncompressed_accuracy is None:
            self.uncompressed_accuracy = self._measure(self.uncompressed_model)
        self.history, self.cumulative_epochs, self.best = [], 0, None
        self._configure_optimizers()

    def _configure_optimizers(self):
        self.training_epochs = 0
        self.best_accuracy_since_reset = -math.inf
        if self._configure_optimizers_fn is None:
            return
        result = self._configure_optimizers_fn()
        self.optimizer, self.lr_scheduler = result if isinstance(result, tuple) else (result, None)
        if self.lr_factor != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.lr_factor
            if hasattr(self.lr_scheduler, "base_lrs"):
                self.lr_scheduler.base_lrs = [lr * self.lr_factor for lr in self.lr_scheduler.base_lrs]

    def _train_epoch(self, model):
        self._train_epoch_fn(self.ctrl, model, epoch=self.cumulative_epochs, optimizer=self.optimizer,
                             lr_scheduler=self.lr_scheduler)
        self.ctrl.scheduler.epoch_step()
        if self.lr_scheduler is not None and self.lr_updates_needed:
            import torch
            if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.lr_scheduler.step(self.best_accuracy_since_reset)
            else:
                self.lr_scheduler.step()
        self.training_epochs += 1
        self.cumulative_epochs += 1

    def _measure(self, model) -> float:
        import torch
        with torch.no_grad():
            return float(self._validate_fn(model, epoch=self.cumulative_epochs))

    def _validate(self, model, phase: str, step: float | None = None) -> float:
        accuracy = self._measure(model)
        self.best_accuracy_since_reset = max(self.best_accuracy_since_reset, accuracy)
        record = EpochRecord(self.cumulative_epochs, phase, self.compression_rate, accuracy,
                             accuracy - self.minimal_tolerable_accuracy, step)
        self.history.append(record)
        self._progress(record)
        if self.log_dir is not None:
            self.write_csv(self.log_dir / "accuracy_aware_history.csv")
        if self._dump_checkpoint_fn is not None and phase != "final":
            self._dump_checkpoint_fn(model, self.ctrl, self, self.log_dir)
        return accuracy

    def _progress(self, r: EpochRecord):
        if self.report is None:
            return
        rate = "-" if r.compression_rate is None else f"{r.compression_rate:.4f}"
        step = "" if r.compression_rate_step is None else f", step {r.compression_rate_step:.4f}"
        self.report(f"[accuracy-aware {self.mode}] epoch {r.epoch} ({r.phase}): compression rate {rate}{step}, "
                    f"accuracy {r.accuracy:.4f} (uncompressed {self.uncompressed_accuracy:.4f}, minimal "
                    f"tolerable {self.minimal_tolerable_accuracy:.4f}), budget {r.accuracy_budget:+.4f}")

    def _note(self, message: str):
        if self.report is not None:
            self.report(f"[accuracy-aware {self.mode}] {message}")

    # -- the best model -----------------------------------------------------------------------
    def _keep(self, model, accuracy: float):
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.best = _Checkpoint(self.compression_rate, accuracy, state, copy.deepcopy(self.ctrl.state_dict()))

    def _restore_best(self, model):
        if self.best is None:
            return
        model.load_state_dict(self.best.model_state)
        self.ctrl.load_state_dict(copy.deepcopy(self.best.ctrl_state))
        if self._level_part is not None and getattr(self._level_part, "pinned_level", None) is not None:
            self._level_part.set_compression_rate(self.best.compression_rate)

    def _finish(self, model):
        if self.log_dir is not None and self.history:
            self.plot(self.log_dir / "accuracy_vs_compression_rate.png")
        return model

    # -- results -----------------------------------------------------------------------------
    @property
    def statistics(self) -> TrainingLoopStatistics:
        last = self.history[-1]
        u = self.uncompressed_accuracy
        return TrainingLoopStatistics(u, last.compression_rate, last.accuracy, u - last.accuracy,
                                      100 * (1 - last.accuracy / u) if u else 0.0, last.accuracy_budget)

    def write_csv(self, path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(EpochRecord)])
            writer.writeheader()
            for record in self.history:
                writer.writerow(asdict(record))
        return path

    def plot(self, path):
        """Accuracy against compression rate, one point per validation, with the budget lines."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        points = [r for r in self.history if r.compression_rate is not None]
        xs = [r.compression_rate for r in points] if points else [r.epoch for r in self.history]
        ys = [r.accuracy for r in (points or self.history)]
        ax.plot(xs, ys, color="0.7", linewidth=0.8, zorder=1)
        ax.scatter(xs, ys, c=range(len(xs)), cmap="viridis", zorder=2, label="validations (dark: early)")
        ax.axhline(self.uncompressed_accuracy, color="tab:green", linestyle="--", label="uncompressed")
        ax.axhline(self.minimal_tolerable_accuracy, color="tab:red", linestyle=":", label="minimal tolerable")
        last = self.history[-1]
        if points:
            ax.scatter([last.compression_rate], [last.accuracy], marker="*", s=200, color="tab:orange",
                       zorder=3, label="returned model")
        ax.set_xlabel("compression rate" if points else "epoch")
        ax.set_ylabel("accuracy")
        ax.set_title(f"accuracy-aware training ({self.mode})")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return path


class EarlyExitCompressionTrainingLoop(_BaseLoop):
    """Fine-tune until the accuracy is within budget (and the schedules are done), then stop."""
    mode = EARLY_EXIT

    def run(self, model, train_epoch_fn, validate_fn, configure_optimizers_fn=None, dump_checkpoint_fn=None):
        """Returns ``model`` (trained in place); ``self.statistics`` and ``self.history`` tell how it went."""
        self._start(model, train_epoch_fn, validate_fn, configure_optimizers_fn, dump_checkpoint_fn)
        if self._early_exit_phase(model, self.params["maximal_total_epochs"], EARLY_EXIT):
            return self._finish(model)
        if self.best is None:
            self._note("the compression schedules never reached their targets; the model is left as trained last")
        else:  # the budget was never met: the most accurate fully compressed epoch
            self._note(f"the accuracy budget was not met in {self.params['maximal_total_epochs']} epochs; "
                       f"restoring the most accurate fully compressed epoch")
            self._restore_best(model)
            self._validate(model, "final")
        return self._finish(model)

    def _early_exit_phase(self, model, epochs: int, phase: str) -> bool:
        """Validate, then train up to ``epochs`` epochs; True as soon as the criterion holds."""
        accuracy = self._validate(model, phase)
        for epoch in range(epochs + 1):
            if epoch > 0:
                self._train_epoch(model)
                accuracy = self._validate(model, phase)
            if fully_compressed(self.ctrl) and (self.best is None or accuracy > self.best.accuracy):
                self._keep(model, accuracy)
            if self.within_budget(accuracy) and fully_compressed(self.ctrl):
                return True
        return False


def fully_compressed(ctrl) -> bool:
    """Whether every scheduled level has reached its target (a level fixed by the loop counts as reached)."""
    for part in ctrl.parts:
        if getattr(part, "pinned_level", None) is not None:
            continue
        level = getattr(part.scheduler, "current_level", None)
        target = getattr(part.scheduler, "target_level", None)
        if level is not None and target is not None and level < target - 1e-9:
            return False
    return True


class AdaptiveCompressionTrainingLoop(EarlyExitCompressionTrainingLoop):
    """Search the highest compression level whose fine-tuned accuracy stays within the budget."""
    mode = ADAPTIVE

    def __init__(self, params: dict, ctrl, uncompressed_model_accuracy: float | None = None, **kwargs):
        super().__init__(params, ctrl, uncompressed_model_accuracy, **kwargs)
        if self._level_part is None:
            have = ", ".join(p.algorithm for p in ctrl.parts) or "no compression"
            raise ConfigError(f"accuracy_aware_training.mode: 'adaptive_compression_level' searches the level of an "
                              f"algorithm with a continuous compression level (magnitude_sparsity, rb_sparsity, "
                              f"filter_pruning); this model has {have}: use mode 'early_exit'",
                              path="accuracy_aware_training.mode")
        self.maximal_compression_rate = min(MAXIMAL_COMPRESSION_RATE,
                                            getattr(self._level_part, "maximal_compression_rate",
                                                    MAXIMAL_COMPRESSION_RATE))
        self.minimal_compression_rate = 0.0

    def _keep_if_best(self, model, accuracy: float):
        """The best model: the highest level within budget, the most accurate epoch at that level."""
        if not self.within_budget(accuracy):
            return
        rate = self.compression_rate
        if self.best is None or rate > self.best.compression_rate or \
                (rate == self.best.compression_rate and accuracy > self.best.accuracy):
            self._keep(model, accuracy)

    def run(self, model, train_epoch_fn, validate_fn, configure_optimizers_fn=None, dump_checkpoint_fn=None):
        """Returns ``model`` holding the best state found; ``self.statistics`` gives its level and accuracy."""
        p = self.params
        self._start(model, train_epoch_fn, validate_fn, configure_optimizers_fn, dump_checkpoint_fn)
        self._early_exit_phase(model, p["initial_training_phase_epochs"], "initial")
        if self.best is not None and not self.within_budget(self.best.accuracy):
            self.best = None  # the initial phase kept its most accurate epoch; the search keeps within-budget ones
        part = self._level_part
        target = float(part.compression_rate)
        part.set_compression_rate(target)
        step, was_increased, force = float(p["initial_compression_rate_step"]), None, True
        self._configure_optimizers()
        accuracy = self._validate(model, "search", step)
        self._keep_if_best(model, accuracy)
        while step >= p["minimal_compression_rate_step"] and self.cumulative_epochs < p["maximal_total_epochs"]:
            budget = self.best_accuracy_since_reset - self.minimal_tolerable_accuracy
            if force or budget >= 0 or self.training_epochs >= p["patience_epochs"]:
                direction = 1.0 if budget >= 0 else -1.0
                if was_increased is not None and was_increased != direction:
                    step *= p["compression_rate_step_reduction_factor"]
                    self.lr_factor *= p["lr_reduction_factor"]
                target, was_increased, force = round(target + direction * step, 10), direction, False
                if target < self.minimal_compression_rate:
                    self._note("cannot reach the accuracy budget even without compression")
                    break
                if target > self.maximal_compression_rate:
                    self._note(f"reached the maximal compression rate {self.maximal_compression_rate:g}")
                    break
                self._restore_best(model)
                part.set_compression_rate(target)
                self._configure_optimizers()
            self._train_epoch(model)
            accuracy = self._validate(model, "search", step)
            self._keep_if_best(model, accuracy)
        if self.best is None:
            self._note("no epoch met the accuracy budget; the model is left as trained last "
                       "(more epochs, a larger budget or a lower starting level may help)")
        else:
            self._restore_best(model)
        self._validate(model, "final")
        return self._finish(model)



_LOOPS = {EARLY_EXIT: EarlyExitCompressionTrainingLoop, ADAPTIVE: AdaptiveCompressionTrainingLoop}


def _block_of(config) -> tuple[dict, Any]:
    """The ``accuracy_aware_training`` block and the config's ``log_dir`` from a Config, a config dict or the block."""
    data = getattr(config, "data", config)
    if not isinstance(data, dict):
        raise ConfigError(f"accuracy_aware_training: expected a Config, a config dict or the block itself, "
                          f"got {type(config).__name__}", path="accuracy_aware_training")
    if "mode" in data and "accuracy_aware_training" not in data:
        return data, None
    if "accuracy_aware_training" not in data:
        raise ConfigError("accuracy_aware_training: the config has no 'accuracy_aware_training' block",
                          path="accuracy_aware_training")
    return data["accuracy_aware_training"], data.get("log_dir")


def create_accuracy_aware_training_loop(config, ctrl, uncompressed_model_accuracy: float | None = None, **kwargs):
    """The loop for the config's ``accuracy_aware_training`` block (NNCF's function of the same name).

    ``config``: a ``Config``, an NNCF-style config dict, or the block itself
    (``{"mode": ..., "params": {...}}``). ``ctrl``: the compression controller.
    Keyword arguments: ``uncompressed_model=`` (instead of the accuracy),
    ``log_dir=`` (default: the config's ``log_dir``; None writes no files),
    ``report=`` (a callable taking each progress line; None for silence),
    ``lr_updates_needed=`` (step the lr scheduler once per epoch; default True).
    """
    block, log_dir = _block_of(config)
    params = validate_accuracy_aware_config(block)
    kwargs.setdefault("log_dir", log_dir)
    return _LOOPS[params["mode"]](params, ctrl, uncompressed_model_accuracy, **kwargs)
