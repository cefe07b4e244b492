"""OpenVINO CPU latency of the int8 QDQ export of ResNet-18 against its fp32 export and NNCF's int8 model.

One run, interleaved (A B A B ...): every configuration runs a few inferences per round,
rounds alternate; medians and the spread (min-max over rounds) are reported (the machine
is shared; ratios within one run are what counts). Each batch size (default 1 and 8),
224x224, static shapes, LATENCY hint, one stream, one OpenVINO thread by default:

- fp32 export, the plugin's default inference precision (bf16 on CPUs with bf16, f32
  otherwise), and ``INFERENCE_PRECISION_HINT=f32`` where the default is not f32;
- fxcompress int8 (``Quantize(bits=8)``, ``initialize`` on the calibration images);
- NNCF 3.4 int8 (``openvino.convert_model`` of the torch model, then ``nncf.quantize``
  with its OpenVINO backend, CPU defaults, the same calibration images), when nncf is
  installed (``--no-nncf`` skips it).

The network is ``resnet18_like`` with random weights and its BatchNorm statistics taken from
the calibration images (as a trained model has them), so BatchNorm folds into a non-zero
conv bias on both sides. ``--graphs`` prints what OpenVINO compiled each int8 model into at
the largest batch (``compiled_model.get_runtime_model()``: layer counts per type and
precision, and every layer that differs between the two), the comparison behind
docs/export.md's "runtime graph against NNCF's".

    NNCF_EXTENSION_LOAD_TIMEOUT=0 PYTHONPATH=. /tmp/perf/nncfvenv/bin/python \\
        benchmarks/bench_openvino_latency.py --graphs          # ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_openvino_latency.py --no-nncf --rounds 2 --size 112   # quick look
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import use_this_checkout  # noqa: E402

use_this_checkout()

from fxcompress import compile_for_compression  # noqa: E402
from fxcompress.export import export_onnx  # noqa: E402
from fxcompress.passes import Quantize  # noqa: E402
from fxcompress.runtime import openvino_compute_layers  # noqa: E402
from fxcompress.testing import resnet18_like  # noqa: E402
from timing import interleaved_times  # noqa: E402

FXCOMPRESS = "fxcompress int8"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def calibration(size: int, batches: int = 4, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(batches)]


def benchmark_model(images) -> torch.nn.Module:
    """ResNet-18 with random weights and BatchNorm statistics of ``images`` (cumulative averages)."""
    model = resnet18_like(num_classes=1000, width=64)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for x in images:
            model(x)
    return model.eval()


def build_models(size: int, folder: Path, use_nncf: bool) -> dict:
    """{name: (ov.Model, file size in bytes)}."""
    import openvino as ov
    core = ov.Core()
    images = calibration(size)
    model = benchmark_model(images)
    x = images[0][:1]
    out = {}

    fp32_path = export_onnx(model, folder / "fp32.onnx", example_inputs=(x,))
    out["fp32"] = (core.read_model(fp32_path), os.path.getsize(fp32_path))

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(model, [Quantize(bits=8)], example_inputs=(x,), copy=True)
        ctrl.initialize(images)
        int8_path = ctrl.export_onnx(folder / "int8.onnx")
    log(f"fxcompress compile + initialize + export {time.perf_counter() - start:.1f}s")
    out[FXCOMPRESS] = (core.read_model(int8_path), os.path.getsize(int8_path))

    if use_nncf:
        try:
            import nncf
        except ImportError:
            log("nncf is not installed: skipping the NNCF comparison (pip install nncf==3.4.0)")
            return out
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # NNCF's OpenVINO backend on the converted model: the same placement and ranges as its
            # torch backend, without compiling NNCF's C++ torch extension (minutes on 2 cores).
            fp32_ov = ov.convert_model(copy.deepcopy(model), example_input=x)
            ov_model = nncf.quantize(fp32_ov, nncf.Dataset([c.numpy() for c in images]), subset_size=8)
        log(f"nncf {nncf.__version__} quantize + convert {time.perf_counter() - start:.1f}s")
        ov.save_model(ov_model, str(folder / "nncf.xml"))
        out[f"nncf {nncf.__version__} int8"] = (ov_model, os.path.getsize(folder / "nncf.bin"))
    return out


def compile_at(model, batch: int, size: int, threads: int, precision: str | None):
    import openvino as ov
    m = model.clone()
    m.reshape({m.inputs[0].any_name: ov.PartialShape([batch, 3, size, size])})
    cfg = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads)}
    if precision:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    return ov.Core().compile_model(m, "CPU", cfg)


def runtime_layers(compiled) -> list[tuple[str, str, str, str]]:
    """``(layerType, runtimePrecision, outputPrecisions, kernel)`` of every executed layer, in order
    (constants, inputs and outputs left out)."""
    rows = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        value = lambda key: info[key].astype(str) if key in info else ""  # noqa: E731
        if value("layerType") in ("Const", "Input", "Output"):
            continue
        rows.append((value("layerType"), value("runtimePrecision"), value("outputPrecisions"),
                     value("primitiveType")))
    return rows


def graph_report(models: dict, batch: int, size: int, threads: int) -> dict:
    """Per int8 model: layer counts by (type, precision, output precision), and the layers that differ."""
    layers = {name: runtime_layers(compile_at(model, batch, size, threads, None))
              for name, (model, _) in models.items() if name != "fp32"}
    report = {name: {" ".join(k): v for k, v in sorted(Counter(r[:3] for r in rows).items())}
              for name, rows in layers.items()}
    names = list(layers)
    if len(names) == 2:
        a, b = (layers[n] for n in names)
        report["differing layers"] = ([f"#{i}: {' '.join(x)} | {' '.join(y)}" for i, (x, y) in enumerate(zip(a, b))
                                       if x != y] + ([f"layer count {len(a)} | {len(b)}"] if len(a) != len(b) else []))
    return report


def measure(models: dict, batch: int, size: int, threads: int, rounds: int, f32_hint: bool) -> dict:
    """{configuration: seconds per inference, one figure per round}."""
    data = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    calls = {}
    for name, (model, _) in models.items():
        for label, precision in (("default", None), ("f32", "f32")) if f32_hint else (("default", None),):
            request = compile_at(model, batch, size, threads, precision).create_infer_request()
            calls[f"{name} / {label}"] = lambda r=request: r.infer([data])
    return interleaved_times(calls, rounds, max(1, round(8 / batch)), warmup=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="OpenVINO inference threads (and torch's)")
    parser.add_argument("--no-nncf", action="store_true")
    parser.add_argument("--graphs", action="store_true", help="compare the compiled runtime graphs")
    parser.add_argument("--json", type=str, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import openvino as ov
    core = ov.Core()
    default_precision = core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()  # "f32", "bf16"
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    log(f"OpenVINO {ov.__version__}, CPU default inference precision {default_precision}, "
        f"capabilities {capabilities}, {args.threads} threads")

    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(args.size, Path(tmp), not args.no_nncf)
        results = {"size": args.size, "threads": args.threads, "default_precision": default_precision,
                   "capabilities": list(capabilities), "file_bytes": {k: v[1] for k, v in models.items()},
                   "integer_layers": {}, "latency_ms": {}}
        for name, (model, _) in models.items():
            report = openvino_compute_layers(compile_at(model, 1, args.size, args.threads, None))
            results["integer_layers"][name] = [len(report.integer), len(report.layers)]
        if args.graphs:
            results["runtime_graph"] = graph_report(models, max(args.batches), args.size, args.threads)
        for batch in args.batches:
            times = measure(models, batch, args.size, args.threads, args.rounds, default_precision != "f32")
            results["latency_ms"][str(batch)] = {k: [1000 * t for t in v] for k, v in times.items()}

    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_report(results: dict):
    print(f"\nResNet-18 (resnet18_like(1000, 64)), {results['size']}x{results['size']}, OpenVINO CPU, "
          f"{results['threads']} thread(s), default precision {results['default_precision']}")
    print("\nfile sizes: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in results["file_bytes"].items()))
    print("integer conv/linear layers (runtime model): "
          + ", ".join(f"{k}: {a}/{b}" for k, (a, b) in results["integer_layers"].items() if k != "fp32"))
    for name, counts in results.get("runtime_graph", {}).items():
        print(f"\nruntime graph, {name}:")
        if not counts:
            print("  none")
        for key, value in (counts.items() if isinstance(counts, dict) else enumerate(counts)):
            print(f"  {key}: {value}")
    print("\n| batch | configuration | median ms | spread (min-max) ms | speed-up vs fp32 (default) |")
    print("|---|---|---|---|---|")
    for batch, lat in results["latency_ms"].items():
        fp32 = statistics.median(lat["fp32 / default"])
        for key, ms in lat.items():
            median = statistics.median(ms)
            print(f"| {batch} | {key} | {median:.1f} | {min(ms):.1f}-{max(ms):.1f} | {fp32 / median:.2f}x |")
        ours = [k for k in lat if k.startswith(FXCOMPRESS)]
        nncf = [k for k in lat if k.startswith("nncf")]
        for a, b in zip(ours, nncf):
            ratio = statistics.median(lat[a]) / statistics.median(lat[b])
            per_round = sorted(x / y for x, y in zip(lat[a], lat[b]))
            print(f"| {batch} | {a} / {b} | {ratio:.3f} | per round {per_round[0]:.3f}-{per_round[-1]:.3f} | |")


if __name__ == "__main__":
    main()
