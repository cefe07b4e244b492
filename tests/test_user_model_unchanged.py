"""The user's model is never mutated: with ``copy=False`` the GraphModule shares the user's
parameters but owns its buffers, and no algorithm's ``initialize()`` (BatchNorm adaptation
included) or training step writes into the user's tensors or flips its modules' modes.
Also the BatchNorm adaptation itself (fxcompress.batchnorm) against an independent recurrence."""
import pytest
import torch
import torch.nn as nn

from compression_cases import ALGORITHMS, BN_SAMPLES, CASES, batches, model_and_example, train_steps
from fxcompress import compile_for_compression
from fxcompress.batchnorm import adapt_batchnorm, batchnorm_layers
from fxcompress.data import CalibrationData


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_initialize_and_training_leave_the_user_model_bitwise_unchanged(algorithm):
    torch.manual_seed(0)
    model, example = model_and_example()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    ctrl, gm = compile_for_compression(model, CASES[algorithm](), example_inputs=example, copy=False)
    assert any(p is q for p in gm.parameters() for q in model.parameters())  # copy=False shares parameters
    data = batches(seed=1)
    ctrl.initialize(data)
    adapted = {name: (bn.running_mean.clone(), bn.running_var.clone())
               for name, bn in gm.named_modules() if bn in batchnorm_layers(gm)}
    assert adapted, "the case must have BatchNorm layers"
    # BatchNorm adaptation ran: the graph's statistics moved away from the user's
    moved = [name for name, (mean, _) in adapted.items()
             if not torch.equal(mean, state.get(f"{name}.running_mean", mean))]
    assert moved, "BatchNorm adaptation changed no statistics: the test would prove nothing"
    train_steps(ctrl, gm, model, batches(seed=2))
    after = model.state_dict()
    assert after.keys() == state.keys()
    changed = [k for k in state if not torch.equal(after[k], state[k]) or after[k].dtype != state[k].dtype]
    assert not changed, f"{algorithm} wrote into the user's model: {changed}"
    assert {name: m.training for name, m in model.named_modules()} == modes


# -- the BatchNorm adaptation itself ----------------------------------------------------------------

class ConvDropoutBN(nn.Module):
    """Dropout before the BatchNorm: if it ran in train mode, the statistics would show it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm2d(3, momentum=0.3)

    def forward(self, x):
        return self.bn(self.drop(self.conv(x))).relu()


def test_adaptation_is_nncf_ema_with_only_batchnorm_in_train_mode_and_modes_restored():
    torch.manual_seed(0)
    model = ConvDropoutBN()
    model.eval()
    model.drop.train()  # a mixed mode, to check every flag comes back as it was
    data = [torch.randn(4, 2, 5, 5) * 3 + 1 for _ in range(4)]
    gm = torch.fx.symbolic_trace(model)
    mean, var = gm.bn.running_mean.clone(), gm.bn.running_var.clone()
    modes = {name: m.training for name, m in gm.named_modules()}
    buffers = {id(b) for b in gm.buffers()}
    layers = adapt_batchnorm(gm, CalibrationData(data), num_samples=12, progress=None)  # 3 batches of 4
    assert layers == [gm.bn]
    # independent recurrence: the layer's momentum from the trained statistics, dropout off (eval)
    for x in data[:3]:
        y = torch.nn.functional.conv2d(x, model.conv.weight, model.conv.bias, padding=1).double()
        n = y.numel() / y.shape[1]
        batch_mean, batch_var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False) * n / (n - 1)
        mean = 0.7 * mean.double() + 0.3 * batch_mean
        var = 0.7 * var.double() + 0.3 * batch_var
    torch.testing.assert_close(gm.bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gm.bn.running_var.double(), var, rtol=1e-5, atol=1e-5)
    assert int(gm.bn.num_batches_tracked) == 3 and gm.bn.momentum == 0.3
    assert {name: m.training for name, m in gm.named_modules()} == modes
    assert {id(b) for b in gm.buffers()} == buffers  # written in place: DDP's buffer references stay valid


def test_adaptation_without_batches_is_an_error_and_zero_samples_a_no_op():
    gm = torch.fx.symbolic_trace(ConvDropoutBN().eval())
    with pytest.raises(ValueError, match="no batches for BatchNorm adaptation"):
        adapt_batchnorm(gm, CalibrationData([]), num_samples=BN_SAMPLES, progress=None)
    before = gm.bn.running_mean.clone()
    assert adapt_batchnorm(gm, CalibrationData([torch.randn(2, 2, 5, 5)]), num_samples=0, progress=None) == []
    assert torch.equal(gm.bn.running_mean, before)


def test_compile_gives_the_graph_its_own_buffers_and_shares_parameters():
    model, example = model_and_example()
    _, gm = compile_for_compression(model, [], example_inputs=example)
    user_buffers = {id(b) for b in model.buffers()}
    assert not any(id(b) in user_buffers for b in gm.buffers())
    assert {id(p) for p in gm.parameters()} == {id(p) for p in model.parameters()}
    gm.train()
    gm(torch.randn(4, 3, 32, 32))  # a train-mode forward updates running statistics in place
    assert torch.equal(model.bn1.running_mean, build_fresh_running_mean())


def build_fresh_running_mean():
    model, _ = model_and_example()
    return model.bn1.running_mean
