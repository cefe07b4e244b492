"""Accuracy-aware training: config validation, NNCF's level search on a scripted accuracy curve, and on digits."""
from __future__ import annotations

import csv
import warnings

import pytest
import torch
import torch.nn.functional as F

from fxcompress import Config, compile_for_compression
from fxcompress.accuracy_aware import (AdaptiveCompressionTrainingLoop, EarlyExitCompressionTrainingLoop,
                                       create_accuracy_aware_training_loop, validate_accuracy_aware_config)
from fxcompress.controller import CompressionController, ControllerPart
from fxcompress.errors import ConfigError
from fxcompress.passes import MagnitudeSparsity
from fxcompress.testing import digits_loaders, evaluate_accuracy, seeded, train_digits_cnn

ADAPTIVE = "adaptive_compression_level"


def block(mode=ADAPTIVE, **params):
    return {"mode": mode, "params": params}


# -- config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aa, field", [
    (block(maximal_relative_accuracy_degradation=1.0, maximal_absolute_accuracy_degradation=0.01),
     r"accuracy_aware_training\.params\.maximal_absolute_accuracy_degradation: give either"),
    (block(maximal_relative_accuracy_degradation=-1.0),
     r"accuracy_aware_training\.params\.maximal_relative_accuracy_degradation: -1\.0 is less than the minimum"),
    (block(maximal_absolute_accuracy_degradation=-0.5),
     r"accuracy_aware_training\.params\.maximal_absolute_accuracy_degradation: -0\.5 is less than the minimum"),
    (block("early_stop", maximal_relative_accuracy_degradation=1.0),
     r"accuracy_aware_training\.mode: 'early_stop' is not one of \['early_exit', 'adaptive_compression_level'\]"),
    (block(patience_epochs=2), r"accuracy_aware_training\.params\.maximal_relative_accuracy_degradation: the "
                               r"accuracy budget is missing"),
    (block("early_exit", maximal_relative_accuracy_degradation=1.0, patience_epochs=2),
     r"accuracy_aware_training\.params: unknown key 'patience_epochs'"),
    (block(maximal_relative_accuracy_degradation=1.0, patience_epoch=2),
     r"unknown key 'patience_epoch' \(did you mean 'patience_epochs'\?\)"),
    (block(maximal_relative_accuracy_degradation=1.0, minimal_compression_rate_step=0.2),
     r"accuracy_aware_training\.params\.minimal_compression_rate_step: 0\.2 is above initial_compression_rate_step"),
    (block(maximal_relative_accuracy_degradation=1.0, initial_compression_rate_step=1.5),
     r"accuracy_aware_training\.params\.initial_compression_rate_step"),
])
def test_bad_blocks_are_config_errors_naming_the_field(aa, field):
    with pytest.raises(ConfigError, match=field):
        validate_accuracy_aware_config(aa)
    with pytest.raises(ConfigError, match=field):  # the same from a whole config
        Config.from_dict({"compression": {"algorithm": "magnitude_sparsity"}, "accuracy_aware_training": aa})


def test_block_defaults_are_nncf_defaults():
    params = validate_accuracy_aware_config(block(maximal_relative_accuracy_degradation=1.0))
    assert params == {"mode": ADAPTIVE, "maximal_relative_accuracy_degradation": 1.0, "maximal_total_epochs": 10000,
                      "initial_training_phase_epochs": 5, "patience_epochs": 3, "initial_compression_rate_step": 0.1,
                      "compression_rate_step_reduction_factor": 0.5, "lr_reduction_factor": 0.5,
                      "minimal_compression_rate_step": 0.025}
    assert validate_accuracy_aware_config(block("early_exit", maximal_absolute_accuracy_degradation=0.01)) == {
        "mode": "early_exit", "maximal_absolute_accuracy_degradation": 0.01, "maximal_total_epochs": 10000}


def test_adaptive_mode_without_a_continuous_level_is_a_config_error():
    model = train_digits_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = Config.from_dict({"input_info": {"sample_size": [2, 1, 8, 8]},
                                   "compression": [{"algorithm": "quantization"}],
                                   "accuracy_aware_training": block(maximal_relative_accuracy_degradation=1.0)})
        ctrl, _ = compile_for_compression(model, config)
    with pytest.raises(ConfigError, match=r"accuracy_aware_training\.mode: 'adaptive_compression_level' searches the "
                                          r"level of an algorithm with a continuous compression level.*this model "
                                          r"has quantization"):
        create_accuracy_aware_training_loop(config, ctrl, 0.98)
    loop = create_accuracy_aware_training_loop(block("early_exit", maximal_relative_accuracy_degradation=1.0), ctrl,
                                               0.98)
    assert isinstance(loop, EarlyExitCompressionTrainingLoop)
    with pytest.raises(TypeError, match="uncompressed_model_accuracy"):
        create_accuracy_aware_training_loop(block("early_exit", maximal_relative_accuracy_degradation=1.0), ctrl)


# -- the search, on a scripted accuracy curve -------------------------------------------------------------

class ScriptedLevel(ControllerPart):
    """A part with a continuous level whose accuracy is a known function of the level."""
    algorithm = "scripted"

    def __init__(self, level):
        super().__init__()
        self.level, self.pinned_level = level, None

    @property
    def compression_rate(self):
        return self.level

    def set_compression_rate(self, level):
        self.pinned_level = self.level = level

    def state_dict(self):
        return {**super().state_dict(), "level": self.level}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.level = state["level"]


def test_search_steps_up_within_budget_down_after_patience_and_halves_the_step_on_each_turn():
    part = ScriptedLevel(0.3)
    model = torch.nn.Linear(1, 1)
    ctrl = CompressionController(None, [part])
    loop = create_accuracy_aware_training_loop(
        block(maximal_absolute_accuracy_degradation=0.01, initial_training_phase_epochs=1, patience_epochs=1,
              initial_compression_rate_step=0.1, minimal_compression_rate_step=0.025), ctrl, 0.99, report=None)
    assert isinstance(loop, AdaptiveCompressionTrainingLoop)
    epochs = []

    def train_epoch(ctrl_, model_, epoch, optimizer, lr_scheduler):
        epochs.append(epoch)
        with torch.no_grad():
            model_.weight.fill_(part.level)  # the "weights" remember the level they were trained at

    def validate(model_, epoch=None):
        return 0.99 if part.level <= 0.72 + 1e-9 else 0.9  # within budget up to level 0.72

    loop.run(model, train_epoch, validate, lambda: torch.optim.SGD(model.parameters(), lr=1.0))
    levels = [r.compression_rate for r in loop.history if r.phase == "search"]
    steps = [r.compression_rate_step for r in loop.history if r.phase == "search"]
    # up by 0.1 while within budget; 0.8 fails: turn, step 0.05; 0.75 fails: down again (no turn);
    # 0.7 fits: turn, step 0.025; 0.725 fails: turn, step 0.0125 < minimal step: one last epoch, end
    assert levels == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.75, 0.7, 0.725, 0.7125])
    assert steps == pytest.approx([0.1] * 6 + [0.05] * 2 + [0.025, 0.0125])
    assert loop.lr_factor == pytest.approx(0.5 ** 3)
    # the best model: the highest level within budget, restored with its weights and controller state
    assert loop.statistics.compression_rate == pytest.approx(0.7125) and part.level == pytest.approx(0.7125)
    assert model.weight.item() == pytest.approx(0.7125)
    assert loop.history[-1].phase == "final" and loop.statistics.accuracy_budget == pytest.approx(0.01)
    # the initial phase ends at once (0.3 is within budget): 9 epochs, all in the search
    assert epochs == list(range(9))


# -- digits ----------------------------------------------------------------------------------------------

@pytest.fixture
def digits():
    """Fresh loaders per test: a test's figures do not depend on what ran before it."""
    model = train_digits_cnn()
    train, test = digits_loaders(batch_size=64, seed=0)
    return model, train, test, evaluate_accuracy(model, test)


def train_epoch_fn(train):
    def train_epoch(ctrl, model, epoch, optimizer, lr_scheduler):
        model.train()
        for x, y in train:
            optimizer.zero_grad(set_to_none=True)
            (F.cross_entropy(model(x), y) + ctrl.loss()).backward()
            optimizer.step()
            ctrl.scheduler.step()
    return train_epoch


def test_adaptive_level_on_digits_ends_within_a_1_percent_budget_above_the_starting_level(digits, tmp_path):
    model, train, test, fp32 = digits
    start = 0.5
    ctrl, gm = compile_for_compression(
        model, [MagnitudeSparsity(sparsity_init=start, sparsity_target=start, sparsity_target_epoch=0)],
        model.example_input(), copy=True)
    lines = []
    loop = create_accuracy_aware_training_loop(
        {"log_dir": str(tmp_path), "accuracy_aware_training": block(
            maximal_relative_accuracy_degradation=1.0, initial_training_phase_epochs=0, patience_epochs=1,
            initial_compression_rate_step=0.2, minimal_compression_rate_step=0.1, maximal_total_epochs=3)},
        ctrl, fp32, report=lines.append)

    def validate(m, epoch=None):
        return evaluate_accuracy(m, test)

    with seeded(0):
        returned = loop.run(gm, train_epoch_fn(train), validate, lambda: torch.optim.Adam(gm.parameters(), lr=1e-3))
    assert returned is gm
    accuracy, level = validate(gm), ctrl.statistics().to_dict()["magnitude_sparsity"]
    assert accuracy >= fp32 * 0.99, f"{accuracy:.4f} vs fp32 {fp32:.4f}"
    assert accuracy == loop.statistics.compressed_accuracy
    assert level["current_target"] == loop.statistics.compression_rate > start
    assert level["sparsity"] == pytest.approx(loop.statistics.compression_rate, abs=1e-4)
    print(f"fp32 {fp32:.4f}; returned sparsity {level['sparsity']:.3f} at accuracy {accuracy:.4f} "
          f"after {loop.cumulative_epochs} epochs")
    # progress, the CSV of the search and the plot
    assert len(lines) == len(loop.history) and "budget" in lines[0] and "compression rate 0.5000" in lines[0]
    with (tmp_path / "accuracy_aware_history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(loop.history) and float(rows[-1]["compression_rate"]) == loop.statistics.compression_rate
    assert (tmp_path / "accuracy_vs_compression_rate.png").read_bytes()[:4] == b"\x89PNG"


def test_early_exit_stops_at_the_first_epoch_within_budget(digits):
    model, train, test, fp32 = digits
    ctrl, gm = compile_for_compression(
        model, [MagnitudeSparsity(sparsity_init=0.85, sparsity_target=0.85, sparsity_target_epoch=0)],
        model.example_input(), copy=True)
    trained = []
    train_epoch = train_epoch_fn(train)

    def counting_train_epoch(*args, **kwargs):
        trained.append(kwargs["epoch"])
        train_epoch(*args, **kwargs)

    loop = create_accuracy_aware_training_loop(
        block("early_exit", maximal_relative_accuracy_degradation=1.0, maximal_total_epochs=10), ctrl, fp32,
        report=None)
    with seeded(0):
        loop.run(gm, counting_train_epoch, lambda m, epoch=None: evaluate_accuracy(m, test),
                 lambda: torch.optim.Adam(gm.parameters(), lr=1e-3))
    accuracies = [r.accuracy for r in loop.history]
    minimal = fp32 * 0.99
    print(f"fp32 {fp32:.4f}; accuracy per epoch {[round(a, 4) for a in accuracies]}")
    assert accuracies[0] < minimal  # compression costs accuracy: fine-tuning is needed
    assert all(a < minimal for a in accuracies[:-1]) and accuracies[-1] >= minimal
    assert trained == list(range(len(accuracies) - 1)) and loop.cumulative_epochs == len(trained) < 10
    assert evaluate_accuracy(gm, test) == accuracies[-1]


def test_early_exit_without_meeting_the_budget_restores_the_most_accurate_epoch():
    part = ScriptedLevel(0.5)
    model = torch.nn.Linear(1, 1)
    ctrl = CompressionController(None, [part])
    accuracies = iter([0.5, 0.9, 0.7])  # before training, after epoch 1, after epoch 2
    lines = []
    loop = create_accuracy_aware_training_loop(
        block("early_exit", maximal_absolute_accuracy_degradation=0.01, maximal_total_epochs=2), ctrl, 0.99,
        report=lines.append)

    def train_epoch(ctrl_, model_, epoch, optimizer, lr_scheduler):
        with torch.no_grad():
            model_.weight.fill_(epoch + 1)

    def validate(model_, epoch=None):
        return next(accuracies, float(model_.weight))

    loop.run(model, train_epoch, validate)  # no optimizers: configure_optimizers_fn is optional
    assert [(r.epoch, r.phase, r.accuracy) for r in loop.history] == [
        (0, "early_exit", 0.5), (1, "early_exit", 0.9), (2, "early_exit", 0.7), (2, "final", 1.0)]
    assert model.weight.item() == 1.0  # the weights after epoch 1, the most accurate
    assert "not met in 2 epochs" in lines[-2]


def test_set_compression_rate_fixes_the_level_of_sparsity_and_pruning_controllers():
    from fxcompress.passes import FilterPruning, RBSparsity
    from fxcompress.testing import DigitsCNN
    model = DigitsCNN(seed=0).eval()
    x = model.example_input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(model, [
            MagnitudeSparsity(sparsity_target=0.5, sparsity_target_epoch=10),
            FilterPruning(pruning_target=0.5, pruning_steps=10, prune_first_conv=True)], x, copy=True)
        rb_ctrl, _ = compile_for_compression(model, [RBSparsity(sparsity_target=0.5, sparsity_target_epoch=10)], x,
                                             copy=True)
    magnitude, pruning = ctrl.parts
    magnitude.set_compression_rate(0.7)
    pruning.set_compression_rate(0.25)
    rb_ctrl.parts[0].set_compression_rate(0.6)
    for _ in range(3):  # the schedules move on; the fixed levels stay
        ctrl.scheduler.epoch_step()
        rb_ctrl.scheduler.epoch_step()
    stats = ctrl.statistics().to_dict()
    assert stats["magnitude_sparsity"]["sparsity"] == pytest.approx(0.7, abs=1e-4)
    assert stats["magnitude_sparsity"]["current_target"] == magnitude.compression_rate == 0.7
    assert stats["filter_pruning"]["pruning_level"] == pruning.compression_rate == 0.25
    assert [row["pruned"] for row in stats["filter_pruning"]["layers"]] == [4, 8, 8]  # a quarter of 16, 32, 32
    assert rb_ctrl.statistics().to_dict()["rb_sparsity"]["target_density"] == pytest.approx(0.4)
    # after a checkpoint round trip the same level does not recompute the masks
    masks = [layer.mask.mask.clone() for layer in magnitude.layers]
    state = ctrl.state_dict()
    with torch.no_grad():
        gm.conv2.weight.mul_(-1).add_(1)  # weights that would give other masks
    ctrl.load_state_dict(state)
    magnitude.set_compression_rate(0.7)
    assert all(torch.equal(m, layer.mask.mask) for m, layer in zip(masks, magnitude.layers))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        magnitude.set_compression_rate(1.0)
