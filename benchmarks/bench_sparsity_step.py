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


from fxcompress.passes import MagnitudeSparsity, Quantize, RBSparsity
from timing import time_training_steps, training_step_arguments


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    training_step_arguments(parser)
    args = parser.parse_args()
    times = time_training_steps(CONFIGS, args)
    base, quant = times["fp32"], times["int8 (quantization only)"]
    print(f"model: {args.model}, {args.rounds} rounds x {args.steps} steps, {args.threads} thread(s), "
          f"{args.device}, interleaved medians")
    print("| configuration | ms / step | vs fp32 step | vs int8-only step |")
    print("|---|---|---|---|")
    for name in CONFIGS:
        t = times[name]
        print(f"| {name} | {t * 1e3:.1f} | {t / base:.2f}x | {t / quant:.2f}x |")


if __name__ == "__main__":
    main()
