"""ONNX export of lowered GraphModules through ``torch.onnx.export`` (dynamo exporter, onnxscript).

Two things live here:

* the **export ops** a lowered graph is made of (``torch.ops.fxcompress.*``,
  registered with ``torch.library`` with a CPU/any-device implementation and a
  fake kernel, so the lowered graph runs in PyTorch, traces with
  ``torch.export`` and exports):

  - ``quantize_dequantize(x, scale, zero_point, quant_min, quant_max, axis)``:
    an activation quantizer, frozen. ``zero_point`` is an int8/uint8 tensor,
    ``scale`` float32 (0-d per tensor, 1-d per channel on ``axis``). Same values
    as ``fxcompress.ops.fake_quantize``. Exported as
    ``QuantizeLinear -> DequantizeLinear`` (uint8 when ``quant_min >= 0``, else
    int8); a range narrower than the 8-bit type (2..7 bits, narrow range) gets a
    ``Clip`` in front of the ``QuantizeLinear`` so the integer range is exact.
  - ``dequantize_weight(q, scale, zero_point, quant_min, quant_max, axis)``: a
    weight stored as integers (int8/uint8 tensor ``q``), ``(q - zp) * scale``.
    Exported as one ``DequantizeLinear`` whose input is the integer initializer,
    so the file holds int8 weights (a quarter of fp32).

* ``export_onnx`` and the translation table (``register_onnx_translation``:
  an op overload -> a plain Python function using an onnxscript opset module,
  see docs/export.md). The batch dimension of every input is dynamic
  unless ``dynamic_batch=False``, and so is every input dimension a traced
  Hugging Face model reads (``gm.meta["dynamic_dims"]``: batch and sequence); a
  graph that cannot take other sizes is exported with static shapes and a
  warning saying so.

Only standard ONNX ops are emitted (ONNX Runtime loads every export). The
exporter's constant folder is told never to fold ``QuantizeLinear`` /
``DequantizeLinear`` (a folded weight dequantization is an fp32 weight that
OpenVINO runs in fp32), and ``export_onnx`` checks the written graph: every
``dequantize_weight`` of the module must arrive as a ``DequantizeLinear`` on an
integer initializer, otherwise it warns.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from typing import Callable, Optional, Sequence

import torch

from .errors import ExportError
from .tracing import normalize_example_inputs

__all__ = ["export_onnx", "register_onnx_translation", "onnx_translations", "DEFAULT_OPSET",
           "quantize_dequantize", "dequantize_weight", "storage_dtype", "SIGNED_TO_UNSIGNED"]

# Added to a signed 8-bit activation grid's integers (and zero point) to write it as uint8: same values.
SIGNED_TO_UNSIGNED = 128
DEFAULT_OPSET = 21  # 4-bit QDQ needs opset 21 (docs/export.md); ORT and OpenVINO read it.
_TRANSLATIONS: dict = {}


def register_onnx_translation(op, fn: Callable):
    """Lower ``op`` (e.g. ``torch.ops.fxcompress.fake_quantize.default``) with ``fn`` during export."""
    _TRANSLATIONS[op] = fn


def onnx_translations() -> dict:
    return dict(_TRANSLATIONS)


# ---------------------------------------------------------------------------
# export ops
# ---------------------------------------------------------------------------

def storage_dtype(quant_min: int, quant_max: int) -> torch.dtype:
    """The 8-bit integer type that holds ``[quant_min, quant_max]``: uint8 if unsigned, else int8."""
    if quant_min >= 0 and quant_max <= 255:
        return torch.uint8
    if quant_min >= -128 and quant_max <= 127:
        return torch.int8
    raise ValueError(f"integer range [{quant_min}, {quant_max}] does not fit 8 bits")


def _per_axis(t: torch.Tensor, ndim: int, axis: Optional[int]) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


@torch.library.custom_op("fxcompress::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                        quant_max: int, axis: Optional[int]) -> torch.Tensor:
    """A frozen activation quantizer: ``fake_quantize`` with an integer zero point (QDQ in ONNX)."""
    from . import ops  # the op library: same kernel as training, so strip() equals the trained graph
    # The op library takes 1-d scale/zero point (per tensor: one element), as FakeQuantizer passes them.
    return ops.fake_quantize(x, scale.to(x.dtype).reshape(-1), zero_point.to(x.dtype).reshape(-1), quant_min,
                             quant_max, axis)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, quant_min, quant_max, axis):
    return torch.empty_like(x)


@torch.library.custom_op("fxcompress::dequantize_weight", mutates_args=())
def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                      quant_max: int, axis: Optional[int]) -> torch.Tensor:
    """An integer weight, dequantized: ``(q - zero_point) * scale`` (``DequantizeLinear`` in ONNX)."""
    zp = _per_axis(zero_point.to(torch.float32), q.dim(), axis)
    return (q.to(torch.float32) - zp) * _per_axis(scale.to(torch.float32), q.dim(), axis)


@dequantize_weight.register_fake
def _(q, scale, zero_point, quant_min, quant_max, axis):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


# -- onnxscript translations ------------------------------------------------

def _onnx_int_type(quant_min: int, quant_max: int):
    from onnxscript import INT8, UINT8
    return UINT8 if storage_dtype(quant_min, quant_max) == torch.uint8 else INT8


def _qdq_onnx(x, scale, zero_point, quant_min: int, quant_max: int, axis=None):
    from onnxscript import FLOAT
    from onnxscript import opset21 as op
    lo, hi = (0, 255) if storage_dtype(quant_min, quant_max) == torch.uint8 else (-128, 127)
    axis_kw = {} if axis is None else {"axis": axis}
    if (quant_min, quant_max) != (lo, hi):
        # QuantizeLinear saturates to the 8-bit type, fake_quantize to [quant_min, quant_max]:
        # clip the float input to the dequantized bounds first (exact: the map is monotonic).
        zp = op.Cast(zero_point, to=FLOAT.dtype)
        low = op.Mul(op.Sub(op.Constant(value_float=float(quant_min)), zp), scale)
        high = op.Mul(op.Sub(op.Constant(value_float=float(quant_max)), zp), scale)
        if axis is None:
            x = op.Clip(x, low, high)
        else:
            rank = len(x.shape) if x.shape is not None else None
            if rank is None:
                raise ValueError("a per-channel activation quantizer with a narrow range needs the input rank")
            axis_pos = axis % rank
            shape = op.Constant(value_ints=[-1] + [1] * (rank - axis_pos - 1))
            x = op.Max(op.Min(x, op.Reshape(high, shape)), op.Reshape(low, shape))
    q = op.QuantizeLinear(x, scale, zero_point, **axis_kw)
    return op.DequantizeLinear(q, scale, zero_point, **axis_kw)


def _dequantize_weight_onnx(q, scale, zero_point, quant_min: int, quant_max: int, axis=None):
    from onnxscript import opset21 as op
    if axis is None:
        return op.DequantizeLinear(q, scale, zero_point)
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _fake_quantize_onnx(x, scale, zero_point, quant_min: int, quant_max: int, axis=None):
    """The training op itself (a graph exported without lowering): the same QDQ, zero point rounded.

    Weights then reach the file as fp32 initializers behind a QuantizeLinear, which
    ``export_onnx`` turns into integer initializers (``_store_quantized_constants``).
    """
    from onnxscript import opset21 as op
    zp = op.Cast(op.Round(zero_point), to=_onnx_int_type(quant_min, quant_max).dtype)
    if axis is None:  # per tensor: ONNX wants scalars
        scalar = op.Constant(value_ints=[])
        scale, zp = op.Reshape(scale, scalar), op.Reshape(zp, scalar)
    return _qdq_onnx(x, scale, zp, quant_min, quant_max, axis)


register_onnx_translation(torch.ops.fxcompress.quantize_dequantize.default, _qdq_onnx)
register_onnx_translation(torch.ops.fxcompress.dequantize_weight.default, _dequantize_weight_onnx)


def _register_training_op_translation():
    try:
        from . import ops  # noqa: F401  (defines torch.ops.fxcompress.fake_quantize)
        target = torch.ops.fxcompress.fake_quantize.default
    except (ImportError, AttributeError, RuntimeError):
        return
    register_onnx_translation(target, _fake_quantize_onnx)


_register_training_op_translation()


# ---------------------------------------------------------------------------
# export_onnx
# ---------------------------------------------------------------------------

def _dynamic_shapes(args: tuple, kwargs: dict, dims: dict | None = None, arg_names: Sequence[str] = ()):
    """Dynamic batch for every input; with ``dims`` (``gm.meta["dynamic_dims"]`` of a traced
    Hugging Face model: ``{"input_ids": {0: "batch", 1: "sequence"}}``) the named dimensions of
    each input, one ``Dim`` per name. ``arg_names`` name the positional inputs (the graph's
    placeholders), so positional token ids get their sequence axis too."""
    named: dict[str, torch.export.Dim] = {}

    def dim(name):
        return named.setdefault(name, torch.export.Dim(name))

    def spec(value, input_name=None):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if dims and input_name in dims:
                return {d: dim(n) for d, n in dims[input_name].items()}
            return {0: dim("batch")}
        if isinstance(value, (tuple, list)):
            return type(value)(spec(v) for v in value)
        return None

    positional = tuple(spec(a, n) for a, n in zip(args, list(arg_names) + [None] * len(args)))
    if kwargs:
        return {k: spec(v, k) for k, v in kwargs.items()} if not args else \
            positional + tuple(spec(v, k) for k, v in kwargs.items())
    return positional


def _placeholder_names(module) -> list[str]:
    graph = getattr(module, "graph", None)
    return [n.target for n in graph.nodes if n.op == "placeholder"] if graph is not None else []


_NEVER_FOLD = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def _should_fold(node) -> bool | None:
    # A folded DequantizeLinear on a weight is an fp32 initializer: OpenVINO then runs the layer in fp32.
    return False if node.domain in ("", "ai.onnx") and node.op_type in _NEVER_FOLD else None


def _optimize(program):
    """The exporter's optimization (constant folding, fusions) with Q/DQ never folded."""
    import onnxscript.optimizer
    onnxscript.optimizer.optimize_ir(program.model, should_fold=_should_fold)
    try:
        from onnxscript.rewriter import onnx_fusions
    except ImportError:  # older onnxscript: no fusions step in the exporter either
        return
    onnx_fusions.fuse(program.model)


def _store_quantized_constants(model) -> int:
    """``QuantizeLinear`` on a constant (a slice of a parameter, folded by the optimizer) becomes the
    integer constant itself, read by the ``DequantizeLinear``: the weight form. Same values (ONNX
    QuantizeLinear: round half to even, saturate), and OpenVINO's low-precision transformations,
    which failed on a Q/DQ of a constant feeding an Add, accept it. Returns how many were stored."""
    import numpy as np
    import onnx_ir as ir
    graph = model.graph
    taken = {v.name for n in graph for v in n.outputs} | set(graph.initializers)
    stored = 0
    for node in list(graph):
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
            continue
        x, scale, zero_point = node.inputs[:3]
        out = node.outputs[0]
        if (any(v is None or v.const_value is None for v in (x, scale, zero_point))
                or out.is_graph_output()):
            continue
        zp = zero_point.const_value.numpy()
        if zp.dtype not in (np.int8, np.uint8):
            continue
        s = scale.const_value.numpy().astype(np.float32)
        xv = x.const_value.numpy().astype(np.float32)
        if s.ndim == 1 and s.size > 1:
            attr = node.attributes.get("axis")
            axis = (attr.value if attr is not None else 1) % xv.ndim
            shape = [1] * xv.ndim
            shape[axis] = -1
            s, zp = s.reshape(shape), zp.reshape(shape)
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(xv / s) + zp.astype(np.float32), info.min, info.max).astype(zp.dtype)
        name, i = f"{x.name}_quantized", 1
        while name in taken:
            name, i = f"{x.name}_quantized_{i}", i + 1
        taken.add(name)
        value = ir.Value(name=name, const_value=ir.tensor(q, name=name))
        graph.register_initializer(value)
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        stored += 1
    if stored:
        from onnx_ir.passes.common import RemoveUnusedNodesPass
        RemoveUnusedNodesPass()(model)
    return stored


# Ops through which ONNX Runtime's QDQPropagationTransformer moves a DequantizeLinear.
_SHAPE_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather",
                        "Expand", "Identity", "Tile", "Split"})


def _unsigned_before_shape_ops(model) -> int:
    """Write an int8 activation QDQ that a shape op reads as uint8 (integers and zero point + 128).

    The same values. ONNX Runtime 1.32's default session cannot load int8 activation
    QDQ ahead of a shape op (its QDQ propagation and its x86 int8-to-uint8 rewrite
    together produce an invalid QuantizeLinear; reproduction in docs/export.md). The
    lowering writes such activations as uint8 already; this catches the shape ops the
    exporter's decompositions add (scaled_dot_product_attention). Returns how many.
    """
    import numpy as np
    import onnx_ir as ir
    graph = model.graph
    changed = 0
    for node in list(graph):
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
            continue
        zero_point = node.inputs[2]
        if zero_point is None or zero_point.const_value is None:
            continue
        zp = zero_point.const_value.numpy()
        if zp.dtype != np.int8:
            continue
        dequantizers = [user for user, _ in node.outputs[0].uses()]
        if not all(d.op_type == "DequantizeLinear" and d.inputs[2] is zero_point for d in dequantizers):
            continue
        if not any(user.op_type in _SHAPE_OPS for d in dequantizers for user, _ in d.outputs[0].uses()):
            continue
        name = f"{zero_point.name}_uint8"
        shifted = ir.Value(name=name, const_value=ir.tensor((zp.astype(np.int16) + SIGNED_TO_UNSIGNED)
                                                          .astype(np.uint8), name=name))
        graph.register_initializer(shifted)
        for q_or_dq in [node, *dequantizers]:
            q_or_dq.replace_input_with(2, shifted)
        if "output_dtype" in node.attributes:
            del node.attributes["output_dtype"]
        node.outputs[0].dtype = ir.DataType.UINT8
        changed += 1
    return changed


_INT32_MAX = 2 ** 31 - 1


def _dequantize_scale(value, through_shape_ops: bool):
    """The constant scale of the DequantizeLinear that produces ``value`` (looking through shape ops,
    as ORT's QDQ propagation does), or None."""
    node = value.producer() if value is not None else None
    while through_shape_ops and node is not None and node.op_type in _SHAPE_OPS:
        node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.inputs[1].const_value is None:
        return None
    return node.inputs[1].const_value.numpy()


def _weight_integers(value):
    """The integers and zero point of the weight DequantizeLinear producing ``value`` (constants), or None."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.inputs[0].const_value is None:
        return None
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    if zero_point is not None and zero_point.const_value is None:
        return None
    return node.inputs[0].const_value.numpy(), 0 if zero_point is None else zero_point.const_value.numpy()


def _empty_output_channels(node, channels: int):
    """Output channels of a Conv/Gemm whose weight integers are all the zero point, so that the channel
    computes its bias alone (axis 0 of a Conv or ``Gemm(transB=1)`` weight, axis 1 of a ``Gemm(transB=0)``
    one: transformers' Conv1D); None when the weight's integers are unknown."""
    import numpy as np
    found = _weight_integers(node.inputs[1])
    if found is None:
        return None
    q, zp = found
    axis = 1 if node.op_type == "Gemm" and not node.attributes.get_int("transB", 0) else 0
    q = np.moveaxis(q.astype(np.int32), axis, 0)
    zp = np.asarray(zp).astype(np.int32)
    if zp.size > 1:                     # per output channel
        zp = zp.reshape(-1, *([1] * (q.ndim - 1)))
    empty = np.all((q == zp).reshape(q.shape[0], -1), axis=1)
    return empty if empty.shape == (channels,) else None


def _float_bias_where_int32_is_wrong(model) -> list[str]:
    """Move the bias of a quantized Conv/Gemm out into a float ``Add`` where ONNX Runtime's int32 bias
    would be wrong. ORT fuses ``DQ -> Conv/Gemm(float bias) [-> Q]`` into an integer kernel whose bias
    it quantizes to int32 at scale ``s_in * s_w`` (per output channel):

    * where ``|bias| / (s_in * s_w)`` does not fit int32 it overflows (a tiny activation range;
      GoogLeNet: 188 output steps);
    * where a channel's weight integers are all zero (a channel masked by sparsity or pruned to zero),
      its output is the bias alone, and the bias is rounded to a multiple of ``s_in * s_w`` with a
      weight scale that no weight uses (the empty range's 1.0): an error up to ``s_in / 2``, 2 output
      steps on a random attention net's classifier. (In a channel with weights, the rounding is half
      of one integer product, the resolution of the channel's own sum.)

    Conv/Gemm + Add is the same computation, and OpenVINO folds the Add back into its int8 conv.
    ONNX Runtime's quantization tool raises the weight scale instead, which would change the
    integers. Returns the nodes changed."""
    import numpy as np
    import onnx_ir as ir
    graph = model.graph
    changed = []
    for node in list(graph):
        if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        bias = node.inputs[2]
        s_in = _dequantize_scale(node.inputs[0], through_shape_ops=True)
        s_w = _dequantize_scale(node.inputs[1], through_shape_ops=False)
        if bias.const_value is None or s_in is None or s_w is None or s_in.size != 1:
            continue
        b = bias.const_value.numpy().astype(np.float64)
        overflows = np.any(np.abs(b) / (float(s_in) * np.broadcast_to(s_w.astype(np.float64), b.shape))
                           >= _INT32_MAX)
        empty = _empty_output_channels(node, b.size)
        bias_alone = empty is not None and bool(np.any(empty & (b.reshape(-1) != 0)))
        if not (overflows or bias_alone):
            continue
        out = node.outputs[0]
        if node.op_type == "Conv":   # [C] -> [C, 1, ...] against [N, C, spatial...]
            rank = len(node.inputs[1].shape) if node.inputs[1].shape is not None else 4
            b = b.reshape(-1, *([1] * (rank - 2)))
        name = f"{bias.name}_float_add"
        addend = ir.Value(name=name, const_value=ir.tensor(b.astype(np.float32), name=name))
        graph.register_initializer(addend)
        node.resize_inputs(2)
        if not bias.uses() and bias.name in graph.initializers:   # ORT warns of unused initializers
            graph.initializers.pop(bias.name)
        add = ir.Node("", "Add", inputs=[addend, addend], name=f"{node.name}_bias_add")
        biased = add.outputs[0]
        biased.dtype, biased.shape = out.dtype, out.shape
        out.replace_all_uses_with(biased, replace_graph_outputs=True)
        add.replace_input_with(0, out)
        biased.name, out.name = out.name, f"{out.name}_without_bias"   # a graph output keeps its name
        graph.insert_after(node, add)
        changed.append(node.name)
    return changed


_TORCHLIB_REGISTRIES: dict = {}


@contextlib.contextmanager
def _reused_torchlib_registry():
    """Build torch.onnx's table of ATen translations once per process instead of once per export.

    ``ONNXRegistry.from_torchlib`` re-imports and re-wraps every torchlib function
    (1.5-5 s on a 2-core machine, a third of a small model's export). For the
    duration of one ``export_onnx`` call it is replaced by a version handing out
    a fresh registry that copies a cached one (custom translations are then
    registered into the copy, as before). Where the private API is not as
    expected, nothing is replaced.
    """
    try:
        from torch.onnx._internal.exporter import _registration
        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, KeyError, AttributeError):
        yield
        return

    def from_torchlib(cls, *args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in _TORCHLIB_REGISTRIES:
            _TORCHLIB_REGISTRIES[key] = build(cls, *args, **kwargs)
        cached = _TORCHLIB_REGISTRIES[key]
        fresh = cls()
        fresh.__dict__.update(cached.__dict__)
        fresh.functions = {k: list(v) for k, v in cached.functions.items()}
        return fresh

    _registration.ONNXRegistry.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = original


def _count_weight_dequantizations(module) -> int | None:
    if not isinstance(module, torch.fx.GraphModule):
        return None
    target = torch.ops.fxcompress.dequantize_weight.default
    return sum(1 for n in module.graph.nodes
               if n.op == "call_function" and n.target in (target, torch.ops.fxcompress.dequantize_weight))


def export_onnx(module: torch.nn.Module, path, *, example_inputs=None, dynamic_batch: bool = True,
                opset_version: int = DEFAULT_OPSET, optimize: bool = True) -> str:
    """Export ``module`` to ``path``; returns the path as a string.

    ``example_inputs`` default to the GraphModule's compile-time example inputs.
    The batch dimension is dynamic unless ``dynamic_batch=False``. ``optimize``
    runs the exporter's constant folding (never on QuantizeLinear/DequantizeLinear).
    """
    if example_inputs is None and isinstance(module, torch.fx.GraphModule):
        args, kwargs = tuple(module.meta.get("example_inputs", ())), dict(module.meta.get("example_kwargs", {}))
    else:
        args, kwargs = normalize_example_inputs(example_inputs)
    if not args and not kwargs:
        raise ValueError("export_onnx needs example inputs: compile with example_inputs=... or pass them here")
    path = os.fspath(path)
    was_training = module.training
    module.eval()
    try:
        program, dynamic = _export_program(module, args, kwargs, dynamic_batch, opset_version)
    finally:
        module.train(was_training)
    if optimize:
        _optimize(program)
        _store_quantized_constants(program.model)
    _unsigned_before_shape_ops(program.model)
    _float_bias_where_int32_is_wrong(program.model)
    program.save(path)
    if dynamic:  # (a failed dynamic export has warned already)
        _warn_static_axes(path, getattr(module, "meta", {}).get("dynamic_dims"), args, kwargs)
    expected = _count_weight_dequantizations(module)
    if expected:
        from .runtime import qdq_summary
        found = qdq_summary(path).integer_weights
        if found < expected:
            warnings.warn(f"{path}: {expected - found} of {expected} integer weights did not survive the "
                          f"export as DequantizeLinear on an integer initializer (folded back to fp32?); "
                          f"OpenVINO runs those layers in floating point", stacklevel=2)
    return path


def _warn_static_axes(path: str, dims: dict | None, args: tuple, kwargs: dict):
    """Warns when an input axis meant to be dynamic came out of the exporter as a fixed size."""
    import onnx
    graph = onnx.load(path, load_external_data=False).graph
    meant = dims or {}
    static = []
    for position, value in enumerate(graph.input):
        axes = meant.get(value.name, {0: "batch"}) if meant else {0: "batch"}
        shape = value.type.tensor_type.shape.dim
        for axis, name in axes.items():
            if axis < len(shape) and not shape[axis].dim_param:
                static.append(f"{value.name} axis {axis} ({name}) = {shape[axis].dim_value}")
    if static:
        warnings.warn(f"{path}: exported with static shapes where dynamic ones were asked for: "
                      f"{', '.join(static)}; the model then takes only inputs of those sizes (a graph "
                      f"specialized on the example inputs' shapes)", stacklevel=3)


def _export_program(module, args, kwargs, dynamic_batch: bool, opset_version: int):
    common = dict(dynamo=True, opset_version=opset_version, optimize=False,
                  custom_translation_table=onnx_translations() or None, verbose=False)
    with _reused_torchlib_registry():
        if dynamic_batch:
            try:
                dims = getattr(module, "meta", {}).get("dynamic_dims")
                shapes = _dynamic_shapes(args, kwargs, dims, _placeholder_names(module))
                program = torch.onnx.export(module, args, kwargs=kwargs or None, dynamic_shapes=shapes, **common)
            except Exception as exc:  # noqa: BLE001 - retried with static shapes, and the user is told
                _raise_if_unconvertible(module, exc)
                what = "dynamic batch and sequence dimensions" if dims else "a dynamic batch dimension"
                warnings.warn(f"export with {what} failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); exporting with the example inputs' "
                              f"static shapes", stacklevel=3)
                return _export_static(module, args, kwargs, common), False
        else:
            program = _export_static(module, args, kwargs, common)
    return program, dynamic_batch


def _export_static(module, args, kwargs, common):
    try:
        return torch.onnx.export(module, args, kwargs=kwargs or None, **common)
    except Exception as exc:
        _raise_if_unconvertible(module, exc)
        raise


def _raise_if_unconvertible(module, exc: Exception):
    """An ExportError naming the op and its graph nodes when ``torch.onnx`` has no ONNX function for an
    op (e.g. ``adaptive_max_pool2d`` with uneven windows: ONNX has no adaptive max pooling)."""
    found = re.search(r"No ONNX function found for <OpOverload\(op='aten\.(\w+)'", str(exc))
    if found is None:
        return
    op = found.group(1)
    nodes = []
    if isinstance(module, torch.fx.GraphModule):
        for node in module.graph.nodes:
            target = getattr(node.target, "__name__", str(node.target)).split(".")[-1]
            if node.op == "call_function" and target == op:
                path = node.meta.get("module_path")
                nodes.append(f"{node.name} (in {path})" if path else node.name)
    where = f" at {', '.join(nodes)}" if nodes else ""
    raise ExportError(f"export_onnx: torch.onnx has no ONNX conversion for aten.{op}{where}; replace that op "
                      f"in the model (e.g. adaptive_max_pool2d to 1x1, or max_pool2d with a fixed kernel) "
                      f"or register a translation with fxcompress.export.register_onnx_translation") from exc
