"""Pattern matching treats module, functional and method forms alike."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress import trace
import pickle

from fxcompress.optable import Kind, kind_of, kinds_tagged, op_arg, op_kind
from fxcompress.patterns import Chain, Optional, find_nodes
from fxcompress.weights import WEIGHTED_KINDS, functionalize_weighted, weighted_ops
from test_flops import Functional


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
    assert weighted_ops(gm) == []  # a query: module calls are listed only once functionalized
    assert functionalize_weighted(gm) == 4
    assert functionalize_weighted(gm) == 0  # idempotent
    assert len(weighted_ops(gm)) == 4
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


def test_kinds_are_objects_and_a_misspelt_kind_raises():
    with pytest.raises(AttributeError, match="unknown op kind 'cnov'"):
        Kind.cnov  # noqa: B018
    with pytest.raises(KeyError, match="unknown op kind 'batchnorm'"):
        Chain("conv", "batchnorm")
    with pytest.raises(KeyError, match="no op kind has the tag"):
        kinds_tagged("quantisation_agnostic")
    assert pickle.loads(pickle.dumps(Kind.conv)) is Kind.conv
    with pytest.raises(TypeError, match="compared as objects"):
        "conv" in WEIGHTED_KINDS  # noqa: B015 - code still comparing names fails loudly
    assert kinds_tagged("quantization_agnostic") == {Kind.max_pool, Kind.flatten, Kind.reshape, Kind.transpose,
                                                      Kind.dropout, Kind.identity}
    gm = trace(Forms().eval(), (torch.randn(1, 4, 6, 6),))
    match = next(Chain(Kind.conv, Kind.batch_norm).find(gm))
    assert match[Kind.conv] is match["conv"] and op_kind(match[Kind.batch_norm], gm) is Kind.batch_norm


def test_op_arg_reads_positional_and_keyword_arguments_by_name():
    gm = trace(Functional(), (torch.randn(1, 6, 5, 5),))  # F.conv2d(x, w, None, 1, 1, groups=3)
    conv = find_nodes(gm, Kind.conv)[0]
    assert op_arg(conv, Kind.conv, "groups", 1) == 3          # keyword
    assert op_arg(conv, Kind.conv, "padding") == 1            # positional
    assert op_arg(conv, Kind.conv, "dilation", 1) == 1        # absent: the default
    with pytest.raises(KeyError, match="has no argument 'group'"):
        op_arg(conv, Kind.conv, "group")
