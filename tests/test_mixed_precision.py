"""The MixedPrecision pass after Quantize: finding the quantized layers, HAWQ traces and bit widths,
manual mode, config entries, errors, checkpoints, dumps, ONNX export of mixed bit widths, and the
digits accuracy of HAWQ's choice against uniform and order-violating assignments."""
import copy
import itertools
import json
import warnings

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fxcompress import Config, compile_for_compression
from fxcompress.errors import ConfigError, NotInitializedError, ScopeError
from fxcompress.passes import MixedPrecision, Quantize
from fxcompress.data import CalibrationData
from fxcompress.passes.mixed_precision import estimate_average_traces
from fxcompress.passes.mixed_precision.selection import compression_ratio, monotone_configurations
from fxcompress.quantizers import FakeQuantizer
from fxcompress.testing import DigitsCNN, digits_loaders, evaluate_accuracy
from training import digits_setup, report

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
# fast quantization init for tests: few range-init samples, no BatchNorm adaptation
QUICK = {"range": {"num_init_samples": 64}, "batchnorm_adaptation": {"num_bn_adaptation_samples": 0}}
LAYERS = ["conv1", "conv2", "conv3", "fc"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread avoids OpenMP oversubscription on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calibration(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=g)), batch_size=64)


def compile_digits(mixed, model=None, quantize=None):
    model = model if model is not None else DigitsCNN(seed=0).eval()
    quantize = quantize if quantize is not None else Quantize(bits=8, initializer=QUICK)
    return compile_for_compression(model, [quantize, mixed], example_inputs=(X,), copy=True)


def part_of(ctrl):
    return next(p for p in ctrl.parts if p.algorithm == "mixed_precision")


def quantizer_bits(gm):
    return {name: m.spec.bits for name, m in gm.named_modules() if isinstance(m, FakeQuantizer)}


def save_traces(tmp_path, traces):
    path = tmp_path / "traces.pt"
    torch.save(torch.tensor(traces), path)
    return str(path)


# -- what the pass finds -----------------------------------------------------------------------

def test_finds_every_quantized_layer_its_activation_quantizer_and_nncf_flops():
    ctrl, gm = compile_digits(MixedPrecision())
    part = part_of(ctrl)
    assert [l.module_path for l in part.layers] == LAYERS
    assert [l.weight_quantizer for l in part.layers] == [f"{p}_weight_quantizer" for p in LAYERS]
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for layer in part.layers:
        assert len(layer.activation_quantizers) == 1
        (act,) = layer.activation_quantizers
        assert isinstance(gm.get_submodule(act), FakeQuantizer)
        assert nodes[act].meta["quantization"]["group"] == "activations"
        assert nodes[layer.weight_quantizer].meta["quantization"]["group"] == "weights"
    # NNCF's FLOPs: 2 * weight.numel() * output spatial size (conv), 2 * weight.numel() (linear on [N, C])
    assert [l.flops for l in part.layers] == [2 * 144 * 64, 2 * 4608 * 64, 2 * 9216 * 16, 2 * 5120]
    assert [l.params for l in part.layers] == [144, 4608, 9216, 5120]
    # nothing changes at compile time in HAWQ mode
    assert set(quantizer_bits(gm).values()) <= {7, 8}


def test_without_quantize_there_is_nothing_to_do():
    with pytest.warns(UserWarning, match="put Quantize"):
        ctrl, gm = compile_for_compression(DigitsCNN(seed=0).eval(), [MixedPrecision()], example_inputs=(X,))
    stats = ctrl.statistics().to_dict()["mixed_precision"]
    assert stats["num_layers"] == 0 and stats["layers"] == [] and "Quantize" in stats["skipped"][-1]["reason"]
    ctrl.initialize()  # nothing to initialize, no data needed
    part_of(ctrl).check_exportable()


# -- HAWQ end to end ---------------------------------------------------------------------------------

def test_traces_are_the_hessian_traces_of_the_float_loss_with_respect_to_the_weights():
    """The pass probes w + delta on each weight quantizer's output with quantizers off; the same probes
    on the float model's parameters must give the same numbers."""
    model = DigitsCNN(seed=0).eval()
    ctrl, gm = compile_digits(MixedPrecision(iter_number=6, tolerance=0.0, num_data_points=64, seed=3),
                              model=model)
    loader = calibration(64)
    part = part_of(ctrl)
    est = part.estimate_traces(gm, CalibrationData(loader, model=gm))
    x, y = next(iter(loader))
    weights = [getattr(model, p).weight for p in LAYERS]
    expected = estimate_average_traces([(lambda: F.cross_entropy(model(x), y), 64)], weights, iter_number=6,
                                       tolerance=0.0, probes_per_pass=4,
                                       generator=torch.Generator().manual_seed(3))
    assert est.iterations == expected.iterations == 6
    assert est.traces == pytest.approx(expected.traces, rel=1e-4)
    # the quantizers are enabled again and the model's mode is restored
    assert all(m.enabled for m in gm.modules() if isinstance(m, FakeQuantizer))


def test_hawq_sets_weight_and_activation_bits_from_the_traces(tmp_path):
    # traces decreasing along the network: conv1 most sensitive, fc least
    traces = [10.0, 1.0, 0.1, 0.01]
    ctrl, gm = compile_digits(MixedPrecision(bits=[2, 4, 8], compression_ratio=1.9,
                                             traces_per_layer_path=save_traces(tmp_path, traces)))
    part = part_of(ctrl)
    assert not part.needs_data()
    with pytest.raises(NotInitializedError, match="initialize"):
        part.check_exportable()
    ctrl.initialize(calibration())
    stats = ctrl.statistics().to_dict()["mixed_precision"]
    bits = [row["bits"] for row in stats["layers"]]
    assert bits == sorted(bits, reverse=True)  # traces decrease along the layers, so do the bits
    assert stats["compression_ratio"] >= 1.9
    assert stats["compression_ratio"] == pytest.approx(
        compression_ratio(bits, [l.flops for l in part.layers], [l.group for l in part.layers]))
    for layer, b in zip(part.layers, bits):
        expected = 7 if (b == 8 and layer.overflow_fix) else b  # the overflow fix keeps 8-bit weights at 7
        assert layer.module.spec.bits == expected
        assert gm.get_submodule(layer.group).spec.bits == b  # one consumer each: activation = its layer
        assert bool(layer.module.initialized)
    assert [row["avg_trace"] for row in stats["layers"]] == pytest.approx(traces)
    assert {"sensitivity", "candidates", "feasible_candidates", "reachable_ratio"} <= set(stats)
    part.check_exportable()


def test_hawq_set_bits_keeps_the_ranges(tmp_path):
    ctrl, gm = compile_digits(MixedPrecision(bits=[4, 8], compression_ratio=2.0,
                                             traces_per_layer_path=save_traces(tmp_path, [1.0, 1.0, 1.0, 1.0])))
    ctrl.initialize(calibration())
    for layer in part_of(ctrl).layers:
        q = layer.module
        assert q.spec.bits == 4
        # narrow symmetric 4-bit: [-7, 7]; the real range max|w| per channel is unchanged
        w = getattr(gm, layer.module_path).weight.detach()
        dims = [d for d in range(w.dim()) if d != 0]
        torch.testing.assert_close(q.effective_scale() * 7, w.abs().amax(dim=dims), rtol=1e-5, atol=1e-7)


def test_digits_hawq_needs_data_and_reports_its_search():
    model, train, _, _ = digits_setup(0)
    ctrl, gm = compile_digits(MixedPrecision(bits=[2, 4, 8], compression_ratio=2.0, num_data_points=64,
                                             iter_number=8), model=model)
    assert part_of(ctrl).needs_data()
    with pytest.raises(ValueError, match="needs a data loader"):
        ctrl.initialize()
    ctrl.initialize(train)
    stats = ctrl.statistics().to_dict()["mixed_precision"]
    assert stats["initialized"] and stats["hutchinson_iterations"] <= 8
    assert stats["candidates"] == 15  # C(4 + 3 - 1, 2)
    assert stats["reachable_ratio"] == [1.0, 4.0]
    assert all(row["avg_trace"] > 0 for row in stats["layers"])


# -- the digits must-show: HAWQ against uniform and order-violating assignments -------------------------

def _with_bits(gm, layers, bits):
    g = copy.deepcopy(gm)
    for layer, b in zip(layers, bits):
        g.get_submodule(layer.weight_quantizer).set_bits(7 if (b == 8 and layer.overflow_fix) else b)
        g.get_submodule(layer.group).set_bits(b)
    return g


def _finetune_accuracy(gm, seed, epochs=1, lr=1e-3):
    """The same fine-tune for every assignment: a fresh loader on the model's own split (its test images
    never train), the same batch order and RNG."""
    train, test = digits_loaders(batch_size=64, seed=seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(gm.parameters(), lr=lr)
    gm.train()
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(gm(x), y).backward()
            opt.step()
    return evaluate_accuracy(gm.eval(), test)


def test_digits_hawq_is_at_least_as_accurate_as_uniform_and_order_violating_assignments(train_seed, tmp_path):
    """Same short fine-tune (1 epoch, Adam 1e-3) for every assignment; figures in benchmarks/RESULTS.md.

    (a) budget 2.0: HAWQ's choice vs uniform 4-bit (ratio 2.0), and vs 6 random assignments that violate
        the trace order with a compression ratio within 5% of HAWQ's (their mean accuracy);
    (b) budget 3.5: HAWQ's choice vs uniform 2-bit, the only uniform assignment meeting it.
    """
    import random

    model, train, _, _ = digits_setup(train_seed)
    ctrl, gm = compile_digits(MixedPrecision(bits=[2, 4, 8], compression_ratio=2.0, num_data_points=128,
                                             iter_number=24, dump_init_precision_data=True, dump_dir=str(tmp_path)),
                              model=model)
    ctrl.initialize(train)
    part = part_of(ctrl)
    layers, flops, groups = part.layers, [l.flops for l in part.layers], [l.group for l in part.layers]
    acc = {}

    def accuracy(bits):
        if tuple(bits) not in acc:
            acc[tuple(bits)] = _finetune_accuracy(_with_bits(gm, layers, bits), train_seed)
        return acc[tuple(bits)]

    # (a)
    hawq_2 = part.current_bits()
    ratio_2 = compression_ratio(hawq_2, flops, groups)
    monotone = set(monotone_configurations(part.traces, [2, 4, 8]))
    violating = [c for c in itertools.product([2, 4, 8], repeat=4)
                 if c not in monotone and abs(compression_ratio(c, flops, groups) / ratio_2 - 1) <= 0.05]
    sample = random.Random(0).sample(violating, 6)
    mean_violating = sum(accuracy(c) for c in sample) / len(sample)

    # (b) the same traces (dumped above) at a higher budget
    ctrl_b, gm_b = compile_digits(MixedPrecision(bits=[2, 4, 8], compression_ratio=3.5,
                                                 traces_per_layer_path=str(tmp_path / "traces_per_layer.pt")),
                                  model=model)
    ctrl_b.initialize(calibration())
    hawq_35 = part_of(ctrl_b).current_bits()
    ratio_35 = compression_ratio(hawq_35, flops, groups)
    print(json.dumps({"traces": part.traces, "hawq_2.0": [hawq_2, ratio_2, accuracy(hawq_2)],
                      "uniform4": accuracy([4, 4, 4, 4]), "hawq_3.5": [hawq_35, ratio_35, accuracy(hawq_35)],
                      "uniform2": accuracy([2, 2, 2, 2]),
                      "violating": [[c, compression_ratio(c, flops, groups), acc[c]] for c in sample]}))
    report("hawq", train_seed, hawq_2=str(hawq_2).replace(" ", ""), vs_uniform4=accuracy(hawq_2) - accuracy([4, 4, 4, 4]),
           vs_violating_mean=accuracy(hawq_2) - mean_violating, hawq_35=str(hawq_35).replace(" ", ""),
           vs_uniform2=accuracy(hawq_35) - accuracy([2, 2, 2, 2]))
    # Measured over seeds 0-2 with ATen at AVX2 and at its baseline (docs/testing.md): HAWQ keeps uniform
    # 4-bit at 2.0 in all 6 runs, 2.5-3.3 points above the violating mean; (8, 2, 2, 2) at 3.5, 11-16 points
    # above uniform 2-bit. The traces depend on the CPU's float rounding, so the choice is compared, not fixed.
    assert ratio_2 >= 2.0 and ratio_35 >= 3.5
    assert accuracy(hawq_2) >= accuracy([4, 4, 4, 4])
    assert accuracy(hawq_2) >= mean_violating
    assert accuracy(hawq_35) >= accuracy([2, 2, 2, 2])


# -- manual mode -------------------------------------------------------------------------------------------

def test_manual_bits_apply_at_compile_time_with_nncf_and_quantizer_scopes():
    ctrl, gm = compile_digits(MixedPrecision(type="manual", bitwidth_per_scope=[
        [4, "conv*"], [2, "DigitsCNN/NNCFConv2d[conv3]/conv2d_0|WEIGHT"], [6, "fc_weight_quantizer"]]))
    part = part_of(ctrl)
    assert [l.module.spec.bits for l in part.layers] == [4, 4, 2, 6]
    assert [gm.get_submodule(l.group).spec.bits for l in part.layers] == [4, 4, 2, 6]
    stats = ctrl.statistics().to_dict()["mixed_precision"]
    assert stats["type"] == "manual" and not part.needs_data()
    assert stats["compression_ratio"] == pytest.approx(
        8 * sum(l.flops for l in part.layers) / sum(l.flops * b for l, b in zip(part.layers, [4, 4, 2, 6])))
    # an activation quantizer set on its own wins over the max-of-consumers rule
    act = part.layers[1].group
    ctrl, gm = compile_digits(MixedPrecision(type="manual", bitwidth_per_scope=[[4, "conv2"], [8, act]]))
    assert gm.get_submodule("conv2_weight_quantizer").spec.bits == 4 and gm.get_submodule(act).spec.bits == 8


def test_an_activation_quantizer_feeding_several_layers_gets_the_max_of_their_bits():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4 * 64, 3)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            return self.fc(torch.flatten(self.a(x) + self.b(x), 1))

    ctrl, gm = compile_for_compression(
        Fork().eval(), [Quantize(bits=8, initializer=QUICK),
                        MixedPrecision(type="manual", bitwidth_per_scope=[[2, "a"], [4, "b"]])],
        example_inputs=(X,))
    part = part_of(ctrl)
    by_path = {l.module_path: l for l in part.layers}
    assert by_path["a"].group == by_path["b"].group  # one quantizer on relu(stem) feeds both
    assert gm.get_submodule(by_path["a"].group).spec.bits == 4
    assert by_path["a"].module.spec.bits == 2 and by_path["b"].module.spec.bits == 4
    # bit complexity counts layer a at max(weight 2, activation 4) = 4 bits
    flops = {p: l.flops for p, l in by_path.items()}
    bits = {"stem": 8, "a": 4, "b": 4, "fc": 8}
    assert part.achieved_ratio() == pytest.approx(8 * sum(flops.values()) / sum(flops[p] * bits[p] for p in flops))


def test_manual_scope_that_matches_nothing_is_an_error():
    with pytest.raises(ScopeError, match=r"bitwidth_per_scope\[1\].*'conv9'"):
        compile_digits(MixedPrecision(type="manual", bitwidth_per_scope=[[4, "conv1"], [4, "conv9"]]))
    with pytest.raises(ConfigError, match="unknown role"):
        compile_digits(MixedPrecision(type="manual", bitwidth_per_scope=[[4, "conv1|BIAS"]]))


# -- configuration ------------------------------------------------------------------------------------------

def test_unreachable_compression_ratio_is_a_config_error_with_the_reachable_range(tmp_path):
    with pytest.raises(ConfigError, match=r"compression_ratio: 3 cannot be reached with bits \[4, 8\]: "
                                          r"the reachable range is \[1, 2\]") as info:
        MixedPrecision(bits=[4, 8], compression_ratio=3)
    assert info.value.path == "MixedPrecision.compression_ratio"
    with pytest.raises(ConfigError, match=r"reachable range is \[2, 4\]"):
        MixedPrecision(bits=[2, 4], compression_ratio=1.5)
    # a range that only the model restricts: conv2 (65% of the FLOPs) excluded, kept at 8 bits
    ctrl, gm = compile_digits(MixedPrecision(bits=[4, 8], compression_ratio=1.9, ignored_scopes=["conv2"],
                                             traces_per_layer_path=save_traces(tmp_path, [1.0, 1.0, 1.0])))
    part = part_of(ctrl)
    with pytest.raises(ConfigError, match=r"MixedPrecision.compression_ratio: 1.9 cannot be reached .*"
                                          r"reachable range is \[1, 1.2"):
        ctrl.initialize(calibration())
    assert [l.module_path for l in part.excluded] == ["conv2"]


@pytest.mark.parametrize("params, match", [
    ({"type": "autoq"}, r"type: NNCF's 'autoq' .* not supported; 'hawq' chooses"),
    ({"type": "manual"}, "needs bitwidth_per_scope"),
    ({"type": "hawq", "bitwidth_per_scope": [[4, "conv1"]]}, "applies to type 'manual' only"),
    ({"bits": [1, 8]}, r"bits\[0\]"),
    ({"compresion_ratio": 2}, "did you mean 'compression_ratio'"),
    ({"bitwidth_per_scope": [["4", "conv1"]], "type": "manual"}, r"bitwidth_per_scope\[0\]\[0\]"),
])
def test_bad_keys_name_the_field(params, match):
    with pytest.raises(ConfigError, match=match):
        MixedPrecision(**params)
    with pytest.raises(ConfigError, match=match):
        Config.from_dict({"compression": [{"algorithm": "quantization"}, {"algorithm": "mixed_precision", **params}]})


def test_nncf_quantization_entry_with_precision_expands_into_both_passes(tmp_path):
    traces = save_traces(tmp_path, [4.0, 3.0, 2.0, 1.0])
    precision = {"type": "hawq", "bits": [4, 8], "compression_ratio": 1.5, "traces_per_layer_path": traces}
    config = Config.from_dict({"input_info": {"sample_size": [2, 1, 8, 8]}, "compression": {
        "algorithm": "quantization", "initializer": {**QUICK, "precision": precision}}})
    assert [type(p).__name__ for p in config.passes] == ["Quantize", "MixedPrecision"]
    assert config.passes[1].params["compression_ratio"] == 1.5
    ctrl_a, gm_a = compile_for_compression(DigitsCNN(seed=0).eval(), config, example_inputs=(X,))
    ctrl_b, gm_b = compile_digits(MixedPrecision(**precision))
    assert gm_a.code == gm_b.code
    for ctrl in (ctrl_a, ctrl_b):
        ctrl.initialize(calibration())
    assert quantizer_bits(gm_a) == quantizer_bits(gm_b)
    assert sorted(set(quantizer_bits(gm_a).values())) in ([4, 7, 8], [4, 8], [4, 7])
    # NNCF's own error for a Python Quantize: mixed precision is a pass of its own
    with pytest.raises(ConfigError, match=r"MixedPrecision\(\*\*precision\)"):
        Quantize(initializer={"precision": precision})
    with pytest.raises(ConfigError, match=r"compression.initializer.precision.compression_ratio"):
        Config.from_dict({"compression": {"algorithm": "quantization",
                                          "initializer": {"precision": {"bits": [4, 8], "compression_ratio": 9}}}})


# -- checkpoints, criterion, dumps ------------------------------------------------------------------------------

def test_controller_state_restores_the_chosen_bits(tmp_path):
    import fxcompress
    traces = save_traces(tmp_path, [1.0, 2.0, 0.5, 3.0])
    mixed = dict(bits=[2, 4, 8], compression_ratio=2.5, traces_per_layer_path=traces)
    ctrl, gm = compile_digits(MixedPrecision(**mixed))
    ctrl.initialize(calibration())
    torch.save({"ctrl": ctrl.state_dict(), "gm": gm.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["ctrl"]["mixed_precision"]["traces"] == pytest.approx({"conv1": 1.0, "conv2": 2.0, "conv3": 0.5, "fc": 3.0})
    fresh_ctrl, fresh = compile_digits(MixedPrecision(**mixed))
    fresh_ctrl.load_state_dict(saved["ctrl"])
    fxcompress.load_state(fresh, saved["gm"])
    assert quantizer_bits(fresh) == quantizer_bits(gm)
    fresh.eval(), gm.eval()
    torch.testing.assert_close(fresh(X), gm(X))
    assert part_of(fresh_ctrl).initialized
    bad = copy.deepcopy(saved["ctrl"])
    bad["mixed_precision"]["bits"].pop("conv1_weight_quantizer")
    with pytest.raises(Exception, match="missing"):
        fresh_ctrl.load_state_dict(bad)


def test_custom_criterion_and_target():
    seen = []

    def criterion_fn(outputs, target, criterion):
        seen.append(target)
        return criterion(outputs, torch.zeros_like(outputs))

    ctrl, gm = compile_digits(MixedPrecision(iter_number=2, num_data_points=8, criterion=F.mse_loss,
                                             criterion_fn=criterion_fn, target_fn=lambda batch: "t"))
    ctrl.initialize([(torch.randn(8, 1, 8, 8),)])
    assert seen and set(seen) == {"t"}
    assert part_of(ctrl).traces is not None
    # default criterion without targets: a clear error
    ctrl, gm = compile_digits(MixedPrecision(iter_number=2, num_data_points=8))
    with pytest.raises(ValueError, match="no target"):
        ctrl.initialize([torch.randn(8, 1, 8, 8)])
    with pytest.raises(ConfigError, match="criterion: expected a callable"):
        MixedPrecision(criterion="cross_entropy")


def test_dump_writes_traces_choice_and_plot_and_the_traces_reproduce_the_choice(tmp_path):
    pytest.importorskip("matplotlib")
    ctrl, gm = compile_digits(MixedPrecision(bits=[2, 4, 8], compression_ratio=2.2, iter_number=4,
                                             num_data_points=64, dump_init_precision_data=True,
                                             dump_dir=str(tmp_path / "dump")))
    ctrl.initialize(calibration())
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["bitwidth_per_scope.json", "hawq_data.json", "traces_and_bits.png", "traces_per_layer.pt"]
    assert (tmp_path / "dump" / "traces_and_bits.png").stat().st_size > 1000
    chosen = json.loads((tmp_path / "dump" / "bitwidth_per_scope.json").read_text())["bitwidth_per_scope"]
    assert [s for _, s in chosen] == LAYERS
    data = json.loads((tmp_path / "dump" / "hawq_data.json").read_text())
    assert len(data["candidate_ratios"]) == 15 and data["bits"] == [b for b, _ in chosen]
    again, gm2 = compile_digits(MixedPrecision(bits=[2, 4, 8], compression_ratio=2.2,
                                               traces_per_layer_path=str(tmp_path / "dump" / "traces_per_layer.pt")))
    again.initialize(calibration())
    assert quantizer_bits(gm2) == quantizer_bits(gm)
    manual, gm3 = compile_digits(MixedPrecision(type="manual", bitwidth_per_scope=chosen))
    assert quantizer_bits(gm3) == quantizer_bits(gm)
    part_of(ctrl).plot(tmp_path / "again.png")
    assert (tmp_path / "again.png").exists()


# -- export --------------------------------------------------------------------------------------------------------

def test_mixed_bit_widths_survive_into_onnx_and_both_runtimes_read_them(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    from fxcompress.runtime import openvino_compile, openvino_infer, qdq_summary, run_onnxruntime

    bits = {"conv1": 8, "conv2": 4, "conv3": 2, "fc": 4}
    ctrl, gm = compile_digits(MixedPrecision(type="manual", bitwidth_per_scope=[[b, s] for s, b in bits.items()]),
                              model=DigitsCNN(seed=0).eval())
    ctrl.initialize(calibration())
    gm.eval()
    path = ctrl.export_onnx(tmp_path / "mixed.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    summary = qdq_summary(model)
    assert summary.integer_weight_types == {"INT8": 4} and summary.weight_quantize_ops == 0
    # every integer weight lies in its layer's narrow range: 2^(b-1) - 1 (8-bit: 7-bit overflow fix or 127)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_weight_q")}
    assert len(weights) == 4
    for name, values in weights.items():
        layer = next(p for p in bits if name.startswith(p))
        assert abs(int(values.min())) <= 2 ** (bits[layer] - 1) - 1 and int(values.max()) <= 2 ** (bits[layer] - 1) - 1
        if bits[layer] < 8:
            assert int(abs(values).max()) == 2 ** (bits[layer] - 1) - 1  # the range is used, not just fits
    # activations below 8 bits get a Clip to their range ahead of an 8-bit QuantizeLinear
    assert summary.op_counts["Clip"] == 3
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = gm(x).numpy()
    step = max(float(m.effective_scale().detach().max()) for n, m in gm.named_modules()
               if isinstance(m, FakeQuantizer) and "weight" not in n)
    out = run_onnxruntime(path, x, level="basic")[0]
    assert abs(out - expected).max() <= step
    ov = openvino_infer(openvino_compile(path, precision="f32"), x)[0]
    assert abs(ov - expected).max() <= 2 * step


def test_traces_and_noise_see_the_masked_weights_after_sparsity():
    from fxcompress.passes import MagnitudeSparsity

    model = DigitsCNN(seed=0).eval()
    ctrl, gm = compile_for_compression(model, [MagnitudeSparsity(sparsity_init=0.5), Quantize(bits=8, initializer=QUICK),
                                               MixedPrecision(bits=[4, 8], compression_ratio=1.5, iter_number=3,
                                                              num_data_points=64)],
                                       example_inputs=(X,), copy=True)
    part = part_of(ctrl)
    assert [l.module_path for l in part.layers] == LAYERS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model may have negative traces
        ctrl.initialize(calibration(64))
    # the noise is that of the masked weight: zero where the mask is zero, so it equals the noise of w * mask
    for layer, noise in zip(part.layers, part.noise):
        mask = gm.get_submodule(f"{layer.module_path}_weight_mask").binary_mask()
        assert bool((mask == 0).any())  # a global 50% level: every layer has zeros
        w = getattr(gm, layer.module_path).weight.detach() * mask
        with torch.no_grad():
            expected = float(((copy.deepcopy(layer.module)(w) - w) ** 2).sum())
        assert noise[nominal_bits_of(layer)] == pytest.approx(expected, rel=1e-5)


def nominal_bits_of(layer):
    bits = layer.module.spec.bits
    return 8 if (layer.overflow_fix and bits == 7) else bits
