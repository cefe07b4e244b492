"""The compression controller: one part per compression pass, composed.

Each compression pass returns a ``ControllerPart`` that owns the modules it
inserted (quantizers, masks) by direct reference. The user talks to the
``CompressionController``, which forwards ``initialize``, ``loss``,
``scheduler``, ``statistics``, ``state_dict`` to every part (and hands out a
part by its algorithm name: ``ctrl["quantization"]``), and lowers the
graph for ``strip()`` / ``export_onnx()`` with the lowering passes the parts
provide, in the fixed order of ``fxcompress.lowering.LoweringPhase`` (masks and
pruning act on float weights before quantizers are turned into export ops).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.fx

from . import inspect as fx_inspect
from .data import CalibrationData
from .errors import CheckpointError
from .lowering import LoweringPhase
from .pass_manager import Pass, PassContext, PassManager, PassRecord

__all__ = ["Scheduler", "CompositeScheduler", "ControllerPart", "StatisticsSection", "Statistics",
           "CompressionController", "InitContext"]


class Scheduler:
    """Counts optimizer steps and epochs; algorithms subclass it and react in ``update()``.

    Call ``step()`` after every optimizer step and ``epoch_step()`` once per epoch
    (at its end, as in docs/design.md's loop). ``current_epoch`` starts at 0 and
    ``current_step`` counts steps within the current epoch.
    """

    def __init__(self):
        self.current_epoch = 0
        self.current_step = 0
        self.global_step = 0

    def step(self):
        self.current_step += 1
        self.global_step += 1
        self.update()

    def epoch_step(self):
        self.current_epoch += 1
        self.current_step = 0
        self.update()

    def update(self):
        """Recompute the algorithm's current level from the counters."""

    def state_dict(self) -> dict:
        return {"current_epoch": self.current_epoch, "current_step": self.current_step,
                "global_step": self.global_step}

    def load_state_dict(self, state: dict):
        for key in ("current_epoch", "current_step", "global_step"):
            if key not in state:
                raise CheckpointError(f"scheduler state lacks '{key}'")
            setattr(self, key, int(state[key]))
        self.update()


class CompositeScheduler:
    def __init__(self, schedulers: Sequence[Scheduler]):
        self.schedulers = list(schedulers)

    def step(self):
        for s in self.schedulers:
            s.step()

    def epoch_step(self):
        for s in self.schedulers:
            s.epoch_step()

    @property
    def current_epoch(self) -> int:
        return self.schedulers[0].current_epoch if self.schedulers else 0

    def attach_optimizer(self, optimizer) -> "CompositeScheduler":
        """Let the schedules that drive the optimizer (NNCF's staged quantization / binarization:
        learning rate and weight decay) set its parameter groups from now on (docs/nncf_configs.md)."""
        for s in self.schedulers:
            if getattr(s, "drives_optimizer", False):
                s.attach_optimizer(optimizer)
        return self

    def should_step_optimizer(self) -> bool:
        """False while a staged schedule accumulates gradients (``batch_multiplier``); else True."""
        return all(s.should_step_optimizer() for s in self.schedulers if getattr(s, "drives_optimizer", False))


@dataclass
class InitContext:
    """What a part's ``initialize`` gets: the graph, the data, and how to run it."""
    gm: torch.fx.GraphModule
    data: CalibrationData | None
    distributed: bool = False   # ctrl.distributed() was called: ranks may exchange results mid-way


@dataclass
class StatisticsSection:
    algorithm: str
    summary: dict = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.summary, "layers": [dict(r) for r in self.layers],
                "skipped": [dict(s) for s in self.skipped]}

    def __str__(self) -> str:
        lines = [f"== {self.algorithm} =="]
        lines += [f"{k}: {_fmt(v)}" for k, v in self.summary.items()]
        if self.layers:
            lines.append(_table(self.layers))
        for s in self.skipped:
            lines.append(f"skipped {s.get('scope', '?')}: {s.get('reason', '')}")
        return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [columns] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


class Statistics:
    def __init__(self, sections: Sequence[StatisticsSection]):
        self.sections = list(sections)

    def to_dict(self) -> dict:
        """``{algorithm: {summary keys..., "layers": [...], "skipped": [...]}}`` (README documents the keys)."""
        out = {}
        for s in self.sections:
            key, i = s.algorithm, 1
            while key in out:
                key, i = f"{s.algorithm}_{i}", i + 1
            out[key] = s.to_dict()
        return out

    def __getitem__(self, algorithm: str) -> StatisticsSection:
        for s in self.sections:
            if s.algorithm == algorithm:
                return s
        raise KeyError(algorithm)

    def __str__(self) -> str:
        return "\n\n".join(str(s) for s in self.sections) if self.sections else "(no compression)"

    __repr__ = __str__


class ControllerPart:
    """What one compression pass leaves behind for the training loop.

    Subclasses override what applies; the defaults are those of an algorithm
    with nothing to initialize, no loss and no schedule.
    """
    algorithm: str = "none"

    def __init__(self):
        self.scheduler = Scheduler()

    def initialize(self, ctx: InitContext):
        pass

    def loss(self):
        return None

    def statistics(self) -> StatisticsSection:
        return StatisticsSection(self.algorithm)

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict):
        self.scheduler.load_state_dict(state["scheduler"])

    def lowering_passes(self) -> list[Pass]:
        return []

    def distributed(self):
        """Make the state initialization computed agree across torch.distributed ranks, now.

        ``ctrl.distributed()`` calls it at once and again after every later ``initialize()``,
        so it must be safe to repeat (a no-op in one process: see ``fxcompress.distributed``).
        """

    def check_exportable(self):
        """Raise a clear error when the part's state cannot be exported yet (e.g. before initialize)."""

    def set_calibration_data(self, ctx: InitContext):
        """Keep the data for re-initializations during training (staged quantization's stage starts)."""

    def needs_data(self) -> bool:
        """True when ``initialize`` cannot do its job without a data loader."""
        return False


class CompressionController:
    """The parts of every compression pass, driven as one; parts are reached by algorithm name.

    ``ctrl["quantization"]`` or ``ctrl.quantization`` is the quantization part (a second
    part of the same algorithm is ``quantization_1``: the keys of ``state_dict()``);
    ``"filter_pruning" in ctrl`` tests for one, ``for name in ctrl`` and ``ctrl.items()``
    walk them in pass order; ``ctrl.parts`` is the list.
    """

    def __init__(self, gm: torch.fx.GraphModule, parts: Sequence[ControllerPart],
                 records: Sequence[PassRecord] = ()):
        self.gm = gm
        self.parts = list(parts)
        self.records = list(records)
        self.scheduler = CompositeScheduler([p.scheduler for p in self.parts])
        self._distributed = False

    # -- parts by name ---------------------------------------------------
    def keys(self) -> list[str]:
        """The parts' names in pass order: the algorithm names of configs, ``_1``, ``_2`` for repeats."""
        keys, counts = [], {}
        for part in self.parts:
            n = counts.get(part.algorithm, 0)
            keys.append(part.algorithm if n == 0 else f"{part.algorithm}_{n}")
            counts[part.algorithm] = n + 1
        return keys

    def items(self) -> list[tuple[str, ControllerPart]]:
        return list(zip(self.keys(), self.parts))

    def __iter__(self):
        return iter(self.keys())

    def __contains__(self, name) -> bool:
        return name in self.keys()

    def _parts_listing(self) -> str:
        keys = self.keys()
        return f"its parts: {', '.join(repr(k) for k in keys) if keys else '(none)'}"

    def _find(self, name) -> ControllerPart | None:
        return next((part for key, part in self.items() if key == name), None)

    def __getitem__(self, name: str) -> ControllerPart:
        part = self._find(name)
        if part is None:
            raise KeyError(f"this compression controller has no part {name!r}; {self._parts_listing()}")
        return part

    def __dir__(self):
        return [*super().__dir__(), *self.keys()]

    def __getattr__(self, name: str) -> ControllerPart:
        # Only reached when normal lookup fails. Copies and pickles look up dunders before
        # __init__ ran (no parts yet): those get a plain AttributeError.
        if "parts" not in self.__dict__ or name.startswith("__"):
            raise AttributeError(name)
        part = self._find(name)
        if part is None:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r} and no part of "
                                 f"that name; {self._parts_listing()}")
        return part

    # -- training loop -------------------------------------------------
    def set_calibration_data(self, data_loader: Iterable, *, input_fn: Callable | None = None, device=None):
        """Hand the parts the loader that re-initializations during training use, without initializing.

        ``initialize(loader)`` does this too. A run resumed from a checkpoint calls it after
        ``load_state_dict`` (as NNCF keeps the init loader registered in its config), so that a
        later stage start (staged quantization re-initializes ranges) sees the same data as the
        uninterrupted run would.
        """
        data = CalibrationData(data_loader, input_fn, device, model=self.gm)
        for part in self.parts:
            part.set_calibration_data(InitContext(self.gm, data, self._distributed))
        return self

    def initialize(self, data_loader: Iterable | None = None, *, input_fn: Callable | None = None,
                   device=None):
        """Range init, BN adaptation, Hessian traces, importance: whatever the parts need."""
        data = None
        if data_loader is not None:
            data = CalibrationData(data_loader, input_fn, device, model=self.gm)
        elif any(p.needs_data() for p in self.parts):
            needing = [p.algorithm for p in self.parts if p.needs_data()]
            raise ValueError(f"initialize: {', '.join(needing)} needs a data loader: ctrl.initialize(loader)")
        for part in self.parts:
            part.initialize(InitContext(self.gm, data, self._distributed))
            if self._distributed:  # before the next part builds on it
                part.distributed()
        return self

    def loss(self) -> torch.Tensor:
        total = None
        for part in self.parts:
            value = part.loss()
            if value is not None:
                total = value if total is None else total + value
        if total is None:
            device = next((p.device for p in self.gm.parameters()), torch.device("cpu"))
            return torch.zeros((), device=device)
        return total

    def statistics(self) -> Statistics:
        return Statistics([p.statistics() for p in self.parts])

    def distributed(self):
        """Make every rank hold what rank-local initialization computed alike (averaged or rank 0's).

        Call it after wrapping in DistributedDataParallel, before or after ``initialize()``:
        it synchronizes what is initialized now, and every later ``initialize()`` does again.
        """
        self._distributed = True
        for part in self.parts:
            part.distributed()
        return self

    # -- checkpoints -----------------------------------------------------
    def state_dict(self) -> dict:
        """Plain Python and tensors only, so it loads with ``torch.load(..., weights_only=True)``."""
        return {key: part.state_dict() for key, part in self.items()}

    def load_state_dict(self, state: dict):
        """Restore every part; on a bad entry, parts already loaded are put back (all or nothing)."""
        if not isinstance(state, dict):
            raise CheckpointError(f"controller checkpoint must be the dict ctrl.state_dict() returned, "
                                  f"got {type(state).__name__}")
        keys = self.keys()
        missing = [k for k in keys if k not in state]
        unexpected = [k for k in state if k not in keys]
        if missing or unexpected:
            raise CheckpointError(
                f"controller checkpoint does not match this compression setup: "
                f"missing {missing}, unexpected {unexpected} (this controller has parts {keys})")
        loaded: list[tuple[ControllerPart, dict]] = []
        for key, part in self.items():
            loaded.append((part, part.state_dict()))
            try:
                part.load_state_dict(state[key])
            except Exception as exc:
                for done, before in reversed(loaded):
                    done.load_state_dict(before)
                if isinstance(exc, CheckpointError):
                    raise
                raise CheckpointError(f"controller checkpoint, part '{key}': malformed state "
                                      f"({type(exc).__name__}: {exc}); nothing was loaded") from exc

    # -- lowering ----------------------------------------------------------
    def lowering_passes(self) -> list[Pass]:
        passes = [p for part in self.parts for p in part.lowering_passes()]
        return sorted(passes, key=lambda p: getattr(p, "lowering_order", LoweringPhase.DEFAULT))

    def lower(self, debug: bool = False) -> torch.fx.GraphModule:
        """A lowered deep copy of the graph: masks folded, channels removed, quantizers as export ops."""
        lowered = copy.deepcopy(self.gm)
        lowered.eval()
        manager = PassManager(self.lowering_passes(), debug=debug)
        manager.run(lowered, PassContext.for_graph(lowered, debug))
        self.lowering_records = manager.records
        return lowered

    def strip(self) -> torch.fx.GraphModule:
        """The folded plain model (masks applied, pruned channels removed, BN folded where quantized)."""
        return self.lower()

    def export_onnx(self, path, *, example_inputs=None, dynamic_batch: bool = True, **kwargs):
        """Lower and export to ONNX (QDQ where quantized); returns the path."""
        from .export import export_onnx
        for part in self.parts:
            part.check_exportable()
        lowered = self.lower()
        return export_onnx(lowered, path, example_inputs=example_inputs, dynamic_batch=dynamic_batch,
                           **kwargs)

    # -- inspection ------------------------------------------------------------
    def diff(self) -> str:
        """The graph diff of every compression pass, in order."""
        return "\n\n".join(f"### {r.name}\n{r.diff or '(no change)'}" for r in self.records)

    def summary(self) -> str:
        return fx_inspect.summary(self.records)
