"""Loading compressed-model checkpoints with clear errors."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import CheckpointError

__all__ = ["load_state"]


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
