"""Checkpoints round-trip exactly: statistics, schedules, counters, and a resumed run == an uninterrupted one.

For every algorithm and for a pipeline of three: compile, ``initialize``, train
with a deterministic loader, save ``gm.state_dict()``, ``ctrl.state_dict()`` and
the optimizer's state (loaded back with ``weights_only=True``) in the middle of
an epoch; then compile afresh, load, and train on. The statistics string is
identical right after the load, and after the remaining steps (which cross
epoch boundaries where the schedules change level or stage) every parameter and
buffer is bitwise the same as in the run that was never interrupted.
"""
import io

import pytest
import torch
import torch.nn.functional as F

from fxcompress import CheckpointError, compile_for_compression, load_state
from fxcompress.passes import (Binarization, ConstSparsity, FilterPruning, MagnitudeSparsity, MixedPrecision,
                               Quantize, RBSparsity)
from fxcompress.testing import models as zoo

# HAWQ on an untrained model finds negative traces and says so; that is not what is tested here
pytestmark = pytest.mark.filterwarnings("ignore:mixed precision. negative average Hessian trace")

STEPS_PER_EPOCH = 2
EPOCHS = 3
SAVE_AT = STEPS_PER_EPOCH + 2  # events before the checkpoint: epoch 0, its epoch_step, one step of epoch 1
BN = {"batchnorm_adaptation": {"num_bn_adaptation_samples": 4}}
RANGE = {"range": {"num_init_samples": 4}}


def _quantize(**kwargs):
    return Quantize(bits=8, initializer={**RANGE, **BN}, **kwargs)


def _enabled(stats, part="quantization") -> list[bool]:
    return [row["enabled"] for row in stats[part]["layers"]]


# name -> (model, passes factory, probe); the probe reads from the statistics dict what the schedule
# changes at an epoch boundary after SAVE_AT (a level, a stage, quantizers switched on), so a resumed
# run that got the schedule wrong cannot pass
CASES = {
    "quantization": ("resnet_tiny", lambda: [_quantize(activations_quant_start_epoch=1,
                                                       weights_quant_start_epoch=2)],
                     _enabled),
    "magnitude_sparsity": ("resnet_tiny", lambda: [MagnitudeSparsity(
        sparsity_init=0.1, sparsity_target=0.6, sparsity_target_epoch=3, sparsity_freeze_epoch=3,
        initializer=BN)],
        lambda stats: (stats["magnitude_sparsity"]["sparsity"], stats["magnitude_sparsity"]["frozen"])),
    "rb_sparsity": ("resnet_tiny", lambda: [RBSparsity(
        schedule="multistep", multistep_steps=[1, 2], multistep_sparsity_levels=[0.1, 0.3, 0.5],
        sparsity_freeze_epoch=2)],
        lambda stats: (stats["rb_sparsity"]["current_target"], stats["rb_sparsity"]["frozen"])),
    "rb_sparsity_adaptive": ("resnet_tiny", lambda: [RBSparsity(
        schedule="adaptive", sparsity_init=0.0, sparsity_target=0.5, patience=2)],
        lambda stats: stats["rb_sparsity"]["current_target"]),  # raised after two kept-up epochs
    "const_sparsity": ("resnet_tiny", lambda: [ConstSparsity(), _quantize(activations_quant_start_epoch=2)],
                       _enabled),
    "filter_pruning": ("resnet_tiny", lambda: [FilterPruning(
        pruning_target=0.5, pruning_steps=3, schedule="exponential", initializer=BN)],
        lambda stats: (stats["filter_pruning"]["pruning_level"], stats["filter_pruning"]["frozen"])),
    "binarization": ("resnet_tiny", lambda: [Binarization(
        activations_quant_start_epoch=1, weights_quant_start_epoch=2, lr_poly_drop_start_epoch=1,
        initializer={**RANGE, **BN})],
        lambda stats: (stats["binarization"]["stage"], stats["binarization"]["lr_factor"])),
    "mixed_precision": ("resnet_tiny", lambda: [
        _quantize(activations_quant_start_epoch=2),
        MixedPrecision(bits=[4, 8], compression_ratio=1.5, num_data_points=4, iter_number=3)],
        _enabled),
    "pipeline": ("resnet_tiny", lambda: [
        MagnitudeSparsity(sparsity_init=0.1, sparsity_target=0.5, sparsity_target_epoch=3, initializer=BN),
        FilterPruning(pruning_target=0.3, pruning_steps=3),
        _quantize(activations_quant_start_epoch=2)],
        lambda stats: (stats["magnitude_sparsity"]["current_target"], stats["filter_pruning"]["pruning_level"],
                       _enabled(stats))),
}


def _events() -> list[tuple]:
    """The training loop as a list: ``("step", batch)`` per optimizer step, ``("epoch",)`` at each epoch end."""
    out = []
    for _ in range(EPOCHS):
        out += [("step", i) for i in range(STEPS_PER_EPOCH)] + [("epoch",)]
    return out


def _loader(example: torch.Tensor, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(example.shape, generator=g), torch.randint(0, 10, (example.shape[0],), generator=g))
            for _ in range(n)]


def _compile(name: str):
    model_name, passes, _ = CASES[name]
    model, inputs = zoo.ARCHITECTURES[model_name]()
    ctrl, gm = compile_for_compression(model, passes(), inputs)
    return ctrl, gm, inputs


def _optimizer(gm):
    return torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)


def _train(ctrl, gm, optimizer, loader, events):
    gm.train()
    for event in events:
        if event[0] == "epoch":
            ctrl.scheduler.epoch_step()
            continue
        x, y = loader[event[1]]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(gm(x), y) + ctrl.loss()
        loss.backward()
        optimizer.step()
        ctrl.scheduler.step()


def _round_trip(obj):
    """``torch.save`` then ``torch.load(weights_only=True)``: checkpoints must stay plain data."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _checkpoint(ctrl, gm, optimizer):
    return _round_trip({"gm": gm.state_dict(), "ctrl": ctrl.state_dict(), "optimizer": optimizer.state_dict()})


def _resume(name, checkpoint, controller_first: bool = False):
    ctrl, gm, _ = _compile(name)
    if controller_first:  # either order of the two loads restores the same run
        ctrl.load_state_dict(checkpoint["ctrl"])
        load_state(gm, checkpoint["gm"])
    else:
        load_state(gm, checkpoint["gm"])
        ctrl.load_state_dict(checkpoint["ctrl"])
    optimizer = _optimizer(gm)
    optimizer.load_state_dict(checkpoint["optimizer"])
    return ctrl, gm, optimizer


def _assert_equal(got, expected, where="ctrl.state_dict()"):
    """Nested dicts/lists of numbers, strings and tensors: equal, tensors bitwise."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and list(got) == list(expected), where
        for key in expected:
            _assert_equal(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            _assert_equal(a, b, f"{where}[{i}]")
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


def _assert_same_state(gm, expected: dict):
    got = gm.state_dict()
    assert list(got) == list(expected)
    different = [k for k in got if not torch.equal(got[k], expected[k])]
    assert not different, f"differ after resuming: {different[:8]}"


@pytest.mark.parametrize("name", list(CASES))
def test_statistics_identical_after_loading_an_initialized_checkpoint(name):
    torch.manual_seed(0)
    ctrl, gm, inputs = _compile(name)
    ctrl.initialize(_loader(inputs[0], 4))
    checkpoint = _checkpoint(ctrl, gm, _optimizer(gm))
    ctrl2, _, _ = _resume(name, checkpoint)
    assert str(ctrl2.statistics()) == str(ctrl.statistics())
    assert ctrl2.statistics().to_dict() == ctrl.statistics().to_dict()
    _assert_equal(_round_trip(ctrl2.state_dict()), checkpoint["ctrl"])


@pytest.mark.parametrize("name", list(CASES))
def test_resumed_training_is_bitwise_the_uninterrupted_run(name):
    probe = CASES[name][2]
    torch.manual_seed(0)
    ctrl, gm, inputs = _compile(name)
    loader = _loader(inputs[0], STEPS_PER_EPOCH)
    ctrl.initialize(loader)
    optimizer = _optimizer(gm)
    events = _events()
    _train(ctrl, gm, optimizer, loader, events[:SAVE_AT])
    checkpoint = _checkpoint(ctrl, gm, optimizer)
    saved_statistics = ctrl.statistics()
    _train(ctrl, gm, optimizer, loader, events[SAVE_AT:])
    final_statistics = ctrl.statistics()
    assert probe(final_statistics.to_dict()) != probe(saved_statistics.to_dict())  # the schedule moved on

    torch.manual_seed(1234)  # whatever the RNG did meanwhile, the checkpoint restores what the run needs
    ctrl2, gm2, optimizer2 = _resume(name, checkpoint, controller_first=name == "pipeline")
    ctrl2.set_calibration_data(loader)  # staged quantization re-initializes ranges at a stage start
    assert str(ctrl2.statistics()) == str(saved_statistics)
    _train(ctrl2, gm2, optimizer2, loader, events[SAVE_AT:])
    _assert_same_state(gm2, gm.state_dict())
    assert str(ctrl2.statistics()) == str(final_statistics)
    _assert_equal(_round_trip(ctrl2.state_dict()), _round_trip(ctrl.state_dict()))


@pytest.mark.parametrize("corrupt, message", [
    (lambda state: state["quantization"]["quantizers"].popitem(), "quantization controller state does not match"),
    (lambda state: state["magnitude_sparsity"].pop("scheduler"),
     "part 'magnitude_sparsity': malformed state \\(KeyError"),
], ids=["quantizer_missing", "magnitude_scheduler_missing"])
def test_a_bad_controller_checkpoint_loads_nothing(corrupt, message):
    torch.manual_seed(0)
    ctrl, gm, inputs = _compile("pipeline")
    loader = _loader(inputs[0], STEPS_PER_EPOCH)
    ctrl.initialize(loader)
    _train(ctrl, gm, _optimizer(gm), loader, _events()[:SAVE_AT])
    state = _round_trip(ctrl.state_dict())
    corrupt(state)
    ctrl2, gm2, _ = _compile("pipeline")
    before_ctrl, before_gm = _round_trip(ctrl2.state_dict()), _round_trip(gm2.state_dict())
    with pytest.raises(CheckpointError, match=message):
        ctrl2.load_state_dict(state)
    _assert_equal(_round_trip(ctrl2.state_dict()), before_ctrl)
    _assert_same_state(gm2, before_gm)


@pytest.mark.parametrize("name", ["quantization", "binarization"])
def test_switches_set_by_hand_survive_a_checkpoint(name):
    torch.manual_seed(0)
    ctrl, gm, inputs = _compile(name)
    loader = _loader(inputs[0], STEPS_PER_EPOCH)
    ctrl.initialize(loader)
    _train(ctrl, gm, _optimizer(gm), loader, _events()[:SAVE_AT])  # epoch 1: activations on
    if name == "quantization":
        ctrl.quantization.activation_quantizers[0].module.enabled = False  # e.g. to look at one layer in float
    else:
        ctrl.binarization.set_binarization(activations=False, weights=True)
    checkpoint = _checkpoint(ctrl, gm, _optimizer(gm))
    ctrl2, gm2, _ = _resume(name, checkpoint)
    assert str(ctrl2.statistics()) == str(ctrl.statistics())
    gm.eval(), gm2.eval()
    assert torch.equal(gm2(inputs[0]), gm(inputs[0]))
