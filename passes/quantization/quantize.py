"""The ``Quantize`` pass (NNCF's ``"algorithm": "quantization"``): annotate, then insert quantizers.

``Quantize.call`` does three things in order:

1. canonicalize: conv/linear module calls become their functional form
   (``fxcompress.weights.weighted_ops``) so weight quantizers sit on the weight
   edge after any masks of earlier passes; with ``fold_bn`` a BatchNorm after a
   conv/linear is folded into it first (running statistics frozen);
2. decide: ``policy.plan_quantization`` annotates the nodes whose outputs get a
   quantizer (``node.meta["quantization_annotation"]``);
3. do: ``insert_quantizers`` turns every annotation into one ``FakeQuantizer``
   module (``conv1_weight_quantizer``, ``layer1_0_add_input_quantizer``) on the
   producer's output feeding exactly the annotated consumers, and removes the
   annotations.

Weight ranges are set right away from the weights; activation ranges need data
(``ctrl.initialize(loader)``). A model with nothing to quantize is left
unchanged with a warning saying why.

Metadata of an inserted quantizer node (on top of ``fxcompress.graph``'s rules):
``meta["quantization"] = {"group", "serves", "reasons", "overflow_fix"}``.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx
import torch.nn as nn

from fxcompress.algorithm import CompressionPass
from fxcompress.batchnorm import BATCHNORM_ADAPTATION_SCHEMA, DEFAULT_NUM_BN_ADAPTATION_SAMPLES
from fxcompress.bn_folding import find_batch_norm_folds, remove_folded_batch_norm, set_bias_arg, warn_not_folded
from fxcompress.registry import algorithm_class, register_algorithm
from fxcompress.errors import ConfigError
from fxcompress.graph import GraphSnapshot, add_module, copy_meta, get_attr_value, insert_on_output
from fxcompress.optable import Kind, op_arg, op_kind
from fxcompress.pass_manager import PassContext, PassResult
from fxcompress.quantizers import FakeQuantizer
from fxcompress.schedulers import STAGED_DEFAULTS, STAGED_PARAMS
from fxcompress.scopes import ScopeSet
from fxcompress.weights import WEIGHTED_KINDS, functionalize_weighted, weighted_ops

from .attention import decompose_attention
from .controller import QuantizationController, QuantizerInfo
from .policy import (ANNOTATION_KEY, DEVICE_RULES, GroupSettings, Override, QuantizationPlan,
                     QuantizationSettings, node_label, plan_quantization)
from .range_init import RANGE_TYPES, RangeInitRules
from .smoothing import insert_smoothing
from .unified_scales import UNIFIED_SCALE_OPS_SCHEMA, unified_scale_scopes, unify_scales

__all__ = ["Quantize", "QUANTIZATION_SCHEMA", "insert_quantizers", "fold_batch_norms"]

# ---------------------------------------------------------------------------
# Config schema (NNCF's nncf/config/schemata/algo/quantization.py names and defaults)
# ---------------------------------------------------------------------------

_SCOPES = {"type": "array", "items": {"type": "string", "minLength": 1}}
_BITS = {"type": "integer", "minimum": 2, "maximum": 8}
_PERCENT = {"type": "number", "minimum": 0, "maximum": 100}
_RANGE_PROPERTIES = {
    "num_init_samples": {"type": "integer", "minimum": 0},
    "type": {"enum": list(RANGE_TYPES)},
    "params": {"type": "object", "properties": {"min_percentile": _PERCENT, "max_percentile": _PERCENT},
               "additionalProperties": False},
    # Accepted next to "type" as well (NNCF nests them in "params").
    "min_percentile": _PERCENT,
    "max_percentile": _PERCENT,
}
_RANGE = {"type": "object", "properties": _RANGE_PROPERTIES, "additionalProperties": False}
_RANGE_ITEM = {"type": "object", "additionalProperties": False, "properties": {
    **_RANGE_PROPERTIES, "target_scopes": _SCOPES, "ignored_scopes": _SCOPES,
    "target_quantizer_group": {"enum": ["weights", "activations"]}}}
_QUANTIZER_PROPERTIES = {
    "mode": {"enum": ["symmetric", "asymmetric"]},
    "bits": _BITS,
    "signed": {"type": "boolean"},
    "per_channel": {"type": "boolean"},
}
_GROUP_PROPERTIES = {
    **_QUANTIZER_PROPERTIES,
    "ignored_scopes": _SCOPES,
    "target_scopes": _SCOPES,
    # NNCF's log-scale parametrization is not implemented: only its default is accepted (check()).
    "logarithm_scale": {"type": "boolean"},
}
_OVERRIDE = {"type": "object", "additionalProperties": False, "properties": {
    **_QUANTIZER_PROPERTIES,
    "initializer": {"type": "object", "properties": {"range": _RANGE}, "additionalProperties": False}}}

QUANTIZATION_SCHEMA = {
    "type": "object",
    "properties": {
        "bits": _BITS,
        "weights": {"type": "object", "additionalProperties": False,
                    "properties": {**_GROUP_PROPERTIES, "narrow_range": {"type": "boolean"}}},
        "activations": {"type": "object", "additionalProperties": False,
                        "properties": {**_GROUP_PROPERTIES, "unified_scale_ops": UNIFIED_SCALE_OPS_SCHEMA}},
        "preset": {"enum": ["performance", "mixed"]},
        # NNCF's key: transformer defaults (TRANSFORMER_DEFAULTS); inferred for Hugging Face models.
        "model_type": {"enum": ["transformer"]},
        "initializer": {"type": "object", "additionalProperties": False, "properties": {
            "range": {"oneOf": [_RANGE, {"type": "array", "items": _RANGE_ITEM}]},
            "batchnorm_adaptation": BATCHNORM_ADAPTATION_SCHEMA,
            # NNCF's mixed precision lives here; from_config_entry hands it to MixedPrecision (issue 8)
            "precision": {"type": "object"},
        }},
        "scope_overrides": {"type": "object", "additionalProperties": False, "properties": {
            "weights": {"type": "object", "additionalProperties": _OVERRIDE},
            "activations": {"type": "object", "additionalProperties": _OVERRIDE},
        }},
        "overflow_fix": {"enum": ["enable", "disable", "first_layer_only"]},
        "quantize_inputs": {"type": "boolean"},
        "quantize_outputs": {"type": "boolean"},
        # fxcompress extension: quantizers on both inputs of matmuls of two activations (attention's
        # Q·Kᵀ and softmax·V; scaled_dot_product_attention decomposed into them), which OpenVINO then
        # runs in integers (docs/transformers.md, "Int8 attention")
        "quantize_attention": {"type": "boolean"},
        "fold_bn": {"type": "boolean"},
        "learnable_ranges": {"type": "boolean"},
        # fxcompress extension: false keeps the model inputs' quantizers at their initialized range
        # (no gradient), so the first layer computes no input gradient (the fp32 step computes none)
        "learnable_input_ranges": {"type": "boolean"},
        # NNCF: multiplies the gradients of every quantizer's scale (and zero point)
        "compression_lr_multiplier": {"type": "number", "exclusiveMinimum": 0},
        # fxcompress extension, named after nncf.quantize's argument: fast bias correction in
        # initialize() (off by default here, as for NNCF's QAT; quantize_post_training turns it on)
        "fast_bias_correction": {"type": "boolean"},
        # fxcompress extension: SmoothQuant-style activation smoothing of linear layers' inputs, its
        # alpha; absent: off, or TRANSFORMER_DEFAULTS' for a transformer; null: off (never on convolutions)
        "smooth_quant_alpha": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        # NNCF's staged quantization ("params" block): quantizers switch on at the start epochs, and
        # the learning-rate policy drives an attached optimizer (fxcompress.schedulers.StagedScheduler).
        **STAGED_PARAMS,
        # Deprecated in NNCF; the export is always standard QuantizeLinear/DequantizeLinear here.
        "export_to_onnx_standard_ops": {"type": "boolean"},
    },
}

# NNCF's defaults for model_type "transformer": asymmetric activations (preset "mixed": the
# outputs of LayerNorm and GELU are far from symmetric), 7-bit weights only in the first
# layer (NNCF's post-training default) and activation smoothing (NNCF's SmoothQuant, which it
# runs for transformers only). The alpha is ours, not NNCF's 0.95: on all-MiniLM-L6-v2 0.95 gives
# an embedding cosine of 0.994 (NNCF itself 0.993), 0.65 gives 0.997-0.998 on two calibration
# splits while 0.7 and above lose the held-out split (docs/transformers.md). The placement puts no
# quantizer on a LayerNorm or GELU output that no integer op reads; the additive attention mask is
# never quantized whatever the model type (fxcompress.integer_inputs).
# The attention matmuls are quantized as for any model (quantize_attention, so OpenVINO runs them in
# integers): with the smoothing above they cost MiniLM 0.0002 of mean cosine (docs/transformers.md,
# "Int8 attention").
TRANSFORMER_DEFAULTS = {"preset": "mixed", "overflow_fix": "first_layer_only", "smooth_quant_alpha": 0.65}


@register_algorithm
class Quantize(CompressionPass):
    """Quantization-aware training / post-training quantization for OpenVINO-style integer inference.

    ``Quantize(bits=8, weights={...}, activations={...}, preset="performance",
    target_device="ANY", initializer={"range": {...}, "batchnorm_adaptation": {...}},
    scope_overrides={...}, overflow_fix="enable", quantize_inputs=True,
    quantize_outputs=False, fold_bn=False, learnable_ranges=True, learnable_input_ranges=True,
    fast_bias_correction=False, smooth_quant_alpha=None, ignored_scopes=[...], target_scopes=[...])``; the keys and
    defaults are NNCF's (docs/quantization.md lists them; ``fast_bias_correction`` is
    ``nncf.quantize``'s argument, an fxcompress extension in a config entry).
    """
    algorithm = "quantization"
    schema = QUANTIZATION_SCHEMA
    defaults = {
        "bits": 8, "preset": "performance", "target_device": "ANY", "overflow_fix": "enable",
        "quantize_inputs": True, "quantize_outputs": False, "quantize_attention": True, "fold_bn": False,
        "learnable_ranges": True, "learnable_input_ranges": True,
        "fast_bias_correction": False,
    }

    def __init__(self, **params):
        super().__init__(**params)
        self._given = set(params)
        self.settings = self._settings(self._params_for(params.get("model_type")))
        initializer = self.params.get("initializer", {})
        self.range_rules = RangeInitRules(initializer.get("range"))
        self.num_bn_adaptation_samples = initializer.get("batchnorm_adaptation", {}).get(
            "num_bn_adaptation_samples", DEFAULT_NUM_BN_ADAPTATION_SAMPLES)
        self.unified_scale_scopes = unified_scale_scopes(self.params.get("activations", {}).get("unified_scale_ops"))

    def _params_for(self, model_type: str | None) -> dict:
        """The parameters with ``model_type``'s defaults for the keys the user did not give."""
        if model_type != "transformer":
            return self.params
        return {**self.params, **{k: v for k, v in TRANSFORMER_DEFAULTS.items() if k not in self._given}}

    def model_type(self, gm: torch.fx.GraphModule) -> tuple[str | None, str]:
        """``(model_type, how it was chosen)``: given, or "transformer" for a Hugging Face model."""
        if "model_type" in self._given:
            return self.params["model_type"], "given"
        hf_type = gm.meta.get("huggingface_model_type")
        if hf_type:
            return "transformer", f"inferred: Hugging Face model_type {hf_type!r}"
        return None, "default"

    @staticmethod
    def _settings(p: dict) -> QuantizationSettings:
        weights, activations = p.get("weights", {}), p.get("activations", {})
        act_mode = activations.get("mode", "asymmetric" if p["preset"] == "mixed" else "symmetric")
        return QuantizationSettings(
            weights=GroupSettings(
                bits=weights.get("bits", p["bits"]), mode=weights.get("mode", "symmetric"),
                signed=weights.get("signed"), per_channel=weights.get("per_channel", True),
                narrow_range=weights.get("narrow_range", True),
                ignored_scopes=ScopeSet(weights.get("ignored_scopes"), "weights.ignored_scopes"),
                target_scopes=ScopeSet(weights.get("target_scopes"), "weights.target_scopes")),
            activations=GroupSettings(
                bits=activations.get("bits", p["bits"]), mode=act_mode, signed=activations.get("signed"),
                per_channel=activations.get("per_channel", False), narrow_range=False,
                ignored_scopes=ScopeSet(activations.get("ignored_scopes"), "activations.ignored_scopes"),
                target_scopes=ScopeSet(activations.get("target_scopes"), "activations.target_scopes")),
            overrides={group: tuple(Override(pattern, ScopeSet([pattern], f"scope_overrides.{group}"), values)
                                    for pattern, values in p.get("scope_overrides", {}).get(group, {}).items())
                       for group in ("weights", "activations")},
            device=p["target_device"], rules=DEVICE_RULES[p["target_device"]],
            overflow_fix=p["overflow_fix"], quantize_inputs=p["quantize_inputs"],
            quantize_outputs=p["quantize_outputs"], quantize_attention=p["quantize_attention"])

    @classmethod
    def validate(cls, params: dict, prefix: str) -> dict:
        if params.get("target_device") == "VPU" and "preset" in params:
            # NNCF 2.5's rule for VPU (quantization/algo.py): its hardware config fixes the quantizer modes
            raise ConfigError(f"{prefix}.preset: target_device 'VPU' takes no preset (NNCF 2.5 refuses it too: "
                              "'The VPU target device does not support presets'); remove 'preset', or use "
                              "target_device 'NPU', VPU's new name, which accepts one", path=f"{prefix}.preset")
        return super().validate(params, prefix)

    @classmethod
    def check(cls, params: dict, prefix: str):
        def check_quantizer(values: dict, path: str):
            if values.get("logarithm_scale") is True:
                raise ConfigError(f"{path}.logarithm_scale: NNCF's optimization of log(scale) is not implemented "
                                  "(the quantizers train the scale itself); remove it or set it to false "
                                  "(docs/nncf_configs.md)", path=f"{path}.logarithm_scale")
            if values.get("mode") == "asymmetric" and values.get("signed") is True:
                raise ConfigError(f"{path}.signed: an asymmetric quantizer is unsigned (it has a zero point); "
                                  "drop 'signed' or use mode 'symmetric'", path=f"{path}.signed")

        def check_range(values: dict, path: str):
            merged = {**{k: values[k] for k in ("min_percentile", "max_percentile") if k in values},
                      **values.get("params", {})}
            low, high = merged.get("min_percentile", 0.1), merged.get("max_percentile", 99.9)
            if low >= high:
                raise ConfigError(f"{path}: min_percentile ({low}) must be below max_percentile ({high})",
                                  path=f"{path}.min_percentile")

        for group in ("weights", "activations"):
            check_quantizer(params.get(group, {}), f"{prefix}.{group}")
            for pattern, values in params.get("scope_overrides", {}).get(group, {}).items():
                where = f"{prefix}.scope_overrides.{group}[{pattern!r}]"
                check_quantizer(values, where)
                if "range" in values.get("initializer", {}):
                    check_range(values["initializer"]["range"], f"{where}.initializer.range")
        if "precision" in params.get("initializer", {}):  # only a config entry may nest it (issue 8)
            raise ConfigError(f"{prefix}.initializer.precision: mixed precision is its own pass; use "
                              "[Quantize(...), MixedPrecision(**precision)]", path=f"{prefix}.initializer.precision")
        ranges = params.get("initializer", {}).get("range")
        if isinstance(ranges, dict):
            check_range(ranges, f"{prefix}.initializer.range")
        elif isinstance(ranges, list):
            for i, item in enumerate(ranges):
                check_range(item, f"{prefix}.initializer.range[{i}]")

    @classmethod
    def from_config_entry(cls, entry: dict, path: str, global_params: dict) -> list:
        """NNCF's ``initializer.precision`` (issue 8) makes one entry two passes: Quantize, then MixedPrecision."""
        initializer = entry.get("initializer")
        if not isinstance(initializer, dict) or "precision" not in initializer:
            return super().from_config_entry(entry, path, global_params)
        precision = initializer["precision"]
        if not isinstance(precision, dict):
            raise ConfigError(f"{path}.initializer.precision: must be an object, got {type(precision).__name__}",
                              path=f"{path}.initializer.precision")
        rest = {k: v for k, v in initializer.items() if k != "precision"}
        passes = super().from_config_entry({**entry, "initializer": rest}, path, global_params)
        mixed_precision = algorithm_class("mixed_precision")  # passes do not import each other
        mixed_precision.validate(precision, prefix=f"{path}.initializer.precision")
        return passes + [mixed_precision(**precision)]

    def staged_params(self) -> dict | None:
        """NNCF's staged-quantization keys with NNCF's defaults, or None when none is given (as NNCF
        uses its staged scheduler only for a non-empty ``params`` block)."""
        if not any(key in self.params for key in STAGED_PARAMS):
            return None
        return {key: self.params.get(key, default) for key, default in STAGED_DEFAULTS.items()}

    # -- the pass ----------------------------------------------------------------
    def _validate_all_scopes(self, gm: torch.fx.GraphModule, settings: QuantizationSettings):
        self.validate_scopes(gm)
        scope_sets = [settings.weights.ignored_scopes, settings.weights.target_scopes,
                      settings.activations.ignored_scopes, settings.activations.target_scopes]
        scope_sets += [o.scopes for group in settings.overrides.values() for o in group]
        scope_sets += self.range_rules.scope_sets()
        scope_sets += [scopes for group in self.unified_scale_scopes for scopes in group]
        for scopes in scope_sets:
            scopes.validate(gm)

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        model_type, chosen = self.model_type(gm)
        params = self._params_for(model_type)
        # scope sets resolve NNCF names against the graph when validated: validate the ones planning uses
        settings = self.settings if params is self.params else self._settings(params)
        self._validate_all_scopes(gm, settings)
        snapshot = GraphSnapshot(gm)
        functionalize_weighted(gm)
        fused_attention = decompose_attention(gm, self.name, enabled=settings.quantize_attention)[1]
        folded = fold_batch_norms(gm, self.selects) if self.params["fold_bn"] else []
        ops = weighted_ops(gm)
        plan = plan_quantization(gm, ops, settings, self.selects)
        skipped = plan.skipped + fused_attention + _unsupported_weighted(gm)
        if not plan.points:
            for node in gm.graph.nodes:
                node.meta.pop(ANNOTATION_KEY, None)
            snapshot.restore()
            reasons = "; ".join(f"{s['scope']}: {s['reason']}" for s in skipped[:5])
            warnings.warn(f"Quantize: nothing to quantize in {type(gm).__name__}: it has no conv, linear or "
                          f"matmul layer with float inputs that the scopes select"
                          + (f" (skipped {reasons})" if reasons else ""), stacklevel=2)
            return PassResult(gm, False, controller=self._controller([], skipped, folded, params, model_type,
                                                                     chosen))
        infos = insert_quantizers(gm, plan, self.name, self.params["learnable_ranges"], self.range_rules,
                                  lr_multiplier=self.params.get("compression_lr_multiplier"),
                                  learnable_inputs=self.params["learnable_input_ranges"])
        if self.unified_scale_scopes:
            infos = unify_scales(gm, infos, self.unified_scale_scopes, self.settings.rules.agnostic)
        smoothing = []
        if params.get("smooth_quant_alpha") is not None:
            smoothing = insert_smoothing(gm, [q.name for q in infos if q.group == "activations"], self.name)
        controller = self._controller(infos, skipped, folded, params, model_type, chosen, smoothing)
        controller.init_weight_ranges(gm)
        return PassResult(gm, True, controller=controller)

    def _controller(self, infos, skipped, folded, params, model_type, chosen, smoothing=()) -> QuantizationController:
        settings = {"target_device": params["target_device"], "preset": params["preset"],
                    "quantize_attention": params["quantize_attention"]}
        if model_type:
            settings["model_type"] = f"{model_type} ({chosen})"
        if folded:
            settings["folded_batch_norms"] = len(folded)
        return QuantizationController(
            infos, skipped, settings=settings, num_bn_adaptation_samples=self.num_bn_adaptation_samples,
            staged=self.staged_params(), fast_bias_correction=params["fast_bias_correction"],
            smoothing=smoothing, smooth_quant_alpha=params.get("smooth_quant_alpha"))


def _unsupported_weighted(gm: torch.fx.GraphModule) -> list[dict]:
    """Conv/linear module calls that stayed modules (no exact functional form): not quantized."""
    out = []
    for node in gm.graph.nodes:
        kind = op_kind(node, gm)
        if node.op == "call_module" and kind is not None and kind in WEIGHTED_KINDS:
            out.append({"scope": node.target, "reason": f"{kind.name} called in a form without an exact "
                                                        "functional equivalent (e.g. output_size=, a subclass)"})
    return out


# ---------------------------------------------------------------------------
# Graph surgery
# ---------------------------------------------------------------------------

def _insert(gm: torch.fx.GraphModule, producer: torch.fx.Node, users: list[torch.fx.Node], name: str,
            inserted_by: str) -> torch.fx.Node:
    if producer.op != "placeholder":
        return insert_on_output(gm, producer, name, inserted_by, users=users)
    # Keep the placeholders together at the top of the graph: insert after the last one.
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        new = gm.graph.call_module(name, (producer,))
    copy_meta(producer, new, inserted_by)
    for user in users:
        user.replace_input_with(producer, new)
    return new


def insert_quantizers(gm: torch.fx.GraphModule, plan: QuantizationPlan, inserted_by: str,
                      learnable: bool = True, range_rules: RangeInitRules | None = None,
                      lr_multiplier: float | None = None, learnable_inputs: bool = True) -> list[QuantizerInfo]:
    """One ``FakeQuantizer`` per annotated point; the annotations are consumed. ``learnable`` makes the
    scales (and zero points) trainable; ``learnable_inputs=False`` excepts the quantizers of the model's
    inputs (placeholders)."""
    range_rules = range_rules or RangeInitRules(None)
    infos = []
    for point in plan.points:
        trainable = learnable and (learnable_inputs or point.producer.op != "placeholder")
        quantizer = FakeQuantizer(point.spec, num_channels=point.num_channels, learnable=trainable,
                                  lr_multiplier=lr_multiplier)
        device = _device_of(point.producer, gm)
        if device is not None:
            quantizer.to(device)
        name = add_module(gm, point.name, quantizer)
        node = _insert(gm, point.producer, point.consumers, name, inserted_by)
        serves = tuple(node_label(n) for n in point.serves)
        node.meta["quantization"] = {"group": point.group, "serves": list(serves), "reasons": list(point.reasons),
                                     "overflow_fix": point.overflow_fix}
        infos.append(QuantizerInfo(
            name=name, module=quantizer, group=point.group, scopes=point.scopes, serves=serves,
            reasons=tuple(point.reasons), range_init=range_rules.for_quantizer(point.group, point.scopes,
                                                                              point.override),
            overflow_fix=point.overflow_fix, signed_fixed=point.signed_fixed))
    for node in gm.graph.nodes:
        node.meta.pop(ANNOTATION_KEY, None)
    gm.graph.lint()
    gm.recompile()
    return infos


def _device_of(node: torch.fx.Node, gm: torch.fx.GraphModule):
    if node.op == "get_attr":
        value = get_attr_value(gm, node.target)
        if isinstance(value, torch.Tensor):
            return value.device
    for p in gm.parameters():
        return p.device
    return None


# ---------------------------------------------------------------------------
# BatchNorm folding at compile time (fold_bn=True)
# ---------------------------------------------------------------------------

_FOLD_KINDS = (Kind.conv, Kind.conv_transpose, Kind.linear)


@torch.no_grad()
def fold_batch_norms(gm: torch.fx.GraphModule, selects=lambda path: True) -> list[str]:
    """Fold ``conv/linear -> BatchNorm`` (running statistics) into the conv's weight and bias
    (``fxcompress.bn_folding``).

    New parameter tensors under the old names on the GraphModule's own module copy
    (the user's model keeps its tensors), trainable: QAT then trains the folded
    weights, and the weight quantizer sees what inference will use. A pair that
    cannot fold is named in a warning and keeps its BatchNorm. Returns the folded
    BatchNorm scopes.
    """
    functionalize_weighted(gm)
    folds, skipped = find_batch_norm_folds(gm, _FOLD_KINDS, eval_only=False, selects=selects)
    folded = []
    for fold in folds:
        op, conv = fold.op, fold.op.node
        weight = op.weight(gm)
        if weight is None:
            skipped.append({"scope": fold.scope, "node": fold.bn_node.name, "conv": conv.name,
                            "reason": "the conv weight is computed, not a parameter"})
            continue
        weight_target = op.weight_source.target
        owner_path, _, weight_name = weight_target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        setattr(owner, weight_name, nn.Parameter(fold.folded_weight(weight), requires_grad=weight.requires_grad))
        new_bias = nn.Parameter(fold.folded_bias().to(weight.dtype))
        bias_node = op_arg(conv, op.kind, "bias")
        if isinstance(bias_node, torch.fx.Node):  # a get_attr (computed biases are refused)
            b_path, _, b_name = bias_node.target.rpartition(".")
            setattr(gm.get_submodule(b_path) if b_path else gm, b_name, new_bias)
        else:
            name = "bias" if getattr(owner, "bias", None) is None else "folded_bias"
            owner.register_parameter(name, new_bias)
            with gm.graph.inserting_before(conv):
                getter = gm.graph.get_attr(f"{owner_path}.{name}" if owner_path else name)
            getter.meta["module_path"] = op.module_path
            set_bias_arg(conv, getter)
        remove_folded_batch_norm(gm, fold)
        folded.append(fold.scope)
    warn_not_folded(skipped, "at compile time (fold_bn)", "it stays a BatchNorm in the training graph")
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded

