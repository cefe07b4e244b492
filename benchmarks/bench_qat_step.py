"""QAT training step time against the fp32 step, ResNet-18-shaped network, CPU.

One run, interleaved rounds: an SGD step (forward, cross-entropy, backward,
update) of the eager fp32 model, then of the int8 QAT graph
(``compile_for_compression(model, [Quantize(bits=8)])`` after range init), ...;
medians compared. The fake-quantize kernel is the op library's active backend
(``fxcompress.ops.backend()``: compiled C++ or the PyTorch reference), printed
with the figures; ``--compare-reference`` measures the reference backend too
(in a subprocess with ``FXCOMPRESS_OPS_BACKEND=reference``).

    .venv/bin/python benchmarks/bench_qat_step.py                 # ~2 min on 2 cores
    .venv/bin/python benchmarks/bench_qat_step.py --compare-reference
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxcompress.ops  # noqa: E402
from fxcompress import compile_for_compression  # noqa: E402
from fxcompress.passes import Quantize  # noqa: E402
from fxcompress.testing import resnet18_like  # noqa: E402


def measure(args) -> dict:
    torch.manual_seed(0)
    model = resnet18_like(num_classes=10, width=args.width)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))

    fp32 = copy.deepcopy(model).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, qat = compile_for_compression(copy.deepcopy(model), [Quantize(bits=8)], example_inputs=(x[:1],))
        ctrl.initialize([x[: max(1, args.batch // 2)]])
    qat.train()
    runs = {"fp32": (fp32, None), "int8 QAT": (qat, ctrl)}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, (m, _) in runs.items()}

    def step(name):
        module, controller = runs[name]
        opt = optimizers[name]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(x), y)
        if controller is not None:
            loss = loss + controller.loss()
            loss.backward()
            opt.step()
            controller.scheduler.step()
        else:
            loss.backward()
            opt.step()
        return time.perf_counter() - start

    for name in runs:  # warm-up
        step(name)
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name in runs:
            for _ in range(args.steps_per_round):
                times[name].append(step(name))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"backend": fxcompress.ops.backend(), "threads": torch.get_num_threads(),
            "batch": args.batch, "size": args.size, "width": args.width,
            "step_ms": {k: 1000 * v for k, v in medians.items()},
            "ratio": medians["int8 QAT"] / medians["fp32"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--compare-reference", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = parser.parse_args()

    results = [measure(args)]
    if args.compare_reference and results[0]["backend"] != "reference":
        cmd = [sys.executable, __file__, "--json"] + [f"--{k.replace('_', '-')}={v}" for k, v in
                                                      (("batch", args.batch), ("size", args.size),
                                                       ("width", args.width), ("rounds", args.rounds),
                                                       ("steps_per_round", args.steps_per_round))]
        env = {**os.environ, "FXCOMPRESS_OPS_BACKEND": "reference"}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results[0]))
        return
    r = results[0]
    print(f"\nResNet-18 (resnet18_like(10, {r['width']})), batch {r['batch']}, {r['size']}x{r['size']}, "
          f"SGD step, {r['threads']} threads")
    print("\n| fake-quantize backend | fp32 step ms | int8 QAT step ms | QAT / fp32 |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['step_ms']['fp32']:.0f} | {r['step_ms']['int8 QAT']:.0f} | "
              f"{r['ratio']:.2f}x |")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 2)
    main()
