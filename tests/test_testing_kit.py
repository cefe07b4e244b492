"""Tests of the public testing kit, fxcompress.testing."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import given, settings

import fxcompress.testing.data as kit_data
from fxcompress.testing import (ARCHITECTURES, DataDependentGate, ModelNeedingLeaf,
                                assert_modules_agree, assert_outputs_agree, digits_loaders,
                                evaluate_accuracy, leaf_modules_for, load_digits_tensors,
                                max_abs_diff, resnet18_like, train_digits_cnn)
from fxcompress.testing.strategies import (AttentionNetSpec, AttentionSpec, ConvNetSpec,
                                           ConvSpec, HeadSpec, ModelCase, RareConvSpec,
                                           ConvBlockSpec, attention_blocks, conv_nets, mlps,
                                           models)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is as fast, and far faster when
    other processes load the 2-core machine (thread oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves):
        super().__init__()
        self.leaves = tuple(leaves)

    def is_leaf_module(self, m, qualname):
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, leaves=()) -> fx.GraphModule:
    if not leaves:
        return fx.symbolic_trace(model)
    graph = _LeafTracer(leaves).trace(model)
    return fx.GraphModule(model, graph)


def _check_case(case: ModelCase) -> None:
    model, inputs = case.model, case.example_inputs
    assert not model.training
    with torch.no_grad():
        out = model(*inputs)
    leaves = out.values() if isinstance(out, dict) else (out if isinstance(out, tuple) else [out])
    for t in leaves:
        assert torch.isfinite(t).all(), case
    gm = fx.symbolic_trace(model)
    assert_modules_agree(model, gm, inputs, atol=0, rtol=0, msg=repr(case))
    # rebuilding from the spec gives the identical model and inputs
    again = case.spec.build()
    assert repr(again) == repr(case)
    for a, b in zip(again.example_inputs, inputs):
        assert torch.equal(a, b)
    assert_modules_agree(model, again.model, inputs, atol=0, rtol=0)


# ---------------------------------------------------------------------------
# hand-written architectures
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_runs_traces_and_agrees(name):
    model, inputs = ARCHITECTURES[name]()
    assert isinstance(inputs, tuple) and inputs and inputs[0].shape[0] == 2
    assert not model.training
    with torch.no_grad():
        out = model(*inputs)
    assert out.shape[0] == 2 and out.dim() == 2
    assert torch.isfinite(out).all()
    leaves = leaf_modules_for(name)
    if leaves:
        with pytest.raises(fx.proxy.TraceError):
            fx.symbolic_trace(model)
    gm = _trace(model, leaves)
    assert_modules_agree(model, gm, inputs, atol=0, rtol=0)
    # the traced graph re-traces, as a compiler's output must
    if not leaves:
        assert_modules_agree(model, fx.symbolic_trace(gm), inputs, atol=0, rtol=0)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_is_deterministic(name):
    m1, in1 = ARCHITECTURES[name]()
    state = torch.random.get_rng_state()
    m2, in2 = ARCHITECTURES[name]()
    assert torch.equal(state, torch.random.get_rng_state()), "building must not touch the RNG"
    for a, b in zip(in1, in2):
        assert torch.equal(a, b)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert_modules_agree(m1, m2, in1, atol=0, rtol=0)


def test_norm_layers_are_randomized():
    model, _ = ARCHITECTURES["resnet_tiny"]()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    assert any((bn.weight < 0).any() for bn in bns)
    assert all(not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)) for bn in bns)


def test_model_needing_leaf():
    model, (x,) = ARCHITECTURES["model_needing_leaf"]()
    assert leaf_modules_for("model_needing_leaf") == (DataDependentGate,)
    assert ModelNeedingLeaf.leaf_modules == (DataDependentGate,)
    with pytest.raises(fx.proxy.TraceError, match="control flow"):
        fx.symbolic_trace(model)
    gm = _trace(model, (DataDependentGate,))
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)
    for seed in range(4):
        xi = model.example_input(seed=seed) * (1 if seed % 2 else -3)
        assert_modules_agree(model, gm, xi, atol=0, rtol=0)
    gate = model.gate
    pos, neg = torch.ones(1, 8, 2, 2), -torch.ones(1, 8, 2, 2)
    assert not torch.allclose(gate(pos), -gate(neg)), "both branches are exercised"


def test_leaf_modules_for_unknown_name():
    with pytest.raises(KeyError):
        leaf_modules_for("no_such_model")
    assert leaf_modules_for("resnet_tiny") == ()


def test_resnet18_like_matches_torchvision_layout():
    model = resnet18_like()
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision resnet18
    names = dict(model.named_modules())
    for n in ["conv1", "bn1", "relu", "maxpool", "layer1.0.conv1", "layer1.1.bn2",
              "layer2.0.downsample.0", "layer2.0.downsample.1", "layer4.1.conv2", "avgpool", "fc"]:
        assert n in names, n
    assert "layer1.0.downsample" not in names or names["layer1.0.downsample"] is None
    assert isinstance(names["layer3.0.downsample.0"], nn.Conv2d)
    assert names["layer3.0.downsample.0"].stride == (2, 2)
    assert names["conv1"].kernel_size == (7, 7) and names["conv1"].stride == (2, 2)
    assert model.fc.in_features == 512 and model.fc.out_features == 1000
    small = resnet18_like(num_classes=5, width=8)
    with torch.no_grad():
        out = small.eval()(small.example_input(batch=1, size=64))
    assert out.shape == (1, 5)


# ---------------------------------------------------------------------------
# hypothesis strategies
# ---------------------------------------------------------------------------


@settings(deadline=None)
@given(models())
def test_generated_models_run_trace_and_agree(case):
    _check_case(case)


@settings(deadline=None)
@given(conv_nets(include_rare_ops=True, multi_output=True))
def test_generated_conv_nets_with_rare_ops(case):
    assert isinstance(case.spec, ConvNetSpec)
    assert case.example_inputs[0].dim() == 4
    assert max(case.example_inputs[0].shape[2:]) <= 16
    for m in case.model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            assert m.in_channels <= 32 and m.out_channels <= 32
    _check_case(case)


@settings(deadline=None)
@given(mlps(multi_output=True))
def test_generated_mlps(case):
    _check_case(case)


@settings(deadline=None)
@given(attention_blocks(include_rare_ops=True))
def test_generated_attention_blocks(case):
    assert case.example_inputs[0].dim() == 3
    _check_case(case)


def test_rare_ops_build_and_trace():
    """Every rare op (and a depthwise and a grouped conv) in one explicit spec."""
    blocks = (
        ConvBlockSpec(ConvSpec(3, 8, 3, 1, 1, 1, True, True, "nn.ReLU")),
        ConvBlockSpec(ConvSpec(8, 8, 3, 2, 1, 8, False, True, "F.relu6")),     # depthwise
        RareConvSpec("conv1d", 8, 12, 3, 1, 1, 0, 4, True, True, "x.relu()"),   # grouped
        RareConvSpec("conv3d", 12, 8, 3, 1, 1, 0, 1, False, True, "nn.GELU"),
        RareConvSpec("conv_transpose2d", 8, 6, 3, 2, 1, 1, 2, True, True, "torch.relu"),
    )
    head = HeadSpec("none", "x.view(x.size(0),-1)", 6 * 12 * 12, None, "none", 0.0, 3)
    case = ConvNetSpec(7, (2, 3, 12, 12), blocks, head).build()
    types = {type(m) for m in case.model.modules()}
    assert {nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.BatchNorm1d, nn.BatchNorm3d} <= types
    assert case.model(*case.example_inputs).shape == (2, 3)
    _check_case(case)
    assert "conv_transpose2d3x3(8->6,s2,p1,op1,g2,bias)+bn+torch.relu" in repr(case)


def test_sdpa_attention_spec():
    blk = AttentionSpec(dim=8, heads=2, seq_len=4, pre_norm=True, fused_qkv=True, bias=True,
                        split="view+transpose", key_t="transpose(-1,-2)", scale="div",
                        softmax="F.softmax", mask="additive", sdpa=True, attn_dropout=0.0,
                        add="+=", ffn_hidden=16, ffn_act="nn.GELU")
    case = AttentionNetSpec(3, (2, 4, 8), None, (blk,), True, "mean", 5).build()
    _check_case(case)


def test_model_case_repr_is_the_spec():
    blocks = (ConvBlockSpec(ConvSpec(1, 4, 3, 1, 1, 1, False, True, "nn.ReLU6")),)
    case = ConvNetSpec(0, (2, 1, 8, 8), blocks,
                       HeadSpec("x.mean((2,3))", "torch.flatten(x,1)", 4, None, "none", 0.0, 2)
                       ).build()
    assert repr(case).startswith("ModelCase(conv_net(input=[2, 1, 8, 8], seed=0")
    assert "conv3x3(1->4,s1,p1)+bn+nn.ReLU6" in repr(case)
    assert case.description in repr(case)


# ---------------------------------------------------------------------------
# asserts
# ---------------------------------------------------------------------------


def test_assert_modules_agree_detects_difference():
    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    b = nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4)
    assert assert_modules_agree(a, b, x) == 0.0
    with torch.no_grad():
        b.bias[1] += 0.5
    with pytest.raises(AssertionError) as err:
        assert_modules_agree(a, b, (x,), msg="after pass X")
    text = str(err.value)
    assert "after pass X" in text and "max abs diff 0.5" in text and "index (0, 1)" in text
    # within tolerance
    assert_modules_agree(a, b, x, atol=0.6)


class _Structured(nn.Module):
    def __init__(self, delta=0.0):
        super().__init__()
        self.delta = delta
        self.drop = nn.Dropout(0.5)

    def forward(self, x, y):
        z = self.drop(x)
        return {"logits": z + y, "aux": (z * 2 + self.delta, [y]), "n": 3, "name": "ok"}


def test_assert_modules_agree_structured_outputs_and_modes():
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    a, b = _Structured(), _Structured()
    a.train()
    b.eval()
    b.drop.train()  # mixed modes must be restored exactly
    assert_modules_agree(a, b, (x, y), atol=0, rtol=0)  # dropout off: eval mode
    assert a.training and a.drop.training and not b.training and b.drop.training
    assert_modules_agree(a, b, {"x": x, "y": y})  # keyword inputs
    with pytest.raises(AssertionError, match=r"output\['aux'\]\[0\]: max abs diff 0.001"):
        assert_modules_agree(a, _Structured(1e-3), (x, y))


def test_assert_outputs_agree_structure_and_dtype():
    with pytest.raises(AssertionError, match="shape"):
        assert_outputs_agree(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(AssertionError, match="length"):
        assert_outputs_agree((torch.zeros(1),), (torch.zeros(1), torch.zeros(1)))
    with pytest.raises(AssertionError, match="keys differ"):
        assert_outputs_agree({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    with pytest.raises(AssertionError, match="dtype"):
        assert_outputs_agree(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert_outputs_agree(torch.zeros(2), torch.zeros(2, dtype=torch.float64), check_dtype=False)
    with pytest.raises(AssertionError, match="nan"):
        assert_outputs_agree(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))
    assert_outputs_agree(torch.tensor([float("nan"), float("inf")]),
                         torch.tensor([float("nan"), float("inf")]), atol=0, rtol=0)


def test_assert_modules_agree_clones_inputs():
    class InPlace(nn.Module):
        def forward(self, x):
            return x.mul_(2)

    x = torch.ones(3)
    assert_modules_agree(InPlace(), InPlace(), x, atol=0, rtol=0)
    assert torch.equal(x, torch.ones(3))


def test_max_abs_diff():
    assert max_abs_diff(torch.zeros(3), torch.tensor([0.0, -2.0, 1.0])) == 2.0
    assert max_abs_diff((torch.ones(2), {"a": torch.zeros(1)}),
                        (torch.ones(2), {"a": torch.full((1,), 0.25)})) == 0.25
    assert max_abs_diff(torch.tensor([float("nan")]), torch.tensor([float("nan")])) == 0.0
    assert math.isinf(max_abs_diff(torch.tensor([float("nan")]), torch.tensor([0.0])))
    assert max_abs_diff(torch.zeros(0), torch.zeros(0)) == 0.0
    assert max_abs_diff(torch.tensor([1, 5]), torch.tensor([1, 2])) == 3.0
    with pytest.raises(ValueError, match="shape"):
        max_abs_diff(torch.zeros(2), torch.zeros(3))


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def test_digits_tensors():
    x_train, y_train, x_test, y_test = load_digits_tensors(seed=0)
    assert x_train.shape == (1347, 1, 8, 8) and x_test.shape == (450, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert y_train.shape == (1347,) and y_test.shape == (450,)
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1) < 1e-4
    assert set(y_train.tolist()) == set(range(10)) == set(y_test.tolist())
    again = load_digits_tensors(seed=0)
    assert torch.equal(again[0], x_train) and torch.equal(again[3], y_test)
    other = load_digits_tensors(seed=1, test_fraction=0.5)
    assert other[0].shape[0] + other[2].shape[0] == 1797
    assert other[2].shape[0] in (898, 899)


def test_digits_loaders():
    train, test = digits_loaders(batch_size=32, seed=0)
    x, y = next(iter(train))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    assert sum(len(b[1]) for b in test) == 450
    first = next(iter(digits_loaders(batch_size=32, seed=0)[0]))[1]
    assert torch.equal(first, y), "shuffling is reproducible given the seed"


def test_evaluate_accuracy_bounds_and_mode():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(10))

        def forward(self, x):
            return self.w.expand(x.shape[0], 10) + torch.nn.functional.one_hot(
                torch.zeros(x.shape[0], dtype=torch.long), 10)

    _, test = digits_loaders()
    m = Constant().train()
    acc = evaluate_accuracy(m, test)
    assert m.training
    assert 0.05 < acc < 0.15  # always predicts 0: one class of ten


def test_trained_digits_cnn_accuracy():
    model = train_digits_cnn()  # cached in $FXCOMPRESS_CACHE or ~/.cache/fxcompress
    assert not model.training
    _, test = digits_loaders()
    assert evaluate_accuracy(model, test) >= 0.95  # 0.984-0.996 over train seeds 0-4 (docs/testing.md)


def test_digits_cnn_cache_round_trip(tmp_path, monkeypatch):
    m1 = train_digits_cnn(epochs=1, cache_dir=tmp_path)
    files = list(tmp_path.glob("digits_cnn_*.pt"))
    assert len(files) == 1
    assert not list(tmp_path.glob("*.tmp"))

    def no_training(*args, **kwargs):
        raise AssertionError("should have loaded from the cache")

    monkeypatch.setattr(kit_data, "_train", no_training)
    m2 = train_digits_cnn(epochs=1, cache_dir=tmp_path)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    monkeypatch.undo()
    # different hyperparameters -> different file; training is deterministic
    m3 = train_digits_cnn(epochs=1, cache_dir=tmp_path, use_cache=False)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m3.state_dict()[k]), k
    monkeypatch.setenv("FXCOMPRESS_CACHE", str(tmp_path / "env"))
    assert kit_data.default_cache_dir() == tmp_path / "env"


def test_kit_imports_without_hypothesis(monkeypatch):
    """The kit (all but strategies) imports with hypothesis absent, and without
    importing sklearn until data is loaded.  Fresh copies of the kit's modules are
    imported; monkeypatch puts the originals back afterwards."""
    import importlib

    for name in list(sys.modules):
        if name.startswith("fxcompress.testing") or name.split(".")[0] in ("hypothesis",
                                                                           "sklearn"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # makes `import hypothesis` fail
    import fxcompress

    monkeypatch.delattr(fxcompress, "testing", raising=False)
    kit = importlib.import_module("fxcompress.testing")
    importlib.import_module("fxcompress.testing.models")
    assert "sklearn" not in sys.modules
    kit.ARCHITECTURES["mlp"]()
    with pytest.raises(ImportError):
        kit.strategies


def test_kit_imports_nothing_else_from_fxcompress():
    import ast
    import pathlib

    import fxcompress.testing as kit

    root = pathlib.Path(kit.__file__).parent
    paths = sorted(root.rglob("*.py"))
    assert root / "strategies" / "__init__.py" in paths
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mods = [node.module or ""] if node.level == 0 else []
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for mod in mods:
                assert not mod.startswith("fxcompress"), (path.name, mod)
                if mod.startswith("hypothesis"):  # only the strategies package needs hypothesis
                    assert path.parent.name == "strategies", path.name
