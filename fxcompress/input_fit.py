"""Why example inputs do not fit a model: the first module that refused them and what it expects.

Tracing runs the model on the example inputs (shape propagation, and for
shape-specialized models the trace itself). When an op raises there, the user
gave inputs the model cannot take (2 channels for a 3-channel conv, a 3-D size
for a 2-D conv net): ``InputShapeError`` says which input, its shape, the module
that refused it and the shape that module expects, instead of torch's message
about a graph node.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .errors import InputShapeError

__all__ = ["NodeFailure", "input_shape_error", "refused_by_model_code", "module_code_error", "describe_shape"]


class NodeFailure(RuntimeError):
    """Running ``node`` on concrete values raised ``cause``; ``values`` are the positional values it got."""

    def __init__(self, node: torch.fx.Node, args: tuple, kwargs: dict, cause: BaseException):
        super().__init__(f"running node {node.name} ({node.format_node()}) on the example inputs failed: "
                         f"{type(cause).__name__}: {_first_line(cause)}")
        self.node, self.values, self.kwargs, self.cause = node, args, kwargs, cause


def describe_shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(list(value.shape))
    return type(value).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _spatial(n: int) -> str:
    return ", ".join("DHW"[3 - n:]) if n <= 3 else ", ".join(f"L{i}" for i in range(n))


def _conv_refusal(m: _ConvNd, x: torch.Tensor) -> str | None:
    n = len(m.kernel_size)
    expected = f"[N, {m.in_channels}, {_spatial(n)}]"
    # an (n+1)-D input is one unbatched sample to torch: the batch dimension is missing
    if x.dim() != n + 2:
        return f"expects a {n + 2}-D input {expected}, got a {x.dim()}-D input {list(x.shape)}"
    if x.shape[1] != m.in_channels:
        return f"expects {m.in_channels} input channels, got {x.shape[1]}"
    return None


def _norm_refusal(m: nn.Module, x: torch.Tensor) -> str | None:
    if isinstance(m, _BatchNorm):
        dims = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}.get(type(m))
        if dims and x.dim() not in dims:
            return f"expects a {' or '.join(f'{d}-D' for d in dims)} input with {m.num_features} channels " \
                   f"in dimension 1, got a {x.dim()}-D input {list(x.shape)}"
        if x.dim() > 1 and x.shape[1] != m.num_features:
            return f"expects {m.num_features} channels (dimension 1), got {x.shape[1]}"
    if isinstance(m, nn.LayerNorm):
        shape = list(m.normalized_shape)
        if list(x.shape[-len(shape):]) != shape:
            return f"expects inputs whose last dimensions are {shape}, got {list(x.shape)}"
    return None


def _refusal(module: nn.Module, args: tuple) -> str | None:
    """What ``module`` expects, when its first tensor input visibly does not fit; else None."""
    x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if x is None:
        return None
    if isinstance(module, _ConvNd):
        return _conv_refusal(module, x)
    if isinstance(module, nn.Linear) and (x.dim() == 0 or x.shape[-1] != module.in_features):
        return f"expects inputs whose last dimension is {module.in_features} (in_features), got {list(x.shape)}"
    if isinstance(module, nn.Embedding):
        if x.is_floating_point() or x.is_complex():
            return f"expects integer token indices, got {x.dtype} values of shape {list(x.shape)}"
        if x.numel() and (int(x.max()) >= module.num_embeddings or int(x.min()) < 0):
            return f"expects indices in [0, {module.num_embeddings}), got values up to {int(x.max())}"
    return _norm_refusal(module, x)


def _first_unbatched_conv(failed: torch.fx.Node, root: nn.Module):
    """``(node, conv, input)`` of the first conv before ``failed`` that got an input without a batch dimension.

    torch reads a ``[C, H, W]`` input to ``Conv2d`` as one unbatched sample, so a 3-D example
    for a 2-D conv net passes the first conv and fails further on; the conv is where it went wrong.
    """
    for node in failed.graph.nodes:
        if node is failed:
            return None
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        module = root.get_submodule(str(node.target))
        meta = node.args[0].meta.get("tensor_meta")
        if isinstance(module, _ConvNd) and hasattr(meta, "shape") and len(meta.shape) == len(module.kernel_size) + 1:
            return node, module, torch.empty(tuple(meta.shape), device="meta")
    return None


def _enclosing_module(node: torch.fx.Node, root: nn.Module) -> tuple[str, nn.Module | None]:
    if node.op == "call_module":
        return str(node.target), root.get_submodule(str(node.target))
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = next(reversed(stack.values()))[0]
        try:
            return path, root.get_submodule(path)
        except AttributeError:
            return path, None
    return "", None


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", str(target))
    return f"{'torch' if module.startswith('torch') else module}.{name}".lstrip(".")


def _inputs_reaching(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The placeholders ``node`` depends on, in graph order."""
    seen, stack, found = set(), [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            found.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in found]


def _shown(inputs: dict[str, Any], names: list[str], keys: dict[str, int | str], label: str) -> str:
    """``example_inputs [1, 2, 32, 32] does not fit`` / ``example_inputs['a'] [2, 8] and ... do not fit``."""
    if len(inputs) == 1:
        return f"{label} {describe_shape(next(iter(inputs.values())))} does not fit"
    shown = " and ".join(f"{label}[{keys[name]!r}] {describe_shape(inputs[name])}" for name in names)
    return shown + (" do not fit" if len(names) > 1 else " does not fit")


def input_shape_error(failure: NodeFailure, root: nn.Module, inputs: dict[str, Any],
                      keys: dict[str, int | str], label: str = "example_inputs") -> InputShapeError:
    """An ``InputShapeError`` for ``failure`` (raised while running the graph of ``root`` on ``inputs``).

    ``inputs`` maps each placeholder (forward parameter) name to its example value, ``keys``
    the same names to the position (int) or keyword (str) the user gave it under; ``label``
    names the argument in messages.
    """
    node = failure.node
    unbatched = _first_unbatched_conv(node, root)
    if unbatched is not None:  # a conv read a sample without its batch dimension; a later op failed on that
        node, module, x = unbatched
        path, refusal = str(node.target), _conv_refusal(module, x)
    else:
        path, module = _enclosing_module(node, root)
        refusal = _refusal(module, failure.values) if node.op == "call_module" and module is not None else None
    names = [p.target for p in _inputs_reaching(node) if p.target in inputs] or list(inputs)
    where = f"module `{path}` ({type(module).__name__})" if module is not None else "the model's own forward"
    if refusal is None:
        got = ", ".join(describe_shape(a) for a in failure.values if isinstance(a, torch.Tensor)) or "no tensors"
        op = "" if node.op == "call_module" else f"`{_op_name(node)}` in "
        refusal = f"rejected inputs of shape {got}: {_first_line(failure.cause)}"
        where = op + where
    reason = f"{where} {refusal}"
    return InputShapeError(f"{_shown(inputs, names, keys, label)} the model: {reason}", module_path=path,
                           operation=_op_name(node) if node.op != "call_module" else type(module).__name__,
                           inputs=[keys[name] for name in names], reason=reason)


def refused_by_model_code(exc: BaseException) -> bool:
    """Whether ``exc``, raised while tracing on concrete example values, is the model refusing them.

    With every value concrete, torch's own errors (a shape mismatch in ``expand``, an index out
    of range) come from the inputs; fx's trace errors and type errors about proxies do not.
    """
    return isinstance(exc, (RuntimeError, IndexError, ValueError)) and not isinstance(exc, torch.fx.proxy.TraceError)


def module_code_error(exc: BaseException, module_path: str, module_type: type, source: str | None,
                      inputs: dict[str, Any], keys: dict[str, int | str],
                      label: str = "example_inputs") -> InputShapeError:
    """An ``InputShapeError`` for a module whose own Python code refused the example values."""
    where = f"module `{module_path}` ({module_type.__name__})" if module_path else \
        f"the model's own forward ({module_type.__name__})"
    at = f" at {source}" if source else ""
    reason = f"{where} rejected them{at}: {type(exc).__name__}: {_first_line(exc)}"
    return InputShapeError(f"{_shown(inputs, list(inputs), keys, label)} the model: {reason}",
                           module_path=module_path, source_line=source, inputs=list(keys.values()), reason=reason)
