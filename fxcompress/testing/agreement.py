"""Per-quantizer agreement between an exported QDQ model in a runtime and the fake-quantized graph.

An output several quantization steps off does not say whether a runtime computes some quantizer
wrongly or whether one-step rounding flips upstream were amplified by the layers in between
(docs/export.md, "Agreement"). :func:`quantizer_agreement` separates the two: every activation
quantizer is computed by the runtime and by the fake-quantized PyTorch graph from the **same exact
values** of the quantizers upstream (values on their integer grids) and the two are compared, in steps
of that quantizer. A lowering that computes the same thing stays within one step at every quantizer
(float rounding may flip a rounding at a .5 boundary); more than one step given exact inputs is a real
difference in what the runtime computes.

Two ways to give both sides the same upstream values, in one runtime call each:

* ``probes``: the upstream values are the **runtime's own**. Every compared ``QuantizeLinear`` of the
  file gets a second ``DequantizeLinear`` (the same scale, zero point and axis) whose output is an extra
  graph output; the original one still feeds the graph, so the runtime sees the node groups of the file.
  The graph is then run with the runtime's values substituted at each quantizer. Used (``auto``) in
  ONNX Runtime when the probed model's real outputs equal the file's bitwise (checked on every call).
  Not in OpenVINO: there a probe can read other values than the quantizer's readers get (DenseNet-121,
  docs/export.md "Agreement"), even where the outputs are unchanged.
* ``split``: the upstream values are the **graph's own**. Otherwise (and in OpenVINO, where a
  QuantizeLinear with a second reader is no longer fused into its producer) the runtime runs a copy
  of the file in which every compared quantizer's ``DequantizeLinear`` is a graph output and its
  readers read instead a graph input, fed with the fake-quantized graph's value there, through a
  ``QuantizeLinear``/``DequantizeLinear`` pair on the same grid (:func:`_split`): each
  quantizer is computed by the runtime from exact values, by the nodes of the file between it and the
  quantizers upstream. What the runtime fuses differs from the full model only at those boundaries: a
  quantizer between a conv and a residual add is fused into the conv's epilogue in the full model, and
  here the add starts from the fed value (the same values on the same grid). Replaces one compile
  per quantizer (a copy of the file cut at each), minutes per model in OpenVINO.

The kit imports nothing from fxcompress: the lowered graph's ``quantize_dequantize`` op is found by
name, and onnxruntime / openvino are imported on use.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["QuantizerError", "QuantizerAgreement", "quantizer_agreement", "run_runtime"]


@dataclass
class QuantizerError:
    name: str               # the activation quantizer's node in the fake-quantized graph
    steps: float            # max |runtime - graph| / step over its elements, given the runtime's upstream values
    elements_off: int       # elements that differ at all
    elements: int


@dataclass
class QuantizerAgreement:
    runtime: str
    quantizers: list[QuantizerError] = field(default_factory=list)
    method: str = "probes"                 # how the runtime's values were read (module docstring)
    output_steps: float = 0.0              # the first output's error against gm, in steps of its quantizer
                                           # (absolute when the output has none)

    @property
    def max_steps(self) -> float:
        return max((q.steps for q in self.quantizers), default=0.0)

    def worst(self, n: int = 3) -> list[QuantizerError]:
        return sorted(self.quantizers, key=lambda q: -q.steps)[:n]

    def __str__(self) -> str:
        worst = ", ".join(f"{q.name} {q.steps:.2f} ({q.elements_off}/{q.elements})" for q in self.worst())
        return (f"{self.runtime}: {len(self.quantizers)} quantizers, max {self.max_steps:.2f} steps "
                f"(worst: {worst}); output {self.output_steps:.2f} steps"
                f" [{self.method}]")


def _activation_dequantizers(model) -> list:
    """The file's activation DequantizeLinear nodes of ``quantize_dequantize`` ops, in graph order.

    The exporter names them after the exported program's nodes (``quantize_dequantize``,
    ``quantize_dequantize_1``, ...), numbered in execution order of the lowered graph."""
    constants = {t.name for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in constants
          and n.output[0].startswith("quantize_dequantize")
          and getattr(producers.get(n.input[0]), "op_type", None) == "QuantizeLinear"]
    return sorted(dq, key=lambda n: int(n.output[0].rpartition("_")[2]) if n.output[0][-1].isdigit() else 0)


def _probed(model, dequantizers):
    """A copy of ``model`` with a second DequantizeLinear on each quantizer's integers as an extra output."""
    import onnx
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    for dq in dequantizers:
        name = f"{dq.output[0]}__probe"
        probe = onnx.helper.make_node("DequantizeLinear", list(dq.input), [name], name=name)
        probe.attribute.extend(dq.attribute)
        probed.graph.node.append(probe)
        probed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return probed


def _split(model, dequantizers, shapes):
    """A copy of ``model`` in which every reader of one of ``dequantizers`` reads instead a new graph input
    (named after the DequantizeLinear's output, ``__in``) through a QuantizeLinear/DequantizeLinear pair on
    that DequantizeLinear's grid (of the given ``shapes``); the graph outputs are the ``dequantizers``' outputs.

    Fed values on those grids, the pair is exact, and every quantizer is computed from the fed values by the
    nodes between it and the quantizers upstream, fused by the runtime as in the full model (a runtime fuses
    a DequantizeLinear into its reader and a QuantizeLinear into its producer: the pair at each new input
    is what it fuses at a quantizer's readers, the DequantizeLinear at each output what it fuses as in a
    cut of the model there). Returns the copy and the new inputs' names, in ``dequantizers``' order."""
    import onnx
    split = onnx.ModelProto()
    split.CopyFrom(model)
    renamed, names, pairs = {}, [], []
    for dq, shape in zip(dequantizers, shapes):
        source = dq.output[0]
        name, quantized, dequantized = f"{source}__in", f"{source}__in_q", f"{source}__in_dq"
        q = onnx.helper.make_node("QuantizeLinear", [name, *dq.input[1:]], [quantized], name=quantized)
        q.attribute.extend(a for a in dq.attribute if a.name == "axis")
        again = onnx.helper.make_node("DequantizeLinear", [quantized, *dq.input[1:]], [dequantized], name=dequantized)
        again.attribute.extend(dq.attribute)
        pairs += [q, again]
        split.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape)))
        renamed[source] = dequantized
        names.append(name)
    for node in split.graph.node:
        for i, x in enumerate(node.input):
            if x in renamed:
                node.input[i] = renamed[x]
    nodes = pairs + list(split.graph.node)  # the pairs read graph inputs only: first keeps the order topological
    del split.graph.node[:]
    split.graph.node.extend(nodes)
    del split.graph.output[:]
    split.graph.output.extend(onnx.helper.make_tensor_value_info(dq.output[0], onnx.TensorProto.FLOAT, None)
                              for dq in dequantizers)
    return split, names


def run_runtime(path, inputs, runtime: str, threads: int = 1) -> list[np.ndarray]:
    """All outputs of the model at ``path`` for ``inputs`` (in the graph's input order, or a dict by input
    name): ``runtime`` is ``ort_<all|ext|basic|none>`` (ONNX Runtime CPU at that optimization level) or
    ``ov`` (OpenVINO CPU, ``INFERENCE_PRECISION_HINT=f32``), on ``threads`` threads (docs/export.md,
    "OpenVINO on several threads", for why the check uses one)."""
    as_array = lambda x: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)  # noqa: E731
    if runtime.startswith("ort_"):
        import onnxruntime as ort
        level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 "ext": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                 "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                 "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[runtime[4:]]
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        feed = inputs if isinstance(inputs, dict) else dict(zip(names, inputs))
        return session.run(None, {name: as_array(feed[name]) for name in names})
    if runtime == "ov":
        import openvino as ov
        compiled = ov.Core().compile_model(os.fspath(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                     "INFERENCE_NUM_THREADS": threads})
        feed = ({name: as_array(x) for name, x in inputs.items()} if isinstance(inputs, dict)
                else [as_array(x) for x in inputs])
        result = compiled.create_infer_request().infer(feed)
        return [np.asarray(result[o]) for o in compiled.outputs]
    raise ValueError(f"unknown runtime {runtime!r}: ort_all, ort_ext, ort_basic, ort_none or ov")


def _error(name: str, ours: torch.Tensor, theirs, step: float) -> QuantizerError:
    theirs = torch.from_numpy(np.ascontiguousarray(theirs)).to(ours.dtype)
    if theirs.shape != ours.shape:
        raise RuntimeError(f"{name}: the runtime's value has shape {tuple(theirs.shape)}, "
                           f"the graph's {tuple(ours.shape)}")
    diff = (ours - theirs).abs()
    return QuantizerError(name, float(diff.max()) / step if diff.numel() else 0.0, int((diff > 0).sum()),
                          diff.numel())


class _Substituting(torch.fx.Interpreter):
    """Runs the fake-quantized graph; records its value at each activation quantizer named in ``steps``
    and, where ``runtime_values`` has one, the error against it and continues from the runtime's value."""

    def __init__(self, gm, runtime_values: dict, steps: dict):
        super().__init__(gm)
        self.runtime_values, self.steps, self.errors, self.values = runtime_values, steps, [], {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.steps:
            self.values[n.name] = out
        if n.name not in self.runtime_values:
            return out
        self.errors.append(_error(n.name, out, self.runtime_values[n.name], self.steps[n.name]))
        return torch.from_numpy(np.ascontiguousarray(self.runtime_values[n.name])).to(out.dtype)


def quantizer_agreement(gm: torch.fx.GraphModule, lowered: torch.fx.GraphModule, path, inputs,
                        runtime: str = "ort_all", method: str = "auto") -> QuantizerAgreement:
    """Every activation quantizer of the fake-quantized ``gm``, given exact values of the quantizers
    upstream, against the runtime's value of it, in its own steps.

    ``method`` (module docstring): ``probes`` (the upstream values are the runtime's own), ``split``
    (they are ``gm``'s), or ``auto``: in ONNX Runtime probes where they leave its outputs bitwise
    unchanged, else split; in OpenVINO split. ``lowered`` is the graph ``path`` was exported from
    (``ctrl.lower()``); its
    ``quantize_dequantize`` nodes carry the names of ``gm``'s quantizer nodes and map in order onto the
    file's activation DequantizeLinear nodes. Re-quantizations the lowering adds (the int8 copy of an
    attention matmul operand, the same grid) have no quantizer in ``gm`` and are not compared. ``gm``
    must be in eval mode. Runtimes as in :func:`run_runtime` (one thread)."""
    import onnx
    if method not in ("auto", "probes", "split"):
        raise ValueError(f"unknown method {method!r}: auto, probes or split")
    qdq_op = torch.ops.fxcompress.quantize_dequantize.default
    lowered_qdq = [n for n in lowered.graph.nodes if n.op == "call_function" and n.target is qdq_op]
    model = onnx.load(os.fspath(path))
    dequantizers = _activation_dequantizers(model)
    if len(dequantizers) != len(lowered_qdq):
        raise RuntimeError(f"{len(dequantizers)} activation DequantizeLinear in {path}, "
                           f"{len(lowered_qdq)} quantize_dequantize ops in the lowered graph")
    gm_nodes = {n.name for n in gm.graph.nodes if n.op == "call_module"}
    steps = {}
    for node in lowered_qdq:
        scale = node.args[1]
        value = lowered.get_buffer(scale.target) if isinstance(scale, torch.fx.Node) else torch.as_tensor(scale)
        steps[node.name] = float(value.max())
    compared = [(dq, node.name) for dq, node in zip(dequantizers, lowered_qdq) if node.name in gm_nodes]
    own = _Substituting(gm, {}, {name: steps[name] for _, name in compared})  # gm's own values
    with torch.no_grad():
        expected = own.run(*inputs)
    result = QuantizerAgreement(runtime, method=method)
    with tempfile.TemporaryDirectory() as tmp:
        plain = run_runtime(path, inputs, runtime)
        if method == "probes" or (method == "auto" and runtime != "ov"):
            probed_path = Path(tmp) / "probed.onnx"
            onnx.save(_probed(model, [dq for dq, _ in compared]), probed_path)
            outputs = run_runtime(probed_path, inputs, runtime)
            n_out = len(model.graph.output)
            if method == "probes" or all(np.array_equal(a, b) for a, b in zip(plain, outputs[:n_out])):
                result.method = "probes"
                interpreter = _Substituting(gm, {name: v for (_, name), v in zip(compared, outputs[n_out:])},
                                            steps)
                with torch.no_grad():
                    interpreter.run(*inputs)
                result.quantizers = interpreter.errors
        if result.method != "probes":
            split, names = _split(model, [dq for dq, _ in compared],
                                  [tuple(own.values[name].shape) for _, name in compared])
            onnx.save(split, Path(tmp) / "split.onnx")
            feed = dict(zip((i.name for i in model.graph.input), inputs))
            feed.update((input_name, own.values[name]) for input_name, (_, name) in zip(names, compared))
            values = run_runtime(Path(tmp) / "split.onnx", feed, runtime)
            result.method = "split"
            result.quantizers = [_error(name, own.values[name], value, steps[name])
                                 for (_, name), value in zip(compared, values)]
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected
    output_node = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    output_node = output_node[0] if isinstance(output_node, (tuple, list)) else output_node
    output_step = steps.get(getattr(output_node, "name", None))
    error = float(np.abs(plain[0] - expected.detach().numpy()).max())
    result.output_steps = error / output_step if output_step else error
    return result
