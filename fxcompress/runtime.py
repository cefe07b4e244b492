"""Checking an exported model the way its runtimes see it.

* ``qdq_summary(path)``: what the ONNX file holds (integer weight initializers
  behind ``DequantizeLinear``, activation ``QuantizeLinear``/``DequantizeLinear``
  pairs, ``QuantizeLinear`` on constants, bytes of float and integer
  initializers, ops outside the standard domains). Needs only ``onnx``.
* ``run_onnxruntime(path, *inputs)``: outputs from ONNX Runtime (CPU).
* ``openvino_compile(path, precision=None, fuse_attention=True)`` and ``openvino_compute_layers(compiled)``:
  what OpenVINO's CPU plugin really executes. ``compiled_model.get_runtime_model()``
  lists executed layers with ``layerType``, ``runtimePrecision`` and the kernel
  (``primitiveType``); ``runtimePrecision`` alone misleads for weight-only
  layers, so a Convolution / MatMul / FullyConnected counts as integer only
  when its activation input is u8/i8 (u1: binary) *and* its kernel is an
  integer one (docs/design.md, runtime facts).

onnxruntime and openvino are imported on first use (dev extras), so importing
this module needs neither.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["QDQSummary", "qdq_summary", "run_onnxruntime", "openvino_compile", "openvino_infer",
           "OVLayer", "OVReport", "openvino_compute_layers", "COMPUTE_LAYER_TYPES"]

_STANDARD_DOMAINS = ("", "ai.onnx")
_INT_TYPES = {"INT8", "UINT8", "INT4", "UINT4", "INT16", "UINT16", "INT2", "UINT2"}


@dataclass
class QDQSummary:
    """What an exported ONNX file contains, as far as quantization is concerned."""
    integer_weights: int = 0          # DequantizeLinear whose input is an integer initializer
    integer_weight_types: Counter = field(default_factory=Counter)  # e.g. {"INT8": 21, "UINT8": 1}
    activation_quantizers: int = 0    # QuantizeLinear on a computed tensor
    weight_quantize_ops: int = 0      # QuantizeLinear on a constant: an fp32 weight stored in the file
    float_initializer_bytes: int = 0
    integer_initializer_bytes: int = 0
    custom_domain_ops: list[str] = field(default_factory=list)
    op_counts: Counter = field(default_factory=Counter)
    opset: int | None = None


def _load(model_or_path):
    import onnx
    if isinstance(model_or_path, (str, os.PathLike)):
        return onnx.load(os.fspath(model_or_path))
    return model_or_path


def qdq_summary(model_or_path) -> QDQSummary:
    from onnx import TensorProto
    model = _load(model_or_path)
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    constants = set(init)
    for node in graph.node:  # Constant nodes count as constants too
        if node.op_type == "Constant":
            constants.update(node.output)
    out = QDQSummary()
    out.opset = next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), None)
    for t in graph.initializer:
        nbytes = _tensor_bytes(t)
        type_name = TensorProto.DataType.Name(t.data_type)
        if type_name in _INT_TYPES:
            out.integer_initializer_bytes += nbytes
        elif type_name in ("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE"):
            out.float_initializer_bytes += nbytes
    for node in graph.node:
        if node.domain not in _STANDARD_DOMAINS:
            out.custom_domain_ops.append(f"{node.domain}::{node.op_type}")
        out.op_counts[node.op_type] += 1
        if node.op_type == "DequantizeLinear" and node.input[0] in init:
            type_name = TensorProto.DataType.Name(init[node.input[0]].data_type)
            if type_name in _INT_TYPES:
                out.integer_weights += 1
                out.integer_weight_types[type_name] += 1
        elif node.op_type == "QuantizeLinear":
            if node.input[0] in constants:
                out.weight_quantize_ops += 1
            else:
                out.activation_quantizers += 1
    return out


def _tensor_bytes(t) -> int:
    if t.raw_data:
        return len(t.raw_data)
    from onnx import numpy_helper
    return int(numpy_helper.to_array(t).nbytes)


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ONNX Runtime's graph optimization levels by short name ("all": what its default session runs)
ORT_LEVELS = ("all", "ext", "basic", "none")


def _feed(names: list[str], inputs: tuple) -> dict:
    """``{input name: array}`` from inputs in the model's input order, or from one dict by name."""
    if len(inputs) == 1 and isinstance(inputs[0], dict):
        return {n: _numpy(inputs[0][n]) for n in names}
    if len(names) != len(inputs):
        raise ValueError(f"the model takes {len(names)} inputs ({names}), got {len(inputs)}")
    return {n: _numpy(x) for n, x in zip(names, inputs)}


def run_onnxruntime(model_or_path, *inputs, threads: int | None = None, level: str = "all") -> list[np.ndarray]:
    """Run the model (a path or an ``onnx.ModelProto``) on ONNX Runtime's CPU provider; inputs in the
    model's input order or one dict by name. ``level``: the graph optimization level, one of
    ``ORT_LEVELS`` ("all", the default session's; "ext"ended, "basic", "none")."""
    import onnxruntime as ort
    levels = dict(zip(ORT_LEVELS, (ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   ort.GraphOptimizationLevel.ORT_DISABLE_ALL)))
    if level not in levels:
        raise ValueError(f"unknown ONNX Runtime level {level!r}: one of {', '.join(ORT_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    if threads:
        options.intra_op_num_threads = threads
    source = os.fspath(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) \
        else model_or_path.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, _feed([i.name for i in session.get_inputs()], inputs))


def openvino_compile(path_or_model, *, precision: str | None = None, device: str = "CPU",
                     config: dict | None = None, core=None, fuse_attention: bool = True):
    """Read (a path) and compile on ``device``. ``precision``: None (the plugin's default: bf16 on
    CPUs with bf16, f32 otherwise) or an ``INFERENCE_PRECISION_HINT`` such as ``"f32"``.

    ``fuse_attention=False`` is for inspection: on AVX-512 CPUs the CPU plugin fuses an attention
    block (``q @ k^T``, scale, mask, softmax, its quantizer and ``probs @ v``) into one ``Subgraph``
    layer whose runtime precision covers the whole block, so the two MatMuls are not listed; with
    its snippets disabled they run, and are reported, as their own layers (what AVX2 CPUs always
    do). Deploy with the default."""
    import openvino as ov
    core = core or ov.Core()
    model = core.read_model(os.fspath(path_or_model)) if isinstance(path_or_model, (str, os.PathLike)) \
        else path_or_model
    cfg = dict(config or {})
    if precision is not None:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    if not fuse_attention and device == "CPU":
        cfg["SNIPPETS_MODE"] = "DISABLE"
    return core.compile_model(model, device, cfg)


def openvino_infer(compiled, *inputs) -> list[np.ndarray]:
    """All outputs; inputs in the model's input order or one dict by name."""
    request = compiled.create_infer_request()
    feed = ({name: _numpy(x) for name, x in inputs[0].items()} if len(inputs) == 1 and isinstance(inputs[0], dict)
            else [_numpy(x) for x in inputs])
    result = request.infer(feed)
    return [np.asarray(result[o]) for o in compiled.outputs]


COMPUTE_LAYER_TYPES = ("Convolution", "GroupConvolution", "Deconvolution", "MatMul", "FullyConnected",
                       "BinaryConvolution")
_INT_KERNEL = re.compile(r"(i8|u8|u1|int8)$", re.IGNORECASE)


@dataclass
class OVLayer:
    name: str
    layer_type: str
    runtime_precision: str
    kernel: str
    input_types: list[str]
    # the source model's ops this runtime layer executes (``originalLayersNames``): a fused
    # attention ``Subgraph`` names its MatMuls here
    fused: tuple[str, ...] = ()

    @property
    def integer(self) -> bool:
        """Activations arrive as u8/i8 (u1: binary) and the kernel is an integer one."""
        activation = self.input_types[0] if self.input_types else ""
        return activation in ("u8", "i8", "u1") and bool(_INT_KERNEL.search(self.kernel))


@dataclass
class OVReport:
    layers: list[OVLayer]

    @property
    def integer(self) -> list[OVLayer]:
        return [layer for layer in self.layers if layer.integer]

    @property
    def floating(self) -> list[OVLayer]:
        return [layer for layer in self.layers if not layer.integer]

    def counts(self) -> dict[str, int]:
        return {"compute_layers": len(self.layers), "integer": len(self.integer),
                "floating": len(self.floating)}

    def __str__(self) -> str:
        rows = [f"{'layer':40s} {'type':16s} {'precision':9s} {'kernel':28s} inputs"]
        rows += [f"{x.name[:40]:40s} {x.layer_type:16s} {x.runtime_precision:9s} {x.kernel[:28]:28s} "
                 f"{','.join(x.input_types)}{'' if x.integer else '  <- not integer'}" for x in self.layers]
        return "\n".join(rows)


def _rt(info, key: str) -> str:
    if key not in info:
        return ""
    value = info[key]
    return value.astype(str) if hasattr(value, "astype") else str(value)


def openvino_compute_layers(compiled, layer_types: Sequence[str] = COMPUTE_LAYER_TYPES) -> OVReport:
    """The convolutions and matmuls OpenVINO executes, with their precisions and kernels. Add
    ``"Subgraph"`` to ``layer_types`` to see fused blocks too (attention on AVX-512 CPUs; see
    ``openvino_compile(fuse_attention=False)``)."""
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer_type = _rt(info, "layerType")
        if layer_type not in layer_types:
            continue
        input_types = [op.input(i).get_element_type().get_type_name() for i in range(op.get_input_size())]
        fused = tuple(name for name in _rt(info, "originalLayersNames").split(",") if name)
        layers.append(OVLayer(op.get_friendly_name(), layer_type, _rt(info, "runtimePrecision"),
                              _rt(info, "primitiveType"), input_types, fused))
    return OVReport(layers)
