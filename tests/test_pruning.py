"""FilterPruning: dependency analysis, masks, fold, cost prediction, schedules, config and errors.

The central property (docs/design.md's quality bar): on random networks with residuals,
concats, depthwise convs and flatten -> linear, the folded (physically smaller)
model computes what the masked model computes, and its FLOPs and parameter counts
are exactly what the analysis predicted.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcompress.optable import Kind
from fxcompress import Config, ConfigError, ScopeError, compile_for_compression, trace
from fxcompress.passes import FilterPruning
from fxcompress.passes.pruning import ChannelMask, model_cost
from fxcompress.passes.pruning.dependency import analyze_channels
from fxcompress.passes.pruning.importance import filter_importance
from fxcompress.passes.pruning.index_maps import reshape_channel_map
from fxcompress.passes.pruning.schedule import build_pruning_scheduler, exponential_with_bias_coefficients
from fxcompress.schedulers import exponential_schedule
from fxcompress.testing import assert_modules_agree, build, seeded
from fxcompress.testing.strategies import conv_nets
from fxcompress.weights import functionalize_weighted, weighted_ops

AGGRESSIVE = dict(schedule="baseline", prune_first_conv=True, prune_downsample_convs=True)


def compile_quietly(model, passes, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_for_compression(model, passes, inputs)


def part_of(ctrl):
    return ctrl.parts[0]


def check_fold(ctrl, gm, inputs):
    """folded == masked, and the folded model's cost is the predicted one; returns the folded model."""
    folded = ctrl.strip()
    assert_modules_agree(gm, folded, inputs, atol=1e-4, rtol=1e-4, msg="folded vs masked")
    assert model_cost(folded) == part_of(ctrl).predicted_cost()
    assert not any(isinstance(m, ChannelMask) for m in folded.modules())
    return folded


# ---------------------------------------------------------------------------------------------
# index algebra of reshapes (sympy) against what torch does
# ---------------------------------------------------------------------------------------------

@st.composite
def reshapes(draw):
    b, c = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    spatial = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    in_shape = (b, c, *spatial)
    rest = math.prod(in_shape[1:])
    form = draw(st.sampled_from(["flatten", "keep_channel", "split_rest", "split_channels"]))
    if form == "flatten":
        out = (b, rest)
    elif form == "keep_channel":
        out = (b, c, rest // c)
    elif form == "split_rest":
        k = draw(st.sampled_from([d for d in range(1, rest + 1) if rest % d == 0]))
        out = (b, k, rest // k)
    else:
        k = draw(st.sampled_from([d for d in range(1, c + 1) if c % d == 0]))
        out = (b, c // k, k * rest // c)
    return in_shape, out


@given(reshapes())
@settings(deadline=None)
def test_reshape_channel_map_matches_torch(case):
    in_shape, out_shape = case
    mapping = reshape_channel_map(in_shape, 1, out_shape)
    channel = torch.arange(in_shape[1]).view(1, -1, *([1] * (len(in_shape) - 2))).expand(*in_shape)
    reshaped = channel.reshape(out_shape)
    if mapping is None:
        # then no single output axis carries the channel alone
        for j in range(1, len(out_shape)):
            moved = reshaped.movedim(j, -1).reshape(-1, out_shape[j])
            assert not (moved == moved[:1]).all() or in_shape[1] == 1
        return
    moved = reshaped.movedim(mapping.out_axis, -1).reshape(-1, out_shape[mapping.out_axis])
    assert torch.equal(moved, torch.as_tensor(mapping.index).expand_as(moved))


def test_flatten_maps_channels_to_feature_blocks():
    mapping = reshape_channel_map((2, 8, 4, 4), 1, (2, 128))
    assert mapping.out_axis == 1 and mapping.expression == "floor(o1/16)"
    assert mapping.block == 16 and list(mapping.index[14:18]) == [0, 0, 1, 1]
    assert reshape_channel_map((2, 8, 4, 4), 1, (2, 4, 64)) is None  # channel pairs spread over two axes


# ---------------------------------------------------------------------------------------------
# random networks: folded == masked, predicted cost == folded cost
# ---------------------------------------------------------------------------------------------

PRUNING_OPTIONS = st.fixed_dictionaries({
    "all_weights": st.booleans(),
    "prune_batch_norms": st.booleans(),
    "filter_importance": st.sampled_from(["L1", "L2", "geometric_median"]),
    "interlayer_ranking_type": st.sampled_from(["unweighted_ranking", "flops_weighted_ranking"]),
    "round_to": st.sampled_from([1, 1, 2]),
    "target": st.sampled_from([("pruning_target", 0.5), ("pruning_target", 0.3), ("pruning_flops_target", 0.2)]),
})


def _pruning_pass(options):
    options = dict(options)
    key, value = options.pop("target")
    return FilterPruning(**AGGRESSIVE, **{key: value}, **options)


@given(case=conv_nets(multi_output=True), options=PRUNING_OPTIONS)
@settings(deadline=None)
def test_random_conv_nets_fold_to_the_masked_model_with_the_predicted_cost(case, options):
    try:
        ctrl, gm = compile_quietly(case.model, [_pruning_pass(options)], case.example_inputs)
    except ConfigError as exc:
        assert "cannot be reached" in str(exc)
        return
    if not part_of(ctrl).groups:
        assert part_of(ctrl).statistics().skipped or not part_of(ctrl).analysis.groups
        return
    check_fold(ctrl, gm, case.example_inputs)


@given(case=conv_nets(include_rare_ops=True), options=PRUNING_OPTIONS)
@settings(deadline=None)
def test_ops_the_analysis_does_not_know_never_give_a_wrong_model(case, options):
    try:
        ctrl, gm = compile_quietly(case.model, [_pruning_pass(options)], case.example_inputs)
    except ConfigError as exc:
        assert "cannot be reached" in str(exc)
        return
    if part_of(ctrl).groups:
        check_fold(ctrl, gm, case.example_inputs)


@dataclass(frozen=True)
class TinySpec:
    """stem conv -> residual -> concat of two convs -> depthwise (multiplier) -> pool? -> flatten -> linear."""
    seed: int
    hw: int
    c1: int
    ca: int
    cb: int
    mult: int
    act: str
    bias: bool
    pool: str
    flatten: str


class TinyNet(nn.Module):
    def __init__(self, s: TinySpec):
        super().__init__()
        with seeded(s.seed):
            self.stem = nn.Conv2d(3, s.c1, 3, padding=1, bias=s.bias)
            self.bn0 = nn.BatchNorm2d(s.c1)
            self.body = nn.Conv2d(s.c1, s.c1, 3, padding=1, bias=s.bias)
            self.bn1 = nn.BatchNorm2d(s.c1)
            self.a = nn.Conv2d(s.c1, s.ca, 1, bias=s.bias)
            self.b = nn.Conv2d(s.c1, s.cb, 3, padding=1, bias=s.bias)
            c = s.ca + s.cb
            self.dw = nn.Conv2d(c, c * s.mult, 3, padding=1, groups=c, bias=s.bias)
            self.bn2 = nn.BatchNorm2d(c * s.mult)
            self.pool = {"none": None, "avg2": nn.AdaptiveAvgPool2d(2), "max": nn.MaxPool2d(2)}[s.pool]
            hw = {"none": s.hw, "avg2": 2, "max": s.hw // 2}[s.pool]
            self.features = c * s.mult * hw * hw
            self.fc = nn.Linear(self.features, 5)
        self.act, self.flatten = s.act, s.flatten
        self.eval()

    def _act(self, x):
        return {"relu": F.relu, "sigmoid": torch.sigmoid, "gelu": F.gelu, "none": lambda t: t}[self.act](x)

    def forward(self, x):
        x = self._act(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.body(x)) + x)
        x = torch.cat([self._act(self.a(x)), self.b(x)], 1)
        x = self._act(self.bn2(self.dw(x)))
        if self.pool is not None:
            x = self.pool(x)
        if self.flatten == "view":
            x = x.view(x.size(0), -1)
        elif self.flatten == "reshape_literal":
            x = x.reshape(x.size(0), self.features)  # a literal size the fold must rewrite
        else:
            x = torch.flatten(x, 1)
        return self.fc(x)


@st.composite
def tiny_nets(draw):
    spec = TinySpec(draw(st.integers(0, 2**16)), draw(st.integers(4, 8)), draw(st.integers(2, 8)),
                    draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.sampled_from([1, 2])),
                    draw(st.sampled_from(["relu", "sigmoid", "gelu", "none"])), draw(st.booleans()),
                    draw(st.sampled_from(["none", "avg2", "max"])),
                    draw(st.sampled_from(["flatten", "view", "reshape_literal"])))
    model = TinyNet(spec)
    g = torch.Generator().manual_seed(spec.seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 3 - 1.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return spec, model, (torch.randn(2, 3, spec.hw, spec.hw, generator=g),)


@given(net=tiny_nets(), options=PRUNING_OPTIONS)
@settings(deadline=None)
def test_residual_concat_depthwise_flatten_linear_nets_prune_and_fold(net, options):
    spec, model, inputs = net
    try:
        ctrl, gm = compile_quietly(model, [_pruning_pass(options)], inputs)
    except ConfigError as exc:
        assert "cannot be reached" in str(exc)
        return
    part = part_of(ctrl)
    assert part.groups, part.skipped
    folded = check_fold(ctrl, gm, inputs)
    # the linear layer lost whole feature blocks: in_features is a multiple of the block per channel
    block = {"none": spec.hw ** 2, "avg2": 4, "max": (spec.hw // 2) ** 2}[spec.pool]
    assert folded.fc.weight.shape[1] % block == 0
    kept_dw = folded.get_parameter("dw.weight").shape[0]
    assert folded.fc.weight.shape[1] == kept_dw * block


# ---------------------------------------------------------------------------------------------
# reference architectures
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet_tiny", "resnet18_like", "mobilenet_v2_tiny", "densenet_tiny"])
def test_reference_architectures_prune_and_fold(name):
    case = build(name)
    ctrl, gm = compile_quietly(case.model, [FilterPruning(pruning_target=0.5, **AGGRESSIVE)], case.example_inputs)
    stats = ctrl.statistics()["filter_pruning"].summary
    assert stats["params_after"] < 0.6 * stats["params_before"]
    assert stats["flops_after"] < 0.6 * stats["flops_before"]
    folded = check_fold(ctrl, gm, case.example_inputs)
    assert sum(p.numel() for p in folded.parameters()) == stats["params_after"]


def test_resnet_residual_adds_tie_the_convs_of_a_stage():
    case = build("resnet18_like")
    gm = trace(case.model, case.example_inputs)
    functionalize_weighted(gm)
    analysis = analyze_channels(gm, weighted_ops(gm))
    stage = {tuple(p.name for p in g.producers): g for g in analysis.groups}
    g = stage[("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2")]
    assert g.size == 16 and {c.name for c in g.consumers} == {"layer2.1.conv1", "layer3.0.conv1",
                                                              "layer3.0.downsample.0"}
    # every conv group is prunable; the classifier's outputs are the model's
    assert all(g.prunable for g in analysis.groups if g.producers[0].kind is Kind.conv)
    (fc,) = [g for g in analysis.groups if g.producers[0].kind is Kind.linear]
    assert fc.reasons == ["'fc' is (part of) the model output"]


def test_defaults_keep_first_and_downsampling_convs():
    case = build("resnet18_like")
    ctrl, _ = compile_quietly(case.model, [FilterPruning(pruning_target=0.5)], case.example_inputs)
    reasons = " | ".join(s["reason"] for s in ctrl.statistics()["filter_pruning"].skipped)
    assert "first convolution conv1 (prune_first_conv is false)" in reasons
    assert "downsampling convolution layer2.0.conv1" in reasons
    prunable = [row["producers"] for row in ctrl.statistics()["filter_pruning"].layers]
    assert prunable == ["layer1.0.conv1", "layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1"]


def test_grouped_conv_loses_whole_groups_and_densenet_concat_maps_ranges():
    case = build("mobilenet_v2_tiny")
    ctrl, gm = compile_quietly(case.model, [FilterPruning(pruning_target=0.5, **AGGRESSIVE)], case.example_inputs)
    assert [s["scope"] for s in ctrl.statistics()["filter_pruning"].skipped] == ["classifier.1"]
    folded = check_fold(ctrl, gm, case.example_inputs)
    conv_last = next(n for n in folded.graph.nodes if n.name == "conv_last")
    weight = case.model.conv_last.weight  # groups=4: 4 groups of (in/4 -> out/4); half of them stay
    assert folded.conv_last.weight.shape == (weight.shape[0] // 2, *weight.shape[1:])
    assert conv_last.args[6] == 2

    case = build("densenet_tiny")
    gm = trace(case.model, case.example_inputs)
    functionalize_weighted(gm)
    analysis = analyze_channels(gm, weighted_ops(gm))
    by_producer = {g.describe(): g for g in analysis.groups}
    # the stem's 16 channels are read by every later layer of the block through the concats
    stem = by_producer["features.conv0"]
    assert [c.name for c in stem.consumers] == ["features.denseblock1.denselayer1.conv1",
                                                "features.denseblock1.denselayer2.conv1",
                                                "features.denseblock1.denselayer3.conv1",
                                                "features.transition1.conv"]
    # channels 16..23 of the block's concat (norm of layer 2) come from layer 1's conv2
    norm = next(n for n in analysis.norms if n.module_path == "features.denseblock1.denselayer2.norm1")
    layer1 = by_producer["features.denseblock1.denselayer1.conv2"]
    groups = analysis.group_of[analysis.classes_of(norm.space)]
    assert (groups[:16] == stem.id).all() and (groups[16:24] == layer1.id).all()


def test_export_onnx_writes_the_smaller_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    from fxcompress.export import export_onnx
    from fxcompress.runtime import run_onnxruntime
    case = build("resnet_tiny")
    ctrl, gm = compile_quietly(case.model, [FilterPruning(pruning_target=0.5, **AGGRESSIVE)], case.example_inputs)
    dense = export_onnx(trace(case.model, case.example_inputs), tmp_path / "dense.onnx")
    path = ctrl.export_onnx(tmp_path / "pruned.onnx")
    weights = {t.name: list(t.dims) for t in onnx.load(path).graph.initializer}
    assert [4, 3, 3, 3] in weights.values()  # conv1: 8 -> 4 filters
    assert (tmp_path / "pruned.onnx").stat().st_size < 0.5 * (tmp_path / "dense.onnx").stat().st_size
    x = case.example_inputs[0]
    (out,) = run_onnxruntime(path, x)
    with torch.no_grad():
        np.testing.assert_allclose(out, gm.eval()(x).numpy(), atol=1e-4, rtol=1e-4)
    assert dense


# ---------------------------------------------------------------------------------------------
# forms of convs, unknown ops, masks while fine-tuning
# ---------------------------------------------------------------------------------------------

class FunctionalConvs(nn.Module):
    """Convs written functionally with their own parameters; BN in module form."""

    def __init__(self):
        super().__init__()
        with seeded(0):
            self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
            self.b1 = nn.Parameter(torch.randn(8) * 0.1)
            self.bn = nn.BatchNorm2d(8)
            self.w2 = nn.Parameter(torch.randn(6, 8, 3, 3) * 0.3)
            self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.bn(F.conv2d(x, self.w1, self.b1, padding=1)))
        x = F.conv2d(x, self.w2, None, stride=2, padding=1)
        return self.fc(x.flatten(1))


def test_functional_convs_prune_and_fold():
    model, x = FunctionalConvs().eval(), torch.randn(2, 3, 8, 8)
    ctrl, gm = compile_quietly(model, [FilterPruning(pruning_target=0.5, **AGGRESSIVE)], (x,))
    folded = check_fold(ctrl, gm, (x,))
    assert folded.w1.shape == (4, 3, 3, 3) and folded.b1.shape == (4,) and folded.bn.num_features == 4
    assert folded.w2.shape == (3, 4, 3, 3) and folded.fc.weight.shape == (3, 3 * 16)


class Rolls(nn.Module):
    def __init__(self):
        super().__init__()
        with seeded(1):
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1)
            self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.c1(x))
        z = torch.roll(F.relu(self.c2(y)), 1, dims=1)  # permutes channels: not understood
        return self.c3(z).mean((2, 3))


def test_unknown_op_makes_its_group_unprunable_with_the_reason():
    model, x = Rolls().eval(), torch.randn(2, 3, 8, 8)
    ctrl, gm = compile_quietly(model, [FilterPruning(pruning_target=0.5, **AGGRESSIVE)], (x,))
    stats = ctrl.statistics()["filter_pruning"]
    assert [row["producers"] for row in stats.layers] == ["c1"]
    reasons = {s["scope"]: s["reason"] for s in stats.skipped}
    assert "roll" in reasons["c2"] and "does not understand" in reasons["c2"]
    assert "model output" in reasons["c3"]
    check_fold(ctrl, gm, (x,))


def test_nothing_to_prune_warns_and_leaves_the_graph_alone():
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), torch.randn(1, 3, 6, 6)
    with pytest.warns(UserWarning, match="nothing to prune"):
        ctrl, gm = compile_for_compression(model, [FilterPruning(**AGGRESSIVE)], (x,))
    assert not ctrl.records[0].modified and "conv2d" not in gm.code
    skipped = ctrl.statistics()["filter_pruning"].skipped
    assert skipped == [{"scope": "0", "reason": "'_0' is (part of) the model output"}]
    assert ctrl.strip() is not None


class ConvBnSigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        with seeded(2):
            self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)
            self.c2 = nn.Conv2d(8, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.sigmoid(self.bn(self.c1(x)))  # sigmoid(0) = 0.5: pruned channels are not zero here
        return self.fc(self.c2(x).mean((2, 3)))


def test_masks_zero_filters_bias_and_bn_channels_and_their_gradients():
    model, x = ConvBnSigmoid().eval(), torch.randn(2, 3, 8, 8)
    ctrl, gm = compile_quietly(model, [FilterPruning(pruning_target=0.5, **AGGRESSIVE)], (x,))
    names = {n for n, m in gm.named_modules() if isinstance(m, ChannelMask)}
    assert names == {"c1_weight_mask", "c1_bias_mask", "bn_output_mask", "c2_weight_mask", "c2_bias_mask",
                     "c2_input_mask"}
    keep = gm.c1_weight_mask.mask.bool()
    assert int(keep.sum()) == 4 and torch.equal(gm.c1_bias_mask.mask, gm.c1_weight_mask.mask)
    captured = {}
    handle = gm.bn_output_mask.register_forward_hook(lambda m, i, o: captured.__setitem__("bn", o))
    gm.train()
    gm(x).sum().backward()
    assert (captured["bn"][:, ~keep] == 0).all() and (captured["bn"][:, keep] != 0).any()
    grad = gm.c1.weight.grad
    assert (grad[~keep] == 0).all() and (grad[keep] != 0).any()
    handle.remove()
    gm.eval()
    check_fold(ctrl, gm, (x,))


def test_zero_grad_false_keeps_gradients_of_pruned_filters():
    model, x = ConvBnSigmoid().eval(), torch.randn(2, 3, 8, 8)
    ctrl, gm = compile_quietly(model, [FilterPruning(pruning_target=0.5, zero_grad=False, **AGGRESSIVE)], (x,))
    keep = gm.c1_weight_mask.mask.bool()
    gm(x).sum().backward()
    assert (gm.c1.weight.grad[~keep] != 0).any()
    check_fold(ctrl, gm, (x,))


def test_prune_batch_norms_false_masks_consumer_inputs_instead():
    case = build("resnet_tiny")
    ctrl, gm = compile_quietly(case.model, [FilterPruning(pruning_target=0.5, prune_batch_norms=False,
                                                          **AGGRESSIVE)], case.example_inputs)
    names = [n for n, m in gm.named_modules() if isinstance(m, ChannelMask)]
    assert not any(n.endswith("_output_mask") for n in names)
    assert "layer1_conv1_input_mask" in names and "fc_input_mask" in names
    check_fold(ctrl, gm, case.example_inputs)


def test_user_model_is_untouched():
    case = build("resnet_tiny")
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    ctrl, _ = compile_quietly(case.model, [FilterPruning(pruning_target=0.5, **AGGRESSIVE)], case.example_inputs)
    ctrl.strip()
    after = case.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------
# importance, ranking, targets
# ---------------------------------------------------------------------------------------------

def test_filter_importance_criteria():
    w = torch.randn(5, 3, 2, 2)
    flat = w.flatten(1).double()
    assert torch.allclose(filter_importance(w, 0, "L1"), flat.abs().sum(1))
    assert torch.allclose(filter_importance(w, 0, "L2"), flat.norm(dim=1))
    gm_ref = torch.stack([sum((flat[i] - flat[j]).norm() for j in range(5)) for i in range(5)])
    assert torch.allclose(filter_importance(w, 0, "geometric_median"), gm_ref)
    # transposed-conv layout: filters on axis 1
    assert torch.allclose(filter_importance(w.transpose(0, 1), 1, "L1"), flat.abs().sum(1))


class Scaled(nn.Module):
    """Two independent convs; the second's filters are 100x larger."""

    def __init__(self):
        super().__init__()
        with seeded(3):
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(3, 8, 3, padding=1, bias=False)
            with torch.no_grad():
                self.b.weight.mul_(100)
            self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)).mean((2, 3))


def test_uniform_prunes_the_least_important_filters_of_each_group():
    model, x = Scaled().eval(), torch.randn(2, 3, 8, 8)
    ctrl, gm = compile_quietly(model, [FilterPruning(pruning_target=0.25, **AGGRESSIVE)], (x,))
    for name in ("a", "b"):
        norms = getattr(model, name).weight.flatten(1).norm(dim=1)
        keep = getattr(gm, f"{name}_weight_mask").mask.bool()
        assert int((~keep).sum()) == 2
        assert norms[~keep].max() < norms[keep].min()


def test_global_ranking_normalizes_layers():
    model, x = Scaled().eval(), torch.randn(2, 3, 8, 8)
    ctrl, gm = compile_quietly(model, [FilterPruning(pruning_target=0.25, all_weights=True, **AGGRESSIVE)], (x,))
    pruned = int((gm.a_weight_mask.mask == 0).sum() + (gm.b_weight_mask.mask == 0).sum())
    assert pruned == 4
    # normalized: the 100x layer is not spared wholesale
    assert (gm.b_weight_mask.mask == 0).any()


def test_flops_target_is_reached_with_the_least_pruning():
    case = build("resnet_tiny")
    for all_weights in (False, True):
        ctrl, gm = compile_quietly(case.model, [FilterPruning(pruning_flops_target=0.4, all_weights=all_weights,
                                                              **AGGRESSIVE)], case.example_inputs)
        stats = ctrl.statistics()["filter_pruning"].summary
        assert stats["target_kind"] == "flops" and stats["flops_pruned_ratio"] >= 0.4
        assert stats["flops_pruned_ratio"] < 0.55
        check_fold(ctrl, gm, case.example_inputs)


def test_round_to_keeps_multiples_of_the_simd_width():
    case = build("resnet18_like")  # width 8: groups of 8 .. 64 channels
    for kwargs in ({"pruning_flops_target": 0.3}, {"pruning_target": 0.5, "all_weights": True}):
        ctrl, gm = compile_quietly(case.model, [FilterPruning(round_to=8, **kwargs, **AGGRESSIVE)],
                                   case.example_inputs)
        rows = ctrl.statistics()["filter_pruning"].layers
        kept = [r["channels"] - r["pruned"] for r in rows]
        assert all(k % 8 == 0 for k in kept) and any(r["pruned"] for r in rows), kept
        folded = check_fold(ctrl, gm, case.example_inputs)
        assert all(p.shape[0] % 8 == 0 for n, p in folded.named_parameters() if n.endswith("conv1.weight"))


def test_flops_weighted_ranking_prefers_expensive_channels():
    case = build("resnet_tiny")
    runs = {}
    for ranking in ("unweighted_ranking", "flops_weighted_ranking"):
        ctrl, _ = compile_quietly(case.model, [FilterPruning(pruning_target=0.3, all_weights=True,
                                                             interlayer_ranking_type=ranking, **AGGRESSIVE)],
                                  case.example_inputs)
        runs[ranking] = ctrl.statistics()["filter_pruning"].summary["flops_pruned_ratio"]
    assert runs["flops_weighted_ranking"] > runs["unweighted_ranking"]


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------

def test_exponential_schedule_with_warmup_then_frozen_masks():
    case = build("resnet_tiny")
    ctrl, gm = compile_quietly(case.model, [FilterPruning(pruning_target=0.6, num_init_steps=1, pruning_steps=4,
                                                          prune_first_conv=True, prune_downsample_convs=True)],
                               case.example_inputs)
    part = part_of(ctrl)
    levels, frozen = [], []
    for epoch in range(8):
        levels.append(ctrl.statistics()["filter_pruning"].summary["pruning_level"])
        frozen.append(ctrl.statistics()["filter_pruning"].summary["frozen"])
        with torch.no_grad():  # weights move: masks follow until the schedule freezes
            gm.layer1.conv1.weight.mul_(torch.linspace(0.5, 1.5, 8).view(-1, 1, 1, 1).flip(0) ** (epoch + 1))
        ctrl.scheduler.step()
        ctrl.scheduler.epoch_step()
    expected = [0.0] + [exponential_schedule(e, 0.0, 0.6, 3) for e in range(4)] + [0.6] * 3
    assert levels == pytest.approx(expected)
    assert frozen == [False] * 5 + [True] * 3
    assert part.pruned.sum() > 0
    masks_at_freeze = gm.layer1_conv1_weight_mask.mask.clone()
    with torch.no_grad():
        gm.layer1.conv1.weight.mul_(torch.linspace(0.1, 10, 8).view(-1, 1, 1, 1))
    ctrl.scheduler.epoch_step()
    assert torch.equal(gm.layer1_conv1_weight_mask.mask, masks_at_freeze)


def test_baseline_and_exponential_with_bias_schedules():
    base = build_pruning_scheduler("baseline", 0.0, 0.5, num_init_steps=2, pruning_steps=10)
    seen = []
    for _ in range(4):
        seen.append((base.current_level, base.frozen))
        base.epoch_step()
    assert seen == [(0.0, False), (0.0, False), (0.5, True), (0.5, True)]
    a, b, k = exponential_with_bias_coefficients(0.0, 0.5, 9)
    curve = lambda t: a * math.exp(-k * t) + b  # noqa: E731
    assert curve(0) == pytest.approx(0.0) and curve(9) == pytest.approx(0.5)
    assert curve(9 * 0.125) == pytest.approx(0.375)
    sched = build_pruning_scheduler("exponential_with_bias", 0.0, 0.5, num_init_steps=0, pruning_steps=10)
    levels = []
    for _ in range(12):
        levels.append(sched.current_level)
        sched.epoch_step()
    assert levels[0] == 0.0 and levels[9] == pytest.approx(0.5) and levels[-1] == 0.5
    assert all(x <= y + 1e-12 for x, y in zip(levels, levels[1:]))


# ---------------------------------------------------------------------------------------------
# config, checkpoints, errors
# ---------------------------------------------------------------------------------------------

def test_nncf_config_entry_equals_the_pass():
    case = build("resnet_tiny")
    config = Config.from_dict({"input_info": {"sample_size": [2, 3, 32, 32]}, "compression": {
        "algorithm": "filter_pruning", "pruning_init": 0.1,
        "params": {"schedule": "exponential", "pruning_target": 0.4, "pruning_steps": 3,
                   "filter_importance": "geometric_median", "prune_first_conv": True}}})
    ctrl_a, gm_a = compile_quietly(case.model, config, case.example_inputs)
    ctrl_b, gm_b = compile_quietly(case.model, [FilterPruning(pruning_init=0.1, schedule="exponential",
                                                              pruning_target=0.4, pruning_steps=3,
                                                              filter_importance="geometric_median",
                                                              prune_first_conv=True)], case.example_inputs)
    assert gm_a.code == gm_b.code
    assert ctrl_a.statistics().to_dict() == ctrl_b.statistics().to_dict()
    assert ctrl_a.statistics().to_dict()["filter_pruning"]["pruning_level"] == pytest.approx(0.1)


def test_checkpoint_round_trip(tmp_path):
    case = build("resnet_tiny")
    make = lambda: compile_quietly(case.model, [FilterPruning(pruning_target=0.5, pruning_steps=3,  # noqa: E731
                                                              **{**AGGRESSIVE, "schedule": "exponential"})],
                                   case.example_inputs)
    ctrl, gm = make()
    for _ in range(2):
        ctrl.scheduler.epoch_step()
    torch.save({"ctrl": ctrl.state_dict(), "gm": gm.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ctrl2, gm2 = make()
    ctrl2.load_state_dict(state["ctrl"])
    gm2.load_state_dict(state["gm"])
    assert np.array_equal(part_of(ctrl2).pruned, part_of(ctrl).pruned)
    assert ctrl2.statistics().to_dict() == ctrl.statistics().to_dict()
    assert torch.equal(gm2.layer2_conv1_weight_mask.mask, gm.layer2_conv1_weight_mask.mask)


@pytest.mark.parametrize("kwargs, message", [
    ({"pruning_target": 1.0}, "pruning_target: 1.0 would remove all filters"),
    ({"pruning_target": 1.5}, "must be below 1.0"),
    ({"pruning_flops_target": 1.0}, "pruning_flops_target: 1.0 would remove all FLOPs"),
    ({"pruning_target": 0.3, "pruning_flops_target": 0.3}, "not both"),
    ({"legr_params": {"generations": 2}}, "applies to interlayer_ranking_type 'learned_ranking' (LeGR) only"),
    ({"pruning_init": 0.6, "pruning_target": 0.5}, "above the target"),
    ({"pruning_targe": 0.5}, "did you mean 'pruning_target'"),
    ({"schedule": "linear"}, "one of 'exponential', 'exponential_with_bias', 'baseline'"),
])
def test_bad_arguments_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FilterPruning(**kwargs)


def test_unreachable_flops_target_names_the_reachable_maximum():
    case = build("resnet18_like")
    model_before = {k: v.clone() for k, v in case.model.state_dict().items()}
    with pytest.raises(ConfigError) as info:
        compile_quietly(case.model, [FilterPruning(pruning_flops_target=0.9)], case.example_inputs)
    message = str(info.value)
    assert "pruning_flops_target: 0.9 cannot be reached" in message
    reachable = float(message.split("removes at most ")[1].split()[0])
    assert 0 < reachable < 0.9
    # just below the stated maximum works
    ctrl, _ = compile_quietly(case.model, [FilterPruning(pruning_flops_target=reachable - 0.01, schedule="baseline")],
                              case.example_inputs)
    assert ctrl.statistics()["filter_pruning"].summary["flops_pruned_ratio"] >= reachable - 0.01
    assert all(torch.equal(model_before[k], v) for k, v in case.model.state_dict().items())


def test_scopes():
    case = build("resnet_tiny")
    ctrl, _ = compile_quietly(case.model, [FilterPruning(pruning_target=0.5, ignored_scopes=["layer2.conv1"],
                                                         **AGGRESSIVE)], case.example_inputs)
    skipped = ctrl.statistics()["filter_pruning"].skipped
    assert skipped[0] == {"scope": "layer2.conv1", "reason": "layer2.conv1 excluded by ignored_scopes/target_scopes"}
    assert [s["reason"] for s in skipped[1:]] == ["'fc' is (part of) the model output"]
    with pytest.raises(ScopeError, match="layer9"):
        compile_quietly(case.model, [FilterPruning(ignored_scopes=["layer9"])], case.example_inputs)


def test_statistics_layout():
    case = build("resnet_tiny")
    ctrl, _ = compile_quietly(case.model, [FilterPruning(pruning_target=0.5, **AGGRESSIVE)], case.example_inputs)
    d = ctrl.statistics().to_dict()["filter_pruning"]
    for key in ("pruning_level", "target", "target_kind", "filters_pruned_ratio", "flops_before", "flops_after",
                "flops_pruned_ratio", "params_before", "params_after", "params_pruned_ratio", "groups",
                "prunable_groups", "epoch", "frozen", "schedule", "layers", "skipped"):
        assert key in d, key
    assert d["filters_pruned_ratio"] == 0.5 and d["pruning_level"] == 0.5
    assert d["layers"][0] == {"group": 0, "producers": "conv1, layer1.conv2", "channels": 8, "pruned": 4,
                              "ratio": 0.5}
    assert "filter_pruning" in str(ctrl.statistics())


def test_batchnorm_adaptation_initializer_runs_on_initialize():
    case = build("resnet_tiny")
    ctrl, gm = compile_quietly(case.model, [FilterPruning(
        pruning_target=0.5, initializer={"batchnorm_adaptation": {"num_bn_adaptation_samples": 8}}, **AGGRESSIVE)],
        case.example_inputs)
    before = gm.layer1.bn1.running_mean.clone()
    ctrl.initialize([(torch.randn(4, 3, 32, 32),) for _ in range(3)])
    assert not torch.equal(gm.layer1.bn1.running_mean, before)
    assert not gm.training
    check_fold(ctrl, gm, case.example_inputs)
