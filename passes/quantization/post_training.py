"""``quantize_post_training``: post-training int8 in one call, as ``nncf.quantize``.

The same ``Quantize`` pass and controller as QAT, with ``nncf.quantize``'s post-training
defaults: activation ranges from ``subset_size`` calibration samples (300), fast bias
correction on, no BatchNorm adaptation (``nncf.quantize`` has none: the BatchNorm layers keep
the statistics they were trained with, and fast bias correction moves their ``bias``).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch

from fxcompress.api import compile_for_compression
from fxcompress.controller import CompressionController
from fxcompress.data import CalibrationData
from fxcompress.errors import ConfigError

from .quantize import Quantize

__all__ = ["quantize_post_training", "DEFAULT_SUBSET_SIZE"]

DEFAULT_SUBSET_SIZE = 300  # nncf.quantize's subset_size


def quantize_post_training(model: torch.nn.Module, calibration_data: Iterable, example_inputs: Any = None, *,
                           subset_size: int = DEFAULT_SUBSET_SIZE, fast_bias_correction: bool = True,
                           model_type: str | None = None, input_fn: Callable | None = None, leaf_modules=None, **quantize_params
                           ) -> tuple[CompressionController, torch.fx.GraphModule]:
    """Quantize ``model`` post-training on ``calibration_data``; returns ``(ctrl, gm)`` ready to evaluate
    or ``ctrl.export_onnx(path)``.

    ``calibration_data``: any loader ``ctrl.initialize`` takes (``input_fn=`` as there).
    ``example_inputs``: for tracing; default the first calibration batch. ``subset_size``: samples
    for the activation ranges and the bias correction. ``quantize_params``: ``Quantize``'s
    arguments (``preset``, ``target_device``, ``ignored_scopes``, ``weights``, ``activations``, ...);
    ``initializer={"range": ...}`` overrides the range settings (its ``num_init_samples`` wins over
    ``subset_size``). ``model_type="transformer"`` (``nncf.ModelType.TRANSFORMER``;
    inferred for Hugging Face models) picks ``Quantize``'s transformer defaults (``preset="mixed"``,
    activation smoothing). The user's model is never modified.
    """
    if not isinstance(subset_size, int) or isinstance(subset_size, bool) or subset_size <= 0:
        raise ConfigError(f"quantize_post_training: subset_size must be a positive integer, got {subset_size!r}",
                          path="subset_size")
    if model_type not in (None, "transformer"):
        raise ConfigError(f"quantize_post_training: model_type must be None or 'transformer', got {model_type!r}",
                          path="model_type")
    if model_type is not None:
        quantize_params["model_type"] = model_type
    initializer = copy.deepcopy(quantize_params.pop("initializer", {}))
    ranges = initializer.setdefault("range", {})
    if isinstance(ranges, dict):
        ranges.setdefault("num_init_samples", subset_size)
    initializer.setdefault("batchnorm_adaptation", {"num_bn_adaptation_samples": 0})
    quantize = Quantize(initializer=initializer, fast_bias_correction=fast_bias_correction, **quantize_params)
    if example_inputs is None:
        data = CalibrationData(calibration_data, input_fn, model=model)
        first = next(iter(data.batches(1)), None)
        if first is None:
            raise ValueError("quantize_post_training: the calibration data yielded no batches")
        args, kwargs = first
        example_inputs = kwargs if kwargs else args
    ctrl, gm = compile_for_compression(model, [quantize], example_inputs, leaf_modules=leaf_modules)
    ctrl.initialize(calibration_data, input_fn=input_fn)
    return ctrl, gm
