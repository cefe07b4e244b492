"""NNCF-style JSON configs: validation and the front door that builds passes by name.

Accepted format (NNCF's)::

    {
      "input_info": {"sample_size": [1, 3, 32, 32]},          # or a list, one per input
      "target_device": "CPU",
      "ignored_scopes": ["fc"],                              # applies to every algorithm
      "compression": [                                       # or a single object
        {"algorithm": "magnitude_sparsity", "sparsity_init": 0.1,
         "params": {"sparsity_target": 0.5, "sparsity_target_epoch": 10}},
        {"algorithm": "quantization", "initializer": {"range": {"num_init_samples": 64}}}
      ]
    }

Top-level keys fxcompress does not use (NNCF sample scripts keep ``model``,
``epochs``, ``optimizer`` there) are kept and ignored; a near miss of a known
key (``compresion``) is an error with a did-you-mean. Inside an algorithm's
entry every key is checked by that algorithm's schema.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import json5
import torch

from .accuracy_aware import validate_accuracy_aware_config
from .algorithm import COMMON_PROPERTIES, SCOPES_SCHEMA, validate_schema
from .errors import ConfigError
from .registry import algorithm_class, register_algorithm, registered_algorithms

__all__ = ["Config", "register_algorithm", "algorithm_registry"]

def algorithm_registry() -> dict[str, type]:
    """Every algorithm by name (``fxcompress.registry``), after importing them all."""
    _import_algorithms()
    return registered_algorithms()


def _import_algorithms():
    # The config front door is the one place the infrastructure imports the algorithms.
    import fxcompress.passes  # noqa: F401  (registers them)


_INPUT_INFO_ITEM = {
    "type": "object",
    "properties": {
        "sample_size": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1},
        "type": {"enum": ["float", "long", "int", "bool", "half", "bfloat16"]},
        "filler": {"enum": ["zeros", "ones", "random"]},
        "keyword": {"type": "string"},
    },
    "required": ["sample_size"],
    "additionalProperties": False,
}

TOP_LEVEL_SCHEMA = {
    "type": "object",
    "properties": {
        "input_info": {"oneOf": [_INPUT_INFO_ITEM, {"type": "array", "items": _INPUT_INFO_ITEM, "minItems": 1}]},
        "compression": {"oneOf": [
            {"type": "object", "required": ["algorithm"]},
            {"type": "array", "items": {"type": "object", "required": ["algorithm"]}},
        ]},
        "target_device": COMMON_PROPERTIES["target_device"],
        "ignored_scopes": SCOPES_SCHEMA,
        "target_scopes": SCOPES_SCHEMA,
        "log_dir": {"type": "string"},
        # NNCF: multiplies the gradients of every algorithm's compression parameters
        "compression_lr_multiplier": {"type": "number", "exclusiveMinimum": 0},
        # deprecated in NNCF 2.x; tracing decides shape specialization itself (fxcompress.tracing)
        "disable_shape_matching": {"type": "boolean"},
        # NNCF's accuracy-aware training loop, checked here and run by fxcompress.accuracy_aware
        "accuracy_aware_training": {"type": "object"},
    },
}
_KNOWN_TOP = sorted(TOP_LEVEL_SCHEMA["properties"])
_DTYPES = {"float": torch.float32, "long": torch.int64, "int": torch.int32, "bool": torch.bool,
           "half": torch.float16, "bfloat16": torch.bfloat16}


_JSON5_ERROR = re.compile(r"^<string>:(\d+) (.*) at column (\d+)$")


def parse_json(text: str, source: str = "config") -> Any:
    """Parse a config text as NNCF does (jstyleson): JSON plus ``//`` and ``/* */`` comments and
    trailing commas. ``json5`` (a JSON superset) reads it; an error names the line and column."""
    try:
        return json5.loads(text)
    except ValueError as exc:
        match = _JSON5_ERROR.match(str(exc))
        where, what = (f"line {match[1]}, column {match[3]}", match[2]) if match else ("", str(exc))
        raise ConfigError(f"{source}: not valid JSON{' at ' + where if where else ''}: {what}") from None


def _line_of_field(text: str, field_path: str | None) -> int | None:
    """The line where the field ``compression[0].params.sparsity_target`` is written, found by
    looking for each key of the path after the previous one (None when a key is not found)."""
    keys = re.findall(r"([^.\[\]]+)", re.sub(r"\[\d+\]", "", field_path or ""))
    position = None
    for key in keys:
        found = re.compile(r'["\']' + re.escape(key) + r'["\']\s*:').search(text, position or 0)
        if found is None:
            break
        position = found.start()
    return None if position is None else text.count("\n", 0, position) + 1


class Config:
    """A validated NNCF-style configuration."""

    def __init__(self, data: dict, source: str = "config"):
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a config must be a JSON object, got {type(data).__name__}")
        self.source = source
        self._check_top_level(data)
        validate_schema(data, TOP_LEVEL_SCHEMA)
        if "accuracy_aware_training" in data:
            validate_accuracy_aware_config(data["accuracy_aware_training"])
        self.data = copy.deepcopy(data)
        self.entries = self._entries()
        self.passes = self._build_passes()
        if not self.passes:
            raise ConfigError(f"compression: the config ({source}) compresses nothing: 'compression' is missing or empty; "
                              f"add e.g. {{\"compression\": {{\"algorithm\": \"quantization\"}}}}",
                              path="compression")

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        return cls(data)

    @classmethod
    def from_json(cls, path) -> "Config":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        data = parse_json(text, str(path))
        try:
            return cls(data, source=str(path))
        except ConfigError as exc:
            line = _line_of_field(text, exc.path)
            if line is None:
                raise
            raise type(exc)(f"{path}, line {line}: {exc}", path=exc.path) from None

    def _check_top_level(self, data: dict):
        for key in data:
            if key in _KNOWN_TOP:
                continue
            close = difflib.get_close_matches(key, _KNOWN_TOP, n=1, cutoff=0.8)
            if close:
                raise ConfigError(f"{key}: unknown top-level key; did you mean '{close[0]}'?", path=key)

    def _entries(self) -> list[dict]:
        comp = self.data.get("compression", [])
        return [comp] if isinstance(comp, dict) else list(comp)

    def _build_passes(self) -> list:
        _import_algorithms()
        global_params = {k: self.data[k] for k in ("ignored_scopes", "target_scopes", "target_device",
                                                   "compression_lr_multiplier") if k in self.data}
        passes = []
        for i, entry in enumerate(self.entries):
            path = "compression" if isinstance(self.data.get("compression"), dict) else f"compression[{i}]"
            algorithm = algorithm_class(entry["algorithm"], f"{path}.algorithm")
            passes.extend(algorithm.from_config_entry(entry, path, global_params))
        # NNCF lists entries in any order; a pass that must see the uncompressed graph
        # (knowledge_distillation keeps it as the teacher) runs first.
        return sorted(passes, key=lambda p: not getattr(p, "runs_first", False))

    def example_inputs(self) -> tuple | dict | None:
        """Inputs built from ``input_info``: uniform random floats, integer ones, unless ``filler`` says otherwise."""
        info = self.data.get("input_info")
        if info is None:
            return None
        items = [info] if isinstance(info, dict) else info
        generator = torch.Generator().manual_seed(0)
        args, kwargs = [], {}
        for item in items:
            dtype = _DTYPES[item.get("type", "float")]
            size = item["sample_size"]
            filler = item.get("filler", "random" if dtype.is_floating_point else "ones")
            if filler == "random" and dtype.is_floating_point:
                value = torch.rand(size, generator=generator).to(dtype)
            elif filler == "random":
                value = torch.randint(0, 2, size, generator=generator).to(dtype)
            elif filler == "ones":
                value = torch.ones(size, dtype=dtype)
            else:
                value = torch.zeros(size, dtype=dtype)
            if "keyword" in item:
                kwargs[item["keyword"]] = value
            else:
                args.append(value)
        if kwargs and args:
            raise ConfigError("input_info: give every input a 'keyword' or none of them "
                              "(mixing positional and keyword inputs is not supported)", path="input_info")
        return kwargs if kwargs else tuple(args)

    def __repr__(self):
        return f"Config({self.source}: {', '.join(repr(p) for p in self.passes)})"
