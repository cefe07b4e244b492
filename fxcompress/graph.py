"""Graph surgery helpers shared by all passes.

Metadata carry-over (what an inserted node inherits in ``node.meta``):
- a node inserted *on an edge* (quantizer, mask: shape-preserving) copies
  ``shape``, ``dtype`` and ``module_path`` from the node whose value it transforms;
- a node that *replaces* another (functional conv for a conv module) takes over
  all of the replaced node's meta;
- every inserted node records ``inserted_by`` (the pass name), so inspection
  and later passes can tell user nodes from compression nodes.
"""
from __future__ import annotations

import copy
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

__all__ = [
    "shallow_module_copy", "detach_submodules", "GraphSnapshot", "TensorSnapshot", "unique_name",
    "add_module", "insert_on_output", "insert_before_input", "copy_meta", "get_attr_value", "inserted_modules",
    "read_only_through",
]

_SHAPE_META = ("shape", "dtype", "module_path", "tensor_meta")


def _own_containers(state: dict) -> dict:
    """``state`` (a module's ``__dict__``) with its dict/list/set values copied one level deep.

    A module's parameters, buffers, submodules and hooks live in such containers:
    copying them lets a copy (or a snapshot) add, remove or replace entries
    without touching the original's.
    """
    return {key: (type(value)(value) if type(value) in (dict, OrderedDict, list, set) else value)
            for key, value in state.items()}


def shallow_module_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A new module tree with the same parameter and buffer tensors.

    Passes may then replace submodules, parameters or attributes, or register hooks,
    on the copy without touching the user's model; tensors are shared, never copied.
    """
    new = copy.copy(module)
    new.__dict__ = _own_containers(module.__dict__)
    new._modules = {name: (shallow_module_copy(child) if child is not None else None)
                    for name, child in module._modules.items()}
    return new


def detach_submodules(gm: torch.fx.GraphModule):
    """Replace the GraphModule's submodules (taken by reference from the user's model) by shallow copies."""
    for name, child in list(gm._modules.items()):
        if child is not None:
            gm._modules[name] = shallow_module_copy(child)


class GraphSnapshot:
    """The structure of a GraphModule, restorable after a failure: graph, meta, modules.

    Saves the graph plus each module's attributes, with its parameter, buffer,
    submodule and hook dictionaries, so restoring undoes replaced or added
    attributes, added or removed submodules and registered hooks. Modules keep
    their identity on restore. Tensor *values* written in place are
    ``TensorSnapshot``'s job.
    """

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.graph = copy.deepcopy(gm.graph)
        self.meta = dict(gm.meta)
        self.modules = [(m, _own_containers(m.__dict__)) for m in gm.modules()]

    def restore(self):
        for module, state in self.modules:
            module.__dict__.clear()
            module.__dict__.update(_own_containers(state))
        self.gm.graph = self.graph
        self.gm.meta.clear()
        self.gm.meta.update(self.meta)
        self.gm.recompile()


@dataclass
class _SavedTensor:
    name: str
    tensor: torch.Tensor
    data: torch.Tensor          # an alias of the storage it had, to undo ``t.data = other``
    version: int
    requires_grad: bool
    grad: torch.Tensor | None
    value: torch.Tensor         # a copy of its values

    def changed(self) -> bool:
        t = self.tensor
        return (t._version != self.version or t.data_ptr() != self.data.data_ptr()
                or t.shape != self.value.shape or t.requires_grad != self.requires_grad
                or t.grad is not self.grad or not _same_values(t, self.value))

    def restore(self):
        t = self.tensor
        with torch.no_grad():
            if t.data_ptr() != self.data.data_ptr() or t.shape != self.data.shape or t.dtype != self.data.dtype:
                t.data = self.data
            if t._version != self.version or not _same_values(t, self.value):
                t.copy_(self.value)
        if t.requires_grad != self.requires_grad:
            t.requires_grad_(self.requires_grad)
        if t.grad is not self.grad:
            t.grad = self.grad


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal values (NaNs in the same places count as equal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


class TensorSnapshot:
    """The values of every parameter, buffer and tensor attribute in a module tree.

    The GraphModule shares these tensors with the user's model, so a pass that
    writes into one in place (``w.mul_(2)``, ``w.data.zero_()``, ``w.data = t``)
    changes the user's model. This keeps a copy of each value, says which tensors
    changed (version counter, storage, shape, requires_grad, grad, or values: a
    write through ``.data`` does not bump the version counter) and restores them.
    Costs one copy of the model's tensors while it lives.
    """

    def __init__(self, root: torch.nn.Module):
        self.saved: list[_SavedTensor] = []
        seen: set[int] = set()
        for name, t in _named_tensors(root):
            if id(t) not in seen:
                seen.add(id(t))
                self.saved.append(_SavedTensor(name, t, t.data, t._version, t.requires_grad, t.grad,
                                               t.detach().clone()))

    def tensors(self) -> list[torch.Tensor]:
        return [s.tensor for s in self.saved]

    def changed(self, among: list[torch.Tensor] | None = None) -> list[str]:
        """Names (as in ``named_parameters()``/``named_buffers()``) of the tensors changed in place;
        with ``among``, only those that are among these tensors."""
        keep = None if among is None else {id(t) for t in among}
        return [s.name for s in self.saved if (keep is None or id(s.tensor) in keep) and s.changed()]

    def restore(self) -> list[str]:
        """Restore every changed tensor; returns their names."""
        changed = [s for s in self.saved if s.changed()]
        for s in changed:
            s.restore()
        return [s.name for s in changed]


def _named_tensors(root: torch.nn.Module):
    for prefix, module in root.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for key, value in list(module._parameters.items()) + list(module._buffers.items()):
            if value is not None:
                yield dot + key, value
        for key, value in module.__dict__.items():
            if isinstance(value, torch.Tensor):
                yield dot + key, value


def unique_name(gm: torch.nn.Module, base: str) -> str:
    """A free attribute name on ``gm`` derived from ``base`` (dots and odd characters become ``_``)."""
    name = re.sub(r"[^0-9a-zA-Z_]", "_", base).strip("_") or "module"
    if name[0].isdigit():
        name = "_" + name
    candidate, i = name, 1
    while hasattr(gm, candidate):
        candidate = f"{name}_{i}"
        i += 1
    return candidate


def add_module(gm: torch.fx.GraphModule, base_name: str, module: torch.nn.Module) -> str:
    """Register ``module`` on ``gm`` at top level under a readable unique name; returns the name."""
    name = unique_name(gm, base_name)
    gm.add_submodule(name, module)
    return name


def copy_meta(src: torch.fx.Node, dst: torch.fx.Node, inserted_by: str | None = None):
    for key in _SHAPE_META:
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    if "nn_module_stack" in src.meta:
        dst.meta["nn_module_stack"] = src.meta["nn_module_stack"]
    if inserted_by:
        dst.meta["inserted_by"] = inserted_by


def insert_on_output(gm: torch.fx.GraphModule, node: torch.fx.Node, module_name: str,
                     inserted_by: str, users: list[torch.fx.Node] | None = None) -> torch.fx.Node:
    """Insert ``call_module(module_name)`` on ``node``'s output; it feeds ``users`` (default: all users).

    One inserted node serves all the given consumers: a tensor is transformed once.
    """
    targets = list(node.users) if users is None else list(users)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(module_name, (node,))
    copy_meta(node, new, inserted_by)
    for user in targets:
        user.replace_input_with(node, new)
    return new


def insert_before_input(gm: torch.fx.GraphModule, consumer: torch.fx.Node, input_node: torch.fx.Node,
                        module_name: str, inserted_by: str) -> torch.fx.Node:
    """Insert ``call_module(module_name)`` between ``input_node`` and this one ``consumer`` only."""
    with gm.graph.inserting_before(consumer):
        new = gm.graph.call_module(module_name, (input_node,))
    copy_meta(input_node, new, inserted_by)
    consumer.replace_input_with(input_node, new)
    return new


def inserted_modules(gm: torch.fx.GraphModule, module_type) -> list[torch.fx.Node]:
    """The calls of modules of ``module_type`` that a compression pass inserted (``inserted_by``), in graph
    order: how lowering passes find what to lower, from the graph's own marks."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.meta.get("inserted_by")
            and isinstance(gm.get_submodule(n.target), module_type)]


def read_only_through(gm: torch.fx.GraphModule, target: str, module_names: set[str]) -> bool:
    """Whether every read of the tensor ``target`` goes into one of the modules ``module_names``: a
    lowering pass may then replace the tensor itself (masks, binarizers folded under the same name)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == target:
            if any(not (u.op == "call_module" and u.target in module_names) for u in node.users):
                return False
    return True


def get_attr_value(gm: torch.nn.Module, target: str) -> Any:
    value = gm
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def tensor_attr(gm: torch.nn.Module, node) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads; None for anything else (a computed value, a constant, None)."""
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        value = get_attr_value(gm, node.target)
        if isinstance(value, torch.Tensor):
            return value
    return None
