"""Unstructured sparsity: magnitude, regularization-based and constant masks on conv/linear weights."""
from .const import ConstSparsity, ConstSparsityController
from .lowering import FoldMasks
from .magnitude import MagnitudeSparsity, MagnitudeSparsityController
from .masks import BinaryMask, RBMask, SparsityMask
from .rb import RBSparsity, RBSparsityController

__all__ = ["MagnitudeSparsity", "RBSparsity", "ConstSparsity", "FoldMasks", "MagnitudeSparsityController",
           "RBSparsityController", "ConstSparsityController", "SparsityMask", "BinaryMask", "RBMask"]
