"""The compression algorithms and their lowering passes (imported as ``fxcompress.passes``).

Each algorithm is a ``CompressionPass``; importing this package registers it for
JSON configs under its NNCF name.
"""
from .binarization import Binarization
from .distillation import KnowledgeDistillation
from .mixed_precision import MixedPrecision
from .pruning import FilterPruning
from .quantization import Quantize, quantize_post_training
from .sparsity import ConstSparsity, MagnitudeSparsity, RBSparsity

__all__ = ["Quantize", "quantize_post_training", "MixedPrecision", "Binarization", "MagnitudeSparsity", "RBSparsity", "ConstSparsity",
           "FilterPruning", "KnowledgeDistillation"]
