"""Binarization (issue 7): XNOR / DoReFa weights, scale-threshold activation binarization,
the staged schedule, and lowering for export. See docs/binarization.md."""
from .algo import Binarization, BinarizationController, BinarizedLayer
from .lowering import LowerBinarizers
from .modules import ActivationBinarizer, WeightBinarizer
from .schedule import StagedBinarizationScheduler

__all__ = ["Binarization", "BinarizationController", "BinarizedLayer", "LowerBinarizers",
           "ActivationBinarizer", "WeightBinarizer", "StagedBinarizationScheduler"]
