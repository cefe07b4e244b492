"""Post-training int8 of the digits CNN: fxcompress with and without fast bias correction, and
NNCF's ``nncf.quantize`` (torch backend) with and without it, side by side in one process.

Per train seed (the split, the trained DigitsCNN): fp32 test accuracy, then for each
configuration the accuracy drop against fp32 (450 test images: one image is 0.22 points) and
two measures finer than accuracy, on the test images: the mean over classes of
|mean logit shift| against fp32 (what bias correction targets) and the logit MSE against
fp32. Both get the same 300 training images (one per item): fxcompress
``quantize_post_training(model, images, subset_size=300)`` (no BatchNorm adaptation, as
``nncf.quantize``); NNCF 3.4 ``nncf.quantize(model, nncf.Dataset(images), subset_size=300)``
(fast bias correction; its torch backend refuses to turn it off), when nncf is importable (its
own venv: benchmarks/RESULTS.md says how it was made). ``--weight-bits 4`` quantizes weights to 4 bits (fxcompress
only: nncf.quantize has no 4-bit weights for conv layers), where weight rounding moves the
means far more.

    PYTHONPATH=. /tmp/perf/nncfvenv/bin/python benchmarks/bench_post_training.py
    .venv/bin/python benchmarks/bench_post_training.py --weight-bits 4
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import warnings

import torch

from checkout import use_this_checkout  # noqa: E402  (benchmarks/checkout.py)

ROOT = use_this_checkout()
os.environ.setdefault("TQDM_DISABLE", "1")

from fxcompress.passes import quantize_post_training  # noqa: E402
from fxcompress.testing import digits_loaders, evaluate_accuracy, train_digits_cnn  # noqa: E402


def _errors(model, x, reference):
    with torch.no_grad():
        diff = model(x) - reference
    return diff.mean(dim=0).abs().mean().item(), diff.pow(2).mean().item()


def _nncf(model, calibration):
    import nncf
    return nncf.quantize(copy.deepcopy(model), nncf.Dataset(calibration), subset_size=len(calibration))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--weight-bits", type=int, default=8)
    parser.add_argument("--subset-size", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    has_nncf = importlib.util.find_spec("nncf") is not None and args.weight_bits == 8
    if has_nncf:
        import nncf
        print(f"nncf {nncf.__version__}, torch {torch.__version__}")
    weights = {"bits": args.weight_bits}
    configs = {"fxcompress, no bias correction": lambda m, c: quantize_post_training(
                   m, c, subset_size=len(c), fast_bias_correction=False, weights=weights)[1],
               "fxcompress, fast bias correction (default)": lambda m, c: quantize_post_training(
                   m, c, subset_size=len(c), weights=weights)[1]}
    if has_nncf:
        # NNCF's torch backend refuses fast_bias_correction=False ("not supported")
        configs["NNCF, fast bias correction (default)"] = lambda m, t: _nncf(m, t)
    rows = {name: [] for name in configs}
    for seed in range(args.seeds):
        model = train_digits_cnn(seed=seed)
        train, test = digits_loaders(batch_size=64, seed=seed)
        # the same 300 training images for both, one per item (nncf.Dataset's subset_size counts items)
        calibration = [image[None] for batch in train for image in batch[0]][:args.subset_size]
        x = torch.cat([batch[0] for batch in test])
        with torch.no_grad():
            reference = model(x)
        fp32 = evaluate_accuracy(model, test)
        print(f"seed {seed}: fp32 {100 * fp32:.2f}%")
        for name, build in configs.items():
            torch.manual_seed(seed)
            quantized = build(model, calibration)
            drop = 100 * (fp32 - evaluate_accuracy(quantized, test))
            shift, mse = _errors(quantized, x, reference)
            rows[name].append((drop, shift, mse))
            print(f"  {name}: drop {drop:.2f} pt, |mean logit shift| {shift:.4f}, logit MSE {mse:.4f}")
    print(f"\nmeans over {args.seeds} seeds, weights {args.weight_bits} bits")
    print("| configuration | accuracy drop (pt) | mean |logit shift| | logit MSE |")
    print("|---|---|---|---|")
    for name, values in rows.items():
        mean = [sum(v[i] for v in values) / len(values) for i in range(3)]
        print(f"| {name} | {mean[0]:.2f} | {mean[1]:.4f} | {mean[2]:.4f} |")


if __name__ == "__main__":
    main()
