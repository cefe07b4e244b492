"""The compression algorithms and their lowering passes (imported as ``fxcompress.passes``).

Each algorithm is a ``CompressionPass``; importing this package registers them
for JSON configs by their NNCF names.
"""
from .sparsity import ConstSparsity, MagnitudeSparsity, RBSparsity  # noqa: E402  (issue 5)

__all__ = [*globals().get("__all__", []), "MagnitudeSparsity", "RBSparsity", "ConstSparsity"]
from .quantization import Quantize  # noqa: E402  (issue 4)

__all__ = [*__all__, "Quantize"]
from .binarization import Binarization  # noqa: E402  (issue 7)

__all__ = [*__all__, "Binarization"]
from .mixed_precision import MixedPrecision  # noqa: E402  (issue 8)

__all__ = [*__all__, "MixedPrecision"]
from .pruning import FilterPruning  # noqa: E402  (issue 6)

__all__ = [*__all__, "FilterPruning"]
