"""Fast bias correction (NNCF's ``FastBiasCorrection``, on by default in ``nncf.quantize``).

Quantizing a layer's weights (and its input) moves the mean of its output: the rounding
errors of a channel's weights do not cancel on the data's mean input. Fast bias correction
measures that shift per output channel and adds it to the layer's bias, so the quantized
layer's output has the float layer's mean again.

As NNCF does, the shift of each layer is measured in isolation from the float model's
statistics, in the same pass over the calibration data that sets the activation ranges:

- during the range-init pass (every quantizer off, i.e. the float model) the per-channel
  mean of each corrected layer's input is collected: the pass runs ``statistics_module``, a
  second GraphModule over the same modules and parameters whose graph adds one observer
  per corrected layer on its input (the user's GraphModule is not touched);
- then a one-sample input filled per channel with that mean (the layer's input shape) goes
  through the layer with float and with quantized weights: ``shift = mean(float output) -
  mean(quantized output)`` per output channel. Both sides see the same input, so zero
  padding at the borders cancels; for a linear layer the shift is exactly the mean output
  shift over the calibration data that weight quantization causes.

Unlike NNCF, the mean input is not passed through the input's activation quantizer: rounding
one constant per channel is an error the data does not have (the data's rounding errors
average out), and on the digits CNN it made the correction worse than none. The correction
is thus that of weight quantization (benchmarks/RESULTS.md has the comparison).

The shift goes into the layer's own bias, or, for a conv/linear without bias followed by an
eval-mode BatchNorm (NNCF's "fused bias"), into the BatchNorm's ``bias`` scaled by
``weight / sqrt(running_var + eps)``. A layer with neither is left alone (NNCF too).
A layer whose BatchNorm is re-estimated afterwards by BatchNorm adaptation is skipped:
adaptation re-centres the BatchNorm on the quantized layer's output mean, which already
removes the shift (a correction would be undone, or counted twice).

The corrected bias is a new parameter tensor on the GraphModule (the user's model keeps its
own); the parameter keeps its name, so ``gm.state_dict()`` carries the corrected value and
checkpoints, export and ``strip()`` see it. The shifts applied are remembered by the
controller so a second ``initialize()`` starts again from the uncorrected biases.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

from fxcompress.graph import get_attr_value
from fxcompress.optable import Kind, OpKind
from fxcompress.quantizers import FakeQuantizer
from fxcompress.weights import weighted_ops

__all__ = ["BiasTarget", "bias_correction_targets", "InputMean", "statistics_module", "correct_biases",
           "set_parameter"]

_CORRECTED_KINDS = (Kind.conv, Kind.linear)


@dataclass
class BiasTarget:
    """One quantized layer whose bias (own, or the next BatchNorm's) gets corrected."""
    node: torch.fx.Node                  # the functional conv/linear
    kind: OpKind                         # Kind.conv | Kind.linear
    weight_chain: list[torch.fx.Node]    # get_attr, then the transforms (masks, quantizer) in order
    bias_target: str                     # parameter path that receives the shift
    batch_norm: str | None = None        # BatchNorm module path when the bias is the BatchNorm's

    @property
    def channel_axis(self) -> int:
        """Where the channels are in the layer's input and output (conv: 1, linear: last)."""
        return -1 if self.kind is Kind.linear else 1


def _weight_chain(op) -> list[torch.fx.Node] | None:
    chain, current = [], op.weight_input
    while isinstance(current, torch.fx.Node) and current.op == "call_module":
        chain.append(current)
        current = current.args[0] if current.args else None
    if not isinstance(current, torch.fx.Node) or current.op != "get_attr" or current is not op.weight_source:
        return None
    return [current, *reversed(chain)]


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def bias_correction_targets(gm: torch.fx.GraphModule, adapted_batch_norms: bool
                            ) -> tuple[list[BiasTarget], list[dict]]:
    """The layers fast bias correction corrects, and ``{"scope", "reason"}`` for quantized ones it skips.

    ``adapted_batch_norms``: BatchNorm adaptation runs after the correction (its layers are skipped).
    """
    targets, skipped = [], []
    for op in weighted_ops(gm, _CORRECTED_KINDS):
        chain = _weight_chain(op)
        quantizers = [gm.get_submodule(n.target) for n in (chain or [])[1:]]
        if not any(isinstance(m, FakeQuantizer) and m.enabled for m in quantizers):
            continue  # weights not quantized: nothing moved
        scope = op.module_path or op.node.name

        def skip(reason):
            skipped.append({"scope": scope, "reason": f"fast bias correction: {reason}"})

        if any(isinstance(a, torch.fx.Node) for a in [*op.node.args[3:], *op.node.kwargs.values()]):
            skip("computed layer arguments")
            continue
        bias = op.node.args[2] if len(op.node.args) > 2 else op.node.kwargs.get("bias")
        follower = _only_user(op.node)
        bn = None
        if follower is not None and follower.op == "call_module":
            module = gm.get_submodule(follower.target)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                bn = (follower.target, module)
        if bn is not None and adapted_batch_norms and bn[1].track_running_stats:
            skip(f"BatchNorm adaptation re-centres {bn[0]} after it, which removes the shift")
            continue
        if isinstance(bias, torch.fx.Node) and bias.op == "get_attr":
            targets.append(BiasTarget(op.node, op.kind, chain, bias.target))
        elif bias is None and bn is not None and bn[1].affine and bn[1].track_running_stats:
            targets.append(BiasTarget(op.node, op.kind, chain, f"{bn[0]}.bias", batch_norm=bn[0]))
        else:
            skip("no bias (and no BatchNorm right after it) to correct")
    return targets, skipped


class InputMean(nn.Module):
    """Observer module: running per-channel mean and shape of a layer's input (returns nothing)."""

    def __init__(self, channel_axis: int):
        super().__init__()
        self.channel_axis = channel_axis
        self.total: torch.Tensor | None = None
        self.count = 0
        self.shape: torch.Size | None = None

    def forward(self, x: torch.Tensor):
        x = x.detach().float()
        axis = self.channel_axis % x.dim()
        dims = [d for d in range(x.dim()) if d != axis]
        total = x.sum(dim=dims).double()  # float32 reduction (pairwise: accurate), float64 across batches
        self.total = total if self.total is None else self.total + total
        self.count += x.numel() // x.shape[axis]
        self.shape = x.shape

    def input_blob(self) -> torch.Tensor | None:
        """One sample of the input's shape, every channel holding its mean; None if nothing was seen."""
        if self.total is None or self.count == 0:
            return None
        mean = (self.total / self.count).float()
        shape = [1, *self.shape[1:]]
        view = [1] * len(shape)
        view[self.channel_axis % len(shape)] = -1
        return mean.reshape(view).expand(shape).contiguous()


def _channel_mean(y: torch.Tensor, axis: int) -> torch.Tensor:
    axis %= y.dim()
    return y.mean(dim=[d for d in range(y.dim()) if d != axis])


def statistics_module(gm: torch.fx.GraphModule, targets: list[BiasTarget]
                      ) -> tuple[torch.fx.GraphModule, dict[str, InputMean]]:
    """A GraphModule computing what ``gm`` computes (same modules and parameters, by reference) that
    also feeds each target's input to an ``InputMean`` observer; and the observers by target node name."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(gm.graph, env)
    graph.output(output)
    root: dict[str, object] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            root[node.target] = gm.get_submodule(node.target)
        elif node.op == "get_attr":
            root[node.target] = get_attr_value(gm, node.target)
    observers = {}
    for i, target in enumerate(targets):
        name = f"_fast_bias_correction_input_mean_{i}"
        observers[target.node.name] = root[name] = InputMean(target.channel_axis)
        copied = env[target.node]
        with graph.inserting_before(copied):
            graph.call_module(name, (copied.args[0],))
    return torch.fx.GraphModule(root, graph), observers


@torch.no_grad()
def _shift(gm: torch.fx.GraphModule, target: BiasTarget, blob: torch.Tensor) -> torch.Tensor:
    """``mean(layer(blob, float weight)) - mean(layer(blob, quantized weight))`` per output channel
    (the bias cancels), computed as one call with the weight difference: the layer is linear in it."""
    weight_float = weight_quantized = get_attr_value(gm, target.weight_chain[0].target)
    for node in target.weight_chain[1:]:
        module = gm.get_submodule(node.target)
        weight_quantized = module(weight_quantized)
        if not isinstance(module, FakeQuantizer):  # masks and the like act in both
            weight_float = module(weight_float)
    node, fn = target.node, target.node.target
    rest = list(node.args[3:])
    shift = fn(blob, weight_float - weight_quantized, None, *rest, **node.kwargs)
    return _channel_mean(shift, target.channel_axis)


def set_parameter(gm: torch.nn.Module, path: str, value: torch.Tensor):
    """Replace the parameter at ``path`` by a new one holding ``value`` (never written in place: the
    user's model may share the old tensor)."""
    owner_path, _, name = path.rpartition(".")
    owner = gm.get_submodule(owner_path)
    old = getattr(owner, name)
    setattr(owner, name, nn.Parameter(value.detach().clone().to(old.dtype),
                                      requires_grad=old.requires_grad))


@torch.no_grad()
def correct_biases(gm: torch.fx.GraphModule, targets: list[BiasTarget], means: dict[str, InputMean]
                   ) -> dict[str, torch.Tensor]:
    """Add each target's shift to its bias; returns ``{bias parameter path: shift added}``."""
    applied = {}
    for target in targets:
        blob = means[target.node.name].input_blob()
        if blob is None:
            continue
        shift = _shift(gm, target, blob)
        bias = get_attr_value(gm, target.bias_target)
        if target.batch_norm is not None:  # the shift enters the BatchNorm's output scaled by its factor
            bn = gm.get_submodule(target.batch_norm)
            shift = shift * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        if not torch.isfinite(shift).all():
            continue
        set_parameter(gm, target.bias_target, bias + shift.to(bias))
        applied[target.bias_target] = shift.detach().to(bias).clone()
    return applied
