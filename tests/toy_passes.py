"""Small, real graph transforms used to test the infrastructure (not algorithms of the product).

``ScaleAfterActivations`` inserts a learnable scalar gain after every ReLU-like op;
with ``init=1.0`` it is an exact identity, so infrastructure tests can compare outputs.
Its controller part has a scheduler and state, to test checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fxcompress.algorithm import CompressionPass
from fxcompress.config import register_algorithm
from fxcompress.controller import ControllerPart, StatisticsSection
from fxcompress.graph import add_module, insert_on_output
from fxcompress.optable import op_kind
from fxcompress.pass_manager import Pass, PassResult


class Gain(nn.Module):
    def __init__(self, init: float):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x):
        return x * self.gain


class GainPart(ControllerPart):
    algorithm = "toy_gain"

    def __init__(self, gains: dict[str, Gain]):
        super().__init__()
        self.gains = gains
        self.seen_batches = 0

    def initialize(self, ctx):
        if ctx.data is not None:
            self.seen_batches = ctx.data.run(ctx.gm, num_samples=8)

    def loss(self):
        return sum((g.gain - 1.0) ** 2 for g in self.gains.values())

    def statistics(self):
        return StatisticsSection(self.algorithm, {"num_gains": len(self.gains), "epoch": self.scheduler.current_epoch},
                                 [{"name": n, "gain": float(g.gain.detach())} for n, g in self.gains.items()])

    def state_dict(self):
        return {**super().state_dict(), "seen_batches": self.seen_batches}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.seen_batches = int(state["seen_batches"])


@register_algorithm
class ScaleAfterActivations(CompressionPass):
    algorithm = "toy_gain"
    schema = {"type": "object", "properties": {"init": {"type": "number", "exclusiveMinimum": 0}}}
    defaults = {"init": 1.0}

    def call(self, gm, ctx):
        self.validate_scopes(gm)
        gains = {}
        for node in list(gm.graph.nodes):
            kind = op_kind(node, gm)
            if kind is None or "relu_like" not in kind.tags or not self.selects(node.meta.get("module_path", "")):
                continue
            name = add_module(gm, f"{node.name}_gain", Gain(self.params["init"]))
            insert_on_output(gm, node, name, self.name)
            gains[name] = gm.get_submodule(name)
        return PassResult(gm, bool(gains), GainPart(gains))


class FailingPass(Pass):
    """Inserts a module and a node, then fails: the pass manager must undo both."""
    name = "failing"

    def call(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op in ("call_module", "call_function"))
        name = add_module(gm, "half_done", Gain(2.0))
        insert_on_output(gm, node, name, self.name)
        setattr(gm.get_submodule(node.target) if node.op == "call_module" else gm, "marker", True)
        raise RuntimeError("boom")


class ChangesOutputs(Pass):
    """Claims to preserve outputs but doubles them: debug mode must catch it."""
    name = "changes_outputs"
    preserves_outputs = True

    def call(self, gm, ctx):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        value = output.args[0]
        with gm.graph.inserting_before(output):
            doubled = gm.graph.call_function(torch.mul, (value, 2.0))
        output.replace_input_with(value, doubled)
        return PassResult(gm, True)
