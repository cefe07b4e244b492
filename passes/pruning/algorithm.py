"""``FilterPruning`` (NNCF's ``"filter_pruning"``) and its controller part.

The pass: functionalize convs/linears (``weighted_ops``), analyze channel
dependencies (``dependency``), apply the user's policy (scopes,
``prune_first_conv``, ``prune_downsample_convs``), insert ``ChannelMask``
modules (weight and bias of every producer, BatchNorm outputs, consumer inputs
not provably zero), annotate nodes for the fold, and hand a controller part the
plan. The part sets masks for the scheduled level (recomputing importance at
every epoch until the schedule freezes), reports statistics, checkpoints, and
provides the fold pass for ``strip()`` / ``export_onnx()``.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.fx

from fxcompress.algorithm import CompressionPass
from fxcompress.batchnorm import (BATCHNORM_ADAPTATION_SCHEMA, DEFAULT_NUM_BN_ADAPTATION_SAMPLES,
                                  adapt_batchnorm, average_batchnorm_statistics)
from fxcompress.registry import register_algorithm
from fxcompress.controller import ControllerPart, InitContext, StatisticsSection
from fxcompress.distributed import broadcast_from_rank0, is_distributed, is_rank0
from fxcompress.errors import CheckpointError, ConfigError
from fxcompress.graph import GraphSnapshot, add_module, get_attr_value, insert_before_input, insert_on_output
from fxcompress.pass_manager import PassContext, PassResult
from fxcompress.scopes import ScopeIndex
from fxcompress.weights import functionalize_weighted, weighted_ops

from .cost import CostModel
from .dependency import ChannelAnalysis, Group, analyze_channels
from .fold import INSERTED_BY, FoldPrunedChannels
from .importance import CRITERIA, WEIGHT_CRITERIA, TaylorScores, class_importance, filter_importance, flops_weighted
from .legr import (LEGR_DEFAULTS, LEGR_SCHEMA, Coefficients, LegrCallbacks, identity, load_coefficients, run_legr,
                   save_coefficients)
from .masks import ChannelMask, ChannelMaskedLayerNorm
from .reconstruction import (DEFAULT_RECONSTRUCTION_SAMPLES, DEFAULT_RIDGE, RECONSTRUCTION_SCHEMA,
                             reconstruct_consumers)
from .schedule import SCHEDULE_NAMES, build_pruning_scheduler
from .selection import PRUNING_QUOTA, Selector

__all__ = ["FilterPruning", "FilterPruningController"]

_FRACTION = {"type": "number", "minimum": 0}

SCHEMA = {
    "type": "object",
    "properties": {
        "pruning_init": _FRACTION,
        "schedule": {"enum": list(SCHEDULE_NAMES)},
        "pruning_target": _FRACTION,
        "pruning_flops_target": _FRACTION,
        "num_init_steps": {"type": "integer", "minimum": 0},
        "pruning_steps": {"type": "number", "exclusiveMinimum": 0},  # whole epochs unless per optimizer step
        "update_per_optimizer_step": {"type": "boolean"},
        "steps_per_epoch": {"type": "integer", "minimum": 1},
        "filter_importance": {"enum": list(CRITERIA)},
        "weight_importance": {"enum": list(CRITERIA)},  # NNCF 1.x name of filter_importance
        "interlayer_ranking_type": {"enum": ["unweighted_ranking", "flops_weighted_ranking", "learned_ranking"]},
        "all_weights": {"type": "boolean"},
        "prune_first_conv": {"type": "boolean"},
        "prune_downsample_convs": {"type": "boolean"},
        "prune_batch_norms": {"type": "boolean"},
        "zero_grad": {"type": "boolean"},
        "round_to": {"type": "integer", "minimum": 1},  # fxcompress: keep multiples of this many channels
        "legr_params": LEGR_SCHEMA,
        "save_ranking_coeffs_path": {"type": "string", "minLength": 1},
        "load_ranking_coeffs_path": {"type": "string", "minLength": 1},
        "initializer": {
            "type": "object",
            "properties": {"batchnorm_adaptation": BATCHNORM_ADAPTATION_SCHEMA,
                           "reconstruction": RECONSTRUCTION_SCHEMA},
            "additionalProperties": False,
        },
    },
}

DEFAULTS = {
    "pruning_init": 0.0, "schedule": "exponential", "num_init_steps": 0, "pruning_steps": 100,
    "filter_importance": "L2", "interlayer_ranking_type": "unweighted_ranking", "all_weights": False,
    "prune_first_conv": False, "prune_downsample_convs": False, "prune_batch_norms": True, "zero_grad": True,
    "round_to": 1, "update_per_optimizer_step": False,
}
DEFAULT_PRUNING_TARGET = 0.5


@register_algorithm
class FilterPruning(CompressionPass):
    """Prune whole filters (output channels) of convolutions, and everything tied to them.

    ``FilterPruning(pruning_target=0.5)`` prunes half of the filters of every
    prunable group; ``FilterPruning(pruning_flops_target=0.3)`` removes 30% of
    the FLOPs. See docs/pruning.md for every key.
    """
    algorithm = "filter_pruning"
    schema = SCHEMA
    defaults = DEFAULTS

    @classmethod
    def check(cls, params: dict, prefix: str):
        filters, flops = params.get("pruning_target"), params.get("pruning_flops_target")
        if filters is not None and flops is not None:
            raise ConfigError(f"{prefix}: give either pruning_target (fraction of filters) or "
                              f"pruning_flops_target (fraction of FLOPs), not both", path=f"{prefix}.pruning_target")
        for key, what in (("pruning_target", "filters"), ("pruning_flops_target", "FLOPs")):
            value = params.get(key)
            if value is not None and value >= 1.0:
                raise ConfigError(f"{prefix}.{key}: {value} would remove all {what}; it is the fraction of {what} "
                                  f"removed and must be below 1.0 (e.g. 0.5)", path=f"{prefix}.{key}")
        target = flops if flops is not None else (filters if filters is not None else DEFAULT_PRUNING_TARGET)
        if params["pruning_init"] > target:
            raise ConfigError(f"{prefix}.pruning_init: {params['pruning_init']} is above the target {target}",
                              path=f"{prefix}.pruning_init")
        if params.get("weight_importance") and "filter_importance" in params and \
                params["weight_importance"] != params["filter_importance"] and params["filter_importance"] != "L2":
            raise ConfigError(f"{prefix}: weight_importance ({params['weight_importance']}) and filter_importance "
                              f"({params['filter_importance']}) disagree; give filter_importance only",
                              path=f"{prefix}.weight_importance")
        if params["interlayer_ranking_type"] == "learned_ranking" and \
                params["filter_importance"] not in WEIGHT_CRITERIA:
            raise ConfigError(f"{prefix}.filter_importance: learned_ranking (LeGR) learns coefficients of weight "
                              f"norms; use one of {', '.join(WEIGHT_CRITERIA)} with it, not "
                              f"{params['filter_importance']!r}", path=f"{prefix}.filter_importance")
        steps = params["pruning_steps"]
        if not params.get("update_per_optimizer_step"):
            if steps != int(steps) or steps < 1:
                raise ConfigError(f"{prefix}.pruning_steps: {steps} is not a whole number of epochs; a fraction of "
                                  f"an epoch needs update_per_optimizer_step: true (and steps_per_epoch)",
                                  path=f"{prefix}.pruning_steps")
            if "steps_per_epoch" in params:
                raise ConfigError(f"{prefix}.steps_per_epoch: applies with update_per_optimizer_step: true only",
                                  path=f"{prefix}.steps_per_epoch")
        elif "steps_per_epoch" not in params and params["schedule"] != "baseline":
            raise ConfigError(f"{prefix}.steps_per_epoch: update_per_optimizer_step needs the number of optimizer "
                              f"steps per epoch to place each step in the schedule from the first epoch on",
                              path=f"{prefix}.steps_per_epoch")
        if "reconstruction" in params.get("initializer", {}):
            criterion = params.get("weight_importance") if params["filter_importance"] == "L2" else None
            criterion = criterion or params["filter_importance"]
            if params["schedule"] != "baseline" or criterion == "taylor" or params.get("pruning_init"):
                raise ConfigError(f"{prefix}.initializer.reconstruction: reconstructs the layers after the channels "
                                  f"pruned at initialize, so it needs the final masks then: schedule 'baseline' "
                                  f"without pruning_init, and a weight criterion (not 'taylor', which waits for "
                                  f"gradients); here schedule {params['schedule']!r}, filter_importance "
                                  f"{criterion!r}", path=f"{prefix}.initializer.reconstruction")
        legr_keys = [k for k in ("legr_params", "save_ranking_coeffs_path", "load_ranking_coeffs_path") if k in params]
        if legr_keys and params["interlayer_ranking_type"] != "learned_ranking":
            raise ConfigError(f"{prefix}.{legr_keys[0]}: applies to interlayer_ranking_type 'learned_ranking' (LeGR) "
                              f"only, the ranking here is {params['interlayer_ranking_type']!r}",
                              path=f"{prefix}.{legr_keys[0]}")

    # -- resolved options --------------------------------------------------------------------
    @property
    def target(self) -> tuple[str, float]:
        if self.params.get("pruning_flops_target") is not None:
            return "flops", float(self.params["pruning_flops_target"])
        return "filters", float(self.params.get("pruning_target", DEFAULT_PRUNING_TARGET))

    @property
    def criterion(self) -> str:
        legacy = self.params.get("weight_importance")  # NNCF 1.x name; filter_importance wins when set
        return legacy if legacy and self.params["filter_importance"] == "L2" else self.params["filter_importance"]

    # -- the pass ------------------------------------------------------------------------------
    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        self.validate_scopes(gm)
        if any("pruning_space" in n.meta for n in gm.graph.nodes):
            raise ConfigError("FilterPruning: this model already went through a FilterPruning pass; "
                              "use one per model", path="compression")
        snapshot = GraphSnapshot(gm)
        functionalize_weighted(gm)
        ops = weighted_ops(gm)
        analysis = analyze_channels(gm, ops, prune_batch_norms=self.params["prune_batch_norms"])
        self._apply_policy(analysis)
        prunable = [g for g in analysis.groups if g.prunable]
        if not prunable:
            snapshot.restore()
            why = "no convolution in the model" if not analysis.groups else \
                f"all {len(analysis.groups)} channel groups are unprunable (see ctrl.statistics() 'skipped')"
            warnings.warn(f"FilterPruning: nothing to prune: {why}", stacklevel=2)
            return PassResult(gm, False, FilterPruningController(self, analysis, []))
        if self.criterion == "bn_scale":
            without = [g.describe() or f"group {g.id}" for g in prunable if not g.norms]
            if without:
                snapshot.restore()
                raise ConfigError(f"FilterPruning.filter_importance: 'bn_scale' ranks channels by their BatchNorm "
                                  f"scale, but no BatchNorm follows {', '.join(without)}; use 'L2' or 'taylor' "
                                  f"(or ignored_scopes)", path="FilterPruning.filter_importance")
        cost = CostModel(analysis, gm)
        selector = Selector(analysis, prunable, cost, round_to=self.params["round_to"])
        part = FilterPruningController(self, analysis, prunable, gm, cost, selector)
        kind, target = self.target
        if kind == "flops":
            scores = part.scores() if part.ranking_ready else np.zeros(analysis.num_classes)  # any order: a limit
            reachable = selector.max_flops_fraction(scores, self.params["all_weights"])
            if target > reachable + 1e-9:
                raise ConfigError(
                    f"FilterPruning.pruning_flops_target: {target:g} cannot be reached: pruning every prunable "
                    f"group to its limit ({PRUNING_QUOTA:.0%} of its channels) removes at most {reachable:.4f} "
                    f"of the FLOPs ({len(prunable)} of {len(analysis.groups)} channel groups are prunable; "
                    f"prune_first_conv / prune_downsample_convs / ignored_scopes may free more)",
                    path="FilterPruning.pruning_flops_target")
        part.bind_masks(self._insert_masks(gm, analysis, prunable))
        self._annotate(analysis, prunable)
        part.start()
        return PassResult(gm, True, part)

    def _apply_policy(self, analysis: ChannelAnalysis):
        p = self.params
        for group in analysis.groups:
            # as NNCF: a layer out of scope keeps its filters; its inputs follow the layers before it
            outside = [layer.name for layer in group.producers if not self.selects(layer.module_path)]
            if outside:
                group.reasons.append(f"{', '.join(outside)} excluded by ignored_scopes/target_scopes")
            if not p["prune_first_conv"]:
                first = [l.name for l in group.producers if l.first]
                if first:
                    group.reasons.append(f"contains the first convolution {', '.join(first)} "
                                         f"(prune_first_conv is false)")
            if not p["prune_downsample_convs"]:
                down = [l.name for l in group.producers if l.downsampling]
                if down:
                    group.reasons.append(f"contains the downsampling convolution {', '.join(down)} "
                                         f"(stride > 1; prune_downsample_convs is false)")

    def _insert_masks(self, gm, analysis: ChannelAnalysis, groups: list[Group]) -> list:
        candidate = np.zeros(analysis.num_classes, dtype=bool)
        for g in groups:
            candidate[g.classes] = True

        def touched(space):
            return space is not None and bool(candidate[analysis.classes_of(space)].any())

        straight_through = not self.params["zero_grad"]
        bindings = []

        def device_of(layer):
            if layer.weight_target is not None:
                return get_attr_value(gm, layer.weight_target).device
            return next((t.device for t in gm.parameters()), torch.device("cpu"))

        # consumer inputs the analysis cannot prove zero at pruned channels (first: they read the original edge)
        by_input: dict[torch.fx.Node, tuple] = {}
        for layer in analysis.layers.values():
            space = layer.in_space
            # a grouped conv loses whole groups, filters included: its input needs no mask
            if touched(space) and not layer.grouped and not space.zero:
                x = layer.data_input
                by_input.setdefault(x, (space, []))[1].append(layer)
        for x, (space, consumers) in by_input.items():
            mask = ChannelMask(space.size, space.axis, space.ndim, straight_through).to(device_of(consumers[0]))
            name = add_module(gm, f"{consumers[0].name}_input_mask", mask)
            insert_on_output(gm, x, name, INSERTED_BY, users=[c.node for c in consumers])
            bindings.append((mask, space))
        for layer in analysis.layers.values():
            if not touched(layer.out_space):
                continue
            node, space = layer.node, layer.out_space
            weight_input = node.args[layer.weight_arg]
            mask = ChannelMask(space.size, layer.out_axis, len(layer.weight_shape), straight_through)
            mask = mask.to(device_of(layer))
            name = add_module(gm, f"{layer.name}_weight_mask", mask)
            insert_before_input(gm, node, weight_input, name, INSERTED_BY)
            bindings.append((mask, space))
            bias = node.args[layer.bias_arg] if len(node.args) > layer.bias_arg else None
            if isinstance(bias, torch.fx.Node):
                mask = ChannelMask(space.size, 0, 1, straight_through).to(device_of(layer))
                name = add_module(gm, f"{layer.name}_bias_mask", mask)
                insert_before_input(gm, node, bias, name, INSERTED_BY)
                bindings.append((mask, space))
        for site in analysis.layer_norms:
            if touched(site.space):
                bindings.append((self._mask_layer_norm(gm, site), site.space))
        if self.params["prune_batch_norms"]:
            for norm in analysis.norms:
                if touched(norm.space):
                    mask = ChannelMask(norm.space.size, 1, norm.space.ndim, straight_through)
                    mask = mask.to(next((t.device for t in gm.get_submodule(norm.module_path).parameters()),
                                        torch.device("cpu")))
                    name = add_module(gm, f"{norm.module_path}_output_mask", mask)
                    insert_on_output(gm, norm.node, name, INSERTED_BY)
                    bindings.append((mask, norm.space))
        return bindings

    @staticmethod
    def _mask_layer_norm(gm, site) -> ChannelMaskedLayerNorm:
        """Replace the LayerNorm node by a ``ChannelMaskedLayerNorm`` reading the same parameters."""
        node = site.node
        module = ChannelMaskedLayerNorm(site.space.size, site.eps)
        weight = gm.get_parameter(site.weight) if site.weight else None
        if weight is not None:
            module = module.to(weight.device)
        name = add_module(gm, f"{node.meta.get('module_path') or node.name}_masked", module)
        graph = gm.graph
        with graph.inserting_before(node):
            params = []
            for target, index in ((site.weight, 2), (site.bias, 3)):
                if target is None:
                    params.append(None)
                elif node.op == "call_function":
                    params.append(node.args[index] if len(node.args) > index else node.kwargs[("weight", "bias")[index - 2]])
                else:
                    params.append(graph.get_attr(target))
            new = graph.call_module(name, (node.args[0], *params))
        new.meta.update(node.meta)
        new.meta["inserted_by"] = INSERTED_BY
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        site.node = site.space.node = new
        gm.recompile()
        return module

    @staticmethod
    def _annotate(analysis: ChannelAnalysis, groups: list[Group]):
        """What the fold needs, in node.meta: the channel class of every element that may shrink."""
        candidate = np.zeros(analysis.num_classes, dtype=bool)
        for g in groups:
            candidate[g.classes] = True
        for space in analysis.spaces:
            classes = analysis.classes_of(space)
            if candidate[classes].any():
                space.node.meta["pruning_space"] = {"axis": space.axis, "classes": tuple(classes.tolist())}
        for layer in analysis.layers.values():
            if layer.in_space is not None and candidate[analysis.classes_of(layer.in_space)].any():
                classes = analysis.classes_of(layer.in_space)
                layer.node.meta["pruning_input"] = {"axis": layer.in_space.axis, "classes": tuple(classes.tolist())}
        for node in analysis.reshapes:
            if "pruning_space" in node.meta:
                node.meta["pruning_reshape"] = True


class FilterPruningController(ControllerPart):
    """Masks for the scheduled level, statistics, checkpoints and the fold pass."""
    algorithm = "filter_pruning"

    def __init__(self, owner: FilterPruning, analysis: ChannelAnalysis, groups: list[Group], gm=None,
                 cost: CostModel | None = None, selector: Selector | None = None):
        super().__init__()
        self.params = dict(owner.params)
        self.target_kind, self.target = owner.target
        self.criterion = owner.criterion
        self.analysis = analysis
        self.groups = groups
        self.gm = gm
        self.cost = cost
        self.selector = selector
        self.bindings: list[tuple[ChannelMask, object]] = []
        self.pruned = np.zeros(analysis.num_classes, dtype=bool)
        self.current_level = 0.0
        self._applied: tuple | None = None
        self._frozen = False
        self._suspended = True
        self._class_flops = None
        self._adapted_bns: list = []
        self._reconstructed: list[str] = []  # weight targets initializer.reconstruction replaced
        # reconstruction solves from the weights as compiled: once, at the first initialize with data
        self.reconstruction_pending = "reconstruction" in self.params.get("initializer", {}) and bool(groups)
        self.pinned_level: float | None = None  # set by set_compression_rate (accuracy-aware training)
        p = self.params
        self.scheduler = build_pruning_scheduler(p["schedule"], p["pruning_init"], self.target,
                                                 p["num_init_steps"], p["pruning_steps"],
                                                 p["update_per_optimizer_step"], p.get("steps_per_epoch"))
        # taylor: gradients of the user's backward passes; masks wait for the first one (ranking_ready)
        self.taylor = (TaylorScores(gm, [layer for g in groups for layer in g.producers])
                       if self.criterion == "taylor" and groups else None)
        self.scheduler.on_update(self._on_schedule)
        self.skipped = [{"scope": g.describe() or f"group {g.id}", "reason": "; ".join(g.reasons)}
                        for g in analysis.groups if not g.prunable]
        # LeGR (legr.py): per-layer (a, b) of the filter importances; learned at initialize() unless loaded
        self.learned_ranking = p["interlayer_ranking_type"] == "learned_ranking"
        self.ranking_coeffs: Coefficients | None = None
        self.ranking_learned = False
        self.legr_rewards: list[float] = []
        self.legr_callbacks = LegrCallbacks()
        if self.learned_ranking and groups:
            layers = self._ranked_layers()
            if p.get("load_ranking_coeffs_path"):
                index = ScopeIndex.of(gm)
                self.ranking_coeffs = load_coefficients(p["load_ranking_coeffs_path"], layers,
                                                        lambda path: index.module_ops.get(path, ()))
                self.ranking_learned = True
                self._save_coefficients()
            else:
                self.ranking_coeffs = identity(layers)

    # -- masks -------------------------------------------------------------------------------
    def bind_masks(self, bindings):
        self.bindings = list(bindings)

    def start(self):
        """Apply the schedule's first level (called by the pass once the masks are in the graph)."""
        self._suspended = False
        if self.taylor is not None:
            self.taylor.attach()
        self._on_schedule(self.scheduler)

    @property
    def ranking_ready(self) -> bool:
        """Whether channels can be ranked now: always, except ``taylor`` before its first backward pass."""
        return self.taylor is None or self.taylor.ready

    def _on_schedule(self, scheduler):
        if self._suspended or self._frozen or self.pinned_level is not None or not self.groups:
            return
        key = (scheduler.current_epoch, float(scheduler.current_level))
        if key == self._applied:
            return
        if scheduler.current_level > 0 and not self.ranking_ready:
            return  # taylor: applied at the first scheduler step after a backward pass
        self.set_pruning_level(scheduler.current_level)
        self._applied = key
        if scheduler.frozen:
            self._frozen = True
            if self.taylor is not None:
                self.taylor.detach()

    @property
    def global_ranking(self) -> bool:
        """One ranking over all groups: ``all_weights``, or LeGR (its coefficients exist to compare layers)."""
        return bool(self.params["all_weights"]) or self.learned_ranking

    def scores(self) -> np.ndarray:
        """Importance per channel class from the current weights (normalized across layers when global)."""
        if self.learned_ranking:  # as NNCF: LeGR's affine transforms replace the normalization
            return class_importance(self.analysis, self.gm, self.criterion, normalize=False,
                                    coefficients=self.ranking_coeffs)
        scores = class_importance(self.analysis, self.gm, self.criterion, normalize=self.global_ranking,
                                  taylor=self.taylor)
        if self.global_ranking and self.params["interlayer_ranking_type"] == "flops_weighted_ranking":
            if self._class_flops is None:
                flops = np.zeros(self.analysis.num_classes)
                cands = self.selector.candidates
                flops[cands] = self.cost.flops_per_class(cands)
                self._class_flops = flops
            scores = flops_weighted(scores, self._class_flops)
        return scores

    # -- LeGR ----------------------------------------------------------------------------------
    def _ranked_layers(self) -> list[str]:
        """The layers LeGR learns coefficients for: the producers of the prunable groups."""
        return list(dict.fromkeys(layer.name for g in self.groups for layer in g.producers
                                  if layer.weight_target is not None))

    def set_legr_callbacks(self, *, val_loader=None, criterion=None, target_fn=None, optimizer_fn=None,
                           train_steps_fn=None, val_fn=None):
        """How LeGR fine-tunes and scores a candidate ranking (``legr.LegrCallbacks``; NNCF's
        ``register_default_init_args(..., train_steps_fn=, val_loader=, legr_train_optimizer=, ...)``).
        The training batches are the loader given to ``ctrl.initialize``."""
        given = {"val_loader": val_loader, "criterion": criterion, "target_fn": target_fn,
                 "optimizer_fn": optimizer_fn, "train_steps_fn": train_steps_fn, "val_fn": val_fn}
        for key, value in given.items():
            if value is not None:
                setattr(self.legr_callbacks, key, value)

    def apply_ranking(self, coefficients: Coefficients, level: float):
        """Masks for ``level`` under the ranking ``coefficients`` (one LeGR candidate)."""
        self.ranking_coeffs = dict(coefficients)
        self.set_pruning_level(level)

    def learn_ranking(self, data):
        """Run LeGR's search on ``data`` (a ``CalibrationData``) and keep the best coefficients."""
        settings = {**LEGR_DEFAULTS, **self.params.get("legr_params", {})}
        level = float(settings.get("max_pruning", self.target))
        limit = self.maximal_compression_rate
        if level > limit + 1e-9:
            raise ConfigError(f"FilterPruning.legr_params.max_pruning: {level:g} cannot be reached (at most "
                              f"{limit:.4f} with these groups)", path="FilterPruning.legr_params.max_pruning")
        norms = {}
        for layer in self.analysis.layers.values():
            if layer.name in self.ranking_coeffs:
                weight = get_attr_value(self.gm, layer.weight_target)
                norms[layer.name] = filter_importance(weight, layer.out_axis, self.criterion).cpu().numpy()
        current, before = self.current_level, self.ranking_coeffs
        try:
            best, self.legr_rewards = run_legr(self, self.gm, data, self.legr_callbacks, settings, level, norms)
        except BaseException:
            self.apply_ranking(before, current)  # the masks as they were
            raise
        self.apply_ranking(best, current)
        self.ranking_learned = True
        self._save_coefficients()

    def _save_coefficients(self):
        # under torch.distributed rank 0 writes: its coefficients are the ones every rank uses (distributed())
        if self.params.get("save_ranking_coeffs_path") and is_rank0():
            save_coefficients(self.params["save_ranking_coeffs_path"], self.ranking_coeffs)

    def set_pruning_level(self, level: float):
        """Recompute the masks for ``level`` (fraction of filters, or of FLOPs with pruning_flops_target)."""
        if not self.groups:
            return
        level = float(level)
        if level <= 0:
            pruned = np.zeros(self.analysis.num_classes, dtype=bool)
        else:
            if not self.ranking_ready:
                raise RuntimeError("filter_pruning: filter_importance 'taylor' ranks channels by the gradients of "
                                   "the task loss; run a backward pass (loss.backward()) before setting a level")
            scores = self.scores()
            if self.taylor is not None:
                self.taylor.reset()  # the next masks use the gradients gathered from now on
            if self.params["update_per_optimizer_step"] and level >= self.current_level:
                # within-epoch steps only add channels, as progressive pruning that removes them does: a channel
                # brought back after a few steps would return with stale weights and BatchNorm statistics
                scores = np.where(self.pruned, -np.inf, scores)
            if self.target_kind == "flops":
                pruned = self.selector.for_flops(level, scores, self.global_ranking)
            elif self.global_ranking:
                pruned = self.selector.global_(level, scores)
            else:
                pruned = self.selector.uniform(level, scores)
        self._set_pruned(pruned)
        self.current_level = level

    # -- accuracy-aware training -------------------------------------------------------------
    @property
    def compression_rate(self) -> float:
        """The current pruning level (NNCF's name; accuracy-aware training reads it)."""
        return float(self.current_level)

    @property
    def maximal_compression_rate(self) -> float:
        """The highest level the masks can reach: the pruning quota, or the FLOPs it removes."""
        if self.target_kind == "flops" and self.groups:
            scores = self.scores() if self.ranking_ready else np.zeros(self.analysis.num_classes)
            return float(self.selector.max_flops_fraction(scores, self.global_ranking))
        return PRUNING_QUOTA

    def set_compression_rate(self, level: float):
        """Fix the pruning level at ``level`` from now on (accuracy-aware training searches it).

        The schedule no longer changes the masks. They are recomputed from the current
        weights unless ``level`` is the level applied now (as after loading a checkpoint).
        """
        if not 0.0 <= level < 1.0:
            raise ValueError(f"pruning level must be in [0, 1), got {level}")
        self.pinned_level = float(level)
        if self.pinned_level != float(self.current_level):
            self.set_pruning_level(self.pinned_level)

    def _set_pruned(self, pruned: np.ndarray):
        self.pruned = pruned.copy()
        for mask, space in self.bindings:
            mask.set(torch.from_numpy(self.analysis.keep(space, self.pruned)))

    # -- the training loop -----------------------------------------------------------------------
    def _legr_pending(self) -> bool:
        return self.learned_ranking and bool(self.groups) and not self.ranking_learned

    def needs_data(self) -> bool:
        return self._legr_pending() or self.reconstruction_pending

    def initialize(self, ctx: InitContext):
        if self._legr_pending():
            self.learn_ranking(ctx.data)
        initializer = self.params.get("initializer", {})
        if ctx.data is None or not self.groups:
            return
        if self.reconstruction_pending:  # before BatchNorm adaptation: it changes what the BatchNorms see
            settings = initializer["reconstruction"]
            self._reconstructed = reconstruct_consumers(
                self, ctx.data, settings.get("num_samples", DEFAULT_RECONSTRUCTION_SAMPLES),
                settings.get("ridge", DEFAULT_RIDGE))
            self.reconstruction_pending = False
        init = initializer.get("batchnorm_adaptation")
        if init is None:
            return
        samples = init.get("num_bn_adaptation_samples", DEFAULT_NUM_BN_ADAPTATION_SAMPLES)
        self._adapted_bns = adapt_batchnorm(ctx.gm, ctx.data, samples, "filter pruning: BatchNorm adaptation")

    def distributed(self):
        """Make every rank use rank 0's masks (LeGR coefficients, reconstructed weights), and the mean of
        the adapted BatchNorm statistics."""
        if not is_distributed() or not self.groups:
            return
        if self.learned_ranking:  # later schedule steps rank with them: every rank uses rank 0's search
            names = list(self.ranking_coeffs)
            coefficients = torch.tensor([self.ranking_coeffs[n] for n in names], dtype=torch.float64)
            broadcast_from_rank0([coefficients])
            self.ranking_coeffs = {n: (float(a), float(b)) for n, (a, b) in zip(names, coefficients.tolist())}
        broadcast_from_rank0([get_attr_value(self.gm, t).data for t in self._reconstructed])  # rank 0's solution
        flags = torch.from_numpy(self.pruned.astype(np.uint8))
        broadcast_from_rank0([flags])
        self._set_pruned(flags.numpy().astype(bool))
        average_batchnorm_statistics(self._adapted_bns)

    # -- statistics -----------------------------------------------------------------------------
    def statistics(self) -> StatisticsSection:
        summary = {"pruning_level": float(self.current_level), "target": self.target,
                   "target_kind": self.target_kind, "schedule": self.params["schedule"],
                   "epoch": self.scheduler.current_epoch, "frozen": self._frozen,
                   "groups": len(self.analysis.groups), "prunable_groups": len(self.groups)}
        if self.learned_ranking:
            summary.update({"ranking_learned": self.ranking_learned, "legr_generations": len(self.legr_rewards),
                            "legr_best_reward": max(self.legr_rewards) if self.legr_rewards else None})
        rows = []
        if self.groups:
            now, full = self.cost.evaluate(self.pruned), self.cost.full
            filters = pruned_filters = 0
            for g in self.groups:
                k = int(self.pruned[g.classes].sum())
                for layer in g.producers:
                    kept = self.analysis.keep(layer.out_space, self.pruned)
                    filters += kept.size
                    pruned_filters += int((~kept).sum())
                rows.append({"group": g.id, "producers": g.describe(), "channels": g.size, "pruned": k,
                             "ratio": k / g.size})
            summary.update({
                "filters_pruned_ratio": pruned_filters / max(1, filters),
                "flops_before": full.flops, "flops_after": now.flops,
                "flops_pruned_ratio": 1 - now.flops / max(1, full.flops),
                "params_before": full.params, "params_after": now.params,
                "params_pruned_ratio": 1 - now.params / max(1, full.params),
            })
        return StatisticsSection(self.algorithm, summary, rows, [dict(s) for s in self.skipped])

    def predicted_cost(self):
        """(FLOPs, parameters) the folded model will have with the current masks."""
        return self.cost.evaluate(self.pruned)

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "num_classes": int(self.analysis.num_classes),
                "pruned": [int(c) for c in np.nonzero(self.pruned)[0]], "level": float(self.current_level),
                "applied": list(self._applied) if self._applied else None, "frozen": bool(self._frozen),
                "reconstruction_pending": bool(self.reconstruction_pending),
                "ranking_coeffs": ({k: [a, b] for k, (a, b) in self.ranking_coeffs.items()}
                                   if self.ranking_coeffs is not None and self.ranking_learned else None)}

    def load_state_dict(self, state: dict):
        for key in ("scheduler", "num_classes", "pruned", "level", "frozen"):
            if key not in state:
                raise CheckpointError(f"filter_pruning controller state lacks '{key}'")
        if int(state["num_classes"]) != self.analysis.num_classes:
            raise CheckpointError(f"filter_pruning checkpoint was saved for a model with {state['num_classes']} "
                                  f"channel classes, this one has {self.analysis.num_classes}: not the same model")
        self._suspended = True
        try:
            self.scheduler.load_state_dict(state["scheduler"])
        finally:
            self._suspended = False
        pruned = np.zeros(self.analysis.num_classes, dtype=bool)
        pruned[np.asarray(state["pruned"], dtype=np.int64)] = True
        self._set_pruned(pruned)
        self.current_level = float(state["level"])
        self._applied = tuple(state["applied"]) if state.get("applied") else None
        self._frozen = bool(state["frozen"])
        # a checkpoint taken after reconstruction holds the solved weights: not solved again on resume
        self.reconstruction_pending = self.reconstruction_pending and state.get("reconstruction_pending", True)
        if self._frozen and self.taylor is not None:
            self.taylor.detach()  # frozen masks need no more gradients
        if self.learned_ranking and state.get("ranking_coeffs"):
            coeffs = {k: (float(a), float(b)) for k, (a, b) in state["ranking_coeffs"].items()}
            if set(coeffs) != set(self.ranking_coeffs):
                raise CheckpointError("filter_pruning checkpoint holds LeGR coefficients for other layers: "
                                      "not the same model")
            self.ranking_coeffs, self.ranking_learned = coeffs, True

    # -- lowering -----------------------------------------------------------------------------------
    def lowering_passes(self):
        if not self.groups:
            return []
        return [FoldPrunedChannels(np.nonzero(self.pruned)[0].tolist())]
