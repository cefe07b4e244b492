"""Timing helpers shared by the benchmark scripts.

Configurations are timed interleaved (round robin over several rounds) and compared by
their medians, so load on the shared machine hits every configuration alike; ratios are
taken within one run.
"""
from __future__ import annotations

import random
import statistics
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from fxcompress import compile_for_compression
from fxcompress.testing import DigitsCNN, ResNetTiny


def interleaved_times(calls: dict, rounds: int, repeats: int, warmup: int = 2,
                      clock: Callable[[], float] = time.perf_counter) -> dict:
    """Seconds per call of each zero-argument callable, one figure per round; every round runs each
    configuration once, so load on the shared machine hits every configuration alike. The order
    within a round is a fresh (seeded) permutation: what runs right after another configuration
    inherits its cache state (a large fp32 model evicts the next model's weights), and a fixed
    order would charge that to the same configuration every round. ``clock`` may be
    ``time.process_time``: the process's CPU time, which leaves out the time a single-threaded
    computation waits for a core when the machine runs more jobs than it has cores."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: [] for name in calls}
    order, shuffler = list(calls), random.Random(0)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            call = calls[name]
            start = clock()
            for _ in range(repeats):
                call()
            times[name].append((clock() - start) / repeats)
    return times


def interleaved_medians(calls: dict, rounds: int, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per call of each zero-argument callable, timed round robin."""
    return {name: statistics.median(t) for name, t in interleaved_times(calls, rounds, repeats, warmup).items()}


def training_model(model_name: str):
    """(model, input batch, number of classes) of the small training-step benchmarks."""
    if model_name == "digits":
        return DigitsCNN(seed=0), torch.randn(64, 1, 8, 8), 10
    return ResNetTiny(num_classes=10, width=16, seed=0), torch.randn(32, 3, 32, 32), 10


def compiled_training_model(passes: list, model_name: str, device: str):
    """``(ctrl, gm, x, y)``: the model compiled with ``passes``, initialized on one batch, in train mode."""
    model, x, classes = training_model(model_name)
    y = torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    model, x, y = model.to(device), x.to(device), y.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(model, passes, example_inputs=(x,), copy=True)
        ctrl.initialize([(x, y)])
    gm.train()
    return ctrl, gm, x, y


def training_step(passes: list, model_name: str, device: str) -> Callable[[], None]:
    """One step of the user's loop on a compiled model: forward, ctrl.loss(), backward, Adam, scheduler."""
    ctrl, gm, x, y = compiled_training_model(passes, model_name, device)
    opt = torch.optim.Adam(gm.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(gm(x), y) + ctrl.loss()
        loss.backward()
        opt.step()
        ctrl.scheduler.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return step


def training_step_arguments(parser):
    """The command-line options every training-step benchmark takes."""
    parser.add_argument("--model", choices=["resnet_tiny", "digits"], default="resnet_tiny")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps timed per configuration per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    return parser


def time_training_steps(configs: dict, args) -> dict:
    """Median seconds per training step of each configuration (name -> pass factory), interleaved."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    steps = {name: training_step(make(), args.model, args.device) for name, make in configs.items()}
    return interleaved_medians(steps, args.rounds, args.steps, warmup=3)
