"""Real data for tests and demos: the 8x8 handwritten digits bundled with
scikit-learn (1797 images, 10 classes; no download), and a :class:`DigitsCNN`
trained on them, cached on disk.

scikit-learn is imported lazily, inside :func:`load_digits_tensors`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .models import DigitsCNN, seeded

__all__ = [
    "load_digits_tensors",
    "digits_loaders",
    "train_digits_cnn",
    "evaluate_accuracy",
    "default_cache_dir",
]

# Bump when the data pipeline, DigitsCNN or the training recipe changes, so stale
# cached weights are not reused.
_RECIPE_VERSION = 1


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[Any, Any]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    data, target = digits.data.copy(), digits.target.copy()
    data.flags.writeable = False
    target.flags.writeable = False
    return data, target


def load_digits_tensors(seed: int = 0, test_fraction: float = 0.25
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sklearn digits as tensors: ``(x_train, y_train, x_test, y_test)``.

    ``x_*``: float32 ``[N, 1, 8, 8]``, pixel values (0..16) scaled to [0, 1] and then
    standardized with the training set's mean and std (one scalar each);
    ``y_*``: int64 ``[N]`` in 0..9.  The split is stratified and deterministic
    given ``seed`` (with the default 0.25: 1347 train, 450 test images).
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    data, target = _raw_digits()
    x = torch.tensor(data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    train_idx, test_idx = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=target)
    train_idx = torch.as_tensor(train_idx)
    test_idx = torch.as_tensor(test_idx)
    x_train, y_train = x[train_idx], y[train_idx]
    x_test, y_test = x[test_idx], y[test_idx]
    mean, std = x_train.mean(), x_train.std()
    x_train = ((x_train - mean) / std).contiguous()
    x_test = ((x_test - mean) / std).contiguous()
    return x_train, y_train, x_test, y_test


def digits_loaders(batch_size: int = 64, seed: int = 0, test_fraction: float = 0.25
                   ) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` over :func:`load_digits_tensors`, each yielding
    ``(x, y)`` batches.  The train loader reshuffles every epoch from a generator
    seeded with ``seed`` (so iteration order is reproducible); the test loader does
    not shuffle.  Single-process loading."""
    x_train, y_train, x_test, y_test = load_digits_tensors(seed, test_fraction)
    g = torch.Generator()
    g.manual_seed(int(seed))
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size,
                       shuffle=True, generator=g)
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=batch_size, shuffle=False)
    return train, test


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy of ``model`` over ``loader``'s ``(x, y)`` batches, in [0, 1].

    Runs in eval mode under ``torch.no_grad`` and restores the model's previous
    train/eval mode.  Inputs are moved to the device of the model's first
    parameter (if it has one)."""
    was_training = model.training
    model.eval()
    try:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else None
        correct = 0
        total = 0
        for batch in loader:
            x, y = batch[0], batch[1]
            if device is not None:
                x, y = x.to(device), y.to(device)
            out = model(x)
            correct += int((out.argmax(dim=-1) == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate_accuracy: the loader yielded no samples")
    return correct / total


def default_cache_dir() -> Path:
    """``$FXCOMPRESS_CACHE`` if set, else ``~/.cache/fxcompress``."""
    env = os.environ.get("FXCOMPRESS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fxcompress"


def _train(epochs: int, lr: float, batch_size: int, seed: int, weight_decay: float
           ) -> DigitsCNN:
    train_loader, _ = digits_loaders(batch_size=batch_size, seed=seed)
    model = DigitsCNN(seed=seed)
    steps = max(1, epochs * len(train_loader))
    # One intra-op thread: the same float results whatever the machine's thread
    # count, and no oversubscription slowdown (a 10x one) on a busy 2-core machine;
    # this net is too small to gain from more threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with seeded(seed):
            _fit(model, train_loader, epochs, lr, weight_decay, steps)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


def _fit(model: nn.Module, train_loader: DataLoader, epochs: int, lr: float,
         weight_decay: float, steps: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for x, y in train_loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()


def train_digits_cnn(epochs: int = 6, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                     *, lr: float = 0.01, batch_size: int = 64, weight_decay: float = 1e-4,
                     use_cache: bool = True) -> DigitsCNN:
    """A :class:`DigitsCNN` trained on the digits training split (about 98% test
    accuracy with the defaults), returned in eval mode.

    Training is deterministic (seeded init, seeded shuffling, AdamW with a one-cycle
    schedule) and takes a few seconds on two CPU cores.  The state_dict is cached
    in ``cache_dir`` (default :func:`default_cache_dir`) under a name keyed by a
    hash of the hyperparameters; a cached file is loaded with
    ``torch.load(weights_only=True)``.  The file is written atomically, so parallel
    test processes can share the cache.  ``use_cache=False`` always trains and
    writes nothing.
    """
    hparams = {"recipe": _RECIPE_VERSION, "epochs": int(epochs), "seed": int(seed),
               "lr": float(lr), "batch_size": int(batch_size),
               "weight_decay": float(weight_decay), "test_fraction": 0.25}
    key = hashlib.sha256(json.dumps(hparams, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir if cache_dir is not None else default_cache_dir())
    path = path.expanduser() / f"digits_cnn_{key}.pt"

    if use_cache and path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = DigitsCNN(seed=0)
            model.load_state_dict(state)
            return model.eval()
        except Exception:  # corrupt or stale file: retrain and overwrite
            pass

    model = _train(int(epochs), float(lr), int(batch_size), int(seed), float(weight_decay))
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            os.close(fd)
            try:
                torch.save(model.state_dict(), tmp)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError:  # read-only cache location: the trained model is still fine
            pass
    return model
