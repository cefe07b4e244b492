"""NNCF-style JSON configs: validation errors name the field; configs and Python passes are interchangeable."""
import json

import pytest
import torch

from fxcompress import Config, ConfigError, ScopeError, compile_for_compression
from fxcompress.testing import models as zoo
from toy_passes import ScaleAfterActivations

BASE = {"input_info": {"sample_size": [2, 3, 32, 32]}, "compression": {"algorithm": "toy_gain", "init": 0.5}}


def _resnet():
    model, inputs = zoo.ARCHITECTURES["resnet_tiny"]()
    return model.eval(), inputs


def test_config_and_python_passes_give_identical_graphs(tmp_path):
    model, inputs = _resnet()
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({**BASE, "model": "resnet", "epochs": 3, "optimizer": {"type": "sgd"}}))
    _, from_json = compile_for_compression(model, Config.from_json(path))
    _, from_python = compile_for_compression(model, [ScaleAfterActivations(init=0.5)], inputs)
    assert from_json.code == from_python.code
    assert from_json.relu_gain.gain.item() == 0.5


def test_input_info_builds_example_inputs():
    config = Config.from_dict({**BASE, "input_info": [{"sample_size": [1, 4], "type": "long", "keyword": "ids"},
                                                      {"sample_size": [1, 4], "keyword": "mask"}]})
    inputs = config.example_inputs()
    assert set(inputs) == {"ids", "mask"} and inputs["ids"].dtype == torch.int64
    assert inputs["mask"].shape == (1, 4)


def test_nested_params_and_top_level_scopes_apply():
    model, _ = _resnet()
    config = Config.from_dict({**BASE, "ignored_scopes": ["layer1"],
                               "compression": [{"algorithm": "toy_gain", "params": {"init": 2.0}}]})
    (p,) = config.passes
    assert p.params["init"] == 2.0 and p.params["ignored_scopes"] == ["layer1"]
    ctrl, gm = compile_for_compression(model, config)
    assert all("layer1" not in n for n in ctrl.parts[0].gains)


@pytest.mark.parametrize("data, path, fragment", [
    ({**BASE, "compresion": []}, "compresion", "did you mean 'compression'"),
    ({**BASE, "compression": {"algorithm": "quantisation_x"}}, "compression.algorithm", "unknown algorithm"),
    ({**BASE, "compression": [{"algorithm": "toy_gain", "inti": 1.0}]}, "compression[0]",
     "unknown key 'inti' (did you mean 'init'?)"),
    ({**BASE, "compression": [{"algorithm": "toy_gain", "init": -1}]}, "compression[0].init",
     "allowed: type number, > 0"),
    ({**BASE, "compression": [{"algorithm": "toy_gain", "params": {"init": "big"}}]}, "compression[0].init",
     "is not of type 'number'"),
    ({**BASE, "input_info": {"sample_size": [1, 0]}}, "input_info", "sample_size"),
    ({**BASE, "target_device": "TPU"}, "target_device", "one of 'CPU'"),
    ({"input_info": BASE["input_info"]}, "compression", "compresses nothing"),
    ({**BASE, "compression": []}, "compression", "compresses nothing"),
])
def test_config_errors_name_the_field(data, path, fragment):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data)
    assert info.value.path == path or str(info.value).startswith(path)
    assert fragment in str(info.value)
    assert str(info.value).startswith(path)


def test_bad_json_file_reports_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"compression": [\n  {"algorithm": "toy_gain" "init": 1}\n]}')  # a comma missing
    with pytest.raises(ConfigError, match=r"not valid JSON at line 2, column 28"):
        Config.from_json(path)


def test_unknown_keyword_argument_of_a_pass_is_an_error():
    with pytest.raises(ConfigError, match=r"ScaleAfterActivations: unknown key 'int' \(did you mean 'init'\?\)"):
        ScaleAfterActivations(int=1.0)


def test_scope_that_matches_nothing_is_an_error_naming_it():
    model, inputs = _resnet()
    with pytest.raises(ScopeError, match=r"ignored_scopes: scope 'layer9' matches no module.*did you mean"):
        compile_for_compression(model, [ScaleAfterActivations(ignored_scopes=["layer9"])], inputs)


def test_nncf_scope_names_and_regex_scopes():
    from fxcompress.scopes import ScopeSet
    scopes = ScopeSet(["ResNet/Sequential[layer1]/BasicBlock[0]/Conv2d[conv1]", "{re}layer2\\.[0-9]+\\.bn.*",
                       "fc*"])
    assert scopes.matches("layer1.0.conv1")
    assert scopes.matches("layer2.1.bn2") and not scopes.matches("layer2.1.conv2")
    assert scopes.matches("fc") and scopes.matches("layer1") is False
    assert ScopeSet(["layer1"]).matches("layer1.0.conv1")  # a scope covers what is inside it
