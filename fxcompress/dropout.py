"""Dropout that follows ``train()``/``eval()`` after tracing.

Models decide dropout from ``self.training`` in Python: ``F.dropout(x, p, training=self.training)``
(transformers' eager attention) and ``scaled_dot_product_attention(..., dropout_p=p if
self.training else 0.0)`` (its SDPA attention). torch.fx evaluates that flag once, while tracing,
and writes the result into the graph as a constant: a model compiled in train mode would keep
dropping attention weights after ``gm.eval()`` (random evaluation, calibration and export), and one
compiled in eval mode would never drop them during fine-tuning.

``make_dropout_mode_aware`` turns those constants back into modules, which read ``self.training``
at every call:

- a functional dropout given its ``training`` flag explicitly, equal to the model's mode when
  traced (so it came from ``self.training``), becomes the matching ``nn.Dropout*`` module;
- an SDPA call traced in train mode with a constant ``dropout_p > 0`` reads its rate from a
  ``DropoutRate`` module (``p`` in train mode, 0.0 in eval mode). Traced in eval mode the rate is
  0.0 and the ``p`` it came from is gone: such a graph fine-tunes without attention dropout.

A flag that differs from the model's mode, or that the graph computes, is the model's own choice
and stays as traced; so does a call relying on a default (``F.dropout``'s ``training=True``).
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .graph import copy_meta

__all__ = ["DropoutRate", "make_dropout_mode_aware"]

# functional dropout -> (its module, the positional index of ``training``)
_FUNCTIONAL = {
    F.dropout: (nn.Dropout, 2),
    F.dropout1d: (nn.Dropout1d, 2),
    F.dropout2d: (nn.Dropout2d, 2),
    F.dropout3d: (nn.Dropout3d, 2),
    F.alpha_dropout: (nn.AlphaDropout, 2),
    F.feature_alpha_dropout: (nn.FeatureAlphaDropout, 2),
    torch.dropout: (nn.Dropout, 2),
}
_SDPA_DROPOUT_INDEX = 4   # scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, ...)


class DropoutRate(nn.Module):
    """The attention dropout rate of a fused attention call: ``p`` in train mode, 0.0 in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self) -> float:
        return self.p if self.training else 0.0

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _argument(node: torch.fx.Node, index: int, name: str):
    """(given, value) of an argument passed by position or keyword."""
    if len(node.args) > index:
        return True, node.args[index]
    if name in node.kwargs:
        return True, node.kwargs[name]
    return False, None


def _new_module_name(gm: torch.fx.GraphModule, node: torch.fx.Node, suffix: str) -> str:
    base = f"{node.name}_{suffix}"
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def make_dropout_mode_aware(gm: torch.fx.GraphModule, traced_in_training: bool) -> list[str]:
    """Rewrite the dropout decisions fx froze at trace time into modules; returns the nodes rewritten."""
    rewritten = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _FUNCTIONAL:
            module_type, index = _FUNCTIONAL[node.target]
            given, training = _argument(node, index, "train" if node.target is torch.dropout else "training")
            _, p = _argument(node, 1, "p")
            _, inplace = _argument(node, 3, "inplace")
            if not given or training is not traced_in_training or not isinstance(p, (int, float)):
                continue
            name = _new_module_name(gm, node, "dropout")
            gm.add_submodule(name, module_type(p=float(p), inplace=bool(inplace)))
            with gm.graph.inserting_before(node):
                module_call = gm.graph.call_module(name, (node.args[0],))
            copy_meta(node, module_call)
            node.replace_all_uses_with(module_call)
            gm.graph.erase_node(node)
            rewritten.append(name)
        elif node.target is F.scaled_dot_product_attention and traced_in_training:
            _, p = _argument(node, _SDPA_DROPOUT_INDEX, "dropout_p")
            if not isinstance(p, (int, float)) or p == 0:
                continue
            name = _new_module_name(gm, node, "dropout_rate")
            gm.add_submodule(name, DropoutRate(p))
            with gm.graph.inserting_before(node):
                rate = gm.graph.call_module(name, ())
            if len(node.args) > _SDPA_DROPOUT_INDEX:
                node.update_arg(_SDPA_DROPOUT_INDEX, rate)
            else:
                node.update_kwarg("dropout_p", rate)
            rewritten.append(name)
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten
