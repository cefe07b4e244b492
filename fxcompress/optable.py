"""Per-op facts in one declarative table (NNCF calls these operator metatypes).

Each ``OpKind`` lists the module classes, functions and tensor-method names that
compute the same thing, so passes treat ``nn.ReLU``, ``F.relu``, ``torch.relu``
and ``x.relu()`` alike, and states the facts passes need: where the weight is,
which weight axis holds output channels, how channels pass through.

``op_kind(node, gm)`` answers "what is this node?" for every pass.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["OpKind", "OPS", "op_kind", "kind_of", "called_module"]


@dataclass(frozen=True)
class OpKind:
    name: str
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    # For weighted ops in functional form: positional index of weight and bias.
    weight_arg: int | None = None
    bias_arg: int | None = None
    # Weight axis that indexes output channels (conv/linear: 0, transposed conv: 1).
    weight_out_axis: int | None = None
    # Channel behaviour for pruning: "elementwise" ops keep channel c as channel c.
    channel_passthrough: bool = False
    tags: frozenset = field(default_factory=frozenset)


def _fns(*names):
    """Functions that exist in this torch version (some are version-specific)."""
    out = []
    for dotted in names:
        obj = torch
        for atom in dotted.split(".")[1:]:
            obj = getattr(obj, atom, None)
            if obj is None:
                break
        if obj is not None:
            out.append(obj)
    return tuple(out)


_RELU_LIKE = frozenset({"relu_like"})

OPS: tuple[OpKind, ...] = (
    OpKind("conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d), (F.conv1d, F.conv2d, F.conv3d),
           weight_arg=1, bias_arg=2, weight_out_axis=0, tags=frozenset({"weighted", "int8_compute"})),
    OpKind("conv_transpose", (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
           (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d),
           weight_arg=1, bias_arg=2, weight_out_axis=1, tags=frozenset({"weighted", "int8_compute"})),
    OpKind("linear", (nn.Linear,), (F.linear,), weight_arg=1, bias_arg=2, weight_out_axis=0,
           tags=frozenset({"weighted", "int8_compute"})),
    # torch.addmm(bias, x, weight) with a [in, out] weight: a linear layer with a transposed weight, as
    # transformers' Conv1D (GPT-2 and others) computes it; output channels on weight axis 1.
    OpKind("addmm", (), (torch.addmm,), ("addmm",), weight_arg=2, bias_arg=0, weight_out_axis=1,
           tags=frozenset({"weighted", "int8_compute"})),
    OpKind("matmul", (), (operator.matmul, torch.matmul, torch.bmm, torch.mm), ("matmul", "bmm", "mm"),
           tags=frozenset({"int8_compute"})),
    # q, k, v are its first three inputs; OpenVINO runs it (fused) in int8 when they are quantized.
    OpKind("attention", (), (F.scaled_dot_product_attention,), tags=frozenset({"int8_compute"})),
    OpKind("batch_norm", (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), (F.batch_norm,),
           channel_passthrough=True),
    OpKind("layer_norm", (nn.LayerNorm,), (F.layer_norm,)),
    OpKind("group_norm", (nn.GroupNorm,), (F.group_norm,)),
    OpKind("relu", (nn.ReLU, nn.ReLU6), (F.relu, torch.relu, F.relu6, F.relu_, torch.relu_),
           ("relu", "relu_"), channel_passthrough=True, tags=_RELU_LIKE | {"activation"}),
    OpKind("hardtanh", (nn.Hardtanh,), (F.hardtanh,), channel_passthrough=True, tags=frozenset({"activation"})),
    OpKind("leaky_relu", (nn.LeakyReLU,), (F.leaky_relu,), channel_passthrough=True,
           tags=frozenset({"activation"})),
    OpKind("gelu", (nn.GELU,), (F.gelu,), channel_passthrough=True, tags=frozenset({"activation"})),
    OpKind("sigmoid", (nn.Sigmoid,), (torch.sigmoid, F.sigmoid), ("sigmoid",), channel_passthrough=True,
           tags=frozenset({"activation"})),
    OpKind("tanh", (nn.Tanh,), (torch.tanh, F.tanh), ("tanh",), channel_passthrough=True,
           tags=frozenset({"activation"})),
    OpKind("silu", (nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish),
           (F.silu, F.hardswish, F.hardsigmoid, F.mish), channel_passthrough=True,
           tags=frozenset({"activation"})),
    OpKind("softmax", (nn.Softmax,), (F.softmax, torch.softmax), ("softmax",)),
    OpKind("add", (), (operator.add, operator.iadd, torch.add), ("add", "add_"),
           tags=frozenset({"elementwise_binary"})),
    OpKind("sub", (), (operator.sub, torch.sub), ("sub",), tags=frozenset({"elementwise_binary"})),
    OpKind("mul", (), (operator.mul, operator.imul, torch.mul), ("mul", "mul_"),
           tags=frozenset({"elementwise_binary"})),
    OpKind("div", (), (operator.truediv, torch.div), ("div",), tags=frozenset({"elementwise_binary"})),
    OpKind("cat", (), _fns("torch.cat", "torch.concat", "torch.concatenate")),
    OpKind("flatten", (nn.Flatten,), (torch.flatten,), ("flatten",)),
    OpKind("reshape", (), (torch.reshape,), ("view", "reshape")),
    OpKind("max_pool", (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                        nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
           (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
            F.adaptive_max_pool3d), channel_passthrough=True, tags=frozenset({"pooling"})),
    OpKind("avg_pool", (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                        nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
           (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d), channel_passthrough=True, tags=frozenset({"pooling"})),
    OpKind("mean", (), (torch.mean,), ("mean",)),
    OpKind("dropout", (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d), (F.dropout,),
           channel_passthrough=True),
    OpKind("identity", (nn.Identity,), (), ("contiguous", "clone"), channel_passthrough=True),
    OpKind("embedding", (nn.Embedding,), (F.embedding,), weight_arg=1),
    OpKind("transpose", (), (torch.transpose, torch.permute), ("transpose", "permute", "t")),
)

_BY_MODULE: dict[type, OpKind] = {}
_BY_FUNCTION: dict[Callable, OpKind] = {}
_BY_METHOD: dict[str, OpKind] = {}
for _kind in OPS:
    for _m in _kind.modules:
        _BY_MODULE[_m] = _kind
    for _f in _kind.functions:
        _BY_FUNCTION.setdefault(_f, _kind)
    for _name in _kind.methods:
        _BY_METHOD.setdefault(_name, _kind)
KINDS: dict[str, OpKind] = {k.name: k for k in OPS}


def called_module(node: torch.fx.Node, gm: torch.nn.Module) -> torch.nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def op_kind(node: torch.fx.Node, gm: torch.nn.Module) -> OpKind | None:
    """The ``OpKind`` of a node, whatever form (module, function, method) it takes."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        for cls in type(module).__mro__:
            if cls in _BY_MODULE:
                return _BY_MODULE[cls]
        return None
    if node.op == "call_function":
        try:
            return _BY_FUNCTION.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)
    return None


def kind_of(node: torch.fx.Node, gm: torch.nn.Module) -> str | None:
    kind = op_kind(node, gm)
    return kind.name if kind else None
