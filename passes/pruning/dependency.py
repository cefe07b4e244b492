"""Channel dependency analysis: which channels of which layers must be pruned together.

The model is Torch-Pruning's dependency graph at the granularity of single channels:

- a **space** is the channel axis of one node's output (``Space``): a conv's
  output channels, the same channels after BatchNorm and ReLU, the features of
  a flatten;
- an **edge** ties elements of two spaces through an explicit **index map**
  (``Edge``): identity for ops that pass channels through (BN, activations,
  pooling, dropout) and for the operands of a residual add; an offset for each
  input of a channel concat; a group map for grouped convs (each group's input
  channels and filters are one class, so whole groups are pruned; depthwise:
  input ``c`` <-> outputs ``c*m .. c*m+m-1``); a block map for flatten -> linear (channel ``c``
  <-> features ``[c*H*W, (c+1)*H*W)``, derived with sympy in ``index_maps``);
- a **class** is a set of elements tied together: pruning one prunes all of
  them. Classes are found by spreading over the edges with a worklist;
- a **group** is the set of classes whose producers (the convs that create
  the channels) overlap: the unit that is pruned at one ratio and reported in
  the statistics.

Roles: a *producer* is a conv / transposed conv / linear / addmm (transformers'
``Conv1D``) whose output channels start a space (its filters are what pruning
removes); a *consumer* is one of them reading a tracked space (its input
channels / features shrink); a *norm* is a BatchNorm module on a tracked space
(its channels shrink); a LayerNorm over exactly the channel axis passes channels
(``LayerNormSite``: masked while fine-tuning so that its statistics ignore
pruned channels), and per-channel parameters in add/mul (layer scales) shrink.

Anything the analysis does not understand *blocks* the spaces that reach it,
with a reason: an unknown op, an op mixing channels (GroupNorm, softmax over
channels, matmul), a tensor whose channels are not tracked combined with a
tracked one, the model output, a grouped conv whose inputs are not tracked, a
shared weight.
A group containing a blocked element is never pruned, so the analysis can
only give up, never produce a wrong model.

Each space also carries ``zero``: whether its pruned elements are provably
exactly 0 in the masked model (producers' filters are masked; BN outputs are
masked when ``prune_batch_norms``; ``relu(0) == 0`` but ``sigmoid(0) != 0``; a
sum is zero where both operands are; a product where one is). The pass puts an
input mask in front of every consumer whose input is not provably zero there,
which is what makes the folded model equal the masked one.

This module decides; it does not touch the graph (``FilterPruning`` does).
"""
from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.fx

from fxcompress.flops import positions
from fxcompress.optable import Kind, OpKind, op_arg, op_kind
from fxcompress.quantizers import is_quantizer
from fxcompress.weights import WeightedOp, parameter_of

from .index_maps import reshape_channel_map

__all__ = ["Space", "Edge", "Layer", "Norm", "LayerNormSite", "Group", "ChannelAnalysis", "analyze_channels", "shape_args"]


@dataclass(eq=False)
class Space:
    """The channel axis ``axis`` (of ``size`` elements) of ``node``'s output; elements ``start..start+size-1``."""
    index: int
    node: torch.fx.Node
    axis: int
    size: int
    start: int
    ndim: int
    zero: bool = True

    @property
    def ids(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.size)

    def __repr__(self):
        return f"Space({self.node.name}, axis={self.axis}, size={self.size})"


@dataclass(eq=False)
class Edge:
    """Element ``index_a[k]`` of ``a`` and element ``index_b[k]`` of ``b`` are pruned together."""
    a: Space
    b: Space
    index_a: np.ndarray
    index_b: np.ndarray
    why: str


def _data_arg(kind: OpKind) -> int:
    """Position of the data input: addmm(bias, x, weight) is transformers' Conv1D; the others take it first."""
    return 1 if kind is Kind.addmm else 0


@dataclass(eq=False)
class Layer:
    """A conv / transposed conv / linear / addmm (Conv1D) in functional form (see ``fxcompress.weights``)."""
    node: torch.fx.Node
    kind: OpKind
    module_path: str
    weight_target: str | None
    bias_target: str | None
    weight_shape: tuple
    groups: int
    spatial: int          # positions per sample the weight is applied at
    stride: tuple
    problem: str | None = None   # why its channels cannot change (shared weight, grouped conv, ...)
    in_space: Space | None = None
    out_space: Space | None = None
    first: bool = False   # no conv/linear between the model input and this layer

    @property
    def out_axis(self) -> int:
        return self.kind.weight_out_axis

    @property
    def in_axis(self) -> int:
        return 1 - self.kind.weight_out_axis  # conv_transpose, addmm: [in, out]

    @property
    def input_arg(self) -> int:
        return _data_arg(self.kind)

    @property
    def weight_arg(self) -> int:
        return self.kind.weight_arg

    @property
    def bias_arg(self) -> int:
        return self.kind.bias_arg

    @property
    def data_input(self):
        return self.node.args[self.input_arg] if len(self.node.args) > self.input_arg else None

    @property
    def in_channels(self) -> int:
        if len(self.weight_shape) < 2:
            return -1
        if self.kind is Kind.conv:
            return self.weight_shape[1] * self.groups
        return self.weight_shape[self.in_axis]

    @property
    def grouped(self) -> bool:
        """A grouped conv (depthwise included): group ``k``'s filters read only group ``k``'s inputs."""
        return self.kind is Kind.conv and self.groups > 1

    @property
    def depthwise(self) -> bool:
        return self.grouped and self.groups == self.in_channels

    @property
    def downsampling(self) -> bool:
        return self.kind is Kind.conv and any(int(s) > 1 for s in self.stride)

    @property
    def name(self) -> str:
        return self.module_path or self.node.name


@dataclass(eq=False)
class Norm:
    node: torch.fx.Node
    module_path: str
    space: Space


@dataclass(eq=False)
class LayerNormSite:
    """A LayerNorm over a tracked last axis; ``weight`` / ``bias``: parameter targets (or None)."""
    node: torch.fx.Node
    space: Space          # its output channels
    weight: str | None
    bias: str | None
    eps: float


@dataclass(eq=False)
class Group:
    """Classes pruned together at one ratio; ``reasons`` is empty when the group can be pruned."""
    id: int
    classes: np.ndarray
    producers: list[Layer]
    consumers: list[Layer]
    norms: list[Norm]
    reasons: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def prunable(self) -> bool:
        return not self.reasons

    def describe(self) -> str:
        return ", ".join(p.name for p in self.producers)


def shape_args(node: torch.fx.Node) -> tuple[list, object] | None:
    """The target shape of a view/reshape node as a list, and how to write it back, or None.

    Besides literal shapes, ``x.view(y.size()[:-1] + (n,))`` (transformers' ``Conv1D``) reads as
    ``[None, ..., n]`` (form ``"size_prefix"``): a prefix computed at run time and a literal tail.
    """
    if node.op == "call_method" and node.target in ("view", "reshape"):
        rest = list(node.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            return list(rest[0]), "tuple_arg"
        if len(rest) == 1 and _size_prefix_tail(rest[0]) is not None:
            tail = list(rest[0].args[1])
            out_shape = _tensor_shape(node)
            if out_shape is None or len(out_shape) < len(tail):
                return None
            return [None] * (len(out_shape) - len(tail)) + tail, "size_prefix"
        return rest, "varargs"
    if node.op == "call_function" and node.target is torch.reshape:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
        if isinstance(shape, (tuple, list)):
            return list(shape), "function"
    return None


def _size_prefix_tail(shape) -> tuple | None:
    """The literal tail of ``<sizes of a tensor>[:k] + (n, ...)``, the shape node's only use, or None."""
    if not (isinstance(shape, torch.fx.Node) and shape.op == "call_function" and shape.target is operator.add
            and len(shape.args) == 2 and len(shape.users) == 1):
        return None
    prefix, tail = shape.args
    if not (isinstance(prefix, torch.fx.Node) and prefix.op == "call_function" and prefix.target is operator.getitem
            and isinstance(prefix.args[0], torch.fx.Node) and prefix.args[0].op == "call_method"
            and prefix.args[0].target == "size" and len(prefix.args[0].args) == 1):
        return None
    return tail if isinstance(tail, tuple) and all(isinstance(v, int) for v in tail) else None


def _tensor_shape(node) -> tuple | None:
    shape = node.meta.get("shape") if isinstance(node, torch.fx.Node) else None
    if isinstance(shape, tuple) and all(isinstance(s, int) for s in shape):
        return shape
    return None


def _data_input(node: torch.fx.Node):
    if node.args:
        return node.args[0]
    return node.kwargs.get("input")


def _describe(node: torch.fx.Node, gm) -> str:
    kind = op_kind(node, gm)
    if node.op == "call_module":
        what = type(gm.get_submodule(node.target)).__name__
    elif node.op == "call_method":
        what = f".{node.target}()"
    else:
        what = getattr(node.target, "__name__", str(node.target))
    where = node.meta.get("module_path") or ""
    return f"'{node.name}' ({what}{', kind ' + kind.name if kind else ''}{' in ' + where if where else ''})"


_SIZE_QUERIES = frozenset({"size", "dim"})
_POWER = (operator.pow, torch.pow)


def _is_scalar_power(node: torch.fx.Node) -> bool:
    """``x ** p`` / ``torch.pow(x, p)`` / ``x.pow(p)`` with a number ``p``: elementwise on channels."""
    is_pow = (node.op == "call_function" and node.target in _POWER) or \
        (node.op == "call_method" and node.target == "pow")
    return is_pow and len(node.args) == 2 and isinstance(node.args[1], (int, float)) and not node.kwargs


class ChannelAnalysis:
    """The result: spaces, edges, layers, classes and groups of one graph (see the module docstring)."""

    def __init__(self, gm: torch.fx.GraphModule, ops: Iterable[WeightedOp], prune_batch_norms: bool = True):
        self.gm = gm
        self.prune_batch_norms = prune_batch_norms
        self.spaces: list[Space] = []
        self.edges: list[Edge] = []
        self.blocks: list[tuple[Space, str, np.ndarray | None]] = []
        self.norms: list[Norm] = []
        self.layer_norms: list[LayerNormSite] = []
        # per-channel parameters outside conv/linear/BatchNorm (LayerNorm affine, layer scales):
        # (space, parameters per channel), for the cost model
        self.channel_params: list[tuple[Space, int]] = []
        self.reshapes: list[torch.fx.Node] = []
        self.space_of: dict[torch.fx.Node, Space] = {}
        self.layers: dict[torch.fx.Node, Layer] = {}
        self._num_elements = 0
        for op in ops:
            self.layers[op.node] = self._layer(op)
        self._mark_shared_weights()
        self._sweep()
        self._find_classes()
        self._find_groups()

    # -- layers -------------------------------------------------------------------------
    def _layer(self, op: WeightedOp) -> Layer:
        node, kind = op.node, op.kind
        weight = op.weight(self.gm)
        weight_target = op.weight_source.target if op.weight_source is not None else None
        weight_arg = node.args[op.kind.weight_arg] if len(node.args) > op.kind.weight_arg else None
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else (_tensor_shape(weight_arg) or ())
        bias_arg = node.args[kind.bias_arg] if len(node.args) > kind.bias_arg else node.kwargs.get("bias")
        bias_source = parameter_of(bias_arg)
        bias_target = bias_source.target if bias_source is not None else None
        groups, stride = 1, (1,)
        if kind in (Kind.conv, Kind.conv_transpose):
            groups = op_arg(node, kind, "groups", 1)
            stride = op_arg(node, kind, "stride", 1)
        stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride,)
        input_index = _data_arg(kind)
        out_shape = _tensor_shape(node)
        in_shape = _tensor_shape(node.args[input_index]) if len(node.args) > input_index else None
        spatial = positions(kind, in_shape, out_shape) if out_shape and in_shape else 1
        layer = Layer(node, kind, op.module_path, weight_target, bias_target, shape,
                      int(groups) if isinstance(groups, int) else -1, spatial, stride)
        if weight_target is None or not isinstance(weight, torch.Tensor):
            layer.problem = f"{layer.name}: its weight is computed in the graph, not a parameter"
        elif not isinstance(groups, int) or any(not isinstance(s, int) for s in stride):
            layer.problem = f"{layer.name}: groups/stride are computed at run time"
        elif bias_arg is not None and bias_target is None:
            layer.problem = f"{layer.name}: its bias is computed in the graph, not a parameter"
        elif kind is Kind.conv_transpose and groups > 1:
            layer.problem = f"{layer.name}: grouped transposed convolution (groups={groups})"
        elif out_shape is None or in_shape is None:
            layer.problem = f"{layer.name}: no shape metadata"
        return layer

    def _mark_shared_weights(self):
        owners: dict[int, list[Layer]] = {}
        for layer in self.layers.values():
            if layer.weight_target is not None:
                tensor = self._attr(layer.weight_target)
                owners.setdefault(id(tensor), []).append(layer)
        for group in owners.values():
            if len(group) > 1:
                names = ", ".join(l.node.name for l in group)
                for layer in group:
                    layer.problem = layer.problem or f"{layer.name}: its weight is shared by {names}"

    def _attr(self, target: str):
        value = self.gm
        for atom in target.split("."):
            value = getattr(value, atom)
        return value

    # -- spaces and edges ------------------------------------------------------------------
    def _new_space(self, node, axis: int, size: int, zero: bool) -> Space:
        shape = _tensor_shape(node)
        space = Space(len(self.spaces), node, axis, size, self._num_elements, len(shape) if shape else 0, zero)
        self._num_elements += size
        self.spaces.append(space)
        self.space_of[node] = space
        return space

    def _tie(self, a: Space, b: Space, index_a, index_b, why: str):
        self.edges.append(Edge(a, b, np.asarray(index_a, dtype=np.int64), np.asarray(index_b, dtype=np.int64), why))

    def _identity(self, a: Space, b: Space, why: str):
        self._tie(a, b, np.arange(a.size), np.arange(b.size), why)

    def _block(self, space: Space, reason: str, elements: np.ndarray | None = None):
        """Never prune ``space`` (or only its ``elements``) nor anything tied to it."""
        self.blocks.append((space, reason, elements))

    # -- the sweep over the graph in topological order ------------------------------------
    def _sweep(self):
        after_weighted: set[torch.fx.Node] = set()
        module_calls: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                module_calls[node.target] = module_calls.get(node.target, 0) + 1
        self._module_calls = module_calls
        for node in self.gm.graph.nodes:
            inputs = node.all_input_nodes
            if node in self.layers:
                data = self.layers[node].data_input
                self.layers[node].first = not (isinstance(data, torch.fx.Node) and
                                               (data in after_weighted or data in self.layers))
            if any(i in after_weighted or i in self.layers for i in inputs):
                after_weighted.add(node)
            if node.op in ("placeholder", "get_attr"):
                continue
            tracked = [i for i in inputs if i in self.space_of]
            if node.op == "output":
                for i in tracked:
                    self._block(self.space_of[i], f"'{i.name}' is (part of) the model output")
                continue
            if not tracked and node not in self.layers:
                continue
            claimed = self._visit(node, tracked)
            for i in tracked:
                if i not in claimed:
                    self._block(self.space_of[i], f"used by {_describe(node, self.gm)}, which the channel "
                                                  f"analysis does not understand")

    def _visit(self, node: torch.fx.Node, tracked: list[torch.fx.Node]) -> set:
        if node in self.layers:
            return self._visit_layer(node, self.layers[node])
        if node.op == "call_method" and node.target in _SIZE_QUERIES:
            return set(tracked)  # shape queries: recomputed on the smaller tensor at run time
        if node.op == "call_function" and node.target is getattr and len(node.args) > 1 \
                and node.args[1] in ("shape", "ndim", "dtype", "device"):
            return set(tracked)
        kind = op_kind(node, self.gm)
        if kind is Kind.batch_norm:
            return self._visit_norm(node)
        if kind is Kind.layer_norm:
            return self._visit_layer_norm(node)
        if self._is_passthrough_module(node):
            return self._visit_passthrough(node, zero_preserving=True, pooling=False)
        if kind is not None and kind.channel_passthrough:
            pooling = "pooling" in kind.tags
            zero = pooling or kind in (Kind.dropout, Kind.identity) or self._maps_zero_to_zero(node)
            return self._visit_passthrough(node, zero_preserving=zero, pooling=pooling)
        if kind in (Kind.add, Kind.sub, Kind.mul, Kind.div):
            return self._visit_binary(node, kind)
        if kind is Kind.cat:
            return self._visit_cat(node)
        if kind in (Kind.flatten, Kind.reshape):
            return self._visit_reshape(node)
        if kind is Kind.mean:
            return self._visit_mean(node)
        if kind is Kind.transpose:
            return self._visit_transpose(node)
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "stochastic_depth" \
                and getattr(node.target, "__module__", "").startswith("torchvision"):
            # drops whole samples (training) or nothing (eval): channels pass through, zero stays zero
            return self._visit_passthrough(node, zero_preserving=True, pooling=False)
        if _is_scalar_power(node):  # x ** 3 in a decomposed GELU (GPT-2's NewGELU)
            return self._visit_passthrough(node, zero_preserving=self._maps_zero_to_zero(node), pooling=False)
        return set()

    def _is_passthrough_module(self, node) -> bool:
        """Per-tensor activation quantizers inserted by an earlier pass pass channels through."""
        if node.op != "call_module" or not node.meta.get("inserted_by"):
            return False
        module = self.gm.get_submodule(node.target)
        return is_quantizer(module) and getattr(module, "axis", 0) is None

    def _visit_layer(self, node, layer: Layer) -> set:
        x = layer.data_input
        claimed = set()
        if isinstance(x, torch.fx.Node) and x in self.space_of:
            claimed.add(x)
            space = self.space_of[x]
            channel_axis = 1 if layer.kind in (Kind.conv, Kind.conv_transpose) else space.ndim - 1
            if space.axis != channel_axis:
                self._block(space, f"reaches {layer.name} on axis {space.axis}, not on its channel axis")
            elif layer.problem:
                self._block(space, layer.problem)
            else:
                layer.in_space = space
        shape = _tensor_shape(node)
        if shape is None:
            return claimed
        # output channels: axis 1 of a conv's output, the last axis of a linear layer's
        axis = 1 if layer.kind in (Kind.conv, Kind.conv_transpose) else len(shape) - 1
        out = self._new_space(node, axis, shape[axis], zero=True)
        layer.out_space = out
        if layer.problem:
            self._block(out, layer.problem)
        elif layer.grouped:
            self._tie_conv_groups(layer, out)
        return claimed

    def _tie_conv_groups(self, layer: Layer, out: Space):
        """Group ``k`` of a grouped conv is pruned whole: its input and output channels form one class.

        Its filters read only group ``k``'s input channels, so removing the group (inputs, filters,
        and one from ``groups``) leaves the other groups' outputs exactly as they were. A depthwise
        conv is the case of one input channel per group: input ``c`` <-> outputs ``c*m .. c*m+m-1``.
        """
        if layer.in_space is None:
            self._block(out, f"{layer.name}: grouped convolution (groups={layer.groups}) whose input "
                             f"channels cannot be pruned")
            return
        groups, ins = layer.groups, layer.in_space
        a, b = ins.size // groups, out.size // groups
        inputs, outputs = np.arange(ins.size), np.arange(out.size)
        # connect every input channel to its group's first filter and every filter to its group's first input
        self._tie(ins, out, inputs, (inputs // a) * b, f"group of {layer.name}")
        self._tie(ins, out, (outputs // b) * a, outputs, f"group of {layer.name}")

    def _visit_norm(self, node) -> set:
        x = _data_input(node)
        if node.op != "call_module" or x not in self.space_of:
            return set()  # functional batch_norm: separate parameter tensors the fold cannot slice
        space = self.space_of[x]
        if space.axis != 1 or self._module_calls.get(node.target, 0) > 1:
            return set()
        out = self._new_space(node, 1, space.size, zero=self.prune_batch_norms)
        self._identity(space, out, f"batch norm {node.target}")
        self.norms.append(Norm(node, node.target, out))
        return {x}

    def _visit_layer_norm(self, node) -> set:
        """LayerNorm over exactly the channel axis (the last one): channels pass through.

        While fine-tuning, ``FilterPruning`` replaces it by a ``ChannelMaskedLayerNorm`` (statistics
        of the kept channels, zero at pruned ones) so that the folded LayerNorm computes the same.
        """
        x = _data_input(node)
        space = self.space_of.get(x)
        if space is None or space.axis != space.ndim - 1:
            return set()
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            if type(module) is not torch.nn.LayerNorm or self._module_calls.get(node.target, 0) > 1 \
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
                    any(p is not None and not self._own_parameter(p) for p in params):
                return set()
            shape = tuple(shape)
            weight, bias = (p.target if p is not None else None for p in params)
        if shape != (space.size,):
            self._block(space, f"'{node.name}' normalizes over {list(shape)}, not over its {space.size} channels")
            return {x}
        out = self._new_space(node, space.axis, space.size, zero=True)
        self._identity(space, out, f"layer norm {node.name}")
        self.layer_norms.append(LayerNormSite(node, out, weight, bias, float(eps)))
        self.channel_params.append((out, (weight is not None) + (bias is not None)))
        return {x}

    def _own_parameter(self, node) -> bool:
        """A ``get_attr`` of a tensor that no other ``get_attr`` reads and only one node uses (the fold slices it)."""
        if not (isinstance(node, torch.fx.Node) and node.op == "get_attr" and len(node.users) == 1):
            return False
        return sum(1 for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == node.target) == 1

    def _visit_passthrough(self, node, zero_preserving: bool, pooling: bool) -> set:
        x = _data_input(node)
        if x not in self.space_of:
            return set()
        space = self.space_of[x]
        shape = _tensor_shape(node)
        if shape is None or len(shape) != space.ndim or shape[space.axis] != space.size:
            return set()
        if pooling and space.axis != 1:
            return set()
        if any(isinstance(a, torch.fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
            return set()  # a tensor-valued parameter (threshold, min/max): not understood
        out = self._new_space(node, space.axis, space.size, zero=space.zero and zero_preserving)
        self._identity(space, out, f"passes channels through {node.name}")
        return {x}

    def _maps_zero_to_zero(self, node) -> bool:
        """f(0) == 0 for an elementwise activation, evaluated on a zero tensor."""
        dtype = node.meta.get("dtype") if isinstance(node.meta.get("dtype"), torch.dtype) else torch.float32
        zero = torch.zeros(1, dtype=dtype)
        try:
            with torch.no_grad():
                if node.op == "call_module":
                    out = self.gm.get_submodule(node.target)(zero)
                elif node.op == "call_function":
                    out = node.target(zero, *node.args[1:], **node.kwargs)
                else:
                    out = getattr(zero, node.target)(*node.args[1:], **node.kwargs)
        except Exception:  # noqa: BLE001 - unknown signature: assume it does not preserve zero
            return False
        return isinstance(out, torch.Tensor) and bool((out == 0).all())

    def _visit_binary(self, node, kind: OpKind) -> set:
        shape = _tensor_shape(node)
        operands = list(node.args[:2])
        if shape is None or len(operands) != 2 or any(isinstance(v, torch.fx.Node) for v in node.kwargs.values()):
            return set()
        ndim = len(shape)
        tracked = [o for o in operands if isinstance(o, torch.fx.Node) and o in self.space_of]
        axes = {self.space_of[o].axis + ndim - self.space_of[o].ndim for o in tracked}
        claimed = set(tracked)
        if len(axes) != 1:
            for o in tracked:
                self._block(self.space_of[o], f"'{node.name}' combines channels on different axes")
            return claimed
        axis = axes.pop()
        ties, others_zero, untracked_channelwise = [], [], None
        for o in operands:
            if isinstance(o, torch.fx.Node) and o in self.space_of:
                space = self.space_of[o]
                if space.size == shape[axis]:
                    ties.append(o)
                else:
                    self._block(space, f"'{node.name}' broadcasts its {space.size} channel(s) across "
                                       f"{shape[axis]}")
            elif isinstance(o, torch.fx.Node):
                oshape = _tensor_shape(o)
                if oshape is not None:
                    k = axis - (ndim - len(oshape))
                    if k >= 0 and oshape[k] > 1:
                        if self._own_parameter(o) and oshape[k] == shape[axis] and \
                                math.prod(oshape) == oshape[k] and kind in (Kind.add, Kind.sub, Kind.mul):
                            # a per-channel parameter (ConvNeXt's layer scale): its channels are sliced too
                            param = self._new_space(o, k, oshape[k], zero=False)
                            self.channel_params.append((param, 1))
                            ties.append(o)
                            continue
                        untracked_channelwise = o
                others_zero.append(False)
            else:
                others_zero.append(isinstance(o, (int, float)) and o == 0)
        if untracked_channelwise is not None:
            for o in ties:
                self._block(self.space_of[o], f"'{node.name}' combines it with '{untracked_channelwise.name}', "
                                              f"whose channels are not tracked")
            return claimed
        if kind is Kind.div and len(ties) and operands[1] in ties:
            self._block(self.space_of[operands[1]], f"'{node.name}' divides by channels that pruning zeroes")
            ties = [o for o in ties if o is not operands[1]]
        if not ties:
            return claimed
        zeros = [self.space_of[o].zero for o in ties]
        if kind in (Kind.add, Kind.sub):
            zero = all(zeros) and all(others_zero) and len(ties) + len(others_zero) == 2
        elif kind is Kind.mul:
            zero = any(zeros) or any(others_zero)
        else:  # div: numerator
            zero = operands[0] in ties and self.space_of[operands[0]].zero
        out = self._new_space(node, axis, shape[axis], zero=zero)
        for o in ties:
            self._identity(self.space_of[o], out, f"'{node.name}' ({kind.name}) ties its operands' channels")
        return claimed

    def _visit_cat(self, node) -> set:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = _tensor_shape(node)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or shape is None:
            return set()
        dim = dim % len(shape)
        tracked = [t for t in tensors if isinstance(t, torch.fx.Node) and t in self.space_of]
        claimed = set(tracked)
        axes = {self.space_of[t].axis for t in tracked}
        if len(axes) != 1 or any(self.space_of[t].ndim != len(shape) for t in tracked):
            for t in tracked:
                self._block(self.space_of[t], f"'{node.name}' concatenates tensors with channels on different axes")
            return claimed
        axis = axes.pop()
        if dim == axis:
            if any(_tensor_shape(t) is None for t in tensors):
                for t in tracked:
                    self._block(self.space_of[t], f"'{node.name}' concatenates a tensor without shape metadata")
                return claimed
            out = self._new_space(node, axis, shape[axis], zero=all(self.space_of[t].zero for t in tracked))
            offset = 0
            for t in tensors:
                tshape = _tensor_shape(t)
                if t in self.space_of:
                    space = self.space_of[t]
                    self._tie(space, out, np.arange(space.size), offset + np.arange(space.size),
                              f"'{node.name}' concatenates it at offset {offset}")
                else:  # channels nothing can remove (e.g. the model input): a depthwise conv must keep them
                    self._block(out, f"'{node.name}' concatenates '{getattr(t, 'name', t)}', whose channels are "
                                     f"not tracked", offset + np.arange(tshape[dim]))
                offset += tshape[dim]
            return claimed
        ties = []
        for t in tensors:
            if t in self.space_of and self.space_of[t].size == shape[axis]:
                ties.append(t)
            else:
                tshape = _tensor_shape(t)
                if t in self.space_of or tshape is None or tshape[axis] > 1:
                    for u in tracked:
                        self._block(self.space_of[u], f"'{node.name}' concatenates it with '{getattr(t, 'name', t)}' "
                                                      f"whose channels do not line up")
                    return claimed
        out = self._new_space(node, axis, shape[axis], zero=all(self.space_of[t].zero for t in ties))
        for t in ties:
            self._identity(self.space_of[t], out, f"'{node.name}' concatenates along another axis")
        return claimed

    def _visit_reshape(self, node) -> set:
        x = _data_input(node)
        if x not in self.space_of:
            return set()
        space = self.space_of[x]
        in_shape, out_shape = _tensor_shape(x), _tensor_shape(node)
        if in_shape is None or out_shape is None:
            return set()
        mapping = reshape_channel_map(in_shape, space.axis, out_shape)
        if mapping is None:
            self._block(space, f"'{node.name}' reshapes {list(in_shape)} to {list(out_shape)}, spreading the "
                               f"channels of axis {space.axis} over several axes")
            return {x}
        literal = False
        parsed = shape_args(node)
        if op_kind(node, self.gm) is Kind.reshape:
            if parsed is None or len(parsed[0]) != len(out_shape):
                self._block(space, f"'{node.name}': cannot read its target shape")
                return {x}
            entry = parsed[0][mapping.out_axis]
            if self._size_of_channels(entry, x, space):
                entry = -1  # x.size(axis) of the channels themselves: follows them at run time
            if not isinstance(entry, int):
                self._block(space, f"'{node.name}': the size of axis {mapping.out_axis} is computed at run time")
                return {x}
            literal = entry != -1
        out = self._new_space(node, mapping.out_axis, out_shape[mapping.out_axis], zero=space.zero)
        self._tie(space, out, mapping.index, np.arange(out.size),
                  f"'{node.name}': channel -> {mapping.expression}")
        if literal:
            self.reshapes.append(node)
        return {x}

    @staticmethod
    def _size_of_channels(entry, x: torch.fx.Node, space: Space) -> bool:
        """``entry`` is ``x.size(d)`` with ``d`` the channel axis of ``x``."""
        if not (isinstance(entry, torch.fx.Node) and entry.op == "call_method" and entry.target == "size"
                and len(entry.args) == 2 and entry.args[0] is x and isinstance(entry.args[1], int)):
            return False
        return entry.args[1] % space.ndim == space.axis

    def _visit_mean(self, node) -> set:
        x = _data_input(node)
        space = self.space_of.get(x)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        shape = _tensor_shape(node)
        if space is None or dims is None or not isinstance(keepdim, bool) or shape is None:
            return set()
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            return set()
        dims = [d % space.ndim for d in dims]
        if space.axis in dims:
            self._block(space, f"'{node.name}' averages over the channel axis")
            return {x}
        axis = space.axis if keepdim else space.axis - sum(d < space.axis for d in dims)
        out = self._new_space(node, axis, space.size, zero=space.zero)
        self._identity(space, out, f"'{node.name}' averages other axes")
        return {x}

    def _visit_transpose(self, node) -> set:
        x = _data_input(node)
        space = self.space_of.get(x)
        shape = _tensor_shape(node)
        if space is None or shape is None:
            return set()
        rest = list(node.args[1:])
        if node.target in ("permute", torch.permute):
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            dims = dims or node.kwargs.get("dims")
            if not dims or not all(isinstance(d, int) for d in dims):
                return set()
            dims = [d % space.ndim for d in dims]
            axis = dims.index(space.axis)
        elif node.target == "t":
            axis = 1 - space.axis
        else:
            d0 = rest[0] if rest else node.kwargs.get("dim0")
            d1 = rest[1] if len(rest) > 1 else node.kwargs.get("dim1")
            if not isinstance(d0, int) or not isinstance(d1, int):
                return set()
            d0, d1 = d0 % space.ndim, d1 % space.ndim
            axis = d1 if space.axis == d0 else d0 if space.axis == d1 else space.axis
        out = self._new_space(node, axis, space.size, zero=space.zero)
        self._identity(space, out, f"'{node.name}' moves the channel axis to {axis}")
        return {x}

    # -- classes: spread over the edges with a worklist ---------------------------------------
    def _find_classes(self):
        n = self._num_elements
        self.element_space = np.zeros(n, dtype=np.int64)
        for space in self.spaces:
            self.element_space[space.start:space.start + space.size] = space.index
        neighbours: list[list[int]] = [[] for _ in range(n)]
        for edge in self.edges:
            for i, j in zip((edge.a.start + edge.index_a).tolist(), (edge.b.start + edge.index_b).tolist()):
                neighbours[i].append(j)
                neighbours[j].append(i)
        class_of = np.full(n, -1, dtype=np.int64)
        count = 0
        for seed in range(n):
            if class_of[seed] >= 0:
                continue
            class_of[seed] = count
            work = deque([seed])
            while work:
                e = work.popleft()
                for f in neighbours[e]:
                    if class_of[f] < 0:
                        class_of[f] = count
                        work.append(f)
            count += 1
        self.class_of = class_of
        self.num_classes = count
        # per class: the spaces it touches and how many of their elements
        pairs = class_of * max(1, len(self.spaces)) + self.element_space
        uniq, counts = np.unique(pairs, return_counts=True)
        cls, spc = uniq // max(1, len(self.spaces)), uniq % max(1, len(self.spaces))
        self.class_spaces: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.int64), np.zeros(0, np.int64))
                                                                 for _ in range(count)]
        bounds = np.searchsorted(cls, np.arange(count + 1))
        for c in range(count):
            lo, hi = bounds[c], bounds[c + 1]
            self.class_spaces[c] = (spc[lo:hi], counts[lo:hi])
        self.blocked: dict[int, str] = {}
        for space, reason, elements in self.blocks:
            ids = space.ids if elements is None else space.start + elements
            for c in np.unique(class_of[ids]).tolist():
                self.blocked.setdefault(c, reason)

    # -- groups: classes whose producers overlap ---------------------------------------------
    def _find_groups(self):
        parent = list(range(self.num_classes))

        def find(c):
            while parent[c] != c:
                parent[c] = parent[parent[c]]
                c = parent[c]
            return c

        producers = [l for l in self.layers.values() if l.out_space is not None]
        produced = np.zeros(self.num_classes, dtype=bool)
        for layer in producers:
            classes = np.unique(self.class_of[layer.out_space.ids])
            produced[classes] = True
            root = find(int(classes[0]))
            for c in classes[1:].tolist():
                parent[find(c)] = root
        by_root: dict[int, list[int]] = {}
        for c in np.nonzero(produced)[0].tolist():
            by_root.setdefault(find(c), []).append(c)
        self.group_of = np.full(self.num_classes, -1, dtype=np.int64)
        self.groups: list[Group] = []
        for classes in sorted(by_root.values(), key=lambda cs: cs[0]):
            gid = len(self.groups)
            arr = np.asarray(classes, dtype=np.int64)
            self.group_of[arr] = gid
            self.groups.append(Group(gid, arr, [], [], []))
        for layer in producers:
            g = self.groups[self.group_of[self.class_of[layer.out_space.start]]]
            g.producers.append(layer)
        for layer in self.layers.values():
            if layer.in_space is not None:
                for gid in self._groups_in(layer.in_space):
                    self.groups[gid].consumers.append(layer)
        for norm in self.norms:
            for gid in self._groups_in(norm.space):
                self.groups[gid].norms.append(norm)
        for group in self.groups:
            reasons = {self.blocked[c] for c in group.classes.tolist() if c in self.blocked}
            group.reasons.extend(sorted(reasons))

    def _groups_in(self, space: Space) -> list[int]:
        gids = np.unique(self.group_of[self.class_of[space.ids]])
        return [int(g) for g in gids if g >= 0]

    # -- queries ----------------------------------------------------------------------------------
    def classes_of(self, space: Space) -> np.ndarray:
        return self.class_of[space.start:space.start + space.size]

    def keep(self, space: Space, pruned: np.ndarray) -> np.ndarray:
        """Boolean keep vector of ``space`` given a boolean ``pruned`` flag per class."""
        return ~pruned[self.classes_of(space)]

    def summary(self) -> str:
        lines = [f"{len(self.spaces)} spaces, {self._num_elements} elements, {self.num_classes} classes, "
                 f"{len(self.groups)} groups"]
        for g in self.groups:
            status = "prunable" if g.prunable else "blocked: " + "; ".join(g.reasons)
            lines.append(f"group {g.id}: {g.size} channels, producers [{g.describe()}], consumers "
                         f"[{', '.join(c.name for c in g.consumers)}] - {status}")
        return "\n".join(lines)


def analyze_channels(gm: torch.fx.GraphModule, ops: Iterable[WeightedOp],
                     prune_batch_norms: bool = True) -> ChannelAnalysis:
    """Analyze ``gm`` (conv/linear already in functional form, ``ops`` from ``weighted_ops(gm)``)."""
    return ChannelAnalysis(gm, ops, prune_batch_norms)
