"""Accuracy on real data (sklearn digits, a trained DigitsCNN): post-training int8, one epoch of
QAT, 4-bit weights with QAT. Figures are recorded in docs/quantization.md
(``pytest tests/test_quantization_accuracy.py -rP`` prints them)."""
from __future__ import annotations

import warnings

import pytest
import torch

from fxcompress import compile_for_compression
from fxcompress.passes import Quantize
from fxcompress.testing import digits_loaders, evaluate_accuracy, train_digits_cnn
from training import fine_tune


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    model = train_digits_cnn()
    train, test = digits_loaders()
    return model, train, test, evaluate_accuracy(model, test)


def _quantize(model, train, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(model, [Quantize(**kw)], example_inputs=(torch.randn(2, 1, 8, 8),))
    ctrl.initialize(train)
    return ctrl, gm


def test_digits_int8_post_training_and_one_epoch_of_qat(digits):
    model, train, test, fp32 = digits
    assert fp32 > 0.95
    ctrl, gm = _quantize(model, train)
    ptq = evaluate_accuracy(gm, test)
    assert ptq >= fp32 - 0.005, f"post-training int8 {ptq:.4f} vs fp32 {fp32:.4f}"
    torch.manual_seed(0)
    fine_tune(ctrl, gm, train, epochs=1, lr=3e-4)
    qat = evaluate_accuracy(gm, test)
    assert qat >= ptq, f"one epoch of QAT {qat:.4f} vs post-training {ptq:.4f} (fp32 {fp32:.4f})"
    ctrl.parts[0].check_exportable()
    print(f"digits: fp32 {fp32:.4f}, int8 post-training {ptq:.4f}, after 1 epoch of QAT {qat:.4f}")


def test_digits_4bit_weights_with_qat(digits):
    model, train, test, fp32 = digits
    ctrl, gm = _quantize(model, train, weights={"bits": 4})
    assert {q.module.spec.bits for q in ctrl.parts[0].weight_quantizers} == {4}
    torch.manual_seed(0)
    fine_tune(ctrl, gm, train, epochs=1, lr=3e-4)
    acc = evaluate_accuracy(gm, test)
    assert acc >= fp32 - 0.02, f"4-bit weights + QAT {acc:.4f} vs fp32 {fp32:.4f}"
    print(f"digits: fp32 {fp32:.4f}, 4-bit weights / 8-bit activations after 1 epoch of QAT {acc:.4f}")
