"""Mask modules: what the sparsity passes insert on the weight edge of convs and linears.

``conv1_weight -> conv1_weight_mask -> (conv1_weight_quantizer ->) conv2d``: the
mask module multiplies the weight by a 0/1 mask through the op library's
``apply_mask``, so a later weight quantizer sees the masked weight and the
original parameter stays trainable (gradients reach it where the mask is 1).

- ``BinaryMask``: a fixed 0/1 buffer ``mask`` (magnitude and constant sparsity);
  the controller replaces the buffer with a new tensor when the level changes.
- ``RBMask``: a trainable importance logit per weight (NNCF's regularization-based
  sparsity). Training: ``mask = [sigmoid(logits + logit(u)) > 0.5]`` with
  ``u ~ U(eps, 1 - eps)`` (a stochastic binary mask); eval or frozen:
  ``mask = [sigmoid(logits) > 0.5]``. The threshold is straight-through: its
  gradient is the identity, so the task loss and the sparsity loss both train
  the logits.

Every mask module offers ``binary_mask()`` (the deterministic 0/1 mask that
lowering folds into the weight) and ``frozen``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from fxcompress import ops
from fxcompress.gradients import scaled_gradient

__all__ = ["SparsityMask", "BinaryMask", "RBMask", "straight_through_threshold", "RB_INIT_PROBABILITY"]

RB_INIT_PROBABILITY = 0.99  # NNCF's initial keep probability: logit(0.99) ~ 4.6


class _STThreshold(torch.autograd.Function):
    """``x > 0.5`` forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return (x > 0.5).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def straight_through_threshold(x: torch.Tensor) -> torch.Tensor:
    return _STThreshold.apply(x)


class SparsityMask(nn.Module):
    """Base of the mask modules: ``forward(w) = apply_mask(w, mask)``."""

    def binary_mask(self) -> torch.Tensor:
        """The deterministic 0/1 mask (what eval mode applies and lowering folds)."""
        raise NotImplementedError

    @property
    def frozen(self) -> bool:
        return True


class BinaryMask(SparsityMask):
    """A fixed 0/1 mask in buffer ``mask`` (same shape and dtype as the weight)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", torch.ones_like(weight, dtype=weight.dtype
                                                     if weight.is_floating_point() else torch.float32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return ops.apply_mask(w, self.mask)

    def binary_mask(self) -> torch.Tensor:
        return self.mask

    def set_mask(self, mask: torch.Tensor):
        """Replace the mask with a new tensor (never written in place: checkpoints and copies stay intact)."""
        if mask.shape != self.mask.shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} for a weight of shape {tuple(self.mask.shape)}")
        self.mask = mask.detach().to(device=self.mask.device, dtype=self.mask.dtype).clone()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mask.shape)}"


class RBMask(SparsityMask):
    """A trainable importance logit per weight; binary stochastic mask in training.

    ``lr_multiplier`` (NNCF's ``compression_lr_multiplier``) scales the logits'
    gradients without changing their values. ``frozen`` is a plain attribute
    the controller sets at ``sparsity_freeze_epoch``: the mask is then
    deterministic and the logits get no gradient.
    """

    def __init__(self, weight: torch.Tensor, eps: float = 1e-6, lr_multiplier: float | None = None):
        super().__init__()
        init = math.log(RB_INIT_PROBABILITY / (1.0 - RB_INIT_PROBABILITY))
        self.logits = nn.Parameter(torch.full(weight.shape, init, dtype=torch.float32, device=weight.device))
        self.eps = float(eps)
        self.lr_multiplier = lr_multiplier
        self._frozen = False

    @property
    def frozen(self) -> bool:
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool):
        self._frozen = bool(value)

    def _logits(self) -> torch.Tensor:
        return scaled_gradient(self.logits, self.lr_multiplier)

    def keep_probability_mask(self) -> torch.Tensor:
        """``[sigmoid(logits) > 0.5]`` with a straight-through gradient (the sparsity loss's density term)."""
        return straight_through_threshold(torch.sigmoid(self._logits()))

    def binary_mask(self) -> torch.Tensor:
        with torch.no_grad():
            return (torch.sigmoid(self.logits) > 0.5).to(self.logits.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self._frozen:
            mask = self.binary_mask()
        elif self.training:
            u = torch.rand_like(self.logits).clamp_(self.eps, 1.0 - self.eps)
            mask = straight_through_threshold(torch.sigmoid(self._logits() + torch.log(u / (1.0 - u))))
        else:
            mask = self.keep_probability_mask()
        return ops.apply_mask(w, mask.to(w.dtype))

    def extra_repr(self) -> str:
        return f"shape={tuple(self.logits.shape)}, frozen={self._frozen}"
