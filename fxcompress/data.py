"""Turning a user's data loader into model inputs, for initialization and calibration.

``initialize(loader)`` accepts any iterable of batches (docs/design.md):
- a tensor: the model's single input;
- a tuple/list whose first element is the model input (``(input, target)``);
  that element may itself be a tuple of tensors for a model with several inputs;
- a dict: keyword inputs (a Hugging Face tokenizer's output), keys the model does
  not take are dropped (``labels`` and the like);
``input_fn(batch) -> args tuple | dict | tensor`` overrides all of that.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterable, Iterator

import torch

__all__ = ["batch_to_inputs", "batch_target", "CalibrationData", "to_device", "count_samples", "progress_bar",
           "preserved_modes"]


def batch_target(batch: Any):
    """The target of a batch: its second element ``(input, target)``, or ``batch["labels"]``; None otherwise."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if hasattr(batch, "keys") and "labels" in batch:
        return batch["labels"]
    return None


def batch_to_inputs(batch: Any, input_fn: Callable | None = None,
                    accepted_kwargs: set[str] | None = None) -> tuple[tuple, dict]:
    if input_fn is not None:
        batch = input_fn(batch)
        if isinstance(batch, torch.Tensor):
            return (batch,), {}
        if isinstance(batch, dict):
            return (), dict(batch)
        return tuple(batch), {}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict) or hasattr(batch, "keys") and not isinstance(batch, torch.Tensor):
        items = dict(batch)
        if accepted_kwargs is not None:
            items = {k: v for k, v in items.items() if k in accepted_kwargs}
        return (), items
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("initialize: got an empty batch")
        first = batch[0]
        if isinstance(first, torch.Tensor):
            return (first,), {}
        if isinstance(first, (tuple, list)):
            return tuple(first), {}
        if isinstance(first, dict):
            return batch_to_inputs(first, None, accepted_kwargs)
    raise TypeError(
        f"initialize: cannot turn a batch of type {type(batch).__name__} into model inputs; "
        "pass input_fn=lambda batch: <model inputs> to say how")


def count_samples(args: tuple, kwargs: dict) -> int:
    """The batch size of model inputs: the first dimension of the first tensor (1 if none)."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def to_device(value, device):
    """``value`` (a tensor or nested tuples/lists/dicts of them) moved to ``device`` (None: unchanged)."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class CalibrationData:
    """A re-iterable view of the user's loader as model inputs, limited by a sample count."""

    def __init__(self, loader: Iterable, input_fn: Callable | None = None, device=None,
                 model: torch.nn.Module | None = None):
        if loader is None:
            raise ValueError("initialize needs a data loader (any iterable of batches)")
        self.loader = loader
        self.input_fn = input_fn
        self.device = device
        self.accepted_kwargs = _accepted_kwargs(model) if model is not None else None

    def batches(self, num_samples: int | None = None) -> Iterator[tuple[tuple, dict]]:
        """Yields ``(args, kwargs)`` until ``num_samples`` samples were seen (all if None)."""
        seen = 0
        for batch in self.loader:
            args, kwargs = batch_to_inputs(batch, self.input_fn, self.accepted_kwargs)
            args, kwargs = to_device(args, self.device), to_device(kwargs, self.device)
            yield args, kwargs
            seen += count_samples(args, kwargs)
            if num_samples is not None and seen >= num_samples:
                return

    def run(self, module: torch.nn.Module, num_samples: int | None = None, *,
            progress: str | None = None, train_modules: Iterable[torch.nn.Module] = (),
            purpose: str = "") -> int:
        """Forward passes over the data in eval mode, without gradients; returns how many batches ran.

        ``train_modules`` run in train mode meanwhile (BatchNorm adaptation); every module's flag is
        restored after. ``purpose`` names the step in the error for a loader without batches.
        """
        count = 0
        with preserved_modes(module), torch.no_grad():
            module.eval()
            for m in train_modules:
                m.train()
            for args, kwargs in progress_bar(self.batches(num_samples), progress):
                module(*args, **kwargs)
                count += 1
        if count == 0:
            raise ValueError(f"initialize: the data loader yielded no batches{' for ' + purpose if purpose else ''}")
        return count


@contextlib.contextmanager
def preserved_modes(module: torch.nn.Module):
    """Every submodule's train/eval flag as it was on entry, restored on exit (``module.train(mode)``
    alone would overwrite flags the user set per module, e.g. BatchNorm layers frozen in eval)."""
    modes = {m: m.training for m in module.modules()}
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _accepted_kwargs(model: torch.nn.Module) -> set[str] | None:
    forward = getattr(model, "forward", None)
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def progress_bar(iterable, description: str | None):
    """tqdm progress bar when a description is given and tqdm is installed; plain iteration otherwise."""
    if not description:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a declared dependency, but stay usable without it
        return iterable
    # disable=None: no bar when stderr is not a terminal, so logs written to files stay readable
    return tqdm(iterable, desc=description, leave=False, disable=None)
