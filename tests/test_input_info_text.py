"""NNCF-style ``input_info`` for text models (several inputs, ``"type": "long"``, fillers, keywords):
compile from a JSON config -> initialize -> export with dynamic batch and sequence axes."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fxcompress import Config, compile_for_compression  # noqa: E402
from fxcompress.runtime import run_onnxruntime  # noqa: E402

# NNCF's BERT configs (its transformers integration) list three positional long inputs; the
# keyword form names them, as NNCF's GPT-2 / DistilBERT configs do.
POSITIONAL = [{"sample_size": [1, 32], "type": "long"}] * 3
KEYWORD = [{"sample_size": [2, 24], "type": "long", "filler": "random", "keyword": name}
           for name in ("input_ids", "attention_mask", "token_type_ids")]


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128, num_labels=2)
    return transformers.BertForSequenceClassification(config).eval()


def test_fillers_give_valid_token_ids_and_masks():
    info = [{"sample_size": [3, 9], "type": "long", "filler": filler} for filler in ("zeros", "ones", "random")]
    info.append({"sample_size": [2, 4]})
    config = Config.from_dict({"input_info": info, "compression": {"algorithm": "quantization"}})
    zeros, ones, random, floats = config.example_inputs()
    assert zeros.dtype == ones.dtype == random.dtype == torch.int64 and floats.dtype == torch.float32
    assert not zeros.any() and bool(ones.eq(1).all())
    # Random integers are 0 or 1: token ids every vocabulary has, and a valid attention mask.
    assert set(random.unique().tolist()) == {0, 1}


@pytest.mark.parametrize("input_info", [POSITIONAL, KEYWORD], ids=["positional", "keyword"])
def test_nncf_bert_config_compiles_initializes_and_exports_with_dynamic_axes(tmp_path, input_info):
    path = tmp_path / "bert_int8.json"
    path.write_text(json.dumps({"model": "bert-base-uncased", "input_info": input_info,
                                "compression": {"algorithm": "quantization",
                                                "initializer": {"range": {"num_init_samples": 8}}}}))
    ctrl, gm = compile_for_compression(tiny_bert(), Config.from_json(path))
    assert gm.meta["dynamic_dims"] == {name: {0: "batch", 1: "sequence"}
                                       for name in ("input_ids", "attention_mask", "token_type_ids")}
    g = torch.Generator().manual_seed(1)
    batches = []
    for batch, length in [(4, 10), (4, 17)]:
        ids = torch.randint(1, 64, (batch, length), generator=g)
        mask = (torch.arange(length) < torch.randint(3, length + 1, (batch, 1), generator=g)).long()
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    ctrl.initialize(batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # a static-shape export warns: fail on it
        warnings.filterwarnings("ignore", message=".*axis name.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        onnx_path = ctrl.export_onnx(tmp_path / "bert.onnx")
    inputs = onnx.load(onnx_path).graph.input
    assert [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in inputs] == [["batch", "sequence"]] * 3
    gm.eval()
    for batch in batches:   # shapes other than the example's
        with torch.no_grad():
            expected = gm(**batch)["logits"].numpy()
        got = run_onnxruntime(onnx_path, *[batch[i.name] for i in inputs])[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())
