"""The channel rules of the pruning analysis are registered by op kind object, one rule per kind.

How channels flow through each op is tested on models in test_pruning.py and test_pruning_groups.py;
this file checks the registry itself: what it refuses, that every kind the op table marks
channel-preserving has a rule, and that a kind mixing channels (GroupNorm) has none and pins them.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fxcompress import trace
from fxcompress.optable import OPS, Kind
from fxcompress.passes.pruning.channels import channel_rule, rule_kinds
from fxcompress.passes.pruning.dependency import analyze_channels
from fxcompress.weights import functionalize_weighted, weighted_ops


def test_a_rule_is_registered_by_kind_object_not_by_name():
    before = rule_kinds()
    with pytest.raises(TypeError, match=r"Kind\.group_norm"):
        channel_rule("group_norm")
    with pytest.raises(ValueError, match="already has the channel rule"):
        channel_rule(Kind.group_norm, Kind.cat)  # cat has a rule: nothing is registered
    assert rule_kinds() == before and Kind.group_norm not in before


def test_every_channel_preserving_kind_has_a_rule_and_channel_mixing_kinds_none():
    kinds = rule_kinds()
    assert {k for k in OPS if k.channel_passthrough} <= kinds
    assert {Kind.conv, Kind.conv_transpose, Kind.linear, Kind.addmm, Kind.cat, Kind.add, Kind.flatten,
            Kind.reshape, Kind.transpose, Kind.mean, Kind.layer_norm} <= kinds
    assert not {Kind.group_norm, Kind.softmax, Kind.matmul, Kind.attention, Kind.embedding} & kinds


class ConvGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(self.gn(self.c1(x))))).mean((2, 3))


def test_a_kind_without_a_rule_pins_the_channels_reaching_it():
    model, x = ConvGroupNorm().eval(), torch.randn(2, 3, 8, 8)
    gm = trace(model, (x,))
    functionalize_weighted(gm)
    analysis = analyze_channels(gm, weighted_ops(gm))
    groups = {g.describe(): g for g in analysis.groups}
    assert set(groups) == {"c1", "c2", "c3"}
    assert len(groups["c1"].reasons) == 1 and "GroupNorm" in groups["c1"].reasons[0] \
        and "does not understand" in groups["c1"].reasons[0]
    assert groups["c2"].prunable and groups["c2"].size == 4
    assert [c.name for c in groups["c2"].consumers] == ["c3"]
    assert "model output" in groups["c3"].reasons[0]
