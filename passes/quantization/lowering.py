"""Lowering of a quantized graph into the form that exports as an ONNX QDQ model.

Run by ``ctrl.lower()`` / ``ctrl.strip()`` / ``ctrl.export_onnx()`` on a deep
copy of the trained graph, in ``fxcompress.lowering.LoweringPhase`` order (after masks and pruning):

1. ``FoldBatchNorm`` (``LoweringPhase.FOLD_BATCH_NORM``): ``conv -> BatchNorm`` (eval, running stats)
   becomes one conv with new weight and bias tensors (never written in place).
   When the conv's weight goes through a weight quantizer, the quantizer is
   frozen to integers ``q`` with per-output-channel ``scale`` and the BN factor
   ``f = gamma / sqrt(var + eps)`` goes into the scale: ``scale' = |f| * scale``,
   with the integers negated where ``f < 0`` (reflected inside ``[qmin, qmax]``
   for asymmetric ranges). So ``(q' - zp') * scale' == f * (q - zp) * scale``:
   the folded model equals the fake-quantized one up to float rounding, and a
   per-tensor weight quantizer becomes a per-channel integer weight. The one
   case that cannot stay exact, a symmetric full range with ``q == qmin`` in a
   channel with ``f < 0`` (``-qmin`` does not fit), keeps that BatchNorm.
   A BatchNorm after a conv without a quantizer is folded in float.
2. ``LowerQuantizers`` (``LoweringPhase.LOWER_QUANTIZERS``): every ``FakeQuantizer`` becomes an export op
   of ``fxcompress.export``: a quantizer on a weight (its input is a
   parameter) becomes integer buffers ``<name>_q`` (int8, or uint8 for
   unsigned ranges, whatever the bit width) + ``scale`` + ``zero_point`` read by
   ``dequantize_weight``; a quantizer on an activation becomes
   ``quantize_dequantize`` with its scale and integer zero point as buffers. A
   disabled quantizer is removed.

Afterwards the float weights that nothing reads any more are dropped (set to
None on their module), so the exported file holds only the integer weights.

Metadata: a lowered node takes over ``shape``/``dtype``/``module_path`` of the
quantizer node it replaces and its name; ``inserted_by`` names the lowering pass.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

from fxcompress.bn_folding import (BatchNormFold, find_batch_norm_folds, remove_folded_batch_norm, set_bias_arg,
                                   warn_not_folded)
from fxcompress.errors import PassError
from fxcompress.export import SIGNED_TO_UNSIGNED, storage_dtype
from fxcompress.graph import copy_meta, get_attr_value, tensor_attr, unique_name
from fxcompress.lowering import LoweringPhase
from fxcompress.optable import Kind, op_kind
from fxcompress.pass_manager import Pass, PassContext, PassResult
from fxcompress.quantizers import FakeQuantizer, quantizer_at
from fxcompress.weights import functionalize_weighted

from .avg_pool_padding import WriteOutAvgPoolPadding

__all__ = ["IntegerWeight", "freeze_weight", "fold_channel_factor", "FoldBatchNorm", "LowerQuantizers",
           "quantization_lowering_passes", "drop_unused_tensors"]

BN_FOLD_ORDER = LoweringPhase.FOLD_BATCH_NORM
QUANTIZER_LOWERING_ORDER = LoweringPhase.LOWER_QUANTIZERS

_DEQUANTIZE_WEIGHT = torch.ops.fxcompress.dequantize_weight.default
_QUANTIZE_DEQUANTIZE = torch.ops.fxcompress.quantize_dequantize.default


# ---------------------------------------------------------------------------
# integer weights
# ---------------------------------------------------------------------------

@dataclass
class IntegerWeight:
    """A weight as integers: ``value = (q - zero_point) * scale`` (per channel on ``axis``)."""
    q: torch.Tensor            # int64, values in [quant_min, quant_max]
    scale: torch.Tensor        # float32: 0-d (per tensor) or [C] (per channel on axis)
    zero_point: torch.Tensor   # int64, same shape as scale
    quant_min: int
    quant_max: int
    axis: int | None

    def dequantize(self) -> torch.Tensor:
        return torch.ops.fxcompress.dequantize_weight(*self.export_tensors(), self.quant_min, self.quant_max,
                                                      self.axis)

    def export_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, scale, zero_point)`` in their stored types (int8/uint8, float32, int8/uint8)."""
        dtype = storage_dtype(self.quant_min, self.quant_max)
        return self.q.to(dtype), self.scale.to(torch.float32).contiguous(), self.zero_point.to(dtype)


def _broadcast(t: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


@torch.no_grad()
def freeze_weight(quantizer: FakeQuantizer, weight: torch.Tensor, name: str = "weight") -> IntegerWeight:
    """The integers a weight quantizer produces for ``weight``, read off its own output.

    Running the quantizer itself (the op library's kernel) and dividing by its
    scale keeps the integers exactly those the trained graph used.
    """
    weight = weight.detach().to(torch.float32)
    axis = quantizer.axis
    if axis is not None and axis < 0:
        axis += weight.dim()
    scale = quantizer.effective_scale().detach().to(torch.float32).reshape(-1)
    zero_point = quantizer.zero_point.detach().to(torch.float32).round().reshape(-1)
    if axis is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    out = quantizer(weight)
    s, zp = _broadcast(scale, weight.dim(), axis), _broadcast(zero_point, weight.dim(), axis)
    q = torch.round(out / s) + zp
    back = (q - zp) * s
    if not torch.allclose(back, out, rtol=1e-5, atol=1e-6 * float(s.abs().max())):
        raise PassError(f"weight quantizer of {name}: its output is not on the integer grid of its "
                        f"scale/zero point (max error {float((back - out).abs().max()):.3g}); "
                        f"it cannot be lowered to integer weights")
    q = q.clamp(quantizer.quant_min, quantizer.quant_max).to(torch.int64)
    return IntegerWeight(q, scale, zero_point.to(torch.int64), quantizer.quant_min, quantizer.quant_max, axis)


def fold_channel_factor(w: IntegerWeight, factor: torch.Tensor, axis: int = 0) -> IntegerWeight | None:
    """The integer weight whose values are ``factor[c] * w`` per channel ``c`` of ``axis``, exactly.

    ``scale' = |f| * scale``; where ``f < 0`` the integers are negated around the
    zero point: symmetric ranges (zero point 0) negate ``q`` (None if some
    ``-q`` falls outside the range, e.g. ``-qmin`` of a full int8 range);
    asymmetric ones reflect ``q' = qmin + qmax - q`` with ``zp' = qmin + qmax - zp``.
    Where ``f == 0`` the channel becomes zeros.
    """
    channels = w.q.shape[axis]
    factor = factor.to(torch.float64).reshape(-1)
    if factor.numel() != channels:
        raise ValueError(f"{factor.numel()} factors for {channels} channels")
    if w.axis is not None and w.axis != axis:
        return None
    scale = w.scale.to(torch.float64).reshape(-1).expand(channels).clone()
    zero_point = w.zero_point.reshape(-1).expand(channels).clone()
    q = w.q.clone()
    view = [1] * q.dim()
    view[axis] = -1
    negative = factor < 0
    symmetric = bool((zero_point == 0).all())
    if negative.any():
        neg = negative.reshape(view)
        if symmetric:
            negated = torch.where(neg, -q, q)
            if negated.min() < w.quant_min or negated.max() > w.quant_max:
                return None
            q = negated
        else:
            total = w.quant_min + w.quant_max
            q = torch.where(neg, total - q, q)
            zero_point = torch.where(negative, total - zero_point, zero_point)
    zero = factor == 0
    if zero.any():
        q = torch.where(zero.reshape(view), zero_point.reshape(view), q)
    new_scale = torch.where(zero, scale, scale * factor.abs()).to(torch.float32)
    return IntegerWeight(q, new_scale, zero_point, w.quant_min, w.quant_max, axis)


# ---------------------------------------------------------------------------
# graph helpers
# ---------------------------------------------------------------------------

def _register_tensor(gm: torch.fx.GraphModule, base: str, tensor: torch.Tensor, parameter: bool = False) -> str:
    name = unique_name(gm, base)
    if parameter:
        gm.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
    else:
        gm.register_buffer(name, tensor)
    return name


def _integer_weight_node(gm: torch.fx.GraphModule, w: IntegerWeight, base: str, before: torch.fx.Node,
                         inserted_by: str) -> torch.fx.Node:
    q, scale, zero_point = w.export_tensors()
    graph = gm.graph
    with graph.inserting_before(before):
        attrs = [graph.get_attr(_register_tensor(gm, f"{base}_{role}", t))
                 for role, t in (("q", q), ("scale", scale), ("zero_point", zero_point))]
        node = graph.call_function(_DEQUANTIZE_WEIGHT, (*attrs, w.quant_min, w.quant_max, w.axis))
    node.meta.update({"shape": tuple(q.shape), "dtype": torch.float32, "inserted_by": inserted_by})
    return node


def _base_name(node: torch.fx.Node) -> str:
    path = node.meta.get("module_path") or node.name
    return path.replace(".", "_")


def drop_unused_tensors(gm: torch.fx.GraphModule) -> list[str]:
    """Erase unread ``get_attr`` nodes, unused submodules, and parameters/buffers nothing reads.

    A parameter is read when a ``get_attr`` names it or a ``call_module`` calls
    its module (or a parent). Unread ones are set to None on their module (so
    ``print(module)`` still works); torch.export would otherwise carry them into
    the ONNX file as fp32 initializers. Returns the names dropped.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    gm.delete_all_unused_submodules()
    read = {n.target for n in graph.nodes if n.op in ("get_attr", "call_module")}

    def is_read(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in read for i in range(1, len(parts) + 1))

    dropped = []
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if is_read(name):
            continue
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if leaf in owner._parameters:
            owner.register_parameter(leaf, None)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = None
        dropped.append(name)
    return dropped


_quantizer_of = quantizer_at


# ---------------------------------------------------------------------------
# passes
# ---------------------------------------------------------------------------

class FoldBatchNorm(Pass):
    """Fold eval BatchNorm into the preceding conv, exactly, through its weight quantizer."""
    name = "fold_batch_norm"
    lowering_order = BN_FOLD_ORDER
    preserves_outputs = True
    _KINDS = (Kind.conv, Kind.conv_transpose)

    def __init__(self):
        self.folded: list[dict] = []
        self.skipped: list[dict] = []

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        self.folded, self.skipped = [], []
        functionalized = functionalize_weighted(gm, kinds=self._KINDS) > 0
        folds, self.skipped = find_batch_norm_folds(gm, self._KINDS, eval_only=True)
        for fold in folds:
            reason = self._fold(gm, fold)
            conv = fold.op.node
            if reason:
                self.skipped.append({"scope": fold.scope, "node": fold.bn_node.name, "conv": conv.name,
                                     "reason": reason})
            else:
                self.folded.append({"scope": fold.scope, "conv": conv.meta.get("module_path", conv.name)})
        # Not folding is exact (the BatchNorm stays in the graph, a BatchNormalization in the file), but
        # ONNX Runtime then runs that conv in float (its QDQ fusion needs conv -> QuantizeLinear).
        warn_not_folded(self.skipped, "at export", "it stays a BatchNorm in the export (exact)")
        if self.folded:
            drop_unused_tensors(gm)
        return PassResult(gm, bool(self.folded) or functionalized)

    def _fold(self, gm, fold: BatchNormFold) -> str | None:
        """Fold one pair through the conv's weight quantizer (if any); returns why not, or None when folded."""
        op = fold.op
        conv = op.node
        edge = weight_in = op.weight_input
        quantizer = _quantizer_of(gm, weight_in)
        if quantizer is not None and not quantizer.enabled:
            weight_in, quantizer = weight_in.args[0], None
        if quantizer is not None and len(weight_in.users) != 1:
            return "the weight quantizer is shared with another op"
        source = weight_in.args[0] if quantizer is not None else weight_in
        weight = tensor_attr(gm, source)
        if weight is None:
            return f"the weight edge holds {weight_in.format_node()[:60]!r}, not a weight (quantizer)"
        if fold.groups != 1 and quantizer is not None:
            # Output channel g * (O/g) + j is weight column j of group g: one per-channel weight scale
            # (axis 1, O/g entries) serves every group, so a factor per output channel cannot go into it.
            return ("BatchNorm kept: after a grouped transposed conv with a weight quantizer, the output "
                    "channels are not one weight axis (its scales are shared by the groups)")

        base = _base_name(conv)
        graph = gm.graph
        if quantizer is not None:
            frozen = freeze_weight(quantizer, weight, name=base)
            folded = fold_channel_factor(frozen, fold.factor, axis=op.out_axis)
            if folded is None:
                return ("BatchNorm kept: a negative BN factor meets the lowest integer of a symmetric "
                        "full range, whose negation does not fit")
            new_weight = _integer_weight_node(gm, folded, f"{base}_weight", conv, self.name)
        else:
            w = fold.folded_weight(weight)
            with graph.inserting_before(conv):
                new_weight = graph.get_attr(_register_tensor(gm, f"{base}_weight_folded", w, parameter=True))
            new_weight.meta.update({"shape": tuple(w.shape), "dtype": w.dtype, "inserted_by": self.name})
        new_bias = fold.folded_bias()
        with graph.inserting_before(conv):
            new_bias_node = graph.get_attr(_register_tensor(gm, f"{base}_bias_folded", new_bias, parameter=True))
        new_bias_node.meta.update({"shape": tuple(new_bias.shape), "dtype": new_bias.dtype,
                                   "inserted_by": self.name})

        conv.update_arg(op.kind.weight_arg, new_weight)
        set_bias_arg(conv, new_bias_node)
        remove_folded_batch_norm(gm, fold)
        if edge.op == "call_module" and not edge.users:  # the frozen (or disabled) weight quantizer
            graph.erase_node(edge)
        return None


# Ops that only move or select values: a quantized tensor's values stay on its grid through them.
_SHAPE_KINDS = frozenset({Kind.flatten, Kind.reshape, Kind.transpose, Kind.dropout, Kind.identity})
# Consumers OpenVINO runs in int8 only with signed activations: matmuls of two activations
# (q @ k^T). scaled_dot_product_attention is not here: the exporter decomposes it with reshapes
# and a Mul between its inputs and the MatMul, so its inputs are never int8 MatMul operands.
_SIGNED_CONSUMERS = frozenset({Kind.matmul})


def _is_shape_op_on(node: torch.fx.Node, tensor: torch.fx.Node, gm) -> bool:
    """``node`` reshapes/permutes/slices ``tensor`` (its first argument)."""
    if not node.args or node.args[0] is not tensor:
        return False
    if node.op == "call_function" and node.target is operator.getitem:
        return True  # slicing a tensor (tuples of chunk/split outputs are not quantizer outputs)
    return op_kind(node, gm) in _SHAPE_KINDS


def _reads_values(node: torch.fx.Node) -> bool:
    """Not a shape query: ``x.size()`` (a symbolic size the tracer recorded) reads no values of ``x``."""
    return node.meta.get("dtype", torch.float32) is not None


def _consumers(gm, node: torch.fx.Node) -> list[torch.fx.Node]:
    """The users of ``node``'s values, looking through shape ops."""
    out = []
    for user in node.users:
        if _is_shape_op_on(user, node, gm):
            out += _consumers(gm, user)
        elif _reads_values(user):
            out.append(user)
    return out


def _feeds_only_activation_matmuls(gm, node: torch.fx.Node) -> bool:
    consumers = _consumers(gm, node)
    return bool(consumers) and all(op_kind(c, gm) in _SIGNED_CONSUMERS for c in consumers)


# Consumers that read an int8 activation QDQ directly in both runtimes: ONNX Runtime loads it
# (shape ops are what break its default session) and OpenVINO compiles a residual Add's signed
# input or a conv's signed input as i8 (NNCF's form), where a uint8 grid with zero point 128
# compiles as u8 with a zero-point shift (docs/export.md, "runtime graph against NNCF's").
_INT8_READERS = frozenset({Kind.conv, Kind.add})


def _read_only_by_convs_and_adds(node: torch.fx.Node, gm) -> bool:
    return bool(node.users) and all(op_kind(u, gm) in _INT8_READERS for u in node.users)


def _requantize_after_shape_ops(gm: torch.fx.GraphModule, qdq: torch.fx.Node):
    """Give the consumers behind shape ops their own int8 QDQ; the shape ops read the same grid as uint8.

    ``matmul(view(QDQ_s8(x)))`` becomes ``matmul(QDQ_s8(view(QDQ_u8(x))))``: the same values (a
    shape op moves values; a second QDQ of the same grid is the identity). ONNX Runtime cannot
    load an int8 QDQ ahead of a shape op (its QDQ propagation, docs/export.md), OpenVINO runs the
    matmul in int8 only with the signed QDQ at its input, and the uint8 QDQ at the producer keeps
    OpenVINO from moving per-channel weight dequantization through the shape ops (which failed
    to compile for a one-token sequence).
    """
    if not any(_is_shape_op_on(u, qdq, gm) for u in qdq.users):
        return
    x, scale, zp, qmin, qmax, axis = qdq.args
    graph = gm.graph

    def visit(node: torch.fx.Node):
        for user in list(node.users):
            if not _is_shape_op_on(user, node, gm):
                continue
            consumers = [u for u in user.users if not _is_shape_op_on(u, user, gm) and _reads_values(u)]
            if consumers:
                with graph.inserting_after(user):
                    signed = graph.call_function(_QUANTIZE_DEQUANTIZE, (user, scale, zp, qmin, qmax, axis))
                copy_meta(user, signed, LowerQuantizers.name)
                for consumer in consumers:
                    consumer.replace_input_with(user, signed)
            visit(user)

    visit(qdq)
    unsigned = (get_attr_value(gm, zp.target).to(torch.int16) + SIGNED_TO_UNSIGNED).to(torch.uint8)
    with graph.inserting_before(qdq):
        unsigned_zp = graph.get_attr(_register_tensor(gm, f"{zp.target}_uint8", unsigned))
    unsigned_zp.meta.update({"shape": tuple(unsigned.shape), "dtype": torch.uint8})
    qdq.args = (x, scale, unsigned_zp, qmin + SIGNED_TO_UNSIGNED, qmax + SIGNED_TO_UNSIGNED, axis)


class LowerQuantizers(Pass):
    """Every FakeQuantizer becomes an export op: integer weights, or a frozen activation QDQ."""
    name = "lower_quantizers"
    lowering_order = QUANTIZER_LOWERING_ORDER
    preserves_outputs = True

    def __init__(self):
        self.lowered: list[dict] = []

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        self.lowered = []
        graph = gm.graph
        for node in list(graph.nodes):
            quantizer = _quantizer_of(gm, node)
            if quantizer is None:
                continue
            source = node.args[0]
            if not quantizer.enabled:
                node.replace_all_uses_with(source)
                graph.erase_node(node)
                self.lowered.append({"quantizer": node.target, "as": "removed (disabled)"})
                continue
            weight = tensor_attr(gm, source)
            if weight is not None:
                frozen = freeze_weight(quantizer, weight, name=node.target)
                new = _integer_weight_node(gm, frozen, source.target.replace(".", "_"), node, self.name)
                kind = f"{storage_dtype(frozen.quant_min, frozen.quant_max)} weight"
            else:
                new = self._activation(gm, quantizer, node)
                kind = f"QuantizeLinear/DequantizeLinear ({new.args[2].meta['dtype']})"
            copy_meta(node, new, self.name)
            name = node.name
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            new.name = name
            if new.target is _QUANTIZE_DEQUANTIZE and new.args[2].meta["dtype"] == torch.int8:
                _requantize_after_shape_ops(gm, new)
            self.lowered.append({"quantizer": name, "as": kind, "bits": quantizer.spec.bits,
                                 "range": [quantizer.quant_min, quantizer.quant_max]})
        if self.lowered:
            drop_unused_tensors(gm)
        return PassResult(gm, bool(self.lowered))

    def _activation(self, gm, quantizer: FakeQuantizer, node: torch.fx.Node) -> torch.fx.Node:
        qmin, qmax = quantizer.quant_min, quantizer.quant_max
        scale = quantizer.effective_scale().detach().to(torch.float32).reshape(-1)
        zero_point = quantizer.zero_point.detach().round()
        if qmin < 0 and not (quantizer.axis is None and (_feeds_only_activation_matmuls(gm, node)
                                                         or _read_only_by_convs_and_adds(node, gm))):
            # A signed grid written as uint8, every integer shifted by 128 (a symmetric int8
            # activation is uint8 with zero point 128): the same values, and the form ONNX
            # Runtime's own quantization tool writes. int8 activations next to shape ops break
            # ORT's default session (docs/export.md, "ONNX Runtime"). Operands of activation
            # matmuls / attention stay int8: OpenVINO runs those in int8 only with signed inputs;
            # so do inputs read only by convs and residual adds (OpenVINO then compiles NNCF's graph).
            qmin, qmax, zero_point = qmin + SIGNED_TO_UNSIGNED, qmax + SIGNED_TO_UNSIGNED, \
                zero_point + SIGNED_TO_UNSIGNED
        dtype = storage_dtype(qmin, qmax)
        if zero_point.min() < torch.iinfo(dtype).min or zero_point.max() > torch.iinfo(dtype).max:
            raise PassError(f"{node.target}: zero point outside the {dtype} range, cannot export")
        zero_point = zero_point.to(dtype).reshape(-1)
        axis = quantizer.axis
        if axis is None:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        elif axis < 0 and isinstance(node.meta.get("shape"), tuple):
            axis += len(node.meta["shape"])
        graph = gm.graph
        with graph.inserting_before(node):
            s = graph.get_attr(_register_tensor(gm, f"{node.target}_scale", scale))
            zp = graph.get_attr(_register_tensor(gm, f"{node.target}_zero_point", zero_point))
            zp.meta.update({"shape": tuple(zero_point.shape), "dtype": dtype})
            return graph.call_function(_QUANTIZE_DEQUANTIZE, (node.args[0], s, zp, qmin, qmax, axis))


def quantization_lowering_passes() -> list[Pass]:
    """The lowering passes of quantization, for ``ControllerPart.lowering_passes()``."""
    return [FoldBatchNorm(), LowerQuantizers(), WriteOutAvgPoolPadding()]
