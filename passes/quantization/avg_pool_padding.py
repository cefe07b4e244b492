"""Average pools that count their zero padding, on a quantized input whose zero point is not 0.

PyTorch's ``AvgPool`` pads with the real value 0 and, by default (``count_include_pad=True``),
divides by the whole window. OpenVINO's CPU plugin runs such an ``AveragePool`` on the input's
integers and pads with the *integer* 0, which is the real value ``-zero_point * scale``: border
outputs move by up to ``(padded taps / window) * zero_point * scale`` (measured on a u8 input with
zero point 20, a 3x3 stride-2 pool with padding 1: 12 to 56 output steps for output scales of 1 to
1/5 of the input's; also with the padding as an explicit ``Pad``). ONNX Runtime computes it as
PyTorch does. The lowering pads the float input before its quantizer and pools without padding:

    x -> pad(0) -> the input's QuantizeLinear/DequantizeLinear (a copy, same grid) -> avg_pool(padding=0)

The padded zeros quantize to the zero point, so OpenVINO's integer pool reads the right values (0.00
steps in the same measurement; the Pad runs in f32, the pool still in u8), and the values equal the
original pool's exactly. Rejected forms: a ``Pad`` between the DequantizeLinear and a second QDQ
(right for 2-D/3-D, but OpenVINO 2026.4 fails to compile it for 1-D: the dequantization it moves
through the ``Pad`` keeps the unpadded length), and excluding the padding times each window's inside
fraction (1-2 steps off: OpenVINO rounds the excluded average to the input's grid). ``ceil_mode``
pools keep their form. docs/export.md.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxcompress.graph import copy_meta, get_attr_value
from fxcompress.lowering import LoweringPhase
from fxcompress.pass_manager import Pass, PassContext, PassResult

__all__ = ["WriteOutAvgPoolPadding"]

_QUANTIZE_DEQUANTIZE = torch.ops.fxcompress.quantize_dequantize.default
_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_MODULES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_POOL_OF_DIMS = {dims: pool for pool, dims in _FUNCTIONS.items()}
_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _pool_arguments(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[int, dict] | None:
    """(dims, pool arguments) of an average-pool node, None for any other node."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        dims = _MODULES.get(type(module))
        if dims is None:
            return None
        return dims, {name: getattr(module, name, None) for name in _POOL_ARGS}   # AvgPool1d: no divisor_override
    if node.op == "call_function" and node.target in _FUNCTIONS:
        values = dict(zip(_POOL_ARGS, node.args[1:]))
        values.update({k: v for k, v in node.kwargs.items() if k in _POOL_ARGS})
        defaults = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                    "divisor_override": None}
        return _FUNCTIONS[node.target], {**defaults, **values}
    return None


def _zero_point_is_nonzero(gm: torch.fx.GraphModule, node) -> bool:
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is _QUANTIZE_DEQUANTIZE):
        return False
    zero_point = node.args[2]
    return bool((get_attr_value(gm, zero_point.target) != 0).any())


def _pads(padding) -> bool:
    return any(p != 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))


class WriteOutAvgPoolPadding(Pass):
    """Padded average pools counting their padding, on a QDQ input with a nonzero zero point: the float
    input padded before a copy of its QDQ (module docstring)."""
    name = "write_out_avg_pool_padding"
    lowering_order = LoweringPhase.RUNTIME_FORMS
    preserves_outputs = True

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        changed, padded_inputs = False, {}
        for node in list(gm.graph.nodes):
            found = _pool_arguments(gm, node)
            if found is None or not node.args:
                continue
            dims, args = found
            if (not _pads(args["padding"]) or not args["count_include_pad"] or args["ceil_mode"]
                    or args["divisor_override"] is not None or not _zero_point_is_nonzero(gm, node.args[0])):
                continue
            stride = args["stride"] if args["stride"] not in (None, []) else args["kernel_size"]
            padding = args["padding"] if isinstance(args["padding"], (tuple, list)) else (args["padding"],) * dims
            qdq, graph = node.args[0], gm.graph
            pads = tuple(p for size in reversed(padding) for p in (size, size))   # F.pad: last dimension first
            # one padded copy per input and padding: pools of the same input share it (the exporter would
            # merge identical copies, and every QDQ of the lowered graph must be one of the file's); the
            # QDQ the pool read goes when nothing else reads it
            requantized = padded_inputs.get((qdq, pads))
            with graph.inserting_before(node):
                if requantized is None:
                    with graph.inserting_after(qdq):
                        padded = graph.call_function(F.pad, (qdq.args[0], pads))
                    with graph.inserting_after(padded):
                        requantized = graph.call_function(_QUANTIZE_DEQUANTIZE, (padded, *qdq.args[1:]))
                    for added in (padded, requantized):
                        copy_meta(node, added, self.name)
                        added.meta.pop("shape", None)
                    padded_inputs[(qdq, pads)] = requantized
                new = graph.call_function(_POOL_OF_DIMS[dims], (requantized, args["kernel_size"], stride, 0))
            copy_meta(node, new, self.name)
            new.meta["shape"] = node.meta.get("shape")
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            changed = True
        for qdq in {qdq for qdq, _ in padded_inputs}:
            if not qdq.users:      # the padded pools were its only readers
                gm.graph.erase_node(qdq)
        if changed:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, changed)
