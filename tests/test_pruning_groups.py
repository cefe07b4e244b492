"""Filter pruning of grouped and depthwise convs, linear layers as producers, transformers' Conv1D.

Own small models: a RegNet-style bottleneck (grouped 3x3), a ConvNeXt block (depthwise 7x7,
permute, LayerNorm, Linear-GELU-Linear, layer scale), a GPT-2-style MLP block with a ``Conv1D``
defined here as transformers defines it (``addmm`` with a ``[in, out]`` weight). Each must lose
parameters in ``strip()``, compute what the masked model computes, and train. The property tests
check ``fold == masked`` on generated deployment models (MobileNet / ShuffleNet / ConvNeXt blocks,
attention blocks) and conv nets with grouped and depthwise convs.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings

from fxcompress import compile_for_compression
from fxcompress.passes import FilterPruning
from fxcompress.passes.pruning import ChannelMask, model_cost
from fxcompress.passes.pruning.masks import ChannelMaskedLayerNorm
from fxcompress.testing import assert_modules_agree
from fxcompress.testing.strategies import conv_nets, deployment_models

AGGRESSIVE = dict(pruning_target=0.5, schedule="baseline", prune_first_conv=True, prune_downsample_convs=True)


def compile_quietly(model, inputs, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_for_compression(model, [FilterPruning(**{**AGGRESSIVE, **options})], inputs, copy=True)


def check_fold(ctrl, gm, inputs):
    """folded == masked (eval mode), the predicted cost is the folded model's; returns the folded model."""
    gm.eval()
    folded = ctrl.strip()
    assert_modules_agree(gm, folded, inputs, atol=1e-5, rtol=1e-4, msg="folded vs masked")
    assert model_cost(folded) == ctrl.parts[0].predicted_cost()
    assert not any(isinstance(m, ChannelMask) for m in folded.modules())
    return folded


def train_steps(gm, inputs, steps=3):
    """A few SGD steps on the masked graph; returns the losses (finite, and the last below the first)."""
    gm.train()
    torch.manual_seed(0)
    target = torch.randn_like(gm(*inputs))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(gm(*inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    return losses


# ---------------------------------------------------------------------------------------------
# RegNet-style bottleneck: grouped 3x3 conv
# ---------------------------------------------------------------------------------------------

class RegNetBlock(nn.Module):
    """torchvision's ResBottleneckBlock in small: 1x1 -> grouped 3x3 (group width 4) -> 1x1, + projection."""

    def __init__(self, c_in=8, width=16, c_out=12, group_width=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c_in, 3, padding=1), nn.BatchNorm2d(c_in), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width // group_width, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.proj = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.head = nn.Linear(c_out, 5)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.proj(x) + self.c(self.b(self.a(x))))
        return self.head(y.mean((2, 3)))


def test_grouped_conv_loses_whole_groups():
    torch.manual_seed(0)
    model, x = RegNetBlock(), torch.randn(2, 3, 8, 8)
    ctrl, gm = compile_quietly(model, (x,))
    part = ctrl.parts[0]
    # the bottleneck is one group: conv a's filters, conv b's inputs and filters, conv c's inputs;
    # each channel class is one of conv b's 4 groups (4 inputs + 4 filters + conv a's 4 filters)
    bottleneck = next(g for g in part.groups if "b.0" in g.describe())
    assert bottleneck.describe() == "a.0, b.0" and bottleneck.size == 4
    folded = check_fold(ctrl, gm, (x,))
    b = next(n for n in folded.graph.nodes if n.name == "b_0")
    weight = folded.get_submodule("b.0").weight
    assert weight.shape == (8, 4, 3, 3) and b.args[6] == 2  # 2 of 4 groups, each 4 wide
    # the stem (8 -> 4) and the residual channels (proj and c: 12 -> 6) are halved too
    assert folded.get_submodule("a.0").weight.shape == (8, 4, 1, 1)
    assert folded.get_submodule("c.0").weight.shape == (6, 8, 1, 1)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in folded.parameters())
    assert after == part.statistics().summary["params_after"] and after < 0.55 * before
    train_steps(gm, (x,))
    check_fold(ctrl, gm, (x,))


def test_depthwise_conv_groups_follow_the_pruned_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.BatchNorm2d(16), nn.ReLU6(),  # multiplier 2
                          nn.Conv2d(16, 4, 1), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(2, 3, 6, 6)
    ctrl, gm = compile_quietly(model, (x,))
    folded = check_fold(ctrl, gm, (x,))
    dw = next(n for n in folded.graph.nodes if n.op == "call_function" and n.args[1].target == "3.weight")
    assert folded.get_submodule("3").weight.shape == (8, 1, 3, 3) and dw.args[6] == 4


# ---------------------------------------------------------------------------------------------
# ConvNeXt block: depthwise conv, permute, LayerNorm, linear layers on the channel axis
# ---------------------------------------------------------------------------------------------

class ConvNeXtBlock(nn.Module):
    """torchvision's CNBlock: dw 7x7 -> NHWC -> LayerNorm -> Linear(c, 4c) -> GELU -> Linear(4c, c)
    -> NCHW, times a per-channel layer scale, plus the input."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.pwconv2 = nn.Linear(4 * c, c)
        self.layer_scale = nn.Parameter(torch.full((c, 1, 1), 0.5))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(F.gelu(self.pwconv1(y))).permute(0, 3, 1, 2)
        return self.head((x + self.layer_scale * y).mean((2, 3)))


def test_convnext_block_prunes_through_layernorm_permutes_linears_and_layer_scale():
    torch.manual_seed(0)
    model, x = ConvNeXtBlock(), torch.randn(2, 3, 8, 8)
    ctrl, gm = compile_quietly(model, (x,))
    groups = {g.describe(): g for g in ctrl.parts[0].groups}
    # the residual channels: the stem, the depthwise conv and pwconv2 produce them; the LayerNorm
    # (over the channels, after a permute), pwconv1's inputs and the layer scale follow them
    assert sorted(groups) == ["pwconv1", "stem, dwconv, pwconv2"]
    assert groups["pwconv1"].size == 32 and [c.name for c in groups["pwconv1"].consumers] == ["pwconv2"]
    assert groups["stem, dwconv, pwconv2"].size == 8
    # while fine-tuning the LayerNorm normalizes over the kept channels only
    masked_norm = next(m for m in gm.modules() if isinstance(m, ChannelMaskedLayerNorm))
    assert int(masked_norm.mask.sum()) == 4
    folded = check_fold(ctrl, gm, (x,))
    assert folded.pwconv1.weight.shape == (16, 4) and folded.pwconv2.weight.shape == (4, 16)
    assert folded.dwconv.weight.shape == (4, 1, 7, 7) and folded.norm.weight.shape == (4,)
    assert folded.layer_scale.shape == (4, 1, 1) and folded.head.weight.shape == (3, 4)
    params = sum(p.numel() for p in folded.parameters())
    assert params == ctrl.parts[0].statistics().summary["params_after"]
    assert params < 0.5 * sum(p.numel() for p in model.parameters())
    train_steps(gm, (x,))
    check_fold(ctrl, gm, (x,))


def test_masked_layernorm_equals_layernorm_over_the_kept_channels():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 5, 6), torch.randn(6), torch.randn(6)
    norm = ChannelMaskedLayerNorm(6, eps=1e-5)
    assert torch.equal(norm(x, weight, bias), F.layer_norm(x, (6,), weight, bias, 1e-5))
    keep = torch.tensor([True, False, True, True, False, True])
    norm.set(keep)
    x = x * keep  # pruned channels arrive as zeros, or as anything: they are ignored
    y = norm(x + torch.randn_like(x) * ~keep, weight, bias)
    expected = F.layer_norm(x[..., keep], (4,), weight[keep], bias[keep], 1e-5)
    torch.testing.assert_close(y[..., keep], expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(y[..., ~keep], torch.zeros_like(y[..., ~keep]))


# ---------------------------------------------------------------------------------------------
# GPT-2-style MLP with transformers' Conv1D (addmm with a [in, out] weight)
# ---------------------------------------------------------------------------------------------

class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: a linear layer with a transposed weight, computed by addmm."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


def new_gelu(x):
    """GPT-2's tanh GELU, written out as transformers' NewGELUActivation does."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2MLPBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.c_fc = Conv1D(4 * d, d)
        self.c_proj = Conv1D(d, 4 * d)

    def forward(self, x):
        return x + self.c_proj(new_gelu(self.c_fc(self.ln(x))))


def test_gpt2_conv1d_mlp_prunes_its_hidden_channels():
    torch.manual_seed(0)
    model, x = GPT2MLPBlock(), torch.randn(2, 5, 8)
    ctrl, gm = compile_quietly(model, (x,))
    (group,) = ctrl.parts[0].groups
    assert group.describe() == "c_fc" and [c.name for c in group.consumers] == ["c_proj"]
    folded = check_fold(ctrl, gm, (x,))
    assert folded.c_fc.weight.shape == (8, 16) and folded.c_fc.bias.shape == (16,)
    assert folded.c_proj.weight.shape == (16, 8)
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in folded.parameters()) == before - 16 * 8 * 2 - 16
    train_steps(gm, (x,))
    check_fold(ctrl, gm, (x,))


# ---------------------------------------------------------------------------------------------
# property tests: fold == masked on generated models
# ---------------------------------------------------------------------------------------------

def _fold_equals_masked(case):
    try:
        ctrl, gm = compile_quietly(case.model, case.example_inputs)
    except Exception as exc:  # noqa: BLE001 - only a clear "nothing to prune" path is acceptable
        raise AssertionError(f"compile failed: {exc}") from exc
    if ctrl.parts[0].groups:
        check_fold(ctrl, gm, case.example_inputs)


@given(case=deployment_models())
@settings(max_examples=6)
def test_deployment_models_fold_to_the_masked_model(case):
    _fold_equals_masked(case)


@given(case=conv_nets(deployment_blocks=True, max_blocks=3))
@settings(max_examples=6)
def test_grouped_and_depthwise_conv_nets_fold_to_the_masked_model(case):
    _fold_equals_masked(case)


@pytest.mark.slow
@given(case=deployment_models())
@settings(max_examples=150)
def test_deployment_models_fold_to_the_masked_model_thorough(case):
    _fold_equals_masked(case)


@pytest.mark.slow
@given(case=conv_nets(deployment_blocks=True, max_blocks=4))
@settings(max_examples=150)
def test_grouped_and_depthwise_conv_nets_fold_to_the_masked_model_thorough(case):
    _fold_equals_masked(case)
