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
from typing import Any

import torch
import torch.fx

__all__ = [
    "shallow_module_copy", "detach_submodules", "GraphSnapshot", "unique_name",
    "add_module", "insert_on_output", "insert_before_input", "copy_meta", "get_attr_value",
]

_SHAPE_META = ("shape", "dtype", "module_path", "tensor_meta")


def shallow_module_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A new module tree with the same parameter and buffer tensors.

    Passes may then replace submodules, parameters or attributes on the copy
    without touching the user's model; tensors are shared, never copied.
    """
    new = copy.copy(module)
    new.__dict__ = dict(module.__dict__)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {name: (shallow_module_copy(child) if child is not None else None)
                    for name, child in module._modules.items()}
    return new


def detach_submodules(gm: torch.fx.GraphModule):
    """Replace the GraphModule's submodules (taken by reference from the user's model) by shallow copies."""
    for name, child in list(gm._modules.items()):
        if child is not None:
            gm._modules[name] = shallow_module_copy(child)


class GraphSnapshot:
    """Everything a pass may change in a GraphModule, restorable after a failure.

    Passes never write into parameter tensors in place (DESIGN.md), so saving the
    graph plus each module's attribute/parameter/buffer/submodule dictionaries
    is enough to undo any pass. Modules keep their identity on restore.
    """

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.graph = copy.deepcopy(gm.graph)
        self.meta = dict(gm.meta)
        self.modules = [(m, self._state(m)) for m in gm.modules()]

    @staticmethod
    def _state(m: torch.nn.Module) -> dict:
        state = dict(m.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            state[key] = dict(state[key])
        return state

    def restore(self):
        for module, state in self.modules:
            module.__dict__.clear()
            module.__dict__.update(self._state_copy(state))
        self.gm.graph = self.graph
        self.gm.meta.clear()
        self.gm.meta.update(self.meta)
        self.gm.recompile()

    def _state_copy(self, state: dict) -> dict:
        copied = dict(state)
        for key in ("_parameters", "_buffers", "_modules"):
            copied[key] = dict(state[key])
        return copied


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


def get_attr_value(gm: torch.nn.Module, target: str) -> Any:
    value = gm
    for atom in target.split("."):
        value = getattr(value, atom)
    return value
