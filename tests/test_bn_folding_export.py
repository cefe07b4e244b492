"""BatchNorm folding at export beyond ``nn.Conv2d -> nn.BatchNorm2d``: functional ``F.batch_norm``,
grouped and depthwise convs, transposed convs; and the cases it refuses, with the reason.

The folded graph must compute what the fake-quantized graph computes (the integers are kept,
the BN factor goes into the per-channel scales), so outputs agree to float rounding.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress.passes.quantization.lowering import FoldBatchNorm
from fxcompress.testing import randomize_norm_layers_
from quantization_export_helpers import lower, quantize_graph


class FunctionalBN(nn.Module):
    """``F.batch_norm`` on registered statistics, after a grouped conv, as hand-written models do it."""

    def __init__(self, groups=2, training=False):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=groups)
        self.register_buffer("mean", torch.randn(8) * 0.1)
        self.register_buffer("var", torch.rand(8) + 0.5)
        self.gamma = nn.Parameter(torch.randn(8))      # some negative
        self.beta = nn.Parameter(torch.randn(8))
        self.training_flag = training
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, self.training_flag, 0.1, 1e-3)
        return self.head(F.relu(y))


class ConvThenBN(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels)
        self.head = nn.Conv2d(conv.out_channels, 3, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))))


def _fold(gm):
    lowered, passes = lower(gm)
    return lowered, next(p for p in passes if isinstance(p, FoldBatchNorm))


def _batch_norm_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is F.batch_norm
            or (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm))]


def _agree(lowered, gm, x):
    with torch.no_grad():
        for batch in (x, torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(5))):
            torch.testing.assert_close(lowered(batch), gm(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_functional_batch_norm_folds_after_grouped_and_depthwise_convs(groups):
    torch.manual_seed(0)
    model = FunctionalBN(groups=groups).eval()
    x = torch.randn(2, 4, 6, 6)
    gm = quantize_graph(model, x)
    lowered, fold = _fold(gm)
    assert len(fold.folded) == 1 and not fold.skipped and not _batch_norm_nodes(lowered)
    _agree(lowered, gm, x)


def test_functional_batch_norm_in_training_mode_is_refused():
    model = FunctionalBN(training=True).eval()
    x = torch.randn(2, 4, 6, 6)
    gm = quantize_graph(model, x)
    with pytest.warns(UserWarning, match=r"node 'batch_norm' .*after conv node 'conv' not folded: functional "
                                         r"batch_norm with training=True"):
        lowered, fold = _fold(gm)
    assert not fold.folded and "training=True" in fold.skipped[0]["reason"]
    assert len(_batch_norm_nodes(lowered)) == 1


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4),                 # grouped
    lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),                 # depthwise
    lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1),        # transposed, output channels on axis 1
], ids=["grouped", "depthwise", "transposed"])
def test_bn_folds_exactly_through_the_weight_quantizer(conv):
    torch.manual_seed(1)
    model = ConvThenBN(conv()).eval()
    randomize_norm_layers_(model, seed=2)   # negative gammas too
    x = torch.randn(2, 4, 6, 6)
    gm = quantize_graph(model, x)
    lowered, fold = _fold(gm)
    assert len(fold.folded) == 1 and not fold.skipped and not _batch_norm_nodes(lowered)
    _agree(lowered, gm, x)


def test_bn_after_grouped_transposed_conv_is_kept_when_quantized_and_folded_in_float_otherwise():
    torch.manual_seed(3)
    model = ConvThenBN(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2)).eval()
    randomize_norm_layers_(model, seed=4)
    x = torch.randn(2, 4, 6, 6)
    gm = quantize_graph(model, x)
    with pytest.warns(UserWarning, match=r"node 'bn' \(bn\) after conv node 'conv' not folded: BatchNorm kept: "
                                         r"after a grouped transposed conv"):
        lowered, fold = _fold(gm)
    assert not fold.folded and "grouped transposed conv" in fold.skipped[0]["reason"]
    assert len(_batch_norm_nodes(lowered)) == 1
    _agree(lowered, gm, x)

    gm.get_submodule("conv_weight_quantizer").enabled = False   # no quantizer: folded in float, per group
    lowered, fold = _fold(gm)
    assert len(fold.folded) == 1 and not _batch_norm_nodes(lowered)
    _agree(lowered, gm, x)
