"""Lowering binarizers for ``strip()`` / ``export_onnx()``: plain tensors and standard ops only.

Runs at ``lowering_order = 45`` (after mask folding 10, BN folding 30 and
quantizer lowering 40), on ``ctrl.lower()``'s deep copy, in eval mode:

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

Metadata: a lowered node takes over the replaced node's ``shape``/``dtype``/
``module_path``; ``inserted_by`` names this pass.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

from fxcompress.graph import copy_meta, get_attr_value, unique_name
from fxcompress.pass_manager import Pass, PassContext, PassResult

from .modules import ActivationBinarizer, WeightBinarizer

__all__ = ["LowerBinarizers", "BINARIZATION_LOWERING_ORDER"]

BINARIZATION_LOWERING_ORDER = 45


class LowerBinarizers(Pass):
    name = "lower_binarizers"
    preserves_outputs = True
    lowering_order = BINARIZATION_LOWERING_ORDER

    def __init__(self, weight_binarizers: list[str], activation_binarizers: list[str]):
        self.weight_binarizers = list(dict.fromkeys(weight_binarizers))
        self.activation_binarizers = list(dict.fromkeys(activation_binarizers))

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        names = set(self.weight_binarizers) | set(self.activation_binarizers)
        nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in names]
        weight_names = set(self.weight_binarizers)
        for node in nodes:
            module = gm.get_submodule(node.target)
            if not module.enabled:
                replacement = node.args[0]
            elif isinstance(module, WeightBinarizer):
                replacement = self._fold_weight(gm, node, module, weight_names)
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
        return PassResult(gm, modified=bool(nodes))

    # -- weights -------------------------------------------------------------------------------
    @staticmethod
    def _read_only_through(gm, target: str, names: set[str]) -> bool:
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target == target:
                if any(not (u.op == "call_module" and u.target in names) for u in node.users):
                    return False
        return True

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
        if self._read_only_through(gm, source.target, names):
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

