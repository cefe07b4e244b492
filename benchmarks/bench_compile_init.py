"""Time to compile and initialize int8 quantization on a ResNet-18-shaped network, where it goes, and
NNCF's ``nncf.quantize`` on the same samples; then lowering and export.

``compile_for_compression(resnet18_like(1000, 64), [Quantize(bits=8)], example_inputs=[1, 3, 224, 224])``
(trace, placement, quantizer insertion), then ``ctrl.initialize(loader)`` (range
init over the loader, BatchNorm adaptation), then ``ctrl.lower()`` and
``ctrl.export_onnx()``. Also ``quantize_post_training(model, loader)`` (compile + range init
with fast bias correction, no BatchNorm adaptation: what ``nncf.quantize`` does) and, when nncf
is importable, ``nncf.quantize(model, nncf.Dataset(loader), subset_size=len(loader))`` (torch
backend: the same batches; min/max statistics, fast bias correction). Imports that either side
triggers on first use (torch._dynamo, sympy, nncf) are done before timing.

Breakdown of ours: ``trace`` (symbolic trace + shape propagation on the example input), each
compression pass as the pass manager recorded it (including its re-propagation of shapes and
its snapshots), and within initialize the range statistics pass and BatchNorm adaptation.
Times in seconds and in units of one eager fp32 forward pass of a loader batch measured in the
same run (the machine is shared: the unit makes runs comparable).

    .venv/bin/python benchmarks/bench_compile_init.py               # ~3 min on 2 cores
    PYTHONPATH=. /tmp/perf/nncfvenv/bin/python benchmarks/bench_compile_init.py   # with NNCF (own venv)
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from checkout import use_this_checkout  # noqa: E402  (benchmarks/checkout.py)

ROOT = use_this_checkout()
os.environ.setdefault("TQDM_DISABLE", "1")

from fxcompress import compile_for_compression, trace  # noqa: E402
from fxcompress.batchnorm import adapt_batchnorm  # noqa: E402
from fxcompress.data import CalibrationData  # noqa: E402
from fxcompress.passes import Quantize, quantize_post_training  # noqa: E402
from fxcompress.testing import resnet18_like  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=32, help="calibration samples (batches of 8)")
    parser.add_argument("--no-export", action="store_true", help="skip lower / export_onnx")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="torch threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = resnet18_like(num_classes=1000, width=64).eval()
    g = torch.Generator().manual_seed(0)
    batch = min(8, args.samples)
    loader = [torch.randn(batch, 3, args.size, args.size, generator=g) for _ in range(max(1, args.samples // batch))]
    example = (loader[0][:1],)
    has_nncf = importlib.util.find_spec("nncf") is not None
    _warm_imports(has_nncf)
    with torch.no_grad():
        model(loader[0])
        forward = statistics.median(_timed(lambda: model(loader[0]))[1] for _ in range(3))

    times, breakdown = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, breakdown["trace (incl. shape propagation)"] = _timed(lambda: trace(model, example))
        (ctrl, gm), times["compile_for_compression"] = _timed(
            lambda: compile_for_compression(model, [Quantize(bits=8)], example_inputs=example))
        for record in ctrl.records:
            breakdown[f"pass {record.name} (incl. re-propagation, snapshots)"] = record.seconds
        _, times["initialize"] = _timed(lambda: ctrl.initialize(loader))
        # the initialize steps one by one, on a second compiled copy
        ctrl2, gm2 = compile_for_compression(model, [Quantize(bits=8)], example_inputs=example)
        part, data = ctrl2.quantization, CalibrationData(loader, model=gm2)
        _, breakdown["initialize: weight ranges"] = _timed(lambda: part.init_weight_ranges(gm2))
        _, breakdown["initialize: range statistics (one pass)"] = _timed(
            lambda: part.init_activation_ranges(gm2, data))
        _, breakdown["initialize: BatchNorm adaptation"] = _timed(
            lambda: adapt_batchnorm(gm2, data, part.num_bn_adaptation_samples, None))
        _, times["quantize_post_training (compile + ranges + bias correction)"] = _timed(
            lambda: quantize_post_training(model, loader, example, subset_size=args.samples))
        if has_nncf:
            times["nncf.quantize (same batches)"] = _nncf_quantize(model, loader)
        if not args.no_export:
            _, times["lower (strip)"] = _timed(ctrl.lower)
            with tempfile.TemporaryDirectory() as tmp:
                _, times["export_onnx"] = _timed(lambda: ctrl.export_onnx(Path(tmp) / "int8.onnx"))

    quantizers = sum(1 for n, _ in gm.named_modules() if n.endswith("quantizer"))
    print(f"\nResNet-18 (resnet18_like(1000, 64)), {args.size}x{args.size}, {len(loader)} batches of {batch} "
          f"for initialize, {quantizers} quantizers, {torch.get_num_threads()} threads; "
          f"one fp32 forward of a batch: {forward:.2f} s")
    print("\n| step | seconds | fp32 forwards of a batch |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.2f} | {t / forward:.1f} |")
    total = times["compile_for_compression"] + times["initialize"]
    print(f"| compile + initialize | {total:.2f} | {total / forward:.1f} |")
    if "nncf.quantize (same batches)" in times:
        ptq = times["quantize_post_training (compile + ranges + bias correction)"]
        print(f"\nquantize_post_training / nncf.quantize: {ptq / times['nncf.quantize (same batches)']:.2f}x; "
              f"compile + initialize (with BatchNorm adaptation) / nncf.quantize: "
              f"{total / times['nncf.quantize (same batches)']:.2f}x")
    print("\n| breakdown | seconds | fp32 forwards of a batch |")
    print("|---|---|---|")
    for name, t in breakdown.items():
        print(f"| {name} | {t:.2f} | {t / forward:.1f} |")


def _warm_imports(has_nncf: bool):
    """Import what either side loads on first use, so neither is charged for it."""
    import sympy  # noqa: F401
    import torch._dynamo  # noqa: F401
    if has_nncf:
        import nncf  # noqa: F401
        import nncf.torch  # noqa: F401


def _nncf_quantize(model, loader) -> float:
    import nncf
    model = copy.deepcopy(model)
    start = time.perf_counter()
    nncf.quantize(model, nncf.Dataset(loader), subset_size=len(loader))  # subset_size counts items: batches
    return time.perf_counter() - start


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


if __name__ == "__main__":
    main()
