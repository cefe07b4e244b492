"""Training-step time of binarized models against the fp32 step.

A "step" is forward + backward + Adam update + ``ctrl.loss()`` + ``ctrl.scheduler.step()``,
as in the user's loop. Configurations: fp32; the first stage of the staged schedule
(activations binarized, weights float); fully binarized with XNOR and with DoReFa weights.
They are timed interleaved (round robin, several rounds) and each ratio is the median step
time of a configuration over the fp32 model's, all in one run, so machine noise hits every
configuration alike. First and last layers stay in full precision (the default).

    .venv/bin/python benchmarks/bench_binarization_step.py [--model resnet_tiny|digits] [--rounds 11]
                                                            [--threads 1] [--device cpu|cuda]

With ``--openvino`` it measures inference instead: the fp32 model and the fully binarized
one exported in both forms (``export_form="where"``: float +-m weights and Greater/Where;
``"qdq"``: int8 +-1 weights and two-level uint8 QDQ activations), OpenVINO CPU, latency
hint, f32 inference precision and the plugin's default (bf16 on CPUs that have it), again
interleaved medians, with how many convolutions OpenVINO runs in integers.

Prints a Markdown table (the RESULTS.md section is pasted from it).
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from fxcompress import compile_for_compression
from fxcompress.passes import Binarization
from fxcompress.testing import DigitsCNN, ResNetTiny


def build(model_name: str):
    if model_name == "digits":
        return DigitsCNN(seed=0), torch.randn(64, 1, 8, 8), 10
    return ResNetTiny(num_classes=10, width=16, seed=0), torch.randn(32, 3, 32, 32), 10


CONFIGS = {
    "fp32": lambda: [],
    "binary activations, float weights (stage 1)": lambda: [
        Binarization(activations_quant_start_epoch=0, weights_quant_start_epoch=1000)],
    "fully binary, XNOR weights": lambda: [
        Binarization(mode="xnor", activations_quant_start_epoch=0, weights_quant_start_epoch=0)],
    "fully binary, DoReFa weights": lambda: [
        Binarization(mode="dorefa", activations_quant_start_epoch=0, weights_quant_start_epoch=0)],
}


def setup(name: str, model_name: str, device: str):
    model, x, classes = build(model_name)
    y = torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    model, x, y = model.to(device), x.to(device), y.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(model, CONFIGS[name](), example_inputs=(x,), copy=True)
        ctrl.initialize([(x, y)])
    gm.train()
    opt = torch.optim.Adam(gm.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(gm(x), y) + ctrl.loss()
        loss.backward()
        opt.step()
        ctrl.scheduler.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up
        step()
    return step


def openvino_latency(args):
    import os
    import tempfile

    from fxcompress.runtime import openvino_compile, openvino_compute_layers
    model, x, _ = build(args.model)
    model.eval()
    configs = {"fp32": [], "binary, export_form=where": [Binarization(activations_quant_start_epoch=0,
                                                                        weights_quant_start_epoch=0)],
               "binary, export_form=qdq": [Binarization(activations_quant_start_epoch=0,
                                                          weights_quant_start_epoch=0, export_form="qdq")]}
    requests, integer = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, passes in configs.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ctrl, gm = compile_for_compression(model, passes, example_inputs=(x,), copy=True)
                ctrl.initialize([(x,)])
                path = ctrl.export_onnx(os.path.join(tmp, f"{len(requests)}.onnx"))
            for precision in ("f32", None):
                compiled = openvino_compile(path, precision=precision,
                                            config={"PERFORMANCE_HINT": "LATENCY",
                                                    "INFERENCE_NUM_THREADS": args.threads})
                key = (name, precision or "default")
                requests[key] = compiled.create_infer_request()
                report = openvino_compute_layers(compiled)
                integer[key] = f"{len(report.integer)}/{len(report.layers)}"
    data = x.numpy()
    times = {key: [] for key in requests}
    for request in requests.values():
        for _ in range(5):
            request.infer([data])
    for _ in range(args.rounds):
        for key, request in requests.items():
            start = time.perf_counter()
            for _ in range(args.steps * 4):
                request.infer([data])
            times[key].append((time.perf_counter() - start) / (args.steps * 4))
    print(f"model: {args.model}, batch {x.shape[0]}, OpenVINO CPU latency hint, {args.threads} thread(s), "
          f"{args.rounds} rounds, interleaved medians")
    print("| model | precision | integer convs/FC | ms / inference | vs fp32, same precision |")
    print("|---|---|---|---|---|")
    for key in requests:
        base = statistics.median(times[("fp32", key[1])])
        t = statistics.median(times[key])
        print(f"| {key[0]} | {key[1]} | {integer[key]} | {t * 1e3:.2f} | {base / t:.2f}x faster |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["resnet_tiny", "digits"], default="resnet_tiny")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps timed per configuration per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--openvino", action="store_true", help="exported-model inference latency instead")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.openvino:
        return openvino_latency(args)
    from fxcompress import ops
    steps = {name: setup(name, args.model, args.device) for name in CONFIGS}
    times = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["fp32"])
    print(f"model: {args.model}, {args.rounds} rounds x {args.steps} steps, {args.threads} thread(s), "
          f"{args.device}, op library: {ops.backend()}, interleaved medians")
    print("| configuration | ms / step | vs fp32 step |")
    print("|---|---|---|")
    for name in CONFIGS:
        t = statistics.median(times[name])
        print(f"| {name} | {t * 1e3:.1f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
