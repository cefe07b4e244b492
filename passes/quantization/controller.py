"""What the ``Quantize`` pass leaves for the training loop: the order of initialization (ranges, smoothing,
bias correction, BatchNorm adaptation), the staged schedule, statistics, state. Measuring the ranges is
``RangeInitializer``'s (range_initializer.py)."""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx

from fxcompress.batchnorm import adapt_batchnorm, average_batchnorm_statistics
from fxcompress.checkpoint import require_same_names, require_state_keys
from fxcompress.controller import ControllerPart, InitContext, StatisticsSection
from fxcompress.data import CalibrationData
from fxcompress.distributed import average_across_ranks
from fxcompress.errors import NotInitializedError
from fxcompress.graph import get_attr_value
from fxcompress.quantizers import FakeQuantizer, average_ranges_across_ranks
from fxcompress.schedulers import StagedScheduler

from .bias_correction import bias_correction_targets, correct_biases, set_parameter, statistics_module
from .range_init import RangeInitConfig
from .range_initializer import RangeInitializer
from .smoothing import SmoothingGroup, smooth

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

    STAGES = ("float", "activations_quantized", "weights_quantized", "fully_quantized")

    def _switch_quantizers(self):
        for q in self.quantizers:
            if self.start_epoch(q.group) is not None:  # an unstaged group's quantizers stay as they are
                q.module.enabled = self.enabled(q.group)


class QuantizationController(ControllerPart):
    algorithm = "quantization"

    def __init__(self, quantizers: list[QuantizerInfo], skipped: list[dict], *, settings: dict | None = None,
                 num_bn_adaptation_samples: int = 0, staged: dict | None = None,
                 fast_bias_correction: bool = False, smoothing: list[SmoothingGroup] = (),
                 smooth_quant_alpha: float | None = None):
        super().__init__()
        self.quantizers = list(quantizers)
        self.ranges = RangeInitializer(self.quantizers)
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
        self.fast_bias_correction = bool(fast_bias_correction)
        self.bias_shifts: dict[str, torch.Tensor] = {}  # bias parameter path -> shift fast bias correction added
        self._bias_skipped: list[dict] = []
        self.smoothing_groups = list(smoothing)     # activation smoothing (SmoothQuant), set up at compile time
        self.smooth_quant_alpha = smooth_quant_alpha
        self.smoothed = 0

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
        return self.ranges.needs_data()

    def initialize(self, ctx: InitContext):
        self.init_weight_ranges(ctx.gm)
        correct = self.fast_bias_correction and ctx.data is not None and self.needs_data()
        if correct:
            self._undo_bias_correction(ctx.gm)  # the float statistics are those of the uncorrected model
        if self.smoothing_groups and ctx.data is not None and self.needs_data():
            # its own pass: the ranges below must see the smoothed activations
            self.smoothed = smooth(ctx.gm, self.smoothing_groups, self.smooth_quant_alpha,
                                   lambda: self.ranges.float_pass(ctx.gm, ctx.data))
            self.init_weight_ranges(ctx.gm)
        if correct:
            targets, self._bias_skipped = bias_correction_targets(
                ctx.gm, adapted_batch_norms=self.num_bn_adaptation_samples > 0)
            statistics_gm, means = statistics_module(ctx.gm, targets)
        if self.needs_data():
            if ctx.data is None:
                raise ValueError("initialize: quantization needs a data loader to set activation ranges: "
                                 "ctrl.initialize(loader)")
            # fast bias correction observes its layers' inputs in the same pass
            self.init_activation_ranges(ctx.gm, ctx.data, statistics_gm if correct else None)
        self._distributed = self._distributed or ctx.distributed
        if self._distributed:  # BatchNorm adapts to the ranges every rank keeps
            average_ranges_across_ranks(q.module for q in self.quantizers)
        if correct:  # after the ranges are final, before BatchNorm adaptation
            self.bias_shifts = correct_biases(ctx.gm, targets, means)
            if self._distributed:
                self._average_corrected_biases(ctx.gm)
        self.set_calibration_data(ctx)
        self._adapted_bns = []
        if ctx.data is not None and self.num_bn_adaptation_samples > 0:
            self._adapted_bns = adapt_batchnorm(ctx.gm, ctx.data, self.num_bn_adaptation_samples,
                                                "quantization: BatchNorm adaptation")
        self.bn_adapted = len(self._adapted_bns)
        if self._adapted_bns and self.needs_data():
            # NNCF's order (ranges, then BatchNorm adapted to the quantized model) leaves ranges measured
            # on the old statistics: a random-init MobileNetV2's activations grew 10x past them, and with
            # steps that small a one-step rounding flip (folded vs unfolded BN, integer kernels) grew by
            # the layer gain at every layer, 250 steps at the output (docs/export.md). The ranges are set
            # again on the statistics the model keeps, so they fit what the exported graph computes.
            self.init_activation_ranges(ctx.gm, ctx.data)
            if self._distributed:
                average_ranges_across_ranks(q.module for q in self.quantizers)
        self.initialized = True

    def set_calibration_data(self, ctx: InitContext):
        self._init_gm, self._init_data = ctx.gm, ctx.data  # for the range re-init at a stage start

    @torch.no_grad()
    def _undo_bias_correction(self, gm: torch.fx.GraphModule):
        """Take the shifts an earlier fast bias correction added out of the biases again."""
        for path, shift in self.bias_shifts.items():
            set_parameter(gm, path, get_attr_value(gm, path) - shift)
        self.bias_shifts = {}

    def _average_corrected_biases(self, gm: torch.fx.GraphModule):
        """Ranks measured their shifts on their own data: every rank keeps the mean shift (and so the
        mean corrected bias: the uncorrected biases are the same on every rank)."""
        average_across_ranks([*self.bias_shifts.values(), *(get_attr_value(gm, path) for path in self.bias_shifts)])

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

    # range setting lives in RangeInitializer (range_initializer.py); these are its entry points
    def init_weight_ranges(self, gm: torch.fx.GraphModule):
        """Weight ranges from the weights themselves (no data needed)."""
        self.ranges.init_weight_ranges(gm)

    def init_activation_ranges(self, gm: torch.nn.Module, data: CalibrationData,
                               forward: torch.nn.Module | None = None):
        """Activation ranges from one float pass over ``data`` (``RangeInitializer.init_activation_ranges``)."""
        self.ranges.init_activation_ranges(gm, data, forward)

    def distributed(self):
        """Every rank gets the mean of the ranges (and adapted BatchNorm statistics) the ranks found."""
        self._distributed = True  # ranges re-initialized at a stage start are averaged too
        average_ranges_across_ranks(q.module for q in self.quantizers)
        average_batchnorm_statistics(self._adapted_bns)
        if self.bias_shifts and self._init_gm is not None:
            self._average_corrected_biases(self._init_gm)

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
            "bias_corrected": len(self.bias_shifts),
            "smoothed": self.smoothed,
            **self.settings,
        }
        return StatisticsSection(self.algorithm, summary, rows, list(self.skipped) + list(self._bias_skipped))

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "scheduler": self.scheduler.state_dict(),
            "initialized": self.initialized,
            "bn_adapted": int(self.bn_adapted),
            "bias_shifts": {path: shift.detach().clone() for path, shift in self.bias_shifts.items()},
            "bias_skipped": [dict(s) for s in self._bias_skipped],
            "smoothed": int(self.smoothed),
            "quantizers": {q.name: {"enabled": bool(q.module.enabled), "initialized": bool(q.module.initialized),
                                    "bits": int(q.module.spec.bits), "signed": bool(q.module.spec.signed)}
                           for q in self.quantizers},
        }

    def load_state_dict(self, state: dict):
        require_state_keys(state, ("scheduler", "quantizers"), "quantization controller")
        require_same_names([q.name for q in self.quantizers], state["quantizers"], "quantization controller",
                           "quantizers")
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
        self.bias_shifts = {str(k): v for k, v in state.get("bias_shifts", {}).items()}
        self._bias_skipped = [dict(s) for s in state.get("bias_skipped", [])]
        self.smoothed = int(state.get("smoothed", 0))
