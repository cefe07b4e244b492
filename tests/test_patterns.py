"""Pattern matching treats module, functional and method forms alike."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress import trace
from fxcompress.optable import kind_of
from fxcompress.patterns import Chain, Optional, find_nodes
from fxcompress.weights import weighted_ops


class Forms(nn.Module):
    """The same conv-bn-relu and residual add written four ways."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(4))
        self.relu = nn.ReLU()

    def forward(self, x):
        a = self.relu(self.bns[0](self.convs[0](x)))
        b = F.relu(self.bns[1](self.convs[1](a)))
        c = torch.relu(self.bns[2](self.convs[2](b)))
        d = self.bns[3](self.convs[3](c)).relu()
        return torch.add(a + b, c) + d


def test_relu_and_add_forms_map_to_one_kind():
    gm = trace(Forms().eval(), (torch.randn(1, 4, 6, 6),))
    kinds = [kind_of(n, gm) for n in gm.graph.nodes if n.op != "placeholder" and n.op != "output"]
    assert kinds.count("relu") == 4
    assert kinds.count("add") == 3
    assert len(find_nodes(gm, "conv")) == 4 and len(find_nodes(gm, "batch_norm")) == 4


def test_chain_matches_every_form_and_optional_steps():
    gm = trace(Forms().eval(), (torch.randn(1, 4, 6, 6),))
    matches = list(Chain("conv", "batch_norm", Optional("relu")).find(gm))
    assert len(matches) == 4
    assert all(m.get("relu") is not None for m in matches)
    assert [m["conv"].target for m in matches] == [f"convs.{i}" for i in range(4)]
    # Functional convs (after weighted_ops) match the same pattern.
    weighted_ops(gm)
    assert len(list(Chain("conv", "batch_norm", "relu").find(gm))) == 4


def test_chain_does_not_fuse_through_a_tensor_with_other_users():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # conv output feeds bn and the add

    gm = trace(Branch().eval(), (torch.randn(1, 2, 3, 3),))
    assert list(Chain("conv", "batch_norm").find(gm)) == []
    assert len(list(Chain("conv", Optional("batch_norm")).find(gm))) == 1


def test_chain_must_start_with_required_step():
    with pytest.raises(ValueError):
        Chain(Optional("relu"), "conv")
