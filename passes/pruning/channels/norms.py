"""Channel rules of the normalizations: BatchNorm (channels shrink) and LayerNorm over the channel
axis (channels pass through). GroupNorm mixes the channels of a group and has no rule, so the
channels reaching it are pinned."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx

from fxcompress.optable import Kind, OpKind

from .graph import data_input
from .model import LayerNormSite, Norm
from .registry import channel_rule

if TYPE_CHECKING:
    from ..dependency import ChannelAnalysis

__all__ = ["batch_norm", "layer_norm"]


@channel_rule(Kind.batch_norm)
def batch_norm(analysis: ChannelAnalysis, node: torch.fx.Node, kind: OpKind) -> set:
    """A BatchNorm module called once on channel axis 1: channels pass through, its channels shrink
    (``Norm``). Pins its input otherwise (functional, called twice, another axis)."""
    x = data_input(node)
    if node.op != "call_module" or x not in analysis.space_of:
        return set()  # functional batch_norm: separate parameter tensors the fold cannot slice
    space = analysis.space_of[x]
    if space.axis != 1 or analysis.calls_of(node.target) > 1:
        return set()
    out = analysis.new_space(node, 1, space.size, zero=analysis.prune_batch_norms)
    analysis.tie_identity(space, out, f"batch norm {node.target}")
    analysis.norms.append(Norm(node, node.target, out))
    return {x}


@channel_rule(Kind.layer_norm)
def layer_norm(analysis: ChannelAnalysis, node: torch.fx.Node, kind: OpKind) -> set:
    """LayerNorm over exactly the channel axis (the last one): channels pass through.

    While fine-tuning, ``FilterPruning`` replaces it by a ``ChannelMaskedLayerNorm`` (statistics
    of the kept channels, zero at pruned ones) so that the folded LayerNorm computes the same.
    """
    x = data_input(node)
    space = analysis.space_of.get(x)
    if space is None or space.axis != space.ndim - 1:
        return set()
    if node.op == "call_module":
        module = analysis.gm.get_submodule(node.target)
        if type(module) is not torch.nn.LayerNorm or analysis.calls_of(node.target) > 1 \
                or len(node.args) != 1 or node.kwargs:
            return set()
        shape, eps = tuple(module.normalized_shape), module.eps
        weight = f"{node.target}.weight" if module.weight is not None else None
        bias = f"{node.target}.bias" if module.bias is not None else None
    else:
        args = list(node.args) + [None] * (5 - len(node.args))
        shape = args[1] if args[1] is not None else node.kwargs.get("normalized_shape")
        params = [args[2] if args[2] is not None else node.kwargs.get("weight"),
                  args[3] if args[3] is not None else node.kwargs.get("bias")]
        eps = args[4] if args[4] is not None else node.kwargs.get("eps", 1e-5)
        if not isinstance(shape, (tuple, list)) or not isinstance(eps, float) or \
                any(p is not None and not analysis.owns_parameter(p) for p in params):
            return set()
        shape = tuple(shape)
        weight, bias = (p.target if p is not None else None for p in params)
    if shape != (space.size,):
        analysis.block(space, f"'{node.name}' normalizes over {list(shape)}, not over its {space.size} channels")
        return {x}
    out = analysis.new_space(node, space.axis, space.size, zero=True)
    analysis.tie_identity(space, out, f"layer norm {node.name}")
    analysis.layer_norms.append(LayerNormSite(node, out, weight, bias, float(eps)))
    analysis.channel_params.append((out, (weight is not None) + (bias is not None)))
    return {x}
