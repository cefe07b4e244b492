"""[MagnitudeSparsity, Quantize] in one compile: weight quantizers see masked weights; QDQ export keeps the zeros."""
import numpy as np
import onnx
import pytest
import torch

from fxcompress import Config, compile_for_compression
from fxcompress.passes import MagnitudeSparsity, Quantize, RBSparsity
from fxcompress.testing import DigitsCNN

X = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def compile_pipeline(sparsity):
    model = DigitsCNN(seed=0).eval()
    ctrl, gm = compile_for_compression(model, [sparsity, Quantize(bits=8)], example_inputs=(X,), copy=True)
    ctrl.initialize([(X, None)])
    return ctrl, gm


@pytest.mark.parametrize("sparsity", [lambda: MagnitudeSparsity(sparsity_init=0.5, sparsity_target=0.5),
                                      lambda: RBSparsity(sparsity_init=0.3)], ids=["magnitude", "rb"])
def test_weight_quantizers_see_masked_weights(sparsity):
    ctrl, gm = compile_pipeline(sparsity())
    for layer in ("conv1", "conv2", "conv3", "fc"):
        quantizer_node = next(n for n in gm.graph.nodes if n.target == f"{layer}_weight_quantizer")
        mask_node = quantizer_node.args[0]
        assert mask_node.target == f"{layer}_weight_mask", "masks come first, quantizers stack on them"
        seen = {}
        handle = gm.get_submodule(f"{layer}_weight_quantizer").register_forward_hook(
            lambda m, args, out: seen.setdefault("w", args[0].detach().clone()))
        gm.eval()
        gm(X)
        handle.remove()
        mask = gm.get_submodule(f"{layer}_weight_mask").binary_mask()
        assert torch.equal(seen["w"], gm.get_submodule(layer).weight * mask)


def test_exported_qdq_model_keeps_exactly_the_mask_zeros(tmp_path):
    import onnxruntime as ort
    ctrl, gm = compile_pipeline(MagnitudeSparsity(sparsity_init=0.5, sparsity_target=0.5))
    path = ctrl.export_onnx(tmp_path / "sparse_qdq.onnx")
    model = onnx.load(path)
    ints = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2}
    stats = ctrl.statistics().to_dict()["magnitude_sparsity"]
    assert len(ints) == 4
    assert sum(int((w == 0).sum()) for w in ints.values()) == stats["masked_params"]
    # per layer too: the int8 zeros sit exactly where the masks are zero
    for layer in ("conv1", "conv2", "conv3", "fc"):
        (w,) = [v for k, v in ints.items() if k.startswith(layer)]
        mask = gm.get_submodule(f"{layer}_weight_mask").mask.numpy()
        assert np.array_equal(w == 0, mask == 0), layer
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: X.numpy()})[0]
    gm.eval()
    want = gm(X).detach().numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    import openvino as ov
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got_ov = compiled(X.numpy())[0]
    assert np.abs(got_ov - want).max() < 0.05 * np.abs(want).max()


def test_json_config_pipeline_matches_the_pass_list():
    cfg = Config.from_dict({
        "input_info": {"sample_size": [8, 1, 8, 8]},
        "compression": [{"algorithm": "magnitude_sparsity", "sparsity_init": 0.5, "params": {"sparsity_target": 0.5}},
                        {"algorithm": "quantization", "bits": 8}]})
    c1, g1 = compile_for_compression(DigitsCNN(seed=0).eval(), cfg, example_inputs=(X,))
    c2, g2 = compile_for_compression(DigitsCNN(seed=0).eval(),
                                     [MagnitudeSparsity(sparsity_init=0.5, sparsity_target=0.5), Quantize(bits=8)],
                                     example_inputs=(X,))
    assert g1.code == g2.code
    assert [p.algorithm for p in c1.parts] == ["magnitude_sparsity", "quantization"]


def test_model_sparsity_counts_only_the_users_parameters():
    ctrl, gm = compile_pipeline(RBSparsity(sparsity_init=0.3))
    with torch.no_grad():
        gm.conv2_weight_mask.logits[:4] = -1.0
    stats = ctrl.statistics().to_dict()["rb_sparsity"]
    n_model = sum(p.numel() for p in DigitsCNN(seed=0).parameters())
    assert stats["masked_params"] == 4 * 16 * 9
    assert stats["model_sparsity"] == pytest.approx(stats["masked_params"] / n_model)


def test_sparsity_after_quantization_warns():
    with pytest.warns(UserWarning, match="list the sparsity pass before quantization"):
        compile_for_compression(DigitsCNN(seed=0).eval(),
                                [Quantize(bits=8), MagnitudeSparsity(sparsity_init=0.5, sparsity_target=0.5)],
                                example_inputs=(X,))
