"""Fast bias correction (``Quantize(fast_bias_correction=True)``, on in ``quantize_post_training``):
what it corrects, exactly by how much, and that it keeps the promises (user's model untouched,
checkpoints, export, repeated initialize)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress import Config, ConfigError, compile_for_compression, load_state
from fxcompress.passes import Quantize, quantize_post_training
from fxcompress.testing import DigitsCNN, assert_state_unchanged, state_snapshot

NO_ADAPTATION = {"range": {"num_init_samples": 64}, "batchnorm_adaptation": {"num_bn_adaptation_samples": 0}}


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def _data(shape, n=4, batch=16, seed=1, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g) + shift for _ in range(n)]


def _compile(model, example, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_for_compression(model, [Quantize(**kw)], example_inputs=(example,))


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_linear_output_mean_equals_float_on_the_calibration_data(weight_bits):
    """For a linear layer the correction is exact: over the calibration samples, the layer with
    quantized weights and corrected bias has the float layer's mean output, given the float input."""
    model = TwoLinear().eval()
    data = _data((12,))
    ctrl, gm = _compile(model, data[0], fast_bias_correction=True, weights={"bits": weight_bits},
                        initializer=NO_ADAPTATION)
    ctrl.initialize(data)
    assert ctrl.statistics()["quantization"].summary["bias_corrected"] == 2
    x = torch.cat(data)
    with torch.no_grad():
        inputs = {"fc1": x, "fc2": F.relu(model.fc1(x))}  # the float model's inputs of each layer
        for name, layer_input in inputs.items():
            float_layer = getattr(model, name)
            weight = getattr(gm, f"{name}_weight_quantizer")(float_layer.weight)
            corrected = F.linear(layer_input, weight, getattr(gm, name).bias).mean(0)
            uncorrected = F.linear(layer_input, weight, float_layer.bias).mean(0)
            target = float_layer(layer_input).mean(0)
            assert (uncorrected - target).abs().max() > 1e-3  # there was a shift to correct
            torch.testing.assert_close(corrected, target, atol=2e-6, rtol=0)


def test_conv_without_bias_corrects_the_next_batchnorm_and_leaves_the_user_model_alone():
    model = DigitsCNN(seed=0).eval()
    with torch.no_grad():  # trained-looking statistics, so the BatchNorm factors are not all 1
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    before = state_snapshot(model)
    data = _data((1, 8, 8))
    ctrl, gm = quantize_post_training(model, data, subset_size=64)
    assert set(ctrl.quantization.bias_shifts) == {"bn1.bias", "bn2.bias", "bn3.bias", "fc.bias"}
    assert ctrl.statistics()["quantization"].summary["bn_adapted"] == 0  # as nncf.quantize
    assert_state_unchanged(before, model)
    for path, shift in ctrl.quantization.bias_shifts.items():
        owner, _, name = path.rpartition(".")
        assert torch.equal(getattr(gm.get_submodule(owner), name), getattr(model.get_submodule(owner), name) + shift)
        assert shift.abs().max() > 0
    # a conv followed by BatchNorm: its output shift times the BatchNorm factor moved the BatchNorm's bias
    conv_shift = _conv_mean_shift(gm, model, torch.cat(data))
    factor = model.bn1.weight / torch.sqrt(model.bn1.running_var + model.bn1.eps)
    torch.testing.assert_close(ctrl.quantization.bias_shifts["bn1.bias"], conv_shift * factor, atol=1e-5, rtol=1e-3)


@torch.no_grad()
def _conv_mean_shift(gm, model, x):
    """conv1's per-channel output mean over the data, float weights minus quantized weights (same padding on
    both sides: the correction evaluates both on the mean input, which for conv1's one input channel
    differs from the data only inside each image; the interior dominates at 8x8)."""
    weight = gm.conv1_weight_quantizer(model.conv1.weight)
    blob = x.mean(dim=(0, 2, 3), keepdim=True).expand(1, *x.shape[1:])
    return (F.conv2d(blob, model.conv1.weight, padding=1) - F.conv2d(blob, weight, padding=1)).mean(dim=(0, 2, 3))


def test_batchnorm_adaptation_after_it_skips_those_layers_with_the_reason():
    model = DigitsCNN(seed=0).eval()
    ctrl, gm = _compile(model, torch.randn(2, 1, 8, 8), fast_bias_correction=True,
                        initializer={"range": {"num_init_samples": 32},
                                     "batchnorm_adaptation": {"num_bn_adaptation_samples": 32}})
    ctrl.initialize(_data((1, 8, 8)))
    assert set(ctrl.quantization.bias_shifts) == {"fc.bias"}
    skipped = {s["scope"]: s["reason"] for s in ctrl.statistics()["quantization"].skipped}
    assert set(skipped) == {"conv1", "conv2", "conv3"}
    assert "BatchNorm adaptation re-centres bn1" in skipped["conv1"]


def test_off_by_default_in_quantize():
    model = TwoLinear().eval()
    data = _data((12,))
    ctrl, gm = _compile(model, data[0], initializer=NO_ADAPTATION)
    ctrl.initialize(data)
    assert gm.fc1.bias is model.fc1.bias and gm.fc2.bias is model.fc2.bias
    assert ctrl.statistics()["quantization"].summary["bias_corrected"] == 0


def test_repeated_initialize_corrects_once():
    model = TwoLinear().eval()
    data = _data((12,))
    ctrl, gm = _compile(model, data[0], fast_bias_correction=True, initializer=NO_ADAPTATION)
    ctrl.initialize(data)
    first = gm.fc2.bias.detach().clone()
    ctrl.initialize(data)
    torch.testing.assert_close(gm.fc2.bias.detach(), first, atol=1e-6, rtol=0)


def test_checkpoint_round_trip_keeps_the_corrected_biases(tmp_path):
    model = DigitsCNN(seed=0).eval()
    data = _data((1, 8, 8))
    ctrl, gm = quantize_post_training(model, data, subset_size=64)
    torch.save({"gm": gm.state_dict(), "ctrl": ctrl.state_dict()}, tmp_path / "ckpt.pt")
    ctrl2, gm2 = _compile(model, data[0], fast_bias_correction=True, initializer=NO_ADAPTATION)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    load_state(gm2, saved["gm"])
    ctrl2.load_state_dict(saved["ctrl"])
    assert ctrl2.statistics().to_dict() == ctrl.statistics().to_dict()
    x = torch.cat(data)
    with torch.no_grad():
        assert torch.equal(gm2(x), gm(x))
    # a later initialize() starts from the uncorrected biases: the result is the first run's again
    ctrl2.initialize(data)
    torch.testing.assert_close(gm2.bn2.bias.detach(), gm.bn2.bias.detach(), atol=1e-6, rtol=0)


def test_export_agrees_with_the_fake_quantized_graph(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = DigitsCNN(seed=0).eval()
    data = _data((1, 8, 8))
    ctrl, gm = quantize_post_training(model, data, subset_size=64, quantize_outputs=True)
    assert len(ctrl.quantization.bias_shifts) == 4
    path = ctrl.export_onnx(tmp_path / "ptq.onnx")
    x = torch.cat(data)
    with torch.no_grad():
        expected = gm(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    output_quantizer = gm.get_submodule(next(n for n in gm.graph.nodes if n.op == "output").args[0].target)
    step = float(output_quantizer.effective_scale().detach().max())
    assert abs(got - expected).max() <= step + 1e-6


def test_config_key_and_bad_arguments():
    config = Config.from_dict({"input_info": {"sample_size": [1, 12]},
                               "compression": {"algorithm": "quantization", "fast_bias_correction": True}})
    assert config.passes[0].params["fast_bias_correction"] is True
    with pytest.raises(ConfigError, match="fast_bias_correction"):
        Quantize(fast_bias_correction="yes")
    with pytest.raises(ConfigError, match="subset_size"):
        quantize_post_training(TwoLinear(), _data((12,)), subset_size=0)
