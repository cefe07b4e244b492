"""fxcompress.testing: models, random-model strategies, agreement checks and real
data for testing a graph compiler.

The kit builds models, not compressions: it imports nothing else from
fxcompress, only torch (plus hypothesis in :mod:`.strategies` and scikit-learn
inside :func:`load_digits_tensors`).

* :mod:`fxcompress.testing.models` -- hand-written architectures and
  :data:`ARCHITECTURES` (imported here eagerly).
* :mod:`fxcompress.testing.asserts` -- :func:`assert_modules_agree`,
  :func:`max_abs_diff` (eager).
* :mod:`fxcompress.testing.data` -- the sklearn digits and a trained
  :class:`DigitsCNN` (eager; sklearn is imported only when data is loaded).
* :mod:`fxcompress.testing.agreement` -- :func:`quantizer_agreement`: every activation
  quantizer of an exported QDQ model in ONNX Runtime / OpenVINO against the fake-quantized
  graph, both computing it from the same exact upstream values (imported on use: needs onnx).
* :mod:`fxcompress.testing.strategies` -- hypothesis strategies; loaded lazily
  on first access (``fxcompress.testing.strategies`` or
  ``from fxcompress.testing.strategies import conv_nets``), so this package
  imports without hypothesis installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from .asserts import (assert_modules_agree, assert_outputs_agree, assert_state_unchanged, max_abs_diff,
                      module_structure, state_snapshot)
from .data import (default_cache_dir, digits_loaders, evaluate_accuracy, load_digits_tensors,
                   train_digits_cnn)
from .models import (ARCHITECTURES, LEAF_MODULES, MLP, DataDependentGate, DenseNetTiny,
                     DigitsCNN, MobileNetV2Tiny, ModelCase, ModelNeedingLeaf, ResidualDigitsCNN, ResNet,
                     ResNetTiny, TransformerEncoderTiny, build, leaf_modules_for, randomize_norm_layers_,
                     resnet18_like, seeded)

__all__ = [
    # models
    "ARCHITECTURES", "LEAF_MODULES", "leaf_modules_for", "build", "ModelCase", "seeded",
    "randomize_norm_layers_", "ResNetTiny", "ResNet", "resnet18_like", "MobileNetV2Tiny",
    "DenseNetTiny", "TransformerEncoderTiny", "MLP", "DataDependentGate", "ModelNeedingLeaf",
    "DigitsCNN",
    "ResidualDigitsCNN",
    # asserts
    "assert_modules_agree", "assert_outputs_agree", "max_abs_diff", "state_snapshot",
    "assert_state_unchanged", "module_structure",
    # data
    "load_digits_tensors", "digits_loaders", "train_digits_cnn", "evaluate_accuracy",
    "default_cache_dir",
    # lazily imported submodule (needs hypothesis)
    "strategies",
]


def __getattr__(name: str) -> Any:
    if name == "strategies":
        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
