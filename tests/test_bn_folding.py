"""fxcompress.bn_folding: the one BatchNorm folding, as Quantize(fold_bn=True) uses it at compile time.

(The export-time use, through weight quantizers, is tested in test_bn_folding_export.py and
test_quantization_export.py.)
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcompress.testing
from fxcompress import compile_for_compression
from fxcompress.bn_folding import scale_output_channels
from fxcompress.passes import Quantize


def _fold(model, x):
    ctrl, gm = compile_for_compression(model, [Quantize(fold_bn=True)], example_inputs=(x,))
    for q in ctrl["quantization"].quantizers:
        q.module.enabled = False
    return ctrl, gm


class GroupedTransposedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.up(x))


class FunctionalBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, bias=False)
        self.register_buffer("mean", torch.randn(5))
        self.register_buffer("var", torch.rand(5) + 0.5)
        self.gamma = nn.Parameter(torch.randn(5))
        self.beta = nn.Parameter(torch.randn(5))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)


class LinearBN3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)  # normalizes dimension 1 of [N, 6, 6]: the tokens, not fc's features

    def forward(self, x):
        return self.bn(self.fc(x))


def test_grouped_transposed_conv_folds_exactly():
    model = GroupedTransposedBN().eval()
    fxcompress.testing.randomize_norm_layers_(model)
    x = torch.randn(2, 4, 5, 5)
    ctrl, gm = _fold(model, x)
    assert ctrl.statistics()["quantization"].summary["folded_batch_norms"] == 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_functional_batch_norm_folds_exactly():
    model = FunctionalBN().eval()
    x = torch.randn(2, 3, 6, 6)
    ctrl, gm = _fold(model, x)
    assert ctrl.statistics()["quantization"].summary["folded_batch_norms"] == 1
    assert not any(n.target is F.batch_norm for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_batch_norm_on_another_axis_is_refused_by_name():
    model = LinearBN3d().eval()
    fxcompress.testing.randomize_norm_layers_(model)
    x = torch.randn(2, 6, 6)
    with pytest.warns(UserWarning, match=r"node 'bn' \(bn\) after conv node 'fc'.*not 2-D"):
        ctrl, gm = _fold(model, x)
    assert "folded_batch_norms" not in ctrl.statistics()["quantization"].summary
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_scale_output_channels_of_a_grouped_transposed_weight():
    weight = torch.randn(4, 3, 2, 2)  # ConvTranspose(in=4, out=6, groups=2): [in, out/groups, k, k]
    factor = torch.arange(1.0, 7.0)
    scaled = scale_output_channels(weight, factor, axis=1, groups=2)
    for group in range(2):
        for j in range(3):
            rows = slice(2 * group, 2 * group + 2)
            assert torch.equal(scaled[rows, j], weight[rows, j] * factor[3 * group + j])
