"""Per-op facts in one declarative table (NNCF calls these operator metatypes).

Each ``OpKind`` lists the module classes, functions and tensor-method names that
compute the same thing, so passes treat ``nn.ReLU``, ``F.relu``, ``torch.relu``
and ``x.relu()`` alike, and states the facts passes need: where the weight is,
which weight axis holds output channels, how channels pass through.

``op_kind(node, gm)`` answers "what is this node?" for every pass, with an
``OpKind`` object: passes compare with ``Kind.conv`` (``kind is Kind.conv``,
``kind in {Kind.conv, Kind.linear}``), never with the kind's name, so a
misspelt kind (``Kind.cnov``) raises at import instead of silently matching
nothing. Facts shared by several kinds are tags (``kinds_tagged("pooling")``).
``op_arg(node, kind, "groups")`` reads an argument by name, positional or keyword.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["OpKind", "OPS", "Kind", "KINDS", "op_kind", "kind_of", "kinds_tagged", "as_kinds", "KindSet", "op_arg", "called_module"]


@dataclass(frozen=True, eq=False)  # one object per kind: compared by identity
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
    # Names of the functional form's positional arguments (``op_arg`` reads them by name).
    arg_names: tuple[str, ...] = ()

    def __reduce__(self):  # unpickle to the one table object, so identity comparisons still hold
        return (_kind_named, (self.name,))

    def __repr__(self) -> str:
        return f"Kind.{self.name}"


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
# Tags: "weighted" (conv/linear forms with a weight argument), "int8_compute" (the runtime computes it
# in int8 on quantized inputs), "relu_like", "activation", "elementwise_binary", "pooling",
# "quantization_agnostic" (a quantized input gives an output on the same grid: NNCF's
# quantization-agnostic ops, through which quantizers are moved and looked up).
_AGNOSTIC = frozenset({"quantization_agnostic"})
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")

OPS: tuple[OpKind, ...] = (
    OpKind("conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d), (F.conv1d, F.conv2d, F.conv3d),
           weight_arg=1, bias_arg=2, weight_out_axis=0, tags=frozenset({"weighted", "int8_compute"}),
           arg_names=_CONV_ARGS),
    OpKind("conv_transpose", (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
           (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d),
           weight_arg=1, bias_arg=2, weight_out_axis=1, tags=frozenset({"weighted", "int8_compute"}),
           arg_names=_CONV_T_ARGS),
    OpKind("linear", (nn.Linear,), (F.linear,), weight_arg=1, bias_arg=2, weight_out_axis=0,
           tags=frozenset({"weighted", "int8_compute"}), arg_names=("input", "weight", "bias")),
    # torch.addmm(bias, x, weight) with a [in, out] weight: a linear layer with a transposed weight, as
    # transformers' Conv1D (GPT-2 and others) computes it; output channels on weight axis 1.
    OpKind("addmm", (), (torch.addmm,), ("addmm",), weight_arg=2, bias_arg=0, weight_out_axis=1,
           tags=frozenset({"weighted", "int8_compute"}), arg_names=("input", "mat1", "mat2")),
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
    OpKind("flatten", (nn.Flatten,), (torch.flatten,), ("flatten",), tags=_AGNOSTIC),
    OpKind("reshape", (), (torch.reshape,), ("view", "reshape"), tags=_AGNOSTIC),
    OpKind("max_pool", (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                        nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
           (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
            F.adaptive_max_pool3d), channel_passthrough=True, tags=frozenset({"pooling"}) | _AGNOSTIC),
    OpKind("avg_pool", (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                        nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
           (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d), channel_passthrough=True, tags=frozenset({"pooling"})),
    OpKind("mean", (), (torch.mean,), ("mean",)),
    OpKind("dropout", (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d), (F.dropout,),
           channel_passthrough=True, tags=_AGNOSTIC),
    OpKind("identity", (nn.Identity,), (), ("contiguous", "clone"), channel_passthrough=True, tags=_AGNOSTIC),
    OpKind("embedding", (nn.Embedding,), (F.embedding,), weight_arg=1),
    OpKind("transpose", (), (torch.transpose, torch.permute), ("transpose", "permute", "t"), tags=_AGNOSTIC),
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


def _kind_named(name: str) -> OpKind:
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown op kind {name!r}; the kinds are: {', '.join(sorted(KINDS))}") from None


class _KindNamespace:
    """``Kind.conv``, ``Kind.batch_norm``, ...: the table's kinds as attributes (an unknown one raises)."""

    def __init__(self, kinds: dict[str, OpKind]):
        self.__dict__.update(kinds)

    def __getattr__(self, name: str) -> OpKind:  # only reached for names that are not kinds
        raise AttributeError(f"unknown op kind {name!r}; the kinds are: {', '.join(sorted(KINDS))}")

    def __getitem__(self, name: str) -> OpKind:
        return _kind_named(name)

    def __setattr__(self, name, value):
        raise AttributeError("the op kinds are fixed by fxcompress.optable.OPS")


Kind = _KindNamespace(KINDS)


class KindSet(frozenset):
    """A set of op kinds that refuses to be asked about a kind's name: ``"conv" in kinds`` raises
    instead of answering False, so code still comparing names fails loudly."""

    def __contains__(self, item) -> bool:
        if isinstance(item, str):
            raise TypeError(f"op kinds are compared as objects (Kind.{item}), not by name ({item!r}); "
                            "use op_kind(node, gm), not kind_of(node, gm)")
        return super().__contains__(item)


def as_kinds(kinds) -> KindSet:
    """Kind objects from kind objects or kind names (an unknown name raises)."""
    return KindSet(k if isinstance(k, OpKind) else _kind_named(k) for k in kinds)


def kinds_tagged(tag: str) -> KindSet:
    """The kinds carrying ``tag`` (an unknown tag raises: it would match nothing)."""
    found = KindSet(k for k in OPS if tag in k.tags)
    if not found:
        raise KeyError(f"no op kind has the tag {tag!r}")
    return found


def op_arg(node: torch.fx.Node, kind: OpKind, name: str, default=None):
    """Argument ``name`` of a functional call of ``kind``, given positionally or by keyword."""
    if name not in kind.arg_names:
        raise KeyError(f"op kind {kind.name!r} has no argument {name!r} (it has {kind.arg_names})")
    index = kind.arg_names.index(name)
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


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
