"""Example inputs that do not fit the model: a ``TraceError`` (Python) or ``ConfigError`` (config)
naming the argument or field, the shape given, the first module that refused it and what it expects,
never torch's message about a graph node."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fxcompress import ConfigError, TraceError, compile_for_compression, trace
from fxcompress.errors import InputShapeError
from fxcompress.testing import DigitsCNN, MobileNetV2Tiny

QUANTIZE = {"algorithm": "quantization"}


def test_python_inputs_with_too_few_channels_name_the_conv_and_its_channels():
    x = torch.randn(1, 2, 32, 32)
    with pytest.raises(TraceError) as info:
        compile_for_compression(MobileNetV2Tiny(), [], example_inputs=(x,))
    assert str(info.value) == ("example_inputs [1, 2, 32, 32] does not fit the model: module `features.0.0` "
                               "(Conv2d) expects 3 input channels, got 2")
    assert isinstance(info.value, InputShapeError)
    assert info.value.module_path == "features.0.0" and info.value.inputs == [0]


def test_config_sample_size_with_too_few_channels_is_a_config_error_naming_the_field():
    config = {"input_info": {"sample_size": [1, 2, 32, 32]}, "compression": QUANTIZE}
    with pytest.raises(ConfigError) as info:
        compile_for_compression(MobileNetV2Tiny(), config)
    assert str(info.value) == ("input_info.sample_size [1, 2, 32, 32] does not fit the model: module "
                               "`features.0.0` (Conv2d) expects 3 input channels, got 2")
    assert info.value.path == "input_info.sample_size"


@pytest.mark.parametrize("size", [[1, 8, 8], [3, 32, 32]])
def test_a_3d_size_for_a_2d_conv_net_names_the_missing_batch_dimension(size):
    """torch reads [C, H, W] as one unbatched sample, so the conv passes it and a later layer fails:
    the message still blames the first conv, the one that did not get the 4-D input it expects."""
    model = DigitsCNN() if size[-1] == 8 else MobileNetV2Tiny()
    first, channels = ("conv1", 1) if size[-1] == 8 else ("features.0.0", 3)
    expected = (f"does not fit the model: module `{first}` (Conv2d) expects a 4-D input [N, {channels}, H, W], "
                f"got a 3-D input {size}")
    with pytest.raises(TraceError) as python:
        trace(model, (torch.randn(*size),))
    assert str(python.value) == f"example_inputs {size} {expected}"
    with pytest.raises(ConfigError) as config:
        compile_for_compression(model, {"input_info": [{"sample_size": size}], "compression": QUANTIZE})
    assert str(config.value) == f"input_info[0].sample_size {size} {expected}"
    assert config.value.path == "input_info[0].sample_size"


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(6, 2)

    def forward(self, image, features):
        return self.image(image).mean() + self.fc(features)


def test_of_several_inputs_only_the_ones_reaching_the_refusing_module_are_named():
    good_image, bad_features = torch.randn(1, 3, 8, 8), torch.randn(1, 5)
    with pytest.raises(TraceError) as python:
        trace(TwoInputs(), (good_image, bad_features))
    assert str(python.value) == ("example_inputs[1] [1, 5] does not fit the model: module `fc` (Linear) expects "
                                 "inputs whose last dimension is 6 (in_features), got [1, 5]")
    config = {"input_info": [{"sample_size": [1, 3, 8, 8], "keyword": "image"},
                             {"sample_size": [1, 5], "keyword": "features"}], "compression": QUANTIZE}
    with pytest.raises(ConfigError) as info:
        compile_for_compression(TwoInputs(), config)
    assert str(info.value).startswith("input_info[1].sample_size [1, 5] does not fit the model: module `fc` (Linear)")
    assert info.value.path == "input_info[1].sample_size"


def test_a_shape_specialized_model_names_the_module_and_the_line_that_refused_the_inputs():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TraceError) as info:
        trace(model, {"input_ids": ids + 64})
    assert str(info.value) == ("example_inputs [2, 8] does not fit the model: module `embeddings.word_embeddings` "
                               "(Embedding) expects indices in [0, 64), got values up to "
                               f"{int(ids.max()) + 64}")
    with pytest.raises(TraceError, match=r"example_inputs \[2, 20\] does not fit the model: `Tensor.expand` in module "
                                         r"`embeddings` \(BertEmbeddings\) rejected inputs of shape \[1, 16\]: "
                                         r"The expanded size of the tensor \(20\)"):
        trace(model, {"input_ids": torch.randint(0, 64, (2, 20))})  # longer than max_position_embeddings


def test_inputs_that_fit_still_trace():
    gm = trace(MobileNetV2Tiny(), (torch.randn(1, 3, 32, 32),))
    assert gm.graph.find_nodes(op="call_module", target="features.0.0")[0].meta["shape"] == (1, 8, 16, 16)
