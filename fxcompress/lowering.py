"""The phases of lowering, in the one order every lowering pass is sorted by.

``ctrl.lower()`` (and so ``strip()`` / ``export_onnx()``) runs the lowering
passes of all controller parts on a deep copy of the graph, sorted by their
``Pass.lowering_order``, which each pass takes from this table. The order:

1. ``REMOVE_HOOKS``: inert training-only hooks (distillation) go first; they
   change no value and later phases need not know about them.
2. ``FOLD_MASKS``: sparsity masks act on float weights, so the phases after
   see (and export) weights that already hold the zeros.
3. ``PRUNE_CHANNELS``: pruned channels are removed physically on the float,
   masked graph, before BatchNorm folding so the folded statistics are the
   kept channels' ones.
4. ``FOLD_BATCH_NORM``: BatchNorm into the preceding conv, through its weight
   quantizer (which must still be a quantizer module to take the BN factor
   into its scale).
5. ``LOWER_QUANTIZERS``: fake quantizers become export ops on the final weights.
6. ``LOWER_BINARIZERS``: binarizers become plain tensors / standard ops, after
   the masks and pruned channels are folded (the ``+-m`` tensors they fold must
   be computed from the final float weights).
7. ``RUNTIME_FORMS``: ops rewritten for what a runtime computes differently, reading the
   lowered QDQ (average pools counting padding over a nonzero zero point: OpenVINO).
8. ``DEFAULT``: a lowering pass that names no phase runs last.

The values are the historical numbers, so an ``int`` order still sorts among them.
"""
from __future__ import annotations

from enum import IntEnum

__all__ = ["LoweringPhase"]


class LoweringPhase(IntEnum):
    REMOVE_HOOKS = 5
    FOLD_MASKS = 10
    PRUNE_CHANNELS = 20
    FOLD_BATCH_NORM = 30
    LOWER_QUANTIZERS = 40
    LOWER_BINARIZERS = 45
    RUNTIME_FORMS = 48
    DEFAULT = 50
