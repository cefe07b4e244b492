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

How channels flow through each op kind, and what it pins, is a *channel rule* registered by op
kind in ``channels/`` (one module per op family, as Torch-Pruning registers one pruner per layer
type); this module holds the sweep that applies them, the classes and the groups. It decides; it
does not touch the graph (``FilterPruning`` does).
"""
from __future__ import annotations

from collections import deque
from typing import Iterable

import numpy as np
import torch
import torch.fx

from fxcompress.weights import WeightedOp

from .channels import rule_for
from .channels.graph import describe, tensor_shape
from .channels.layers import build_layer, mark_shared_weights
from .channels.model import Edge, Group, Layer, LayerNormSite, Norm, Space
from .channels.shapes import shape_args

__all__ = ["Space", "Edge", "Layer", "Norm", "LayerNormSite", "Group", "ChannelAnalysis", "analyze_channels", "shape_args"]


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
            self.layers[op.node] = build_layer(gm, op)
        mark_shared_weights(self.layers.values(), gm)
        self._sweep()
        self._find_classes()
        self._find_groups()

    # -- what the channel rules (``channels/``) build with ---------------------------------------
    def new_space(self, node, axis: int, size: int, zero: bool) -> Space:
        shape = tensor_shape(node)
        space = Space(len(self.spaces), node, axis, size, self._num_elements, len(shape) if shape else 0, zero)
        self._num_elements += size
        self.spaces.append(space)
        self.space_of[node] = space
        return space

    def tie(self, a: Space, b: Space, index_a, index_b, why: str):
        self.edges.append(Edge(a, b, np.asarray(index_a, dtype=np.int64), np.asarray(index_b, dtype=np.int64), why))

    def tie_identity(self, a: Space, b: Space, why: str):
        self.tie(a, b, np.arange(a.size), np.arange(b.size), why)

    def block(self, space: Space, reason: str, elements: np.ndarray | None = None):
        """Never prune ``space`` (or only its ``elements``) nor anything tied to it."""
        self.blocks.append((space, reason, elements))

    def calls_of(self, target: str) -> int:
        """How many nodes call the module ``target`` (a module called twice cannot be sliced for one call)."""
        return self._module_calls.get(target, 0)

    def owns_parameter(self, node) -> bool:
        """A ``get_attr`` of a tensor that no other ``get_attr`` reads and only one node uses (the fold slices it)."""
        if not (isinstance(node, torch.fx.Node) and node.op == "get_attr" and len(node.users) == 1):
            return False
        return sum(1 for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == node.target) == 1

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
                    self.block(self.space_of[i], f"'{i.name}' is (part of) the model output")
                continue
            if not tracked and node not in self.layers:
                continue
            claimed = self._visit(node)
            for i in tracked:
                if i not in claimed:
                    self.block(self.space_of[i], f"used by {describe(node, self.gm)}, which the channel "
                                                 f"analysis does not understand")

    def _visit(self, node: torch.fx.Node) -> set:
        """Apply the channel rule of ``node``'s kind; without one, nothing is claimed (all pinned)."""
        found = rule_for(node, self.gm)
        if found is None:
            return set()
        rule, kind = found
        return rule(self, node, kind)

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
