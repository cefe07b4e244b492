"""The ``MixedPrecision`` pass: HAWQ-v2 or manual bit widths for the quantizers ``Quantize`` inserted.

Runs after ``Quantize`` (``[Quantize(...), MixedPrecision(...)]``, or one
NNCF quantization entry with ``"initializer": {"precision": {...}}``, which the
config front door expands into both). At compile time it only finds the
quantized layers (``layers.py``) and builds its controller part; in
``"manual"`` mode it also applies ``bitwidth_per_scope`` right away (no data
needed, so the quantization part's range init then already sees the final
widths). In ``"hawq"`` mode the bits are chosen in ``ctrl.initialize(loader)``
(``controller.py``), after the quantization part's range init.

Keys and defaults are NNCF's ``initializer.precision`` block
(``nncf/config/schemata/algo/quantization.py``); ``seed`` and ``dump_dir`` are
ours. Python-only keyword arguments: ``criterion`` (default
``F.cross_entropy``), ``criterion_fn(outputs, target, criterion) -> loss`` and
``target_fn(batch) -> target`` (default: the batch's second element).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch.fx

from fxcompress.algorithm import CompressionPass
from fxcompress.registry import register_algorithm
from fxcompress.errors import ConfigError
from fxcompress.pass_manager import PassContext, PassResult

from .controller import MixedPrecisionController
from .layers import find_quantized_layers
from .selection import ratio_bounds

__all__ = ["MixedPrecision", "PRECISION_SCHEMA", "PRECISION_DEFAULTS"]

_BITS = {"type": "integer", "minimum": 2, "maximum": 8}

PRECISION_SCHEMA = {
    "type": "object",
    "properties": {
        "type": {"enum": ["hawq", "manual"]},
        "bits": {"type": "array", "items": _BITS, "minItems": 1, "uniqueItems": True},
        "num_data_points": {"type": "integer", "minimum": 1},
        "iter_number": {"type": "integer", "minimum": 1},
        "tolerance": {"type": "number", "minimum": 0},
        "compression_ratio": {"type": "number", "exclusiveMinimum": 0},
        "bitwidth_per_scope": {"type": "array", "items": {
            "type": "array", "prefixItems": [_BITS, {"type": "string", "minLength": 1}],
            "minItems": 2, "maxItems": 2}},
        "traces_per_layer_path": {"type": "string", "minLength": 1},
        "dump_init_precision_data": {"type": "boolean"},
        "bitwidth_assignment_mode": {"enum": ["liberal", "strict"]},
        # ours: where dumps go, and the seed of the Rademacher vectors (reproducible choices)
        "dump_dir": {"type": "string", "minLength": 1},
        "seed": {"type": "integer"},
    },
}

# nncf/config/schemata/defaults.py
PRECISION_DEFAULTS = {
    "type": "hawq", "bits": [2, 4, 8], "num_data_points": 100, "iter_number": 200, "tolerance": 1e-4,
    "compression_ratio": 1.5, "dump_init_precision_data": False, "bitwidth_assignment_mode": "liberal",
    "dump_dir": "mixed_precision_dump", "seed": 0,
}


@register_algorithm
class MixedPrecision(CompressionPass):
    """``MixedPrecision(type="hawq", bits=[2, 4, 8], compression_ratio=1.5, num_data_points=100,
    iter_number=200, tolerance=1e-4, bitwidth_assignment_mode="liberal", traces_per_layer_path=None,
    dump_init_precision_data=False, dump_dir="mixed_precision_dump", seed=0, criterion=None,
    criterion_fn=None, target_fn=None)`` or ``MixedPrecision(type="manual", bitwidth_per_scope=[[4, "conv1"],
    ...])``; docs/mixed_precision.md describes every key."""
    algorithm = "mixed_precision"
    schema = PRECISION_SCHEMA
    defaults = PRECISION_DEFAULTS

    def __init__(self, *, criterion: Callable | None = None, criterion_fn: Callable | None = None,
                 target_fn: Callable | None = None, **params):
        for name, fn in (("criterion", criterion), ("criterion_fn", criterion_fn), ("target_fn", target_fn)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"MixedPrecision.{name}: expected a callable, got {type(fn).__name__}", path=name)
        super().__init__(**params)
        self.params["bits"] = sorted(self.params["bits"])
        self.criterion, self.criterion_fn, self.target_fn = criterion, criterion_fn, target_fn

    @classmethod
    def validate(cls, params: dict, prefix: str) -> dict:
        if params.get("type") == "autoq":  # before its own keys (eval_subset_ratio, ...) read as unknown
            raise ConfigError(f"{prefix}.type: NNCF's 'autoq' (a reinforcement-learning search) is not supported; "
                              f"'hawq' chooses the bit widths automatically (docs/nncf_configs.md)",
                              path=f"{prefix}.type")
        if "type" not in params and params.get("bitwidth_per_scope"):
            params = {**params, "type": "manual"}  # NNCF: bit widths given per scope mean manual precision
        return super().validate(params, prefix)

    @classmethod
    def check(cls, params: dict, prefix: str):
        mode = params["type"]
        if mode == "manual":
            if not params.get("bitwidth_per_scope"):
                raise ConfigError(f"{prefix}.bitwidth_per_scope: type 'manual' needs bitwidth_per_scope, e.g. "
                                  f"[[4, \"conv1\"], [8, \"fc\"]]", path=f"{prefix}.bitwidth_per_scope")
            return
        if params.get("bitwidth_per_scope"):
            raise ConfigError(f"{prefix}.bitwidth_per_scope: applies to type 'manual' only; type 'hawq' chooses "
                              f"the bit widths itself", path=f"{prefix}.bitwidth_per_scope")
        low, high = ratio_bounds(params["bits"])
        ratio = params["compression_ratio"]
        if not low <= ratio <= high:
            raise ConfigError(f"{prefix}.compression_ratio: {ratio:g} cannot be reached with bits "
                              f"{sorted(params['bits'])}: the reachable range is [{low:g}, {high:g}] "
                              f"(1.0 = all 8-bit, {high:g} = all {min(params['bits'])}-bit)",
                              path=f"{prefix}.compression_ratio")

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        self.validate_scopes(gm)
        found, skipped = find_quantized_layers(gm)
        layers = [l for l in found if self.selects(l.module_path)]
        excluded = [l for l in found if not self.selects(l.module_path)]
        part = MixedPrecisionController(gm, layers, excluded, skipped, self.params, criterion=self.criterion,
                                        criterion_fn=self.criterion_fn, target_fn=self.target_fn)
        if not layers:
            why = ("the graph has no weight quantizers: put Quantize(...) before MixedPrecision(...)"
                   if not found else "the scopes exclude every quantized layer")
            warnings.warn(f"MixedPrecision: nothing to do: {why}", stacklevel=2)
            part.skipped.append({"scope": "(model)", "reason": why})
            return PassResult(gm, False, controller=part)
        if self.params["type"] == "manual":
            part.apply_manual(gm)
            return PassResult(gm, bool(part.manual_assignments), controller=part)
        return PassResult(gm, False, controller=part)
