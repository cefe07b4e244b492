"""The one MAC counter (fxcompress.flops) against torch's own FLOP counter, an independent reference."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fxcompress import trace
from fxcompress.flops import model_macs, op_macs
from fxcompress.optable import Kind, op_kind
from fxcompress.weights import functionalize_weighted


class MatMul(nn.Module):
    def forward(self, x):
        return torch.matmul(x, x.transpose(1, 2)) @ x  # [B, T, D] @ [B, D, T], then [B, T, T] @ [B, T, D]


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 2, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight, None, 1, 1, groups=3)


CASES = {
    "conv": (lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1), (2, 3, 9, 11)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 5), (2, 4, 17)),
    "grouped_conv": (lambda: nn.Conv2d(8, 12, 3, groups=4, padding=1), (2, 8, 7, 7)),
    "depthwise_conv": (lambda: nn.Conv2d(8, 8, 3, groups=8, dilation=2), (2, 8, 9, 9)),
    "functional_grouped_conv": (Functional, (2, 6, 5, 5)),
    "conv_transpose": (lambda: nn.ConvTranspose2d(8, 4, 3, stride=2, groups=2), (2, 8, 5, 6)),
    "linear": (lambda: nn.Linear(16, 24), (2, 16)),
    "linear_tokens": (lambda: nn.Linear(16, 24), (2, 5, 16)),
    "matmul": (MatMul, (2, 5, 7)),
    "conv_stack": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(),
                                         nn.Linear(8 * 3 * 3, 10)), (2, 3, 7, 7)),
}


def _torch_flops(model, x) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_macs_match_torch_flop_counter(name, functional):
    make, shape = CASES[name]
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(shape)
    gm = trace(model, (x,))
    if functional:
        functionalize_weighted(gm)
    counted = [n for n in gm.graph.nodes if op_macs(n, gm) is not None]
    assert counted, "the counter saw none of the model's ops"
    expected = _torch_flops(model, x)
    assert expected > 0
    # per-sample MACs x batch x 2 (a multiply-add is two FLOPs)
    assert 2 * shape[0] * model_macs(gm) == expected


def test_only_conv_linear_matmul_are_counted():
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).eval(), (torch.randn(1, 3, 4, 4),))
    per_node = {op_kind(n, gm): op_macs(n, gm) for n in gm.graph.nodes if op_kind(n, gm) is not None}
    assert per_node == {Kind.conv: 3 * 4 * 16, Kind.batch_norm: None, Kind.relu: None}
    assert model_macs(gm, kinds=[Kind.batch_norm]) == 0
