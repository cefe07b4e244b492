"""The main job (`make demo`): compress a CNN trained on real handwritten digits, end to end.

1. trains (or loads from the cache) a small CNN on scikit-learn's digits data set;
2. compiles it with 50% magnitude sparsity + int8 quantization, prints what the passes
   did (summary and graph diff), initializes ranges, fine-tunes briefly, prints statistics;
3. exports the QDQ ONNX model and checks its accuracy in ONNX Runtime and OpenVINO;
4. prunes 50% of the filters, fine-tunes, and folds them away physically.

Outputs go to ./out (ONNX files). Run: `.venv/bin/python examples/digits_demo.py`.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fxcompress import compile_for_compression
from fxcompress.passes import FilterPruning, MagnitudeSparsity, Quantize
from fxcompress.testing.data import digits_loaders, evaluate_accuracy, train_digits_cnn


def fine_tune(gm, ctrl, loader, epochs: int, lr: float = 1e-3):
    optimizer = torch.optim.Adam(gm.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    gm.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = criterion(gm(x), y) + ctrl.loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ctrl.scheduler.step()
        ctrl.scheduler.epoch_step()
    gm.eval()


def onnx_accuracy(path: str, loader) -> dict[str, float]:
    """Accuracy of the exported model in ONNX Runtime and OpenVINO (where installed)."""
    xs = torch.cat([x for x, _ in loader]).numpy()
    ys = torch.cat([y for _, y in loader]).numpy()
    results = {}
    try:
        import onnxruntime as ort
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        logits = np.concatenate([session.run(None, {name: xs[i:i + 64]})[0] for i in range(0, len(xs), 64)])
        results["onnxruntime"] = float((logits.argmax(1) == ys).mean())
    except ImportError:
        pass
    try:
        import openvino as ov
        # the plugin's default precision, as a user would deploy: bf16 for the non-quantized parts on
        # CPUs with bf16 (AVX-512 BF16, AMX), f32 elsewhere, so a few images may differ between machines
        compiled = ov.Core().compile_model(path, "CPU")
        logits = np.concatenate([compiled(xs[i:i + 64])[0] for i in range(0, len(xs), 64)])
        results["openvino"] = float((logits.argmax(1) == ys).mean())
    except ImportError:
        pass
    return results


def section(title: str):
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per pipeline")
    parser.add_argument("--out", default="out", help="where the ONNX files go")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    train_loader, test_loader = digits_loaders(batch_size=64, seed=0)

    section("1. fp32 baseline (scikit-learn digits, 8x8 handwritten digits)")
    start = time.perf_counter()
    model = train_digits_cnn().eval()
    fp32 = evaluate_accuracy(model, test_loader)
    print(f"trained or loaded from cache in {time.perf_counter() - start:.1f} s; fp32 test accuracy {fp32:.4f}")
    example = (next(iter(test_loader))[0][:1],)

    section("2. 50% magnitude sparsity + int8 quantization")
    ctrl, gm = compile_for_compression(model, [
        MagnitudeSparsity(sparsity_init=0.25, sparsity_target=0.5, sparsity_target_epoch=max(1, args.epochs - 1),
                          sparsity_freeze_epoch=args.epochs),
        Quantize(bits=8)], example_inputs=example)
    print(ctrl.summary())
    print("\nWhat the passes changed in the graph:\n")
    print(ctrl.diff())
    ctrl.initialize(train_loader)
    ptq = evaluate_accuracy(gm, test_loader)
    fine_tune(gm, ctrl, train_loader, args.epochs)
    qat = evaluate_accuracy(gm, test_loader)
    print(f"\naccuracy: fp32 {fp32:.4f} | sparse+int8 before fine-tuning {ptq:.4f} | after {args.epochs} epochs {qat:.4f}")
    print()
    print(ctrl.statistics())
    path = ctrl.export_onnx(out / "digits_sparse_int8.onnx")
    size = os.path.getsize(path)
    print(f"\nexported {path} ({size / 1024:.1f} KiB); accuracy of the exported model: {onnx_accuracy(path, test_loader)}")

    section("3. filter pruning: 50% of the filters, removed physically")
    ctrl, gm = compile_for_compression(model, [FilterPruning(pruning_target=0.5, schedule="baseline", prune_first_conv=True)],
                                       example_inputs=example)
    ctrl.initialize(train_loader)
    fine_tune(gm, ctrl, train_loader, args.epochs)
    masked = evaluate_accuracy(gm, test_loader)
    small = ctrl.strip()
    params_before = sum(p.numel() for p in model.parameters())
    params_after = sum(p.numel() for p in small.parameters())
    print(ctrl.statistics())
    print(f"\naccuracy: fp32 {fp32:.4f} | pruned {masked:.4f} | folded {evaluate_accuracy(small, test_loader):.4f}; "
          f"parameters {params_before} -> {params_after} ({params_after / params_before:.2f}x)")
    path = ctrl.export_onnx(out / "digits_pruned.onnx")
    print(f"exported {path}; accuracy of the exported model: {onnx_accuracy(path, test_loader)}")


if __name__ == "__main__":
    main()
