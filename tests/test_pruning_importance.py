"""Filter importance criteria (passes/pruning/importance.py) and progressive pruning within an epoch.

Every criterion is checked against a direct computation on a hand-built residual model whose one
prunable channel group has two producing convs and two BatchNorms, so the group sum matters: the
scores equal the reference, and the pruned channels are the reference's lowest-ranked ones.
"""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress import Config, ConfigError, compile_for_compression
from fxcompress.passes import FilterPruning

CHANNELS = 6


class TwoProducers(nn.Module):
    """``relu(bn1(conv1(x)) + bn2(conv2(x)))`` then a head: one group of 6 channels made by two convs."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, CHANNELS, 3, padding=1, bias=False), nn.BatchNorm2d(CHANNELS)
        self.conv2, self.bn2 = nn.Conv2d(3, CHANNELS, 1, bias=False), nn.BatchNorm2d(CHANNELS)
        self.head = nn.Conv2d(CHANNELS, 4, 1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)) + self.bn2(self.conv2(x)))
        return self.head(y).mean((2, 3))


def _model():
    torch.manual_seed(0)
    model = TwoProducers()
    with torch.no_grad():  # distinct scales per filter and per BatchNorm channel, so the criteria disagree
        model.conv1.weight.mul_(torch.tensor([1.0, 3.0, 0.2, 2.0, 0.5, 1.5]).view(-1, 1, 1, 1))
        model.conv2.weight.mul_(torch.tensor([2.5, 0.3, 1.0, 0.4, 3.0, 0.6]).view(-1, 1, 1, 1))
        model.bn1.weight.copy_(torch.tensor([0.9, -0.1, 1.4, 0.3, -0.8, 0.2]))
        model.bn2.weight.copy_(torch.tensor([0.1, 0.7, -0.05, 1.2, 0.2, 0.15]))
    return model.eval()


INPUT = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(1))
TARGET = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])


def _filters(weight: torch.Tensor) -> np.ndarray:
    return weight.detach().double().reshape(weight.shape[0], -1).numpy()


def reference_scores(model: TwoProducers, criterion: str) -> np.ndarray:
    """The group's importance per channel, computed directly from the model (not with fxcompress)."""
    convs, bns = (model.conv1, model.conv2), (model.bn1, model.bn2)
    if criterion == "bn_scale":
        return sum(np.abs(bn.weight.detach().double().numpy()) for bn in bns)
    if criterion == "group_l2":  # per channel, the mean of sum w**2 over its 5 members (Torch-Pruning's group L2)
        head = model.head.weight.detach().double().numpy()  # [4, 6, 1, 1]: the consumer's input slices
        members = [(_filters(c.weight) ** 2).sum(1) for c in convs]
        members += [bn.weight.detach().double().numpy() ** 2 for bn in bns]
        members.append((head ** 2).sum(axis=(0, 2, 3)))
        return sum(members) / len(members)
    if criterion == "taylor":  # one backward pass of the dense model on the same batch and loss
        dense = copy.deepcopy(model).train()
        F.cross_entropy(dense(INPUT), TARGET).backward()
        return sum(np.abs(_filters(c.weight) * _filters(c.weight.grad)).sum(1)
                   for c in (dense.conv1, dense.conv2))
    total = np.zeros(CHANNELS)
    for conv in convs:
        f = _filters(conv.weight)
        for c in range(CHANNELS):
            if criterion == "L1":
                total[c] += np.abs(f[c]).sum()
            elif criterion == "L2":
                total[c] += np.sqrt((f[c] ** 2).sum())
            else:  # geometric_median: summed distance to the layer's other filters
                total[c] += sum(np.sqrt(((f[c] - f[o]) ** 2).sum()) for o in range(CHANNELS))
    return total


def _compile(model, **params):
    options = {"pruning_target": 0.5, "schedule": "baseline", "prune_first_conv": True, **params}
    return compile_for_compression(model, [FilterPruning(**options)], (INPUT,), copy=True)


def _pruned_channels(gm) -> set[int]:
    return set(np.nonzero(gm.conv1_weight_mask.mask.numpy() == 0)[0].tolist())


def _train_step(ctrl, gm):
    gm.train()
    F.cross_entropy(gm(INPUT), TARGET).backward()
    ctrl.scheduler.step()


@pytest.mark.parametrize("criterion", ["L1", "L2", "geometric_median", "group_l2", "bn_scale", "taylor"])
def test_criterion_matches_direct_computation(criterion):
    model = _model()
    expected = reference_scores(model, criterion)
    ctrl, gm = _compile(model, filter_importance=criterion)
    part = ctrl.filter_pruning
    if criterion == "taylor":
        assert _pruned_channels(gm) == set()  # masks wait for the first backward pass
        with torch.no_grad():
            gm.train()(INPUT)  # a forward without backward gives no gradients: still nothing pruned
        ctrl.scheduler.step()
        assert _pruned_channels(gm) == set()
        gm.zero_grad()
        gm.train()
        F.cross_entropy(gm(INPUT), TARGET).backward()
        scores = part.scores()  # before the step consumes the gathered gradients
        ctrl.scheduler.step()
    else:
        scores = part.scores()
    classes = part.analysis.classes_of(part.groups[0].producers[0].out_space)
    np.testing.assert_allclose(scores[classes], expected, rtol=1e-6)
    lowest = set(np.argsort(expected, kind="stable")[:CHANNELS // 2].tolist())
    assert _pruned_channels(gm) == lowest
    assert ctrl.statistics().to_dict()["filter_pruning"]["layers"][0]["pruned"] == CHANNELS // 2


def test_criteria_rank_the_hand_built_case_differently():
    """The reference case separates the criteria (else the test above could pass with the wrong one)."""
    model = _model()
    orders = {c: tuple(np.argsort(reference_scores(model, c), kind="stable").tolist())
              for c in ("L1", "L2", "geometric_median", "group_l2", "bn_scale", "taylor")}
    assert len(set(orders.values())) == 6, orders


def test_taylor_accumulates_over_backward_passes_and_restarts_after_masks_are_set():
    model = _model()
    ctrl, gm = _compile(model, filter_importance="taylor", pruning_target=0.3,
                        schedule="exponential", update_per_optimizer_step=True, pruning_steps=1,
                        steps_per_epoch=2)
    part = ctrl.filter_pruning
    gm.train()
    for _ in range(2):  # two backward passes of the same batch: the sum doubles
        F.cross_entropy(gm(INPUT), TARGET).backward()
    classes = part.analysis.classes_of(part.groups[0].producers[0].out_space)
    np.testing.assert_allclose(part.scores()[classes], 2 * reference_scores(model, "taylor"), rtol=1e-6)
    ctrl.scheduler.step()  # sets masks from the sum, then starts a new one
    assert part.current_level > 0 and not part.taylor.ready


def test_taylor_without_gradients_is_a_clear_error_and_the_model_still_pickles():
    ctrl, gm = _compile(_model(), filter_importance="taylor")
    with pytest.raises(RuntimeError, match="backward pass"):
        ctrl.filter_pruning.set_pruning_level(0.5)
    assert ctrl.filter_pruning.taylor.attached
    clone = pickle.loads(pickle.dumps(gm))  # the gradient hooks live on the parameters, not in the graph
    torch.testing.assert_close(clone.eval()(INPUT), gm.eval()(INPUT), rtol=0, atol=0)
    copy.deepcopy(gm)
    _train_step(ctrl, gm)  # baseline: the target right after the first backward pass, then frozen
    assert ctrl.statistics().to_dict()["filter_pruning"]["frozen"]
    assert not ctrl.filter_pruning.taylor.attached  # no gradient hooks once masks are frozen
    resumed, resumed_gm = _compile(_model(), filter_importance="taylor")
    resumed.load_state_dict(ctrl.state_dict())  # a checkpoint with frozen masks: no hooks, same masks
    assert not resumed.filter_pruning.taylor.attached
    assert _pruned_channels(resumed_gm) == _pruned_channels(gm) and len(_pruned_channels(gm)) == CHANNELS // 2


@pytest.mark.parametrize("params, message", [
    ({"filter_importance": "taylr"}, "'L2', 'L1', 'geometric_median', 'group_l2', 'taylor', 'bn_scale'"),
    ({"filter_importance": "group_l2", "interlayer_ranking_type": "learned_ranking", "all_weights": True},
     "learned_ranking"),
    ({"filter_importance": "taylor", "interlayer_ranking_type": "learned_ranking", "all_weights": True},
     "learned_ranking"),
    ({"pruning_steps": 0.5}, "update_per_optimizer_step"),
    ({"update_per_optimizer_step": True, "pruning_steps": 0.5}, "steps_per_epoch"),
    ({"steps_per_epoch": 10}, "update_per_optimizer_step: true only"),
])
def test_config_names_validate(params, message):
    with pytest.raises(ConfigError, match=message):
        FilterPruning(**params)


def test_nncf_style_json_takes_the_new_criteria():
    config = Config.from_dict({"input_info": {"sample_size": [1, 3, 5, 5]},
                               "compression": {"algorithm": "filter_pruning",
                                               "params": {"filter_importance": "bn_scale", "schedule": "baseline",
                                                          "pruning_target": 0.5, "prune_first_conv": True}}})
    ctrl, gm = compile_for_compression(_model(), config, copy=True)
    assert _pruned_channels(gm) == set(np.argsort(reference_scores(_model(), "bn_scale"))[:3].tolist())


def test_bn_scale_without_batchnorm_is_a_config_error_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="no BatchNorm follows"):
        compile_for_compression(model, [FilterPruning(filter_importance="bn_scale", prune_first_conv=True)],
                                (INPUT,))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[0], nn.Conv2d) and len(list(model.modules())) == 4


def test_progressive_within_one_epoch_follows_the_schedule_and_only_adds_channels():
    steps = 8
    ctrl, gm = _compile(_model(), filter_importance="L2", pruning_target=0.5, schedule="exponential",
                        update_per_optimizer_step=True, pruning_steps=0.5, steps_per_epoch=steps)
    part = ctrl.filter_pruning
    levels, pruned_sets = [], []
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.5)  # large steps: L2 norms change order between steps
    for _ in range(steps):
        optimizer.zero_grad()
        _train_step(ctrl, gm)
        optimizer.step()
        levels.append(part.current_level)
        pruned_sets.append(_pruned_channels(gm))
    # density 1 - level decays exponentially to 0.5 at t = 0.5 epoch (4 of 8 steps), then stays
    expected = [min(1 - 0.5 ** ((s / steps) / 0.5), 0.5) for s in range(1, steps + 1)]
    np.testing.assert_allclose(levels, expected, rtol=1e-9)
    assert [len(p) for p in pruned_sets] == [round(level * CHANNELS) for level in expected]
    assert all(a <= b for a, b in zip(pruned_sets, pruned_sets[1:]))  # a pruned channel stays pruned
    assert not ctrl.statistics().to_dict()["filter_pruning"]["frozen"]
    ctrl.scheduler.epoch_step()
    assert ctrl.statistics().to_dict()["filter_pruning"]["frozen"]  # frozen from epoch ceil(0.5) = 1


def test_group_l2_in_global_ranking_divides_each_group_by_its_mean():
    """all_weights: groups are compared after dividing each group's scores by their mean (Torch-Pruning's
    normalizer="mean"), so a group with larger weights does not take all the pruning."""
    model = _model()
    ctrl, gm = _compile(model, filter_importance="group_l2", all_weights=True)
    part = ctrl.filter_pruning
    classes = part.analysis.classes_of(part.groups[0].producers[0].out_space)
    expected = reference_scores(model, "group_l2")
    np.testing.assert_allclose(part.scores()[classes], expected / expected.mean(), rtol=1e-6)
