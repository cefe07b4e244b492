"""Channel rule of concatenation (``torch.cat`` / ``torch.concat``): DenseNet and Inception merges,
ShuffleNet's split-and-concat."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx

from fxcompress.optable import Kind, OpKind

from .graph import tensor_shape
from .registry import channel_rule

if TYPE_CHECKING:
    from ..dependency import ChannelAnalysis

__all__ = ["cat"]


@channel_rule(Kind.cat)
def cat(analysis: ChannelAnalysis, node: torch.fx.Node, kind: OpKind) -> set:
    """Concatenation along the channel axis ties each input at its offset (an untracked input's channels,
    e.g. the model input's, are pinned in the output); along another axis the inputs' channels are tied
    element by element. Pins inputs whose channels sit on different axes or do not line up."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = tensor_shape(node)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or shape is None:
        return set()
    dim = dim % len(shape)
    tracked = [t for t in tensors if isinstance(t, torch.fx.Node) and t in analysis.space_of]
    claimed = set(tracked)
    axes = {analysis.space_of[t].axis for t in tracked}
    if len(axes) != 1 or any(analysis.space_of[t].ndim != len(shape) for t in tracked):
        for t in tracked:
            analysis.block(analysis.space_of[t], f"'{node.name}' concatenates tensors with channels on different axes")
        return claimed
    axis = axes.pop()
    if dim == axis:
        if any(tensor_shape(t) is None for t in tensors):
            for t in tracked:
                analysis.block(analysis.space_of[t], f"'{node.name}' concatenates a tensor without shape metadata")
            return claimed
        out = analysis.new_space(node, axis, shape[axis], zero=all(analysis.space_of[t].zero for t in tracked))
        offset = 0
        for t in tensors:
            tshape = tensor_shape(t)
            if t in analysis.space_of:
                space = analysis.space_of[t]
                analysis.tie(space, out, np.arange(space.size), offset + np.arange(space.size),
                             f"'{node.name}' concatenates it at offset {offset}")
            else:  # channels nothing can remove (e.g. the model input): a depthwise conv must keep them
                analysis.block(out, f"'{node.name}' concatenates '{getattr(t, 'name', t)}', whose channels are "
                                    f"not tracked", offset + np.arange(tshape[dim]))
            offset += tshape[dim]
        return claimed
    ties = []
    for t in tensors:
        if t in analysis.space_of and analysis.space_of[t].size == shape[axis]:
            ties.append(t)
        else:
            tshape = tensor_shape(t)
            if t in analysis.space_of or tshape is None or tshape[axis] > 1:
                for u in tracked:
                    analysis.block(analysis.space_of[u], f"'{node.name}' concatenates it with '{getattr(t, 'name', t)}' "
                                                         f"whose channels do not line up")
                return claimed
    out = analysis.new_space(node, axis, shape[axis], zero=all(analysis.space_of[t].zero for t in ties))
    for t in ties:
        analysis.tie_identity(analysis.space_of[t], out, f"'{node.name}' concatenates along another axis")
    return claimed
