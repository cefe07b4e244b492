"""Small readers of fx nodes shared by the channel rules: shape metadata, the data input, a description."""
from __future__ import annotations

import torch
import torch.fx

from fxcompress.optable import op_kind

__all__ = ["tensor_shape", "data_input", "describe"]


def tensor_shape(node) -> tuple | None:
    shape = node.meta.get("shape") if isinstance(node, torch.fx.Node) else None
    if isinstance(shape, tuple) and all(isinstance(s, int) for s in shape):
        return shape
    return None


def data_input(node: torch.fx.Node):
    if node.args:
        return node.args[0]
    return node.kwargs.get("input")


def describe(node: torch.fx.Node, gm) -> str:
    kind = op_kind(node, gm)
    if node.op == "call_module":
        what = type(gm.get_submodule(node.target)).__name__
    elif node.op == "call_method":
        what = f".{node.target}()"
    else:
        what = getattr(node.target, "__name__", str(node.target))
    where = node.meta.get("module_path") or ""
    return f"'{node.name}' ({what}{', kind ' + kind.name if kind else ''}{' in ' + where if where else ''})"
