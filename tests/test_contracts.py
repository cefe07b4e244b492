"""The promises of the README and of docs/design.md ("Public API", "API details"), one test each,
through the public API only, so a change that breaks one is caught at once.

A promise that does not hold yet and is another issue's work is marked
``xfail(strict=True, reason="issue N: ...")``: it flips to a failure (and must be unmarked)
the moment it holds. Small models only: the module runs in seconds.
"""
from __future__ import annotations

import copy
import io
import pickle
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress import (CheckpointError, Config, ConfigError, ScopeError, TraceError, compile_for_compression,
                        load_state, trace)
from fxcompress.errors import InputShapeError
from fxcompress.passes import (Binarization, ConstSparsity, FilterPruning, MagnitudeSparsity, MixedPrecision,
                               Quantize, RBSparsity)
from fxcompress.testing import (DigitsCNN, ResNetTiny, assert_modules_agree, assert_state_unchanged,
                                module_structure, state_snapshot)

X = DigitsCNN(seed=0).example_input(batch=4)
# quick initialization: a few range-init samples
QUICK = {"range": {"num_init_samples": 8}}
ALL_PASSES = [Quantize, MixedPrecision, Binarization, MagnitudeSparsity, RBSparsity, ConstSparsity, FilterPruning]


def batches(n=2, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def digits(*passes, copy_model=False, model=None):
    model = model if model is not None else DigitsCNN(seed=0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schedule hints are not what these tests are about
        return compile_for_compression(model, list(passes), example_inputs=(X,), copy=copy_model)


# -- the compiled model ---------------------------------------------------------------------------------

def test_gm_is_a_graph_module_that_trains():
    ctrl, gm = digits(MagnitudeSparsity(sparsity_init=0.5), Quantize(bits=8, initializer=QUICK), copy_model=True)
    ctrl.initialize(batches())
    assert isinstance(gm, torch.fx.GraphModule)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    x, y = batches(1, batch=32, seed=7)[0]
    gm.train()
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(gm(x), y) + ctrl.loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ctrl.scheduler.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert gm.conv1_weight_quantizer.scale.grad is not None  # compression parameters train too


def test_gm_pickles_deep_copies_and_saves_computing_the_same():
    ctrl, gm = digits(Quantize(bits=8, initializer=QUICK))
    ctrl.initialize(batches())
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    for restored in (pickle.loads(pickle.dumps(gm)), copy.deepcopy(gm), torch.load(buffer, weights_only=False)):
        assert restored.code == gm.code
        assert_modules_agree(gm, restored, (X,), atol=0.0, rtol=0.0)


def test_gm_code_reads_like_hand_written_code_with_meaningful_names():
    model = ResNetTiny().eval()
    ctrl, gm = compile_for_compression(model, [MagnitudeSparsity(), Quantize(bits=8)], (model.example_input(),))
    code = gm.code
    for name in ("conv1_weight_mask", "conv1_weight_quantizer", "layer1_add_input_quantizer",
                 "layer1_conv1 = ", "layer2_downsample_0"):
        assert name in code, name
    assert not re.search(r"\b(_tensor_constant|getattr_|submod_)\d", code)  # no anonymous machinery
    # every inserted module is named after the value it acts on: <node or module path>_<role>
    nodes = {n.name for n in trace(model, (model.example_input(),)).graph.nodes}
    paths = {p.replace(".", "_") for p, _ in model.named_modules() if p}
    inserted = [n for n, _ in gm.named_children() if n.endswith(("_quantizer", "_mask"))]
    assert len(inserted) == 29
    for name in inserted:
        prefix = re.fullmatch(r"(\w+?)_(weight|input|output)_(quantizer|mask)", name).group(1)
        assert prefix in nodes or any(prefix.startswith(p + "_") and prefix[len(p) + 1:] in nodes
                                      for p in paths), name


def test_gm_shares_parameters_with_the_model_unless_copy_is_true():
    model = DigitsCNN(seed=0).eval()
    _, shared = digits(Quantize(bits=8), model=model)
    _, copied = digits(Quantize(bits=8), model=model, copy_model=True)
    assert shared.conv1.weight is model.conv1.weight
    assert copied.conv1.weight is not model.conv1.weight and torch.equal(copied.conv1.weight, model.conv1.weight)


def test_debug_mode_checks_outputs_after_every_pass():
    ctrl, gm = compile_for_compression(DigitsCNN(seed=0).eval(), [MagnitudeSparsity(sparsity_init=0.0)],
                                       example_inputs=(X,), debug=True)
    assert [r.name for r in ctrl.records] == ["magnitude_sparsity"]


def test_every_pass_is_inspectable_summary_and_diff():
    ctrl, gm = digits(MagnitudeSparsity(), Quantize(bits=8))
    summary = ctrl.summary()
    assert "magnitude_sparsity" in summary and "quantization" in summary
    diff = ctrl.diff()
    assert "### magnitude_sparsity" in diff and "+    conv1_weight_mask = self.conv1_weight_mask(" in diff


# -- the controller ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: [Quantize(bits=8)], lambda: [Quantize(bits=8), MixedPrecision()], lambda: [Binarization()],
    lambda: [MagnitudeSparsity()], lambda: [RBSparsity()], lambda: [ConstSparsity()],
    lambda: [FilterPruning()]], ids=["quantization", "mixed_precision", "binarization", "magnitude", "rb",
                                      "const", "filter_pruning"])
def test_every_controller_part_offers_the_controller_interface(make):
    ctrl, gm = digits(*make())
    part = ctrl.parts[-1]
    for method in ("initialize", "loss", "statistics", "state_dict", "load_state_dict"):
        assert callable(getattr(part, method)), method
    assert callable(part.scheduler.step) and callable(part.scheduler.epoch_step)
    assert torch.is_tensor(ctrl.loss()) or isinstance(ctrl.loss(), float)
    section = ctrl.statistics().to_dict()[part.algorithm]
    assert "layers" in section and "skipped" in section
    ctrl.load_state_dict(ctrl.state_dict())


def test_statistics_hold_the_current_level_and_its_target():
    ctrl, gm = digits(MagnitudeSparsity(sparsity_init=0.1, sparsity_target=0.5, sparsity_target_epoch=2),
                      FilterPruning(pruning_init=0.1, pruning_target=0.4, pruning_steps=2))
    stats = ctrl.statistics().to_dict()
    assert set(stats) == {"magnitude_sparsity", "filter_pruning"}
    for algorithm, section in stats.items():
        levels = {k: v for k, v in section.items() if isinstance(v, float)}
        assert any("target" in k for k in levels), (algorithm, sorted(section))
    text = str(ctrl.statistics())
    assert "magnitude_sparsity" in text and "filter_pruning" in text


# -- arguments, scopes and configs ---------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ALL_PASSES, ids=lambda c: c.__name__)
def test_unknown_keyword_arguments_are_errors(cls):
    with pytest.raises(ConfigError, match=r"unknown key 'ignored_scope' \(did you mean 'ignored_scopes'\?\)"):
        cls(ignored_scope=["fc"])


def test_pass_arguments_mirror_the_json_names():
    _, from_python = digits(Quantize(bits=8, preset="mixed", ignored_scopes=["fc"]))
    _, from_config = compile_for_compression(DigitsCNN(seed=0).eval(), {
        "input_info": {"sample_size": [4, 1, 8, 8]},
        "compression": {"algorithm": "quantization", "bits": 8, "preset": "mixed", "ignored_scopes": ["fc"]}},
        example_inputs=(X,))
    assert from_python.code == from_config.code
    assert_state_unchanged(state_snapshot(from_python), from_config)


def test_a_scope_that_matches_nothing_is_an_error_naming_it():
    with pytest.raises(ScopeError, match="'conv9'"):
        digits(Quantize(bits=8, ignored_scopes=["conv9"]))


def test_scopes_are_module_paths_globs_or_regular_expressions():
    def quantized(**scopes):
        ctrl, gm = digits(Quantize(bits=8, **scopes))
        return sorted(n[:-len("_weight_quantizer")] for n, _ in gm.named_children() if n.endswith("_weight_quantizer"))

    assert quantized(ignored_scopes=["conv2"]) == ["conv1", "conv3", "fc"]
    assert quantized(ignored_scopes=["conv*"]) == ["fc"]
    assert quantized(ignored_scopes=["{re}conv[12]"]) == ["conv3", "fc"]


def test_config_top_level_keys_it_does_not_use_are_kept_and_ignored():
    config = Config.from_dict({"model": "resnet18", "epochs": 3, "optimizer": {"type": "sgd"},
                               "input_info": {"sample_size": [1, 1, 8, 8]},
                               "compression": {"algorithm": "quantization"}})
    assert config.data["model"] == "resnet18" and [p.name for p in config.passes] == ["quantization"]


def test_config_near_miss_of_a_known_key_is_an_error_with_a_did_you_mean():
    with pytest.raises(ConfigError, match="did you mean 'compression'"):
        Config.from_dict({"compresion": {"algorithm": "quantization"}})
    with pytest.raises(ConfigError, match=r"compression: unknown key 'bit' \(did you mean 'bits'\?\)") as info:
        Config.from_dict({"compression": {"algorithm": "quantization", "bit": 8}})
    assert info.value.path.startswith("compression")


def test_config_that_compresses_nothing_says_so():
    with pytest.raises(ConfigError, match="compresses nothing"):
        Config.from_dict({"input_info": {"sample_size": [1, 1, 8, 8]}})


def test_config_errors_name_the_field_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"compression\.sparsity_target: 1\.5 is greater than "
                                          r"(or equal to )?the maximum") as info:
        Config.from_dict({"compression": {"algorithm": "magnitude_sparsity", "sparsity_target": 1.5}})
    assert info.value.path == "compression.sparsity_target"


# -- initialize -------------------------------------------------------------------------------------------------

class KeywordDigits(nn.Module):
    """DigitsCNN taking its input by keyword, as a Hugging Face model takes ``input_ids``."""

    def __init__(self):
        super().__init__()
        self.net = DigitsCNN(seed=0)

    def forward(self, pixels):
        return self.net(pixels)


def test_initialize_accepts_every_documented_batch_form():
    data = [x for x, _ in batches(2, batch=4)]

    def calibrated(loader, model=None, **kw):
        ctrl, gm = compile_for_compression(model or DigitsCNN(seed=0).eval(), [Quantize(bits=8, initializer=QUICK)],
                                           example_inputs=({"pixels": X} if model else (X,)))
        ctrl.initialize(loader, **kw)
        return {k: v for k, v in gm.state_dict().items() if "quantizer" in k}

    reference = calibrated(data)  # tensors
    forms = {
        "(input, target)": calibrated([(x, torch.zeros(4, dtype=torch.long)) for x in data]),
        "[input, target]": calibrated([[x, torch.zeros(4, dtype=torch.long)] for x in data]),
        "((input,), target)": calibrated([((x,), 0) for x in data]),
        "input_fn": calibrated([{"image": x} for x in data], input_fn=lambda batch: batch["image"]),
        "DataLoader": calibrated(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(data)),
                                                             batch_size=4)),
    }
    forms["dict of keyword inputs"] = calibrated([{"pixels": x, "labels": torch.zeros(4)} for x in data],
                                                 model=KeywordDigits().eval())
    for form, state in forms.items():  # the same quantizers in the same order (names follow the input's)
        assert len(state) == len(reference), form
        for (key, value), expected in zip(state.items(), reference.values()):
            assert torch.equal(value, expected), (form, key)


# -- checkpoints ----------------------------------------------------------------------------------------------------

def _trained_pipeline():
    ctrl, gm = digits(MagnitudeSparsity(sparsity_init=0.2, sparsity_target=0.5, sparsity_target_epoch=2),
                      Quantize(bits=8, initializer=QUICK), copy_model=True)
    ctrl.initialize(batches())
    ctrl.scheduler.step()
    ctrl.scheduler.epoch_step()
    return ctrl, gm


def test_load_state_strips_the_module_prefix_of_ddp():
    ctrl, gm = _trained_pipeline()
    _, fresh = digits(MagnitudeSparsity(sparsity_init=0.2), Quantize(bits=8, initializer=QUICK), copy_model=True)
    load_state(fresh, {f"module.{k}": v for k, v in gm.state_dict().items()})
    assert_state_unchanged(state_snapshot(gm), fresh)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_state(fresh, {k: v for k, v in gm.state_dict().items() if "quantizer" not in k})


def test_checkpoints_load_with_weights_only():
    ctrl, gm = _trained_pipeline()
    files = {}
    for name, state in (("gm", gm.state_dict()), ("ctrl", ctrl.state_dict())):
        files[name] = io.BytesIO()
        torch.save(state, files[name])
        files[name].seek(0)
    ctrl2, gm2 = digits(MagnitudeSparsity(sparsity_init=0.2, sparsity_target=0.5, sparsity_target_epoch=2),
                        Quantize(bits=8, initializer=QUICK), copy_model=True)
    load_state(gm2, torch.load(files["gm"], weights_only=True))
    ctrl2.load_state_dict(torch.load(files["ctrl"], weights_only=True))
    assert_modules_agree(gm, gm2, (X,), atol=0.0, rtol=0.0)
    assert ctrl2.scheduler.current_epoch == ctrl.scheduler.current_epoch == 1


def test_statistics_are_identical_after_a_checkpoint_round_trip():
    model = DigitsCNN(seed=0).eval()
    passes = lambda: [MagnitudeSparsity(sparsity_init=0.2, sparsity_target=0.5, sparsity_target_epoch=2),  # noqa: E731
                      Quantize(bits=8, initializer={"range": {"num_init_samples": 8},
                                                    "batchnorm_adaptation": {"num_bn_adaptation_samples": 8}})]
    ctrl, gm = digits(*passes(), model=model, copy_model=True)
    ctrl.initialize(batches())
    ctrl.scheduler.epoch_step()
    ctrl2, gm2 = digits(*passes(), model=model, copy_model=True)
    load_state(gm2, gm.state_dict())
    ctrl2.load_state_dict(ctrl.state_dict())
    assert str(ctrl2.statistics()) == str(ctrl.statistics())


# -- the user's model is never mutated --------------------------------------------------------------------------------

def test_the_users_model_is_never_mutated_by_compile_initialize_export_or_strip(tmp_path):
    model = DigitsCNN(seed=0).eval()
    values, structure = state_snapshot(model), module_structure(model)
    adapt = {"batchnorm_adaptation": {"num_bn_adaptation_samples": 8}}
    ctrl, gm = compile_for_compression(model, [MagnitudeSparsity(sparsity_init=0.5, initializer=adapt),
                                               FilterPruning(pruning_init=0.3),
                                               Quantize(bits=8, initializer={"range": {"num_init_samples": 8},
                                                                             "batchnorm_adaptation": {
                                                                                 "num_bn_adaptation_samples": 8}})],
                                       example_inputs=(X,))
    ctrl.initialize(batches())
    ctrl.export_onnx(str(tmp_path / "model.onnx"))
    ctrl.strip()
    assert_state_unchanged(values, model)
    assert module_structure(model) == structure


def test_a_failed_compile_leaves_the_model_untouched_and_returns_nothing():
    class Failing:
        name = "failing"

        def __call__(self, gm, ctx):
            with torch.no_grad():
                gm.conv1.weight.mul_(3)
            gm.conv1.register_forward_hook(lambda *a: None)
            raise RuntimeError("boom")

    model = DigitsCNN(seed=0).eval()
    values, structure = state_snapshot(model), module_structure(model)
    result = None
    with pytest.raises(Exception, match="pass 'failing' failed and was rolled back"):
        result = compile_for_compression(model, [Quantize(bits=8), Failing()], example_inputs=(X,))
    assert result is None
    assert_state_unchanged(values, model)
    assert module_structure(model) == structure


def test_a_pass_with_nothing_to_do_warns_and_changes_nothing():
    model = nn.Sequential(nn.ReLU(), nn.Flatten()).eval()
    x = torch.randn(2, 3, 4)
    plain = trace(model, (x,))
    for make, match in ((lambda: Quantize(bits=8), "nothing to quantize"),
                        (lambda: FilterPruning(), "nothing to prune")):
        with pytest.warns(UserWarning, match=match):
            ctrl, gm = compile_for_compression(model, [make()], example_inputs=(x,))
        assert gm.code == plain.code
        assert not list(gm.parameters()) and not list(gm.buffers())
        (section,) = ctrl.statistics().to_dict().values()
        assert "skipped" in section


# -- tracing --------------------------------------------------------------------------------------------------------

class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:
            return x
        return -x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_an_untraceable_module_is_named_with_the_source_line_and_the_fix():
    with pytest.raises(TraceError, match=r"cannot trace module 'gate' \(Gate\): data-dependent Python control flow"
                                         r"(.|\n)*test_contracts.py:\d+: if x.mean\(\) > 0:(.|\n)*leaf_modules="):
        trace(Gated(), (X,))


def test_leaf_modules_are_taken_by_trace_and_compile_alike():
    for leaves in ([Gate], ["gate"]):
        assert any(n.target == "gate" for n in trace(Gated(), (X,), leaf_modules=leaves).graph.nodes)
        ctrl, gm = compile_for_compression(Gated(), [Quantize(bits=8)], (X,), leaf_modules=leaves)
        assert "self.gate(" in gm.code and "conv_weight_quantizer" in gm.code


def test_example_inputs_that_do_not_fit_are_an_error_naming_the_argument_and_the_module():
    with pytest.raises(TraceError, match=r"example_inputs \[4, 2, 8, 8\] does not fit the model: module `conv1` "
                                         r"\(Conv2d\) expects 1 input channels, got 2"):
        compile_for_compression(DigitsCNN(seed=0), [Quantize(bits=8)], example_inputs=(torch.randn(4, 2, 8, 8),))


# -- promises owned by other issues ------------------------------------------------------------------------------------

def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _text_inputs(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # a padded sequence
    return {"input_ids": torch.randint(0, 64, (batch, length), generator=g), "attention_mask": mask}


def test_a_compiled_transformer_runs_at_any_batch_size_and_sequence_length():
    model = _tiny_bert()
    ctrl, gm = compile_for_compression(model, [Quantize(bits=8)], example_inputs=_text_inputs(2, 8))
    ctrl.initialize([_text_inputs(2, 8), _text_inputs(4, 16, seed=2)])  # calibration batches of other shapes
    _, plain = compile_for_compression(model, [], example_inputs=_text_inputs(2, 8))
    for batch, length in [(3, 12), (1, 32), (4, 5)]:
        inputs = _text_inputs(batch, length, seed=1)
        with torch.no_grad():
            expected = model(**inputs)["last_hidden_state"]
            assert torch.equal(plain(**inputs)["last_hidden_state"], expected)
        out = gm(**inputs)["last_hidden_state"]
        assert out.shape == (batch, length, 16)
        cosine = F.cosine_similarity(out.flatten(1), expected.flatten(1))
        assert cosine.min() > 0.95, cosine  # 8-bit everywhere on a random tiny BERT: about 0.99
        out.square().mean().backward()  # and it trains at that shape
        assert gm.embeddings.word_embeddings.weight.grad is not None
    # max_position_embeddings is 32: a longer sequence is an error naming the input and its dimension
    with pytest.raises(InputShapeError, match=r"input_ids\.shape\[1\] .*<= 32") as info:
        gm(**_text_inputs(2, 40))
    assert info.value.inputs == ["input_ids"]


def test_every_export_loads_in_onnx_runtimes_default_session(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _tiny_bert()
    inputs = _text_inputs(2, 8)
    ctrl, gm = compile_for_compression(model, [Quantize(bits=8)], example_inputs=inputs)
    ctrl.initialize([inputs])
    path = str(tmp_path / "bert.onnx")
    ctrl.export_onnx(path)
    ort.InferenceSession(path, providers=["CPUExecutionProvider"])  # default: all graph optimizations


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_transformer_exports_with_dynamic_batch_and_sequence_axes(tmp_path, attention):
    ort = pytest.importorskip("onnxruntime")
    model = _tiny_bert()
    model.config._attn_implementation = attention
    ctrl, gm = compile_for_compression(model, [Quantize(bits=8)], example_inputs=_text_inputs(2, 8))
    assert gm.meta["dynamic_dims"]["input_ids"] == {0: "batch", 1: "sequence"}
    ctrl.initialize([_text_inputs(2, 8), _text_inputs(4, 16, seed=2)])
    path = str(tmp_path / "bert.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to static shapes
        warnings.filterwarnings("ignore", message=".*(deprecated|axis name).*")
        ctrl.export_onnx(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])  # default session
    assert [i.shape for i in session.get_inputs()] == [["batch", "sequence"]] * 2
    for batch, length in [(1, 16), (4, 16), (3, 5), (4, 32)]:
        inputs = _text_inputs(batch, length, seed=3)
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        with torch.no_grad():
            expected = gm(**inputs)["last_hidden_state"]
        # the ONNX runtime rounds ties and accumulates in another order: a few quantization steps at most
        assert got.shape == tuple(expected.shape)
        assert float((torch.from_numpy(got) - expected).abs().max()) < 0.02


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_compiled_gpt2_runs_at_other_batch_sizes_and_sequence_lengths(attention):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = transformers.GPT2Model(config).eval()

    def inputs(batch, length):  # use_cache=False: a flag the traced graph bakes in
        return {**_text_inputs(batch, length), "use_cache": False}

    _, gm = compile_for_compression(model, [], example_inputs=inputs(2, 8))
    for batch, length in [(3, 12), (1, 20)]:
        with torch.no_grad():
            assert torch.equal(gm(**inputs(batch, length))["last_hidden_state"],
                               model(**inputs(batch, length)).last_hidden_state)
