"""The training keys of a sample config (NNCF's sample scripts read the same ones).

The config file is read with the project's NNCF config reader (``fxcompress.config.parse_json``:
comments and trailing commas allowed); its ``compression`` section goes to
``compile_for_compression`` unchanged, and the keys below drive the sample's training:

``model`` (str, required), ``task`` (str), ``input_info`` (required: ``sample_size``
``[1, C, H, W]`` sets the image size the datasets produce), ``batch_size`` (int),
``epochs`` (int), ``dataset`` (str), ``pretrained`` (bool), ``num_classes`` (int),
``seed`` (int), ``workers`` (int), ``log_dir`` (str) and ``optimizer``:
``{"type": "sgd"|"adam"|"adamw", "base_lr", "weight_decay", "momentum", "nesterov",
"optimizer_params": {...}, "schedule_type": "multistep"|"step"|"cosine"|"plateau"|"none",
"steps": [...], "step": N, "gamma": g, "schedule_params": {...}}``.

A wrong type or value is a SampleError naming the key.
"""
from __future__ import annotations

import copy
import pathlib

from fxcompress.config import parse_json
from fxcompress.errors import ConfigError
from fxcompress.samples.task import SampleError

DEFAULTS = {"batch_size": 32, "epochs": 1, "seed": 0, "workers": 0, "pretrained": False}
OPTIMIZER_DEFAULTS = {"type": "sgd", "base_lr": 0.01, "weight_decay": 0.0, "momentum": 0.9,
                      "nesterov": False, "schedule_type": "multistep", "steps": [], "step": 30,
                      "gamma": 0.1}
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("multistep", "step", "cosine", "plateau", "none")

# key -> (accepted Python types, description for the error, value check or None)
_INT = (int,)
_NUMBER = (int, float)
_SAMPLE_KEYS = {
    "model": ((str,), "a model name string", None),
    "task": ((str,), "a task name string", None),
    "batch_size": (_INT, "a positive integer", lambda v: v >= 1),
    "epochs": (_INT, "a non-negative integer", lambda v: v >= 0),
    "seed": (_INT, "a non-negative integer", lambda v: v >= 0),
    "workers": (_INT, "a non-negative integer", lambda v: v >= 0),
    "num_classes": (_INT, "a positive integer", lambda v: v >= 1),
    "dataset": ((str,), "a dataset name string", None),
    "pretrained": ((bool,), "true or false", None),
    "log_dir": ((str,), "a path string", None),
    "optimizer": ((dict,), "an object", None),
}
_OPTIMIZER_KEYS = {
    "type": ((str,), f"one of {', '.join(OPTIMIZERS)}", lambda v: v.lower() in OPTIMIZERS),
    "base_lr": (_NUMBER, "a positive number", lambda v: v > 0),
    "weight_decay": (_NUMBER, "a non-negative number", lambda v: v >= 0),
    "momentum": (_NUMBER, "a number in [0, 1)", lambda v: 0 <= v < 1),
    "nesterov": ((bool,), "true or false", None),
    "optimizer_params": ((dict,), "an object", None),
    "schedule_type": ((str,), f"one of {', '.join(SCHEDULES)}", lambda v: v.lower() in SCHEDULES),
    "schedule_params": ((dict,), "an object", None),
    "steps": ((list,), "a list of epoch numbers", lambda v: all(_is(x, _INT) and x >= 0 for x in v)),
    "step": (_INT, "a positive integer", lambda v: v >= 1),
    "gamma": (_NUMBER, "a positive number", lambda v: v > 0),
}


def _is(value, types) -> bool:
    # bool is an int subclass in Python, but `"epochs": true` is a mistake, not 1.
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _check(block: dict, keys: dict, prefix: str):
    for key, (types, what, valid) in keys.items():
        if key not in block:
            continue
        value = block[key]
        if not _is(value, types) or (valid is not None and not valid(value)):
            raise SampleError(f"config key '{prefix}{key}': expected {what}, got {value!r}")


def read_config(path) -> dict:
    """The config file as a dict; SampleError for a missing or unparsable file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise SampleError(f"--config {path}: no such file")
    try:
        data = parse_json(path.read_text(), str(path))
    except ConfigError as error:
        raise SampleError(str(error)) from None
    if not isinstance(data, dict):
        raise SampleError(f"--config {path}: a config must be a JSON object, got {type(data).__name__}")
    return data


def validate(config: dict) -> dict:
    """The config with the sample defaults filled in (a copy); SampleError naming a bad key."""
    config = copy.deepcopy(config)
    if "model" not in config:
        raise SampleError("config key 'model': missing (e.g. \"model\": \"resnet18\")")
    _check(config, _SAMPLE_KEYS, "")
    info = config.get("input_info")
    size = info.get("sample_size") if isinstance(info, dict) else None
    if not (isinstance(size, list) and len(size) == 4 and all(_is(v, _INT) and v >= 1 for v in size)):
        raise SampleError(f"config key 'input_info.sample_size': expected [1, C, H, W] of positive integers "
                          f"(one image input), got {size if info is not None else 'nothing'!r}")
    for key, value in DEFAULTS.items():
        config.setdefault(key, value)
    optimizer = dict(config.get("optimizer") or {})
    # NNCF's samples accept schedule settings both at the top of "optimizer" and in "schedule_params".
    params = optimizer.get("schedule_params") or {}
    _check(params, _OPTIMIZER_KEYS, "optimizer.schedule_params.")
    _check(optimizer, _OPTIMIZER_KEYS, "optimizer.")
    merged = {**OPTIMIZER_DEFAULTS, **(optimizer.get("optimizer_params") or {}), **params, **optimizer}
    _check(merged, _OPTIMIZER_KEYS, "optimizer.optimizer_params.")
    merged["type"] = merged["type"].lower()
    merged["schedule_type"] = merged["schedule_type"].lower()
    config["optimizer"] = {k: merged[k] for k in OPTIMIZER_DEFAULTS}
    return config


def apply_overrides(config: dict, **values) -> dict:
    """Command-line values (those not None) replace the config's."""
    return {**config, **{key: value for key, value in values.items() if value is not None}}
