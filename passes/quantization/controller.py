"""What the ``Quantize`` pass leaves for the training loop: range init, BN adaptation, statistics, state."""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx

from fxcompress.batchnorm import adapt_batchnorm, average_batchnorm_statistics
from fxcompress.controller import ControllerPart, InitContext, Scheduler, StatisticsSection
from fxcompress.data import CalibrationData, count_samples, preserved_modes, progress_bar
from fxcompress.errors import CheckpointError, NotInitializedError
from fxcompress.quantizers import FakeQuantizer, average_ranges_across_ranks
from fxcompress.schedulers import StagedScheduler
from fxcompress.weights import edge_value

from .range_init import RangeCollector, RangeInitConfig, weight_range

__all__ = ["QuantizerInfo", "QuantizationScheduler", "QuantizationController"]


@dataclass
class QuantizerInfo:
    """One inserted quantizer, as the controller knows it."""
    name: str                        # module name on the GraphModule (conv1_weight_quantizer)
    module: FakeQuantizer
    group: str                       # "weights" | "activations"
    scopes: tuple[str, ...]          # module paths it serves
    serves: tuple[str, ...]          # names of the ops it serves
    reasons: tuple[str, ...]         # why it is there ("conv input", "residual add input", ...)
    range_init: RangeInitConfig
    overflow_fix: bool = False
    signed_fixed: bool = False

    @property
    def kind(self) -> str:
        return "weight" if self.group == "weights" else "activation"


class QuantizationScheduler(StagedScheduler):
    """Staged quantization: NNCF's ``StagedQuantizationScheduler`` and its learning-rate policy
    (``fxcompress.schedulers.StagedScheduler``) switching this pass's quantizers.

    ``staged``: NNCF's ``params`` keys with NNCF's defaults filled in, or None when the config
    gives none of them: then nothing is staged (quantizers stay as they are) and the optimizer
    is not driven.
    """

    def __init__(self, quantizers: list[QuantizerInfo], staged: dict | None = None):
        if staged is None:
            super().__init__(None, None)
        else:
            super().__init__(**staged)
        self.drives_optimizer = staged is not None
        self.quantizers = quantizers
        self.on_update(QuantizationScheduler._switch_quantizers)

    def _switch_quantizers(self):
        starts = {"weights": self.weights_quant_start_epoch, "activations": self.activations_quant_start_epoch}
        for q in self.quantizers:
            start = starts.get(q.group)
            if start is not None:
                q.module.enabled = self.current_epoch >= start

    @property
    def stage(self) -> str:
        """``float``, ``activations_quantized``, ``weights_quantized`` or ``fully_quantized``."""
        return ("float", "activations_quantized", "weights_quantized", "fully_quantized")[
            int(self.activations_enabled) + 2 * int(self.weights_enabled)]


class QuantizationController(ControllerPart):
    algorithm = "quantization"

    def __init__(self, quantizers: list[QuantizerInfo], skipped: list[dict], *, settings: dict | None = None,
                 num_bn_adaptation_samples: int = 0, staged: dict | None = None):
        super().__init__()
        self.quantizers = list(quantizers)
        self.skipped = list(skipped)
        self.settings = dict(settings or {})
        self.num_bn_adaptation_samples = int(num_bn_adaptation_samples)
        self.scheduler = QuantizationScheduler(self.quantizers, staged)
        self.scheduler.on_stage_start(self._reinit_ranges)
        self.initialized = False        # initialize() ran (ranges loaded from a checkpoint count too)
        self.bn_adapted = 0
        self._adapted_bns: list = []
        self._distributed = False       # ranks average what initialization finds (ctrl.distributed())
        self._init_gm = self._init_data = None

    # -- lookup ----------------------------------------------------------------
    @property
    def weight_quantizers(self) -> list[QuantizerInfo]:
        return [q for q in self.quantizers if q.group == "weights"]

    @property
    def activation_quantizers(self) -> list[QuantizerInfo]:
        return [q for q in self.quantizers if q.group == "activations"]

    def __getitem__(self, name: str) -> QuantizerInfo:
        for q in self.quantizers:
            if q.name == name:
                return q
        raise KeyError(f"no quantizer named {name!r}; quantizers: {[q.name for q in self.quantizers][:8]}")

    # -- initialization --------------------------------------------------------
    def needs_data(self) -> bool:
        return any(q.range_init.num_init_samples > 0 for q in self.activation_quantizers)

    def initialize(self, ctx: InitContext):
        self.init_weight_ranges(ctx.gm)
        if self.needs_data():
            if ctx.data is None:
                raise ValueError("initialize: quantization needs a data loader to set activation ranges: "
                                 "ctrl.initialize(loader)")
            self.init_activation_ranges(ctx.gm, ctx.data)
        self._distributed = self._distributed or ctx.distributed
        if self._distributed:  # BatchNorm adapts to the ranges every rank keeps
            average_ranges_across_ranks(q.module for q in self.quantizers)
        self.set_calibration_data(ctx)
        self._adapted_bns = []
        if ctx.data is not None and self.num_bn_adaptation_samples > 0:
            self._adapted_bns = adapt_batchnorm(ctx.gm, ctx.data, self.num_bn_adaptation_samples,
                                                "quantization: BatchNorm adaptation")
        self.bn_adapted = len(self._adapted_bns)
        self.initialized = True

    def set_calibration_data(self, ctx: InitContext):
        self._init_gm, self._init_data = ctx.gm, ctx.data  # for the range re-init at a stage start

    def _reinit_ranges(self, scheduler=None):
        """NNCF's staged scheduler re-initializes the ranges when a group is switched on: the weights
        trained in float until then, and the activations changed with them."""
        if not self.initialized:
            return
        if self._init_gm is None:  # resumed from a checkpoint without ctrl.set_calibration_data(loader)
            warnings.warn("quantization: a quantization stage starts but the controller has no data to "
                          "re-initialize ranges with (a resumed run): the ranges stay as loaded; call "
                          "ctrl.set_calibration_data(loader) after ctrl.load_state_dict(...) to re-initialize "
                          "them as the uninterrupted run does", stacklevel=3)
            return
        self.init_weight_ranges(self._init_gm)
        if self._init_data is not None and self.needs_data():
            self.init_activation_ranges(self._init_gm, self._init_data)
        if self._distributed:
            average_ranges_across_ranks(q.module for q in self.quantizers)

    def _quantizer_nodes(self, gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
        return {n.target: n for n in gm.graph.nodes if n.op == "call_module"}

    @torch.no_grad()
    def _weight_value(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor | None:
        """The tensor a weight quantizer sees: the parameter through the transforms before it (masks)."""
        return edge_value(gm, node.args[0]) if node.args else None

    @torch.no_grad()
    def init_weight_ranges(self, gm: torch.fx.GraphModule):
        """Weight ranges from the weights themselves (no data needed)."""
        nodes = self._quantizer_nodes(gm)
        for q in self.weight_quantizers:
            node = nodes.get(q.name)
            value = self._weight_value(gm, node) if node is not None else None
            if value is None:
                continue
            low, high = weight_range(value, q.module.spec, q.range_init)
            q.module.set_range(low, high)

    @torch.no_grad()
    def init_activation_ranges(self, gm: torch.nn.Module, data: CalibrationData):
        """One pass over the data with all quantizers disabled, observing each activation quantizer's input."""
        targets = [q for q in self.activation_quantizers if q.range_init.num_init_samples > 0]
        collectors = {q.name: RangeCollector(q.range_init, q.module.spec, seed=i) for i, q in enumerate(targets)}
        active = {q.name: True for q in targets}
        enabled = {q.name: q.module.enabled for q in self.quantizers}
        hooks = []
        for q in targets:
            def hook(module, args, name=q.name):
                if active[name]:
                    collectors[name].update(args[0])
            hooks.append(q.module.register_forward_pre_hook(hook))
        total = max(q.range_init.num_init_samples for q in targets)
        seen = batches = 0
        with preserved_modes(gm):
            try:
                for q in self.quantizers:
                    q.module.enabled = False
                gm.eval()
                for args, kwargs in progress_bar(data.batches(total), "quantization: range init"):
                    for q in targets:
                        active[q.name] = seen < q.range_init.num_init_samples
                    gm(*args, **kwargs)
                    seen += count_samples(args, kwargs)
                    batches += 1
            finally:
                for h in hooks:
                    h.remove()
                for q in self.quantizers:
                    q.module.enabled = enabled[q.name]
        if batches == 0:
            raise ValueError("initialize: the data loader yielded no batches")
        unseen = []
        for q in targets:
            result = collectors[q.name].range()
            if result is None:
                unseen.append(q.name)
                continue
            q.module.set_range(*result)
        if unseen:
            warnings.warn(f"quantization: {len(unseen)} activation quantizers saw no data during range init "
                          f"({', '.join(unseen[:5])}); their ranges stay unset", stacklevel=3)

    def distributed(self):
        """Every rank gets the mean of the ranges (and adapted BatchNorm statistics) the ranks found."""
        self._distributed = True  # ranges re-initialized at a stage start are averaged too
        average_ranges_across_ranks(q.module for q in self.quantizers)
        average_batchnorm_statistics(self._adapted_bns)

    # -- export ----------------------------------------------------------------
    def check_exportable(self):
        missing = [q.name for q in self.quantizers if q.module.enabled and not bool(q.module.initialized)]
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise NotInitializedError(
                f"quantization: {len(missing)} quantizers have no range yet ({shown}); call "
                "ctrl.initialize(data_loader) before export, or load a checkpoint saved after initialization "
                "(fxcompress.load_state(gm, state_dict))")

    def lowering_passes(self):
        from .lowering import quantization_lowering_passes
        return quantization_lowering_passes()

    # -- statistics ------------------------------------------------------------
    @torch.no_grad()
    def _row(self, q: QuantizerInfo) -> dict:
        m, s = q.module, q.module.spec
        scale = m.effective_scale().detach().float()
        zp = m.zero_point.detach().float().round()
        low = ((m.quant_min - zp) * scale).min().item()
        high = ((m.quant_max - zp) * scale).max().item()
        return {"name": q.name, "kind": q.kind, "bits": 8 if q.overflow_fix and s.bits == 7 else s.bits,
                "effective_bits": s.bits, "mode": s.mode, "per_channel": s.per_channel,
                "signed": s.mode == "symmetric" and s.signed, "narrow_range": s.narrow_range,
                "range_low": low, "range_high": high, "initialized": bool(m.initialized),
                "enabled": bool(m.enabled), "range_init": q.range_init.type, "consumers": ", ".join(q.serves)}

    def statistics(self) -> StatisticsSection:
        rows = [self._row(q) for q in self.quantizers]
        bits = Counter(r["bits"] for r in rows)
        summary: dict[str, Any] = {
            "weight_quantizers": len(self.weight_quantizers),
            "activation_quantizers": len(self.activation_quantizers),
            "bits": {b: bits[b] for b in sorted(bits)},
            "initialized": bool(rows) and all(r["initialized"] for r in rows),
            "overflow_fix": sum(q.overflow_fix for q in self.quantizers),
            "bn_adapted": self.bn_adapted,
            **self.settings,
        }
        return StatisticsSection(self.algorithm, summary, rows, list(self.skipped))

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "scheduler": self.scheduler.state_dict(),
            "initialized": self.initialized,
            "bn_adapted": int(self.bn_adapted),
            "quantizers": {q.name: {"enabled": bool(q.module.enabled), "initialized": bool(q.module.initialized),
                                    "bits": int(q.module.spec.bits), "signed": bool(q.module.spec.signed)}
                           for q in self.quantizers},
        }

    def load_state_dict(self, state: dict):
        for key in ("scheduler", "quantizers"):
            if key not in state:
                raise CheckpointError(f"quantization controller state lacks '{key}'")
        names = [q.name for q in self.quantizers]
        missing = [n for n in names if n not in state["quantizers"]]
        unexpected = [n for n in state["quantizers"] if n not in names]
        if missing or unexpected:
            raise CheckpointError(f"quantization controller state does not match this model's quantizers: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        # the scheduler first: its update() applies the staged start epochs, then the saved
        # switches win (a quantizer the user turned off stays off, as in the saved run)
        self.scheduler.load_state_dict(state["scheduler"])
        for q in self.quantizers:
            saved = state["quantizers"][q.name]
            q.module.enabled = bool(saved["enabled"])
            if int(saved.get("bits", q.module.spec.bits)) != q.module.spec.bits:
                q.module.spec = replace(q.module.spec, bits=int(saved["bits"]))
        self.initialized = bool(state.get("initialized", False))
        self.bn_adapted = int(state.get("bn_adapted", 0))
