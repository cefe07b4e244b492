"""Least-squares reconstruction of the layers that read pruned channels (``initializer.reconstruction``).

Pruning a group's channels removes inputs of the layers that read them (the group's consumers);
each such layer then computes something other than what the dense model computed. As in
ThiNet (Luo et al. 2017) and "channel pruning" (He et al. 2017), the weights of each consumer
on its kept input channels are solved for so that its output on calibration data matches the
dense model's output of the same layer:

    W_kept = argmin || X_kept W_kept^T - (Y_dense - b) ||^2 + ridge * mean(diag(X^T X)) * ||W_kept||^2

``X_kept``: the layer's input in the pruned model (im2col rows for a conv), on its kept
channels; ``Y_dense``: the layer's output in the unpruned model (all masks open, the weights
as they were) on the same samples; ``b``: its bias, kept. The consumers are solved one at a
time in graph order, each with the inputs the already reconstructed layers before it produce,
so the errors of earlier layers are compensated too. The normal equations are accumulated
batch by batch (``X^T X`` is ``D x D`` for ``D`` kept inputs times the kernel size); the dense
outputs of the consumers are kept for the calibration samples.

Which layers: 2-D convolutions with ``groups == 1`` and linear layers whose input loses
channels (a grouped conv loses whole groups with their filters; transposed convs and Conv1D
are left as they are). Runs once, in ``ctrl.initialize(loader)``, for the masks set at compile
time (``schedule: "baseline"``), before any BatchNorm adaptation. Weights are replaced by new
parameters, never written in place, so an optimizer must be built after ``initialize``. A
failure restores every parameter and mask as it was.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from fxcompress.data import CalibrationData, preserved_modes
from fxcompress.graph import get_attr_value
from fxcompress.optable import Kind

from .channels.model import Layer
from .fold import _set_tensor

__all__ = ["RECONSTRUCTION_SCHEMA", "DEFAULT_RECONSTRUCTION_SAMPLES", "DEFAULT_RIDGE", "reconstructible",
           "reconstruct_consumers"]

DEFAULT_RECONSTRUCTION_SAMPLES = 256
DEFAULT_RIDGE = 1e-3

RECONSTRUCTION_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {"num_samples": {"type": "integer", "minimum": 1},
                   "ridge": {"type": "number", "minimum": 0}},
}


def _conv_geometry(node: torch.fx.Node) -> dict | None:
    """stride / padding / dilation of a functional 2-D conv node, or None for a form unfold cannot do."""
    names = ("stride", "padding", "dilation", "groups")
    values = {name: node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(name)
              for i, name in enumerate(names)}
    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    values = {k: defaults[k] if v is None else v for k, v in values.items()}
    if values["padding"] == "valid":
        values["padding"] = 0
    if isinstance(values["padding"], str) or values["groups"] != 1:
        return None
    return {k: values[k] for k in ("stride", "padding", "dilation")}


def reconstructible(gm, layer: Layer) -> bool:
    """A conv2d (groups 1) or linear with a parameter weight: the layers this module solves for."""
    if layer.weight_target is None or layer.in_space is None:
        return False
    weight = get_attr_value(gm, layer.weight_target)
    if layer.kind is Kind.linear:
        return weight.dim() == 2
    return layer.kind is Kind.conv and weight.dim() == 4 and _conv_geometry(layer.node) is not None


def _tap(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> torch.fx.GraphModule:
    """A GraphModule computing the values of ``nodes`` (a tuple) from ``gm``'s inputs, and nothing after
    them. It shares ``gm``'s modules (masks included) and the parameters ``gm`` holds now, so it is
    built again after a weight is replaced."""
    graph, env = torch.fx.Graph(), {}
    for node in gm.graph.nodes:
        if node.op != "output":
            env[node] = graph.node_copy(node, lambda arg: env[arg])
    graph.output(tuple(env[n] for n in nodes))
    tap = torch.fx.GraphModule(gm, graph)
    tap.graph.eliminate_dead_code()  # what comes after the nodes is not run
    tap.recompile()
    return tap


def _rows(layer: Layer, x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The layer's input on its kept channels as rows ``[samples, kept inputs]`` (im2col for a conv)."""
    if layer.kind is Kind.linear:
        return x[..., keep].reshape(-1, int(keep.sum()))
    x = x[:, keep]
    cols = F.unfold(x, weight.shape[2:], **_conv_geometry(layer.node))  # [N, C*kh*kw, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _targets(layer: Layer, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The dense output as rows ``[samples, out]``, bias removed."""
    if layer.kind is Kind.linear:
        rows = y.reshape(-1, y.shape[-1])
        return rows - bias if bias is not None else rows
    if bias is not None:
        y = y - bias.reshape(1, -1, 1, 1)
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


def _kept_columns(layer: Layer, keep: np.ndarray, weight: torch.Tensor) -> torch.Tensor:
    """Which of the rows' columns are kept inputs (a conv's channel covers kh*kw columns)."""
    per_channel = int(np.prod(weight.shape[2:])) if layer.kind is Kind.conv else 1
    return torch.from_numpy(np.repeat(keep, per_channel))


@torch.no_grad()
def reconstruct_consumers(part, data: CalibrationData, num_samples: int, ridge: float = DEFAULT_RIDGE) -> list[str]:
    """Solve the weights of every reconstructible consumer of pruned channels (module docstring);
    returns the weight targets replaced. ``part``: the ``FilterPruningController`` (its graph,
    analysis and current masks)."""
    gm, analysis, pruned = part.gm, part.analysis, part.pruned.copy()
    layers = [layer for layer in analysis.layers.values()
              if reconstructible(gm, layer) and not analysis.keep(layer.in_space, pruned).all()]
    if not layers:
        return []
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    layers.sort(key=lambda layer: order[layer.node])
    batches = list(data.batches(num_samples))
    if not batches:
        raise ValueError("initialize: the data loader yielded no batches for pruning reconstruction")
    originals = {layer.weight_target: get_attr_value(gm, layer.weight_target) for layer in layers}
    try:
        with preserved_modes(gm):
            gm.eval()
            part._set_pruned(np.zeros_like(pruned))  # the dense model: every mask open
            outputs = _tap(gm, [layer.node for layer in layers])
            dense = [dict(zip([layer.node for layer in layers], outputs(*args, **kwargs))) for args, kwargs in batches]
            part._set_pruned(pruned)
            for layer in layers:
                _solve(gm, layer, analysis.keep(layer.in_space, pruned), batches, dense, ridge)
    except BaseException:
        for target, tensor in originals.items():
            _set_owner_attr(gm, target, tensor)
        part._set_pruned(pruned)
        raise
    return list(originals)


def _solve(gm, layer: Layer, keep: np.ndarray, batches, dense, ridge: float):
    weight = get_attr_value(gm, layer.weight_target)
    bias = get_attr_value(gm, layer.bias_target) if layer.bias_target is not None else None
    kept = _kept_columns(layer, keep, weight).to(weight.device)
    keep_inputs = torch.from_numpy(keep).to(weight.device)
    gram = rhs = None
    layer_input = _tap(gm, [layer.node.args[layer.input_arg]])
    for (args, kwargs), outputs in zip(batches, dense):
        x = _rows(layer, layer_input(*args, **kwargs)[0], weight, keep_inputs).double()
        t = _targets(layer, outputs[layer.node], bias).double()
        gram = x.T @ x if gram is None else gram + x.T @ x
        rhs = x.T @ t if rhs is None else rhs + x.T @ t
    if not (torch.isfinite(gram).all() and torch.isfinite(rhs).all()):
        raise ValueError(f"filter_pruning reconstruction of {layer.name}: non-finite values in its inputs or in the "
                         f"unpruned model's outputs on the calibration data; the weights were left as they were")
    damp = ridge * gram.diagonal().mean().clamp_min(1e-12)
    system = gram + damp * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    # the pseudo-inverse (eigen-decomposition): with ridge 0 and linearly dependent inputs the system is
    # singular, where a plain solve returns huge weights that cancel only in exact arithmetic
    solution = torch.linalg.pinv(system, hermitian=True) @ rhs
    new = weight.detach().clone().reshape(weight.shape[0], -1)
    new[:, kept] = solution.T.to(new.dtype)
    _set_tensor(gm, layer.weight_target, new.reshape(weight.shape), weight)


def _set_owner_attr(gm, target: str, tensor: torch.Tensor):
    owner_path, _, name = target.rpartition(".")
    setattr(gm.get_submodule(owner_path) if owner_path else gm, name, tensor)
