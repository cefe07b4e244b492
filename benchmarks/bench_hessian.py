"""Time of HAWQ's Hessian-trace estimation (Hutchinson), per layer and in total, on the digits CNN and
a ResNet-18-shaped network; and (``--accuracy``) the digits accuracy of HAWQ's choice after a short
fine-tune against uniform and trace-order-violating assignments.

Timing figures, all measured in one run, one thread:
- one Hutchinson iteration (one Rademacher probe over all quantized layers, all batches) against one
  training step (forward + backward) on the same batches;
- probing 4 vectors per forward pass (what the pass does) against 1;
- each layer's trace estimated alone (a probe on that layer only) against the joint iteration;
- iterations and seconds until the default stopping rule (tolerance 1e-4) holds.

    .venv/bin/python benchmarks/bench_hessian.py            # timing
    .venv/bin/python benchmarks/bench_hessian.py --accuracy # digits accuracy figures
"""
from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fxcompress import compile_for_compression
from fxcompress.data import CalibrationData
from fxcompress.passes import MixedPrecision, Quantize
from fxcompress.passes.mixed_precision.selection import compression_ratio, monotone_configurations, select_bitwidths
from fxcompress.quantizers import FakeQuantizer
from fxcompress.testing import digits_loaders, evaluate_accuracy, resnet18_like, train_digits_cnn

QUICK = {"range": {"num_init_samples": 64}, "batchnorm_adaptation": {"num_bn_adaptation_samples": 0}}


def _compile(model, example, **mixed):
    ctrl, gm = compile_for_compression(model, [Quantize(bits=8, initializer=QUICK), MixedPrecision(**mixed)],
                                       example_inputs=(example,), copy=True)
    return ctrl, gm, next(p for p in ctrl.parts if p.algorithm == "mixed_precision")


def _train_step_seconds(gm, loader, repeats: int) -> float:
    quantizers = [m for m in gm.modules() if isinstance(m, FakeQuantizer)]
    for q in quantizers:
        q.enabled = False  # the Hessian is taken of the float model: compare with a float step
    gm.eval()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for x, y in loader:
            loss = F.cross_entropy(gm(x), y)
            torch.autograd.grad(loss, [p for p in gm.parameters() if p.requires_grad], allow_unused=True)
        times.append(time.perf_counter() - start)
    for q in quantizers:
        q.enabled = True
    return statistics.median(times[1:])


def _iteration_seconds(part, gm, data, layers, iterations: int, probes: int) -> float:
    part.params.update(iter_number=iterations, tolerance=0.0)
    start = time.perf_counter()
    est = part.estimate_traces(gm, data, layers=layers, progress="", probes_per_pass=probes)
    assert est.iterations == iterations
    return (time.perf_counter() - start) / iterations


def timing(name, model, loader, example, iterations: int, repeats: int, converge_cap: int):
    samples = sum(len(x) for x, _ in loader)
    ctrl, gm, part = _compile(model, example, num_data_points=samples)
    data = CalibrationData(loader, model=gm)
    step = _train_step_seconds(gm, loader, repeats)
    joint1 = _iteration_seconds(part, gm, data, part.layers, iterations, probes=1)
    joint4 = _iteration_seconds(part, gm, data, part.layers, iterations, probes=4)
    per_layer = [(layer.module_path, layer.params,
                  _iteration_seconds(part, gm, data, [layer], max(4, iterations // 2), probes=4))
                 for layer in part.layers]
    part.params.update(iter_number=converge_cap, tolerance=1e-4)
    start = time.perf_counter()
    est = part.estimate_traces(gm, data, progress="")
    converge_seconds = time.perf_counter() - start

    print(f"\n## {name}: {len(part.layers)} quantized layers, {samples} samples per iteration")
    print(f"training step (fwd+bwd over the same batches): {step * 1000:.1f} ms")
    print("| measure | ratio | ms |\n|---|---|---|")
    print(f"| Hutchinson iteration, 1 probe per pass, vs training step | {joint1 / step:.2f}x | {joint1 * 1000:.1f} |")
    print(f"| Hutchinson iteration, 4 probes per pass, vs training step | {joint4 / step:.2f}x | {joint4 * 1000:.1f} |")
    print(f"| 4 probes per pass vs 1 (per iteration) | {joint4 / joint1:.2f}x | |")
    total = sum(t for *_, t in per_layer)
    print(f"| sum of per-layer iterations vs one joint iteration | {total / joint4:.2f}x | {total * 1000:.1f} |")
    print(f"| until tolerance 1e-4 (cap {converge_cap}): {est.iterations} iterations, "
          f"converged={est.converged} | {converge_seconds / step:.1f} training steps | {converge_seconds * 1000:.0f} |")
    print("\n| layer | params | alone: ms per iteration | vs joint iteration | avg trace |\n|---|---|---|---|---|")
    for (path, params, t), trace in zip(per_layer, est.traces):
        print(f"| {path} | {params} | {t * 1000:.1f} | {t / joint4:.2f}x | {trace:.3g} |")


def accuracy_figures(epochs: int):
    """HAWQ's choice vs uniform and trace-order-violating assignments, same fine-tune for all."""
    model = train_digits_cnn()
    train, test = digits_loaders(batch_size=64)
    example = next(iter(train))[0][:2]
    ctrl, gm, part = _compile(model, example, bits=[2, 4, 8], compression_ratio=2.0, num_data_points=128)
    ctrl.initialize(train)
    layers, flops, groups = part.layers, [l.flops for l in part.layers], [l.group for l in part.layers]
    print(f"\ntraces: {[f'{t:.3g}' for t in part.traces]} ({part.trace_estimate.iterations} iterations)")

    def finetuned(bits):
        g = copy.deepcopy(gm)
        for layer, b in zip(layers, bits):
            g.get_submodule(layer.weight_quantizer).set_bits(7 if (b == 8 and layer.overflow_fix) else b)
            g.get_submodule(layer.group).set_bits(b)
        ptq = evaluate_accuracy(g, test)
        tr, _ = digits_loaders(batch_size=64, seed=1)
        torch.manual_seed(0)
        opt = torch.optim.Adam(g.parameters(), lr=1e-3)
        g.train()
        for _ in range(epochs):
            for x, y in tr:
                opt.zero_grad()
                F.cross_entropy(g(x), y).backward()
                opt.step()
        return ptq, evaluate_accuracy(g.eval(), test)

    monotone = set(monotone_configurations(part.traces, [2, 4, 8]))
    print(f"\n| budget | assignment (conv1, conv2, conv3, fc) | kind | ratio | accuracy before fine-tune | "
          f"after {epochs} epoch(s) |\n|---|---|---|---|---|---|")
    for budget in (2.0, 3.5):
        sel = select_bitwidths(part.traces, flops, part.noise, [2, 4, 8], budget, groups=groups)
        hawq = tuple(sel.bits)
        ratio = compression_ratio(hawq, flops, groups)
        uniform = [u for u in ((8,) * 4, (4,) * 4, (2,) * 4) if compression_ratio(u, flops, groups) >= budget]
        violating = [c for c in itertools.product([2, 4, 8], repeat=4)
                     if c not in monotone and abs(compression_ratio(c, flops, groups) / ratio - 1) <= 0.05]
        # the uniform assignment closest to the budget (the least compressed one meeting it)
        rows = [(hawq, "HAWQ")] + [(u, "uniform") for u in uniform[:1] if u != hawq]
        rows += [(c, "violates trace order") for c in violating]
        accs = []
        for bits, kind in rows:
            ptq, ft = finetuned(bits)
            if kind.startswith("violates"):
                accs.append(ft)
            print(f"| {budget} | {bits} | {kind} | {compression_ratio(bits, flops, groups):.3f} | {ptq:.4f} | {ft:.4f} |")
        if accs:
            print(f"| {budget} | mean of the {len(accs)} order-violating assignments | | | | {sum(accs) / len(accs):.4f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy", action="store_true", help="digits accuracy figures instead of timing")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resnet-size", type=int, default=32)
    parser.add_argument("--converge-cap", type=int, default=200, help="iteration cap of the digits CNN run")
    parser.add_argument("--resnet-converge-cap", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.accuracy:
        accuracy_figures(args.epochs)
        return
    train, _ = digits_loaders(batch_size=64)
    digits = DataLoader(TensorDataset(*[torch.cat(t) for t in zip(*[b for _, b in zip(range(2), train)])]),
                        batch_size=64)
    timing("DigitsCNN (trained), 8x8 digits, 2 batches of 64", train_digits_cnn(), digits,
           next(iter(digits))[0][:2], args.iterations, args.repeats, args.converge_cap)
    g = torch.Generator().manual_seed(0)
    size = args.resnet_size
    x = torch.randn(32, 3, size, size, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    resnet = DataLoader(TensorDataset(x, y), batch_size=16)
    timing(f"resnet18_like(num_classes=10, width=64) at {size}x{size}, random data, 2 batches of 16",
           resnet18_like(num_classes=10, width=64).eval(), resnet, x[:2], max(2, args.iterations // 2),
           args.repeats, args.resnet_converge_cap)


if __name__ == "__main__":
    main()
