"""Where quantizers go and with which settings: a pure decision over the graph.

``plan_quantization(gm, weighted, settings, selects)`` reads the graph (op kinds
from ``fxcompress.optable``, shapes and dtypes from ``node.meta``) and writes its
decision as annotations: ``node.meta["quantization_annotation"]`` on every node
whose *output* is to be quantized, a list of ``QuantizationPoint`` (a tensor
gets one quantizer per role, usually one in all). It changes nothing else;
``quantize.insert_quantizers`` turns the annotations into ``FakeQuantizer``
nodes. So the policy is testable on its own: trace, annotate, count.

The rules (``DEVICE_RULES`` in ``device_rules.py``, one declarative table per target device) say which
inputs of which op kinds OpenVINO's plugin needs quantized to run the op in
integers (docs/export.md, "What OpenVINO runs in int8"):

- weights of conv / transposed conv / linear / ``addmm`` (transformers'
  ``Conv1D``, a ``[in, out]`` weight) (and 2-D parameters multiplied by
  ``matmul``): per output channel on the weight's output axis (1 for
  transposed convs and ``addmm``; with groups that axis has ``out_channels / groups``
  entries, which is what gets a scale each);
- activation inputs of conv, linear, matmul (both operands, symmetric; none for a matmul of two
  activations unless ``quantize_attention``), pooling (avg), both inputs of residual adds (a fused
  ``scaled_dot_product_attention`` gets none: OpenVINO runs it in float without a quantized softmax
  output, so ``passes/quantization/attention.py`` rewrites it into matmuls first);
- the model inputs (``quantize_inputs``), the model outputs (``quantize_outputs``).

A request for "input i of op X" is resolved to the tensor it really reads:
the walk goes up through quantization-agnostic ops (max-pool, flatten,
view/reshape, transpose/permute, dropout, contiguous, tensor slicing), whose
output of a quantized tensor is still on the quantizer's grid, to the producer.
All requests that reach the same producer share ONE quantizer, placed on the
producer's output and feeding exactly the consumers that asked for it (other
consumers keep the float tensor). A producer whose output is non-negative
(ReLU-like, sigmoid, softmax) gets an unsigned quantizer; others signed.
Integer and boolean tensors (token ids, masks) and constants (a parameter
added as a bias) are never activation-quantized, nor are float values computed
only from integer inputs and constants (the additive attention mask built from a
0/1 mask, ``fxcompress.integer_inputs``): an op combining one with an activation
(scores + mask) is not an integer op and runs in float.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.fx

from fxcompress.graph import get_attr_value
from fxcompress.integer_inputs import is_integer_derived, mark_integer_derived
from fxcompress.optable import Kind, OpKind, op_kind
from fxcompress.quantizers import QuantSpec, quantizer_at
from fxcompress.scopes import ScopeSet
from fxcompress.weights import WeightedOp, parameter_of

# the per-device table and the decision's data model live in their own modules; imported here
# (and re-exported) so that ``from .policy import DEVICE_RULES, QuantizationPoint, ...`` keeps working
from .device_rules import DEVICE_RULES, DeviceRules, InputRule
from .plan import ANNOTATION_KEY, QuantizationPlan, QuantizationPoint, annotations, node_label, readable_name

__all__ = ["ANNOTATION_KEY", "InputRule", "DeviceRules", "DEVICE_RULES", "GroupSettings", "Override",
           "QuantizationSettings", "QuantizationPoint", "QuantizationPlan", "plan_quantization",
           "annotations", "readable_name", "node_label"]


# ---------------------------------------------------------------------------
# Settings (resolved from the pass parameters)
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupSettings:
    """Defaults of one quantizer group ("weights" or "activations") plus its own scopes."""
    bits: int
    mode: str
    signed: bool | None          # None: decided by the placement (weights: signed)
    per_channel: bool
    narrow_range: bool
    ignored_scopes: ScopeSet
    target_scopes: ScopeSet

    def selects(self, paths: tuple) -> bool:
        paths = tuple(p for p in paths if p) or ("",)
        if self.ignored_scopes and any(self.ignored_scopes.matches(p) for p in paths if p):
            return False
        return not self.target_scopes or any(self.target_scopes.matches(p) for p in paths if p)


@dataclass(frozen=True)
class Override:
    """A ``scope_overrides`` entry: settings for the quantizers whose scopes it matches."""
    pattern: str
    scopes: ScopeSet
    values: Mapping[str, Any]     # mode / bits / signed / per_channel / initializer


@dataclass(frozen=True)
class QuantizationSettings:
    weights: GroupSettings
    activations: GroupSettings
    overrides: Mapping[str, tuple[Override, ...]]   # group -> overrides, in config order
    device: str
    rules: DeviceRules
    overflow_fix: str            # "enable" | "disable" | "first_layer_only"
    quantize_inputs: bool
    quantize_outputs: bool
    quantize_attention: bool = True   # quantizers on matmuls of two activations (attention)

    def override_for(self, group: str, scopes: tuple) -> dict:
        """Merged values of the overrides matching any of ``scopes`` (module paths or fx nodes; later
        entries win)."""
        merged: dict = {}
        for o in self.overrides.get(group, ()):
            if any(o.scopes.matches(s) for s in scopes if s):
                merged.update(o.values)
        return merged


def _is_float_tensor(node: torch.fx.Node) -> bool:
    dtype = node.meta.get("dtype")
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    if "dtype" in node.meta:  # known non-tensor (None, tuple of outputs)
        return False
    return True  # no metadata: assume a float tensor


def _is_tensor(node) -> bool:
    return isinstance(node, torch.fx.Node) and isinstance(node.meta.get("dtype"), torch.dtype)


def _dynamic_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes whose values depend on the model inputs' values (the rest are constants of the model).

    Shape queries (``x.size(1)``) do not make a result dynamic: ``pos_embedding[:x.size(1)]``
    is a slice of a parameter.
    """
    dynamic: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in dynamic and _carries_values(a) for a in node.all_input_nodes):
            dynamic.add(node)
    return dynamic


def _carries_values(node: torch.fx.Node) -> bool:
    """A tensor (or container of tensors), not a shape/int result."""
    return node.meta.get("dtype", torch.float32) is not None


def _input(node: torch.fx.Node, index: int, names: tuple[str, ...]):
    if index < len(node.args):
        return node.args[index]
    if index < len(names):
        return node.kwargs.get(names[index])
    return None


def _is_agnostic(node: torch.fx.Node, gm, rules: DeviceRules) -> bool:
    if node.op == "call_function" and node.target is operator.getitem:
        # Slicing a tensor keeps its grid; indexing a tuple (chunk/split outputs) is not a tensor op.
        return bool(node.args) and _is_tensor(node.args[0])
    return op_kind(node, gm) in rules.agnostic and bool(node.args) and _is_tensor(node.args[0])


def _only_feeds(node: torch.fx.Node, gm, kinds: frozenset, through: OpKind) -> bool:
    """Whether every path from ``node``'s output reaches an op of ``kinds``, passing only ops of kind ``through``."""
    users = list(node.users)
    if not users:
        return False
    for user in users:
        kind = op_kind(user, gm)
        if kind in kinds:
            continue
        if kind is through and _only_feeds(user, gm, kinds, through):
            continue
        return False
    return True


def _is_quantizer_node(node: torch.fx.Node, gm) -> bool:
    return quantizer_at(gm, node) is not None


def _resolve(node: torch.fx.Node, consumer: torch.fx.Node, gm, rules: DeviceRules):
    """Walk up from ``node`` (an input of ``consumer``) through agnostic ops.

    Returns ``(producer, edge_user)``: the tensor to quantize and its user on the
    path (the node whose input becomes the quantizer).
    """
    edge_user = consumer
    while _is_agnostic(node, gm, rules) and not _is_quantizer_node(node, gm):
        edge_user, node = node, node.args[0]
    return node, edge_user


@dataclass
class _Request:
    producer: torch.fx.Node
    edge_users: list
    serves: list
    reasons: list
    symmetric: bool = False
    # the second operand of a matmul of two activations whose first operand is not a softmax output
    # (q @ k^T): x86 kernels without VNNI saturate its int16 pair sums at 8 bits (docs/export.md, "Agreement")
    pair_saturating_rhs: bool = False


def _first_layer_ops(gm, weighted: list[WeightedOp]) -> set[torch.fx.Node]:
    """Weighted ops with no weighted op upstream (NNCF: the first convolutions)."""
    weighted_nodes = {op.node for op in weighted}
    behind: set[torch.fx.Node] = set()  # nodes downstream of some weighted op
    for node in gm.graph.nodes:
        if any(a in behind or a in weighted_nodes for a in node.all_input_nodes):
            behind.add(node)
    return {n for n in weighted_nodes if n not in behind}


def _weight_spec(settings: QuantizationSettings, override: dict, axis: int) -> QuantSpec:
    w = settings.weights
    mode = override.get("mode", w.mode)
    signed = override.get("signed", True if w.signed is None else w.signed)
    per_channel = override.get("per_channel", w.per_channel)
    return QuantSpec(bits=override.get("bits", w.bits), mode=mode,
                     signed=signed if mode == "symmetric" else False,
                     per_channel=per_channel, axis=axis if per_channel else None,
                     narrow_range=w.narrow_range and mode == "symmetric" and signed)


def _activation_spec(settings: QuantizationSettings, override: dict, nonnegative: bool,
                     force_symmetric: bool, ndim: int) -> tuple[QuantSpec, bool]:
    a = settings.activations
    mode = "symmetric" if force_symmetric else a.mode
    signed = a.signed
    fixed = signed is not None
    if "mode" in override:
        mode = override["mode"]
    if "signed" in override:
        signed, fixed = override["signed"], True
    if signed is None:
        signed = not nonnegative
    per_channel = override.get("per_channel", a.per_channel) and ndim >= 2
    spec = QuantSpec(bits=override.get("bits", a.bits), mode=mode,
                     signed=signed if mode == "symmetric" else False,
                     per_channel=per_channel, axis=1 if per_channel else None, narrow_range=False)
    return spec, fixed


def plan_quantization(gm: torch.fx.GraphModule, weighted: list[WeightedOp], settings: QuantizationSettings,
                      selects: Callable[[str], bool]) -> QuantizationPlan:
    """Decide the quantizers of ``gm`` and annotate them on the producer nodes.

    ``weighted``: the graph's conv/linear ops in functional form
    (``fxcompress.weights.weighted_ops``); ``selects(module_path)``: the pass's
    ``ignored_scopes`` / ``target_scopes``.
    """
    for node in gm.graph.nodes:
        node.meta.pop(ANNOTATION_KEY, None)
    planner = _Planner(gm, settings, selects)
    planner.weights(weighted)
    planner.model_inputs()
    planner.op_inputs({op.node for op in weighted})
    planner.model_outputs()
    return planner.finish()


class _Planner:
    """The state of one planning run: points decided, activation requests, what was skipped."""

    def __init__(self, gm: torch.fx.GraphModule, settings: QuantizationSettings, selects: Callable[[str], bool]):
        self.gm, self.settings, self.selects = gm, settings, selects
        self.rules = settings.rules
        self.points: list[QuantizationPoint] = []
        self.skipped: list[dict] = []
        self.requests: dict[torch.fx.Node, _Request] = {}
        self.weight_points: dict[torch.fx.Node, QuantizationPoint] = {}
        self.dynamic = _dynamic_nodes(gm)
        mark_integer_derived(gm)
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def skip(self, scope: str, reason: str):
        self.skipped.append({"scope": scope, "reason": reason})

    # -- weights ---------------------------------------------------------------
    def weights(self, weighted: list[WeightedOp]):
        first_layer = (_first_layer_ops(self.gm, weighted) if self.settings.overflow_fix == "first_layer_only"
                       else set())
        for op in weighted:
            path = op.module_path
            scope = path or readable_name(op.node, self.gm)
            if not self.selects(path):
                self.skip(scope, "excluded by ignored_scopes/target_scopes")
            elif not self.settings.weights.selects((path,)):
                self.skip(scope, "excluded by weights.ignored_scopes/target_scopes")
            elif op.weight_source is None:
                self.skip(scope, "the weight is computed, not a parameter")
            elif _is_quantizer_node(op.weight_input, self.gm):
                self.skip(scope, "the weight is already quantized")
            else:
                self.add_weight(op.weight_input, op.node, op.out_axis, path, readable_name(op.node, self.gm),
                                f"{op.kind.name} weight", first_layer=op.node in first_layer)

    def add_weight(self, source: torch.fx.Node, consumer: torch.fx.Node, axis: int, path: str, base: str,
                   reason: str, first_layer: bool = False):
        """One weight quantizer on ``source`` (shared by every op the same tensor feeds)."""
        point = self.weight_points.get(source)
        if point is not None:
            if point.spec.axis not in (None, axis):
                self.skip(path or base, f"shared weight needs channel axis {axis}, its quantizer uses "
                                        f"{point.spec.axis}")
                return
            point.consumers.append(consumer)
            point.serves.append(consumer)
            point.scopes = point.scopes + (path,)
            return
        override = self.settings.override_for("weights", (path,))
        spec = _weight_spec(self.settings, override, axis)
        fix = (self.rules.overflow_fix and spec.bits == 8 and spec.mode == "symmetric"
               and (self.settings.overflow_fix == "enable" or first_layer))
        if fix:
            spec = spec.with_bits(7)
        shape = source.meta.get("shape")
        if not isinstance(shape, tuple) and source.op == "get_attr":
            shape = tuple(get_attr_value(self.gm, source.target).shape)
        channels = int(shape[axis]) if spec.per_channel else 1
        point = QuantizationPoint("weights", source, [consumer], spec, channels, f"{base}_weight_quantizer",
                                  (path,), [consumer], [reason], overflow_fix=fix, signed_fixed=True,
                                  override=override)
        self.weight_points[source] = point
        self.points.append(point)

    def matmul_weight(self, node: torch.fx.Node, operand: torch.fx.Node, index: int) -> bool:
        """Quantize a 2-D parameter operand of a matmul as a weight; True when it was handled."""
        source = parameter_of(operand)
        shape = operand.meta.get("shape")
        if source is None or not _is_float_tensor(operand) or not isinstance(shape, tuple) \
                or len(shape) != 2:
            return False
        if _is_quantizer_node(operand, self.gm):
            return True
        path = node.meta.get("module_path", "")
        if not self.settings.weights.selects((path,)):
            self.skip(path or node.name, "matmul weight: excluded by weights.ignored_scopes/target_scopes")
            return True
        # [M, K] @ x: rows are the outputs; x @ [K, N]: columns (a [K, N] weight on axis 1: OpenVINO runs axis 0 in f32)
        self.add_weight(operand, node, 0 if index == 0 else 1, path, source.target.replace(".", "_"),
                        "matmul weight")
        self.weight_points[operand].name = f"{source.target.replace('.', '_')}_quantizer"
        return True

    # -- activations -------------------------------------------------------------
    def request(self, producer, edge_user, served, reason, rule: InputRule | None = None):
        req = self.requests.get(producer)
        if req is None:
            req = self.requests[producer] = _Request(producer, [], [], [])
        for items, item in ((req.edge_users, edge_user), (req.serves, served), (req.reasons, reason)):
            if item not in items:
                items.append(item)
        if rule is not None:
            req.symmetric |= rule.symmetric

    def model_inputs(self):
        if not self.settings.quantize_inputs:
            return
        for ph in (n for n in self.gm.graph.nodes if n.op == "placeholder"):
            if not _is_float_tensor(ph):
                self.skip(ph.name, f"model input of dtype {ph.meta.get('dtype')} is not quantized")
                continue
            for user in ph.users:
                if user.meta.get("dtype", torch.float32) is None:
                    continue  # a shape query (x.size(1)) reads no values
                self.request(ph, user, user, "model input")

    def op_inputs(self, weighted_nodes: set):
        for node in self.gm.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            if node.meta.get("inserted_by") or _is_quantizer_node(node, self.gm):
                continue
            kind = op_kind(node, self.gm)
            rule = self.rules.inputs.get(kind)
            if rule is not None:
                self.op_request(node, kind, rule, node in weighted_nodes)

    def op_request(self, node: torch.fx.Node, kind: OpKind, rule: InputRule, weighted: bool):
        path = node.meta.get("module_path", "")
        scope = path or node_label(node)
        if not self.selects(node):  # the node: NNCF operation scopes (Inception3/__add___0) name it
            if not weighted:  # a weighted op's exclusion is already listed
                self.skip(scope, f"{rule.reason}: excluded by ignored_scopes/target_scopes")
            return
        if not self.settings.activations.selects((node,)):
            self.skip(scope, f"{rule.reason}: excluded by activations.ignored_scopes/target_scopes")
            return
        inputs = [_input(node, i, rule.names) for i in rule.inputs]
        if rule.all_dynamic:
            if kind is Kind.matmul and len(inputs) == 2:
                consts = [i for i, x in enumerate(inputs) if isinstance(x, torch.fx.Node) and x not in self.dynamic]
                if len(consts) == 1 and self.matmul_weight(node, inputs[consts[0]], consts[0]):
                    inputs = [inputs[1 - consts[0]]]
            resolved = [_resolve(x, node, self.gm, self.rules)[0] if isinstance(x, torch.fx.Node) else None
                        for x in inputs]
            mask = next((x for x in resolved if x is not None and is_integer_derived(x) and _is_float_tensor(x)), None)
            if len(inputs) > 1 and mask is not None:
                self.skip(scope, f"{rule.reason}: '{mask.name}' is computed only from integer inputs (an "
                                 "attention mask): the op runs in float")
                return
            if len(inputs) > 1 and not all(x is not None and x in self.dynamic and _is_float_tensor(x)
                                           for x in resolved):
                return  # a bias add / scaling by a constant: not an integer op
            if kind is Kind.matmul and len(inputs) > 1 and not self.settings.quantize_attention:
                self.skip(scope, f"{rule.reason}: a matmul of two activations and quantize_attention is false")
                return
        if rule.skip_if_feeding and _only_feeds(node, self.gm, rule.skip_if_feeding, kind):
            self.skip(scope, f"{rule.reason}: its result only feeds {'/'.join(sorted(k.name for k in rule.skip_if_feeding))} "
                             f"(directly or through {kind.name}s), which run in float")
            return
        unbounded_lhs = False
        for index, x in enumerate(inputs):
            if not isinstance(x, torch.fx.Node):
                continue
            producer, edge_user = _resolve(x, node, self.gm, self.rules)
            if kind is Kind.matmul and len(inputs) == 2 and index == 0:
                unbounded_lhs = not is_softmax_output(producer, self.gm)
            if not _is_float_tensor(producer):
                self.skip(scope, f"{rule.reason} '{producer.name}' has dtype {producer.meta.get('dtype')}: "
                                 "not quantized")
            elif producer not in self.dynamic:
                self.skip(scope, f"{rule.reason} '{producer.name}' is a constant of the model")
            elif is_integer_derived(producer):
                self.skip(scope, f"{rule.reason} '{producer.name}' is computed only from integer inputs and "
                                 "constants (an attention mask, position ids): not quantized")
            elif _is_quantizer_node(producer, self.gm):
                continue  # already quantized (an earlier quantization pass)
            elif producer.op == "placeholder" and not self.settings.quantize_inputs:
                self.skip(scope, f"{rule.reason} is model input '{producer.name}' and quantize_inputs is false")
            else:
                self.request(producer, edge_user, node, rule.reason, rule)
                if index == 1 and unbounded_lhs:
                    self.requests[producer].pair_saturating_rhs = True

    def model_outputs(self):
        if not self.settings.quantize_outputs:
            return
        output = next(n for n in self.gm.graph.nodes if n.op == "output")
        for x in output.all_input_nodes:
            if _is_float_tensor(x) and x in self.dynamic and not is_integer_derived(x) \
                    and not _is_quantizer_node(x, self.gm):
                self.request(x, output, output, "model output")

    # -- result ------------------------------------------------------------------
    def finish(self) -> QuantizationPlan:
        requests = list(self.requests.values())
        if not self.points and all(set(r.reasons) <= {"model input", "model output"} for r in requests):
            requests = []  # nothing runs in integers: quantizing only inputs/outputs buys nothing
        for req in sorted(requests, key=lambda r: self.order[r.producer]):
            self.points.append(_activation_point(self.gm, req, self.settings, self.order))
        self.points.sort(key=lambda p: self.order[p.producer])
        for point in self.points:
            point.producer.meta.setdefault(ANNOTATION_KEY, []).append(point)
        unique = list({(s["scope"], s["reason"]): s for s in self.skipped}.values())
        return QuantizationPlan(self.points, unique)


def is_softmax_output(node, gm) -> bool:
    """Whether ``node`` is a softmax output (attention probabilities), looking through dropout."""
    while isinstance(node, torch.fx.Node) and op_kind(node, gm) in (Kind.dropout, Kind.identity):
        node = node.args[0] if node.args else None
    return isinstance(node, torch.fx.Node) and op_kind(node, gm) is Kind.softmax


# Kinds whose output is non-negative when their (first / every) tensor input is.
_KEEPS_SIGN = frozenset({Kind.max_pool, Kind.avg_pool, Kind.mean, Kind.flatten, Kind.reshape, Kind.transpose,
                         Kind.dropout, Kind.identity})
_ALL_INPUTS_NONNEG = frozenset({Kind.cat, Kind.add, Kind.mul})


def _nonnegative(node, gm, rules: DeviceRules, memo: dict) -> bool:
    """Whether ``node``'s output can never be negative (ReLU-like producers and what keeps their sign)."""
    if node in memo:
        return memo[node]
    memo[node] = False
    kind = op_kind(node, gm)
    result = False
    if kind is not None and (kind in rules.nonnegative or "relu_like" in kind.tags):
        result = True
    elif node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
        result = _is_tensor(node.args[0]) and _nonnegative(node.args[0], gm, rules, memo)
    elif kind in _KEEPS_SIGN:
        result = bool(node.args) and isinstance(node.args[0], torch.fx.Node) and \
            _nonnegative(node.args[0], gm, rules, memo)
    elif kind in _ALL_INPUTS_NONNEG:
        inputs = node.all_input_nodes
        result = bool(inputs) and all(_nonnegative(x, gm, rules, memo) for x in inputs if _is_tensor(x))
    memo[node] = result
    return result


def _activation_point(gm, req: _Request, settings: QuantizationSettings, order: dict) -> QuantizationPoint:
    producer = req.producer
    rules = settings.rules
    kind = op_kind(producer, gm)
    nonnegative = _nonnegative(producer, gm, rules, {})
    scopes = tuple(dict.fromkeys([s.meta.get("module_path", "") for s in req.serves if s.op != "output"]
                                 + [producer.meta.get("module_path", "")]))
    # matched on the nodes: NNCF operation scopes ({re}.*/__add___0) name them, module scopes their paths
    override = settings.override_for("activations", tuple(s for s in req.serves if s.op != "output") + (producer,))
    shape = producer.meta.get("shape")
    ndim = len(shape) if isinstance(shape, tuple) else 0
    spec, fixed = _activation_spec(settings, override, nonnegative, req.symmetric, ndim)
    # Q.K^T: without VNNI, x86 runtimes multiply q (shifted to u8 when signed) by k in u8 x s8 pairs summed
    # in int16; k at its 8-bit ends saturated them (126 output steps in OpenVINO). 7 bits keep every pair
    # sum within 2 * 255 * 64, as the overflow fix does for weights. (Softmax outputs as the first operand
    # need none: probabilities sum to at most 1.)
    overflow_fix = (req.pair_saturating_rhs and rules.overflow_fix and settings.overflow_fix == "enable"
                    and spec.bits == 8 and spec.signed and spec.mode == "symmetric" and "bits" not in override)
    if overflow_fix:
        spec = spec.with_bits(7)
    channels = int(shape[1]) if spec.per_channel else 1
    # Edge users in graph order (the quantizer feeds them; other users keep the float tensor).
    users = sorted(req.edge_users, key=lambda n: order[n])
    if producer.op == "placeholder":
        base = f"{producer.name}_input"
    elif len(req.serves) == 1 and not (kind is not None and (kind.tags & {"activation", "relu_like"}
                                                             or kind in rules.nonnegative)) \
            and req.serves[0].op != "output":
        base = f"{readable_name(req.serves[0], gm)}_input"
    else:
        base = f"{readable_name(producer, gm)}_output"
    return QuantizationPoint("activations", producer, users, spec, channels, f"{base}_quantizer", scopes,
                             list(req.serves), list(req.reasons), overflow_fix=overflow_fix, signed_fixed=fixed,
                             override=override)
