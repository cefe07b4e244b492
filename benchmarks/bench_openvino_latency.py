"""OpenVINO CPU latency of the int8 QDQ export of a ResNet-18-shaped network against its fp32 export.

One run, interleaved: every configuration runs a few inferences per round, rounds
alternate, medians are compared (the machine is shared; ratios within one run are
what counts). Configurations, each at batch 1 and batch 8, 224x224, static shapes,
LATENCY hint, one stream:

- fp32 export, the plugin's default inference precision (bf16 on CPUs with bf16,
  f32 otherwise) and ``INFERENCE_PRECISION_HINT=f32``;
- fxcompress int8 (``Quantize(bits=8)``, range init on random data: fine for
  latency), default precision and f32 hint;
- NNCF 3.4 int8 (``openvino.convert_model`` of the torch model, then ``nncf.quantize``
  with its OpenVINO backend, CPU defaults), when nncf is installed (optional;
  ``--no-nncf`` skips it).

Also reports how many conv/linear layers run in integers and the file sizes.

    .venv/bin/python benchmarks/bench_openvino_latency.py            # ~3-5 min on 2 cores
    .venv/bin/python benchmarks/bench_openvino_latency.py --rounds 2 --size 112   # quick look
"""
from __future__ import annotations

import argparse
import copy
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

from fxcompress import compile_for_compression  # noqa: E402
from fxcompress.export import export_onnx  # noqa: E402
from fxcompress.passes import Quantize  # noqa: E402
from fxcompress.runtime import openvino_compute_layers  # noqa: E402
from fxcompress.testing import resnet18_like  # noqa: E402
from timing import interleaved_medians  # noqa: E402


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def calibration(size: int, batches: int = 4, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(batches)]


def build_models(size: int, folder: Path, use_nncf: bool) -> dict:
    """{name: (ov.Model, file size in bytes or None)}."""
    import openvino as ov
    core = ov.Core()
    model = resnet18_like(num_classes=1000, width=64).eval()
    x = torch.randn(1, 3, size, size)
    out = {}

    start = time.perf_counter()
    fp32_path = export_onnx(model, folder / "fp32.onnx", example_inputs=(x,))
    log(f"fp32 export {time.perf_counter() - start:.1f}s")
    out["fp32"] = (core.read_model(fp32_path), os.path.getsize(fp32_path))

    start = time.perf_counter()
    ctrl, gm = compile_for_compression(model, [Quantize(bits=8)], example_inputs=(x,), copy=True)
    ctrl.initialize(calibration(size))
    int8_path = ctrl.export_onnx(folder / "int8.onnx")
    log(f"fxcompress compile + initialize + export {time.perf_counter() - start:.1f}s")
    out["fxcompress int8"] = (core.read_model(int8_path), os.path.getsize(int8_path))

    if use_nncf:
        try:
            import nncf
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # NNCF's OpenVINO backend on the converted model: the same placement and ranges as its
                # torch backend, without compiling NNCF's C++ torch extension (minutes on 2 cores).
                fp32_ov = ov.convert_model(copy.deepcopy(model), example_input=x)
                ov_model = nncf.quantize(fp32_ov, nncf.Dataset([c.numpy() for c in calibration(size)]),
                                         subset_size=8)
            log(f"nncf {nncf.__version__} quantize + convert {time.perf_counter() - start:.1f}s")
            ov.save_model(ov_model, str(folder / "nncf.xml"))
            out[f"nncf {nncf.__version__} int8"] = (ov_model, os.path.getsize(folder / "nncf.bin"))
        except ImportError:
            log("nncf is not installed: skipping the NNCF comparison (pip install nncf==3.4.0)")
    return out


def compile_all(models: dict, batch: int, size: int, threads: int) -> dict:
    """{(model name, precision label): compiled model} at a static [batch, 3, size, size]."""
    import openvino as ov
    core = ov.Core()
    compiled = {}
    for name, (model, _) in models.items():
        for label, hint in (("default", None), ("f32", "f32")):
            m = model.clone()
            m.reshape({m.inputs[0].any_name: ov.PartialShape([batch, 3, size, size])})
            cfg = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads)}
            if hint:
                cfg["INFERENCE_PRECISION_HINT"] = hint
            compiled[(name, label)] = core.compile_model(m, "CPU", cfg)
    return compiled


def measure(compiled: dict, batch: int, size: int, rounds: int, per_round: int) -> dict:
    data = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    requests = {k: c.create_infer_request() for k, c in compiled.items()}
    return interleaved_medians({k: (lambda r=r: r.infer([data])) for k, r in requests.items()}, rounds, per_round,
                               warmup=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-nncf", action="store_true")
    parser.add_argument("--json", type=str, default=None, help="also write the figures to this file")
    args = parser.parse_args()

    import openvino as ov
    core = ov.Core()
    default_precision = str(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    log(f"OpenVINO {ov.__version__}, CPU default inference precision {default_precision}, "
        f"capabilities {capabilities}, {args.threads} threads")

    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(args.size, Path(tmp), not args.no_nncf)
        results = {"size": args.size, "threads": args.threads, "default_precision": default_precision,
                   "capabilities": list(capabilities), "file_bytes": {k: v[1] for k, v in models.items()},
                   "latency_ms": {}, "integer_layers": {}}
        for batch in args.batches:
            compiled = compile_all(models, batch, args.size, args.threads)
            if batch == args.batches[0]:
                for (name, label), c in compiled.items():
                    report = openvino_compute_layers(c)
                    results["integer_layers"][f"{name} / {label}"] = [len(report.integer), len(report.layers)]
            per_round = max(1, round(8 / batch))
            medians = measure(compiled, batch, args.size, args.rounds, per_round)
            results["latency_ms"][str(batch)] = {f"{n} / {lab}": 1000 * t for (n, lab), t in medians.items()}

    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_report(results: dict):
    print(f"\nResNet-18 (resnet18_like(1000, 64)), {results['size']}x{results['size']}, OpenVINO CPU, "
          f"{results['threads']} threads, default precision {results['default_precision']}")
    sizes = results["file_bytes"]
    print("\nfile sizes: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items() if v))
    if "fxcompress int8" in sizes and sizes.get("fp32"):
        print(f"int8 / fp32 file size: {sizes['fxcompress int8'] / sizes['fp32']:.3f}")
    print("\ninteger conv/linear layers (runtime model): "
          + ", ".join(f"{k}: {a}/{b}" for k, (a, b) in results["integer_layers"].items() if "fp32" not in k))
    print("\n| batch | configuration | latency ms | speed-up vs fp32 f32 | speed-up vs fp32 default |")
    print("|---|---|---|---|---|")
    for batch, lat in results["latency_ms"].items():
        f32, default = lat["fp32 / f32"], lat["fp32 / default"]
        for key, ms in lat.items():
            print(f"| {batch} | {key} | {ms:.1f} | {f32 / ms:.2f}x | {default / ms:.2f}x |")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 2)
    main()
