"""Gradient scaling, NNCF's ``compression_lr_multiplier``: a parameter's learning rate times a factor.

``scaled_gradient(p, k)`` has the value of ``p`` and the gradient ``k * dL/dp`` (``p.detach() +
(p - p.detach()) * k``), so a parameter of a compression module learns ``k`` times faster under
any optimizer without its own parameter group.
"""
from __future__ import annotations

import torch

__all__ = ["scaled_gradient"]


def scaled_gradient(p: torch.Tensor, multiplier: float | None) -> torch.Tensor:
    """``p`` with its gradient multiplied by ``multiplier`` (None or 1: ``p`` itself)."""
    if multiplier is None or multiplier == 1:
        return p
    fixed = p.detach()
    return fixed + (p - fixed) * multiplier
