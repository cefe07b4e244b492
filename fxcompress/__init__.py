"""fxcompress: neural-network compression for PyTorch as a torch.fx graph-rewriting compiler.

    from fxcompress import compile_for_compression, Config, load_state
    from fxcompress.passes import Quantize, MagnitudeSparsity, FilterPruning
    ctrl, gm = compile_for_compression(model, [Quantize(bits=8)], example_inputs=(x,))
"""
from .api import compile_for_compression
from .checkpoint import load_state
from .config import Config
from .controller import CompressionController
from .errors import (CheckpointError, ConfigError, ExportError, FxCompressError, NotInitializedError, PassError,
                     ScopeError, TraceError, UnsupportedModelError)
from .tracing import trace

__version__ = "0.1.0"

__all__ = [
    "compile_for_compression", "Config", "load_state", "trace", "CompressionController",
    "FxCompressError", "TraceError", "ConfigError", "ScopeError", "PassError", "UnsupportedModelError",
    "CheckpointError", "NotInitializedError", "ExportError", "__version__",
]
