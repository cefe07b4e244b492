"""FilterPruning on real data: fine-tuning the Digits CNN, and pruning + quantization to an int8 OpenVINO model."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fxcompress import compile_for_compression
from fxcompress.passes import FilterPruning
from fxcompress.passes.pruning import model_cost
from fxcompress.testing import digits_loaders, evaluate_accuracy, seeded, train_digits_cnn
from training import digits_setup, fine_tune, quantizer_scales_at_lower_lr, report

PRUNE_HALF = dict(pruning_target=0.5, schedule="baseline", prune_first_conv=True)


def test_digits_cnn_with_half_the_filters_pruned_and_fine_tuned_stays_within_1_5_percent(train_seed):
    model, train, test, fp32 = digits_setup(train_seed)
    ctrl, gm = compile_for_compression(model, [FilterPruning(**PRUNE_HALF)], model.example_input(), copy=True)
    stats = ctrl.statistics()["filter_pruning"]
    assert stats.summary["filters_pruned_ratio"] == 0.5
    assert [row["ratio"] for row in stats.layers] == [0.5, 0.5, 0.5]
    # 4 epochs: with 3 the worst of 6 runs (seeds 0-2 x AVX2/default ATen) dropped 1.33 points, against a
    # 1.5-point bar; with 4 the worst of 8 runs (seeds 0-4) drops 0.89 (docs/testing.md)
    with seeded(train_seed):
        fine_tune(ctrl, gm, train, epochs=4, lr=2e-3)
    pruned = evaluate_accuracy(gm, test)
    report("filter_pruning_50", train_seed, fp32=fp32, acc=pruned, drop=fp32 - pruned)
    folded = ctrl.strip()
    assert evaluate_accuracy(folded, test) == pruned
    assert pruned >= fp32 - 0.015, f"pruned {pruned:.4f} vs fp32 {fp32:.4f}"
    # the folded model is physically half as wide
    assert folded.conv1.weight.shape == (8, 1, 3, 3) and folded.conv2.weight.shape == (16, 8, 3, 3)
    assert folded.conv3.weight.shape == (16, 16, 3, 3) and folded.fc.weight.shape == (10, 16 * 4 * 4)
    assert model_cost(folded).params == stats.summary["params_after"]


def _quantize_pass():
    try:
        from fxcompress.passes import Quantize
    except ImportError as exc:  # pragma: no cover - the quantization issue has not landed
        pytest.skip(f"needs the Quantize pass (passes/quantization, issue 4): {exc}")
    return Quantize


@pytest.fixture(scope="module")
def dense_int8(tmp_path_factory):
    """The unpruned Digits CNN exported as int8 QDQ (the size reference), shared by both orders."""
    Quantize = _quantize_pass()
    model = train_digits_cnn()
    train, _ = digits_loaders(batch_size=64, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, _ = compile_for_compression(model, [Quantize(bits=8)], model.example_input(), copy=True)
        ctrl.initialize(train)
        return ctrl.export_onnx(tmp_path_factory.mktemp("dense") / "dense_int8.onnx")


@pytest.mark.parametrize("order", ["prune_then_quantize", "quantize_then_prune"])
def test_pruning_and_quantization_export_a_smaller_qdq_model_that_openvino_runs_in_int8(tmp_path, order,
                                                                                         dense_int8, train_seed):
    Quantize = _quantize_pass()
    pytest.importorskip("openvino")
    from fxcompress.runtime import openvino_compile, openvino_compute_layers, openvino_infer, qdq_summary
    model, train, test, fp32 = digits_setup(train_seed)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        passes = [FilterPruning(**PRUNE_HALF), Quantize(bits=8)]
        if order == "quantize_then_prune":
            passes = passes[::-1]
        ctrl, gm = compile_for_compression(model, passes, model.example_input(), copy=True)
        ctrl.initialize(train)
        with seeded(train_seed):
            fine_tune(ctrl, gm, train, epochs=2, lr=1e-3, params=quantizer_scales_at_lower_lr(gm, lr=1e-5))
        path = ctrl.export_onnx(tmp_path / "pruned_int8.onnx")
        lowered = ctrl.strip()

    dense, pruned = qdq_summary(dense_int8), qdq_summary(path)
    assert pruned.integer_weights == dense.integer_weights == 4  # 3 convs + fc, int8 behind DequantizeLinear
    # convs lose 3/4 of their weights (filters and inputs halved), the linear layer half of its inputs
    assert pruned.integer_initializer_bytes < 0.35 * dense.integer_initializer_bytes
    assert pruned.float_initializer_bytes < dense.float_initializer_bytes  # scales and biases shrink too

    compiled = openvino_compile(path, precision="f32")
    layers = openvino_compute_layers(compiled)
    assert layers.layers and not layers.floating, str(layers)

    xs, _ = next(iter(test))
    (ov_out,) = openvino_infer(compiled, xs)
    with torch.no_grad():
        torch_out = lowered(xs).numpy()
    agreement = np.mean(ov_out.argmax(1) == torch_out.argmax(1))
    ov_correct = total = 0
    for xs, ys in test:
        (out,) = openvino_infer(compiled, xs)
        ov_correct += int((out.argmax(1) == ys.numpy()).sum())
        total += len(ys)
    report(f"filter_pruning_50_int8_openvino_{order}", train_seed, fp32=fp32, openvino=ov_correct / total,
           drop=fp32 - ov_correct / total, argmax_agreement=float(agreement))
    assert agreement >= 0.95
    assert ov_correct / total >= fp32 - 0.03, f"OpenVINO int8 pruned {ov_correct / total:.4f} vs fp32 {fp32:.4f}"
