"""Constant sparsity: keep the zeros a checkpoint already has (NNCF's ``const_sparsity``).

The mask of every selected weight is ``weight != 0`` at compile time and never
changes, so fine-tuning (with quantization, say) cannot revive pruned weights.
A graph state dict saved from a magnitude-sparsity model loads into a
const-sparsity one (same mask module names and buffers).
"""
from __future__ import annotations

import torch

from fxcompress.registry import register_algorithm

from .base import SparsityController, SparsityPass
from .masks import BinaryMask

__all__ = ["ConstSparsity", "ConstSparsityController"]


class ConstSparsityController(SparsityController):
    algorithm = "const_sparsity"

    def __init__(self, gm, layers, skipped):
        super().__init__(gm, layers, skipped)
        self.frozen = True

    def summary_statistics(self) -> dict:
        return {"schedule": None}


@register_algorithm
class ConstSparsity(SparsityPass):
    """``ConstSparsity(ignored_scopes=[...])``: no keys of its own."""
    algorithm = "const_sparsity"
    schema = {"type": "object", "properties": {}}
    defaults = {}

    def make_mask(self, weight: torch.Tensor) -> BinaryMask:
        mask = BinaryMask(weight)
        mask.set_mask((weight.detach() != 0).to(mask.mask.dtype))
        return mask

    def make_controller(self, gm, layers, skipped) -> ConstSparsityController:
        return ConstSparsityController(gm, layers, skipped)
