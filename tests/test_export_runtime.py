"""Exported QDQ models in the real runtimes: ONNX Runtime agrees with the fake-quantized graph,
OpenVINO compiles them on the CPU and runs every convolution and linear layer in integers.

Exports cost a few seconds each, so the random models are few and tiny.

"Within one quantization step": ONNX Runtime evaluates QuantizeLinear/DequantizeLinear
as specified (graph optimizations at the basic level; the extended level fuses QDQ
into integer kernels with their own requantization rounding), and its outputs must
be within one step of the coarsest activation quantizer of the fake-quantized
graph (float rounding differences may flip a rounding at a .5 boundary here and
there; each flip is one step of one element).
"""
from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import Phase, given, settings

from fxcompress.export import export_onnx
from fxcompress.optable import kind_of
from fxcompress.runtime import (openvino_compile, openvino_compute_layers, openvino_infer, qdq_summary,
                                run_onnxruntime)
from fxcompress.testing import build, strategies
from quantization_export_helpers import activation_step, batch_of, count_weighted, lower, quantize_graph

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


def _ort_reference(path, *inputs):
    """ONNX Runtime with QDQ evaluated as the ONNX spec says (no QDQ fusion into integer kernels)."""
    return run_onnxruntime(path, *inputs, level="basic")


def _export(gm, path, **kw):
    lowered, _ = lower(gm)
    return export_onnx(lowered, path, **kw), lowered


def _strided_pointwise_only(lowered) -> int:
    """Convs that OpenVINO's CPU plugin runs in f32 by its own choice (see docs/export.md).

    When every consumer of a tensor is a 1x1 conv with stride > 1, the plugin
    moves the stride into a subsampling pooling ahead of the dequantization, and
    those convs then get f32 inputs. Counted here so the assertion stays exact
    for everything else.
    """
    def strided_pointwise(node):
        if kind_of(node, lowered) != "conv" or node.op != "call_function":
            return False
        shape = node.args[1].meta.get("shape") or ()
        stride = node.args[3] if len(node.args) > 3 else 1
        strides = stride if isinstance(stride, (tuple, list)) else (stride,)
        return all(k == 1 for k in shape[2:]) and any(s > 1 for s in strides)

    count = 0
    for node in lowered.graph.nodes:
        users = list(node.users)
        if users and all(strided_pointwise(u) for u in users):
            count += len(users)
    return count


# OpenVINO's CPU plugin defaults to bf16 for what is not quantized on CPUs with bf16 (AVX-512 BF16,
# AMX) and to f32 elsewhere; the tests pin f32 so that what they count and compare is the same on every
# x86-64 CPU (the integer layers are int8 under either hint).
OPENVINO_PRECISION = "f32"


def _check_openvino(path, gm, inputs, expected_integer):
    compiled = openvino_compile(path, precision=OPENVINO_PRECISION)
    report = openvino_compute_layers(compiled)
    assert len(report.integer) == expected_integer, f"\n{report}"
    out = openvino_infer(compiled, *inputs)[0]
    assert out.shape == tuple(gm(*inputs).shape)
    return report, out


# -- random models ---------------------------------------------------------------------

# Each example exports (seconds): few examples, and no shrinking (minutes of re-exports); a failure
# prints the model's spec, which rebuilds it.
@given(strategies.models())
@settings(deadline=None, max_examples=4, phases=[Phase.explicit, Phase.reuse, Phase.generate])
def test_runtimes_agree_on_random_models(tmp_path_factory, case):
    gm = quantize_graph(case.model, case.example_inputs)
    path, lowered = _export(gm, tmp_path_factory.mktemp("random") / "model.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    summary = qdq_summary(model)
    assert summary.integer_weights == count_weighted(gm) and summary.custom_domain_ops == []

    dynamic = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param != ""
    inputs = batch_of(case.example_inputs, 3) if dynamic else case.example_inputs
    with torch.no_grad():
        expected = gm(*inputs).numpy()
    assert abs(_ort_reference(path, *inputs)[0] - expected).max() <= activation_step(gm)
    # ONNX Runtime's default session fuses QDQ into integer kernels with their own requantization
    # (a few steps off on some graphs, see docs/export.md): it must load and run the model.
    assert run_onnxruntime(path, *inputs)[0].shape == expected.shape

    layers = count_weighted(gm)
    _check_openvino(path, gm, inputs, layers - _strided_pointwise_only(lowered))


# -- the model zoo: every conv and linear runs in integers in OpenVINO ----------------------

@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenet_v2_tiny", "mlp", "transformer_encoder_tiny_features",
                                  pytest.param("resnet18_like", marks=pytest.mark.slow),
                                  pytest.param("densenet_tiny", marks=pytest.mark.slow),
                                  pytest.param("digits_cnn", marks=pytest.mark.slow)])
def test_openvino_runs_every_conv_and_linear_in_int8(name, tmp_path):
    case = build(name)
    gm = quantize_graph(case.model, case.example_inputs)
    path, lowered = _export(gm, tmp_path / f"{name}.onnx")
    layers = count_weighted(gm)
    report, out = _check_openvino(path, gm, case.example_inputs, layers)
    assert {layer.input_types[1] for layer in report.integer} <= {"i8", "u8"}  # integer weights
    with torch.no_grad():
        expected = gm(*case.example_inputs).numpy()
    # measured: 0.057 of a step at most (resnet_tiny), the same with ATen at AVX2 and at its baseline
    assert abs(_ort_reference(path, *case.example_inputs)[0] - expected).max() <= activation_step(gm)


# -- BN folding in the runtimes ------------------------------------------------------------

class ConvBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.weight.copy_(torch.linspace(-2.0, 1.5, 8))  # half of the gammas negative
                bn.bias.copy_(torch.linspace(-0.5, 0.5, 8))
                bn.running_mean.copy_(torch.linspace(-0.3, 0.3, 8))
                bn.running_var.copy_(torch.linspace(0.2, 3.0, 8))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_bn_folded_export_equals_fake_quantized_graph(per_channel, tmp_path):
    torch.manual_seed(0)
    model = ConvBNNet().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = quantize_graph(model, x, per_channel=per_channel)
    path, lowered = _export(gm, tmp_path / "bn.onnx")
    assert qdq_summary(path).op_counts["BatchNormalization"] == 0
    x2 = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = gm(x2).numpy()
    # exact up to float rounding: nearly every output to 1e-5; where float rounding flipped a
    # rounding at a .5 boundary inside the network, within one step
    # measured: 75% (per-channel) and 100% (per-tensor) within 1e-5, max 0.016 of a step, AVX2 and baseline
    diff = abs(_ort_reference(path, x2)[0] - expected)
    assert (diff <= 1e-5).mean() >= 0.5 and diff.max() <= activation_step(gm)
    _check_openvino(path, gm, (x2,), 3)


# -- dynamic batch ------------------------------------------------------------------------

def test_dynamic_batch(tmp_path):
    case = build("resnet_tiny")
    gm = quantize_graph(case.model, case.example_inputs)
    path, lowered = _export(gm, tmp_path / "dynamic.onnx")
    compiled = openvino_compile(path, precision=OPENVINO_PRECISION)
    for batch in (1, 5):
        inputs = batch_of(case.example_inputs, batch)
        with torch.no_grad():
            expected = gm(*inputs).numpy()
        assert run_onnxruntime(path, *inputs)[0].shape == expected.shape
        assert abs(_ort_reference(path, *inputs)[0] - expected).max() <= activation_step(gm)
        assert openvino_infer(compiled, *inputs)[0].shape == expected.shape

    static = export_onnx(lowered, tmp_path / "static.onnx", dynamic_batch=False)
    dims = onnx.load(static).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == case.example_inputs[0].shape[0]


# -- bit widths 2..7 -----------------------------------------------------------------------

def test_low_bit_widths_are_read_by_both_runtimes(tmp_path):
    """2..7-bit weights are stored as int8 within their narrowed range; 2..7-bit activations get a Clip to
    their range ahead of an 8-bit QuantizeLinear. OpenVINO then runs every layer u8 x i8."""
    case = build("resnet_tiny")  # 10 conv/linear layers: bits cycle 2, 3, ..., 7
    bits = [2, 3, 4, 5, 6, 7]
    gm = quantize_graph(case.model, case.example_inputs, bits_per_layer=bits)
    path, lowered = _export(gm, tmp_path / "lowbit.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    summary = qdq_summary(model)
    assert summary.integer_weight_types == {"INT8": 10}
    narrow = [n for n in lowered.graph.nodes if n.target is torch.ops.fxcompress.quantize_dequantize.default
              and (n.args[3], n.args[4]) not in ((0, 255), (-128, 127))]
    assert narrow and summary.op_counts["Clip"] == len(narrow)  # one Clip per activation below 8 bits
    ranges = sorted({(n.args[3], n.args[4]) for n in lowered.graph.nodes
                     if n.target is torch.ops.fxcompress.dequantize_weight.default})
    assert ranges == sorted((-(2 ** (b - 1)) + 1, 2 ** (b - 1) - 1) for b in bits)
    for t in model.graph.initializer:  # the stored integers stay inside each layer's range
        if t.name.endswith("_weight_q"):
            values = onnx.numpy_helper.to_array(t)
            assert max(abs(int(values.min())), int(values.max())) <= 63
    inputs = batch_of(case.example_inputs, 3)
    with torch.no_grad():
        expected = gm(*inputs).numpy()
    assert abs(_ort_reference(path, *inputs)[0] - expected).max() <= activation_step(gm)
    _check_openvino(path, gm, inputs, count_weighted(gm))


# -- end to end through the Quantize pass -----------------------------------------------------

def test_quantize_pass_export_runs_int8_in_openvino(tmp_path):
    from fxcompress import compile_for_compression
    from fxcompress.passes import Quantize

    case = build("resnet_tiny")
    ctrl, gm = compile_for_compression(case.model, [Quantize(bits=8)], example_inputs=case.example_inputs)
    ctrl.initialize([case.example_inputs[0]])
    path = ctrl.export_onnx(tmp_path / "ctrl.onnx")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    gm.eval()
    inputs = batch_of(case.example_inputs, 3)
    with torch.no_grad():
        expected = gm(*inputs).numpy()
    assert abs(_ort_reference(path, *inputs)[0] - expected).max() <= activation_step(gm)
    stripped = ctrl.strip()
    with torch.no_grad():
        assert abs(stripped(*inputs).numpy() - expected).max() <= activation_step(gm)
    _check_openvino(path, gm, inputs, count_weighted(gm))
