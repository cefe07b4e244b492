"""NNCF 2.x configs run unchanged: scope names in every NNCF form, VPU, bitwidth_per_scope without a
type, JSON with comments, the samples' extra keys, staged quantization (docs/nncf_configs.md)."""
import json

import pytest
import torch

from fxcompress import ConfigError, ScopeError, compile_for_compression
from fxcompress.passes import MagnitudeSparsity, Quantize
from fxcompress.scopes import ScopeIndex, ScopeSet
from fxcompress.testing import models as zoo
from fxcompress.tracing import trace


@pytest.fixture(scope="module")
def resnet():
    model, inputs = zoo.ARCHITECTURES["resnet18_like"]()
    return model, inputs, trace(model, inputs)


@pytest.fixture(scope="module")
def mobilenet():
    model, inputs = zoo.ARCHITECTURES["mobilenet_v2_tiny"]()
    return model, inputs, trace(model, inputs)


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


# -- NNCF names of the traced graph ------------------------------------------------------------

def test_nncf_operation_names_follow_nncf_scope_rules(resnet):
    _, _, gm = resnet
    index = ScopeIndex.of(gm)
    assert index.modules["layer2.0.downsample.0"] == (
        "ResNet/Sequential[layer2]/BasicBlock[0]/Sequential[downsample]/Conv2d[0]",
        "ResNet/Sequential[layer2]/BasicBlock[0]/Sequential[downsample]/NNCFConv2d[0]")
    assert "ResNet/NNCFConv2d[conv1]/conv2d_0" in index.node_ops["conv1"]
    assert "ResNet/NNCFLinear[fc]/linear_0" in index.module_ops["fc"]
    # an in-place ReLU called twice in one block: relu_ with call indices 0 and 1
    assert "ResNet/Sequential[layer1]/BasicBlock[0]/ReLU[relu]/relu__0" in index.node_ops["layer1_0_relu"]
    assert "ResNet/Sequential[layer1]/BasicBlock[0]/ReLU[relu]/relu__1" in index.node_ops["layer1_0_relu_1"]
    # `out += identity`: fx records operator.add; NNCF writes __iadd__ (or __add__ for `a + b`)
    assert {"ResNet/Sequential[layer1]/BasicBlock[0]/__iadd___0",
            "ResNet/Sequential[layer1]/BasicBlock[0]/__add___0"} <= set(index.node_ops["add"])
    assert "ResNet/flatten_0" in index.node_ops["flatten"]


def test_container_classes_come_from_the_model_even_when_never_called():
    model, inputs = zoo.ARCHITECTURES["transformer_encoder_tiny"]()
    index = ScopeIndex.of(trace(model, inputs))
    assert index.modules["layers.0.attention.query"][-1] == (
        "TransformerEncoderTiny/ModuleList[layers]/TransformerEncoderLayerTiny[0]/"
        "MultiHeadSelfAttention[attention]/NNCFLinear[query]")


# -- every scope form ----------------------------------------------------------------------------

RESNET_SCOPES = [
    # (scope, what it must match, what it must not match); strings are module paths, others node names
    ("ResNet/NNCFLinear[fc]", ["fc"], ["conv1", "layer4.1.conv2"]),
    ("ResNet/Linear[fc]", ["fc"], ["conv1"]),
    ("ResNet/NNCFLinear[fc]/linear_0", ["fc"], ["conv1"]),
    ("{re}ResNet/NNCFLinear\\[fc\\]/.*", ["fc"], ["conv1"]),
    ("{re}ResNet/NNCFConv2d\\[conv1\\]", ["conv1"], ["layer1.0.conv1", "fc"]),
    ("{re}ResNet/Sequential\\[layer2\\]/BasicBlock\\[0\\]/Sequential\\[downsample\\]/.*",
     ["layer2.0.downsample.0", "layer2.0.downsample.1"], ["layer2.0.conv1", "layer3.0.downsample.0"]),
    ("ResNet/Sequential[layer1]/BasicBlock[0]/Conv2d[conv1]", ["layer1.0.conv1"], ["layer1.1.conv1"]),
    ("ResNet/Sequential[layer1]/BasicBlock[0]", ["layer1.0.conv1", "layer1.0.bn2", ":add"],
     ["layer1.1.conv1", ":add_1"]),
    ("ResNet/ReLU[relu]/relu__0", ["relu"], ["layer1.0.relu"]),
    ("ResNet/Sequential[layer1]/BasicBlock[0]/ReLU[relu]/relu__1", [":layer1_0_relu_1"], [":layer1_0_relu"]),
    ("ResNet/Sequential[layer1]/BasicBlock[0]/__iadd___0", [":add"], ["layer1.0.conv1", ":add_1", "layer1.0"]),
    ("{re}.*/__iadd___0", [":add", ":add_1"], ["layer1.0.conv1"]),
    # module paths, globs and path regexes keep working
    ("layer1.0.conv1", ["layer1.0.conv1"], ["layer1.1.conv1"]),
    ("layer*.0.downsample", ["layer2.0.downsample.0"], ["layer2.0.conv1"]),
    ("{re}layer[23]\\.1\\.bn.*", ["layer2.1.bn1", "layer3.1.bn2"], ["layer2.0.bn1"]),
]


@pytest.mark.parametrize("scope,matched,unmatched", RESNET_SCOPES, ids=[s[0] for s in RESNET_SCOPES])
def test_every_scope_form_matches_what_nncf_means(resnet, scope, matched, unmatched):
    _, _, gm = resnet
    scopes = ScopeSet([scope]).bind(gm)
    scopes.validate(gm)
    where = lambda item: _node(gm, item[1:]) if item.startswith(":") else item  # noqa: E731
    assert [m for m in matched if not scopes.matches(where(m))] == []
    assert [u for u in unmatched if scopes.matches(where(u))] == []


def test_mobilenet_regex_scope_from_nncf_sample(mobilenet):
    _, _, gm = mobilenet
    # mobilenet_v2_imagenet_rb_sparsity_int8.json writes Conv2dNormActivation; our copy names it ConvBNReLU6
    scopes = ScopeSet(["{re}MobileNetV2Tiny/Sequential\\[features\\]/ConvBNReLU6\\[0\\]/NNCFConv2d\\[0\\]/.*",
                       "MobileNetV2Tiny/Sequential[features]/InvertedResidual[1]/Sequential[conv]/Conv2d[1]/conv2d_0"])
    scopes.validate(gm)
    assert scopes.matches("features.0.0") and scopes.matches("features.1.conv.1")
    assert not scopes.matches("features.1.conv.0.0") and not scopes.matches("features.0.1")


def test_unmatched_nncf_scope_is_an_error_listing_the_nearest_names(resnet):
    _, _, gm = resnet
    with pytest.raises(ScopeError, match=r"ignored_scopes: scope 'ResNet/NNCFLinear\[fc2\]' matches no module or "
                                         r"operation.*did you mean 'ResNet/NNCFLinear\[fc\]'"):
        ScopeSet(["ResNet/NNCFLinear[fc2]"]).validate(gm)
    with pytest.raises(ScopeError, match=r"'\{re\}ResNet/Sequential\\\\\[layer9\\\\\]/.\*' matches no module"):
        ScopeSet(["{re}ResNet/Sequential\\[layer9\\]/.*"]).validate(gm)
    with pytest.raises(ScopeError, match=r"'ResNet/__add___0' matches no module or operation"):
        ScopeSet(["ResNet/__add___0"]).validate(gm)  # the adds live in the blocks, not at the root


def test_operation_scope_removes_exactly_that_operations_input_quantizers(resnet):
    model, inputs, _ = resnet
    _, base = compile_for_compression(model, [Quantize()], inputs)
    _, ignored = compile_for_compression(
        model, [Quantize(ignored_scopes=["ResNet/Sequential[layer1]/BasicBlock[0]/__iadd___0"])], inputs)
    names = lambda gm: {n.target for n in gm.graph.nodes if n.op == "call_module" and "quantizer" in n.target}  # noqa
    assert names(base) - names(ignored) == {"layer1_0_add_input_quantizer"}
    assert names(ignored) < names(base)


def test_module_scopes_in_sparsity_and_weights_group(resnet):
    model, inputs, _ = resnet
    ctrl, gm = compile_for_compression(model, [
        MagnitudeSparsity(sparsity_init=0.5, ignored_scopes=["{re}ResNet/NNCFLinear\\[fc\\]/.*",
                                                             "ResNet/NNCFConv2d[conv1]/conv2d_0"]),
        Quantize(weights={"ignored_scopes": ["{re}.*Sequential\\[downsample\\]/.*"]})], inputs)
    sparse = {row["layer"] for row in ctrl.statistics().to_dict()["magnitude_sparsity"]["layers"]}
    assert "fc" not in sparse and "conv1" not in sparse and "layer1.0.conv1" in sparse
    weight_q = {n.target for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith("weight_quantizer")}
    assert "layer2_0_downsample_0_weight_quantizer" not in weight_q and "layer2_0_conv1_weight_quantizer" in weight_q


# -- VPU and bitwidth_per_scope ---------------------------------------------------------------------

def test_vpu_is_npu_and_takes_no_preset():
    from fxcompress import Config, ConfigError
    base = {"input_info": {"sample_size": [1, 3, 32, 32]}, "target_device": "VPU",
            "compression": {"algorithm": "quantization"}}
    (q,) = Config.from_dict(base).passes
    assert q.params["target_device"] == "NPU" and q.settings.device == "NPU"
    assert Quantize(target_device="VPU").settings.rules == Quantize(target_device="NPU").settings.rules
    with pytest.raises(ConfigError, match=r"compression.preset: target_device 'VPU' takes no preset"):
        Config.from_dict({**base, "compression": {"algorithm": "quantization", "preset": "mixed"}})
    assert Config.from_dict({**base, "target_device": "NPU",
                             "compression": {"algorithm": "quantization", "preset": "mixed"}}).passes


def test_bitwidth_per_scope_without_type_means_manual(resnet):
    from fxcompress import Config
    model, inputs, _ = resnet
    config = Config.from_dict({
        "input_info": {"sample_size": [2, 3, 32, 32]},
        "compression": {"algorithm": "quantization", "overflow_fix": "disable",
                        "initializer": {"precision": {"bitwidth_per_scope": [
            [4, "ResNet/NNCFConv2d[conv1]/conv2d_0|WEIGHT"], [4, "{re}ResNet/NNCFLinear\\[fc\\]/.*|WEIGHT"]]}}}})
    assert config.passes[1].params["type"] == "manual"
    _, gm = compile_for_compression(model, config, inputs)
    bits = {n.target: gm.get_submodule(n.target).spec.bits for n in gm.graph.nodes
            if n.op == "call_module" and n.target.endswith("weight_quantizer")}
    assert bits["conv1_weight_quantizer"] == 4 and bits["fc_weight_quantizer"] == 4
    assert {b for name, b in bits.items() if name not in ("conv1_weight_quantizer", "fc_weight_quantizer")} == {8}


# -- NNCF 2.5's other top-level keys ------------------------------------------------------------------

def test_top_level_keys_apply_as_in_nncf():
    from fxcompress import Config, ConfigError
    base = {"input_info": {"sample_size": [1, 3, 32, 32]}}
    config = Config.from_dict({**base, "target_scopes": ["layer1"], "ignored_scopes": ["fc"],
                               "compression_lr_multiplier": 3.0, "disable_shape_matching": True,
                               "compression": [{"algorithm": "rb_sparsity", "target_scopes": ["layer2"],
                                                "ignored_scopes": ["conv1"]},
                                               {"algorithm": "magnitude_sparsity"}]})
    rb, magnitude = config.passes
    assert rb.params["target_scopes"] == ["layer1"] and rb.params["ignored_scopes"] == ["fc", "conv1"]
    assert rb.params["compression_lr_multiplier"] == 3.0 and "compression_lr_multiplier" not in magnitude.params
    (q,) = Config.from_dict({**base, "compression_lr_multiplier": 3.0, "compression": {"algorithm": "quantization"}}).passes
    assert q.params["compression_lr_multiplier"] == 3.0
    assert Config.from_dict({**base, "compression": {"algorithm": "quantization",
                                                     "weights": {"logarithm_scale": False}}}).passes
    with pytest.raises(ConfigError, match=r"compression.activations.logarithm_scale: NNCF's optimization of "
                                          r"log\(scale\) is not implemented"):
        Config.from_dict({**base, "compression": {"algorithm": "quantization",
                                                  "activations": {"logarithm_scale": True}}})
    with pytest.raises(ConfigError, match=r"initializer.precision.type: NNCF's 'autoq' .* is not supported"):
        Config.from_dict({**base, "compression": {"algorithm": "quantization", "initializer": {
            "precision": {"type": "autoq", "eval_subset_ratio": 0.5, "warmup_iter_number": 2}}}})


# -- JSON as NNCF reads it, and the samples' extra keys ------------------------------------------------

SSD_STYLE = """{
  // NNCF's detection sample keys: read by the sample script, ignored by the compression config
  "model": "ssd_vgg", "batchnorm": true, "num_classes": 21, "dataset": "voc",
  "input_info": {"sample_size": [2, 3, 32, 32],},
  "preprocessing": {"mean": [0.406, 0.456, 0.485], "std": [0.255, 0.224, 0.229], "normalize_coef": 255},
  "ssd_params": {"variance": [0.1, 0.1, 0.2, 0.2], "steps": [8, 16, 32], "flip": true, "top_k": 200},
  "basenet": "vgg16_reducedfc.pth", "weighted_loss": true, "multiprocessing_distributed": true,
  "checkpoint_save_dir": "/tmp/ckpt", "model_params": {"input_size_hw": [368, 480]}, "weighing": "mfb",
  "optimizer": {"type": "Adam", "base_lr": 1e-5, "schedule_type": "multistep", "steps": [2],},
  "epochs": 24, "batch_size": 128, "test_interval": 1, "save_freq": 3,
  /* the compression part */
  "compression": {
    "algorithm": "quantization",
    "initializer": {"range": {"num_init_samples": 4,},},  // trailing commas, as jstyleson allows
  },
}
"""


def test_json_with_comments_trailing_commas_and_sample_keys_loads(tmp_path):
    from fxcompress import Config
    path = tmp_path / "ssd300_vgg_voc_int8.json"
    path.write_text(SSD_STYLE)
    config = Config.from_json(path)
    (q,) = config.passes
    assert type(q).__name__ == "Quantize" and q.range_rules.default.num_init_samples == 4
    assert config.data["ssd_params"]["top_k"] == 200 and config.data["basenet"] == "vgg16_reducedfc.pth"
    assert config.example_inputs()[0].shape == (2, 3, 32, 32)


def test_json_errors_name_the_line_and_the_field(tmp_path):
    from fxcompress import Config, ConfigError
    path = tmp_path / "cfg.json"
    path.write_text(SSD_STYLE.replace('"flip": true,', '"flip": true'))
    with pytest.raises(ConfigError, match=r"cfg.json: not valid JSON at line 6, column 87: Unexpected"):
        Config.from_json(path)
    path.write_text(SSD_STYLE.replace('"num_init_samples": 4', '"num_init_samples": -4'))
    with pytest.raises(ConfigError, match=r"cfg.json, line 14: compression.initializer.range.num_init_samples: "
                                          r"-4 is less than the minimum of 0"):
        Config.from_json(path)
    path.write_text(SSD_STYLE.replace('"compression"', '"compresion"'))
    with pytest.raises(ConfigError, match=r"line 12: compresion: unknown top-level key; did you mean 'compression'"):
        Config.from_json(path)


# -- staged quantization ----------------------------------------------------------------------------

STAGED = {"batch_multiplier": 2, "activations_quant_start_epoch": 0, "weights_quant_start_epoch": 1,
          "lr_poly_drop_start_epoch": 2, "lr_poly_drop_duration_epochs": 2, "disable_wd_start_epoch": 2,
          "base_lr": 3.1e-4, "base_wd": 1e-5}


def _mlp_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def test_staged_quantization_drives_the_users_optimizer_as_nncf():
    from fxcompress import Config
    model, inputs = zoo.ARCHITECTURES["mlp"]()
    config = Config.from_dict({"input_info": {"sample_size": [2, 16]},
                               "compression": {"algorithm": "quantization", "params": STAGED}})
    ctrl, gm = compile_for_compression(model, config, inputs, copy=True)
    part = ctrl.parts[0]
    loader = _mlp_batches(4)
    ctrl.initialize(loader)
    optimizer = torch.optim.Adam(gm.parameters(), lr=0.1, weight_decay=0.5)
    ctrl.scheduler.attach_optimizer(optimizer)
    assert optimizer.param_groups[0]["lr"] == 3.1e-4 and optimizer.param_groups[0]["weight_decay"] == 1e-5
    weights = [q for q in part.quantizers if q.group == "weights"]
    activations = [q for q in part.quantizers if q.group == "activations"]
    scales_at_init = [q.module.scale.detach().clone() for q in weights]
    lrs, wds, optimizer_steps = [], [], 0
    for epoch in range(4):
        assert all(q.module.enabled for q in activations)                  # activations from epoch 0
        assert all(q.module.enabled == (epoch >= 1) for q in weights)      # weights from epoch 1
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(gm(x), y) / part.scheduler.batch_multiplier  # a mean
            loss.backward()
            if ctrl.scheduler.should_step_optimizer():
                optimizer.step()
                optimizer.zero_grad()
                optimizer_steps += 1
            ctrl.scheduler.step()
            lrs.append(optimizer.param_groups[0]["lr"])
            wds.append(optimizer.param_groups[0]["weight_decay"])
        ctrl.scheduler.epoch_step()
        if epoch == 0:  # weights switched on: their ranges re-initialized from the weights trained in float
            changed = [not torch.equal(s, q.module.scale) for s, q in zip(scales_at_init, weights)]
            assert all(changed)
    assert optimizer_steps == 8  # 16 batches, one optimizer step per 2 (batch_multiplier)
    # NNCF's PolyLRDropScheduler: base_lr until epoch 2, then base_lr * ((4 - t) / 2) ** 2.1
    expected = [3.1e-4 * (((4 - t) / 2) ** 2.1 if 2 <= t < 4 else (0.0 if t >= 4 else 1.0))
                for t in [e + (s + 1) / 4 if e else 0.0 for e in range(4) for s in range(4)]]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert wds == [1e-5] * 8 + [0.0] * 8  # weight decay off once t > disable_wd_start_epoch (2)
    assert ctrl.parts[0].scheduler.stage == "fully_quantized"


def test_staged_keys_take_nncfs_defaults_and_no_params_means_no_staging():
    model, inputs = zoo.ARCHITECTURES["mlp"]()
    ctrl, _ = compile_for_compression(model, [Quantize(base_lr=1e-4)], inputs)
    part = ctrl.parts[0]
    assert part.scheduler.activations_quant_start_epoch == 1 and part.scheduler.weights_quant_start_epoch == 1
    assert not any(q.module.enabled for q in part.quantizers)           # NNCF: both start at epoch 1
    ctrl.scheduler.epoch_step()
    assert all(q.module.enabled for q in part.quantizers)
    ctrl, gm = compile_for_compression(model, [Quantize()], inputs)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.5)
    ctrl.scheduler.attach_optimizer(optimizer)
    assert optimizer.param_groups[0]["lr"] == 0.5 and ctrl.scheduler.should_step_optimizer()
    assert all(q.module.enabled for q in ctrl.parts[0].quantizers)


# -- NNCF-style configs end to end: compile -> initialize -> train a few steps -> export ----------------

# Written as NNCF's samples are (comments, trailing commas, the scripts' keys, NNCF scope names);
# the models are fxcompress.testing.models' torchvision look-alikes (class and attribute names as
# torchvision's, so NNCF's scope names carry over with the class renamed).
BINARIZATION_XNOR = """{
    "model": "resnet18", "pretrained": false, "batch_size": 8, "epochs": 2,
    "input_info": {"sample_size": [2, 3, 32, 32]},
    "target_device": "VPU",   // NNCF 2.5's name of the NPU
    "compression": [{
        "algorithm": "binarization",
        "mode": "xnor",
        "params": {"activations_quant_start_epoch": 0, "weights_quant_start_epoch": 1,
                   "lr_poly_drop_start_epoch": 1, "lr_poly_drop_duration_epochs": 1,
                   "disable_wd_start_epoch": 1, "base_lr": 1e-3, "base_wd": 1e-5, "batch_multiplier": 1},
        "ignored_scopes": ["{re}ResNet/NNCFLinear\\\\[fc\\\\]/.*",
                           "{re}ResNet/NNCFConv2d\\\\[conv1\\\\]",
                           "{re}ResNet/Sequential\\\\[layer2\\\\]/BasicBlock\\\\[0\\\\]/Sequential\\\\[downsample\\\\]/.*",
                           "ResNet/Sequential[layer3]/BasicBlock[0]/Sequential[downsample]/Conv2d[0]",
                           "{re}layer4\\\\.0\\\\.downsample.*",],
    },],
}"""

RB_SPARSITY_INT8 = """{
    /* mobilenet_v2_imagenet_rb_sparsity_int8.json, on a tiny MobileNetV2 */
    "model": "mobilenet_v2", "dataset": "imagenet", "multiprocessing_distributed": true,
    "input_info": {"sample_size": [2, 3, 32, 32],},
    "target_device": "VPU",
    "compression": [
        {"algorithm": "rb_sparsity", "sparsity_init": 0.05,
         "params": {"schedule": "multistep", "multistep_steps": [1], "multistep_sparsity_levels": [0.1, 0.3]},
         "ignored_scopes": ["{re}MobileNetV2Tiny/Sequential\\\\[features\\\\]/ConvBNReLU6\\\\[0\\\\]/NNCFConv2d\\\\[0\\\\]/.*"]},
        {"algorithm": "quantization",
         "initializer": {"range": {"num_init_samples": 4}, "batchnorm_adaptation": {"num_bn_adaptation_samples": 4}},
         "ignored_scopes": ["MobileNetV2Tiny/Sequential[features]/InvertedResidual[1]/__add___0",
                            "MobileNetV2Tiny/Sequential[features]/InvertedResidual[1]/Sequential[conv]/Conv2d[1]/conv2d_0"]},
    ],
}"""

MIXED_MANUAL_STAGED = """{
    // resnet50_imagenet_mixed_int_manual_staged.json, on a ResNet-18 look-alike
    "model": "resnet18", "checkpoint_save_dir": "/tmp/unused", "optimizer": {"type": "Adam", "base_lr": 1e-4},
    "input_info": {"sample_size": [2, 3, 32, 32]},
    "target_device": "TRIAL",
    "compression": {
        "algorithm": "quantization",
        "weights": {"mode": "asymmetric", "bits": 4}, "activations": {"mode": "asymmetric", "bits": 4},
        "initializer": {
            "range": {"num_init_samples": 4},
            "precision": {
                // no "type": bitwidth_per_scope means manual
                "bitwidth_per_scope": [
                    [8, "ResNet/NNCFConv2d[conv1]/conv2d_0|WEIGHT"],
                    [8, "ResNet/NNCFLinear[fc]/linear_0|WEIGHT"],
                    [8, "ResNet/Sequential[layer1]/BasicBlock[0]/NNCFConv2d[conv1]/conv2d_0|WEIGHT"],
                    [8, "/nncf_model_input_0|OUTPUT"],      // NNCF's quantizer ids of activations
                    [8, "ResNet/ReLU[relu]/relu__0|OUTPUT"],
                ],
            },
        },
        "params": {"batch_multiplier": 2, "activations_quant_start_epoch": 0, "weights_quant_start_epoch": 1,
                   "lr_poly_drop_start_epoch": 1, "lr_poly_drop_duration_epochs": 1, "disable_wd_start_epoch": 1,
                   "base_lr": 3.1e-4, "base_wd": 1e-5},
    },
}"""

PRUNING_LEGR = """{
    // resnet18_imagenet_pruning_learned_ranking.json, with a short search
    "model": "resnet18", "pretrained": false, "batch_size": 2,
    "input_info": {"sample_size": [2, 3, 32, 32]},
    "compression": [{
        "algorithm": "filter_pruning",
        "pruning_init": 0.1,
        "params": {
            "pruning_flops_target": 0.3, "pruning_steps": 2,
            "interlayer_ranking_type": "learned_ranking",
            "legr_params": {"generations": 3, "train_steps": 1, "max_pruning": 0.3, "random_seed": 1,},
            "save_ranking_coeffs_path": "SAVE_PATH",
        },
        "ignored_scopes": ["{re}^ResNet/Sequential\\\\[layer4\\\\]/BasicBlock\\\\[1\\\\]/NNCFConv2d\\\\[conv1\\\\]/conv2d_0$"],
    }],
}"""

E2E = [("binarization_xnor", BINARIZATION_XNOR, "resnet18_like"),
       ("rb_sparsity_int8", RB_SPARSITY_INT8, "mobilenet_v2_tiny"),
       ("mixed_manual_staged", MIXED_MANUAL_STAGED, "resnet18_like"),
       ("pruning_legr", PRUNING_LEGR, "resnet18_like")]


def _train(ctrl, gm, batches):
    optimizer = torch.optim.SGD(gm.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    ctrl.scheduler.attach_optimizer(optimizer)
    for epoch in range(2):
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(gm(x), y) + ctrl.loss()
            loss.backward()
            if ctrl.scheduler.should_step_optimizer():
                optimizer.step()
                optimizer.zero_grad()
            ctrl.scheduler.step()
        ctrl.scheduler.epoch_step()
    return optimizer


@pytest.mark.parametrize("name,text,arch", E2E, ids=[e[0] for e in E2E])
def test_nncf_style_config_compiles_initializes_trains_and_exports(tmp_path, name, text, arch):
    import numpy as np
    import onnxruntime as ort
    from fxcompress import Config
    path = tmp_path / f"{name}.json"
    path.write_text(text.replace("SAVE_PATH", str(tmp_path / "legr.json")))
    config = Config.from_json(path)
    model, _ = zoo.ARCHITECTURES[arch]()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g)) for _ in range(2)]
    ctrl, gm = compile_for_compression(model, config, copy=True)
    ctrl.initialize(batches)
    before = {k: v.detach().clone() for k, v in gm.state_dict().items()}
    optimizer = _train(ctrl, gm, batches)
    assert any(not torch.equal(before[k], v) for k, v in gm.state_dict().items() if k in before)  # it trained
    stats = ctrl.statistics().to_dict()
    if name == "binarization_xnor":
        section = stats["binarization"]
        binarized = {row["layer"] for row in section["layers"]}
        assert {"fc", "conv1", "layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"} \
            .isdisjoint(binarized)
        assert "layer1.0.conv1" in binarized and section["stage"] == "fully_binarized"
        assert optimizer.param_groups[0]["lr"] == 0.0  # NNCF's drop over epoch 1 ends at epoch 2
    elif name == "rb_sparsity_int8":
        sparse = {row["layer"] for row in stats["rb_sparsity"]["layers"]}
        assert "features.0.0" not in sparse and "features.1.conv.1" in sparse
        quantizers = {n.target for n in gm.graph.nodes if n.op == "call_module" and "quantizer" in n.target}
        assert "features_1_conv_1_weight_quantizer" not in quantizers
        assert "features_2_conv_2_weight_quantizer" in quantizers
        assert stats["quantization"]["target_device"] == "NPU"
    elif name == "pruning_legr":
        section = stats["filter_pruning"]
        assert section["ranking_learned"] and section["legr_generations"] == 3
        assert section["pruning_level"] == 0.3 and section["flops_pruned_ratio"] >= 0.3  # epoch 2: the target
        coefficients = json.loads((tmp_path / "legr.json").read_text())
        assert "layer4.1.conv1" not in coefficients and "layer1.0.conv1" in coefficients
        assert {k: tuple(v) for k, v in coefficients.items()} == ctrl.filter_pruning.ranking_coeffs
    else:
        bits = {row["layer"]: row["bits"] for row in stats["mixed_precision"]["layers"]}
        assert bits["conv1"] == bits["fc"] == bits["layer1.0.conv1"] == 8
        assert {b for layer, b in bits.items() if layer not in ("conv1", "fc", "layer1.0.conv1")} == {4}
        assert ctrl.parts[0].scheduler.stage == "fully_quantized"
    onnx_path = ctrl.export_onnx(tmp_path / f"{name}.onnx")
    x = batches[0][0]
    gm.eval()
    with torch.no_grad():
        expected = gm(x).numpy()
    (got,) = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    assert got.shape == expected.shape and np.isfinite(got).all()
    if name == "binarization_xnor":  # no quantizer: the export computes the same function
        assert np.abs(got - expected).max() < 1e-4


def test_scope_override_on_an_nncf_operation_name(resnet):
    model, inputs, _ = resnet
    ctrl, gm = compile_for_compression(model, [Quantize(scope_overrides={"activations": {
        "{re}ResNet/Sequential\\[layer1\\]/BasicBlock\\[0\\]/__iadd___0": {"bits": 4}}})], inputs)
    bits = {n.target: gm.get_submodule(n.target).spec.bits for n in gm.graph.nodes
            if n.op == "call_module" and n.target.endswith("quantizer") and "weight" not in n.target}
    # the add's two inputs: bn2's output, and the block input (the stem ReLU's output, through the max pool)
    assert {name for name, b in bits.items() if b == 4} == {"layer1_0_add_input_quantizer", "relu_output_quantizer"}
    assert len(bits) > 10 and {b for b in bits.values()} == {4, 8}


def test_quantization_compression_lr_multiplier_scales_the_quantizer_gradients_only(resnet):
    from fxcompress import Config
    model, inputs, _ = resnet
    grads, outputs = [], []
    for multiplier in (None, 4.0):
        extra = {} if multiplier is None else {"compression_lr_multiplier": multiplier}
        config = Config.from_dict({"input_info": {"sample_size": [2, 3, 32, 32]}, **extra,
                                   "compression": {"algorithm": "quantization",
                                                   "weights": {"mode": "asymmetric"}}})
        ctrl, gm = compile_for_compression(model, config, inputs, copy=True)
        ctrl.initialize([inputs])
        out = gm(*inputs)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append({name: p.grad.clone() for name, p in gm.named_parameters() if p.grad is not None})
    assert torch.equal(outputs[0], outputs[1])
    quantizer_params = [n for n in grads[0] if "quantizer" in n]
    assert any(n.endswith("zero_point") for n in quantizer_params) and any(n.endswith("scale") for n in quantizer_params)
    for name, g in grads[0].items():
        if name in quantizer_params:
            assert torch.allclose(grads[1][name], 4.0 * g, rtol=1e-5, atol=0), name
        else:
            assert torch.equal(grads[1][name], g), name


# -- NNCF quantizer ids in bitwidth_per_scope --------------------------------------------------------------

def _manual(resnet, entries):
    from fxcompress.passes import MixedPrecision
    model, inputs, _ = resnet
    ctrl, gm = compile_for_compression(model, [Quantize(overflow_fix="disable", quantize_inputs=True),
                                               MixedPrecision(type="manual", bitwidth_per_scope=entries)], inputs)
    bits = {n.target: gm.get_submodule(n.target).spec.bits for n in gm.graph.nodes
            if n.op == "call_module" and "quantizer" in n.target}
    return ctrl, gm, bits


def test_nncf_quantizer_ids_in_bitwidth_per_scope_name_our_quantizers(resnet):
    from fxcompress.passes.mixed_precision.quantizer_ids import nncf_quantizer_ids
    block = "ResNet/Sequential[layer1]/BasicBlock[0]"
    ctrl, gm, bits = _manual(resnet, [
        [4, "ResNet/NNCFConv2d[conv1]/conv2d_0|WEIGHT"],                     # a weight quantizer
        [4, "/nncf_model_input_0|OUTPUT"],                                   # the model input
        [4, f"{block}/ReLU[relu]/relu__0|OUTPUT"],                           # an activation, by its producer
        [4, f"{block}/NNCFBatchNorm2d[bn2]/batch_norm_0|OUTPUT"],            # an add's input (feeds no layer)
        [4, "ResNet/Sequential[layer2]/BasicBlock[1]/NNCFConv2d[conv2]/conv2d_0|INPUT0"],  # by its consumer
        [2, "{re}ResNet/Sequential\\[layer4\\]/BasicBlock\\[1\\]/NNCFConv2d\\[conv[12]\\]/conv2d_0|WEIGHT"],
        [4, "ResNet/Sequential[layer3]/BasicBlock[0]/NNCFConv2d[conv2]/conv2d_0|INPUT"],  # any input port
    ])
    four = {name for name, b in bits.items() if b == 4}
    assert four == {"conv1_weight_quantizer", "x_input_quantizer", "layer1_0_relu_output_quantizer",
                    "layer1_0_add_input_quantizer", "layer2_1_relu_output_quantizer", "layer3_0_relu_output_quantizer"}
    # the activation quantizers of those two layers follow them (the maximum rule, docs/mixed_precision.md)
    assert {name for name, b in bits.items() if b == 2} == {
        "layer4_1_conv1_weight_quantizer", "layer4_1_conv2_weight_quantizer",
        "layer4_0_relu_1_output_quantizer", "layer4_1_relu_output_quantizer"}
    assert {b for name, b in bits.items() if b not in (2, 4)} == {8}
    ids = nncf_quantizer_ids(gm)
    assert f"{block}/Conv2d[conv2]/conv2d_0|INPUT0" in ids["layer1_0_relu_output_quantizer"]
    assert "ResNet/AdaptiveAvgPool2d[avgpool]/adaptive_avg_pool2d_0|OUTPUT" in ids["fc_input_quantizer"]


def test_an_nncf_quantizer_id_matching_nothing_lists_the_nearest_ids(resnet):
    with pytest.raises(ScopeError, match=r"bitwidth_per_scope\[0\]: NNCF quantizer id "
                                         r"'ResNet/NNCFConv2d\[conv9\]/conv2d_0\|WEIGHT' names no quantizer.*"
                                         r"did you mean 'ResNet/NNCFConv2d\[conv1\]/conv2d_0\|WEIGHT'"):
        _manual(resnet, [[4, "ResNet/NNCFConv2d[conv9]/conv2d_0|WEIGHT"]])
    with pytest.raises(ConfigError, match=r"unknown role .\|BIAS. in"):
        _manual(resnet, [[4, "ResNet/NNCFConv2d[conv1]/conv2d_0|BIAS"]])


def test_unified_scale_ops_make_the_inputs_of_the_named_operations_share_one_quantizer(resnet, tmp_path):
    import numpy as np
    import onnxruntime as ort
    model, inputs, _ = resnet
    adds = ["ResNet/Sequential[layer1]/BasicBlock[0]/__iadd___0", "{re}ResNet/Sequential\\[layer1\\]/BasicBlock\\[1\\]/__i?add___0"]
    ctrl, gm = compile_for_compression(model, [Quantize(activations={"unified_scale_ops": [adds]})], inputs, copy=True)
    users = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and "quantizer" in n.target:
            users.setdefault(n.target, []).append(n)
    # the two adds' four inputs: bn2 of each block, the stem's ReLU (through the max pool) and block 0's output
    shared = users["layer1_0_add_input_quantizer"]
    assert len(shared) == 4 and "layer1_1_add_input_quantizer" not in users
    assert not hasattr(gm, "layer1_1_add_input_quantizer")
    assert {n.args[0].name for n in shared} == {"layer1_0_bn2", "relu", "layer1_1_bn2", "layer1_0_relu_1"}
    names = [q.name for q in ctrl.quantization.quantizers]
    assert len(names) == len(set(names)) == len(users)
    g = torch.Generator().manual_seed(0)
    ctrl.initialize([(torch.rand(2, 3, 32, 32, generator=g),) for _ in range(2)])
    path = ctrl.export_onnx(tmp_path / "unified.onnx")
    gm.eval()
    with torch.no_grad():
        expected = gm(*inputs).numpy()
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": inputs[0].numpy()})
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()
    with pytest.raises(ScopeError, match=r"unified_scale_ops\[0\]: scope 'ResNet/__add___9'"):
        compile_for_compression(model, [Quantize(activations={"unified_scale_ops": [["ResNet/__add___9"]]})], inputs)
