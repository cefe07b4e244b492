"""The algorithm registry: compression passes by their config ``algorithm`` name.

Each algorithm's pass class registers itself with ``@register_algorithm`` when its
module is imported (``fxcompress.passes`` imports them all). The registry is
mechanism: it never imports an algorithm itself. The config front door
(``fxcompress.config.algorithm_registry``) is the one place that imports
``fxcompress.passes`` so that the table is full before it builds passes by name;
a pass that needs another algorithm by name (quantization asks for
``mixed_precision``) uses ``algorithm_class`` and so does not import it.
"""
from __future__ import annotations

import difflib

from .errors import ConfigError

__all__ = ["register_algorithm", "registered_algorithms", "algorithm_class"]

_REGISTRY: dict[str, type] = {}


def register_algorithm(cls):
    """Class decorator: makes a CompressionPass buildable from configs by its ``algorithm`` name."""
    if not cls.algorithm:
        raise TypeError(f"{cls.__name__} has no 'algorithm' name to register")
    _REGISTRY[cls.algorithm] = cls
    return cls


def registered_algorithms() -> dict[str, type]:
    """A copy of the table: ``{algorithm name: pass class}`` of every pass imported so far."""
    return dict(_REGISTRY)


def algorithm_class(name: str, path: str = "algorithm") -> type:
    """The pass class registered as ``name``; an unknown name is a ConfigError at ``path`` with a
    did-you-mean and the known names."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"{path}: unknown algorithm {name!r}; {hint}"
                          f"known algorithms: {', '.join(sorted(_REGISTRY))}", path=path)
    return _REGISTRY[name]
