"""Time to compile and initialize int8 quantization on a ResNet-18-shaped network, and to lower and export it.

``compile_for_compression(resnet18_like(1000, 64), [Quantize(bits=8)], example_inputs=[1, 3, 224, 224])``
(trace, placement, quantizer insertion), then ``ctrl.initialize(loader)`` (range
init over the loader, BatchNorm adaptation), then ``ctrl.lower()`` and
``ctrl.export_onnx()``. Times in seconds and in units of one eager fp32 forward
pass of a loader batch measured in the same run (the machine is shared: the
unit makes runs comparable).

    .venv/bin/python benchmarks/bench_compile_init.py               # ~2-3 min on 2 cores
    .venv/bin/python benchmarks/bench_compile_init.py --samples 64
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxcompress import compile_for_compression  # noqa: E402
from fxcompress.passes import Quantize  # noqa: E402
from fxcompress.testing import resnet18_like  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=32, help="calibration samples (batches of 8)")
    args = parser.parse_args()

    model = resnet18_like(num_classes=1000, width=64).eval()
    g = torch.Generator().manual_seed(0)
    batch = min(8, args.samples)
    loader = [torch.randn(batch, 3, args.size, args.size, generator=g) for _ in range(max(1, args.samples // batch))]
    with torch.no_grad():
        model(loader[0])
        forward = statistics.median(_timed(lambda: model(loader[0]))[1] for _ in range(3))

    times = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (ctrl, gm), times["compile_for_compression"] = _timed(
            lambda: compile_for_compression(model, [Quantize(bits=8)], example_inputs=(loader[0][:1],)))
        _, times["initialize"] = _timed(lambda: ctrl.initialize(loader))
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


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 2)
    main()
