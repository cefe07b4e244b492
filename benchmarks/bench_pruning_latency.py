"""OpenVINO fp32 latency of filter-pruned ResNet-18-shaped networks against the dense one.

``resnet18_like(1000, 64)`` (the real ResNet-18 topology), 224x224, batch 1. The
dense model is exported as is; the pruned ones are compiled with
``FilterPruning(pruning_flops_target=t, schedule="baseline", prune_downsample_convs=True,
round_to=r)`` for each target ``t`` (default 0.3 and 0.5) and ``r`` (default 1: any channel
count, NNCF's behaviour; 16: counts kept multiples of 16, the channel block of OpenVINO's
AVX-512 kernels), folded and exported with
``ctrl.export_onnx`` (the physically smaller graph). Every model is compiled by
OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT=f32``, LATENCY hint, one
stream, static shape [1, 3, 224, 224], and timed interleaved in one run (round
robin, ``--per-round`` inferences each, medians): on a shared machine only the
ratios within one run count.

Reports, per model: FLOPs and parameters (counted on the folded graph, and the
analysis' prediction), the FLOPs ratio to the dense model, the median latency and
the speed-up. Weights are the random initialization: latency does not depend on
them, and which filters go does not change the shapes much.

    .venv/bin/python benchmarks/bench_pruning_latency.py                 # ~2-4 min on 2 cores
    .venv/bin/python benchmarks/bench_pruning_latency.py --targets 0.3 0.5 0.7 --rounds 11
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxcompress import compile_for_compression, trace  # noqa: E402
from fxcompress.export import export_onnx  # noqa: E402
from fxcompress.passes import FilterPruning  # noqa: E402
from fxcompress.passes.pruning import model_cost  # noqa: E402
from fxcompress.testing import resnet18_like  # noqa: E402
from timing import interleaved_medians  # noqa: E402


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def build(folder: Path, size: int, targets: list[float], round_to: list[int]) -> dict:
    """{name: (onnx path, flops, params, predicted (flops, params) or None)}."""
    model = resnet18_like(num_classes=1000, width=64).eval()
    x = torch.randn(1, 3, size, size)
    dense_gm = trace(model, (x,))
    dense = model_cost(dense_gm)
    out = {"dense": (export_onnx(model, folder / "dense.onnx", example_inputs=(x,)), dense.flops, dense.params,
                     None)}
    for target in targets:
        for r in round_to:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ctrl, _ = compile_for_compression(
                    model, [FilterPruning(pruning_flops_target=target, schedule="baseline",
                                          prune_downsample_convs=True, round_to=r)],
                    example_inputs=(x,), copy=True)
                predicted = ctrl.parts[0].predicted_cost()
                folded = model_cost(ctrl.strip())
                path = ctrl.export_onnx(folder / f"pruned_{target}_{r}.onnx")
            log(f"flops target {target}, round_to {r}: compile + fold + export {time.perf_counter() - start:.1f}s")
            name = f"pruned, FLOPs target {target:g}" + (f", round_to {r}" if r > 1 else "")
            out[name] = (path, folded.flops, folded.params, (predicted.flops, predicted.params))
    return out


def compile_all(models: dict, size: int, threads: int) -> dict:
    import openvino as ov
    core = ov.Core()
    compiled = {}
    for name, (path, *_rest) in models.items():
        model = core.read_model(str(path))
        model.reshape({model.inputs[0].any_name: ov.PartialShape([1, 3, size, size])})
        compiled[name] = core.compile_model(model, "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads),
            "INFERENCE_PRECISION_HINT": "f32"})
    return compiled


def measure(compiled: dict, size: int, rounds: int, per_round: int) -> dict:
    data = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    requests = {k: c.create_infer_request() for k, c in compiled.items()}
    return interleaved_medians({k: (lambda r=r: r.infer([data])) for k, r in requests.items()}, rounds, per_round,
                               warmup=3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json", type=str, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    import openvino as ov
    log(f"OpenVINO {ov.__version__}, {args.threads} threads, f32 inference precision")
    with tempfile.TemporaryDirectory() as tmp:
        models = build(Path(tmp), args.size, args.targets, args.round_to)
        sizes = {k: os.path.getsize(v[0]) for k, v in models.items()}
        medians = measure(compile_all(models, args.size, args.threads), args.size, args.rounds, args.per_round)
    dense_flops, dense_params = models["dense"][1], models["dense"][2]
    dense_ms = 1000 * medians["dense"]
    rows = []
    for name, (_, flops, params, predicted) in models.items():
        ms = 1000 * medians[name]
        rows.append({"model": name, "flops": flops, "params": params, "predicted": predicted,
                     "flops_ratio": flops / dense_flops, "params_ratio": params / dense_params,
                     "file_mb": sizes[name] / 1e6, "latency_ms": ms, "speedup": dense_ms / ms})
    print(f"\nResNet-18 (resnet18_like(1000, 64)), {args.size}x{args.size}, batch 1, OpenVINO {ov.__version__} CPU, "
          f"f32 hint, {args.threads} threads, {args.rounds} rounds x {args.per_round} interleaved, medians\n")
    print("| model | GFLOPs | FLOPs vs dense | params (M) | params vs dense | ONNX MB | latency ms | "
          "speed-up vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        check = "" if r["predicted"] is None or tuple(r["predicted"]) == (r["flops"], r["params"]) else " (!)"
        print(f"| {r['model']} | {r['flops'] / 1e9:.3f}{check} | {r['flops_ratio']:.3f} | {r['params'] / 1e6:.2f} | "
              f"{r['params_ratio']:.3f} | {r['file_mb']:.1f} | {r['latency_ms']:.1f} | {r['speedup']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 2)
    main()
