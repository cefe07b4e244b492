"""fxcompress.integrations.transformers: QAT, sparsity and checkpoints through transformers.Trainer.

A tiny random BERT classifier (2 layers, hidden 32) learns which of two token ranges a padded
sequence is drawn from; a few dozen examples, a few dozen optimizer steps.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from fxcompress import CheckpointError  # noqa: E402
from fxcompress.integrations.transformers import (COMPRESSION_STATE_NAME, CompressedModel,  # noqa: E402
                                                  CompressionTrainer)
from fxcompress.passes import MagnitudeSparsity, Quantize  # noqa: E402
from fxcompress.runtime import openvino_compile, openvino_infer, run_onnxruntime  # noqa: E402

VOCAB, LENGTH = 64, 16


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return transformers.BertForSequenceClassification(config)


class TokenRanges(torch.utils.data.Dataset):
    """Label 0: tokens from [10, 30); label 1: tokens from [30, 50); right-padded to LENGTH."""

    def __init__(self, count: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(count):
            label = i % 2
            length = int(torch.randint(4, LENGTH + 1, (), generator=g))
            ids = torch.zeros(LENGTH, dtype=torch.long)
            ids[:length] = torch.randint(10 + 20 * label, 30 + 20 * label, (length,), generator=g)
            mask = (torch.arange(LENGTH) < length).long()
            self.items.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                               "labels": torch.tensor(label), "unused_column": torch.tensor(i)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def example_inputs(batch: int = 2, length: int = LENGTH):
    ids = torch.randint(10, 50, (batch, length), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def training_args(folder, **overrides):
    values = dict(output_dir=str(folder), per_device_train_batch_size=8, learning_rate=3e-3, max_steps=24,
                  logging_steps=4, save_strategy="no", report_to=[], seed=0, use_cpu=True,
                  dataloader_num_workers=0, disable_tqdm=True)
    values.update(overrides)
    return transformers.TrainingArguments(**values)


def trainer_for(folder, compression, *, seed: int = 0, examples: int = 48, **overrides) -> CompressionTrainer:
    return CompressionTrainer(model=tiny_bert(seed), args=training_args(folder, **overrides),
                              train_dataset=TokenRanges(examples, seed=1), compression=compression,
                              example_inputs=example_inputs(), num_init_batches=2)


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_qat_through_the_trainer_learns_and_exports_with_dynamic_axes(tmp_path):
    trainer = trainer_for(tmp_path, [Quantize(bits=8, quantize_outputs=True)])
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) == 6
    assert losses[0] == pytest.approx(np.log(2), abs=0.05)   # chance level at the start
    # learns: 0.693 -> 0.531 in 24 steps with the attention matmuls quantized too (0.466 when the tiny BERT,
    # compiled in train mode, kept SDPA fused because fx had frozen its dropout rate: fxcompress/dropout.py)
    assert losses[-1] < 0.8 * losses[0], losses
    ctrl, gm = trainer.ctrl, trainer.model.gm
    assert ctrl.scheduler.schedulers[0].global_step == 24
    stats = ctrl.statistics().to_dict()["quantization"]
    assert stats["layers"], stats   # quantized layers are listed

    path = trainer.export_onnx(tmp_path / "model.onnx")
    gm.eval()
    output_quantizer = gm.get_submodule(next(n for n in gm.graph.nodes if n.op == "output").args[0]["logits"].target)
    step = float(output_quantizer.effective_scale().detach().max())
    compiled = openvino_compile(path, precision="f32")
    for batch, length in [(1, 7), (5, 13)]:       # neither is the example's (2, 16)
        inputs = TokenRanges(batch, seed=7 + batch).items
        feed = {k: torch.stack([item[k][:length] for item in inputs]) for k in trainer.model.input_names}
        with torch.no_grad():
            expected = gm(**feed)["logits"].numpy()
        ordered = [feed[name] for name in trainer.model.input_names]
        onnx_runtime = run_onnxruntime(path, *ordered)[0]
        openvino = openvino_infer(compiled, *ordered)[0]
        assert onnx_runtime.shape == openvino.shape == (batch, 2)
        assert np.abs(onnx_runtime - expected).max() <= step * 1.001
        assert np.abs(openvino - expected).max() <= step * 1.001


def _state(trainer):
    """Everything a resumed run must reproduce: weights, quantizer scales, masks, controller state."""
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer.ctrl.state_dict()


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_state_bitwise(tmp_path):
    """Sparsity masks and quantizers together, stopped mid-epoch (dropout on: the RNG state matters too)."""
    def passes():
        return [MagnitudeSparsity(sparsity_target=0.5, sparsity_init=0.1, schedule="polynomial",
                                  sparsity_target_epoch=3, sparsity_freeze_epoch=4), Quantize(bits=8)]

    common = dict(max_steps=12, save_strategy="steps", save_steps=6, examples=32)   # 4 steps per epoch: 3 epochs
    uninterrupted = trainer_for(tmp_path / "a", passes(), **common)
    uninterrupted.train()
    checkpoint = tmp_path / "a" / "checkpoint-6"
    assert (checkpoint / COMPRESSION_STATE_NAME).is_file() and (checkpoint / "model.safetensors").is_file()

    resumed = trainer_for(tmp_path / "b", passes(), **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    weights, ctrl_state = _state(uninterrupted)
    resumed_weights, resumed_ctrl_state = _state(resumed)
    _assert_same(ctrl_state, resumed_ctrl_state, "ctrl")
    _assert_same(weights, resumed_weights, "weights")
    assert uninterrupted.ctrl.scheduler.current_epoch == 3
    sparsity = uninterrupted.ctrl.statistics().to_dict()["magnitude_sparsity"]
    assert sparsity["current_target"] == pytest.approx(0.5)
    assert sparsity["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_sparsity_config_through_the_trainer_follows_its_schedule(tmp_path):
    config = {"compression": [{"algorithm": "magnitude_sparsity", "sparsity_init": 0.2,
                               "params": {"schedule": "multistep", "multistep_steps": [1, 2],
                                          "multistep_sparsity_levels": [0.2, 0.4, 0.6]}}]}
    trainer = trainer_for(tmp_path, config, num_train_epochs=2, max_steps=-1, examples=32)   # 4 steps per epoch
    trainer.train()
    ctrl = trainer.ctrl
    assert ctrl.scheduler.current_epoch == 2
    assert ctrl.scheduler.schedulers[0].global_step == 8
    stats = ctrl.statistics().to_dict()["magnitude_sparsity"]
    assert stats["current_target"] == pytest.approx(0.6)
    assert stats["sparsity"] == pytest.approx(0.6, abs=0.01)   # measured on the masks


def test_trainer_keeps_the_columns_the_graph_takes_and_computes_the_heads_loss():
    model = tiny_bert()
    compressed = CompressedModel(model, [Quantize(bits=8)], example_inputs())
    import inspect
    assert list(inspect.signature(compressed.forward).parameters) == [
        "input_ids", "attention_mask", "token_type_ids", "labels"]
    compressed.ctrl.initialize([example_inputs()])
    batch = example_inputs(3, 9)
    labels = torch.tensor([0, 1, 1])
    outputs = compressed(**batch, labels=labels)
    expected = torch.nn.functional.cross_entropy(outputs["logits"], labels)
    assert torch.equal(outputs["loss"], expected)
    # It pickles (torch.save(model), DataLoader workers, multiprocessing): the head's loss is no closure.
    import pickle
    compressed.eval()   # no dropout: the two runs must be comparable
    outputs = compressed(**batch, labels=labels)
    restored = pickle.loads(pickle.dumps(compressed))
    again = restored(**batch, labels=labels)
    assert torch.equal(again["logits"], outputs["logits"]) and torch.equal(again["loss"], outputs["loss"])
    with pytest.raises(TypeError, match=r"unexpected \['position_ids'\]"):
        compressed(**batch, position_ids=batch["input_ids"])
    with pytest.raises(TypeError, match=r"missing \['token_type_ids'\]"):
        compressed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_unsupported_trainer_features_raise_clear_errors(tmp_path):
    compressed = CompressedModel(tiny_bert(), [Quantize(bits=8)], example_inputs())
    with pytest.raises(NotImplementedError, match="checkpointing is not supported"):
        compressed.gradient_checkpointing_enable()
    with pytest.raises(NotImplementedError, match="save_model"):
        compressed.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="compiled already"):
        CompressionTrainer(model=compressed, args=training_args(tmp_path), compression=[Quantize(bits=8)])
    with pytest.raises(ValueError, match="needs `compression`"):
        CompressionTrainer(model=tiny_bert(), args=training_args(tmp_path))
    trainer = CompressionTrainer(model=compressed, args=training_args(tmp_path), train_dataset=TokenRanges(8, 0))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a CompressionTrainer checkpoint"):
        trainer._load_from_checkpoint(str(tmp_path / "empty"))


def test_tied_weights_save_and_resume_through_safetensors(tmp_path):
    """A masked-LM head shares its weight with the word embeddings: safetensors refuses shared tensors."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True)
    model = transformers.BertForMaskedLM(config)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    compressed = CompressedModel(model, [Quantize(bits=8)], example_inputs())
    trainer = CompressionTrainer(model=compressed, args=training_args(tmp_path), train_dataset=TokenRanges(8, 0),
                                 num_init_batches=1)
    trainer.initialize_compression()
    trainer.save_model(str(tmp_path / "saved"))
    saved = {k: v.clone() for k, v in compressed.state_dict().items()}
    with torch.no_grad():
        for p in compressed.parameters():
            p.add_(1.0)
    trainer._load_from_checkpoint(str(tmp_path / "saved"))
    restored = dict(compressed.named_parameters(remove_duplicate=False))
    tied = [name for name in restored if "word_embeddings.weight" in name or "decoder.weight" in name]
    assert len({restored[n].data_ptr() for n in tied}) == 1
    _assert_same(saved, dict(compressed.state_dict()))
