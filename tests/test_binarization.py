"""Binarization: binarizer values against independent formulas, gradients against finite differences,
placement (first/last layers, scopes), the staged schedule and its hints, checkpoints, initialization,
lowering and export to ONNX Runtime / OpenVINO, config errors.

The accuracy of the staged schedule on the digits CNN is in test_binarization_training.py.
"""
import json
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fxcompress import Config, compile_for_compression, load_state
from fxcompress.errors import ConfigError, NotInitializedError, ScopeError
from fxcompress.passes import Binarization
from fxcompress.passes.binarization import ActivationBinarizer, StagedBinarizationScheduler, WeightBinarizer
from fxcompress.testing import DigitsCNN, assert_modules_agree
from fxcompress.testing.strategies import conv_nets

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast on an idle machine and far faster on a shared, loaded one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compile_digits(*passes, model=None):
    model = model if model is not None else DigitsCNN(seed=0).eval()
    return compile_for_compression(model, list(passes), example_inputs=(X,))


def binarizers(gm, cls):
    return {name: m for name, m in gm.named_modules() if isinstance(m, cls)}


def digits_batches(n=4, batch=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


# -- independent references (numpy, float64 statistics) -------------------------------------------

def ref_weight_binarize(w: np.ndarray, per_channel: bool) -> np.ndarray:
    w64 = w.astype(np.float64)
    if per_channel:
        m = np.abs(w64).reshape(w.shape[0], -1).mean(axis=1).reshape((-1,) + (1,) * (w.ndim - 1))
    else:
        m = np.abs(w64).mean()
    m = np.asarray(m, dtype=np.float32)
    return np.where(w >= 0, m, -m).astype(np.float32)


def ref_activation_binarize(x: np.ndarray, scale: np.float32, tau: np.ndarray) -> np.ndarray:
    """``S if x > tau_c * S else 0``, channels on dim 1, the product in float32."""
    t = (tau.astype(np.float32) * np.float32(scale)).reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x > t, np.float32(scale), np.float32(0)).astype(np.float32)


finite = dict(allow_nan=False, allow_infinity=False, width=32)


@st.composite
def weights(draw):
    shape = draw(st.sampled_from([(4, 3, 3, 3), (1, 1, 1, 1), (8, 2, 1, 1), (3, 5, 2), (6, 4, 1, 3, 3)]))
    values = draw(arrays(np.float32, shape, elements=st.floats(-4, 4, **finite)))
    if draw(st.booleans()):  # exact zeros: sign(0) = +1
        values[..., 0] = 0.0
    return values


# -- forward values ---------------------------------------------------------------------------------

@settings(deadline=None)
@given(w=weights(), mode=st.sampled_from(["xnor", "dorefa"]))
def test_weight_binarizer_equals_the_formula(w, mode):
    module = WeightBinarizer(mode)
    tensor = torch.from_numpy(w)
    assert torch.equal(module(tensor), tensor)  # disabled: identity
    module.enabled = True
    got = module(tensor).numpy()
    want = ref_weight_binarize(w, per_channel=(mode == "xnor"))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    # every output channel holds one magnitude, with the weight's sign (0 counts as +)
    assert np.array_equal(np.sign(got) >= 0, w >= 0)


@st.composite
def activations(draw):
    shape = draw(st.sampled_from([(2, 3, 4, 4), (1, 1, 5), (3, 4), (2, 2, 2, 2, 2)]))
    x = draw(arrays(np.float32, shape, elements=st.floats(-2, 6, **finite)))
    channels = shape[1]
    log_scale = draw(st.floats(-3, 2, **finite))
    logits = draw(arrays(np.float32, (channels,), elements=st.floats(-5, 5, **finite)))
    return x, np.float32(log_scale), logits


@settings(deadline=None)
@given(case=activations())
def test_activation_binarizer_equals_the_formula(case):
    x, log_scale, logits = case
    module = ActivationBinarizer(x.shape[1])
    module.log_scale.data = torch.tensor([log_scale])
    module.threshold.data = torch.from_numpy(logits)
    xt = torch.from_numpy(x)
    assert torch.equal(module(xt), xt)  # disabled: identity
    module.enabled = True
    module.eval()
    # S and tau are the stated functions of the hidden parameters ...
    scale = module.scale().detach().numpy()[0]
    tau = module.relative_threshold().detach().numpy()
    np.testing.assert_allclose(scale, math.exp(float(log_scale)), rtol=1e-6)
    np.testing.assert_allclose(tau, 1 / (1 + np.exp(-logits.astype(np.float64))), rtol=1e-5, atol=1e-7)
    # ... and the output is S where x > tau * S, else 0
    got = module(xt).detach().numpy()
    np.testing.assert_array_equal(got, ref_activation_binarize(x, scale, tau))
    assert set(np.unique(got)) <= {np.float32(0), np.float32(scale)}


# -- gradients ------------------------------------------------------------------------------------------

def central_difference(f, x0: float, h: float) -> float:
    return (f(x0 + h) - f(x0 - h)) / (2 * h)


def op_grads(x, scale, tau, g):
    """Gradients the op library gives for sum(g * out) w.r.t. S and tau."""
    from fxcompress import ops
    s = torch.tensor([scale], dtype=torch.float32, requires_grad=True)
    t = torch.tensor(tau, dtype=torch.float32, requires_grad=True)
    (ops.activation_binarize(torch.tensor(x), s, t) * torch.tensor(g)).sum().backward()
    return float(s.grad[0]), t.grad.numpy().astype(np.float64)


@settings(deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.5, 3.0))
def test_scale_gradient_matches_finite_differences_in_the_clipping_region(seed, scale):
    """Above S the output is S itself: the forward is smooth in S and d out / dS = 1 exactly."""
    rng = np.random.default_rng(seed)
    x = (scale * (1.2 + rng.random((2, 3, 4, 4)))).astype(np.float32)  # all x > S: clipped
    tau = rng.uniform(0.1, 0.9, 3).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    grad_s, grad_tau = op_grads(x, scale, tau, g)

    def loss_of_scale(s):
        return float((g.astype(np.float64) * ref_activation_binarize(x, np.float32(s), tau)).sum())

    fd = central_difference(loss_of_scale, scale, 1e-3 * scale)
    assert grad_s == pytest.approx(fd, rel=1e-4, abs=1e-4)
    # the threshold cannot move any of these outputs: smooth, zero derivative, and the op agrees
    for c in range(3):
        def loss_of_tau(v, c=c):
            t = tau.copy()
            t[c] = v
            return float((g * ref_activation_binarize(x, np.float32(scale), t)).sum())
        assert central_difference(loss_of_tau, float(tau[c]), 1e-3) == 0.0
    np.testing.assert_array_equal(grad_tau, 0.0)


@settings(deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.5, 3.0))
def test_scale_and_threshold_gradients_inside_the_range_are_pact_for_binarization(seed, scale):
    """Inside [0, S] the forward is a step (zero derivative a.e.); the op's gradients are those of its
    straight-through relaxation (PACT extended to binarization), checked here by finite differences:

        out/S = b(u),  u = x/S - tau,  b' := 1   (straight-through)
        relaxed output  r(S', tau') = S' * (b0 + (x/S' - tau') - (x/S - tau))      b0: the forward's step
        d r / dS'  at S = b0 - x/S = (out - x) / S   (the binarization error)
        d (r/S) / dtau' = -1                          (per element of the band 0 < x < S)
    """
    rng = np.random.default_rng(seed)
    x = (scale * rng.uniform(0.02, 0.98, (2, 3, 4, 4))).astype(np.float32)  # strictly inside (0, S)
    tau = rng.uniform(0.2, 0.8, 3).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float64)
    grad_s, grad_tau = op_grads(x, scale, tau, g.astype(np.float32))
    x64 = x.astype(np.float64)
    t64 = tau.astype(np.float64).reshape(1, -1, 1, 1)
    b0 = ref_activation_binarize(x, np.float32(scale), tau).astype(np.float64) / np.float32(scale)

    def relaxed_loss_s(s):
        return float((g * s * (b0 + (x64 / s - t64) - (x64 / scale - t64))).sum())

    def relaxed_loss_tau(c, v):
        t = t64.copy()
        t[0, c] = v
        return float((g * (b0 + (x64 / scale - t) - (x64 / scale - t64))).sum())

    assert grad_s == pytest.approx(central_difference(relaxed_loss_s, scale, 1e-4 * scale), rel=1e-3, abs=1e-3)
    for c in range(3):
        fd = central_difference(lambda v: relaxed_loss_tau(c, v), float(tau[c]), 1e-4)
        assert grad_tau[c] == pytest.approx(fd, rel=1e-3, abs=1e-3)


def test_hidden_parameter_gradients_chain_through_smooth_maps():
    """log_scale -> S = exp and logit -> tau = sigmoid are smooth: their derivatives match finite
    differences, and the hidden parameters' gradients are the op's gradients times them."""
    torch.manual_seed(0)
    module = ActivationBinarizer(3)
    module.set_scale_threshold(1.7, torch.tensor([0.3, 0.5, 0.8]))
    module.enabled = True
    x = torch.rand(2, 3, 5, 5) * 2.5
    g = torch.randn_like(x)
    (module(x) * g).sum().backward()
    s = float(module.scale().detach()[0])
    tau = module.relative_threshold().detach().double()
    grad_s, grad_tau = op_grads(x.numpy(), s, tau.float().numpy(), g.numpy())

    def scale_of(v):
        with torch.no_grad():
            return math.exp(v)

    log_s = float(module.log_scale.detach()[0])
    ds = central_difference(scale_of, log_s, 1e-5)
    assert ds == pytest.approx(s, rel=1e-5)
    assert float(module.log_scale.grad[0]) == pytest.approx(grad_s * ds, rel=1e-4)
    for c in range(3):
        logit = float(module.threshold.detach()[c])
        dtau = central_difference(lambda v: 1 / (1 + math.exp(-v)), logit, 1e-5)
        assert dtau == pytest.approx(float(tau[c] * (1 - tau[c])), rel=1e-5)
        assert float(module.threshold.grad[c]) == pytest.approx(grad_tau[c] * dtau, rel=1e-4, abs=1e-6)


def test_compression_lr_multiplier_scales_hidden_gradients_only():
    x = torch.rand(2, 3, 4, 4) * 2
    grads = []
    for multiplier in (None, 4.0):
        module = ActivationBinarizer(3, lr_multiplier=multiplier)
        module.set_scale_threshold(1.3, 0.4)
        module.enabled = True
        out = module(x)
        out.sum().backward()
        grads.append((out.detach(), module.log_scale.grad.clone(), module.threshold.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.allclose(grads[1][1], 4 * grads[0][1]) and torch.allclose(grads[1][2], 4 * grads[0][2])


def test_weight_gradient_is_straight_through():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    module = WeightBinarizer("xnor")
    module.enabled = True
    g = torch.randn_like(w)
    (module(w) * g).sum().backward()
    assert torch.equal(w.grad, g)


# -- placement --------------------------------------------------------------------------------------------

def test_binarizers_sit_on_weight_and_input_edges_of_inner_convs():
    ctrl, gm = compile_digits(Binarization())
    assert sorted(binarizers(gm, WeightBinarizer)) == ["conv2_weight_binarizer", "conv3_weight_binarizer"]
    assert sorted(binarizers(gm, ActivationBinarizer)) == ["conv2_input_binarizer", "conv3_input_binarizer"]
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.endswith("_binarizer"):
            assert node.meta["inserted_by"] == "binarization"
            (user,) = node.users
            assert user.op == "call_function" and user.target is torch.conv2d
            if node.target.endswith("_weight_binarizer"):
                assert user.args[1] is node and node.args[0].op == "get_attr"
            else:
                assert user.args[0] is node
    assert gm.get_submodule("conv2_input_binarizer").num_channels == 16
    assert gm.get_submodule("conv3_input_binarizer").num_channels == 32
    stats = ctrl.statistics().to_dict()["binarization"]
    assert [r["layer"] for r in stats["layers"]] == ["conv2", "conv3"]
    assert [s["scope"] for s in stats["skipped"]] == ["conv1"]
    assert "first layer" in stats["skipped"][0]["reason"]
    assert 0.9 < stats["binarized_mac_share"] < 1.0
    # the user's model is untouched and its parameters keep their names
    assert "conv2.weight" in dict(gm.named_parameters())


class FCN(nn.Module):
    """conv -> conv -> conv: the last layer is a conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def test_first_and_last_layers_stay_full_precision_unless_asked():
    model = FCN().eval()
    x = torch.randn(2, 2, 6, 6)
    ctrl, gm = compile_for_compression(model, [Binarization()], example_inputs=(x,))
    assert sorted(binarizers(gm, WeightBinarizer)) == ["b_weight_binarizer"]
    skipped = {s["scope"]: s["reason"] for s in ctrl.statistics().to_dict()["binarization"]["skipped"]}
    assert "first layer" in skipped["a"] and "last layer" in skipped["c"]
    ctrl, gm = compile_for_compression(model, [Binarization(binarize_first_last=True)], example_inputs=(x,))
    assert sorted(binarizers(gm, WeightBinarizer)) == ["a_weight_binarizer", "b_weight_binarizer",
                                                       "c_weight_binarizer"]
    ctrl, gm = compile_for_compression(model, [Binarization(binarize_first_last=True, ignored_scopes=["c"])],
                                       example_inputs=(x,))
    assert sorted(binarizers(gm, WeightBinarizer)) == ["a_weight_binarizer", "b_weight_binarizer"]
    with pytest.raises(ScopeError, match="cc"):
        compile_for_compression(model, [Binarization(ignored_scopes=["cc"])], example_inputs=(x,))


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.head(x.mean((2, 3)))


def test_a_shared_weight_gets_one_weight_binarizer_and_each_call_its_input_binarizer():
    ctrl, gm = compile_for_compression(SharedConv().eval(), [Binarization()], example_inputs=(torch.randn(2, 1, 6, 6),))
    assert list(binarizers(gm, WeightBinarizer)) == ["shared_weight_binarizer"]
    assert len(binarizers(gm, ActivationBinarizer)) == 2
    assert len(ctrl.parts[0].layers) == 2


def test_nothing_to_binarize_warns_and_reports():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    with pytest.warns(UserWarning, match="nothing to binarize"):
        ctrl, gm = compile_for_compression(model, [Binarization()], example_inputs=(X,))
    stats = ctrl.statistics().to_dict()["binarization"]
    assert stats["binarized_layers"] == 0 and stats["skipped"][0]["scope"] == "0"


@settings(deadline=None, max_examples=8)
@given(case=conv_nets())
def test_disabled_binarizers_are_exact_identities_and_lowering_is_exact(case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(case.model, [Binarization(binarize_first_last=True)],
                                           example_inputs=case.example_inputs)
    assert_modules_agree(case.model, gm, case.example_inputs, atol=0, rtol=0)
    part = ctrl.parts[0]
    for layer in part.layers:  # a data-like range: S = 0.5, tau in (0.2, 0.8)
        act = layer.activation_binarizer
        act.set_scale_threshold(0.5, torch.rand(act.num_channels) * 0.6 + 0.2)
    part.set_binarization(activations=True, weights=True)
    lowered = ctrl.lower()
    assert not binarizers(lowered, (WeightBinarizer, ActivationBinarizer))
    assert_modules_agree(gm, lowered, case.example_inputs, atol=1e-5, rtol=1e-5)


# -- staged schedule -------------------------------------------------------------------------------------------

def enabled_flags(gm):
    acts = {m.enabled for m in binarizers(gm, ActivationBinarizer).values()}
    wts = {m.enabled for m in binarizers(gm, WeightBinarizer).values()}
    assert len(acts) == 1 and len(wts) == 1
    return acts.pop(), wts.pop()


def test_stages_switch_at_the_configured_epochs():
    ctrl, gm = compile_digits(Binarization(activations_quant_start_epoch=1, weights_quant_start_epoch=3))
    seen = []
    for epoch in range(5):
        for _ in range(3):
            ctrl.scheduler.step()
        stats = ctrl.statistics().to_dict()["binarization"]
        seen.append((stats["epoch"], stats["stage"], enabled_flags(gm)))
        ctrl.scheduler.epoch_step()
    assert seen == [(0, "float", (False, False)),
                    (1, "activations_binarized", (True, False)),
                    (2, "activations_binarized", (True, False)),
                    (3, "fully_binarized", (True, True)),
                    (4, "fully_binarized", (True, True))]


def test_default_weights_start_one_epoch_after_activations():
    ctrl, _ = compile_digits(Binarization())
    s = ctrl.parts[0].scheduler
    assert (s.activations_quant_start_epoch, s.weights_quant_start_epoch) == (1, 2)
    ctrl, _ = compile_digits(Binarization(activations_quant_start_epoch=4))
    assert ctrl.parts[0].scheduler.weights_quant_start_epoch == 5
    ctrl, gm = compile_digits(Binarization(activations_quant_start_epoch=2, weights_quant_start_epoch=0))
    assert ctrl.parts[0].stage == "weights_binarized" and enabled_flags(gm) == (False, True)


def test_lr_and_weight_decay_hints_follow_nncf_poly_drop():
    s = StagedBinarizationScheduler(0, 1, lr_poly_drop_start_epoch=2, lr_poly_drop_duration_epochs=4,
                                    disable_wd_start_epoch=3, base_lr=0.1, base_wd=1e-4)
    for epoch, lr, wd in [(0, 0.1, 1e-4), (1.9, 0.1, 1e-4), (2, 0.1, 1e-4), (3, 0.1 * 0.75 ** 2.1, 1e-4),
                          (3.5, 0.1 * 0.625 ** 2.1, 0.0), (5.99, 0.1 * (0.01 / 4) ** 2.1, 0.0), (6, 0.0, 0.0)]:
        assert s.lr_hint(epoch=epoch) == pytest.approx(lr, rel=1e-12, abs=1e-15)
        assert s.wd_hint(epoch=epoch) == wd
    assert s.lr_hint(1.0, epoch=4) == pytest.approx(0.5 ** 2.1)
    # the fractional epoch comes from the step counters once an epoch's length is known
    for _ in range(2):
        for _ in range(10):
            s.step()
        s.epoch_step()
    for _ in range(5):
        s.step()
    assert s.epoch_float == 2.5 and s.lr_hint() == pytest.approx(0.1 * (3.5 / 4) ** 2.1)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0, weight_decay=1.0)
    s.apply_to(opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(s.lr_hint()) and opt.param_groups[0]["weight_decay"] == 1e-4
    s2 = StagedBinarizationScheduler(0, 1)
    assert s2.lr_hint(0.5, epoch=1000) == 0.5 and s2.wd_hint(0.1, epoch=1000) == 0.1  # no drop configured


# -- checkpoints -------------------------------------------------------------------------------------------------

def train_steps(gm, ctrl, batches, lr=1e-2):
    opt = torch.optim.Adam(gm.parameters(), lr=lr)
    gm.train()
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        opt.step()
        ctrl.scheduler.step()


def test_checkpoint_resumes_stage_and_hidden_parameters(tmp_path):
    def build():
        return compile_digits(Binarization(activations_quant_start_epoch=1, weights_quant_start_epoch=2,
                                           lr_poly_drop_start_epoch=1, lr_poly_drop_duration_epochs=4))
    ctrl, gm = build()
    batches = digits_batches()
    ctrl.initialize(batches)
    for _ in range(2):
        train_steps(gm, ctrl, batches)
        ctrl.scheduler.epoch_step()
    train_steps(gm, ctrl, batches[:2])  # in the middle of epoch 2
    assert ctrl.parts[0].stage == "fully_binarized"
    torch.save({"model": gm.state_dict(), "ctrl": ctrl.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ctrl2, gm2 = build()
    assert ctrl2.parts[0].stage == "float"
    load_state(gm2, ckpt["model"])
    ctrl2.load_state_dict(ckpt["ctrl"])
    assert ctrl2.parts[0].stage == "fully_binarized" and enabled_flags(gm2) == (True, True)
    s1, s2 = ctrl.parts[0].scheduler, ctrl2.parts[0].scheduler
    assert (s2.current_epoch, s2.current_step, s2.global_step, s2.steps_per_epoch) == (2, 2, 10, 4)
    assert s2.lr_hint() == s1.lr_hint()
    for name in ("conv2_input_binarizer", "conv3_input_binarizer"):
        a, b = gm.get_submodule(name), gm2.get_submodule(name)
        assert torch.equal(a.log_scale, b.log_scale) and torch.equal(a.threshold, b.threshold)
        assert bool(b.initialized)
    assert_modules_agree(gm, gm2, X, atol=0, rtol=0)
    assert ctrl2.statistics().to_dict() == ctrl.statistics().to_dict()


def test_checkpoint_before_the_switch_resumes_in_float_and_switches_on_time(tmp_path):
    ctrl, gm = compile_digits(Binarization(activations_quant_start_epoch=2, weights_quant_start_epoch=3))
    ctrl.scheduler.epoch_step()
    torch.save(ctrl.state_dict(), tmp_path / "c.pt")
    ctrl2, gm2 = compile_digits(Binarization(activations_quant_start_epoch=2, weights_quant_start_epoch=3))
    ctrl2.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    stages = []
    for _ in range(3):
        stages.append(ctrl2.parts[0].stage)
        ctrl2.scheduler.epoch_step()
    assert stages == ["float", "activations_binarized", "fully_binarized"]


# -- initialization ----------------------------------------------------------------------------------------------

def inputs_of(gm, name, batches):
    seen = []
    module = gm.get_submodule(name)
    hook = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        gm.eval()
        for x, _ in batches:
            gm(x)
    hook.remove()
    return torch.cat(seen)


def test_initialize_sets_scale_from_percentile_and_thresholds_that_keep_channel_means():
    ctrl, gm = compile_digits(Binarization(activations_quant_start_epoch=0, weights_quant_start_epoch=5))
    batches = digits_batches(n=4, batch=16)
    module = gm.get_submodule("conv3_input_binarizer")
    ctrl.parts[0].set_binarization(activations=False)
    x = inputs_of(gm, "conv3_input_binarizer", batches)  # float inputs (the binarizers observe those)
    ctrl.parts[0].set_binarization(activations=True)
    ctrl.initialize(batches)
    scale = float(module.scale().detach()[0])
    assert scale == pytest.approx(float(torch.quantile(x.flatten(), 0.999)), rel=1e-4)
    out = (x > module.absolute_threshold().reshape(1, -1, 1, 1)).float() * scale
    channel_means = x.clamp(0, scale).transpose(0, 1).reshape(x.shape[1], -1).mean(1)
    out_means = out.transpose(0, 1).reshape(x.shape[1], -1).mean(1)
    live = (channel_means > 0.02 * scale)  # channels whose tau is not at its 0.01 floor
    assert torch.allclose(out_means[live], channel_means[live], rtol=0.1, atol=0.02 * scale)
    stats = ctrl.statistics().to_dict()["binarization"]["layers"]
    assert all(r["initialized"] for r in stats)


@pytest.mark.parametrize("range_type,expected", [
    ("min_max", lambda xs: max(float(x.max()) for x in xs)),
    ("mean_min_max", lambda xs: sum(float(x.max()) for x in xs) / len(xs)),
])
def test_range_types(range_type, expected):
    ctrl, gm = compile_digits(Binarization(initializer={"range": {"type": range_type},
                                                        "threshold": {"type": "half"}}))
    batches = digits_batches(n=3, batch=8)
    per_batch = [inputs_of(gm, "conv2_input_binarizer", [b]) for b in batches]
    ctrl.initialize(batches)
    module = gm.get_submodule("conv2_input_binarizer")
    assert float(module.scale().detach()[0]) == pytest.approx(expected(per_batch), rel=1e-5)
    assert torch.allclose(module.relative_threshold(), torch.full((16,), 0.5))


def test_list_form_range_sets_each_binarizer_from_the_first_item_that_selects_it():
    # NNCF's list form: per-scope range configs; conv2 by min_max, conv3 (no item for it) by the default
    ranges = [{"type": "min_max", "target_scopes": ["conv2"], "target_quantizer_group": "activations"},
              {"type": "mean_min_max", "target_scopes": ["{re}conv[23]"], "ignored_scopes": ["conv3"]},
              {"type": "min_max", "target_quantizer_group": "weights"}]  # weight binarizers have no range
    ctrl, gm = compile_digits(Binarization(initializer={"range": ranges, "threshold": {"type": "half"}}))
    batches = digits_batches(n=3, batch=8)
    conv2 = [inputs_of(gm, "conv2_input_binarizer", [b]) for b in batches]
    conv3 = torch.cat([inputs_of(gm, "conv3_input_binarizer", [b]) for b in batches])
    ctrl.initialize(batches)
    scale = {name: float(gm.get_submodule(f"{name}_input_binarizer").scale().detach()[0]) for name in ("conv2", "conv3")}
    assert scale["conv2"] == pytest.approx(max(float(x.max()) for x in conv2), rel=1e-5)
    assert scale["conv3"] == pytest.approx(float(torch.quantile(conv3.flatten(), 0.999)), rel=1e-4)
    with pytest.raises(ScopeError, match=r"initializer.range\[0\].target_scopes: scope 'conv9'"):
        compile_digits(Binarization(initializer={"range": [{"type": "min_max", "target_scopes": ["conv9"]}]}))
    with pytest.raises(ConfigError, match=r"initializer.range\[0\].params.min_percentile: 50 is not below"):
        Binarization(initializer={"range": [{"params": {"min_percentile": 50, "max_percentile": 10}}]})


def test_batchnorm_adaptation_reestimates_running_statistics_only():
    ctrl, gm = compile_digits(Binarization(activations_quant_start_epoch=0, weights_quant_start_epoch=0,
                                           initializer={"batchnorm_adaptation": {"num_bn_adaptation_samples": 32}}))
    params = {k: v.detach().clone() for k, v in gm.named_parameters() if "binarizer" not in k}
    before = gm.get_submodule("bn2").running_mean.clone()
    ctrl.initialize(digits_batches(n=4, batch=16))
    assert not torch.allclose(gm.get_submodule("bn2").running_mean, before)
    assert all(torch.equal(v, dict(gm.named_parameters())[k]) for k, v in params.items())
    assert gm.get_submodule("bn2").momentum == DigitsCNN().bn2.momentum


def test_without_initialize_the_first_training_batch_sets_the_scale_as_nncf():
    ctrl, gm = compile_digits(Binarization(activations_quant_start_epoch=0))
    x, _ = digits_batches(n=1, batch=32)[0]
    module = gm.get_submodule("conv2_input_binarizer")
    gm.eval()
    gm(x)  # eval: an uninitialized binarizer does not set itself
    assert not bool(module.initialized)
    with pytest.raises(NotInitializedError, match="conv2_input_binarizer"):
        ctrl.export_onnx("unused.onnx")
    seen = []
    hook = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    gm.train()
    gm(x)
    hook.remove()
    k = max(1, round(seen[0].numel() * 0.001))
    assert float(module.scale().detach()[0]) == pytest.approx(float(seen[0].flatten().topk(k).values.min()),
                                                              rel=1e-5)
    assert bool(module.initialized)
    assert torch.allclose(module.relative_threshold(), torch.full((16,), 0.5))  # NNCF's initial tau


# -- export -------------------------------------------------------------------------------------------------------

def test_export_runs_in_onnxruntime_and_openvino_with_pytorch_outputs(tmp_path):
    from fxcompress.runtime import openvino_compile, openvino_infer, qdq_summary, run_onnxruntime
    ctrl, gm = compile_digits(Binarization(activations_quant_start_epoch=0, weights_quant_start_epoch=0))
    batches = digits_batches()
    ctrl.initialize(batches)
    train_steps(gm, ctrl, batches)  # trained, non-trivial thresholds and BN statistics
    gm.eval()
    path = ctrl.export_onnx(tmp_path / "binary.onnx")
    model = onnx.load(path)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Greater") == 2 and ops.count("Where") == 2
    assert not qdq_summary(path).custom_domain_ops
    # the binarized conv weights are stored as +-m constants: one magnitude per output channel
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3
    for conv in convs[1:]:
        w = inits[conv.input[1]]
        per_channel = np.abs(w).reshape(w.shape[0], -1)
        assert np.allclose(per_channel.max(1), per_channel.min(1), rtol=1e-6)  # BN may fold a factor in
    x = torch.randn(9, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    want = gm(x).detach().numpy()
    np.testing.assert_allclose(run_onnxruntime(path, x)[0], want, rtol=1e-4, atol=1e-4)
    compiled = openvino_compile(path, precision="f32")
    np.testing.assert_allclose(openvino_infer(compiled, x)[0], want, rtol=1e-4, atol=1e-4)


def test_integer_export_form_runs_binary_convs_as_u8_x_i8_in_openvino(tmp_path):
    from fxcompress.runtime import (openvino_compile, openvino_compute_layers, openvino_infer, qdq_summary,
                                    run_onnxruntime)
    for mode in ("xnor", "dorefa"):
        ctrl, gm = compile_digits(Binarization(mode=mode, activations_quant_start_epoch=0,
                                               weights_quant_start_epoch=0, export_form="qdq"))
        ctrl.initialize(digits_batches())
        gm.eval()
        path = ctrl.export_onnx(tmp_path / f"binary_{mode}.onnx")
        summary = qdq_summary(path)
        assert summary.integer_weights == 2 and summary.integer_weight_types == {"INT8": 2}
        assert summary.activation_quantizers == 2 and not summary.custom_domain_ops
        model = onnx.load(path)
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        for q in [inits[n.input[0]] for n in model.graph.node
                  if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(0)).dtype == np.int8]:
            assert set(np.unique(q)) <= {-1, 1}
        x = torch.randn(9, 1, 8, 8, generator=torch.Generator().manual_seed(4))
        want = gm(x).detach().numpy()
        np.testing.assert_allclose(run_onnxruntime(path, x)[0], want, rtol=1e-4, atol=1e-4)
        compiled = openvino_compile(path, precision="f32")
        np.testing.assert_allclose(openvino_infer(compiled, x)[0], want, rtol=1e-4, atol=1e-4)
        layers = openvino_compute_layers(compiled)
        assert len(layers.integer) == 2 and all(layer.input_types[:2] == ["u8", "i8"] for layer in layers.integer)


def test_thresholds_are_exact_at_the_boundary(tmp_path):
    """Inputs at T and 1-3 ulps around it: the Greater/Where form agrees with PyTorch in both runtimes,
    the QDQ form in ONNX Runtime (QuantizeLinear divides by 2T; OpenVINO multiplies by a reciprocal)."""
    from fxcompress.runtime import openvino_compile, openvino_infer, run_onnxruntime
    channels = 8
    model = nn.Conv2d(channels, 3, 1, bias=False).eval()
    x0 = torch.zeros(1, channels, 1, 7)
    for form in ("where", "qdq"):
        ctrl, gm = compile_for_compression(model, [Binarization(binarize_first_last=True, export_form=form,
                                                                activations_quant_start_epoch=0)],
                                           example_inputs=(x0,))
        (binarizer,) = binarizers(gm, ActivationBinarizer).values()
        binarizer.set_scale_threshold(1.7320508, torch.linspace(0.1, 0.9, channels))
        t = binarizer.absolute_threshold().numpy().astype(np.float32)
        columns = [t]
        for direction in (np.inf, -np.inf):
            v = t.copy()
            for _ in range(3):
                v = np.nextafter(v, np.float32(direction))
                columns.append(v)
        x = torch.from_numpy(np.stack(columns, axis=1).reshape(1, channels, 1, 7))
        gm.eval()
        want = gm(x).detach().numpy()
        path = ctrl.export_onnx(tmp_path / f"boundary_{form}.onnx", dynamic_batch=False)
        np.testing.assert_allclose(run_onnxruntime(path, x)[0], want, rtol=1e-6, atol=1e-6)
        if form == "where":
            got = openvino_infer(openvino_compile(path, precision="f32"), x)[0]
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_strip_folds_binarized_weights_under_their_names():
    ctrl, gm = compile_digits(Binarization(activations_quant_start_epoch=0, weights_quant_start_epoch=0,
                                           mode="dorefa"))
    ctrl.initialize(digits_batches(n=1))
    plain = ctrl.strip()
    values = torch.unique(dict(plain.named_parameters())["conv2.weight"].abs())
    assert values.numel() == 1  # DoReFa: one magnitude for the whole tensor
    assert torch.equal(dict(gm.named_parameters())["conv2.weight"], DigitsCNN(seed=0).conv2.weight)  # untouched
    assert_modules_agree(gm, plain, X, atol=1e-6, rtol=1e-6)


# -- config ------------------------------------------------------------------------------------------------------

# shaped as NNCF's examples/torch/classification/configs/binarization/resnet18_imagenet_binarization_xnor.json
NNCF_CONFIG = {
    "input_info": {"sample_size": [1, 1, 8, 8]},
    "compression": {
        "algorithm": "binarization",
        "mode": "xnor",
        "params": {
            "activations_quant_start_epoch": 0,
            "weights_quant_start_epoch": 2,
            "lr_poly_drop_start_epoch": 3,
            "lr_poly_drop_duration_epochs": 5,
            "disable_wd_start_epoch": 3,
            "batch_multiplier": 2,
            "base_lr": 1e-3,
            "base_wd": 1e-5,
        },
        "initializer": {"range": {"num_init_samples": 64, "type": "percentile",
                                  "params": {"max_percentile": 99.5}}},
        "ignored_scopes": ["conv1", "fc"],
    },
}


def test_nncf_config_builds_the_same_graph_as_the_pass():
    config = Config.from_dict(json.loads(json.dumps(NNCF_CONFIG)))
    ctrl_c, gm_c = compile_digits(*config.passes)
    entry = NNCF_CONFIG["compression"]
    ctrl_p, gm_p = compile_digits(Binarization(mode="xnor", initializer=entry["initializer"],
                                               ignored_scopes=["conv1", "fc"], **entry["params"]))
    assert gm_c.code == gm_p.code
    s = ctrl_c.parts[0].scheduler
    assert (s.activations_quant_start_epoch, s.weights_quant_start_epoch, s.batch_multiplier) == (0, 2, 2)
    assert ctrl_c.statistics().to_dict() == ctrl_p.statistics().to_dict()


@pytest.mark.parametrize("kwargs,field", [
    (dict(mode="ternary"), "mode"),
    (dict(activations_quant_start_epoch=-1), "activations_quant_start_epoch"),
    (dict(lr_poly_drop_duration_epochs=0), "lr_poly_drop_duration_epochs"),
    (dict(initializer={"range": {"type": "mixed_min_max"}}), "initializer.range.type"),
    (dict(initializer={"range": {"params": {"min_percentile": 99.95}}}), "initializer.range.params.min_percentile"),
    (dict(initializer={"threshold": {"type": "zero"}}), "initializer.threshold.type"),
    (dict(batch_multiplier=0.5), "batch_multiplier"),
    (dict(export_form="fake_quantize"), "export_form"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        Binarization(**kwargs)
    assert info.value.path == f"Binarization.{field}", str(info.value)


def test_unknown_keys_get_did_you_mean():
    with pytest.raises(ConfigError, match="did you mean 'weights_quant_start_epoch'"):
        Binarization(weight_quant_start_epoch=3)
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"input_info": {"sample_size": [1, 1, 8, 8]},
                          "compression": {"algorithm": "binarization", "params": {"mode": "xnr"}}})
    assert info.value.path == "compression.mode"
