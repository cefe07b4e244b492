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
import warnings

import torch

from fxcompress import compile_for_compression
from fxcompress.passes import Binarization
from timing import interleaved_medians, time_training_steps, training_model, training_step_arguments


CONFIGS = {
    "fp32": lambda: [],
    "binary activations, float weights (stage 1)": lambda: [
        Binarization(activations_quant_start_epoch=0, weights_quant_start_epoch=1000)],
    "fully binary, XNOR weights": lambda: [
        Binarization(mode="xnor", activations_quant_start_epoch=0, weights_quant_start_epoch=0)],
    "fully binary, DoReFa weights": lambda: [
        Binarization(mode="dorefa", activations_quant_start_epoch=0, weights_quant_start_epoch=0)],
}


def openvino_latency(args):
    import os
    import tempfile

    from fxcompress.runtime import openvino_compile, openvino_compute_layers
    model, x, _ = training_model(args.model)
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
    times = interleaved_medians({key: (lambda r=request: r.infer([data])) for key, request in requests.items()},
                                args.rounds, args.steps * 4, warmup=5)
    print(f"model: {args.model}, batch {x.shape[0]}, OpenVINO CPU latency hint, {args.threads} thread(s), "
          f"{args.rounds} rounds, interleaved medians")
    print("| model | precision | integer convs/FC | ms / inference | vs fp32, same precision |")
    print("|---|---|---|---|---|")
    for key in requests:
        base, t = times[("fp32", key[1])], times[key]
        print(f"| {key[0]} | {key[1]} | {integer[key]} | {t * 1e3:.2f} | {base / t:.2f}x faster |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    training_step_arguments(parser)
    parser.add_argument("--openvino", action="store_true", help="exported-model inference latency instead")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.openvino:
        return openvino_latency(args)
    from fxcompress import ops
    times = time_training_steps(CONFIGS, args)
    base = times["fp32"]
    print(f"model: {args.model}, {args.rounds} rounds x {args.steps} steps, {args.threads} thread(s), "
          f"{args.device}, op library: {ops.backend()}, interleaved medians")
    print("| configuration | ms / step | vs fp32 step |")
    print("|---|---|---|")
    for name in CONFIGS:
        t = times[name]
        print(f"| {name} | {t * 1e3:.1f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
