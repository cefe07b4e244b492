"""Lowering of quantized graphs (BN folding, quantizers to export ops) and the exported ONNX structure.

The runtimes (ONNX Runtime, OpenVINO) are exercised in test_export_runtime.py;
here: numbers of the lowered graph against the fake-quantized one, the exact BN
fold, what the ONNX file holds (integer weight initializers behind
DequantizeLinear, no QuantizeLinear on weights, standard domains only, per-channel
axes), the file size, and the custom ops' registrations.
"""
from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcompress.export import export_onnx
from fxcompress.passes.quantization.lowering import (FoldBatchNorm, IntegerWeight, fold_channel_factor,
                                                     freeze_weight)
from fxcompress.quantizers import FakeQuantizer, QuantSpec
from fxcompress.runtime import qdq_summary, run_onnxruntime
from fxcompress.testing import strategies
from fxcompress.testing.models import randomize_norm_layers_
from quantization_export_helpers import activation_step, count_weighted, lower, quantize_graph


def _fake_quantizers(gm):
    return [m for m in gm.modules() if isinstance(m, FakeQuantizer)]


def _batch_norms(gm):
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)]


def _dequantize_weights(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.fxcompress.dequantize_weight.default]


class ConvBN(nn.Module):
    """conv -> BN -> relu -> conv -> BN -> pool -> linear, with negative BN gammas."""

    def __init__(self, bias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=bias)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                c = bn.num_features
                bn.weight.copy_(torch.linspace(-1.5, 1.5, c))  # negative, and one near zero
                bn.bias.copy_(torch.linspace(-0.3, 0.3, c))
                bn.running_mean.copy_(torch.linspace(-0.2, 0.4, c))
                bn.running_var.copy_(torch.linspace(0.5, 2.0, c))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- the custom export ops ------------------------------------------------------

def test_export_ops_registrations():
    x = torch.randn(2, 4, 3, 3)
    torch.library.opcheck(torch.ops.fxcompress.quantize_dequantize.default,
                          (x, torch.tensor(0.05), torch.tensor(3, dtype=torch.uint8), 0, 255, None))
    torch.library.opcheck(torch.ops.fxcompress.quantize_dequantize.default,
                          (x, torch.rand(4) + 0.01, torch.zeros(4, dtype=torch.int8), -8, 7, 1))
    q = torch.randint(-127, 128, (4, 2, 3), dtype=torch.int8)
    torch.library.opcheck(torch.ops.fxcompress.dequantize_weight.default,
                          (q, torch.rand(4) + 0.01, torch.zeros(4, dtype=torch.int8), -127, 127, 0))


def test_quantize_dequantize_equals_fake_quantize():
    x = torch.randn(64) * 3
    q = FakeQuantizer(QuantSpec(bits=4, mode="asymmetric"))
    q.set_range(torch.tensor(-1.0), torch.tensor(2.0))
    zp = q.zero_point.detach().round().to(torch.uint8).reshape(())
    out = torch.ops.fxcompress.quantize_dequantize(x, q.effective_scale().detach().reshape(()), zp, 0, 15, None)
    assert torch.equal(out, q(x).detach())


# -- integer weights and the BN factor -------------------------------------------

@pytest.mark.parametrize("spec", [
    QuantSpec(8, "symmetric", per_channel=True, axis=0, narrow_range=True),
    QuantSpec(8, "symmetric", per_channel=False),
    QuantSpec(4, "symmetric", per_channel=True, axis=0),
    QuantSpec(8, "asymmetric", per_channel=True, axis=0),
    QuantSpec(3, "asymmetric", per_channel=False),
], ids=["s8-pc-narrow", "s8-pt", "s4-pc", "a8-pc", "a3-pt"])
def test_freeze_weight_reproduces_the_quantizer(spec):
    w = torch.randn(6, 3, 3, 3)
    q = FakeQuantizer(spec, num_channels=6 if spec.per_channel else 1)
    dims = (1, 2, 3)
    q.set_range(w.amin(dim=dims) if spec.per_channel else w.min(), w.amax(dim=dims) if spec.per_channel else w.max())
    frozen = freeze_weight(q, w)
    assert frozen.q.min() >= spec.quant_range[0] and frozen.q.max() <= spec.quant_range[1]
    assert torch.equal(frozen.dequantize(), q(w).detach())
    stored, _, zp = frozen.export_tensors()
    assert stored.dtype == (torch.int8 if spec.mode == "symmetric" else torch.uint8) and zp.dtype == stored.dtype


@given(st.integers(0, 2**31 - 1), st.sampled_from([(-127, 127), (-128, 127), (0, 255), (0, 15), (-8, 7)]),
       st.booleans())
@settings(deadline=None)
def test_fold_channel_factor_is_exact(seed, qrange, per_tensor):
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = qrange
    channels = 5
    q = torch.randint(qmin, qmax + 1, (channels, 4), generator=g)
    symmetric = qmin < 0
    zp = torch.zeros(channels, dtype=torch.int64) if symmetric else torch.randint(qmin, qmax + 1, (channels,),
                                                                                   generator=g)
    scale = torch.rand(channels, generator=g) * 0.1 + 1e-3
    if per_tensor:
        scale, zp = scale[0].reshape(()), zp[0].reshape(())
    w = IntegerWeight(q, scale, zp, qmin, qmax, None if per_tensor else 0)
    factor = torch.randn(channels, generator=g)
    factor[0] = 0.0
    folded = fold_channel_factor(w, factor, axis=0)
    if folded is None:  # only when -q does not fit a symmetric range
        assert symmetric and bool(((q == qmin) & (factor < 0).reshape(-1, 1)).any()) and -qmin > qmax
        return
    assert folded.axis == 0 and folded.q.min() >= qmin and folded.q.max() <= qmax
    expected = w.dequantize().double() * factor.double().reshape(-1, 1)
    torch.testing.assert_close(folded.dequantize().double(), expected, rtol=1e-6, atol=1e-9)


# -- BN folding -----------------------------------------------------------------

@pytest.mark.parametrize("weights", ["per_channel", "per_tensor", "asymmetric"])
def test_bn_fold_is_exact_with_negative_gammas(weights):
    torch.manual_seed(0)
    model = ConvBN(bias=weights == "per_tensor").eval()
    x = torch.randn(2, 3, 8, 8)
    gm = quantize_graph(model, x, per_channel=weights != "per_tensor",
                        weight_mode="asymmetric" if weights == "asymmetric" else "symmetric")
    lowered, passes = lower(gm, debug=True)
    fold = next(p for p in passes if isinstance(p, FoldBatchNorm))
    assert len(fold.folded) == 2 and not fold.skipped
    assert not _batch_norms(lowered) and not _fake_quantizers(lowered)
    assert len(_dequantize_weights(lowered)) == 3
    # The folded conv weights are BN-factor * dequantized(original quantized weight), channel by channel.
    bn = model.bn1
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded_w = torch.ops.fxcompress.dequantize_weight(lowered.conv1_weight_q, lowered.conv1_weight_scale,
                                                      lowered.conv1_weight_zero_point, 0, 0, 0)
    original = gm.conv1_weight_quantizer(model.conv1.weight).detach()
    torch.testing.assert_close(folded_w, original * factor.detach().reshape(-1, 1, 1, 1), rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        for batch in (x, torch.randn(5, 3, 8, 8)):
            torch.testing.assert_close(lowered(batch), gm(batch), rtol=1e-5, atol=1e-5)


def test_bn_kept_where_negating_the_integers_overflows():
    model = ConvBN().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = quantize_graph(model, x, narrow_range=False)
    # channel 0 of conv1 has a negative BN factor: make its smallest weight hit qmin = -128
    quantizer = gm.conv1_weight_quantizer
    with torch.no_grad():
        w = model.conv1.weight
        scale = w[0].abs().max() / 127
        quantizer.scale[0] = scale
        model.conv1.weight[0].view(-1)[0] = -128 * scale  # the parameter is shared with gm
    assert model.bn1.weight[0] < 0 and freeze_weight(quantizer, model.conv1.weight).q.min() == -128
    lowered, passes = lower(gm)
    fold = next(p for p in passes if isinstance(p, FoldBatchNorm))
    assert [s["scope"] for s in fold.skipped] == ["bn1"] and "negative BN factor" in fold.skipped[0]["reason"]
    assert len(_batch_norms(lowered)) == 1
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), gm(x), rtol=1e-5, atol=1e-5)


def test_bn_after_unquantized_conv_folds_in_float():
    model = ConvBN().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = quantize_graph(model, x)
    gm.conv2_weight_quantizer.enabled = False  # a disabled quantizer is an identity: folded as float
    lowered, passes = lower(gm)
    assert not _batch_norms(lowered) and len(_dequantize_weights(lowered)) == 2
    assert lowered.get_parameter("conv2_weight_folded").dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), gm(x), rtol=1e-5, atol=1e-5)


# -- the lowered graph equals the fake-quantized one --------------------------------

@given(strategies.models())
@settings(deadline=None)
def test_lowered_graph_equals_fake_quantized_graph(case):
    gm = quantize_graph(case.model, case.example_inputs)
    lowered, _ = lower(gm)
    assert not _fake_quantizers(lowered)
    assert len(_dequantize_weights(lowered)) == count_weighted(gm)
    # no float copy of a quantized weight is left in the lowered module
    quantized_params = {n.args[0].target for n in gm.graph.nodes
                        if n.op == "call_module" and n.target.endswith("weight_quantizer")}
    left = {name for name, t in lowered.state_dict().items()}
    assert not quantized_params & left
    with torch.no_grad():
        expected, got = gm(*case.example_inputs), lowered(*case.example_inputs)
    assert (expected - got).abs().max() <= activation_step(gm) + 1e-6


def test_disabled_quantizers_are_removed():
    model = ConvBN().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = quantize_graph(model, x)
    for m in _fake_quantizers(gm):
        m.enabled = False
    lowered, _ = lower(gm)
    assert not _fake_quantizers(lowered) and not _dequantize_weights(lowered)
    assert not any(n.target is torch.ops.fxcompress.quantize_dequantize.default for n in lowered.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-5, atol=1e-5)


# -- what the ONNX file holds -------------------------------------------------------

class WideNet(nn.Module):
    """Big enough (300k weights) that weights dominate the file, as in real models: convs with BN, 2 linears."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 256, 3, padding=1)
        self.fc1 = nn.Linear(256, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.conv3(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(F.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def wide_exports(tmp_path_factory):
    torch.manual_seed(0)
    model = WideNet().eval()
    randomize_norm_layers_(model, seed=3)
    x = torch.randn(2, 3, 8, 8)
    gm = quantize_graph(model, x)
    lowered, _ = lower(gm)
    folder = tmp_path_factory.mktemp("wide")
    return {"int8": export_onnx(lowered, folder / "int8.onnx"),
            "fp32": export_onnx(model, folder / "fp32.onnx", example_inputs=(x,)),
            "gm": gm}


def test_exported_graph_holds_integer_weights(wide_exports):
    model = onnx.load(wide_exports["int8"])
    onnx.checker.check_model(model, full_check=True)
    summary = qdq_summary(model)
    assert summary.integer_weights == 5 and summary.integer_weight_types == {"INT8": 5}
    assert summary.weight_quantize_ops == 0           # no fp32 weight behind a QuantizeLinear
    assert summary.activation_quantizers == 5         # input, pooled relu1, relu2, flattened features, relu(fc1)
    assert summary.custom_domain_ops == []            # ONNX Runtime loads it
    assert summary.op_counts["BatchNormalization"] == 0
    # Per-channel axes: conv weights [O, I, kh, kw] on axis 0; Gemm(transB=1) weights [N, K] on axis 0.
    producers = {o: n for n in model.graph.node for o in n.output}
    init = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear" and dq.input[0] in init
            axis = {a.name: a.i for a in dq.attribute}.get("axis", 1)
            if node.op_type == "Gemm":
                assert {a.name: a.i for a in node.attribute}.get("transB") == 1
            assert axis == 0


def test_file_size_is_under_a_third_of_fp32(wide_exports):
    import os
    ratio = os.path.getsize(wide_exports["int8"]) / os.path.getsize(wide_exports["fp32"])
    assert ratio <= 0.3, ratio


def test_export_warns_when_weights_are_folded_back(tmp_path, monkeypatch):
    import fxcompress.export as export_module
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 6, 6)
    lowered, _ = lower(quantize_graph(model, x))
    # pretend an exporter that folds DequantizeLinear on constants into fp32 weights
    monkeypatch.setattr(export_module, "_should_fold", lambda node: True if node.op_type == "DequantizeLinear"
                        and all(v is not None and v.const_value is not None for v in node.inputs) else None)
    with pytest.warns(UserWarning, match="did not survive the export"):
        export_onnx(lowered, tmp_path / "m.onnx")


def test_unlowered_graph_exports_the_same_qdq(tmp_path):
    """Exporting the training graph itself (FakeQuantizers, no lowering) also gives QDQ with integer
    weights: the fake_quantize op has a translation, and QuantizeLinear on a constant weight is stored as
    the integer initializer."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()
    x = torch.randn(2, 3, 6, 6)
    gm = quantize_graph(model, x)
    path = export_onnx(gm, tmp_path / "unlowered.onnx")
    summary = qdq_summary(path)
    assert summary.integer_weights == 2 and summary.weight_quantize_ops == 0
    assert summary.activation_quantizers == 2 and summary.custom_domain_ops == []
    with torch.no_grad():
        expected = gm(x).numpy()
    assert abs(run_onnxruntime(path, x, level="basic")[0] - expected).max() <= activation_step(gm)


def test_signed_activations_read_by_convs_and_adds_are_int8_in_the_file(tmp_path):
    """ResNet's residual-add inputs that are not after a ReLU (the second conv of a block, the
    downsample branch) and the model input are signed: written int8 (zero point 0) where only
    Conv/Add read them, as NNCF writes them (OpenVINO then compiles the same runtime graph), and
    uint8 (zero point + 128) where a shape op follows (ONNX Runtime's default session,
    docs/export.md). The file loads in ONNX Runtime's default session."""
    import warnings

    import onnxruntime as ort
    from onnx import numpy_helper

    from fxcompress import compile_for_compression
    from fxcompress.passes import Quantize
    from fxcompress.testing import ResNetTiny

    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, _ = compile_for_compression(ResNetTiny(num_classes=10, width=8, seed=0), [Quantize(bits=8)],
                                          example_inputs=(x,), copy=True)
        ctrl.initialize([x])
        path = ctrl.export_onnx(tmp_path / "resnet_tiny.onnx")
    model = onnx.load(path)
    zero_points = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    readers = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    forms = []
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        zp = zero_points[q.input[2]]
        consumers = {c.op_type for dq in readers[q.output[0]] for c in readers.get(dq.output[0], [])}
        forms.append((str(zp.dtype), int(zp.flat[0]), consumers))
    signed = [f for f in forms if f[0] == "int8"]
    assert signed and all(zp == 0 and consumers <= {"Conv", "Add"} for _, zp, consumers in signed), forms
    assert any("Add" in consumers for _, _, consumers in signed)  # a residual input
    assert all(dtype == "uint8" for dtype, _, consumers in forms if consumers - {"Conv", "Add", "MatMul"})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].shape == (4, 10)


class _AdaptiveMaxPoolNet(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.conv, self.size = nn.Conv2d(1, 4, 3), size

    def forward(self, x):
        return F.adaptive_max_pool2d(self.conv(x), self.size)


def test_an_op_onnx_cannot_express_is_a_clear_export_error(tmp_path):
    """ONNX has no adaptive max pooling (torch.onnx converts it where the windows are even): the export
    names the op and its node instead of torch.onnx's conversion traceback, and writes nothing."""
    from fxcompress import compile_for_compression
    from fxcompress.errors import ExportError
    from fxcompress.passes import Quantize
    x = torch.randn(2, 1, 11, 10)
    ctrl, gm = compile_for_compression(_AdaptiveMaxPoolNet((3, 3)), [Quantize()], example_inputs=(x,))
    ctrl.initialize([(x,)])
    with pytest.raises(ExportError, match=r"no ONNX conversion for aten\.adaptive_max_pool2d at adaptive_max_pool2d"):
        ctrl.export_onnx(tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
    # (9x8 to 3x3 has uneven windows); to 1x1 it is a global max pool, which ONNX has
    ctrl, gm = compile_for_compression(_AdaptiveMaxPoolNet((1, 1)), [Quantize()], example_inputs=(x,))
    ctrl.initialize([(x,)])
    assert qdq_summary(ctrl.export_onnx(tmp_path / "global.onnx")).integer_weights == 1
