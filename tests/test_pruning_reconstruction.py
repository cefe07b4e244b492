"""Least-squares reconstruction of the layers reading pruned channels (passes/pruning/reconstruction.py).

- a pruned channel that is a linear combination of kept ones is reconstructed exactly: the pruned
  model computes the dense model's outputs;
- a linear consumer's solved weights equal the ridge least-squares solution computed directly;
- on a residual CNN the reconstructed model is much closer to the dense one than the merely
  masked model (numbers below), and folds to the same outputs;
- bad configurations are ConfigErrors; a failure part-way restores every weight and mask.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress import Config, ConfigError, compile_for_compression
from fxcompress.passes import FilterPruning
from fxcompress.passes.pruning import reconstruction
from fxcompress.testing import ResidualDigitsCNN, seeded

X = torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def _compile(model, reconstruct: dict | None = None, **params):
    options = {"pruning_target": 0.5, "schedule": "baseline", "prune_first_conv": True,
               "initializer": {"reconstruction": reconstruct if reconstruct is not None else {}}, **params}
    return compile_for_compression(model, [FilterPruning(**options)], (X[:2],), copy=True)


def _loader(x, batch=16):
    return [(x[i:i + batch],) for i in range(0, len(x), batch)]


class DependentChannel(nn.Module):
    """conv1 (1x1, 4 filters, the last a small multiple of the first minus the second) -> conv2 (3x3).
    Without a nonlinearity between them, the pruned filter's output is a linear combination of
    the kept ones', so conv2 can be solved to compute exactly what it did."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 1, bias=False)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight[3] = 0.05 * (self.conv1.weight[0] - self.conv1.weight[1])

    def forward(self, x):
        return self.conv2(self.conv1(x)).mean((2, 3))


def test_a_dependent_channel_is_reconstructed_exactly():
    model = DependentChannel().eval()
    ctrl, gm = _compile(model, {"num_samples": 64, "ridge": 0.0}, pruning_target=0.25)
    assert gm.conv1_weight_mask.mask.tolist() == [1.0, 1.0, 1.0, 0.0]  # L2: the small filter goes
    dense = model(X)
    masked_error = (gm.eval()(X) - dense).abs().max().item()
    ctrl.initialize(_loader(X))
    error = (gm.eval()(X) - dense).abs().max().item()
    assert masked_error > 5e-3 and error < 1e-6, (masked_error, error)  # measured: 9.2e-3 and 4.5e-8
    torch.testing.assert_close(ctrl.strip()(X), gm(X), rtol=0, atol=1e-5)  # the fold keeps the solution
    assert torch.equal(model.conv2.weight, DependentChannel().conv2.weight)  # the user's model is untouched


class PooledHead(nn.Module):
    """conv (6 filters) -> BatchNorm -> ReLU -> global mean -> fc: fc's input features are the channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_linear_consumer_gets_the_ridge_least_squares_solution():
    model = PooledHead().eval()
    ridge = 1e-2
    ctrl, gm = _compile(model, {"num_samples": 64, "ridge": ridge})
    keep = gm.conv_weight_mask.mask.bool()
    with torch.no_grad():  # by hand: the kept features, and the dense output less the bias
        features = F.relu(model.bn(model.conv(X))).mean((2, 3)).double()[:, keep]
        target = (model(X) - model.fc.bias).double()
    gram = features.T @ features
    expected = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * torch.eye(int(keep.sum()), dtype=gram.dtype),
                                  features.T @ target).T
    ctrl.initialize(_loader(X))
    weight = gm.fc.weight.detach()
    torch.testing.assert_close(weight[:, keep].double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(weight[:, ~keep], model.fc.weight[:, ~keep])  # pruned columns: left as they were
    assert torch.equal(gm.fc.bias, model.fc.bias)
    assert ctrl.filter_pruning._reconstructed == ["fc.weight"]


def test_residual_cnn_output_is_much_closer_to_the_dense_model():
    """ResidualDigitsCNN at half its channels, random weights, 256 calibration samples: relative output
    error to the dense model 0.767 merely masked, 0.090 reconstructed (every consumer of a pruned
    group: conv2, conv3, conv4, fc)."""
    with seeded(0):
        model = ResidualDigitsCNN().eval()
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ctrl, gm = compile_for_compression(model, [FilterPruning(
        pruning_target=0.5, schedule="baseline", prune_first_conv=True, prune_downsample_convs=True,
        initializer={"reconstruction": {"num_samples": 256}})], (x[:2],), copy=True)
    dense = model(x)

    def relative_error():
        with torch.no_grad():
            return ((gm.eval()(x) - dense).norm() / dense.norm()).item()

    masked = relative_error()
    ctrl.initialize(_loader(x, 64))
    reconstructed = relative_error()
    assert sorted(ctrl.filter_pruning._reconstructed) == ["conv2.weight", "conv3.weight", "conv4.weight", "fc.weight"]
    assert reconstructed < 0.2 * masked, (masked, reconstructed)
    torch.testing.assert_close(ctrl.strip()(x), gm(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("params, message", [
    ({"schedule": "exponential"}, "schedule 'baseline'"),
    ({"filter_importance": "taylor"}, "not 'taylor'"),
    ({"initializer": {"reconstruction": {"num_sample": 10}}}, "num_sample"),
    ({"initializer": {"reconstruction": {"ridge": -1}}}, "ridge"),
])
def test_bad_reconstruction_config_is_a_config_error(params, message):
    options = {"initializer": {"reconstruction": {}}, **params}
    with pytest.raises(ConfigError, match=message):
        FilterPruning(**options)


def test_a_failure_part_way_restores_every_weight_and_mask(monkeypatch):
    with seeded(0):
        model = ResidualDigitsCNN().eval()
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ctrl, gm = compile_for_compression(model, [FilterPruning(
        pruning_target=0.5, schedule="baseline", prune_first_conv=True,
        initializer={"reconstruction": {"num_samples": 32}})], (x[:2],), copy=True)
    before = {name: p for name, p in gm.named_parameters()}
    masks = {name: b.clone() for name, b in gm.named_buffers() if name.endswith("mask")}
    output = gm.eval()(x)
    solve, calls = reconstruction._solve, []

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("solver failed")
        return solve(*args, **kwargs)

    monkeypatch.setattr(reconstruction, "_solve", failing_second)
    with pytest.raises(RuntimeError, match="solver failed"):
        ctrl.initialize(_loader(x))
    assert len(calls) == 2  # the first layer had been replaced when the second failed
    assert all(p is before[name] for name, p in gm.named_parameters())
    assert all(torch.equal(b, masks[name]) for name, b in gm.named_buffers() if name.endswith("mask"))
    torch.testing.assert_close(gm(x), output, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no batches"):
        ctrl.initialize([])


def test_nncf_style_json_turns_it_on():
    config = Config.from_dict({"input_info": {"sample_size": [1, 3, 6, 6]},
                               "compression": {"algorithm": "filter_pruning",
                                               "params": {"schedule": "baseline", "pruning_target": 0.5,
                                                          "prune_first_conv": True},
                                               "initializer": {"reconstruction": {"num_samples": 64}}}})
    model = PooledHead().eval()
    ctrl, gm = compile_for_compression(model, config, copy=True)
    ctrl.initialize(_loader(X))
    assert ctrl.filter_pruning._reconstructed == ["fc.weight"]
    assert not torch.equal(gm.fc.weight, model.fc.weight)


def test_it_runs_once_needs_data_and_is_not_repeated_after_resuming_a_checkpoint():
    model = PooledHead().eval()
    ctrl, gm = _compile(model, {"num_samples": 64})
    with pytest.raises(ValueError, match="filter_pruning needs a data loader"):
        ctrl.initialize()
    ctrl.initialize(_loader(X))
    solved = gm.fc.weight
    ctrl.initialize(_loader(X))  # later initialize calls (e.g. BatchNorm adaptation again) do not solve again
    assert gm.fc.weight is solved
    resumed, resumed_gm = _compile(PooledHead().eval(), {"num_samples": 64})
    resumed.load_state_dict(ctrl.state_dict())
    resumed_gm.load_state_dict(gm.state_dict())
    assert not resumed.filter_pruning.needs_data()
    resumed.initialize(_loader(X))
    assert torch.equal(resumed_gm.fc.weight, solved)


def test_non_finite_calibration_data_is_a_clear_error_and_changes_nothing():
    model = PooledHead().eval()
    ctrl, gm = _compile(model, {"num_samples": 64})
    bad = X.clone()
    bad[3, 0, 2, 2] = float("nan")
    weight = gm.fc.weight
    with pytest.raises(ValueError, match="reconstruction of fc: non-finite values"):
        ctrl.initialize(_loader(bad))
    assert gm.fc.weight is weight and ctrl.filter_pruning.needs_data()
    ctrl.initialize(_loader(X))  # good data afterwards: solved as usual
    assert ctrl.filter_pruning._reconstructed == ["fc.weight"] and gm.fc.weight is not weight


def test_singular_inputs_without_ridge_take_the_least_norm_solution():
    """ridge 0 and a kept channel that copies another: X^T X is singular (``torch.linalg.solve`` refuses it,
    or returns entries of 1e13 when rounding hides it); the pseudo-inverse gives weights of the dense
    ones' size that reproduce the outputs."""
    model = DependentChannel().eval()
    with torch.no_grad():
        model.conv1.weight[2] = model.conv1.weight[0]  # kept channels 0 and 2 are the same
    ctrl, gm = _compile(model, {"num_samples": 64, "ridge": 0.0}, pruning_target=0.25)
    ctrl.initialize(_loader(X))
    torch.testing.assert_close(gm.eval()(X), model(X), rtol=0, atol=1e-5)
    assert gm.conv2.weight.abs().max() < 10 * model.conv2.weight.abs().max()
