"""The binarization pass (NNCF's ``"binarization"``) and its controller.

``Binarization(mode="xnor")`` inserts, for every convolution it binarizes
(``placement.decide``: all but first/last layers and excluded scopes):

    conv2_weight -> conv2_weight_binarizer -> conv2d(conv2_input_binarizer(x), ...)

one ``WeightBinarizer`` per weight parameter (on the weight edge, after
masks of earlier passes) and one ``ActivationBinarizer`` per convolution (on
its data input edge, as NNCF's pre-layer operation). Both start disabled: the
controller's ``StagedBinarizationScheduler`` enables activations at
``activations_quant_start_epoch`` and weights at ``weights_quant_start_epoch``.

``ctrl.initialize(loader)`` sets every activation binarizer's ``S`` and ``T``
from statistics of its float input (``initializer.range``, see
``init.py``); without it, an enabled binarizer initializes from its first
training batch (NNCF's behaviour). ``lowering_passes()`` returns
``LowerBinarizers`` (``lowering.py``) for ``strip()`` / ``export_onnx()``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.fx

from fxcompress.algorithm import CompressionPass
from fxcompress.batchnorm import BATCHNORM_ADAPTATION_SCHEMA, adapt_batchnorm, average_batchnorm_statistics
from fxcompress.registry import register_algorithm
from fxcompress.controller import ControllerPart, InitContext, StatisticsSection
from fxcompress.distributed import broadcast_from_rank0
from fxcompress.errors import CheckpointError, ConfigError, NotInitializedError
from fxcompress.graph import add_module, get_attr_value, insert_before_input, insert_on_output
from fxcompress.flops import op_macs
from fxcompress.optable import Kind, op_kind
from fxcompress.pass_manager import PassContext, PassResult
from fxcompress.schedulers import STAGED_PARAMS
from fxcompress.scopes import ScopeSet
from fxcompress.weights import functionalize_weighted, parameter_of, weighted_ops

from .init import RANGE_TYPES, THRESHOLD_TYPES, initialize_binarizers
from .lowering import EXPORT_FORMS, LowerBinarizers
from .modules import BINARIZATION_MODES, ActivationBinarizer, WeightBinarizer
from .placement import decide
from .schedule import StagedBinarizationScheduler

__all__ = ["Binarization", "BinarizationController", "BinarizedLayer"]


# NNCF's staged keys (fxcompress.schedulers.STAGED_PARAMS); in a JSON entry they sit in its "params"
# block, which from_config_entry merges into the pass's keyword arguments.
_RANGE_PROPERTIES = {
    "num_init_samples": {"type": "integer", "minimum": 0},
    "type": {"enum": list(RANGE_TYPES)},
    "params": {"type": "object", "properties": {
        "min_percentile": {"type": "number", "minimum": 0, "maximum": 100},
        "max_percentile": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
    }, "additionalProperties": False},
}
_SCOPES = {"type": "array", "items": {"type": "string", "minLength": 1}}
# NNCF's list form (its quantization initializer schema, which binarization reuses): per-scope
# range configs; the first item whose scopes select a layer sets its activation binarizer.
_RANGE_ITEM = {"type": "object", "additionalProperties": False, "properties": {
    **_RANGE_PROPERTIES, "target_scopes": _SCOPES, "ignored_scopes": _SCOPES,
    "target_quantizer_group": {"enum": ["weights", "activations"]}}}

INITIALIZER_SCHEMA = {
    "type": "object",
    "properties": {
        "range": {"oneOf": [{"type": "object", "properties": _RANGE_PROPERTIES, "additionalProperties": False},
                            {"type": "array", "items": _RANGE_ITEM}]},
        # fxcompress's own key (NNCF has none: its thresholds start at S / 2).
        "threshold": {
            "type": "object",
            "properties": {"type": {"enum": list(THRESHOLD_TYPES)}},
            "additionalProperties": False,
        },
        "batchnorm_adaptation": BATCHNORM_ADAPTATION_SCHEMA,
    },
    "additionalProperties": False,
}

DEFAULT_INITIALIZER = {
    "range": {"num_init_samples": 256, "type": "percentile", "params": {"max_percentile": 99.9}},
    "threshold": {"type": "mean_matching"},
    "batchnorm_adaptation": {"num_bn_adaptation_samples": 0},
}
DEFAULT_ACTIVATIONS_START = 1   # NNCF's ACTIVATIONS_QUANT_START_EPOCH


def _with_defaults(default: dict, given: dict) -> dict:
    block = {**default, **given}
    if "params" in default:
        block["params"] = {**default["params"], **given.get("params", {})}
    return block


def initializer_params(params: dict) -> dict:
    """The ``initializer`` block with every default filled in (each item of a list-form range too)."""
    given = params.get("initializer") or {}
    out = {}
    for key, default in DEFAULT_INITIALIZER.items():
        value = given.get(key, {})
        out[key] = ([_with_defaults(default, item) for item in value] if isinstance(value, list)
                    else _with_defaults(default, value))
    return out


def range_items(initializer: dict, gm: torch.fx.GraphModule | None = None) -> list[tuple[dict, ScopeSet, ScopeSet]]:
    """A list-form ``initializer.range`` as ``(range, target_scopes, ignored_scopes)`` (bound to ``gm``)."""
    out = []
    for i, item in enumerate(initializer["range"] if isinstance(initializer["range"], list) else []):
        sets = []
        for key in ("target_scopes", "ignored_scopes"):
            scopes = ScopeSet(item.get(key), f"initializer.range[{i}].{key}")
            sets.append(scopes.bind(gm) if gm is not None else scopes)
        out.append((item, *sets))
    return out


def range_for(initializer: dict, items: list, module_path: str) -> dict:
    """The range config of the activation binarizer of the layer at ``module_path``: the first
    list item for activations that selects it, else the default (an object-form range as it is)."""
    if not isinstance(initializer["range"], list):
        return initializer["range"]
    for item, target, ignored in items:
        if item.get("target_quantizer_group", "activations") != "activations" or ignored.matches(module_path):
            continue
        if not target or target.matches(module_path):
            return item
    return DEFAULT_INITIALIZER["range"]


def scheduler_from_params(params: dict) -> StagedBinarizationScheduler:
    activations = params["activations_quant_start_epoch"]
    weights = params.get("weights_quant_start_epoch")
    return StagedBinarizationScheduler(
        activations, activations + 1 if weights is None else weights,
        lr_poly_drop_start_epoch=params.get("lr_poly_drop_start_epoch"),
        lr_poly_drop_duration_epochs=params["lr_poly_drop_duration_epochs"],
        disable_wd_start_epoch=params.get("disable_wd_start_epoch"),
        base_lr=params["base_lr"], base_wd=params["base_wd"], batch_multiplier=params["batch_multiplier"])


@dataclass
class BinarizedLayer:
    """One binarized convolution and the modules that binarize it."""
    module_path: str                 # as in model.named_modules() (scopes match this)
    weight_target: str               # the parameter, e.g. "conv2.weight"
    weight_binarizer_name: str       # e.g. "conv2_weight_binarizer" (shared by convs reading one weight)
    weight_binarizer: WeightBinarizer
    activation_binarizer_name: str   # e.g. "conv2_input_binarizer"
    activation_binarizer: ActivationBinarizer
    macs: int | None                 # multiply-accumulates per sample (from the traced shapes)


def _layers(gm: torch.fx.GraphModule):
    """``(node, weight, out_axis)`` of every conv / transposed conv / linear, module or functional form."""
    for node in gm.graph.nodes:
        kind = op_kind(node, gm)
        if kind is None or "weighted" not in kind.tags:
            continue
        weight = None
        if node.op == "call_module":
            weight = getattr(gm.get_submodule(node.target), "weight", None)
        elif len(node.args) > kind.weight_arg:
            source = parameter_of(node.args[kind.weight_arg])  # through masks and binarizers inserted by passes
            if source is not None:
                weight = get_attr_value(gm, source.target)
        if isinstance(weight, torch.Tensor):
            yield node, weight, kind.weight_out_axis


def _input_channels(node: torch.fx.Node) -> int | None:
    x = node.args[0]
    shape = x.meta.get("shape") if isinstance(x, torch.fx.Node) else None
    if isinstance(shape, (tuple, torch.Size)) and len(shape) >= 2:
        return int(shape[1])
    return None


class BinarizationController(ControllerPart):
    """Owns the binarizers of one binarization pass; the staged scheduler switches them."""
    algorithm = "binarization"

    def __init__(self, gm: torch.fx.GraphModule, layers: list[BinarizedLayer], skipped: list[dict],
                 params: dict, total_macs: int | None):
        super().__init__()
        self.gm = gm
        self.layers = list(layers)
        self.skipped = list(skipped)
        self.mode = params["mode"]
        self.export_form = params["export_form"]
        self.initializer = initializer_params(params)
        self.total_macs = total_macs
        self.initialized_from_data = False
        self._adapted_bns: list = []
        self.scheduler = scheduler_from_params(params)
        self.scheduler.on_update(self._apply_stage)

    # -- stage -------------------------------------------------------------------------------
    def _apply_stage(self, scheduler: StagedBinarizationScheduler):
        self.set_binarization(activations=scheduler.activations_enabled, weights=scheduler.weights_enabled)

    def set_binarization(self, *, activations: bool | None = None, weights: bool | None = None):
        """Enable/disable the binarizers (the scheduler does this at its epochs; tests and users may too)."""
        seen = set()
        for layer in self.layers:
            if activations is not None:
                layer.activation_binarizer.enabled = bool(activations)
            if weights is not None and id(layer.weight_binarizer) not in seen:
                layer.weight_binarizer.enabled = bool(weights)
                seen.add(id(layer.weight_binarizer))

    @property
    def stage(self) -> str:
        return self.scheduler.stage

    # -- initialization ---------------------------------------------------------------------------
    def initialize(self, ctx: InitContext):
        if ctx.data is None or not self.layers:
            return
        items = range_items(self.initializer, ctx.gm)
        by_range: dict[int, tuple[dict, list]] = {}
        for layer in self.layers:
            rng = range_for(self.initializer, items, layer.module_path)
            by_range.setdefault(id(rng), (rng, []))[1].append(layer.activation_binarizer)
        for rng, binarizers in by_range.values():
            initialize_binarizers(ctx.gm, binarizers, ctx.data, {**self.initializer, "range": rng})
        if ctx.distributed:  # BatchNorm adapts to the binarizers every rank keeps
            self._broadcast_binarizers()
        self._adapted_bns = adapt_batchnorm(ctx.gm, ctx.data,
                                            self.initializer["batchnorm_adaptation"]["num_bn_adaptation_samples"],
                                            "binarization: BatchNorm adaptation")
        self.initialized_from_data = True

    def check_exportable(self):
        missing = [layer.activation_binarizer_name for layer in self.layers
                   if layer.activation_binarizer.enabled and not bool(layer.activation_binarizer.initialized)]
        if missing:
            raise NotInitializedError(
                f"binarization: activation binarizers {missing} have no scale/threshold yet; call "
                f"ctrl.initialize(loader) (or train a step) before export")

    # -- statistics ------------------------------------------------------------------------------------
    def statistics(self) -> StatisticsSection:
        rows = []
        for layer in self.layers:
            act = layer.activation_binarizer
            with torch.no_grad():
                scale = float(act.scale()[0])
                tau = act.relative_threshold()
            rows.append({
                "layer": layer.module_path,
                "weight_binarizer": layer.weight_binarizer_name,
                "activation_binarizer": layer.activation_binarizer_name,
                "weights_binarized": layer.weight_binarizer.enabled,
                "activations_binarized": act.enabled,
                "scale": scale,
                "threshold_mean": float(tau.mean()) * scale,
                "relative_threshold_min": float(tau.min()),
                "relative_threshold_max": float(tau.max()),
                "initialized": bool(act.initialized),
                "macs": layer.macs,
            })
        binarized_macs = sum(layer.macs or 0 for layer in self.layers)
        s = self.scheduler
        summary = {
            "mode": self.mode,
            "stage": s.stage,
            "epoch": s.current_epoch,
            "activations_binarized": s.activations_enabled,
            "weights_binarized": s.weights_enabled,
            "activations_quant_start_epoch": s.activations_quant_start_epoch,
            "weights_quant_start_epoch": s.weights_quant_start_epoch,
            "binarized_layers": len(self.layers),
            "skipped_layers": len(self.skipped),
            "binarized_mac_share": (binarized_macs / self.total_macs) if self.total_macs else None,
            "lr_factor": s.lr_factor(),
            "export_form": self.export_form,
        }
        return StatisticsSection(self.algorithm, summary, rows, self.skipped)

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # Hidden parameters (log_scale, threshold) and `initialized` live in gm.state_dict();
        # the stage is a function of the scheduler's counters. The switches are saved too, so a
        # set_binarization() by hand is still in effect after loading (until the next step).
        return {"scheduler": self.scheduler.state_dict(), "initialized_from_data": self.initialized_from_data,
                "enabled": {"activations": [bool(l.activation_binarizer.enabled) for l in self.layers],
                            "weights": [bool(l.weight_binarizer.enabled) for l in self.layers]}}

    def load_state_dict(self, state: dict):
        enabled = state.get("enabled")
        if enabled is not None and any(len(enabled[k]) != len(self.layers) for k in ("activations", "weights")):
            raise CheckpointError(f"binarization controller state has switches for {len(enabled['activations'])} "
                                  f"layers, this model binarizes {len(self.layers)}: not the same model")
        self.initialized_from_data = bool(state.get("initialized_from_data", False))
        self.scheduler.load_state_dict(state["scheduler"])  # sets the switches of the saved stage
        if enabled is not None:
            for layer, act, weight in zip(self.layers, enabled["activations"], enabled["weights"]):
                layer.activation_binarizer.enabled = bool(act)
                layer.weight_binarizer.enabled = bool(weight)

    def lowering_passes(self):
        return [LowerBinarizers(self.export_form)]

    def compression_parameters(self) -> list[torch.nn.Parameter]:
        """The hidden parameters (``log_scale``, ``threshold`` of every activation binarizer)."""
        return [p for layer in self.layers for p in layer.activation_binarizer.parameters()]

    def _broadcast_binarizers(self):
        """Scales and thresholds of rank 0 win, so all ranks binarize alike."""
        broadcast_from_rank0([t for layer in self.layers for t in (layer.activation_binarizer.log_scale,
                                                                   layer.activation_binarizer.threshold,
                                                                   layer.activation_binarizer.initialized)])

    def distributed(self):
        """Rank 0's scales and thresholds; the mean of the adapted BatchNorm statistics."""
        self._broadcast_binarizers()
        average_batchnorm_statistics(self._adapted_bns)


@register_algorithm
class Binarization(CompressionPass):
    """``Binarization(mode="xnor", activations_quant_start_epoch=1, weights_quant_start_epoch=2, ...)``."""
    algorithm = "binarization"
    schema = {"type": "object", "properties": {
        "mode": {"enum": list(BINARIZATION_MODES)},
        "initializer": INITIALIZER_SCHEMA,
        **STAGED_PARAMS,
        "compression_lr_multiplier": {"type": "number", "exclusiveMinimum": 0},
        # fxcompress's own keys: NNCF configs list the first and last layers in ignored_scopes instead;
        # NNCF exports OpenVINO's FakeQuantize(levels=2), which ONNX Runtime cannot load.
        "binarize_first_last": {"type": "boolean"},
        "export_form": {"enum": list(EXPORT_FORMS)},
    }}
    defaults = {
        "mode": "xnor",                       # NNCF's BINARIZATION_MODE
        "batch_multiplier": 1,
        "activations_quant_start_epoch": DEFAULT_ACTIVATIONS_START,
        # weights_quant_start_epoch: activations_quant_start_epoch + 1 when not given (NNCF: 1 for both)
        "lr_poly_drop_duration_epochs": 30,   # NNCF's LR_POLY_DURATION_EPOCHS
        "base_lr": 1e-3,                      # NNCF's STAGED_QUANTIZATION_BASE_LR
        "base_wd": 1e-5,                      # NNCF's STAGED_QUANTIZATION_BASE_WD
        "binarize_first_last": False,
        "export_form": "where",
    }

    @classmethod
    def check(cls, params: dict, prefix: str):
        ranges = initializer_params(params)["range"]
        for i, rng in enumerate(ranges if isinstance(ranges, list) else [ranges]):
            where = f"{prefix}.initializer.range" + (f"[{i}]" if isinstance(ranges, list) else "")
            low, high = rng["params"].get("min_percentile"), rng["params"]["max_percentile"]
            if low is not None and low >= high:
                raise ConfigError(f"{where}.params.min_percentile: {low} is not below max_percentile ({high})",
                                  path=f"{where}.params.min_percentile")

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        self.validate_scopes(gm)
        for _, target, ignored in range_items(initializer_params(self.params)):
            target.validate(gm)
            ignored.validate(gm)
        code_before = gm.code
        total_macs = sum(op_macs(node, gm) or 0 for node, _, _ in _layers(gm)) or None
        functionalize_weighted(gm, kinds=(Kind.conv,))
        convs = weighted_ops(gm, kinds=(Kind.conv,))
        decisions = decide(gm, convs, self.selects, self.params["binarize_first_last"])
        skipped = [{"scope": d.op.module_path, "reason": d.reason} for d in decisions if not d.binarize]
        layers: list[BinarizedLayer] = []
        by_weight: dict[str, tuple[str, WeightBinarizer, torch.fx.Node]] = {}
        multiplier = self.params.get("compression_lr_multiplier")
        for decision in decisions:
            if not decision.binarize:
                continue
            op = decision.op
            channels = _input_channels(op.node)
            if channels is None:
                skipped.append({"scope": op.module_path, "reason": "the shape of its input is unknown"})
                continue
            target = op.weight_source.target
            if target in by_weight:  # a weight read by several convs: one binarizer, as one mask
                w_name, w_binarizer, w_node = by_weight[target]
                op.node.replace_input_with(op.weight_input, w_node)
            else:
                w_binarizer = WeightBinarizer(self.params["mode"])
                w_name = add_module(gm, f"{target}_binarizer", w_binarizer)
                w_node = insert_on_output(gm, op.weight_input, w_name, self.name, users=[op.node])
                by_weight[target] = (w_name, w_binarizer, w_node)
            a_binarizer = ActivationBinarizer(channels, lr_multiplier=multiplier)
            a_name = add_module(gm, f"{op.module_path or op.node.name}_input_binarizer", a_binarizer)
            insert_before_input(gm, op.node, op.node.args[0], a_name, self.name)
            layers.append(BinarizedLayer(op.module_path, target, w_name, w_binarizer, a_name, a_binarizer,
                                         op_macs(op.node, gm)))
        controller = BinarizationController(gm, layers, skipped, self.params, total_macs)
        if not layers:
            reasons = "; ".join(f"{s['scope']}: {s['reason']}" for s in skipped) or "the model has no convolution"
            warnings.warn(f"{self.name}: nothing to binarize ({reasons})", stacklevel=2)
        # functionalizing module calls changes the code even when nothing is inserted
        return PassResult(gm, modified=bool(layers) or gm.code != code_before, controller=controller)
