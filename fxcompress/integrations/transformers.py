"""Compression in a Hugging Face ``transformers.Trainer`` script (docs/transformers.md).

    from fxcompress.integrations.transformers import CompressionTrainer
    trainer = CompressionTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                                 compression=[Quantize(bits=8)],        # passes, a Config or a config dict
                                 example_inputs=dict(tokenizer(["a sentence"], return_tensors="pt")))
    trainer.train()                    # range init on training batches first, then QAT
    trainer.export_onnx("model.onnx")  # dynamic batch and sequence axes

What the Trainer expects of a model and how the compiled ``GraphModule`` meets it, in
``CompressedModel``: ``forward`` names the traced inputs (the Trainer keeps only those dataset
columns) and ``labels``; it returns a dict with ``loss`` computed as the Hugging Face model's
head computes it; ``config`` is the original model's config. ``CompressionTrainer`` adds
``ctrl.loss()`` to the training loss, steps the compression scheduler per optimizer step and per
epoch, saves the controller state in every checkpoint (``compression_state.pt``) and restores it
on ``resume_from_checkpoint``, and saves weights with safetensors after dropping duplicate names
of shared tensors (which ``safetensors`` refuses).
"""
from __future__ import annotations

import inspect
import itertools
import os
from typing import Any, Callable

import torch

try:
    import transformers
    from transformers.loss.loss_utils import (ForCausalLMLoss, ForMaskedLMLoss, ForSequenceClassificationLoss,
                                              ForTokenClassification)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("fxcompress.integrations.transformers needs the `transformers` package "
                      "(pip install transformers accelerate)") from exc

from ..api import compile_for_compression
from ..checkpoint import load_state
from ..controller import CompressionController
from ..errors import CheckpointError

__all__ = ["CompressedModel", "CompressionTrainer", "CompressionCallback", "COMPRESSION_STATE_NAME"]

COMPRESSION_STATE_NAME = "compression_state.pt"
_WEIGHTS_NAME = "model.safetensors"   # transformers' SAFE_WEIGHTS_NAME


class _HeadLoss:
    """The loss a Hugging Face head of ``loss_type`` computes from ``(outputs, labels)``; a class, not a
    closure, so that a ``CompressedModel`` pickles (``torch.save(model)``, multiprocessing)."""

    def __init__(self, loss_type: str, config):
        self.loss_type, self.config = loss_type, config

    def __call__(self, outputs, labels):
        logits, config = outputs["logits"], self.config
        if self.loss_type == "ForSequenceClassification":
            return ForSequenceClassificationLoss(labels, logits, config)
        if self.loss_type == "ForTokenClassification":
            return ForTokenClassification(logits, labels, config)
        if self.loss_type == "ForMaskedLM":
            return ForMaskedLMLoss(logits, labels, config.vocab_size)
        return ForCausalLMLoss(logits, labels, config.vocab_size)


_HEAD_LOSSES = ("ForSequenceClassification", "ForTokenClassification", "ForMaskedLM", "ForCausalLM")


def _task_loss_of(model: torch.nn.Module) -> Callable | None:
    """The loss the Hugging Face model's head computes from ``(outputs, labels)``, by its ``loss_type``."""
    config, loss_type = getattr(model, "config", None), getattr(model, "loss_type", None)
    if config is None or loss_type not in _HEAD_LOSSES:
        return None
    return _HeadLoss(loss_type, config)


class _Forward:
    """``CompressedModel.forward``: its signature names the traced inputs and ``labels``, so the
    Trainer's ``remove_unused_columns`` keeps exactly the dataset columns the graph takes."""

    def __init__(self, model: "CompressedModel"):
        self._model = model

    @property
    def __signature__(self) -> inspect.Signature:
        keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
        return inspect.Signature([inspect.Parameter(name, keyword, default=None)
                                  for name in [*self._model.input_names, "labels"]])

    def __call__(self, *args, **kwargs):
        return self._model.run(*args, **kwargs)


class _ForwardDescriptor:
    """``model.forward`` is a ``_Forward`` naming that model's inputs; on the class (where the
    Trainer's ``find_labels`` looks for label arguments) a plain method taking ``labels``."""

    def __get__(self, instance, owner):
        if instance is None:
            def forward(self, labels=None, **inputs):
                return self.run(labels=labels, **inputs)
            return forward
        return _Forward(instance)


class CompressedModel(torch.nn.Module):
    """A compiled Hugging Face model in the form the ``Trainer`` drives.

    ``CompressedModel(model, compression, example_inputs)`` compiles ``model`` with
    ``compile_for_compression`` (``compression``: passes, a ``Config`` or a config dict; extra
    keywords go to it); ``CompressedModel(model, compiled=(ctrl, gm))`` wraps a graph compiled
    already. ``task_loss(outputs, labels)`` overrides the loss (default: the one the model's head
    computes, for sequence/token classification, masked and causal LM heads).
    """

    def __init__(self, model: torch.nn.Module, compression=None, example_inputs: Any = None, *,
                 compiled: tuple[CompressionController, torch.fx.GraphModule] | None = None,
                 task_loss: Callable | None = None, **compile_kwargs):
        super().__init__()
        if (compiled is None) == (compression is None):
            raise ValueError("CompressedModel: give either `compression` (passes, a Config or a config dict) "
                             "to compile the model, or `compiled=(ctrl, gm)` from compile_for_compression")
        if compiled is None:
            ctrl, gm = compile_for_compression(model, compression, example_inputs, **compile_kwargs)
        else:
            ctrl, gm = compiled
            if not isinstance(ctrl, CompressionController) or ctrl.gm is not gm:
                raise ValueError("CompressedModel: `compiled` must be the (ctrl, gm) pair that "
                                 "compile_for_compression returned")
        self.gm = gm
        self.ctrl = ctrl
        self.config = getattr(model, "config", None)
        self.task_loss = task_loss or _task_loss_of(model)
        self.model_name = type(model).__name__
        self.input_names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]

    forward = _ForwardDescriptor()

    def run(self, *args, labels=None, **inputs) -> dict:
        """``{"loss": ..., **model outputs}`` (``loss`` only with ``labels``); inputs by keyword."""
        if args:
            inputs.update(zip(self.input_names, args))
        unexpected = sorted(set(inputs) - set(self.input_names))
        missing = [n for n in self.input_names if inputs.get(n) is None]
        if unexpected or missing:
            raise TypeError(f"{self.model_name} (compressed) takes the inputs it was compiled with, "
                            f"{self.input_names}, and `labels`; "
                            + (f"unexpected {unexpected}" if unexpected else "")
                            + ("; " if unexpected and missing else "")
                            + (f"missing {missing} (compile with example inputs that include them)" if missing else ""))
        outputs = self.gm(**inputs)
        if isinstance(outputs, torch.Tensor):
            outputs = {"logits": outputs}
        elif not isinstance(outputs, dict):
            outputs = {"logits": outputs[0]} if isinstance(outputs, (tuple, list)) and len(outputs) == 1 else \
                dict(enumerate(outputs))
        if labels is None:
            return dict(outputs)
        if self.task_loss is None:
            raise ValueError(f"{self.model_name}: no task loss is known for this model head; pass "
                             f"task_loss=lambda outputs, labels: ... to CompressedModel, or "
                             f"compute_loss_func=... to the Trainer")
        return {"loss": self.task_loss(outputs, labels), **outputs}

    # What the Trainer (or a user) may ask of a Hugging Face model, answered clearly.
    def gradient_checkpointing_enable(self, *args, **kwargs):
        raise NotImplementedError(
            "activation (gradient) checkpointing is not supported on a compiled fxcompress graph: its "
            "layers are graph nodes, not the model's checkpointable modules; train without "
            "gradient_checkpointing / activation_checkpointing")

    activation_checkpointing_enable = gradient_checkpointing_enable

    def save_pretrained(self, *args, **kwargs):
        raise NotImplementedError(
            "a compressed model has no save_pretrained: save checkpoints with trainer.save_model(dir) "
            "(weights + compression_state.pt), deploy with trainer.export_onnx(path), or take the folded "
            "plain model from ctrl.strip()")

    def export_onnx(self, path, **kwargs):
        """``ctrl.export_onnx`` on the CPU (the compile-time example inputs live there), dynamic batch/sequence."""
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        if device.type != "cpu":
            self.cpu()
        try:
            return self.ctrl.export_onnx(path, **kwargs)
        finally:
            self.to(device)


def _storage(tensor: torch.Tensor):
    return tensor.untyped_storage().data_ptr()


def _view(tensor: torch.Tensor):
    return tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype


def _shared_groups(state_dict: dict) -> list[list[str]]:
    """Names of the tensors that share a storage, one list per storage (tied embeddings, a buffer
    registered in two modules)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            groups.setdefault(_storage(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _without_shared_storage(state_dict: dict) -> dict:
    """``state_dict`` as safetensors takes it (it refuses shared storage): a tensor saved under
    several names keeps its first name; different views of one storage are saved as copies."""
    out = dict(state_dict)
    for names in _shared_groups(state_dict):
        if len({_view(state_dict[n]) for n in names}) == 1:
            for name in names[1:]:
                del out[name]   # loading the first name fills the same tensor
        else:
            for name in names:
                out[name] = state_dict[name].clone()
    return out


def _with_shared_names(model: torch.nn.Module, saved: dict) -> dict:
    """``saved`` with the names ``_without_shared_storage`` dropped, filled from the name kept."""
    own = model.state_dict()
    full = dict(saved)
    for names in _shared_groups(own):
        kept = next((n for n in names if n in saved), None)
        for name in names:
            if name not in full and kept is not None and _view(own[name]) == _view(own[kept]):
                full[name] = saved[kept]
    return full


class CompressionCallback(transformers.TrainerCallback):
    """Steps the compression scheduler after every optimizer step and at the end of every epoch."""

    def __init__(self, ctrl: CompressionController):
        self.ctrl = ctrl

    def on_step_end(self, args, state, control, **kwargs):
        self.ctrl.scheduler.step()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.ctrl.scheduler.epoch_step()


class CompressionTrainer(transformers.Trainer):
    """``transformers.Trainer`` that compresses: takes the usual arguments plus

    - ``compression``: passes, a ``Config`` or an NNCF-style config dict (the model is then
      compiled with ``example_inputs``, or the config's ``input_info``), or ``None`` when
      ``model`` is a ``CompressedModel`` already;
    - ``example_inputs``: the tracing example, e.g. ``dict(tokenizer(texts, return_tensors="pt"))``;
    - ``num_init_batches``: training batches (in dataset order, so the training order is not
      disturbed) that ``train()`` runs ``ctrl.initialize`` on before training (0: the caller
      initialized); a run resumed from a checkpoint restores the initialized state instead;
    - ``onnx_path``: where ``train()`` exports the trained model at its end (optional).
    """

    def __init__(self, model=None, args=None, *trainer_args, compression=None, example_inputs: Any = None,
                 num_init_batches: int = 8, onnx_path: str | None = None, task_loss: Callable | None = None,
                 **trainer_kwargs):
        if isinstance(model, CompressedModel):
            if compression is not None:
                raise ValueError("CompressionTrainer: the model is compiled already (a CompressedModel); "
                                 "drop `compression`, or pass the Hugging Face model to compile it")
        elif compression is None:
            raise ValueError("CompressionTrainer needs `compression` (passes, a Config or a config dict) "
                             "or a model compiled already (CompressedModel)")
        else:
            model = CompressedModel(model, compression, example_inputs, task_loss=task_loss)
        if not isinstance(num_init_batches, int) or num_init_batches < 0:
            raise ValueError(f"CompressionTrainer: num_init_batches must be an integer >= 0, got {num_init_batches!r}")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self.ctrl: CompressionController = model.ctrl
        self.num_init_batches = num_init_batches
        self.onnx_path = onnx_path
        self.add_callback(CompressionCallback(self.ctrl))

    # -- training -----------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if not resume_from_checkpoint and self.num_init_batches:   # None or False: a fresh run
            self.initialize_compression()
        result = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.onnx_path:
            self.export_onnx(self.onnx_path)
        return result

    def initialize_compression(self, num_batches: int | None = None):
        """``ctrl.initialize`` on the first training batches in dataset order (no shuffling: the
        training order and the RNG stay what an uninitialized run would see)."""
        if self.train_dataset is None:
            raise ValueError("CompressionTrainer: initializing compression needs a train_dataset "
                             "(or num_init_batches=0 and ctrl.initialize(...) called by you)")
        loader = self.get_test_dataloader(self.train_dataset)  # sequential, collated, unused columns removed
        batches = list(itertools.islice(loader, num_batches or self.num_init_batches))
        self.ctrl.initialize(batches, device=self.args.device)
        return self

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            loss = loss + self.ctrl.loss()
        return (loss, outputs) if return_outputs else loss

    def export_onnx(self, path, **kwargs):
        """The trained model as an ONNX QDQ file with dynamic batch and sequence axes."""
        return self.model.export_onnx(path, **kwargs)

    # -- checkpoints -----------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state_dict = self.model.state_dict() if state_dict is None else state_dict
        super()._save(output_dir, state_dict=_without_shared_storage(state_dict))
        if self.args.should_save:
            torch.save(self.ctrl.state_dict(), os.path.join(output_dir, COMPRESSION_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        import safetensors.torch
        model = self.model if model is None else model
        weights = os.path.join(resume_from_checkpoint, _WEIGHTS_NAME)
        state_file = os.path.join(resume_from_checkpoint, COMPRESSION_STATE_NAME)
        for path in (weights, state_file):
            if not os.path.isfile(path):
                raise CheckpointError(f"{resume_from_checkpoint} is not a CompressionTrainer checkpoint: "
                                      f"{os.path.basename(path)} is missing")
        saved = safetensors.torch.load_file(weights, device="cpu")
        load_state(model, _with_shared_names(model, saved))   # every key checked, clear errors
        self.ctrl.load_state_dict(torch.load(state_file, map_location="cpu", weights_only=True))

    def _load_best_model(self):
        self._load_from_checkpoint(self.state.best_model_checkpoint)
