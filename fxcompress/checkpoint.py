"""Loading compressed-model checkpoints with clear errors; the RNG state a resumed run needs."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import CheckpointError

__all__ = ["load_state", "rng_state", "set_rng_state", "require_state_keys", "require_same_names"]


def require_state_keys(state: Mapping, keys, owner: str):
    """A CheckpointError naming the first of ``keys`` that ``state`` (``owner``'s saved state) lacks."""
    for key in keys:
        if key not in state:
            raise CheckpointError(f"{owner} state lacks '{key}'")


def require_same_names(expected, saved, owner: str, what: str):
    """A CheckpointError when the names saved in ``owner``'s state are not this model's ``what``."""
    expected, saved = list(expected), list(saved)
    missing = [n for n in expected if n not in saved]
    unexpected = [n for n in saved if n not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{owner} state does not match this model's {what}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def _strip_ddp_prefix(state: Mapping) -> dict:
    """DistributedDataParallel saves keys as ``module.<name>``; accept both forms."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_state(gm: torch.nn.Module, state_dict: Mapping, strict: bool = True) -> torch.nn.Module:
    """Load weights and compression parameters saved from ``gm.state_dict()``.

    Raises ``CheckpointError`` naming every missing, unexpected or mis-shaped key
    (nothing is loaded then). ``module.`` prefixes of DDP are stripped.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"load_state expects a state dict (mapping), got {type(state_dict).__name__}")
    state = _strip_ddp_prefix(state_dict)
    own = gm.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and isinstance(state[k], torch.Tensor)
                  and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if strict and missing:
        problems.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if mismatched:
        problems.append(f"shape mismatches {mismatched[:10]}")
    if problems:
        raise CheckpointError(
            "checkpoint does not fit this compressed model: " + "; ".join(problems)
            + ". Was it saved from a model compiled with the same passes and config?")
    gm.load_state_dict(state, strict=strict)
    return gm


def rng_state(device=None) -> dict:
    """The global torch RNG state that random draws on ``device`` use, as plain uint8 tensors.

    ``{"cpu": ...}``, plus ``"cuda"`` (that device's generator) for a CUDA device.
    A controller part whose training draws random numbers (RB sparsity's stochastic
    masks) saves it, so a resumed run draws what the uninterrupted one would have.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping, device=None, *, owner: str = "controller"):
    """Restore what ``rng_state`` saved (a saved CUDA state only when ``device`` is a CUDA device).

    A checkpoint saved on a GPU loads on a CPU-only machine (only the CPU state is
    restored then) and the other way round (the CUDA generator is left as it is).
    """
    if not isinstance(state, Mapping) or not isinstance(state.get("cpu"), torch.Tensor) \
            or state["cpu"].dtype != torch.uint8:
        raise CheckpointError(f"{owner} state: 'rng_state' must be a dict with a uint8 tensor 'cpu' "
                              f"(from torch.get_rng_state()), got {type(state).__name__}")
    device = torch.device("cpu") if device is None else torch.device(device)
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and isinstance(state.get("cuda"), torch.Tensor):
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
