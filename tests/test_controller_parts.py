"""Controller parts by name: ``ctrl["quantization"]``, ``ctrl.quantization``, ``in``, iteration, clear errors."""
import copy

import pytest

from fxcompress import Config, compile_for_compression
from fxcompress.config import algorithm_registry
from fxcompress.passes import (Binarization, ConstSparsity, FilterPruning, MagnitudeSparsity, Quantize,
                               RBSparsity)
from fxcompress.testing import models as zoo
from toy_passes import ScaleAfterActivations

ALGORITHMS = [Quantize, MagnitudeSparsity, RBSparsity, ConstSparsity, FilterPruning, Binarization]


@pytest.mark.parametrize("cls", ALGORITHMS, ids=lambda c: c.algorithm)
def test_each_part_is_named_as_its_algorithm_in_configs(cls):
    model, inputs = zoo.ARCHITECTURES["resnet_tiny"]()
    ctrl, _ = compile_for_compression(model, [cls()], inputs)
    name = cls.algorithm
    assert algorithm_registry()[name] is cls  # the name a JSON config uses
    assert list(ctrl) == [name] and name in ctrl
    assert ctrl[name] is ctrl.parts[0] and getattr(ctrl, name) is ctrl.parts[0]
    assert ctrl[name].algorithm == name


def test_parts_of_a_config_pipeline_by_name_in_pass_order():
    config = {"input_info": {"sample_size": [2, 3, 32, 32]}, "compression": [
        {"algorithm": "magnitude_sparsity", "sparsity_target": 0.5},
        {"algorithm": "filter_pruning", "pruning_target": 0.3},
        {"algorithm": "quantization",
         "initializer": {"precision": {"type": "manual", "bitwidth_per_scope": [[4, "layer1.conv1"]]}}},
    ]}
    model, _ = zoo.ARCHITECTURES["resnet_tiny"]()
    ctrl, _ = compile_for_compression(model, Config.from_dict(config))
    names = ["magnitude_sparsity", "filter_pruning", "quantization", "mixed_precision"]
    assert list(ctrl) == ctrl.keys() == names
    assert [name for name, _ in ctrl.items()] == names
    assert [part for _, part in ctrl.items()] == ctrl.parts
    # one naming everywhere: parts, checkpoints, statistics
    assert list(ctrl.state_dict()) == names
    assert list(ctrl.statistics().to_dict()) == names
    assert ctrl.mixed_precision is ctrl.parts[3] and ctrl["filter_pruning"] is ctrl.parts[1]
    assert type(ctrl.quantization).__name__ == "QuantizationController"
    assert ctrl.quantization.weight_quantizers  # the part's own API, reached by name
    assert ctrl.mixed_precision.manual_assignments == {"layer1_conv1_weight_quantizer": 4}
    assert "binarization" not in ctrl and 3 not in ctrl
    assert {"quantization", "mixed_precision"} <= set(dir(ctrl))


def test_unknown_part_errors_list_the_parts():
    model, inputs = zoo.ARCHITECTURES["resnet_tiny"]()
    ctrl, _ = compile_for_compression(model, [MagnitudeSparsity(), Quantize()], inputs)
    with pytest.raises(KeyError, match="no part 'pruning'; its parts: 'magnitude_sparsity', 'quantization'"):
        ctrl["pruning"]
    with pytest.raises(AttributeError, match="has no attribute 'binarization' and no part of that name; "
                                             "its parts: 'magnitude_sparsity', 'quantization'"):
        ctrl.binarization
    assert not hasattr(ctrl, "filter_pruning")
    assert getattr(ctrl, "rb_sparsity", None) is None
    empty, _ = compile_for_compression(model, [], inputs)
    assert list(empty) == []
    with pytest.raises(KeyError, match=r"its parts: \(none\)"):
        empty["quantization"]


def test_repeated_algorithm_parts_are_numbered_as_in_checkpoints():
    model, inputs = zoo.ARCHITECTURES["resnet_tiny"]()
    ctrl, _ = compile_for_compression(model, [ScaleAfterActivations(init=0.5), ScaleAfterActivations(init=2.0)],
                                      inputs)
    assert list(ctrl) == ["toy_gain", "toy_gain_1"] == list(ctrl.state_dict())
    assert ctrl.toy_gain is ctrl.parts[0] and ctrl["toy_gain_1"] is ctrl.parts[1]
    assert {float(g.gain.detach()) for g in ctrl.toy_gain_1.gains.values()} == {2.0}


def test_copies_keep_part_access():
    # copy looks up __deepcopy__/__setstate__ on an object whose __dict__ is still empty:
    # part lookup must answer those with a plain AttributeError, not recurse
    model, inputs = zoo.ARCHITECTURES["resnet_tiny"]()
    ctrl, _ = compile_for_compression(model, [ScaleAfterActivations(init=0.5)], inputs)
    shallow = copy.copy(ctrl)
    assert shallow.toy_gain is ctrl.toy_gain
    deep = copy.deepcopy(ctrl)
    assert deep.toy_gain is not ctrl.toy_gain and list(deep) == ["toy_gain"]
