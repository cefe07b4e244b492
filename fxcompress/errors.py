"""Typed errors. Every message names what is wrong (module, node, config field) and how to fix it."""


class FxCompressError(Exception):
    """Base class of all fxcompress errors."""


class TraceError(FxCompressError):
    """The model could not be traced into a torch.fx graph.

    Attributes name where: ``module_path`` (as in ``model.named_modules()``),
    ``operation`` and ``source_line`` (the user's file:line and code).
    """

    def __init__(self, message, *, module_path=None, operation=None, source_line=None):
        super().__init__(message)
        self.module_path = module_path
        self.operation = operation
        self.source_line = source_line


class InputShapeError(TraceError):
    """The example inputs do not fit the model: a module refused them while tracing.

    ``inputs``: the positions (int) or keywords (str) of the example inputs that
    reach the module that refused them; ``reason``: that module and what it
    expects (``module `features.0.0` (Conv2d) expects 3 input channels, got 2``).
    """

    def __init__(self, message, *, inputs=(), reason=None, **where):
        super().__init__(message, **where)
        self.inputs = list(inputs)
        self.reason = reason


class ConfigError(FxCompressError, ValueError):
    """A configuration value is invalid. ``path`` is the JSON path of the field."""

    def __init__(self, message, *, path=None):
        super().__init__(message)
        self.path = path


class ScopeError(ConfigError):
    """An ignored/target scope matches no module of the model."""


class PassError(FxCompressError):
    """A pass failed; the graph it was given is left as it was."""


class ExportError(FxCompressError):
    """The model has an op that ``torch.onnx`` cannot write to ONNX; names the op and the graph nodes."""


class UnsupportedModelError(FxCompressError):
    """The model contains something a pass cannot handle."""


class CheckpointError(FxCompressError):
    """A checkpoint does not fit the model or controller it is loaded into."""


class RangeInitError(FxCompressError, ValueError):
    """Range initialization observed values no quantizer range can hold (inf / NaN)."""


class NotInitializedError(FxCompressError):
    """An operation needs ``ctrl.initialize(loader)`` (or an explicit range) first."""
