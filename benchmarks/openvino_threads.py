"""OpenVINO CPU on several threads: the same compiled model, the same inputs, different results.

Reproduction for docs/export.md ("OpenVINO on several threads"): the project's ``resnet_tiny``
compiled, initialized and exported as in ``tests/test_export_runtimes.py``; the file (and a copy cut
at one quantizer, ``--cut``) is compiled once with ``INFERENCE_NUM_THREADS=1`` and once with ``N``
(``INFERENCE_PRECISION_HINT=f32`` both), and each compiled model is run ``--runs`` times on the same
inputs. Prints, per thread count, how many runs differ bitwise from the first one-thread run, and
the largest difference in steps of the output's quantizer with the elements it touched. The
difference is timing-dependent: it shows on an idle machine, rarely under load.

    .venv/bin/python benchmarks/openvino_threads.py --runs 1000
    .venv/bin/python benchmarks/openvino_threads.py --runs 1000 --cut quantize_dequantize_8
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from checkout import use_this_checkout  # noqa: E402  (benchmarks/checkout.py)

use_this_checkout()

from fxcompress import compile_for_compression  # noqa: E402
from fxcompress.passes import Quantize  # noqa: E402
from fxcompress.testing import build  # noqa: E402


def export_resnet_tiny(folder: Path) -> tuple[Path, list[np.ndarray]]:
    """As ``check_export_everywhere`` in tests/test_export_runtimes.py does it."""
    case = build("resnet_tiny")
    no_adaptation = {"initializer": {"batchnorm_adaptation": {"num_bn_adaptation_samples": 0}}}
    ctrl, gm = compile_for_compression(case.model.eval(), [Quantize(bits=8, quantize_outputs=True, **no_adaptation)],
                                       example_inputs=case.example_inputs)
    g = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randn(x.shape, generator=g) for x in case.example_inputs) for _ in range(2)]
    ctrl.initialize([(b,) for b in (case.example_inputs, *batches)])
    return Path(ctrl.export_onnx(folder / "resnet_tiny.onnx")), [x.numpy() for x in case.example_inputs]


def cut_at(path: Path, output: str) -> tuple[Path, float]:
    """A copy of the file whose only output is ``output`` (a DequantizeLinear), and that output's step."""
    import onnx
    model = onnx.load(path)
    dq = next(n for n in model.graph.node if n.output[0] == output)
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
    cut = path.with_name(f"cut_{output}.onnx")
    onnx.save(model, cut)
    return cut, float(onnx.numpy_helper.to_array(scale).max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--cut", default=None, help="a DequantizeLinear output to cut the file at")
    args = parser.parse_args(argv)
    import openvino as ov
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path, inputs = export_resnet_tiny(Path(tmp))
        path, step = cut_at(path, args.cut or "quantize_dequantize_14")
        compiled = {t: ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                   "INFERENCE_NUM_THREADS": t})
                    for t in (1, args.threads)}
        reference = None
        for threads, model in compiled.items():
            request = model.create_infer_request()
            differing, worst, where = 0, 0.0, None
            for _ in range(args.runs):
                result = np.array(request.infer(inputs)[model.outputs[0]])
                reference = result if reference is None else reference
                if not np.array_equal(result, reference):
                    differing += 1
                    diff = np.abs(result - reference) / step
                    if diff.max() > worst:
                        worst, where = float(diff.max()), np.argwhere(diff > 0)[:8].tolist()
            print(f"{path.name}, {threads} thread(s): {differing} of {args.runs} runs differ from the first "
                  f"one-thread run; max {worst:.2f} steps at {where}", file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
