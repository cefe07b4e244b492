"""One small setup per algorithm, shared by the user-model and the distributed tests.

Every case compresses the tiny ResNet (BatchNorm after every conv) with BatchNorm adaptation
on: the algorithm's own ``initializer.batchnorm_adaptation`` where it has one, else (RB and
constant sparsity, as in NNCF) through a ``Quantize`` pass after it. Data are ``(x, y)``
batches, so mixed precision's Hessian has a loss to differentiate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxcompress.passes import (Binarization, ConstSparsity, FilterPruning, MagnitudeSparsity, MixedPrecision,
                               Quantize, RBSparsity)
from fxcompress.testing import build

BN_SAMPLES = 8
BN_ADAPTATION = {"batchnorm_adaptation": {"num_bn_adaptation_samples": BN_SAMPLES}}
QUANTIZE_INIT = {"range": {"num_init_samples": 8}, **BN_ADAPTATION}


def _quantize():
    return Quantize(bits=8, initializer=QUANTIZE_INIT)


CASES = {
    "quantization": lambda: [_quantize()],
    # fast bias correction corrects fc; the convs are skipped (BatchNorm adaptation re-centres them)
    "quantization_bias_correction": lambda: [Quantize(bits=8, initializer=QUANTIZE_INIT, fast_bias_correction=True)],
    "magnitude_sparsity": lambda: [MagnitudeSparsity(sparsity_init=0.5, sparsity_target=0.6, sparsity_target_epoch=2,
                                                     initializer=BN_ADAPTATION)],
    "rb_sparsity": lambda: [RBSparsity(sparsity_target=0.5, sparsity_target_epoch=2), _quantize()],
    "const_sparsity": lambda: [ConstSparsity(), _quantize()],
    "filter_pruning": lambda: [FilterPruning(pruning_target=0.5, schedule="baseline", prune_first_conv=True,
                                             prune_downsample_convs=True, initializer=BN_ADAPTATION)],
    "binarization": lambda: [Binarization(activations_quant_start_epoch=0, weights_quant_start_epoch=0,
                                          initializer={"range": {"num_init_samples": 8}, **BN_ADAPTATION})],
    "mixed_precision": lambda: [_quantize(), MixedPrecision(type="hawq", bits=[4, 8], compression_ratio=1.5,
                                                            num_data_points=8, iter_number=4)],
}
ALGORITHMS = tuple(CASES)


def model_and_example():
    """The user's model (eval mode, randomized BatchNorm statistics) and its example inputs."""
    case = build("resnet_tiny")
    with torch.no_grad():  # a zero in every conv weight, so constant sparsity has something to keep
        for m in case.model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.view(-1)[::3] = 0.0
    return case.model, case.example_inputs


def batches(seed: int, n: int = 2, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g) * (1 + seed), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def parameters_not_shared_with(gm: torch.nn.Module, model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The GraphModule's own parameters (compression parameters): not the user's model's tensors."""
    shared = {id(p) for p in model.parameters()}
    return [p for p in gm.parameters() if id(p) not in shared]


def train_steps(ctrl, gm, model, data, epochs: int = 2):
    """The README's loop: task loss + ``ctrl.loss()``, SGD on the compression parameters, scheduler steps."""
    own = parameters_not_shared_with(gm, model)
    optimizer = torch.optim.SGD(own, lr=0.05) if own else None
    gm.train()
    for _ in range(epochs):
        for x, y in data:
            loss = F.cross_entropy(gm(x), y) + ctrl.loss()
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            ctrl.scheduler.step()
        ctrl.scheduler.epoch_step()
    gm.eval()
