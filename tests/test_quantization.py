"""The Quantize pass: placement (policy alone and after surgery), numerics against independent
references, range initializers, BN adaptation and folding, controller state, statistics, errors."""
from __future__ import annotations

import copy
import io
import json
import math
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fxcompress
from fxcompress import Config, compile_for_compression, load_state, trace
from fxcompress.errors import ConfigError, NotInitializedError, ScopeError
from fxcompress.passes import Quantize
from fxcompress.passes.quantization import RangeInitConfig, annotations, plan_quantization
from fxcompress.passes.quantization.range_init import RangeCollector, mse_range
from fxcompress.quantizers import FakeQuantizer, QuantSpec, is_quantizer
from fxcompress.gradients import scaled_gradient
from fxcompress.testing import DigitsCNN, build, resnet18_like, strategies
from fxcompress.weights import functionalize_weighted, weighted_ops

NO_BN_ADAPT = {"batchnorm_adaptation": {"num_bn_adaptation_samples": 0}}


def compile_q(model, inputs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_for_compression(model, [Quantize(**kw)], example_inputs=inputs)


def quantizer_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and is_quantizer(gm.get_submodule(n.target))]


def part_of(ctrl):
    return ctrl.parts[0]


def assert_one_quantizer_per_tensor(gm):
    nodes = quantizer_nodes(gm)
    producers = [n.args[0] for n in nodes]
    assert len(producers) == len(set(producers)), "a tensor got two quantizers"
    for n in nodes:
        assert not (n.args[0].op == "call_module" and is_quantizer(gm.get_submodule(n.args[0].target))), \
            f"{n.name} quantizes a quantizer's output"


# ---------------------------------------------------------------------------
# placement
# ---------------------------------------------------------------------------

def test_resnet18_placement_matches_nncf_counts():
    """NNCF 3.4 on torchvision ResNet-18 (OPENVINO.md): 30 activation + 21 weight quantizers."""
    model = resnet18_like(num_classes=10, width=8)
    ctrl, gm = compile_q(model, (torch.randn(2, 3, 32, 32),))
    part = part_of(ctrl)
    assert len(part.weight_quantizers) == 21
    assert len(part.activation_quantizers) == 30
    assert_one_quantizer_per_tensor(gm)
    names = {q.name for q in part.quantizers}
    assert {"conv1_weight_quantizer", "fc_weight_quantizer", "layer1_0_add_input_quantizer",
            "layer2_0_downsample_0_weight_quantizer", "x_input_quantizer", "fc_input_quantizer"} <= names
    # The stem ReLU's quantizer sits on the ReLU output, before the max-pool, and serves
    # layer1.0.conv1 and the residual add (shared), unsigned.
    relu_q = part["relu_output_quantizer"]
    assert not relu_q.module.spec.signed
    assert set(relu_q.serves) == {"layer1_0_conv1", "layer1_0_add"}
    code = gm.code
    assert "maxpool = self.maxpool(relu_output_quantizer)" in code
    # After every ReLU: unsigned; BN outputs feeding adds: signed; avgpool -> fc stays unsigned.
    for q in part.activation_quantizers:
        producer = next(n for n in quantizer_nodes(gm) if n.target == q.name).args[0]
        if "relu" in producer.name or producer.name in ("avgpool", "flatten"):
            assert not q.module.spec.signed, q.name
        elif producer.op != "placeholder":
            assert q.module.spec.signed, q.name
    # Weights: symmetric signed narrow per output channel, overflow fix (ANY) -> 7 bits
    w = part["conv1_weight_quantizer"].module
    assert w.spec.per_channel and w.spec.axis == 0 and w.scale.numel() == 8
    assert (w.quant_min, w.quant_max) == (-63, 63)


def test_policy_alone_annotates_without_surgery():
    case = build("resnet18_like")
    gm = trace(case.model, case.example_inputs)
    functionalize_weighted(gm)
    ops = weighted_ops(gm)
    q = Quantize()
    plan = plan_quantization(gm, ops, q.settings, q.selects)
    assert plan.count("weights") == 21 and plan.count("activations") == 30
    points = annotations(gm)
    assert len(points) == 51
    assert not quantizer_nodes(gm)  # decision only
    by_name = {p.name: p for p in points}
    add_q = by_name["layer1_0_add_input_quantizer"]
    assert add_q.reasons == ["residual add input"] and add_q.spec.signed
    assert by_name["conv1_weight_quantizer"].spec.narrow_range


def test_mobilenet_depthwise_and_grouped_weights_per_channel():
    case = build("mobilenet_v2_tiny")
    ctrl, gm = compile_q(case.model, case.example_inputs)
    part = part_of(ctrl)
    assert (len(part.weight_quantizers), len(part.activation_quantizers)) == (14, 17)
    assert_one_quantizer_per_tensor(gm)
    dw = part["features_1_conv_0_0_weight_quantizer"].module  # depthwise [8, 1, 3, 3]
    assert dw.spec.axis == 0 and dw.scale.numel() == 8
    grouped = part["conv_last_weight_quantizer"].module       # groups=4, [32, 6, 1, 1]
    assert grouped.scale.numel() == 32
    # ReLU6 outputs are unsigned; the residual add's BN input signed
    assert not part["features_0_2_output_quantizer"].module.spec.signed
    assert part["features_1_add_input_quantizer"].module.spec.signed


def test_densenet_concat_shares_one_quantizer_per_tensor():
    case = build("densenet_tiny")
    ctrl, gm = compile_q(case.model, case.example_inputs)
    part = part_of(ctrl)
    assert (len(part.weight_quantizers), len(part.activation_quantizers)) == (13, 15)
    assert_one_quantizer_per_tensor(gm)
    # torch.cat feeds BN: the concat itself is not quantized, every conv input is (after its ReLU)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.conv2d:
            src = node.args[0]
            assert src.op == "call_module" and is_quantizer(gm.get_submodule(src.target)), node.name


def test_shared_tensor_one_quantizer_whatever_the_consumers():
    class Fan(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(x)
            y = self.a(h) + self.b(h)               # h feeds two convs
            z = F.max_pool2d(h, 2)                  # and a max-pool (agnostic)
            return self.c(y.mean((2, 3))) + z.sum()

    ctrl, gm = compile_q(Fan(), (torch.randn(2, 3, 8, 8),))
    part = part_of(ctrl)
    assert_one_quantizer_per_tensor(gm)
    relu_q = part["relu_output_quantizer"]
    assert set(relu_q.serves) == {"a", "b"} and not relu_q.module.spec.signed
    # the max-pool keeps reading the float ReLU output: nothing there asked for integers
    pool = next(n for n in gm.graph.nodes if n.target is F.max_pool2d)
    assert pool.args[0].name == "relu"


def test_transformer_explicit_attention_matmul_operands():
    case = build("transformer_encoder_tiny")
    ctrl, gm = compile_q(case.model, case.example_inputs)
    part = part_of(ctrl)
    assert len(part.weight_quantizers) == 13  # 2 x 6 linears + classifier; embedding not quantized
    assert_one_quantizer_per_tensor(gm)
    skipped = {s["reason"] for s in part.skipped}
    assert any("int64" in r for r in skipped), "token ids are reported as not quantized"
    matmul_qs = [q for q in part.activation_quantizers if "matmul operand" in q.reasons]
    assert len(matmul_qs) == 8  # q, k, probs, v per layer
    for q in matmul_qs:
        assert q.module.spec.mode == "symmetric"
        assert q.module.spec.signed == ("softmax" not in q.name), q.name


def _sdpa_block(preset="performance"):
    class SDPA(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            b, t, _ = x.shape
            split = lambda y: y.view(b, t, 2, 8).transpose(1, 2)  # noqa: E731
            a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
            return self.o(a.transpose(1, 2).reshape(b, t, 16))

    return compile_q(SDPA(), (torch.randn(2, 5, 16),), preset=preset)


def test_sdpa_becomes_two_quantized_matmuls_symmetric_even_with_mixed_preset():
    """q, k, v signed symmetric and the softmax output unsigned symmetric (what OpenVINO runs in
    integers, docs/transformers.md), whatever the preset; other activations follow it."""
    ctrl, gm = _sdpa_block(preset="mixed")
    part = part_of(ctrl)
    assert "scaled_dot_product_attention" not in gm.code
    operands = [q for q in part.activation_quantizers if "matmul operand" in q.reasons]
    assert len(operands) == 4
    for q in operands:
        assert q.module.spec.mode == "symmetric"
        # k, Q·Kᵀ's second operand, has 7 bits under the default overflow fix (docs/export.md, "Agreement")
        assert q.module.quant_min == (0 if "softmax" in q.name else -64 if q.overflow_fix else -128), q.name
    assert [q.name for q in operands if q.overflow_fix] == ["matmul_input_quantizer_1"]
    # other activations follow the preset (mixed: asymmetric)
    others = [q for q in part.activation_quantizers if q not in operands]
    assert others and all(q.module.spec.mode == "asymmetric" for q in others)


def test_transposed_grouped_conv_weight_axis_is_one():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)   # weight [4, 3, 3, 3]
            self.c1 = nn.Conv1d(6, 5, 3)
            self.c3 = nn.Conv3d(1, 2, (1, 3, 3))

        def forward(self, x):
            y = self.up(x)
            z = self.c1(y.flatten(2))
            return z.sum() + self.c3(y[:, :1].unsqueeze(1)).sum()

    ctrl, gm = compile_q(Up(), (torch.randn(2, 4, 5, 5),))
    part = part_of(ctrl)
    up = part["up_weight_quantizer"].module
    assert up.spec.axis == 1 and up.scale.numel() == 3  # out_channels / groups
    assert part["c1_weight_quantizer"].module.scale.numel() == 5
    assert part["c3_weight_quantizer"].module.scale.numel() == 2
    x = torch.randn(3, 4, 5, 5)
    ctrl.initialize([x])
    with torch.no_grad():
        assert torch.isfinite(gm(x)).all()


def test_matmul_with_parameter_is_a_per_channel_weight_on_axis_1():
    class P(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 5))

        def forward(self, x):
            return x @ self.w

    ctrl, gm = compile_q(P(), (torch.randn(3, 8),))
    part = part_of(ctrl)
    (w,) = part.weight_quantizers
    assert w.name == "w_quantizer" and w.module.spec.axis == 1 and w.module.scale.numel() == 5
    assert len(part.activation_quantizers) == 1


def test_shared_parameter_gets_one_weight_quantizer():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return F.linear(torch.relu(F.linear(x, self.fc.weight)), self.fc.weight)

    ctrl, gm = compile_q(Tied(), (torch.randn(2, 6),))
    assert len(part_of(ctrl).weight_quantizers) == 1
    assert_one_quantizer_per_tensor(gm)


def test_quantize_inputs_and_outputs_flags():
    case = build("mlp")
    ctrl, _ = compile_q(case.model, case.example_inputs, quantize_inputs=False)
    names = {q.name for q in part_of(ctrl).quantizers}
    assert not any(n.startswith("x_") for n in names)
    assert any("quantize_inputs is false" in s["reason"] for s in part_of(ctrl).skipped)
    ctrl, gm = compile_q(case.model, case.example_inputs, quantize_outputs=True)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    src = out.args[0]
    assert src.op == "call_module" and is_quantizer(gm.get_submodule(src.target))


def test_ignored_scopes_and_group_scopes_and_overrides():
    case = build("resnet18_like")
    ctrl, _ = compile_q(case.model, case.example_inputs, ignored_scopes=["fc"],
                        weights={"ignored_scopes": ["layer4"]},
                        scope_overrides={"weights": {"conv1": {"bits": 4, "per_channel": False}},
                                         "activations": {"layer1.0.conv2": {"mode": "asymmetric"}}})
    part = part_of(ctrl)
    names = {q.name for q in part.quantizers}
    assert "fc_weight_quantizer" not in names and "fc_input_quantizer" not in names
    assert not any(n.startswith("layer4") and "weight" in n for n in names)
    conv1 = part["conv1_weight_quantizer"].module
    assert conv1.spec.bits == 4 and not conv1.spec.per_channel and conv1.scale.numel() == 1
    assert part["layer1_0_relu_output_quantizer"].module.spec.mode == "asymmetric"
    assert any(s["scope"] == "fc" for s in part.skipped)


def test_overflow_fix_by_device_and_mode():
    case = build("digits_cnn")

    def ranges(**kw):
        ctrl, _ = compile_q(case.model, case.example_inputs, **kw)
        return {q.name: (q.module.quant_min, q.module.quant_max) for q in part_of(ctrl).weight_quantizers}

    assert set(ranges().values()) == {(-63, 63)}                             # ANY, enable (NNCF default)
    assert set(ranges(target_device="CPU").values()) == {(-63, 63)}
    assert set(ranges(target_device="GPU").values()) == {(-127, 127)}
    assert set(ranges(overflow_fix="disable").values()) == {(-127, 127)}
    first = ranges(overflow_fix="first_layer_only", target_device="CPU")
    assert first.pop("conv1_weight_quantizer") == (-63, 63)
    assert set(first.values()) == {(-127, 127)}
    assert set(ranges(bits=4).values()) == {(-7, 7)}                         # only 8-bit weights


def test_config_entry_and_pass_give_identical_graphs():
    kw = dict(preset="mixed", weights={"bits": 4, "per_channel": True}, ignored_scopes=["layer1"],
              initializer={"range": {"type": "min_max", "num_init_samples": 8}})
    case = build("resnet_tiny")
    model, x = case.model, case.example_inputs[0]
    _, gm_pass = compile_q(model, (x,), **kw)
    config = Config.from_dict({"target_device": "CPU", "compression": {"algorithm": "quantization", **kw}})
    _, gm_cfg = compile_for_compression(model, config, example_inputs=(x,))
    _, gm_pass_cpu = compile_q(model, (x,), target_device="CPU", **kw)
    assert gm_cfg.code == gm_pass_cpu.code
    assert gm_pass.code == gm_pass_cpu.code  # CPU and ANY place alike
    # NNCF's nested "params" block is accepted too
    nested = Config.from_dict({"compression": {"algorithm": "quantization",
                                               "params": {"activations_quant_start_epoch": 1}}})
    assert nested.passes[0].params["activations_quant_start_epoch"] == 1


# ---------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------

def test_weight_quantizer_matches_torch_fake_quantize_per_channel():
    case = build("resnet_tiny")
    ctrl, gm = compile_q(case.model, case.example_inputs, overflow_fix="disable")
    q = part_of(ctrl)["layer2_conv1_weight_quantizer"].module
    w = gm.layer2.conv1.weight.detach()
    ref = torch.fake_quantize_per_channel_affine(w, q.scale.detach(), q.zero_point.detach().int(), 0,
                                                 -128, 127)
    out = q(w).detach()
    assert torch.equal(out, ref)
    # range init for weights: scale = max|w| per channel / 127 (narrow range)
    expected = w.abs().amax(dim=(1, 2, 3)) / 127
    torch.testing.assert_close(q.scale.detach(), expected)
    # every weight value lies on its channel's grid
    steps = out / q.scale.detach().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)


def test_activation_quantizer_matches_hand_formula_asymmetric():
    case = build("mlp")
    ctrl, gm = compile_q(case.model, case.example_inputs, preset="mixed",
                         initializer={"range": {"type": "min_max"}, **NO_BN_ADAPT})
    data = [torch.randn(16, 16) * 3 for _ in range(2)]
    ctrl.initialize(data)
    q = part_of(ctrl)["x_input_quantizer"].module
    allx = torch.cat(data)
    low, high = min(allx.min().item(), 0.0), max(allx.max().item(), 0.0)
    scale = (high - low) / 255
    zp = round(-low / scale)
    torch.testing.assert_close(q.scale.detach(), torch.tensor([scale]))
    assert q.zero_point.detach().round().item() == zp
    x = torch.randn(4, 16) * 4
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)
    torch.testing.assert_close(q(x).detach(), ref, rtol=0, atol=1e-5)


def _models():
    return strategies.models(include_rare_ops=True)


@settings(deadline=None)
@given(case=_models())
def test_disabled_quantizers_are_exact_identity(case):
    with torch.no_grad():
        ref = case.model(*case.example_inputs)
    ctrl, gm = compile_q(case.model, case.example_inputs)
    if not part_of(ctrl).quantizers:
        return
    for q in part_of(ctrl).quantizers:
        q.module.enabled = False
    with torch.no_grad():
        out = gm(*case.example_inputs)
    if any(n.meta.get("decomposed_by") for n in gm.graph.nodes):
        # scaled_dot_product_attention rewritten into matmul/softmax/matmul (quantize_attention): the
        # same math as the fused kernel, summed in another order
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out, ref)


@settings(deadline=None)
@given(case=_models(), seed=st.integers(0, 1000))
def test_wide_8bit_ranges_stay_close_to_fp32(case, seed):
    """8-bit quantizers initialized with min-max ranges over the data (nothing clipped)."""
    g = torch.Generator().manual_seed(seed)
    data = [x + 0.1 * torch.randn(x.shape, generator=g) if x.is_floating_point() else x
            for x in case.example_inputs]
    ctrl, gm = compile_q(case.model, case.example_inputs, overflow_fix="disable",
                         initializer={"range": {"type": "min_max"}, **NO_BN_ADAPT})
    if not part_of(ctrl).quantizers:
        return
    ctrl.initialize([tuple(case.example_inputs), tuple(data)], input_fn=lambda b: b)
    with torch.no_grad():
        ref = case.model(*case.example_inputs)
        out = gm(*case.example_inputs)
    assert torch.isfinite(out).all()
    err = (out - ref).norm() / max(ref.norm().item(), 1e-3 * math.sqrt(ref.numel()))
    assert err < 0.15, f"relative error {err:.3f}"


def test_learnable_scale_and_range_get_gradients():
    case = build("mlp")
    for preset in ("performance", "mixed"):
        ctrl, gm = compile_q(case.model, case.example_inputs, preset=preset)
        ctrl.initialize([torch.randn(8, 16)])
        gm.train()
        gm(torch.randn(8, 16)).pow(2).sum().backward()
        for q in part_of(ctrl).quantizers:
            assert q.module.scale.grad is not None and q.module.scale.grad.abs().sum() > 0, q.name
            if q.module.spec.mode == "asymmetric":
                assert q.module.zero_point.grad is not None, q.name
    ctrl, _ = compile_q(case.model, case.example_inputs, learnable_ranges=False)
    assert not any(q.module.scale.requires_grad for q in part_of(ctrl).quantizers)


def _previous_quantizer_forward(q, x):
    """FakeQuantizer.forward before fake_quantize_learnable: effective_scale()'s abs and clamp_min as
    ops of their own, autograd through them."""
    if not q.enabled:
        return x
    quant_min, quant_max = q.spec.quant_range
    zero_point = scaled_gradient(q.zero_point, q.lr_multiplier)
    return fxcompress.ops.fake_quantize_unchecked(x, q.effective_scale(), zero_point, quant_min, quant_max, q.axis)


def _digits_qat(**kw):
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ctrl, gm = compile_q(DigitsCNN(num_classes=10, seed=0), (x[:2],), **kw)
    ctrl.initialize([x])
    return gm.train(), x, torch.arange(16) % 10


@pytest.mark.parametrize("kw", [{}, {"preset": "mixed", "compression_lr_multiplier": 10.0}], ids=["symmetric", "mixed"])
def test_quantizer_gradients_equal_those_through_abs_and_clamp_min(kw):
    """FakeQuantizer's fused op (|scale| and its floor inside fake_quantize_learnable) gives the
    training step the same loss and the same gradient of every parameter, bit for bit, as the
    previous forward (fake_quantize at effective_scale(), autograd through abs and clamp_min), with
    scales pushed negative, to zero and below the floor; asymmetric zero points and the learning-rate
    multiplier too (mixed)."""
    gm, x, y = _digits_qat(**kw)
    quantizers = dict((n, m) for n, m in gm.named_modules() if isinstance(m, FakeQuantizer))
    with torch.no_grad():
        w = quantizers["conv2_weight_quantizer"].scale
        w[0], w[1], w[2] = -1e-9, 0.0, -w[2]  # below the floor, zero, negative
        quantizers["relu_output_quantizer"].scale.neg_()
    previous = copy.deepcopy(gm)
    for m in previous.modules():
        if isinstance(m, FakeQuantizer):
            m.forward = types.MethodType(_previous_quantizer_forward, m)
    losses = []
    for model in (gm, previous):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    grads = dict(previous.named_parameters())
    assert any(isinstance(m, FakeQuantizer) and m.zero_point.requires_grad for m in gm.modules()) == ("preset" in kw)
    for name, p in gm.named_parameters():
        want = grads[name].grad
        assert (p.grad is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(p.grad, want, rtol=0, atol=0, msg=name)
    assert quantizers["conv2_weight_quantizer"].scale.grad[:2].eq(0).all()  # below the floor: no gradient


def test_learnable_input_ranges_false_freezes_the_model_input_quantizers_only():
    """``learnable_input_ranges=False``: the quantizers of the model's inputs keep their range (no
    gradient, so the first conv computes no input gradient); the forward and every other
    parameter's gradient are those of the default QAT graph."""
    frozen, x, y = _digits_qat(learnable_input_ranges=False)
    default, _, _ = _digits_qat()
    inputs = {n.target for n in frozen.graph.nodes if n.op == "call_module"
              and is_quantizer(frozen.get_submodule(n.target)) and n.args[0].op == "placeholder"}
    assert inputs == {"x_input_quantizer"}
    for name, m in frozen.named_modules():
        if isinstance(m, FakeQuantizer):
            assert m.scale.requires_grad == (name not in inputs), name
    assert not frozen.x_input_quantizer(x).requires_grad and default.x_input_quantizer(x).requires_grad
    for model in (frozen, default):
        F.cross_entropy(model(x), y).backward()
    grads = dict(default.named_parameters())
    assert grads["x_input_quantizer.scale"].grad is not None
    for name, p in frozen.named_parameters():
        if name == "x_input_quantizer.scale":
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------
# range initialization
# ---------------------------------------------------------------------------

def _collect(kind, spec, batches, **cfg):
    c = RangeCollector(RangeInitConfig(type=kind, **cfg), spec)
    for b in batches:
        c.update(b)
    return [t.tolist() for t in c.range()]


SIGNED = QuantSpec(8, "symmetric", True)
ASYM = QuantSpec(8, "asymmetric", False)


def test_range_types_against_numpy():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 3, 5, generator=g) * (i + 1) + i for i in range(3)]
    a = [b.numpy() for b in batches]
    flat = np.concatenate([x.ravel() for x in a])
    per_sample = [s for x in a for s in x.reshape(x.shape[0], -1)]
    approx = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)  # noqa: E731
    low, high = _collect("min_max", ASYM, batches)
    approx([low[0], high[0]], [flat.min(), flat.max()])
    low, high = _collect("mean_min_max", ASYM, batches)
    approx([low[0], high[0]], [np.mean([x.min() for x in a]), np.mean([x.max() for x in a])])
    low, high = _collect("mixed_min_max", ASYM, batches)   # asymmetric: means of per-sample min/max
    approx([low[0], high[0]], [np.mean([s.min() for s in per_sample]), np.mean([s.max() for s in per_sample])])
    low, high = _collect("mixed_min_max", SIGNED, batches)  # symmetric: mean of per-sample abs max
    m = np.mean([np.abs(s).max() for s in per_sample])
    approx([low[0], high[0]], [-m, m])
    low, high = _collect("threesigma", ASYM, batches)
    med = np.median(flat)
    mad = np.median(np.abs(flat - med))
    approx([low[0], high[0]], [med - 3 * mad, med + 3 * mad])
    low, high = _collect("percentile", ASYM, batches, min_percentile=10, max_percentile=90)
    approx([low[0], high[0]], [np.percentile(flat, 10, method="closest_observation"),
                               np.percentile(flat, 90, method="closest_observation")])
    low, high = _collect("mean_percentile", ASYM, batches, min_percentile=10, max_percentile=90)
    approx([low[0], high[0]], [np.mean([np.percentile(s, 10, method="closest_observation")
                                        for s in per_sample]),
                               np.mean([np.percentile(s, 90, method="closest_observation")
                                        for s in per_sample])], )


def test_range_per_channel_and_mse_beats_min_max():
    w = torch.randn(6, 4, 3, 3)
    spec = QuantSpec(8, "symmetric", True, per_channel=True, axis=0, narrow_range=True)
    low, high = _collect("min_max", spec, [w])
    np.testing.assert_allclose(high, w.abs().amax(dim=(1, 2, 3)).numpy(), rtol=1e-6)
    # MSE: on a heavy-tailed tensor the search clips, and its error is no worse than min-max
    heavy = torch.randn(1, 20000)
    heavy[0, :5] = 40.0
    spec4 = QuantSpec(4, "symmetric", True)
    low, high = mse_range(heavy, spec4)
    assert high.item() < 40.0

    def err(lo, hi):
        q = FakeQuantizer(spec4)
        q.set_range(lo, hi)
        return (q(heavy) - heavy).pow(2).mean().item()

    assert err(low, high) <= err(torch.tensor([-40.0]), torch.tensor([40.0]))
    for kind in ("mse", "percentile", "threesigma", "mean_percentile", "mixed_min_max", "mean_min_max"):
        low, high = _collect(kind, spec, [w])
        assert len(high) == 6 and all(h > 0 for h in high), kind


def test_range_init_per_group_and_per_scope():
    case = build("resnet_tiny")
    ctrl, gm = compile_q(case.model, case.example_inputs, initializer={
        "range": [{"type": "min_max", "target_quantizer_group": "weights"},
                  {"type": "percentile", "num_init_samples": 4, "target_scopes": ["layer1"],
                   "params": {"min_percentile": 1, "max_percentile": 99}},
                  {"type": "mean_min_max", "target_quantizer_group": "activations"}],
        **NO_BN_ADAPT},
        scope_overrides={"activations": {"fc": {"initializer": {"range": {"type": "threesigma"}}}}})
    part = part_of(ctrl)
    types = {q.name: q.range_init.type for q in part.quantizers}
    assert types["layer1_conv1_weight_quantizer"] == "min_max"            # first match wins
    assert types["layer1_relu_output_quantizer"] == "percentile"
    assert types["layer2_relu_output_quantizer"] == "mean_min_max"
    assert types["fc_input_quantizer"] == "threesigma"
    ctrl.initialize([torch.randn(4, 3, 32, 32) for _ in range(3)])
    assert all(bool(q.module.initialized) for q in part.quantizers)


def test_initialize_progress_and_sample_budget(capsys):
    case = build("mlp")
    ctrl, gm = compile_q(case.model, case.example_inputs, initializer={"range": {"num_init_samples": 10}})
    seen = []
    loader = [torch.randn(4, 16) for _ in range(10)]
    ctrl.initialize(loader, input_fn=lambda b: seen.append(1) or b)
    assert len(seen) == 3  # 3 batches of 4 cover 10 samples; weights need no data


# ---------------------------------------------------------------------------
# BatchNorm adaptation and folding
# ---------------------------------------------------------------------------

class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_bn_adaptation_reestimates_statistics_without_touching_the_user_model():
    model = ConvBN().eval()
    original = model.bn.running_mean.clone()
    data = [torch.randn(8, 3, 6, 6) * 2 + 1 for _ in range(3)]
    ctrl, gm = compile_q(model, (data[0],),
                         initializer={"batchnorm_adaptation": {"num_bn_adaptation_samples": 24}})
    # the BN input in the quantized model, observed with the ranges of the range init
    ctrl.parts[0].init_weight_ranges(gm)
    from fxcompress.data import CalibrationData
    part = part_of(ctrl)
    part.init_activation_ranges(gm, CalibrationData(data))
    seen = []
    h = gm.bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for x in data:
            gm(x)
    h.remove()
    ctrl.initialize(data)
    assert part.bn_adapted == 1
    expected = original.clone()  # NNCF's adaptation: the layer's own momentum, from the trained statistics
    for x in seen:
        expected = (1 - model.bn.momentum) * expected + model.bn.momentum * x.mean((0, 2, 3))
    torch.testing.assert_close(gm.bn.running_mean, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.bn.running_mean, original)       # user's model untouched
    assert gm.bn.momentum == model.bn.momentum and not gm.training


def test_activation_ranges_are_set_on_the_adapted_batchnorm_statistics():
    """Ranges, then BatchNorm adaptation (NNCF's order), then the activation ranges again: they fit the
    statistics the model keeps (a range init run now finds the same ranges), not the replaced ones."""
    model = ConvBN().eval()
    model.bn.running_var.fill_(100.0)   # far from the data: adaptation changes the activations 10x
    model.bn.momentum = None            # cumulative average: the adapted statistics are the data's
    data = [torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(i)) * 2 + 1 for i in range(3)]
    ctrl, gm = compile_q(model, (data[0],),
                         initializer={"batchnorm_adaptation": {"num_bn_adaptation_samples": 24}})
    ctrl.initialize(data)
    part = part_of(ctrl)
    assert part.bn_adapted == 1 and float(gm.bn.running_var.max()) < 50
    scales = {q.name: q.module.scale.detach().clone() for q in part.activation_quantizers}
    from fxcompress.data import CalibrationData
    part.init_activation_ranges(gm, CalibrationData(data))
    for q in part.activation_quantizers:
        assert torch.equal(q.module.scale, scales[q.name]), q.name


def test_fold_bn_at_compile_time_is_exact_in_float():
    model = ConvBN().eval()
    fxcompress.testing.randomize_norm_layers_(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 6, 6)
    ctrl, gm = compile_q(model, (x,), fold_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert ctrl.statistics()["quantization"].summary["folded_batch_norms"] == 1
    for q in part_of(ctrl).quantizers:
        q.module.enabled = False
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------
# controller: statistics, state, staged schedule
# ---------------------------------------------------------------------------

def test_statistics_layout():
    case = build("resnet_tiny")
    ctrl, gm = compile_q(case.model, case.example_inputs, ignored_scopes=["layer3"])
    stats = ctrl.statistics().to_dict()["quantization"]
    assert stats["weight_quantizers"] + stats["activation_quantizers"] == len(stats["layers"])
    assert stats["bits"] == {8: len(stats["layers"])}
    assert stats["initialized"] is False and stats["target_device"] == "ANY"
    row = next(r for r in stats["layers"] if r["name"] == "conv1_weight_quantizer")
    assert {"name", "kind", "bits", "mode", "per_channel", "signed", "range_low", "range_high",
            "consumers", "initialized"} <= set(row)
    assert row["kind"] == "weight" and row["consumers"] == "conv1" and row["initialized"]
    assert row["effective_bits"] == 7
    assert any(s["scope"].startswith("layer3") for s in stats["skipped"])
    json.dumps(stats)
    assert "conv1_weight_quantizer" in str(ctrl.statistics())


def test_state_dict_roundtrip_and_checkpointed_ranges_count_as_initialized(tmp_path):
    case = build("digits_cnn")
    ctrl, gm = compile_q(case.model, case.example_inputs, initializer=NO_BN_ADAPT)
    with pytest.raises(NotInitializedError, match="x_input_quantizer"):
        ctrl.export_onnx(tmp_path / "m.onnx")
    ctrl.initialize([torch.randn(8, 1, 8, 8)])
    part_of(ctrl)["relu_2_output_quantizer"].module.enabled = False
    buf = io.BytesIO()
    torch.save({"gm": gm.state_dict(), "ctrl": ctrl.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    ctrl2, gm2 = compile_q(case.model, case.example_inputs, initializer=NO_BN_ADAPT)
    with pytest.raises(NotInitializedError):
        part_of(ctrl2).check_exportable()
    load_state(gm2, saved["gm"])
    ctrl2.load_state_dict(saved["ctrl"])
    part_of(ctrl2).check_exportable()
    assert part_of(ctrl2)["relu_2_output_quantizer"].module.enabled is False
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(gm(x), gm2(x))
    bad = dict(saved["ctrl"]["quantization"])
    bad["quantizers"] = {"nope": {}}
    with pytest.raises(fxcompress.CheckpointError, match="missing"):
        part_of(ctrl2).load_state_dict(bad)


def test_staged_quantization_schedule():
    case = build("mlp")
    ctrl, _ = compile_q(case.model, case.example_inputs, activations_quant_start_epoch=1,
                        weights_quant_start_epoch=2)
    part = part_of(ctrl)
    assert not any(q.module.enabled for q in part.quantizers)
    ctrl.scheduler.epoch_step()
    assert all(q.module.enabled for q in part.activation_quantizers)
    assert not any(q.module.enabled for q in part.weight_quantizers)
    ctrl.scheduler.epoch_step()
    assert all(q.module.enabled for q in part.quantizers)


def test_weight_quantizer_follows_sparsity_mask():
    from fxcompress.passes import MagnitudeSparsity
    case = build("digits_cnn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(case.model, [MagnitudeSparsity(sparsity_init=0.5), Quantize()],
                                           example_inputs=case.example_inputs)
    conv = next(n for n in gm.graph.nodes if n.name == "conv2")
    wq = conv.args[1]
    assert wq.target == "conv2_weight_quantizer"
    assert wq.args[0].meta.get("inserted_by") not in (None, "quantization")   # the mask comes first


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

def test_nothing_quantizable_warns_and_changes_nothing():
    class NoWeights(nn.Module):
        def forward(self, x):
            return F.layer_norm(torch.relu(x), (4,))

    model = NoWeights()
    with pytest.warns(UserWarning, match="nothing to quantize"):
        ctrl, gm = compile_for_compression(model, [Quantize()], example_inputs=(torch.randn(2, 4),))
    assert not quantizer_nodes(gm)
    assert ctrl.records[0].modified is False
    assert part_of(ctrl).quantizers == []


def test_everything_ignored_warns_with_reasons():
    case = build("mlp")
    with pytest.warns(UserWarning, match="excluded by ignored_scopes"):
        ctrl, gm = compile_for_compression(case.model, [Quantize(ignored_scopes=["layers", "head"],
                                                                 quantize_inputs=False)],
                                           example_inputs=case.example_inputs)
    assert "torch.nn.functional.linear" not in gm.code  # left as module calls (rolled back)
    assert {s["scope"] for s in ctrl.statistics()["quantization"].skipped} >= {"head"}


def test_ignored_scope_matching_nothing_is_a_scope_error():
    case = build("mlp")
    with pytest.raises(ScopeError, match="'layer9'"):
        compile_for_compression(case.model, [Quantize(ignored_scopes=["layer9"])],
                                example_inputs=case.example_inputs)
    with pytest.raises(ScopeError, match="scope_overrides.weights.*'hed'.*did you mean"):
        compile_for_compression(case.model, [Quantize(scope_overrides={"weights": {"hed": {"bits": 4}}})],
                                example_inputs=case.example_inputs)
    with pytest.raises(ScopeError, match=r"initializer.range\[0\].target_scopes"):
        compile_for_compression(case.model, [Quantize(initializer={"range": [{"target_scopes": ["x9"]}]})],
                                example_inputs=case.example_inputs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(bits=9), "Quantize.bits"),
    (dict(bits=1), "Quantize.bits"),
    (dict(weights={"bits": 16}), "Quantize.weights.bits"),
    (dict(activations={"bits": 1.5}), "Quantize.activations.bits"),
    (dict(scope_overrides={"weights": {"fc": {"bits": 0}}}), "Quantize.scope_overrides.weights.fc.bits"),
])
def test_bits_out_of_range_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        Quantize(**kwargs)
    assert str(info.value).startswith(field) and info.value.path == field


def test_config_errors_are_named():
    with pytest.raises(ConfigError, match="did you mean 'preset'"):
        Quantize(presett="mixed")
    with pytest.raises(ConfigError, match="initializer.range.type"):
        Quantize(initializer={"range": {"type": "minmax"}})
    with pytest.raises(ConfigError, match="weights.signed: an asymmetric quantizer is unsigned"):
        Quantize(weights={"mode": "asymmetric", "signed": True})
    with pytest.raises(ConfigError, match="min_percentile"):
        Quantize(initializer={"range": {"type": "percentile", "params": {"min_percentile": 99,
                                                                          "max_percentile": 1}}})
    with pytest.raises(ConfigError, match="compression.overflow_fix"):
        Config.from_dict({"compression": {"algorithm": "quantization", "overflow_fix": "on"}})


def test_non_finite_calibration_statistics_are_an_error_naming_the_quantizer_and_its_producer():
    from fxcompress.errors import RangeInitError

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(self.fc1(x) * 1e38)  # overflows to inf in float32

    torch.manual_seed(0)
    ctrl, gm = compile_for_compression(Scaled(), [Quantize(bits=8)], (torch.randn(2, 4),))
    with pytest.raises(RangeInitError, match=r"quantizer 'fc2_input_quantizer' on the output of node 'mul'.*"
                                             r"non-finite") as info:
        ctrl.initialize([torch.randn(8, 4) * 10])
    assert "inf" in str(info.value)
    assert not any(bool(q.module.initialized) for q in ctrl.parts[0].activation_quantizers)  # nothing half-set
