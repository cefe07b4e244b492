"""ONNX export of lowered GraphModules through ``torch.onnx.export`` (dynamo exporter, onnxscript).

Custom ops lower through translations registered with ``register_onnx_translation``
(an op overload -> a plain Python function using an onnxscript opset module,
see ../shared/OPENVINO.md). The batch dimension of every input is dynamic unless
``dynamic_batch=False``; a graph specialized on the example batch size (a
``view(2, -1)`` baked in by shape-specialized tracing) is exported with static
shapes and a warning saying so.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from .tracing import normalize_example_inputs

__all__ = ["export_onnx", "register_onnx_translation", "onnx_translations", "DEFAULT_OPSET"]

DEFAULT_OPSET = 21  # 4-bit QDQ needs opset 21 (OPENVINO.md); ORT and OpenVINO read it.
_TRANSLATIONS: dict = {}


def register_onnx_translation(op, fn: Callable):
    """Lower ``op`` (e.g. ``torch.ops.fxcompress.fake_quantize.default``) with ``fn`` during export."""
    _TRANSLATIONS[op] = fn


def onnx_translations() -> dict:
    return dict(_TRANSLATIONS)


def _dynamic_shapes(args: tuple, kwargs: dict):
    batch = torch.export.Dim("batch")

    def spec(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return {0: batch}
        if isinstance(value, (tuple, list)):
            return type(value)(spec(v) for v in value)
        return None

    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()} if not args else \
            tuple(spec(a) for a in args) + tuple(spec(v) for v in kwargs.values())
    return tuple(spec(a) for a in args)


def export_onnx(module: torch.nn.Module, path, *, example_inputs=None, dynamic_batch: bool = True,
                opset_version: int = DEFAULT_OPSET, optimize: bool = True) -> str:
    """Export ``module`` to ``path``; returns the path as a string."""
    if example_inputs is None and isinstance(module, torch.fx.GraphModule):
        args, kwargs = tuple(module.meta.get("example_inputs", ())), dict(module.meta.get("example_kwargs", {}))
    else:
        args, kwargs = normalize_example_inputs(example_inputs)
    if not args and not kwargs:
        raise ValueError("export_onnx needs example inputs: compile with example_inputs=... or pass them here")
    path = os.fspath(path)
    module = module.eval()
    common = dict(dynamo=True, opset_version=opset_version, optimize=optimize,
                  custom_translation_table=onnx_translations() or None, verbose=False)
    if dynamic_batch:
        try:
            program = torch.onnx.export(module, args, kwargs=kwargs or None,
                                        dynamic_shapes=_dynamic_shapes(args, kwargs), **common)
        except Exception as exc:  # noqa: BLE001 - retried with static shapes, and the user is told
            warnings.warn(f"export with a dynamic batch dimension failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}); exporting with the example inputs' static shapes",
                          stacklevel=2)
            program = torch.onnx.export(module, args, kwargs=kwargs or None, **common)
    else:
        program = torch.onnx.export(module, args, kwargs=kwargs or None, **common)
    program.save(path)
    return path
