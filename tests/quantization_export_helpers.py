"""Test helpers for the quantization lowering and export tests (not a test module).

``quantize_graph`` inserts ``FakeQuantizer`` modules the way the ``Quantize``
pass places them for OpenVINO's CPU plugin (a weight quantizer on every
conv/linear, one activation quantizer on each tensor that feeds a conv, linear,
matmul or residual add, unsigned after ReLU-like producers), and sets ranges
from min/max over the example inputs. The lowering and export tests use it so
that they depend only on the graph the pass produces, not on its policy code.
"""
from __future__ import annotations

import copy

import torch
import torch.fx

import fxcompress
from fxcompress.graph import add_module, insert_on_output
from fxcompress.optable import op_kind
from fxcompress.pass_manager import PassContext, PassManager
from fxcompress.passes.quantization.lowering import quantization_lowering_passes
from fxcompress.quantizers import FakeQuantizer, QuantSpec
from fxcompress.weights import functionalize_weighted, weighted_ops


def _is_quantizer(gm, node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), FakeQuantizer)


def _constant(node: torch.fx.Node) -> bool:
    """True when no graph input flows into ``node`` (a parameter or a slice of one)."""
    if node.op == "placeholder":
        return False
    return all(_constant(a) for a in node.all_input_nodes)


def quantize_graph(model, example_inputs, *, weight_bits=8, activation_bits=8, per_channel=True,
                   narrow_range=True, weight_mode="symmetric", activation_mode="asymmetric",
                   bits_per_layer=None, calibration_inputs=None) -> torch.fx.GraphModule:
    """Trace ``model`` and insert calibrated fake quantizers (see the module docstring).

    ``bits_per_layer``: optional list of weight/activation bit widths cycled over the conv/linear layers.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm = fxcompress.trace(model, tuple(example_inputs))
    layer_bits = {}
    functionalize_weighted(gm)
    for i, op in enumerate(weighted_ops(gm)):
        bits = bits_per_layer[i % len(bits_per_layer)] if bits_per_layer else weight_bits
        layer_bits[op.node] = bits
        w = op.weight(gm).detach()
        axis = op.out_axis
        spec = QuantSpec(bits=bits, mode=weight_mode, per_channel=per_channel,
                         axis=axis if per_channel else None, narrow_range=narrow_range and weight_mode == "symmetric")
        quantizer = FakeQuantizer(spec, num_channels=w.shape[axis] if per_channel else 1)
        dims = [d for d in range(w.dim()) if d != axis]
        low, high = (w.amin(dim=dims), w.amax(dim=dims)) if per_channel else (w.min(), w.max())
        quantizer.set_range(low, high)
        name = add_module(gm, op.module_path.replace(".", "_") + "_weight_quantizer", quantizer)
        insert_on_output(gm, op.weight_input, name, "test", users=[op.node])

    sources: dict[torch.fx.Node, int] = {}
    for node in list(gm.graph.nodes):
        kind = op_kind(node, gm)
        if kind is None:
            continue
        if "int8_compute" in kind.tags:
            inputs = [node.args[0]] if kind.name != "matmul" else list(node.args[:2])
        elif kind.name == "add":
            inputs = list(node.args[:2])
        else:
            continue
        for src in inputs:
            if isinstance(src, torch.fx.Node) and not _is_quantizer(gm, src) and not _constant(src):
                sources.setdefault(src, layer_bits.get(node, activation_bits))
    quantizers = []
    for src, bits in sources.items():
        kind = op_kind(src, gm)
        unsigned = kind is not None and "relu_like" in kind.tags
        spec = QuantSpec(bits=bits if bits_per_layer else activation_bits,
                         mode="symmetric" if unsigned else activation_mode, signed=not unsigned)
        quantizer = FakeQuantizer(spec)
        insert_on_output(gm, src, add_module(gm, src.name + "_quantizer", quantizer), "test")
        quantizers.append(quantizer)
    gm.graph.lint()
    gm.recompile()
    calibrate(gm, quantizers, calibration_inputs if calibration_inputs is not None else example_inputs)
    return gm.eval()


@torch.no_grad()
def calibrate(gm, quantizers, inputs):
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    seen: dict[FakeQuantizer, list[float]] = {}

    def hook(module, args):
        x = args[0].detach()
        low, high = seen.get(module, [float("inf"), float("-inf")])
        seen[module] = [min(low, float(x.min())), max(high, float(x.max()))]

    handles = [q.register_forward_pre_hook(hook) for q in quantizers]
    for q in quantizers:
        q.enabled = False
    gm.eval()
    try:
        gm(*inputs)
    finally:
        for h in handles:
            h.remove()
        for q in quantizers:
            q.enabled = True
    for q in quantizers:
        low, high = seen.get(q, [0.0, 1.0])
        q.set_range(torch.tensor(low), torch.tensor(high))


def lower(gm: torch.fx.GraphModule, debug: bool = False) -> tuple[torch.fx.GraphModule, list]:
    """A lowered deep copy (what ``ctrl.lower()`` does with the quantization part's passes)."""
    lowered = copy.deepcopy(gm).eval()
    passes = sorted(quantization_lowering_passes(), key=lambda p: p.lowering_order)
    PassManager(passes, debug=debug).run(lowered, PassContext.for_graph(lowered, debug))
    return lowered, passes


def activation_step(gm) -> float:
    """The largest activation quantization step of the graph (one step of the coarsest quantizer)."""
    steps = [float(m.effective_scale().detach().max()) for name, m in gm.named_modules()
             if isinstance(m, FakeQuantizer) and not name.endswith("weight_quantizer")]
    return max(steps) if steps else 0.0


def count_weighted(gm) -> int:
    return sum(1 for n in gm.graph.nodes if (k := op_kind(n, gm)) is not None and "weighted" in k.tags)


def batch_of(inputs: tuple, batch: int) -> tuple:
    """The example inputs repeated/cut to another batch size, with noise, deterministically."""
    g = torch.Generator().manual_seed(batch)
    out = []
    for x in inputs:
        reps = -(-batch // x.shape[0])
        y = x.repeat(reps, *([1] * (x.dim() - 1)))[:batch]
        if y.is_floating_point():
            y = y + 0.1 * torch.randn(y.shape, generator=g) * y.std().clamp_min(1e-3)
        out.append(y)
    return tuple(out)
