"""NNCF's post-training int8 of an fp32 ONNX model with its OpenVINO backend, timed: run in NNCF's own venv.

    /path/to/nncf-venv/bin/python benchmarks/nncf_quantize_openvino.py fp32.onnx samples.npz out.xml [--transformer]

``samples.npz`` holds the calibration batches as ``"<batch>/<input name>"`` arrays (what
``bench_transformer.py`` writes); every batch is one ``nncf.Dataset`` item (a dict of inputs).
Prints one JSON line: nncf and openvino versions, seconds to read the model and to run
``nncf.quantize`` (``model_type=TRANSFORMER`` with ``--transformer``, else NNCF's defaults).
Needs only nncf, openvino and numpy, so a venv without transformers runs it.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp32_onnx")
    parser.add_argument("samples")
    parser.add_argument("output_xml")
    parser.add_argument("--transformer", action="store_true", help="nncf.ModelType.TRANSFORMER")
    args = parser.parse_args()
    import nncf
    import openvino as ov

    batches = defaultdict(dict)
    with np.load(args.samples) as data:
        for key in data.files:
            index, name = key.split("/", 1)
            batches[int(index)][name] = data[key]
    samples = [batches[i] for i in sorted(batches)]
    start = time.perf_counter()
    model = ov.Core().read_model(args.fp32_onnx)
    read = time.perf_counter() - start
    start = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples),
                              model_type=nncf.ModelType.TRANSFORMER if args.transformer else None)
    seconds = time.perf_counter() - start
    ov.save_model(quantized, args.output_xml)
    print(json.dumps({"nncf": nncf.__version__, "openvino": ov.__version__, "read_s": read,
                      "quantize_s": seconds, "samples": len(samples)}))


if __name__ == "__main__":
    main()
