"""Lowering pass (``LoweringPhase.PRUNE_CHANNELS``): remove pruned channels physically.

``FilterPruning`` annotates every node whose channels may shrink with
``node.meta["pruning_space"] = {"axis", "classes"}`` (the channel class of each
element of its output) and every consumer with ``node.meta["pruning_input"]``
(the same for its input). Given the set of pruned classes, this pass builds the
smaller graph:

- conv / transposed conv / linear: new weight (and bias) tensors without the
  pruned output filters and input channels; a grouped (or depthwise) conv
  loses whole groups and ``groups`` becomes the number left; per-channel weight quantizers on the weight
  edge get sliced copies of their scales;
- BatchNorm: a new, smaller BatchNorm module with the kept statistics;
- reshapes with a literal size on the channel-carrying axis get the new size;
- every ``ChannelMask`` inserted by filter pruning is removed.

New tensors and modules are created and set on the (lowered copy's) modules;
no tensor is written in place. Masked channels are exactly zero where they are
consumed (the analysis put masks where it could not prove that), so the
folded graph computes what the masked one does up to float reassociation.
"""
from __future__ import annotations

import copy

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxcompress.errors import PassError
from fxcompress.graph import get_attr_value
from fxcompress.lowering import LoweringPhase
from fxcompress.optable import Kind, op_kind
from fxcompress.quantizers import is_quantizer
from fxcompress.pass_manager import Pass, PassContext, PassResult

from .dependency import shape_args
from .masks import ChannelMask, ChannelMaskedLayerNorm

__all__ = ["FoldPrunedChannels", "INSERTED_BY"]

INSERTED_BY = "filter_pruning"


def _split(target: str) -> tuple[str, str]:
    owner, _, name = target.rpartition(".")
    return owner, name


def _set_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor, like: torch.Tensor):
    owner_path, name = _split(target)
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if isinstance(like, nn.Parameter):
        setattr(owner, name, nn.Parameter(value.detach().clone(), requires_grad=like.requires_grad))
    elif name in owner._buffers:
        owner._buffers[name] = value.detach().clone()
    else:
        setattr(owner, name, value.detach().clone())
    return owner, name


def _set_module(gm: torch.nn.Module, path: str, module: nn.Module):
    parent_path, name = _split(path)
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, name, module)


def _refresh_module_attributes(owner: nn.Module, weight: torch.Tensor, groups: int | None):
    """Keep ``in_channels`` / ``out_channels`` (``in_features``...) of the owning module truthful for printing."""
    if isinstance(owner, nn.modules.conv._ConvNd):
        transposed = owner.transposed
        g = groups if groups is not None else owner.groups
        out_c = weight.shape[1] * g if transposed else weight.shape[0]
        in_c = weight.shape[0] if transposed else weight.shape[1] * g
        owner.in_channels, owner.out_channels, owner.groups = in_c, out_c, g
    elif isinstance(owner, nn.Linear):
        owner.out_features, owner.in_features = weight.shape


class FoldPrunedChannels(Pass):
    name = "filter_pruning_fold"
    lowering_order = LoweringPhase.PRUNE_CHANNELS
    preserves_outputs = True

    def __init__(self, pruned_classes):
        self.pruned = frozenset(int(c) for c in pruned_classes)

    def __repr__(self):
        return f"FoldPrunedChannels({len(self.pruned)} pruned channel classes)"

    def _keep(self, record) -> torch.Tensor | None:
        if not record:
            return None
        classes = record["classes"]
        keep = [i for i, c in enumerate(classes) if c not in self.pruned]
        if len(keep) == len(classes):
            return None
        if not keep:
            raise PassError(f"filter pruning would remove every channel of a tensor (axis {record['axis']})")
        return torch.tensor(keep, dtype=torch.long)

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            kind = op_kind(node, gm)
            if kind in (Kind.conv, Kind.conv_transpose, Kind.linear, Kind.addmm) and node.op == "call_function":
                modified |= self._fold_layer(gm, node, kind)
            elif kind is Kind.batch_norm and node.op == "call_module":
                modified |= self._fold_norm(gm, node)
            elif node.meta.get("pruning_reshape"):
                modified |= self._fold_reshape(node)
            elif node.op == "get_attr" and node.meta.get("pruning_space"):
                modified |= self._fold_parameter(gm, node)
            elif node.op == "call_module" and node.meta.get("inserted_by") == INSERTED_BY \
                    and isinstance(gm.get_submodule(node.target), ChannelMaskedLayerNorm):
                modified |= self._fold_layer_norm(gm, node)
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and node.meta.get("inserted_by") == INSERTED_BY \
                    and isinstance(gm.get_submodule(node.target), ChannelMask):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                gm.delete_submodule(node.target)
                modified = True
        return PassResult(gm, modified)

    # -- layers ------------------------------------------------------------------------------
    def _edge(self, gm, node: torch.fx.Node, arg_index: int, what: str):
        """(get_attr source, transforms on the edge) of the weight or bias argument."""
        current = node.args[arg_index] if len(node.args) > arg_index else None
        chain = []
        while isinstance(current, torch.fx.Node) and current.op != "get_attr":
            if current.op != "call_module" or len(current.all_input_nodes) != 1:
                raise PassError(f"cannot fold the pruned channels of '{node.name}': its {what} is computed by "
                                f"'{current.name}', which the fold does not know how to slice")
            chain.append(current)
            current = current.args[0]
        return current, chain

    def _fold_layer(self, gm, node: torch.fx.Node, kind) -> bool:
        keep_out = self._keep(node.meta.get("pruning_space"))
        keep_in = self._keep(node.meta.get("pruning_input"))
        if keep_out is None and keep_in is None:
            return False
        out_axis, in_axis = kind.weight_out_axis, 1 - kind.weight_out_axis  # conv_transpose, addmm: [in, out]
        source, chain = self._edge(gm, node, kind.weight_arg, "weight")
        if source is None:
            raise PassError(f"cannot fold '{node.name}': its weight is not a parameter")
        weight = get_attr_value(gm, source.target)
        groups_index = kind.arg_names.index("groups") if "groups" in kind.arg_names else None
        groups = node.args[groups_index] if groups_index is not None and len(node.args) > groups_index else 1
        # a grouped conv (depthwise included) loses whole groups (the analysis ties each group's inputs
        # and filters into one class): slice its filters, keep each group's width, count the groups left
        grouped = kind is Kind.conv and groups > 1
        new = weight
        if keep_out is not None:
            new = new.index_select(out_axis, keep_out.to(weight.device))
        if keep_in is not None and not grouped:
            new = new.index_select(in_axis, keep_in.to(weight.device))
        new_groups = None
        if grouped and keep_out is not None:
            new_groups = groups * new.shape[0] // weight.shape[0]
            args = list(node.args)
            args[groups_index] = new_groups
            node.args = tuple(args)
        owner, _ = _set_tensor(gm, source.target, new, weight)
        _refresh_module_attributes(owner, new, new_groups)
        for transform in chain:
            self._fold_weight_transform(gm, node, transform, out_axis, keep_out)
        if keep_out is not None and kind.bias_arg is not None and len(node.args) > kind.bias_arg \
                and node.args[kind.bias_arg] is not None:
            bias_source, bias_chain = self._edge(gm, node, kind.bias_arg, "bias")
            bias = get_attr_value(gm, bias_source.target)
            _set_tensor(gm, bias_source.target, bias.index_select(0, keep_out.to(bias.device)), bias)
            for transform in bias_chain:
                self._fold_weight_transform(gm, node, transform, 0, keep_out)
        return True

    def _fold_weight_transform(self, gm, node, transform: torch.fx.Node, out_axis: int, keep_out):
        module = gm.get_submodule(transform.target)
        if isinstance(module, ChannelMask):
            return  # removed with the other masks
        axis = getattr(module, "axis", None)
        if is_quantizer(module) and (axis is None or keep_out is None):
            return  # per-tensor: shape-agnostic
        if is_quantizer(module) and axis == out_axis:
            sliced = copy.deepcopy(module)
            index = keep_out.to(module.scale.device)
            for attr in ("scale", "zero_point"):
                value = getattr(module, attr)
                if isinstance(value, nn.Parameter):
                    setattr(sliced, attr, nn.Parameter(value.detach().index_select(0, index).clone(),
                                                       requires_grad=value.requires_grad))
                else:
                    sliced._buffers[attr] = value.detach().index_select(0, index).clone()
            _set_module(gm, transform.target, sliced)
            return
        raise PassError(f"cannot fold the pruned channels of '{node.name}': '{transform.name}' "
                        f"({type(module).__name__}) on its weight edge has per-channel state the fold "
                        f"does not know how to slice")

    # -- batch norm ----------------------------------------------------------------------------
    def _fold_norm(self, gm, node) -> bool:
        keep = self._keep(node.meta.get("pruning_space"))
        if keep is None:
            return False
        bn = gm.get_submodule(node.target)
        new = type(bn)(len(keep), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                       track_running_stats=bn.track_running_stats)
        ref = next(iter(bn.parameters()), None)
        ref = ref if ref is not None else next(iter(bn.buffers()), None)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        with torch.no_grad():
            for name in ("weight", "bias"):
                value = getattr(bn, name, None)
                if value is not None:
                    setattr(new, name, nn.Parameter(value.detach().index_select(0, keep.to(value.device)).clone(),
                                                    requires_grad=value.requires_grad))
            for name in ("running_mean", "running_var"):
                value = getattr(bn, name, None)
                if value is not None:
                    new._buffers[name] = value.detach().index_select(0, keep.to(value.device)).clone()
            if getattr(bn, "num_batches_tracked", None) is not None:
                new._buffers["num_batches_tracked"] = bn.num_batches_tracked.detach().clone()
        new.train(bn.training)
        _set_module(gm, node.target, new)
        return True

    # -- per-channel parameters (layer scales, LayerNorm affine) and LayerNorm ---------------------
    def _fold_parameter(self, gm, node) -> bool:
        record = node.meta["pruning_space"]
        keep = self._keep(record)
        if keep is None:
            return False
        value = get_attr_value(gm, node.target)
        _set_tensor(gm, node.target, value.index_select(record["axis"], keep.to(value.device)), value)
        return True

    def _fold_layer_norm(self, gm, node) -> bool:
        """The masked LayerNorm becomes ``F.layer_norm`` over the kept channels, its parameters sliced."""
        module = gm.get_submodule(node.target)
        keep = self._keep(node.meta.get("pruning_space"))
        size = module.mask.numel() if keep is None else len(keep)
        x, weight, bias = node.args
        for param in (weight, bias):
            if param is not None and keep is not None:
                value = get_attr_value(gm, param.target)
                owner, _ = _set_tensor(gm, param.target, value.index_select(0, keep.to(value.device)), value)
                if isinstance(owner, nn.LayerNorm):
                    owner.normalized_shape = (size,)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(F.layer_norm, (x, (size,), weight, bias, module.eps))
        new.meta.update({k: v for k, v in node.meta.items() if k != "inserted_by"})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
        return True

    # -- reshapes ----------------------------------------------------------------------------------
    def _fold_reshape(self, node) -> bool:
        record = node.meta.get("pruning_space")
        keep = self._keep(record)
        if keep is None:
            return False
        parsed = shape_args(node)
        if parsed is None:
            raise PassError(f"cannot fold '{node.name}': its target shape is no longer readable")
        sizes, form = parsed
        sizes[record["axis"]] = len(keep)
        if form == "size_prefix":  # x.view(y.size()[:-k] + tail): rewrite the literal tail
            shape = node.args[1]
            tail = sizes[len(sizes) - len(shape.args[1]):]
            shape.args = (shape.args[0], tuple(tail))
        elif form == "tuple_arg":
            node.args = (node.args[0], tuple(sizes))
        elif form == "varargs":
            node.args = (node.args[0], *sizes)
        elif len(node.args) > 1:
            node.args = (node.args[0], tuple(sizes))
        else:
            node.kwargs = {**node.kwargs, "shape": tuple(sizes)}
        return True
