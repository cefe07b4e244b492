"""Pass manager: lint and recompile after each pass, diffs, rollback, debug checks; inspection output."""
import pytest
import torch
from hypothesis import given, settings

from fxcompress import PassError, compile_for_compression, trace
from fxcompress import inspect as fx_inspect
from fxcompress.pass_manager import Pass, PassContext, PassManager
from fxcompress.testing import models as zoo
from fxcompress.testing import strategies
from fxcompress.testing.asserts import assert_modules_agree
from toy_passes import ChangesOutputs, FailingPass, ScaleAfterActivations


def _resnet():
    model, inputs = zoo.ARCHITECTURES["resnet_tiny"]()
    return model.eval(), inputs


def test_passes_run_in_order_with_lint_diff_and_readable_names():
    model, inputs = _resnet()
    gm = trace(model, inputs)
    manager = PassManager([ScaleAfterActivations(), ScaleAfterActivations(init=2.0)])
    results = manager.run(gm)
    assert [r.modified for r in results] == [True, True]
    assert [r.name for r in manager.records] == ["toy_gain", "toy_gain"]
    first = manager.records[0]
    relus = [n for n in trace(model, inputs).graph.nodes if "relu" in n.name]
    assert len(first.changes.inserted) == len(relus) and not first.changes.removed
    assert first.diff.startswith("--- before toy_gain\n+++ after toy_gain")
    added = [line for line in first.diff.splitlines() if line.startswith("+ ")]
    assert any("self.relu_gain(" in line or "_gain(" in line for line in added)
    # The second pass stacks on the first: gains of gains, all uniquely named.
    names = [n for n, _ in gm.named_children() if n.endswith("gain") or "gain_" in n]
    assert len(names) == len(set(names)) == 2 * len(relus)
    gm.graph.lint()
    assert "_gain(" in gm.code


def test_failing_pass_is_rolled_back_completely():
    model, inputs = _resnet()
    gm = trace(model, inputs)
    manager = PassManager([ScaleAfterActivations()])
    manager.run(gm)
    code, modules = gm.code, dict(gm.named_modules())
    state = {k: v for k, v in gm.state_dict().items()}
    with pytest.raises(PassError, match="pass 'failing' failed and was rolled back.*RuntimeError: boom"):
        manager.run_one(FailingPass(), gm, PassContext.for_graph(gm))
    assert gm.code == code
    assert dict(gm.named_modules()).keys() == modules.keys()
    assert all(gm.get_submodule(n) is m for n, m in modules.items())
    assert not hasattr(gm, "half_done") and not any(hasattr(m, "marker") for m in gm.modules())
    assert gm.state_dict().keys() == state.keys()
    assert_modules_agree(model, gm, inputs, atol=0, rtol=0)


def test_failing_pass_in_compile_leaves_user_model_untouched():
    model, inputs = _resnet()
    before = {n: id(m) for n, m in model.named_modules()}
    with pytest.raises(PassError):
        compile_for_compression(model, [ScaleAfterActivations(), FailingPass()], inputs)
    assert {n: id(m) for n, m in model.named_modules()} == before
    assert not any(hasattr(m, "marker") for m in model.modules())


def test_debug_mode_catches_a_pass_that_changes_outputs():
    model, inputs = _resnet()
    gm = trace(model, inputs)
    with pytest.raises(PassError, match="debug check after pass 'changes_outputs': output changed"):
        PassManager([ChangesOutputs()], debug=True).run(gm)
    assert_modules_agree(model, gm, inputs, atol=0, rtol=0)  # rolled back
    # Without debug the same pass goes through.
    PassManager([ChangesOutputs()]).run(gm)
    assert torch.allclose(gm(*inputs), 2 * model(*inputs))


def test_pass_must_return_a_pass_result():
    class Bad(Pass):
        name = "bad"

        def call(self, gm, ctx):
            return gm

    model, inputs = _resnet()
    gm = trace(model, inputs)
    with pytest.raises(PassError, match="pass .bad. returned ResNetTiny, expected a PassResult"):
        PassManager([Bad()]).run(gm)


@settings(deadline=None)
@given(case=strategies.models())
def test_identity_passes_keep_outputs_exactly(case):
    """Disabled/identity rewrites are exact on random graphs, checked by debug mode too."""
    model = case.model.eval()
    ctrl, gm = compile_for_compression(model, [ScaleAfterActivations(init=1.0)], case.example_inputs, debug=True)
    assert_modules_agree(model, gm, case.example_inputs, atol=0, rtol=0)


def test_no_passes_is_exactly_the_model():
    model, inputs = _resnet()
    ctrl, gm = compile_for_compression(model, [], inputs)
    assert_modules_agree(model, gm, inputs, atol=0, rtol=0)
    assert float(ctrl.loss()) == 0.0
    assert ctrl.statistics().to_dict() == {}
    assert ctrl.state_dict() == {}
    assert_modules_agree(model, ctrl.strip(), inputs, atol=0, rtol=0)


def test_inspect_diff_and_changes():
    model, inputs = _resnet()
    before = trace(model, inputs)
    ctrl, after = compile_for_compression(model, [ScaleAfterActivations()], inputs)
    text = fx_inspect.diff(before, after)
    assert text.startswith("--- before\n+++ after")
    assert fx_inspect.diff(before, before) == ""
    changes = fx_inspect.changes(before, after)
    assert changes.inserted and all(": call_module " in c and "gain" in c for c in changes.inserted)
    assert not changes.removed
    assert "toy_gain" in ctrl.summary() and "yes" in ctrl.summary()
    assert ctrl.diff().startswith("### toy_gain\n--- before toy_gain")
