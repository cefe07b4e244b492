"""Base class of the compression passes: arguments validated by the JSON schema of their config entry.

A pass's keyword arguments are exactly the keys of its NNCF-style config entry
(docs/design.md: "pass arguments mirror the JSON names"), so one JSON schema per
algorithm validates both ``Quantize(bits=8, ...)`` and
``{"algorithm": "quantization", "bits": 8, ...}``; a config entry and the pass
built from the same values are interchangeable. Unknown keys are errors with a
did-you-mean.
"""
from __future__ import annotations

import copy
import difflib
from typing import Any, ClassVar

import jsonschema

from .errors import ConfigError
from .pass_manager import Pass
from .scopes import ScopeSet

__all__ = ["CompressionPass", "validate_schema", "SCOPES_SCHEMA", "DEVICE_ALIASES"]

SCOPES_SCHEMA = {"type": "array", "items": {"type": "string", "minLength": 1}}
COMMON_PROPERTIES = {
    "ignored_scopes": SCOPES_SCHEMA,
    "target_scopes": SCOPES_SCHEMA,
    "target_device": {"enum": ["CPU", "GPU", "NPU", "VPU", "ANY", "TRIAL", "CPU_SPR"]},
}
# Old device names and the names they stand for: NNCF 2.5 called the NPU "VPU" (renamed in NNCF 2.7).
DEVICE_ALIASES = {"VPU": "NPU"}


def _format_path(prefix: str, path) -> str:
    out = prefix
    for atom in path:
        out += f"[{atom}]" if isinstance(atom, int) else (f".{atom}" if out else str(atom))
    return out or "(root)"


def _allowed(schema: dict) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    parts = []
    if "type" in schema:
        parts.append(f"type {schema['type']}")
    for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
                      ("exclusiveMaximum", "<")):
        if key in schema:
            parts.append(f"{word} {schema[key]}")
    if "properties" in schema:
        parts.append("keys " + ", ".join(sorted(schema["properties"])))
    return ", ".join(parts)


def validate_schema(instance: Any, schema: dict, prefix: str = ""):
    """Validate; raise ``ConfigError`` naming the field by its JSON path and what is allowed."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: (len(list(e.absolute_path)), str(e.path)))
    if not errors:
        return
    err = errors[0]
    if err.validator in ("oneOf", "anyOf") and err.context:
        err = sorted(err.context, key=lambda e: -len(list(e.absolute_path)))[0]
    path = _format_path(prefix, err.absolute_path)
    if err.validator == "additionalProperties":
        known = sorted(err.schema.get("properties", {}))
        extra = [k for k in err.instance if k not in known]
        hints = []
        for key in extra:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(f"{path}: unknown key {', '.join(hints)}; allowed keys: {', '.join(known)}",
                          path=path)
    allowed = _allowed(err.schema)
    message = f"{path}: {err.message}" + (f"; allowed: {allowed}" if allowed else "")
    raise ConfigError(message, path=path)


class CompressionPass(Pass):
    """A compression algorithm as a pass. Subclasses declare ``algorithm`` and ``schema``.

    ``schema`` is the JSON schema of the algorithm's own keys (an object schema with
    ``properties``); the common keys (``ignored_scopes``, ``target_scopes``,
    ``target_device``) are added here. Validated, defaulted arguments are in
    ``self.params``.
    """
    algorithm: ClassVar[str] = ""
    schema: ClassVar[dict] = {"type": "object", "properties": {}}
    defaults: ClassVar[dict] = {}

    def __init__(self, **params):
        self.params = self.validate(params, prefix=type(self).__name__)
        self.name = self.algorithm or type(self).__name__
        self.ignored_scopes = ScopeSet(self.params.get("ignored_scopes"), "ignored_scopes")
        self.target_scopes = ScopeSet(self.params.get("target_scopes"), "target_scopes")

    @classmethod
    def full_schema(cls) -> dict:
        schema = copy.deepcopy(cls.schema)
        schema.setdefault("type", "object")
        schema["properties"] = {**COMMON_PROPERTIES, **schema.get("properties", {})}
        schema["additionalProperties"] = False
        return schema

    @classmethod
    def validate(cls, params: dict, prefix: str) -> dict:
        validate_schema(params, cls.full_schema(), prefix)
        merged = copy.deepcopy(cls.defaults)
        merged.update(copy.deepcopy(params))
        cls.check(merged, prefix)
        if merged.get("target_device") in DEVICE_ALIASES:
            merged["target_device"] = DEVICE_ALIASES[merged["target_device"]]
        return merged

    @classmethod
    def check(cls, params: dict, prefix: str):
        """Cross-field checks the schema cannot express (override; raise ConfigError)."""

    @classmethod
    def from_config_entry(cls, entry: dict, path: str, global_params: dict) -> list[Pass]:
        """The passes an NNCF-style config entry stands for (usually one).

        ``params`` (NNCF's nested block) is merged into the entry; top-level
        ``ignored_scopes`` / ``target_device`` of the config apply to every algorithm, and
        ``compression_lr_multiplier`` to those with trainable compression parameters that take it.
        """
        params = {k: v for k, v in entry.items() if k not in ("algorithm", "params")}
        nested = entry.get("params", {})
        if not isinstance(nested, dict):
            raise ConfigError(f"{path}.params: must be an object, got {type(nested).__name__}",
                              path=f"{path}.params")
        for key, value in nested.items():
            if key in params:
                raise ConfigError(f"{path}: '{key}' is given both in the entry and in its params",
                                  path=f"{path}.{key}")
            params[key] = value
        if global_params.get("ignored_scopes"):
            params["ignored_scopes"] = list(global_params["ignored_scopes"]) + list(params.get("ignored_scopes", []))
        if global_params.get("target_scopes"):  # NNCF: the top-level list wins over the entry's
            params["target_scopes"] = list(global_params["target_scopes"])
        for key in ("target_device", "compression_lr_multiplier"):
            if key in global_params and key in cls.full_schema()["properties"]:
                params.setdefault(key, global_params[key])
        cls.validate(params, prefix=path)
        return [cls(**params)]

    def selects(self, where) -> bool:
        """Whether the pass may act on a module (its path) or an operation (its fx node)."""
        if self.ignored_scopes.matches(where):
            return False
        return not self.target_scopes or self.target_scopes.matches(where)

    def validate_scopes(self, gm):
        """Every scope must match some module or operation of the model (call at the start of
        ``call``); binds the scopes to the graph's NNCF names (fxcompress/scopes.py)."""
        self.ignored_scopes.validate(gm)
        self.target_scopes.validate(gm)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items() if self.defaults.get(k, object()) != v)
        return f"{type(self).__name__}({args})"
