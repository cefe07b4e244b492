"""``compile_for_compression``: trace, run the compression passes, build the controller."""
from __future__ import annotations

import copy as _copy
from typing import Any, Sequence

import torch

from .config import Config
from .controller import CompressionController
from .errors import ConfigError, InputShapeError
from .pass_manager import PassContext, PassManager
from .tracing import trace

__all__ = ["compile_for_compression"]


def _as_passes(passes_or_config) -> tuple[list, Config | None]:
    if passes_or_config is None:
        return [], None
    if isinstance(passes_or_config, Config):
        return list(passes_or_config.passes), passes_or_config
    if isinstance(passes_or_config, dict):
        config = Config.from_dict(passes_or_config)
        return list(config.passes), config
    if callable(passes_or_config) and hasattr(passes_or_config, "name"):
        return [passes_or_config], None
    if isinstance(passes_or_config, Sequence) and not isinstance(passes_or_config, str):
        passes = list(passes_or_config)
        for i, p in enumerate(passes):
            if not callable(p):
                raise ConfigError(f"passes[{i}]: expected a pass object such as Quantize(bits=8), "
                                  f"got {type(p).__name__}", path=f"passes[{i}]")
        return passes, None
    raise ConfigError(f"compile_for_compression expects a list of passes, a Config or a config dict, "
                      f"got {type(passes_or_config).__name__}")


@torch.no_grad()
def _own_buffers(gm: torch.nn.Module):
    """Give the GraphModule its own copy of every buffer it shares with the user's model.

    Train-mode forwards and BatchNorm adaptation write buffers in place (running
    statistics), and the user's model must never see those writes. Parameters stay
    shared (as torch.fx does): only the user's optimizer writes them. A buffer
    registered in several places stays one tensor.
    """
    clones: dict[int, torch.Tensor] = {}
    for module in gm.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                if id(buffer) not in clones:
                    clones[id(buffer)] = buffer.clone()
                module._buffers[name] = clones[id(buffer)]


def _input_info_error(config: Config, exc: InputShapeError) -> ConfigError:
    """The config's ``input_info`` entries that reach the module that refused them, as a ConfigError."""
    info = config.data["input_info"]
    if isinstance(info, dict):
        fields = {0: "input_info", info.get("keyword"): "input_info"}
        entries = {"input_info": info}
    else:
        positional = [i for i, item in enumerate(info) if "keyword" not in item]
        fields = {n: f"input_info[{i}]" for n, i in enumerate(positional)}
        fields.update({item["keyword"]: f"input_info[{i}]" for i, item in enumerate(info) if "keyword" in item})
        entries = {f"input_info[{i}]": item for i, item in enumerate(info)}
    named = [fields[key] for key in exc.inputs if key in fields] or list(entries)
    shown = " and ".join(f"{field}.sample_size {list(entries[field]['sample_size'])}" for field in named)
    verb = "do not fit" if len(named) > 1 else "does not fit"
    return ConfigError(f"{shown} {verb} the model: {exc.reason}", path=f"{named[0]}.sample_size")


def compile_for_compression(model: torch.nn.Module, passes_or_config=None, example_inputs: Any = None, *,
                            leaf_modules: Sequence[Any] | None = None, copy: bool = False,
                            debug: bool = False) -> tuple[CompressionController, torch.fx.GraphModule]:
    """Trace ``model``, apply the compression passes, return ``(controller, graph_module)``.

    ``passes_or_config``: a list of passes (``[MagnitudeSparsity(...), Quantize(bits=8)]``),
    a ``Config`` or an NNCF-style config dict. ``example_inputs``: a tensor, a tuple of
    positional inputs or a dict of keyword inputs (default: built from the config's
    ``input_info``). The user's model is never modified; the GraphModule shares its
    parameter tensors unless ``copy=True``. ``debug=True`` checks outputs on the
    example inputs after every pass. The GraphModule owns its buffers (BatchNorm running
    statistics): training it never writes into the user's model.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compile_for_compression expects an nn.Module, got {type(model).__name__}")
    passes, config = _as_passes(passes_or_config)
    inputs_from_config = example_inputs is None and config is not None
    if inputs_from_config:
        example_inputs = config.example_inputs()
    if example_inputs is None:
        raise ConfigError("example_inputs are needed to trace the model: pass example_inputs=(x,) "
                          "or give the config an 'input_info'", path="input_info")
    if copy:
        model = _copy.deepcopy(model)
    try:
        gm = trace(model, example_inputs, leaf_modules=leaf_modules)
    except InputShapeError as exc:
        if inputs_from_config:
            raise _input_info_error(config, exc) from exc
        raise
    if not copy:
        _own_buffers(gm)
    manager = PassManager(passes, debug=debug)
    results = manager.run(gm, PassContext.for_graph(gm, debug))
    parts = [r.controller for r in results if r.controller is not None]
    return CompressionController(gm, parts, manager.records), gm
