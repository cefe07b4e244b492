"""Activation smoothing (``Quantize(smooth_quant_alpha=...)``, SmoothQuant): the smoothed float model
computes the same function, the scales follow the formula, the quantization error drops on
activations with outlier channels, and the promises hold (user's model, checkpoints, export)."""
from __future__ import annotations

import warnings

import pytest
import torch

from fxcompress import ConfigError, compile_for_compression, load_state
from fxcompress.passes import Quantize, quantize_post_training
from fxcompress.passes.quantization.smoothing import ActivationSmoothing
from fxcompress.testing import DigitsCNN, TransformerEncoderTiny, assert_state_unchanged, state_snapshot

INIT = {"range": {"num_init_samples": 16}, "batchnorm_adaptation": {"num_bn_adaptation_samples": 0}}


def _model_and_data():
    model = TransformerEncoderTiny(input_mode="features", dropout=0.0, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, 12, generator=g)
    x[..., 3] *= 20  # an outlier channel, as transformer activations have
    return model, [x[:8], x[8:]]


def _compile(model, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(model, [Quantize(preset="mixed", initializer=INIT, **kw)],
                                           example_inputs=(data[0][:2],))
    ctrl.initialize(data)
    return ctrl, gm


def _relative_error(a, b):
    return ((a - b).pow(2).mean() / b.pow(2).mean()).item()


def test_smoothed_float_model_is_the_same_function_and_quantizes_better():
    model, data = _model_and_data()
    before = state_snapshot(model)
    x = torch.cat(data)
    with torch.no_grad():
        reference = model(x)
    errors = {}
    for alpha in (None, 0.5):
        # the attention matmuls in float: smoothing acts on linear-layer inputs, and the matmul operands'
        # own error (k has 7 bits under the overflow fix) diluted the comparison: 0.0363 vs 0.0358
        ctrl, gm = _compile(model, data, quantize_attention=False,
                            **({} if alpha is None else {"smooth_quant_alpha": alpha}))
        with torch.no_grad():
            errors[alpha] = _relative_error(gm(x), reference)
            for q in ctrl.quantization.quantizers:
                q.module.enabled = False
            torch.testing.assert_close(gm(x), reference, rtol=1e-5, atol=1e-5)  # float rounding only
    assert_state_unchanged(before, model)
    smoothing = [m for m in gm.modules() if isinstance(m, ActivationSmoothing)]
    # q/k/v share one smoothed input per layer; the feed-forward layers, the input projection and
    # the classifier read theirs alone
    assert ctrl.statistics()["quantization"].summary["smoothed"] == len(smoothing) == 8
    assert all(not torch.equal(m.scale, torch.ones_like(m.scale)) for m in smoothing)
    # measured 0.0370 without and 0.0351 with smoothing (deterministic: seeded model and data); the outlier
    # is in the model input only, the random layers after it have none
    assert errors[0.5] < 0.97 * errors[None], errors


def test_scales_follow_the_smoothquant_formula():
    model, data = _model_and_data()
    ctrl, gm = _compile(model, data, smooth_quant_alpha=0.5)
    smoothing = gm.get_submodule("x_input_smoothing")  # the model input, read by input_proj alone
    x_max = torch.cat(data).abs().amax(dim=(0, 1))
    w_max = model.input_proj.weight.abs().amax(dim=0)
    raw = (x_max.sqrt() / w_max.sqrt()).detach()
    # clipped as NNCF's SmoothQuant: up to the 10th percentile of the layer's scales, down to 100
    expected = raw.clamp(min=float(torch.quantile(raw, 0.1)), max=100.0)
    assert (expected != raw).any()  # the clipping is exercised: the flattest channels are raised
    torch.testing.assert_close(smoothing.scale, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(gm.input_proj.weight, model.input_proj.weight * expected, rtol=1e-6, atol=0)


def test_off_by_default_on_for_transformers_and_never_on_convolutions():
    model, data = _model_and_data()
    ctrl, gm = _compile(model, data)
    assert not any(isinstance(m, ActivationSmoothing) for m in gm.modules())
    # model_type "transformer" (inferred for Hugging Face models) smooths at 0.65; None switches it off
    ctrl, gm = _compile(model, data, model_type="transformer")
    assert ctrl.statistics()["quantization"].summary["smoothed"] == 8
    assert ctrl.quantization.smooth_quant_alpha == 0.65
    ctrl, gm = _compile(model, data, model_type="transformer", smooth_quant_alpha=None)
    assert not any(isinstance(m, ActivationSmoothing) for m in gm.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = quantize_post_training(model, data, model_type="transformer", subset_size=16)
    assert ctrl.statistics()["quantization"].summary["smoothed"] == 8
    assert ctrl.statistics()["quantization"].summary["preset"] == "mixed"
    cnn = DigitsCNN(seed=0).eval()
    cnn_data = [torch.randn(8, 1, 8, 8)]
    ctrl, gm = _compile(cnn, cnn_data, smooth_quant_alpha=0.5)
    assert not any(isinstance(m, ActivationSmoothing) for m in gm.modules())  # fc reads a flatten, not a quantizer


def test_repeated_initialize_checkpoint_and_export(tmp_path):
    model, data = _model_and_data()
    ctrl, gm = _compile(model, data, smooth_quant_alpha=0.5)
    x = torch.cat(data)
    with torch.no_grad():
        first = gm(x)
    ctrl.initialize(data)  # takes the scales out first: the same result, not smoothed twice
    with torch.no_grad():
        torch.testing.assert_close(gm(x), first, rtol=1e-4, atol=1e-5)
    torch.save({"gm": gm.state_dict(), "ctrl": ctrl.state_dict()}, tmp_path / "ckpt.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl2, gm2 = compile_for_compression(model, [Quantize(preset="mixed", initializer=INIT,
                                                              smooth_quant_alpha=0.5)], example_inputs=(x[:2],))
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    load_state(gm2, saved["gm"])
    ctrl2.load_state_dict(saved["ctrl"])
    with torch.no_grad():
        assert torch.equal(gm2(x), gm(x))
    assert ctrl2.statistics().to_dict() == ctrl.statistics().to_dict()
    ort = pytest.importorskip("onnxruntime")
    path = ctrl.export_onnx(tmp_path / "smoothed.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = gm(x)
    # within a few steps of the coarsest activation quantizer: LayerNorm/GELU/softmax rounding flips
    # (docs/export.md); a missing smoothing division would be off by the outlier channel's 20x
    assert _relative_error(torch.from_numpy(got), expected) < 1e-3


def test_bad_alpha_is_a_config_error():
    with pytest.raises(ConfigError, match="smooth_quant_alpha"):
        Quantize(smooth_quant_alpha=1.5)
    with pytest.raises(ConfigError, match="model_type"):
        quantize_post_training(DigitsCNN(), [torch.randn(2, 1, 8, 8)], model_type="cnn")


class _TiedHead(torch.nn.Module):
    """An embedding table whose weight a linear layer reuses (a masked-LM decoder), and an untied linear."""
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.proj = torch.nn.Linear(8, 8)
        self.decoder = torch.nn.Linear(8, 20, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        return self.decoder(self.norm(self.proj(h)))


def test_a_weight_tied_to_another_module_is_never_smoothed():
    torch.manual_seed(0)
    model, ids = _TiedHead(), torch.randint(0, 20, (4, 6))
    table = model.embed.weight.detach().clone()
    ctrl, gm = compile_for_compression(model, [Quantize(smooth_quant_alpha=0.5)], example_inputs=(ids,))
    ctrl.initialize([(ids,)])
    parameters = dict(gm.named_parameters(remove_duplicate=False))
    assert parameters["embed.weight"] is parameters["decoder.weight"]  # still tied
    assert torch.equal(parameters["embed.weight"], table)               # and not scaled
    smoothing = [m for m in gm.modules() if isinstance(m, ActivationSmoothing)]
    assert len(smoothing) == 1 and not torch.equal(smoothing[0].scale, torch.ones_like(smoothing[0].scale))
