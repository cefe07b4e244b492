"""QAT training step time against the fp32 step, eager and under ``torch.compile``, CPU.

One run, interleaved rounds (A B A B ...): a training step (zero_grad, forward,
cross-entropy + ``ctrl.loss()``, backward, SGD update; the optimizer runs eagerly) of

- the fp32 model, eager and (``--compile``) ``torch.compile``'d;
- the int8 QAT graph (``compile_for_compression(model, [Quantize(bits=8)])`` after range
  init), eager and (``--compile``) ``torch.compile``'d,

medians and spread (min-max over rounds) compared; ratios to the fp32 eager and fp32 compiled
steps. Models: ``digits`` (DigitsCNN, batch 64 of 8x8: issue 19's QAT-step model),
``resnet18`` (resnet18_like(10, 64), default 112x112), ``resnet_tiny``
(ResNetTiny width 16 at 32x32) and ``tiny_bert`` (TransformerEncoderTiny: 2 post-LN layers, 64 wide,
4 heads, GELU FFN 256, sequence 32: a MiniLM-shaped encoder). With ``--compile`` the script
first checks with ``torch._dynamo.explain`` that the QAT graph compiles to one graph (no graph
breaks) and prints the backend's first-step (compile) time. The fake-quantize kernel is the op
library's active backend (``fxcompress.ops.backend()``); ``--compare-reference`` measures the
reference backend too (subprocess with ``FXCOMPRESS_OPS_BACKEND=reference``). Where the time goes:
``--breakdown`` adds eager copies of the QAT graph with parts of the quantization off (and one with
the quantizer's previous, unfused scale handling), ``--profile``
prints torch.profiler's self CPU time per op and configuration.

    .venv/bin/python benchmarks/bench_qat_step.py                         # ResNet-18 eager, ~2 min
    .venv/bin/python benchmarks/bench_qat_step.py --model digits --compile --threads 1 --steps-per-round 20
    .venv/bin/python benchmarks/bench_qat_step.py --model digits --threads 1 --clock cpu --rounds 11 \
        --steps-per-round 20 --breakdown                        # eager, CPU time, where the time goes
    .venv/bin/python benchmarks/bench_qat_step.py --model resnet_tiny --compile --threads 1
    .venv/bin/python benchmarks/bench_qat_step.py --model tiny_bert --compile --threads 1
    NNCF_EXTENSION_LOAD_TIMEOUT=0 PYTHONPATH=. /tmp/perf/nncfvenv/bin/python benchmarks/bench_qat_step.py \
        --model resnet_tiny --nncf --threads 1                  # NNCF 3.4's QAT step side by side
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
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import use_this_checkout  # noqa: E402

use_this_checkout()

import fxcompress.ops  # noqa: E402
from fxcompress import compile_for_compression  # noqa: E402
from fxcompress.gradients import scaled_gradient  # noqa: E402
from fxcompress.passes import Quantize  # noqa: E402
from fxcompress.quantizers import FakeQuantizer  # noqa: E402
from fxcompress.testing import DigitsCNN, ResNetTiny, TransformerEncoderTiny, resnet18_like  # noqa: E402


def model_and_batch(args):
    """(model, input, labels, classes) of ``args.model``."""
    torch.manual_seed(0)
    if args.model == "digits":
        model, classes = DigitsCNN(num_classes=10, seed=0), 10
        x = torch.randn(args.batch or 64, 1, 8, 8)
    elif args.model == "tiny_bert":
        model = TransformerEncoderTiny(num_classes=4, dim=64, num_heads=4, ff_dim=256, num_layers=2, seq_len=32,
                                       max_len=64, dropout=0.0)
        x, classes = model.example_input(batch=args.batch or 16), 4
    elif args.model == "resnet_tiny":
        model, classes = ResNetTiny(num_classes=10, width=16, seed=0), 10
        size = args.size or 32
        x = torch.randn(args.batch or 32, 3, size, size)
    else:
        model, classes = resnet18_like(num_classes=10, width=args.width), 10
        size = args.size or 112
        x = torch.randn(args.batch or 8, 3, size, size)
    return model, x, torch.randint(0, classes, (x.shape[0],))


def graph_breaks(module, x) -> tuple[int, int, list[str]]:
    """(graphs, graph breaks, reasons) of ``module(x)`` under dynamo."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module)(x)
    return explained.graph_count, explained.graph_break_count, [str(r.reason) for r in explained.break_reasons]


def nncf_qat(model, x):
    """NNCF 3.x's QAT model (``nncf.quantize`` of the torch model, then trained as is), eager."""
    import nncf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(copy.deepcopy(model).eval(), nncf.Dataset([x]), subset_size=1).train()
    return quantized, quantized, None


def _unfused_quantizer_forward(q, x):
    """FakeQuantizer.forward with ``|scale|`` and its floor as ops of their own (``effective_scale()``,
    autograd through abs and clamp_min) before ``fake_quantize``: the quantizer before
    ``fake_quantize_learnable`` folded them into the op (same values and gradients)."""
    if not q.enabled:
        return x
    quant_min, quant_max = q.spec.quant_range
    zero_point = scaled_gradient(q.zero_point, q.lr_multiplier)
    return fxcompress.ops.fake_quantize_unchecked(x, q.effective_scale(), zero_point, quant_min, quant_max, q.axis)


def breakdown_runs(qat, ctrl) -> dict:
    """Copies of the QAT graph with parts of the quantization changed, to see what each costs
    (eager): the quantizers' scale handling unfused (abs / clamp_min ops, as before
    ``fake_quantize_learnable``), the input quantizers' scales frozen (``learnable_input_ranges=False``:
    then the first layer computes no input gradient), the weight quantizers off, the activation
    quantizers off, every quantizer off (the graph alone)."""
    def variant(change):
        gm = copy.deepcopy(qat)
        for name, module in gm.named_modules():
            if isinstance(module, FakeQuantizer):
                change(name, module)
        return gm, gm, ctrl

    def freeze_inputs(name, q):
        if name in input_quantizers:
            q.scale.requires_grad_(False)

    input_quantizers = {n.target for n in qat.graph.nodes
                        if n.op == "call_module" and any(a.op == "placeholder" for a in n.all_input_nodes)}
    is_weight = lambda name: name.endswith("weight_quantizer")  # noqa: E731
    def unfuse(name, q):
        q.forward = types.MethodType(_unfused_quantizer_forward, q)

    return {"QAT, scale's abs / clamp_min unfused (before)": variant(unfuse),
            "QAT, input quantizer scales frozen": variant(freeze_inputs),
            "QAT, weight quantizers off": variant(lambda n, q: setattr(q, "enabled", not is_weight(n))),
            "QAT, activation quantizers off": variant(lambda n, q: setattr(q, "enabled", is_weight(n))),
            "QAT, all quantizers off": variant(lambda n, q: setattr(q, "enabled", False))}


# "cpu": the process's CPU time, which a thread waiting for a core (another job on a shared
# machine) does not count; meaningful with --threads 1.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(args) -> dict:
    model, x, y = model_and_batch(args)
    fp32 = copy.deepcopy(model).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, qat = compile_for_compression(copy.deepcopy(model), [Quantize(bits=8)], example_inputs=(x[:2],))
        ctrl.initialize([x])
    qat.train()
    out = {"backend": fxcompress.ops.backend(), "threads": torch.get_num_threads(), "model": args.model,
           "input": list(x.shape), "clock": args.clock}
    runs = {"fp32 eager": (fp32, fp32, None), "int8 QAT eager": (qat, qat, ctrl)}
    if args.nncf:
        runs["NNCF int8 QAT eager"] = nncf_qat(model, x)
    if args.breakdown:
        runs.update(breakdown_runs(qat, ctrl))
    if args.compile:
        out["dynamo"] = {name: graph_breaks(m, x) for name, m in (("fp32", fp32), ("int8 QAT", qat))}
        torch._dynamo.reset()
        runs["fp32 compiled"] = (fp32, torch.compile(fp32, backend=args.backend), None)
        runs["int8 QAT compiled"] = (qat, torch.compile(qat, backend=args.backend), ctrl)
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, (m, _, _) in runs.items()}

    def step(name):
        _, call, controller = runs[name]
        opt = optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(call(x), y)
        if controller is not None:
            loss = loss + controller.loss()
        loss.backward()
        opt.step()
        if controller is not None:
            controller.scheduler.step()

    out["first_step_s"] = {}
    for name in runs:  # warm-up; the compiled configurations compile here
        start = time.perf_counter()
        step(name)
        out["first_step_s"][name] = time.perf_counter() - start
        step(name)
    times = {name: [] for name in runs}
    now = CLOCKS[args.clock]
    for _ in range(args.rounds):
        for name in runs:
            start = now()
            for _ in range(args.steps_per_round):
                step(name)
            times[name].append((now() - start) / args.steps_per_round)
    out["step_ms"] = {k: [1000 * t for t in v] for k, v in times.items()}
    if args.profile:
        out["profile"] = {name: profile_ops(lambda: step(name), args.steps_per_round) for name in runs}
    return out


def profile_ops(step, steps: int) -> dict:
    """Self CPU time per op (ms per step) and calls per step, from torch.profiler over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: (e.self_cpu_time_total / 1000 / steps, e.count / steps) for e in prof.key_averages()}


def print_profile(profiles: dict, top: int = 25):
    """Self CPU ms per step of the ops that differ most between the configurations."""
    names = list(profiles)
    ops = {op for p in profiles.values() for op in p}
    total = {n: sum(ms for ms, _ in profiles[n].values()) for n in names}
    print("\nprofile (torch.profiler, self CPU ms per step; calls per step)")
    print("| op | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    spread = lambda op: max(profiles[n].get(op, (0, 0))[0] for n in names) - min(
        profiles[n].get(op, (0, 0))[0] for n in names)
    for op in sorted(ops, key=spread, reverse=True)[:top]:
        cells = [f"{profiles[n][op][0]:.3f} ({profiles[n][op][1]:.0f})" if op in profiles[n] else "-" for n in names]
        print(f"| {op} | " + " | ".join(cells) + " |")
    print("| total self CPU | " + " | ".join(f"{total[n]:.3f}" for n in names) + " |")


def print_report(r: dict):
    print(f"\n{r['model']}, input {r['input']}, SGD step, {r['threads']} thread(s), "
          f"fake-quantize backend {r['backend']}, {r.get('clock', 'wall')} clock")
    for name, (graphs, breaks, reasons) in r.get("dynamo", {}).items():
        print(f"torch._dynamo.explain, {name}: {graphs} graph(s), {breaks} graph break(s) {reasons or ''}")
    print("first step (compiles) s: " + ", ".join(f"{k} {v:.1f}" for k, v in r["first_step_s"].items()))
    steps = r["step_ms"]
    median = {k: statistics.median(v) for k, v in steps.items()}
    print("\n| configuration | median ms | spread ms | vs fp32 eager | vs fp32 compiled |")
    print("|---|---|---|---|---|")
    for k, v in steps.items():
        vs_compiled = f"{median[k] / median['fp32 compiled']:.2f}x" if "fp32 compiled" in median else "-"
        print(f"| {k} | {median[k]:.1f} | {min(v):.1f}-{max(v):.1f} | {median[k] / median['fp32 eager']:.2f}x | "
              f"{vs_compiled} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["digits", "resnet18", "resnet_tiny", "tiny_bert"], default="resnet18")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--width", type=int, default=64, help="resnet18's base width")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="step times in wall time, or the process's CPU time (with --threads 1)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd steps")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--nncf", action="store_true", help="also time NNCF's QAT model (eager; run in its venv)")
    parser.add_argument("--compare-reference", action="store_true")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the QAT graph with parts of the quantization off (eager)")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's self CPU time per op, per configuration")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one CPU thread: use it with --threads 1")
    torch.set_num_threads(args.threads)

    results = [measure(args)]
    if args.compare_reference and results[0]["backend"] != "reference":
        cmd = [sys.executable, __file__, "--json"] + [a for a in sys.argv[1:] if a != "--compare-reference"]
        env = {**os.environ, "FXCOMPRESS_OPS_BACKEND": "reference"}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results[0]))
        return
    for r in results:
        print_report(r)
        if "profile" in r:
            print_profile(r["profile"])


if __name__ == "__main__":
    main()
