"""What the three sparsity algorithms share: config keys, mask insertion, the controller base.

Deciding and doing are separate: ``SparsityPass.call`` only inserts mask modules
(all ones, or the masks a subclass computes at compile time) on the weight edge
of every selected conv/linear; the controller decides the masks' values over
training (magnitude thresholds from the schedule, RB logits trained by the
loss) and freezes them at ``sparsity_freeze_epoch``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
import torch
import torch.fx

from fxcompress.algorithm import CompressionPass
from fxcompress.controller import ControllerPart, StatisticsSection
from fxcompress.distributed import broadcast_from_rank0
from fxcompress.errors import ConfigError
from fxcompress.graph import add_module, get_attr_value, insert_on_output
from fxcompress.pass_manager import PassContext, PassResult
from fxcompress.quantizers import is_quantizer
from fxcompress.schedulers import LevelScheduler, build_scheduler, check_multistep
from fxcompress.weights import functionalize_weighted, weighted_ops

from .lowering import FoldMasks
from .masks import SparsityMask

__all__ = ["SparseLayer", "SparsityPass", "SparsityController", "SCHEDULE_PARAMS", "scheduler_from_params"]

_NUMBER = {"type": "number"}
_LEVEL = {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
_EPOCH = {"type": "number", "minimum": 0}

# NNCF's COMMON_SPARSITY_PARAM_PROPERTIES (nncf/config/schemata/common/sparsity.py) plus sparsity_init;
# levels are checked to lie in [0, 1) here (NNCF raised only when the level was set).
SCHEDULE_PARAMS = {
    "sparsity_init": _LEVEL,
    "schedule": {"enum": ["polynomial", "exponential", "adaptive", "multistep"]},
    "patience": {"type": "integer", "minimum": 1},
    "power": {"type": "number", "exclusiveMinimum": 0},
    "concave": {"type": "boolean"},
    "sparsity_target": _LEVEL,
    "sparsity_target_epoch": _EPOCH,
    "sparsity_freeze_epoch": _EPOCH,
    "update_per_optimizer_step": {"type": "boolean"},
    "steps_per_epoch": {"type": "integer", "minimum": 1},
    "multistep_steps": {"type": "array", "items": _EPOCH, "minItems": 1},
    "multistep_sparsity_levels": {"type": "array", "items": _LEVEL, "minItems": 2},
    "sparsity_level_setting_mode": {"enum": ["global", "local"]},
}

SCHEDULE_DEFAULTS = {  # nncf/config/schemata/defaults.py
    "sparsity_init": 0.0, "patience": 1, "power": 0.9, "concave": True, "sparsity_target": 0.5,
    "sparsity_target_epoch": 90, "update_per_optimizer_step": False,
    "multistep_steps": [90], "multistep_sparsity_levels": [0.1, 0.5], "sparsity_level_setting_mode": "global",
}
DEFAULT_FREEZE_EPOCH = 100


def _freeze_epoch(params: dict) -> float:
    """``sparsity_freeze_epoch`` as given, else NNCF's 100 (or later, so the schedule can end first)."""
    if params.get("sparsity_freeze_epoch") is not None:
        return params["sparsity_freeze_epoch"]
    if params["schedule"] == "multistep":
        return max(DEFAULT_FREEZE_EPOCH, params["multistep_steps"][-1])
    return max(DEFAULT_FREEZE_EPOCH, params["sparsity_target_epoch"])


def check_schedule_params(params: dict, prefix: str):
    """Cross-field checks of the schedule keys; errors name the field."""
    schedule = params["schedule"]
    if schedule == "multistep":
        steps = params["multistep_steps"]
        check_multistep(steps, params["multistep_sparsity_levels"], prefix)
        end, end_key = steps[-1], "multistep_steps"
    else:
        end, end_key = params["sparsity_target_epoch"], "sparsity_target_epoch"
    freeze = params.get("sparsity_freeze_epoch")
    if freeze is not None and schedule != "adaptive" and freeze < end:
        raise ConfigError(
            f"{prefix}.sparsity_freeze_epoch: {freeze} is before {end_key} ({end}): the masks would freeze "
            f"before the schedule reaches its target; use sparsity_freeze_epoch >= {end}",
            path=f"{prefix}.sparsity_freeze_epoch")
    if schedule != "multistep" and params["sparsity_init"] > params["sparsity_target"]:
        raise ConfigError(f"{prefix}.sparsity_init: {params['sparsity_init']} is above sparsity_target "
                          f"({params['sparsity_target']}); schedules only increase sparsity",
                          path=f"{prefix}.sparsity_init")


def scheduler_from_params(params: dict) -> LevelScheduler:
    """The level scheduler an algorithm's (validated) schedule keys describe."""
    return build_scheduler(
        params["schedule"], freeze_epoch=_freeze_epoch(params),
        update_per_optimizer_step=params["update_per_optimizer_step"], steps_per_epoch=params.get("steps_per_epoch"),
        initial_level=params["sparsity_init"], target_level=params["sparsity_target"],
        target_epoch=params["sparsity_target_epoch"], power=params["power"], concave=params["concave"],
        patience=params["patience"], steps=params["multistep_steps"], levels=params["multistep_sparsity_levels"])


@dataclass
class SparseLayer:
    """One masked weight: where it is in the model and the mask module that owns its mask."""
    module_path: str      # the conv/linear module, as in model.named_modules() (scopes match this)
    weight_target: str    # the parameter, e.g. "conv1.weight"
    mask_name: str        # the inserted module, e.g. "conv1_weight_mask"
    mask: SparsityMask

    def weight(self, gm: torch.nn.Module) -> torch.Tensor:
        return get_attr_value(gm, self.weight_target)


class SparsityPass(CompressionPass):
    """Inserts one mask module per selected conv/linear weight; subclasses make the masks and controller."""

    def make_mask(self, weight: torch.Tensor) -> SparsityMask:
        raise NotImplementedError

    def make_controller(self, gm: torch.fx.GraphModule, layers: list[SparseLayer],
                        skipped: list[dict]) -> "SparsityController":
        raise NotImplementedError

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        self.validate_scopes(gm)
        code_before = gm.code
        layers, skipped = [], []
        by_weight: dict[str, torch.fx.Node] = {}  # one mask per parameter, however many ops read it
        functionalize_weighted(gm)
        for op in weighted_ops(gm):
            if not self.selects(op.module_path):
                skipped.append({"scope": op.module_path, "reason": "excluded by ignored_scopes/target_scopes"})
                continue
            weight = op.weight(gm)
            if weight is None or not weight.is_floating_point():
                skipped.append({"scope": op.module_path,
                                "reason": "its weight is computed in the graph or not floating point, "
                                          "not a parameter that a mask can act on"})
                continue
            target = op.weight_source.target
            if target in by_weight:
                op.node.replace_input_with(op.weight_input, by_weight[target])
                continue
            self._warn_if_after_quantizer(gm, op)
            mask = self.make_mask(weight)
            name = add_module(gm, f"{target}_mask", mask)
            by_weight[target] = insert_on_output(gm, op.weight_input, name, self.name, users=[op.node])
            layers.append(SparseLayer(op.module_path, target, name, mask))
        controller = self.make_controller(gm, layers, skipped)
        if not layers:
            reasons = "; ".join(f"{s['scope']}: {s['reason']}" for s in skipped) or "the model has no conv or linear"
            warnings.warn(f"{self.name}: nothing to sparsify ({reasons})", stacklevel=2)
        # functionalizing module calls changes the code even when no mask is inserted
        return PassResult(gm, modified=bool(layers) or gm.code != code_before, controller=controller)


    def _warn_if_after_quantizer(self, gm: torch.fx.GraphModule, op):
        node = op.weight_input
        while node is not op.weight_source and node.meta.get("inserted_by"):
            if node.op == "call_module" and is_quantizer(gm.get_submodule(node.target)):
                warnings.warn(f"{self.name}: the mask of {op.module_path} goes after the weight quantizer "
                              f"'{node.target}' (inserted by {node.meta['inserted_by']}), so that quantizer sees "
                              f"unmasked weights; list the sparsity pass before quantization", stacklevel=3)
                return
            node = node.args[0]


def _zeros(mask: torch.Tensor) -> int:
    return int((mask == 0).sum())


class SparsityController(ControllerPart):
    """Owns the mask modules of one sparsity pass; statistics, checkpoints and lowering are shared."""
    # Set by ``set_compression_rate`` (magnitude, RB): the level accuracy-aware training fixed,
    # which replaces the schedule's level from then on.
    pinned_level: float | None = None

    def __init__(self, gm: torch.fx.GraphModule, layers: list[SparseLayer], skipped: list[dict],
                 scheduler=None, target_level: float | None = None):
        super().__init__()
        self.gm = gm
        self.layers = list(layers)
        self.skipped = list(skipped)
        self.target_level = target_level
        if scheduler is not None:
            self.scheduler = scheduler
        self.frozen = False

    # -- what subclasses report ----------------------------------------------------------
    @property
    def current_level(self) -> float | None:
        """The level the schedule asks for now (None for algorithms without a schedule), or the pinned one."""
        if self.pinned_level is not None:
            return self.pinned_level
        return getattr(self.scheduler, "current_level", None)

    @property
    def compression_rate(self) -> float | None:
        """The current sparsity level (NNCF's name; accuracy-aware training reads it)."""
        return self.current_level

    def _pin(self, level: float):
        if not 0.0 <= level < 1.0:
            raise ValueError(f"sparsity level must be in [0, 1), got {level}")
        self.pinned_level = float(level)

    def layer_statistics(self, layer: SparseLayer) -> dict:
        """Algorithm-specific per-layer columns (threshold, ...)."""
        return {}

    def summary_statistics(self) -> dict:
        return {}

    # -- shared ----------------------------------------------------------------------------
    def masks(self) -> list[torch.Tensor]:
        return [layer.mask.binary_mask() for layer in self.layers]

    def sparsity(self) -> float:
        """Fraction of masked weights over all sparsified weights."""
        total = sum(m.numel() for m in self.masks())
        return sum(_zeros(m) for m in self.masks()) / total if total else 0.0

    def statistics(self) -> StatisticsSection:
        rows, zeros_total, total = [], 0, 0
        for layer in self.layers:
            mask = layer.mask.binary_mask()
            zeros, numel = _zeros(mask), mask.numel()
            zeros_total, total = zeros_total + zeros, total + numel
            rows.append({"layer": layer.module_path, "mask": layer.mask_name, "shape": tuple(mask.shape),
                         "params": numel, "sparsity": zeros / numel if numel else 0.0,
                         **self.layer_statistics(layer)})
        model_params = self._model_parameter_count()
        summary = {
            "sparsity": zeros_total / total if total else 0.0,
            "model_sparsity": zeros_total / model_params if model_params else 0.0,
            "sparsified_params": total,
            "masked_params": zeros_total,
            "current_target": self.current_level,
            "sparsity_target": self.target_level,
            "epoch": self.scheduler.current_epoch,
            "frozen": self.frozen,
            **self.summary_statistics(),
        }
        return StatisticsSection(self.algorithm, summary, rows, self.skipped)

    def _model_parameter_count(self) -> int:
        """Parameters of the user's model: those of modules a compression pass inserted are left out."""
        inserted = tuple(f"{n.target}." for n in self.gm.graph.nodes
                         if n.op == "call_module" and n.meta.get("inserted_by"))
        return sum(p.numel() for name, p in self.gm.named_parameters() if not name.startswith(inserted))

    def freeze(self):
        self.frozen = True

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "frozen": self.frozen}

    def load_state_dict(self, state: dict):
        self.frozen = bool(state.get("frozen", False))
        self.scheduler.load_state_dict(state["scheduler"])

    def lowering_passes(self):
        return [FoldMasks()]

    def distributed(self):
        """Masks computed on rank 0 win, so all ranks prune the same weights."""
        broadcast_from_rank0([buffer for layer in self.layers for buffer in layer.mask.buffers()])
