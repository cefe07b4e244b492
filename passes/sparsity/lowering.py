"""Mask folding: ``w -> mask -> op`` becomes ``(w * mask) -> op`` with a new weight tensor.

Runs first among the algorithms' lowering passes (``LoweringPhase.FOLD_MASKS``): masks act on
float weights, so pruning folds, BN folding and quantizer lowering all see
weights that already hold the zeros, and the exported ONNX initializers hold
them too. The rewrite is exact in eval mode (``w * 1 == w``, ``w * 0 == 0``).

Where the masked parameter is read only through its masks (the usual case),
the parameter itself is replaced by a new ``Parameter(w * mask)`` under the same
name (``conv1.weight``), so later lowering passes and the exported model keep
readable names. A parameter also read unmasked elsewhere keeps its value and
the folded weight becomes a new attribute ``<module>.<name>_masked``.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

from fxcompress.graph import get_attr_value, inserted_modules, read_only_through, unique_name
from fxcompress.lowering import LoweringPhase
from fxcompress.pass_manager import Pass, PassContext, PassResult

from .masks import SparsityMask

__all__ = ["FoldMasks"]


class FoldMasks(Pass):
    name = "fold_sparsity_masks"
    preserves_outputs = True
    lowering_order = LoweringPhase.FOLD_MASKS

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        mask_nodes = inserted_modules(gm, SparsityMask)  # every sparsity pass's masks, by the graph's marks
        names = {n.target for n in mask_nodes}
        for node in mask_nodes:
            module = gm.get_submodule(node.target)
            mask = module.binary_mask().detach()
            source = node.args[0]
            if source.op == "get_attr" and read_only_through(gm, source.target, names):
                self._replace_parameter(gm, source.target, mask)
                replacement = source
            else:
                replacement = self._new_constant(gm, node, source, mask)
            node.replace_all_uses_with(replacement)
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
        # Unused get_attr nodes of dropped masks are removed; nothing else is dead here.
        gm.graph.eliminate_dead_code()
        return PassResult(gm, modified=bool(mask_nodes))

    @staticmethod
    def _replace_parameter(gm, target: str, mask: torch.Tensor):
        owner_path, _, attr = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        weight = get_attr_value(gm, target)
        folded = (weight.detach() * mask.to(weight.dtype))  # a new tensor: the original is never written
        if isinstance(weight, nn.Parameter):
            setattr(owner, attr, nn.Parameter(folded, requires_grad=weight.requires_grad))
        else:
            setattr(owner, attr, folded)  # a buffer or plain tensor attribute keeps its kind

    @staticmethod
    def _new_constant(gm, node: torch.fx.Node, source: torch.fx.Node, mask: torch.Tensor) -> torch.fx.Node:
        """The parameter is read unmasked elsewhere, or the weight is computed: keep it, multiply by a constant."""
        if source.op == "get_attr":
            owner_path, _, attr = source.target.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            weight = get_attr_value(gm, source.target)
            new_attr = unique_name(owner, f"{attr}_masked")
            owner.register_parameter(new_attr, nn.Parameter(weight.detach() * mask.to(weight.dtype),
                                                            requires_grad=weight.requires_grad))
            with gm.graph.inserting_before(node):
                new = gm.graph.get_attr(f"{owner_path}.{new_attr}" if owner_path else new_attr)
        else:
            const = unique_name(gm, f"{node.target}_folded")
            gm.register_buffer(const, mask.clone())
            with gm.graph.inserting_before(node):
                mask_node = gm.graph.get_attr(const)
                new = gm.graph.call_function(torch.mul, (source, mask_node))
        new.meta.update({k: v for k, v in node.meta.items() if k != "inserted_by"})
        return new
