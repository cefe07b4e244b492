"""Lowering binarizers for ``strip()`` / ``export_onnx()``: plain tensors and standard ops only.

Runs at ``LoweringPhase.LOWER_BINARIZERS`` (after mask folding, BN folding and
quantizer lowering), on ``ctrl.lower()``'s deep copy, in eval mode:

- an enabled ``WeightBinarizer`` is folded: its output ``sign(w) * m`` is
  computed once (by the same op as in training, so the values are identical)
  and becomes a new tensor. Where the parameter is read only through
  binarizers (the usual case) it replaces the parameter under the same name
  (``conv2.weight`` holds ``+-m``); otherwise it becomes a new attribute
  ``<module>.<name>_binarized``. The ONNX file then holds the ``+-m`` constants.
- an enabled ``ActivationBinarizer`` becomes

      where(x > T, S, 0)       T: buffer [1, C, 1, ...] = tau * S (float32, as the op computes it)
                               S: 0-d buffer

  which exports as ONNX ``Greater`` + ``Where``: standard ops that ONNX
  Runtime and OpenVINO both read, and exact (the comparison and the selected
  values are the training op's). docs/binarization.md says why not QDQ or
  OpenVINO's ``FakeQuantize(levels=2)``.
- a disabled binarizer is an identity and is removed.

``export_form="qdq"`` (``Binarization(export_form="qdq")``) lowers instead to
the integer form OpenVINO executes as a u8 x i8 convolution:

- weights: int8 ``+-1`` buffers ``<param>_sign`` read by the export op
  ``dequantize_weight`` with scale ``m`` (per output channel for XNOR, one for
  DoReFa): ONNX ``DequantizeLinear`` on an int8 initializer, equal to ``+-m``;
- activations: the export op ``binary_activation_qdq`` below, in PyTorch the
  same ``where(x > T, S, 0)``, in ONNX ``Min(x, 2T) -> QuantizeLinear(scale 2T
  per channel, uint8) -> DequantizeLinear(scale S)``: the two levels ``{0, 1}``
  of a uint8 tensor. ONNX Runtime divides by the scale, which is exact (``x / 2T``
  rounds half to even to 1 exactly when ``x > T``); OpenVINO multiplies by a
  reciprocal, so inputs within a few ulps of ``T`` may land on the other side.

Metadata: a lowered node takes over the replaced node's ``shape``/``dtype``/
``module_path``; ``inserted_by`` names this pass.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

from fxcompress.export import register_onnx_translation
from fxcompress.graph import copy_meta, get_attr_value, inserted_modules, read_only_through, unique_name
from fxcompress.lowering import LoweringPhase
from fxcompress.pass_manager import Pass, PassContext, PassResult

from .modules import ActivationBinarizer, WeightBinarizer

__all__ = ["LowerBinarizers", "BINARIZATION_LOWERING_ORDER", "EXPORT_FORMS", "binary_activation_qdq"]

BINARIZATION_LOWERING_ORDER = LoweringPhase.LOWER_BINARIZERS
EXPORT_FORMS = ("where", "qdq")


# ---------------------------------------------------------------------------
# the export op of the integer form
# ---------------------------------------------------------------------------

def _per_channel(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.reshape([1, -1] + [1] * (rank - 2))


@torch.library.custom_op("fxcompress::binary_activation_qdq", mutates_args=())
def binary_activation_qdq(x: torch.Tensor, step: torch.Tensor, step_zero_point: torch.Tensor, scale: torch.Tensor,
                          zero_point: torch.Tensor) -> torch.Tensor:
    """``scale if x > step / 2 else 0`` per channel (dim 1): a frozen activation binarizer whose
    threshold is ``T = step / 2`` (exact: halving a float). Exported as a two-level uint8 QDQ."""
    t = _per_channel(step.float() / 2, x.dim())
    return torch.where(x.float() > t, scale.float(), torch.zeros((), device=x.device)).to(x.dtype)


@binary_activation_qdq.register_fake
def _(x, step, step_zero_point, scale, zero_point):
    return torch.empty_like(x)


def _binary_activation_qdq_onnx(x, step, step_zero_point, scale, zero_point):
    from onnxscript import opset21 as op
    rank = len(x.shape) if x.shape is not None else None
    if rank is None:
        raise ValueError("binary_activation_qdq: the input's rank must be known to export it")
    shape = op.Constant(value_ints=[1, -1] + [1] * (rank - 2))
    clipped = op.Min(x, op.Reshape(step, shape))  # so that round(x / step) <= 1: two levels
    q = op.QuantizeLinear(clipped, step, step_zero_point, axis=1)
    return op.DequantizeLinear(q, scale, zero_point)


register_onnx_translation(torch.ops.fxcompress.binary_activation_qdq.default, _binary_activation_qdq_onnx)


class LowerBinarizers(Pass):
    name = "lower_binarizers"
    preserves_outputs = True
    lowering_order = BINARIZATION_LOWERING_ORDER

    def __init__(self, export_form: str = "where"):
        if export_form not in EXPORT_FORMS:
            raise ValueError(f"export_form must be one of {EXPORT_FORMS}, got {export_form!r}")
        self.export_form = export_form

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        self._replaced: set[str] = set()
        nodes = inserted_modules(gm, (WeightBinarizer, ActivationBinarizer))  # found by the graph's marks
        weight_names = {n.target for n in nodes if isinstance(gm.get_submodule(n.target), WeightBinarizer)}
        for node in nodes:
            module = gm.get_submodule(node.target)
            if not module.enabled:
                replacement = node.args[0]
            elif isinstance(module, WeightBinarizer) and self.export_form == "qdq":
                replacement = self._integer_weight(gm, node, module)
            elif isinstance(module, WeightBinarizer):
                replacement = self._fold_weight(gm, node, module, weight_names)
            elif isinstance(module, ActivationBinarizer) and self.export_form == "qdq":
                replacement = self._activation_qdq(gm, node, module)
            elif isinstance(module, ActivationBinarizer):
                replacement = self._lower_activation(gm, node, module)
            else:
                continue
            node.replace_all_uses_with(replacement)
            name = node.name
            gm.graph.erase_node(node)
            if replacement.meta.get("inserted_by") == self.name and replacement.op == "call_function":
                replacement.name = name  # the readable name (conv2_input_binarizer) stays in the lowered graph
        for target in {n.target for n in nodes}:
            gm.delete_submodule(target)
        # get_attr nodes of folded parameters that nothing reads any more are dead; nothing else is.
        gm.graph.eliminate_dead_code()
        if self.export_form == "qdq":
            self._drop_unread_weights(gm)
        return PassResult(gm, modified=bool(nodes))

    def _drop_unread_weights(self, gm):
        """Float weights replaced by integer ones and read nowhere else: set to None (not exported)."""
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for target in self._replaced:
            if target not in read:
                owner_path, _, attr = target.rpartition(".")
                owner = gm.get_submodule(owner_path) if owner_path else gm
                if attr in owner._parameters:
                    owner._parameters[attr] = None
                elif attr in owner._buffers:
                    owner._buffers[attr] = None

    def _integer_weight(self, gm, node: torch.fx.Node, module: WeightBinarizer) -> torch.fx.Node:
        source = node.args[0]
        if source.op != "get_attr":
            return self._fold_weight(gm, node, module, set())  # computed weight: plain ops
        weight = get_attr_value(gm, source.target).detach()
        with torch.no_grad():
            binarized = module.binarize(weight)
        sign = torch.where(weight >= 0, 1, -1).to(torch.int8)
        if module.mode == "xnor":
            scale, axis = binarized.abs().reshape(weight.shape[0], -1)[:, 0].float().contiguous(), 0
        else:
            scale, axis = binarized.abs().reshape(-1)[0].float().clone(), None
        zero_point = torch.zeros_like(scale, dtype=torch.int8)
        owner_path, _, attr = source.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        names = []
        for suffix, value in (("sign", sign), ("sign_scale", scale), ("sign_zero_point", zero_point)):
            name = unique_name(owner, f"{attr}_{suffix}")
            owner.register_buffer(name, value)
            names.append(f"{owner_path}.{name}" if owner_path else name)
        with gm.graph.inserting_before(node):
            args = [gm.graph.get_attr(n) for n in names]
            new = gm.graph.call_function(torch.ops.fxcompress.dequantize_weight.default,
                                         (*args, -1, 1, axis))
        for helper in args:
            helper.meta["inserted_by"] = self.name
        copy_meta(node, new, self.name)
        self._replaced.add(source.target)
        return new

    def _activation_qdq(self, gm, node: torch.fx.Node, module: ActivationBinarizer) -> torch.fx.Node:
        with torch.no_grad():
            scale = module.scale().detach().float().reshape(())
            threshold = module.relative_threshold().detach().float() * scale  # = the op's tau * S
        values = {"step": (2 * threshold).contiguous(),                      # exact: T = step / 2
                  "step_zero_point": torch.zeros(threshold.shape, dtype=torch.uint8),
                  "scale": scale.clone(), "zero_point": torch.zeros((), dtype=torch.uint8)}
        graph = gm.graph
        args = []
        with graph.inserting_before(node):
            for key, value in values.items():
                name = unique_name(gm, f"{node.target}_{key}")
                gm.register_buffer(name, value.to(scale.device))
                args.append(graph.get_attr(name))
            new = graph.call_function(torch.ops.fxcompress.binary_activation_qdq.default, (node.args[0], *args))
        for helper in args:
            helper.meta["inserted_by"] = self.name
        copy_meta(node, new, self.name)
        return new

    # -- weights -------------------------------------------------------------------------------
    def _fold_weight(self, gm, node: torch.fx.Node, module: WeightBinarizer, names: set[str]) -> torch.fx.Node:
        source = node.args[0]
        if source.op != "get_attr":
            # a weight computed in the graph: binarize it there (plain ops, see _binarize_computed)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(_binarize_computed, (source, module.mode == "xnor"))
            copy_meta(node, new, self.name)
            return new
        weight = get_attr_value(gm, source.target)
        with torch.no_grad():
            binarized = module.binarize(weight.detach()).detach().clone()
        owner_path, _, attr = source.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if read_only_through(gm, source.target, names):
            value = nn.Parameter(binarized, requires_grad=False) if isinstance(weight, nn.Parameter) else binarized
            setattr(owner, attr, value)  # a new tensor under the old name: the original is never written
            return source
        new_attr = unique_name(owner, f"{attr}_binarized")
        owner.register_buffer(new_attr, binarized)
        with gm.graph.inserting_before(node):
            new = gm.graph.get_attr(f"{owner_path}.{new_attr}" if owner_path else new_attr)
        copy_meta(node, new, self.name)
        return new

    # -- activations -------------------------------------------------------------------------------
    def _lower_activation(self, gm, node: torch.fx.Node, module: ActivationBinarizer) -> torch.fx.Node:
        x = node.args[0]
        shape = node.meta.get("shape")
        rank = len(shape) if shape is not None else 4
        with torch.no_grad():
            scale = module.scale().detach().float().reshape(())
            threshold = (module.relative_threshold().detach().float() * scale)  # = the op's tau * S
        base = node.target
        t_name = unique_name(gm, f"{base}_threshold")
        gm.register_buffer(t_name, threshold.reshape([1, -1] + [1] * (rank - 2)).clone())
        s_name = unique_name(gm, f"{base}_scale")
        gm.register_buffer(s_name, scale.clone())
        z_name = unique_name(gm, f"{base}_zero")
        gm.register_buffer(z_name, torch.zeros((), dtype=torch.float32, device=scale.device))
        graph = gm.graph
        with graph.inserting_before(node):
            t_node, s_node, z_node = graph.get_attr(t_name), graph.get_attr(s_name), graph.get_attr(z_name)
            above = graph.call_function(torch.gt, (x, t_node))
            new = graph.call_function(torch.where, (above, s_node, z_node))
        for helper in (t_node, s_node, z_node, above):
            helper.meta["inserted_by"] = self.name
            helper.meta["module_path"] = node.meta.get("module_path", "")
        above.meta.update({"shape": node.meta.get("shape"), "dtype": torch.bool})
        copy_meta(node, new, self.name)
        return new


def _binarize_computed(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``sign(w) * mean|w|`` (per output channel or per tensor) with plain ops, for a computed weight."""
    if per_channel:
        m = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    else:
        m = w.abs().mean()
    return torch.where(w >= 0, m, -m)

