"""The mixed-precision part of the controller: when HAWQ measures, chooses and applies; statistics, state.

``initialize(ctx)`` (HAWQ) runs after the quantization part's (parts initialize
in pass order and MixedPrecision comes after Quantize), so ranges are already
set when bits change. ``FakeQuantizer.set_bits`` keeps the real-valued range a
quantizer covers, so a 4-bit quantizer spans the range its 8-bit range
initialization found: the same result as initializing at 4 bits for every
range initializer whose range does not depend on the bit width (min/max,
mean min/max, percentile, threshold). Steps, each in its own module:

1. traces (``traces.py``): the average Hessian trace of each quantized layer's
   weights on the first ``num_data_points`` samples, or read from
   ``traces_per_layer_path``;
2. noise (``assignment.py``): ``||Q_b(w) - w||²`` for each candidate ``b``;
3. choice: ``selection.select_bitwidths`` (HAWQ-v2 rule documented there);
4. apply (``assignment.py``): weight quantizers get their layer's bits; an
   activation quantizer that feeds quantized layers gets the maximum of their bits;
5. dumps (``dump.py``) with ``dump_init_precision_data``.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F

from fxcompress.checkpoint import require_same_names, require_state_keys
from fxcompress.controller import ControllerPart, InitContext, StatisticsSection
from fxcompress.data import CalibrationData
from fxcompress.distributed import broadcast_from_rank0, is_distributed
from fxcompress.errors import CheckpointError, NotInitializedError
from fxcompress.quantizers import FakeQuantizer, average_ranges_across_ranks

from . import assignment
from .dump import write_precision_dump
from .hessian import TraceEstimate
from .layers import QuantizedLayer, nominal_bits
from .selection import Selection, compression_ratio, select_bitwidths
from .traces import (PROBES_PER_PASS, average_traces_across_ranks, default_criterion_fn, default_target_fn,
                     estimate_layer_traces, load_traces, trace_batches)

__all__ = ["MixedPrecisionController", "default_criterion_fn", "default_target_fn", "PROBES_PER_PASS"]


class MixedPrecisionController(ControllerPart):
    algorithm = "mixed_precision"

    def __init__(self, gm: torch.fx.GraphModule, layers: list[QuantizedLayer], excluded: list[QuantizedLayer],
                 skipped: list[dict], params: dict, *, criterion: Callable | None = None,
                 criterion_fn: Callable | None = None, target_fn: Callable | None = None):
        super().__init__()
        self.gm = gm
        self.layers = list(layers)          # layers whose bits are chosen
        self.excluded = list(excluded)      # quantized layers the scopes exclude: bits kept, counted in ratios
        self.skipped = list(skipped)
        self.params = dict(params)
        self.mode = params["type"]
        self.criterion = criterion if criterion is not None else F.cross_entropy
        self.criterion_fn = criterion_fn if criterion_fn is not None else default_criterion_fn
        self.target_fn = target_fn if target_fn is not None else default_target_fn
        self.initialized = False
        self.traces: list[float] | None = None
        self.trace_estimate: TraceEstimate | None = None
        self.noise: list[dict[int, float]] | None = None
        self.selection: Selection | None = None
        self.manual_assignments: dict[str, int] = {}

    # -- what the parts around us see ----------------------------------------------------------
    def set_criterion(self, criterion: Callable | None = None, criterion_fn: Callable | None = None,
                      target_fn: Callable | None = None):
        """Set the loss the Hessian is taken of (for pipelines built from JSON configs)."""
        if criterion is not None:
            self.criterion = criterion
        if criterion_fn is not None:
            self.criterion_fn = criterion_fn
        if target_fn is not None:
            self.target_fn = target_fn

    def needs_data(self) -> bool:
        return (self.mode == "hawq" and bool(self.layers) and not self.params.get("traces_per_layer_path")
                and not self.initialized)

    @property
    def all_layers(self) -> list[QuantizedLayer]:
        return self.layers + self.excluded

    def _activation_quantizers(self) -> dict[str, FakeQuantizer]:
        return assignment.activation_quantizers(self.gm, self.all_layers)

    def current_bits(self) -> list[int]:
        return [nominal_bits(layer, layer.module) for layer in self.layers]

    def _fixed(self) -> dict[int, int]:
        n = len(self.layers)
        return {n + i: nominal_bits(layer, layer.module) for i, layer in enumerate(self.excluded)}

    def _groups(self) -> list[str | None]:
        return [layer.group for layer in self.all_layers]

    def achieved_ratio(self) -> float:
        """Compression ratio of the current weight bits (activation bits by the max rule)."""
        config = self.current_bits() + [nominal_bits(l, l.module) for l in self.excluded]
        if not config:
            return 1.0
        return compression_ratio(config, [l.flops for l in self.all_layers], self._groups())

    # -- initialize -------------------------------------------------------------------------------
    def initialize(self, ctx: InitContext):
        if self.mode != "hawq" or not self.layers:
            self.initialized = True
            return
        path = self.params.get("traces_per_layer_path")
        self.traces = load_traces(path, self.layers) if path else None
        if self.traces is None:
            if ctx.data is None:
                raise ValueError("initialize: mixed precision (HAWQ) needs a data loader to estimate Hessian "
                                 "traces: ctrl.initialize(loader), or give traces_per_layer_path")
            self.trace_estimate = self.estimate_traces(ctx.gm, ctx.data)
            self.traces = list(self.trace_estimate.traces)
        if ctx.distributed:
            self.traces = average_traces_across_ranks(self.traces)
        negative = [l.module_path for l, t in zip(self.layers, self.traces) if t < 0]
        if negative:
            warnings.warn(f"mixed precision: negative average Hessian trace for {', '.join(negative[:5])}: the model "
                          f"is not near a minimum of the loss; HAWQ's sensitivities assume a trained model "
                          f"(negative traces make fewer bits look better)", stacklevel=3)
        self.noise = self.quantization_noise(ctx.gm)
        self._select_and_apply_bits()
        self.initialized = True
        if self.params.get("dump_init_precision_data"):
            self.dump(self.params["dump_dir"])

    def _select_and_apply_bits(self):
        """Choose the bit widths from the traces and noise (HAWQ-v2 rule) and set them."""
        p = self.params
        self.selection = select_bitwidths(
            self.traces + [0.0] * len(self.excluded), [l.flops for l in self.all_layers],
            self.noise + [{}] * len(self.excluded), p["bits"], p["compression_ratio"], groups=self._groups(),
            fixed=self._fixed(), strict=p["bitwidth_assignment_mode"] == "strict",
            field_name="MixedPrecision.compression_ratio")
        self.apply_bits({layer.weight_quantizer: b for layer, b in zip(self.layers, self.selection.bits)})

    def estimate_traces(self, gm: torch.fx.GraphModule, data: CalibrationData,
                        layers: list[QuantizedLayer] | None = None, progress: str | None = None,
                        probes_per_pass: int = PROBES_PER_PASS) -> TraceEstimate:
        """Average Hessian traces of the layers' weights (all selected layers by default; ``traces.py``)."""
        p = self.params
        return estimate_layer_traces(
            gm, self.layers if layers is None else layers, trace_batches(data, self.target_fn, p["num_data_points"]),
            lambda outputs, target: self.criterion_fn(outputs, target, self.criterion), seed=p["seed"],
            iter_number=p["iter_number"], tolerance=p["tolerance"], probes_per_pass=probes_per_pass,
            progress=progress if progress is not None else "mixed precision: Hessian traces")

    def quantization_noise(self, gm: torch.fx.GraphModule) -> list[dict[int, float]]:
        """``||Q_b(w) - w||²`` per selected layer and candidate width ``b``."""
        return assignment.quantization_noise(gm, self.layers, self.params["bits"])

    # -- applying bits --------------------------------------------------------------------------------
    def apply_bits(self, weight_bits: dict[str, int], activation_bits: dict[str, int] | None = None):
        """Set weight quantizers (by name; nominal bits) and derive or set the activation quantizers."""
        assignment.apply_bits(self.gm, self.all_layers, weight_bits, activation_bits)

    def apply_manual(self, gm: torch.fx.GraphModule):
        """``bitwidth_per_scope``: ``[[bits, scope], ...]``; later entries win (docs/mixed_precision.md)."""
        weight_bits, activation_bits = assignment.manual_bits(gm, self.layers, self.all_layers,
                                                              self.params.get("bitwidth_per_scope", []))
        self.apply_bits(weight_bits, activation_bits)
        self.manual_assignments = {**weight_bits, **activation_bits}

    # -- statistics, checkpoints, export ------------------------------------------------------------------
    def statistics(self) -> StatisticsSection:
        rows = []
        acts = self._activation_quantizers()
        for i, layer in enumerate(self.layers):
            bits = nominal_bits(layer, layer.module)
            row = {"layer": layer.module_path, "weight_quantizer": layer.weight_quantizer,
                   "activation_quantizer": ", ".join(layer.activation_quantizers) or None,
                   "params": layer.params, "flops": layer.flops,
                   "avg_trace": self.traces[i] if self.traces is not None else None,
                   "bits": bits,
                   "activation_bits": max((acts[n].spec.bits for n in layer.activation_quantizers), default=None)}
            if self.noise is not None and self.traces is not None and bits in self.noise[i]:
                row["sensitivity"] = self.traces[i] * self.noise[i][bits]
            rows.append(row)
        summary: dict[str, Any] = {
            "type": self.mode,
            "initialized": self.initialized,
            "compression_ratio": self.achieved_ratio(),
            "compression_ratio_target": self.params["compression_ratio"] if self.mode == "hawq" else None,
            "bits": {b: sum(1 for r in rows if r["bits"] == b) for b in sorted({r["bits"] for r in rows})},
            "candidate_bits": list(self.params["bits"]),
            "num_layers": len(self.layers),
        }
        if self.selection is not None:
            s = self.selection
            summary.update({"sensitivity": s.sensitivity, "candidates": s.num_candidates,
                            "feasible_candidates": s.num_feasible, "reachable_ratio": list(s.reachable)})
        if self.trace_estimate is not None:
            e = self.trace_estimate
            summary.update({"hutchinson_iterations": e.iterations, "converged": e.converged,
                            "trace_seconds": e.seconds})
        skipped = list(self.skipped) + [{"scope": l.module_path, "reason": "excluded by ignored_scopes/"
                                         "target_scopes: bits kept, counted in the compression ratio"}
                                        for l in self.excluded]
        return StatisticsSection(self.algorithm, summary, rows, skipped)

    def state_dict(self) -> dict:
        """Chosen bits, and everything statistics and dumps report (traces, noise, the selection)."""
        quantizers = {l.weight_quantizer: int(l.module.spec.bits) for l in self.all_layers}
        quantizers.update({name: int(m.spec.bits) for name, m in self._activation_quantizers().items()})
        return {"scheduler": self.scheduler.state_dict(), "initialized": self.initialized,
                "bits": quantizers,
                "traces": ({l.module_path: float(t) for l, t in zip(self.layers, self.traces)}
                           if self.traces is not None else None),
                "noise": ({l.module_path: {int(b): float(v) for b, v in n.items()}
                           for l, n in zip(self.layers, self.noise)} if self.noise is not None else None),
                "selection": _plain(self.selection),
                "trace_estimate": _plain(self.trace_estimate),
                "manual_assignments": dict(self.manual_assignments)}

    def load_state_dict(self, state: dict):
        require_state_keys(state, ("scheduler", "bits"), "mixed precision controller")
        modules = {l.weight_quantizer: l.module for l in self.all_layers}
        modules.update(self._activation_quantizers())
        require_same_names(modules, state["bits"], "mixed precision controller", "quantizers")
        for name, module in modules.items():
            # The quantizer's scale/zero point come from the GraphModule's own state dict
            # (fxcompress.load_state), saved for these bits: change the spec only, not the range.
            module.spec = module.spec.with_bits(int(state["bits"][name]))
        self.traces = self._per_layer(state.get("traces"), "traces", float)
        self.noise = self._per_layer(state.get("noise"), "noise",
                                     lambda n: {int(b): float(v) for b, v in n.items()})
        selection = state.get("selection")
        if selection is not None and len(selection["bits"]) != len(self.all_layers):
            raise CheckpointError(f"mixed precision controller state chose bits for {len(selection['bits'])} "
                                  f"layers, this model has {len(self.all_layers)}: not the same model")
        self.selection = (Selection(**{**selection, "reachable": tuple(selection["reachable"])})
                          if selection is not None else None)
        estimate = state.get("trace_estimate")
        self.trace_estimate = TraceEstimate(**estimate) if estimate is not None else None
        self.manual_assignments = dict(state.get("manual_assignments", {}))
        self.initialized = bool(state.get("initialized", False))
        self.scheduler.load_state_dict(state["scheduler"])

    def _per_layer(self, saved: dict | None, key: str, convert: Callable) -> list | None:
        """A ``{module_path: value}`` checkpoint entry as a list in layer order (None stays None)."""
        if not saved:
            return None
        missing = [l.module_path for l in self.layers if l.module_path not in saved]
        if missing:
            raise CheckpointError(f"mixed precision controller state has no {key} for {missing[:5]}: "
                                  f"not the same model")
        return [convert(saved[l.module_path]) for l in self.layers]

    def check_exportable(self):
        if self.mode == "hawq" and self.layers and not self.initialized:
            raise NotInitializedError("mixed precision: the bit widths are not chosen yet; call "
                                      "ctrl.initialize(data_loader) before export (HAWQ needs the Hessian traces)")

    def distributed(self):
        """HAWQ's traces are averaged over ranks and the bits chosen again from them (what initialize does
        after ``ctrl.distributed()``, so either order chooses alike); rank 0's bits win in any case."""
        if not is_distributed() or not self.initialized:
            return
        if self.traces is not None and self.noise is not None:
            self.traces = average_traces_across_ranks(self.traces)
            self._select_and_apply_bits()
        names = [l.weight_quantizer for l in self.layers]
        bits = torch.tensor([nominal_bits(l, l.module) for l in self.layers], dtype=torch.int64)
        broadcast_from_rank0([bits])
        self.apply_bits(dict(zip(names, bits.tolist())))
        # A rank whose bits changed here rescaled its ranges (set_bits keeps the real range, and
        # the ranges were averaged under each rank's own bits): average them again.
        average_ranges_across_ranks([l.module for l in self.all_layers] + list(self._activation_quantizers().values()))

    # -- dumps ----------------------------------------------------------------------------------------
    def bitwidth_per_scope(self) -> list[list]:
        """The chosen weight bits as a manual-mode ``bitwidth_per_scope`` (reproduces this choice)."""
        return [[nominal_bits(l, l.module), l.module_path] for l in self.layers]

    def dump(self, directory):
        """Write traces, noise, candidates and the choice (and a plot when matplotlib is installed; ``dump.py``)."""
        return write_precision_dump(directory, [l.module_path for l in self.layers], [l.flops for l in self.layers],
                                    self.traces, self.noise, self.current_bits(), self.achieved_ratio(),
                                    self.selection, self.plot)

    def plot(self, path):
        """Per-layer average traces and chosen bits (and the candidates' ratio/sensitivity) to an image."""
        from .plot import plot_traces_and_bits
        if self.traces is None:
            raise NotInitializedError("mixed precision: no Hessian traces yet; call ctrl.initialize(loader)")
        return plot_traces_and_bits(path, [l.module_path for l in self.layers], self.traces, self.current_bits(),
                                    self.selection)


def _plain(record) -> dict | None:
    """A dataclass record as plain lists, dicts and numbers (``torch.load(weights_only=True)`` reads it)."""
    if record is None:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(record).items()}
