"""Scopes: which modules a pass acts on.

A scope is a module path as in ``model.named_modules()`` (``layer1.0.conv1``), a
``*`` glob (``layer1.*.conv1``), or a regular expression prefixed ``{re}``
(NNCF's convention), matched against the whole path. A scope also covers the
modules inside it: ``layer1`` covers ``layer1.0.conv1``. NNCF 2.x scope names
(``ResNet/Sequential[layer1]/BasicBlock[0]/Conv2d[conv1]``) are translated to
module paths, so configs written for NNCF keep working.

A scope that matches no module is an error naming it (as NNCF's
``IgnoredScope(validate=True)``): a typo must not silently compress a layer the
user meant to keep in full precision.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Iterable

from .errors import ScopeError

__all__ = ["ScopeSet", "nncf_scope_to_path"]

_NNCF_PART = re.compile(r"\[([^\]]*)\]")


def nncf_scope_to_path(scope: str) -> str:
    """``ResNet/Sequential[layer1]/BasicBlock[0]/Conv2d[conv1]/conv2d_0`` -> ``layer1.0.conv1``."""
    return ".".join(_NNCF_PART.findall(scope))


class ScopeSet:
    def __init__(self, patterns: Iterable[str] | None, field: str = "ignored_scopes"):
        self.field = field
        self.patterns = list(patterns or [])
        self._compiled = [self._compile(p) for p in self.patterns]

    def __bool__(self):
        return bool(self.patterns)

    def _compile(self, pattern: str):
        if not isinstance(pattern, str) or not pattern:
            raise ScopeError(f"{self.field}: every scope must be a non-empty string, got {pattern!r}",
                             path=self.field)
        if pattern.startswith("{re}"):
            try:
                regex = re.compile(pattern[4:])
            except re.error as exc:
                raise ScopeError(f"{self.field}: invalid regular expression {pattern!r}: {exc}",
                                 path=self.field) from None
            return lambda path: regex.fullmatch(path) is not None
        if "/" in pattern and "[" in pattern:
            translated = nncf_scope_to_path(pattern)
            return lambda path: path == translated
        return lambda path: path == pattern or fnmatch.fnmatchcase(path, pattern)

    def _matches_one(self, index: int, path: str) -> bool:
        match = self._compiled[index]
        parts = path.split(".") if path else []
        # A scope covers what is inside it: test the path and each of its ancestors.
        return any(match(".".join(parts[:i])) for i in range(len(parts), 0, -1))

    def matches(self, path: str) -> bool:
        return any(self._matches_one(i, path) for i in range(len(self.patterns)))

    def validate(self, paths: Iterable[str]):
        """Raise ``ScopeError`` for every pattern that matches none of ``paths``."""
        paths = [p for p in paths if p]
        for i, pattern in enumerate(self.patterns):
            if not any(self._matches_one(i, p) for p in paths):
                close = difflib.get_close_matches(pattern, paths, n=3)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
                    f"; module paths look like {paths[:3]}"
                raise ScopeError(f"{self.field}: scope {pattern!r} matches no module of the model{hint}",
                                 path=self.field)
