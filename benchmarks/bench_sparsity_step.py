"""Training-step overhead of sparsity, with and without int8 quantization, against the fp32 step.

A "step" is forward + backward + Adam update + ``ctrl.loss()`` + ``ctrl.scheduler.step()``,
as in the user's loop. Configurations are timed interleaved (round robin, several rounds)
and each ratio is the median step time of a configuration over the fp32 model's, all in
one run, so machine noise hits every configuration alike.

    .venv/bin/python benchmarks/bench_sparsity_step.py [--model resnet_tiny|digits] [--rounds 7] [--device cuda]

Prints a Markdown table (the RESULTS.md section is pasted from it).
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from fxcompress import compile_for_compression
from fxcompress.passes import MagnitudeSparsity, Quantize, RBSparsity
from fxcompress.testing import DigitsCNN, ResNetTiny


def build(model_name: str):
    if model_name == "digits":
        return DigitsCNN(seed=0), torch.randn(64, 1, 8, 8), 10
    return ResNetTiny(num_classes=10, width=16, seed=0), torch.randn(32, 3, 32, 32), 10


CONFIGS = {
    "fp32": lambda: [],
    "magnitude 50%": lambda: [MagnitudeSparsity(sparsity_init=0.5, sparsity_target=0.5)],
    "magnitude, level updated every step": lambda: [MagnitudeSparsity(
        sparsity_init=0.0, sparsity_target=0.9, sparsity_target_epoch=1000, update_per_optimizer_step=True,
        steps_per_epoch=1)],
    "rb": lambda: [RBSparsity(sparsity_init=0.0, sparsity_target=0.5, sparsity_target_epoch=1000)],
    "int8 (quantization only)": lambda: [Quantize(bits=8)],
    "magnitude 50% + int8": lambda: [MagnitudeSparsity(sparsity_init=0.5, sparsity_target=0.5), Quantize(bits=8)],
    "rb + int8": lambda: [RBSparsity(sparsity_init=0.0, sparsity_target=0.5, sparsity_target_epoch=1000),
                          Quantize(bits=8)],
}


def setup(name: str, model_name: str, device: str):
    model, x, classes = build(model_name)
    y = torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    model, x, y = model.to(device), x.to(device), y.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(model, CONFIGS[name](), example_inputs=(x,), copy=True)
        ctrl.initialize([(x, y)])
    gm.train()
    opt = torch.optim.Adam(gm.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(gm(x), y) + ctrl.loss()
        loss.backward()
        opt.step()
        ctrl.scheduler.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up
        step()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["resnet_tiny", "digits"], default="resnet_tiny")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps timed per configuration per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    steps = {name: setup(name, args.model, args.device) for name in CONFIGS}
    times = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["fp32"])
    quant = statistics.median(times["int8 (quantization only)"])
    print(f"model: {args.model}, {args.rounds} rounds x {args.steps} steps, {args.threads} thread(s), "
          f"{args.device}, interleaved medians")
    print("| configuration | ms / step | vs fp32 step | vs int8-only step |")
    print("|---|---|---|---|")
    for name in CONFIGS:
        t = statistics.median(times[name])
        print(f"| {name} | {t * 1e3:.1f} | {t / base:.2f}x | {t / quant:.2f}x |")


if __name__ == "__main__":
    main()
