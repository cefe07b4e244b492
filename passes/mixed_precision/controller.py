"""The mixed-precision part of the controller: Hessian traces, bit-width choice, applying it.

``initialize(ctx)`` (HAWQ) runs after the quantization part's (parts initialize
in pass order and MixedPrecision comes after Quantize), so ranges are already
set when bits change. ``FakeQuantizer.set_bits`` keeps the real-valued range a
quantizer covers, so a 4-bit quantizer spans the range its 8-bit range
initialization found: the same result as initializing at 4 bits for every
range initializer whose range does not depend on the bit width (min/max,
mean min/max, percentile, threshold). Steps:

1. traces: the average Hessian trace of each quantized layer's weights (as its
   weight quantizer sees them), by Hutchinson iterations (``hessian.py``) on the
   first ``num_data_points`` samples, with every quantizer disabled (the float
   model's Hessian, as NNCF does) and the model in eval mode (BatchNorm running
   statistics, no dropout: nothing is updated). The weight enters as
   ``w + δ`` (a forward hook on its quantizer adds a zero tensor ``δ``), and the
   traces are taken with respect to ``δ``, so parameters are never written and
   masks before the quantizer are respected. Or read from
   ``traces_per_layer_path``.
2. noise: ``||Q_b(w) - w||²`` for each candidate ``b``, from a copy of each
   weight quantizer set to ``b`` bits.
3. choice: ``selection.select_bitwidths`` (HAWQ-v2 rule documented there).
4. apply: weight quantizers get their layer's bits; an activation quantizer
   that feeds quantized layers gets the maximum of their bits; activation
   quantizers feeding no quantized layer keep theirs.
"""
from __future__ import annotations

import copy
import difflib
import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F

from fxcompress.controller import ControllerPart, InitContext, StatisticsSection
from fxcompress.data import CalibrationData, batch_to_inputs, count_samples, preserved_modes, to_device
from fxcompress.errors import CheckpointError, ConfigError, NotInitializedError, ScopeError
from fxcompress.quantizers import FakeQuantizer, average_ranges_across_ranks
from fxcompress.scopes import ScopeSet

from .hessian import TraceEstimate, estimate_average_traces
from .layers import QuantizedLayer, effective_bits_for, nominal_bits, quantizer_of, weight_value
from .quantizer_ids import nncf_quantizer_ids
from .selection import Selection, compression_ratio, select_bitwidths

__all__ = ["MixedPrecisionController", "default_criterion_fn", "default_target_fn", "PROBES_PER_PASS"]

# Hutchinson probes that share one forward pass and first backward pass (hessian.py); the result
# equals probing one by one, with at most PROBES_PER_PASS - 1 extra probes after convergence.
PROBES_PER_PASS = 4


def default_target_fn(batch: Any):
    """The target of a batch: its second element ``(input, target)``, or ``batch["labels"]``."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if hasattr(batch, "keys") and "labels" in batch:
        return batch["labels"]
    return None


def default_criterion_fn(outputs, target, criterion):
    """NNCF's ``criterion_fn(outputs, target, criterion)`` default: ``criterion(outputs, target)``."""
    if target is None:
        raise ValueError("mixed precision: the batches have no target (expected (input, target) tuples or a "
                         "'labels' key); pass MixedPrecision(criterion_fn=lambda outputs, target, criterion: "
                         "loss) or target_fn=")
    return criterion(outputs, target)


@dataclass
class _Batch:
    args: tuple
    kwargs: dict
    target: Any
    samples: int


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
        out = {}
        for layer in self.all_layers:
            for name in layer.activation_quantizers:
                out[name] = self.gm.get_submodule(name)
        return out

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
        self.traces = self._load_traces() if self.params.get("traces_per_layer_path") else None
        if self.traces is None:
            if ctx.data is None:
                raise ValueError("initialize: mixed precision (HAWQ) needs a data loader to estimate Hessian "
                                 "traces: ctrl.initialize(loader), or give traces_per_layer_path")
            self.trace_estimate = self.estimate_traces(ctx.gm, ctx.data)
            self.traces = list(self.trace_estimate.traces)
        if ctx.distributed:
            self._average_traces_across_ranks()
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

    def _batches(self, data: CalibrationData) -> list[_Batch]:
        out, seen = [], 0
        for batch in data.loader:
            args, kwargs = batch_to_inputs(batch, data.input_fn, data.accepted_kwargs)
            target = self.target_fn(batch)
            args, kwargs = to_device(args, data.device), to_device(kwargs, data.device)
            n = count_samples(args, kwargs)
            out.append(_Batch(args, kwargs, to_device(target, data.device), n))
            seen += n
            if seen >= self.params["num_data_points"]:
                break
        if not out:
            raise ValueError("initialize: the data loader yielded no batches")
        return out

    def estimate_traces(self, gm: torch.fx.GraphModule, data: CalibrationData,
                        layers: list[QuantizedLayer] | None = None, progress: str | None = None,
                        probes_per_pass: int = PROBES_PER_PASS) -> TraceEstimate:
        """Average Hessian traces of the layers' weights (all selected layers by default)."""
        layers = self.layers if layers is None else layers
        batches = self._batches(data)
        values = [weight_value(gm, layer.weight_node) for layer in layers]
        deltas = [torch.zeros_like(v, dtype=torch.float32).requires_grad_(True) for v in values]
        quantizers = [m for m in gm.modules() if isinstance(m, FakeQuantizer)]
        enabled = [q.enabled for q in quantizers]
        hooks = [layer.module.register_forward_hook(lambda m, args, out, d=d: out + d.to(out.dtype))
                 for layer, d in zip(layers, deltas)]

        def loss_of(b: _Batch):
            return lambda: self.criterion_fn(gm(*b.args, **b.kwargs), b.target, self.criterion)

        try:
            for q in quantizers:
                q.enabled = False
            with preserved_modes(gm):
                gm.eval()
                generator = torch.Generator().manual_seed(int(self.params["seed"]))
                return estimate_average_traces(
                    [(loss_of(b), b.samples) for b in batches], deltas, iter_number=self.params["iter_number"],
                    tolerance=self.params["tolerance"], probes_per_pass=probes_per_pass, generator=generator,
                    progress=progress if progress is not None else "mixed precision: Hessian traces")
        finally:
            for h in hooks:
                h.remove()
            for q, flag in zip(quantizers, enabled):
                q.enabled = flag

    def _load_traces(self) -> list[float]:
        path = self.params["traces_per_layer_path"]
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"MixedPrecision.traces_per_layer_path: cannot read {path}: {exc}",
                              path="traces_per_layer_path") from None
        if isinstance(saved, dict):
            missing = [l.module_path for l in self.layers if l.module_path not in saved]
            if missing:
                raise ConfigError(f"MixedPrecision.traces_per_layer_path: {path} has no trace for {missing[:5]}",
                                  path="traces_per_layer_path")
            return [float(saved[l.module_path]) for l in self.layers]
        values = torch.as_tensor(saved).reshape(-1).tolist()
        if len(values) != len(self.layers):
            raise ConfigError(f"MixedPrecision.traces_per_layer_path: {path} holds {len(values)} traces, the model "
                              f"has {len(self.layers)} quantized layers", path="traces_per_layer_path")
        return [float(v) for v in values]

    def _average_traces_across_ranks(self):
        """Every rank chooses from the traces of all ranks' data (the weights are the same)."""
        from fxcompress.distributed import average_across_ranks
        t = torch.tensor(self.traces, dtype=torch.float64)
        average_across_ranks([t])
        self.traces = t.tolist()

    @torch.no_grad()
    def quantization_noise(self, gm: torch.fx.GraphModule) -> list[dict[int, float]]:
        """``||Q_b(w) - w||²`` per selected layer and candidate width ``b``."""
        out = []
        for layer in self.layers:
            w = weight_value(gm, layer.weight_node).float()
            noise = {}
            for b in self.params["bits"]:
                q = copy.deepcopy(layer.module)
                q.enabled = True
                if not bool(q.initialized):
                    _init_from_weight(q, w)
                q.set_bits(effective_bits_for(layer.overflow_fix, b))
                noise[int(b)] = float(((q(w) - w) ** 2).sum())
            out.append(noise)
        return out

    # -- applying bits --------------------------------------------------------------------------------
    def apply_bits(self, weight_bits: dict[str, int], activation_bits: dict[str, int] | None = None):
        """Set weight quantizers (by name; nominal bits) and derive or set the activation quantizers."""
        by_name = {l.weight_quantizer: l for l in self.all_layers}
        for name, bits in weight_bits.items():
            layer = by_name[name]
            target = effective_bits_for(layer.overflow_fix, bits)
            if layer.module.spec.bits != target:
                layer.module.set_bits(target)
        activation_bits = dict(activation_bits or {})
        derived: dict[str, int] = {}
        for layer in self.all_layers:
            for name in layer.activation_quantizers:
                derived[name] = max(derived.get(name, 0), nominal_bits(layer, layer.module))
        modules = self._activation_quantizers()
        # Named ones need not feed a quantized layer (an addition's inputs in manual mode).
        modules.update({name: self.gm.get_submodule(name) for name in activation_bits})
        for name, module in modules.items():
            bits = activation_bits.get(name, derived.get(name))
            if bits is not None and module.spec.bits != bits:
                module.set_bits(bits)

    def apply_manual(self, gm: torch.fx.GraphModule):
        """``bitwidth_per_scope``: ``[[bits, scope], ...]``; later entries win (docs/mixed_precision.md)."""
        weight_bits: dict[str, int] = {}
        activation_bits: dict[str, int] = {}
        weight_quantizers = {l.weight_quantizer for l in self.all_layers}
        activation_nodes = {n.target: n for n in gm.graph.nodes
                            if n.op == "call_module" and quantizer_of(gm, n) is not None
                            and n.target not in weight_quantizers}
        nncf_ids: dict[str, tuple[str, ...]] | None = None
        for i, (bits, scope) in enumerate(self.params.get("bitwidth_per_scope", [])):
            field = f"bitwidth_per_scope[{i}]"
            pattern, _, role = scope.partition("|")
            role = role.upper()
            if not re.fullmatch(r"WEIGHT|OUTPUT|INPUT\d*|", role):
                raise ConfigError(f"MixedPrecision.{field}: unknown role '|{role}' in {scope!r}; use '|WEIGHT', "
                                  f"'|OUTPUT', '|INPUT' or '|INPUT<port>' (or none)", path=field)
            if role and "/" in pattern:  # an NNCF quantizer id (passes/quantization/quantizer_ids.py)
                if nncf_ids is None:
                    nncf_ids = nncf_quantizer_ids(gm)
                for name in _match_quantizer_ids(pattern, role, nncf_ids, field, scope):
                    (weight_bits if name in weight_quantizers else activation_bits)[name] = int(bits)
                continue
            scopes = ScopeSet([pattern], field).bind(gm)
            matched = False
            if role in ("", "WEIGHT"):
                for layer in self.layers:
                    if scopes.matches(layer.module_path) or pattern == layer.weight_quantizer:
                        weight_bits[layer.weight_quantizer] = int(bits)
                        matched = True
            if role not in ("", "WEIGHT") or (role == "" and not matched):
                for name, node in activation_nodes.items():
                    if pattern == name or (role and scopes.matches(node.meta.get("module_path", ""))):
                        activation_bits[name] = int(bits)
                        matched = True
            if not matched:
                known = [l.module_path for l in self.layers] + list(activation_nodes)
                raise ScopeError(f"MixedPrecision.{field}: scope {scope!r} matches no quantized layer or "
                                 f"quantizer; quantized layers and activation quantizers: {known[:8]}",
                                 path=field)
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
        for key in ("scheduler", "bits"):
            if key not in state:
                raise CheckpointError(f"mixed precision controller state lacks '{key}'")
        modules = {l.weight_quantizer: l.module for l in self.all_layers}
        modules.update(self._activation_quantizers())
        missing = [n for n in modules if n not in state["bits"]]
        unexpected = [n for n in state["bits"] if n not in modules]
        if missing or unexpected:
            raise CheckpointError(f"mixed precision controller state does not match this model's quantizers: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}")
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
        from fxcompress.distributed import broadcast_from_rank0, is_distributed
        if not is_distributed() or not self.initialized:
            return
        if self.traces is not None and self.noise is not None:
            self._average_traces_across_ranks()
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

    def dump(self, directory) -> Path:
        """Write traces, noise, candidates and the choice (and a plot when matplotlib is installed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.traces is not None:
            torch.save(torch.tensor(self.traces, dtype=torch.float32), directory / "traces_per_layer.pt")
        (directory / "bitwidth_per_scope.json").write_text(
            json.dumps({"bitwidth_per_scope": self.bitwidth_per_scope()}, indent=2))
        data = {"layers": [l.module_path for l in self.layers], "flops": [l.flops for l in self.layers],
                "traces": self.traces, "bits": self.current_bits(),
                "noise": [{str(b): v for b, v in n.items()} for n in self.noise] if self.noise else None,
                "compression_ratio": self.achieved_ratio()}
        if self.selection is not None:
            data.update({"candidate_ratios": self.selection.candidate_ratios,
                         "candidate_sensitivities": self.selection.candidate_sensitivities,
                         "reachable_ratio": list(self.selection.reachable)})
        (directory / "hawq_data.json").write_text(json.dumps(data, indent=1))
        try:
            self.plot(directory / "traces_and_bits.png")
        except ImportError:
            warnings.warn("mixed precision: matplotlib is not installed; no plot written "
                          "(pip install matplotlib)", stacklevel=2)
        return directory

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


def _match_quantizer_ids(pattern: str, role: str, ids: dict[str, tuple[str, ...]], field: str,
                         scope: str) -> list[str]:
    """Quantizers an NNCF quantizer id names: ``<operation>|<role>``, the operation plain or ``{re}``.

    A plain operation name matches an id with that name, else (NNCF's manual initializer:
    ``scope_name in str(insertion_point)``) the ids that contain it; a ``{re}`` one is searched
    in the operation names. ``|INPUT`` without a port matches every input port.
    """
    def split(quantizer_id: str) -> tuple[str, str]:
        operation, _, id_role = quantizer_id.rpartition("|")
        return operation, id_role

    def role_matches(id_role: str) -> bool:
        return id_role == role or (role == "INPUT" and id_role.startswith("INPUT"))

    if pattern.startswith("{re}"):
        try:
            regex = re.compile(pattern[4:])
        except re.error as exc:
            raise ConfigError(f"MixedPrecision.{field}: invalid regular expression {pattern!r}: {exc}",
                              path=field) from None
        found = [name for name, qids in ids.items()
                 if any(role_matches(r) and regex.search(op) for op, r in map(split, qids))]
    else:
        found = [name for name, qids in ids.items()
                 if any(role_matches(r) and op == pattern for op, r in map(split, qids))]
        if not found:
            found = [name for name, qids in ids.items() if any(scope in q for q in qids)]
    if found:
        return found
    every = [q for qids in ids.values() for q in qids]
    close = difflib.get_close_matches(scope.replace("{re}", "").replace("\\", ""), every, n=3, cutoff=0.5)
    hint = (f"did you mean {', '.join(repr(c) for c in close)}?" if close
            else f"the model's quantizer ids look like {every[:3]}")
    raise ScopeError(f"MixedPrecision.{field}: NNCF quantizer id {scope!r} names no quantizer of the model; {hint}",
                     path=field)


@torch.no_grad()
def _init_from_weight(q: FakeQuantizer, w: torch.Tensor):
    """Min/max range of the weight (per channel on the quantizer's axis) for an uninitialized copy."""
    axis = q.axis
    if axis is None:
        q.set_range(w.min(), w.max())
    else:
        flat = w.movedim(axis, 0).reshape(w.shape[axis], -1)
        q.set_range(flat.min(dim=1).values, flat.max(dim=1).values)
