"""Quantization: the Quantize pass, its placement policy, range initialization, controller and lowering.

- ``policy``: where quantizers go and with which ``QuantSpec`` (annotations in ``node.meta``);
- ``quantize``: the ``Quantize`` pass (canonicalize, annotate, insert ``FakeQuantizer`` modules);
- ``range_init``: range initializers;
- ``controller``: ``QuantizationController`` (initialize, statistics, state, export checks);
- ``lowering``: the lowering passes for ``strip()`` / ``export_onnx()``;
- ``bias_correction``: fast bias correction (``Quantize(fast_bias_correction=True)``);
- ``post_training``: ``quantize_post_training``, ``nncf.quantize``'s one call.
"""
from .controller import QuantizationController, QuantizerInfo
from .policy import DEVICE_RULES, QuantizationPlan, QuantizationPoint, annotations, plan_quantization
from .post_training import quantize_post_training
from .quantize import QUANTIZATION_SCHEMA, Quantize, fold_batch_norms, insert_quantizers
from .range_init import RANGE_TYPES, RangeInitConfig

__all__ = ["Quantize", "quantize_post_training", "QuantizationController", "QuantizerInfo", "plan_quantization", "annotations",
           "QuantizationPlan", "QuantizationPoint", "DEVICE_RULES", "insert_quantizers", "fold_batch_norms",
           "QUANTIZATION_SCHEMA", "RANGE_TYPES", "RangeInitConfig"]
