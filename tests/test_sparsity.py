"""Sparsity passes: mask insertion, magnitude masks against a reference, RB and const semantics,
folding, export, config errors. Training-level checks are in test_sparsity_training.py."""
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcompress
from fxcompress import Config, compile_for_compression
from fxcompress.errors import ConfigError, ScopeError
from fxcompress.passes import ConstSparsity, MagnitudeSparsity, RBSparsity
from fxcompress.testing import DigitsCNN, assert_modules_agree
from fxcompress.testing.strategies import conv_nets, mlps

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def compile_digits(*passes, model=None):
    model = model if model is not None else DigitsCNN(seed=0).eval()
    return compile_for_compression(model, list(passes), example_inputs=(X,))


def mask_modules(gm):
    return {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and n.target.endswith("_weight_mask")}


# -- insertion --------------------------------------------------------------------------------

def test_masks_sit_on_the_weight_edge_of_every_conv_and_linear():
    ctrl, gm = compile_digits(MagnitudeSparsity(sparsity_init=0.3))
    assert sorted(mask_modules(gm)) == ["conv1_weight_mask", "conv2_weight_mask", "conv3_weight_mask",
                                        "fc_weight_mask"]
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.endswith("_weight_mask"):
            assert node.args[0].op == "get_attr" and node.args[0].target.endswith(".weight")
            assert node.meta["inserted_by"] == "magnitude_sparsity"
            (user,) = node.users
            assert user.op == "call_function" and user.args[1] is node
    # the original weights stay trainable parameters with their names
    names = dict(gm.named_parameters())
    assert names["conv1.weight"].requires_grad and "conv1_weight_mask.mask" in gm.state_dict()


def test_scopes_apply_and_skipped_layers_are_reported():
    ctrl, gm = compile_digits(MagnitudeSparsity(sparsity_init=0.5, ignored_scopes=["fc", "conv1"]))
    assert sorted(mask_modules(gm)) == ["conv2_weight_mask", "conv3_weight_mask"]
    stats = ctrl.statistics().to_dict()["magnitude_sparsity"]
    assert {s["scope"] for s in stats["skipped"]} == {"fc", "conv1"}
    ctrl, gm = compile_digits(MagnitudeSparsity(sparsity_init=0.5, target_scopes=["conv*"],
                                                ignored_scopes=["conv3"]))
    assert sorted(mask_modules(gm)) == ["conv1_weight_mask", "conv2_weight_mask"]
    with pytest.raises(ScopeError, match="cnov1"):
        compile_digits(MagnitudeSparsity(ignored_scopes=["cnov1"]))


def test_nothing_to_sparsify_warns_and_reports():
    with pytest.warns(UserWarning, match="nothing to sparsify"):
        ctrl, gm = compile_digits(MagnitudeSparsity(ignored_scopes=["conv1", "conv2", "conv3", "fc"]))
    assert not mask_modules(gm)
    assert len(ctrl.statistics().to_dict()["magnitude_sparsity"]["skipped"]) == 4


def test_shared_weight_gets_one_mask():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    model = Twice()
    x = torch.randn(3, 6)
    ctrl, gm = compile_for_compression(model, [MagnitudeSparsity(sparsity_init=0.5)], example_inputs=(x,))
    assert list(mask_modules(gm)) == ["fc_weight_mask"]
    mask = gm.fc_weight_mask.mask
    assert int((mask == 0).sum()) == 18
    ref = lambda v: nn.functional.linear(torch.relu(nn.functional.linear(v, model.fc.weight * mask, model.fc.bias)),
                                         model.fc.weight * mask, model.fc.bias)
    assert torch.equal(gm(x), ref(x))
    assert_modules_agree(gm, ctrl.strip(), (x,), atol=0, rtol=0)


def test_config_entry_and_pass_give_identical_graphs():
    entry = {"algorithm": "magnitude_sparsity", "sparsity_init": 0.2,
             "params": {"schedule": "multistep", "multistep_steps": [1, 2],
                        "multistep_sparsity_levels": [0.2, 0.4, 0.6], "weight_importance": "abs"},
             "ignored_scopes": ["fc"]}
    cfg = Config.from_dict({"input_info": {"sample_size": [4, 1, 8, 8]}, "compression": [entry]})
    c1, g1 = compile_for_compression(DigitsCNN(seed=0).eval(), cfg, example_inputs=(X,))
    c2, g2 = compile_digits(MagnitudeSparsity(sparsity_init=0.2, schedule="multistep", multistep_steps=[1, 2],
                                              multistep_sparsity_levels=[0.2, 0.4, 0.6], weight_importance="abs",
                                              ignored_scopes=["fc"]))
    assert g1.code == g2.code
    for key, value in g1.state_dict().items():
        assert torch.equal(value, g2.state_dict()[key]), key


# -- magnitude masks ----------------------------------------------------------------------------

def reference_masks(weights, level, importance, mode):
    """Independent reference: rank weights by importance, zero the round(level * n) smallest."""
    def score(w):
        return w.abs() / w.norm(2) if importance == "normed_abs" else w.abs()
    if mode == "local":
        out = []
        for w in weights:
            flat = score(w).flatten().numpy()
            k = int(round(level * flat.size))
            m = np.ones(flat.size)
            m[np.argsort(flat, kind="stable")[:k]] = 0
            out.append(m.reshape(w.shape))
        return out
    flat = np.concatenate([score(w).flatten().numpy() for w in weights])
    k = int(round(level * flat.size))
    m = np.ones(flat.size)
    m[np.argsort(flat, kind="stable")[:k]] = 0
    sizes = np.cumsum([w.numel() for w in weights])[:-1]
    return [part.reshape(w.shape) for part, w in zip(np.split(m, sizes), weights)]


@pytest.mark.parametrize("importance", ["abs", "normed_abs"])
@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("level", [0.0, 0.37, 0.5, 0.9])
def test_magnitude_masks_match_reference(importance, mode, level):
    ctrl, gm = compile_digits(MagnitudeSparsity(sparsity_init=level, sparsity_target=max(level, 0.5),
                                                weight_importance=importance, sparsity_level_setting_mode=mode))
    names = ["conv1", "conv2", "conv3", "fc"]
    weights = [gm.get_submodule(n).weight.detach() for n in names]
    for name, want in zip(names, reference_masks(weights, level, importance, mode)):
        got = gm.get_submodule(f"{name}_weight_mask").mask
        assert np.array_equal(got.numpy(), want), name
    stats = ctrl.statistics().to_dict()["magnitude_sparsity"]
    total = sum(w.numel() for w in weights)
    assert stats["masked_params"] == (round(level * total) if mode == "global"
                                      else sum(round(level * w.numel()) for w in weights))
    if mode == "local" and level > 0:
        for row in stats["layers"]:
            assert row["sparsity"] == pytest.approx(level, abs=0.5 / row["params"] + 1e-12)
            assert row["threshold"] is not None
    if level > 0 and mode == "global":
        imp = torch.cat([(w.abs() / (w.norm(2) if importance == "normed_abs" else 1)).flatten()
                         for w in weights])
        assert stats["threshold"] == pytest.approx(float(imp.sort().values[round(level * total) - 1]))


def test_masks_follow_the_schedule_and_freeze():
    ctrl, gm = compile_digits(MagnitudeSparsity(sparsity_init=0.1, sparsity_target=0.5, sparsity_target_epoch=2,
                                                sparsity_freeze_epoch=3, schedule="polynomial", power=1,
                                                concave=False, weight_importance="abs"))
    stats = lambda: ctrl.statistics().to_dict()["magnitude_sparsity"]
    assert stats()["sparsity"] == pytest.approx(0.1, abs=1e-4)
    ctrl.scheduler.step()
    assert stats()["sparsity"] == pytest.approx(0.1, abs=1e-4), "per-epoch updates only by default"
    ctrl.scheduler.epoch_step()
    assert stats()["current_target"] == pytest.approx(0.3)
    assert stats()["sparsity"] == pytest.approx(0.3, abs=1e-4)
    ctrl.scheduler.epoch_step()
    ctrl.scheduler.epoch_step()
    assert stats()["sparsity"] == pytest.approx(0.5, abs=1e-4) and stats()["frozen"]
    frozen_mask = gm.conv2_weight_mask.mask.clone()
    with torch.no_grad():  # weights move (training); frozen masks do not
        gm.conv2.weight = nn.Parameter(torch.randn_like(gm.conv2.weight))
    ctrl.scheduler.epoch_step()
    assert torch.equal(gm.conv2_weight_mask.mask, frozen_mask)


def test_per_optimizer_step_updates():
    ctrl, gm = compile_digits(MagnitudeSparsity(sparsity_init=0.0, sparsity_target=0.4, sparsity_target_epoch=1,
                                                power=1, concave=False, update_per_optimizer_step=True,
                                                steps_per_epoch=4))
    seen = []
    for _ in range(4):
        seen.append(ctrl.statistics().to_dict()["magnitude_sparsity"]["sparsity"])
        ctrl.scheduler.step()
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3], abs=1e-4)


def test_masked_weights_get_no_gradient_and_originals_stay_trainable():
    ctrl, gm = compile_digits(MagnitudeSparsity(sparsity_init=0.5))
    gm.train()
    gm(X).sum().backward()
    mask = gm.conv2_weight_mask.mask
    grad = gm.conv2.weight.grad
    assert torch.all(grad[mask == 0] == 0) and grad[mask == 1].abs().sum() > 0


# -- RB -------------------------------------------------------------------------------------------

def test_rb_mask_stochastic_in_training_deterministic_in_eval():
    ctrl, gm = compile_digits(RBSparsity(sparsity_target=0.5, sparsity_target_epoch=2))
    mask = gm.conv3_weight_mask
    with torch.no_grad():
        mask.logits.copy_(torch.randn_like(mask.logits))
    w = gm.conv3.weight
    gm.eval()
    assert torch.equal(mask(w), w * (mask.logits > 0))
    gm.train()
    torch.manual_seed(0)
    a, b = mask(w), mask(w)
    assert not torch.equal(a, b), "training masks are sampled"
    # the sampled keep rate follows sigmoid(logits)
    keep = torch.stack([(mask(w) != 0).float() for _ in range(200)]).mean(0)
    assert (keep - torch.sigmoid(mask.logits)).abs().mean() < 0.05


def test_rb_loss_is_nncf_sparse_loss_and_trains_the_logits():
    ctrl, gm = compile_digits(RBSparsity(sparsity_init=0.3, sparsity_target=0.5, sparsity_target_epoch=3))
    masks = list(mask_modules(gm).values())
    with torch.no_grad():
        for m in masks:
            m.logits.copy_(torch.randn_like(m.logits))
    kept = sum(float((torch.sigmoid(m.logits) > 0.5).sum()) for m in masks)
    n = sum(m.logits.numel() for m in masks)
    loss = ctrl.loss()
    assert float(loss.detach()) == pytest.approx(((kept / n - 0.7) / 0.05) ** 2, rel=1e-5)
    loss.backward()
    assert all(m.logits.grad is not None and m.logits.grad.abs().sum() > 0 for m in masks)


def test_rb_freezes_at_freeze_epoch():
    ctrl, gm = compile_digits(RBSparsity(sparsity_target=0.5, sparsity_target_epoch=1, sparsity_freeze_epoch=2))
    ctrl.scheduler.epoch_step()
    assert ctrl.loss().requires_grad
    with pytest.warns(UserWarning, match=r"froze at epoch 2 with density 1\.000, but the schedule asks for 0\.500"):
        ctrl.scheduler.epoch_step()  # nothing trained the logits: the masks freeze dense, and it says so
    assert float(ctrl.loss()) == 0.0 and ctrl.statistics().to_dict()["rb_sparsity"]["frozen"]
    gm.train()
    mask = gm.conv1_weight_mask
    assert torch.equal(mask(gm.conv1.weight), gm.conv1.weight * mask.binary_mask())
    gm(X).sum().backward()
    assert mask.logits.grad is None, "frozen logits get no gradient"


def test_rb_local_mode_loss():
    ctrl, gm = compile_digits(RBSparsity(sparsity_init=0.2, sparsity_level_setting_mode="local"))
    masks = list(mask_modules(gm).values())
    with torch.no_grad():
        for m in masks:
            m.logits.copy_(torch.randn_like(m.logits))
    dev = sum(abs(float((torch.sigmoid(m.logits) > 0.5).float().mean()) - 0.8) for m in masks)
    assert float(ctrl.loss()) == pytest.approx((dev / 0.05) ** 2, rel=1e-5)


def test_rb_compression_lr_multiplier_scales_gradients_only():
    torch.manual_seed(0)
    c1, g1 = compile_digits(RBSparsity(sparsity_init=0.3))
    c2, g2 = compile_digits(RBSparsity(sparsity_init=0.3, compression_lr_multiplier=4.0))
    c1.loss().backward()
    c2.loss().backward()
    assert float(c1.loss()) == float(c2.loss())
    assert torch.allclose(g2.fc_weight_mask.logits.grad, 4 * g1.fc_weight_mask.logits.grad)


# -- const ------------------------------------------------------------------------------------------

def test_const_sparsity_keeps_existing_zeros():
    model = DigitsCNN(seed=0).eval()
    with torch.no_grad():
        for m in (model.conv2, model.fc):
            m.weight[torch.rand_like(m.weight) < 0.6] = 0
    zeros = {n: int((model.get_submodule(n).weight == 0).sum()) for n in ("conv2", "fc")}
    ctrl, gm = compile_digits(ConstSparsity(), model=model)
    for n in ("conv2", "fc"):
        assert torch.equal(gm.get_submodule(f"{n}_weight_mask").mask, (model.get_submodule(n).weight != 0).float())
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        gm(X).square().mean().backward()
        opt.step()
    plain = ctrl.strip()
    for n in ("conv2", "fc"):
        assert int((plain.get_submodule(n).weight == 0).sum()) == zeros[n]
    stats = ctrl.statistics().to_dict()["const_sparsity"]
    assert stats["frozen"] and stats["masked_params"] == sum(zeros.values())


def test_magnitude_checkpoint_loads_into_const_sparsity():
    ctrl, gm = compile_digits(MagnitudeSparsity(sparsity_init=0.6, sparsity_target=0.6))
    state = gm.state_dict()
    c2, g2 = compile_digits(ConstSparsity())
    fxcompress.load_state(g2, state)
    assert c2.statistics().to_dict()["const_sparsity"]["sparsity"] == pytest.approx(0.6, abs=1e-4)


# -- hypothesis: identities and folding ----------------------------------------------------------

@settings(deadline=None)
@given(case=st.one_of(conv_nets(), mlps()), algorithm=st.sampled_from(["magnitude", "rb", "const"]))
def test_zero_target_mask_is_an_exact_identity(case, algorithm):
    make = {"magnitude": lambda: MagnitudeSparsity(sparsity_init=0.0, sparsity_target=0.0),
            "rb": lambda: RBSparsity(sparsity_init=0.0, sparsity_target=0.0),
            "const": ConstSparsity}[algorithm]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(case.model, [make()], example_inputs=case.example_inputs, copy=True)
    for m in mask_modules(gm).values():
        assert torch.all(m.binary_mask() == 1)
    assert_modules_agree(case.model, gm, case.example_inputs, atol=0, rtol=0)


@settings(deadline=None)
@given(case=st.one_of(conv_nets(), mlps()), level=st.floats(0.0, 0.95), mode=st.sampled_from(["global", "local"]),
       rb=st.booleans())
def test_folding_masks_gives_identical_outputs(case, level, mode, rb):
    if rb:
        p = RBSparsity(sparsity_init=level, sparsity_target=max(level, 0.5), sparsity_level_setting_mode=mode)
    else:
        p = MagnitudeSparsity(sparsity_init=level, sparsity_target=max(level, 0.5), sparsity_level_setting_mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(case.model, [p], example_inputs=case.example_inputs, copy=True)
    if rb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in mask_modules(gm).values():
                m.logits.copy_(torch.randn(m.logits.shape, generator=g))
    plain = ctrl.strip()
    assert not mask_modules(plain)
    assert not any(isinstance(m, fxcompress.passes.sparsity.SparsityMask) for m in plain.modules())
    assert_modules_agree(gm, plain, case.example_inputs, atol=0, rtol=0)
    # the folded weights hold exactly the mask's zeros; the training graph's parameters are untouched
    for name, m in mask_modules(gm).items():
        target = next(n.args[0].target for n in gm.graph.nodes if n.target == name)
        folded = fxcompress.graph.get_attr_value(plain, target)
        original = fxcompress.graph.get_attr_value(gm, target)
        assert torch.equal(folded, original * m.binary_mask())


# -- export -------------------------------------------------------------------------------------------

def onnx_weights(path):
    model = onnx.load(path)
    return {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}


def test_export_holds_the_zeros_and_runs_in_onnxruntime_and_openvino(tmp_path):
    import onnxruntime as ort
    import openvino as ov
    ctrl, gm = compile_digits(MagnitudeSparsity(sparsity_init=0.6, sparsity_target=0.6))
    path = ctrl.export_onnx(tmp_path / "sparse.onnx")
    masked = ctrl.statistics().to_dict()["magnitude_sparsity"]["masked_params"]
    weights = [w for w in onnx_weights(path).values() if w.ndim in (2, 4)]
    assert sum(int((w == 0).sum()) for w in weights) == masked
    gm.eval()
    x = torch.randn(7, 1, 8, 8)
    want = gm(x).detach().numpy()
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got_ov = compiled(x.numpy())[0]
    np.testing.assert_allclose(got_ov, want, atol=1e-3, rtol=1e-3)


# -- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [MagnitudeSparsity, RBSparsity])
@pytest.mark.parametrize("kwargs,field", [
    (dict(sparsity_target=1.0), "sparsity_target"),
    (dict(sparsity_target=-0.1), "sparsity_target"),
    (dict(sparsity_init=1.5), "sparsity_init"),
    (dict(schedule="multistep", multistep_steps=[2], multistep_sparsity_levels=[0.1, 1.0]),
     "multistep_sparsity_levels[1]"),
    (dict(sparsity_target_epoch=10, sparsity_freeze_epoch=5), "sparsity_freeze_epoch"),
    (dict(schedule="multistep", multistep_steps=[2, 6], multistep_sparsity_levels=[0.1, 0.2, 0.3],
          sparsity_freeze_epoch=4), "sparsity_freeze_epoch"),
    (dict(schedule="cosine"), "schedule"),
    (dict(sparsity_levle_setting_mode="local"), None),
    (dict(schedule="multistep", multistep_steps=[2, 4], multistep_sparsity_levels=[0.1, 0.3]),
     "multistep_sparsity_levels"),
    (dict(sparsity_init=0.6, sparsity_target=0.5), "sparsity_init"),
])
def test_bad_arguments_raise_config_error_naming_the_field(cls, kwargs, field):
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    name = cls.__name__
    if field is None:  # unknown key: did-you-mean
        assert "did you mean 'sparsity_level_setting_mode'" in str(info.value)
    else:
        assert info.value.path == f"{name}.{field}"
        assert f"{name}.{field}" in str(info.value)


def test_bad_config_entries_name_the_json_path():
    base = {"input_info": {"sample_size": [1, 1, 8, 8]}}
    cases = [
        ({"algorithm": "magnitude_sparsity", "params": {"sparsity_target": 1.2}}, "compression.sparsity_target"),
        ({"algorithm": "rb_sparsity", "params": {"schedule": "linear"}}, "compression.schedule"),
        ({"algorithm": "magnitude_sparsity", "params": {"sparsity_target_epoch": 20, "sparsity_freeze_epoch": 10}},
         "compression.sparsity_freeze_epoch"),
        ({"algorithm": "magnitude_sparsity", "params": {"schedule": "adaptive"}}, "compression.schedule"),
        ({"algorithm": "const_sparsity", "sparsity_target": 0.5}, "compression"),
    ]
    for entry, path in cases:
        with pytest.raises(ConfigError) as info:
            Config.from_dict({**base, "compression": entry})
        assert info.value.path == path, (entry, str(info.value))


def test_freeze_epoch_default_follows_a_late_target_epoch():
    ctrl, gm = compile_digits(MagnitudeSparsity(sparsity_target_epoch=150))
    assert ctrl.parts[0].scheduler.freeze_epoch == 150


def test_batchnorm_adaptation_initializer():
    model = DigitsCNN(seed=0).eval()
    data = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ctrl, gm = compile_for_compression(
        model, [MagnitudeSparsity(sparsity_init=0.5, sparsity_target=0.5,
                                  initializer={"batchnorm_adaptation": {"num_bn_adaptation_samples": 32}})],
        example_inputs=(X,), copy=True)
    with pytest.raises(ValueError, match="needs a data loader"):
        ctrl.initialize()
    momentum = gm.bn2.momentum
    mean = gm.bn1.running_mean.clone()
    ctrl.initialize(data)
    # bn1's statistics follow the first two batches (32 samples) of the sparse conv1 with bn1's momentum
    w = gm.conv1.weight * gm.conv1_weight_mask.mask
    for x in data[:2]:
        mean = (1 - gm.bn1.momentum) * mean + gm.bn1.momentum * nn.functional.conv2d(x, w, padding=1).mean((0, 2, 3))
    assert torch.allclose(gm.bn1.running_mean, mean, atol=1e-5)
    assert gm.bn2.momentum == momentum and not gm.training
    assert ctrl.statistics().to_dict()["magnitude_sparsity"]["bn_adapted"]
