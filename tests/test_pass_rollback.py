"""A failing pass leaves nothing modified (docs/design.md, "Passes"): not the user's model (parameter
and buffer values, modules, hooks, attributes), not the GraphModule it was given, and
``compile_for_compression`` returns nothing. A pass that writes into shared tensors in place is
refused even when it succeeds."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fxcompress import ConfigError, PassError, compile_for_compression, trace
from fxcompress.pass_manager import Pass, PassContext, PassManager, PassResult
from fxcompress.passes import Quantize
from fxcompress.testing import (ResNetTiny, assert_modules_agree, assert_state_unchanged, module_structure,
                                state_snapshot)

QUICK = {"range": {"num_init_samples": 8}, "batchnorm_adaptation": {"num_bn_adaptation_samples": 0}}


class Sabotage(Pass):
    """A user pass that changes everything it can reach in ``gm``, then fails."""
    name = "sabotage"

    def __init__(self, fail: bool = True):
        self.fail = fail

    def call(self, gm, ctx):
        with torch.no_grad():
            gm.conv1.weight.mul_(2)                                   # in place, bumps the version counter
            gm.layer1.conv1.weight.data.zero_()                    # through .data: no version bump
            gm.get_submodule("layer2.downsample.1").bias.data = torch.randn(16)   # storage swapped
            gm.bn1.running_mean.add_(1)                               # buffers
            gm.layer1.bn1.running_var.data.fill_(7)
            gm.bn1.num_batches_tracked += 5
            if hasattr(gm, "conv1_weight_quantizer"):
                gm.conv1_weight_quantizer.scale.add_(1)               # a tensor the previous pass created
        gm.fc.bias.requires_grad_(False)
        gm.fc.weight.grad = torch.ones_like(gm.fc.weight)
        gm.fc.weight = nn.Parameter(torch.zeros_like(gm.fc.weight))   # a parameter replaced
        gm.conv1.register_forward_hook(lambda m, i, o: o * 0)
        gm.layer1.register_forward_pre_hook(lambda m, i: None)
        gm.bn1._register_state_dict_hook(lambda *a: None)
        gm.conv1.padding = (5, 5)                                     # attributes set
        gm.bn1.momentum = 0.9
        gm.layer1.marker = "sabotaged"
        gm.eval()                                                     # the training flag of every module
        del gm.layer3.conv2                                        # a submodule removed, another added
        gm.add_module("intruder", nn.Linear(2, 2))
        node = next(n for n in gm.graph.nodes if n.op == "call_module")
        with gm.graph.inserting_after(node):
            extra = gm.graph.call_function(torch.neg, (node,))
        node.replace_all_uses_with(extra, delete_user_cb=lambda user: user is not extra)
        gm.recompile()
        if self.fail:
            raise RuntimeError("sabotage complete")
        return PassResult(gm, True)


@pytest.fixture
def model():
    return ResNetTiny().train()


def test_failed_compile_leaves_the_users_model_bitwise_as_it_was(model):
    x = model.example_input()
    values, structure = state_snapshot(model), module_structure(model)
    grads = {k: p.grad for k, p in model.named_parameters()}
    result = None
    with pytest.raises(PassError, match="pass 'sabotage' failed and was rolled back.*sabotage complete"):
        result = compile_for_compression(model, [Quantize(bits=8, initializer=QUICK), Sabotage()], (x,))
    assert result is None  # no half-built GraphModule or controller
    assert_state_unchanged(values, model)
    assert module_structure(model) == structure  # same modules, attributes, hooks, tensor objects
    assert {k: p.grad for k, p in model.named_parameters()} == grads
    assert all(m.training for m in model.modules())
    reference = ResNetTiny().train()
    assert_modules_agree(reference, model, (x,), atol=0.0, rtol=0.0)


def test_failed_pass_restores_the_graph_module_it_was_given(model):
    x = model.example_input()
    gm = trace(model, (x,))
    manager = PassManager([Quantize(bits=8, initializer=QUICK)])
    manager.run(gm)
    values, structure, code = state_snapshot(gm), module_structure(gm), gm.code
    with torch.no_grad():
        expected = gm.eval()(x)
    gm.train()
    with pytest.raises(PassError, match="sabotage"):
        manager.run_one(Sabotage(), gm, PassContext.for_graph(gm))
    assert gm.code == code
    assert_state_unchanged(values, gm)
    assert module_structure(gm) == structure
    assert all(m.training for m in gm.modules())
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), expected)
    assert [r.name for r in manager.records] == ["quantization"]  # the failed pass left no record


def test_a_pass_that_writes_shared_tensors_in_place_is_refused_and_rolled_back(model):
    x = model.example_input()
    values, structure = state_snapshot(model), module_structure(model)
    with pytest.raises(PassError, match=r"pass 'sabotage' wrote into 8 of the model's parameter or buffer tensors "
                                        r"in place \(conv1.weight, bn1.running_mean, bn1.num_batches_tracked, "
                                        r"layer1.conv1.weight, layer1.bn1.running_var, ...\).*create new tensors"):
        compile_for_compression(model, [Sabotage(fail=False)], (x,))
    assert_state_unchanged(values, model)
    assert module_structure(model) == structure


def test_an_fxcompress_error_keeps_its_type_and_names_the_pass(model):
    class BadScope(Pass):
        name = "bad_scope"

        def call(self, gm, ctx):
            with torch.no_grad():
                gm.conv1.weight.zero_()
            raise ConfigError("bad_scope.ignored_scopes: 'nowhere' matches no module", path="ignored_scopes")

    values = state_snapshot(model)
    with pytest.raises(ConfigError, match="matches no module") as info:
        compile_for_compression(model, [BadScope()], (model.example_input(),))
    assert_state_unchanged(values, model)
    if hasattr(info.value, "__notes__"):  # Python >= 3.11
        assert "raised by pass 'bad_scope', which was rolled back" in info.value.__notes__[0]


def test_compiling_does_not_share_hooks_with_the_users_model(model):
    """The GraphModule's modules are copies: hooks registered on them stay off the user's modules."""
    x = model.example_input()
    ctrl, gm = compile_for_compression(model, [], (x,))
    gm.conv1.register_forward_hook(lambda m, i, o: o * 0)
    assert not model.conv1._forward_hooks
    assert gm.conv1.weight is model.conv1.weight  # tensors stay shared, as documented


def test_a_pass_may_change_tensors_an_earlier_pass_created(model):
    """Only the model's own tensors are off limits: MixedPrecision re-ranges Quantize's quantizers in place."""
    class Rescale(Pass):
        name = "rescale"

        def call(self, gm, ctx):
            with torch.no_grad():
                gm.conv1_weight_quantizer.scale.mul_(2)
            return PassResult(gm, True)

    values = state_snapshot(model)
    ctrl, gm = compile_for_compression(model, [Quantize(bits=8, initializer=QUICK), Rescale()],
                                       (model.example_input(),))
    _, reference = compile_for_compression(model, [Quantize(bits=8, initializer=QUICK)], (model.example_input(),))
    assert torch.equal(gm.conv1_weight_quantizer.scale, 2 * reference.conv1_weight_quantizer.scale)
    assert_state_unchanged(values, model)
