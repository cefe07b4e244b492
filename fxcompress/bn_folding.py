"""BatchNorm folding: ``conv -> BatchNorm`` becomes one conv with scaled weight and a new bias.

One mechanism for both places that fold: ``Quantize(fold_bn=True)`` at compile time
(QAT then trains the folded float weights) and the ``FoldBatchNorm`` lowering pass at
export (the factor goes into the frozen weight quantizer's scale). This module finds
the pairs, reads the BatchNorm's statistics, does the arithmetic and removes the
BatchNorm from the graph; where the new weight and bias tensors live is the caller's
business (trainable parameters under the old names at compile time, new frozen
tensors at export).

For an eval BatchNorm with running statistics ``y = (x - mean) * f + beta`` with
``f = gamma / sqrt(var + eps)`` per channel, so after ``x = conv(w, b)``:
``w' = f * w`` (per output channel) and ``b' = (b - mean) * f + beta``. The
arithmetic is done in float64 and rounded once.

Handled: BatchNorm modules and functional ``F.batch_norm`` whose statistics are
parameters/buffers; convs, transposed convs (also grouped: output channel
``g * (O/g) + j`` is column ``j`` of group ``g``'s rows) and, where the caller asks,
linear layers with a 2-D output (BatchNorm1d normalizes dimension 1, the linear's
output features only then). Everything else is refused with the reason, so the
caller can warn naming the node; refusing is always exact (the BatchNorm stays).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

from .graph import tensor_attr
from .optable import Kind, op_arg
from .patterns import Chain, Step
from .weights import WeightedOp, weighted_ops

__all__ = ["BatchNormFold", "find_batch_norm_folds", "remove_folded_batch_norm", "scale_output_channels",
           "set_bias_arg", "warn_not_folded"]


def _statistics(gm: torch.fx.GraphModule, bn_node: torch.fx.Node, eval_only: bool):
    """``(mean, var, gamma, beta, eps)`` (float64) of a BatchNorm node, module or ``F.batch_norm``;
    or why it cannot be folded. ``eval_only``: a BatchNorm module in training mode is refused
    (it would normalize with batch statistics); at compile time the running ones are frozen in."""
    if bn_node.op == "call_module":
        bn = gm.get_submodule(bn_node.target)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            return f"{type(bn).__name__} is not a BatchNorm"
        if (eval_only and bn.training) or bn.running_mean is None or len(bn_node.args) != 1 or bn_node.kwargs:
            return "BatchNorm uses batch statistics (training mode or no running stats)"
        tensors, eps = (bn.running_mean, bn.running_var, bn.weight, bn.bias), bn.eps
    else:  # F.batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum, eps)
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        args = dict(zip(names, bn_node.args)) | dict(bn_node.kwargs)
        if args.get("training", False) is not False:
            return "functional batch_norm with training=True (batch statistics) is not folded"
        tensors = []
        for name in ("running_mean", "running_var", "weight", "bias"):
            value = args.get(name)
            tensor = tensor_attr(gm, value)
            if value is not None and tensor is None:
                return f"functional batch_norm: {name} is computed, not a parameter or buffer"
            tensors.append(tensor)
        if tensors[0] is None or tensors[1] is None:
            return "functional batch_norm without running statistics"
        eps = float(args.get("eps", 1e-5))
    mean, var, gamma, beta = (t.detach().to(torch.float64) if t is not None else None for t in tensors)
    gamma = gamma if gamma is not None else torch.ones_like(var)
    beta = beta if beta is not None else torch.zeros_like(var)
    return mean, var, gamma, beta, eps


def scale_output_channels(weight: torch.Tensor, factor: torch.Tensor, axis: int, groups: int = 1) -> torch.Tensor:
    """``weight`` with output channel ``c`` multiplied by ``factor[c]``; a grouped transposed conv's
    weight ``[I, O/g, k...]`` holds output channel ``g * (O/g) + j`` in the rows of group ``g``, column ``j``."""
    if groups == 1:
        shape = [1] * weight.dim()
        shape[axis] = -1
        return weight * factor.reshape(shape)
    rows, cols = weight.shape[0], weight.shape[1]
    grouped = weight.reshape(groups, rows // groups, cols, *weight.shape[2:])
    f = factor.reshape(groups, 1, cols, *([1] * (weight.dim() - 2)))
    return (grouped * f).reshape(weight.shape)


@dataclass
class BatchNormFold:
    """One foldable ``op -> BatchNorm`` pair and the BatchNorm's per-channel affine map."""
    op: WeightedOp
    bn_node: torch.fx.Node
    factor: torch.Tensor   # gamma / sqrt(var + eps), float64
    mean: torch.Tensor     # float64
    beta: torch.Tensor     # float64
    bias: torch.Tensor | None  # the op's current bias tensor (None: no bias)

    @property
    def scope(self) -> str:
        return self.bn_node.meta.get("module_path", self.bn_node.name)

    @property
    def groups(self) -> int:
        """The groups that matter for the weight layout: a grouped transposed conv's; 1 otherwise."""
        groups = op_arg(self.op.node, self.op.kind, "groups", 1)
        return groups if self.op.kind is Kind.conv_transpose else 1

    def folded_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``factor * weight`` per output channel, computed in float64, in ``weight``'s dtype."""
        return scale_output_channels(weight.detach().to(torch.float64), self.factor, self.op.out_axis,
                                     self.groups).to(weight.dtype)

    def folded_bias(self) -> torch.Tensor:
        """``(bias - mean) * factor + beta`` in float32."""
        old = self.bias.detach().to(torch.float64) if self.bias is not None else torch.zeros_like(self.mean)
        return ((old - self.mean) * self.factor + self.beta).to(torch.float32)


def _pair(gm, op: WeightedOp | None, bn_node, eval_only: bool) -> BatchNormFold | str:
    if op is None:
        return "the conv is not in functional form"
    if op.kind is Kind.linear and len(bn_node.meta.get("shape") or ()) != 2:
        return "BatchNorm after a linear layer whose output is not 2-D normalizes another axis"
    stats = _statistics(gm, bn_node, eval_only)
    if isinstance(stats, str):
        return stats
    bias_node = op_arg(op.node, op.kind, "bias")
    bias = tensor_attr(gm, bias_node)
    if bias_node is not None and bias is None:
        return "the conv bias is computed, not a parameter"
    mean, var, gamma, beta, eps = stats
    return BatchNormFold(op, bn_node, gamma / torch.sqrt(var + eps), mean, beta, bias)


@torch.no_grad()
def find_batch_norm_folds(gm: torch.fx.GraphModule, kinds, *, eval_only: bool = True,
                          selects=lambda path: True) -> tuple[list[BatchNormFold], list[dict]]:
    """The ``op -> BatchNorm`` pairs of ``kinds`` (functional ops, see ``functionalize_weighted``) that fold,
    and the ones that do not: ``{"scope", "node", "conv", "reason"}`` each. A pair whose op's module
    path ``selects`` rejects is neither."""
    ops = {op.node: op for op in weighted_ops(gm, kinds=kinds)}
    chain = Chain(Step(*kinds), Kind.batch_norm)
    folds, skipped = [], []
    for match in list(chain.find(gm)):
        conv, bn_node = match.first, match[Kind.batch_norm]
        scope, op = bn_node.meta.get("module_path", bn_node.name), ops.get(conv)
        if not selects(op.module_path if op is not None else conv.meta.get("module_path", "")):
            continue
        pair = _pair(gm, op, bn_node, eval_only)
        if isinstance(pair, str):
            skipped.append({"scope": scope, "node": bn_node.name, "conv": conv.name, "reason": pair})
        else:
            folds.append(pair)
    return folds, skipped


def remove_folded_batch_norm(gm: torch.fx.GraphModule, fold: BatchNormFold):
    """Route the BatchNorm's users to the op and erase the node (and its module once nothing calls it)."""
    bn_node = fold.bn_node
    bn_node.replace_all_uses_with(fold.op.node)
    gm.graph.erase_node(bn_node)
    target = bn_node.target
    if bn_node.op == "call_module" and not any(
            (n.op == "call_module" and n.target == target) or (n.op == "get_attr" and n.target.startswith(target + "."))
            for n in gm.graph.nodes):
        gm.delete_submodule(bn_node.target)


def warn_not_folded(skipped: list[dict], where: str, consequence: str):
    """One warning naming every BatchNorm node left in the graph, its conv and why."""
    if skipped:
        warnings.warn(f"BatchNorm folding {where}: " + "; ".join(
            f"node {s['node']!r} ({s['scope']}) after conv node {s['conv']!r} not folded: {s['reason']}"
            for s in skipped) + f"; {consequence}", stacklevel=3)


def set_bias_arg(node: torch.fx.Node, bias: torch.fx.Node):
    """Point a functional conv/linear's bias argument (positional 2, or the ``bias`` keyword) at ``bias``."""
    if "bias" in node.kwargs:
        node.kwargs = {**node.kwargs, "bias": bias}
        return
    args = list(node.args)
    while len(args) < 3:
        args.append(None)
    args[2] = bias
    node.args = tuple(args)
