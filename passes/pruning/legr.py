"""LeGR: learned global ranking of filters (Chin et al., CVPR 2020; NNCF's ``"learned_ranking"``).

Global ranking compares filters of different layers, but a filter norm means different
things in different layers. LeGR learns one affine transform per layer, ``a * norm + b``,
so that the global order of the transformed norms prunes the model well. The search
(as NNCF's ``nncf/torch/pruning/filter_pruning/global_ranking``) is an evolution:

- a *candidate* is ``{layer: (a, b)}`` for every producer layer of a prunable group;
- its *reward* is minus the validation loss of the model pruned with it to
  ``max_pruning`` (the same unit as the target: FLOPs with ``pruning_flops_target``, else
  filters) after ``train_steps`` steps of fine-tuning from the original weights;
- the first ``population`` candidates are the identity ``(1, 0)`` (plain norm ranking, so
  the search never ends worse than it on its own reward) and random ones:
  ``a = exp(N(0, 1))``, ``b = N(0, std of the layer's filter norms)``;
- every later candidate mutates the best of ``num_samples`` members drawn from the
  population: ``mutate_percent`` of the layers (at least one) get ``a *= exp(N(0, s))``,
  ``b += N(0, std)``, with ``s = 1 - generation / (1.25 * generations)``, and it replaces
  the oldest member;
- the result is the best candidate seen.

Differences to NNCF, each deliberate: NNCF re-seeds NumPy before every candidate (so its
random candidates repeat), mutates ``int(0.1 * layers)`` layers (none in a net of fewer than
ten) and adds the identity only as candidate 64 (never, with fewer generations); here one
seeded generator drives the search, at least one layer mutates, the identity comes first,
and the population is ``min(64, ceil(generations / 2))`` so a short search still evolves.

Between candidates the model's parameters and buffers are restored from a copy taken before
the search, and they are restored once more after it: the search changes nothing but the
coefficients. The user's data come through ``ctrl.initialize(train_loader)`` and
``FilterPruningController.set_legr_callbacks`` (docs/pruning.md).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from fxcompress.data import CalibrationData, batch_target, batch_to_inputs, count_samples, progress_bar, to_device
from fxcompress.errors import ConfigError

__all__ = ["LEGR_SCHEMA", "LEGR_DEFAULTS", "Coefficients", "EvolutionSearch", "LegrCallbacks", "run_legr",
           "load_coefficients", "save_coefficients"]

Coefficients = dict[str, tuple[float, float]]   # layer (module path) -> (a, b)

# NNCF 2.5's nncf/config/schemata/algo/filter_pruning.py ``legr_params`` and its defaults.
LEGR_SCHEMA = {
    "type": "object",
    "properties": {
        "generations": {"type": "integer", "minimum": 1},
        "train_steps": {"type": "integer", "minimum": 0},
        "max_pruning": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "random_seed": {"type": "integer"},
    },
    "additionalProperties": False,
}
LEGR_DEFAULTS = {"generations": 400, "train_steps": 200, "random_seed": 42}

# NNCF's EvolutionOptimizer hyper-parameters (not in its config schema).
POPULATION_SIZE = 64
NUM_SAMPLES = 16
MUTATE_PERCENT = 0.1
SIGMA_SCALE = 1.0


def identity(layers: Iterable[str]) -> Coefficients:
    return {name: (1.0, 0.0) for name in layers}


class EvolutionSearch:
    """Ask for a candidate, tell its reward; ``best`` is the best candidate told so far."""

    def __init__(self, norm_std: dict[str, float], generations: int, seed: int):
        self.layers = list(norm_std)
        self.std = np.array([max(float(norm_std[k]), 0.0) for k in self.layers])
        self.generations = int(generations)
        self.population_size = max(1, min(POPULATION_SIZE, math.ceil(self.generations / 2)))
        self.rng = np.random.default_rng(seed)
        self.population: list[np.ndarray] = []     # candidates as [layers, 2] arrays
        self.rewards: list[float] = []
        self.ages: list[int] = []                   # generation each member entered
        self.best: Coefficients | None = None
        self.best_reward = -math.inf
        self.history: list[float] = []
        self._asked: np.ndarray | None = None
        self._generation = 0

    def _as_dict(self, candidate: np.ndarray) -> Coefficients:
        return {k: (float(a), float(b)) for k, (a, b) in zip(self.layers, candidate)}

    def ask(self) -> Coefficients:
        g, n = self._generation, len(self.layers)
        if g == 0:
            candidate = np.tile([1.0, 0.0], (n, 1))
        elif g < self.population_size:
            candidate = np.stack([np.exp(self.rng.normal(0.0, SIGMA_SCALE, n)), self.rng.normal(0.0, self.std)], 1)
        else:
            drawn = self.rng.choice(len(self.population), size=NUM_SAMPLES)
            parent = self.population[int(drawn[np.argmax(np.asarray(self.rewards)[drawn])])]
            step = 1.0 - g / (self.generations * 1.25)
            candidate = parent.copy()
            mutated = self.rng.choice(n, size=max(1, int(MUTATE_PERCENT * n)), replace=False)
            candidate[mutated, 0] *= np.exp(self.rng.normal(0.0, SIGMA_SCALE * step, len(mutated)))
            candidate[mutated, 1] += self.rng.normal(0.0, self.std[mutated])
        self._asked = candidate
        return self._as_dict(candidate)

    def tell(self, reward: float):
        if self._asked is None:
            raise RuntimeError("EvolutionSearch.tell without ask")
        candidate, self._asked = self._asked, None
        reward = float(reward) if math.isfinite(reward) else -math.inf
        self.history.append(reward)
        if reward > self.best_reward or self.best is None:
            self.best, self.best_reward = self._as_dict(candidate), reward
        if len(self.population) < self.population_size:
            self.population.append(candidate)
            self.rewards.append(reward)
            self.ages.append(self._generation)
        else:
            oldest = int(np.argmin(self.ages))
            self.population[oldest], self.rewards[oldest], self.ages[oldest] = candidate, reward, self._generation
        self._generation += 1


# ---------------------------------------------------------------------------
# The user's training and validation
# ---------------------------------------------------------------------------

def default_target_fn(batch: Any):
    """The target of a batch (``fxcompress.data.batch_target``); a batch without one is an error."""
    target = batch_target(batch)
    if target is not None:
        return target
    raise ValueError("LeGR: a batch has no target (expected (input, target) tuples or a 'labels' key); pass "
                     "set_legr_callbacks(target_fn=...) or your own train_steps_fn / val_fn")


def default_optimizer(params) -> torch.optim.Optimizer:
    """NNCF's LeGR default: ``SGD(lr=1e-2, momentum=0.9, weight_decay=5e-4, nesterov=True)``."""
    return torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=5e-4, nesterov=True)


@dataclass
class LegrCallbacks:
    """How a candidate is fine-tuned and scored (NNCF's ``LeGRInitArgs``).

    ``train_steps_fn(train_loader, model, optimizer, compression_ctrl, train_steps)`` and
    ``val_fn(model, val_loader) -> (accuracy, loss)`` have NNCF's signatures; without them,
    ``train_steps`` optimizer steps of ``criterion(model(x), target)`` over the training batches
    (cycled), and the sample-weighted mean ``criterion`` over ``val_loader`` (the training loader
    when none is given). ``optimizer_fn(params)`` builds a fresh optimizer for each candidate.
    """
    val_loader: Iterable | None = None
    criterion: Callable = F.cross_entropy
    target_fn: Callable = default_target_fn
    optimizer_fn: Callable = default_optimizer
    train_steps_fn: Callable | None = None
    val_fn: Callable | None = None


def _inputs_and_target(batch, data: CalibrationData, target_fn: Callable):
    args, kwargs = batch_to_inputs(batch, data.input_fn, data.accepted_kwargs)
    return (to_device(args, data.device), to_device(kwargs, data.device),
            to_device(target_fn(batch), data.device))


def _endless(loader: Iterable):
    """The loader's batches, starting over at its end (without keeping them, unlike itertools.cycle)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("LeGR: the training loader yielded no batches")


def _train_steps(model, data: CalibrationData, optimizer, steps: int, cb: LegrCallbacks):
    model.train()
    batches = _endless(data.loader)
    for _ in range(steps):
        args, kwargs, target = _inputs_and_target(next(batches), data, cb.target_fn)
        optimizer.zero_grad(set_to_none=True)
        cb.criterion(model(*args, **kwargs), target).backward()
        optimizer.step()


@torch.no_grad()
def _validate(model, loader: Iterable, data: CalibrationData, cb: LegrCallbacks) -> tuple[float, float]:
    model.eval()
    total = correct = 0
    loss = 0.0
    for batch in loader:
        args, kwargs, target = _inputs_and_target(batch, data, cb.target_fn)
        out = model(*args, **kwargs)
        n = count_samples(args, kwargs)
        loss += float(cb.criterion(out, target)) * n
        total += n
        if isinstance(out, torch.Tensor) and out.dim() == 2 and target.shape == out.shape[:1]:
            correct += int((out.argmax(1) == target).sum())
    if total == 0:
        raise ValueError("LeGR: the validation loader yielded no batches")
    return correct / total, loss / total


def run_legr(part, gm: torch.fx.GraphModule, data: CalibrationData, cb: LegrCallbacks, settings: dict,
             level: float, norms: dict[str, np.ndarray]) -> tuple[Coefficients, list[float]]:
    """The evolutionary search; returns the best coefficients and every candidate's reward.

    ``part`` is the filter pruning part: ``part.apply_ranking(coefficients, level)`` sets the
    masks. The model's parameters, buffers and train/eval mode are as before when this returns.
    """
    search = EvolutionSearch({k: float(np.std(v)) for k, v in norms.items()}, settings["generations"],
                             settings["random_seed"])
    saved = copy.deepcopy(gm.state_dict())
    training = gm.training
    val_loader = cb.val_loader if cb.val_loader is not None else data.loader
    try:
        for _ in progress_bar(range(search.generations), "filter pruning: LeGR generations"):
            candidate = search.ask()
            gm.load_state_dict(saved)
            part.apply_ranking(candidate, level)
            optimizer = cb.optimizer_fn(gm.parameters())
            if cb.train_steps_fn is not None:
                cb.train_steps_fn(data.loader, gm, optimizer, part, settings["train_steps"])
            else:
                _train_steps(gm, data, optimizer, settings["train_steps"], cb)
            if cb.val_fn is not None:
                _, loss = cb.val_fn(gm, val_loader)
            else:
                _, loss = _validate(gm, val_loader, data, cb)
            search.tell(-float(loss))
    finally:
        gm.load_state_dict(saved)
        gm.train(training)
    return search.best, search.history


# ---------------------------------------------------------------------------
# The coefficients file (NNCF's ``save_ranking_coeffs_path`` / ``load_ranking_coeffs_path``)
# ---------------------------------------------------------------------------

def save_coefficients(path: str | Path, coefficients: Coefficients):
    """``{layer: [a, b]}`` as JSON (NNCF's format, keyed by module path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: [a, b] for k, (a, b) in coefficients.items()}, indent=2))


def load_coefficients(path: str | Path, layers: list[str], nncf_names: Callable[[str], Iterable[str]],
                      field: str = "load_ranking_coeffs_path") -> Coefficients:
    """Read a coefficients file for ``layers``: keys are module paths or NNCF node names
    (``ResNet/NNCFConv2d[conv1]/conv2d_0``, what NNCF writes); every layer needs one."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{field}: cannot read ranking coefficients from {path}: {exc}", path=field) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{field}: {path} must hold an object {{layer: [a, b]}}", path=field)
    out: Coefficients = {}
    missing = []
    for layer in layers:
        key = next((k for k in [layer, *nncf_names(layer)] if k in raw), None)
        if key is None:
            missing.append(layer)
            continue
        value = raw[key]
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)):
            raise ConfigError(f"{field}: {path}: the coefficients of {key!r} must be two finite numbers [a, b], "
                              f"got {value!r}", path=field)
        out[layer] = (float(value[0]), float(value[1]))
    if missing:
        raise ConfigError(f"{field}: {path} has no coefficients for {missing[:5]} (of {len(layers)} pruned "
                          f"layers): not saved for this model and these scopes", path=field)
    return out
